"""`build_dataset`: the one input pipeline, multi-view batches for every mode.

Used as

  strategy.distribute_datasets_from_function(
      lambda ctx: pipeline.build_dataset(config, ctx, training=True))

so each input pipeline (host) builds its own dataset of per-replica batches.

Training: shard (in `datasets.load_split`) -> cache (small datasets) ->
repeat with a shuffle seeded per epoch -> skip to `start_step` (resume) ->
`num_views` independently augmented views of each image -> whiten -> cast ->
batch (drop_remainder, static shapes for TPU/XLA) -> prefetch.

Class-balanced training (`--samples_per_class=M`, `samplers.py`): the whole
train split (the `num_images` cap and label noise applied, as in the plain
stream) is held in memory for random access; the stateless index stream of
`samplers.balanced_index_dataset` (this host's slice of each global batch,
from `start_step`) replaces the shuffled stream and is mapped to its
examples, then augmented and batched as above.

Eval: shard -> one eval-preprocessed view -> whiten -> cast -> batch, keeping
the last partial batch so that every eval example is scored exactly once (the
reference drops it instead). The batch dimension is therefore not static in
eval; a TPU eval step must pad or run the remainder separately.

Folder datasets (`folder:PATH`) enter as (file path, label) records: the
training stream shuffles the paths (fully, per epoch) and reads and decodes
each image inside the parallel augmentation map, so no image is held in
memory beyond the batches in flight.

Value range of images: [0, 1] as produced by `augment.py`; when
`augment.apply_whitening` is set and the dataset has whitening constants
(`datasets.WHITENING`: cifar10, cifar100; folder and npz datasets: their own,
computed from the training images and stored in model_dir) images are
(x - mean) / std, roughly zero-mean unit-variance, about [-2.5, 2.8] for
CIFAR. For CIFAR-10 these whitened values equal the reference's exactly; the
reference's un-whitened images are in [-1, 1] instead of our [0, 1].
"""

from typing import Optional, Tuple

import numpy as np
import tensorflow as tf

from supcon_tf import config as config_lib
from supcon_tf.data import augment
from supcon_tf.data import datasets
from supcon_tf.data import samplers

# Decoded datasets up to this size are cached in memory after the first epoch
# (CIFAR: 150 MB), which removes tfds reading and decoding from later epochs.
_MAX_CACHE_BYTES = 2 << 30
# Cached datasets are shuffled fully up to this buffer (the reference uses
# 50000 for CIFAR-10); others use the reference's ImageNet buffer, since their
# decoded images are large and tfds stores examples pre-shuffled.
_MAX_FULL_SHUFFLE = 50_000
_STREAMING_SHUFFLE = 1024
# Records that are file paths (folder datasets) are shuffled fully up to this
# many (about 100 bytes each).
_MAX_PATH_SHUFFLE = 1 << 21

# Mixed into the seed of augmentation randomness so it is independent of the
# shuffle and label-noise streams drawn from the same `DataConfig.seed`.
_AUGMENT_SALT = 0xa06
# Same for the per-epoch shuffle seeds.
_SHUFFLE_SALT = 0x5f1e
# "Forever" for the epoch counter of the infinite training stream.
_MAX_EPOCHS = 1 << 62


