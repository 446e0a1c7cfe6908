"""`--mode=eval_knn`: weighted k-nearest-neighbour accuracy of the embedding.

No classifier is trained: each test image is classified by a vote of its k
most similar training images in the encoder's L2-normalised embedding
(cosine similarity), each neighbour i voting for its label with weight
exp(s_i / T). This is the weighted kNN monitor of Wu et al. 2018
("Unsupervised Feature Learning via Non-Parametric Instance
Discrimination", eq. 8-9, T = 0.07), used by InstDisc, MoCo and SimCLR-style
codebases to track representation quality without a linear probe.

Memory: the train embeddings (the "memory bank") are computed once, in eval
preprocessing (centre crop, no augmentation), and kept as float32 [N, d] on
the host (ImageNet, ResNet-50: 1.28M x 2048 x 4 B = 10.5 GB). Test
embeddings are scored against the bank `chunk_size` queries at a time, so
the largest intermediate is [chunk_size, N] (plus [chunk_size, max_k,
num_classes] votes), never [N_test, N].

Results (`knn_top_1_accuracy@<k>` for each k in `--knn_k`) are merged into
`model_dir/eval_results.json`, keeping the keys of `--mode=eval`, and written
as TensorBoard scalars under `model_dir/logs/eval`.
"""

from typing import Dict, Optional, Sequence, Union

from absl import logging
import numpy as np
import tensorflow as tf

from supcon_tf import config as config_lib
from supcon_tf import distribute
from supcon_tf import models
from supcon_tf.data import datasets
from supcon_tf.evaluation import results as results_lib
from supcon_tf.evaluation import runner
from supcon_tf.training import checkpoints

ArrayLike = Union[np.ndarray, tf.Tensor]


def result_key(k: int) -> str:
  """Name of the accuracy of the k-neighbour vote in results and TensorBoard."""
  return f'knn_top_1_accuracy@{k}'


def _normalize(x: tf.Tensor) -> tf.Tensor:
  return tf.math.l2_normalize(tf.cast(x, tf.float32), axis=-1)


@tf.function(reduce_retracing=True)
def _chunk_votes(query: tf.Tensor, bank: tf.Tensor, bank_labels: tf.Tensor,
                 num_classes: tf.Tensor, ks: tf.Tensor, temperature: tf.Tensor
                 ) -> tf.Tensor:
  """Class scores of each k for one chunk of queries.

  Args:
    query: float32 [c, d], unit rows.
    bank: float32 [n, d], unit rows.
    bank_labels: int32 [n].
    num_classes: int32 [], number of classes C.
    ks: int32 [m], each in [1, n], ascending not required.
    temperature: float32 [], T of the exp(s / T) vote weights.

  Returns:
    float32 [c, m, C]: for each query and each k, the summed weights of the
    k nearest neighbours' votes per class.
  """
  max_k = tf.reduce_max(ks)
  similarity = tf.matmul(query, bank, transpose_b=True)  # [c, n]
  top_sim, top_index = tf.math.top_k(similarity, k=max_k)  # Sorted, desc.
  # Subtracting each row's best similarity scales a query's weights by one
  # constant (the vote is unchanged) and keeps exp() finite for small T.
  weights = tf.exp((top_sim - top_sim[:, :1]) / temperature)  # [c, max_k]
  votes = tf.one_hot(tf.gather(bank_labels, top_index), num_classes)
  votes *= weights[..., None]  # [c, max_k, C]
  # The scores of the k nearest are the first k rows of the cumulative sum.
  return tf.gather(tf.cumsum(votes, axis=1), ks - 1, axis=1)


def knn_scores(query: ArrayLike, bank: ArrayLike, bank_labels: ArrayLike,
               num_classes: int, ks: Sequence[int], temperature: float = 0.07,
               chunk_size: int = 0) -> Dict[int, np.ndarray]:
  """Weighted kNN class scores for several k at once (one top-k search).

  Args:
    query: float [n_query, d] embeddings to classify (L2-normalised here).
    bank: float [n_bank, d] labelled embeddings (L2-normalised here).
    bank_labels: int [n_bank] labels of `bank`, in [0, num_classes).
    num_classes: number of classes.
    ks: neighbour counts; each is clamped to n_bank.
    temperature: T > 0 of the vote weights exp(cos / T).
    chunk_size: queries scored per block (memory O(chunk_size * n_bank));
      0 = all at once.

  Returns:
    {k: float32 [n_query, num_classes]} class scores, up to a positive factor
    per query (only their argmax is meaningful).

  Raises:
    ValueError: for an empty bank, k < 1 or temperature <= 0.
  """
  if temperature <= 0:
    raise ValueError(f'temperature must be > 0, got {temperature}.')
  if any(int(k) < 1 for k in ks) or not ks:
    raise ValueError(f'k must be >= 1, got {list(ks)}.')
  bank = _normalize(bank)
  query = _normalize(query)
  bank_labels = tf.cast(bank_labels, tf.int32)
  n_bank, n_query = int(bank.shape[0]), int(query.shape[0])
  if n_bank == 0:
    raise ValueError('The kNN memory bank is empty.')
  clamped = [min(int(k), n_bank) for k in ks]
  if clamped != [int(k) for k in ks]:
    logging.warning('kNN: k clamped to the bank size %d: %s -> %s', n_bank,
                    list(ks), clamped)
  ks_tensor = tf.constant(clamped, tf.int32)
  chunk = chunk_size if chunk_size > 0 else max(n_query, 1)
  parts = []
  for start in range(0, n_query, chunk):
    # Tensors, not Python numbers, so new values do not retrace.
    parts.append(_chunk_votes(query[start:start + chunk], bank, bank_labels,
                              tf.constant(num_classes, tf.int32), ks_tensor,
                              tf.constant(temperature, tf.float32)))
  if parts:
    scores = tf.concat(parts, axis=0).numpy()
  else:
    scores = np.zeros([0, len(clamped), num_classes], np.float32)
  return {int(k): scores[:, i] for i, k in enumerate(ks)}


