"""Retrieval metrics of an embedding, as metric learning measures them.

The metrics of Musgrave et al. 2020 ("A Metric Learning Reality Check",
section 3.2) and of the pytorch-metric-learning `AccuracyCalculator`:

* precision@1: fraction of queries whose nearest neighbour has their class.
* R-precision: for a query with R relevant bank items (same class), the
  fraction of its R nearest neighbours that are relevant.
* MAP@R: mean average precision at R,
  (1/R) * sum_{i=1..R} P(i) * rel(i), where rel(i) = 1 if the i-th neighbour
  is relevant and P(i) is the precision of the first i neighbours. It rewards
  ranking the relevant items first, unlike R-precision.
* recall@k (k = 1, 2, 4, 8 by default; the "Recall@K" of the deep metric
  learning literature, e.g. Oh Song et al. 2016): fraction of queries with at
  least one relevant item among their k nearest neighbours.
* NMI / AMI: k-means on the query embeddings with one cluster per class,
  scored against the labels with scikit-learn's (adjusted) normalised mutual
  information.

Similarity is the cosine: embeddings are L2-normalised and compared by dot
product, in float32. Inputs are NumPy arrays (or anything `np.asarray`
takes); results are Python floats.

Two settings:

* leave-one-out (`bank=None`): every query is retrieved against all the
  other queries; a query never retrieves itself. R = (size of its class) - 1.
* query vs bank (e.g. test images against train images): R = number of bank
  items of the query's class.

Queries with R = 0 (a singleton class in leave-one-out, or a class absent
from the bank) cannot retrieve anything relevant; like pytorch-metric-learning
(its "lone queries") they are left out of every neighbour metric (precision@1,
R-precision, MAP@R, recall@k). Their number is reported as
`num_queries_without_relevant`, and `num_queries_evaluated` counts the rest.
The clustering scores use all queries.

Memory: queries are processed `chunk_size` at a time against the whole bank
(`tf.matmul` and `tf.math.top_k`, eager, on the default device), and only the
K nearest neighbours of each query are kept, with
K = min(max(max R, max k), max_neighbours, bank size). The largest
intermediates are the [chunk_size, bank_size] similarities and the
[num_queries, K] neighbour indices, never [num_queries, bank_size]. As in
pytorch-metric-learning (its `k` argument), R is capped at K: a query with
more than `max_neighbours` relevant items is scored on its first
`max_neighbours` neighbours with R = max_neighbours.

Ties: neighbours are ordered by decreasing similarity, and items of equal
similarity by increasing bank index (`tf.math.top_k`'s documented order),
also at the K-th place. The result is therefore
deterministic, but an embedding that maps many items to one point is scored
by the dataset's order among them; ties in the float32 similarity are rare
for trained embeddings.
"""

from typing import Dict, Optional, Sequence

import numpy as np
from sklearn import cluster
from sklearn import metrics as sk_metrics
import tensorflow as tf

DEFAULT_KS = (1, 2, 4, 8)


def l2_normalize(x: np.ndarray, epsilon: float = 1e-12) -> np.ndarray:
  """Rows of `x` scaled to unit length (zero rows stay zero).

  Args:
    x: float [n, d].
    epsilon: lower bound of the norm, so zero rows do not divide by zero.

  Returns:
    float32 [n, d].
  """
  x = np.asarray(x, np.float32)
  norm = np.sqrt(np.sum(np.square(x), axis=-1, keepdims=True))
  return x / np.maximum(norm, epsilon)


def top_k_stable(scores, k: int) -> np.ndarray:
  """Column indices of the k largest scores of each row, in order.

  `tf.math.top_k`, whose documented contract is that of equal elements the
  lower-indexed comes first; this holds for the selection too (of the
  columns tied with the k-th largest score, the lowest-indexed are kept).
  It keeps only [rows, k] outputs, unlike a sort or `np.argpartition` copy
  of the whole [rows, n] block.

  Args:
    scores: float [rows, n] (NumPy or tensor), no NaN.
    k: how many, 1 <= k <= n.

  Returns:
    int64 [rows, k]: row r lists its columns by decreasing score, equal
    scores by increasing column.
  """
  n = scores.shape[-1]
  if not 1 <= k <= n:
    raise ValueError(f'k must be in [1, {n}], got {k}.')
  return tf.math.top_k(scores, k=k, sorted=True).indices.numpy().astype(
      np.int64)


