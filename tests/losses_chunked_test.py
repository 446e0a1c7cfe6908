"""Tests of the memory-bounded (chunk_size) path of supcon_tf.losses.

The chunked loss recomputes blocks of anchors in its backward pass; it must
give the dense loss's values and gradients for every variant, on one device
and under a strategy, eagerly and in tf.function.
"""

import itertools

from absl import flags
import numpy as np
import pytest
import tensorflow as tf

from supcon_tf import config as config_lib
from supcon_tf import losses
from tests import loss_oracle
from tests.conftest import mirrored_strategy
from tests.losses_test import replica_run
from tests.loss_oracle import numpy_supcon


_normalized = loss_oracle.normalized


def _loss_and_grad(features, labels, **kwargs):
  """Per-sample losses and d(weighted sum)/d features, eagerly."""
  features = tf.constant(features)
  # Distinct weights per sample so that a misplaced row gradient shows.
  weights = tf.range(1.0, features.shape[0] + 1.0)
  with tf.GradientTape() as tape:
    tape.watch(features)
    loss = losses.supcon_loss(features, labels, **kwargs)
    total = tf.reduce_sum(loss * weights)
  return loss.numpy(), tape.gradient(total, features).numpy()


def _assert_same(got, want):
  (loss_got, grad_got), (loss_want, grad_want) = got, want
  np.testing.assert_allclose(loss_got, loss_want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(grad_got, grad_want, rtol=1e-5, atol=1e-6)


# Batch 8: chunk 2 -> 4 blocks of 2 (divides), chunk 3 -> 3 blocks of 3 (one
# padding row).
FEATURES = _normalized([8, 2, 5], 0)
LABELS = np.array([0, 1, 0, 2, 1, 0, 3, 2])
GRID = list(itertools.product(
    ['all_views', 'one_view'], ['outside', 'inside'],
    ['all', 'one_positive', 'only_negatives'], [-1, 2]))


@pytest.mark.parametrize('contrast,summation,denominator,cap', GRID)
def test_chunked_equals_dense_over_the_grid(contrast, summation, denominator,
                                            cap):
  kwargs = dict(temperature=0.3, contrast_mode=contrast,
                summation_location=summation, denominator_mode=denominator,
                positives_cap=cap)
  dense = _loss_and_grad(FEATURES, LABELS, **kwargs)
  np.testing.assert_allclose(dense[0], numpy_supcon(FEATURES, LABELS,
                                                    **kwargs),
                             rtol=1e-5, atol=1e-6)
  for chunk_size in (2, 3):
    _assert_same(_loss_and_grad(FEATURES, LABELS, chunk_size=chunk_size,
                                **kwargs), dense)


SOFT = np.abs(np.random.RandomState(1).randn(8, 3)).astype(np.float32) + 0.1
SOFT /= SOFT.sum(axis=1, keepdims=True)


@pytest.mark.parametrize('labels', [None, 'soft', 'one_hot'])
@pytest.mark.parametrize('summation,denominator,cap', [
    ('outside', 'all', -1), ('inside', 'one_positive', -1),
    ('outside', 'only_negatives', 2), ('outside', 'one_positive', 0),
])
def test_chunked_equals_dense_for_other_labels(labels, summation, denominator,
                                               cap):
  labels = {None: None, 'soft': SOFT,
            'one_hot': np.eye(4, dtype=np.float32)[LABELS]}[labels]
  kwargs = dict(temperature=0.5, summation_location=summation,
                denominator_mode=denominator, positives_cap=cap)
  dense = _loss_and_grad(FEATURES, labels, **kwargs)
  np.testing.assert_allclose(dense[0], numpy_supcon(FEATURES, labels,
                                                    **kwargs),
                             rtol=1e-5, atol=1e-6)
  _assert_same(_loss_and_grad(FEATURES, labels, chunk_size=3, **kwargs),
               dense)


def test_one_view_without_positives_is_zero_and_finite():
  # One view and singleton classes: several anchors have no positive.
  f = _normalized([5, 1, 4], 2)
  labels = np.array([0, 1, 0, 2, 3])
  for summation in ('outside', 'inside'):
    dense = _loss_and_grad(f, labels, summation_location=summation)
    chunked = _loss_and_grad(f, labels, summation_location=summation,
                             chunk_size=2)
    _assert_same(chunked, dense)
    assert np.all(np.isfinite(chunked[1]))
    np.testing.assert_array_equal(chunked[0][[1, 3, 4]], 0.0)


def test_chunk_at_least_the_batch_is_the_dense_path():
  np.testing.assert_array_equal(
      losses.supcon_loss(FEATURES, LABELS, chunk_size=8).numpy(),
      losses.supcon_loss(FEATURES, LABELS).numpy())
  np.testing.assert_array_equal(
      losses.supcon_loss(FEATURES, LABELS, chunk_size=0).numpy(),
      losses.supcon_loss(FEATURES, LABELS).numpy())


def test_eager_equals_tf_function_and_xla():
  kwargs = dict(positives_cap=2, summation_location='inside', chunk_size=3)
  eager = _loss_and_grad(FEATURES, LABELS, **kwargs)

  def step(features):
    with tf.GradientTape() as tape:
      tape.watch(features)
      loss = losses.supcon_loss(features, LABELS, **kwargs)
      total = tf.reduce_sum(loss * tf.range(1.0, 9.0))
    return loss, tape.gradient(total, features)

  for jit in (False, True):
    loss, grad = tf.function(step, jit_compile=jit)(tf.constant(FEATURES))
    _assert_same((loss.numpy(), grad.numpy()), eager)


def test_dynamic_batch_in_tf_function():
  fn = tf.function(
      lambda x, y: losses.supcon_loss(x, y, chunk_size=2),
      input_signature=[tf.TensorSpec([None, 2, 5]),
                       tf.TensorSpec([None], tf.int32)])
  np.testing.assert_allclose(
      fn(FEATURES, LABELS.astype(np.int32)).numpy(),
      numpy_supcon(FEATURES, LABELS), rtol=1e-5)


@pytest.mark.parametrize('loss_kwargs', [
    dict(chunk_size=2),
    dict(chunk_size=2, contrast_mode='one_view', summation_location='inside'),
    dict(chunk_size=1, denominator_mode='one_positive', positives_cap=2),
])
def test_mirrored_four_replicas_equal_single_device_dense(loss_kwargs):
  # Global batch 12: 3 anchor samples per replica, so chunk 2 pads a row.
  rng = np.random.RandomState(0)
  x = rng.randn(12, 2, 5).astype(np.float32)
  labels = np.array([0, 1, 2, 0, 1, 0, 2, 1, 3, 3, 0, 2], np.int32)
  w_init = rng.randn(5, 4).astype(np.float32)
  dense_kwargs = {k: v for k, v in loss_kwargs.items() if k != 'chunk_size'}
  single = tf.distribute.OneDeviceStrategy('/cpu:0')
  loss_1, grad_1 = replica_run(single, x, labels, w_init, dense_kwargs)
  loss_4, grad_4 = replica_run(mirrored_strategy(4), x, labels, w_init,
                                loss_kwargs)
  np.testing.assert_allclose(loss_4, loss_1, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(grad_4, grad_1, rtol=1e-4, atol=1e-6)


def test_wrapper_passes_chunk_size_and_round_trips():
  loss_obj = losses.SupConLoss(temperature=0.2, chunk_size=3, reduction=None)
  np.testing.assert_allclose(
      loss_obj(LABELS, FEATURES).numpy(),
      losses.supcon_loss(FEATURES, LABELS, temperature=0.2).numpy(),
      rtol=1e-5, atol=1e-6)
  config = loss_obj.get_config()
  assert config['chunk_size'] == 3
  assert losses.SupConLoss.from_config(config).chunk_size == 3
  assert losses.SupConLoss(chunk_size=0).chunk_size is None


@pytest.mark.parametrize('chunk_size', [-1, 1.5, True])
def test_bad_chunk_size_raises(chunk_size):
  with pytest.raises(ValueError, match='chunk_size'):
    losses.supcon_loss(FEATURES, LABELS, chunk_size=chunk_size)
  with pytest.raises(ValueError, match='chunk_size'):
    losses.SupConLoss(chunk_size=chunk_size)


def test_loss_chunk_size_flag():
  fv = flags.FlagValues()
  config_lib.define_flags(fv)
  fv(['prog'])
  assert config_lib.config_from_flags(fv).loss.loss_chunk_size == 0
  fv = flags.FlagValues()
  config_lib.define_flags(fv)
  fv(['prog', '--loss_chunk_size=256'])
  config = config_lib.config_from_flags(fv)
  assert config.loss.loss_chunk_size == 256
  assert config_lib.ExperimentConfig.from_json(config.to_json()) == config
  with pytest.raises(config_lib.ConfigError, match='--loss_chunk_size'):
    config.replace(loss__loss_chunk_size=-1)
