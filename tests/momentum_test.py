"""Tests of supcon_tf.momentum: EMA, the key queue and the queue loss."""

import itertools

import keras
import numpy as np
import pytest
import tensorflow as tf

from supcon_tf import losses
from supcon_tf import models
from supcon_tf.training import momentum
from tests import loss_oracle
from tests.conftest import mirrored_strategy

ONE_DEVICE = tf.distribute.OneDeviceStrategy('/cpu:0')


_normalized = loss_oracle.normalized


def _local_values(strategy, array):
  """Splits `array` along axis 0 into the replicas' local values."""
  local = len(array) // strategy.num_replicas_in_sync

  def value_fn(ctx):
    i = ctx.replica_id_in_sync_group
    return tf.constant(array[i * local:(i + 1) * local])

  return strategy.experimental_distribute_values_from_function(value_fn)


def numpy_supcon_with_queue(features, labels, queue, queue_labels, **kwargs):
  """The NumPy oracle with the queue as extra contrast samples."""
  return loss_oracle.numpy_supcon(features, labels, extra_features=queue,
                                  extra_labels=queue_labels, **kwargs)


# --- EMA ---------------------------------------------------------------------


def test_ema_update_hand_computed():
  target = tf.Variable([1.0, 2.0])
  keras_target = keras.Variable([[4.0]])
  momentum.ema_update([target, keras_target],
                      [tf.constant([3.0, 5.0]), tf.constant([[0.0]])], 0.9)
  np.testing.assert_allclose(target.numpy(), [1.2, 2.3], rtol=1e-6)
  np.testing.assert_allclose(np.asarray(keras_target.numpy()), [[3.6]],
                             rtol=1e-6)
  momentum.ema_update([target], [tf.constant([3.0, 5.0])], 0.0)  # Copy.
  np.testing.assert_allclose(target.numpy(), [3.0, 5.0])


@pytest.mark.parametrize('replicas', [2, 4])
def test_ema_update_in_replica_context(replicas):
  strategy = mirrored_strategy(replicas)
  with strategy.scope():
    target = tf.Variable([1.0, 2.0])
    source = tf.Variable([3.0, 5.0])

  @tf.function
  def step():
    strategy.run(lambda: momentum.ema_update([target], [source], 0.5))

  step()
  step()
  # 1 -> 2 -> 2.5; 2 -> 3.5 -> 4.25, on every replica.
  for value in strategy.experimental_local_results(target):
    np.testing.assert_allclose(value.numpy(), [2.5, 4.25], rtol=1e-6)


# --- The queue ---------------------------------------------------------------


def test_queue_is_fifo_and_wraps_around():
  queue = momentum.FeatureQueue(5, 2)
  feats, labels, mask = queue.read()
  np.testing.assert_array_equal(mask.numpy(), np.zeros(5))
  rows = lambda start, n: np.arange(start, start + n, dtype=np.float32)[:, None] * [1, -1]  # pylint: disable=unnecessary-lambda-assignment
  queue.enqueue(rows(0, 2), [0, 1])
  queue.enqueue(rows(2, 2), [2, 3])
  feats, labels, mask = queue.read()
  np.testing.assert_array_equal(mask.numpy(), [1, 1, 1, 1, 0])
  np.testing.assert_array_equal(labels.numpy()[:4], [0, 1, 2, 3])
  np.testing.assert_array_equal(feats.numpy()[:4], rows(0, 4))
  queue.enqueue(rows(4, 3), [4, 5, 6])  # Wraps: slots 4, 0, 1.
  feats, labels, mask = queue.read()
  np.testing.assert_array_equal(mask.numpy(), np.ones(5))
  np.testing.assert_array_equal(labels.numpy(), [5, 6, 2, 3, 4])
  np.testing.assert_array_equal(feats.numpy(), rows(0, 7)[[5, 6, 2, 3, 4]])
  assert int(queue.pointer.numpy()) == 2
  # More rows than slots: the newest `size` are kept, oldest first.
  queue.enqueue(rows(7, 7), np.arange(7, 14))
  np.testing.assert_array_equal(queue.read()[1].numpy(),
                                [12, 13, 9, 10, 11])
  assert int(queue.pointer.numpy()) == 2  # (2 + 5) % 5.
  assert int(queue.count.numpy()) == 5


def test_queue_enqueue_with_a_dynamic_batch():
  queue = momentum.FeatureQueue(3, 1)
  enqueue = tf.function(queue.enqueue, input_signature=[
      tf.TensorSpec([None, 1]), tf.TensorSpec([None], tf.int32)])
  enqueue(np.ones([2, 1], np.float32), [1, 2])
  enqueue(np.zeros([4, 1], np.float32), [3, 4, 5, 6])
  np.testing.assert_array_equal(queue.read()[1].numpy(), [5, 6, 4])
  assert int(queue.pointer.numpy()) == 2 and int(queue.count.numpy()) == 3


