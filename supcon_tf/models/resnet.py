"""ResNet v1 and ResNeXt encoders, as the reference release defines them.

`build_encoder` returns a functional `keras.Model` from images
`[batch, height, width, 3]` to globally average-pooled features
`[batch, feature_dim]` (float32). Architecture facts, all from the reference
(`supcon/resnet.py`, `supcon/blocks.py`):

* ResNet v1 with batch norm after every convolution. Depths 18 and 34 use the
  basic block (two 3x3 convolutions), 50 and deeper the bottleneck block
  (1x1, 3x3, 1x1 with 4x expansion). The stride of a bottleneck block sits on
  its 3x3 convolution ("ResNet v1.5").
* The first block of *every* group has a projection shortcut (1x1 convolution +
  batch norm), even group 0 of the basic-block nets where the shapes already
  match. ResNet-18/34 therefore have 64*64 + 2*64 = 4,224 parameters more than
  the torchvision nets; ResNet-50/101/152 match them exactly.
* Convolutions with stride > 1 pad explicitly by `kernel_size - 1` (more at the
  end) and use VALID padding, so the output does not depend on whether the
  input side is even; stride-1 convolutions use SAME, and so does the
  grouped 3x3 of ResNeXt at any stride (the reference's GroupConv2D pads
  'same', which for an even side puts the extra zero row at the end, not the
  start). No convolution has a bias. Kernels are initialised with a fan-in truncated normal
  (`VarianceScaling(1.0, 'fan_in', 'truncated_normal')`).
* Batch norm: momentum 0.9, epsilon 1e-5; the last batch norm of each residual
  branch of the basic and bottleneck blocks starts with gamma = 0, so every
  block starts as the identity.
* ResNeXt: bottleneck blocks whose inner width is twice the group's filters,
  with the 3x3 convolution split into 64 groups, and no zero-initialised gamma.
  Depths 50, 101, 152, 200.
* Width multiplier `w`: the stem has `int(64 * w)` filters and group `i`
  `int(64 * 2**i * w)`; the features have `512 * w` (basic) or `2048 * w`
  (bottleneck, ResNeXt) channels.
* Stem: `first_conv_kernel_size` x `first_conv_stride` convolution, batch norm,
  ReLU, then optionally a 3x3 stride-2 SAME max pool. ImageNet uses 7 / 2 / max
  pool; CIFAR uses 3 / 1 / no max pool.

Global batch norm (`use_global_batch_norm=True`) uses
`keras.layers.BatchNormalization(synchronized=True)`: in a replica context of
any `tf.distribute` strategy the batch moments are all-reduced across replicas
(tested on logical CPU devices under MirroredStrategy); outside a strategy it is
ordinary batch norm.
"""

from typing import Callable, Dict, Optional, Tuple, Union

import keras

from supcon_tf import enums

BATCH_NORM_MOMENTUM = 0.9
BATCH_NORM_EPSILON = 1e-5
# ResNeXt's grouped 3x3 convolutions always have this many groups (reference).
RESNEXT_GROUPS = 64

# Blocks per group, by depth.
BLOCK_GROUP_SIZES: Dict[int, Tuple[int, ...]] = {
    18: (2, 2, 2, 2),
    34: (3, 4, 6, 3),
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
    152: (3, 8, 36, 3),
    200: (3, 24, 36, 3),
}
RESNEXT_DEPTHS = (50, 101, 152, 200)

DTypeLike = Union[None, str, keras.DTypePolicy]


def conv_kernel_initializer() -> keras.initializers.Initializer:
  """The reference's `tf.variance_scaling_initializer()` defaults."""
  return keras.initializers.VarianceScaling(
      scale=1.0, mode='fan_in', distribution='truncated_normal')


@keras.saving.register_keras_serializable(package='supcon_tf')
class BatchNormalization(keras.layers.BatchNormalization):
  """Keras batch norm whose moving statistics stay equal on every replica.

  Keras 3 creates the moving mean and variance with aggregation 'none'. With
  local (unsynchronised) batch norm under MirroredStrategy every replica then
  writes its own statistics into its own copy, the copies drift apart, and a
  checkpoint keeps replica 0's. Here the moving statistics of local batch norm
  are 'mean'-aggregated, so each update is averaged over the replicas (the
  moving mean then equals one device's on the whole batch). Synchronised batch
  norm computes the same update on every replica and needs no extra
  communication, so it keeps 'none'.
  """

  def add_weight(self, *args, **kwargs):
    if not kwargs.get('trainable', True) and not self.synchronized:
      kwargs.setdefault('aggregation', 'mean')
    return super().add_weight(*args, **kwargs)


