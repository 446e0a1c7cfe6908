"""`--mode=continuous_eval`: evaluate and export each new checkpoint.

The reference's eval job (`--mode=eval` of its launcher, run next to the
TPU training job) iterates `tf.train.checkpoints_iterator(model_dir,
min_interval_secs=eval_interval_secs, timeout=1 hour)`: whenever a checkpoint
newer than the last one evaluated appears, it evaluates it and exports a
SavedModel of it, and it stops after the checkpoint of the last train step
(or when no new checkpoint came within the timeout). This mode does the same
over our two stage directories: the newest checkpoint of the furthest stage
(`checkpoints.latest_model_checkpoint`) is evaluated (`classify.evaluate`,
merged into eval_results.json) and exported to
`<export_dir or model_dir/exports>/<stage>-<step>`; it stops after the
checkpoint at the last step of the last stage that trains.
"""

import os
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import tensorflow as tf

from supcon_tf import config as config_lib
from supcon_tf import distribute
from supcon_tf import export
from supcon_tf import models
from supcon_tf.data import datasets
from supcon_tf.evaluation import classify
from supcon_tf.evaluation import results as results_lib
from supcon_tf.training import checkpoints
from supcon_tf.training import trainer

EXPORTS_DIR = 'exports'  # As the reference's model_dir/exports.
# How often the model_dir is looked at while waiting (tf.train's default).
POLL_SECS = 1.0


def final_checkpoint(config: config_lib.ExperimentConfig,
                     info: datasets.DatasetInfo) -> Tuple[str, int]:
  """(stage directory name, step) of the last checkpoint training writes."""
  index = 2 if config.stage_2.epochs > 0 else 1
  plan = trainer.plan_stage(config, info, index)
  return plan.name, plan.total_steps


def _stage_of(prefix: str) -> str:
  return os.path.basename(os.path.dirname(prefix))


def _load(config: config_lib.ExperimentConfig, info: datasets.DatasetInfo,
          prefix: str) -> models.SupConModel:
  """A model (under the current scope) holding the checkpoint `prefix`."""
  model = models.build_experiment_model(config, info.num_classes)
  checkpoints.restore_parts(model, prefix, encoder=True, projection_head=True,
                            classifier=True)
  return model


def exports_dir(config: config_lib.ExperimentConfig) -> str:
  return (config.runtime.export_dir or
          os.path.join(config.runtime.model_dir, EXPORTS_DIR))


def continuous_eval(config: config_lib.ExperimentConfig,
                    strategy: tf.distribute.Strategy,
                    sleep: Callable[[float], None] = time.sleep,
                    clock: Callable[[], float] = time.monotonic
                    ) -> List[Dict[str, Any]]:
  """Evaluates and exports every new checkpoint until the last train step.

  Args:
    config: the experiment config (`runtime.eval_interval_secs`: at least
      this long between two evaluations; `runtime.eval_timeout_secs`: stop
      after waiting this long for a new checkpoint).
    strategy: the current strategy.
    sleep: waits the given seconds (tests replace it).
    clock: monotonic seconds (tests replace it).

  Returns:
    One `classify.evaluate` result per evaluated checkpoint, plus 'stage',
    'step' and 'export_dir', oldest first.
  """
  runtime = config.runtime
  config_lib.check_model_dir(config, trainer.TrainingError)
  info = datasets.get_dataset_info(config.data, runtime.model_dir)
  last_stage, last_step = final_checkpoint(config, info)
  print(f'[continuous_eval] watching {runtime.model_dir} until '
        f'{last_stage} step {last_step}', flush=True)
  evaluated: List[Dict[str, Any]] = []
  previous: Optional[str] = None
  waiting_since = clock()
  while True:
    prefix = checkpoints.latest_model_checkpoint(runtime.model_dir)
    if prefix is None or prefix == previous:
      if clock() - waiting_since >= runtime.eval_timeout_secs:
        print(f'[continuous_eval] no new checkpoint for '
              f'{runtime.eval_timeout_secs:g} s; stopping.', flush=True)
        return evaluated
      sleep(min(POLL_SECS, max(runtime.eval_interval_secs, 0.01)))
      continue
    started = clock()
    stage, step = _stage_of(prefix), results_lib.checkpoint_step(prefix)
    with strategy.scope():
      model = _load(config, info, prefix)
    result = dict(classify.evaluate(config, strategy, model=model,
                                    checkpoint=prefix))
    if distribute.is_chief(strategy):
      # Serving graphs must not capture distributed variables: export a
      # copy built outside the strategy.
      result['export_dir'] = export.export_saved_model(
          config, model=_load(config, info, prefix),
          export_dir=os.path.join(exports_dir(config), f'{stage}-{step}'),
          overwrite=True)
    result.update(stage=stage, step=step)
    evaluated.append(result)
    previous = prefix
    if stage == last_stage and step >= last_step:
      print(f'[continuous_eval] evaluated the last checkpoint ({prefix}).',
            flush=True)
      return evaluated
    # tf.train.checkpoints_iterator: at least min_interval_secs between
    # yields; the timeout counts from then on.
    sleep(max(0.0, started + runtime.eval_interval_secs - clock()))
    waiting_since = clock()