def test_queue_checkpoint_round_trip(tmp_path):
  queue = momentum.FeatureQueue(3, 2, label_shape=(4,), label_dtype=tf.float32)
  queue.enqueue(np.ones([2, 2], np.float32), np.eye(4)[:2])
  path = tf.train.Checkpoint(queue=queue).write(str(tmp_path / 'ckpt'))
  other = momentum.FeatureQueue(3, 2, label_shape=(4,),
                                label_dtype=tf.float32)
  tf.train.Checkpoint(queue=other).read(path).assert_consumed()
  for a, b in zip(queue.read(), other.read()):
    np.testing.assert_array_equal(a.numpy(), b.numpy())


@pytest.mark.parametrize('replicas', [2, 4])
def test_queue_under_replicas_enqueues_the_global_batch_once(replicas):
  strategy = mirrored_strategy(replicas)
  with strategy.scope():
    queue = momentum.FeatureQueue(12, 3)
  keys = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)
  labels = np.arange(8, dtype=np.int32)

  @tf.function
  def step(k, y):
    strategy.run(queue.enqueue, args=(k, y))

  step(_local_values(strategy, keys), _local_values(strategy, labels))
  step(_local_values(strategy, keys + 100), _local_values(strategy,
                                                          labels + 100))
  # 16 keys into 12 slots: the second batch's last 4 keys wrapped around to
  # slots 0..3; the global batch went in once per step, in replica order.
  want_labels = np.concatenate([labels[4:] + 100, labels[4:],
                                labels[:4] + 100])
  want_feats = np.concatenate([keys[4:] + 100, keys[4:], keys[:4] + 100])
  for replica_labels, replica_feats, count in zip(
      strategy.experimental_local_results(queue.labels),
      strategy.experimental_local_results(queue.features),
      strategy.experimental_local_results(queue.count)):
    np.testing.assert_array_equal(replica_labels.numpy(), want_labels)
    np.testing.assert_array_equal(replica_feats.numpy(), want_feats)
    assert int(count.numpy()) == 12


# --- The queue-augmented loss ------------------------------------------------

VARIANTS = [
    dict(contrast_mode=c, summation_location=s, denominator_mode=d,
         scale_by_temperature=t, temperature=0.3)
    for c, s, d, t in itertools.product(
        ['all_views', 'one_view'], ['outside', 'inside'],
        ['all', 'one_positive', 'only_negatives'], [True, False])]


