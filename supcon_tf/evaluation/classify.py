"""`--mode=eval`: top-1 / top-5 accuracy and cross-entropy of the classifier.

Runs the eval split through `runner.Runner.classify` and merges the results
into `model_dir/eval_results.json` (other modes' keys are kept) and
TensorBoard (`logs/eval`).
"""

from typing import Any, Dict, Optional

import tensorflow as tf

from supcon_tf import config as config_lib
from supcon_tf import distribute
from supcon_tf import models
from supcon_tf.data import datasets
from supcon_tf.data import pipeline
from supcon_tf.evaluation import results as results_lib
from supcon_tf.evaluation import runner
from supcon_tf.training import checkpoints


EvalError = runner.EvalError


def evaluate(config: config_lib.ExperimentConfig,
             strategy: tf.distribute.Strategy,
             model: Optional[models.SupConModel] = None,
             checkpoint: Optional[str] = None) -> Dict[str, Any]:
  """Top-1 / top-5 accuracy and cross-entropy on the eval split.

  Args:
    config: the experiment config.
    strategy: the current strategy.
    model: the model to evaluate; default: the newest checkpoint of
      `config.runtime.model_dir`.
    checkpoint: the checkpoint `model` holds, recorded with the results
      (default: the newest of `config.runtime.model_dir`).

  Returns:
    {'top_1_accuracy', 'top_5_accuracy', 'cross_entropy_loss',
     'num_examples', 'dataset', 'split', 'checkpoint'}.
  """
  info = datasets.get_dataset_info(
      config.data, config.runtime.model_dir)
  if model is None:
    model = checkpoints.load_model_for_inference(config, info, strategy)
  sums = runner.Runner(model, strategy).classify(
      lambda ctx: pipeline.build_dataset(config, ctx, training=False),
      max_batches=config.runtime.max_eval_steps,
      top_k=min(5, info.num_classes))
  if sums['count'] == 0:
    raise EvalError(f'The eval split of {info.name} is empty.')
  if checkpoint is None:
    checkpoint = checkpoints.latest_model_checkpoint(
        config.runtime.model_dir) or ''
  results = {
      'top_1_accuracy': sums['top_1'] / sums['count'],
      'top_5_accuracy': sums['top_k'] / sums['count'],
      'cross_entropy_loss': sums['cross_entropy'] / sums['count'],
      'num_examples': int(sums['count']),
      'dataset': info.name,
      'split': info.eval_split,
      'checkpoint': checkpoint,
  }
  model_dir = config.runtime.model_dir
  if model_dir and distribute.is_chief(strategy):
    results_lib.publish(
        model_dir, checkpoints.EVAL_RESULTS_FILE, results,
        {k: results[k] for k in ('top_1_accuracy', 'top_5_accuracy',
                                 'cross_entropy_loss')}, checkpoint)
  print(f'[eval] {info.name}/{info.eval_split}: top-1 '
        f'{results["top_1_accuracy"]:.4f}, top-5 '
        f'{results["top_5_accuracy"]:.4f} on {results["num_examples"]} '
        'images', flush=True)
  return results
