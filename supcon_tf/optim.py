"""Learning-rate schedules, the LARS optimizer and the optimizer factory.

Semantics follow the reference release (google-research `supcon/utils.py` and
`supcon/launcher.py`), with one deliberate change: the reference trains both
stages in one run on one global step, so its stage-2 schedule starts at
`stage_1_epochs`; we run the stages separately, so every `StageSchedule` starts
at step 0 of its own stage (equivalent to the reference with the stage's
`warmup_start_epoch` = 0).

Weight decay. With LARS the decay is applied inside the optimizer
(`grad += weight_decay * w` for the selected variables), as the reference does.
With every other optimizer the optimizer applies no decay: the training loop
adds `weight_decay * l2_loss(selected variables)` to the loss, again as the
reference does. In both cases the selected variables are those of the
sub-modules the stage's `use_*_weight_decay` flags name, less batch-norm
parameters and (unless `include_bias`) biases: see
`supcon_tf.models.weight_decay_variables`.
"""

import math
from typing import Any, Callable, Collection, Dict, Optional, Sequence, Union

import keras
import numpy as np
import tensorflow as tf

from supcon_tf import config as config_lib
from supcon_tf import enums

# The reference's LARS trust-ratio coefficient (`utils.ETA_DEFAULT`).
LARS_ETA = 0.001
# Momentum of every momentum optimizer in the reference's `build_optimizer`.
MOMENTUM = 0.9
# `tf.compat.v1.train.RMSPropOptimizer(lr, decay=0.9, momentum=0.9, epsilon)`.
RMSPROP_RHO = 0.9
# `tf.compat.v1.train.AdamOptimizer` defaults (Keras' epsilon default is 1e-7).
ADAM_BETA_1 = 0.9
ADAM_BETA_2 = 0.999
ADAM_EPSILON = 1e-8

# A variable selection: a collection of variables, or a predicate on one.
VariableSelection = Union[Collection[Any], Callable[[Any], bool]]

_SERIALIZABLE_PACKAGE = 'supcon_tf'


def _float32_steps(steps_per_epoch: float, epochs: float) -> int:
  """`int(steps_per_epoch * epochs)`, multiplied in float32.

  The reference computes these step counts from float32 tensors and truncates
  them with `tf.cast`; doing the same keeps boundaries that land next to an
  integer on the same side.
  """
  return int(np.float32(steps_per_epoch) * np.float32(epochs))


