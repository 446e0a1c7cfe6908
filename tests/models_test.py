"""Tests of supcon_tf.models: encoders, heads, SupConModel, weight decay.

Known answers (parameter counts of the standard nets, reference layer facts)
and parts-agree tests (multi-view vs per-view, checkpoint round trips, mixed vs
float32). Nets are built at tiny widths and 8-32 px images to stay fast; only
the parameter-count test builds full-width ResNets, without a forward pass.
The MirroredStrategy (global batch norm) tests are in
models_distributed_test.py.
"""

import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import keras  # pylint: disable=g-import-not-at-top
import numpy as np
import pytest
import tensorflow as tf

from supcon_tf import config
from supcon_tf import enums
from supcon_tf import models
from supcon_tf.models import resnet

RESNET_V1 = enums.EncoderArchitecture.RESNET_V1
RESNEXT = enums.EncoderArchitecture.RESNEXT

# A ResNet-18 small enough to build and run in well under a second.
TINY = config.ModelConfig(
    depth=18, width=0.125, first_conv_kernel_size=3, first_conv_stride=1,
    use_initial_max_pool=False, projection_head_layers=(16, 8))
TINY_EMBEDDING_DIM = 64  # 512 * 0.125.
NUM_CLASSES = 5

# torchvision parameter counts minus the 1000-way classifier (fc weights and
# bias); torchvision convolutions have no bias and BN moving statistics are
# buffers, so these are conv kernels + BN gamma/beta.
TORCHVISION_COUNTS = {
    18: 11_689_512 - (512 * 1000 + 1000),
    34: 21_797_672 - (512 * 1000 + 1000),
    50: 25_557_032 - (2048 * 1000 + 1000),
    101: 44_549_160 - (2048 * 1000 + 1000),
    152: 60_192_808 - (2048 * 1000 + 1000),
}
# The reference gives the first block of every group a projection shortcut;
# torchvision's basic-block nets have none in group 0 (64 -> 64 channels).
REFERENCE_EXTRA_BASIC_PROJECTION = 64 * 64 + 2 * 64


def _images(shape, seed=0):
  return np.random.RandomState(seed).rand(*shape).astype(np.float32)


def _count(variables):
  return sum(int(np.prod(v.shape)) for v in variables)


def _tiny_model(seed=0, **overrides):
  keras.utils.set_random_seed(seed)
  model_config = config.ModelConfig(**{**TINY.__dict__, **overrides})
  return models.build_model(model_config, NUM_CLASSES)


