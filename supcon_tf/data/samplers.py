"""Class-balanced batches: P classes x M images per global batch.

With `--samples_per_class=M`, every global batch of `--batch_size=B` images
holds P = B / M distinct classes with M images each (the "PK" sampling of
metric learning, Hermans et al. 2017). SupCon then has at least M - 1
same-class positives for every anchor, whatever the number of classes (with
1000 ImageNet classes and uniform sampling, a batch of 256 gives most anchors
no positive at all besides their own views).

What a batch is, for step s (a pure function of (labels, seed, s)):

1. key = fold_in([seed, salt], s) (stateless; no iterator state, so a run
   resumed at step s draws exactly the batches of an uninterrupted run).
2. P classes, uniformly without replacement among the classes present in
   `labels` (P > number of classes is an error: a batch would need a class
   twice, breaking the M-per-class contract).
3. For each chosen class with n >= M images, M distinct images uniformly
   without replacement (Floyd's algorithm, O(M^2) per class); with n < M
   images, M draws with replacement (some images appear twice, as different
   augmentations).
4. The batch is laid out class-major: [class 0 x M, class 1 x M, ...], the
   classes in random order, so the global batch is int64 [B] indices into
   `labels`.

Consecutive batches are independent draws (there are no epochs: an image may
recur before others are seen; over many steps every class is drawn
B/M/num_classes of the time and every image of a class equally often).

Hosts: every input pipeline is given the same `labels` (those of the whole
training split, so the indices mean the same on every host) and computes the
same global batch; pipeline i of n keeps its contiguous slice
[i * B/n, (i + 1) * B/n), so the union over pipelines is the global batch.
When B/n is a multiple of M each pipeline holds whole classes. A pipeline
that can only read its own shard of the split can instead pass its shard's
labels with `num_input_pipelines=1`, its own `global_batch_size` (the
per-pipeline batch) and a seed folded with its id: each pipeline's batch is
then balanced, but two pipelines may draw the same class.
"""

import dataclasses

import numpy as np
import tensorflow as tf

# Mixed into the seed so the class/image draws are independent of the other
# users of `DataConfig.seed` (shuffle, augmentation, label noise).
_BALANCED_SALT = 0xba1a
# "Forever" for the step counter of the infinite index stream.
_MAX_STEPS = 1 << 62


@dataclasses.dataclass(frozen=True)
class ClassTable:
  """The examples of each class, as flat arrays (a CSR layout).

  Attributes:
    classes: int64 [C], the distinct labels, ascending.
    counts: int64 [C], images of each class.
    offsets: int64 [C], where each class starts in `order`.
    order: int64 [N], example indices grouped by class (ascending labels),
      ascending index within a class.
  """
  classes: np.ndarray
  counts: np.ndarray
  offsets: np.ndarray
  order: np.ndarray

  @property
  def num_classes(self) -> int:
    return int(self.classes.shape[0])


def class_table(labels) -> ClassTable:
  """Groups example indices by label.

  Args:
    labels: int [N], labels >= 0 (e.g. of the whole training split).

  Returns:
    A `ClassTable`.

  Raises:
    ValueError: empty, not 1-D, not integer, or negative labels.
  """
  labels = np.asarray(labels)
  if labels.ndim != 1 or labels.size == 0:
    raise ValueError(f'labels must be a non-empty 1-D array, got shape '
                     f'{labels.shape}.')
  if not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f'labels must be integers, got {labels.dtype}.')
  if labels.min() < 0:
    raise ValueError('labels must be >= 0 (unlabelled examples, -1, cannot '
                     'be sampled by class).')
  order = np.argsort(labels, kind='stable').astype(np.int64)
  classes, offsets, counts = np.unique(labels[order], return_index=True,
                                       return_counts=True)
  return ClassTable(classes=classes.astype(np.int64),
                    counts=counts.astype(np.int64),
                    offsets=offsets.astype(np.int64), order=order)


def validate(num_classes: int, global_batch_size: int, samples_per_class: int,
             num_input_pipelines: int = 1) -> int:
  """Checks the balanced-batch arguments; returns P = classes per batch.

  Raises:
    ValueError: one line naming the flags to change.
  """
  b, m = global_batch_size, samples_per_class
  if m < 2:
    raise ValueError(f'--samples_per_class must be >= 2 so that every anchor '
                     f'has a same-class positive, got {m}.')
  if b < 1 or b % m:
    raise ValueError(f'--batch_size ({b}) must be a positive multiple of '
                     f'--samples_per_class ({m}).')
  if b // m > num_classes:
    raise ValueError(
        f'--batch_size / --samples_per_class = {b} / {m} = {b // m} classes '
        f'per batch, but the training labels have only {num_classes} '
        f'classes; lower --batch_size or raise --samples_per_class.')
  if num_input_pipelines < 1 or b % num_input_pipelines:
    raise ValueError(f'--batch_size ({b}) must be a multiple of the '
                     f'{num_input_pipelines} input pipelines (hosts).')
  return b // m


def step_key(seed: int, step) -> tf.Tensor:
  """int64 [2] stateless key of one step: fold_in([seed, salt], step)."""
  base = tf.constant([seed, _BALANCED_SALT], tf.int64)
  return tf.random.experimental.stateless_fold_in(
      base, tf.cast(step, tf.int64))