@keras.saving.register_keras_serializable(package=_SERIALIZABLE_PACKAGE)
class StageSchedule(keras.optimizers.schedules.LearningRateSchedule):
  """Learning rate of one training stage as a function of its step.

  With `W = int(warmup_epochs * steps_per_epoch)` warmup steps and
  `T = int((total_epochs - warmup_epochs) * steps_per_epoch)` decay steps,
  counted from the end of the warmup (all truncations as the reference's):

  * step < W: linear warmup `peak * step / W` (0 at step 0).
  * W <= step <= W + T, with `d = step - W`:
      COSINE: `peak * (1 + cos(pi * d / T)) / 2`, reaching 0 at the stage end.
      EXPONENTIAL: `peak * decay_rate ** floor(d / (epochs_per_decay *
        steps_per_epoch))` (staircase, the decay period may be fractional).
      PIECEWISE_LINEAR: despite the reference's name, piecewise constant:
        `peak * decay_rate ** n` with n the number of boundaries
        `int(e * steps_per_epoch)` (e in `decay_boundary_epochs`) strictly
        below d. Boundaries, like the exponential staircase, are counted from
        the end of the warmup, as in the reference.
      NO_DECAY: `peak`.
  * step > W + T: 0, whatever the decay type (the reference's end-of-schedule
    guard).

  A stage with `total_epochs == warmup_epochs == 0` has the constant rate
  `peak` (the reference's zero-length schedule).

  Steps are compared in float32, exact up to 2**24 steps.
  """

  def __init__(self,
               peak_learning_rate: float,
               steps_per_epoch: float,
               total_epochs: float,
               warmup_epochs: float = 0.0,
               decay_type: Union[enums.DecayType, str] = enums.DecayType.COSINE,
               decay_rate: float = 0.1,
               decay_boundary_epochs: Sequence[float] = (30, 60, 80, 90),
               epochs_per_decay: float = 2.4,
               name: Optional[str] = None):
    """Initialises the schedule.

    Args:
      peak_learning_rate: float, the rate at the end of the warmup (already
        scaled by the batch size, see `build_schedule`).
      steps_per_epoch: float, training steps per epoch (may be fractional:
        training set size / global batch size).
      total_epochs: float, length of the stage, warmup included.
      warmup_epochs: float, length of the linear warmup from 0.
      decay_type: a `DecayType` member or its name / value.
      decay_rate: float, factor of EXPONENTIAL and PIECEWISE_LINEAR decay.
      decay_boundary_epochs: increasing epochs (after the warmup) at which
        PIECEWISE_LINEAR multiplies the rate by `decay_rate`.
      epochs_per_decay: float > 0, EXPONENTIAL staircase period in epochs.
      name: optional name of the schedule.

    Raises:
      ValueError: on an unknown decay type or inconsistent lengths (naming the
        value).
    """
    super().__init__()
    self.decay_type = enums.parse_enum(enums.DecayType, decay_type)
    if steps_per_epoch <= 0:
      raise ValueError(f'steps_per_epoch must be > 0, got {steps_per_epoch}.')
    if warmup_epochs < 0 or total_epochs < 0:
      raise ValueError(f'Epochs must be >= 0, got total_epochs={total_epochs}, '
                       f'warmup_epochs={warmup_epochs}.')
    if total_epochs < warmup_epochs or (total_epochs == warmup_epochs and
                                        warmup_epochs > 0):
      # The reference requires warmup_start <= max_lr_epoch < decay_end, except
      # for a 0-epoch stage without warmup.
      raise ValueError(
          f'warmup_epochs ({warmup_epochs}) must be < total_epochs '
          f'({total_epochs}); only a 0-epoch stage may have 0 of both.')
    if (self.decay_type == enums.DecayType.EXPONENTIAL and
        epochs_per_decay <= 0):
      raise ValueError(f'epochs_per_decay must be > 0, got {epochs_per_decay}.')
    self.peak_learning_rate = float(peak_learning_rate)
    self.steps_per_epoch = float(steps_per_epoch)
    self.total_epochs = float(total_epochs)
    self.warmup_epochs = float(warmup_epochs)
    self.decay_rate = float(decay_rate)
    self.decay_boundary_epochs = tuple(float(e) for e in decay_boundary_epochs)
    self.epochs_per_decay = float(epochs_per_decay)
    self.name = name

    self.constant = total_epochs == 0
    self.warmup_steps = _float32_steps(self.steps_per_epoch, self.warmup_epochs)
    self.decay_steps = _float32_steps(
        self.steps_per_epoch,
        np.float32(self.total_epochs) - np.float32(self.warmup_epochs))
    # The reference computes these boundaries in Python (float64).
    self.boundary_steps = tuple(int(self.steps_per_epoch * e)
                                for e in self.decay_boundary_epochs)
    self.staircase_steps = float(
        np.float32(self.steps_per_epoch) * np.float32(self.epochs_per_decay))

  def _decayed(self, decay_step: tf.Tensor) -> tf.Tensor:
    """Post-warmup rate; `decay_step`: float32 scalar >= 0."""
    peak = tf.constant(self.peak_learning_rate, tf.float32)
    if self.decay_type == enums.DecayType.COSINE:
      # T == 0 only when the post-warmup part is under one step; the
      # reference would divide 0 by 0 there, we keep the peak.
      fraction = tf.math.divide_no_nan(
          tf.minimum(decay_step, float(self.decay_steps)),
          float(self.decay_steps))
      return peak * 0.5 * (1.0 + tf.cos(math.pi * fraction))
    if self.decay_type == enums.DecayType.EXPONENTIAL:
      exponent = tf.floor(decay_step / self.staircase_steps)
      return peak * tf.pow(self.decay_rate, exponent)
    if self.decay_type == enums.DecayType.PIECEWISE_LINEAR:
      if not self.boundary_steps:
        return peak
      boundaries = tf.constant(self.boundary_steps, tf.float32)
      passed = tf.reduce_sum(tf.cast(decay_step > boundaries, tf.float32))
      return peak * tf.pow(self.decay_rate, passed)
    return peak  # NO_DECAY; parse_enum admits nothing else.

  def __call__(self, step) -> tf.Tensor:
    """Returns the rate at `step`.

    Args:
      step: int or float scalar (Python or tensor of any numeric dtype, e.g. the
        optimizer's int64 `iterations`), 0 at the first step of the stage.

    Returns:
      float32 scalar tensor.
    """
    with tf.name_scope(self.name or 'StageSchedule'):
      if self.constant:
        return tf.constant(self.peak_learning_rate, tf.float32)
      step = tf.cast(step, tf.float32)
      since_warmup = step - float(self.warmup_steps)
      # Clamped so the decay never sees negative steps (the exponential would
      # overflow there); those steps take the warmup branch anyway.
      decayed = self._decayed(tf.maximum(since_warmup, 0.0))
      decayed = tf.where(since_warmup <= float(self.decay_steps), decayed, 0.0)
      if self.warmup_steps == 0:
        return decayed
      warmup = self.peak_learning_rate * step / float(self.warmup_steps)
      return tf.where(step < float(self.warmup_steps), warmup, decayed)

  def get_config(self) -> Dict[str, Any]:
    return {
        'peak_learning_rate': self.peak_learning_rate,
        'steps_per_epoch': self.steps_per_epoch,
        'total_epochs': self.total_epochs,
        'warmup_epochs': self.warmup_epochs,
        'decay_type': self.decay_type.name.lower(),  # JSON-serialisable.
        'decay_rate': self.decay_rate,
        'decay_boundary_epochs': list(self.decay_boundary_epochs),
        'epochs_per_decay': self.epochs_per_decay,
        'name': self.name,
    }


