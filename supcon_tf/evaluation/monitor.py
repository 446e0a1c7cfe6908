"""The stage-1 embedding monitor: is the embedding learning, or collapsing?

With `--monitor_every_epochs=E`, the trainer calls an `EmbeddingMonitor`
every E epochs (and at the last step) on the model being trained. On two
fixed subsets, embedded in eval preprocessing (one centre crop, no
augmentation, batch norm in inference mode, `training=False`):

* the first `--monitor_bank_size` images of the train split (as training
  reads it: the `num_images` cap and label noise included) are the memory
  bank, and
* the first `--monitor_query_size` images of the test split are the queries,

it reports

* `knn_top_1_accuracy@<k>` for each k of `--knn_k`: the weighted kNN vote of
  `knn.py` (the same functions, so on the same subsets it equals
  `--mode=eval_knn` run with `--num_images=<bank size>` and
  `--max_eval_steps=<query size> / --eval_batch_size`), and
* the collapse indicators of `embedding_stats.py` on the queries:
  `positive_cosine`, `negative_cosine`, `alignment`, `uniformity`,
  `dimension_std_scaled` (std per dimension x sqrt(d): about 1 when spread
  out, 0 when collapsed).

The embedding is the encoder's L2-normalised output (what the linear
classifier and `eval_knn` read), not the projection the loss sees.

Cost: one forward pass over bank + queries per call (the step function is
traced once per monitor; the preprocessed subsets are cached in memory after
the first call when they take at most 256 MB), the [queries, bank]
similarities and a [queries, queries] float64 matrix; memory is bounded by the
two sizes, not by the dataset. The trainer measures the time spent here and
prints it at the end of the stage.

Dependency direction: the trainer takes this as a plain callback
(`trainer.Monitor`) from `modes.py`; training never imports evaluation.
"""

import os
from typing import Dict, Optional

import tensorflow as tf

from supcon_tf import config as config_lib
from supcon_tf import distribute
from supcon_tf import models
from supcon_tf.data import datasets
from supcon_tf.evaluation import embedding_stats
from supcon_tf.evaluation import knn
from supcon_tf.evaluation import results as results_lib
from supcon_tf.evaluation import runner
from supcon_tf.training import checkpoints

# The indicators of `embedding_stats.embedding_stats` the monitor reports.
STATS = ('positive_cosine', 'negative_cosine', 'alignment', 'uniformity',
         'dimension_std_scaled')
# Preprocessed subsets up to this size are cached between calls.
_MAX_CACHE_BYTES = 256 << 20


def subset_batches(config: config_lib.ExperimentConfig,
                   input_context: Optional[tf.distribute.InputContext],
                   training_split: bool, size: int) -> tf.data.Dataset:
  """Eval-preprocessed batches of the first `size` images of a split.

  The split is sharded by `datasets.load_split` (eval split always, train
  split with `shard_per_host`); each pipeline keeps its share of the first
  `size` images of the split, so the union over pipelines is those images
  when the pipelines read contiguous shards of equal length.

  Args:
    config: the experiment config (eval preprocessing and batch size).
    input_context: from `distribute_datasets_from_function`, or None.
    training_split: the train split (else the eval split).
    size: images in the subset.

  Returns:
    Finite dataset of (images [<= per_replica_eval_batch, s, s, 3], int32
    labels).
  """
  info = datasets.get_dataset_info(config.data, config.runtime.model_dir)
  examples = datasets.load_split(config.data, training_split, input_context)
  shards = 1
  if input_context is not None and input_context.num_input_pipelines > 1 and (
      config.data.shard_per_host or not training_split):
    shards = input_context.num_input_pipelines
  examples = examples.take(max(1, size // shards))
  return runner.batch_eval_examples(examples, config, info, input_context)


class EmbeddingMonitor:
  """`monitor(model, step) -> {name: float}` (see the module docstring).

  Args:
    config: the experiment config (`config.analysis` sizes and kNN options).
    strategy: the strategy the model was built under.
  """

  def __init__(self, config: config_lib.ExperimentConfig,
               strategy: tf.distribute.Strategy):
    self.config = config
    self.strategy = strategy
    self.info = datasets.get_dataset_info(config.data, config.runtime.model_dir)
    self._runner: Optional[runner.Runner] = None
    # (split, size, pipeline id) -> its subset's batches, built once.
    self._datasets: Dict = {}

  def _dataset_fn(self, training_split: bool, size: int) -> runner.DatasetFn:
    image_size = self.config.augment.image_size
    cache = size * image_size * image_size * 3 * 4 <= _MAX_CACHE_BYTES

    def dataset_fn(ctx):
      key = (training_split, size, ctx.input_pipeline_id if ctx else 0)
      if key not in self._datasets:
        ds = subset_batches(self.config, ctx, training_split, size)
        self._datasets[key] = ds.cache() if cache else ds
      return self._datasets[key]
    return dataset_fn

  def embed(self, model: models.SupConModel, training_split: bool,
            size: int) -> Dict:
    """{'normalized_embedding': float32 [n, d], 'labels': int32 [n]}."""
    if self._runner is None or self._runner.model is not model:
      self._runner = runner.Runner(model, self.strategy)  # Traced once.
    return self._runner.predict(self._dataset_fn(training_split, size),
                                [models.NORMALIZED_EMBEDDING])

  def __call__(self, model: models.SupConModel,
               step: int) -> Dict[str, float]:
    analysis = self.config.analysis
    key = models.NORMALIZED_EMBEDDING
    bank = self.embed(model, True, analysis.monitor_bank_size)
    queries = self.embed(model, False, analysis.monitor_query_size)
    accuracies = knn.knn_accuracies(
        queries[key], queries[runner.LABELS], bank[key],
        bank[runner.LABELS], self.info.num_classes, analysis.knn_k,
        analysis.knn_temperature, analysis.knn_chunk_size)
    scalars = {knn.result_key(k): acc for k, acc in accuracies.items()}
    stats = embedding_stats.embedding_stats(
        queries[key], queries[runner.LABELS],
        max_samples=analysis.monitor_query_size, seed=self.config.data.seed)
    scalars.update({name: stats[name] for name in STATS})
    model_dir = self.config.runtime.model_dir
    if model_dir and distribute.is_chief(self.strategy):
      # The last values, next to the other modes' results.
      results_lib.merge_json(
          os.path.join(model_dir, checkpoints.EVAL_RESULTS_FILE),
          {**{f'monitor_{k}': v for k, v in scalars.items()},
           'monitor_step': step,
           'monitor_num_bank_examples': int(bank[key].shape[0]),
           'monitor_num_examples': int(queries[key].shape[0])})
    return scalars
