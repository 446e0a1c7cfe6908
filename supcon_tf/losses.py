r"""Supervised contrastive loss (Khosla et al., NeurIPS 2020) and its variants.

Notation (paper section 3.2): a batch of `batch` samples with `num_views`
augmented views each is flattened view-major into N = batch * num_views
contrast samples z (L2-normalised by the caller). For an anchor i, P(i) are the
other samples with the same label (never i itself), the negatives those with a
different label, and s_ij = <z_i, z_j> / temperature.

  L_out_i = -1/|P(i)| sum_{p in P(i)} log( exp(s_ip) / D_ip )     (eq. 2)
  L_in_i  = -log( 1/|P(i)| sum_{p in P(i)} exp(s_ip) / D_ip )     (eq. 3)

with the denominator D_ip, per `denominator_mode`:
  ALL:            sum_{j != i} exp(s_ij)  (only capped positives and negatives)
  ONE_POSITIVE:   exp(s_ip) + sum_{n negative} exp(s_in)
  ONLY_NEGATIVES: sum_{n negative} exp(s_in)

Without labels every sample is its own class (SimCLR, Chen et al. 2020).
Under a tf.distribute strategy the anchors are the replica's local batch and the
contrast set is the global batch gathered from every replica, so the result is
exactly the single-device loss on the concatenated batch.
"""

from typing import Optional, Union

import keras
import tensorflow as tf

from supcon_tf import distribute
from supcon_tf import enums

ContrastModeLike = Union[enums.LossContrastMode, str]
SummationLike = Union[enums.LossSummationLocation, str]
DenominatorLike = Union[enums.LossDenominatorMode, str]


def _validate(features: tf.Tensor, labels: Optional[tf.Tensor], temperature,
              positives_cap: int):
  """Static checks; returns (local_batch, num_views)."""
  if features.shape.rank is None or features.shape.rank < 3:
    raise ValueError(
        f'supcon_loss: features must have rank >= 3 [batch, num_views, dim], '
        f'got shape {features.shape}.')
  if not features.dtype.is_floating:
    raise ValueError(
        f'supcon_loss: features must be floating point, got {features.dtype}.')
  num_views = features.shape[1]
  if num_views is None:
    raise ValueError('supcon_loss: the num_views dimension (axis 1) of '
                     f'features must be static, got shape {features.shape}.')
  if labels is not None:
    if labels.shape.rank not in (1, 2):
      raise ValueError(
          'supcon_loss: labels must be [batch] class ids or [batch, '
          f'num_classes] one-hot/soft labels, got shape {labels.shape}.')
    if (labels.shape[0] is not None and features.shape[0] is not None and
        labels.shape[0] != features.shape[0]):
      raise ValueError(
          f'supcon_loss: labels batch ({labels.shape[0]}) does not match '
          f'features batch ({features.shape[0]}).')
  if isinstance(temperature, (int, float)) and temperature <= 0:
    raise ValueError(
        f'supcon_loss: temperature must be > 0, got {temperature}.')
  if not isinstance(positives_cap, int) or isinstance(positives_cap, bool):
    raise ValueError(
        f'supcon_loss: positives_cap must be an int, got {positives_cap!r}.')
  if positives_cap < -1 or (positives_cap > -1 and
                            positives_cap % num_views != 0):
    raise ValueError(
        f'supcon_loss: positives_cap must be -1 (no cap) or a non-negative '
        f'multiple of num_views (= {num_views}), got {positives_cap}.')
  return features.shape[0], num_views


def _same_class_mask(labels, global_labels, diagonal):
  """[local_batch, global_batch] float32: 1 where two samples share a class.

  Class ids compare by equality; one-hot or soft rows by their dot product
  (the reference's definition, which reduces to equality for one-hot rows).
  """
  if labels is None:
    return diagonal
  if labels.shape.rank == 1:
    return tf.cast(
        tf.equal(labels[:, None], global_labels[None, :]), tf.float32)
  return tf.matmul(labels, global_labels, transpose_b=True)


