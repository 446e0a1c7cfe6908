"""Tests of supcon_tf.losses against hand-computed values and NumPy."""

import itertools
import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from supcon_tf import enums
from supcon_tf import losses
from tests import loss_oracle
from tests.conftest import mirrored_strategy
from tests.loss_oracle import numpy_supcon


_normalized = loss_oracle.normalized


def test_hand_computed_symmetric_vectors():
  # Sample 0 is e1 in both views, sample 1 is -e1: each anchor sees its twin
  # at similarity 1 and two negatives at -1, so with temperature 1
  # L = -log(e / (e + 2/e)) = log(e + 2/e) - 1 for every sample.
  e1 = np.array([1.0, 0.0], np.float32)
  features = np.stack([np.stack([e1, e1]), np.stack([-e1, -e1])])
  loss = losses.supcon_loss(features, np.array([0, 1]), temperature=1.0)
  expected = math.log(math.e + 2 / math.e) - 1
  np.testing.assert_allclose(loss.numpy(), [expected, expected], rtol=1e-6)


def test_hand_computed_inside_equals_outside_with_one_positive():
  # With exactly one positive per anchor, L_in == L_out (the mean over a
  # single term commutes with the log).
  f = _normalized([3, 2, 4], 0)
  out = losses.supcon_loss(f, None, summation_location='outside')
  inside = losses.supcon_loss(f, None, summation_location='inside')
  np.testing.assert_allclose(out.numpy(), inside.numpy(), rtol=1e-5)


def test_hand_computed_only_negatives_orthogonal():
  # Orthogonal samples, identical views, temperature 1: the positive has
  # s=1, the two negatives (other sample, both views) s=0. ONLY_NEGATIVES:
  # L = -(1 - log 2).
  f = np.zeros([2, 2, 2], np.float32)
  f[0, :, 0] = 1.0
  f[1, :, 1] = 1.0
  loss = losses.supcon_loss(f, [0, 1], temperature=1.0,
                            denominator_mode='only_negatives')
  np.testing.assert_allclose(loss.numpy(), [math.log(2) - 1] * 2, rtol=1e-6)


GRID = list(itertools.product(
    ['all_views', 'one_view'], ['outside', 'inside'],
    ['all', 'one_positive', 'only_negatives'], [-1, 0, 2, 4], [True, False]))


@pytest.mark.parametrize('contrast,summation,denominator,cap,scale', GRID)
def test_matches_numpy_over_the_grid(contrast, summation, denominator, cap,
                                     scale):
  f = _normalized([6, 2, 5], 1)
  labels = np.array([0, 1, 0, 2, 1, 0])
  kwargs = dict(temperature=0.3, contrast_mode=contrast,
                summation_location=summation, denominator_mode=denominator,
                positives_cap=cap, scale_by_temperature=scale)
  got = losses.supcon_loss(f, labels, **kwargs).numpy()
  want = numpy_supcon(f, labels, **kwargs)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('num_views', [1, 2, 3])
@pytest.mark.parametrize('summation', ['outside', 'inside'])
def test_matches_numpy_for_any_num_views(num_views, summation):
  f = _normalized([5, num_views, 4], 2)
  # Label 3 appears once: with one view that anchor has no positive -> 0.
  labels = np.array([0, 1, 0, 3, 1])
  got = losses.supcon_loss(f, labels, summation_location=summation,
                           temperature=0.5).numpy()
  want = numpy_supcon(f, labels, summation_location=summation,
                      temperature=0.5)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  assert np.all(np.isfinite(got))
  if num_views == 1:
    assert got[3] == 0.0


def test_simclr_limit_equals_identity_labels():
  f = _normalized([5, 2, 6], 3)
  np.testing.assert_allclose(
      losses.supcon_loss(f, None).numpy(),
      losses.supcon_loss(f, np.arange(5)).numpy(), rtol=1e-6)


def test_one_hot_equals_int_labels():
  f = _normalized([6, 2, 4], 4)
  labels = np.array([2, 0, 2, 1, 0, 2])
  np.testing.assert_allclose(
      losses.supcon_loss(f, labels, positives_cap=2).numpy(),
      losses.supcon_loss(f, np.eye(3)[labels], positives_cap=2).numpy(),
      rtol=1e-6)


