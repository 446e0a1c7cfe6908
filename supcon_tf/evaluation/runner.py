"""Running a trained model over whole splits, for the evaluation modes.

`eval_batches` preprocesses any split (the train split too, for the kNN
memory bank) exactly like `pipeline.build_dataset(..., training=False)`:
one deterministic eval crop, whitening, no augmentation, the last partial
batch kept. `Runner.predict` gathers chosen model outputs of every example onto
the host; `Runner.count_top1` sums correct top-1 predictions across replicas
(`classify` also sums top-k and cross-entropy, for `classify.py`) without keeping any outputs. A runner traces its
steps once for all the datasets it is given.

Used by `classify.py`, `knn.py`, `corruptions.py` and `plots.py`; results
go through `results.py`.
"""

from typing import Callable, Dict, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf

from supcon_tf import config as config_lib
from supcon_tf import errors
from supcon_tf import models
from supcon_tf.data import datasets
from supcon_tf.data import pipeline

LABELS = 'labels'


class EvalError(errors.UserError, RuntimeError):
  """Nothing to evaluate (an empty eval split)."""

DatasetFn = Callable[[Optional[tf.distribute.InputContext]], tf.data.Dataset]


def batch_eval_examples(
    examples: tf.data.Dataset,
    config: config_lib.ExperimentConfig,
    info: datasets.DatasetInfo,
    input_context: Optional[tf.distribute.InputContext] = None,
    augment_config: Optional[config_lib.AugmentConfig] = None,
) -> tf.data.Dataset:
  """Eval-preprocessed batches of raw `(uint8 image, label)` examples.

  Args:
    examples: dataset of (uint8 [h, w, 3], int32 []) examples of this input
      pipeline.
    config: experiment config (eval batch size, preprocessing, dtype).
    info: the dataset the model was trained on (its whitening constants are
      applied, so that other data, e.g. corrupted copies, is normalised like
      the model's own test images).
    input_context: from `distribute_datasets_from_function`, or None.
    augment_config: preprocessing options replacing `config.augment`.

  Returns:
    Finite dataset of (images [<= per_replica_eval_batch, s, s, 3] float32 or
    bfloat16, labels int32 [<= per_replica_eval_batch]).
  """
  augment_config = augment_config or config.augment
  whitening = pipeline.whitening_constants(info, augment_config)
  dtype = pipeline.output_dtype(config)
  batch = pipeline.per_replica_batch_size(config.data.eval_batch_size,
                                          input_context)

  def eval_map(image, label):
    return pipeline.finalize_images(
        pipeline.eval_view(image, augment_config), whitening, dtype), label

  examples = examples.map(eval_map, num_parallel_calls=tf.data.AUTOTUNE)
  return examples.batch(batch, drop_remainder=False).prefetch(
      tf.data.AUTOTUNE)


def eval_batches(config: config_lib.ExperimentConfig,
                 input_context: Optional[tf.distribute.InputContext] = None,
                 training_split: bool = False) -> tf.data.Dataset:
  """Eval-preprocessed batches of the train (`training_split`) or eval split.

  The train split is read as training reads it (the `num_images` cap, label
  noise, host sharding) but preprocessed for eval: one centre crop, no
  augmentation. The eval split is `pipeline.build_dataset(training=False)`.
  """
  if not training_split:
    return pipeline.build_dataset(config, input_context, training=False)
  info = datasets.get_dataset_info(
      config.data, config.runtime.model_dir)
  examples = datasets.load_split(config.data, True, input_context)
  return batch_eval_examples(examples, config, info, input_context)


