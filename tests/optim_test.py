"""Tests for supcon_tf.optim: schedules, LARS, build_optimizer, weight decay.

Known answers are computed by hand (schedules) or re-derived in NumPy from the
reference's update rules (LARS, RMSProp). The MirroredStrategy check lives in
optim_distributed_test.py (it needs logical devices set before TF starts).
"""

import copy
import dataclasses
import json
import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from supcon_tf import config as config_lib
from supcon_tf import enums
from supcon_tf import optim

DecayType = enums.DecayType

# 10 steps per epoch, 10 epochs of which 2 warmup: warmup steps [0, 20), decay
# steps d = step - 20 in [0, 80], 0 after step 100.
SPE, TOTAL, WARMUP = 10.0, 10.0, 2.0


def _schedule(decay_type, **kwargs):
  return optim.StageSchedule(
      peak_learning_rate=kwargs.pop('peak', 1.0), steps_per_epoch=SPE,
      total_epochs=TOTAL, warmup_epochs=WARMUP, decay_type=decay_type,
      **kwargs)


def _check_values(schedule, expected):
  steps = sorted(expected)
  got = [float(schedule(s)) for s in steps]
  np.testing.assert_allclose(got, [expected[s] for s in steps], rtol=1e-6,
                             atol=1e-7, err_msg=str(steps))


# ----------------------------------------------------------------- schedules


def test_cosine_schedule_values():
  _check_values(_schedule(DecayType.COSINE, peak=2.0), {
      0: 0.0,  # Warmup starts at 0.
      10: 1.0,  # Half-way through the warmup.
      19: 1.9,  # Last warmup step.
      20: 2.0,  # Peak: first decay step.
      40: 1.0 + math.cos(math.pi / 4),  # d = 20 of 80.
      60: 1.0,  # Cosine midpoint.
      100: 0.0,  # Stage end.
      101: 0.0,
      10_000: 0.0,
  })


def test_exponential_schedule_is_a_staircase_from_the_warmup_end():
  # Decay period 2.4 epochs = 24 steps, counted from step 20.
  _check_values(
      _schedule(DecayType.EXPONENTIAL, decay_rate=0.5, epochs_per_decay=2.4), {
          10: 0.5,
          20: 1.0,
          43: 1.0,
          44: 0.5,
          67: 0.5,
          68: 0.25,
          92: 0.125,
          100: 0.125,  # floor(80 / 24) = 3.
          101: 0.0,  # The reference zeroes every decay type after the end.
      })


def test_piecewise_schedule_boundaries():
  # Boundaries at 3 and 5 epochs after the warmup: d = 30 and 50. The rate
  # changes strictly after a boundary (tf piecewise_constant semantics).
  _check_values(
      _schedule(DecayType.PIECEWISE_LINEAR, decay_rate=0.1,
                decay_boundary_epochs=(3, 5)), {
                    5: 0.25,
                    20: 1.0,
                    50: 1.0,
                    51: 0.1,
                    70: 0.1,
                    71: 0.01,
                    100: 0.01,
                    101: 0.0,
                })


def test_piecewise_schedule_without_boundaries_is_constant():
  _check_values(
      _schedule(DecayType.PIECEWISE_LINEAR, decay_boundary_epochs=()),
      {20: 1.0, 100: 1.0, 101: 0.0})


def test_no_decay_schedule():
  _check_values(_schedule(DecayType.NO_DECAY, peak=0.3),
                {0: 0.0, 10: 0.15, 20: 0.3, 77: 0.3, 100: 0.3, 101: 0.0})


def test_schedule_without_warmup_starts_at_peak():
  s = optim.StageSchedule(1.0, SPE, TOTAL, 0.0, DecayType.COSINE)
  _check_values(s, {0: 1.0, 50: 0.5, 100: 0.0})