def knn_predict(query: ArrayLike, bank: ArrayLike, bank_labels: ArrayLike,
                num_classes: int, k: int = 20, temperature: float = 0.07,
                chunk_size: int = 0) -> np.ndarray:
  """Weighted kNN labels of `query` (Wu et al. 2018, eq. 8-9).

  Each query's k most cosine-similar bank rows vote for their labels with
  weights exp(similarity / temperature); the class with the largest summed
  weight wins (ties: the smallest class index).

  Args:
    query: float [n_query, d].
    bank: float [n_bank, d].
    bank_labels: int [n_bank].
    num_classes: number of classes.
    k: neighbours (clamped to n_bank).
    temperature: T > 0.
    chunk_size: queries per block; the similarity matrix in memory is
      [chunk_size, n_bank]; 0 = all queries at once.

  Returns:
    int32 [n_query] predicted labels.
  """
  scores = knn_scores(query, bank, bank_labels, num_classes, [k],
                      temperature, chunk_size)[int(k)]
  return np.argmax(scores, axis=-1).astype(np.int32)


def knn_accuracies(query: ArrayLike, query_labels: ArrayLike, bank: ArrayLike,
                   bank_labels: ArrayLike, num_classes: int,
                   ks: Sequence[int], temperature: float = 0.07,
                   chunk_size: int = 0) -> Dict[int, float]:
  """{k: top-1 accuracy of the weighted kNN vote} for each k in `ks`."""
  query_labels = np.asarray(query_labels)
  if query_labels.shape[0] == 0:
    raise ValueError('No queries to classify.')
  scores = knn_scores(query, bank, bank_labels, num_classes, ks, temperature,
                      chunk_size)
  return {k: float(np.mean(np.argmax(s, axis=-1) == query_labels))
          for k, s in scores.items()}


def evaluate_knn(config: config_lib.ExperimentConfig,
                 strategy: tf.distribute.Strategy,
                 model: Optional[models.SupConModel] = None) -> Dict:
  """Runs the kNN evaluation of the model in model_dir; returns the results.

  Bank: the train split (as training reads it: `num_images` cap and label
  noise included, like the classifier stage) in eval preprocessing. Queries:
  the eval split, capped at `max_eval_steps` batches like `--mode=eval`.
  """
  analysis = config.analysis
  info = datasets.get_dataset_info(
      config.data, config.runtime.model_dir)
  if model is None:
    model = checkpoints.load_model_for_inference(config, info, strategy)
  key = models.NORMALIZED_EMBEDDING
  print(f'[eval_knn] embedding {info.num_train_examples} train images '
        f'of {info.name} (the memory bank)', flush=True)
  bank, queries = runner.embed_bank_and_queries(config, strategy, model,
                                                info, key)
  accuracies = knn_accuracies(
      queries[key], queries[runner.LABELS], bank[key],
      bank[runner.LABELS], info.num_classes, analysis.knn_k,
      analysis.knn_temperature, analysis.knn_chunk_size)
  checkpoint = checkpoints.latest_model_checkpoint(
      config.runtime.model_dir) or ''
  results = {result_key(k): acc for k, acc in accuracies.items()}
  results.update({
      'knn_temperature': float(analysis.knn_temperature),
      'knn_num_bank_examples': int(bank[key].shape[0]),
      'knn_num_examples': int(queries[key].shape[0]),
      'knn_embedding_dim': int(bank[key].shape[-1]),
      'knn_checkpoint': checkpoint,
  })
  model_dir = config.runtime.model_dir
  if model_dir and distribute.is_chief(strategy):
    results_lib.publish(
        model_dir, checkpoints.EVAL_RESULTS_FILE, results,
        {result_key(k): acc for k, acc in accuracies.items()}, checkpoint)
  shown = ', '.join(f'k={k}: {acc:.4f}' for k, acc in accuracies.items())
  print(f'[eval_knn] {info.name}/{info.eval_split}: weighted kNN top-1 '
        f'(T={analysis.knn_temperature:g}) {shown} on '
        f'{results["knn_num_examples"]} images against '
        f'{results["knn_num_bank_examples"]} train embeddings', flush=True)
  return results


def run_eval_knn(config: config_lib.ExperimentConfig,
                 strategy: tf.distribute.Strategy) -> Dict:
  """The `--mode=eval_knn` handler."""
  return evaluate_knn(config, strategy)
