"""Tests of flags/*.cfg: they parse, and carry the reference scripts' values.

Each flagfile is resolved the way a user runs it, `python -m supcon_tf.main
--flagfile=flags/X.cfg --dry_run` from the repository root (nested
`--flagfile=` lines are relative to it), and a handful of key values per file
are compared with the values of google-research/supcon `scripts/configs.sh`
and `scripts/<name>.sh`, hard-coded below. Dry runs import no TensorFlow.
"""

import glob
import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS_DIR = os.path.join(ROOT, 'flags')

# Every script of the reference release's scripts/ directory.
REFERENCE_SCRIPTS = (
    'supcon_cifar10_resnet50', 'supcon_imagenet_resnet50',
    'supcon_imagenet_resnet101', 'supcon_imagenet_resnet200',
    'simclr_cifar10_resnet50', 'simclr_imagenet_resnet50',
    'cross_entropy_cifar10_resnet50', 'cross_entropy_imagenet_resnet50',
    'cross_entropy_imagenet_resnet200',
    'train_classification_head_from_pretrained_encoder',
)
CIFAR100_VARIANTS = ('supcon_cifar100_resnet50', 'cross_entropy_cifar100_resnet50',
                     'simclr_cifar100_resnet50')
ALL_CONFIGS = REFERENCE_SCRIPTS + CIFAR100_VARIANTS + ('quickstart_digits',)


def _all_cfg_files():
  return sorted(os.path.relpath(p, ROOT) for p in
                glob.glob(os.path.join(FLAGS_DIR, '**', '*.cfg'), recursive=True))


def _main(*args, cwd=ROOT):
  env = dict(os.environ, PYTHONPATH=ROOT)
  return subprocess.run([sys.executable, '-m', 'supcon_tf.main', *args],
                        cwd=cwd, env=env, capture_output=True, text=True,
                        timeout=120)


def _resolve(name, *overrides):
  proc = _main(f'--flagfile=flags/{name}.cfg', '--dry_run', *overrides)
  assert proc.returncode == 0, proc.stderr
  return json.loads(proc.stdout)


def _get(config, dotted):
  section, field = dotted.split('.')
  return config[section][field]


def _same(got, want):
  """Equality, with a float tolerance (1e-4 is not exactly 0.0001 * 1)."""
  if isinstance(want, (list, tuple)):
    return (isinstance(got, (list, tuple)) and len(got) == len(want) and
            all(_same(g, w) for g, w in zip(got, want)))
  if isinstance(want, float) and not isinstance(got, bool):
    return isinstance(got, (int, float)) and math.isclose(got, want,
                                                          rel_tol=1e-9)
  return type(got) is type(want) and got == want


# -----------------------------------------------------------------------------
# The reference's flag groups (scripts/configs.sh), as resolved config values.

