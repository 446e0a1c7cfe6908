"""Raw labelled image datasets: tfds builders and the embedded `digits`.

`load_split` yields single, unaugmented examples `(image, label)` with `image`
uint8 [height, width, 3] and `label` int32 []. Everything that changes *which*
examples a host sees or *what label* they carry lives here (the `num_images`
cap, label noise, host sharding); everything that changes pixels lives in
`augment.py`, and batching / views in `pipeline.py`.

Datasets:

* `digits`: scikit-learn's bundled 8x8 handwritten digits (1797 images, 10
  classes), always available, no download. Grey values 0..16 become uint8
  0..255 and 3 equal channels; preprocessing upscales them to `image_size`.
  A fixed stratified split (seed 0) gives 1437 train / 360 test images.
* Any tfds image classification dataset by name (`cifar10`, `cifar100`,
  `imagenet2012`, `mnist`, `oxford_flowers102`, `name:version`,
  `name/config`, ...), read from `DataConfig.data_dir` (tfds's default when
  None). Nothing is ever downloaded: a dataset that is not prepared there
  raises `DatasetError` explaining how to prepare it.

Order of operations (the reference's `CommonInput.input_fn`, with the cap taken
before sharding so that `num_images` means the same images on any topology):

  full split -> first `num_images` (train only) -> this pipeline's contiguous
  shard -> label noise (train only, keyed by the global example index).
"""

import dataclasses
import functools
import os
from typing import Any, Dict, Optional, Tuple

import numpy as np
import tensorflow as tf

from supcon_tf import config as config_lib
from supcon_tf import errors

DIGITS = 'digits'
# Images and split sizes of the embedded dataset.
_DIGITS_NUM_TEST = 360
_DIGITS_SPLIT_SEED = 0

# Mixed into the label-noise seed so that label noise and other users of
# `DataConfig.seed` (shuffling, augmentation) draw independent streams.
_LABEL_NOISE_SALT = 0x5eed1abe


def _from_reference_range(mean, std):
  """Converts whitening constants for [-1, 1] images to [0, 1] images.

  The reference whitens images in [-1, 1]; ours are in [0, 1]. With
  x' = 2x - 1, (x' - m) / s == (x - (1 + m) / 2) / (s / 2), so the whitened
  values are identical to the reference's.
  """
  return (tuple(round((1.0 + m) / 2.0, 6) for m in mean),
          tuple(round(s / 2.0, 6) for s in std))


# Per-channel (mean, std) of images in [0, 1], keyed by the tfds base name.
WHITENING = {
    # Reference `inputs.cifar10` (for [-1, 1] images); equals the usual
    # (0.4914, 0.4822, 0.4465) / (0.2023, 0.1994, 0.2010).
    'cifar10': _from_reference_range((-0.0172, -0.0356, -0.107),
                                     (0.4046, 0.3988, 0.402)),
    # The reference has no CIFAR-100 input; these are the dataset's own
    # per-channel training-set statistics, as commonly used.
    'cifar100': ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    # No entry for imagenet2012 on purpose: the reference's ImageNet input has
    # no `image_mean_std`, so with its default `apply_whitening=True` it only
    # logs a warning and feeds un-whitened images. The paper's ImageNet
    # numbers were obtained that way.
}

# tfds datasets whose `test` split is unlabelled (labels -1): evaluate on
# `validation`, as the reference does for ImageNet.
_EVAL_ON_VALIDATION = ('imagenet2012',)


