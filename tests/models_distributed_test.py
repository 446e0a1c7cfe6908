"""Global batch norm of supcon_tf.models under MirroredStrategy on logical CPUs.

With `use_global_batch_norm` the batch moments are all-reduced across replicas,
so one training forward (and backward) split over N replicas must equal one
device on the whole batch: the outputs (which depend on the batch statistics),
the moving statistics afterwards, and the summed gradients. With local batch
norm they must differ (a check that the test can fail).

Logical CPU devices must exist before TensorFlow initialises: tests/conftest.py
creates them (pytest loads it before any test module, whether this file runs
alone or with the whole directory) and hands out one cached MirroredStrategy per
replica count. Tests needing more devices than exist are skipped.
"""

import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import keras  # pylint: disable=g-import-not-at-top
import numpy as np
import pytest
import tensorflow as tf

from supcon_tf import config
from supcon_tf import models
from tests import conftest

_GLOBAL_BATCH = 8
_NUM_CLASSES = 3
_MODEL_CONFIG = config.ModelConfig(
    depth=18, width=0.125, first_conv_kernel_size=3, first_conv_stride=1,
    use_initial_max_pool=False, projection_head_layers=(16, 8),
    use_projection_batch_norm=True, use_projection_batch_norm_beta=True)


def _strategy(n):
  available = len(tf.config.list_logical_devices('CPU'))
  if available < n:
    pytest.skip(f'needs {n} logical CPU devices, have {available}')
  return conftest.mirrored_strategy(n)


def _inputs():
  rng = np.random.RandomState(0)
  # Different scale and offset per sample, so that per-replica statistics are
  # far from the global ones.
  scale = np.arange(1, _GLOBAL_BATCH + 1, dtype=np.float32)[:, None, None, None]
  images = rng.rand(_GLOBAL_BATCH, 16, 16, 3).astype(np.float32) * scale
  images += scale / 2
  # Weights of a fixed linear "loss" on the projection and the embedding.
  weights = rng.randn(_GLOBAL_BATCH, 8).astype(np.float32)
  emb_weights = rng.randn(_GLOBAL_BATCH, 64 + _NUM_CLASSES).astype(np.float32)
  return images, weights, emb_weights


def _loss(outputs, weights, emb_weights):
  # Linear in every output with a gradient path, so that each trainable
  # variable (the classifier behind its stop-gradient included) gets one.
  rest = tf.concat([outputs[models.EMBEDDING], outputs[models.LOGITS]], -1)
  return (tf.reduce_sum(outputs[models.PROJECTION] * weights) +
          tf.reduce_sum(rest * emb_weights))


def _bn_layers(model):
  """Batch norms of the encoder (first: `stem_bn`), then the projection head."""
  return [layer for layer in (model.encoder.layers +
                              model.projection_head.sublayers)
          if isinstance(layer, keras.layers.BatchNormalization)]


def _single_device(model_config):
  keras.utils.set_random_seed(1)
  model = models.build_model(model_config, _NUM_CLASSES)
  initial_weights = model.get_weights()
  images, weights, emb_weights = _inputs()
  with tf.GradientTape() as tape:
    outputs = model(images, training=True)
    loss = _loss(outputs, weights, emb_weights)
  grads = tape.gradient(loss, model.trainable_variables)
  stats = [(bn.moving_mean.numpy(), bn.moving_variance.numpy())
           for bn in _bn_layers(model)]
  return (initial_weights, {k: v.numpy() for k, v in outputs.items()},
          [g.numpy() for g in grads], stats)


def _mirrored(model_config, num_replicas, initial_weights):
  strategy = _strategy(num_replicas)
  with strategy.scope():
    model = models.build_model(model_config, _NUM_CLASSES)
  model.set_weights(initial_weights)
  images, weights, emb_weights = _inputs()
  per_replica = _GLOBAL_BATCH // num_replicas

  def shard(array):
    return strategy.experimental_distribute_values_from_function(
        lambda ctx: array[ctx.replica_id_in_sync_group * per_replica:
                          (ctx.replica_id_in_sync_group + 1) * per_replica])

  @tf.function
  def step(images, weights, emb_weights):
    def replica_fn(images, weights, emb_weights):
      with tf.GradientTape() as tape:
        outputs = model(images, training=True)
        loss = _loss(outputs, weights, emb_weights)
      return outputs, tape.gradient(loss, model.trainable_variables)
    outputs, grads = strategy.run(replica_fn,
                                  args=(images, weights, emb_weights))
    # The global loss is the sum of the replica losses.
    grads = [strategy.reduce(tf.distribute.ReduceOp.SUM, g, axis=None)
             for g in grads]
    return outputs, grads

  outputs, grads = step(shard(images), shard(weights), shard(emb_weights))
  outputs = {k: np.concatenate([t.numpy() for t in
                                strategy.experimental_local_results(v)])
             for k, v in outputs.items()}
  stats = []
  for bn in _bn_layers(model):
    # Every replica's copy of the moving statistics must agree.
    means = strategy.experimental_local_results(bn.moving_mean.value)
    variances = strategy.experimental_local_results(bn.moving_variance.value)
    for m, v in zip(means[1:], variances[1:]):
      np.testing.assert_allclose(m.numpy(), means[0].numpy(), atol=1e-6)
      np.testing.assert_allclose(v.numpy(), variances[0].numpy(), atol=1e-6)
    stats.append((means[0].numpy(), variances[0].numpy()))
  return outputs, [g.numpy() for g in grads], stats


@pytest.mark.parametrize('num_replicas', [2, 4])
def test_global_batch_norm_equals_one_device_on_whole_batch(num_replicas):
  initial, outputs, grads, stats = _single_device(_MODEL_CONFIG)
  d_outputs, d_grads, d_stats = _mirrored(_MODEL_CONFIG, num_replicas, initial)
  for key in models.OUTPUT_KEYS:
    np.testing.assert_allclose(d_outputs[key], outputs[key], rtol=1e-4,
                               atol=1e-4, err_msg=key)
  assert len(d_stats) == len(stats) == 21 + 1  # Encoder + projection head.
  for (m, v), (dm, dv) in zip(stats, d_stats):
    np.testing.assert_allclose(dm, m, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(dv, v, rtol=1e-4, atol=1e-5)
  for g, dg in zip(grads, d_grads):
    np.testing.assert_allclose(dg, g, rtol=1e-3, atol=1e-4)


def test_local_batch_norm_differs_from_one_device():
  local_config = config.ModelConfig(
      **{**_MODEL_CONFIG.__dict__, 'use_global_batch_norm': False})
  initial, outputs, _, stats = _single_device(local_config)
  d_outputs, _, d_stats = _mirrored(local_config, 2, initial)
  assert np.abs(d_outputs[models.EMBEDDING] -
                outputs[models.EMBEDDING]).max() > 1e-2
  # Local updates are averaged over the replicas (and the copies agree, checked
  # in _mirrored). The first batch norm sees the same activations as one
  # device, so with equal shards its moving mean matches one device's, while
  # its moving variance lacks the between-shard part.
  (mean, variance), (d_mean, d_variance) = stats[0], d_stats[0]
  np.testing.assert_allclose(d_mean, mean, rtol=1e-4, atol=1e-5)
  assert np.abs(d_variance - variance).max() > 1e-2
