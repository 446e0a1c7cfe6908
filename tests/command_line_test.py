"""Mutated quickstart command lines: each runs, or fails in one `error:` line.

The mutations of flags/quickstart_digits.cfg a new user makes (out-of-range and
mismatched values, unknown enum names, bad lists, an empty --model_dir, modes
in the wrong order) are checked in-process the way `main` checks them (absl
parsing, `config_from_flags`, `check_model_dir`): each parses, or raises a
`flags.Error` / `errors.UserError` whose message is one line naming a flag.
A few real `python -m supcon_tf.main` runs then check what the user sees:
exit 1, one `error:` line on stderr, no traceback. About 40 s (4 processes).
"""

import os
import subprocess
import sys

from absl import flags
import pytest

from supcon_tf import config as config_lib
from supcon_tf import errors

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = ['--flagfile=flags/quickstart_digits.cfg']

# (extra flags, a flag the error must name; None = the command is valid).
MUTATIONS = [
    ([], None),
    (['--stage_1_epochs=1'], '--stage_1_warmup_epochs'),
    (['--stage_1_epochs=5'], '--stage_1_epochs'),  # == warmup (5).
    (['--stage_2_epochs=2', '--stage_2_warmup_epochs=3'],
     '--stage_2_warmup_epochs'),
    (['--stage_1_epochs=0'], None),  # A skipped stage's warmup is unused.
    (['--stage_1_epochs=-1'], '--stage_1_epochs'),
    (['--stage_1_warmup_epochs=-1'], '--stage_1_warmup_epochs'),
    (['--resnet_depth=19'], '--resnet_depth'),
    (['--resnet_architecture=resnext'], '--resnet_depth'),  # Depth 18.
    (['--resnet_architecture=resnext', '--resnet_depth=50'],
     '--resnet_width'),  # Width 0.25 cannot be split into 64 groups.
    (['--resnet_architecture=resnext', '--resnet_depth=50',
      '--resnet_width=0.5'], None),
    (['--resnet_architecture=resnet'], '--resnet_architecture'),
    (['--resnet_width=0'], '--resnet_width'),
    (['--resnet_width=0.01'], '--resnet_width'),
    (['--resnet_depth=eighteen'], '--resnet_depth'),
    (['--batch_size=0'], '--batch_size'),
    (['--batch_size=-128'], '--batch_size'),
    (['--eval_batch_size=0'], '--eval_batch_size'),
    (['--num_views=0'], '--num_views'),
    (['--num_views=3'], None),
    (['--positives_cap=3'], '--positives_cap'),
    (['--temperature=0'], '--temperature'),
    (['--temperature=-0.1'], '--temperature'),
    (['--label_smoothing=1'], '--label_smoothing'),
    (['--image_size=0'], '--image_size'),
    (['--crop_area_range=0.8'], '--crop_area_range'),
    (['--crop_area_range=1.0,0.8'], '--crop_area_range'),
    (['--crop_area_range=0,1'], '--crop_area_range'),
    (['--crop_area_range=a,b'], '--crop_area_range'),
    (['--projection_head_layers='], '--projection_head_layers'),
    (['--projection_head_layers=128,-1'], '--projection_head_layers'),
    (['--projection_head_layers=128,6.5'], '--projection_head_layers'),
    (['--stage_1_decay_boundary_epochs=30,10'],
     '--stage_1_decay_boundary_epochs'),
    (['--stage_1_decay_boundary_epochs=x'], '--stage_1_decay_boundary_epochs'),
    (['--stage_1_optimizer=sgd'], '--stage_1_optimizer'),
    (['--stage_1_optimizer=LARS'], None),
    (['--stage_2_learning_rate_decay=linear'], '--stage_2_learning_rate_decay'),
    (['--augmentation_type=simclr_v2'], '--augmentation_type'),
    (['--blur_probability=2'], '--blur_probability'),
    (['--mode=fit'], '--mode'),
    (['--mode=pretrain', '--model_dir='], '--model_dir'),
    (['--mode=classifier', '--model_dir='], '--model_dir'),
    (['--mode=eval', '--model_dir='], '--model_dir'),
    (['--mode=export', '--model_dir='], '--model_dir'),
    (['--mode=eval', '--model_dir=', '--reference_ckpt=/nowhere'], None),
    (['--mode=plot_embeddings', '--model_dir='], '--model_dir'),
    (['--corruptions=fog,rain'], '--corruptions'),
    (['--corruptions=fog,saturate'], None),
    (['--severities=0,1'], '--severities'),
    (['--severities=1,x'], '--severities'),
    (['--knn_k=0'], '--knn_k'),
    (['--knn_k='], '--knn_k'),
    (['--mix=cutmix'], '--contrastive_loss'),
    (['--mix=cutmix', '--contrastive_loss=genscl'], None),
    (['--contrastive_loss=genscl', '--positives_cap=2'], '--positives_cap'),
    (['--queue_size=-1'], '--queue_size'),
    (['--queue_size=64', '--loss_chunk_size=32'], '--loss_chunk_size'),
    (['--momentum=1'], '--momentum'),
    (['--teacher=/x'], '--teacher'),
    (['--label_noise_prob=-0.1'], '--label_noise_prob'),
    (['--steps_per_loop=0'], '--steps_per_loop'),
    (['--max_train_steps=-1'], '--max_train_steps'),
    (['--dataset='], None),  # Falls back to --input_fn.
    (['--batch_sizee=64'], '--batch_sizee'),  # A typo.
]