def test_fractional_steps_per_epoch_truncates_like_the_reference():
  # W = int(2.5 * 1) = 2 warmup steps; T = int(2.5 * 3) = 7 decay steps;
  # staircase period 2.5 * 0.5 = 1.25 steps (d = 7 at step 9: 5 decays).
  cos = optim.StageSchedule(1.0, 2.5, 4.0, 1.0, DecayType.COSINE)
  _check_values(cos, {1: 0.5, 2: 1.0, 9: 0.0, 10: 0.0})
  exp = optim.StageSchedule(1.0, 2.5, 4.0, 1.0, DecayType.EXPONENTIAL,
                            decay_rate=0.5, epochs_per_decay=0.5)
  _check_values(exp, {2: 1.0, 3: 1.0, 4: 0.5, 5: 0.25, 9: 0.5**5, 10: 0.0})


def test_zero_epoch_stage():
  s = optim.StageSchedule(0.7, SPE, 0.0, 0.0, DecayType.EXPONENTIAL)
  _check_values(s, {0: 0.7, 5: 0.7})
  with pytest.raises(ValueError, match='warmup_epochs'):
    optim.StageSchedule(0.7, SPE, 1.0, 1.0, DecayType.COSINE)
  with pytest.raises(ValueError, match='warmup_epochs'):
    optim.StageSchedule(0.7, SPE, 1.0, 2.0, DecayType.COSINE)


def test_schedule_bad_values_raise():
  with pytest.raises(ValueError, match='linear_ramp'):
    optim.StageSchedule(1.0, SPE, TOTAL, WARMUP, 'linear_ramp')
  with pytest.raises(ValueError, match='steps_per_epoch'):
    optim.StageSchedule(1.0, 0.0, TOTAL, WARMUP)
  with pytest.raises(ValueError, match='epochs_per_decay'):
    optim.StageSchedule(1.0, SPE, TOTAL, WARMUP, 'exponential',
                        epochs_per_decay=0.0)


def test_schedule_accepts_enum_names_and_values():
  for spelling in ('cosine', 'COSINE', 'c'):
    assert _schedule(spelling).decay_type is DecayType.COSINE


@pytest.mark.parametrize('decay_type', list(DecayType))
def test_schedule_step_dtypes_and_tf_function(decay_type):
  s = _schedule(decay_type, decay_rate=0.5, decay_boundary_epochs=(3, 5))
  steps = [0, 7, 20, 44, 51, 68, 100, 101]
  expected = [float(s(i)) for i in steps]

  @tf.function(input_signature=[tf.TensorSpec([], tf.int64)])
  def lr_int64(step):
    return s(step)

  @tf.function(input_signature=[tf.TensorSpec([], tf.float32)])
  def lr_float(step):
    return s(step)

  for fn, dtype in ((lr_int64, tf.int64), (lr_float, tf.float32)):
    got = [float(fn(tf.constant(i, dtype))) for i in steps]
    np.testing.assert_allclose(got, expected, rtol=1e-6)
  got = [float(s(tf.constant(i, tf.int32))) for i in steps]
  np.testing.assert_allclose(got, expected, rtol=1e-6)
  assert s(tf.constant(3, tf.int64)).dtype == tf.float32


@pytest.mark.parametrize('decay_type', list(DecayType))
def test_schedule_config_round_trip(decay_type):
  s = _schedule(decay_type, peak=0.6, decay_rate=0.3,
                decay_boundary_epochs=(1, 4), epochs_per_decay=0.7)
  config = s.get_config()
  json.dumps(config)  # JSON-serialisable, for config.json / checkpoints.
  clones = [optim.StageSchedule.from_config(config),
            keras.saving.deserialize_keras_object(
                keras.saving.serialize_keras_object(s))]
  for clone in clones:
    assert isinstance(clone, optim.StageSchedule)
    assert clone.get_config() == config
    for step in (0, 15, 20, 33, 61, 100, 101):
      assert float(clone(step)) == float(s(step))


def test_build_schedule_scales_by_global_batch():
  stage = config_lib.StageConfig(
      epochs=10, warmup_epochs=2, base_learning_rate=0.3,
      learning_rate_decay=DecayType.PIECEWISE_LINEAR, decay_rate=0.1,
      decay_boundary_epochs=(3, 5), epochs_per_decay=1.5)
  s = optim.build_schedule(stage, global_batch_size=512, steps_per_epoch=SPE)
  assert s.peak_learning_rate == pytest.approx(0.6)
  assert (s.total_epochs, s.warmup_epochs, s.decay_type, s.decay_rate,
          s.decay_boundary_epochs, s.epochs_per_decay) == (
              10.0, 2.0, DecayType.PIECEWISE_LINEAR, 0.1, (3.0, 5.0), 1.5)
  _check_values(s, {10: 0.3, 20: 0.6, 51: 0.06})


