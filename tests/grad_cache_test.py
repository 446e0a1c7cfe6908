"""Tests of supcon_tf/training/grad_cache.py (gradient caching).

A tiny SupConModel (conv + batch norm encoder, the real heads) on 8x8 images
with two views; the loss is the train step's: SupCon with labels over the
gathered global batch, cross-entropy on view 0's logits, and a weight-decay
term that reads the variables directly.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from supcon_tf import losses
from supcon_tf import models
from supcon_tf.training import grad_cache
from tests import conftest

NUM_CLASSES = 3
VIEWS = 2


def _model(batch_norm='local', dtype=None, seed=0):
  """SupConModel with a conv encoder; batch_norm: none, local or sync."""
  keras.utils.set_random_seed(seed)
  images = keras.Input((8, 8, 3))
  x = keras.layers.Conv2D(4, 3, padding='same', use_bias=False,
                          dtype=dtype)(images)
  if batch_norm != 'none':
    x = keras.layers.BatchNormalization(
        synchronized=batch_norm == 'sync', momentum=0.5, dtype=dtype)(x)
  x = keras.layers.ReLU(dtype=dtype)(x)
  x = keras.layers.GlobalAveragePooling2D(dtype='float32')(x)
  model = models.SupConModel(
      keras.Model(images, x),
      models.ProjectionHead((8, 4), dtype=dtype),
      models.ClassificationHead(NUM_CLASSES, zero_initialize=False,
                                dtype=dtype))
  model.build((None, None, None, 3))
  return model


def _data(batch, seed=1):
  rng = np.random.default_rng(seed)
  images = tf.constant(rng.normal(size=(batch, VIEWS, 8, 8, 3)), tf.float32)
  labels = tf.constant(rng.integers(0, NUM_CLASSES, size=batch), tf.int32)
  return images, labels


def _loss_fn(model, labels, global_batch):
  """The train step's loss over a replica batch (gathers under a strategy)."""
  def loss_fn(outputs):
    per_sample = losses.supcon_loss(outputs[models.PROJECTION], labels,
                                    temperature=0.5)
    contrastive = tf.reduce_sum(per_sample) / global_batch
    ce = keras.losses.sparse_categorical_crossentropy(
        labels, outputs[models.LOGITS][:, 0], from_logits=True)
    cross_entropy = tf.reduce_sum(ce) / global_batch
    replicas = tf.distribute.get_strategy().num_replicas_in_sync
    decay = 1e-2 * models.l2_weight_decay(model.encoder.trainable_variables)
    total = contrastive + cross_entropy + decay / replicas
    return total, {'contrastive_loss': contrastive,
                   'cross_entropy_loss': cross_entropy}
  return loss_fn


def _unrolled(model, images, labels, micro, training):
  """Reference: one tape over the micro-batches embedded one after another.

  With `micro` equal to the batch this is the plain full-batch step; with
  batch norm in training mode it is the gradient with per-micro-batch
  statistics, and it updates the moving averages once per micro-batch.
  """
  batch = images.shape[0]
  variables = model.trainable_variables
  with tf.GradientTape() as tape:
    parts = [model(images[i:i + micro], training=training)
             for i in range(0, batch, micro)]
    outputs = {k: tf.concat([p[k] for p in parts], 0) for k in parts[0]}
    loss, _ = _loss_fn(model, labels, batch)(outputs)
  return loss, tape.gradient(loss, variables)


def _cached(model, images, labels, micro, training, global_batch=None,
            scale_loss=None):
  return grad_cache.cached_gradients(
      lambda x: model(x, training=training),
      _loss_fn(model, labels, global_batch or images.shape[0]), images,
      model.trainable_variables, micro, scale_loss=scale_loss)


def _moving_stats(model):
  return [v.numpy() for v in model.non_trainable_variables]


# The float32 noise floor: without training-mode batch norm the one-tape
# full-batch gradient and the one-tape gradient of the same model embedded in
# micro-batches are mathematically equal, but differ by up to 1e-4 of the
# largest entry here (M=1 of 32; 2.5e-5 for M=2 of 16), while the cached
# gradient stays within 5e-7 of the latter. So: tight against the one-tape
# micro-batch reference, the noise floor against the full batch.
FULL_BATCH_RTOL = 2e-4


