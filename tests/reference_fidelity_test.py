"""Training-time behaviours that must match the reference release (issue 18).

Each test fails on the behaviour before the fix: single-view stages were not
blurred, the deferred blur drew one sigma per image, Contrast blended toward
the mean grey level, stage 2 warm-started from --reference_ckpt again,
update_encoder_batch_norm=False left the projection head's statistics moving,
MOMENTUM / NESTEROV were Keras SGD, ResNeXt's strided grouped conv padded
explicitly, and --hparams, --keep_checkpoint_interval_secs and
--mode=continuous_eval did not exist. Tiny models (ResNet-18 at width 0.25 on
16 px digits), a few steps each.
"""

import os

from absl import flags
import keras
import numpy as np
import pytest
import tensorflow as tf

from supcon_tf import config as config_lib
from supcon_tf import enums
from supcon_tf import models
from supcon_tf import optim
from supcon_tf import reference_hparams
from supcon_tf.data import augment as A
from supcon_tf.data import datasets
from supcon_tf.evaluation import continuous
from supcon_tf.models import resnet
from supcon_tf.training import trainer as train
from tests.train_test import ONE_DEVICE, tiny_config


# --- 1. Deferred blur in single-view stages ----------------------------------


def test_single_view_stage_with_deferred_blur_blurs(tmp_path):
  # Cross-entropy in stage 1: one view, as stage 2 and the CE baselines.
  config = tiny_config(
      tmp_path, stage_1__contrastive_loss_weight=0.0,
      stage_1__cross_entropy_loss_weight=1.0, augment__blur_probability=1.0,
      augment__defer_blurring=True)
  trainer = train.Trainer(config, ONE_DEVICE, 1)
  assert trainer.plan.num_views == 1
  assert trainer.step.defer_blur
  # 32 px: the reference's kernel (side // 10 taps) is 1 tap below 20 px.
  images = np.random.RandomState(0).rand(4, 1, 32, 32, 3).astype(np.float32)
  blurred = trainer.step.blur(tf.constant(images)).numpy()
  assert blurred.shape == images.shape
  assert np.all(np.abs(blurred - images).max(axis=(1, 2, 3, 4)) > 0.01)


# --- 2. One blur sigma per per-core batch ------------------------------------


def _copies(n=6, size=32):
  image = np.random.RandomState(1).rand(size, size, 3).astype(np.float32)
  return tf.constant(np.stack([image] * n))


def test_deferred_blur_shares_one_sigma_per_batch():
  images = _copies()
  blurred = A.batch_random_blur(images, 1., seed=[3, 4]).numpy()
  # Identical inputs blurred with one sigma give identical outputs ...
  for b in blurred[1:]:
    np.testing.assert_array_equal(b, blurred[0])
  # ... a Gaussian blur of some sigma in [0.1, 2]: find it on a grid.
  errors = [np.abs(A.gaussian_blur(images[0], s).numpy() - blurred[0]).max()
            for s in np.linspace(0.1, 2.0, 400)]
  assert min(errors) < 2e-3
  # Per image (ours, --blur_sigma_per_image): different sigmas.
  per_image = A.batch_random_blur(images, 1., seed=[3, 4],
                                  sigma_per_image=True).numpy()
  assert np.abs(per_image - per_image[:1]).max() > 1e-3


def test_train_step_blurs_all_views_with_one_sigma(tmp_path):
  config = tiny_config(tmp_path, augment__blur_probability=1.0,
                       augment__defer_blurring=True, stage_2__epochs=0)
  trainer = train.Trainer(config, ONE_DEVICE, 1)
  assert trainer.plan.num_views == 2
  views = tf.reshape(_copies(8), [4, 2, 32, 32, 3])
  blurred = trainer.step.blur(views).numpy().reshape(8, 32, 32, 3)
  assert np.abs(blurred[0] - views[0, 0]).max() > 0.01
  for b in blurred[1:]:
    np.testing.assert_array_equal(b, blurred[0])


# --- 3. The reference library's Contrast -------------------------------------


