"""Tests of the tables of supcon_tf.evaluation.report."""

import numpy as np

from supcon_tf.evaluation import report


def test_monitor_table_aligns_epochs_of_runs():
  rows = [{'method': 'SupCon'}, {'method': 'Cross-entropy'}]
  curves = [
      {'knn_top_1_accuracy@20': (np.array([5.04, 10.0]),
                                 np.array([0.5, 0.75]))},
      {'knn_top_1_accuracy@20': (np.array([10.0]), np.array([0.875])),
       'uniformity': (np.array([10.0]), np.array([-1.0]))},
  ]
  assert report.format_monitor_table(rows, curves).splitlines() == [
      '| epoch | SupCon knn_top_1_accuracy@20 | Cross-entropy '
      'knn_top_1_accuracy@20 |',
      '|---|---|---|',
      '| 5 | 50.0% | - |',
      '| 10 | 75.0% | 87.5% |',
  ]
  assert report.format_monitor_table(rows, [{}, {}]) is None


def test_retrieval_table_has_both_settings():
  results = {f'retrieval_{s}_{k}': 0.5 for s in ('loo', 'vs_train')
             for k, _ in report.RETRIEVAL_COLUMNS}
  results.update(retrieval_nmi=0.25, retrieval_ami=0.125)
  rows = [{'method': 'SupCon', 'results': results},
          {'method': 'no retrieval', 'results': {}}]
  lines = report.format_retrieval_table(rows).splitlines()
  assert len(lines) == 4
  assert lines[2] == ('| SupCon | test (leave-one-out) | ' +
                      ' | '.join(['50.0'] * 7) + ' | 0.250 | 0.125 |')
  assert lines[3].startswith('| SupCon | train | 50.0')
  assert report.format_retrieval_table(rows[1:]) is None