def steps_per_epoch(info: datasets.DatasetInfo, global_batch: int) -> int:
  """Training steps of `global_batch` images in one pass over the train split.

  Batches never straddle the remainder (drop_remainder), so this is the floor,
  and at least 1 so that tiny debugging datasets still train.
  """
  if global_batch <= 0:
    raise ValueError(f'global_batch must be > 0, got {global_batch}.')
  return max(1, info.num_train_examples // global_batch)


def per_replica_batch_size(
    global_batch: int,
    input_context: Optional[tf.distribute.InputContext]) -> int:
  """Batch size one replica receives (the global batch without a context)."""
  if input_context is None:
    return global_batch
  return input_context.get_per_replica_batch_size(global_batch)


def output_dtype(config: config_lib.ExperimentConfig) -> tf.DType:
  """bfloat16 when mixed precision is allowed, else float32."""
  return tf.bfloat16 if config.augment.allow_mixed_precision else tf.float32


def whitening_constants(
    info: datasets.DatasetInfo,
    augment_config: config_lib.AugmentConfig,
) -> Optional[Tuple[tf.Tensor, tf.Tensor]]:
  """(mean, std), float32 [3], if images are to be whitened, else None."""
  if not augment_config.apply_whitening or not info.has_whitening:
    return None
  return (tf.constant(info.whitening_mean, tf.float32),
          tf.constant(info.whitening_std, tf.float32))


def finalize_images(images: tf.Tensor,
                    whitening: Optional[Tuple[tf.Tensor, tf.Tensor]],
                    dtype: tf.DType) -> tf.Tensor:
  """Whitens (in float32, for accuracy) and casts preprocessed images.

  Args:
    images: float32 [..., 3] in [0, 1].
    whitening: from `whitening_constants`, or None.
    dtype: output dtype.

  Returns:
    `dtype` [..., 3].
  """
  if whitening is not None:
    images = augment.whiten(images, *whitening)
  return tf.cast(images, dtype)


def _augment_seed(config: config_lib.ExperimentConfig,
                  pipeline_id: int) -> tf.Tensor:
  base = tf.constant([config.data.seed, _AUGMENT_SALT], tf.int64)
  # Different hosts must not draw the same augmentations for their examples.
  return tf.random.experimental.stateless_fold_in(base, pipeline_id)


def train_views(image: tf.Tensor, augment_config: config_lib.AugmentConfig,
                num_views: int, seed: tf.Tensor) -> tf.Tensor:
  """`num_views` independent training augmentations of one image.

  Args:
    image: uint8 [height, width, 3].
    augment_config: preprocessing options.
    num_views: how many views.
    seed: int [2] stateless seed of this example; view v uses
      fold_in(seed, v), so the views differ and the result is reproducible.

  Returns:
    float32 [num_views, image_size, image_size, 3] in [0, 1].
  """
  size = augment_config.image_size
  views = []
  for v in range(num_views):
    view_seed = tf.random.experimental.stateless_fold_in(seed, v)
    view = augment.preprocess_for_train(image, augment_config, seed=view_seed)
    views.append(tf.ensure_shape(view, [size, size, 3]))
  return tf.stack(views, axis=0)


def eval_view(image: tf.Tensor,
              augment_config: config_lib.AugmentConfig) -> tf.Tensor:
  """The eval crop of one image: float32 [image_size, image_size, 3]."""
  size = augment_config.image_size
  return tf.ensure_shape(
      augment.preprocess_for_eval(image, augment_config), [size, size, 3])


def _seeded_shuffle(ds: tf.data.Dataset, buffer: int,
                    seeds: tf.Tensor) -> tf.data.Dataset:
  """`ds.shuffle(buffer)` in an order that depends on `seeds` only.

  `Dataset.shuffle` mixes in the global seed (`tf.random.set_seed`) and
  rejects a tensor seed when that is 0, so the op is called directly.

  Args:
    ds: a dataset of dense tensors.
    buffer: shuffle buffer size.
    seeds: int64 [2].
  """
  specs = tf.nest.flatten(ds.element_spec)
  variant = tf.raw_ops.ShuffleDatasetV3(
      input_dataset=tf.data.experimental.to_variant(ds),
      buffer_size=tf.constant(buffer, tf.int64),
      seed=seeds[0],
      seed2=tf.bitwise.bitwise_or(seeds[1], 1),  # (0, 0) would mean random.
      seed_generator=tf.raw_ops.DummySeedGenerator(),
      output_types=[spec.dtype for spec in specs],
      output_shapes=[spec.shape for spec in specs],
      reshuffle_each_iteration=False)
  return tf.data.experimental.from_variant(variant, ds.element_spec)


def _epochs(first_epoch: int, one_epoch, source: tf.data.Dataset
            ) -> tf.data.Dataset:
  """`one_epoch(first_epoch)`, `one_epoch(first_epoch + 1)`, ... in sequence.

  Like `Dataset.repeat()`, the stream ends instead of starting an epoch when
  `source` (the split before caching and shuffling) yields no element: a plain
  `flat_map` over empty epochs would spin through all `_MAX_EPOCHS` inside one
  `GetNext`, keeping the input threads busy forever (e.g. once every record
  has failed to decode and the cache is empty), which hangs the destruction
  of a `tf.distribute` iterator. The check reads one element of `source` per
  epoch; a read error (a corrupt first record) is the stream's error. It
  costs nothing per element, unlike markers threaded through the stream
  (which halved the throughput of a cheap pipeline).
  """
  def has_data(epoch):
    del epoch
    return source.take(1).reduce(tf.constant(False), lambda seen, _: True)

  return (tf.data.Dataset.range(first_epoch, _MAX_EPOCHS)
          .take_while(has_data).flat_map(one_epoch))


def _should_cache(info: datasets.DatasetInfo, num_examples: int) -> bool:
  height, width, channels = info.image_shape
  if height is None or width is None:
    return False  # Variable-size images (ImageNet): too big to cache.
  return num_examples * height * width * channels <= _MAX_CACHE_BYTES


def random_access_split(data_config: config_lib.DataConfig,
                        info: datasets.DatasetInfo
                        ) -> Tuple[tf.Tensor, tf.Tensor]:
  """The whole training split in memory, for samplers that pick by index.

  The split is read as training reads it (the `num_images` cap, label noise)
  by every host, unsharded, so an index means the same example everywhere.

  Returns:
    (uint8 [N, h, w, 3] images, int32 [N] labels), N = info.num_train_examples.

  Raises:
    datasets.DatasetError: the images vary in size or the decoded split is
      larger than the in-memory limit (2 GiB).
  """
  if not _should_cache(info, info.num_train_examples):
    raise datasets.DatasetError(
        f'--samples_per_class needs random access to the training split of '
        f'{info.name}: supported are datasets with fixed-size images whose '
        f'decoded train split fits in {_MAX_CACHE_BYTES >> 30} GiB (digits, '
        'CIFAR, ...), held in memory. Pass --samples_per_class=0 (plain '
        'shuffled batches), or --num_images to train on a subset.')
  images, labels = [], []
  examples = datasets.load_split(data_config, True, None).batch(4096)
  for image_batch, label_batch in examples.as_numpy_iterator():
    images.append(image_batch)
    labels.append(label_batch)
  return (tf.constant(np.concatenate(images, axis=0)),
          tf.constant(np.concatenate(labels, axis=0), tf.int32))


def _balanced_examples(data_config: config_lib.DataConfig,
                       info: datasets.DatasetInfo,
                       input_context: Optional[tf.distribute.InputContext],
                       start_step: int) -> Tuple[tf.data.Dataset, int]:
  """The class-balanced training stream (see `samplers.py`).

  Returns:
    (infinite dataset of (uint8 image, int32 label): this pipeline's slice
    of the global balanced batch of step `start_step`, then of the next
    step, ...; the stream position of its first element).

  Raises:
    datasets.DatasetError: no random access (see `random_access_split`).
    config_lib.ConfigError: batch size, M and the classes do not fit.
  """
  num_pipelines = input_context.num_input_pipelines if input_context else 1
  pipeline_id = input_context.input_pipeline_id if input_context else 0
  images, labels = random_access_split(data_config, info)
  try:
    indices = samplers.balanced_index_dataset(
        labels.numpy(), data_config.batch_size, data_config.samples_per_class,
        data_config.seed, start_step, num_pipelines, pipeline_id)
  except ValueError as e:
    raise config_lib.ConfigError(str(e)) from e
  per_pipeline = data_config.batch_size // num_pipelines
  examples = indices.unbatch().map(
      lambda i: (tf.gather(images, i), tf.gather(labels, i)),
      num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return examples, int(start_step) * per_pipeline


def build_dataset(
    config: config_lib.ExperimentConfig,
    input_context: Optional[tf.distribute.InputContext] = None,
    training: bool = True,
    start_step: int = 0,
) -> tf.data.Dataset:
  """Batches of preprocessed images and labels for one input pipeline.

  Args:
    config: the experiment config; uses `config.data` and `config.augment`.
    input_context: from `strategy.distribute_datasets_from_function`, or None
      (one pipeline, batches of the global batch size).
    training: training batches (infinite, augmented multi-view) if True, else
      eval batches (one pass, single eval view).
    start_step: training only: the number of global batches already consumed
      (the step a resumed run starts at). The stream then starts exactly where
      a run that trained `start_step` steps left it: the training stream is a
      pure function of (seed, input pipeline, position), so resuming needs no
      iterator state in the checkpoint.

  Returns:
    Training: an infinite dataset of (images, labels) with images
    [per_replica_batch, num_views, image_size, image_size, 3] and labels int32
    [per_replica_batch], both with static shapes.
    Eval: a finite dataset of (images, labels) with images
    [<= per_replica_eval_batch, image_size, image_size, 3] and labels int32
    [<= per_replica_eval_batch]; only the last batch may be smaller.
    Images are bfloat16 if `config.augment.allow_mixed_precision` else
    float32; see the module docstring for their value range.

  Raises:
    datasets.DatasetError: the dataset is unknown or not prepared.
  """
  data_config, augment_config = config.data, config.augment
  info = datasets.get_dataset_info(data_config, config.runtime.model_dir)
  whitening = whitening_constants(info, augment_config)
  dtype = output_dtype(config)
  pipeline_id = input_context.input_pipeline_id if input_context else 0

  ds, decode = datasets.load_split_records(data_config, training,
                                           input_context)
  records_are_paths = decode is not None
  if decode is None:
    def decode(image, label):
      return image, label
  source = ds
  num_local = int(ds.cardinality())
  if num_local < 0:  # Unknown cardinality: assume the whole split.
    num_local = (info.num_train_examples if training else
                 info.num_eval_examples)

  if training:
    batch = per_replica_batch_size(data_config.batch_size, input_context)
    if data_config.samples_per_class > 0:
      # Class-balanced: examples picked by index from the in-memory split,
      # already decoded, instead of the shuffled epochs below.
      ds, start = _balanced_examples(data_config, info, input_context,
                                     start_step)

      def decode(image, label):  # pylint: disable=function-redefined
        return image, label
    else:
      if records_are_paths:
        # Shuffling paths is cheap: shuffle fully, decode after (train_map).
        buffer = min(num_local, _MAX_PATH_SHUFFLE)
      elif _should_cache(info, num_local):
        ds = ds.cache()
        buffer = min(num_local, _MAX_FULL_SHUFFLE)
      else:
        buffer = _STREAMING_SHUFFLE
      # Sharded before this point (load_split), so shuffling never moves an
      # example between hosts. Epoch e is shuffled with a seed derived from
      # (seed, e) only, so the order is reproducible and a resumed run jumps
      # to its epoch directly, skipping at most one epoch of this shard (cheap
      # once cached; for streamed datasets the skipped examples are read and
      # decoded). `tf.distribute` iterators cannot be checkpointed (TF 2.x
      # raises "expecting a trackable object"), and explicit tf.data
      # checkpoints would store the shuffle buffer and cache (GBs): the
      # position is the checkpointed step.
      replicas_per_pipeline = 1
      if input_context is not None:
        replicas_per_pipeline = max(
            1, input_context.num_replicas_in_sync //
            input_context.num_input_pipelines)
      start = int(start_step) * batch * replicas_per_pipeline
      first_epoch, offset = divmod(start, max(num_local, 1))
      epoch_key = tf.constant([data_config.seed, _SHUFFLE_SALT], tf.int64)
      shard = ds

      def one_epoch(epoch):
        seeds = tf.random.stateless_uniform(
            [2], tf.random.experimental.stateless_fold_in(epoch_key, epoch),
            minval=None, maxval=None, dtype=tf.int64)
        return _seeded_shuffle(shard, max(buffer, 1), seeds)

      ds = _epochs(first_epoch, one_epoch, source)
      if offset:
        ds = ds.skip(offset)
    # A running example counter keys the stateless augmentation seeds, so the
    # views are a function of (seed, host, position in the stream), whatever
    # the map parallelism.
    ds = ds.enumerate(start=start)
    base_seed = _augment_seed(config, pipeline_id)
    num_views = data_config.num_views

    def train_map(index, example):
      image, label = decode(*example)
      seed = tf.random.experimental.stateless_fold_in(base_seed, index)
      views = train_views(image, augment_config, num_views, seed)
      return finalize_images(views, whitening, dtype), label

    ds = ds.map(train_map, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(batch, drop_remainder=True)
  else:
    batch = per_replica_batch_size(data_config.eval_batch_size, input_context)

    def eval_map(*record):
      image, label = decode(*record)
      return finalize_images(eval_view(image, augment_config), whitening,
                             dtype), label

    ds = ds.map(eval_map, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(batch, drop_remainder=False)
  return ds.prefetch(tf.data.AUTOTUNE)