def _library_contrast(image_uint8, factor):
  """NumPy transcription of the Model Garden `contrast` (float output)."""
  h, w = image_uint8.shape[:2]
  hist_sum = float(h * w)  # sum(histogram_fixed_width(gray, nbins=256))
  mean = np.uint8(np.clip(hist_sum / 256.0, 0., 255.))  # cast truncates
  degenerate = np.full_like(image_uint8, mean).astype(np.float32)
  out = degenerate + factor * (image_uint8.astype(np.float32) - degenerate)
  return np.clip(out, 0., 255.)  # blend() clips for factor > 1


@pytest.mark.parametrize('size,factor', [(16, 1.9), (32, 0.46), (224, 1.9),
                                         (40, 1.54)])
def test_reference_contrast_matches_the_library_formula(size, factor):
  rng = np.random.RandomState(size)
  image = rng.randint(0, 256, [size, size + 3, 3]).astype(np.uint8)
  got = A.reference_contrast(tf.constant(image / 255., tf.float32), factor)
  # The library then truncates to uint8; our pixels stay float.
  np.testing.assert_allclose(got.numpy() * 255.,
                             _library_contrast(image, factor), atol=1e-3)


def test_contrast_known_answers_reference_and_pil():
  # A constant grey-100 32x32 image: the library blends toward 32*32/256 = 4
  # whatever the content; PIL toward the mean (100), which leaves it alone.
  image = tf.fill([32, 32, 3], 100. / 255.)
  reference = A.apply_augment_op(image, 'Contrast', 10.).numpy()
  np.testing.assert_allclose(reference * 255., 4 + 1.9 * 96, atol=1e-3)
  pil = A.apply_augment_op(image, 'Contrast', 10., pil_contrast=True).numpy()
  # (rgb_to_grayscale's weights sum to 0.9999.)
  np.testing.assert_allclose(pil * 255., 100., atol=0.02)
  # The example: a dark 224 px image at magnitude 10.
  dark = tf.constant(np.random.RandomState(0).uniform(
      0, 80 / 255., [224, 224, 3]).astype(np.float32))
  ref_mean = A.reference_contrast(dark, 1.9).numpy().mean() * 255.
  pil_mean = A.contrast(dark, 1.9).numpy().mean() * 255.
  assert ref_mean < 20 < 35 < pil_mean


def test_policies_use_the_selected_contrast():
  # RandAugment with one layer at magnitude 10 (factor 1.9): the two settings
  # differ exactly where Contrast was drawn, and then by the two ops.
  image = tf.fill([32, 32, 3], 100. / 255.)
  drawn = 0
  for seed in range(30):
    ref, pil = (A.randaugment(image, 1, 10., seed=[seed, 7],
                              pil_contrast=p).numpy() for p in (False, True))
    if np.allclose(ref, pil):
      continue
    drawn += 1
    np.testing.assert_allclose(ref, A.reference_contrast(image, 1.9),
                               atol=1e-6)
    np.testing.assert_allclose(pil, A.contrast(image, 1.9), atol=1e-6)
  assert drawn > 0


# --- 4. Stage 2 keeps stage 1's training when warm-starting ------------------


def _write_model_checkpoint(config, prefix):
  """A checkpoint of a freshly initialised model (as training writes)."""
  info = datasets.get_dataset_info(config.data)
  model = models.build_experiment_model(config, info.num_classes)
  tf.train.Checkpoint(model=model).write(prefix)
  return model


