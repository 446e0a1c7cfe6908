"""Two-stage training: the trainer of one stage and its host loop.

Stage 1 (`--mode=pretrain`) trains the encoder and projection head with the
contrastive loss (SupCon, or SimCLR with `use_labels=False`; the cross-entropy
baseline when the stage-1 weights say so). Stage 2 (`--mode=classifier`)
trains the classification head on the encoder restored from stage 1 (frozen
by the stop-gradient before the classifier, as in the reference). Each stage
has its own checkpoints, so a stage resumes where it stopped.

The layout of `model_dir` is described in `checkpoints.py`.

The per-replica step is small (forward, per-example losses reduced by the
global batch, weight decay, gradients, apply); `steps_per_loop` steps run in
one `tf.function` call; checkpoints, summaries and progress live in the host
loop.

Monitor (`--monitor_every_epochs=E`): the host loop ends a chunk at every E-th
epoch boundary (and at the last step) and calls `monitor(model, step)`, a
callback given by the caller (`modes.py` passes
`evaluation.monitor.EmbeddingMonitor`; training never imports evaluation,
which imports training). Its float results are printed on their own line,
their kNN accuracies on the progress line, and all are written to
TensorBoard as `monitor/<name>` next to the training scalars.

The progress line shows what the stage trains: the classification head's
`cross_entropy_loss` and `top_1_accuracy` only when its loss weight is
non-zero (in SupCon pretraining the stop-gradient head is untrained and
those numbers mean nothing); TensorBoard still gets them.

Failure behaviour (docs/failure_behaviour.md):
* SIGTERM (preemption): the host loop finishes the current chunk of
  `steps_per_loop` steps, saves a checkpoint and raises `Preempted`; `main`
  exits with `PREEMPTED_EXIT_CODE`. Under MultiWorkerMirroredStrategy the
  workers agree (all-reduce) to stop at the same step.
* A hard kill loses at most `save_interval_steps` steps: a restart resumes the
  model, optimizer slots, step and the input stream (a pure function of
  (seed, step), `pipeline.build_dataset(start_step=)`); the step's only random
  op (deferred blur) is seeded by (seed, step, replica), so there is no RNG
  state to save. With `--deterministic` a resumed run equals an uninterrupted
  one.
* Non-finite loss terms, gradient norm or weights stop training
  (`NonFiniteError`, naming the steps and the terms) before anything is saved.
"""

import dataclasses
import math
import os
import signal
import sys
import time
from typing import Callable, Dict, Optional

from absl import logging
import keras
import numpy as np
import tensorflow as tf

from supcon_tf import config as config_lib
from supcon_tf import distribute
from supcon_tf import errors
from supcon_tf import models
from supcon_tf import optim
from supcon_tf.data import augment
from supcon_tf.data import datasets
from supcon_tf.data import pipeline
from supcon_tf.training import checkpoints
from supcon_tf.training import extensions
from supcon_tf.training import grad_cache
from supcon_tf.training import step as step_lib

STAGE_DIRS = checkpoints.STAGE_DIRS

# `monitor(model, step) -> {name: float}`, called at epoch boundaries.
Monitor = Callable[[models.SupConModel, int], Dict[str, float]]
# Terms of the classification head, hidden from the progress line when its
# loss weight is 0 (`step.TrainStep.loss_terms`).
CLASSIFIER_TERMS = ('cross_entropy_loss', 'top_1_accuracy')

# Exit status of `main` after a SIGTERM stopped training with a checkpoint
# saved (EX_TEMPFAIL: "try again later"); rerunning the same command resumes.
PREEMPTED_EXIT_CODE = 75


class TrainingError(errors.UserError, RuntimeError):
  """Training cannot start or continue; the message says why."""


class NonFiniteError(TrainingError, FloatingPointError):
  """A loss term, the gradient norm or the weights became NaN or infinite."""