def peak_learning_rate(stage: config_lib.StageConfig,
                       global_batch_size: int) -> float:
  """`base_learning_rate` scaled linearly by `global_batch_size / 256`."""
  return (stage.base_learning_rate * global_batch_size /
          config_lib.BASE_BATCH_SIZE)


def build_schedule(stage: config_lib.StageConfig, global_batch_size: int,
                   steps_per_epoch: float) -> StageSchedule:
  """The learning-rate schedule of one stage.

  Args:
    stage: the stage's config.
    global_batch_size: int, training images per step over all replicas.
    steps_per_epoch: float, training set size / global batch size.

  Returns:
    A `StageSchedule` starting at step 0 of the stage.
  """
  return StageSchedule(
      peak_learning_rate=peak_learning_rate(stage, global_batch_size),
      steps_per_epoch=steps_per_epoch,
      total_epochs=stage.epochs,
      warmup_epochs=stage.warmup_epochs,
      decay_type=stage.learning_rate_decay,
      decay_rate=stage.decay_rate,
      decay_boundary_epochs=stage.decay_boundary_epochs,
      epochs_per_decay=stage.epochs_per_decay)


@keras.saving.register_keras_serializable(package=_SERIALIZABLE_PACKAGE)
class LARS(keras.optimizers.Optimizer):
  """Layer-wise Adaptive Rate Scaling (You, Gitman & Ginsburg 2017).

  https://arxiv.org/abs/1708.03888. The reference's `LARSOptimizer` (from
  SimCLR), for Keras 3. For a variable w with gradient g, learning rate lr:

      g <- g + weight_decay * w            if w is decayed
      trust = eta * ||w|| / ||g||          if w is adapted and both norms > 0,
              1                            otherwise
      v <- momentum * v + lr * trust * g   (classic momentum)
      w <- w - v                           (or, with Nesterov,
                                            w - (momentum * v + lr * trust * g))

  With `classic_momentum=False` the rate is applied after the momentum and the
  trust ratio uses the norm of the momentum update instead of ||g||.

  Which variables are decayed and adapted is given by variable identity, never
  by name: `weight_decay_variables` (default: all) and
  `layer_adaptation_variables` (default: the same selection, as the
  reference's `exclude_from_layer_adaptation` defaults to its
  `exclude_from_weight_decay`). Variables outside both get a plain momentum
  update. Keras' own decoupled `weight_decay` mechanism is not used.
  """

  def __init__(self,
               learning_rate: Union[float, Callable[..., Any]] = 0.001,
               momentum: float = MOMENTUM,
               weight_decay: float = 0.0,
               eta: float = LARS_ETA,
               use_nesterov: bool = False,
               classic_momentum: bool = True,
               weight_decay_variables: Optional[VariableSelection] = None,
               layer_adaptation_variables: Optional[VariableSelection] = None,
               name: str = 'LARS',
               **kwargs):
    """Initialises the optimizer.

    Args:
      learning_rate: float, a `LearningRateSchedule` or a callable of the
        iteration.
      momentum: float, momentum coefficient.
      weight_decay: float, L2 coefficient added to the decayed variables'
        gradients (0 disables decay; layer adaptation still applies).
      eta: float, trust-ratio coefficient.
      use_nesterov: bool, Nesterov momentum.
      classic_momentum: bool, rate applied inside the momentum (the reference's
        default) or after it.
      weight_decay_variables: the variables to decay: a collection of
        variables (Keras or tf variables, compared by identity) or a
        predicate called with each trainable variable when the optimizer is
        built. None: all.
      layer_adaptation_variables: same form, the variables that get the trust
        ratio. None: the `weight_decay_variables` selection.
      name: optimizer name.
      **kwargs: the base optimizer's options (clipnorm, global_clipnorm,
        use_ema, loss_scale_factor, gradient_accumulation_steps, ...).
    """
    # The base class gets no weight_decay: Keras would add AdamW-style
    # decoupled decay on top of ours.
    super().__init__(learning_rate=learning_rate, name=name, **kwargs)
    self.momentum = float(momentum)
    self.lars_weight_decay = float(weight_decay)
    self.eta = float(eta)
    self.use_nesterov = bool(use_nesterov)
    self.classic_momentum = bool(classic_momentum)
    # Variable collections become sets of variable keys right away: keeping
    # the variables themselves as attributes would make them checkpoint
    # dependencies of the optimizer.
    self._decay_selection = self._freeze_selection(weight_decay_variables)
    self._adaptation_selection = (
        self._decay_selection if layer_adaptation_variables is None else
        self._freeze_selection(layer_adaptation_variables))

  def _freeze_selection(self, selection):
    if selection is None or callable(selection):
      return selection
    return frozenset(self._var_key(v) for v in selection)

  def _selected(self, selection, variable) -> bool:
    if selection is None:
      return True
    if callable(selection):
      return bool(selection(variable))
    return self._var_key(variable) in selection

  def build(self, var_list):
    """Creates one momentum slot per variable and resolves the selections."""
    if self.built:
      return
    super().build(var_list)
    self._momentums = self.add_optimizer_variables(var_list, 'momentum')
    # Python booleans indexed like the slots: update_step branches statically,
    # so excluded variables cost no norm computation.
    self._decay_flags = tuple(
        self.lars_weight_decay != 0 and
        self._selected(self._decay_selection, v) for v in var_list)
    self._adaptation_flags = tuple(
        self._selected(self._adaptation_selection, v) for v in var_list)

  def is_decayed(self, variable) -> bool:
    """Whether `variable` (built with) gets weight decay."""
    return self._decay_flags[self._get_variable_index(variable)]

  def is_adapted(self, variable) -> bool:
    """Whether `variable` (built with) gets the trust ratio."""
    return self._adaptation_flags[self._get_variable_index(variable)]

  def _trust_ratio(self, w, u):
    """eta * ||w|| / ||u||, or 1 where either norm is 0; float scalar."""
    w_norm = tf.norm(w)
    u_norm = tf.norm(u)
    ratio = self.eta * tf.math.divide_no_nan(w_norm, u_norm)
    return tf.where((w_norm > 0) & (u_norm > 0), ratio, tf.ones_like(ratio))

  def update_step(self, gradient, variable, learning_rate):
    """Applies one LARS update to `variable` (one replica's copy).

    Args:
      gradient: tensor (or IndexedSlices, densified) shaped like `variable`,
        already summed over replicas.
      variable: the variable to update.
      learning_rate: float scalar tensor.
    """
    index = self._get_variable_index(variable)
    decay, adapt = self._decay_flags[index], self._adaptation_flags[index]
    momentum_slot = self._momentums[index]
    dtype = variable.dtype
    w = tf.convert_to_tensor(variable)
    g = tf.cast(tf.convert_to_tensor(gradient), dtype)
    lr = tf.cast(learning_rate, dtype)
    m = tf.cast(self.momentum, dtype)
    if decay:
      g = g + tf.cast(self.lars_weight_decay, dtype) * w
    v = tf.convert_to_tensor(momentum_slot)
    if self.classic_momentum:
      scaled_lr = lr * self._trust_ratio(w, g) if adapt else lr
      next_v = m * v + scaled_lr * g
      update = m * next_v + scaled_lr * g if self.use_nesterov else next_v
    else:
      next_v = m * v + g
      update = m * next_v + g if self.use_nesterov else next_v
      scaled_lr = lr * self._trust_ratio(w, update) if adapt else lr
      update = scaled_lr * update
    self.assign(momentum_slot, next_v)
    self.assign_sub(variable, update)

  def get_config(self) -> Dict[str, Any]:
    """The hyperparameters; variable selections are not serialised."""
    config = super().get_config()
    config.update({
        'momentum': self.momentum,
        'weight_decay': self.lars_weight_decay,
        'eta': self.eta,
        'use_nesterov': self.use_nesterov,
        'classic_momentum': self.classic_momentum,
    })
    return config


