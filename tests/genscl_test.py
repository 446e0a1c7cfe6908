"""Tests of supcon_tf.genscl against hand-computed values, NumPy and SupCon."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from supcon_tf import losses
from supcon_tf.losses import genscl
from tests import loss_oracle
from tests.conftest import mirrored_strategy
from tests.loss_oracle import numpy_genscl
from tests.losses_test import replica_run


_normalized = loss_oracle.normalized
_soft_labels = loss_oracle.soft_labels


def test_hand_computed_soft_labels():
  # One view, temperature 1; z0 = z1 = e1, z2 = e2; labels [1, 0],
  # [.5, .5], [0, 1]. Anchor 0: targets (1, 0) over (1, 2), logits (1, 0):
  # log(e + 1) - 1. Anchor 1: targets (.5, .5) over (0, 2), logits (1, 0):
  # log(e + 1) - 1/2. Anchor 2: targets (0, 1), logits (0, 0): log 2.
  e1, e2 = np.eye(2, dtype=np.float32)
  features = np.stack([e1, e1, e2])[:, None, :]
  labels = np.array([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]], np.float32)
  loss = genscl.genscl_loss(features, labels, temperature=1.0)
  want = [math.log(math.e + 1) - 1, math.log(math.e + 1) - 0.5, math.log(2)]
  np.testing.assert_allclose(loss.numpy(), want, rtol=1e-6)
  np.testing.assert_allclose(loss.numpy(), numpy_genscl(features, labels, 1.0),
                             rtol=1e-6)


@pytest.mark.parametrize('contrast_mode', ['all_views', 'one_view'])
@pytest.mark.parametrize('scale', [True, False])
@pytest.mark.parametrize('num_views', [1, 2, 3])
def test_one_hot_equals_supcon_outside_all(contrast_mode, scale, num_views):
  f = _normalized([6, num_views, 5], 1)
  labels = np.array([0, 1, 0, 2, 1, 0])
  kwargs = dict(temperature=0.3, contrast_mode=contrast_mode,
                scale_by_temperature=scale)
  want = losses.supcon_loss(f, labels, summation_location='outside',
                            denominator_mode='all', **kwargs).numpy()
  np.testing.assert_allclose(
      genscl.genscl_loss(f, np.eye(3, dtype=np.float32)[labels],
                         **kwargs).numpy(), want, rtol=1e-5, atol=1e-6)
  # Class ids are one-hot labels; cosine == dot for one-hot rows.
  np.testing.assert_allclose(genscl.genscl_loss(f, labels, **kwargs).numpy(),
                             want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(
      genscl.genscl_loss(f, np.eye(3)[labels], label_similarity='cosine',
                         **kwargs).numpy(), want, rtol=1e-5, atol=1e-6)


def test_no_labels_is_simclr():
  f = _normalized([5, 2, 4], 2)
  np.testing.assert_allclose(genscl.genscl_loss(f, None).numpy(),
                             losses.supcon_loss(f, None).numpy(), rtol=1e-5)


@pytest.mark.parametrize('num_views', [1, 2, 3])
@pytest.mark.parametrize('contrast_mode', ['all_views', 'one_view'])
@pytest.mark.parametrize('similarity', ['dot', 'cosine'])
def test_soft_labels_match_numpy(num_views, contrast_mode, similarity):
  f = _normalized([5, num_views, 4], 3)
  labels = _soft_labels(5, 3, 4)
  kwargs = dict(temperature=0.5, contrast_mode=contrast_mode,
                label_similarity=similarity)
  got = genscl.genscl_loss(f, labels, **kwargs).numpy()
  np.testing.assert_allclose(got, numpy_genscl(f, labels, **kwargs),
                             rtol=1e-5, atol=1e-6)


def test_no_positive_gives_zero_and_finite_gradient():
  # Sample 2's label is orthogonal to every other label, one view: 0.
  f = tf.constant(_normalized([3, 1, 4], 5))
  labels = np.array([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]],
                    np.float32)
  with tf.GradientTape() as tape:
    tape.watch(f)
    loss = genscl.genscl_loss(f, labels)
  assert loss.numpy()[2] == 0.0 and loss.numpy()[0] > 0
  grad = tape.gradient(loss, f)
  assert np.all(np.isfinite(grad.numpy()))


def test_extra_samples_match_numpy_and_masked_extras_change_nothing():
  f = _normalized([4, 2, 5], 6)
  labels = _soft_labels(4, 3, 7)
  extra = _normalized([6, 5], 8)
  extra_labels = _soft_labels(6, 3, 9)
  mask = np.array([1, 1, 0, 1, 0, 1], np.float32)
  kwargs = dict(temperature=0.2, extra_features=extra,
                extra_labels=extra_labels, extra_mask=mask)
  np.testing.assert_allclose(
      genscl.genscl_loss(f, labels, **kwargs).numpy(),
      numpy_genscl(f, labels, **kwargs), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(
      genscl.genscl_loss(f, labels, extra_features=extra,
                         extra_labels=extra_labels,
                         extra_mask=np.zeros(6)).numpy(),
      genscl.genscl_loss(f, labels).numpy(), rtol=1e-6)
  # Without labels every extra sample is a negative.
  np.testing.assert_allclose(
      genscl.genscl_loss(f, None, extra_features=extra).numpy(),
      numpy_genscl(f, None, extra_features=extra), rtol=1e-5)


@pytest.mark.parametrize('dtype', [tf.bfloat16, tf.float16])
def test_low_precision_input_computed_in_float32(dtype):
  f = _normalized([4, 2, 8], 10)
  labels = _soft_labels(4, 3, 11)
  low = genscl.genscl_loss(tf.cast(f, dtype), labels)
  assert low.dtype == tf.float32
  want = genscl.genscl_loss(tf.cast(tf.cast(f, dtype), tf.float32), labels)
  np.testing.assert_allclose(low.numpy(), want.numpy(), rtol=1e-6)


def test_gradient_matches_finite_differences():
  f = _normalized([4, 2, 3], 12).astype(np.float64)
  labels = _soft_labels(4, 3, 13)
  x = tf.constant(f)
  with tf.GradientTape() as tape:
    tape.watch(x)
    loss = tf.reduce_sum(genscl.genscl_loss(tf.cast(x, tf.float32), labels,
                                            temperature=0.5))
  grad = tape.gradient(loss, x).numpy()
  for idx in [(0, 0, 0), (2, 1, 2), (3, 0, 1)]:
    delta = np.zeros(f.shape)
    delta[idx] = 1e-4
    numeric = (numpy_genscl(f + delta, labels, 0.5).sum() -
               numpy_genscl(f - delta, labels, 0.5).sum()) / 2e-4
    np.testing.assert_allclose(grad[idx], numeric, rtol=1e-2, atol=1e-3)


def test_dynamic_batch_in_tf_function():
  fn = tf.function(lambda x, y: genscl.genscl_loss(x, y), input_signature=[
      tf.TensorSpec([None, 2, 3]), tf.TensorSpec([None, 3])])
  f = _normalized([5, 2, 3], 14)
  labels = _soft_labels(5, 3, 15)
  np.testing.assert_allclose(fn(f, labels).numpy(), numpy_genscl(f, labels),
                             rtol=1e-5)


def test_wrapper_equals_function_and_round_trips():
  f = _normalized([4, 2, 3], 16)
  labels = _soft_labels(4, 3, 17)
  loss_obj = genscl.GenSCLLoss(temperature=0.2, contrast_mode='one_view',
                               reduction=None)
  np.testing.assert_allclose(
      loss_obj(labels, f).numpy(),
      genscl.genscl_loss(f, labels, temperature=0.2,
                         contrast_mode='one_view').numpy(), rtol=1e-6)
  restored = keras.losses.deserialize(keras.losses.serialize(loss_obj))
  assert isinstance(restored, genscl.GenSCLLoss)
  assert restored.get_config()['contrast_mode'] == 'one_view'
  np.testing.assert_allclose(restored(labels, f).numpy(),
                             loss_obj(labels, f).numpy())


@pytest.mark.parametrize('kwargs,features_shape,labels,match', [
    ({}, [4, 3], None, 'rank'),
    ({}, [4, 2, 3], np.zeros([3, 2]), 'batch'),
    ({}, [4, 2, 3], np.zeros([4, 2, 2]), 'labels must be'),
    ({'temperature': 0.0}, [4, 2, 3], None, 'temperature'),
    ({'contrast_mode': 'some_views'}, [4, 2, 3], None, 'some_views'),
    ({'label_similarity': 'l1'}, [4, 2, 3], None, 'label_similarity'),
])
def test_bad_inputs_raise_clear_errors(kwargs, features_shape, labels, match):
  with pytest.raises(ValueError, match=match):
    genscl.genscl_loss(np.ones(features_shape, np.float32), labels, **kwargs)


# --- Multi-replica exactness -------------------------------------------------


@pytest.mark.parametrize('loss_kwargs', [
    dict(),
    dict(contrast_mode='one_view', temperature=0.5, label_similarity='cosine'),
])
def test_mirrored_four_replicas_equal_single_device(loss_kwargs):
  rng = np.random.RandomState(0)
  x = rng.randn(8, 2, 5).astype(np.float32)
  labels = _soft_labels(8, 3, 18)
  w_init = rng.randn(5, 4).astype(np.float32)
  single = tf.distribute.OneDeviceStrategy('/cpu:0')
  loss_1, grad_1 = replica_run(single, x, labels, w_init, loss_kwargs,
                               genscl.genscl_loss)
  loss_4, grad_4 = replica_run(mirrored_strategy(4), x, labels, w_init,
                               loss_kwargs, genscl.genscl_loss)
  np.testing.assert_allclose(loss_4, loss_1, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(grad_4, grad_1, rtol=1e-4, atol=1e-6)
  z = x @ w_init
  z /= np.linalg.norm(z, axis=-1, keepdims=True)
  np.testing.assert_allclose(loss_1, numpy_genscl(z, labels, **loss_kwargs),
                             rtol=1e-4, atol=1e-5)
  # The gathered contrast set matters: per-local-batch losses differ.
  local_only = np.concatenate([
      genscl.genscl_loss(z[i:i + 2], labels[i:i + 2], **loss_kwargs).numpy()
      for i in range(0, 8, 2)])
  assert not np.allclose(local_only, loss_1, atol=1e-3)