class Preempted(Exception):  # pylint: disable=g-bad-exception-name
  """SIGTERM stopped training after saving a checkpoint at `step`."""

  def __init__(self, stage: str, step: int, checkpoint: str):
    self.stage, self.step, self.checkpoint = stage, step, checkpoint
    super().__init__(
        f'[{stage}] stopped by SIGTERM (preemption) after saving step {step} '
        f'to {checkpoint}. Run the same command again to resume from step '
        f'{step}.')


def set_determinism(config: config_lib.ExperimentConfig) -> None:
  """`--deterministic`: op determinism and seeds (before building models).

  Seeds Python, NumPy, TensorFlow and Keras with `--seed`, so that initial
  weights, tf.data shuffles and any unseeded op repeat from run to run, and
  makes TF pick deterministic kernels. Process-wide.
  """
  if not config.runtime.deterministic:
    return
  keras.utils.set_random_seed(config.data.seed)
  tf.config.experimental.enable_op_determinism()


class _StopSignal:
  """Records SIGTERM while training instead of dying (main thread only)."""

  def __init__(self):
    self.requested = False
    self._previous = None
    self._installed = False

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True  # No I/O here: the handler may interrupt a print.

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
      self._installed = True
    except ValueError:  # Not the main thread: SIGTERM keeps its default.
      logging.warning('Not in the main thread: SIGTERM is not handled.')
    return self

  def __exit__(self, *exc):
    if self._installed:
      signal.signal(signal.SIGTERM, self._previous or signal.SIG_DFL)
    return False


# -----------------------------------------------------------------------------
# Planning.


@dataclasses.dataclass(frozen=True)
class StagePlan:
  """What one stage will do, derived from the config and the dataset."""
  index: int  # 1 or 2.
  stage: config_lib.StageConfig
  global_batch: int
  num_views: int
  steps_per_epoch: float  # num_train / global_batch, as the reference.
  total_steps: int

  @property
  def name(self) -> str:
    return STAGE_DIRS[self.index]


def plan_stage(config: config_lib.ExperimentConfig,
               info: datasets.DatasetInfo, index: int) -> StagePlan:
  """Steps and views of stage `index` (1 or 2)."""
  stage = config.stage_1 if index == 1 else config.stage_2
  global_batch = config.data.batch_size
  if info.num_train_examples == 0:
    raise TrainingError(
        f'The training split {info.train_split!r} of {info.name} is empty: '
        'nothing to train on.')
  if config.data.num_images > info.num_train_examples:
    raise TrainingError(
        f'--num_images={config.data.num_images} is larger than the training '
        f'split of {info.name} ({info.num_train_examples} images); lower it, '
        'or pass 0 to use them all.')
  if info.num_train_examples < global_batch:
    raise TrainingError(
        f'--batch_size={global_batch} is larger than the training set '
        f'({info.num_train_examples} images of {info.name}); lower it.')
  steps_per_epoch = info.num_train_examples / global_batch
  total = int(stage.epochs * steps_per_epoch)
  if config.runtime.max_train_steps:
    total = min(total, config.runtime.max_train_steps)
  # The classifier reads view 0 only; without a contrastive term there is no
  # use for more views (the reference computes them anyway).
  num_views = config.data.num_views if stage.contrastive_loss_weight > 0 else 1
  return StagePlan(index, stage, global_batch, num_views, steps_per_epoch,
                   total)


def stage_config(config: config_lib.ExperimentConfig,
                 plan: StagePlan) -> config_lib.ExperimentConfig:
  """The config the stage's input pipeline is built from."""
  if plan.num_views == config.data.num_views:
    return config
  return config.replace(data__num_views=plan.num_views,
                        loss__positives_cap=-1)


def _bn_layers(module) -> list:
  """Every BatchNormalization layer inside `module` (recursively)."""
  return [l for l in module._flatten_layers(include_self=True, recursive=True)  # pylint: disable=protected-access
          if isinstance(l, keras.layers.BatchNormalization)]


