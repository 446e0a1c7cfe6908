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
"""

import os
from typing import Optional

from absl import logging
import tensorflow as tf

from supcon_tf import config as config_lib
from supcon_tf import models
from supcon_tf.data import datasets

STAGE_DIRS = {1: 'pretrain', 2: 'classifier'}
CONFIG_FILE = 'config.json'
EVAL_RESULTS_FILE = 'eval_results.json'
EXPORT_DIR = 'export'


class CheckpointError(RuntimeError):
  """A checkpoint is missing or does not fit the model; the message says why."""


def build_model(config: config_lib.ExperimentConfig,
                info: datasets.DatasetInfo) -> models.SupConModel:
  """The model for `config` (call under `strategy.scope()`)."""
  return models.build_model(
      config.model, info.num_classes,
      mixed_precision=config.augment.allow_mixed_precision)


def stage_dir(model_dir: str, index: int) -> str:
  """Checkpoint directory of stage `index` (1 or 2)."""
  return os.path.join(model_dir, STAGE_DIRS[index])


def latest_in(directory: str) -> Optional[str]:
  """Newest checkpoint prefix in `directory`, or None."""
  if not directory or not tf.io.gfile.isdir(directory):
    return None
  return tf.train.latest_checkpoint(directory)


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


def write_config(config: config_lib.ExperimentConfig) -> None:
  """Writes model_dir/config.json (refusing another experiment's model_dir)."""
  model_dir = config.runtime.model_dir
  tf.io.gfile.makedirs(model_dir)
  path = os.path.join(model_dir, CONFIG_FILE)
  if tf.io.gfile.exists(path):
    with tf.io.gfile.GFile(path) as f:
      try:
        old = config_lib.ExperimentConfig.from_json(f.read())
      except (ValueError, KeyError) as e:
        logging.warning('Ignoring unreadable %s: %s', path, e)
        old = None
    if old is not None:
      differing = {k: v for k, v in config_lib.diff(old, config).items()
                   if not k.startswith('runtime.')}
      if differing:
        logging.warning('model_dir %s was used with a different config: %s',
                        model_dir, differing)
  with tf.io.gfile.GFile(path, 'w') as f:
    f.write(config.to_json())


def load_model_for_inference(config: config_lib.ExperimentConfig,
                             info: datasets.DatasetInfo,
                             strategy: Optional[tf.distribute.Strategy] = None
                             ) -> models.SupConModel:
  """The model with the newest weights in model_dir (or --reference_ckpt)."""
  strategy = strategy or tf.distribute.get_strategy()
  path = latest_model_checkpoint(config.runtime.model_dir)
  if path is None:
    path = resolve_checkpoint(config.warm_start.reference_ckpt)
  if path is None:
    raise CheckpointError(
        f'No checkpoint in --model_dir={config.runtime.model_dir!r}: train '
        'first (--mode=pretrain / classifier / train_then_eval).')
  with strategy.scope():
    model = build_model(config, info)
  restore_parts(model, path, encoder=True, projection_head=True,
                classifier=True)
  logging.info('Loaded %s.', path)
  return model