# ---------------------------------------------------------------------- LARS


def _np_lars(weights, grad_steps, lrs, *, weight_decay, eta, momentum,
             decayed, adapted, nesterov=False, classic=True):
  """NumPy LARS (float64), the reference's update rule, for several steps.

  Args:
    weights: list of arrays.
    grad_steps: list (per step) of lists of gradients.
    lrs: learning rate per step.
    weight_decay, eta, momentum: floats.
    decayed, adapted: per-variable booleans.
    nesterov, classic: momentum variants.

  Returns:
    The weights after all steps.
  """
  w = [np.array(x, np.float64) for x in weights]
  v = [np.zeros_like(x) for x in w]

  def trust(wi, ui, adapt):
    wn, un = np.linalg.norm(wi), np.linalg.norm(ui)
    return eta * wn / un if adapt and wn > 0 and un > 0 else 1.0

  for grads, lr in zip(grad_steps, lrs):
    for i, g in enumerate(grads):
      g = np.array(g, np.float64)
      if decayed[i] and weight_decay:
        g = g + weight_decay * w[i]
      if classic:
        scaled = lr * trust(w[i], g, adapted[i])
        v[i] = momentum * v[i] + scaled * g
        update = momentum * v[i] + scaled * g if nesterov else v[i]
      else:
        v[i] = momentum * v[i] + g
        update = momentum * v[i] + g if nesterov else v[i]
        update = lr * trust(w[i], update, adapted[i]) * update
      w[i] = w[i] - update
  return w


def _lars_problem():
  """Variables and two steps of gradients covering the special cases.

  0 kernel: decayed and adapted. 1 bias: excluded (neither). 2 zero: decayed
  and adapted, ||w|| = 0 at step 1 (trust 1). 3 stalled: adapted, not decayed,
  zero gradient at step 2 (||g|| = 0: trust 1, not NaN).
  """
  rng = np.random.default_rng(0)
  weights = [rng.normal(size=(2, 3)), rng.normal(size=(3,)), np.zeros(4),
             rng.normal(size=(2, 2))]
  grads = [[rng.normal(size=w.shape) for w in weights] for _ in range(2)]
  grads[1][3] = np.zeros((2, 2))
  decayed = [True, False, True, False]
  adapted = [True, False, True, True]
  return weights, grads, decayed, adapted


def _tf_variables(weights):
  return [tf.Variable(w.astype(np.float32)) for w in weights]


def _run(opt, variables, grad_steps, fn=None):
  def apply(grads):
    opt.apply_gradients(zip(grads, variables))
  fn = fn or apply
  for grads in grad_steps:
    fn([tf.constant(g, tf.float32) for g in grads])
  return [v.numpy() for v in variables]


def test_lars_reference_known_answer():
  # The reference's LARSOptimizerTest.testBasic: lr 3, no weight decay.
  var0, var1 = tf.Variable([1.0, 2.0]), tf.Variable([3.0, 4.0])
  opt = optim.LARS(3.0)
  opt.apply_gradients([(tf.constant([0.1, 0.1]), var0),
                       (tf.constant([0.01, 0.01]), var1)])
  np.testing.assert_allclose(
      var0.numpy(), [1.0, 2.0] - 3.0 * 0.001 * np.sqrt(5.0) / np.sqrt(2.0),
      rtol=1e-6)
  np.testing.assert_allclose(
      var1.numpy(), [3.0, 4.0] - 3.0 * 0.001 * 5.0 / np.sqrt(2.0), rtol=1e-6)


@pytest.mark.parametrize('nesterov,classic', [(False, True), (True, True),
                                              (False, False), (True, False)])