def nearest_neighbours(
    query: np.ndarray,
    bank: Optional[np.ndarray] = None,
    *,
    k: int,
    chunk_size: int = 1024,
) -> np.ndarray:
  """The k most cosine-similar bank items of each query, chunk by chunk.

  Memory: one float32 [chunk_size, n] similarity block at a time (ImageNet
  train as the bank, chunk 1024: 5.2 GB; lower `chunk_size` to fit).

  Args:
    query: float [q, d] embeddings (normalised here).
    bank: float [n, d], or None for leave-one-out against `query` itself (a
      query is never its own neighbour).
    k: neighbours per query; at most n (n - 1 in leave-one-out).
    chunk_size: queries scored at once.

  Returns:
    int64 [q, k] bank indices (query indices in leave-one-out), nearest
    first, ties by increasing index (see `top_k_stable`).
  """
  if chunk_size < 1:
    raise ValueError(f'chunk_size must be >= 1, got {chunk_size}.')
  query = tf.constant(l2_normalize(query))
  leave_one_out = bank is None
  bank = query if leave_one_out else tf.constant(l2_normalize(bank))
  num_queries = int(query.shape[0])
  out = np.empty((num_queries, k), np.int64)
  for start in range(0, num_queries, chunk_size):
    stop = min(start + chunk_size, num_queries)
    similarity = tf.matmul(query[start:stop], bank, transpose_b=True)
    if not leave_one_out:
      out[start:stop] = top_k_stable(similarity, k)
      continue
    # Take one more and drop the query itself: the others keep their order
    # (ties included). If rounding ranked it below k others, drop the last.
    ranked = top_k_stable(similarity, k + 1)  # [c, k + 1]
    is_self = ranked == np.arange(start, stop)[:, None]
    drop = np.where(is_self.any(axis=1), is_self.argmax(axis=1), k)
    keep = np.ones(ranked.shape, bool)
    keep[np.arange(stop - start), drop] = False
    out[start:stop] = ranked[keep].reshape(stop - start, k)
  return out


def relevant_counts(query_labels: np.ndarray,
                    bank_labels: Optional[np.ndarray] = None) -> np.ndarray:
  """R of each query: bank items of its class (itself excluded if no bank).

  Args:
    query_labels: int [q].
    bank_labels: int [n], or None for leave-one-out.

  Returns:
    int64 [q].
  """
  query_labels = np.asarray(query_labels)
  leave_one_out = bank_labels is None
  bank_labels = query_labels if leave_one_out else np.asarray(bank_labels)
  classes, counts = np.unique(bank_labels, return_counts=True)
  if not len(classes):
    return np.zeros(query_labels.shape, np.int64)
  position = np.minimum(np.searchsorted(classes, query_labels),
                        len(classes) - 1)
  r = np.where(classes[position] == query_labels, counts[position], 0)
  return (r - 1 if leave_one_out else r).astype(np.int64)


def metrics_from_matches(
    matches: np.ndarray,
    num_relevant: np.ndarray,
    ks: Sequence[int] = DEFAULT_KS,
) -> Dict[str, float]:
  """Neighbour metrics from the relevance of each query's ranked neighbours.

  Args:
    matches: bool [q, K]: matches[i, j] is True if the j-th nearest neighbour
      of query i has its class.
    num_relevant: int [q], R of each query (before the cap at K).
    ks: the k of recall@k; each k > K is scored at K.

  Returns:
    'precision_at_1', 'r_precision', 'map_at_r', 'recall_at_<k>' for each k,
    averaged over the queries with R > 0 (NaN if there are none), and the
    counts 'num_queries_evaluated' and 'num_queries_without_relevant'.
  """
  matches = np.asarray(matches, bool)
  num_relevant = np.asarray(num_relevant, np.int64)
  num_queries, num_neighbours = matches.shape
  valid = num_relevant > 0
  results = {
      'num_queries_evaluated': float(np.sum(valid)),
      'num_queries_without_relevant': float(num_queries - np.sum(valid)),
  }
  matches = matches[valid]
  r = np.minimum(num_relevant[valid], num_neighbours)  # The cap at K.

  def mean(x):
    return float(np.mean(x)) if x.size else float('nan')

  rank = np.arange(1, num_neighbours + 1)
  within_r = rank[None, :] <= r[:, None]  # [q', K]
  hits = matches & within_r
  precision_at_rank = np.cumsum(matches, axis=1) / rank  # P(i)
  safe_r = np.maximum(r, 1)
  results['precision_at_1'] = (
      mean(matches[:, 0]) if num_neighbours else float('nan'))
  results['r_precision'] = mean(np.sum(hits, axis=1) / safe_r)
  results['map_at_r'] = mean(
      np.sum(precision_at_rank * hits, axis=1) / safe_r)
  for k in ks:
    if k < 1:
      raise ValueError(f'recall@k needs k >= 1, got {k}.')
    results[f'recall_at_{k}'] = mean(
        np.any(matches[:, :min(k, num_neighbours)], axis=1))
  return results


