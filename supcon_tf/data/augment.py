"""Image augmentation: pixel ops, the paper's policies, train/eval crops.

Everything here works on float32 RGB images with values in [0, 1] and shape
[height, width, 3] (the batched blur takes [batch, height, width, 3]). Every op
is a pure function `image -> image` built from core TensorFlow ops (no
tensorflow-addons), so it runs eagerly, inside `tf.data.Dataset.map` and, for
the ops XLA supports (colour ops, equalize, blur; not the projective
transforms), under `jit_compile`.

Randomness. Every random function takes `seed=None`:
  * `seed=None` draws from the global TF random state (`tf.random.uniform`).
  * `seed=` a shape [2] int32 / int64 tensor (or a pair of ints) uses stateless
    ops only, so the output is a deterministic function of (image, seed), also
    inside `tf.data` (e.g. zipped with `tf.data.Dataset.random()`). Sub-seeds
    are derived with `tf.random.experimental.stateless_split`.

Public pieces (reference = google-research/supcon/preprocessing.py plus the
TF Model Garden `official/vision/image_classification/augment.py` it imports):

  Deterministic ops (AutoAugment / RandAugment vocabulary):
    autocontrast, equalize, invert, posterize, solarize, solarize_add, color,
    contrast (PIL), reference_contrast (the reference library's), brightness, sharpness, rotate, shear_x, shear_y, translate_x,
    translate_y, grayscale, gaussian_blur.
  Random ops:
    cutout, random_resized_crop, random_flip, color_jitter, random_grayscale,
    random_gaussian_blur, warp, random_apply.
  Policies:
    autoaugment (ImageNet policy), randaugment, simclr_augment,
    stacked_randaugment, augment (dispatch on `enums.AugmentationType`).
  Entry points used by the input pipeline:
    preprocess_for_train, preprocess_for_eval, batch_random_blur,
    should_defer_blur, whiten.

Unlike the reference (which returns images in [-1, 1]), the preprocess
functions return [0, 1]; whitening / rescaling is the pipeline's job.
"""

import functools
import math
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import tensorflow as tf

from supcon_tf import enums

# A seed for stateless randomness: None (use the global random state) or a
# shape [2] int32 / int64 tensor / pair of ints.
Seed = Optional[Union[tf.Tensor, Sequence[int]]]
# A function (image, seed) -> image.
SeededOp = Callable[[tf.Tensor, Seed], tf.Tensor]
# A static (Python) size, or a dynamic one.
IntOrTensor = Union[int, tf.Tensor]

# The image side for which the reference's pixel constants (translate / cutout
# sizes, warp control length) were chosen.
REFERENCE_IMAGE_SIZE = 224
# AutoAugment fills pixels uncovered by geometric ops and cutout with uint8 128.
FILL_VALUE = 128. / 255.
# Levels of AutoAugment / RandAugment run over [0, _MAX_LEVEL].
_MAX_LEVEL = 10.

# AutoAugment ImageNet policy ('v0' in the Model Garden), (op, prob, level).
AUTOAUGMENT_IMAGENET_POLICY = (
    (('Equalize', 0.8, 1), ('ShearY', 0.8, 4)),
    (('Color', 0.4, 9), ('Equalize', 0.6, 3)),
    (('Color', 0.4, 1), ('Rotate', 0.6, 8)),
    (('Solarize', 0.8, 3), ('Equalize', 0.4, 7)),
    (('Solarize', 0.4, 2), ('Solarize', 0.6, 2)),
    (('Color', 0.2, 0), ('Equalize', 0.8, 8)),
    (('Equalize', 0.4, 8), ('SolarizeAdd', 0.8, 3)),
    (('ShearX', 0.2, 9), ('Rotate', 0.6, 8)),
    (('Color', 0.6, 1), ('Equalize', 1.0, 2)),
    (('Invert', 0.4, 9), ('Rotate', 0.6, 0)),
    (('Equalize', 1.0, 9), ('ShearY', 0.6, 3)),
    (('Color', 0.4, 7), ('Equalize', 0.6, 0)),
    (('Posterize', 0.4, 6), ('AutoContrast', 0.4, 7)),
    (('Solarize', 0.6, 8), ('Color', 0.6, 9)),
    (('Solarize', 0.2, 4), ('Rotate', 0.8, 9)),
    (('Rotate', 1.0, 7), ('TranslateY', 0.8, 9)),
    (('ShearX', 0.0, 0), ('Solarize', 0.8, 4)),
    (('ShearY', 0.8, 0), ('Color', 0.6, 4)),
    (('Color', 1.0, 0), ('Rotate', 0.6, 2)),
    (('Equalize', 0.8, 4), ('Equalize', 0.0, 8)),
    (('Equalize', 1.0, 4), ('AutoContrast', 0.6, 2)),
    (('ShearY', 0.4, 7), ('SolarizeAdd', 0.6, 7)),
    (('Posterize', 0.8, 2), ('Solarize', 0.6, 10)),
    (('Solarize', 0.6, 8), ('Equalize', 0.6, 1)),
    (('Color', 0.8, 6), ('Rotate', 0.4, 5)),
)

# RandAugment's op list, in the Model Garden's order (the order decides which
# op a drawn index selects; index len(RANDAUGMENT_OPS) is the identity).
RANDAUGMENT_OPS = (
    'AutoContrast', 'Equalize', 'Invert', 'Rotate', 'Posterize', 'Solarize',
    'Color', 'Contrast', 'Brightness', 'Sharpness', 'ShearX', 'ShearY',
    'TranslateX', 'TranslateY', 'Cutout', 'SolarizeAdd')

# Reference pixel constants at REFERENCE_IMAGE_SIZE.
AUTOAUGMENT_TRANSLATE_CONST = 250.
AUTOAUGMENT_CUTOUT_CONST = 100.
RANDAUGMENT_TRANSLATE_CONST = 100.
RANDAUGMENT_CUTOUT_CONST = 40.
# STACKED_RANDAUGMENT runs the Model Garden's RandAugment() with its defaults.
STACKED_RANDAUGMENT_NUM_LAYERS = 2
STACKED_RANDAUGMENT_MAGNITUDE = 10.
RANDAUGMENT_NUM_LAYERS = 2
WARP_MAX_CONTROL_LENGTH = 23.


# -----------------------------------------------------------------------------
# Randomness helpers.


def _as_seed(seed: Seed) -> Optional[tf.Tensor]:
  if seed is None:
    return None
  seed = tf.convert_to_tensor(seed)
  if seed.dtype not in (tf.int32, tf.int64):
    seed = tf.cast(seed, tf.int64)
  return seed


def split_seed(seed: Seed, num: int) -> List[Optional[tf.Tensor]]:
  """Derives `num` independent stateless seeds from `seed`.

  Args:
    seed: None or a shape [2] int32 / int64 seed.
    num: Python int, how many seeds to return.

  Returns:
    A list of `num` shape [2] seeds, or `num` Nones when `seed` is None (so
    callers can pass the result on unchanged in stateful mode).
  """
  seed = _as_seed(seed)
  if seed is None:
    return [None] * num
  return tf.unstack(tf.random.experimental.stateless_split(seed, num))


def _uniform(shape, seed: Seed, minval=0., maxval=1., dtype=tf.float32):
  seed = _as_seed(seed)
  if seed is None:
    return tf.random.uniform(shape, minval, maxval, dtype=dtype)
  return tf.random.stateless_uniform(shape, seed, minval, maxval, dtype=dtype)


def _normal(shape, seed: Seed, dtype=tf.float32):
  seed = _as_seed(seed)
  if seed is None:
    return tf.random.normal(shape, dtype=dtype)
  return tf.random.stateless_normal(shape, seed, dtype=dtype)


def _random_sign(value, seed: Seed) -> tf.Tensor:
  """`value` or `-value` with probability 1/2 each."""
  value = tf.convert_to_tensor(value, tf.float32)
  return tf.where(_uniform([], seed) < 0.5, value, -value)


def _uniform_index(uniform: tf.Tensor, n: int) -> tf.Tensor:
  """int32 index uniform over [0, n) from a U(0, 1) scalar."""
  return tf.minimum(tf.cast(uniform * n, tf.int32), n - 1)


def random_apply(fn: SeededOp, p: Union[float, tf.Tensor], image: tf.Tensor,
                 seed: Seed = None) -> tf.Tensor:
  """Returns `fn(image, seed')` with probability `p`, else `image`.

  Args:
    fn: A function (image, seed) -> image of the same shape and dtype.
    p: Probability of applying `fn`. A Python float of 0 or 1 builds no
      condition at all (the common cases of fixed policies).
    image: Any tensor `fn` accepts.
    seed: Optional stateless seed; split between the coin and `fn`.

  Returns:
    A tensor with the shape and dtype of `image`.
  """
  if isinstance(p, (int, float)) and (p <= 0 or p >= 1):
    return image if p <= 0 else fn(image, seed)
  coin_seed, fn_seed = split_seed(seed, 2)
  return _apply_if_coin(lambda im: fn(im, fn_seed), p, image,
                        _uniform([], coin_seed))