def test_lars_two_steps_match_numpy(nesterov, classic):
  weights, grads, decayed, adapted = _lars_problem()
  variables = _tf_variables(weights)
  opt = optim.LARS(
      0.5, momentum=0.9, weight_decay=0.01, eta=0.05, use_nesterov=nesterov,
      classic_momentum=classic,
      weight_decay_variables=[v for v, d in zip(variables, decayed) if d],
      layer_adaptation_variables=[v for v, a in zip(variables, adapted) if a])
  got = _run(opt, variables, grads)
  expected = _np_lars(weights, grads, [0.5, 0.5], weight_decay=0.01, eta=0.05,
                      momentum=0.9, decayed=decayed, adapted=adapted,
                      nesterov=nesterov, classic=classic)
  for g, e in zip(got, expected):
    assert np.all(np.isfinite(g))
    np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-7)
  assert [opt.is_decayed(v) for v in variables] == decayed
  assert [opt.is_adapted(v) for v in variables] == adapted


def test_lars_default_adaptation_follows_weight_decay_selection():
  # The reference: exclude_from_layer_adaptation defaults to
  # exclude_from_weight_decay. The zero-gradient step of an adapted variable
  # must not produce NaN (trust 1 when ||g|| = 0).
  weights, grads, _, _ = _lars_problem()
  decayed = [True, False, True, False]
  variables = _tf_variables(weights)
  selected = [v for v, d in zip(variables, decayed) if d]
  opt = optim.LARS(0.5, weight_decay=0.01, weight_decay_variables=selected)
  got = _run(opt, variables, grads)
  expected = _np_lars(weights, grads, [0.5, 0.5], weight_decay=0.01,
                      eta=optim.LARS_ETA, momentum=0.9, decayed=decayed,
                      adapted=decayed)
  for g, e in zip(got, expected):
    np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-7)


def test_lars_zero_gradient_adapted_variable_stays_finite():
  w = tf.Variable([[1.0, -2.0]])
  opt = optim.LARS(0.1, weight_decay=0.0)
  _run(opt, [w], [[np.array([[0.5, 0.5]])], [np.zeros((1, 2))]])
  expected = _np_lars([np.array([[1.0, -2.0]])],
                      [[np.array([[0.5, 0.5]])], [np.zeros((1, 2))]],
                      [0.1, 0.1], weight_decay=0.0, eta=optim.LARS_ETA,
                      momentum=0.9, decayed=[False], adapted=[True])
  np.testing.assert_allclose(w.numpy(), expected[0], rtol=1e-6)


def test_lars_predicate_selection_equals_collection():
  weights, grads, decayed, _ = _lars_problem()
  results = []
  for use_predicate in (False, True):
    variables = _tf_variables(weights)
    chosen = [v for v, d in zip(variables, decayed) if d]
    chosen_ids = {id(v) for v in chosen}
    selection = ((lambda v: id(v) in chosen_ids) if use_predicate  # pylint: disable=cell-var-from-loop
                 else chosen)
    opt = optim.LARS(0.5, weight_decay=0.01, eta=0.05,
                     weight_decay_variables=selection)
    results.append(_run(opt, variables, grads))
    assert [opt.is_decayed(v) for v in variables] == decayed
  for a, b in zip(*results):
    np.testing.assert_array_equal(a, b)


def test_lars_none_selection_means_all_and_zero_decay_still_adapts():
  weights, grads, _, _ = _lars_problem()
  variables = _tf_variables(weights)
  opt = optim.LARS(0.5, weight_decay=0.0, eta=0.05)
  got = _run(opt, variables, grads)
  expected = _np_lars(weights, grads, [0.5, 0.5], weight_decay=0.0, eta=0.05,
                      momentum=0.9, decayed=[False] * 4, adapted=[True] * 4)
  for g, e in zip(got, expected):
    np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-7)
  assert not any(opt.is_decayed(v) for v in variables)