TPU = {'augment.allow_mixed_precision': True, 'augment.defer_blurring': True}
CIFAR10 = {
    'data.dataset': 'cifar10', 'data.shard_per_host': False,
    'model.first_conv_kernel_size': 3, 'model.first_conv_stride': 1,
    'model.use_initial_max_pool': False, 'augment.image_size': 32,
    'augment.blur_probability': 0.0, 'augment.apply_whitening': True,
    'augment.crop_area_range': [0.2, 1.0],
    'augment.use_pytorch_color_jitter': True,
    'augment.eval_crop_method': 'identity', 'augment.crop_padding': 0,
    'loss.label_smoothing': 0.0,
}
IMAGENET = {
    'data.dataset': 'imagenet2012', 'data.shard_per_host': True,
    'model.first_conv_kernel_size': 7, 'model.first_conv_stride': 2,
    'model.use_initial_max_pool': True, 'augment.image_size': 224,
    'augment.blur_probability': 0.5, 'loss.label_smoothing': 0.05,
}
CONTRASTIVE = {
    'model.stop_gradient_before_classification_head': True,
    'loss.contrast_mode': 'all_views', 'loss.summation_location': 'outside',
    'loss.denominator_mode': 'all',
    'stage_1.contrastive_loss_weight': 1.0,
    'stage_1.cross_entropy_loss_weight': 0.0,
    'stage_2.contrastive_loss_weight': 0.0,
    'stage_2.cross_entropy_loss_weight': 1.0,
    'stage_1.use_encoder_weight_decay': True,
    'stage_1.use_projection_head_weight_decay': True,
    'stage_1.use_classification_head_weight_decay': False,
    'stage_2.use_encoder_weight_decay': False,
    'stage_2.use_projection_head_weight_decay': False,
    'stage_2.use_classification_head_weight_decay': True,
    'stage_1.update_encoder_batch_norm': True,
    'stage_2.update_encoder_batch_norm': False,
}
SUPCON = {
    **CONTRASTIVE, 'loss.use_labels': True, 'model.normalize_embedding': True,
    'loss.use_bias_weight_decay': True, 'model.use_projection_batch_norm': False,
    'model.projection_head_layers': [128],
    'model.zero_initialize_classifier': False,
    'loss.scale_by_temperature': True,
}
SIMCLR = {
    **CONTRASTIVE, 'loss.use_labels': False, 'model.normalize_embedding': False,
    'loss.use_bias_weight_decay': True, 'model.use_projection_batch_norm': True,
    'model.projection_head_layers': [2048, 2048, 128],
    'model.zero_initialize_classifier': True,
    'loss.scale_by_temperature': False,
}
XENT = {
    'stage_2.epochs': 0.0, 'stage_2.warmup_epochs': 0.0,
    'model.stop_gradient_before_classification_head': False,
    'stage_1.contrastive_loss_weight': 0.0,
    'stage_1.cross_entropy_loss_weight': 1.0,
    'stage_2.contrastive_loss_weight': 0.0,
    'stage_2.cross_entropy_loss_weight': 0.0,
    'stage_1.use_encoder_weight_decay': True,
    'stage_1.use_projection_head_weight_decay': False,
    'stage_1.use_classification_head_weight_decay': True,
    'stage_2.use_encoder_weight_decay': False,
    'stage_2.use_projection_head_weight_decay': False,
    'stage_2.use_classification_head_weight_decay': False,
    'stage_1.update_encoder_batch_norm': True,
    'stage_2.update_encoder_batch_norm': False,
    'model.normalize_embedding': False,
}


def _resnet(depth):
  return {'model.architecture': 'resnet_v1', 'model.depth': depth,
          'model.width': 1.0}