class _Progress:
  """One status line with steps/s and ETA; rewritten in place on a terminal."""

  def __init__(self, name: str, total: int, start: int):
    self.name, self.total, self.start = name, total, start
    self.t0 = time.time()
    self.tty = sys.stdout.isatty()

  def update(self, step: int, metrics: Dict[str, float], lr: float):
    """Shows `metrics` (the caller picks which) at `step`."""
    elapsed = time.time() - self.t0
    rate = (step - self.start) / elapsed if elapsed > 0 else 0.0
    eta = (self.total - step) / rate if rate > 0 else float('nan')
    width = 20
    done = int(width * step / max(self.total, 1))
    bar = '=' * done + '.' * (width - done)
    shown = ' '.join(f'{k}={v:.4f}' for k, v in metrics.items())
    line = (f'[{self.name}] {step}/{self.total} [{bar}] {shown} lr={lr:.4g} '
            f'{rate:.2f} steps/s ETA {eta:.0f}s')
    if self.tty:
      end = '\n' if step >= self.total else ''
      print('\r' + line, end=end, flush=True)
    else:
      print(line, flush=True)


# -----------------------------------------------------------------------------
# Training.


class Trainer:
  """Trains one stage under the current strategy.

  Args:
    config: the experiment config.
    strategy: the tf.distribute strategy (built once, in main).
    index: 1 (pretrain) or 2 (classifier).
    monitor: called as `monitor(model, step)` every
      `--monitor_every_epochs` epochs and at the last step; returns float
      scalars to print and log. None = no monitor.
  """

  def __init__(self, config: config_lib.ExperimentConfig,
               strategy: tf.distribute.Strategy, index: int,
               monitor: Optional[Monitor] = None):
    config_lib.check_model_dir(config, TrainingError)
    self.config = config
    self.strategy = strategy
    self.info = datasets.get_dataset_info(
        config.data, config.runtime.model_dir)
    self.plan = plan_stage(config, self.info, index)
    self.stage = self.plan.stage
    self.data_config = stage_config(config, self.plan)
    micro_batch_size = self._micro_batch_size()  # Fails before building.
    self.is_chief = distribute.is_chief(strategy)
    # Saving is collective under MultiWorkerMirroredStrategy: every worker
    # saves, but only the chief's checkpoints are kept in model_dir; the
    # others write to a scratch directory and resume from the chief's.
    self.chief_ckpt_dir = checkpoints.stage_dir(config.runtime.model_dir,
                                                index)
    self.ckpt_dir = self.chief_ckpt_dir if self.is_chief else os.path.join(
        config.runtime.model_dir, 'tmp',
        f'worker_{distribute.worker_id(strategy)}', self.plan.name)
    self.log_dir = os.path.join(config.runtime.model_dir, 'logs',
                                self.plan.name)
    set_determinism(config)  # Before anything draws initial weights.
    # MultiWorkerMirroredStrategy: workers agree on stopping (SIGTERM).
    self._multi_worker = isinstance(
        strategy, tf.distribute.MultiWorkerMirroredStrategy)

    with strategy.scope():
      self.model = models.build_experiment_model(config, self.info.num_classes)
      self.schedule = optim.build_schedule(self.stage, self.plan.global_batch,
                                           self.plan.steps_per_epoch)
      self.wd_vars = models.weight_decay_variables(
          self.model,
          use_encoder=self.stage.use_encoder_weight_decay,
          use_projection_head=self.stage.use_projection_head_weight_decay,
          use_classification_head=(
              self.stage.use_classification_head_weight_decay),
          include_bias=config.loss.use_bias_weight_decay)
      optimizer = optim.build_optimizer(self.stage, self.schedule,
                                        weight_decay_variables=self.wd_vars)
      if self.model.encoder_compute_dtype == 'float16':
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
      self.optimizer = optimizer
      # Build the slots eagerly: lazily inside tf.function they cannot be
      # initialised under MirroredStrategy.
      self.optimizer.build(self.model.trainable_variables)
      # GenSCL, label mixing, distillation, momentum queue (stage 1; all off
      # by default): see extensions.py.
      self.extensions = extensions.TrainStepExtensions(config, self.info,
                                                       self.model, index)
    self._freeze_encoder_bn_stats()
    ws = config.warm_start
    self.step = step_lib.TrainStep(
        config, self.model, self.optimizer, self.extensions,
        step_lib.plan_losses(config, self.stage, self.extensions,
                             bool(self.wd_vars)),
        global_batch=self.plan.global_batch,
        num_classes=self.info.num_classes,
        weight_decay_variables=self.wd_vars,
        # As the reference: every training step blurs when deferred, also
        # with one view (stage 2, cross-entropy runs).
        defer_blur=augment.should_defer_blur(config.augment),
        # As the reference: a model warm-started from a reference checkpoint
        # runs batch norm in inference mode unless batch_norm_in_train_mode.
        bn_training=not (ws.reference_ckpt and
                         not ws.batch_norm_in_train_mode),
        # The loss-scale optimizer (float16) skips steps with non-finite
        # gradients by design, so those are not an error there.
        check_gradients=not isinstance(
            self.optimizer, keras.optimizers.LossScaleOptimizer),
        micro_batch_size=micro_batch_size)

    # The input stream is built by `make_iterator` once the starting step is
    # known (it resumes at that step's position). The step, model and
    # optimizer slots are the whole training state: there is no other random
    # state (see `step.TrainStep`).
    self.dataset = None
    self.iterator = None
    self.checkpoint = tf.train.Checkpoint(model=self.model,
                                          optimizer=self.optimizer)
    for name, trackable in self.extensions.checkpoint_objects().items():
      setattr(self.checkpoint, name, trackable)  # E.g. the momentum queue.
    # As the reference's RunConfig: besides the newest max_to_keep, one
    # checkpoint per keep_checkpoint_interval_secs is kept for good.
    self.manager = tf.train.CheckpointManager(
        self.checkpoint, self.ckpt_dir,
        max_to_keep=config.runtime.max_checkpoints_to_keep,
        keep_checkpoint_every_n_hours=(
            config.runtime.keep_checkpoint_interval_secs / 3600.0 or None))
    self._loop_fn = None
    self._sync_fn = None
    every = config.analysis.monitor_every_epochs
    self.monitor = monitor if every > 0 else None
    self._monitor_interval = every * self.plan.steps_per_epoch  # In steps.
    self.monitor_seconds = 0.0  # Spent in the monitor (the cost, measured).

  # --- set-up ---------------------------------------------------------------

  def _micro_batch_size(self) -> int:
    """Stage 1's `--micro_batch_size`, checked against the replica batch.

    Stage 2 ignores it: it trains the classifier with a per-sample loss
    (nothing couples the samples, so a large batch needs no caching), on an
    encoder frozen by the default stop gradient (no encoder activations are
    kept for a backward pass); caching would only cost a second forward.
    """
    micro = self.config.runtime.micro_batch_size
    if self.plan.index != 1 or not micro:
      return 0
    replicas = self.strategy.num_replicas_in_sync
    per_replica = self.plan.global_batch // replicas
    try:
      grad_cache.num_micro_batches(per_replica, micro)
    except ValueError as e:
      raise config_lib.ConfigError(
          f'--micro_batch_size={micro} must divide the per-replica batch '
          f'--batch_size={self.plan.global_batch} / {replicas} replicas = '
          f'{per_replica}; pick a divisor of {per_replica}, or 0 (off).'
      ) from e
    return micro

  def _freeze_encoder_bn_stats(self):
    """`update_encoder_batch_norm=False`: batch statistics are still used for
    normalisation (training mode) but the moving averages stay put, as the
    reference's empty update_ops do. Those are every batch-norm update of
    the model (the projection head's too), despite the name. Momentum 1
    keeps moving = moving."""
    if self.stage.update_encoder_batch_norm:
      return
    for layer in _bn_layers(self.model):
      layer.momentum = 1.0

  def make_iterator(self, start_step: int):
    """(Re)builds the input stream at the position of `start_step`."""
    self.dataset = self.strategy.distribute_datasets_from_function(
        lambda ctx: pipeline.build_dataset(self.data_config, ctx,
                                           training=True,
                                           start_step=start_step))
    self.iterator = iter(self.dataset)
    return self.iterator

  def _release_input(self):
    """Drops the input stream: after an input error its background threads
    would otherwise keep retrying (a core busy) while the exception, which
    references this trainer, is alive."""
    self.iterator = None
    self.dataset = None

  def _restore_checkpoint(self, prefix: str):
    try:
      self.checkpoint.read(prefix).assert_existing_objects_matched()
    except AssertionError as e:
      raise checkpoints.CheckpointError(
          f'Checkpoint {prefix} does not match the model being trained '
          f'(other flags than {checkpoints.CONFIG_FILE}?): {e}') from e

  def restore_or_initialize(self) -> int:
    """Resumes this stage, or warm-starts it; returns the starting step.

    Resuming uses the newest readable checkpoint of the stage; unreadable
    newer ones are skipped with a warning (`checkpoints.restore_newest`).
    A fresh stage 2 starts from stage 1's checkpoint in this model_dir when
    there is one, else from --reference_ckpt (warm-starting only once, as
    the reference); a fresh stage 1 from --reference_ckpt.
    """
    latest = checkpoints.restore_newest(self.chief_ckpt_dir,
                                        self._restore_checkpoint)
    if latest:
      step = int(self.optimizer.iterations.numpy())
      logging.info('Resumed %s from %s at step %d.', self.plan.name, latest,
                   step)
      print(f'[{self.plan.name}] resuming from {latest} at step {step}',
            flush=True)
      return step
    ws = self.config.warm_start
    if self.plan.index == 2:
      # Stage 1 ran in this model_dir: continue from it. The reference warm
      # starts once, before stage 1; what was warm-started (the classifier
      # too, with warm_start_classifier) is in stage 1's checkpoint.
      pretrained = checkpoints.restore_newest(
          checkpoints.stage_dir(self.config.runtime.model_dir, 1),
          lambda prefix: checkpoints.restore_parts(
              self.model, prefix, encoder=True, projection_head=True,
              classifier=bool(ws.reference_ckpt and
                              ws.warm_start_classifier)))
      if pretrained is not None:
        print(f'[{self.plan.name}] encoder from {pretrained}', flush=True)
        return 0
    if ws.reference_ckpt:
      path = checkpoints.resolve_checkpoint(ws.reference_ckpt)
      if path is None:
        raise TrainingError(
            f'--reference_ckpt={ws.reference_ckpt}: no checkpoint found there.')
      if not (ws.warm_start_encoder or ws.warm_start_projection_head or
              ws.warm_start_classifier):
        logging.warning('--reference_ckpt is set but no --warm_start_* flag: '
                        'nothing is loaded from it.')
      checkpoints.restore_parts(
          self.model, path, ws.warm_start_encoder,
          ws.warm_start_projection_head, ws.warm_start_classifier,
          allow_missing=ws.ignore_missing_checkpoint_vars)
      print(f'[{self.plan.name}] warm-started from {path}', flush=True)
    elif self.plan.index == 2:
      raise TrainingError(
          'The classifier stage needs a pretrained encoder: run '
          '--mode=pretrain with the same --model_dir first, or pass '
          '--reference_ckpt=DIR --warm_start_encoder.')
    return 0

  def _make_loop(self):
    """tf.function running `num_steps` steps; returns their mean metrics."""
    strategy = self.strategy
    replica_step = self.step
    # --use_xla: XLA-compile the per-replica step, as Keras' jit_compile does
    # (the loop around it reads the iterator, which XLA cannot). TPU steps are
    # compiled anyway; with several replicas on other devices the compiled
    # step cannot reach each replica's variables (XLA places it on one
    # device), so it stays off there.
    if (self.config.runtime.use_xla and
        not isinstance(strategy, tf.distribute.TPUStrategy)):
      if strategy.num_replicas_in_sync == 1:
        replica_step = tf.function(replica_step, jit_compile=True)
      else:
        logging.warning('--use_xla is ignored with %d replicas (only one '
                        'replica or TPU).', strategy.num_replicas_in_sync)

    def loop_fn(iterator, num_steps):
      def one_step():
        per_replica = strategy.run(replica_step, args=next(iterator))
        return {k: strategy.reduce(tf.distribute.ReduceOp.SUM, v, axis=None)
                for k, v in per_replica.items()}
      # The first step outside the loop defines the loop-carried structure.
      sums = one_step()
      for _ in tf.range(num_steps - 1):
        sums = {k: v + w for (k, v), w in zip(sums.items(),
                                               one_step().values())}
      return {k: v / tf.cast(num_steps, tf.float32) for k, v in sums.items()}

    return tf.function(loop_fn, jit_compile=None)

  # --- the host loop --------------------------------------------------------

  def next_monitor_step(self, step: int) -> int:
    """The first step > `step` that ends a monitored epoch (or the last)."""
    if self.monitor is None:
      return self.plan.total_steps + 1
    interval = self._monitor_interval
    # Epoch boundary k is at k * interval steps (fractional); the monitor
    # runs after the first whole step past it. The epsilon keeps a boundary
    # that is a whole step (up to rounding) on that step.
    k = math.floor(step / interval + 1e-9) + 1
    return min(max(step + 1, math.ceil(k * interval - 1e-9)),
               self.plan.total_steps)

  def _run_monitor(self, step: int, writer) -> Dict[str, float]:
    """Runs the monitor at `step`; logs and prints its scalars."""
    t0 = time.time()
    scalars = self.monitor(self.model, step)
    seconds = time.time() - t0
    self.monitor_seconds += seconds
    with writer.as_default(step=step):
      for k, v in scalars.items():
        tf.summary.scalar(f'monitor/{k}', v)
    writer.flush()
    if self.is_chief:
      shown = ' '.join(f'{k}={v:.4f}' for k, v in scalars.items())
      print(f'[{self.plan.name}] epoch {step / self.plan.steps_per_epoch:.1f}'
            f' monitor: {shown} ({seconds:.1f} s)', flush=True)
    return scalars

  def progress_metrics(self, metrics: Dict[str, float]) -> Dict[str, float]:
    """The terms the progress line shows: only what the stage trains."""
    if self.step.loss_plan.trains_classifier:
      return metrics
    return {k: v for k, v in metrics.items() if k not in CLASSIFIER_TERMS}

  def _all_finite(self) -> bool:
    """Whether every model and optimizer variable is finite.

    Checked on the host, as the save is about to read every variable anyway;
    this works for any strategy's variables (TPU ones included).
    """
    for v in self.model.variables + self.optimizer.variables:
      if (tf.as_dtype(v.dtype).is_floating and
          not np.all(np.isfinite(np.asarray(v.numpy(), np.float32)))):
        return False
    return True

  def _any_worker_stopping(self, local: bool) -> bool:
    """True if this or (multi-worker) any worker received SIGTERM."""
    if not self._multi_worker:
      return local
    if self._sync_fn is None:
      strategy = self.strategy

      def sync(flag):
        per_replica = strategy.run(tf.identity, args=(flag,))
        return strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica,
                               axis=None)
      self._sync_fn = tf.function(sync)
    return float(self._sync_fn(tf.constant(float(local)))) > 0

  def _save(self, step: int) -> str:
    """Saves a checkpoint at `step`, never one holding non-finite values."""
    if not self._all_finite():
      raise NonFiniteError(
          f'[{self.plan.name}] the weights or optimizer slots are not finite '
          f'at step {step}; not saving them. The last checkpoint is kept; '
          'lower the learning rate or check the inputs.')
    return self.manager.save(checkpoint_number=step)

  def _input_or_cluster_error(self, error: tf.errors.OpError, first: int,
                              last_save: int) -> Exception:
    """A clear error for a failure inside the loop, or `error` itself."""
    text = str(error.message if hasattr(error, 'message') else error)
    # The first line that says something ("Graph execution error:" does not).
    lines = [l.strip() for l in text.splitlines() if l.strip() and not
             l.strip().startswith(('Graph execution error', 'Detected at',
                                   'File ', '[[', '{{'))]
    first_line = (lines[0] if lines else text.strip())[:500]
    if self._multi_worker and isinstance(
        error, (tf.errors.UnavailableError, tf.errors.DeadlineExceededError,
                tf.errors.CancelledError, tf.errors.AbortedError)):
      return TrainingError(
          f'[{self.plan.name}] a worker of the multi-worker job stopped or '
          f'cannot be reached during steps {first + 1}.. ({type(error).__name__}'
          f': {first_line}). Restart every worker with the same command; '
          f'training resumes from the last checkpoint (step {last_save}).')
    if isinstance(error, tf.errors.OutOfRangeError):
      return datasets.DatasetError(
          f'[{self.plan.name}] the training data of {self.info.name} ran out '
          f'at step {first + 1}; is the split empty?')
    named = datasets.unreadable_images_error(self.config.data, error)
    if named is not None:  # Folder images: the message names the file.
      return datasets.DatasetError(
          f'[{self.plan.name}] reading the training data failed during '
          f'steps {first + 1}.. (resume from step {last_save} after the '
          f'fix): {named}')
    if isinstance(error, tf.errors.DataLossError) or (
        isinstance(error, tf.errors.InvalidArgumentError) and
        ('Iterator' in text or 'decode' in text.lower())):
      return datasets.DatasetError(
          f'[{self.plan.name}] reading the training data of {self.info.name} '
          f'failed during steps {first + 1}..: {first_line}. A corrupt or '
          'truncated image or record file? Re-prepare the dataset (e.g. tfds '
          'build --overwrite) and resume; training restarts from the last '
          f'checkpoint (step {last_save}).')
    return error

  def _check_metrics(self, metrics: Dict[str, float], first: int, step: int,
                     last_save: int):
    """Raises NonFiniteError naming the steps and terms that are not finite."""
    bad = {k: v for k, v in metrics.items() if not math.isfinite(v)}
    if not bad:
      return
    where = (f'step {step}' if step == first + 1 else
             f'steps {first + 1}..{step} (rerun with --steps_per_loop=1 to '
             'find the first)')
    raise NonFiniteError(
        f'[{self.plan.name}] non-finite {", ".join(sorted(bad))} at {where}: '
        f'{bad} (all terms, averaged over those steps: {metrics}). Nothing '
        f'after the last checkpoint (step {last_save}) is saved; lower the '
        'learning rate or check the inputs.')

  def train(self) -> Dict[str, float]:
    """Runs the stage to its last step; returns the last metrics.

    Raises:
      NonFiniteError: a loss term, the gradient norm or the weights became
        non-finite (nothing non-finite is saved).
      Preempted: SIGTERM; a checkpoint of the current step was saved.
      TrainingError: a peer of a multi-worker job failed.
      datasets.DatasetError: the training data cannot be read.
    """
    plan, runtime = self.plan, self.config.runtime
    step = self.restore_or_initialize()
    if step >= plan.total_steps:
      print(f'[{plan.name}] already complete ({step}/{plan.total_steps} '
            'steps).', flush=True)
      return {}
    self.make_iterator(step)
    if self._loop_fn is None:
      self._loop_fn = self._make_loop()
    writer = (tf.summary.create_file_writer(self.log_dir) if self.is_chief
              else tf.summary.create_noop_writer())
    progress = _Progress(plan.name, plan.total_steps, step)
    if self.is_chief:
        print(f'[{plan.name}] {plan.total_steps} steps ({self.stage.epochs:g} '
            f'epochs of {self.info.num_train_examples} {self.info.name} '
            f'images, global batch {plan.global_batch}, {plan.num_views} '
            f'view(s), {self.strategy.num_replicas_in_sync} replica(s))',
            flush=True)
    metrics: Dict[str, float] = {}
    monitored: Dict[str, float] = {}  # The monitor's last kNN accuracies.
    next_monitor = self.next_monitor_step(step)
    last_save = first = step
    error = None
    stage_start = time.time()
    with _StopSignal() as stop_signal:
      try:
        while step < plan.total_steps:
          n = min(runtime.steps_per_loop, plan.total_steps - step,
                  runtime.summary_interval_steps -
                  step % runtime.summary_interval_steps,
                  runtime.save_interval_steps -
                  step % runtime.save_interval_steps,
                  next_monitor - step)
          first = step
          t0 = time.time()
          out = self._loop_fn(self.iterator, tf.constant(n, tf.int32))
          metrics = {k: float(v) for k, v in out.items()}
          seconds = time.time() - t0
          step = int(self.optimizer.iterations.numpy())
          self._check_metrics(metrics, first, step, last_save)
          lr = float(self.schedule(step - 1))
          if (step % runtime.summary_interval_steps == 0 or
              step >= plan.total_steps):
            with writer.as_default(step=step):
              for k, v in metrics.items():
                tf.summary.scalar(k, v)
              tf.summary.scalar('learning_rate', lr)
              tf.summary.scalar('steps_per_second', n / max(seconds, 1e-9))
              tf.summary.scalar('epoch', step / plan.steps_per_epoch)
            writer.flush()
          # Checked once per chunk: a SIGTERM during a chunk stops training
          # at its end, so keep a chunk shorter than the grace period.
          stopping = self._any_worker_stopping(stop_signal.requested)
          if (step % runtime.save_interval_steps == 0 or
              step >= plan.total_steps or stopping):
            path = self._save(step)
            last_save = step
          if step >= next_monitor and not stopping:
            monitored = {k: v for k, v in self._run_monitor(
                step, writer).items() if k.startswith('knn')}
            next_monitor = self.next_monitor_step(step)
          if self.is_chief:
            progress.update(step, {**self.progress_metrics(metrics),
                                   **monitored}, lr)
          if stopping:
            raise Preempted(plan.name, step, path)
      except tf.errors.OpError as e:
        self._release_input()
        error = self._input_or_cluster_error(e, first, last_save)
        if error is e:
          raise
      except BaseException:
        self._release_input()
        raise
    if error is not None:
      # Raised outside the handler: the TF error's traceback holds the input
      # iterator (an argument of the loop), whose threads must stop.
      raise error
    if last_save != step:
      self._save(step)
    if self.monitor is not None and self.is_chief:
      total = time.time() - stage_start
      print(f'[{plan.name}] monitor: {self.monitor_seconds:.1f} s of the '
            f'stage\'s {total:.1f} s '
            f'({100 * self.monitor_seconds / max(total, 1e-9):.1f}%)',
            flush=True)
    if not self.is_chief:
      tf.io.gfile.rmtree(self.ckpt_dir)  # Scratch copies of the chief's.
    return metrics


def train_stage(config: config_lib.ExperimentConfig,
                strategy: tf.distribute.Strategy,
                index: int,
                monitor: Optional[Monitor] = None) -> Dict[str, float]:
  """Trains stage `index` unless it has no steps (`Trainer` for monitor)."""
  config_lib.check_model_dir(config, TrainingError)
  stage = config.stage_1 if index == 1 else config.stage_2
  if stage.epochs <= 0:
    print(f'[{STAGE_DIRS[index]}] skipped: stage_{index}_epochs is 0.',
          flush=True)
    return {}
  if distribute.is_chief(strategy):
    checkpoints.write_config(config)
    # Class names and own data's whitening statistics, which eval and export
    # on this model_dir then reuse.
    datasets.save_run_files(
        datasets.get_dataset_info(config.data, config.runtime.model_dir),
        config.runtime.model_dir, config.augment.apply_whitening)
  else:
    checkpoints.check_config(config)  # Fail together with the chief.
  return Trainer(config, strategy, index, monitor).train()