class DatasetError(errors.UserError, ValueError):
  """A dataset that cannot be used; the message says why and what to do."""


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """Static facts about a dataset, as used by the pipeline and the trainer.

  Attributes:
    name: the dataset name as given (`digits`, `cifar10`, `cifar10:3.0.2`...).
    num_classes: cardinality of the label set.
    num_train_examples: training examples used, after the `num_images` cap,
      over all hosts together.
    num_eval_examples: examples of the eval split (never capped).
    image_shape: (height, width, 3) of raw images as `load_split` yields them;
      height / width are None when images vary in size (e.g. ImageNet).
    train_split: tfds split used for training ('train').
    eval_split: tfds split used for evaluation ('test' or 'validation').
    whitening_mean: per-channel mean of [0, 1] images, or None when the
      dataset has no whitening constants.
    whitening_std: per-channel standard deviation, or None.
  """
  name: str
  num_classes: int
  num_train_examples: int
  num_eval_examples: int
  image_shape: Tuple[Optional[int], Optional[int], int]
  train_split: str
  eval_split: str
  whitening_mean: Optional[Tuple[float, float, float]] = None
  whitening_std: Optional[Tuple[float, float, float]] = None

  @property
  def has_whitening(self) -> bool:
    return self.whitening_mean is not None and self.whitening_std is not None


def base_name(name: str) -> str:
  """'cifar10:3.0.2' -> 'cifar10'; 'imagenet2012_subset/10pct' -> ..._subset."""
  return name.split(':')[0].split('/')[0].strip().lower()


# -----------------------------------------------------------------------------
# Embedded digits.


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
  """The digits splits as numpy arrays, computed once per process.

  Returns:
    {'train': (images, labels), 'test': (images, labels)}; images uint8
    [n, 8, 8, 3], labels int32 [n]. 1437 train and 360 test examples, every
    class in both splits in proportion (stratified), in a fixed shuffled
    order so that the first N training images cover all classes.
  """
  # Imported here: scikit-learn is only needed for this dataset and is slow to
  # import.
  from sklearn import datasets as sk_datasets  # pylint: disable=g-import-not-at-top
  from sklearn import model_selection  # pylint: disable=g-import-not-at-top
  digits = sk_datasets.load_digits()
  # 0..16 -> 0..255, rounded so 16 maps exactly to 255.
  grey = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
  images = np.repeat(grey[..., None], 3, axis=-1)
  labels = digits.target.astype(np.int32)
  train_idx, test_idx = model_selection.train_test_split(
      np.arange(len(labels)), test_size=_DIGITS_NUM_TEST, stratify=labels,
      random_state=_DIGITS_SPLIT_SEED, shuffle=True)
  for arr in (images, labels):
    arr.setflags(write=False)  # Shared through the cache: keep it immutable.
  return {'train': (images[train_idx], labels[train_idx]),
          'test': (images[test_idx], labels[test_idx])}


# -----------------------------------------------------------------------------
# tfds.


@dataclasses.dataclass(frozen=True)
class TfdsSource:
  """What `load_split` needs beyond `DatasetInfo` to read a tfds dataset."""
  builder: Any  # tfds.core.DatasetBuilder
  image_key: str
  label_key: str
  num_channels: Optional[int]
  split_sizes: Dict[str, int]


def _tfds():
  # tfds is imported lazily so that `digits`-only use (tests, laptops) does not
  # pay for it, and so that its absence only matters when it is needed.
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return tfds


def _prepared_versions(data_dir: str, name: str):
  """Versions of `name` with a dataset_info.json under `data_dir`."""
  root = os.path.join(data_dir, name)
  if not tf.io.gfile.isdir(root):
    return []
  return sorted(os.path.relpath(dirpath, data_dir)
                for dirpath, _, filenames in tf.io.gfile.walk(root)
                if 'dataset_info.json' in filenames)