class Runner:
  """Runs one model over distributed eval datasets, tracing each step once.

  The step functions are built once per runner (and per set of output keys),
  so evaluating many datasets with the same element shapes (the 75 sets of
  ImageNet-C) does not retrace the model for each.

  Args:
    model: a SupConModel (called with training=False).
    strategy: the current strategy.
  """

  def __init__(self, model: models.SupConModel,
               strategy: tf.distribute.Strategy):
    self.model = model
    self.strategy = strategy
    self._predict_steps: Dict[Tuple[str, ...], Callable] = {}
    self._classify_steps: Dict[int, Callable] = {}

  def _batches(self, dataset_fn: DatasetFn, max_batches: int):
    dataset = self.strategy.distribute_datasets_from_function(dataset_fn)
    for i, batch in enumerate(dataset):
      if max_batches and i >= max_batches:
        return
      yield batch

  def _make_predict_step(self, keys: Tuple[str, ...]) -> Callable:
    model, strategy = self.model, self.strategy

    def replica_fn(images, labels):
      outputs = model(images, training=False)
      result = {k: tf.cast(outputs[k], tf.float32) for k in keys}
      result[LABELS] = tf.cast(labels, tf.int32)
      return result

    @tf.function(reduce_retracing=True)
    def step(batch):
      per_replica = strategy.run(replica_fn, args=batch)
      # gather (not experimental_local_results): under multi-worker
      # strategies every worker must see every example.
      return {k: strategy.gather(v, axis=0) for k, v in per_replica.items()}

    return step

  def predict(self, dataset_fn: DatasetFn, output_keys: Sequence[str],
              max_batches: int = 0) -> Dict[str, np.ndarray]:
    """Model outputs of every example of a distributed eval dataset.

    Args:
      dataset_fn: input_context -> dataset of (images, labels) batches.
      output_keys: model outputs to keep (e.g. models.NORMALIZED_EMBEDDING).
      max_batches: stop after this many (global) batches; 0 = all.

    Returns:
      {key: float32 [n, dim] for each key, LABELS: int32 [n]}, gathered from
      every replica (and worker), in dataset order.
    """
    keys = tuple(output_keys)
    if keys not in self._predict_steps:
      self._predict_steps[keys] = self._make_predict_step(keys)
    step = self._predict_steps[keys]
    parts: Dict[str, list] = {k: [] for k in keys + (LABELS,)}
    for batch in self._batches(dataset_fn, max_batches):
      for k, v in step(batch).items():
        parts[k].append(v.numpy())
    if not parts[LABELS]:
      return {k: np.zeros([0], np.int32 if k == LABELS else np.float32)
              for k in parts}
    return {k: np.concatenate(v, axis=0) for k, v in parts.items()}

  def classify(self, dataset_fn: DatasetFn, max_batches: int = 0,
               top_k: int = 5) -> Dict[str, float]:
    """Sums over a split of the classifier's hits and cross-entropy.

    Returns:
      {'top_1': correct top-1, 'top_k': correct top-`top_k`,
       'cross_entropy': summed cross-entropy, 'count': examples}, over every
      replica (and worker).
    """
    if top_k not in self._classify_steps:
      model, strategy = self.model, self.strategy

      def replica_fn(images, labels):
        logits = tf.cast(model(images, training=False)[models.LOGITS],
                         tf.float32)
        labels = tf.cast(labels, tf.int32)
        hits = lambda k: tf.reduce_sum(tf.cast(  # pylint: disable=g-long-lambda
            tf.math.in_top_k(labels, logits, k), tf.float32))
        ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits)
        return {'top_1': hits(1), 'top_k': hits(top_k),
                'cross_entropy': tf.reduce_sum(ce),
                'count': tf.cast(tf.shape(labels)[0], tf.float32)}

      @tf.function(reduce_retracing=True)
      def step(batch):
        per_replica = strategy.run(replica_fn, args=batch)
        return {k: strategy.reduce(tf.distribute.ReduceOp.SUM, v, axis=None)
                for k, v in per_replica.items()}

      self._classify_steps[top_k] = step
    sums = {'top_1': 0.0, 'top_k': 0.0, 'cross_entropy': 0.0, 'count': 0.0}
    for batch in self._batches(dataset_fn, max_batches):
      for k, v in self._classify_steps[top_k](batch).items():
        sums[k] += float(v)
    return sums

  def count_top1(self, dataset_fn: DatasetFn,
                 max_batches: int = 0) -> Tuple[int, int]:
    """(correct top-1 predictions of the classifier, examples)."""
    sums = self.classify(dataset_fn, max_batches, top_k=1)
    return int(sums['top_1']), int(sums['count'])


def embed_bank_and_queries(
    config: config_lib.ExperimentConfig, strategy: tf.distribute.Strategy,
    model: models.SupConModel, info: datasets.DatasetInfo,
    key: str = models.NORMALIZED_EMBEDDING
) -> Tuple[Dict[str, np.ndarray], Dict[str, np.ndarray]]:
  """Embeddings of the train split (the bank) and of the eval split.

  The bank is the train split as training reads it (`num_images` cap and
  label noise included), the queries the eval split capped at
  `max_eval_steps` batches like `--mode=eval`; both in eval preprocessing.

  Returns:
    (bank, queries), each {key: float32 [n, dim], LABELS: int32 [n]}.

  Raises:
    EvalError: the eval split is empty.
  """
  model_runner = Runner(model, strategy)
  bank = model_runner.predict(
      lambda ctx: eval_batches(config, ctx, training_split=True), [key])
  queries = model_runner.predict(
      lambda ctx: eval_batches(config, ctx, training_split=False), [key],
      max_batches=config.runtime.max_eval_steps)
  if queries[LABELS].shape[0] == 0:
    raise EvalError(f'The eval split of {info.name} is empty.')
  return bank, queries


def predict(model: models.SupConModel, strategy: tf.distribute.Strategy,
            dataset_fn: DatasetFn, output_keys: Sequence[str],
            max_batches: int = 0) -> Dict[str, np.ndarray]:
  """`Runner(model, strategy).predict(...)`, for a single dataset."""
  return Runner(model, strategy).predict(dataset_fn, output_keys, max_batches)


def count_top1(model: models.SupConModel, strategy: tf.distribute.Strategy,
               dataset_fn: DatasetFn, max_batches: int = 0) -> Tuple[int, int]:
  """`Runner(model, strategy).count_top1(...)`, for a single dataset."""
  return Runner(model, strategy).count_top1(dataset_fn, max_batches)


def l2_normalize_rows(x: np.ndarray) -> np.ndarray:
  """Rows scaled to unit L2 norm (zero rows stay zero)."""
  norms = np.linalg.norm(x, axis=-1, keepdims=True)
  return x / np.maximum(norms, 1e-12)