def _apply_if_coin(fn: Callable[[tf.Tensor], tf.Tensor],
                   p: Union[float, tf.Tensor], image: tf.Tensor,
                   coin: tf.Tensor) -> tf.Tensor:
  """`fn(image)` if `coin` (a U(0, 1) scalar drawn by the caller) < `p`.

  The policies draw all their coins and scalar parameters in one stateless op
  (`_uniform([k], seed)`) rather than one seed split and one draw each: on
  small images those tiny ops, not the pixel work, dominated the cost of an
  augmented view. A Python float `p` of 0 or 1 builds no condition.
  """
  if isinstance(p, (int, float)):
    if p <= 0:
      return image
    if p >= 1:
      return fn(image)
  return tf.cond(coin < tf.cast(p, tf.float32), lambda: fn(image),
                 lambda: image)


# -----------------------------------------------------------------------------
# Conversions.


def to_float_image(image: tf.Tensor) -> tf.Tensor:
  """Converts an image to float32 in [0, 1].

  Args:
    image: [h, w, c] (or batched) tensor; integer dtypes are scaled by their
      maximum (uint8: 1/255), float dtypes are assumed to be in [0, 1] already.

  Returns:
    A float32 tensor of the same shape.
  """
  image = tf.convert_to_tensor(image)
  if image.dtype.is_integer:
    return tf.image.convert_image_dtype(image, tf.float32)
  return tf.cast(image, tf.float32)


def _to_rgb(image: tf.Tensor) -> tf.Tensor:
  """Makes a [h, w, 3] image; single-channel images are repeated."""
  if image.shape.rank != 3:
    raise ValueError(f'Expected an image of rank 3, got shape {image.shape}.')
  if image.shape[-1] == 1:
    image = tf.image.grayscale_to_rgb(image)
  return tf.ensure_shape(image, [None, None, 3])


def _quantize(image: tf.Tensor) -> tf.Tensor:
  """Float [0, 1] -> int32 in [0, 255], for ops defined on uint8 levels."""
  return tf.cast(tf.round(tf.clip_by_value(image, 0., 1.) * 255.), tf.int32)


def _dequantize(levels: tf.Tensor) -> tf.Tensor:
  return tf.cast(levels, tf.float32) / 255.