def test_soft_labels_match_numpy():
  f = _normalized([4, 2, 3], 5)
  soft = np.array([[0.7, 0.3], [0.2, 0.8], [1.0, 0.0], [0.5, 0.5]],
                  np.float32)
  np.testing.assert_allclose(losses.supcon_loss(f, soft).numpy(),
                             numpy_supcon(f, soft), rtol=1e-5)


def test_enum_members_and_strings_agree():
  f = _normalized([4, 2, 3], 6)
  labels = [0, 1, 1, 0]
  a = losses.supcon_loss(
      f, labels, contrast_mode=enums.LossContrastMode.ONE_VIEW,
      summation_location=enums.LossSummationLocation.INSIDE,
      denominator_mode=enums.LossDenominatorMode.ONE_POSITIVE)
  b = losses.supcon_loss(f, labels, contrast_mode='ONE_VIEW',
                         summation_location='inside',
                         denominator_mode='one_positive')
  np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_wrapper_equals_function_and_round_trips():
  f = _normalized([4, 2, 3], 7)
  labels = np.array([0, 1, 1, 0])
  loss_obj = losses.SupConLoss(temperature=0.2, denominator_mode='one_positive',
                               reduction=None)
  np.testing.assert_allclose(
      loss_obj(labels, f).numpy(),
      losses.supcon_loss(f, labels, temperature=0.2,
                         denominator_mode='one_positive').numpy(), rtol=1e-6)
  config = loss_obj.get_config()
  assert config['denominator_mode'] == 'one_positive'
  clone = losses.SupConLoss.from_config(config)
  np.testing.assert_allclose(clone(labels, f).numpy(), loss_obj(labels, f))
  restored = keras.losses.deserialize(keras.losses.serialize(loss_obj))
  assert isinstance(restored, losses.SupConLoss)
  # Default reduction is the batch mean.
  np.testing.assert_allclose(
      losses.SupConLoss(temperature=0.2, denominator_mode='one_positive')(
          labels, f).numpy(), loss_obj(labels, f).numpy().mean(), rtol=1e-6)


def test_wrapper_in_model_fit():
  # A model producing [batch, 2, dim] normalised features trains with
  # compile(loss=SupConLoss()) and its loss goes down.
  rng = np.random.RandomState(0)
  x = rng.randn(32, 2, 6).astype(np.float32)
  y = (x[:, 0, 0] > 0).astype(np.int32)
  x[:, :, 1] += 3 * (2 * y[:, None] - 1)
  inputs = keras.Input([2, 6])
  z = keras.layers.Dense(4)(inputs)
  z = keras.layers.UnitNormalization(axis=-1)(z)
  model = keras.Model(inputs, z)
  model.compile(optimizer=keras.optimizers.SGD(0.5),
                loss=losses.SupConLoss(temperature=0.5))
  history = model.fit(x, y, batch_size=32, epochs=15, verbose=0)
  assert history.history['loss'][-1] < history.history['loss'][0]


def test_simclr_wrapper_ignores_labels():
  f = _normalized([4, 2, 3], 8)
  np.testing.assert_allclose(
      losses.SupConLoss(use_labels=False, reduction=None)(
          np.array([0, 0, 0, 0]), f).numpy(),
      losses.supcon_loss(f).numpy(), rtol=1e-6)


def test_gradients_finite_and_match_numeric():
  f = tf.constant(_normalized([4, 2, 3], 9), tf.float64)
  labels = [0, 1, 0, 1]
  for summation in ('outside', 'inside'):
    with tf.GradientTape() as tape:
      tape.watch(f)
      loss = tf.reduce_sum(
          losses.supcon_loss(tf.cast(f, tf.float32), labels,
                             summation_location=summation))
    grad = tape.gradient(loss, f)
    assert grad is not None and np.all(np.isfinite(grad.numpy()))
    # Central finite differences on a few coordinates.
    for idx in [(0, 0, 0), (2, 1, 2), (3, 0, 1)]:
      eps = 1e-3
      delta = np.zeros(f.shape)
      delta[idx] = eps
      plus = numpy_supcon(f.numpy() + delta, labels,
                          summation_location=summation).sum()
      minus = numpy_supcon(f.numpy() - delta, labels,
                           summation_location=summation).sum()
      np.testing.assert_allclose(grad.numpy()[idx], (plus - minus) / (2 * eps),
                                 rtol=2e-2, atol=2e-3)


