"""Tests of supcon_tf.data.mixing (CutMix and Mixup on multi-view batches)."""

import numpy as np
import pytest
import tensorflow as tf

from supcon_tf import enums
from supcon_tf.data import mixing


def _batch(batch=6, views=2, size=12, classes=4, seed=0):
  rng = np.random.RandomState(seed)
  # Constant, distinct images per sample and view: every pixel says whose it
  # is (sample index + view / 10 in channel 0).
  images = np.zeros([batch, views, size, size, 3], np.float32)
  for b in range(batch):
    for v in range(views):
      images[b, v, ..., 0] = b + v / 10
      images[b, v, ..., 1:] = rng.rand(size, size, 2)
  labels = np.eye(classes, dtype=np.float32)[np.arange(batch) % classes]
  return images, labels


def _partner_of(mixed, images):
  """Per sample: the other sample whose pixels appear in it (or itself)."""
  owners = np.round(mixed[:, 0, ..., 0] - 0.0).astype(int)  # View 0.
  out = []
  for b in range(len(images)):
    others = set(np.unique(owners[b])) - {b}
    out.append(others.pop() if others else b)
  return np.array(out)


@pytest.mark.parametrize('seed', [0, 1, 2, 3])
def test_cutmix_box_area_matches_lambda_and_labels_use_it(seed):
  images, labels = _batch()
  mixed, soft = mixing.cutmix(images, labels, alpha=1.0, seed=[seed, 7])
  mixed, soft = mixed.numpy(), soft.numpy()
  assert mixed.shape == images.shape and soft.shape == labels.shape
  np.testing.assert_allclose(soft.sum(-1), 1.0, rtol=1e-6)
  lam = float(mixing.sample_beta(1.0, mixing._seeds([seed, 7], 3)[0]))  # pylint: disable=protected-access
  size = images.shape[2]
  partner = _partner_of(mixed, images)
  for b in range(len(images)):
    # Pixels are either the sample's own or its partner's, in every view, in
    # the same box.
    for v in range(images.shape[1]):
      own = np.isclose(mixed[b, v, ..., 0], b + v / 10)
      other = np.isclose(mixed[b, v, ..., 0], partner[b] + v / 10)
      assert np.all(own | other)
      if v == 0:
        box = other if partner[b] != b else np.zeros_like(other)
      elif partner[b] != b:
        np.testing.assert_array_equal(other, box)
    if partner[b] == b:  # Its own partner, or an empty box: unchanged.
      np.testing.assert_allclose(soft[b], labels[b], rtol=1e-6)
    else:
      area = box.mean()
      # The box is a rectangle of about (1 - lam) of the image...
      rows, cols = np.where(box)
      assert box[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()
      side = np.sqrt(1 - lam) * size
      assert abs(area - (1 - lam)) <= (2 * side + 1) / size**2 + 1e-6
      # ...and the labels mix by its actual area.
      want = (1 - area) * labels[b] + area * labels[partner[b]]
      np.testing.assert_allclose(soft[b], want, rtol=1e-5, atol=1e-6)


def test_mixup_formula_and_views_share_partner_and_lambda():
  images, labels = _batch()
  seed = tf.constant([3, 4], tf.int64)
  mixed, soft = mixing.mixup(images, labels, alpha=0.4, seed=seed)
  lam_seed, perm_seed = mixing._seeds(seed, 2)  # pylint: disable=protected-access
  lam = float(mixing.sample_beta(0.4, lam_seed))
  perm = mixing.partner_permutation(len(images), perm_seed).numpy()
  assert sorted(perm) == list(range(len(images)))
  np.testing.assert_allclose(mixed.numpy(),
                             lam * images + (1 - lam) * images[perm],
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(soft.numpy(),
                             lam * labels + (1 - lam) * labels[perm],
                             rtol=1e-5, atol=1e-6)


def test_same_seed_same_mix_other_seed_other_mix():
  images, labels = _batch()
  for fn in (mixing.cutmix, mixing.mixup):
    a = fn(images, labels, 1.0, [1, 2])
    b = fn(images, labels, 1.0, [1, 2])
    c = fn(images, labels, 1.0, [1, 3])
    np.testing.assert_array_equal(a[0].numpy(), b[0].numpy())
    assert not np.array_equal(a[0].numpy(), c[0].numpy())


def test_lambda_is_beta_distributed():
  lams = np.array([float(mixing.sample_beta(0.5, [i, 0])) for i in range(400)])
  assert np.all((lams >= 0) & (lams <= 1))
  assert abs(lams.mean() - 0.5) < 0.06  # Beta(a, a) has mean 1/2...
  assert abs(lams.var() - 0.125) < 0.03  # ...and variance 1 / (4 (2a + 1)).


def test_works_in_tf_function_with_bfloat16_and_dispatch():
  images, labels = _batch(views=3)

  @tf.function
  def run(x, y, seed):
    return mixing.mix('cutmix', x, y, 1.0, seed)

  mixed, soft = run(tf.cast(images, tf.bfloat16), labels,
                    tf.constant([5, 6], tf.int64))
  assert mixed.dtype == tf.bfloat16 and soft.dtype == tf.float32
  same_images, same_labels = mixing.mix(enums.MixType.NONE, images, labels,
                                        1.0, [0, 0])
  np.testing.assert_array_equal(same_images.numpy(), images)
  np.testing.assert_array_equal(same_labels.numpy(), labels)


@pytest.mark.parametrize('fn', [mixing.cutmix, mixing.mixup])
def test_bad_inputs(fn):
  images, labels = _batch()
  with pytest.raises(ValueError, match='views'):
    fn(images[:, 0], labels, 1.0, [0, 0])
  with pytest.raises(ValueError, match='labels'):
    fn(images, np.argmax(labels, -1), 1.0, [0, 0])
  with pytest.raises(ValueError, match='alpha'):
    fn(images, labels, 0.0, [0, 0])
