"""Flags, config checks, train-step hooks and end-to-end smoke tests of the
beyond-the-reference features: GenSCL, CutMix / Mixup, distillation and the
momentum queue (supcon_tf/training/extensions.py and the modules it wires in).

The end-to-end runs use `tiny_config` of tests/train_test.py (2 steps of a
ResNet-18 at width 0.25 on 16 px digits). One run (CutMix + GenSCL) is
exported and is the teacher of the second (momentum queue + distillation).
"""

import math

from absl import flags
import numpy as np
import pytest
import tensorflow as tf

from supcon_tf import config as config_lib
from supcon_tf import enums
from supcon_tf import export
from supcon_tf import models
from supcon_tf.data import datasets
from supcon_tf.data import mixing
from supcon_tf.data import pipeline
from supcon_tf.training import checkpoints
from supcon_tf.training import distill
from supcon_tf.training import extensions
from supcon_tf.training import trainer as train
from tests.conftest import mirrored_strategy
from tests.testing import run_mode as _mode
from tests.testing import tiny_config


def _parse(*args):
  fv = flags.FlagValues()
  config_lib.define_flags(fv)
  fv(['prog', *args])
  return config_lib.config_from_flags(fv)


# --- Flags and config checks -------------------------------------------------


def test_flags_default_off_and_round_trip():
  c = _parse()
  assert c.loss.contrastive_loss == enums.ContrastiveLoss.SUPCON
  assert c.augment.mix == enums.MixType.NONE and c.augment.mix_alpha == 1.0
  assert c.loss.queue_size == 0 and c.loss.momentum == 0.999
  assert c.loss.teacher == ''
  c = _parse('--mix=CUTMIX', '--contrastive_loss=genscl', '--mix_alpha=0.4',
             '--queue_size=64', '--momentum=0.99', '--teacher=/t',
             '--teacher_temperature=4', '--teacher_weight=0.3')
  assert c.augment.mix == enums.MixType.CUTMIX and c.augment.mix_alpha == 0.4
  assert c.loss.contrastive_loss == enums.ContrastiveLoss.GENSCL
  assert (c.loss.queue_size, c.loss.momentum) == (64, 0.99)
  assert (c.loss.teacher, c.loss.teacher_temperature,
          c.loss.teacher_weight) == ('/t', 4.0, 0.3)
  assert config_lib.ExperimentConfig.from_json(c.to_json()) == c
  # A config.json written before these fields existed still loads.
  old = config_lib.ExperimentConfig().to_dict()
  for key in ('contrastive_loss', 'queue_size', 'momentum', 'teacher',
              'teacher_temperature', 'teacher_weight'):
    del old['loss'][key]
  del old['augment']['mix'], old['augment']['mix_alpha']
  assert (config_lib.ExperimentConfig.from_dict(old) ==
          config_lib.ExperimentConfig())


@pytest.mark.parametrize('args,flag', [
    (['--mix=cutmix'], 'contrastive_loss'),
    (['--mix=mixup', '--contrastive_loss=supcon'], 'contrastive_loss'),
    (['--contrastive_loss=genscl', '--nouse_labels'], 'contrastive_loss'),
    (['--contrastive_loss=genscl', '--summation_location=inside'],
     'summation_location'),
    (['--contrastive_loss=genscl', '--positives_cap=2'], 'positives_cap'),
    (['--mix=cutmix', '--contrastive_loss=genscl', '--mix_alpha=0'],
     'mix_alpha'),
    (['--queue_size=-1'], 'queue_size'),
    (['--queue_size=8', '--momentum=1'], 'momentum'),
    (['--queue_size=8', '--positives_cap=2'], 'positives_cap'),
    (['--queue_size=8', '--loss_chunk_size=4'], 'loss_chunk_size'),
    (['--teacher_weight=1.5'], 'teacher_weight'),
    (['--teacher_temperature=0'], 'teacher_temperature'),
    (['--teacher=/t'], 'teacher'),  # SupCon, no cross-entropy: no effect.
])
def test_invalid_combinations_name_the_flag(args, flag):
  with pytest.raises(config_lib.ConfigError, match=f'--{flag}'):
    _parse(*args)


def test_mixing_with_supcon_message_says_what_to_do():
  with pytest.raises(config_lib.ConfigError,
                     match='--contrastive_loss=genscl'):
    _parse('--mix=cutmix')
  # Without a labelled contrastive term, mixing needs no GenSCL.
  _parse('--mix=cutmix', '--stage_1_contrastive_loss_weight=0',
         '--stage_1_cross_entropy_loss_weight=1')
  _parse('--mix=mixup', '--nouse_labels')


# --- End to end ----------------------------------------------------------------


def _finite(metrics):
  return metrics and all(math.isfinite(v) for v in metrics.values())


@pytest.fixture(scope='module')
def cutmix_genscl_run(tmp_path_factory):
  """Pretrains 2 steps with CutMix + GenSCL and exports the result."""
  model_dir = tmp_path_factory.mktemp('cutmix_genscl')
  config = tiny_config(model_dir, augment__mix=enums.MixType.CUTMIX,
                       loss__contrastive_loss=enums.ContrastiveLoss.GENSCL)
  metrics = _mode(config, enums.Mode.PRETRAIN)
  export_dir = _mode(
      config.replace(runtime__export_dir=str(model_dir / 'teacher')),
      enums.Mode.EXPORT)
  return config, metrics, export_dir