def _select(condition: tf.Tensor, x: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
  """`tf.where(condition, x, y)` for a `condition` broadcastable to `x`.

  Same-shape `Select` instead of `SelectV2` (what tf.where builds): on CPU the
  latter is 3-4x slower on a 224 px image, broadcast or not. `x` and `y` have
  the same shape.
  """
  if not condition.shape.is_fully_defined() or condition.shape != x.shape:
    condition = tf.broadcast_to(condition, tf.shape(x))
  return tf.raw_ops.Select(condition=condition, x=x, y=y)


def _hw(image: tf.Tensor) -> Tuple[IntOrTensor, IntOrTensor]:
  """Height and width of a [h, w, c] image: Python ints when static."""
  shape = tf.shape(image)
  h = image.shape[-3] if image.shape[-3] is not None else shape[-3]
  w = image.shape[-2] if image.shape[-2] is not None else shape[-2]
  return h, w


def whiten(image: tf.Tensor, mean, std) -> tf.Tensor:
  """Per-channel whitening `(image - mean) / std` (reference `apply_whitening`).

  Args:
    image: float [..., 3] tensor.
    mean: Broadcastable to `image` (e.g. [3]), same value scale as `image`.
    std: Broadcastable to `image`.

  Returns:
    A tensor of the shape and dtype of `image`.
  """
  mean = tf.cast(mean, image.dtype)
  std = tf.cast(std, image.dtype)
  return (image - mean) / std


# -----------------------------------------------------------------------------
# Pixel (colour) ops. All take and return float32 [h, w, 3] in [0, 1].


def _blend(degenerate: tf.Tensor, image: tf.Tensor, factor) -> tf.Tensor:
  """`degenerate + factor * (image - degenerate)`, clipped to [0, 1].

  factor 0 gives `degenerate`, 1 gives `image`, > 1 extrapolates (PIL
  ImageEnhance semantics).
  """
  factor = tf.cast(factor, tf.float32)
  return tf.clip_by_value(degenerate + factor * (image - degenerate), 0., 1.)


def grayscale(image: tf.Tensor) -> tf.Tensor:
  """Luma (ITU-R 601: 0.2989 R + 0.587 G + 0.114 B) repeated over 3 channels.

  Args:
    image: float32 [h, w, 3] (or [n, h, w, 3]).

  Returns:
    float32 tensor of the same shape with equal channels.
  """
  # One matmul by [[r] * 3, [g] * 3, [b] * 3] instead of rgb_to_grayscale and
  # grayscale_to_rgb: 3 ops instead of 11, which matters on small images.
  return tf.tensordot(image, tf.constant(_LUMA_TO_RGB, image.dtype), axes=1)


# ITU-R 601 luma weights (those of tf.image.rgb_to_grayscale), one row per
# input channel, repeated over the three output channels.
_LUMA_TO_RGB = ((0.2989,) * 3, (0.5870,) * 3, (0.1140,) * 3)


def autocontrast(image: tf.Tensor) -> tf.Tensor:
  """Stretches each channel linearly so that its min is 0 and its max is 1.

  PIL `ImageOps.autocontrast` (cutoff 0). Constant channels are unchanged.

  Args:
    image: float32 [h, w, 3] in [0, 1].

  Returns:
    float32 [h, w, 3] in [0, 1].
  """
  lo = tf.reduce_min(image, axis=[-3, -2], keepdims=True)
  hi = tf.reduce_max(image, axis=[-3, -2], keepdims=True)
  # Constant channels get the identity map (offset 0, scale 1); the decision
  # is made on the [.., 1, 1, 3] statistics, not per pixel.
  varies = hi > lo
  offset = tf.where(varies, lo, tf.zeros_like(lo))
  scale = tf.where(varies, 1. / (hi - lo), tf.ones_like(lo))
  return tf.clip_by_value((image - offset) * scale, 0., 1.)


def equalize(image: tf.Tensor) -> tf.Tensor:
  """Histogram equalisation of each channel, PIL `ImageOps.equalize` rules.

  Works on the 256 uint8 levels of the image: with `step = (n_pixels -
  count_of_the_brightest_level) // 255`, level v maps to
  `(cumhist[v - 1] + step // 2) // step` (0 for the lowest), clipped to 255.
  Channels with step 0 (one or two levels) are returned unchanged.

  Args:
    image: float32 [h, w, 3] in [0, 1].

  Returns:
    float32 [h, w, 3] in [0, 1], multiples of 1/255 in equalised channels.
  """
  # Flat bin ids: channel c uses bins [256 c, 256 c + 256) of one 768-bin
  # histogram. bincount (unlike histogram_fixed_width) also compiles with
  # XLA, and is 2x faster than unsorted_segment_sum.
  ids = _quantize(image) + tf.constant([0, 256, 512], tf.int32)
  hist = tf.math.bincount(tf.reshape(ids, [-1]), minlength=768,
                          maxlength=768, dtype=tf.int32)
  hist = tf.reshape(hist, [3, 256])
  n = tf.reduce_sum(hist[0])
  # The brightest occupied level's count: the last non-zero bin (found on the
  # 3 x 256 histogram rather than by a pass over the pixels).
  occupied = tf.cast(hist > 0, tf.int32) * tf.range(1, 257)
  top_count = tf.gather(hist, tf.argmax(occupied, axis=1)[:, None],
                        batch_dims=1)[:, 0]
  step = (n - top_count) // 255  # [3]
  safe_step = tf.maximum(step, 1)[:, None]
  lut = (tf.cumsum(hist, axis=1) + safe_step // 2) // safe_step
  lut = tf.concat([tf.zeros([3, 1], lut.dtype), lut[:, :-1]], axis=1)
  lut = _dequantize(tf.clip_by_value(lut, 0, 255))
  # gather_nd on [768, 1] is faster than gather on [768] (CPU).
  equalized = tf.gather_nd(tf.reshape(lut, [768, 1]), ids[..., None])[..., 0]
  # Channels with step 0 are kept; the common case needs no select.
  return tf.cond(tf.reduce_all(step > 0), lambda: equalized,
                 lambda: _select(step > 0, equalized, image))


def invert(image: tf.Tensor) -> tf.Tensor:
  """`1 - image` (PIL `ImageOps.invert`).

  Args:
    image: float32 [h, w, 3] in [0, 1].

  Returns:
    float32 [h, w, 3] in [0, 1].
  """
  return 1. - image


def posterize(image: tf.Tensor, bits) -> tf.Tensor:
  """Keeps the `bits` most significant bits of each uint8 level.

  `bits` is clipped to [1, 8]: the reference's uint8 shift clamps shifts of 8
  to 7, so its 0-bit posterize (reached at low levels) keeps 1 bit.

  Args:
    image: float32 [h, w, 3] in [0, 1].
    bits: int (Python or scalar tensor).

  Returns:
    float32 [h, w, 3], multiples of 1/255.
  """
  bits = tf.clip_by_value(tf.cast(bits, tf.int32), 1, 8)
  # Keeping the top bits of level l is floor(l / 2^k) * 2^k, exact in float32.
  block = tf.cast(tf.bitwise.left_shift(1, 8 - bits), tf.float32)
  levels = tf.round(tf.clip_by_value(image, 0., 1.) * 255.)
  return tf.floor(levels / block) * (block / 255.)


def solarize(image: tf.Tensor, threshold=FILL_VALUE) -> tf.Tensor:
  """Inverts pixels at or above `threshold`: `x if x < threshold else 1 - x`.

  Args:
    image: float32 [h, w, 3] in [0, 1].
    threshold: float in [0, 1] (the reference's uint8 threshold T is T / 255;
      default 128 / 255).

  Returns:
    float32 [h, w, 3] in [0, 1].
  """
  threshold = tf.cast(threshold, image.dtype)
  return _select(image < threshold, image, 1. - image)


def solarize_add(image: tf.Tensor, addition=0., threshold=FILL_VALUE
                 ) -> tf.Tensor:
  """Adds `addition` to pixels below `threshold`, clipped to [0, 1].

  Args:
    image: float32 [h, w, 3] in [0, 1].
    addition: float (reference uint8 addition A is A / 255).
    threshold: float in [0, 1] (default 128 / 255).

  Returns:
    float32 [h, w, 3] in [0, 1].
  """
  addition = tf.cast(addition, image.dtype)
  threshold = tf.cast(threshold, image.dtype)
  added = tf.clip_by_value(image + addition, 0., 1.)
  return _select(image < threshold, added, image)


def color(image: tf.Tensor, factor) -> tf.Tensor:
  """PIL `ImageEnhance.Color`: blend from grayscale (0) to the image (1).

  Args:
    image: float32 [h, w, 3] in [0, 1].
    factor: float >= 0; > 1 over-saturates.

  Returns:
    float32 [h, w, 3] in [0, 1].
  """
  return _blend(grayscale(image), image, factor)


def contrast(image: tf.Tensor, factor) -> tf.Tensor:
  """PIL `ImageEnhance.Contrast`: blend from the mean gray level (0) to image.

  Args:
    image: float32 [h, w, 3] in [0, 1].
    factor: float >= 0.

  Returns:
    float32 [h, w, 3] in [0, 1].
  """
  mean = tf.reduce_mean(tf.image.rgb_to_grayscale(image))
  return _blend(mean, image, factor)


def reference_contrast(image: tf.Tensor, factor) -> tf.Tensor:
  """The reference augmentation library's `contrast`, on [0, 1] floats.

  The Model Garden op (the reference's AutoAugment / RandAugment) means to
  blend toward the mean grey level but sums the grey-level histogram without
  weighting it by the levels: its "mean" is the pixel count h * w / 256,
  clipped to 255 and truncated to uint8. A 224 px image thus always blends
  toward grey level 196, whatever its content (`contrast` is PIL's op).

  Args:
    image: float32 [h, w, 3] in [0, 1].
    factor: float >= 0.

  Returns:
    float32 [h, w, 3] in [0, 1].
  """
  h, w = _hw(image)
  pixels = tf.cast(h, tf.float32) * tf.cast(w, tf.float32)
  level = tf.floor(tf.minimum(pixels / 256., 255.))
  return _blend(level / 255., image, factor)


def brightness(image: tf.Tensor, factor) -> tf.Tensor:
  """PIL `ImageEnhance.Brightness`: blend from black (0) to the image (1).

  Args:
    image: float32 [h, w, 3] in [0, 1].
    factor: float >= 0.

  Returns:
    float32 [h, w, 3] in [0, 1].
  """
  return _blend(tf.zeros_like(image), image, factor)


def sharpness(image: tf.Tensor, factor) -> tf.Tensor:
  """PIL `ImageEnhance.Sharpness`: blend from the SMOOTH-filtered image.

  The degenerate image is the 3x3 kernel [[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13
  applied to the interior; the one-pixel border keeps the original pixels, as
  in PIL.

  Args:
    image: float32 [h, w, 3] in [0, 1], h, w >= 3.
    factor: float >= 0; 0 smooths, 1 is the identity, > 1 sharpens.

  Returns:
    float32 [h, w, 3] in [0, 1].
  """
  kernel = tf.constant([[1., 1., 1.], [1., 5., 1.], [1., 1., 1.]]) / 13.
  kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
  smooth = tf.nn.depthwise_conv2d(
      image[None], kernel, strides=[1, 1, 1, 1], padding='VALID')[0]
  middle = tf.concat([image[1:-1, :1], smooth, image[1:-1, -1:]], axis=1)
  degenerate = tf.concat([image[:1], middle, image[-1:]], axis=0)
  return _blend(degenerate, image, factor)


# -----------------------------------------------------------------------------
# Geometric ops: nearest neighbour, constant fill (ImageProjectiveTransformV3).


def _projective_transform(image: tf.Tensor, transform, fill_value=FILL_VALUE,
                          interpolation: str = 'NEAREST') -> tf.Tensor:
  """Applies a projective transform mapping output (x, y) to input points.

  Args:
    image: float32 [h, w, c].
    transform: 8 floats [a0, a1, a2, b0, b1, b2, c0, c1]: output pixel (x, y)
      (x = column, y = row) reads input ((a0 x + a1 y + a2) / k,
      (b0 x + b1 y + b2) / k), k = c0 x + c1 y + 1.
    fill_value: value of output pixels that read outside the input.
    interpolation: 'NEAREST' or 'BILINEAR'.

  Returns:
    float32 [h, w, c].
  """
  transform = tf.reshape(
      tf.stack([tf.cast(t, tf.float32) for t in transform]), [1, 8])
  out = tf.raw_ops.ImageProjectiveTransformV3(
      images=image[None],
      transforms=transform,
      output_shape=tf.shape(image)[-3:-1],
      fill_value=tf.cast(fill_value, tf.float32),
      interpolation=interpolation,
      fill_mode='CONSTANT')[0]
  return tf.ensure_shape(out, image.shape)


def rotate(image: tf.Tensor, degrees, fill_value=FILL_VALUE) -> tf.Tensor:
  """Rotates about the image centre, counter-clockwise for positive degrees.

  Counter-clockwise as displayed (row 0 on top): `rotate(x, 90)` equals
  `np.rot90(x)` for square images.

  Args:
    image: float32 [h, w, 3].
    degrees: float (Python or scalar tensor).
    fill_value: value of uncovered pixels (AutoAugment gray by default).

  Returns:
    float32 [h, w, 3].
  """
  radians = tf.cast(degrees, tf.float32) * (math.pi / 180.)
  h, w = _hw(image)
  h = tf.cast(h, tf.float32)
  w = tf.cast(w, tf.float32)
  cos, sin = tf.cos(radians), tf.sin(radians)
  # Offsets keep the centre ((w - 1) / 2, (h - 1) / 2) fixed.
  x_offset = ((w - 1.) - (cos * (w - 1.) - sin * (h - 1.))) / 2.
  y_offset = ((h - 1.) - (sin * (w - 1.) + cos * (h - 1.))) / 2.
  return _projective_transform(
      image, [cos, -sin, x_offset, sin, cos, y_offset, 0., 0.], fill_value)


def translate_x(image: tf.Tensor, pixels, fill_value=FILL_VALUE) -> tf.Tensor:
  """Shifts the content left by `pixels` (PIL / AutoAugment convention).

  `output[:, x] = image[:, x + pixels]`; negative values shift right.

  Args:
    image: float32 [h, w, 3].
    pixels: float (whole numbers give exact shifts).
    fill_value: value of uncovered pixels.

  Returns:
    float32 [h, w, 3].
  """
  return _projective_transform(
      image, [1., 0., pixels, 0., 1., 0., 0., 0.], fill_value)


def translate_y(image: tf.Tensor, pixels, fill_value=FILL_VALUE) -> tf.Tensor:
  """Shifts the content up by `pixels`: `output[y] = image[y + pixels]`.

  Args:
    image: float32 [h, w, 3].
    pixels: float.
    fill_value: value of uncovered pixels.

  Returns:
    float32 [h, w, 3].
  """
  return _projective_transform(
      image, [1., 0., 0., 0., 1., pixels, 0., 0.], fill_value)


def shear_x(image: tf.Tensor, level, fill_value=FILL_VALUE) -> tf.Tensor:
  """Horizontal shear: `output[y, x] = image[y, x + level * y]`.

  Args:
    image: float32 [h, w, 3].
    level: float shear coefficient (0 = identity).
    fill_value: value of uncovered pixels.

  Returns:
    float32 [h, w, 3].
  """
  return _projective_transform(
      image, [1., level, 0., 0., 1., 0., 0., 0.], fill_value)


def shear_y(image: tf.Tensor, level, fill_value=FILL_VALUE) -> tf.Tensor:
  """Vertical shear: `output[y, x] = image[y + level * x, x]`.

  Args:
    image: float32 [h, w, 3].
    level: float shear coefficient (0 = identity).
    fill_value: value of uncovered pixels.

  Returns:
    float32 [h, w, 3].
  """
  return _projective_transform(
      image, [1., 0., 0., level, 1., 0., 0., 0.], fill_value)


def cutout(image: tf.Tensor, pad_size, fill_value=FILL_VALUE,
           seed: Seed = None) -> tf.Tensor:
  """Fills a (2 pad_size)^2 square at a uniformly random centre (clipped).

  DeVries & Taylor 2017, as in the Model Garden: the centre (cy, cx) is
  uniform over all pixels and rows [cy - pad, cy + pad), columns
  [cx - pad, cx + pad) are set to `fill_value`.

  Args:
    image: float32 [h, w, 3].
    pad_size: int half side of the square (0 = identity).
    fill_value: float fill.
    seed: Optional stateless seed.

  Returns:
    float32 [h, w, 3].
  """
  h, w = _hw(image)
  seed_y, seed_x = split_seed(seed, 2)
  cy = _uniform([], seed_y, 0, h, tf.int32)
  cx = _uniform([], seed_x, 0, w, tf.int32)
  pad = tf.cast(pad_size, tf.int32)
  rows = tf.range(h)[:, None, None]
  cols = tf.range(w)[None, :, None]
  inside = ((rows >= cy - pad) & (rows < cy + pad) &
            (cols >= cx - pad) & (cols < cx + pad))
  return _select(inside, tf.fill(tf.shape(image),
                                 tf.cast(fill_value, image.dtype)), image)


# -----------------------------------------------------------------------------
# SimCLR ops.


def random_resized_crop(image: tf.Tensor, size: int,
                        area_range: Sequence[float] = (0.08, 1.0),
                        aspect_ratio_range: Sequence[float] = (0.75, 1.33),
                        min_object_covered: float = 0.1,
                        max_attempts: int = 100,
                        seed: Seed = None) -> tf.Tensor:
  """Inception-style random crop resized (bilinear) to `size` x `size`.

  Samples with `sample_distorted_bounding_box` over the whole image. As in the
  reference, when the sampler returns the whole image (its failure signal) the
  central square of side min(h, w) is used instead. Note that
  `min_object_covered=0.1` (the reference's value) also makes 0.1 the
  effective lower area bound when `area_range[0] < 0.1`.

  Args:
    image: float32 [h, w, 3], any size.
    size: Python int, output side.
    area_range: (min, max) fraction of the image area in the crop.
    aspect_ratio_range: (min, max) width / height of the crop; the
      reference's literal (0.75, 1.33), i.e. about 3/4..4/3.
    min_object_covered: see `tf.image.sample_distorted_bounding_box`.
    max_attempts: see `tf.image.sample_distorted_bounding_box`.
    seed: Optional stateless seed.

  Returns:
    float32 [size, size, 3].
  """
  shape = tf.shape(image)
  kwargs = dict(
      bounding_boxes=tf.zeros([1, 0, 4], tf.float32),
      min_object_covered=min_object_covered,
      aspect_ratio_range=tuple(aspect_ratio_range),
      area_range=tuple(area_range),
      max_attempts=max_attempts,
      use_image_if_no_bounding_boxes=True)
  seed = _as_seed(seed)
  if seed is None:
    begin, crop_size, _ = tf.image.sample_distorted_bounding_box(
        shape, **kwargs)
  else:
    begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
        shape, seed=seed, **kwargs)
  h, w = shape[0], shape[1]
  failed = tf.logical_and(tf.equal(crop_size[0], h), tf.equal(crop_size[1], w))
  side = tf.minimum(h, w)
  offset_y = tf.where(failed, (h - side + 1) // 2, begin[0])
  offset_x = tf.where(failed, (w - side + 1) // 2, begin[1])
  crop_h = tf.where(failed, side, crop_size[0])
  crop_w = tf.where(failed, side, crop_size[1])
  crop = tf.slice(image, tf.stack([offset_y, offset_x, 0]),
                  tf.stack([crop_h, crop_w, -1]))
  resized = tf.image.resize(crop, [size, size], method='bilinear')
  return tf.ensure_shape(resized, [size, size, image.shape[-1]])


def random_flip(image: tf.Tensor, seed: Seed = None) -> tf.Tensor:
  """Left-right flip with probability 1/2.

  Args:
    image: [h, w, c] tensor.
    seed: Optional stateless seed.

  Returns:
    Tensor of the same shape and dtype.
  """
  seed = _as_seed(seed)
  if seed is None:
    return tf.image.random_flip_left_right(image)
  return tf.image.stateless_random_flip_left_right(image, seed)


def color_jitter(image: tf.Tensor, strength: float = 0.5,
                 use_pytorch_impl: bool = False,
                 seed: Seed = None) -> tf.Tensor:
  """SimCLR colour distortion: brightness, contrast, saturation, hue.

  The four effects run in a random order, each followed by clipping to [0, 1].
  With s = 0.8 * strength and d = 0.2 * strength (SimCLR constants):

  * TensorFlow style (default): brightness adds U(-s, s); contrast scales each
    channel about its mean by U(1 - s, 1 + s); saturation scales HSV S by
    U(1 - s, 1 + s); hue shifts by U(-d, d) (the `tf.image.adjust_*` ops).
  * torchvision style (`use_pytorch_impl`, like `transforms.ColorJitter`):
    factors f ~ U(max(0, 1 - s), 1 + s); brightness f * x; contrast blends with
    the mean grayscale value, f * x + (1 - f) * mean; saturation blends with
    the grayscale image; hue shifts HSV H by U(-d, d) modulo 1.

  Lower bounds 1 - s are clamped at 0 in both styles (the reference's TF style
  would raise for strength > 1.25).

  Args:
    image: float32 [h, w, 3] in [0, 1].
    strength: Python float >= 0; 0.5 is the reference default.
    use_pytorch_impl: Python bool, torchvision-style jitter.
    seed: Optional stateless seed.

  Returns:
    float32 [h, w, 3] in [0, 1].

  Raises:
    ValueError: if strength < 0 or the hue range 0.2 * strength exceeds 0.5.
  """
  _check_jitter_strength(strength)
  return _color_jitter(image, strength, use_pytorch_impl,
                       _uniform([_JITTER_UNIFORMS], seed))


# Uniforms `_color_jitter` consumes: 4 effect parameters, 4 order keys.
_JITTER_UNIFORMS = 8


def _check_jitter_strength(strength: float):
  if strength < 0:
    raise ValueError(f'strength must be >= 0, got {strength}.')
  if 0.2 * strength > 0.5:
    raise ValueError(
        f'Hue jitter 0.2 * strength must be <= 0.5, got {0.2 * strength}.')


def _color_jitter(image: tf.Tensor, strength: float, use_pytorch_impl: bool,
                  uniforms: tf.Tensor) -> tf.Tensor:
  """`color_jitter` with its random values given.

  Args:
    image: float32 [h, w, 3] in [0, 1].
    strength: Python float, checked by `_check_jitter_strength`.
    use_pytorch_impl: Python bool.
    uniforms: float32 [_JITTER_UNIFORMS] ~ U(0, 1): brightness, contrast,
      saturation, hue parameters, then the keys whose argsort is the order.

  Returns:
    float32 [h, w, 3] in [0, 1].
  """
  s = 0.8 * strength
  d = 0.2 * strength
  lower = max(0., 1. - s)
  # The random values do not depend on the order, so they are set up front,
  # all four by one affine map of the uniforms: brightness is a delta
  # U(-s, s) in TF style and a factor U(lower, 1 + s) in torchvision style.
  brightness_low = lower if use_pytorch_impl else -s
  brightness_high = 1. + s if use_pytorch_impl else s
  low = tf.constant([brightness_low, lower, lower, -d], tf.float32)
  high = tf.constant([brightness_high, 1. + s, 1. + s, d], tf.float32)
  values = low + (high - low) * uniforms[:4]
  brightness_value, contrast_factor, saturation_factor, hue_delta = (
      tf.unstack(values))
  brightness_delta = brightness_factor = brightness_value
  order = tf.unstack(tf.argsort(uniforms[4:_JITTER_UNIFORMS]))

  if use_pytorch_impl:
    def jitter_brightness(im):
      return im * brightness_factor

    def jitter_contrast(im):
      mean = tf.reduce_mean(tf.image.rgb_to_grayscale(im))
      return contrast_factor * im + (1. - contrast_factor) * mean

    def jitter_saturation(im):
      gray = tf.image.rgb_to_grayscale(im)
      return saturation_factor * im + (1. - saturation_factor) * gray

    def jitter_hue(im):
      h, s_, v = tf.unstack(tf.image.rgb_to_hsv(im), axis=-1)
      h = tf.math.floormod(h + hue_delta, 1.)
      return tf.image.hsv_to_rgb(tf.stack([h, s_, v], axis=-1))
  else:
    def jitter_brightness(im):
      return tf.image.adjust_brightness(im, brightness_delta)

    def jitter_contrast(im):
      return tf.image.adjust_contrast(im, contrast_factor)

    def jitter_saturation(im):
      return tf.image.adjust_saturation(im, saturation_factor)

    def jitter_hue(im):
      return tf.image.adjust_hue(im, hue_delta)

  effects = (jitter_brightness, jitter_contrast, jitter_saturation, jitter_hue)
  for i in range(4):
    image = tf.switch_case(
        order[i], [functools.partial(f, image) for f in effects])
    image = tf.clip_by_value(image, 0., 1.)
  return image


def random_grayscale(image: tf.Tensor, p: float = 0.2,
                     seed: Seed = None) -> tf.Tensor:
  """`grayscale(image)` with probability `p` (SimCLR uses 0.2).

  Args:
    image: float32 [h, w, 3].
    p: probability.
    seed: Optional stateless seed.

  Returns:
    float32 [h, w, 3].
  """
  return random_apply(lambda im, _: grayscale(im), p, image, seed)


def blur_radius(side_length: int) -> int:
  """The reference's blur radius: kernel size side // 10, radius half of it."""
  return (side_length // 10) // 2


def _blur_axis(images: tf.Tensor, taps: List[tf.Tensor], radius: int,
               axis: int) -> tf.Tensor:
  """Convolves [n, h, w, c] images along `axis` (1 or 2) with [n] kernels.

  Reflect padding (instead of the reference's zero padding) keeps border
  brightness, whatever the value range (e.g. whitened images in the train
  step). The sum of shifted slices compiles to one fused loop under XLA and
  allows a different kernel per image. The kernels are symmetric, so the two
  slices at distance j share one multiplication.

  Args:
    images: [n, h, w, c].
    taps: radius + 1 tensors [n, 1, 1, 1], the kernel weights at distances
      0..radius (`_gaussian_taps`).
    radius: Python int.
    axis: 1 or 2.
  """
  paddings = [[0, 0], [0, 0], [0, 0], [0, 0]]
  paddings[axis] = [radius, radius]
  padded = tf.pad(images, paddings, mode='REFLECT')
  length = images.shape[axis]
  if length is None:
    length = tf.shape(images)[axis]

  def shifted(offset):
    begin = [0, 0, 0, 0]
    begin[axis] = radius + offset
    size = [-1, -1, -1, -1]
    size[axis] = length
    return tf.slice(padded, begin, size)

  out = taps[0] * shifted(0)
  for j in range(1, radius + 1):
    out += taps[j] * (shifted(-j) + shifted(j))
  return out


def _gaussian_taps(sigmas: tf.Tensor, radius: int) -> tf.Tensor:
  """[n] sigmas -> [n, radius + 1] weights of normalised Gaussian kernels.

  Column j is the weight at distance j of a kernel of side 2 radius + 1
  (float32).
  """
  squares = tf.constant([float(j * j) for j in range(radius + 1)])
  sigmas = tf.cast(sigmas, tf.float32)[:, None]
  taps = tf.exp(squares * (-0.5 / tf.square(sigmas)))
  total = 2. * tf.reduce_sum(taps, axis=1, keepdims=True) - taps[:, :1]
  return taps / total


def _gaussian_kernels(sigmas: tf.Tensor, radius: int) -> tf.Tensor:
  """[n] sigmas -> [n, 2 radius + 1] normalised Gaussian kernels (float32)."""
  taps = _gaussian_taps(sigmas, radius)
  return tf.concat([tf.reverse(taps[:, 1:], axis=[1]), taps], axis=1)


# From this radius on, one image is blurred faster by two depthwise
# convolutions than by the sum of shifted slices (CPU: 3x at radius 11, the
# reference's radius for 224 px; equal at radius 3).
_CONV_BLUR_MIN_RADIUS = 4


def _blur_one_by_conv(image: tf.Tensor, sigma: tf.Tensor, radius: int
                      ) -> tf.Tensor:
  """Blurs one [h, w, c] image (static c) with two depthwise convolutions."""
  channels = image.shape[-1]
  kernel = tf.cast(_gaussian_kernels(tf.reshape(sigma, [1]), radius)[0],
                   image.dtype)
  column = tf.tile(tf.reshape(kernel, [-1, 1, 1, 1]), [1, 1, channels, 1])
  row = tf.reshape(column, [1, -1, channels, 1])
  padded = tf.pad(image[None], [[0, 0], [radius, radius], [radius, radius],
                                [0, 0]], mode='REFLECT')
  out = tf.nn.depthwise_conv2d(padded, column, [1, 1, 1, 1], 'VALID')
  out = tf.nn.depthwise_conv2d(out, row, [1, 1, 1, 1], 'VALID')
  return tf.ensure_shape(out[0], image.shape)


def _blur_batch(images: tf.Tensor, sigmas: tf.Tensor, radius: int
                ) -> tf.Tensor:
  if radius <= 0:
    return images
  taps = tf.cast(_gaussian_taps(sigmas, radius), images.dtype)
  taps = tf.unstack(tf.reshape(taps, [-1, radius + 1, 1, 1, 1]), axis=1)
  blurred = _blur_axis(images, taps, radius, axis=2)
  return _blur_axis(blurred, taps, radius, axis=1)


def _static_radius(images: tf.Tensor, radius: Optional[int]) -> int:
  if radius is not None:
    return radius
  side = images.shape[-3]
  if side is None:
    raise ValueError('Blur needs a static image height or an explicit radius; '
                     f'got shape {images.shape}.')
  return blur_radius(side)


def gaussian_blur(image: tf.Tensor, sigma, radius: Optional[int] = None
                  ) -> tf.Tensor:
  """Separable Gaussian blur with standard deviation `sigma` pixels.

  Args:
    image: float [h, w, c] or [n, h, w, c] (float32 / bfloat16 / float16).
    sigma: scalar float, or [n] floats for a batch (one sigma per image).
    radius: Python int kernel radius; default `blur_radius(h)` (the reference:
      kernel side h // 10). radius 0 returns the input.

  Returns:
    Tensor of the shape and dtype of `image`.
  """
  batched = image.shape.rank == 4
  images = image if batched else image[None]
  radius = _static_radius(images, radius)
  if (not batched and radius >= _CONV_BLUR_MIN_RADIUS and
      image.dtype == tf.float32 and image.shape[-1] is not None):
    return _blur_one_by_conv(image, tf.cast(sigma, tf.float32), radius)
  sigmas = tf.broadcast_to(tf.cast(sigma, tf.float32), tf.shape(images)[:1])
  out = _blur_batch(images, sigmas, radius)
  return out if batched else out[0]


def random_gaussian_blur(image: tf.Tensor, seed: Seed = None,
                         sigma_range: Tuple[float, float] = (0.1, 2.0),
                         radius: Optional[int] = None) -> tf.Tensor:
  """`gaussian_blur` with sigma ~ U(sigma_range) (SimCLR: 0.1..2.0).

  Args:
    image: float [h, w, c].
    seed: Optional stateless seed.
    sigma_range: (min, max) sigma in pixels.
    radius: see `gaussian_blur`.

  Returns:
    Tensor of the shape and dtype of `image`.
  """
  sigma = _uniform([], seed, sigma_range[0], sigma_range[1])
  return gaussian_blur(image, sigma, radius)


def batch_random_blur(images: tf.Tensor, blur_probability: float,
                      seed: Seed = None,
                      radius: Optional[int] = None,
                      sigma_per_image: bool = False) -> tf.Tensor:
  """Blurs each image of a batch with probability `blur_probability`.

  For `defer_blurring`: run inside the train step on the accelerator (compiles
  with XLA), on all views. As the reference's `batch_random_blur`, one sigma
  ~ U(0.1, 2.0) is drawn for the whole batch (the reference calls it on each
  core's batch); with `sigma_per_image` each image draws its own.

  Args:
    images: float [n, h, w, c] (float32 / bfloat16 / float16), any value range
      (reflect padding keeps whitened images unbiased at the border).
    blur_probability: Python float or scalar tensor in [0, 1].
    seed: Optional stateless seed.
    radius: see `gaussian_blur`; default from the static height.
    sigma_per_image: one sigma per image instead of one per batch.

  Returns:
    Tensor of the shape and dtype of `images`; unselected images are returned
    bit-exactly.
  """
  if isinstance(blur_probability, (int, float)) and blur_probability <= 0:
    return images
  radius = _static_radius(images, radius)
  sigma_seed, select_seed = split_seed(seed, 2)
  n = tf.shape(images)[0]
  if sigma_per_image:
    sigmas = _uniform([n], sigma_seed, 0.1, 2.0)
  else:
    sigmas = tf.fill([n], _uniform([], sigma_seed, 0.1, 2.0))
  blurred = _blur_batch(images, sigmas, radius)
  selected = (_uniform([n, 1, 1, 1], select_seed) <
              tf.cast(blur_probability, tf.float32))
  return tf.where(selected, blurred, images)


def _thin_plate_spline_flow(control: tf.Tensor, flows: tf.Tensor,
                            query: tf.Tensor) -> tf.Tensor:
  """Interpolates `flows` at `control` points to `query` points.

  Polyharmonic spline of order 2 (thin-plate, phi(r) = r^2 log r) plus an
  affine term, no regularisation: what `tfa.image.sparse_image_warp` uses.

  Args:
    control: float32 [k, 2] points.
    flows: float32 [k, 2] values at the points.
    query: float32 [q, 2] points.

  Returns:
    float32 [q, 2] interpolated values.
  """
  def phi(squared_distance):
    return 0.5 * squared_distance * tf.math.log(
        tf.maximum(squared_distance, 1e-10))

  def squared_distance(a, b):
    return tf.reduce_sum(tf.square(a[:, None, :] - b[None, :, :]), axis=-1)

  k = tf.shape(control)[0]
  a = phi(squared_distance(control, control))  # [k, k]
  b = tf.concat([control, tf.ones([k, 1])], axis=1)  # [k, 3]
  lhs = tf.concat([tf.concat([a, b], axis=1),
                   tf.concat([tf.transpose(b), tf.zeros([3, 3])], axis=1)],
                  axis=0)
  rhs = tf.concat([flows, tf.zeros([3, 2])], axis=0)
  solution = tf.linalg.solve(lhs, rhs)
  weights, affine = solution[:k], solution[k:]
  rbf = phi(squared_distance(query, control)) @ weights
  linear = tf.concat([query, tf.ones([tf.shape(query)[0], 1])], axis=1) @ affine
  return rbf + linear


def _bilinear_sample(image: tf.Tensor, rows: tf.Tensor, cols: tf.Tensor
                     ) -> tf.Tensor:
  """Samples [h, w, c] `image` at float [q] (row, col), clamping at edges."""
  h, w = tf.shape(image)[0], tf.shape(image)[1]
  rows = tf.clip_by_value(rows, 0., tf.cast(h - 1, tf.float32))
  cols = tf.clip_by_value(cols, 0., tf.cast(w - 1, tf.float32))
  r0 = tf.clip_by_value(tf.floor(rows), 0., tf.cast(tf.maximum(h - 2, 0),
                                                    tf.float32))
  c0 = tf.clip_by_value(tf.floor(cols), 0., tf.cast(tf.maximum(w - 2, 0),
                                                    tf.float32))
  ar = (rows - r0)[:, None]
  ac = (cols - c0)[:, None]
  r0 = tf.cast(r0, tf.int32)
  c0 = tf.cast(c0, tf.int32)
  r1 = tf.minimum(r0 + 1, h - 1)
  c1 = tf.minimum(c0 + 1, w - 1)

  def at(r, c):
    return tf.gather_nd(image, tf.stack([r, c], axis=1))

  top = at(r0, c0) * (1. - ac) + at(r0, c1) * ac
  bottom = at(r1, c0) * (1. - ac) + at(r1, c1) * ac
  return top * (1. - ar) + bottom * ar


def warp(image: tf.Tensor, seed: Seed = None,
         max_control_length: Optional[float] = None,
         num_control_points_per_axis: int = 2) -> tf.Tensor:
  """Random smooth (thin-plate spline) warp, the reference's `_warp`.

  Control points sit on an evenly spaced interior grid of
  `num_control_points_per_axis`^2 points; each moves by N(0, 1) * L pixels with
  one L ~ U(0, max_control_length) per image, and the dense flow between them
  is a thin-plate spline (as `tfa.image.sparse_image_warp`), sampled
  bilinearly with edge clamping.

  Args:
    image: float32 [h, w, c].
    seed: Optional stateless seed.
    max_control_length: max displacement scale in pixels; default
      23 * min(h, w) / 224 (the reference's 23 pixels at 224).
    num_control_points_per_axis: Python int.

  Returns:
    float32 [h, w, c].
  """
  h, w = _hw(image)
  hf = tf.cast(h, tf.float32)
  wf = tf.cast(w, tf.float32)
  if max_control_length is None:
    max_control_length = (WARP_MAX_CONTROL_LENGTH * tf.minimum(hf, wf) /
                          REFERENCE_IMAGE_SIZE)
  n = num_control_points_per_axis
  grid = tf.range(1, n + 1, dtype=tf.float32) / (n + 1)
  gy, gx = tf.meshgrid(grid * hf, grid * wf, indexing='ij')
  source = tf.reshape(tf.stack([gy, gx], axis=-1), [-1, 2])  # (row, col)
  length_seed, flow_seed = split_seed(seed, 2)
  length = _uniform([], length_seed, 0., 1.) * tf.cast(max_control_length,
                                                        tf.float32)
  dest = source + _normal([n * n, 2], flow_seed) * length
  ys, xs = tf.meshgrid(tf.range(hf), tf.range(wf), indexing='ij')
  query = tf.stack([tf.reshape(ys, [-1]), tf.reshape(xs, [-1])], axis=1)
  # Output pixel p reads input p - flow(p); flow is dest - source at dest, so
  # the content at each source point moves to its dest point.
  flow = _thin_plate_spline_flow(dest, dest - source, query)
  sampled = _bilinear_sample(image, query[:, 0] - flow[:, 0],
                             query[:, 1] - flow[:, 1])
  return tf.ensure_shape(tf.reshape(sampled, tf.shape(image)), image.shape)


# -----------------------------------------------------------------------------
# AutoAugment / RandAugment level -> op mapping (Model Garden semantics).


def _scaled_const(image: tf.Tensor, const: float, scale_to_image_size: bool):
  """Pixel constant for this image: const * min(h, w) / 224 when scaling."""
  if not scale_to_image_size:
    return const
  h, w = _hw(image)
  if isinstance(h, int) and isinstance(w, int):
    return const * min(h, w) / REFERENCE_IMAGE_SIZE
  return const * tf.cast(tf.minimum(h, w), tf.float32) / REFERENCE_IMAGE_SIZE


def _enhance_factor(level: float) -> float:
  return level / _MAX_LEVEL * 1.8 + 0.1


def _make_op(name: str, level: float, translate_const: float,
             cutout_const: float, scale_to_image_size: bool = True,
             pil_contrast: bool = False) -> SeededOp:
  """The op `name` at `level` in [0, 10] as a function (image, seed) -> image.

  Level mapping of the Model Garden's `level_to_arg` (m = level / 10):
  Rotate +-30 m degrees; ShearX/Y +-0.3 m; TranslateX/Y +-m * translate_const
  pixels; Posterize int(4 m) bits; Solarize threshold int(256 m) / 255;
  SolarizeAdd addition int(110 m) / 255; Color/Contrast/Brightness/Sharpness
  factor 1.8 m + 0.1; Cutout half side int(m * cutout_const). Signs are random.
  The pixel constants are for 224-pixel images and, with
  `scale_to_image_size`, scale with min(h, w) / 224 (identical at 224).
  Contrast is the reference library's (`reference_contrast`) unless
  `pil_contrast` (`contrast`).
  """
  m = level / _MAX_LEVEL

  def translate(fn):
    def op(image, seed):
      pixels = m * _scaled_const(image, translate_const, scale_to_image_size)
      return fn(image, _random_sign(pixels, seed))
    return op

  def cutout_op(image, seed):
    pad = tf.cast(tf.floor(m * _scaled_const(image, cutout_const,
                                             scale_to_image_size)), tf.int32)
    return cutout(image, pad, seed=seed)

  builders: Dict[str, SeededOp] = {
      'AutoContrast': lambda im, s: autocontrast(im),
      'Equalize': lambda im, s: equalize(im),
      'Invert': lambda im, s: invert(im),
      'Rotate': lambda im, s: rotate(im, _random_sign(m * 30., s)),
      'Posterize': lambda im, s: posterize(im, int(m * 4)),
      'Solarize': lambda im, s: solarize(im, int(m * 256) / 255.),
      'SolarizeAdd': lambda im, s: solarize_add(im, int(m * 110) / 255.),
      'Color': lambda im, s: color(im, _enhance_factor(level)),
      'Contrast': lambda im, s: (contrast if pil_contrast else
                                 reference_contrast)(im,
                                                     _enhance_factor(level)),
      'Brightness': lambda im, s: brightness(im, _enhance_factor(level)),
      'Sharpness': lambda im, s: sharpness(im, _enhance_factor(level)),
      'ShearX': lambda im, s: shear_x(im, _random_sign(m * 0.3, s)),
      'ShearY': lambda im, s: shear_y(im, _random_sign(m * 0.3, s)),
      'TranslateX': translate(translate_x),
      'TranslateY': translate(translate_y),
      'Cutout': cutout_op,
  }
  if name not in builders:
    raise ValueError(f'Unknown augmentation op {name!r}; expected one of '
                     f'{sorted(builders)}.')
  return builders[name]


def apply_augment_op(image: tf.Tensor, name: str, level: float,
                     seed: Seed = None,
                     translate_const: float = RANDAUGMENT_TRANSLATE_CONST,
                     cutout_const: float = RANDAUGMENT_CUTOUT_CONST,
                     scale_to_image_size: bool = True,
                     pil_contrast: bool = False) -> tf.Tensor:
  """Applies one AutoAugment / RandAugment op by name at `level` in [0, 10].

  Args:
    image: float32 [h, w, 3] in [0, 1].
    name: one of RANDAUGMENT_OPS.
    level: Python float in [0, 10] (RandAugment's magnitude M).
    seed: Optional stateless seed (random signs, cutout position).
    translate_const: translation in pixels at level 10 (224-pixel images).
    cutout_const: cutout half side in pixels at level 10 (224-pixel images).
    scale_to_image_size: scale the pixel constants by min(h, w) / 224.
    pil_contrast: Contrast as PIL instead of the reference library.

  Returns:
    float32 [h, w, 3] in [0, 1].
  """
  return _make_op(name, level, translate_const, cutout_const,
                  scale_to_image_size, pil_contrast)(image, seed)


def autoaugment(image: tf.Tensor, seed: Seed = None,
                policy=AUTOAUGMENT_IMAGENET_POLICY,
                translate_const: float = AUTOAUGMENT_TRANSLATE_CONST,
                cutout_const: float = AUTOAUGMENT_CUTOUT_CONST,
                scale_to_image_size: bool = True,
                pil_contrast: bool = False) -> tf.Tensor:
  """AutoAugment (Cubuk et al. 2018): one random sub-policy of `policy`.

  Each sub-policy's ops run in order, each with its own probability, at the
  fixed levels of the table (the reference does not scale them by
  augmentation_magnitude).

  Args:
    image: float32 [h, w, 3] in [0, 1].
    seed: Optional stateless seed.
    policy: sequence of sub-policies, each a sequence of (op, prob, level).
    translate_const: see `apply_augment_op` (AutoAugment: 250).
    cutout_const: see `apply_augment_op` (AutoAugment: 100).
    scale_to_image_size: see `apply_augment_op`.
    pil_contrast: see `apply_augment_op`.

  Returns:
    float32 [h, w, 3] in [0, 1].
  """
  max_ops = max(len(sub) for sub in policy)
  draw_seed, *op_seeds = split_seed(seed, 1 + max_ops)
  # The sub-policy index and every op's coin in one draw (see
  # `_apply_if_coin`).
  uniforms = tf.unstack(_uniform([1 + max_ops], draw_seed))
  coins = uniforms[1:]

  def run(sub_policy):
    im = image
    for (name, prob, level), op_seed, coin in zip(sub_policy, op_seeds,
                                                  coins):
      op = _make_op(name, level, translate_const, cutout_const,
                    scale_to_image_size, pil_contrast)
      im = _apply_if_coin(lambda x, op=op, s=op_seed: op(x, s), prob, im,
                          coin)
    return im

  index = _uniform_index(uniforms[0], len(policy))
  branches = [functools.partial(run, sub) for sub in policy]
  return tf.ensure_shape(tf.switch_case(index, branches), image.shape)


def randaugment(image: tf.Tensor, num_layers: int = RANDAUGMENT_NUM_LAYERS,
                magnitude: float = 10., seed: Seed = None,
                translate_const: float = RANDAUGMENT_TRANSLATE_CONST,
                cutout_const: float = RANDAUGMENT_CUTOUT_CONST,
                scale_to_image_size: bool = True,
                pil_contrast: bool = False) -> tf.Tensor:
  """RandAugment (Cubuk et al. 2019): `num_layers` random ops at `magnitude`.

  As the Model Garden: each layer draws an index uniformly from the 16 ops of
  RANDAUGMENT_OPS plus one identity slot, and applies the op (always).

  Args:
    image: float32 [h, w, 3] in [0, 1].
    num_layers: N, Python int.
    magnitude: M on the 0..10 level scale, Python float.
    seed: Optional stateless seed.
    translate_const: see `apply_augment_op` (RandAugment: 100).
    cutout_const: see `apply_augment_op` (RandAugment: 40).
    scale_to_image_size: see `apply_augment_op`.
    pil_contrast: see `apply_augment_op`.

  Returns:
    float32 [h, w, 3] in [0, 1].
  """
  ops = [_make_op(name, magnitude, translate_const, cutout_const,
                  scale_to_image_size, pil_contrast)
         for name in RANDAUGMENT_OPS]
  # One split and one draw of all layers' op indices (see `_apply_if_coin`).
  select_seed, *op_seeds = split_seed(seed, 1 + num_layers)
  selectors = tf.unstack(_uniform([num_layers], select_seed))
  for selector, op_seed in zip(selectors, op_seeds):
    index = _uniform_index(selector, len(ops) + 1)
    current = image
    branches = [functools.partial(op, current, op_seed) for op in ops]
    branches.append(lambda current=current: current)
    image = tf.ensure_shape(tf.switch_case(index, branches), current.shape)
  return image


# -----------------------------------------------------------------------------
# Policies.


# Uniforms a SimCLR-style policy draws at once: the jitter's, then the coins
# of jitter, grayscale, warp and blur, then the blur sigma.
_SIMCLR_UNIFORMS = _JITTER_UNIFORMS + 5


def _simclr_draw(seed: Seed, num_seeds: int
                 ) -> Tuple[tf.Tensor, List[Optional[tf.Tensor]]]:
  """The SimCLR policies' uniforms and `num_seeds` more seeds, in one split.

  Drawing every scalar in one op (instead of a split and a draw per random
  choice) makes a SimCLR view of a 32 px image about 1.3x faster.

  Returns:
    (float32 [_SIMCLR_UNIFORMS] ~ U(0, 1), list of `num_seeds` seeds).
  """
  draw_seed, *seeds = split_seed(seed, 1 + num_seeds)
  return _uniform([_SIMCLR_UNIFORMS], draw_seed), seeds


def _simclr_jitter(image: tf.Tensor, strength: float,
                   use_pytorch_color_jitter: bool,
                   uniforms: tf.Tensor) -> tf.Tensor:
  """Colour jitter with probability 0.8."""
  _check_jitter_strength(strength)
  return _apply_if_coin(
      lambda im: _color_jitter(im, strength, use_pytorch_color_jitter,
                               uniforms[:_JITTER_UNIFORMS]),
      0.8, image, uniforms[_JITTER_UNIFORMS])


def _simclr_tail(image: tf.Tensor, blur_probability: float,
                 warp_probability: float, uniforms: tf.Tensor,
                 warp_seed: Seed) -> tf.Tensor:
  """Grayscale (p = 0.2), warp and Gaussian blur (sigma ~ U(0.1, 2))."""
  gray_coin, warp_coin, blur_coin, blur_uniform = tf.unstack(
      uniforms[_JITTER_UNIFORMS + 1:_SIMCLR_UNIFORMS])
  image = _apply_if_coin(grayscale, 0.2, image, gray_coin)
  if warp_probability > 0:
    image = _apply_if_coin(lambda im: warp(im, seed=warp_seed),
                           warp_probability, image, warp_coin)
  if blur_probability > 0:
    image = _apply_if_coin(
        lambda im: gaussian_blur(im, 0.1 + 1.9 * blur_uniform),
        blur_probability, image, blur_coin)
  return image


def simclr_augment(image: tf.Tensor, strength: float = 0.5,
                   blur_probability: float = 0.5,
                   warp_probability: float = 0.,
                   use_pytorch_color_jitter: bool = False,
                   seed: Seed = None) -> tf.Tensor:
  """SimCLR (Chen et al. 2020) appearance augmentation, after crop and flip.

  Colour jitter (p = 0.8), grayscale (p = 0.2), warp (p = warp_probability),
  Gaussian blur (p = blur_probability), in the reference's order.

  Args:
    image: float32 [h, w, 3] in [0, 1].
    strength: colour jitter strength (augmentation_magnitude).
    blur_probability: 0 when blurring is deferred to the train step.
    warp_probability: probability of `warp`.
    use_pytorch_color_jitter: torchvision-style jitter.
    seed: Optional stateless seed.

  Returns:
    float32 [h, w, 3] in [0, 1].
  """
  uniforms, (warp_seed,) = _simclr_draw(seed, 1)
  image = _simclr_jitter(image, strength, use_pytorch_color_jitter, uniforms)
  return _simclr_tail(image, blur_probability, warp_probability, uniforms,
                      warp_seed)


def stacked_randaugment(image: tf.Tensor, strength: float = 0.5,
                        blur_probability: float = 0.5,
                        warp_probability: float = 0.,
                        use_pytorch_color_jitter: bool = False,
                        seed: Seed = None,
                        pil_contrast: bool = False) -> tf.Tensor:
  """SimCLR colour jitter, then RandAugment, then the rest of SimCLR.

  As the reference: jitter (p = 0.8, strength = augmentation_magnitude),
  RandAugment with the Model Garden defaults (N = 2, M = 10, independent of
  augmentation_magnitude), grayscale (p = 0.2), warp, blur.

  Args:
    image: float32 [h, w, 3] in [0, 1].
    strength: colour jitter strength (augmentation_magnitude).
    blur_probability: 0 when blurring is deferred to the train step.
    warp_probability: probability of `warp`.
    use_pytorch_color_jitter: torchvision-style jitter.
    seed: Optional stateless seed.
    pil_contrast: see `apply_augment_op`.

  Returns:
    float32 [h, w, 3] in [0, 1].
  """
  uniforms, (ra_seed, warp_seed) = _simclr_draw(seed, 2)
  image = _simclr_jitter(image, strength, use_pytorch_color_jitter, uniforms)
  image = randaugment(image, STACKED_RANDAUGMENT_NUM_LAYERS,
                      STACKED_RANDAUGMENT_MAGNITUDE, seed=ra_seed,
                      pil_contrast=pil_contrast)
  return _simclr_tail(image, blur_probability, warp_probability, uniforms,
                      warp_seed)


def augment(image: tf.Tensor,
            augmentation_type: Union[enums.AugmentationType, str],
            magnitude: float = 0.5, blur_probability: float = 0.5,
            warp_probability: float = 0.,
            use_pytorch_color_jitter: bool = False,
            seed: Seed = None, pil_contrast: bool = False) -> tf.Tensor:
  """Applies the policy `augmentation_type` (reference `_augment_image`).

  magnitude <= 0 turns every policy off (the reference returns the image).
  SIMCLR: `simclr_augment` with strength = magnitude. STACKED_RANDAUGMENT:
  `stacked_randaugment` with strength = magnitude. RANDAUGMENT: N = 2,
  M = magnitude (on the 0..10 scale, as the reference passes it). AUTOAUGMENT:
  the ImageNet policy at its own levels. IDENTITY: nothing. Warp and blur
  only exist in the SimCLR-based policies.

  Args:
    image: float32 [h, w, 3] in [0, 1].
    augmentation_type: enums.AugmentationType or its name / value.
    magnitude: augmentation_magnitude.
    blur_probability: in-pipeline blur probability (0 when deferred).
    warp_probability: warp probability.
    use_pytorch_color_jitter: torchvision-style jitter.
    seed: Optional stateless seed.
    pil_contrast: the AutoAugment / RandAugment Contrast op as PIL instead
      of the reference library (see `reference_contrast`).

  Returns:
    float32 [h, w, 3] in [0, 1].

  Raises:
    ValueError: for an unknown augmentation type.
  """
  augmentation_type = enums.parse_enum(enums.AugmentationType,
                                       augmentation_type)
  simclr_kwargs = dict(strength=magnitude, blur_probability=blur_probability,
                       warp_probability=warp_probability,
                       use_pytorch_color_jitter=use_pytorch_color_jitter,
                       seed=seed)
  policies = {
      enums.AugmentationType.SIMCLR:
          lambda im: simclr_augment(im, **simclr_kwargs),
      enums.AugmentationType.STACKED_RANDAUGMENT:
          lambda im: stacked_randaugment(im, pil_contrast=pil_contrast,
                                         **simclr_kwargs),
      enums.AugmentationType.RANDAUGMENT:
          lambda im: randaugment(im, RANDAUGMENT_NUM_LAYERS, magnitude,
                                 seed=seed, pil_contrast=pil_contrast),
      enums.AugmentationType.AUTOAUGMENT:
          lambda im: autoaugment(im, seed=seed, pil_contrast=pil_contrast),
      enums.AugmentationType.IDENTITY: lambda im: im,
  }
  if magnitude <= 0:
    return image
  return policies[augmentation_type](image)


# -----------------------------------------------------------------------------
# Entry points.


def _policy_blurs(augmentation_type) -> bool:
  augmentation_type = enums.parse_enum(enums.AugmentationType,
                                       augmentation_type)
  return augmentation_type in (enums.AugmentationType.SIMCLR,
                               enums.AugmentationType.STACKED_RANDAUGMENT)


def should_defer_blur(config) -> bool:
  """Whether the train step must call `batch_random_blur` (reference rule).

  True when the policy blurs (SIMCLR or STACKED_RANDAUGMENT),
  blur_probability > 0 and defer_blurring is set.

  Args:
    config: an AugmentConfig.
  """
  return bool(_policy_blurs(config.augmentation_type) and
              config.blur_probability > 0 and config.defer_blurring)


def preprocess_for_train(image: tf.Tensor, config, seed: Seed = None
                         ) -> tf.Tensor:
  """One augmented training view (reference `_preprocess_image_for_train`).

  Random resized crop (area config.crop_area_range, aspect 0.75..1.33) to
  image_size, random left-right flip (unless `config.random_flip` is False,
  for data that is not mirror-symmetric such as digits), then the policy of
  config.augmentation_type (see `augment`); blur is left out when
  `should_defer_blur(config)`. The crop and flip also happen for IDENTITY,
  as in the reference.

  Args:
    image: uint8 [h, w, 3] (or [h, w, 1], repeated to RGB), or float in
      [0, 1]; any size.
    config: an AugmentConfig.
    seed: Optional stateless seed; draw different seeds for different views.

  Returns:
    float32 [image_size, image_size, 3] in [0, 1].
  """
  size = config.image_size
  image = _to_rgb(to_float_image(image))
  crop_seed, flip_seed, policy_seed = split_seed(seed, 3)
  image = random_resized_crop(image, size, config.crop_area_range,
                              seed=crop_seed)
  if getattr(config, 'random_flip', True):
    image = random_flip(image, flip_seed)
  blur_probability = 0. if config.defer_blurring else config.blur_probability
  image = augment(
      image, config.augmentation_type,
      magnitude=config.augmentation_magnitude,
      blur_probability=blur_probability,
      warp_probability=config.warp_probability,
      use_pytorch_color_jitter=config.use_pytorch_color_jitter,
      seed=policy_seed, pil_contrast=getattr(config, 'pil_contrast', False))
  return tf.ensure_shape(tf.clip_by_value(image, 0., 1.), [size, size, 3])


def _center_crop(image: tf.Tensor, crop_h, crop_w) -> tf.Tensor:
  """Crop with the reference's offsets (h - crop + 1) // 2."""
  shape = tf.shape(image)
  offset_y = (shape[0] - crop_h + 1) // 2
  offset_x = (shape[1] - crop_w + 1) // 2
  return tf.slice(image, tf.stack([offset_y, offset_x, 0]),
                  tf.stack([crop_h, crop_w, -1]))


def _resize(image: tf.Tensor, size) -> tf.Tensor:
  return tf.image.resize(image, size, method='bilinear')


def preprocess_for_eval(image: tf.Tensor, config) -> tf.Tensor:
  """Deterministic eval crop (reference `_crop_to_square`, is_training=False).

  With s = image_size, p = crop_padding and config.eval_crop_method:
  RESIZE_THEN_CROP: resize (bilinear) so the short side is s + p, then take
  the central s x s. CROP_THEN_RESIZE: take the central square of side
  int(short_side * s / (s + p)), resize to s x s. CROP_THEN_DISTORT: take the
  central s / (s + p) of each side (`tf.image.central_crop`, keeps the aspect
  ratio), resize to s x s (distorts non-square images). IDENTITY: nothing;
  the image must already be s x s (else an error is raised).

  Args:
    image: uint8 [h, w, 3] (or [h, w, 1]) or float in [0, 1].
    config: an AugmentConfig.

  Returns:
    float32 [image_size, image_size, 3] in [0, 1].

  Raises:
    ValueError: for an unknown method, or (IDENTITY) a static size mismatch
      (a dynamic mismatch fails in `tf.ensure_shape` at run time).
  """
  size = config.image_size
  padding = config.crop_padding
  method = enums.parse_enum(enums.EvalCropMethod, config.eval_crop_method)
  image = _to_rgb(to_float_image(image))
  crop_frac = size / (size + padding)

  def resize_then_crop(im):
    shape = tf.shape(im)
    h = tf.cast(shape[0], tf.float32)
    w = tf.cast(shape[1], tf.float32)
    short = tf.minimum(h, w)
    # The short side is set exactly (the reference's float product could
    # truncate it to s + p - 1); the long side is truncated like the reference.
    target = float(size + padding)
    new_h = tf.where(h <= w, target, tf.floor(h * target / short))
    new_w = tf.where(h <= w, tf.floor(w * target / short), target)
    resized = _resize(im, tf.cast(tf.stack([new_h, new_w]), tf.int32))
    return _center_crop(resized, size, size)

  def crop_then_resize(im):
    shape = tf.shape(im)
    side = tf.cast(crop_frac * tf.cast(tf.minimum(shape[0], shape[1]),
                                       tf.float32), tf.int32)
    return _resize(_center_crop(im, side, side), [size, size])

  def crop_then_distort(im):
    return _resize(tf.image.central_crop(im, crop_frac), [size, size])

  methods = {
      enums.EvalCropMethod.RESIZE_THEN_CROP: resize_then_crop,
      enums.EvalCropMethod.CROP_THEN_RESIZE: crop_then_resize,
      enums.EvalCropMethod.CROP_THEN_DISTORT: crop_then_distort,
      enums.EvalCropMethod.IDENTITY: lambda im: im,
  }
  if (method == enums.EvalCropMethod.IDENTITY and
      not image.shape[:2].is_compatible_with([size, size])):
    raise ValueError(f'eval_crop_method IDENTITY needs {size} x {size} images, '
                     f'got shape {image.shape}.')
  image = methods[method](image)
  return tf.ensure_shape(tf.clip_by_value(image, 0., 1.), [size, size, 3])