def test_no_positive_gives_zero_loss_and_finite_gradient():
  f = tf.constant(_normalized([3, 1, 4], 10))
  for summation in ('outside', 'inside'):
    with tf.GradientTape() as tape:
      tape.watch(f)
      loss = losses.supcon_loss(f, [0, 1, 2], summation_location=summation)
    np.testing.assert_array_equal(loss.numpy(), [0.0, 0.0, 0.0])
    grad = tape.gradient(loss, f,
                         unconnected_gradients=tf.UnconnectedGradients.ZERO)
    np.testing.assert_array_equal(grad.numpy(), np.zeros([3, 1, 4]))
    # Mixed: samples 0 and 2 have a positive, sample 1 has none.
    with tf.GradientTape() as tape:
      tape.watch(f)
      loss = losses.supcon_loss(f, [0, 1, 0], summation_location=summation)
    assert loss.numpy()[1] == 0.0 and loss.numpy()[0] > 0
    grad = tape.gradient(loss, f)
    assert np.all(np.isfinite(grad.numpy())) and np.any(grad.numpy() != 0)


@pytest.mark.parametrize('dtype', [tf.bfloat16, tf.float16])
def test_low_precision_input_computed_in_float32(dtype):
  f = _normalized([4, 2, 8], 11)
  labels = [0, 1, 1, 0]
  low = losses.supcon_loss(tf.cast(f, dtype), labels)
  assert low.dtype == tf.float32
  # Only the input rounding differs.
  want = losses.supcon_loss(tf.cast(tf.cast(f, dtype), tf.float32), labels)
  np.testing.assert_allclose(low.numpy(), want.numpy(), rtol=1e-6)
  np.testing.assert_allclose(low.numpy(), numpy_supcon(f, labels), rtol=0.05)


def test_eager_equals_tf_function_and_xla():
  f = _normalized([6, 2, 5], 12)
  labels = np.array([0, 1, 0, 2, 1, 0])
  fn = lambda x, y: losses.supcon_loss(x, y, positives_cap=2)  # pylint: disable=unnecessary-lambda-assignment
  eager = fn(f, labels).numpy()
  np.testing.assert_allclose(tf.function(fn)(f, labels).numpy(), eager,
                             rtol=1e-6)
  np.testing.assert_allclose(
      tf.function(fn, jit_compile=True)(f, labels).numpy(), eager, rtol=1e-5)


def test_dynamic_batch_in_tf_function():
  fn = tf.function(
      lambda x, y: losses.supcon_loss(x, y),
      input_signature=[tf.TensorSpec([None, 2, 3]), tf.TensorSpec([None],
                                                                  tf.int32)])
  f = _normalized([5, 2, 3], 13)
  labels = np.array([0, 1, 0, 1, 1], np.int32)
  np.testing.assert_allclose(fn(f, labels).numpy(), numpy_supcon(f, labels),
                             rtol=1e-5)


@pytest.mark.parametrize('kwargs,features_shape,labels,match', [
    ({}, [4, 3], None, 'rank'),
    ({}, [4, 2, 3], np.zeros([3], np.int32), 'batch'),
    ({}, [4, 2, 3], np.zeros([4, 2, 2]), 'labels must be'),
    ({'temperature': 0.0}, [4, 2, 3], None, 'temperature'),
    ({'temperature': -1.0}, [4, 2, 3], None, 'temperature'),
    ({'positives_cap': 3}, [4, 2, 3], None, 'positives_cap'),
    ({'positives_cap': -2}, [4, 2, 3], None, 'positives_cap'),
    ({'contrast_mode': 'some_views'}, [4, 2, 3], None, 'some_views'),
    ({'summation_location': 'middle'}, [4, 2, 3], None, 'middle'),
    ({'denominator_mode': 'none'}, [4, 2, 3], None, 'allowed'),
])
def test_bad_inputs_raise_clear_errors(kwargs, features_shape, labels, match):
  with pytest.raises(ValueError, match=match):
    losses.supcon_loss(np.ones(features_shape, np.float32), labels, **kwargs)