def _assert_grads_close(got, want, rtol=1e-5):
  """Each gradient within `rtol` of the largest entry of its reference."""
  assert len(got) == len(want)
  for g, w in zip(got, want):
    assert g is not None and w is not None
    w = np.asarray(w)
    np.testing.assert_allclose(np.asarray(g), w, rtol=rtol,
                               atol=rtol * np.max(np.abs(w)))


@pytest.mark.parametrize('batch_norm', ['none', 'local'])
@pytest.mark.parametrize('micro', [8, 2])
def test_equals_full_batch_gradient(batch_norm, micro):
  # Without batch norm, or with it in inference mode, the micro-batches do
  # not interact: caching must give the plain full-batch gradient.
  model = _model(batch_norm)
  images, labels = _data(16)
  stats = _moving_stats(model)
  loss, want = _unrolled(model, images, labels, 16, training=False)
  _, same_order = _unrolled(model, images, labels, micro, training=False)
  step = _cached(model, images, labels, micro, training=False)
  np.testing.assert_allclose(float(step.loss), float(loss), rtol=1e-6)
  _assert_grads_close(step.gradients, same_order)
  _assert_grads_close(step.gradients, want, rtol=FULL_BATCH_RTOL)
  assert set(step.terms) == {'contrastive_loss', 'cross_entropy_loss'}
  assert step.outputs[models.PROJECTION].shape == (16, VIEWS, 4)
  for a, b in zip(_moving_stats(model), stats):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize('micro', [8, 4, 1])
def test_equals_full_batch_gradient_under_mirrored_strategy(micro):
  # 4 replicas of 8: the loss gathers the global batch of 32; the summed
  # replica gradients must equal one device's on the concatenated batch.
  # (The loops are unrolled here: see grad_cache.unroll_by_default.)
  strategy = conftest.mirrored_strategy(4)
  model = _model('local')
  images, labels = _data(32)
  _, want = _unrolled(model, images, labels, 32, training=False)
  with strategy.scope():
    replica_model = _model('local')
  replica_model.set_weights(model.get_weights())

  def shard(tensor):
    return strategy.experimental_distribute_values_from_function(
        lambda ctx: tensor[8 * ctx.replica_id_in_sync_group:][:8])

  def replica_fn(images, labels):
    return _cached(replica_model, images, labels, micro, training=False,
                   global_batch=32).gradients

  @tf.function
  def run(images, labels):
    grads = strategy.run(replica_fn, args=(images, labels))
    return [strategy.reduce(tf.distribute.ReduceOp.SUM, g, axis=None)
            for g in grads]

  # Summing over replicas reorders the float32 sums as micro-batches do
  # (micro=8 is the plain step, at 2e-5 of the largest entry).
  _assert_grads_close(run(shard(images), shard(labels)), want,
                      rtol=FULL_BATCH_RTOL)


@pytest.mark.parametrize('use_tf_function', [False, True])
def test_batch_norm_training_mode_is_per_micro_batch(use_tf_function):
  # Moving averages updated once per micro-batch (in order), not twice;
  # gradient = that of the model normalising each micro-batch by itself.
  images, labels = _data(16)
  reference = _model('local')
  _, want = _unrolled(reference, images, labels, 4, training=True)
  model = _model('local')
  before = _moving_stats(model)
  fn = lambda: _cached(model, images, labels, 4, training=True).gradients
  got = tf.function(fn)() if use_tf_function else fn()
  _assert_grads_close(got, want)
  after, expected = _moving_stats(model), _moving_stats(reference)
  assert not np.allclose(after[0], before[0])
  for a, b in zip(after, expected):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  # A full-batch step (statistics of all 16) is a different gradient.
  _, full = _unrolled(_model('local'), images, labels, 16, training=True)
  assert not all(np.allclose(g, f, rtol=1e-3) for g, f in zip(got, full))


