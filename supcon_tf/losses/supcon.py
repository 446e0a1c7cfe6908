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

How it is computed (the reference's values, far fewer passes over the
[anchors, contrast] matrix; docs/performance_loss.md has the measurements):

* Logits live in a 4-D layout s[a, b, v, g] (anchor view a of local sample b
  against view v of global sample g); sample-level [b, g] masks, built from
  label equality, broadcast over the views instead of being tiled to
  [A*B, V*G], and masked sums first add the views up ([a, b, g]).
* The anchor's own entry is set to -inf (in place: a diagonal or a scatter),
  so exp() drops it from every sum; subtracting it afterwards would cancel
  catastrophically when the self term dominates. The row max (stability
  shift, it cancels) is taken over the other entries.
* L_out splits as log D_i - 1/|P(i)| sum_p s_ip. Without a positives cap the
  second term is linear in z: <z_i, (sum of z over i's class) - z_i> / T, from
  per-class feature sums in O(N * dim). With denominator ALL the first term
  is a log-sum-exp over j != i without any mask, so the default configuration
  reads the N x N matrix for one max, one exp and one sum.
* The part that reads the logits has a hand-written gradient (one to three
  elementwise passes over the saved exp(s) instead of autodiff's chain of
  broadcasts), and on one device with all views as anchors the logits are the
  Gram matrix Z Z^T, whose gradient (G + G^T) Z takes one matmul, not two.
* `chunk_size` evaluates the loss over blocks of anchor samples with a
  tf.custom_gradient that recomputes each block in the backward pass, so
  peak memory is O(N * chunk_size) instead of O(N^2).
"""

from typing import Optional, Union

import keras
import tensorflow as tf

from supcon_tf import distribute
from supcon_tf import enums
from supcon_tf.losses import kernel
from supcon_tf.losses import layout

ContrastModeLike = Union[enums.LossContrastMode, str]
SummationLike = Union[enums.LossSummationLocation, str]
DenominatorLike = Union[enums.LossDenominatorMode, str]


def _validate(features: tf.Tensor, labels: Optional[tf.Tensor], temperature,
              positives_cap: int, chunk_size):
  """Static checks of flattened features [batch, num_views, dim] and the
  options; returns (local_batch, num_views)."""
  num_views = features.shape[1]
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
  layout.check_temperature(temperature, 'supcon_loss')
  if not isinstance(positives_cap, int) or isinstance(positives_cap, bool):
    raise ValueError(
        f'supcon_loss: positives_cap must be an int, got {positives_cap!r}.')
  if positives_cap < -1 or (positives_cap > -1 and
                            positives_cap % num_views != 0):
    raise ValueError(
        f'supcon_loss: positives_cap must be -1 (no cap) or a non-negative '
        f'multiple of num_views (= {num_views}), got {positives_cap}.')
  if chunk_size is not None and (not isinstance(chunk_size, int) or
                                 isinstance(chunk_size, bool) or
                                 chunk_size < 0):
    raise ValueError(
        f'supcon_loss: chunk_size must be None, 0 (both: no chunking) or a '
        f'positive int, got {chunk_size!r}.')
  return features.shape[0], num_views


def supcon_loss(features,
                labels=None,
                *,
                temperature=0.07,
                contrast_mode: ContrastModeLike = 'all_views',
                summation_location: SummationLike = 'outside',
                denominator_mode: DenominatorLike = 'all',
                positives_cap: int = -1,
                scale_by_temperature: bool = True,
                chunk_size: Optional[int] = None) -> tf.Tensor:
  """Per-sample supervised contrastive loss.

  Args:
    features: float [batch, num_views, dim] (extra trailing dims are
      flattened), L2-normalised by the caller; any float dtype, computed in
      float32. Under a strategy, the replica's local batch.
    labels: None (SimCLR: each sample its own class), int [batch] class ids, or
      float [batch, num_classes] one-hot / soft labels. Not differentiated.
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
    chunk_size: None or 0: compute the [anchors, contrast] logits at once.
      A positive int: compute the loss and its gradient over blocks of
      `chunk_size` local samples (times the anchor views each), recomputing
      each block in the backward pass, so peak memory is
      O(chunk_size * num_views * global_batch * num_views) instead of
      O(N^2). Same values (to float rounding) for every variant, at the price
      of one more logits matmul per block in the backward pass.

  Returns:
    float32 [batch]: each sample's loss, the mean over its anchor views.
    Anchors without any positive contribute 0.

  Raises:
    ValueError: on a bad rank, batch mismatch, temperature, cap, chunk size or
      mode.
  """
  contrast_mode = enums.parse_enum(enums.LossContrastMode, contrast_mode)
  summation_location = enums.parse_enum(enums.LossSummationLocation,
                                        summation_location)
  denominator_mode = enums.parse_enum(enums.LossDenominatorMode,
                                      denominator_mode)
  # Rank, dtype and static views checked; float32 [batch, views, dim].
  features = layout.flatten_features(features, 'supcon_loss')
  if labels is not None:
    labels = tf.convert_to_tensor(labels)
  static_batch, num_views = _validate(features, labels, temperature,
                                      positives_cap, chunk_size)
  local_batch = tf.shape(features)[0]

  # Contrast set: the global batch (identity outside a multi-replica context).
  multi_replica = distribute.in_cross_replica_gather_context()
  global_features = distribute.cross_replica_concat(features)
  offset = distribute.replica_id() * local_batch

  if labels is None:
    label_kind, global_labels = kernel.NO_LABELS, None
  else:
    if labels.shape.rank == 1:
      label_kind = kernel.CLASS_IDS
      # Class ids compare by equality, whatever their dtype (Keras casts
      # y_true to the loss dtype).
      labels = tf.cast(labels, tf.int32) if labels.dtype.is_integer else (
          tf.cast(labels, tf.float32))
    else:
      label_kind = kernel.SOFT
      labels = tf.cast(labels, tf.float32)
    global_labels = tf.stop_gradient(distribute.cross_replica_concat(labels))

  num_anchor_views = (1 if contrast_mode == enums.LossContrastMode.ONE_VIEW
                      else num_views)
  plan = kernel.Plan(num_anchor_views=num_anchor_views, num_views=num_views,
               summation=summation_location, denominator=denominator_mode,
               samples_per_anchor=(positives_cap // num_views
                                   if positives_cap > -1 else -1),
               label_kind=label_kind)

  temperature = tf.cast(temperature, tf.float32)
  # View-major layouts: contrast [V, G, D], anchors [A, B, D] (divided by T).
  contrast = tf.transpose(global_features, [1, 0, 2])
  local = tf.transpose(features[:, :num_anchor_views], [1, 0, 2])
  anchors = local / temperature

  chunked = bool(chunk_size) and (static_batch is None or
                                  chunk_size < static_batch)
  if chunked:
    terms, num_positives = kernel.chunked_terms(anchors, contrast, offset,
                                          global_labels, plan, chunk_size)
  else:
    logits_op = None
    if (not multi_replica and num_anchor_views == num_views and
        not kernel.in_xla_context()):
      # Anchors and contrast are the same N samples: a Gram matrix.
      logits_op = kernel.gram_logits_op(contrast * tf.math.rsqrt(temperature))
    terms, num_positives = kernel.block_terms(anchors, contrast, offset,
                                        global_labels, plan, logits_op)

  if plan.numerator_from_class_sums:
    numerator, num_positives = kernel.class_sum_numerator(
        anchors, local, contrast, offset, global_labels, plan)
  has_positive = num_positives > 0
  if plan.numerator_from_class_sums:
    # eq. 2: log D_i - 1/|P(i)| sum_p s_ip (the row shift cancels).
    terms -= numerator / tf.where(has_positive, num_positives,
                                  tf.ones_like(num_positives))
  loss = tf.where(has_positive, terms, tf.zeros_like(terms))
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
  batch. `chunk_size` (keyword-only) bounds the loss's memory, see
  `supcon_loss`.
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
               *,
               chunk_size: Optional[int] = None,
               **kwargs):
    super().__init__(reduction=reduction, name=name, **kwargs)
    layout.check_temperature(float(temperature), 'SupConLoss')
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
    if chunk_size is not None and (not isinstance(chunk_size, int) or
                                   isinstance(chunk_size, bool) or
                                   chunk_size < 0):
      raise ValueError(f'SupConLoss: chunk_size must be None or an int >= 0, '
                       f'got {chunk_size!r}.')
    self.chunk_size = chunk_size or None

  def call(self, y_true, y_pred):
    return supcon_loss(
        y_pred,
        labels=y_true if self.use_labels else None,
        temperature=self.temperature,
        contrast_mode=self.contrast_mode,
        summation_location=self.summation_location,
        denominator_mode=self.denominator_mode,
        positives_cap=self.positives_cap,
        scale_by_temperature=self.scale_by_temperature,
        chunk_size=self.chunk_size)

  def get_config(self):
    config = super().get_config()
    config.update(
        temperature=self.temperature,
        contrast_mode=self.contrast_mode.name.lower(),
        summation_location=self.summation_location.name.lower(),
        denominator_mode=self.denominator_mode.name.lower(),
        positives_cap=self.positives_cap,
        scale_by_temperature=self.scale_by_temperature,
        use_labels=self.use_labels,
        chunk_size=self.chunk_size)
    return config