@keras.saving.register_keras_serializable(package=_SERIALIZABLE_PACKAGE)
class ReferenceRMSprop(keras.optimizers.RMSprop):
  """Keras RMSprop with the mean square initialised to 1, not 0.

  The reference uses `tf.compat.v1.train.RMSPropOptimizer`, whose `rms` slot
  starts at ones; the update rule is otherwise Keras' (mean square
  `rho * ms + (1 - rho) * g**2`, step `lr * g / sqrt(ms + epsilon)` into a
  momentum buffer). With zeros the first steps would be ~1/sqrt(1 - rho)
  times larger whenever `epsilon` is small (stage 2 uses 1e-3).
  """

  def add_optimizer_variables(self, trainable_variables, name,
                              initializer='zeros'):
    # Through the initializer, not an assign after build: build may run while
    # a tf.function is traced, and an assign would then run at every step.
    if name == 'velocity':  # Keras RMSprop's mean-square slot.
      initializer = 'ones'
    return super().add_optimizer_variables(trainable_variables, name,
                                           initializer=initializer)


@keras.saving.register_keras_serializable(package=_SERIALIZABLE_PACKAGE)
class TF1Momentum(keras.optimizers.Optimizer):
  """The reference's `tf.compat.v1.train.MomentumOptimizer`, for Keras 3.

  The learning rate multiplies the accumulator instead of entering it:

      accum <- momentum * accum + g
      w <- w - lr * accum                       (plain)
      w <- w - lr * (g + momentum * accum)      (Nesterov, the new accum)

  Keras' SGD keeps the rate inside its velocity (v <- momentum * v - lr * g;
  w <- w + v), so the two agree while the rate is constant and differ while
  it changes (warmup, cosine, piecewise decay): after a rate change the TF1
  form rescales the whole accumulated history at once.
  """

  def __init__(self,
               learning_rate: Union[float, Callable[..., Any]] = 0.01,
               momentum: float = MOMENTUM,
               use_nesterov: bool = False,
               name: str = 'TF1Momentum',
               **kwargs):
    super().__init__(learning_rate=learning_rate, name=name, **kwargs)
    self.momentum = float(momentum)
    self.use_nesterov = bool(use_nesterov)

  def build(self, var_list):
    """One accumulator per variable, zero-initialised (as TF1)."""
    if self.built:
      return
    super().build(var_list)
    self._accumulators = self.add_optimizer_variables(var_list, 'momentum')

  def update_step(self, gradient, variable, learning_rate):
    """One TF1 momentum update of `variable`.

    Args:
      gradient: tensor shaped like `variable` (summed over replicas).
      variable: the variable to update.
      learning_rate: float scalar tensor.
    """
    accum_slot = self._accumulators[self._get_variable_index(variable)]
    dtype = variable.dtype
    g = tf.cast(tf.convert_to_tensor(gradient), dtype)
    lr = tf.cast(learning_rate, dtype)
    m = tf.cast(self.momentum, dtype)
    accum = m * tf.convert_to_tensor(accum_slot) + g
    self.assign(accum_slot, accum)
    step = g + m * accum if self.use_nesterov else accum
    self.assign_sub(variable, lr * step)

  def get_config(self) -> Dict[str, Any]:
    config = super().get_config()
    config.update({'momentum': self.momentum,
                   'use_nesterov': self.use_nesterov})
    return config