# Each script: its groups in the script's order (later wins), then its own
# lines.
EXPECTED = {
    'supcon_cifar10_resnet50': {
        **TPU, **_resnet(50), **CIFAR10, **SUPCON,
        'data.batch_size': 4096, 'augment.augmentation_type': 'simclr',
        'augment.augmentation_magnitude': 0.5, 'loss.temperature': 0.1,
        'stage_1.weight_decay': 1e-4, 'stage_2.weight_decay': 0.0,
        'stage_1.epochs': 1000.0, 'stage_2.epochs': 100.0,
        'stage_1.warmup_epochs': 10.0, 'stage_2.warmup_epochs': 0.0,
        'stage_1.base_learning_rate': 0.5, 'stage_2.base_learning_rate': 2.5,
        'stage_1.learning_rate_decay': 'cosine',
        'stage_2.learning_rate_decay': 'piecewise_linear',
        'stage_2.decay_rate': 0.2,
        'stage_2.decay_boundary_epochs': [60.0, 75.0, 90.0],
        'stage_1.optimizer': 'momentum', 'stage_2.optimizer': 'momentum',
        'model.normalize_embedding': False,
        'model.use_projection_batch_norm': False,
        'model.projection_head_layers': [2048, 128],
        'model.use_global_batch_norm': False,
    },
    'supcon_imagenet_resnet50': {
        **TPU, **_resnet(50), **IMAGENET, **SUPCON,
        'data.batch_size': 6144, 'augment.augmentation_type': 'autoaugment',
        'augment.augmentation_magnitude': 1.0, 'loss.temperature': 0.1,
        'stage_1.weight_decay': 1e-3, 'stage_2.weight_decay': 1e-6,
        'stage_1.epochs': 350.0, 'stage_2.epochs': 90.0,
        'stage_1.base_learning_rate': 0.4, 'stage_2.base_learning_rate': 0.05,
        'stage_2.learning_rate_decay': 'exponential',
        'stage_1.optimizer': 'lars', 'stage_2.optimizer': 'rmsprop',
        'stage_2.decay_rate': 0.97, 'stage_2.epochs_per_decay': 0.5,
        'stage_1.warmup_epochs': 12.0, 'model.use_global_batch_norm': True,
    },
    'supcon_imagenet_resnet101': {
        **TPU, **_resnet(101), **IMAGENET, **SUPCON,
        'data.batch_size': 4096, 'augment.augmentation_type': 'autoaugment',
        'augment.augmentation_magnitude': 1.0, 'loss.temperature': 0.1,
        'stage_1.weight_decay': 1e-4, 'stage_2.weight_decay': 1e-6,
        'stage_1.epochs': 350.0, 'stage_2.epochs': 90.0,
        'stage_1.base_learning_rate': 0.4, 'stage_2.base_learning_rate': 0.05,
        'stage_2.learning_rate_decay': 'exponential',
        'stage_1.optimizer': 'lars', 'stage_2.optimizer': 'rmsprop',
        'stage_2.decay_rate': 0.97, 'stage_2.epochs_per_decay': 0.5,
    },
    'supcon_imagenet_resnet200': {
        **TPU, **_resnet(200), **IMAGENET, **SUPCON,
        'data.batch_size': 4096,
        'augment.augmentation_type': 'stacked_randaugment',
        'augment.augmentation_magnitude': 1.0, 'loss.temperature': 0.1,
        'stage_1.weight_decay': 1e-4, 'stage_2.weight_decay': 1e-6,
        'stage_1.epochs': 700.0, 'stage_2.epochs': 90.0,
        'stage_1.base_learning_rate': 0.2, 'stage_2.base_learning_rate': 0.05,
        'stage_2.learning_rate_decay': 'exponential',
        'stage_1.optimizer': 'lars', 'stage_2.optimizer': 'rmsprop',
        'stage_2.decay_rate': 0.97, 'stage_2.epochs_per_decay': 0.5,
    },
    'simclr_cifar10_resnet50': {
        **TPU, **_resnet(50), **CIFAR10, **SIMCLR,
        'data.batch_size': 1024, 'augment.augmentation_type': 'simclr',
        'augment.augmentation_magnitude': 0.5, 'loss.temperature': 0.5,
        'stage_1.weight_decay': 1e-4, 'stage_2.weight_decay': 0.0,
        'stage_1.epochs': 400.0, 'stage_2.epochs': 90.0,
        'stage_1.warmup_epochs': 10.0, 'stage_2.warmup_epochs': 0.0,
        'stage_1.base_learning_rate': 0.5, 'stage_2.base_learning_rate': 0.25,
        'stage_1.learning_rate_decay': 'cosine',
        'stage_2.learning_rate_decay': 'cosine',
        'stage_1.optimizer': 'momentum', 'stage_2.optimizer': 'momentum',
    },
    'simclr_imagenet_resnet50': {
        **TPU, **_resnet(50), **IMAGENET, **SIMCLR,
        'data.batch_size': 6144, 'augment.augmentation_type': 'simclr',
        'augment.augmentation_magnitude': 1.0, 'loss.temperature': 0.1,
        'stage_1.weight_decay': 1e-4, 'stage_2.weight_decay': 1e-6,
        'stage_1.epochs': 100.0, 'stage_2.epochs': 90.0,
        'stage_1.base_learning_rate': 0.3, 'stage_2.base_learning_rate': 0.1,
        'stage_1.optimizer': 'lars', 'stage_2.optimizer': 'nesterov',
    },
    'cross_entropy_cifar10_resnet50': {
        **TPU, **_resnet(50), **CIFAR10, **XENT,
        'data.batch_size': 1024, 'augment.augmentation_type': 'simclr',
        'augment.augmentation_magnitude': 0.5, 'stage_1.weight_decay': 5e-4,
        'stage_1.epochs': 1000.0, 'stage_1.base_learning_rate': 0.1,
        'stage_1.optimizer': 'nesterov', 'loss.label_smoothing': 0.0,
    },
    'cross_entropy_imagenet_resnet50': {
        **TPU, **_resnet(50), **IMAGENET, **XENT,
        'data.batch_size': 6144, 'augment.augmentation_type': 'autoaugment',
        'augment.augmentation_magnitude': 1.0, 'stage_1.weight_decay': 1e-4,
        'stage_1.epochs': 200.0, 'stage_1.base_learning_rate': 0.1,
        'stage_1.optimizer': 'nesterov',
    },
    'cross_entropy_imagenet_resnet200': {
        **TPU, **_resnet(200), **IMAGENET, **XENT,
        'data.batch_size': 4096,
        'augment.augmentation_type': 'stacked_randaugment',
        'augment.augmentation_magnitude': 1.0, 'stage_1.weight_decay': 1e-4,
        'stage_1.epochs': 700.0, 'stage_1.base_learning_rate': 0.1,
        'stage_1.optimizer': 'nesterov',
    },
    # The script's stage-1 values become stage 2's (see the flagfile and
    # docs/reproducing.md: the reference's ONLY_CLASSIFIER_FLAGS is undefined).
    'train_classification_head_from_pretrained_encoder': {
        **TPU, **_resnet(50), **IMAGENET, **SIMCLR,
        'data.batch_size': 6144, 'augment.augmentation_type': 'simclr',
        'augment.augmentation_magnitude': 1.0,
        'stage_1.epochs': 0.0,
        'stage_2.weight_decay': 1e-6, 'stage_2.epochs': 90.0,
        'stage_2.warmup_epochs': 12.0, 'stage_2.base_learning_rate': 0.1,
        'stage_2.learning_rate_decay': 'cosine',
        'stage_2.optimizer': 'nesterov',
        'warm_start.warm_start_encoder': True,
        'warm_start.warm_start_projection_head': True,
        'warm_start.warm_start_classifier': False,
        'warm_start.reference_ckpt': '',
    },
    'quickstart_digits': {
        **SUPCON,
        'data.dataset': 'digits', 'model.depth': 18, 'model.width': 0.25,
        'model.first_conv_kernel_size': 3, 'model.first_conv_stride': 1,
        'model.use_initial_max_pool': False, 'augment.image_size': 16,
        'augment.random_flip': False,
        'augment.augmentation_type': 'simclr', 'augment.blur_probability': 0.0,
        'augment.allow_mixed_precision': False, 'loss.temperature': 0.1,
        'data.eval_batch_size': 360,
        'model.projection_head_layers': [128, 64],
        'stage_1.keras_momentum': True, 'stage_2.keras_momentum': True,
    },
}


