"""Tests of supcon_tf.config and the --dry_run command line."""

import json
import os
import subprocess
import sys

from absl import flags
import pytest

from supcon_tf import config as config_lib
from supcon_tf import enums

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _parse(*args):
  # A private FlagValues per call, so tests do not share parsed state.
  fv = flags.FlagValues()
  config_lib.define_flags(fv)
  fv(['prog', *args])
  return config_lib.config_from_flags(fv)


def test_defaults_are_the_reference_defaults():
  c = _parse()
  assert c.data.batch_size == 2048 and c.data.eval_batch_size == 128
  assert c.model.depth == 50 and c.model.projection_head_layers == (2048, 128)
  assert c.model.use_global_batch_norm
  assert c.loss.temperature == 0.07 and c.loss.positives_cap == -1
  assert c.loss.contrast_mode == enums.LossContrastMode.ALL_VIEWS
  assert c.stage_1.epochs == 700 and c.stage_2.epochs == 200
  assert c.stage_1.base_learning_rate == 0.3
  assert c.stage_2.base_learning_rate == 0.05
  assert c.stage_1.rmsprop_epsilon == 1.0 and c.stage_2.rmsprop_epsilon == 0.001
  assert c.stage_1.decay_boundary_epochs == (30, 60, 80, 90)
  assert (c.stage_2.contrastive_loss_weight,
          c.stage_2.cross_entropy_loss_weight) == (0.0, 1.0)
  assert c.augment.augmentation_type == enums.AugmentationType.AUTOAUGMENT
  assert c.augment.crop_area_range == (0.08, 1.0)
  assert c.data.dataset == 'imagenet2012'  # --input_fn=imagenet alias.
  # Flags and dataclass defaults agree: parsing nothing == ExperimentConfig().
  assert c == config_lib.ExperimentConfig()


def test_upper_and_lower_case_enum_names():
  a = _parse('--contrast_mode=ONE_VIEW', '--stage_1_optimizer=LARS',
             '--eval_crop_method=crop_then_resize')
  assert a.loss.contrast_mode == enums.LossContrastMode.ONE_VIEW
  assert a.stage_1.optimizer == enums.Optimizer.LARS
  assert a.augment.eval_crop_method == enums.EvalCropMethod.CROP_THEN_RESIZE


def test_overrides_and_aliases():
  c = _parse('--input_fn=cifar10', '--batch_size=64',
             '--projection_head_layers=512,64', '--crop_area_range=0.2,1',
             '--stage_2_decay_boundary_epochs=10,20')
  assert c.data.dataset == 'cifar10' and c.data.batch_size == 64
  assert c.model.projection_head_layers == (512, 64)
  assert c.augment.crop_area_range == (0.2, 1.0)
  assert c.stage_2.decay_boundary_epochs == (10.0, 20.0)
  assert _parse('--dataset=digits', '--input_fn=cifar10').data.dataset == (
      'digits')


@pytest.mark.parametrize('args,flag', [
    (['--positives_cap=3'], 'positives_cap'),
    (['--num_views=3', '--positives_cap=4'], 'positives_cap'),
    (['--stage_1_epochs=-1'], 'stage_1_epochs'),
    (['--temperature=0'], 'temperature'),
    (['--resnet_depth=42'], 'resnet_depth'),
    (['--batch_size=0'], 'batch_size'),
    (['--crop_area_range=0.5'], 'crop_area_range'),
    (['--crop_area_range=0.9,0.1'], 'crop_area_range'),
    (['--label_noise_prob=1.5'], 'label_noise_prob'),
    (['--projection_head_layers=128,x'], 'projection_head_layers'),
    (['--stage_2_decay_boundary_epochs=60,30'], 'stage_2_decay_boundary_epochs'),
    (['--retrieval_ks=1,8', '--retrieval_max_neighbours=4'], 'retrieval_ks'),
    (['--retrieval_max_neighbours=0'], 'retrieval_max_neighbours'),
    (['--retrieval_chunk_size=0'], 'retrieval_chunk_size'),
    (['--monitor_every_epochs=-1'], 'monitor_every_epochs'),
    (['--samples_per_class=1'], 'samples_per_class'),
    (['--batch_size=12', '--samples_per_class=5'], 'samples_per_class'),
    (['--batch_size=12', '--micro_batch_size=5'], 'micro_batch_size'),
    (['--folder_test_fraction=1'], 'folder_test_fraction'),
    (['--dataset=folder:'], 'dataset'),
])
def test_invalid_values_name_the_flag(args, flag):
  with pytest.raises(config_lib.ConfigError, match=f'--{flag}:'):
    _parse(*args)