def test_sync_batch_norm_under_mirrored_strategy():
  # Synchronised batch norm: micro-batch k of every replica is normalised
  # together; moving averages move once per micro-batch on every replica.
  strategy = conftest.mirrored_strategy(2)
  images, labels = _data(16)
  # Replica r holds rows 8r..8r+7; its micro-batch k rows 8r+4k..8r+4k+3.
  # The one-device reference embeds the global micro-batches in that order
  # (the summed loss does not depend on the order of the samples).
  order = np.concatenate([np.arange(8 * r + 4 * k, 8 * r + 4 * k + 4)
                          for k in range(2) for r in range(2)])
  reference = _model('sync')
  _, want = _unrolled(reference, tf.gather(images, order),
                      tf.gather(labels, order), 8, training=True)
  with strategy.scope():
    model = _model('sync')

  def shard(tensor):
    return strategy.experimental_distribute_values_from_function(
        lambda ctx: tensor[8 * ctx.replica_id_in_sync_group:][:8])

  def replica_fn(images, labels):
    return _cached(model, images, labels, 4, training=True,
                   global_batch=16).gradients

  @tf.function
  def run(images, labels):
    grads = strategy.run(replica_fn, args=(images, labels))
    return [strategy.reduce(tf.distribute.ReduceOp.SUM, g, axis=None)
            for g in grads]

  _assert_grads_close(run(shard(images), shard(labels)), want,
                      rtol=FULL_BATCH_RTOL)  # Summed over replicas.
  for a, b in zip(_moving_stats(model), _moving_stats(reference)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_micro_batch_equal_to_batch_is_the_plain_step():
  images, labels = _data(8)
  reference = _model('local')
  loss, want = _unrolled(reference, images, labels, 8, training=True)
  model = _model('local')
  step = _cached(model, images, labels, 8, training=True)
  assert float(step.loss) == float(loss)
  for g, w in zip(step.gradients, want):
    np.testing.assert_array_equal(g, w)
  for a, b in zip(_moving_stats(model), _moving_stats(reference)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize('micro', [3, 16, -2])
def test_micro_batch_not_dividing_raises(micro):
  model = _model('none')
  images, labels = _data(8)
  with pytest.raises(ValueError, match=r'--micro_batch_size=-?\d+ must '
                     r'divide the per-replica batch of 8'):
    _cached(model, images, labels, micro, training=True)


def test_eager_and_tf_function_agree():
  images, labels = _data(8)
  eager_model, graph_model = _model('local'), _model('local')
  eager = _cached(eager_model, images, labels, 2, training=True)
  graph = tf.function(
      lambda: _cached(graph_model, images, labels, 2, training=True))()
  _assert_grads_close(graph.gradients, eager.gradients, rtol=1e-6)
  for key in eager.terms:
    np.testing.assert_allclose(graph.terms[key], eager.terms[key], rtol=1e-6)
  for a, b in zip(_moving_stats(graph_model), _moving_stats(eager_model)):
    np.testing.assert_allclose(a, b, rtol=1e-6)


def test_mixed_bfloat16_with_loss_scale():
  # The replay yields the scaled gradients, as a plain step's would be.
  images, labels = _data(8)
  model = _model('local', dtype='mixed_bfloat16')
  optimizer = keras.optimizers.LossScaleOptimizer(
      keras.optimizers.SGD(0.1), initial_scale=1024.0)
  optimizer.build(model.trainable_variables)
  step = tf.function(lambda: _cached(model, images, labels, 2,
                                     training=False,
                                     scale_loss=optimizer.scale_loss))()
  _, unscaled = _unrolled(model, images, labels, 8, training=False)
  for g, u in zip(step.gradients, unscaled):
    assert g.dtype == tf.float32
    # bfloat16 compute: the two paths round differently.
    np.testing.assert_allclose(np.asarray(g) / 1024.0, u, rtol=0.1,
                               atol=0.05 * float(tf.reduce_max(tf.abs(u))))
  optimizer.apply_gradients(zip(step.gradients, model.trainable_variables))
  assert all(np.all(np.isfinite(v.numpy())) for v in model.variables)