def test_stage_2_warm_start_keeps_stage_1_weights(tmp_path):
  config = tiny_config(tmp_path / 'run')
  reference = _write_model_checkpoint(config, str(tmp_path / 'ref' / 'ckpt-1'))
  config = config.replace(warm_start__reference_ckpt=str(tmp_path / 'ref'),
                          warm_start__warm_start_encoder=True)
  # Stage 1 ran in this model_dir (warm-started, then trained: other weights).
  stage_1 = _write_model_checkpoint(
      config, str(tmp_path / 'run' / 'pretrain' / 'ckpt-2'))
  stage_2 = train.Trainer(config, ONE_DEVICE, 2)
  assert stage_2.restore_or_initialize() == 0
  for s, r, w in zip(stage_1.encoder.weights, reference.encoder.weights,
                     stage_2.model.encoder.weights):
    np.testing.assert_array_equal(w.numpy(), s.numpy())
  assert any(not np.array_equal(s.numpy(), r.numpy())
             for s, r in zip(stage_1.encoder.weights, reference.encoder.weights))
  # Without a stage-1 checkpoint, stage 2 warm-starts from the reference.
  alone = train.Trainer(config.replace(
      runtime__model_dir=str(tmp_path / 'alone')), ONE_DEVICE, 2)
  alone.restore_or_initialize()
  for r, w in zip(reference.encoder.weights, alone.model.encoder.weights):
    np.testing.assert_array_equal(w.numpy(), r.numpy())


# --- 5. update_encoder_batch_norm=False freezes every BN statistic ----------


def test_frozen_batch_norm_keeps_every_moving_statistic(tmp_path):
  config = tiny_config(tmp_path, stage_1__update_encoder_batch_norm=False,
                       model__use_projection_batch_norm=True,
                       runtime__max_train_steps=1, stage_2__epochs=0)
  trainer = train.Trainer(config, ONE_DEVICE, 1)
  moving = [v for v in trainer.model.variables
            if 'moving' in v.path]
  assert any('projection' in v.path for v in moving), [v.path for v in moving]
  before = [v.numpy() for v in moving]
  # One real step of the stage (eager: the same per-replica step as train()).
  images = tf.random.stateless_uniform([16, 2, 16, 16, 3], [0, 1])
  labels = tf.range(16) % 10
  ONE_DEVICE.run(trainer.step, args=(images, labels))
  assert int(trainer.optimizer.iterations.numpy()) == 1
  for v, b in zip(moving, before):
    np.testing.assert_array_equal(v.numpy(), b, err_msg=v.path)


# --- 6. TF1 MomentumOptimizer ------------------------------------------------


def _numpy_tf1_momentum(w, grads, rates, momentum=0.9, nesterov=False):
  accum = np.zeros_like(w)
  for g, lr in zip(grads, rates):
    accum = momentum * accum + g
    w = w - lr * (g + momentum * accum if nesterov else accum)
  return w


@pytest.mark.parametrize('nesterov', [False, True])
def test_tf1_momentum_matches_numpy_over_a_warmup(nesterov):
  # The reference's linear warmup (4 steps to 0.4), then constant.
  schedule = optim.build_schedule(
      config_lib.StageConfig(epochs=2, warmup_epochs=1, base_learning_rate=0.4,
                             learning_rate_decay=enums.DecayType.NO_DECAY),
      global_batch_size=256, steps_per_epoch=4)
  rates = [float(schedule(step)) for step in range(7)]
  assert rates[0] < rates[1] < rates[3] and rates[4] == rates[6]
  rng = np.random.RandomState(0)
  w0 = rng.randn(3, 2).astype(np.float32)
  grads = [rng.randn(3, 2).astype(np.float32) for _ in rates]
  stage = config_lib.StageConfig(
      optimizer=(enums.Optimizer.NESTEROV if nesterov else
                 enums.Optimizer.MOMENTUM))
  results = {}
  for keras_momentum in (False, True):
    optimizer = optim.build_optimizer(
        config_lib.StageConfig(**{**stage.__dict__,
                                  'keras_momentum': keras_momentum}),
        schedule)
    assert isinstance(optimizer, keras.optimizers.SGD) == keras_momentum
    w = tf.Variable(w0)
    for g in grads:
      optimizer.apply_gradients([(tf.constant(g), w)])
    results[keras_momentum] = w.numpy()
  np.testing.assert_allclose(
      results[False], _numpy_tf1_momentum(w0, grads, rates, nesterov=nesterov),
      rtol=1e-5, atol=1e-6)
  # Keras SGD keeps the rate inside the velocity: not the same while it
  # changes.
  assert np.abs(results[True] - results[False]).max() > 1e-3


