"""Tests of supcon_tf.evaluation.retrieval against brute force and hand values."""

import numpy as np
import pytest

from supcon_tf.evaluation import retrieval


def brute_force(query, query_labels, bank=None, bank_labels=None,
                ks=(1, 2, 4, 8), max_neighbours=1000):
  """Full sort of the whole similarity matrix, one query at a time."""
  q = query / np.linalg.norm(query, axis=1, keepdims=True)
  loo = bank is None
  b = q if loo else bank / np.linalg.norm(bank, axis=1, keepdims=True)
  bl = query_labels if loo else bank_labels
  p1, rp, mapr, rec = [], [], [], {k: [] for k in ks}
  skipped = 0
  for i in range(len(q)):
    ids = [j for j in range(len(b)) if not (loo and j == i)]
    sims = (b[ids].astype(np.float64) @ q[i].astype(np.float64))
    # Sort by (-similarity, index).
    order = sorted(range(len(ids)), key=lambda t: (-sims[t], ids[t]))
    rel = np.array([bl[ids[t]] == query_labels[i] for t in order])
    r = int(rel.sum())
    if r == 0:
      skipped += 1
      continue
    r = min(r, max_neighbours)
    p1.append(rel[0])
    rp.append(rel[:r].mean())
    ap = sum(rel[:m + 1].mean() for m in range(r) if rel[m]) / r
    mapr.append(ap)
    for k in ks:
      rec[k].append(rel[:k].any())
  out = {'precision_at_1': np.mean(p1), 'r_precision': np.mean(rp),
         'map_at_r': np.mean(mapr), 'num_queries_without_relevant': skipped}
  out.update({f'recall_at_{k}': np.mean(v) for k, v in rec.items()})
  return out


def _random(n, d, classes, seed):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, classes, n)
  # Class means plus noise: metrics strictly between 0 and 1.
  means = rng.normal(size=(classes, d))
  return (means[labels] + 1.5 * rng.normal(size=(n, d))).astype(np.float32), labels


def _assert_matches(got, want):
  for key, value in want.items():
    assert got[key] == pytest.approx(value, abs=1e-9), key


@pytest.mark.parametrize('chunk_size', [7, 1024])
def test_leave_one_out_matches_brute_force(chunk_size):
  x, y = _random(53, 5, 4, seed=0)
  got = retrieval.retrieval_metrics(x, y, chunk_size=chunk_size,
                                    clustering=False)
  want = brute_force(x, y)
  _assert_matches(got, want)
  assert 0 < got['map_at_r'] < got['recall_at_8'] <= 1


@pytest.mark.parametrize('chunk_size', [3, 11])
def test_query_vs_bank_matches_brute_force(chunk_size):
  x, y = _random(40, 6, 5, seed=1)
  b, bl = _random(61, 6, 5, seed=2)
  # A query class absent from the bank: those queries have R = 0.
  y[:3] = 9
  got = retrieval.retrieval_metrics(x, y, b, bl, chunk_size=chunk_size,
                                    clustering=False)
  want = brute_force(x, y, b, bl)
  assert want['num_queries_without_relevant'] == 3
  _assert_matches(got, want)
  assert got['num_queries_evaluated'] == 37


def test_max_neighbours_caps_r():
  x, y = _random(30, 4, 2, seed=3)
  got = retrieval.retrieval_metrics(x, y, ks=(1, 2), max_neighbours=5,
                                    clustering=False)
  assert got['num_neighbours'] == 5
  _assert_matches(got, brute_force(x, y, ks=(1, 2), max_neighbours=5))


def test_map_at_r_hand_value():
  # Ranking [relevant, irrelevant, relevant] with R = 2.
  matches = np.array([[True, False, True]])
  got = retrieval.metrics_from_matches(matches, np.array([2]), ks=(1, 2, 3))
  assert got['map_at_r'] == pytest.approx((1 / 1 + 0) / 2)  # Only top R = 2.
  # With R = 3 (a third relevant item beyond the list) the third rank counts.
  got3 = retrieval.metrics_from_matches(matches, np.array([3]), ks=(1,))
  assert got3['r_precision'] == pytest.approx(2 / 3)
  # R is capped at K = 3 (the list length): same as R = 3.
  got9 = retrieval.metrics_from_matches(matches, np.array([9]), ks=(1,))
  assert got9['map_at_r'] == pytest.approx((1 / 1 + 2 / 3) / 3)
  assert got['r_precision'] == pytest.approx(1 / 2)
  assert got['precision_at_1'] == 1.0
  assert got['recall_at_2'] == 1.0


def test_map_at_r_counts_only_the_first_r_ranks():
  # Musgrave et al.: MAP@R = (1/R) sum_{i<=R} P(i) rel(i). The uncapped
  # average precision of [1, 0, 1] would be (1/1 + 2/3) / 2; MAP@R with R = 2
  # stops at rank 2. Two rows: [1, 0, 1] (R = 2) and [0, 1, 1] (R = 2).
  got = retrieval.metrics_from_matches(
      np.array([[True, False, True], [False, True, True]]),
      np.array([2, 2]), ks=(1,))
  assert got['map_at_r'] == pytest.approx(((1 + 0) / 2 + (0 + 1 / 2) / 2) / 2)
  assert got['map_at_r'] != pytest.approx(((1 + 2 / 3) / 2 + 0.5) / 2)