@pytest.mark.parametrize('kwargs', VARIANTS)
def test_empty_queue_equals_plain_loss(kwargs):
  f = _normalized([6, 2, 5], 1)
  labels = np.array([0, 1, 0, 2, 1, 0])
  want = losses.supcon_loss(f, labels, **kwargs).numpy()
  empty = losses.supcon_loss_with_queue(
      f, labels, np.zeros([0, 5], np.float32), np.zeros([0], np.int32),
      **kwargs)
  np.testing.assert_allclose(empty.numpy(), want, rtol=1e-5, atol=1e-6)
  # A queue whose slots are all unfilled, and no queue at all, too.
  masked = losses.supcon_loss_with_queue(
      f, labels, _normalized([4, 5], 2), np.array([0, 1, 2, 0]),
      queue_mask=np.zeros(4), **kwargs)
  np.testing.assert_allclose(masked.numpy(), want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(
      losses.supcon_loss_with_queue(f, labels, **kwargs).numpy(), want,
      rtol=1e-5, atol=1e-6)


def test_empty_queue_equals_plain_loss_simclr_and_soft_labels():
  f = _normalized([4, 2, 3], 3)
  soft = np.array([[.7, .3], [.2, .8], [1, 0], [.5, .5]], np.float32)
  for labels, queue_labels in ((None, None), (soft, np.zeros([0, 2]))):
    np.testing.assert_allclose(
        losses.supcon_loss_with_queue(f, labels, np.zeros([0, 3]),
                                        queue_labels).numpy(),
        losses.supcon_loss(f, labels).numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('kwargs', VARIANTS[::3])
def test_queue_loss_matches_numpy(kwargs):
  f = _normalized([5, 2, 4], 4)
  labels = np.array([0, 1, 0, 3, 1])  # Label 3 has positives only in queue.
  queue = _normalized([6, 4], 5)
  queue_labels = np.array([3, 0, 2, 2, 1, 3])
  mask = np.array([1, 1, 1, 0, 1, 0], np.float32)
  got = losses.supcon_loss_with_queue(f, labels, queue, queue_labels,
                                        queue_mask=mask, **kwargs).numpy()
  keep = mask > 0
  want = numpy_supcon_with_queue(f, labels, queue[keep], queue_labels[keep],
                                 **kwargs)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  # SimCLR: every queue entry is a negative.
  np.testing.assert_allclose(
      losses.supcon_loss_with_queue(f, None, queue, None, **kwargs).numpy(),
      numpy_supcon_with_queue(f, None, queue, None, **kwargs), rtol=1e-5,
      atol=1e-6)


def test_positives_cap_is_rejected():
  with pytest.raises(ValueError, match='positives_cap'):
    losses.supcon_loss_with_queue(_normalized([2, 2, 3], 0), [0, 1],
                                    positives_cap=2)


def test_queue_loss_four_replicas_equal_single_device():
  rng = np.random.RandomState(0)
  x = rng.randn(8, 2, 5).astype(np.float32)
  labels = np.array([0, 1, 2, 0, 1, 0, 2, 1], np.int32)
  w_init = rng.randn(5, 4).astype(np.float32)
  queue = _normalized([6, 4], 6)
  queue_labels = np.array([0, 1, 2, 2, 1, 0], np.int32)
  mask = np.array([1, 1, 1, 1, 0, 0], np.float32)

  def run(strategy):
    with strategy.scope():
      w = tf.Variable(w_init)

    @tf.function
    def step(xb, yb):
      def replica_fn(xr, yr):
        with tf.GradientTape() as tape:
          z = tf.math.l2_normalize(tf.einsum('bvi,io->bvo', xr, w), axis=-1)
          per_sample = losses.supcon_loss_with_queue(
              z, yr, queue, queue_labels, queue_mask=mask,
              denominator_mode='one_positive')
          scaled = tf.reduce_sum(per_sample) / 8
        return per_sample, tape.gradient(scaled, w)
      per_sample, grads = strategy.run(replica_fn, args=(xb, yb))
      return per_sample, strategy.reduce(tf.distribute.ReduceOp.SUM, grads,
                                         axis=None)

    per_sample, grad = step(_local_values(strategy, x),
                            _local_values(strategy, labels))
    return np.concatenate([t.numpy() for t in
                           strategy.experimental_local_results(per_sample)]
                          ), grad.numpy()

  loss_1, grad_1 = run(ONE_DEVICE)
  loss_4, grad_4 = run(mirrored_strategy(4))
  np.testing.assert_allclose(loss_4, loss_1, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(grad_4, grad_1, rtol=1e-4, atol=1e-6)


# --- The momentum encoder ----------------------------------------------------


def _tiny_model(seed):
  keras.utils.set_random_seed(seed)
  inputs = keras.Input([4, 4, 3])
  x = keras.layers.Flatten()(inputs)
  x = keras.layers.Dense(6)(x)
  encoder = keras.Model(inputs, x)
  model = models.SupConModel(
      encoder, models.ProjectionHead(feature_dims=(5, 3)),
      models.ClassificationHead(2))
  model.build((None, 4, 4, 3))
  return model


@pytest.mark.parametrize('replicas', [1, 2])
def test_momentum_contrast_copies_then_averages_and_enqueues(replicas):
  strategy = ONE_DEVICE if replicas == 1 else mirrored_strategy(replicas)
  with strategy.scope():
    online = _tiny_model(0)
    contrast = momentum.MomentumContrast(_tiny_model(1), online,
                                         queue_size=16, momentum=0.75)
  images = np.random.RandomState(0).rand(4, 2, 4, 4, 3).astype(np.float32)
  labels = np.array([0, 1, 1, 0], np.int32)

  @tf.function
  def update(x, y):
    strategy.run(contrast.update, args=(x, y))

  def online_values():
    return [np.array(v.numpy()) for v in online.encoder.trainable_variables +
            online.projection_head.trainable_variables]

  update(_local_values(strategy, images), _local_values(strategy, labels))
  # First update: the key model becomes a copy of the online one.
  first = online_values()
  for k, o in zip(contrast.key_variables(), first):
    np.testing.assert_allclose(np.array(k.numpy()), o, rtol=1e-6)
  feats, queue_labels, mask = contrast.read_queue()
  np.testing.assert_array_equal(mask.numpy(), [1] * 8 + [0] * 8)
  # Keys of every view, sample-major, labels repeated per view.
  np.testing.assert_array_equal(queue_labels.numpy()[:8],
                                [0, 0, 1, 1, 1, 1, 0, 0])
  want_keys = online(images, training=True)[models.PROJECTION].numpy()
  np.testing.assert_allclose(feats.numpy()[:8], want_keys.reshape(8, 3),
                             rtol=1e-4, atol=1e-5)
  # Then EMA: k <- 0.75 k + 0.25 q.
  for v in online.encoder.trainable_variables:
    v.assign(v + 1.0)
  update(_local_values(strategy, images), _local_values(strategy, labels))
  second = online_values()
  for k, a, b in zip(contrast.key_variables(), first, second):
    np.testing.assert_allclose(np.array(k.numpy()), 0.75 * a + 0.25 * b,
                               rtol=1e-5, atol=1e-6)
  assert int(contrast.queue.count.numpy()) == 16
