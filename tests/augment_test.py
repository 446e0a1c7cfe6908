"""Tests for supcon_tf.data.augment: known answers, parts agree, policies."""

import dataclasses

import keras
import numpy as np
from PIL import Image, ImageEnhance, ImageOps
import pytest
import tensorflow as tf

from supcon_tf import enums
from supcon_tf.config import AugmentConfig
from supcon_tf.data import augment

A = augment
ATOL = 1e-6


def _uint8_image(h=16, w=16, seed=0):
  return np.random.RandomState(seed).randint(0, 256, (h, w, 3)).astype(np.uint8)


def _float_image(h=16, w=16, seed=0):
  """Random float image on the uint8 grid (so uint8 references apply)."""
  return _uint8_image(h, w, seed).astype(np.float32) / 255.


def _pil(fn, image_u8, *args):
  out = fn(Image.fromarray(image_u8), *args)
  return np.asarray(out).astype(np.float32) / 255.


def _run(fn, image):
  return fn(tf.constant(image)).numpy()


def _in_dataset(fn, image):
  """Runs `fn` inside tf.data.Dataset.map (graph mode) on one image."""
  ds = tf.data.Dataset.from_tensors(tf.constant(image)).map(fn)
  return next(iter(ds)).numpy()


# -----------------------------------------------------------------------------
# Known answers.


def test_rotate_90_is_rot90():
  image = _float_image(8, 8)
  np.testing.assert_allclose(_run(lambda x: A.rotate(x, 90.), image),
                             np.rot90(image, 1), atol=ATOL)
  np.testing.assert_allclose(_run(lambda x: A.rotate(x, 180.), image),
                             np.rot90(image, 2), atol=ATOL)
  np.testing.assert_allclose(_run(lambda x: A.rotate(x, -90.), image),
                             np.rot90(image, -1), atol=ATOL)
  np.testing.assert_allclose(_run(lambda x: A.rotate(x, 0.), image), image,
                             atol=ATOL)


def test_rotate_fills_corners():
  image = np.zeros((9, 9, 3), np.float32)
  out = _run(lambda x: A.rotate(x, 45., fill_value=0.7), image)
  np.testing.assert_allclose(out[0, 0], 0.7)
  np.testing.assert_allclose(out[4, 4], 0.)


def test_invert_twice_is_identity():
  image = _float_image()
  np.testing.assert_allclose(_run(A.invert, image), 1. - image, atol=ATOL)
  np.testing.assert_allclose(_run(lambda x: A.invert(A.invert(x)), image),
                             image, atol=ATOL)
  u8 = _uint8_image()
  np.testing.assert_allclose(_run(A.invert, _float_image()),
                             _pil(ImageOps.invert, u8), atol=ATOL)


def test_solarize_threshold():
  image = np.array([[[0.1, 0.5, 0.9]]], np.float32)
  out = _run(lambda x: A.solarize(x, 0.5), image)
  np.testing.assert_allclose(out, [[[0.1, 0.5, 0.1]]], atol=ATOL)
  # Default threshold 128 / 255 matches PIL's solarize(threshold=128).
  u8 = _uint8_image()
  np.testing.assert_allclose(_run(A.solarize, u8.astype(np.float32) / 255.),
                             _pil(ImageOps.solarize, u8, 128), atol=1e-6)


def test_solarize_add():
  image = np.array([[[0.1, 0.45, 0.6]]], np.float32)
  out = _run(lambda x: A.solarize_add(x, 0.2, threshold=0.5), image)
  np.testing.assert_allclose(out, [[[0.3, 0.65, 0.6]]], atol=1e-6)
  out = _run(lambda x: A.solarize_add(x, 0.9, threshold=0.5), image)
  np.testing.assert_allclose(out, [[[1.0, 1.0, 0.6]]], atol=1e-6)


