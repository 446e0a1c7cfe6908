"""Preemption, hard kills, NaN guard, checkpoint integrity, multi-worker loss.

The expensive pieces are shared: one uninterrupted reference run (module
fixture) is both the yardstick of the interrupted runs and the source of the
checkpoints that the integrity tests corrupt. Subprocesses run the real
command line (`python -m supcon_tf.main`).
"""

import functools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

from absl import flags
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.python.framework import config as tf_config_lib

from supcon_tf import config as config_lib
from supcon_tf import enums
from supcon_tf import export
from supcon_tf import losses
from supcon_tf.data import pipeline
from supcon_tf.training import checkpoints
from supcon_tf.training import trainer as train
from tests.conftest import mirrored_strategy
from tests.testing import ONE_DEVICE
from tests.testing import free_ports
from tests.testing import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Steps of the interrupted / uninterrupted runs.
NUM_STEPS = 8

# The command-line twin of train_test.tiny_config (a test checks they agree).
TINY_FLAGS = (
    '--resnet_depth=18', '--resnet_width=0.25', '--first_conv_kernel_size=3',
    '--first_conv_stride=1', '--nouse_initial_max_pool',
    '--projection_head_layers=32,16', '--dataset=digits', '--batch_size=16',
    '--eval_batch_size=64', '--image_size=16', '--augmentation_type=simclr',
    '--blur_probability=0.0', '--stage_1_epochs=1', '--stage_1_warmup_epochs=0',
    '--stage_1_optimizer=momentum', '--stage_1_base_learning_rate=0.1',
    '--stage_2_epochs=1', '--stage_2_warmup_epochs=0',
    '--stage_2_optimizer=momentum', '--max_train_steps=2', '--max_eval_steps=1',
    '--steps_per_loop=2', '--summary_interval_steps=1',
    '--save_interval_steps=1')
# What the preemption runs change: every step saved, deferred blur on (the
# step's only random op), reproducible.
RUN_FLAGS = ('--mode=pretrain', f'--max_train_steps={NUM_STEPS}',
             '--steps_per_loop=1', f'--max_checkpoints_to_keep={NUM_STEPS}',
             '--blur_probability=0.5', '--defer_blurring', '--deterministic')


def _config_from_argv(argv) -> config_lib.ExperimentConfig:
  fv = flags.FlagValues()
  config_lib.define_flags(fv)
  fv(['supcon_tf'] + list(argv))
  return config_lib.config_from_flags(fv)


def _run_argv(model_dir):
  return list(TINY_FLAGS) + list(RUN_FLAGS) + [f'--model_dir={model_dir}']


def _env(**extra):
  return dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3', **extra)


def _newest_step(directory) -> int:
  latest = checkpoints.latest_in(str(directory))
  return int(latest.rsplit('-', 1)[1]) if latest else 0


def _wait_for_step(directory, step, procs, timeout=600):
  """Waits until a checkpoint >= `step` is in `directory` (procs running)."""
  deadline = time.time() + timeout
  while _newest_step(directory) < step:
    for p in procs:
      if p.poll() is not None:
        out, err = p.communicate()
        raise AssertionError(f'exited early ({p.returncode}): {out[-2000:]}\n'
                             f'{err[-3000:]}')
    if time.time() > deadline:
      raise AssertionError(f'no checkpoint {step} in {directory}')
    time.sleep(0.02)


def _checkpoint_values(prefix):
  """Every saved tensor (model, optimizer slots, step) but the save counter."""
  reader = tf.train.load_checkpoint(prefix)
  return {k: reader.get_tensor(k) for k in reader.get_variable_to_shape_map()
          if 'save_counter' not in k and '_CHECKPOINTABLE_OBJECT_GRAPH' not in k}


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  """The uninterrupted run: NUM_STEPS deterministic steps, in process."""
  model_dir = tmp_path_factory.mktemp('reference')
  config = _config_from_argv(_run_argv(model_dir))
  previous = signal.getsignal(signal.SIGTERM)
  try:
    trainer = train.Trainer(config, ONE_DEVICE, 1)
    trainer.train()
  finally:
    tf_config_lib.disable_op_determinism()  # Process-wide: leave it off.
  assert signal.getsignal(signal.SIGTERM) is previous  # Handler restored.
  return config, model_dir


def test_flags_twin_of_tiny_config(tmp_path):
  assert _config_from_argv(TINY_FLAGS + (f'--model_dir={tmp_path}',)) == (
      tiny_config(tmp_path))