def test_pretrain_cutmix_genscl_and_export_for_distillation(
    cutmix_genscl_run):
  config, metrics, export_dir = cutmix_genscl_run
  assert _finite(metrics) and metrics['contrastive_loss'] > 0
  assert checkpoints.latest_in(
      f'{config.runtime.model_dir}/pretrain').endswith('ckpt-2')
  # The export's float32 signature gives the model's logits on
  # pipeline-preprocessed images.
  info = datasets.get_dataset_info(config.data)
  teacher = distill.Teacher(export_dir, image_size=16,
                            num_classes=info.num_classes)
  images, _ = next(iter(pipeline.build_dataset(config.replace(
      data__eval_batch_size=8), training=False)))
  model = checkpoints.load_model_for_inference(config, info)
  want = model(images, training=False)['logits'].numpy()
  np.testing.assert_allclose(teacher.logits(images).numpy(), want,
                             rtol=1e-4, atol=1e-5)
  loaded = tf.saved_model.load(export_dir)
  assert {export.SIGNATURE_KEY,
          export.PREPROCESSED_SIGNATURE_KEY} <= set(loaded.signatures)


def test_pretrain_with_queue_and_teacher(cutmix_genscl_run, tmp_path):
  _, _, teacher_dir = cutmix_genscl_run
  config = tiny_config(tmp_path, loss__queue_size=32,
                       loss__teacher=teacher_dir,
                       stage_1__cross_entropy_loss_weight=1.0)
  metrics = _mode(config, enums.Mode.PRETRAIN)
  assert _finite(metrics) and metrics['contrastive_loss'] > 0
  # The queue is checkpointed: 2 steps x 16 images x 2 views > 32 slots.
  prefix = checkpoints.latest_in(str(tmp_path / 'pretrain'))
  names = [n for n, _ in tf.train.list_variables(prefix)]
  count = [n for n in names if 'momentum_contrast/queue/count' in n]
  assert count, names
  assert int(tf.train.load_variable(prefix, count[0])) == 32
  # ...and restored on resume.
  trainer = train.Trainer(config, tf.distribute.OneDeviceStrategy('/cpu:0'),
                          1)
  assert trainer.restore_or_initialize() == 2
  queue = trainer.extensions.momentum.queue
  assert int(queue.count.numpy()) == 32
  assert bool(trainer.extensions.momentum.initialized.numpy())


def test_mixup_genscl_queue_and_teacher_under_two_replicas(cutmix_genscl_run,
                                                          tmp_path):
  """Every extension at once, under MirroredStrategy with 2 replicas."""
  _, _, teacher_dir = cutmix_genscl_run
  config = tiny_config(tmp_path, augment__mix=enums.MixType.MIXUP,
                       loss__contrastive_loss=enums.ContrastiveLoss.GENSCL,
                       loss__queue_size=128, loss__teacher=teacher_dir,
                       stage_1__cross_entropy_loss_weight=1.0)
  metrics = _mode(config, enums.Mode.PRETRAIN, mirrored_strategy(2))
  assert _finite(metrics) and metrics['contrastive_loss'] > 0
  # The global batch is enqueued once per step: 2 steps x 16 images x 2
  # views = 64 of the 128 slots (each replica enqueuing it would give 128).
  prefix = checkpoints.latest_in(str(tmp_path / 'pretrain'))
  count = [n for n, _ in tf.train.list_variables(prefix)
           if 'momentum_contrast/queue/count' in n]
  assert count and int(tf.train.load_variable(prefix, count[0])) == 64
  features = [n for n, _ in tf.train.list_variables(prefix)
              if 'momentum_contrast/queue/features' in n]
  assert features
  # The filled slots hold unit-norm keys, the rest are still zero.
  stored = tf.train.load_variable(prefix, features[0])
  np.testing.assert_allclose(np.linalg.norm(stored[:64], axis=-1), 1.0,
                             rtol=1e-4)
  assert not stored[64:].any()


def test_prepare_mixes_and_blends_the_teacher(cutmix_genscl_run, tmp_path):
  _, _, teacher_dir = cutmix_genscl_run
  config = tiny_config(tmp_path, augment__mix=enums.MixType.MIXUP,
                       loss__contrastive_loss=enums.ContrastiveLoss.GENSCL,
                       loss__teacher=teacher_dir, loss__teacher_weight=0.25,
                       loss__teacher_temperature=2.0)
  info = datasets.get_dataset_info(config.data)
  model = models.build_experiment_model(config, info.num_classes)
  ext = extensions.TrainStepExtensions(config, info, model, 1)
  assert ext.owns_contrastive_loss and ext.momentum is None
  images = np.random.RandomState(0).rand(4, 2, 16, 16, 3).astype(np.float32)
  labels = np.array([0, 3, 3, 9], np.int32)
  mixed, targets = ext.prepare(images, labels, tf.constant(7, tf.int64))
  fold_in = tf.random.experimental.stateless_fold_in
  seed = fold_in(fold_in(
      tf.constant([config.data.seed, extensions.MIX_SALT], tf.int64),
      tf.constant(7, tf.int64)), tf.constant(0, tf.int64))  # Replica 0.
  want_images, want_labels = mixing.mixup(images, np.eye(10)[labels], 1.0,
                                          seed)
  np.testing.assert_allclose(mixed.numpy(), want_images.numpy(), rtol=1e-6)
  teacher = ext.teacher.probabilities(want_images, 2.0)
  np.testing.assert_allclose(
      targets.numpy(), 0.75 * want_labels.numpy() + 0.25 * teacher.numpy(),
      rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(targets.numpy().sum(-1), 1.0, rtol=1e-5)
  # Stage 2 and the default config change nothing.
  for ext in (extensions.TrainStepExtensions(config, info, model, 2),
              extensions.TrainStepExtensions(tiny_config(tmp_path), info,
                                             model, 1)):
    same, none = ext.prepare(images, labels, 0)
    assert none is None and same is images
    assert not ext.owns_contrastive_loss and not ext.checkpoint_objects()
