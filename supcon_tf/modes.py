"""`--mode` -> what runs: the one dispatch table of the command line.

Each handler takes `(config, strategy)` and returns what the mode produces
(metrics, a path, ...). Modules register here; `main.py` only dispatches.
"""

import os
from typing import Any, Callable, Dict

from supcon_tf import config as config_lib
from supcon_tf import distribute
from supcon_tf import enums
from supcon_tf import export
from supcon_tf.evaluation import classify
from supcon_tf.training import trainer

Handler = Callable[[config_lib.ExperimentConfig, Any], Any]


def stage_1_monitor(config, strategy):
  """The embedding monitor of stage 1, or None (`--monitor_every_epochs`).

  Built here so that training takes it as a callback and never imports
  evaluation (which imports training).
  """
  if config.analysis.monitor_every_epochs <= 0:
    return None
  from supcon_tf.evaluation import monitor  # pylint: disable=g-import-not-at-top
  return monitor.EmbeddingMonitor(config, strategy)


def run_pretrain(config, strategy):
  return trainer.train_stage(config, strategy, 1,
                             stage_1_monitor(config, strategy))


def run_classifier(config, strategy):
  return trainer.train_stage(config, strategy, 2)


def run_train(config, strategy):
  return {'pretrain': trainer.train_stage(config, strategy, 1,
                                          stage_1_monitor(config, strategy)),
          'classifier': trainer.train_stage(config, strategy, 2)}


def run_train_then_eval(config, strategy):
  """Both stages, eval, then export (as the reference's train_then_eval)."""
  run_train(config, strategy)
  results = classify.evaluate(config, strategy)
  if distribute.is_chief(strategy):
    export.export_saved_model(config, strategy)
  return results


def run_eval(config, strategy):
  return classify.evaluate(config, strategy)


def run_export(config, strategy):
  return export.export_saved_model(config, strategy)


def run_show_augmentations(config, strategy):
  del strategy
  from supcon_tf.data import visualize  # pylint: disable=g-import-not-at-top
  config_lib.check_model_dir(config, trainer.TrainingError)
  path = visualize.save_augmentation_grid(
      config, os.path.join(config.runtime.model_dir, 'augmentations.png'))
  print(f'[show_augmentations] wrote {path}', flush=True)
  return path


def run_eval_knn(config, strategy):
  from supcon_tf.evaluation import knn  # pylint: disable=g-import-not-at-top
  return knn.run_eval_knn(config, strategy)


def run_eval_corruptions(config, strategy):
  from supcon_tf.evaluation import corruptions  # pylint: disable=g-import-not-at-top
  return corruptions.run_eval_corruptions(config, strategy)


def run_continuous_eval(config, strategy):
  from supcon_tf.evaluation import continuous  # pylint: disable=g-import-not-at-top
  return continuous.continuous_eval(config, strategy)


def run_plot_embeddings(config, strategy):
  from supcon_tf.evaluation import plots  # pylint: disable=g-import-not-at-top
  return plots.run_plot_embeddings(config, strategy)


def run_eval_retrieval(config, strategy):
  from supcon_tf.evaluation import retrieval_eval  # pylint: disable=g-import-not-at-top
  return retrieval_eval.run_eval_retrieval(config, strategy)


MODE_HANDLERS: Dict[enums.Mode, Handler] = {
    enums.Mode.PRETRAIN: run_pretrain,
    enums.Mode.CLASSIFIER: run_classifier,
    enums.Mode.TRAIN: run_train,
    enums.Mode.TRAIN_THEN_EVAL: run_train_then_eval,
    enums.Mode.EVAL: run_eval,
    enums.Mode.EXPORT: run_export,
    enums.Mode.SHOW_AUGMENTATIONS: run_show_augmentations,
    enums.Mode.EVAL_KNN: run_eval_knn,
    enums.Mode.EVAL_CORRUPTIONS: run_eval_corruptions,
    enums.Mode.PLOT_EMBEDDINGS: run_plot_embeddings,
    enums.Mode.CONTINUOUS_EVAL: run_continuous_eval,
    enums.Mode.EVAL_RETRIEVAL: run_eval_retrieval,
}
