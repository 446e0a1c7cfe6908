"""Gradient caching (`--micro_batch_size`) through the real stage-1 Trainer.

tests/grad_cache_test.py checks `grad_cache.cached_gradients` on a tiny conv
model; these tests run it where it is used: `Trainer` -> `TrainStep` on the
tiny ResNet-18 of tests/train_test.py (width 0.125, 16 px digits, batch 16,
2 views), SupCon + weight decay.
"""

import dataclasses

from absl import flags
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.python.framework import config as tf_config_lib

from supcon_tf import config as config_lib
from supcon_tf.training import trainer as train
from tests.conftest import mirrored_strategy
from tests.train_test import ONE_DEVICE
from tests.train_test import tiny_config

# The float32 noise floor of a sum reordered by micro-batches (see
# tests/grad_cache_test.py): relative to each gradient's largest entry.
FULL_BATCH_RTOL = 2e-4


def _assert_grads_close(got, want, rtol):
  assert len(got) == len(want)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=rtol,
                               atol=rtol * np.max(np.abs(w)))


def _checkpoint_values(prefix):
  """Every saved tensor but the save counter."""
  reader = tf.train.load_checkpoint(prefix)
  return {k: reader.get_tensor(k) for k in reader.get_variable_to_shape_map()
          if 'save_counter' not in k and '_CHECKPOINTABLE_OBJECT_GRAPH' not in k}


def _config(model_dir, micro, bn_inference=False, **overrides):
  if bn_inference:
    # As after a warm start from a reference checkpoint with the reference's
    # default --nobatch_norm_in_train_mode: batch norm in inference mode (the
    # step never reads the checkpoint itself).
    overrides.update(warm_start__reference_ckpt=str(model_dir / 'ref'),
                     warm_start__batch_norm_in_train_mode=False)
  return tiny_config(model_dir / f'm{micro}', model__width=0.125,
                     stage_1__weight_decay=1e-3,
                     runtime__micro_batch_size=micro, **overrides)


def _trainers(tmp_path, strategy, micro, **overrides):
  """(plain, cached) stage-1 trainers holding the same initial weights."""
  plain = train.Trainer(_config(tmp_path, 0, **overrides), strategy, 1)
  cached = train.Trainer(_config(tmp_path, micro, **overrides), strategy, 1)
  cached.model.set_weights(plain.model.get_weights())
  assert cached.step.micro_batch_size == micro
  assert plain.step.micro_batch_size == 0
  return plain, cached


def _summed_gradients(trainer, batch):
  """The step's loss and gradients (scaled), summed over replicas."""
  strategy = trainer.strategy

  def replica_fn(images, labels):
    images, targets = trainer.extensions.prepare(
        images, labels, trainer.optimizer.iterations)
    total, _, grads = trainer.step.gradients(images, labels, targets)
    return [total] + [g for g in grads if g is not None]

  @tf.function
  def run(images, labels):
    out = strategy.run(replica_fn, args=(images, labels))
    return [strategy.reduce(tf.distribute.ReduceOp.SUM, o, axis=None)
            for o in out]
  out = run(*batch)
  return float(out[0]), [g.numpy() for g in out[1:]]


# GenSCL with the momentum queue: the extension's loss inside the cached loss.
GENSCL_QUEUE = dict(loss__contrastive_loss='genscl', loss__queue_size=32)


@pytest.mark.parametrize('replicas,micro,overrides', [
    (1, 4, {}), (1, 4, GENSCL_QUEUE), (4, 2, {})])
def test_trainer_gradient_equals_full_batch(tmp_path, replicas, micro,
                                            overrides):
  # Batch norm in inference mode: micro-batches do not interact, so the
  # cached gradient is the plain full-batch gradient (4 replicas: per-replica
  # batch 4 in micro-batches of 2, the loss over the gathered 16).
  strategy = ONE_DEVICE if replicas == 1 else mirrored_strategy(replicas)
  plain, cached = _trainers(tmp_path, strategy, micro, bn_inference=True,
                            **overrides)
  assert cached.step.loss_plan.contrastive_by_extension == bool(overrides)
  assert not cached.step.bn_training
  stats = [v.numpy() for v in cached.model.non_trainable_variables]
  batch = next(plain.make_iterator(0))
  want_loss, want = _summed_gradients(plain, batch)
  got_loss, got = _summed_gradients(cached, batch)
  np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
  assert len(got) == len(want) == len(cached.model.trainable_variables) - 2
  _assert_grads_close(got, want, rtol=FULL_BATCH_RTOL)
  for a, b in zip(cached.model.non_trainable_variables, stats):
    np.testing.assert_array_equal(a.numpy(), b)  # Inference mode: untouched.


