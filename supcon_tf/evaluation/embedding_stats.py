"""Collapse indicators of a batch of embeddings.

Cheap statistics to watch during training, computed on one batch (or a
subsample) of embeddings, after L2 normalisation:

* `positive_cosine` / `negative_cosine`: mean cosine similarity of positive
  pairs (same label, i != j) and of negative pairs (different labels). A
  healthy supervised embedding has the first near 1 and the second near 0
  or below; a collapsed one has both near 1.
* `alignment` (Wang & Isola 2020, "Understanding Contrastive Representation
  Learning through Alignment and Uniformity on the Hypersphere", eq. 4):
  E_{(x, y) positive} ||f(x) - f(y)||^alpha with alpha = 2. Lower is better;
  0 when positives coincide.
* `uniformity` (ibid., eq. 5): log E_{i != j} exp(-t ||f(x_i) - f(x_j)||^2)
  with t = 2, over all pairs of distinct samples. Lower is more uniform; 0
  for a fully collapsed embedding (all points equal), its maximum.
* `dimension_std`: the standard deviation of each dimension of the
  normalised embedding across samples, averaged over dimensions (SimSiam,
  Chen & He 2021, section 4.1). About 1/sqrt(d) for points spread uniformly
  on the sphere (`dimension_std_scaled` = dimension_std * sqrt(d), about 1);
  0 for a collapsed embedding.

Positives: in Wang & Isola the positive pairs are two augmented views of one
image. Here they are given by labels (two samples of one class are a positive
pair), which is what SupCon pulls together; pass embeddings with a views axis
[n, views, d] and no labels to get Wang & Isola's view pairs, or with labels
to use both (the views of a sample share its label).

Pairs are ordered (i, j) with i != j; every unordered pair counts twice, which
leaves all means unchanged. Statistics are float64 NumPy; the pairwise
matrices are [n, n], so batches larger than `max_samples` are subsampled
(uniformly without replacement, seeded).
"""

from typing import Dict, Optional

import numpy as np

ALIGNMENT_ALPHA = 2.0
UNIFORMITY_T = 2.0


def normalize(embeddings: np.ndarray, epsilon: float = 1e-12) -> np.ndarray:
  """float64 [n, d] rows scaled to unit length (zero rows stay zero)."""
  x = np.asarray(embeddings, np.float64)
  norm = np.sqrt(np.sum(np.square(x), axis=-1, keepdims=True))
  return x / np.maximum(norm, epsilon)


def flatten_views(embeddings: np.ndarray,
                  labels: Optional[np.ndarray] = None):
  """[n, d] or [n, views, d] embeddings -> ([m, d], int64 [m] labels).

  Args:
    embeddings: float [n, d] with `labels` int [n], or float [n, views, d]
      with `labels` int [n] or None (each sample its own class, so the
      positives are the views of one sample).
    labels: as above.

  Returns:
    (embeddings [m, d], labels int64 [m]); m = n or n * views, sample-major.

  Raises:
    ValueError: bad shapes, or [n, d] embeddings without labels.
  """
  x = np.asarray(embeddings)
  if x.ndim == 2:
    if labels is None:
      raise ValueError('[n, d] embeddings need labels to define positives.')
    labels = np.asarray(labels).reshape(-1)
    if labels.shape[0] != x.shape[0]:
      raise ValueError(f'{x.shape[0]} embeddings but {labels.shape[0]} '
                       'labels.')
    return x, labels.astype(np.int64)
  if x.ndim != 3:
    raise ValueError(f'embeddings must be [n, d] or [n, views, d], got '
                     f'{x.shape}.')
  n, views, _ = x.shape
  labels = np.arange(n) if labels is None else np.asarray(labels).reshape(-1)
  if labels.shape[0] != n:
    raise ValueError(f'{n} samples but {labels.shape[0]} labels.')
  return (x.reshape(n * views, -1),
          np.repeat(labels.astype(np.int64), views))