def _check_like_main(args, model_dir='/tmp/unused'):
  """What main does before running a mode; returns the config or raises."""
  fv = flags.FlagValues()
  config_lib.define_flags(fv)
  fv(['supcon_tf', *QUICKSTART, f'--model_dir={model_dir}', *args])
  config = config_lib.config_from_flags(fv)
  config_lib.check_model_dir(config)
  return config


@pytest.mark.parametrize('args, flag', MUTATIONS,
                         ids=[' '.join(a) or 'quickstart' for a, _ in MUTATIONS])
def test_mutated_quickstart_parses_or_names_the_flag(args, flag, monkeypatch):
  monkeypatch.chdir(ROOT)  # Nested flagfiles are relative to the root.
  if flag is None:
    _check_like_main(args)
    return
  with pytest.raises((flags.Error, errors.UserError)) as raised:
    _check_like_main(args)
  message = str(raised.value)
  assert '\n' not in message.strip(), message
  assert flag in message or flag.lstrip('-') in message, message


def test_every_user_error_class_derives_from_user_error():
  # pylint: disable=g-import-not-at-top
  from supcon_tf import distribute
  from supcon_tf import export
  from supcon_tf.data import datasets
  from supcon_tf.evaluation import classify
  from supcon_tf.evaluation import corruptions
  from supcon_tf.training import checkpoints
  from supcon_tf.training import distill
  from supcon_tf.training import trainer
  # pylint: enable=g-import-not-at-top
  for cls, other_base in [
      (config_lib.ConfigError, ValueError), (datasets.DatasetError, ValueError),
      (checkpoints.CheckpointError, RuntimeError),
      (checkpoints.ConfigMismatchError, RuntimeError),
      (trainer.TrainingError, RuntimeError),
      (trainer.NonFiniteError, FloatingPointError),
      (export.ExportError, RuntimeError), (distill.TeacherError, ValueError),
      (corruptions.CorruptionError, ValueError),
      (distribute.TFConfigError, ValueError), (classify.EvalError, RuntimeError)]:
    assert issubclass(cls, errors.UserError), cls
    assert issubclass(cls, other_base), cls  # `except ValueError` still works.
  assert not issubclass(trainer.Preempted, errors.UserError)


def _main(*args):
  return subprocess.run(
      [sys.executable, '-m', 'supcon_tf.main', *args], capture_output=True,
      text=True, cwd=ROOT, timeout=300,
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3', PYTHONPATH=ROOT))


def _assert_one_error_line(proc, *needles):
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert 'Traceback' not in proc.stderr, proc.stderr[-3000:]
  lines = [l for l in proc.stderr.splitlines() if l.startswith('error: ')]
  assert len(lines) == 1, proc.stderr[-3000:]
  for needle in needles:
    assert needle in lines[0], lines[0]


@pytest.mark.parametrize('args, needles', [
    # The example: once a 30-line traceback from the LR schedule.
    (['--stage_1_epochs=1'], ['--stage_1_warmup_epochs', '--stage_1_epochs']),
    (['--stage_1_optimizer=sgd'], ['--stage_1_optimizer=sgd']),
    (['--mode=pretrain', '--model_dir='], ['--model_dir is required']),
])
def test_command_line_bad_values_one_error_line(args, needles):
  _assert_one_error_line(_main(*QUICKSTART, *args), *needles)


def test_modes_in_the_wrong_order_one_error_line(tmp_path):
  # Eval before any training: a run-time error (TF imported), still one line.
  proc = _main(*QUICKSTART, '--mode=eval', f'--model_dir={tmp_path}',
               '--max_eval_steps=1')
  _assert_one_error_line(proc, 'No checkpoint', str(tmp_path))
  # The classifier before the pretraining it builds on.
  proc = _main(*QUICKSTART, '--mode=classifier', f'--model_dir={tmp_path}',
               '--max_train_steps=1')
  _assert_one_error_line(proc, 'pretrained encoder')