# Where the reference's behaviour differs from our improvements, the paper
# configurations select the reference's (README "Differences from the
# reference"): its Contrast op, one blur sigma per per-core batch and the TF1
# MomentumOptimizer.
REFERENCE_BEHAVIOUR = {
    'augment.pil_contrast': False, 'augment.blur_sigma_per_image': False,
    'stage_1.keras_momentum': False, 'stage_2.keras_momentum': False,
}
for _name in REFERENCE_SCRIPTS:
  EXPECTED[_name].update(REFERENCE_BEHAVIOUR)


# -----------------------------------------------------------------------------


def test_every_reference_script_has_a_flagfile():
  for name in ALL_CONFIGS:
    assert os.path.isfile(os.path.join(FLAGS_DIR, name + '.cfg')), name
  assert set(EXPECTED) == set(REFERENCE_SCRIPTS) | {'quickstart_digits'}


@pytest.mark.parametrize('path', _all_cfg_files())
def test_flagfile_parses(path):
  proc = _main(f'--flagfile={path}', '--dry_run')
  assert proc.returncode == 0, proc.stderr
  config = json.loads(proc.stdout)
  assert set(config) >= {'model', 'loss', 'data', 'augment', 'stage_1',
                         'stage_2', 'runtime'}


@pytest.mark.parametrize('path', _all_cfg_files())
def test_flagfile_syntax(path):
  # absl reads a flagfile line by line: only a '#' in the first column starts
  # a comment, and values are taken verbatim (an inline comment or quotes would
  # become part of the value; an indented comment becomes an argument).
  with open(os.path.join(ROOT, path)) as f:
    for number, line in enumerate(f, 1):
      where = f'{path}:{number}: {line!r}'
      if not line.strip() or line.startswith('#'):
        continue
      assert line.startswith('--'), where
      assert line == line.lstrip() and line.rstrip('\n') == line.rstrip(), where
      assert '#' not in line and '"' not in line and "'" not in line, where
      if line.startswith('--flagfile='):
        included = line.strip().split('=', 1)[1]
        assert included.startswith('flags/'), where  # Repo-relative.
        assert os.path.isfile(os.path.join(ROOT, included)), where