def clustering_scores(embeddings: np.ndarray, labels: np.ndarray, *,
                      seed: int = 0, n_init: int = 1) -> Dict[str, float]:
  """NMI and AMI of k-means on the embedding, one cluster per class.

  Args:
    embeddings: float [n, d] (normalised here, so clustering is by cosine).
    labels: int [n].
    seed: k-means++ initialisation seed.
    n_init: k-means restarts (the best inertia is kept).

  Returns:
    {'nmi': ..., 'ami': ...}, each 1.0 when the clusters are the classes.
  """
  labels = np.asarray(labels)
  num_classes = len(np.unique(labels))
  if num_classes < 2 or num_classes > len(labels) - 1:
    # Mutual information is degenerate with one class or one item per class.
    return {'nmi': float('nan'), 'ami': float('nan')}
  kmeans = cluster.KMeans(n_clusters=num_classes, n_init=n_init,
                          random_state=seed)
  assignment = kmeans.fit_predict(l2_normalize(embeddings))
  return {
      'nmi': float(sk_metrics.normalized_mutual_info_score(labels, assignment)),
      'ami': float(sk_metrics.adjusted_mutual_info_score(labels, assignment)),
  }


def num_neighbours_needed(num_relevant: np.ndarray, ks: Sequence[int],
                          max_neighbours: int, bank_size: int) -> int:
  """K = min(max(max R, max k), max_neighbours, bank_size), at least 1."""
  largest = max([int(np.max(num_relevant, initial=0))] + [int(k) for k in ks])
  return max(1, min(largest, max_neighbours, bank_size))


def retrieval_metrics(
    query: np.ndarray,
    query_labels: np.ndarray,
    bank: Optional[np.ndarray] = None,
    bank_labels: Optional[np.ndarray] = None,
    *,
    ks: Sequence[int] = DEFAULT_KS,
    chunk_size: int = 1024,
    max_neighbours: int = 1000,
    clustering: bool = True,
    seed: int = 0,
) -> Dict[str, float]:
  """All retrieval metrics of an embedding (see the module docstring).

  Args:
    query: float [q, d] embeddings, any scale (normalised here).
    query_labels: int [q].
    bank: float [n, d] embeddings to retrieve from, or None for leave-one-out
      retrieval among the queries.
    bank_labels: int [n]; given exactly when `bank` is.
    ks: the k of recall@k, each in [1, max_neighbours].
    chunk_size: queries scored at once (memory O(chunk_size * n)).
    max_neighbours: the most neighbours kept per query; R is capped at it.
    clustering: also compute 'nmi' and 'ami' (k-means on the queries).
    seed: k-means seed.

  Returns:
    A dict of floats: 'precision_at_1', 'r_precision', 'map_at_r',
    'recall_at_<k>' per k, 'num_queries_evaluated',
    'num_queries_without_relevant', 'num_neighbours' (the K used), and, if
    `clustering`, 'nmi' and 'ami'.

  Raises:
    ValueError: mismatched shapes, a bank without labels (or labels without a
      bank), or a k outside [1, max_neighbours].
  """
  query = np.asarray(query)
  query_labels = np.asarray(query_labels).reshape(-1)
  if (bank is None) != (bank_labels is None):
    raise ValueError('Give both bank and bank_labels, or neither '
                     '(leave-one-out).')
  if query.ndim != 2 or query.shape[0] != query_labels.shape[0]:
    raise ValueError(f'query must be [q, d] with q = len(query_labels), got '
                     f'{query.shape} and {query_labels.shape}.')
  if bank is not None:
    bank = np.asarray(bank)
    bank_labels = np.asarray(bank_labels).reshape(-1)
    if (bank.ndim != 2 or bank.shape[0] != bank_labels.shape[0] or
        bank.shape[1] != query.shape[1]):
      raise ValueError(f'bank must be [n, {query.shape[1]}] with n = '
                       f'len(bank_labels), got {bank.shape} and '
                       f'{bank_labels.shape}.')
  if not ks or any(not 1 <= k <= max_neighbours for k in ks):
    raise ValueError(f'Each k of recall@k must be in [1, max_neighbours = '
                     f'{max_neighbours}], got {tuple(ks)}.')

  num_relevant = relevant_counts(query_labels, bank_labels)
  bank_size = query.shape[0] - 1 if bank is None else bank.shape[0]
  results: Dict[str, float] = {}
  if bank_size >= 1 and query.shape[0] >= 1:
    k = num_neighbours_needed(num_relevant, ks, max_neighbours, bank_size)
    neighbours = nearest_neighbours(query, bank, k=k, chunk_size=chunk_size)
    labels = query_labels if bank is None else bank_labels
    matches = labels[neighbours] == query_labels[:, None]
  else:  # Nothing to retrieve: every query is without relevant items.
    k = 0
    matches = np.zeros((query.shape[0], 0), bool)
  results.update(metrics_from_matches(matches, num_relevant, ks))
  results['num_neighbours'] = float(k)
  if clustering:
    results.update(clustering_scores(query, query_labels, seed=seed))
  return results