def _not_prepared_message(name: str, builder) -> str:
  """How to get `name` onto disk, for the error when it is missing."""
  # builder.data_dir is <data_root>/<full_name>, full_name = name[/config]/ver.
  data_dir = str(builder.data_dir)
  full_name = builder.info.full_name
  data_root = (data_dir[:-len(full_name)].rstrip('/')
               if data_dir.endswith(full_name) else data_dir)
  lines = [
      f'Dataset {name!r} (tfds {builder.info.full_name}) is not prepared in '
      f'data_dir {data_root!r}: {builder.data_dir}/dataset_info.json does '
      'not exist. supcon_tf never downloads data.']
  prepared = _prepared_versions(data_root, base_name(name))
  if prepared:
    lines.append(f'Prepared there: {prepared}; select one with '
                 f'--dataset={base_name(name)}:<version> (or /<config>).')
  manual = getattr(builder, 'MANUAL_DOWNLOAD_INSTRUCTIONS', None)
  if manual:
    manual_dir = os.path.join(data_root, 'downloads', 'manual')
    lines.append(
        'This dataset needs a manual download. Put the files below in '
        f'{manual_dir} (tfds\'s default manual_dir), then run on this machine:'
        f'\n  tfds build {base_name(name)} --data_dir={data_root} '
        f'--manual_dir={manual_dir}\nInstructions from tfds:\n'
        + manual.strip())
  else:
    lines.append(
        'Prepare it on a machine with internet access and copy '
        f'{data_root}/{base_name(name)} here, e.g.:\n'
        f'  tfds build {name} --data_dir={data_root}\n'
        'or in Python: tensorflow_datasets.builder('
        f'{name!r}, data_dir={data_root!r}).download_and_prepare()')
  lines.append('Or use --dataset=digits (embedded, no download).')
  return '\n'.join(lines)


@functools.lru_cache(maxsize=16)
def tfds_source(name: str, data_dir: Optional[str]) -> TfdsSource:
  """Opens the tfds builder of `name` and checks it is usable, offline.

  Raises:
    DatasetError: unknown name, not prepared in `data_dir`, or not an image
      classification dataset.
  """
  tfds = _tfds()
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    import difflib  # pylint: disable=g-import-not-at-top
    # Without community datasets: listing those would go to the network.
    close = difflib.get_close_matches(
        base_name(name), tfds.list_builders(with_community_datasets=False),
        n=3)
    hint = f' Did you mean {close}?' if close else ''
    raise DatasetError(
        f'Unknown dataset {name!r}: it is neither {DIGITS!r} (embedded) nor a '
        f'tfds dataset name, and no prepared dataset of that name is in '
        f'data_dir {data_dir!r}.{hint} Names: '
        'https://www.tensorflow.org/datasets/catalog/overview') from e
  except (AssertionError, ValueError) as e:
    # E.g. a version or config the installed tfds does not know.
    prepared = _prepared_versions(data_dir, base_name(name)) if data_dir else []
    raise DatasetError(
        f'Cannot open tfds dataset {name!r} in data_dir {data_dir!r}: {e}'
        + (f'\nPrepared there: {prepared}.' if prepared else '')) from e
  # `is_prepared` only looks at the local data_dir, so this never touches the
  # network; `as_dataset` on an unprepared builder would fail less clearly.
  if not builder.is_prepared() or not builder.info.splits:
    raise DatasetError(_not_prepared_message(name, builder))

  info = builder.info
  keys = info.supervised_keys
  if (isinstance(keys, tuple) and len(keys) == 2 and
      all(isinstance(k, str) for k in keys)):
    image_key, label_key = keys
  else:
    image_key, label_key = 'image', 'label'
  features = info.features
  feature_names = list(features.keys()) if hasattr(features, 'keys') else []
  if (image_key not in feature_names or label_key not in feature_names or
      not isinstance(features[image_key], tfds.features.Image) or
      not isinstance(features[label_key], tfds.features.ClassLabel)):
    raise DatasetError(
        f'Dataset {name!r} is not an image classification dataset: expected '
        f'an Image feature {image_key!r} and a ClassLabel feature '
        f'{label_key!r}, got features {feature_names}.')
  num_channels = features[image_key].shape[-1]
  if num_channels not in (None, 1, 3, 4):
    raise DatasetError(
        f'Dataset {name!r}: images have {num_channels} channels; only grey, '
        'RGB and RGBA images are supported.')
  split_sizes = {k: int(v.num_examples) for k, v in info.splits.items()}
  return TfdsSource(builder=builder, image_key=image_key,
                     label_key=label_key, num_channels=num_channels,
                     split_sizes=split_sizes)