def subsample(embeddings: np.ndarray, labels: np.ndarray, max_samples: int,
              seed: int = 0):
  """At most `max_samples` rows, chosen uniformly without replacement.

  Rows keep their relative order; with n <= max_samples, the inputs as-is.
  """
  n = embeddings.shape[0]
  if max_samples <= 0 or n <= max_samples:
    return embeddings, labels
  keep = np.sort(np.random.default_rng(seed).choice(n, max_samples,
                                                     replace=False))
  return embeddings[keep], labels[keep]


def pair_statistics(x: np.ndarray, labels: np.ndarray, *,
                    alpha: float = ALIGNMENT_ALPHA,
                    t: float = UNIFORMITY_T) -> Dict[str, float]:
  """Cosine, alignment and uniformity of unit rows (see the module doc).

  Args:
    x: float64 [n, d], unit (or zero) rows.
    labels: int [n].
    alpha: alignment exponent.
    t: uniformity temperature.

  Returns:
    'positive_cosine', 'negative_cosine', 'alignment', 'uniformity', and the
    pair counts 'num_positive_pairs', 'num_negative_pairs' (ordered pairs).
    A statistic over an empty set of pairs is NaN.
  """
  n = x.shape[0]
  cosine = x @ x.T  # [n, n]
  # ||a - b||^2 = |a|^2 + |b|^2 - 2 a.b, clipped: rounding can make it < 0.
  sq_norm = np.diag(cosine)
  sq_dist = np.maximum(sq_norm[:, None] + sq_norm[None, :] - 2 * cosine, 0.0)
  off_diagonal = ~np.eye(n, dtype=bool)
  same = labels[:, None] == labels[None, :]
  positive = same & off_diagonal
  negative = ~same

  def mean(values, mask):
    return float(np.mean(values[mask])) if mask.any() else float('nan')

  if off_diagonal.any():
    # log-mean-exp with the max subtracted (the max of -t*d^2 is <= 0, but
    # for large t all terms would underflow).
    logits = -t * sq_dist[off_diagonal]
    top = np.max(logits)
    uniformity = float(top + np.log(np.mean(np.exp(logits - top))))
  else:
    uniformity = float('nan')
  return {
      'positive_cosine': mean(cosine, positive),
      'negative_cosine': mean(cosine, negative),
      'alignment': mean(sq_dist ** (alpha / 2), positive),
      'uniformity': uniformity,
      'num_positive_pairs': float(np.sum(positive)),
      'num_negative_pairs': float(np.sum(negative)),
  }


def dimension_std(x: np.ndarray) -> float:
  """Mean over dimensions of the std across samples of float [n, d] `x`."""
  return float(np.mean(np.std(x, axis=0))) if x.shape[0] else float('nan')


def embedding_stats(
    embeddings: np.ndarray,
    labels: Optional[np.ndarray] = None,
    *,
    max_samples: int = 2048,
    seed: int = 0,
    alpha: float = ALIGNMENT_ALPHA,
    t: float = UNIFORMITY_T,
) -> Dict[str, float]:
  """Collapse indicators of a batch of embeddings (see the module doc).

  Args:
    embeddings: float [n, d] (then `labels` is required) or [n, views, d];
      any scale, normalised here.
    labels: int [n], or None with a views axis (positives = views of one
      sample).
    max_samples: rows used after flattening views, subsampled if more (the
      pairwise matrices are [max_samples, max_samples] float64); <= 0 uses
      all.
    seed: subsampling seed.
    alpha: alignment exponent (Wang & Isola: 2).
    t: uniformity temperature (Wang & Isola: 2).

  Returns:
    float dict: 'positive_cosine', 'negative_cosine', 'alignment',
    'uniformity', 'dimension_std', 'dimension_std_scaled', 'num_samples',
    'num_positive_pairs', 'num_negative_pairs'. NaN where the pairs a
    statistic needs are absent (e.g. no two samples share a label).
  """
  x, labels = flatten_views(embeddings, labels)
  x, labels = subsample(x, labels, max_samples, seed)
  x = normalize(x)
  stats = pair_statistics(x, labels, alpha=alpha, t=t)
  stats['dimension_std'] = dimension_std(x)
  stats['dimension_std_scaled'] = float(
      stats['dimension_std'] * np.sqrt(x.shape[1]))
  stats['num_samples'] = float(x.shape[0])
  return stats