def test_solarize_matches_keras():
  image = _float_image()
  layer = keras.layers.Solarization(value_range=(0, 1))
  # Threshold between grid points: the layer works in [0, 255] after scaling.
  threshold = 100.5
  expected = layer.transform_images(
      tf.constant(image[None]),
      {'thresholds': tf.constant(threshold), 'additions': tf.constant(0.)})
  out = _run(lambda x: A.solarize(x, threshold / 255.), image)
  np.testing.assert_allclose(out, np.asarray(expected)[0], atol=1e-5)


@pytest.mark.parametrize('bits', [1, 2, 4, 7, 8])
def test_posterize_bits(bits):
  u8 = _uint8_image()
  out = _run(lambda x: A.posterize(x, bits), u8.astype(np.float32) / 255.)
  expected = ((u8 >> (8 - bits)) << (8 - bits)).astype(np.float32) / 255.
  np.testing.assert_allclose(out, expected, atol=ATOL)
  np.testing.assert_allclose(out, _pil(ImageOps.posterize, u8, bits), atol=ATOL)


def test_posterize_zero_bits_keeps_one_bit():
  # The reference's uint8 shift clamps 8 to 7: 0 bits behaves as 1 bit.
  image = _float_image()
  np.testing.assert_allclose(_run(lambda x: A.posterize(x, 0), image),
                             _run(lambda x: A.posterize(x, 1), image))


