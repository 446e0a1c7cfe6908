"""NumPy oracles of the losses, shared by the loss tests.

Loop-by-loop float64 re-derivations, written from the definitions (DESIGN.md
section 2 and losses/genscl.py's docstring), not from the TF code: one anchor at
a time, one contrast sample at a time. tests/losses_test.py,
losses_chunked_test.py, genscl_test.py and momentum_test.py compare the package
with these; keep a single copy of each here.
"""

import numpy as np


def normalized(shape, seed):
  """Random float32 vectors of unit L2 norm along the last axis."""
  x = np.random.RandomState(seed).randn(*shape).astype(np.float32)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def soft_labels(batch, classes, seed):
  """Dirichlet soft labels `[batch, classes]`, the first row one-hot."""
  rng = np.random.RandomState(seed)
  y = rng.dirichlet(np.ones(classes), size=batch).astype(np.float32)
  y[0] = np.eye(classes)[0]  # A one-hot row among soft ones.
  return y


def numpy_supcon(features, labels=None, temperature=0.07,
                 contrast_mode='all_views', summation_location='outside',
                 denominator_mode='all', positives_cap=-1,
                 scale_by_temperature=True, extra_features=None,
                 extra_labels=None):
  """Loop-by-loop re-derivation of DESIGN.md section 2 in float64.

  Args:
    features: `[batch, views, dim]`.
    labels: int `[batch]`, one-hot / soft `[batch, classes]`, or None
      (SimCLR: each sample its own class).
    extra_features: optional `[K, dim]` extra contrast samples (the momentum
      queue): positives where their `extra_labels` match (never with
      labels=None), negatives otherwise; never anchors, never capped.
    (The other arguments as `supcon_tf.losses.supcon_loss`.)

  Returns:
    float64 `[batch]`, the mean loss of each sample's anchor views.
  """
  f = np.asarray(features, np.float64)
  batch, views, _ = f.shape
  z = f.transpose(1, 0, 2).reshape(views * batch, -1)  # View-major.
  q = (np.zeros([0, z.shape[1]]) if extra_features is None else
       np.asarray(extra_features, np.float64).reshape(-1, z.shape[1]))
  sample_of = lambda j: j % batch  # pylint: disable=unnecessary-lambda-assignment
  if labels is None:
    same = np.eye(batch)
    extra_same = np.zeros([batch, len(q)])
  else:
    labels = np.asarray(labels)
    if labels.ndim == 1:
      same = (labels[:, None] == labels[None, :]).astype(np.float64)
    else:
      same = labels.astype(np.float64) @ labels.T.astype(np.float64)
    if len(q):
      extra = np.asarray(extra_labels)
      if labels.ndim == 1:
        extra_same = (labels[:, None] == extra[None, :]).astype(np.float64)
      else:
        extra_same = labels.astype(np.float64) @ extra.T.astype(np.float64)
    else:
      extra_same = np.zeros([batch, 0])
  capped = same.copy()
  if positives_cap > -1:
    for b in range(batch):
      others = [g for g in range(batch) if g != b]
      # Highest values first, lower index first among equals.
      order = sorted(others, key=lambda g, b=b: (-same[b, g], g))
      keep = set(order[:positives_cap // views]) | {b}
      for g in range(batch):
        if g not in keep:
          capped[b, g] = 0.0
  anchor_rows = range(views * batch) if contrast_mode == 'all_views' else range(
      batch)
  contrast = np.concatenate([z, q])
  per_anchor = {}
  for i in anchor_rows:
    bi = sample_of(i)
    s = contrast @ z[i] / temperature
    s = s - s.max()
    e = np.exp(s)
    pos = np.array([0.0 if j == i else capped[bi, sample_of(j)]
                    for j in range(len(z))] + list(extra_same[bi]))
    neg = np.array([1.0 - same[bi, sample_of(j)] for j in range(len(z))] +
                   list(1.0 - extra_same[bi]))
    neg_sum = (e * neg).sum()
    if denominator_mode == 'all':
      den = np.full(len(contrast), neg_sum + (e * pos).sum())
    elif denominator_mode == 'one_positive':
      den = e + neg_sum
    else:
      den = np.full(len(contrast), neg_sum)
    npos = pos.sum()
    if npos == 0:
      loss = 0.0
    elif summation_location == 'outside':
      loss = -((s - np.log(den)) * pos).sum() / npos
    else:
      loss = -np.log((e / den * pos).sum() / npos)
    if scale_by_temperature:
      loss *= temperature
    per_anchor[i] = loss
  out = np.zeros(batch)
  counts = np.zeros(batch)
  for i, loss in per_anchor.items():
    out[sample_of(i)] += loss
    counts[sample_of(i)] += 1
  return out / counts


def numpy_genscl(features, labels, temperature=0.07,
                 contrast_mode='all_views', scale_by_temperature=True,
                 label_similarity='dot', extra_features=None,
                 extra_labels=None, extra_mask=None):
  """Loop-by-loop re-derivation of the module docstring in float64."""
  f = np.asarray(features, np.float64)
  batch, views, _ = f.shape
  z = f.transpose(1, 0, 2).reshape(views * batch, -1)  # View-major.
  if labels is None:
    y = np.eye(batch)
  else:
    y = np.asarray(labels, np.float64)
    if y.ndim == 1:
      y = np.eye(int(y.max()) + 1)[y.astype(int)]
  extra_z = np.zeros([0, z.shape[1]])
  extra_y = np.zeros([0, y.shape[1]])
  if extra_features is not None:
    keep = (np.ones(len(extra_features)) if extra_mask is None else
            np.asarray(extra_mask)) > 0
    extra_z = np.asarray(extra_features, np.float64)[keep]
    if labels is None:
      extra_y = np.zeros([len(extra_z), y.shape[1]])
    else:
      extra_y = np.asarray(extra_labels, np.float64)[keep]
  if label_similarity == 'cosine':
    y = y / np.linalg.norm(y, axis=1, keepdims=True)
    if len(extra_y):
      extra_y = extra_y / np.linalg.norm(extra_y, axis=1, keepdims=True)
  anchors = range(views * batch) if contrast_mode == 'all_views' else range(
      batch)
  out = np.zeros(batch)
  counts = np.zeros(batch)
  for i in anchors:
    bi = i % batch
    others = [j for j in range(views * batch) if j != i]
    cz = np.concatenate([z[others], extra_z])
    cy = np.concatenate([y[[j % batch for j in others]], extra_y])
    s = cz @ z[i] / temperature
    w = cy @ y[bi]
    if w.sum() <= 0:
      loss = 0.0
    else:
      t = w / w.sum()
      log_p = s - np.log(np.exp(s - s.max()).sum()) - s.max()
      loss = -(t * log_p).sum()
    if scale_by_temperature:
      loss *= temperature
    out[bi] += loss
    counts[bi] += 1
  return out / counts