def test_sigkill_then_resume_then_sigterm_equals_uninterrupted(tmp_path,
                                                               reference):
  """The real command: kill -9 loses at most save_interval_steps; the restart
  resumes (weights, slots, step, data position, blur randomness); SIGTERM
  saves the current step and exits 75; that checkpoint is bit-identical to
  the uninterrupted run's at the same step."""
  command = [sys.executable, '-m', 'supcon_tf.main'] + _run_argv(tmp_path)
  ckpt_dir = tmp_path / 'pretrain'
  # The child runs at a lower priority than this test, so that on a loaded
  # machine the signals still arrive within a step or two of the checkpoint
  # they wait for (the run is only NUM_STEPS long).
  lower_priority = functools.partial(os.nice, 10)
  # 1. kill -9 once checkpoints exist: the newest survives.
  p = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       text=True, env=_env(), cwd=ROOT,
                       preexec_fn=lower_priority)
  _wait_for_step(ckpt_dir, 2, [p])
  p.send_signal(signal.SIGKILL)
  p.communicate(timeout=60)
  assert p.returncode == -signal.SIGKILL
  killed_at = _newest_step(ckpt_dir)
  assert 2 <= killed_at < NUM_STEPS - 2
  # 2. The same command resumes there; SIGTERM after its next checkpoint:
  # it saves at the end of the chunk (one step) and exits 75.
  p = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       text=True, env=_env(), cwd=ROOT,
                       preexec_fn=lower_priority)
  _wait_for_step(ckpt_dir, killed_at + 1, [p])
  p.send_signal(signal.SIGTERM)
  out, err = p.communicate(timeout=300)
  assert p.returncode == train.PREEMPTED_EXIT_CODE, err[-3000:]
  assert (f'resuming from {ckpt_dir}/ckpt-{killed_at} at step {killed_at}'
          in out)
  match = re.search(r'stopped by SIGTERM \(preemption\) after saving step '
                    r'(\d+) to (\S+)\. Run the same command again to resume',
                    err)
  assert match, err[-3000:]
  saved = int(match.group(1))
  assert killed_at < saved < NUM_STEPS and _newest_step(ckpt_dir) == saved
  assert match.group(2) == f'{ckpt_dir}/ckpt-{saved}'
  # 3. Equal, bit for bit, to the uninterrupted run at that step.
  got = _checkpoint_values(str(ckpt_dir / f'ckpt-{saved}'))
  want = _checkpoint_values(str(reference[1] / 'pretrain' / f'ckpt-{saved}'))
  assert set(got) == set(want) and len(got) > 50
  for key in want:
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)


@pytest.mark.parametrize('replicas', [1, 2])
def test_input_stream_resumes_at_the_step(replicas):
  """build_dataset(start_step=k) continues the stream of a run at step k, on
  one device and on two mirrored replicas (one pipeline, two batches/step)."""
  strategy = ONE_DEVICE if replicas == 1 else mirrored_strategy(2)
  config = tiny_config('/unused', data__num_images=48,
                       augment__blur_probability=0.0)
  start = 4  # 4 * 16 images > 48: the resumed stream starts in epoch 1.

  def batches(start_step, n):
    dataset = strategy.distribute_datasets_from_function(
        lambda ctx: pipeline.build_dataset(config, ctx, True, start_step))
    iterator = iter(dataset)
    return [[np.concatenate([t.numpy() for t in
                             strategy.experimental_local_results(x)])
             for x in next(iterator)] for _ in range(n)]

  full = batches(0, start + 2)
  resumed = batches(start, 2)
  for want, got in zip(full[start:], resumed):
    np.testing.assert_array_equal(got[1], want[1])  # Labels.
    np.testing.assert_array_equal(got[0], want[0])  # Augmented views.
  # Each epoch is shuffled differently.
  assert not np.array_equal(full[0][1], full[3][1])


def _poison_gradients_from_step(monkeypatch, holder, step):
  """From optimizer step `step` on, the contrastive loss keeps a finite value
  but gets a NaN gradient (0 * d sqrt(x)/dx at x = 0)."""
  original = losses.supcon_loss

  def poisoned(features, *args, **kwargs):
    out = original(features, *args, **kwargs)
    on = tf.cast(tf.convert_to_tensor(holder['iterations']) >= step,
                 features.dtype)
    inner = on * tf.reduce_sum(features * 0.0) + (1.0 - on)
    return out + (tf.sqrt(inner) - (1.0 - on))

  monkeypatch.setattr(losses, 'supcon_loss', poisoned)