def batch_norm(name: str, *, synchronized: bool, zero_gamma: bool = False,
               center: bool = True, dtype: DTypeLike = None
               ) -> BatchNormalization:
  """A batch norm layer with the reference's momentum and epsilon.

  Args:
    name: Layer name.
    synchronized: All-reduce the batch moments across the replicas of the
      current `tf.distribute` strategy (global batch norm).
    zero_gamma: Start with gamma = 0 (last batch norm of a residual branch).
    center: Whether the layer has a beta (shift) parameter.
    dtype: Dtype policy. Keras computes the moments in float32 even under a
      mixed policy, so statistics do not lose precision.

  Returns:
    A `BatchNormalization` (a `keras.layers.BatchNormalization`) over the last
    (channel) axis.
  """
  return BatchNormalization(
      axis=-1, momentum=BATCH_NORM_MOMENTUM, epsilon=BATCH_NORM_EPSILON,
      center=center, scale=True,
      gamma_initializer='zeros' if zero_gamma else 'ones',
      synchronized=synchronized, name=name, dtype=dtype)


class _Builder:
  """Holds the options shared by every layer of one encoder while wiring it."""

  def __init__(self, use_global_batch_norm: bool, dtype: DTypeLike):
    self.synchronized = use_global_batch_norm
    self.dtype = dtype

  def conv(self, x, filters: int, kernel_size: int, strides: int, name: str,
           groups: int = 1, fixed_padding: bool = True):
    """Convolution with the reference's padding; no bias.

    `fixed_padding`: strided convolutions pad explicitly (the reference's
    Conv2DFixedPadding); False: always SAME (its GroupConv2D).
    """
    if strides > 1 and fixed_padding:
      # Pad by kernel_size - 1 independently of the input size, then VALID:
      # the reference's Conv2DFixedPadding.
      pad_total = kernel_size - 1
      if pad_total:
        pad_beg = pad_total // 2
        pad_end = pad_total - pad_beg
        x = keras.layers.ZeroPadding2D(
            ((pad_beg, pad_end), (pad_beg, pad_end)), name=name + '_pad',
            dtype=self.dtype)(x)
      padding = 'valid'
    else:
      padding = 'same'
    return keras.layers.Conv2D(
        filters, kernel_size, strides=strides, padding=padding, groups=groups,
        use_bias=False, kernel_initializer=conv_kernel_initializer(),
        name=name, dtype=self.dtype)(x)

  def bn(self, x, name: str, zero_gamma: bool = False):
    return batch_norm(name, synchronized=self.synchronized,
                      zero_gamma=zero_gamma, dtype=self.dtype)(x)

  def relu(self, x, name: str):
    return keras.layers.ReLU(name=name, dtype=self.dtype)(x)

  def shortcut(self, x, filters: int, strides: int, use_projection: bool,
               name: str):
    if not use_projection:
      return x
    x = self.conv(x, filters, 1, strides, name + '_proj_conv')
    return self.bn(x, name + '_proj_bn')

  def merge(self, x, shortcut, name: str):
    x = keras.layers.Add(name=name + '_add', dtype=self.dtype)([x, shortcut])
    return self.relu(x, name + '_out')

  def basic_block(self, x, filters: int, strides: int, use_projection: bool,
                  name: str):
    """Two 3x3 convolutions; `filters` output channels."""
    shortcut = self.shortcut(x, filters, strides, use_projection, name)
    x = self.conv(x, filters, 3, strides, name + '_conv1')
    x = self.relu(self.bn(x, name + '_bn1'), name + '_relu1')
    x = self.conv(x, filters, 3, 1, name + '_conv2')
    x = self.bn(x, name + '_bn2', zero_gamma=True)
    return self.merge(x, shortcut, name)

  def bottleneck_block(self, x, filters: int, strides: int,
                       use_projection: bool, name: str):
    """1x1, 3x3 (strided), 1x1 convolutions; `4 * filters` output channels."""
    shortcut = self.shortcut(x, 4 * filters, strides, use_projection, name)
    x = self.conv(x, filters, 1, 1, name + '_conv1')
    x = self.relu(self.bn(x, name + '_bn1'), name + '_relu1')
    x = self.conv(x, filters, 3, strides, name + '_conv2')
    x = self.relu(self.bn(x, name + '_bn2'), name + '_relu2')
    x = self.conv(x, 4 * filters, 1, 1, name + '_conv3')
    x = self.bn(x, name + '_bn3', zero_gamma=True)
    return self.merge(x, shortcut, name)

  def resnext_block(self, x, filters: int, strides: int, use_projection: bool,
                    name: str):
    """Bottleneck with a 2x wider, 64-group 3x3; `4 * filters` outputs."""
    shortcut = self.shortcut(x, 4 * filters, strides, use_projection, name)
    x = self.conv(x, 2 * filters, 1, 1, name + '_conv1')
    x = self.relu(self.bn(x, name + '_bn1'), name + '_relu1')
    x = self.conv(x, 2 * filters, 3, strides, name + '_conv2',
                  groups=RESNEXT_GROUPS, fixed_padding=False)
    x = self.relu(self.bn(x, name + '_bn2'), name + '_relu2')
    x = self.conv(x, 4 * filters, 1, 1, name + '_conv3')
    # The reference does not zero-initialise gamma in ResNeXt blocks.
    x = self.bn(x, name + '_bn3', zero_gamma=False)
    return self.merge(x, shortcut, name)