def _pick_splits(name: str, split_sizes: Dict[str, int]) -> Tuple[str, str]:
  available = sorted(split_sizes)
  if 'train' not in split_sizes:
    raise DatasetError(
        f'Dataset {name!r} has no "train" split (splits: {available}).')
  if base_name(name).startswith(_EVAL_ON_VALIDATION):
    order = ('validation', 'test')
  else:
    order = ('test', 'validation')
  for split in order:
    if split in split_sizes:
      return 'train', split
  raise DatasetError(
      f'Dataset {name!r} has neither a "test" nor a "validation" split '
      f'(splits: {available}).')


# -----------------------------------------------------------------------------
# Public API.


def get_dataset_info(data_config: config_lib.DataConfig) -> DatasetInfo:
  """Facts about `data_config.dataset`, read offline from tfds metadata.

  Args:
    data_config: the `data` section of the experiment config.

  Returns:
    A `DatasetInfo`; `num_train_examples` is capped by `num_images`.

  Raises:
    DatasetError: unknown, unprepared, or not an image classification dataset.
  """
  name = data_config.dataset
  whitening = WHITENING.get(base_name(name), (None, None))
  if base_name(name) == DIGITS:
    arrays = _digits_arrays()
    num_train, num_eval = len(arrays['train'][1]), len(arrays['test'][1])
    num_classes, image_shape = 10, (8, 8, 3)
    train_split, eval_split = 'train', 'test'
  else:
    source = tfds_source(name, data_config.data_dir)
    train_split, eval_split = _pick_splits(name, source.split_sizes)
    num_train = source.split_sizes[train_split]
    num_eval = source.split_sizes[eval_split]
    features = source.builder.info.features
    num_classes = int(features[source.label_key].num_classes)
    height, width = features[source.image_key].shape[:2]
    image_shape = (height, width, 3)
  if data_config.num_images > 0:
    num_train = min(num_train, data_config.num_images)
  return DatasetInfo(
      name=name, num_classes=num_classes, num_train_examples=num_train,
      num_eval_examples=num_eval, image_shape=image_shape,
      train_split=train_split, eval_split=eval_split,
      whitening_mean=whitening[0], whitening_std=whitening[1])