def _analytic_param_count(depth, width, architecture):
  """Conv kernels + BN gamma/beta, from the reference's layer list."""
  def conv(k, cin, cout, groups=1):
    return k * k * (cin // groups) * cout

  def bn(channels):
    return 2 * channels

  stem = int(64 * width)
  total = conv(7, 3, stem) + bn(stem)
  cin = stem
  for group, num_blocks in enumerate(resnet.BLOCK_GROUP_SIZES[depth]):
    f = int(64 * 2**group * width)
    for block in range(num_blocks):
      if architecture == RESNEXT:
        out = 4 * f
        total += (conv(1, cin, 2 * f) + bn(2 * f) +
                  conv(3, 2 * f, 2 * f, groups=64) + bn(2 * f) +
                  conv(1, 2 * f, out) + bn(out))
      elif depth < 50:
        out = f
        total += conv(3, cin, f) + bn(f) + conv(3, f, f) + bn(f)
      else:
        out = 4 * f
        total += (conv(1, cin, f) + bn(f) + conv(3, f, f) + bn(f) +
                  conv(1, f, out) + bn(out))
      if block == 0:
        total += conv(1, cin, out) + bn(out)
      cin = out
  return total


# ---------------------------------------------------------------- encoders ---


@pytest.fixture(name='zero_kernels')
def _zero_kernels(monkeypatch):
  """Zero-initialised kernels: counts do not depend on the initialiser, and
  sampling tens of millions of truncated normals dominates the build time."""
  monkeypatch.setattr(resnet, 'conv_kernel_initializer', lambda: 'zeros')


@pytest.mark.parametrize('depth', [18, 50, 101, 152])
def test_parameter_counts_match_standard_resnets(depth, zero_kernels):
  del zero_kernels
  encoder = resnet.build_encoder(depth)
  expected = TORCHVISION_COUNTS[depth]
  if depth < 50:
    expected += REFERENCE_EXTRA_BASIC_PROJECTION
  assert _count(encoder.trainable_variables) == expected
  assert _analytic_param_count(depth, 1.0, RESNET_V1) == expected
  # Moving mean and variance: as many as gamma and beta.
  bn_params = _count(v for layer in encoder.layers
                     if isinstance(layer, keras.layers.BatchNormalization)
                     for v in layer.trainable_variables)
  assert _count(encoder.non_trainable_variables) == bn_params
  assert encoder.output_shape == (None, 512 if depth < 50 else 2048)


def test_resnet50_parameter_count_is_the_published_one():
  assert TORCHVISION_COUNTS[50] == 23_508_032


@pytest.mark.parametrize('architecture,depth,width', [
    (RESNEXT, 50, 0.5), (RESNEXT, 200, 0.5), (RESNET_V1, 34, 0.25),
    (RESNET_V1, 50, 0.75)])
def test_parameter_counts_match_layer_list(architecture, depth, width,
                                           zero_kernels):
  del zero_kernels
  encoder = resnet.build_encoder(depth, width, architecture)
  assert _count(encoder.trainable_variables) == _analytic_param_count(
      depth, width, architecture)


_ALL_ENCODERS = ([(RESNET_V1, d) for d in resnet.BLOCK_GROUP_SIZES] +
                 [(RESNEXT, d) for d in resnet.RESNEXT_DEPTHS])
# In eager mode on CPU Keras XLA-compiles every grouped convolution call on its
# own (seconds per block), so the deepest ResNeXts are checked symbolically;
# ResNeXt-50/101 run the same blocks for real.
_SYMBOLIC_ONLY = {(RESNEXT, 152), (RESNEXT, 200)}


def _check_features(encoder, batch, dim, run):
  if run:
    features = encoder(_images((batch, 32, 32, 3)), training=False)
    assert features.dtype == tf.float32
    assert features.shape == (batch, dim)
  else:
    spec = encoder.compute_output_spec(
        keras.KerasTensor((batch, 32, 32, 3), 'float32'))
    assert spec.shape == (batch, dim) and spec.dtype == 'float32'


def _last_feature_map_side(encoder, depth):
  """Side of the last block's output for 32 px images (symbolic)."""
  last = encoder.get_layer(
      f'group3_block{resnet.BLOCK_GROUP_SIZES[depth][3] - 1}_out')
  feature_map = keras.Model(encoder.inputs, last.output)
  spec = feature_map.compute_output_spec(
      keras.KerasTensor((1, 32, 32, 3), 'float32'))
  assert spec.shape[1] == spec.shape[2]
  return spec.shape[1]


@pytest.mark.parametrize('architecture,depth', _ALL_ENCODERS)
def test_output_shapes_every_depth(architecture, depth):
  width = 0.5 if architecture == RESNEXT else 0.25
  dim = models.feature_dim(depth, width, architecture)
  assert dim == (512 if depth < 50 and architecture == RESNET_V1
                 else 2048) * width
  encoder = resnet.build_encoder(depth, width, architecture)
  assert encoder.output_shape == (None, dim)
  _check_features(encoder, 2, dim,
                  run=(architecture, depth) not in _SYMBOLIC_ONLY)


# The stem does not interact with the depth: both stems on each block type.
@pytest.mark.parametrize('architecture,depth', [
    (RESNET_V1, 18), (RESNET_V1, 34), (RESNET_V1, 50), (RESNEXT, 50)])
@pytest.mark.parametrize('stem', ['imagenet', 'cifar'])
def test_output_shapes_both_stems(architecture, depth, stem):
  width = 0.5 if architecture == RESNEXT else 0.25
  dim = models.feature_dim(depth, width, architecture)
  imagenet = stem == 'imagenet'
  encoder = resnet.build_encoder(
      depth, width, architecture,
      first_conv_kernel_size=7 if imagenet else 3,
      first_conv_stride=2 if imagenet else 1,
      use_initial_max_pool=imagenet)
  assert ('stem_pool' in [l.name for l in encoder.layers]) == imagenet
  assert encoder.get_layer('stem_conv').kernel_size == (
      (7, 7) if imagenet else (3, 3))
  # 32 px: /32 with the ImageNet stem (1x1 at the end), /8 with CIFAR's.
  assert _last_feature_map_side(encoder, depth) == (1 if imagenet else 4)
  _check_features(encoder, 2, dim, run=True)


def test_odd_image_sizes_and_architecture_names():
  encoder = resnet.build_encoder(18, 0.125, 'resnet_v1')
  assert encoder(_images((1, 33, 27, 3)), training=False).shape == (1, 64)
  encoder = resnet.build_encoder(50, 0.25, 'r1')  # Enum value also accepted.
  assert encoder(_images((1, 17, 17, 3)), training=False).shape == (1, 512)
  encoder = resnet.build_encoder(50, 0.5, 'RESNEXT', use_initial_max_pool=False)
  assert encoder.output_shape == (None, 1024)


@pytest.mark.parametrize('kwargs,message', [
    (dict(depth=42), 'depth=42'),
    (dict(depth=18, architecture=RESNEXT), 'depth=18'),
    (dict(depth=50, width=0.25, architecture=RESNEXT), 'multiple of 0.5'),
    (dict(depth=50, width=0.0), 'width'),
    (dict(depth=50, architecture='bogus'), 'bogus'),
])
def test_invalid_encoder_arguments_raise(kwargs, message):
  with pytest.raises(ValueError, match=message):
    resnet.build_encoder(**kwargs)


def test_reference_layer_facts():
  encoder = resnet.build_encoder(50, 0.25)
  layer = encoder.get_layer
  # Bottleneck stride on the 3x3 ("v1.5"), explicit padding before it.
  assert layer('group1_block0_conv1').strides == (1, 1)
  assert layer('group1_block0_conv2').strides == (2, 2)
  assert layer('group1_block0_conv2').padding == 'valid'
  assert layer('group1_block0_conv2_pad').padding == ((1, 1), (1, 1))
  assert layer('group1_block0_proj_conv').strides == (2, 2)
  assert layer('group1_block1_conv2').padding == 'same'
  stem_pad = layer('stem_conv_pad').padding
  assert stem_pad == ((3, 3), (3, 3))
  assert not layer('stem_conv').use_bias
  # Projection shortcut in the first block of every group only.
  names = [l.name for l in encoder.layers]
  assert 'group0_block0_proj_conv' in names
  assert 'group0_block1_proj_conv' not in names
  # Batch norm hyperparameters; zero gamma at the end of each residual branch.
  bn = layer('group2_block3_bn1')
  assert (bn.momentum, bn.epsilon, bn.synchronized) == (0.9, 1e-5, True)
  assert np.all(layer('group2_block3_bn1').gamma.numpy() == 1)
  assert np.all(layer('group2_block3_bn3').gamma.numpy() == 0)
  # Fan-in truncated normal kernels.
  init = layer('stem_conv').kernel_initializer
  assert isinstance(init, keras.initializers.VarianceScaling)
  assert (init.scale, init.mode, init.distribution) == (
      1.0, 'fan_in', 'truncated_normal')
  # ResNeXt: 2x-wide 64-group 3x3, gamma not zero-initialised.
  resnext = resnet.build_encoder(50, 0.5, RESNEXT)
  conv2 = resnext.get_layer('group0_block0_conv2')
  assert (conv2.groups, conv2.filters) == (64, 64)
  assert np.all(resnext.get_layer('group0_block0_bn3').gamma.numpy() == 1)
  # Basic block: zero gamma on the second batch norm.
  basic = resnet.build_encoder(18, 0.125, use_global_batch_norm=False)
  assert np.all(basic.get_layer('group0_block0_bn2').gamma.numpy() == 0)
  assert not basic.get_layer('group0_block0_bn2').synchronized


def test_encoder_config_round_trip():
  keras.utils.set_random_seed(0)
  encoder = resnet.build_encoder(18, 0.25, RESNET_V1, 3, 1, False,
                                 dtype='mixed_bfloat16')
  clone = keras.Model.from_config(encoder.get_config())
  clone.set_weights(encoder.get_weights())
  images = _images((2, 8, 8, 3))
  np.testing.assert_array_equal(clone(images, training=False),
                                encoder(images, training=False))
  assert clone.get_layer('stem_conv').dtype_policy.name == 'mixed_bfloat16'
  resnext = resnet.build_encoder(50, 0.5, RESNEXT)
  clone = keras.Model.from_config(resnext.get_config())
  assert clone.get_config() == resnext.get_config()
  assert clone.get_layer('group0_block0_conv2').groups == 64
  assert isinstance(clone.get_layer('stem_bn'), resnet.BatchNormalization)


# ------------------------------------------------------------------- heads ---


def test_projection_head_layout_and_unit_norm():
  head = models.ProjectionHead((32, 16, 8))
  out = head(_images((4, 12)))
  assert out.shape == (4, 8) and out.dtype == tf.float32
  np.testing.assert_allclose(np.linalg.norm(out, axis=-1), 1.0, rtol=1e-5)
  dense = [l for l in head.sublayers if isinstance(l, keras.layers.Dense)]
  assert [d.units for d in dense] == [32, 16, 8]
  assert [d.use_bias for d in dense] == [True, True, False]
  assert [type(l).__name__ for l in head.sublayers] == [
      'Dense', 'ReLU', 'Dense', 'ReLU', 'Dense']
  assert np.std(dense[0].kernel.numpy()) == pytest.approx(0.01, rel=0.2)


@pytest.mark.parametrize('beta', [True, False])
def test_projection_head_batch_norm_options(beta):
  head = models.ProjectionHead((32, 8), use_batch_norm=True,
                               use_batch_norm_beta=beta)
  head.build((None, 12))
  dense_0, bn, _, _ = head.sublayers
  assert not dense_0.use_bias  # Batch norm follows: no bias.
  assert isinstance(bn, keras.layers.BatchNormalization)
  assert bn.center == beta and bn.scale
  assert len(bn.trainable_variables) == (2 if beta else 1)


def test_projection_head_without_layers_normalizes_input():
  x = _images((3, 6))
  out = models.ProjectionHead(())(x)
  np.testing.assert_allclose(out, x / np.linalg.norm(x, axis=-1,
                                                     keepdims=True), rtol=1e-6)


def test_heads_reject_non_rank_2_inputs():
  with pytest.raises(ValueError, match='rank 2'):
    models.ProjectionHead((4,))(_images((2, 3, 4)))
  with pytest.raises(ValueError, match='rank 2'):
    models.ClassificationHead(3)(_images((2, 3, 4)))


def test_classification_head_initialisation():
  x = _images((4, 12))
  zero = models.ClassificationHead(7, zero_initialize=True)
  np.testing.assert_array_equal(zero(x), np.zeros((4, 7)))
  glorot = models.ClassificationHead(7)
  assert glorot(x).shape == (4, 7)
  assert np.abs(glorot.dense.kernel.numpy()).max() > 0
  np.testing.assert_array_equal(glorot.dense.bias.numpy(), np.zeros(7))


def test_heads_config_round_trip():
  x = _images((4, 12))
  for head in (models.ProjectionHead((16, 8), use_batch_norm=True,
                                     use_batch_norm_beta=False),
               models.ClassificationHead(3, zero_initialize=True)):
    head(x)
    clone = type(head).from_config(head.get_config())
    clone.build((None, 12))
    clone.set_weights(head.get_weights())
    assert clone.get_config() == head.get_config()
    np.testing.assert_array_equal(clone(x), head(x))


# ------------------------------------------------------------ SupConModel ---


def test_model_outputs_dict_of_float32():
  model = _tiny_model()
  out = model(_images((2, 8, 8, 3)), training=True)
  assert set(out) == set(models.OUTPUT_KEYS) == {
      'embedding', 'normalized_embedding', 'projection', 'logits'}
  shapes = {models.EMBEDDING: (2, TINY_EMBEDDING_DIM),
            models.NORMALIZED_EMBEDDING: (2, TINY_EMBEDDING_DIM),
            models.PROJECTION: (2, 8), models.LOGITS: (2, NUM_CLASSES)}
  for key, shape in shapes.items():
    assert out[key].shape == shape and out[key].dtype == tf.float32, key
  for key in (models.NORMALIZED_EMBEDDING, models.PROJECTION):
    np.testing.assert_allclose(np.linalg.norm(out[key], axis=-1), 1.0,
                               rtol=1e-5)
  np.testing.assert_allclose(
      out[models.NORMALIZED_EMBEDDING],
      tf.nn.l2_normalize(out[models.EMBEDDING], axis=-1), rtol=1e-6)
  assert model.encoder is not None
  assert isinstance(model.projection_head, models.ProjectionHead)
  assert isinstance(model.classification_head, models.ClassificationHead)


def test_multi_view_equals_per_view_calls():
  model = _tiny_model()
  images = _images((3, 2, 8, 8, 3))
  out = model(images, training=False)
  for key in models.OUTPUT_KEYS:
    assert out[key].shape[:2] == (3, 2)
  for view in range(2):
    per_view = model(images[:, view], training=False)
    for key in models.OUTPUT_KEYS:
      np.testing.assert_allclose(out[key][:, view], per_view[key], rtol=1e-5,
                                 atol=1e-6, err_msg=key)


def test_multi_view_is_one_encoder_batch_in_training():
  # In training mode batch norm must see all batch * views images at once,
  # sample-major, exactly as if they had been stacked by hand.
  model = _tiny_model()
  images = _images((3, 2, 8, 8, 3))
  out = model(images, training=True)
  flat = model(images.reshape(6, 8, 8, 3), training=True)
  for key in models.OUTPUT_KEYS:
    np.testing.assert_allclose(
        out[key], np.reshape(flat[key], (3, 2, -1)), rtol=1e-5, atol=1e-6)
  # ...and differs from running each view as its own batch.
  view_0 = model(images[:, 0], training=True)[models.EMBEDDING]
  assert np.abs(out[models.EMBEDDING][:, 0] - view_0).max() > 1e-4


def test_model_rejects_bad_rank():
  with pytest.raises(ValueError, match='rank|views'):
    _tiny_model()(_images((8, 8, 3)))


def _encoder_grads(model, output_key, images):
  with tf.GradientTape() as tape:
    out = model(images, training=True)
    loss = tf.reduce_sum(out[output_key] * tf.range(
        1.0, 1.0 + out[output_key].shape[-1]))
  return tape.gradient(loss, model.encoder.trainable_variables)


def test_stop_gradient_before_classification_head():
  images = _images((2, 8, 8, 3))
  stopped = _tiny_model()  # Config default: stop gradient (reference).
  assert stopped.stop_gradient_before_classification_head
  assert all(g is None for g in _encoder_grads(stopped, models.LOGITS, images))
  # The classifier itself still learns.
  with tf.GradientTape() as tape:
    loss = tf.reduce_sum(stopped(images, training=True)[models.LOGITS])
  grads = tape.gradient(loss, stopped.classification_head.trainable_variables)
  assert all(g is not None and np.abs(g).max() > 0 for g in grads)
  # Without the stop, the gradient reaches the encoder.
  joint = _tiny_model(stop_gradient_before_classification_head=False,
                      zero_initialize_classifier=False)
  grads = _encoder_grads(joint, models.LOGITS, images)
  assert all(g is not None for g in grads)
  assert max(np.abs(g).max() for g in grads) > 0


def test_stop_gradient_before_projection_head():
  images = _images((2, 8, 8, 3))
  flowing = _tiny_model()
  grads = _encoder_grads(flowing, models.PROJECTION, images)
  assert max(np.abs(g).max() for g in grads) > 0
  stopped = _tiny_model(stop_gradient_before_projection_head=True)
  assert all(g is None
             for g in _encoder_grads(stopped, models.PROJECTION, images))


def test_normalize_embedding_option_feeds_heads():
  images = _images((2, 8, 8, 3))
  for normalize in (True, False):
    model = _tiny_model(normalize_embedding=normalize)
    out = model(images, training=False)
    head_input = out[models.NORMALIZED_EMBEDDING if normalize
                     else models.EMBEDDING]
    np.testing.assert_allclose(model.classification_head(head_input),
                               out[models.LOGITS], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model.projection_head(head_input),
                               out[models.PROJECTION], rtol=1e-5, atol=1e-6)


def test_build_model_follows_config():
  model = _tiny_model(projection_head_layers=(32, 16, 4),
                      zero_initialize_classifier=True,
                      use_projection_batch_norm=True,
                      use_projection_batch_norm_beta=False)
  out = model(_images((2, 8, 8, 3)), training=False)
  assert out[models.PROJECTION].shape == (2, 4)
  np.testing.assert_array_equal(out[models.LOGITS], np.zeros((2, 5)))
  bns = [l for l in model.projection_head.sublayers
         if isinstance(l, keras.layers.BatchNormalization)]
  assert len(bns) == 2 and not any(bn.center for bn in bns)
  assert model.encoder_compute_dtype == 'float32'


def test_eval_mode_batch_norm_is_deterministic_and_per_sample():
  model = _tiny_model()
  images = _images((4, 8, 8, 3))
  model(images, training=True)  # Move the moving statistics off their init.
  first = model(images, training=False)
  again = model(images, training=False)
  alone = model(images[:1], training=False)
  for key in models.OUTPUT_KEYS:
    np.testing.assert_array_equal(first[key], again[key])
    np.testing.assert_allclose(first[key][:1], alone[key], rtol=1e-5,
                               atol=1e-6)
  # Training mode uses batch statistics: the result depends on the batch.
  train_all = model(images, training=True)[models.EMBEDDING]
  train_one = model(images[:2], training=True)[models.EMBEDDING]
  assert np.abs(train_all[:2] - train_one).max() > 1e-4


def test_training_updates_moving_statistics_with_momentum_0_9():
  model = _tiny_model()
  images = _images((4, 8, 8, 3))
  stem_bn = model.encoder.get_layer('stem_bn')
  stem_conv = model.encoder.get_layer('stem_conv')
  model(images, training=True)
  activations = stem_conv(images).numpy()
  expected = 0.1 * activations.mean(axis=(0, 1, 2))  # 0.9 * 0 + 0.1 * mean.
  np.testing.assert_allclose(stem_bn.moving_mean.numpy(), expected, rtol=1e-4,
                             atol=1e-6)


def test_model_config_round_trip():
  model = _tiny_model(use_projection_batch_norm=True,
                      stop_gradient_before_projection_head=True)
  clone = models.SupConModel.from_config(model.get_config())
  clone.build((None, None, None, 3))
  clone.set_weights(model.get_weights())
  assert clone.stop_gradient_before_projection_head
  images = _images((2, 8, 8, 3))
  for training in (False, True):
    a = model(images, training=training)
    b = clone(images, training=training)
    for key in models.OUTPUT_KEYS:
      np.testing.assert_array_equal(a[key], b[key])


def test_checkpoint_round_trip_whole_model(tmp_path):
  model = _tiny_model(seed=1)
  images = _images((2, 8, 8, 3))
  model(images, training=True)  # Non-trivial moving statistics.
  path = tf.train.Checkpoint(model=model).save(str(tmp_path / 'ckpt'))
  restored = _tiny_model(seed=2)
  status = tf.train.Checkpoint(model=restored).restore(path)
  status.assert_existing_objects_matched()
  for training in (False, True):
    a = model(images, training=training)
    b = restored(images, training=training)
    for key in models.OUTPUT_KEYS:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_checkpoint_parts_for_warm_start(tmp_path):
  source = _tiny_model(seed=1)
  images = _images((2, 8, 8, 3))
  source(images, training=True)
  expected = source(images, training=False)
  # 1. A checkpoint of the encoder alone.
  encoder_path = tf.train.Checkpoint(encoder=source.encoder).save(
      str(tmp_path / 'encoder'))
  target = _tiny_model(seed=2)
  tf.train.Checkpoint(encoder=target.encoder).restore(
      encoder_path).assert_existing_objects_matched()
  out = target(images, training=False)
  np.testing.assert_array_equal(out[models.EMBEDDING],
                                expected[models.EMBEDDING])
  assert np.abs(out[models.LOGITS] - expected[models.LOGITS]).max() > 0
  # 2. The encoder and projection head out of a whole-model checkpoint.
  model_path = tf.train.Checkpoint(model=source).save(str(tmp_path / 'model'))
  target = _tiny_model(seed=3)
  parts = tf.train.Checkpoint(encoder=target.encoder,
                              projection_head=target.projection_head)
  tf.train.Checkpoint(model=parts).restore(model_path).expect_partial()
  out = target(images, training=False)
  for key in (models.EMBEDDING, models.PROJECTION):
    np.testing.assert_array_equal(out[key], expected[key])
  assert np.abs(out[models.LOGITS] - expected[models.LOGITS]).max() > 0


# ------------------------------------------------------- mixed precision ---


def test_mixed_precision_policy_on_cpu():
  if tf.config.list_physical_devices('GPU'):
    pytest.skip('CPU-only expectation')
  assert models.mixed_precision_policy() == 'mixed_bfloat16'


def test_mixed_precision_model():
  global_policy = keras.config.dtype_policy().name
  keras.utils.set_random_seed(0)
  mixed = models.build_model(TINY, NUM_CLASSES, mixed_precision=True)
  assert keras.config.dtype_policy().name == global_policy  # Untouched.
  assert mixed.encoder_compute_dtype == 'bfloat16'
  assert mixed.encoder.get_layer('stem_conv').dtype_policy.name == (
      'mixed_bfloat16')
  assert mixed.projection_head.sublayers[0].compute_dtype == 'bfloat16'
  assert all(v.dtype == 'float32' for v in mixed.variables)
  images = _images((2, 2, 8, 8, 3))
  with tf.GradientTape() as tape:
    out = mixed(images, training=True)
    loss = tf.reduce_sum(out[models.PROJECTION][..., 0])
  assert all(v.dtype == tf.float32 for v in out.values())
  grads = tape.gradient(loss, mixed.trainable_variables)
  assert all(g is None or g.dtype == tf.float32 for g in grads)
  # Close to float32 with the same weights.
  full = models.build_model(TINY, NUM_CLASSES)
  full.set_weights(mixed.get_weights())
  reference = full(images, training=False)
  out = mixed(images, training=False)
  cosine = np.sum(out[models.NORMALIZED_EMBEDDING] *
                  reference[models.NORMALIZED_EMBEDDING], axis=-1)
  assert cosine.min() > 0.99


# ---------------------------------------------------------- weight decay ---


def _ids(variables):
  return {id(v) for v in variables}


def _bn_ids(module):
  # pylint: disable=protected-access
  return _ids(v for l in module._flatten_layers(recursive=True)
              if isinstance(l, keras.layers.BatchNormalization)
              for v in l.weights)


def test_weight_decay_selection_by_sub_module():
  model = _tiny_model(use_projection_batch_norm=True,
                      projection_head_layers=(16, 16, 8))
  conv_kernels = [l.kernel for l in model.encoder.layers
                  if isinstance(l, keras.layers.Conv2D)]
  assert len(conv_kernels) == 1 + 2 * 8 + 4  # Stem, blocks, projections.
  proj_kernels = [l.kernel for l in model.projection_head.sublayers
                  if isinstance(l, keras.layers.Dense)]
  classifier = model.classification_head.dense

  selected = models.weight_decay_variables(model)
  assert _ids(selected) == _ids(conv_kernels + proj_kernels)
  assert len(selected) == len(_ids(selected))  # No duplicates.
  assert not _ids(selected) & _bn_ids(model)

  selected = models.weight_decay_variables(
      model, use_encoder=False, use_projection_head=False,
      use_classification_head=True)
  assert _ids(selected) == _ids([classifier.kernel, classifier.bias])
  selected = models.weight_decay_variables(
      model, use_encoder=False, use_projection_head=False,
      use_classification_head=True, include_bias=False)
  assert _ids(selected) == _ids([classifier.kernel])
  assert not models.weight_decay_variables(
      model, use_encoder=False, use_projection_head=False)


def test_weight_decay_biases_of_projection_head():
  model = _tiny_model()  # No projection batch norm: dense_0 has a bias.
  dense_0, _, dense_1 = model.projection_head.sublayers
  with_bias = models.weight_decay_variables(model, use_encoder=False)
  assert _ids(with_bias) == _ids([dense_0.kernel, dense_0.bias,
                                  dense_1.kernel])
  without = models.weight_decay_variables(model, use_encoder=False,
                                          include_bias=False)
  assert _ids(without) == _ids([dense_0.kernel, dense_1.kernel])


def test_weight_decay_skips_frozen_parts():
  model = _tiny_model()
  model.encoder.trainable = False
  selected = models.weight_decay_variables(model)
  assert not _ids(selected) & _ids(model.encoder.weights)


def test_l2_weight_decay_is_sum_of_half_squares():
  model = _tiny_model()
  variables = models.weight_decay_variables(model)
  expected = sum(0.5 * np.sum(np.square(v.numpy().astype(np.float64)))
                 for v in variables)
  value = models.l2_weight_decay(variables)
  assert value.dtype == tf.float32 and value.shape == ()
  assert float(value) == pytest.approx(expected, rel=1e-5)
  assert float(models.l2_weight_decay([])) == 0.0
  # Differentiable: the gradient of sum(l2_loss) is the variable itself.
  with tf.GradientTape() as tape:
    value = models.l2_weight_decay(variables[:2])
  grads = tape.gradient(value, variables[:2])
  for g, v in zip(grads, variables[:2]):
    np.testing.assert_allclose(g, v.numpy(), rtol=1e-6)
