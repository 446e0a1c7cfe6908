"""Label mixing (CutMix, Mixup) on multi-view batches.

Both take a batch of views `[batch, views, h, w, 3]` and one-hot (or soft)
labels `[batch, classes]` and return the mixed images and soft labels
`[batch, classes]`. One partner permutation and one lambda are drawn per call
(per replica and step in training) and used for every view of a sample, and
CutMix pastes the same box into every view, so the views of a sample stay
views of the same mixed image and share its one soft label (what GenSCL's
per-sample labels need).

* Mixup (Zhang et al., 2018): x = lam * x_i + (1 - lam) * x_perm(i),
  y = lam * y_i + (1 - lam) * y_perm(i), lam ~ Beta(alpha, alpha).
* CutMix (Yun et al., 2019): a box of area (1 - lam) * h * w (up to rounding
  to whole pixels) from the partner replaces the same box of the image; the
  box lies entirely inside the image (unlike the release, which clips a box
  centred anywhere, so its area can fall short of 1 - lam), and the labels
  mix by the actual pasted area: y = (1 - a) * y_i + a * y_perm(i) with a =
  box area / (h * w).

Mixing whitened images is the same as whitening mixed ones (whitening is
affine and the mixing weights sum to 1), so mixing happens on the
pipeline's final images, on the accelerator, inside the train step.

Randomness is stateless: the same `seed` gives the same mix.
"""

from typing import Tuple

import tensorflow as tf

from supcon_tf import enums


def _seeds(seed, count: int):
  """`count` independent stateless seeds int64 [2] derived from `seed`."""
  seed = tf.convert_to_tensor(seed)
  if seed.shape.rank == 0:
    seed = tf.stack([tf.cast(seed, tf.int64), tf.constant(0, tf.int64)])
  seed = tf.cast(seed, tf.int64)
  # (int64 data: a Python int would make fold_in cast the seed to int32.)
  return [tf.random.experimental.stateless_fold_in(seed,
                                                   tf.constant(i, tf.int64))
          for i in range(count)]


def sample_beta(alpha: float, seed) -> tf.Tensor:
  """float32 scalar lam ~ Beta(alpha, alpha) (stateless)."""
  s1, s2 = _seeds(seed, 2)
  g1 = tf.random.stateless_gamma([], s1, alpha=alpha, dtype=tf.float32)
  g2 = tf.random.stateless_gamma([], s2, alpha=alpha, dtype=tf.float32)
  total = g1 + g2
  # Both gammas underflow to 0 only for tiny alpha; then lam is 0 or 1.
  return tf.where(total > 0, g1 / tf.where(total > 0, total, 1.0),
                  tf.cast(g1 >= g2, tf.float32))


def partner_permutation(batch_size, seed) -> tf.Tensor:
  """int32 [batch] uniformly random permutation (stateless)."""
  keys = tf.random.stateless_uniform(tf.reshape(batch_size, [1]), seed)
  return tf.argsort(keys, stable=True)


def _check(images: tf.Tensor, labels: tf.Tensor, alpha: float, name: str):
  if images.shape.rank != 5:
    raise ValueError(f'{name}: images must be [batch, views, h, w, c], got '
                     f'shape {images.shape}.')
  if labels.shape.rank != 2:
    raise ValueError(f'{name}: labels must be one-hot / soft [batch, '
                     f'num_classes], got shape {labels.shape}.')
  if isinstance(alpha, (int, float)) and alpha <= 0:
    raise ValueError(f'{name}: alpha must be > 0, got {alpha}.')


def mixup(images, labels_one_hot, alpha: float,
          seed) -> Tuple[tf.Tensor, tf.Tensor]:
  """Mixup of a multi-view batch.

  Args:
    images: float [batch, views, h, w, c] (any float dtype; kept).
    labels_one_hot: float [batch, num_classes] one-hot or soft labels.
    alpha: Beta(alpha, alpha) concentration, > 0.
    seed: int [2] (or scalar) stateless seed.

  Returns:
    (images of the same shape and dtype, float32 [batch, num_classes]).
  """
  images = tf.convert_to_tensor(images)
  labels = tf.cast(tf.convert_to_tensor(labels_one_hot), tf.float32)
  _check(images, labels, alpha, 'mixup')
  lam_seed, perm_seed = _seeds(seed, 2)
  lam = sample_beta(alpha, lam_seed)
  perm = partner_permutation(tf.shape(images)[0], perm_seed)
  lam_x = tf.cast(lam, images.dtype)
  mixed = lam_x * images + (1 - lam_x) * tf.gather(images, perm)
  mixed_labels = lam * labels + (1 - lam) * tf.gather(labels, perm)
  return mixed, mixed_labels


