r"""Momentum encoder and a queue of its keys as extra contrast samples.

MoCo-style (He et al., 2020; the SupCon authors list it as not implemented):
a momentum (EMA) copy of the encoder and projection head encodes each batch
into keys, which go into a FIFO queue of `queue_size` keys with their labels.
The queued keys join the SupCon (or GenSCL) contrast set as extra samples:
positives when their label matches the anchor's, negatives otherwise, never
anchors, and without gradient. The in-batch part of the loss is unchanged
(the online features of the global batch, as `losses.supcon_loss`), so an
empty queue gives exactly the plain loss.

Order within a train step (`MomentumContrast.update`, after the optimizer
step): EMA update theta_k <- m theta_k + (1 - m) theta_q of the key encoder
and projection head (at the first step the key model becomes a copy of the
online one), keys of the step's images from the key model (batch norm in
training mode, as MoCo), enqueue. So the loss of step t contrasts with keys
of steps < t.

Under a tf.distribute strategy every replica holds the same queue: the keys
and labels of the GLOBAL batch are gathered (`distribute.cross_replica_concat`)
and written once per step, identically on every replica, into variables with
`ON_WRITE` synchronization and `ONLY_FIRST_REPLICA` aggregation.

`supcon_loss_with_queue` is a dense reimplementation of `losses.supcon_loss`
(which this module cannot extend) with extra contrast samples; it supports
every contrast mode, summation location and denominator mode and
`scale_by_temperature`, but not `positives_cap` (which has no sensible
extension to a queue) nor `chunk_size`.
"""

from typing import Sequence, Union

import keras
import tensorflow as tf

from supcon_tf import distribute
from supcon_tf import enums
from supcon_tf import genscl
from supcon_tf import models

_SYNC = dict(synchronization=tf.VariableSynchronization.ON_WRITE,
             aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
             trainable=False)


def _tf_variable(variable):
  """The tf.Variable behind a Keras variable (or the variable itself)."""
  return variable.value if isinstance(variable, keras.Variable) else variable


def ema_update(targets: Sequence, sources: Sequence, momentum) -> None:
  """targets <- momentum * targets + (1 - momentum) * sources, elementwise.

  Works outside a strategy, in a replica context (through a merge call, as
  Keras optimizers update variables) and in a cross-replica context. Every
  replica's sources must hold the same values (mirrored weights after a
  synchronous optimizer step), so every replica's copy stays the same.

  Args:
    targets: variables (Keras or tf) to update.
    sources: variables or tensors of the same shapes.
    momentum: float scalar in [0, 1]; 0 copies the sources.
  """
  targets = list(targets)
  sources = list(sources)
  if len(targets) != len(sources):
    raise ValueError(f'ema_update: {len(targets)} targets but '
                     f'{len(sources)} sources.')
  momentum = tf.cast(momentum, tf.float32)
  values = [tf.convert_to_tensor(_tf_variable(s)) for s in sources]

  def assign(variable, value):
    m = tf.cast(momentum, variable.dtype)
    return variable.assign(m * variable + (1 - m) * tf.cast(value,
                                                             variable.dtype))

  def apply(strategy, values):
    for target, value in zip(targets, values):
      strategy.extended.update(_tf_variable(target), assign, args=(value,),
                               group=False)

  if tf.distribute.in_cross_replica_context():
    apply(tf.distribute.get_strategy(), values)
  else:
    tf.__internal__.distribute.interim.maybe_merge_call(
        apply, tf.distribute.get_strategy(), values)


