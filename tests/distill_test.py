"""Tests of supcon_tf.distill (the teacher SavedModel and target blending)."""

import numpy as np
import pytest
import tensorflow as tf

from supcon_tf import config as config_lib
from supcon_tf.training import distill
from tests.conftest import mirrored_strategy

SIZE, CLASSES = 4, 3


class _LinearTeacher(tf.Module):
  """A SavedModel-able stand-in for an exported model."""

  def __init__(self, seed=0):
    super().__init__()
    rng = np.random.RandomState(seed)
    self.w = tf.Variable(rng.randn(SIZE * SIZE * 3, CLASSES).astype(
        np.float32))

  def numpy_logits(self, images):
    return np.reshape(images, [len(images), -1]) @ self.w.numpy()

  @tf.function(input_signature=[
      tf.TensorSpec([None, SIZE, SIZE, 3], tf.float32, name='images')])
  def logits_from_preprocessed(self, images):
    logits = tf.matmul(tf.reshape(images, [tf.shape(images)[0], -1]), self.w)
    return {'logits': logits, 'probabilities': tf.nn.softmax(logits)}


def _save(path, with_signature=True):
  teacher = _LinearTeacher()
  fn = teacher.logits_from_preprocessed
  signatures = {'serving_default': fn}
  if with_signature:
    signatures[distill.SIGNATURE_KEY] = fn
  tf.saved_model.save(teacher, str(path), signatures=signatures)
  return teacher


def _images(batch=4, views=2, seed=1):
  return np.random.RandomState(seed).rand(batch, views, SIZE, SIZE, 3).astype(
      np.float32)


def _softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def test_probabilities_are_view_averaged_softened_predictions(tmp_path):
  source = _save(tmp_path)
  teacher = distill.Teacher(str(tmp_path), image_size=SIZE,
                            num_classes=CLASSES)
  images = _images()
  got = teacher.probabilities(images, temperature=2.0).numpy()
  logits = source.numpy_logits(images.reshape(-1, SIZE, SIZE, 3))
  want = _softmax(logits / 2.0).reshape(4, 2, CLASSES).mean(1)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  # Single-view batches and bfloat16 images work too.
  single = teacher.probabilities(tf.cast(images[:, 0], tf.bfloat16)).numpy()
  assert single.shape == (4, CLASSES)
  np.testing.assert_allclose(single.sum(-1), 1.0, rtol=1e-5)


def test_blend_targets():
  labels = np.eye(3, dtype=np.float32)[[0, 2]]
  teacher = np.array([[0.2, 0.3, 0.5], [0.6, 0.3, 0.1]], np.float32)
  np.testing.assert_allclose(
      distill.blend_targets(labels, teacher, 0.25).numpy(),
      [[0.8, 0.075, 0.125], [0.15, 0.075, 0.775]], rtol=1e-6)


def test_missing_signature_or_directory_fails_clearly(tmp_path):
  _save(tmp_path / 'old', with_signature=False)
  with pytest.raises(distill.TeacherError,
                     match="no 'logits_from_preprocessed' signature"):
    distill.Teacher(str(tmp_path / 'old'))
  with pytest.raises(distill.TeacherError, match='no SavedModel'):
    distill.Teacher(str(tmp_path / 'nothing'))
  # A config error: main prints its message without a traceback.
  assert issubclass(distill.TeacherError, config_lib.ConfigError)


def test_size_and_class_mismatch_fail_clearly(tmp_path):
  _save(tmp_path)
  with pytest.raises(distill.TeacherError, match='image_size'):
    distill.Teacher(str(tmp_path), image_size=SIZE + 1)
  with pytest.raises(distill.TeacherError, match='classes'):
    distill.Teacher(str(tmp_path), num_classes=CLASSES + 1)


def test_teacher_in_replica_context(tmp_path):
  source = _save(tmp_path)
  strategy = mirrored_strategy(2)
  with strategy.scope():
    teacher = distill.Teacher(str(tmp_path))
  images = _images()

  @tf.function
  def run(x):
    return strategy.run(lambda xr: teacher.probabilities(xr), args=(x,))

  per_replica = run(strategy.experimental_distribute_values_from_function(
      lambda ctx: tf.constant(images[ctx.replica_id_in_sync_group * 2:][:2])))
  got = np.concatenate([t.numpy() for t in
                        strategy.experimental_local_results(per_replica)])
  want = _softmax(source.numpy_logits(images.reshape(-1, SIZE, SIZE, 3))
                  ).reshape(4, 2, CLASSES).mean(1)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