def test_lars_in_tf_function_with_schedule():
  weights, grads, decayed, adapted = _lars_problem()
  variables = _tf_variables(weights)
  schedule = optim.StageSchedule(2.0, steps_per_epoch=1.0, total_epochs=4.0,
                                 warmup_epochs=2.0)
  opt = optim.LARS(schedule, weight_decay=0.01, eta=0.05,
                   weight_decay_variables=[v for v, d in zip(variables,
                                                             decayed) if d])

  @tf.function
  def step(grads):
    opt.apply_gradients(zip(grads, variables))

  got = _run(opt, variables, grads, fn=step)
  # Iterations 0 and 1 of the warmup: rates 0 and 1.
  expected = _np_lars(weights, grads, [0.0, 1.0], weight_decay=0.01,
                      eta=0.05, momentum=0.9, decayed=decayed,
                      adapted=decayed)
  for g, e in zip(got, expected):
    np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-7)
  assert int(opt.iterations.numpy()) == 2


def test_lars_does_not_use_keras_decoupled_weight_decay():
  opt = optim.LARS(0.1, weight_decay=0.5)
  assert opt.weight_decay is None
  assert opt.lars_weight_decay == 0.5
  # Excluded variable, no adaptation: a plain momentum step, no decay at all.
  w = tf.Variable([1.0, 1.0])
  opt = optim.LARS(0.1, weight_decay=0.5, weight_decay_variables=[])
  opt.apply_gradients([(tf.constant([1.0, 2.0]), w)])
  np.testing.assert_allclose(w.numpy(), [0.9, 0.8], rtol=1e-6)


def test_lars_get_config_round_trip():
  schedule = _schedule(DecayType.COSINE, peak=0.4)
  opt = optim.LARS(schedule, momentum=0.8, weight_decay=1e-3, eta=0.002,
                   use_nesterov=True, classic_momentum=False, name='stage1')
  config = opt.get_config()
  assert (config['momentum'], config['weight_decay'], config['eta'],
          config['use_nesterov'], config['classic_momentum'],
          config['name']) == (0.8, 1e-3, 0.002, True, False, 'stage1')
  # Keras' from_config replaces the serialised schedule in place: pass a copy.
  clone = optim.LARS.from_config(copy.deepcopy(config))
  assert clone.get_config() == config
  assert isinstance(clone._learning_rate, optim.StageSchedule)  # pylint: disable=protected-access
  clone2 = keras.optimizers.deserialize(keras.optimizers.serialize(opt))
  assert isinstance(clone2, optim.LARS)
  assert clone2.lars_weight_decay == 1e-3


def test_lars_with_keras_model_variables():
  model = keras.Sequential([
      keras.Input((4,)), keras.layers.Dense(3),
      keras.layers.BatchNormalization(), keras.layers.Dense(2)])
  dense1, bn, dense2 = model.layers
  chosen = [dense1.kernel, dense2.kernel]  # As models.weight_decay_variables.
  opt = optim.LARS(0.1, weight_decay=1e-2, weight_decay_variables=chosen)
  x = tf.random.stateless_normal((8, 4), seed=(1, 2))

  @tf.function
  def step():
    with tf.GradientTape() as tape:
      loss = tf.reduce_mean(tf.square(model(x, training=True)))
    grads = tape.gradient(loss, model.trainable_variables)
    opt.apply_gradients(zip(grads, model.trainable_variables))

  step()
  step()
  assert opt.is_decayed(dense1.kernel) and opt.is_adapted(dense1.kernel)
  for v in (dense1.bias, bn.gamma, bn.beta, dense2.bias):
    assert not opt.is_decayed(v) and not opt.is_adapted(v)
  assert all(np.all(np.isfinite(v.numpy())) for v in model.weights)


# ------------------------------------------------------------ build_optimizer


def _stage(kind, **kwargs):
  return config_lib.StageConfig(optimizer=kind, **kwargs)