def test_hand_ranking_through_embeddings():
  # Query at angle 0; bank items at decreasing similarity: class 1, 0, 1, 0.
  angles = np.array([0.1, 0.3, 0.5, 0.7])
  bank = np.stack([np.cos(angles), np.sin(angles)], axis=1)
  bank_labels = np.array([1, 0, 1, 0])
  query = np.array([[1.0, 0.0]])
  got = retrieval.retrieval_metrics(query, np.array([1]), bank, bank_labels,
                                    ks=(1, 2), clustering=False)
  # R = 2, ranking [1, 0, 1, 0]: MAP@R = (1/1 + 0) / 2, R-precision = 1/2.
  assert got['map_at_r'] == pytest.approx(0.5)
  assert got['r_precision'] == pytest.approx(0.5)
  assert got['precision_at_1'] == 1.0


def test_ties_broken_by_index():
  scores = np.array([[0.5, 1.0, 0.5, 1.0, 0.5]])
  np.testing.assert_array_equal(retrieval.top_k_stable(scores, 3), [[1, 3, 0]])
  np.testing.assert_array_equal(retrieval.top_k_stable(scores, 4),
                                [[1, 3, 0, 2]])
  # Many ties across the k-th place, in a long row: lowest indices win.
  rows = np.random.default_rng(0).integers(0, 3, (3, 3000)).astype(np.float32)
  want = np.stack([np.lexsort((np.arange(3000), -r))[:777] for r in rows])
  np.testing.assert_array_equal(retrieval.top_k_stable(rows, 777), want)
  # Through the metrics: the query ties with a wrong-class item at index 0
  # and a right-class item at index 1; the lower index wins.
  bank = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
  got = retrieval.retrieval_metrics(np.array([[1.0, 0.0]]), np.array([1]),
                                    bank, np.array([0, 1, 0]), ks=(1, 2),
                                    clustering=False)
  assert got['precision_at_1'] == 0.0
  assert got['recall_at_2'] == 1.0
  flipped = retrieval.retrieval_metrics(
      np.array([[1.0, 0.0]]), np.array([1]), bank, np.array([1, 0, 0]),
      ks=(1,), clustering=False)
  assert flipped['precision_at_1'] == 1.0


def test_leave_one_out_never_retrieves_self_and_excludes_singletons():
  # Class 2 has one member: R = 0, left out. Identical points everywhere so
  # only the self-exclusion decides.
  x = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [-1.0, 0.0]])
  y = np.array([0, 0, 1, 1, 2])
  np.testing.assert_array_equal(retrieval.relevant_counts(y), [1, 1, 1, 1, 0])
  neighbours = retrieval.nearest_neighbours(x, k=1, chunk_size=2)
  np.testing.assert_array_equal(neighbours[:4, 0], [1, 0, 3, 2])
  # k = n - 1: every other item, never itself, ties by index.
  all_others = retrieval.nearest_neighbours(x, k=4, chunk_size=3)
  for i, row in enumerate(all_others):
    assert i not in row and sorted(row) == sorted(set(range(5)) - {i})
  np.testing.assert_array_equal(all_others[0], [1, 2, 3, 4])
  got = retrieval.retrieval_metrics(x, y, ks=(1, 2), clustering=False)
  assert got['num_queries_without_relevant'] == 1
  assert got['num_queries_evaluated'] == 4
  # The singleton would have scored 0 everywhere; excluded, all are perfect.
  for key in ('precision_at_1', 'r_precision', 'map_at_r', 'recall_at_1'):
    assert got[key] == 1.0, key


def test_k_larger_than_class():
  # Two classes of 2 items, k = 8 > bank: recall@8 is scored on all 3 others.
  x = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
  y = np.array([0, 0, 1, 1])
  got = retrieval.retrieval_metrics(x, y, clustering=False)
  assert got['num_neighbours'] == 3
  assert got['recall_at_8'] == 1.0 and got['precision_at_1'] == 1.0


def test_perfect_embedding_scores_one_everywhere():
  rng = np.random.default_rng(0)
  y = np.repeat(np.arange(4), 6)
  x = np.eye(4)[y] + 0.01 * rng.normal(size=(24, 4))
  got = retrieval.retrieval_metrics(x, y, chunk_size=5)
  for key in ('precision_at_1', 'r_precision', 'map_at_r', 'recall_at_1',
              'recall_at_2', 'recall_at_4', 'recall_at_8', 'nmi', 'ami'):
    assert got[key] == pytest.approx(1.0), key
  assert all(type(v) is float for v in got.values())  # JSON-ready.
  vs_bank = retrieval.retrieval_metrics(x[::2], y[::2], x[1::2], y[1::2])
  assert vs_bank['map_at_r'] == pytest.approx(1.0)
  assert vs_bank['nmi'] == pytest.approx(1.0)


def test_random_labels_score_low_clustering():
  x, _ = _random(60, 4, 3, seed=5)
  y = np.random.default_rng(9).integers(0, 3, 60)
  got = retrieval.clustering_scores(x, y, seed=0)
  assert got['ami'] < 0.2 and got['nmi'] < 0.3


def test_bad_arguments():
  x = np.zeros((4, 2), np.float32)
  y = np.zeros(4, int)
  with pytest.raises(ValueError, match='bank_labels'):
    retrieval.retrieval_metrics(x, y, bank=x)
  with pytest.raises(ValueError, match='max_neighbours'):
    retrieval.retrieval_metrics(x, y, ks=(2000,))
  with pytest.raises(ValueError, match='query'):
    retrieval.retrieval_metrics(x, y[:3])
