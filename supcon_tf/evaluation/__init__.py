"""Evaluation: one runner and one results writer; classify, kNN, retrieval, monitor, corruptions, plots, report."""