def _cap_positives(same, diagonal, samples_per_anchor: int):
  """Keeps the first `samples_per_anchor` other positive samples of each row.

  "First" is by global column index (top_k keeps the lower index on ties), so
  the choice is the same on one device and under any number of replicas. The
  anchor's own sample (its other views) is always kept.

  Args:
    same: [local_batch, global_batch] same-class mask.
    diagonal: [local_batch, global_batch] one-hot of each anchor's own column.
    samples_per_anchor: positives_cap // num_views.

  Returns:
    [local_batch, global_batch] capped positive-sample mask.
  """
  others = tf.minimum(same, 1.0 - diagonal)
  if samples_per_anchor == 0:
    keep = tf.zeros_like(same)
  else:
    k = tf.minimum(samples_per_anchor, tf.shape(same)[1])
    _, idx = tf.math.top_k(others, k=k)
    keep = tf.reduce_max(tf.one_hot(idx, tf.shape(same)[1]), axis=1)
  return same * tf.maximum(keep, diagonal)


def supcon_loss(features,
                labels=None,
                *,
                temperature=0.07,
                contrast_mode: ContrastModeLike = 'all_views',
                summation_location: SummationLike = 'outside',
                denominator_mode: DenominatorLike = 'all',
                positives_cap: int = -1,
                scale_by_temperature: bool = True) -> tf.Tensor:
  """Per-sample supervised contrastive loss.

  Args:
    features: float [batch, num_views, dim] (extra trailing dims are
      flattened), L2-normalised by the caller; any float dtype, computed in
      float32. Under a strategy, the replica's local batch.
    labels: None (SimCLR: each sample its own class), int [batch] class ids, or
      float [batch, num_classes] one-hot / soft labels.
    temperature: softmax temperature, > 0.
    contrast_mode: 'all_views' (every view is an anchor) or 'one_view' (only
      view 0 is).
    summation_location: 'outside' (L_out, eq. 2) or 'inside' (L_in, eq. 3).
    denominator_mode: 'all', 'one_positive' or 'only_negatives'.
    positives_cap: keep at most this many positives besides the anchor's own
      views (a multiple of num_views; -1 = no cap). Capped-away positives are
      neither positives nor negatives.
    scale_by_temperature: multiply the loss by `temperature`, so the gradient
      scale does not depend on it.

  Returns:
    float32 [batch]: each sample's loss, the mean over its anchor views.
    Anchors without any positive contribute 0.

  Raises:
    ValueError: on a bad rank, batch mismatch, temperature, cap or mode.
  """
  contrast_mode = enums.parse_enum(enums.LossContrastMode, contrast_mode)
  summation_location = enums.parse_enum(enums.LossSummationLocation,
                                        summation_location)
  denominator_mode = enums.parse_enum(enums.LossDenominatorMode,
                                      denominator_mode)
  features = tf.convert_to_tensor(features)
  if labels is not None:
    labels = tf.convert_to_tensor(labels)
  _, num_views = _validate(features, labels, temperature, positives_cap)

  if features.dtype != tf.float32:
    # (Casting a float32 tensor to float32 can cut it from an eager tape.)
    features = tf.cast(features, tf.float32)
  if features.shape.rank > 3:
    features = tf.reshape(features,
                          tf.concat([tf.shape(features)[:2], [-1]], axis=0))
  local_batch = tf.shape(features)[0]

  # Contrast set: the global batch (identity outside a multi-replica context).
  global_features = distribute.cross_replica_concat(features)
  global_batch = tf.shape(global_features)[0]
  offset = distribute.replica_id() * local_batch
  diagonal = tf.one_hot(tf.range(local_batch) + offset, global_batch)

  if labels is not None:
    if labels.shape.rank == 1:
      # Class ids compare by equality, whatever their dtype (Keras casts
      # y_true to the loss dtype).
      labels = tf.cast(labels, tf.int32) if labels.dtype.is_integer else (
          tf.cast(labels, tf.float32))
    else:
      labels = tf.cast(labels, tf.float32)
    global_labels = distribute.cross_replica_concat(labels)
  else:
    global_labels = None
  same = _same_class_mask(labels, global_labels, diagonal)
  if positives_cap > -1:
    positive_samples = _cap_positives(same, diagonal,
                                      positives_cap // num_views)
  else:
    positive_samples = same
  negatives = 1.0 - same  # The uncapped complement.

  if contrast_mode == enums.LossContrastMode.ONE_VIEW:
    anchors = features[:, :1]  # [B, 1, D]
  else:
    anchors = features
  num_anchor_views = anchors.shape[1]

  # s[a, b, v, g]: anchor view a of local sample b against view v of global
  # sample g. Working in this 4-D layout broadcasts the [B, G] sample masks
  # instead of tiling them to [A*B, V*G].
  temperature = tf.cast(temperature, tf.float32)
  logits = tf.einsum('bad,gvd->abvg', anchors, global_features) / temperature
  row_max = tf.reduce_max(tf.stop_gradient(logits), axis=[2, 3], keepdims=True)
  logits = logits - row_max
  exp_logits = tf.exp(logits)

  # The anchor itself (same sample, same view) is never a positive.
  same_view = tf.eye(num_anchor_views, num_views)[:, None, :, None]
  self_mask = same_view * diagonal[None, :, None, :]
  positives = positive_samples[None, :, None, :] * (1.0 - self_mask)
  negatives = negatives[None, :, None, :]
  num_positives = tf.reduce_sum(positives, axis=[2, 3])  # [A, B]

  negatives_sum = tf.reduce_sum(exp_logits * negatives, axis=[2, 3],
                                keepdims=True)
  if denominator_mode == enums.LossDenominatorMode.ALL:
    denominator = negatives_sum + tf.reduce_sum(
        exp_logits * positives, axis=[2, 3], keepdims=True)
  elif denominator_mode == enums.LossDenominatorMode.ONE_POSITIVE:
    denominator = exp_logits + negatives_sum
  else:
    denominator = negatives_sum

  has_positive = num_positives > 0
  if summation_location == enums.LossSummationLocation.OUTSIDE:
    log_prob = logits - tf.math.log(denominator)
    mean_log_prob = tf.math.divide_no_nan(
        tf.reduce_sum(log_prob * positives, axis=[2, 3]), num_positives)
  else:
    mean_prob = tf.math.divide_no_nan(
        tf.reduce_sum(exp_logits / denominator * positives, axis=[2, 3]),
        num_positives)
    # log(0) of an anchor without positives would be -inf (and NaN in the
    # gradient); such anchors are masked to 0 below.
    mean_log_prob = tf.math.log(
        tf.where(has_positive, mean_prob, tf.ones_like(mean_prob)))
  loss = tf.where(has_positive, -mean_log_prob, tf.zeros_like(mean_log_prob))
  if scale_by_temperature:
    loss = loss * temperature
  return tf.reduce_mean(loss, axis=0)


@keras.saving.register_keras_serializable(package='supcon_tf')
class SupConLoss(keras.losses.Loss):
  """Keras wrapper of `supcon_loss`.

  `y_true` are the labels (int [batch] or one-hot [batch, classes]) and `y_pred`
  the features [batch, num_views, dim]. With `use_labels=False`, `y_true` is
  ignored (SimCLR). The default reduction averages the per-sample losses; in a
  custom distributed loop use `reduction=None` and divide the sum by the global
  batch.
  """

  def __init__(self,
               temperature=0.07,
               contrast_mode: ContrastModeLike = 'all_views',
               summation_location: SummationLike = 'outside',
               denominator_mode: DenominatorLike = 'all',
               positives_cap: int = -1,
               scale_by_temperature: bool = True,
               use_labels: bool = True,
               reduction='sum_over_batch_size',
               name='supcon_loss',
               **kwargs):
    super().__init__(reduction=reduction, name=name, **kwargs)
    if temperature <= 0:
      raise ValueError(f'SupConLoss: temperature must be > 0, got '
                       f'{temperature}.')
    self.temperature = float(temperature)
    self.contrast_mode = enums.parse_enum(enums.LossContrastMode,
                                          contrast_mode)
    self.summation_location = enums.parse_enum(enums.LossSummationLocation,
                                               summation_location)
    self.denominator_mode = enums.parse_enum(enums.LossDenominatorMode,
                                             denominator_mode)
    self.positives_cap = int(positives_cap)
    self.scale_by_temperature = bool(scale_by_temperature)
    self.use_labels = bool(use_labels)

  def call(self, y_true, y_pred):
    return supcon_loss(
        y_pred,
        labels=y_true if self.use_labels else None,
        temperature=self.temperature,
        contrast_mode=self.contrast_mode,
        summation_location=self.summation_location,
        denominator_mode=self.denominator_mode,
        positives_cap=self.positives_cap,
        scale_by_temperature=self.scale_by_temperature)

  def get_config(self):
    config = super().get_config()
    config.update(
        temperature=self.temperature,
        contrast_mode=self.contrast_mode.name.lower(),
        summation_location=self.summation_location.name.lower(),
        denominator_mode=self.denominator_mode.name.lower(),
        positives_cap=self.positives_cap,
        scale_by_temperature=self.scale_by_temperature,
        use_labels=self.use_labels)
    return config