def cutmix_box(height, width, lam, seed) -> Tuple[tf.Tensor, ...]:
  """A box of about (1 - lam) of the image, inside the image.

  Args:
    height, width: int32 scalars, the image size.
    lam: float32 scalar in [0, 1], the fraction of the image kept.
    seed: int64 [2] stateless seed of the box position.

  Returns:
    (top, left, box_height, box_width), int32 scalars, with
    box_height * box_width ~= (1 - lam) * height * width.
  """
  ratio = tf.sqrt(1.0 - tf.clip_by_value(lam, 0.0, 1.0))
  h = tf.cast(height, tf.float32)
  w = tf.cast(width, tf.float32)
  box_h = tf.cast(tf.round(h * ratio), tf.int32)
  box_w = tf.cast(tf.round(w * ratio), tf.int32)
  offsets = tf.random.stateless_uniform([2], seed)
  top = tf.cast(tf.floor(offsets[0] * tf.cast(height - box_h + 1, tf.float32)),
                tf.int32)
  left = tf.cast(tf.floor(offsets[1] * tf.cast(width - box_w + 1, tf.float32)),
                 tf.int32)
  top = tf.minimum(top, height - box_h)
  left = tf.minimum(left, width - box_w)
  return top, left, box_h, box_w


def cutmix(images, labels_one_hot, alpha: float,
           seed) -> Tuple[tf.Tensor, tf.Tensor]:
  """CutMix of a multi-view batch (same partner and box for all views).

  Args:
    images: float [batch, views, h, w, c] (any float dtype; kept).
    labels_one_hot: float [batch, num_classes] one-hot or soft labels.
    alpha: Beta(alpha, alpha) concentration, > 0.
    seed: int [2] (or scalar) stateless seed.

  Returns:
    (images of the same shape and dtype, float32 [batch, num_classes]), the
    labels mixed by the actual box area.
  """
  images = tf.convert_to_tensor(images)
  labels = tf.cast(tf.convert_to_tensor(labels_one_hot), tf.float32)
  _check(images, labels, alpha, 'cutmix')
  lam_seed, perm_seed, box_seed = _seeds(seed, 3)
  lam = sample_beta(alpha, lam_seed)
  perm = partner_permutation(tf.shape(images)[0], perm_seed)
  shape = tf.shape(images)
  height, width = shape[2], shape[3]
  top, left, box_h, box_w = cutmix_box(height, width, lam, box_seed)
  rows = tf.range(height)
  cols = tf.range(width)
  in_rows = tf.logical_and(rows >= top, rows < top + box_h)
  in_cols = tf.logical_and(cols >= left, cols < left + box_w)
  box = tf.logical_and(in_rows[:, None], in_cols[None, :])  # [h, w]
  mixed = tf.where(box[None, None, :, :, None], tf.gather(images, perm),
                   images)
  pasted = tf.cast(box_h * box_w, tf.float32) / tf.cast(height * width,
                                                         tf.float32)
  mixed_labels = (1 - pasted) * labels + pasted * tf.gather(labels, perm)
  return mixed, mixed_labels


MIX_FUNCTIONS = {
    enums.MixType.CUTMIX: cutmix,
    enums.MixType.MIXUP: mixup,
}


def mix(kind, images, labels_one_hot, alpha: float,
        seed) -> Tuple[tf.Tensor, tf.Tensor]:
  """Dispatches on `kind` (an `enums.MixType` or its name); NONE: unchanged.

  Returns:
    (images, float32 [batch, num_classes] labels).
  """
  kind = enums.parse_enum(enums.MixType, kind)
  if kind == enums.MixType.NONE:
    return (tf.convert_to_tensor(images),
            tf.cast(tf.convert_to_tensor(labels_one_hot), tf.float32))
  return MIX_FUNCTIONS[kind](images, labels_one_hot, alpha, seed)