def test_trainer_batch_norm_moving_averages_once_per_micro_batch(tmp_path):
  # Training-mode batch norm: one real step with micro-batches of 4 of 16
  # leaves the moving averages where 4 training-mode forwards of the
  # micro-batches, in order, leave them (the embedding pass adds nothing),
  # not where one full-batch forward does.
  plain, cached = _trainers(tmp_path, ONE_DEVICE, 4)
  assert cached.step.bn_training
  images, labels = next(plain.make_iterator(0))
  tf.function(lambda: cached.step(images, labels))()
  got = [v.numpy() for v in cached.model.non_trainable_variables]
  initial = plain.model.get_weights()
  for i in range(0, 16, 4):
    plain.model(images[i:i + 4], training=True)
  want = [v.numpy() for v in plain.model.non_trainable_variables]
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
  plain.model.set_weights(initial)
  plain.model(images, training=True)
  full = [v.numpy() for v in plain.model.non_trainable_variables]
  assert not all(np.allclose(g, f, rtol=1e-4) for g, f in zip(got, full))
  assert int(cached.optimizer.iterations.numpy()) == 1


def test_resume_is_bit_identical_mixed_precision_steps_per_loop(tmp_path):
  # --deterministic, bfloat16, deferred blur (the step's random op): 2 steps
  # in one tf.function call (--steps_per_loop=2) equal 1 step, a checkpoint,
  # a new Trainer resuming from it and 1 more step.
  def config(name, steps):
    return _config(tmp_path / name, 4, runtime__deterministic=True,
                   runtime__max_train_steps=steps,
                   runtime__steps_per_loop=2,
                   runtime__save_interval_steps=2,
                   runtime__summary_interval_steps=2,
                   augment__allow_mixed_precision=True,
                   augment__blur_probability=0.5,
                   augment__defer_blurring=True)
  try:
    whole = train.Trainer(config('whole', 2), ONE_DEVICE, 1)
    assert whole.model.encoder_compute_dtype == 'bfloat16'
    calls = []
    loop = whole._make_loop()  # pylint: disable=protected-access
    whole._loop_fn = lambda it, n: calls.append(int(n)) or loop(it, n)  # pylint: disable=protected-access
    metrics = whole.train()
    assert calls == [2]  # One call of 2 steps.
    resumed = train.Trainer(config('split', 1), ONE_DEVICE, 1)
    resumed.train()
    # Scramble every variable, then resume to step 2 (same traced loop): all
    # the state must come back from the checkpoint of step 1.
    for v in resumed.model.variables + resumed.optimizer.variables:
      v.assign(tf.cast(tf.fill(v.shape, 3), v.dtype))
    resumed.plan = dataclasses.replace(resumed.plan, total_steps=2)
    resumed.train()
  finally:
    tf_config_lib.disable_op_determinism()  # Process-wide: leave it off.
  assert np.isfinite(metrics['loss']) and metrics['loss'] > 0
  want = _checkpoint_values(whole.manager.latest_checkpoint)
  got = _checkpoint_values(resumed.manager.latest_checkpoint)
  assert resumed.manager.latest_checkpoint.endswith('ckpt-2')
  assert set(got) == set(want)
  for key in want:
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def _parse(*argv):
  fv = flags.FlagValues()
  config_lib.define_flags(fv)
  fv(['supcon_tf', *argv])
  return config_lib.config_from_flags(fv)


def test_micro_batch_size_must_divide_the_replica_batch(tmp_path):
  assert _parse().runtime.micro_batch_size == 0  # Off by default.
  assert _parse('--batch_size=64',
                '--micro_batch_size=16').runtime.micro_batch_size == 16
  with pytest.raises(config_lib.ConfigError,
                     match=r'^--micro_batch_size: 24 must divide '
                     r'--batch_size=64 '):
    _parse('--batch_size=64', '--micro_batch_size=24')
  with pytest.raises(config_lib.ConfigError,
                     match=r'^--micro_batch_size: 3 must divide '
                     r'--batch_size=16'):
    config_lib.validate(_config(tmp_path, 3))
  with pytest.raises(config_lib.ConfigError, match='must be >= 0'):
    config_lib.validate(_config(tmp_path, -1))
  # 16 / 4 replicas = 4 per replica, which 8 does not divide; raised before
  # any model is built.
  config = _config(tmp_path, 8)
  config_lib.validate(config)
  with pytest.raises(config_lib.ConfigError,
                     match=r'^--micro_batch_size=8 must divide the '
                     r'per-replica batch --batch_size=16 / 4 replicas = 4;'):
    train.Trainer(config, mirrored_strategy(4), 1)
  # Stage 2 ignores it.
  assert train.Trainer(config, ONE_DEVICE, 2).step.micro_batch_size == 0