def test_tf1_momentum_equals_keras_sgd_at_a_constant_rate():
  rng = np.random.RandomState(1)
  w0 = rng.randn(4).astype(np.float32)
  grads = [rng.randn(4).astype(np.float32) for _ in range(5)]
  out = []
  for opt in (optim.TF1Momentum(0.1, use_nesterov=True),
              keras.optimizers.SGD(0.1, momentum=0.9, nesterov=True)):
    w = tf.Variable(w0)
    for g in grads:
      opt.apply_gradients([(tf.constant(g), w)])
    out.append(w.numpy())
  np.testing.assert_allclose(out[0], out[1], rtol=1e-5, atol=1e-6)


# --- 7. ResNeXt strided grouped convolution pads SAME ------------------------


def test_resnext_strided_grouped_conv_pads_same():
  encoder = resnet.build_encoder(50, 0.5, 'RESNEXT',
                                 use_initial_max_pool=False)
  layers = {l.name: l for l in encoder.layers}
  grouped = [l for l in encoder.layers
             if isinstance(l, keras.layers.Conv2D) and l.groups > 1]
  strided = [l for l in grouped if l.strides[0] > 1]
  assert strided and all(l.padding == 'same' for l in grouped)
  assert not any(l.name + '_pad' in layers for l in grouped)
  # Known answer on an even side: SAME puts the extra zero row at the end.
  layer = strided[0]
  x = tf.random.stateless_normal([1, 8, 8, layer.kernel.shape[2] *
                                  layer.groups], [0, 1])
  kernel = layer.kernel.numpy()
  per_group = kernel.shape[-1] // layer.groups
  want = tf.concat([
      tf.nn.conv2d(x[..., g * kernel.shape[2]:(g + 1) * kernel.shape[2]],
                   kernel[..., g * per_group:(g + 1) * per_group],
                   strides=2, padding='SAME')
      for g in range(layer.groups)], axis=-1)
  np.testing.assert_allclose(layer(x), want, atol=1e-4)


# --- 8. --hparams, --keep_checkpoint_interval_secs, continuous eval ---------


def _flags(*argv):
  fv = flags.FlagValues()
  config_lib.define_flags(fv)
  fv(['prog', *argv])
  return fv


def test_hparams_reference_defaults_and_overrides():
  fv = _flags('--hparams=bs=1024,t=0.1,s1te=100,au=sr,phl=[512,64],s2op=m,'
              'ul=true,s2be=[10,20],ds=cifar10,s2ebn=0,ms=-1',
              '--mode=eval', '--model_dir=/tmp/x')
  config = config_lib.config_from_flags(fv)
  assert config.data.batch_size == 1024
  assert config.loss.temperature == 0.1 and config.loss.use_labels
  assert config.stage_1.epochs == 100
  assert config.augment.augmentation_type == (
      enums.AugmentationType.STACKED_RANDAUGMENT)
  assert config.model.projection_head_layers == (512, 64)
  assert config.stage_2.optimizer == enums.Optimizer.MOMENTUM
  assert config.stage_2.decay_boundary_epochs == (10., 20.)
  assert config.data.dataset == 'cifar10'
  assert not config.stage_2.update_encoder_batch_norm
  # Everything else is the reference HParams default, not our flag default.
  assert config.stage_2.epochs == 700 and config.stage_2.weight_decay == 1e-4
  assert config.stage_2.contrastive_loss_weight == 1.0
  assert config.stage_1.cross_entropy_loss_weight == 1.0
  assert config.data.num_images == 0  # ms=-1: all.
  # Non-hyperparameter flags still apply.
  assert config.runtime.mode == enums.Mode.EVAL
  assert config.runtime.model_dir == '/tmp/x'
  # Without --hparams, the flags' defaults (ours differ, e.g. temperature).
  assert config_lib.config_from_flags(_flags()).loss.temperature == 0.07