def test_unknown_enum_value_fails_at_parse():
  with pytest.raises(flags.IllegalFlagValueError, match='contrast_mode'):
    _parse('--contrast_mode=some_views')


def test_config_is_frozen_and_json_round_trips():
  c = _parse('--contrast_mode=one_view', '--num_views=3', '--positives_cap=6')
  with pytest.raises(Exception):
    c.loss.temperature = 1.0  # type: ignore[misc]
  assert config_lib.ExperimentConfig.from_json(c.to_json()) == c
  d = json.loads(c.to_json())
  assert d['loss']['contrast_mode'] == 'one_view'


def test_replace_coerces_enum_names_and_sequences():
  c = config_lib.ExperimentConfig().replace(
      runtime__mode='TRAIN_then_eval', loss__contrast_mode='one_view',
      model__projection_head_layers=[64, 32])
  assert c.runtime.mode is enums.Mode.TRAIN_THEN_EVAL
  assert c.loss.contrast_mode is enums.LossContrastMode.ONE_VIEW
  assert c.model.projection_head_layers == (64, 32)
  with pytest.raises(config_lib.ConfigError, match=r'RuntimeConfig\.mode.*fit'):
    config_lib.ExperimentConfig().replace(runtime__mode='fit')


def test_replace_and_diff():
  c = config_lib.ExperimentConfig()
  c2 = c.replace(data__batch_size=32, loss__temperature=0.1)
  assert c2.data.batch_size == 32 and c2.loss.temperature == 0.1
  assert config_lib.diff(c, c2) == {'data.batch_size': (2048, 32),
                                    'loss.temperature': (0.07, 0.1)}
  with pytest.raises(config_lib.ConfigError, match='--temperature'):
    c.replace(loss__temperature=-1.0)


def test_from_dict_rejects_unknown_fields():
  d = config_lib.ExperimentConfig().to_dict()
  d['loss']['tempreature'] = 0.1
  with pytest.raises(config_lib.ConfigError, match='tempreature'):
    config_lib.ExperimentConfig.from_dict(d)


def _main(*args, cwd=None):
  return subprocess.run([sys.executable, '-m', 'supcon_tf.main', *args],
                        capture_output=True, text=True, cwd=cwd or ROOT,
                        timeout=120)


def test_dry_run_prints_config_and_leaves_model_dir_alone(tmp_path):
  model_dir = tmp_path / 'not_created'
  out = _main('--dry_run', '--dataset=digits', '--temperature=0.5',
              f'--model_dir={model_dir}')
  assert out.returncode == 0, out.stderr
  d = json.loads(out.stdout)
  assert d['loss']['temperature'] == 0.5 and d['data']['dataset'] == 'digits'
  assert d['runtime']['model_dir'] == str(model_dir)
  assert not model_dir.exists()


def test_dry_run_bad_flag_exits_nonzero_with_message():
  out = _main('--dry_run', '--positives_cap=3')
  assert out.returncode != 0
  assert '--positives_cap' in out.stderr
  out = _main('--dry_run', '--denominator_mode=most')
  assert out.returncode != 0 and 'denominator_mode' in out.stderr


def test_flagfile(tmp_path):
  f = tmp_path / 'x.cfg'
  f.write_text('--batch_size=96\n--resnet_depth=18\n--use_labels=false\n')
  out = _main(f'--flagfile={f}', '--dry_run')
  assert out.returncode == 0, out.stderr
  d = json.loads(out.stdout)
  assert d['data']['batch_size'] == 96 and d['model']['depth'] == 18
  assert d['loss']['use_labels'] is False