@pytest.mark.parametrize('kind', list(enums.Optimizer))
def test_build_optimizer_class_and_hyperparameters(kind):
  stage = _stage(kind, rmsprop_epsilon=0.001, weight_decay=1e-4)
  opt = optim.build_optimizer(stage, 0.25, name='s')
  assert float(opt.learning_rate) == pytest.approx(0.25)
  assert opt.name == 's'
  expected = {
      enums.Optimizer.RMSPROP: (optim.ReferenceRMSprop, dict(
          rho=0.9, momentum=0.9, epsilon=0.001, centered=False)),
      enums.Optimizer.MOMENTUM: (optim.TF1Momentum, dict(
          momentum=0.9, use_nesterov=False)),
      enums.Optimizer.NESTEROV: (optim.TF1Momentum, dict(
          momentum=0.9, use_nesterov=True)),
      enums.Optimizer.ADAM: (keras.optimizers.Adam, dict(
          beta_1=0.9, beta_2=0.999, epsilon=1e-8)),
      enums.Optimizer.LARS: (optim.LARS, dict(
          momentum=0.9, lars_weight_decay=1e-4, eta=0.001,
          use_nesterov=False, classic_momentum=True)),
  }[kind]
  cls, attrs = expected
  assert type(opt) is cls  # pylint: disable=unidiomatic-typecheck
  for attr, value in attrs.items():
    assert getattr(opt, attr) == pytest.approx(value), attr
  # Only LARS decays; the others leave it to the loss.
  assert opt.weight_decay is None


@pytest.mark.parametrize('kind,nesterov', [(enums.Optimizer.MOMENTUM, False),
                                           (enums.Optimizer.NESTEROV, True)])
def test_build_optimizer_keras_momentum(kind, nesterov):
  opt = optim.build_optimizer(_stage(kind, keras_momentum=True), 0.25)
  assert type(opt) is keras.optimizers.SGD  # pylint: disable=unidiomatic-typecheck
  assert opt.momentum == pytest.approx(0.9) and opt.nesterov == nesterov
  tf1 = optim.build_optimizer(_stage(kind), 0.25)
  again = optim.TF1Momentum.from_config(tf1.get_config())
  assert again.use_nesterov == nesterov and again.momentum == 0.9


def test_build_optimizer_accepts_names_ints_and_schedules():
  stage = _stage('lars')
  assert isinstance(optim.build_optimizer(stage, 1), optim.LARS)
  schedule = optim.build_schedule(_stage('momentum'), 256, SPE)
  opt = optim.build_optimizer(_stage('momentum'), schedule)
  assert opt._learning_rate is schedule  # pylint: disable=protected-access


def test_build_optimizer_bad_value_names_it():
  stage = dataclasses.replace(config_lib.StageConfig(), optimizer='adagrad')
  with pytest.raises(ValueError, match='adagrad'):
    optim.build_optimizer(stage, 0.1)


def test_build_optimizer_lars_uses_weight_decay_variables():
  a, b = tf.Variable([3.0, 4.0]), tf.Variable([1.0])
  opt = optim.build_optimizer(_stage('lars', weight_decay=0.1), 0.1,
                              weight_decay_variables=[a])
  opt.build([a, b])
  assert opt.is_decayed(a) and opt.is_adapted(a)
  assert not opt.is_decayed(b) and not opt.is_adapted(b)


def test_reference_rmsprop_starts_mean_square_at_one():
  # tf.compat.v1 RMSProp: ms_0 = 1; ms = rho ms + (1 - rho) g^2;
  # mom = momentum mom + lr g / sqrt(ms + eps); w -= mom.
  stage = _stage('rmsprop', rmsprop_epsilon=0.001)
  opt = optim.build_optimizer(stage, 0.1)
  w = tf.Variable([1.0, -1.0])
  grads = [np.array([0.5, -2.0]), np.array([1.0, 0.0])]

  @tf.function
  def step(g):
    opt.apply_gradients([(g, w)])

  step(tf.constant(grads[0], tf.float32))
  step(tf.constant(grads[1], tf.float32))
  ms, mom, ew = np.ones(2), np.zeros(2), np.array([1.0, -1.0])
  for g in grads:
    ms = 0.9 * ms + 0.1 * g**2
    mom = 0.9 * mom + 0.1 * g / np.sqrt(ms + 0.001)
    ew = ew - mom
  np.testing.assert_allclose(w.numpy(), ew, rtol=1e-6)
  config = opt.get_config()
  assert isinstance(optim.ReferenceRMSprop.from_config(config),
                    optim.ReferenceRMSprop)