def test_non_finite_gradient_stops_without_saving(tmp_path, monkeypatch):
  config = tiny_config(tmp_path, runtime__max_train_steps=4,
                       runtime__steps_per_loop=1, stage_2__epochs=0)
  holder = {}
  _poison_gradients_from_step(monkeypatch, holder, 2)  # Steps 3, 4.
  trainer = train.Trainer(config, ONE_DEVICE, 1)
  holder['iterations'] = trainer.optimizer.iterations
  with pytest.raises(train.NonFiniteError) as info:
    trainer.train()
  message = str(info.value)
  # Names the step and the terms; the loss itself was still finite.
  assert 'non-finite gradient_norm at step 3' in message
  assert "'contrastive_loss'" in message and 'last checkpoint (step 2)' in message
  assert isinstance(info.value, FloatingPointError)
  latest = checkpoints.latest_in(str(tmp_path / 'pretrain'))
  assert latest.endswith('ckpt-2')
  for key, value in _checkpoint_values(latest).items():
    if np.issubdtype(value.dtype, np.floating):
      assert np.all(np.isfinite(value)), key
  # The weights are NaN now: saving them is refused, nothing is written.
  with pytest.raises(train.NonFiniteError, match='not finite at step 9'):
    trainer._save(9)  # pylint: disable=protected-access
  assert not tf.io.gfile.glob(str(tmp_path / 'pretrain' / 'ckpt-9*'))


def test_non_finite_loss_message_names_steps_and_terms(tmp_path):
  trainer = train.Trainer.__new__(train.Trainer)
  trainer.plan = train.StagePlan(1, config_lib.StageConfig(), 16, 2, 10.0, 10)
  metrics = {'loss': float('nan'), 'contrastive_loss': float('inf'),
             'top_1_accuracy': 0.5}
  with pytest.raises(train.NonFiniteError) as info:
    trainer._check_metrics(metrics, 4, 6, 4)  # pylint: disable=protected-access
  message = str(info.value)
  assert message.startswith('[pretrain] non-finite contrastive_loss, loss at '
                            'steps 5..6 (rerun with --steps_per_loop=1')
  assert 'top_1_accuracy' in message and '(step 4)' in message


