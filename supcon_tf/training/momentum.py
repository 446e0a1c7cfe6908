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

The loss over the online features and the queued keys is
`losses.supcon_loss_with_queue` (supcon_tf/losses/queue.py).
"""

from typing import Sequence

import keras
import tensorflow as tf

from supcon_tf import distribute
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