def _block_fn(builder: _Builder, architecture: enums.EncoderArchitecture,
              depth: int) -> Callable:
  if architecture == enums.EncoderArchitecture.RESNEXT:
    return builder.resnext_block
  return builder.basic_block if depth < 50 else builder.bottleneck_block


def _validate(architecture: enums.EncoderArchitecture, depth: int,
              width: float, first_conv_kernel_size: int,
              first_conv_stride: int) -> None:
  if architecture == enums.EncoderArchitecture.RESNEXT:
    valid_depths = RESNEXT_DEPTHS
  else:
    valid_depths = tuple(BLOCK_GROUP_SIZES)
  if depth not in valid_depths:
    raise ValueError(f'depth={depth} is not a valid {architecture.name} depth; '
                     f'allowed: {valid_depths}.')
  if width <= 0 or int(64 * width) < 1:
    raise ValueError(f'width={width} must give at least one stem filter '
                     '(int(64 * width) >= 1).')
  if architecture == enums.EncoderArchitecture.RESNEXT:
    inner = 2 * int(64 * width)
    if inner % RESNEXT_GROUPS:
      raise ValueError(
          f'width={width}: ResNeXt splits 2 * int(64 * width) = {inner} '
          f'channels into {RESNEXT_GROUPS} groups, so width must be a '
          'multiple of 0.5.')
  if first_conv_kernel_size < 1 or first_conv_stride < 1:
    raise ValueError(
        f'first_conv_kernel_size={first_conv_kernel_size} and '
        f'first_conv_stride={first_conv_stride} must be positive.')


def feature_dim(depth: int = 50, width: float = 1.0,
                architecture: enums.EncoderArchitecture = (
                    enums.EncoderArchitecture.RESNET_V1)) -> int:
  """Channels of the pooled encoder output: 512*w (basic) or 2048*w."""
  architecture = enums.parse_enum(enums.EncoderArchitecture, architecture)
  last = int(64 * 2**3 * width)
  basic = architecture == enums.EncoderArchitecture.RESNET_V1 and depth < 50
  return last if basic else 4 * last


def build_encoder(
    depth: int = 50,
    width: float = 1.0,
    architecture: Union[enums.EncoderArchitecture, str] = (
        enums.EncoderArchitecture.RESNET_V1),
    first_conv_kernel_size: int = 7,
    first_conv_stride: int = 2,
    use_initial_max_pool: bool = True,
    use_global_batch_norm: bool = True,
    dtype: DTypeLike = None,
    name: str = 'encoder',
    input_shape: Tuple[Optional[int], Optional[int], int] = (None, None, 3),
) -> keras.Model:
  """Builds a ResNet v1 / ResNeXt encoder as a functional Keras model.

  Args:
    depth: One of 18, 34, 50, 101, 152, 200 (ResNeXt: 50 and deeper).
    width: Channel multiplier (ResNeXt: a multiple of 0.5).
    architecture: `EncoderArchitecture` member or its name / value.
    first_conv_kernel_size: Kernel size of the stem convolution (7 ImageNet,
      3 CIFAR).
    first_conv_stride: Stride of the stem convolution (2 ImageNet, 1 CIFAR).
    use_initial_max_pool: 3x3 stride-2 max pool after the stem (ImageNet).
    use_global_batch_norm: Batch-norm moments reduced across all replicas.
    dtype: Dtype policy of every layer (`None` = the global policy, e.g.
      `'mixed_bfloat16'` for bfloat16 compute with float32 variables). The
      final average pool always runs in float32.
    name: Model name.
    input_shape: Shape of one image; spatial sides may be `None`.

  Returns:
    A `keras.Model` mapping images `[batch, h, w, c]` (any float dtype) to
    float32 features `[batch, feature_dim(depth, width, architecture)]`. Call
    it with `training=True` to use (and update) batch statistics.

  Raises:
    ValueError: for an unknown architecture, invalid depth or width.
  """
  architecture = enums.parse_enum(enums.EncoderArchitecture, architecture)
  _validate(architecture, depth, width, first_conv_kernel_size,
            first_conv_stride)
  builder = _Builder(use_global_batch_norm, dtype)
  block = _block_fn(builder, architecture, depth)

  images = keras.Input(shape=input_shape, name='images')
  x = builder.conv(images, int(64 * width), first_conv_kernel_size,
                   first_conv_stride, 'stem_conv')
  x = builder.relu(builder.bn(x, 'stem_bn'), 'stem_relu')
  if use_initial_max_pool:
    x = keras.layers.MaxPooling2D(3, strides=2, padding='same',
                                  name='stem_pool', dtype=dtype)(x)
  for group, num_blocks in enumerate(BLOCK_GROUP_SIZES[depth]):
    filters = int(64 * 2**group * width)
    for i in range(num_blocks):
      x = block(x, filters,
                strides=(1 if group == 0 else 2) if i == 0 else 1,
                use_projection=i == 0,
                name=f'group{group}_block{i}')
  # Averaging thousands of values is done in float32 even under a mixed
  # policy, and gives the heads a float32 embedding.
  features = keras.layers.GlobalAveragePooling2D(
      name='avg_pool', dtype='float32')(x)
  return keras.Model(images, features, name=name)