def shard_bounds(num_examples: int, num_shards: int,
                 shard_id: int) -> Tuple[int, int]:
  """[start, end) of contiguous shard `shard_id` of `num_examples` examples.

  Shards differ in size by at most one and together cover every example once.
  """
  if not 0 <= shard_id < num_shards:
    raise ValueError(f'shard_id {shard_id} not in [0, {num_shards}).')
  return (num_examples * shard_id // num_shards,
          num_examples * (shard_id + 1) // num_shards)


def to_rgb_uint8(image: tf.Tensor) -> tf.Tensor:
  """Any tfds image -> uint8 [h, w, 3] (grey repeated, alpha dropped)."""
  if image.dtype != tf.uint8:
    image = tf.image.convert_image_dtype(image, tf.uint8, saturate=True)
  channels = image.shape[-1]
  if channels == 1:
    image = tf.image.grayscale_to_rgb(image)
  elif channels == 4:
    image = image[..., :3]
  elif channels is None:
    # Unknown statically (rare): decide at run time.
    image = tf.cond(tf.equal(tf.shape(image)[-1], 1),
                    lambda: tf.image.grayscale_to_rgb(image),
                    lambda: image[..., :3])
  return tf.ensure_shape(image, [None, None, 3])


def _label_noise_fn(num_classes: int, probability: float, seed: int):
  """Returns a map fn `(index, (image, label)) -> (image, noisy_label)`.

  Reference semantics (`CommonInput._label_noise_fn`): with probability
  `probability` the label is replaced by a class drawn uniformly from all
  `num_classes` classes, which may be the true one, so the fraction of labels
  that actually change is `probability * (num_classes - 1) / num_classes`.
  Unlike the reference, the draw is a stateless function of (seed, global
  example index): the same examples are corrupted in the same way in every
  epoch, run and host layout.
  """
  base_seed = tf.constant([seed, _LABEL_NOISE_SALT], tf.int64)

  def fn(index, example):
    image, label = example
    key = tf.random.experimental.stateless_fold_in(base_seed, index)
    selector, draw = tf.unstack(
        tf.random.stateless_uniform([2], seed=key, dtype=tf.float32))
    random_label = tf.minimum(
        tf.cast(tf.floor(draw * num_classes), tf.int32), num_classes - 1)
    return image, tf.where(selector < probability, random_label, label)

  return fn


def load_split(
    data_config: config_lib.DataConfig,
    training: bool,
    input_context: Optional[tf.distribute.InputContext] = None,
) -> tf.data.Dataset:
  """Unshuffled, unaugmented examples of this input pipeline's shard.

  Sharding: with an `input_context` of several input pipelines (hosts), the
  training split is cut into contiguous disjoint shards, one per pipeline,
  when `shard_per_host` is True (otherwise every host reads all of it, like the
  reference). The eval split is always sharded so that each example is
  evaluated exactly once over all hosts. Shards are taken here, before the
  pipeline shuffles, so that every example lands in exactly one shard.

  Args:
    data_config: the `data` section of the experiment config.
    training: train split (capped by `num_images`, with label noise) if True,
      else the eval split (whole, clean labels).
    input_context: from `strategy.distribute_datasets_from_function`, or None
      for a single pipeline.

  Returns:
    A finite `tf.data.Dataset` of `(image, label)`: image uint8
    [height, width, 3] (height / width static for fixed-size datasets), label
    int32 []. Order is the split's stored order (deterministic).

  Raises:
    DatasetError: the dataset is unknown, not prepared, or a training shard
      would be empty.
  """
  info = get_dataset_info(data_config)
  split = info.train_split if training else info.eval_split
  total = info.num_train_examples if training else info.num_eval_examples

  num_shards, shard_id = 1, 0
  if input_context is not None and input_context.num_input_pipelines > 1:
    if data_config.shard_per_host or not training:
      num_shards = input_context.num_input_pipelines
      shard_id = input_context.input_pipeline_id
  start, end = shard_bounds(total, num_shards, shard_id)
  if training and end <= start:
    raise DatasetError(
        f'Training shard {shard_id} of {num_shards} of {info.name!r} is empty '
        f'({total} examples); use more images or fewer input pipelines.')

  if base_name(info.name) == DIGITS:
    images, labels = _digits_arrays()[split]
    ds = tf.data.Dataset.from_tensor_slices(
        (images[start:end], labels[start:end]))
  else:
    source = tfds_source(info.name, data_config.data_dir)
    # Absolute slicing reads only this shard's records, whereas
    # `Dataset.shard` would make every host read (and drop) the whole split.
    ds = source.builder.as_dataset(
        split=f'{split}[{start}:{end}]', shuffle_files=False)
    image_key, label_key = source.image_key, source.label_key
    ds = ds.map(
        lambda ex: (to_rgb_uint8(ex[image_key]),
                    tf.cast(ex[label_key], tf.int32)),
        num_parallel_calls=tf.data.AUTOTUNE)

  if training and data_config.label_noise_prob > 0:
    ds = ds.enumerate(start=start)  # Global example index.
    ds = ds.map(
        _label_noise_fn(info.num_classes, data_config.label_noise_prob,
                        data_config.seed),
        num_parallel_calls=tf.data.AUTOTUNE)
  return ds