def test_equalize_known_histogram():
  # Channel 0: levels 10, 20, 30 and 200, 256 pixels each (32 x 32 image).
  counts = {10: 256, 20: 256, 30: 256, 200: 256}
  values = np.concatenate([np.full(c, v) for v, c in counts.items()])
  channel = values.reshape(32, 32).astype(np.uint8)
  u8 = np.stack([channel, channel.T, np.full_like(channel, 77)], axis=-1)
  out = _run(A.equalize, u8.astype(np.float32) / 255.)
  # step = (1024 - 256) // 255 = 3; lut[v] = (cumhist[v-1] + 1) // 3, <= 255.
  expected_levels = {10: 0, 20: (256 + 1) // 3, 30: (512 + 1) // 3,
                     200: min((768 + 1) // 3, 255)}
  for v, e in expected_levels.items():
    np.testing.assert_allclose(out[..., 0][channel == v], e / 255., atol=ATOL)
  # Constant channel: step 0, unchanged.
  np.testing.assert_allclose(out[..., 2], 77. / 255., atol=ATOL)
  np.testing.assert_allclose(out, _pil(ImageOps.equalize, u8), atol=ATOL)


def test_equalize_matches_pil_random():
  u8 = _uint8_image(32, 32, seed=3)
  np.testing.assert_allclose(_run(A.equalize, u8.astype(np.float32) / 255.),
                             _pil(ImageOps.equalize, u8), atol=ATOL)


def test_equalize_matches_keras_on_two_level_image():
  # Keras and PIL equalisation formulas differ in general but agree when each
  # channel has two levels (low -> 0, high -> 255) and enough pixels for
  # PIL's step (n - count of the top level) // 255 to be > 0.
  rng = np.random.RandomState(1)
  u8 = np.where(rng.rand(32, 32, 3) < 0.5, 60, 180).astype(np.uint8)
  image = u8.astype(np.float32) / 255.
  expected = keras.layers.Equalization(value_range=(0, 1))(image[None])
  np.testing.assert_allclose(_run(A.equalize, image), np.asarray(expected)[0],
                             atol=1e-5)


def test_autocontrast():
  image = np.stack([np.linspace(0.2, 0.6, 16).reshape(4, 4)] * 2 +
                   [np.full((4, 4), 0.3)], axis=-1).astype(np.float32)
  out = _run(A.autocontrast, image)
  np.testing.assert_allclose(out[..., 0].min(), 0., atol=ATOL)
  np.testing.assert_allclose(out[..., 0].max(), 1., atol=ATOL)
  np.testing.assert_allclose(out[..., 2], 0.3, atol=ATOL)  # Constant channel.
  expected = keras.layers.AutoContrast(value_range=(0, 1))(image[None])
  np.testing.assert_allclose(out, np.asarray(expected)[0], atol=1e-5)


def test_autocontrast_matches_pil():
  u8 = (_uint8_image() // 2 + 40).astype(np.uint8)
  out = _run(A.autocontrast, u8.astype(np.float32) / 255.)
  # PIL truncates its lookup table to integers.
  np.testing.assert_allclose(out, _pil(ImageOps.autocontrast, u8),
                             atol=1.01 / 255.)


@pytest.mark.parametrize('pixels', [2, -3])
def test_translate_whole_pixels(pixels):
  image = _float_image(8, 10)
  fill = 0.25
  out_x = _run(lambda x: A.translate_x(x, float(pixels), fill), image)
  expected = np.full_like(image, fill)
  if pixels > 0:
    expected[:, :-pixels] = image[:, pixels:]
  else:
    expected[:, -pixels:] = image[:, :pixels]
  np.testing.assert_allclose(out_x, expected, atol=ATOL)
  out_y = _run(lambda x: A.translate_y(x, float(pixels), fill), image)
  expected = np.full_like(image, fill)
  if pixels > 0:
    expected[:-pixels] = image[pixels:]
  else:
    expected[-pixels:] = image[:pixels]
  np.testing.assert_allclose(out_y, expected, atol=ATOL)


def test_shear():
  image = _float_image(8, 8)
  for op in (A.shear_x, A.shear_y):
    np.testing.assert_allclose(_run(lambda x, op=op: op(x, 0.), image), image,
                               atol=ATOL)
  # Shear x by 1: row y reads columns x + y.
  out = _run(lambda x: A.shear_x(x, 1., 0.), image)
  np.testing.assert_allclose(out[3, :5], image[3, 3:], atol=ATOL)
  np.testing.assert_allclose(out[3, 5:], 0., atol=ATOL)
  out = _run(lambda x: A.shear_y(x, 1., 0.), image)
  np.testing.assert_allclose(out[:6, 2], image[2:, 2], atol=ATOL)


@pytest.mark.parametrize('op', [A.brightness, A.contrast, A.color, A.sharpness])
def test_enhance_factor_one_is_identity(op):
  image = _float_image()
  np.testing.assert_allclose(_run(lambda x: op(x, 1.), image), image,
                             atol=1e-6)


def test_enhance_factor_zero_is_degenerate():
  image = _float_image()
  np.testing.assert_allclose(_run(lambda x: A.brightness(x, 0.), image), 0.)
  gray = _run(lambda x: A.color(x, 0.), image)
  np.testing.assert_allclose(gray[..., 0], gray[..., 1], atol=ATOL)
  flat = _run(lambda x: A.contrast(x, 0.), image)
  np.testing.assert_allclose(flat, flat.mean(), atol=1e-6)


@pytest.mark.parametrize('name,op', [
    ('color', (A.color, ImageEnhance.Color)),
    ('contrast', (A.contrast, ImageEnhance.Contrast)),
    ('brightness', (A.brightness, ImageEnhance.Brightness)),
    ('sharpness', (A.sharpness, ImageEnhance.Sharpness)),
])
@pytest.mark.parametrize('factor', [0.3, 1.7])
def test_enhance_matches_pil(name, op, factor):
  del name
  ours, pil = op
  u8 = _uint8_image(seed=5)
  out = _run(lambda x: ours(x, factor), u8.astype(np.float32) / 255.)
  expected = _pil(lambda im: pil(im).enhance(factor), u8)
  # PIL rounds to uint8 (and its luma weights are 3-digit); ours stays float.
  np.testing.assert_allclose(out, expected, atol=2.5 / 255.)


def test_cutout():
  image = np.zeros((16, 16, 3), np.float32)
  out = _run(lambda x: A.cutout(x, 3, fill_value=1., seed=[1, 2]), image)
  changed = out[..., 0] > 0
  rows, cols = np.nonzero(changed)
  assert 0 < changed.sum() <= 36
  # A filled axis-aligned rectangle.
  assert changed.sum() == (np.ptp(rows) + 1) * (np.ptp(cols) + 1)
  np.testing.assert_allclose(out[changed], 1.)
  np.testing.assert_allclose(
      _run(lambda x: A.cutout(x, 0, seed=[1, 2]), image), image)


def test_grayscale_and_gaussian_blur_of_constant():
  image = np.full((24, 24, 3), 0.4, np.float32)
  np.testing.assert_allclose(_run(lambda x: A.gaussian_blur(x, 1.5), image),
                             image, atol=1e-6)
  gray = _run(A.grayscale, _float_image())
  np.testing.assert_allclose(gray[..., 0], gray[..., 2])


def test_gaussian_blur_kernel():
  # One bright pixel spreads into a normalised separable Gaussian.
  image = np.zeros((40, 40, 3), np.float32)
  image[20, 20] = 1.
  out = _run(lambda x: A.gaussian_blur(x, 1.0), image)  # radius 2.
  x = np.arange(-2, 3)
  k = np.exp(-x ** 2 / 2.)
  k /= k.sum()
  np.testing.assert_allclose(out[18:23, 18:23, 0], np.outer(k, k), atol=1e-6)
  np.testing.assert_allclose(out.sum(), 3., atol=1e-5)


def test_color_jitter_strength_zero_is_identity():
  image = _float_image()
  for pytorch in (False, True):
    out = _run(lambda x, p=pytorch: A.color_jitter(x, 0., p, seed=[3, 4]),
               image)
    np.testing.assert_allclose(out, image, atol=1e-5)


def test_color_jitter_changes_image_and_stays_in_range():
  image = _float_image()
  for pytorch in (False, True):
    out = _run(lambda x, p=pytorch: A.color_jitter(x, 1., p, seed=[3, 4]),
               image)
    assert out.min() >= 0. and out.max() <= 1.
    assert np.abs(out - image).max() > 0.01


def test_color_jitter_rejects_bad_strength():
  with pytest.raises(ValueError):
    A.color_jitter(tf.zeros([4, 4, 3]), -1.)
  with pytest.raises(ValueError):
    A.color_jitter(tf.zeros([4, 4, 3]), 3., use_pytorch_impl=True)


def test_random_resized_crop():
  image = _float_image(20, 30)
  out = _run(lambda x: A.random_resized_crop(x, 12, seed=[0, 1]), image)
  assert out.shape == (12, 12, 3)
  # Full-area crop of a square image of the output size is the identity.
  square = _float_image(12, 12)
  out = _run(lambda x: A.random_resized_crop(
      x, 12, area_range=(1., 1.), aspect_ratio_range=(1., 1.), seed=[5, 6]),
             square)
  np.testing.assert_allclose(out, square, atol=1e-6)


def test_warp():
  image = _float_image(24, 24)
  same = _run(lambda x: A.warp(x, seed=[1, 1], max_control_length=0.), image)
  np.testing.assert_allclose(same, image, atol=1e-4)
  out = _run(lambda x: A.warp(x, seed=[1, 1], max_control_length=8.), image)
  assert out.shape == image.shape
  assert np.abs(out - image).max() > 0.05
  again = _run(lambda x: A.warp(x, seed=[1, 1], max_control_length=8.), image)
  np.testing.assert_allclose(out, again)
  flat = np.full((24, 24, 3), 0.3, np.float32)
  np.testing.assert_allclose(
      _run(lambda x: A.warp(x, seed=[2, 2], max_control_length=8.), flat),
      flat, atol=1e-5)


def test_thin_plate_spline_interpolates_control_points():
  control = tf.constant([[3., 4.], [10., 2.], [7., 12.], [14., 15.]])
  flows = tf.constant([[1., -2.], [0.5, 0.], [-1., 1.], [2., 3.]])
  # pylint: disable-next=protected-access
  out = A._thin_plate_spline_flow(control, flows, control)
  np.testing.assert_allclose(out, flows, atol=1e-3)


# -----------------------------------------------------------------------------
# Eager == tf.data.map.


DETERMINISTIC_OPS = {
    'autocontrast': A.autocontrast,
    'equalize': A.equalize,
    'invert': A.invert,
    'rotate': lambda x: A.rotate(x, 30.),
    'posterize': lambda x: A.posterize(x, 3),
    'solarize': lambda x: A.solarize(x, 0.4),
    'solarize_add': lambda x: A.solarize_add(x, 0.2),
    'color': lambda x: A.color(x, 1.6),
    'contrast': lambda x: A.contrast(x, 0.4),
    'brightness': lambda x: A.brightness(x, 1.3),
    'sharpness': lambda x: A.sharpness(x, 1.8),
    'shear_x': lambda x: A.shear_x(x, 0.2),
    'shear_y': lambda x: A.shear_y(x, -0.2),
    'translate_x': lambda x: A.translate_x(x, 3.),
    'translate_y': lambda x: A.translate_y(x, -2.),
    'grayscale': A.grayscale,
    'gaussian_blur': lambda x: A.gaussian_blur(x, 1.2),
}

SEEDED_OPS = {
    'cutout': lambda x, s: A.cutout(x, 4, seed=s),
    'random_resized_crop': lambda x, s: A.random_resized_crop(x, 12, seed=s),
    'random_flip': lambda x, s: A.random_flip(x, seed=s),
    'color_jitter': lambda x, s: A.color_jitter(x, 0.8, seed=s),
    'color_jitter_pytorch': lambda x, s: A.color_jitter(x, 0.8, True, seed=s),
    'random_grayscale': lambda x, s: A.random_grayscale(x, 0.5, seed=s),
    'random_gaussian_blur': lambda x, s: A.random_gaussian_blur(x, seed=s),
    'warp': lambda x, s: A.warp(x, seed=s),
    'autoaugment': lambda x, s: A.autoaugment(x, seed=s),
    'randaugment': lambda x, s: A.randaugment(x, 2, 9., seed=s),
}


@pytest.mark.parametrize('name', sorted(DETERMINISTIC_OPS))
def test_deterministic_op_eager_equals_dataset(name):
  op = DETERMINISTIC_OPS[name]
  image = _float_image(24, 24, seed=7)
  eager = _run(op, image)
  assert eager.shape == image.shape and eager.dtype == np.float32
  assert eager.min() >= 0. and eager.max() <= 1.
  np.testing.assert_allclose(_in_dataset(op, image), eager, atol=1e-6)


@pytest.mark.parametrize('name', sorted(SEEDED_OPS))
def test_seeded_op_eager_equals_dataset(name):
  op = SEEDED_OPS[name]
  image = _float_image(24, 24, seed=8)
  seed = tf.constant([11, 12], tf.int64)
  eager = op(tf.constant(image), seed).numpy()
  assert eager.min() >= 0. and eager.max() <= 1.
  np.testing.assert_allclose(_in_dataset(lambda x: op(x, seed), image), eager,
                             atol=1e-6)
  # Without a seed the op still runs (global random state).
  assert op(tf.constant(image), None).shape == eager.shape


def test_deterministic_ops_compile_with_xla():
  image = tf.constant(_float_image(24, 24))

  @tf.function(jit_compile=True)
  def pipeline(x):
    x = A.equalize(x)
    x = A.autocontrast(x)
    x = A.color(A.contrast(A.brightness(x, 1.2), 0.8), 1.3)
    x = A.sharpness(x, 1.5)
    x = A.posterize(A.solarize(x, 0.6), 5)
    return A.gaussian_blur(x, 1.0)

  eager = A.gaussian_blur(A.posterize(A.solarize(A.sharpness(A.color(
      A.contrast(A.brightness(A.autocontrast(A.equalize(image)), 1.2), 0.8),
      1.3), 1.5), 0.6), 5), 1.0)
  np.testing.assert_allclose(pipeline(image), eager, atol=1e-5)


# -----------------------------------------------------------------------------
# Policies and entry points.


def _config(augmentation_type, **kwargs):
  defaults = dict(image_size=16, augmentation_type=augmentation_type,
                  augmentation_magnitude=0.5, blur_probability=0.5,
                  defer_blurring=False, crop_area_range=(0.08, 1.0))
  defaults.update(kwargs)
  return AugmentConfig(**defaults)


POLICY_CONFIGS = {
    'simclr': _config(enums.AugmentationType.SIMCLR),
    'simclr_pytorch_warp': _config(enums.AugmentationType.SIMCLR,
                                   use_pytorch_color_jitter=True,
                                   warp_probability=0.5),
    'autoaugment': _config(enums.AugmentationType.AUTOAUGMENT,
                           augmentation_magnitude=1.0),
    'randaugment': _config(enums.AugmentationType.RANDAUGMENT,
                           augmentation_magnitude=9.),
    'stacked_randaugment': _config(enums.AugmentationType.STACKED_RANDAUGMENT,
                                   augmentation_magnitude=1.0),
    'identity': _config(enums.AugmentationType.IDENTITY),
}


@pytest.mark.parametrize('name', sorted(POLICY_CONFIGS))
def test_preprocess_for_train(name):
  config = POLICY_CONFIGS[name]
  image = tf.constant(_uint8_image(20, 28, seed=9))
  views = [A.preprocess_for_train(image, config, seed=[i, 7]).numpy()
           for i in range(3)]
  for view in views:
    assert view.shape == (16, 16, 3) and view.dtype == np.float32
    assert view.min() >= 0. and view.max() <= 1.
  assert np.abs(views[0] - views[1]).max() > 1e-3
  np.testing.assert_allclose(
      A.preprocess_for_train(image, config, seed=[0, 7]).numpy(), views[0])
  # Inside tf.data, with and without stateless seeds; float input too.
  seeded = _in_dataset(
      lambda x: A.preprocess_for_train(x, config, seed=[0, 7]), image.numpy())
  np.testing.assert_allclose(seeded, views[0], atol=1e-6)
  ds = tf.data.Dataset.from_tensors(tf.cast(image, tf.float32) / 255.).repeat(3)
  ds = ds.map(lambda x: A.preprocess_for_train(x, config))
  unseeded = [x.numpy() for x in ds]
  assert unseeded[0].shape == (16, 16, 3)
  # Three unseeded draws are not all the same (a pair could be, rarely).
  assert max(np.abs(unseeded[0] - u).max() for u in unseeded[1:]) > 1e-3


def test_preprocess_for_train_grayscale_input():
  image = tf.constant(_uint8_image(20, 20)[..., :1])
  out = A.preprocess_for_train(image, POLICY_CONFIGS['simclr'], seed=[1, 2])
  assert out.shape == (16, 16, 3)


def test_identity_policy_is_crop_and_flip_only():
  config = dataclasses.replace(POLICY_CONFIGS['identity'],
                               crop_area_range=(1., 1.))
  image = _float_image(16, 16)
  out = A.preprocess_for_train(tf.constant(image), config, seed=[1, 3]).numpy()
  assert (np.allclose(out, image, atol=1e-6) or
          np.allclose(out, image[:, ::-1], atol=1e-6))


def test_zero_magnitude_disables_policy():
  config = _config(enums.AugmentationType.SIMCLR, augmentation_magnitude=0.,
                   crop_area_range=(1., 1.))
  image = _float_image(16, 16)
  out = A.preprocess_for_train(tf.constant(image), config, seed=[1, 3]).numpy()
  assert (np.allclose(out, image, atol=1e-6) or
          np.allclose(out, image[:, ::-1], atol=1e-6))


def test_augment_rejects_unknown_type():
  with pytest.raises(ValueError):
    A.augment(tf.zeros([8, 8, 3]), 'nonsense')


def test_policy_tables():
  assert len(A.AUTOAUGMENT_IMAGENET_POLICY) == 25
  names = {op for sub in A.AUTOAUGMENT_IMAGENET_POLICY for op, _, _ in sub}
  assert names <= set(A.RANDAUGMENT_OPS)
  assert len(A.RANDAUGMENT_OPS) == 16
  image = tf.constant(_float_image(24, 24))
  for name in A.RANDAUGMENT_OPS:
    out = A.apply_augment_op(image, name, 7., seed=[1, 2])
    assert out.shape == (24, 24, 3), name
  with pytest.raises(ValueError):
    A.apply_augment_op(image, 'Blur', 5.)


def test_translate_constant_scales_with_image_size():
  image = tf.ones([32, 32, 3])
  # Level 10 RandAugment translate: 100 px at 224 -> 100 * 32 / 224 = 14.3 px.
  out = A.apply_augment_op(image, 'TranslateX', 10., seed=[0, 0]).numpy()
  uncovered = np.sum(np.isclose(out[0, :, 0], A.FILL_VALUE))
  assert uncovered == 14
  out = A.apply_augment_op(image, 'TranslateX', 10., seed=[0, 0],
                           scale_to_image_size=False).numpy()
  np.testing.assert_allclose(out, A.FILL_VALUE)


@pytest.mark.parametrize('method,shape', [
    (enums.EvalCropMethod.RESIZE_THEN_CROP, (30, 50)),
    (enums.EvalCropMethod.CROP_THEN_RESIZE, (30, 50)),
    (enums.EvalCropMethod.CROP_THEN_DISTORT, (30, 50)),
    (enums.EvalCropMethod.RESIZE_THEN_CROP, (51, 17)),
    (enums.EvalCropMethod.CROP_THEN_RESIZE, (51, 17)),
    (enums.EvalCropMethod.CROP_THEN_DISTORT, (51, 17)),
    (enums.EvalCropMethod.IDENTITY, (16, 16)),
])
def test_preprocess_for_eval_sizes(method, shape):
  config = _config(enums.AugmentationType.SIMCLR, eval_crop_method=method,
                   crop_padding=4)
  image = _uint8_image(*shape)
  out = A.preprocess_for_eval(tf.constant(image), config).numpy()
  assert out.shape == (16, 16, 3) and out.dtype == np.float32
  assert out.min() >= 0. and out.max() <= 1.
  np.testing.assert_allclose(
      _in_dataset(lambda x: A.preprocess_for_eval(x, config), image), out,
      atol=1e-6)


def test_eval_crop_windows():
  # An image whose pixel value encodes its column: the crops' column ranges
  # show which window each method took.
  h, w, size, pad = 20, 40, 16, 4
  cols = np.tile(np.arange(w, dtype=np.float32)[None, :, None] / 100.,
                 (h, 1, 3))
  def run(method):
    config = _config(enums.AugmentationType.SIMCLR, image_size=size,
                     eval_crop_method=method, crop_padding=pad)
    return A.preprocess_for_eval(tf.constant(cols), config).numpy()[..., 0]
  # CROP_THEN_RESIZE: central square of side int(20 * 16 / 20) = 16 -> no
  # resize; columns 12..27.
  out = run(enums.EvalCropMethod.CROP_THEN_RESIZE)
  np.testing.assert_allclose(out[0], np.arange(12, 28) / 100., atol=1e-6)
  # RESIZE_THEN_CROP: short side 20 -> 20 (no resize), central 16 x 16.
  out = run(enums.EvalCropMethod.RESIZE_THEN_CROP)
  np.testing.assert_allclose(out[0], np.arange(12, 28) / 100., atol=1e-6)
  # CROP_THEN_DISTORT: central 16 x 32 (aspect kept), squashed to 16 wide.
  out = run(enums.EvalCropMethod.CROP_THEN_DISTORT)
  assert out[0, 0] < 0.10 and out[0, -1] > 0.33


def test_eval_crop_identity_requires_size():
  config = _config(enums.AugmentationType.SIMCLR,
                   eval_crop_method=enums.EvalCropMethod.IDENTITY)
  image = _float_image(16, 16)
  np.testing.assert_allclose(
      A.preprocess_for_eval(tf.constant(image), config), image)
  with pytest.raises(ValueError):
    A.preprocess_for_eval(tf.zeros([20, 16, 3]), config)


def test_batch_random_blur():
  images = tf.constant(np.stack([_float_image(32, 32, seed=i)
                                 for i in range(4)]))
  np.testing.assert_array_equal(A.batch_random_blur(images, 0.), images)
  np.testing.assert_array_equal(
      A.batch_random_blur(images, tf.constant(0.), seed=[1, 1]), images)
  blurred = A.batch_random_blur(images, 1., seed=[1, 1]).numpy()
  assert blurred.shape == images.shape
  diff = np.abs(blurred - images.numpy()).reshape(4, -1).max(axis=1)
  assert np.all(diff > 0.01)
  np.testing.assert_allclose(blurred.mean(axis=(1, 2, 3)),
                             images.numpy().mean(axis=(1, 2, 3)), atol=5e-3)
  # Deterministic with a seed; works stateful, in bfloat16 and under XLA.
  np.testing.assert_array_equal(
      A.batch_random_blur(images, 1., seed=[1, 1]), blurred)
  assert A.batch_random_blur(images, 0.5).shape == images.shape
  half = A.batch_random_blur(tf.cast(images, tf.bfloat16), 1., seed=[1, 1])
  assert half.dtype == tf.bfloat16
  # XLA: the same blur as eager for fixed sigmas; XLA's random bits differ
  # from the CPU kernels', so the random version is only checked for effect.
  sigmas = tf.constant([0.5, 1., 1.5, 2.])
  jit_blur = tf.function(A.gaussian_blur, jit_compile=True)
  np.testing.assert_allclose(jit_blur(images, sigmas),
                             A.gaussian_blur(images, sigmas), atol=1e-5)
  jit = tf.function(lambda x: A.batch_random_blur(x, 1., seed=[1, 1]),
                    jit_compile=True)
  jit_blurred = jit(images).numpy()
  assert np.all(np.abs(jit_blurred - images.numpy()).max(axis=(1, 2, 3)) > 0.01)
  jit_stateful = tf.function(lambda x: A.batch_random_blur(x, 0.5),
                             jit_compile=True)
  assert jit_stateful(images).shape == images.shape


@pytest.mark.parametrize('augmentation_type,blur,defer,expected', [
    (enums.AugmentationType.SIMCLR, 0.5, True, True),
    (enums.AugmentationType.STACKED_RANDAUGMENT, 0.5, True, True),
    (enums.AugmentationType.SIMCLR, 0.5, False, False),
    (enums.AugmentationType.SIMCLR, 0., True, False),
    (enums.AugmentationType.AUTOAUGMENT, 0.5, True, False),
    (enums.AugmentationType.RANDAUGMENT, 0.5, True, False),
    (enums.AugmentationType.IDENTITY, 0.5, True, False),
])
def test_should_defer_blur(augmentation_type, blur, defer, expected):
  config = _config(augmentation_type, blur_probability=blur,
                   defer_blurring=defer)
  assert A.should_defer_blur(config) is expected


def test_deferred_blur_is_left_out_of_the_pipeline():
  # With blur deferred, SimCLR at magnitude ~0 (no jitter) never blurs: a
  # sharp edge survives the pipeline.
  image = np.zeros((32, 32, 3), np.float32)
  image[:, 16:] = 1.
  config = _config(enums.AugmentationType.SIMCLR, image_size=32,
                   augmentation_magnitude=1e-6, blur_probability=1.,
                   defer_blurring=True, crop_area_range=(1., 1.))
  for i in range(3):
    out = A.preprocess_for_train(tf.constant(image), config,
                                 seed=[i, 0]).numpy()
    assert np.all((out < 1e-3) | (out > 1 - 1e-3))
  # Not deferred: some of a few draws blur visibly (small sigmas do not).
  config = dataclasses.replace(config, defer_blurring=False)
  outs = [A.preprocess_for_train(tf.constant(image), config,
                                 seed=[i, 0]).numpy() for i in range(5)]
  assert any(np.any((out > 0.01) & (out < 0.99)) for out in outs)


def test_whiten():
  image = tf.fill([2, 2, 3], 0.5)
  out = A.whiten(image, [0.25, 0.5, 0.75], [0.5, 0.5, 0.25])
  np.testing.assert_allclose(out[0, 0], [0.5, 0., -1.])
