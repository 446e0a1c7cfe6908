"""Where a run's files live in model_dir, and loading models from checkpoints.

Layout of `model_dir`:

  config.json            the ExperimentConfig of the run
  pretrain/ckpt-N        stage 1 checkpoints (model, optimizer)
  classifier/ckpt-N      stage 2 checkpoints
  logs/{pretrain,classifier,eval}/   TensorBoard summaries
  eval_results.json      top-1 / top-5 of the last evaluation
  export/                SavedModel (default --export_dir)

Checkpoints hold the model as `model` with its parts as `encoder`,
`projection_head` and `classification_head`, so each part can be restored on
its own (warm starts, the classifier stage, export).

Integrity: restoring walks the checkpoints of a directory newest first and
falls back, with a warning, past any that cannot be read (truncated, corrupt,
an unreadable `checkpoint` state file); it fails only when checkpoints exist
but none can be read. `config.json` is written atomically, and training refuses
a model_dir whose config.json holds a different experiment (the differing
fields are listed) unless `--override_config`.
"""

import os
import re
import sys
from typing import Callable, Dict, List, Optional, Tuple

from absl import logging
import tensorflow as tf

from supcon_tf import config as config_lib
from supcon_tf import errors
from supcon_tf import models
from supcon_tf.data import datasets

STAGE_DIRS = {1: 'pretrain', 2: 'classifier'}
CONFIG_FILE = 'config.json'
EVAL_RESULTS_FILE = 'eval_results.json'
EXPORT_DIR = 'export'

# Config fields that may change between runs in one model_dir: how and where
# a run executes, not what it trains.
IGNORED_CONFIG_SECTIONS = ('runtime', 'analysis')
IGNORED_CONFIG_FIELDS = ('data.data_dir', 'data.eval_batch_size',
                         'data.download')

# What a checkpoint that cannot be read raises (a truncated data file raises
# IndexError from the bundle reader, a corrupt one DataLossError, a truncated
# index "not an sstable").
_UNREADABLE = (tf.errors.OpError, ValueError, IndexError, EOFError, OSError)


class CheckpointError(errors.UserError, RuntimeError):
  """A checkpoint is missing or does not fit the model; the message says why."""


class ConfigMismatchError(CheckpointError):
  """model_dir holds another experiment's config.json."""


def stage_dir(model_dir: str, index: int) -> str:
  """Checkpoint directory of stage `index` (1 or 2)."""
  return os.path.join(model_dir, STAGE_DIRS[index])


def latest_in(directory: str) -> Optional[str]:
  """Newest checkpoint prefix in `directory`, or None."""
  candidates = checkpoint_candidates(directory)
  return candidates[0] if candidates else None


def _checkpoint_number(prefix: str) -> int:
  match = re.search(r'-(\d+)$', prefix)
  return int(match.group(1)) if match else -1


def checkpoint_candidates(directory: str) -> List[str]:
  """Checkpoint prefixes in `directory`, newest (highest number) first.

  The union of what the `checkpoint` state file lists and the prefixes with an
  index file on disk, so a corrupt or missing state file (or a kill between
  writing a checkpoint and updating the state file) loses nothing.
  """
  if not directory or not tf.io.gfile.isdir(directory):
    return []
  prefixes = set()
  state = tf.train.get_checkpoint_state(directory)  # None if unreadable.
  if state is not None:
    for path in (list(state.all_model_checkpoint_paths) +
                 [state.model_checkpoint_path]):
      if path:
        prefixes.add(path if os.path.isabs(path) or '://' in path
                     else os.path.join(directory, path))
  for index in tf.io.gfile.glob(os.path.join(directory, '*.index')):
    prefixes.add(index[:-len('.index')])
  prefixes = [p for p in prefixes if tf.io.gfile.exists(p + '.index')]
  return sorted(prefixes, key=lambda p: (_checkpoint_number(p), p),
                reverse=True)


def restore_newest(directory: str,
                   restore_fn: Callable[[str], None]) -> Optional[str]:
  """Calls `restore_fn(prefix)` on the newest checkpoint that restores.

  Checkpoints that fail to restore (truncated, corrupt) are skipped with a
  warning naming them and the error, and the next older one is tried.

  Args:
    directory: a checkpoint directory (e.g. model_dir/pretrain).
    restore_fn: restores from a prefix; raises if it cannot be read.

  Returns:
    The prefix restored, or None if `directory` holds no checkpoint.

  Raises:
    CheckpointError: checkpoints exist but none could be restored.
  """
  failures = []
  for prefix in checkpoint_candidates(directory):
    try:
      restore_fn(prefix)
    except _UNREADABLE as e:
      reason = f'{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}'
      failures.append(f'{prefix} ({reason})')
      message = (f'Checkpoint {prefix} cannot be restored ({reason}); trying '
                 'the previous one.')
      logging.warning(message)
      print(f'warning: {message}', file=sys.stderr, flush=True)
      continue
    if failures:
      print(f'warning: restored {prefix} instead of the newer unreadable '
            f'{", ".join(failures)}.', file=sys.stderr, flush=True)
    return prefix
  if failures:
    raise CheckpointError(
        f'No checkpoint in {directory} can be restored: '
        + '; '.join(failures) + '. Move the unreadable files away (to start '
        'the stage over, move the whole directory).')
  return None


def resolve_checkpoint(path: str) -> Optional[str]:
  """A checkpoint prefix from a prefix, a checkpoint dir or a model_dir."""
  if not path:
    return None
  if tf.io.gfile.exists(path + '.index'):
    return path
  for directory in (path, os.path.join(path, STAGE_DIRS[2]),
                    os.path.join(path, STAGE_DIRS[1])):
    latest = latest_in(directory)
    if latest:
      return latest
  return None