def _uniform_below(u: tf.Tensor, n: tf.Tensor) -> tf.Tensor:
  """floor(u * n), clipped to n - 1: a uniform integer in [0, n) (n >= 1)."""
  draw = tf.cast(tf.floor(u * tf.cast(n, tf.float64)), tf.int64)
  return tf.minimum(draw, n - 1)


def within_class_positions(counts: tf.Tensor, samples_per_class: int,
                           key: tf.Tensor) -> tf.Tensor:
  """M positions inside each class: distinct if it has >= M images.

  Floyd's algorithm draws a uniformly random M-subset of [0, n) with M
  draws: for j = n - M, ..., n - 1, draw t uniform in [0, j]; take t, or j
  if t was already taken (j never was). Vectorised over classes, with M
  (small) unrolled steps.

  Args:
    counts: int64 [P], images n of each chosen class (>= 1).
    samples_per_class: M.
    key: int64 [2] stateless key.

  Returns:
    int64 [P, M] positions in [0, n): distinct where n >= M, independent
    uniform draws (with replacement) where n < M.
  """
  m = samples_per_class
  u = tf.random.stateless_uniform([m, tf.shape(counts)[0]], key,
                                  dtype=tf.float64)
  taken = []
  for i in range(m):
    j = tf.maximum(counts - m + i, 0)  # Only used where counts >= M.
    t = _uniform_below(u[i], j + 1)
    if taken:
      seen = tf.reduce_any(tf.equal(tf.stack(taken), t[None]), axis=0)
      t = tf.where(seen, j, t)
    taken.append(t)
  floyd = tf.stack(taken, axis=1)
  with_replacement = _uniform_below(tf.transpose(u), counts[:, None])
  return tf.where(counts[:, None] >= m, floyd, with_replacement)


def balanced_batch(table: ClassTable, global_batch_size: int,
                   samples_per_class: int, seed: int, step) -> tf.Tensor:
  """The global balanced batch of one step (TF ops; works in tf.data.map).

  Args:
    table: from `class_table(labels)`.
    global_batch_size: B.
    samples_per_class: M; B % M == 0 and B / M <= table.num_classes.
    seed: the data seed.
    step: int scalar (Python or tensor), the global step.

  Returns:
    int64 [B] indices into `labels`, class-major (see the module doc).
  """
  num_chosen = validate(table.num_classes, global_batch_size,
                        samples_per_class)
  class_key, image_key = tf.unstack(
      tf.random.experimental.stateless_split(step_key(seed, step), 2))
  # The P largest of C uniform keys: P classes without replacement, in random
  # order.
  class_scores = tf.random.stateless_uniform([table.num_classes], class_key)
  chosen = tf.math.top_k(class_scores, k=num_chosen, sorted=True).indices
  counts = tf.gather(tf.constant(table.counts), chosen)
  positions = within_class_positions(counts, samples_per_class, image_key)
  flat = tf.gather(tf.constant(table.offsets), chosen)[:, None] + positions
  batch = tf.gather(tf.constant(table.order), tf.reshape(flat, [-1]))
  return tf.ensure_shape(batch, [global_batch_size])


def balanced_indices(labels, global_batch_size: int, samples_per_class: int,
                     seed: int, step) -> tf.Tensor:
  """`balanced_batch` from raw labels: int64 [global_batch_size] indices.

  Pure: the same (labels, sizes, seed, step) always give the same batch.
  """
  return balanced_batch(class_table(labels), global_batch_size,
                        samples_per_class, seed, step)


def host_slice(global_batch_size: int, num_input_pipelines: int,
               input_pipeline_id: int):
  """[start, stop) of pipeline `input_pipeline_id` in the global batch."""
  if not 0 <= input_pipeline_id < num_input_pipelines:
    raise ValueError(f'input_pipeline_id {input_pipeline_id} not in '
                     f'[0, {num_input_pipelines}).')
  per_host = global_batch_size // num_input_pipelines
  return input_pipeline_id * per_host, (input_pipeline_id + 1) * per_host


def balanced_index_dataset(labels, global_batch_size: int,
                           samples_per_class: int, seed: int,
                           start_step: int = 0, num_input_pipelines: int = 1,
                           input_pipeline_id: int = 0) -> tf.data.Dataset:
  """Infinite stream of this pipeline's slice of each balanced global batch.

  Args:
    labels: int [N], the labels the indices refer to, identical on every
      pipeline (see the module doc).
    global_batch_size: B, images per step over all pipelines.
    samples_per_class: M.
    seed: the data seed.
    start_step: the first step (a resumed run's checkpointed step).
    num_input_pipelines: n, e.g. `InputContext.num_input_pipelines`.
    input_pipeline_id: this pipeline's id in [0, n).

  Returns:
    A dataset whose element k is int64 [B / n] (static shape): indices
    [i * B/n, (i + 1) * B/n) of `balanced_batch(..., step=start_step + k)`.

  Raises:
    ValueError: bad sizes (naming --batch_size / --samples_per_class) or
      labels.
  """
  table = class_table(labels)
  validate(table.num_classes, global_batch_size, samples_per_class,
           num_input_pipelines)
  start, stop = host_slice(global_batch_size, num_input_pipelines,
                           input_pipeline_id)

  def indices_of_step(step):
    batch = balanced_batch(table, global_batch_size, samples_per_class, seed,
                           step)
    return tf.ensure_shape(batch[start:stop], [stop - start])

  # Each element depends on its step only, so parallel maps stay
  # deterministic.
  return tf.data.Dataset.range(start_step, _MAX_STEPS).map(
      indices_of_step, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
