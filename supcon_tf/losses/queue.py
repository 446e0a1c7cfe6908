"""SupCon with extra contrast samples: a momentum queue of keys (MoCo-style).

`supcon_loss_with_queue` is a dense reimplementation of `supcon.supcon_loss`
with extra contrast samples (the keys of `training.momentum.FeatureQueue`):
positives when their label matches the anchor's, negatives otherwise, never
anchors and without gradient. With an empty queue it equals `supcon_loss`.
It supports every contrast mode, summation location and denominator mode and
`scale_by_temperature`, but not `positives_cap` (which has no sensible
extension to a queue) nor `chunk_size`.
"""

from typing import Union

import tensorflow as tf

from supcon_tf import distribute
from supcon_tf import enums
from supcon_tf.losses import layout

def supcon_loss_with_queue(
    features,
    labels=None,
    queue_features=None,
    queue_labels=None,
    *,
    queue_mask=None,
    temperature=0.07,
    contrast_mode: Union[enums.LossContrastMode, str] = 'all_views',
    summation_location: Union[enums.LossSummationLocation, str] = 'outside',
    denominator_mode: Union[enums.LossDenominatorMode, str] = 'all',
    positives_cap: int = -1,
    scale_by_temperature: bool = True) -> tf.Tensor:
  """`losses.supcon_loss` with extra contrast samples (a queue).

  The in-batch terms are those of `supcon_loss` (DESIGN.md section 2; soft
  labels compare by dot product, negatives weigh 1 - <y_i, y_j>); each valid
  queue entry q adds a positive of weight <y_i, y_q> (equality for ids) and a
  negative of weight 1 - <y_i, y_q> to every anchor's sums. Without labels
  (SimCLR) every queue entry is a negative. With no valid entry the result
  equals `supcon_loss(features, labels, ...)`.

  Args:
    features: float [batch, num_views, dim], L2-normalised; under a strategy
      the replica's local batch (the contrast set is the global batch).
    labels: None, int [batch] class ids or float [batch, num_classes].
    queue_features: None or float [queue_size, dim] (no gradient), the same
      on every replica.
    queue_labels: [queue_size] ids or [queue_size, num_classes], the same
      kind as `labels`.
    queue_mask: None (all valid) or float [queue_size], 0 for empty slots.
    temperature: softmax temperature, > 0.
    contrast_mode: 'all_views' or 'one_view'.
    summation_location: 'outside' (L_out) or 'inside' (L_in).
    denominator_mode: 'all', 'one_positive' or 'only_negatives'.
    positives_cap: must be -1 (no cap): capping is not supported here.
    scale_by_temperature: multiply the loss by `temperature`.

  Returns:
    float32 [batch]: each sample's loss, the mean over its anchor views;
    anchors without any positive contribute 0.

  Raises:
    ValueError: bad shapes, temperature, mode, or a positives cap.
  """
  name = 'supcon_loss_with_queue'
  contrast_mode = enums.parse_enum(enums.LossContrastMode, contrast_mode)
  summation = enums.parse_enum(enums.LossSummationLocation,
                               summation_location)
  denominator = enums.parse_enum(enums.LossDenominatorMode, denominator_mode)
  if positives_cap != -1:
    raise ValueError(f'{name}: positives_cap is not supported with a queue '
                     f'(got {positives_cap}); use -1.')
  layout.check_temperature(temperature, name)
  features = layout.flatten_features(features, name)
  labels = layout.labels_tensor(labels, name)
  num_views = features.shape[1]
  num_anchor_views = (1 if contrast_mode == enums.LossContrastMode.ONE_VIEW
                      else num_views)
  local_batch = tf.shape(features)[0]
  temperature = tf.cast(temperature, tf.float32)

  anchors, contrast, self_columns, offset, num_global = (
      layout.anchors_and_contrast(features, num_anchor_views))
  anchors = anchors / temperature
  logits = tf.matmul(anchors, contrast, transpose_b=True)
  self_mask = tf.one_hot(self_columns, tf.shape(contrast)[0])
  if labels is None:
    same = tf.one_hot(offset + tf.range(local_batch), num_global)
  else:
    global_labels = tf.stop_gradient(distribute.cross_replica_concat(labels))
    same = layout.label_similarity_matrix(labels, global_labels)
  same = tf.tile(same, [num_anchor_views, num_views])
  positives = same * (1.0 - self_mask)
  # As supcon_loss: the anchor's own entry is a negative of weight
  # 1 - <y_i, y_i> (0 for hard labels).
  negatives = 1.0 - same
  included = tf.ones_like(logits, tf.bool)

  if queue_features is not None:
    queue, mask, queue_same = layout.extra_contrast_samples(
        labels, local_batch, queue_features, queue_labels, queue_mask, 'dot',
        name)
    queue_logits = tf.matmul(anchors, queue, transpose_b=True)
    queue_same = tf.tile(queue_same, [num_anchor_views, 1])
    logits = tf.concat([logits, queue_logits], axis=1)
    positives = tf.concat([positives, queue_same * mask], axis=1)
    negatives = tf.concat([negatives, (1.0 - queue_same) * mask], axis=1)
    included = tf.concat(
        [included, tf.broadcast_to(mask[None, :] > 0,
                                   tf.shape(queue_logits))], axis=1)

  positives = tf.stop_gradient(positives)
  negatives = tf.stop_gradient(negatives)
  # Row max over the entries that take part (a shift that cancels).
  shift = tf.stop_gradient(tf.reduce_max(
      tf.where(included, logits, tf.fill(tf.shape(logits), -1e9)), axis=1,
      keepdims=True))
  shifted = logits - shift
  exp = tf.exp(shifted) * tf.cast(included, tf.float32)
  negative_sum = tf.reduce_sum(exp * negatives, axis=1, keepdims=True)
  num_positives = tf.reduce_sum(positives, axis=1)
  if denominator == enums.LossDenominatorMode.ALL:
    den = negative_sum + tf.reduce_sum(exp * positives, axis=1,
                                       keepdims=True)
  elif denominator == enums.LossDenominatorMode.ONE_POSITIVE:
    den = exp + negative_sum
  else:
    den = negative_sum
  # (Only ONLY_NEGATIVES without any negative can make den 0.)
  den = tf.maximum(den, 1e-30)
  has_positive = num_positives > 0
  safe_count = tf.where(has_positive, num_positives,
                        tf.ones_like(num_positives))
  if summation == enums.LossSummationLocation.OUTSIDE:
    terms = -tf.reduce_sum(positives * (shifted - tf.math.log(den)),
                           axis=1) / safe_count
  else:
    terms = -tf.math.log(
        tf.reduce_sum(positives * exp / den, axis=1) / safe_count +
        tf.cast(tf.logical_not(has_positive), tf.float32))
  loss = tf.where(has_positive, terms, tf.zeros_like(terms))
  if scale_by_temperature:
    loss = loss * temperature
  return tf.reduce_mean(tf.reshape(loss, [num_anchor_views, -1]), axis=0)