def latest_model_checkpoint(model_dir: str) -> Optional[str]:
  """Newest checkpoint of the furthest stage in `model_dir`."""
  for index in (2, 1):
    latest = latest_in(stage_dir(model_dir, index))
    if latest:
      return latest
  return None


def restore_parts(model: models.SupConModel, path: str, encoder: bool,
                  projection_head: bool, classifier: bool,
                  allow_missing: bool = False) -> None:
  """Loads the chosen parts of `model` from a supcon_tf checkpoint.

  Checkpoints hold the model under `model/` with its parts as `encoder`,
  `projection_head` and `classification_head`, so a partial object graph
  restores exactly those parts.

  Raises:
    CheckpointError: if a chosen part is missing from the checkpoint (unless
      `allow_missing`).
  """
  parts = {}
  if encoder:
    parts['encoder'] = model.encoder
  if projection_head:
    parts['projection_head'] = model.projection_head
  if classifier:
    parts['classification_head'] = model.classification_head
  if not parts:
    return
  status = tf.train.Checkpoint(model=tf.train.Checkpoint(**parts)).read(path)
  if allow_missing:
    status.expect_partial()
    return
  try:
    status.assert_existing_objects_matched()
  except AssertionError as e:
    raise CheckpointError(
        f'Checkpoint {path} does not hold all of {sorted(parts)}: {e}. Pass '
        '--ignore_missing_checkpoint_vars to load what is there.') from e
  status.expect_partial()  # Optimizer slots etc. are not wanted here.


def experiment_diff(old: config_lib.ExperimentConfig,
                    new: config_lib.ExperimentConfig
                    ) -> Dict[str, Tuple[object, object]]:
  """Fields that make `new` a different experiment than `old`.

  As `config.diff`, without the sections and fields that only say how or
  where a run executes (`IGNORED_CONFIG_SECTIONS`, `IGNORED_CONFIG_FIELDS`).
  """
  return {k: v for k, v in config_lib.diff(old, new).items()
          if k.split('.', 1)[0] not in IGNORED_CONFIG_SECTIONS and
          k not in IGNORED_CONFIG_FIELDS}


def check_config(config: config_lib.ExperimentConfig) -> None:
  """Refuses a model_dir whose config.json holds a different experiment.

  Raises:
    ConfigMismatchError: listing the differing fields, unless
      `config.runtime.override_config`.
  """
  path = os.path.join(config.runtime.model_dir, CONFIG_FILE)
  if not tf.io.gfile.exists(path):
    return
  with tf.io.gfile.GFile(path) as f:
    text = f.read()
  try:
    old = config_lib.ExperimentConfig.from_json(text)
  except (ValueError, KeyError, TypeError) as e:
    logging.warning('Ignoring unreadable %s (it is rewritten): %s', path, e)
    return
  differing = experiment_diff(old, config)
  if not differing:
    return
  lines = '\n'.join(f'  {k}: {a!r} in {CONFIG_FILE}, {b!r} now'
                    for k, (a, b) in sorted(differing.items()))
  if config.runtime.override_config:
    logging.warning('--override_config: replacing %s; it differed in:\n%s',
                    path, lines)
    return
  raise ConfigMismatchError(
      f'--model_dir={config.runtime.model_dir} holds another experiment: its '
      f'{CONFIG_FILE} differs in {len(differing)} field(s):\n{lines}\n'
      'Use a new --model_dir, or pass --override_config to train here anyway.')


def write_config(config: config_lib.ExperimentConfig) -> None:
  """Writes model_dir/config.json, atomically (refusing another experiment).

  Raises:
    ConfigMismatchError: see `check_config`.
  """
  model_dir = config.runtime.model_dir
  check_config(config)
  tf.io.gfile.makedirs(model_dir)
  path = os.path.join(model_dir, CONFIG_FILE)
  tmp = path + '.tmp'
  with tf.io.gfile.GFile(tmp, 'w') as f:
    f.write(config.to_json())
  tf.io.gfile.rename(tmp, path, overwrite=True)


def load_model_for_inference(config: config_lib.ExperimentConfig,
                             info: datasets.DatasetInfo,
                             strategy: Optional[tf.distribute.Strategy] = None
                             ) -> models.SupConModel:
  """The model with the newest weights in model_dir (or --reference_ckpt).

  The newest readable checkpoint of the furthest stage is used; unreadable
  newer ones of that stage are skipped with a warning (`restore_newest`).
  """
  strategy = strategy or tf.distribute.get_strategy()
  model_dir = config.runtime.model_dir
  reference = resolve_checkpoint(config.warm_start.reference_ckpt)
  stage_dirs = [stage_dir(model_dir, i) for i in (2, 1)] if model_dir else []
  stage_dirs = [d for d in stage_dirs if checkpoint_candidates(d)]
  if not stage_dirs and reference is None:
    config_lib.check_model_dir(config, CheckpointError)
    raise CheckpointError(
        f'No checkpoint in --model_dir={model_dir!r}: train '
        'first (--mode=pretrain / classifier / train_then_eval).')
  with strategy.scope():
    model = models.build_experiment_model(config, info.num_classes)

  def restore(prefix):
    restore_parts(model, prefix, encoder=True, projection_head=True,
                  classifier=True)

  if stage_dirs:
    path = restore_newest(stage_dirs[0], restore)
  else:
    path = reference
    restore(path)
  logging.info('Loaded %s.', path)
  return model