def test_integer_features_rejected():
  with pytest.raises(ValueError, match='floating'):
    losses.supcon_loss(np.ones([2, 2, 3], np.int32))


# --- Multi-replica exactness -------------------------------------------------


def replica_run(strategy, x, labels, w_init, loss_kwargs,
                loss_fn=losses.supcon_loss):
  """Per-sample losses and summed gradients of `loss_fn` under `strategy`.

  Features are l2_normalize(x @ w) with x [global_batch, views, in] split
  evenly over the replicas; the gradient is with respect to w.
  """
  global_batch = x.shape[0]
  replicas = strategy.num_replicas_in_sync
  local = global_batch // replicas
  with strategy.scope():
    w = tf.Variable(w_init)

  def value_fn(ctx, array):
    i = ctx.replica_id_in_sync_group
    return tf.constant(array[i * local:(i + 1) * local])

  xs = strategy.experimental_distribute_values_from_function(
      lambda ctx: value_fn(ctx, x))
  ys = strategy.experimental_distribute_values_from_function(
      lambda ctx: value_fn(ctx, labels))

  @tf.function
  def step(xb, yb):
    def replica_fn(xr, yr):
      with tf.GradientTape() as tape:
        z = tf.math.l2_normalize(tf.einsum('bvi,io->bvo', xr, w), axis=-1)
        per_sample = loss_fn(z, yr, **loss_kwargs)
        # Explicit reduction by the global batch (DESIGN.md style rule 4).
        scaled = tf.reduce_sum(per_sample) / global_batch
      return per_sample, tape.gradient(scaled, w)
    per_sample, grads = strategy.run(replica_fn, args=(xb, yb))
    return per_sample, strategy.reduce(tf.distribute.ReduceOp.SUM, grads,
                                       axis=None)

  per_sample, grad = step(xs, ys)
  per_sample = np.concatenate(
      [t.numpy() for t in strategy.experimental_local_results(per_sample)])
  return per_sample, grad.numpy()


@pytest.mark.parametrize('loss_kwargs', [
    dict(),
    dict(contrast_mode='one_view', summation_location='inside'),
    dict(denominator_mode='one_positive', positives_cap=2),
    dict(denominator_mode='only_negatives', temperature=0.5),
])
def test_mirrored_four_replicas_equal_single_device(loss_kwargs):
  rng = np.random.RandomState(0)
  x = rng.randn(8, 2, 5).astype(np.float32)
  labels = np.array([0, 1, 2, 0, 1, 0, 2, 1], np.int32)
  w_init = rng.randn(5, 4).astype(np.float32)
  single = tf.distribute.OneDeviceStrategy('/cpu:0')
  mirrored = mirrored_strategy(4)
  loss_1, grad_1 = replica_run(single, x, labels, w_init, loss_kwargs)
  loss_4, grad_4 = replica_run(mirrored, x, labels, w_init, loss_kwargs)
  np.testing.assert_allclose(loss_4, loss_1, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(grad_4, grad_1, rtol=1e-4, atol=1e-6)
  # And the gathered contrast set matters: per-local-batch losses differ.
  z = x @ w_init
  z /= np.linalg.norm(z, axis=-1, keepdims=True)
  local_only = np.concatenate([
      losses.supcon_loss(z[i:i + 2], labels[i:i + 2], **loss_kwargs).numpy()
      for i in range(0, 8, 2)])
  assert not np.allclose(local_only, loss_1, atol=1e-3)


def test_mirrored_simclr_and_one_hot_labels():
  rng = np.random.RandomState(1)
  x = rng.randn(8, 2, 5).astype(np.float32)
  w_init = rng.randn(5, 4).astype(np.float32)
  one_hot = np.eye(3, dtype=np.float32)[[0, 1, 2, 0, 1, 0, 2, 1]]
  single = tf.distribute.OneDeviceStrategy('/cpu:0')
  mirrored = mirrored_strategy(2)
  for labels in (one_hot, np.arange(8, dtype=np.int32)):
    loss_1, grad_1 = replica_run(single, x, labels, w_init, {})
    loss_2, grad_2 = replica_run(mirrored, x, labels, w_init, {})
    np.testing.assert_allclose(loss_2, loss_1, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grad_2, grad_1, rtol=1e-4, atol=1e-6)
