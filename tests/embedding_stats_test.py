"""Tests of supcon_tf.evaluation.embedding_stats on known configurations."""

import math

import numpy as np
import pytest

from supcon_tf.evaluation import embedding_stats as es


def _circle(n):
  angles = 2 * np.pi * np.arange(n) / n
  return np.stack([np.cos(angles), np.sin(angles)], axis=1)


def test_identical_points_are_collapsed():
  x = np.tile([[3.0, 4.0, 0.0]], (6, 1))
  y = np.array([0, 0, 1, 1, 2, 2])
  stats = es.embedding_stats(x, y)
  assert stats['alignment'] == pytest.approx(0.0, abs=1e-12)
  assert stats['positive_cosine'] == pytest.approx(1.0)
  assert stats['negative_cosine'] == pytest.approx(1.0)
  assert stats['dimension_std'] == pytest.approx(0.0, abs=1e-12)
  assert stats['uniformity'] == pytest.approx(0.0, abs=1e-12)
  assert stats['num_positive_pairs'] == 6  # 3 classes x 2 ordered pairs.
  assert stats['num_negative_pairs'] == 24
  assert all(type(v) is float for v in stats.values())  # JSON-ready.


def test_uniformity_on_the_circle_matches_double_sum():
  n, t = 12, 2.0
  x = _circle(n)
  total = 0.0
  for i in range(n):
    for j in range(n):
      if i != j:
        d2 = (x[i, 0] - x[j, 0]) ** 2 + (x[i, 1] - x[j, 1]) ** 2
        total += math.exp(-t * d2)
  expected = math.log(total / (n * (n - 1)))
  # Chord length: |x_i - x_j|^2 = 2 - 2 cos(2 pi (i - j) / n).
  closed = math.log(sum(
      math.exp(-t * (2 - 2 * math.cos(2 * math.pi * k / n)))
      for k in range(1, n)) / (n - 1))
  assert expected == pytest.approx(closed)
  stats = es.embedding_stats(x, np.arange(n))
  assert stats['uniformity'] == pytest.approx(expected, rel=1e-12)
  # Lower than a collapsed set (0) and than a clustered one.
  clustered = _circle(4)[np.arange(n) % 4] + 1e-3 * np.arange(n)[:, None]
  assert stats['uniformity'] < es.embedding_stats(
      clustered, np.arange(n))['uniformity'] < 0
  # Per-dimension std of N equally spaced points: sqrt(1/2) per dimension.
  assert stats['dimension_std'] == pytest.approx(math.sqrt(0.5))
  assert stats['dimension_std_scaled'] == pytest.approx(1.0)
  # No two samples share a label: positive statistics are undefined.
  assert math.isnan(stats['alignment'])


def test_cosines_and_alignment_hand_values():
  # Two classes on orthogonal axes, each with two points at +-30 degrees.
  a = np.deg2rad(30)
  x = np.array([[np.cos(a), np.sin(a)], [np.cos(a), -np.sin(a)],
                [np.sin(a), np.cos(a)], [-np.sin(a), np.cos(a)]])
  y = np.array([0, 0, 1, 1])
  stats = es.embedding_stats(x * 5.0, y)  # Scale must not matter.
  assert stats['positive_cosine'] == pytest.approx(np.cos(2 * a))
  assert stats['alignment'] == pytest.approx(2 - 2 * np.cos(2 * a))
  neg = [x[i] @ x[j] for i in range(2) for j in range(2, 4)]
  assert stats['negative_cosine'] == pytest.approx(np.mean(neg))
  # alpha = 1 gives the mean distance instead.
  assert es.embedding_stats(x, y, alpha=1.0)['alignment'] == pytest.approx(
      np.sqrt(2 - 2 * np.cos(2 * a)))


def test_views_axis_gives_view_pairs():
  rng = np.random.default_rng(0)
  base = rng.normal(size=(5, 8))
  views = np.stack([base, base + 0.1 * rng.normal(size=(5, 8))], axis=1)
  stats = es.embedding_stats(views)  # No labels: positives = views.
  assert stats['num_positive_pairs'] == 10
  assert stats['num_samples'] == 10
  assert 0 < stats['alignment'] < 0.1
  # Same labels for all samples: every pair is positive.
  all_same = es.embedding_stats(views, np.zeros(5, int))
  assert all_same['num_positive_pairs'] == 90
  assert all_same['alignment'] > stats['alignment']


def test_subsample_bounds_memory_and_is_seeded():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(300, 16))
  y = rng.integers(0, 10, 300)
  a = es.embedding_stats(x, y, max_samples=50, seed=3)
  b = es.embedding_stats(x, y, max_samples=50, seed=3)
  c = es.embedding_stats(x, y, max_samples=50, seed=4)
  assert a['num_samples'] == 50
  assert a == b
  assert a['uniformity'] != c['uniformity']
  # Random Gaussian directions: near-uniform, std ~ 1/sqrt(d).
  full = es.embedding_stats(x, y, max_samples=0)
  assert full['num_samples'] == 300
  assert 0.85 < full['dimension_std_scaled'] < 1.15
  assert abs(full['negative_cosine']) < 0.05


def test_bad_shapes():
  with pytest.raises(ValueError, match='labels'):
    es.embedding_stats(np.zeros((3, 2)))
  with pytest.raises(ValueError, match='labels'):
    es.embedding_stats(np.zeros((3, 2)), np.zeros(4, int))
  with pytest.raises(ValueError, match=r'\[n, d\]'):
    es.embedding_stats(np.zeros(3))