@pytest.mark.parametrize('name', sorted(EXPECTED))
def test_values_match_the_reference_script(name):
  config = _resolve(name)
  mismatches = {key: (_get(config, key), want)
                for key, want in EXPECTED[name].items()
                if not _same(_get(config, key), want)}
  assert not mismatches, f'{name}: (resolved, expected) {mismatches}'


def test_no_flagfile_sets_runtime_or_tpu_flags():
  # Which TPU, where the data and checkpoints go, and the mode belong to the
  # command line (and the tpu/ scripts), never to a paper configuration.
  for path in _all_cfg_files():
    with open(os.path.join(ROOT, path)) as f:
      for line in f:
        name = line.strip().split('=', 1)[0]
        assert name not in ('--tpu', '--tpu_name', '--use_tpu', '--master',
                            '--model_dir', '--data_dir', '--mode',
                            '--tpu_zone', '--gcp_project'), (path, line)


@pytest.mark.parametrize('name', CIFAR100_VARIANTS)
def test_cifar100_variants_differ_from_cifar10_only_in_dataset(name):
  cifar100 = _resolve(name)
  cifar10 = _resolve(name.replace('cifar100', 'cifar10'))
  assert cifar100['data'].pop('dataset') == 'cifar100'
  assert cifar10['data'].pop('dataset') == 'cifar10'
  assert cifar100 == cifar10


def test_command_line_overrides_the_flagfile():
  config = _resolve('supcon_cifar10_resnet50', '--dataset=digits',
                    '--batch_size=16', '--resnet_depth=18',
                    '--projection_head_layers=64,32')
  assert config['data']['dataset'] == 'digits'
  assert config['data']['batch_size'] == 16
  assert config['model']['depth'] == 18
  assert config['model']['projection_head_layers'] == [64, 32]
  assert config['loss']['temperature'] == 0.1  # Still the flagfile's.


def test_includes_resolve_against_the_working_directory(tmp_path):
  # The documented convention: run from the repository root. From elsewhere,
  # even an absolute top-level path fails on its repo-relative includes.
  proc = _main(f'--flagfile={FLAGS_DIR}/supcon_cifar10_resnet50.cfg',
               '--dry_run', cwd=str(tmp_path))
  assert proc.returncode != 0
  assert 'flags/common/' in proc.stderr


def test_quickstart_is_small():
  config = _resolve('quickstart_digits')
  steps_per_epoch = 1437 // config['data']['batch_size']
  # Stage 1 (two views, full backward) dominates the quickstart's time; the
  # stage-2 classifier on the frozen encoder is ~6x cheaper per step.
  assert steps_per_epoch * config['stage_1']['epochs'] <= 600
  assert steps_per_epoch * config['stage_2']['epochs'] <= 400
  assert config['runtime']['steps_per_loop'] <= steps_per_epoch


# -----------------------------------------------------------------------------
# A real (tiny) training run through a paper flagfile.


def test_tiny_real_run_of_a_paper_flagfile(tmp_path):
  model_dir = tmp_path / 'run'
  env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL='2',
             CUDA_VISIBLE_DEVICES='')
  proc = subprocess.run(
      [sys.executable, '-m', 'supcon_tf.main',
       '--flagfile=flags/supcon_cifar10_resnet50.cfg',
       '--dataset=digits', '--resnet_depth=18', '--image_size=32',
       '--batch_size=16', '--max_train_steps=2', '--max_eval_steps=1',
       '--mode=train_then_eval', f'--model_dir={model_dir}', '--tpu=',
       '--strategy=one_device', '--projection_head_layers=64,32',
       # CIFAR evaluates uncropped 32x32 images (IDENTITY); digits are 8x8.
       '--eval_crop_method=RESIZE_THEN_CROP',
       # The TPU group turns on bfloat16; keep the CPU run in float32.
       '--allow_mixed_precision=False'],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-5000:]
  results_path = model_dir / 'eval_results.json'
  assert results_path.exists(), proc.stderr[-5000:]
  results = json.loads(results_path.read_text())
  assert 0.0 <= results['top_1_accuracy'] <= 1.0