class FeatureQueue(tf.Module):
  """A FIFO ring buffer of `size` feature vectors and their labels.

  Slots fill from 0; once full, the oldest entries are overwritten first.
  Create under the strategy's scope; call `enqueue` once per step from every
  replica (or outside any strategy).

  Args:
    size: number of slots (> 0).
    dim: feature dimension.
    label_shape: shape of one label: () for class ids, (num_classes,) for
      soft labels.
    label_dtype: tf.int32 (ids) or tf.float32 (soft labels).
  """

  def __init__(self, size: int, dim: int, label_shape=(),
               label_dtype=tf.int32, name: str = 'feature_queue'):
    super().__init__(name=name)
    if size <= 0:
      raise ValueError(f'FeatureQueue: size must be > 0, got {size}.')
    self.size = int(size)
    self.dim = int(dim)
    self.features = tf.Variable(tf.zeros([self.size, self.dim], tf.float32),
                                name='features', **_SYNC)
    self.labels = tf.Variable(
        tf.zeros([self.size, *label_shape], label_dtype), name='labels',
        **_SYNC)
    # Next slot to write and number of filled slots.
    self.pointer = tf.Variable(0, dtype=tf.int32, name='pointer', **_SYNC)
    self.count = tf.Variable(0, dtype=tf.int32, name='count', **_SYNC)

  def mask(self) -> tf.Tensor:
    """float32 [size]: 1 for filled slots, 0 for empty ones."""
    return tf.cast(tf.range(self.size) < self.count, tf.float32)

  def read(self):
    """(features float32 [size, dim], labels, mask float32 [size])."""
    return (tf.stop_gradient(tf.convert_to_tensor(self.features)),
            tf.stop_gradient(tf.convert_to_tensor(self.labels)), self.mask())

  def enqueue(self, features, labels, gather: bool = True) -> None:
    """Writes features [n, dim] and labels [n, ...] after the newest entry.

    Args:
      features: this replica's (local) features.
      labels: their labels.
      gather: concatenate the features and labels of every replica first
        (replica order), so the queue receives the global batch once.
        With more than `size` rows only the last `size` are kept.
    """
    features = tf.stop_gradient(tf.cast(features, tf.float32))
    labels = tf.stop_gradient(tf.cast(labels, self.labels.dtype))
    if gather:
      features = distribute.cross_replica_concat(features)
      labels = distribute.cross_replica_concat(labels)
    n = features.shape[0]
    if n is not None:  # Static (training batches): static slices for XLA.
      keep = min(n, self.size)
    else:
      n = tf.shape(features)[0]
      keep = tf.minimum(n, self.size)
    features = features[n - keep:]
    labels = labels[n - keep:]
    pointer = tf.convert_to_tensor(self.pointer)
    slots = tf.math.floormod(pointer + tf.range(keep), self.size)[:, None]
    new_features = tf.tensor_scatter_nd_update(
        tf.convert_to_tensor(self.features), slots, features)
    new_labels = tf.tensor_scatter_nd_update(
        tf.convert_to_tensor(self.labels), slots, labels)
    new_pointer = tf.math.floormod(pointer + keep, self.size)
    new_count = tf.minimum(tf.convert_to_tensor(self.count) + keep, self.size)
    self.features.assign(new_features)
    self.labels.assign(new_labels)
    self.pointer.assign(new_pointer)
    self.count.assign(new_count)


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
  if isinstance(temperature, (int, float)) and temperature <= 0:
    raise ValueError(f'{name}: temperature must be > 0, got {temperature}.')
  features = genscl.flatten_features(features, name)
  labels = genscl.labels_tensor(labels, name)
  num_views = features.shape[1]
  num_anchor_views = (1 if contrast_mode == enums.LossContrastMode.ONE_VIEW
                      else num_views)
  local_batch = tf.shape(features)[0]
  temperature = tf.cast(temperature, tf.float32)

  anchors, contrast, self_columns, offset, num_global = (
      genscl.anchors_and_contrast(features, num_anchor_views))
  anchors = anchors / temperature
  logits = tf.matmul(anchors, contrast, transpose_b=True)
  self_mask = tf.one_hot(self_columns, tf.shape(contrast)[0])
  if labels is None:
    same = tf.one_hot(offset + tf.range(local_batch), num_global)
  else:
    global_labels = tf.stop_gradient(distribute.cross_replica_concat(labels))
    same = genscl.label_similarity_matrix(labels, global_labels)
  same = tf.tile(same, [num_anchor_views, num_views])
  positives = same * (1.0 - self_mask)
  # As supcon_loss: the anchor's own entry is a negative of weight
  # 1 - <y_i, y_i> (0 for hard labels).
  negatives = 1.0 - same
  included = tf.ones_like(logits, tf.bool)

  if queue_features is not None:
    queue, mask, queue_same = genscl.extra_contrast_samples(
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


def _online_variables(model: models.SupConModel):
  return (model.encoder.trainable_variables +
          model.projection_head.trainable_variables)


class MomentumContrast(tf.Module):
  """The key model (EMA of encoder + projection head) and its key queue.

  Build under the strategy's scope.

  Args:
    key_model: a `SupConModel` of the same architecture as the online model
      (its classification head is unused).
    online_model: the model being trained (only its variables are read).
    queue_size: slots of the queue.
    momentum: EMA momentum m in [0, 1).
    label_shape, label_dtype: see `FeatureQueue`.
  """

  def __init__(self, key_model: models.SupConModel,
               online_model: models.SupConModel, queue_size: int,
               momentum: float = 0.999, label_shape=(),
               label_dtype=tf.int32, name: str = 'momentum_contrast'):
    super().__init__(name=name)
    if not 0.0 <= momentum < 1.0:
      raise ValueError(f'MomentumContrast: momentum must be in [0, 1), got '
                       f'{momentum}.')
    self.key_model = key_model
    self.momentum = float(momentum)
    # Untracked: the online model is checkpointed by its owner.
    self._online = [online_model]
    key_vars, online_vars = (_online_variables(key_model),
                             _online_variables(online_model))
    if [tuple(v.shape) for v in key_vars] != [tuple(v.shape)
                                              for v in online_vars]:
      raise ValueError('MomentumContrast: the key model and the online model '
                       'differ in architecture.')
    dim = online_model.projection_head.compute_output_shape(
        (None, online_model.encoder.output_shape[-1]))[-1]
    self.queue = FeatureQueue(queue_size, dim, label_shape, label_dtype)
    # False until the first update, which copies the online weights (so a
    # warm-started or restored online model is not averaged with the key
    # model's random initial weights).
    self.initialized = tf.Variable(False, name='initialized', **_SYNC)

  def key_variables(self):
    return _online_variables(self.key_model)

  def read_queue(self):
    """(features [size, dim], labels, mask [size]) for the loss."""
    return self.queue.read()

  def update(self, images, labels) -> None:
    """EMA step, then the keys of `images` (all views) enter the queue.

    Args:
      images: this replica's batch [batch, views, h, w, 3].
      labels: its labels, [batch] ids or [batch, num_classes] soft labels.
    """
    momentum = tf.where(tf.convert_to_tensor(self.initialized),
                        tf.constant(self.momentum, tf.float32),
                        tf.constant(0.0, tf.float32))
    ema_update(self.key_variables(), _online_variables(self._online[0]),
               momentum)
    self.initialized.assign(True)
    keys = self.key_model(images, training=True)[models.PROJECTION]
    views = keys.shape[1]
    keys = tf.reshape(keys, [-1, keys.shape[-1]])  # Sample-major.
    key_labels = tf.repeat(labels, views, axis=0)
    self.queue.enqueue(tf.stop_gradient(keys), key_labels)