def _truncate(path):
  with open(path, 'rb') as f:
    data = f.read()
  with open(path, 'wb') as f:
    f.write(data[:len(data) // 2])


def test_corrupt_newest_checkpoint_falls_back(tmp_path, reference, capsys):
  config, ref_dir = reference
  model_dir = tmp_path / 'run'
  shutil.copytree(ref_dir / 'pretrain', model_dir / 'pretrain')
  ckpt_dir = model_dir / 'pretrain'
  trainer = train.Trainer(config.replace(runtime__model_dir=str(model_dir)),
                          ONE_DEVICE, 1)
  newest = NUM_STEPS
  # A truncated data file: the previous checkpoint is used, with a warning.
  data_file, = tf.io.gfile.glob(str(ckpt_dir / f'ckpt-{newest}.data-*'))
  _truncate(data_file)
  assert trainer.restore_or_initialize() == newest - 1
  err = capsys.readouterr().err
  assert f'ckpt-{newest} cannot be restored' in err
  assert f'restored {ckpt_dir}/ckpt-{newest - 1} instead' in err
  # A corrupt index and a garbage `checkpoint` state file: still found.
  _truncate(str(ckpt_dir / f'ckpt-{newest - 1}.index'))
  (ckpt_dir / 'checkpoint').write_text('garbage {')
  assert trainer.restore_or_initialize() == newest - 2
  # Eval / export use the same fallback.
  info = train.datasets.get_dataset_info(config.data)
  model = checkpoints.load_model_for_inference(
      config.replace(runtime__model_dir=str(model_dir)), info)
  np.testing.assert_array_equal(model.get_weights()[0],
                                trainer.model.get_weights()[0])
  # None readable: a clear error rather than silently starting over.
  for path in tf.io.gfile.glob(str(ckpt_dir / '*.index')):
    _truncate(path)
  with pytest.raises(checkpoints.CheckpointError,
                     match=r'No checkpoint in .*pretrain can be restored'):
    trainer.restore_or_initialize()


def test_model_dir_of_another_experiment_is_refused(tmp_path):
  config = tiny_config(tmp_path)
  checkpoints.write_config(config)
  # How and where a run executes may change.
  checkpoints.write_config(config.replace(
      runtime__mode=enums.Mode.EVAL, runtime__max_train_steps=7,
      runtime__export_dir='/elsewhere', runtime__steps_per_loop=5,
      data__eval_batch_size=8, data__data_dir='/data'))
  other = config.replace(loss__temperature=0.5, data__batch_size=32)
  with pytest.raises(checkpoints.ConfigMismatchError) as info:
    checkpoints.write_config(other)
  message = str(info.value)
  assert 'differs in 2 field(s)' in message
  assert 'data.batch_size: 16 in config.json, 32 now' in message
  assert 'loss.temperature: 0.07 in config.json, 0.5 now' in message
  assert '--override_config' in message
  with pytest.raises(checkpoints.ConfigMismatchError):
    train.train_stage(other, ONE_DEVICE, 1)  # Before any model is built.
  checkpoints.write_config(other.replace(runtime__override_config=True))
  saved = config_lib.ExperimentConfig.from_json(
      (tmp_path / 'config.json').read_text())
  assert saved.loss.temperature == 0.5
  assert not (tmp_path / 'config.json.tmp').exists()


def test_export_dir_overwrite_rules(tmp_path):
  config = tiny_config(tmp_path / 'run')
  explicit = tmp_path / 'served'
  explicit.mkdir()
  (explicit / 'saved_model.pb').write_text('x')
  with pytest.raises(export.ExportError, match='not empty; pass --overwrite'):
    export.check_export_dir(config.replace(runtime__export_dir=str(explicit)))
  assert export.check_export_dir(config.replace(
      runtime__export_dir=str(explicit),
      runtime__overwrite=True)) == str(explicit)
  # The run's own model_dir/export is replaced by every train_then_eval.
  default = tmp_path / 'run' / 'export'
  default.mkdir(parents=True)
  (default / 'saved_model.pb').write_text('x')
  assert export.check_export_dir(config) == str(default)
  # train_then_eval refuses before training, not after.
  with pytest.raises(export.ExportError):
    from supcon_tf import main as main_lib  # pylint: disable=g-import-not-at-top
    main_lib.run(config.replace(runtime__export_dir=str(explicit),
                                runtime__mode=enums.Mode.TRAIN_THEN_EVAL),
                 ONE_DEVICE)
  assert not (tmp_path / 'run' / 'pretrain').exists()


def test_multi_worker_peer_killed_then_restart_then_sigterm(tmp_path):
  """2 workers: kill -9 one, the survivor stops with a clear error in bounded
  time; both restarted resume from the checkpoint; SIGTERM to one stops both
  at the same step (exit 75)."""
  ports = free_ports(2)
  cluster = {'worker': [f'127.0.0.1:{p}' for p in ports]}
  model_dir = tmp_path / 'run'
  argv = list(TINY_FLAGS) + [
      '--mode=pretrain', '--max_train_steps=50', '--steps_per_loop=1',
      f'--model_dir={model_dir}']
  ckpt_dir = model_dir / 'pretrain'

  def start():
    procs = []
    for task in range(2):
      tf_config = json.dumps({'cluster': cluster,
                              'task': {'type': 'worker', 'index': task}})
      procs.append(subprocess.Popen(
          [sys.executable, os.path.join(ROOT, 'tests', 'workers',
                                        'main_worker.py')] + argv,
          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
          env=_env(TF_CONFIG=tf_config, SUPCON_TEST_HEALTH_INTERVAL='1')))
    return procs

  def finish(procs, timeout):
    results = []
    for p in procs:
      try:
        out, err = p.communicate(timeout=timeout)
      finally:
        if p.poll() is None:
          p.kill()
      results.append((p.returncode, out, err))
    return results

  # Generous limits: start-up and tracing of two workers on a loaded 2-core
  # machine take minutes; detection itself takes ~13 s here (30-45 s with
  # TF's default health-check interval).
  procs = start()
  try:
    _wait_for_step(ckpt_dir, 2, procs, timeout=600)
    procs[1].send_signal(signal.SIGKILL)
    killed = time.time()
    (code, out, err), _ = finish(procs, timeout=300)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  assert time.time() - killed < 300
  assert code == 1, out[-2000:] + err[-3000:]
  assert 'error: [pretrain] a worker of the multi-worker job stopped' in err
  assert 'Restart every worker with the same command' in err
  at_kill = _newest_step(ckpt_dir)

  procs = start()
  try:
    _wait_for_step(ckpt_dir, at_kill + 1, procs, timeout=600)
    procs[1].send_signal(signal.SIGTERM)
    results = finish(procs, timeout=300)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  steps = []
  for code, out, err in results:
    assert code == train.PREEMPTED_EXIT_CODE, out[-2000:] + err[-3000:]
    steps.append(int(re.search(r'after saving step (\d+)', err).group(1)))
  assert steps[0] == steps[1] == _newest_step(ckpt_dir) > at_kill
  assert f'resuming from {ckpt_dir}/ckpt-{at_kill} at step {at_kill}' in (
      results[0][1])