def _as_learning_rate(learning_rate):
  # Keras refuses ints (and numpy scalars) as learning rates.
  if isinstance(learning_rate, (int, float, np.number)):
    return float(learning_rate)
  return learning_rate


def build_optimizer(
    stage: config_lib.StageConfig,
    learning_rate: Union[float, 'StageSchedule',
                         keras.optimizers.schedules.LearningRateSchedule],
    weight_decay_variables: Optional[VariableSelection] = None,
    name: Optional[str] = None) -> keras.optimizers.Optimizer:
  """The optimizer of one stage, with the reference's hyperparameters.

  RMSPROP: `ReferenceRMSprop(rho=0.9, momentum=0.9,
  epsilon=stage.rmsprop_epsilon)`; MOMENTUM / NESTEROV: `TF1Momentum(0.9)`
  (the reference's MomentumOptimizer) without / with Nesterov, or Keras'
  `SGD(momentum=0.9)` with `stage.keras_momentum`; ADAM: `Adam(0.9, 0.999, epsilon=1e-8)` (TF1
  defaults); LARS: `LARS(momentum=0.9, eta=0.001,
  weight_decay=stage.weight_decay)` decaying and adapting
  `weight_decay_variables` only.

  Only LARS applies weight decay; for the others the training loop adds
  `stage.weight_decay * models.l2_weight_decay(weight_decay_variables)` to the
  loss (the reference does exactly this split). Keras' SGD applies the rate
  inside the momentum buffer where TF1's MomentumOptimizer applies it
  outside; the two agree for a constant rate and differ while it changes.

  Args:
    stage: the stage's config (`optimizer`, `rmsprop_epsilon`,
      `weight_decay`).
    learning_rate: float or schedule (e.g. `build_schedule(...)`).
    weight_decay_variables: for LARS, the variables to decay and adapt (a
      collection or a predicate, see `LARS`); None = all. Ignored otherwise.
    name: optional optimizer name.

  Returns:
    A Keras optimizer, not yet built.

  Raises:
    ValueError: for an unknown optimizer, naming the value and the allowed set.
  """
  kind = enums.parse_enum(enums.Optimizer, stage.optimizer)
  lr = _as_learning_rate(learning_rate)
  kw = {} if name is None else {'name': name}

  def momentum_optimizer(nesterov: bool):
    if stage.keras_momentum:  # Ours: the rate inside the velocity.
      return keras.optimizers.SGD(learning_rate=lr, momentum=MOMENTUM,
                                  nesterov=nesterov, **kw)
    return TF1Momentum(learning_rate=lr, momentum=MOMENTUM,
                       use_nesterov=nesterov, **kw)

  factories = {
      enums.Optimizer.RMSPROP: lambda: ReferenceRMSprop(
          learning_rate=lr, rho=RMSPROP_RHO, momentum=MOMENTUM,
          epsilon=stage.rmsprop_epsilon, centered=False, **kw),
      enums.Optimizer.MOMENTUM: lambda: momentum_optimizer(nesterov=False),
      enums.Optimizer.NESTEROV: lambda: momentum_optimizer(nesterov=True),
      enums.Optimizer.ADAM: lambda: keras.optimizers.Adam(
          learning_rate=lr, beta_1=ADAM_BETA_1, beta_2=ADAM_BETA_2,
          epsilon=ADAM_EPSILON, **kw),
      enums.Optimizer.LARS: lambda: LARS(
          learning_rate=lr, momentum=MOMENTUM, weight_decay=stage.weight_decay,
          eta=LARS_ETA, weight_decay_variables=weight_decay_variables, **kw),
  }
  return factories[kind]()