@pytest.mark.parametrize('argv,message', [
    (['--hparams=zz=1'], "unknown hyperparameter 'zz'"),
    (['--hparams=bs=1,bs=2'], 'bs is assigned twice'),
    (['--hparams=bs=1.5'], 'bs='),
    (['--hparams=au=q'], 'au='),
    (['--hparams=phn=0,chn=1'], 'phn and chn'),
    (['--hparams=bs=64', '--temperature=0.5'], '--temperature'),
])
def test_hparams_errors_name_the_problem(argv, message):
  with pytest.raises(config_lib.ConfigError, match='--hparams') as e:
    config_lib.config_from_flags(_flags(*argv))
  assert message in str(e.value)


def test_hparams_round_trip_of_the_reference_serialization():
  # hparams.serialize() of the reference writes every field; bools as 0/1.
  parts = []
  for abbrev, (_, default, _) in reference_hparams.HPARAMS.items():
    if isinstance(default, tuple):
      text = '[' + ','.join(str(v) for v in default) + ']'
    elif isinstance(default, bool):
      text = str(int(default))
    elif hasattr(default, 'value'):
      text = default.value
    else:
      text = str(default)
    parts.append(f'{abbrev}={text}')
  parsed = reference_hparams.parse(','.join(parts))
  assert parsed == {a: d for a, (_, d, _) in reference_hparams.HPARAMS.items()}


@pytest.mark.parametrize('interval,kept', [
    (1e-6, ['ckpt-1.index', 'ckpt-2.index', 'ckpt-3.index']),
    (config_lib.RuntimeConfig().keep_checkpoint_interval_secs,
     ['ckpt-3.index'])])
def test_keep_checkpoint_interval_keeps_old_checkpoints(tmp_path, interval,
                                                        kept):
  config = tiny_config(tmp_path, runtime__max_checkpoints_to_keep=1,
                       runtime__keep_checkpoint_interval_secs=interval)
  trainer = train.Trainer(config, ONE_DEVICE, 1)
  for step in (1, 2, 3):
    trainer.manager.save(checkpoint_number=step)
  assert sorted(f for f in os.listdir(tmp_path / 'pretrain')
                if f.endswith('.index')) == kept


def test_continuous_eval_picks_up_new_checkpoints_and_stops_at_the_last(
    tmp_path):
  config = tiny_config(tmp_path, stage_2__epochs=0,
                       runtime__eval_interval_secs=0.0,
                       runtime__eval_timeout_secs=1e9)
  waits = []

  def sleep(seconds):
    # Training writes a checkpoint while the evaluator waits for one: step
    # 1, then step 2 (sleep(0) is the pause after an evaluation).
    if seconds > 0:
      waits.append(seconds)
      if len(waits) <= 2:
        _write_model_checkpoint(
            config, str(tmp_path / 'pretrain' / f'ckpt-{len(waits)}'))

  clock = iter(range(10**6)).__next__
  evaluated = continuous.continuous_eval(config, ONE_DEVICE, sleep=sleep,
                                         clock=clock)
  # Nothing existed when it started; it evaluated (and exported) step 1, then
  # step 2 = the last train step, and stopped there.
  assert [(r['stage'], r['step']) for r in evaluated] == [
      ('pretrain', 1), ('pretrain', 2)]
  for r in evaluated:
    assert 0 <= r['top_1_accuracy'] <= 1
    assert r['checkpoint'].endswith(f'ckpt-{r["step"]}')
    assert os.path.isfile(os.path.join(r['export_dir'], 'saved_model.pb'))


def test_continuous_eval_times_out_without_checkpoints(tmp_path):
  config = tiny_config(tmp_path, stage_2__epochs=0,
                       runtime__eval_timeout_secs=5)
  now = [0.0]

  def sleep(seconds):
    now[0] += seconds

  assert continuous.continuous_eval(config, ONE_DEVICE, sleep=sleep,
                                    clock=lambda: now[0]) == []
  assert now[0] >= 5
