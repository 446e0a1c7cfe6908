"""Raw labelled image datasets: tfds builders, `digits`, image folders, npz.

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
  None). A dataset that is not prepared there is downloaded and prepared
  once, as `tfds.load` does, when `DataConfig.download` is True (the
  default); with `--nodownload` it raises `DatasetError` naming the exact
  `tfds build` command instead.
* `folder:PATH`: a class-per-subfolder tree of JPEG / PNG / BMP / GIF files
  (`PATH/<class>/**/<image>`, as Keras's `image_dataset_from_directory` and
  torchvision's `ImageFolder` read it). `PATH/train` + `PATH/test` (or `val`,
  `validation`) are the splits when both exist; otherwise a stratified split
  fixed by `DataConfig.seed` holds out `folder_test_fraction` of each class
  (of `PATH/train` when only that exists). Class names are the sorted folder
  names. Only the file list is held in
  memory; images are read and decoded in the tf.data pipeline (`decode` of
  `load_split_records`), in parallel, grey and RGBA becoming RGB.
* `npz:PATH`: a NumPy archive with `x_train`, `y_train` (and optionally
  `x_test`, `y_test`, `class_names`): uint8 [n, h, w(, c)] or float in
  [0, 1]; the same split rule when there is no test split.

Folder and npz datasets are whitened with their own per-channel mean / std,
computed once from the first `WHITENING_SAMPLE` training images and stored
in `model_dir/whitening.json` (`save_run_files`), which later runs on that
model_dir (eval, export) read back, so they use exactly the same numbers.

Order of operations (the reference's `CommonInput.input_fn`, with the cap taken
before sharding so that `num_images` means the same images on any topology):

  full split -> first `num_images` (train only) -> this pipeline's contiguous
  shard -> label noise (train only, keyed by the global example index).
"""

import dataclasses
import functools
import json
import os
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf

from supcon_tf import config as config_lib
from supcon_tf import errors

DIGITS = 'digits'
# Images and split sizes of the embedded dataset.
_DIGITS_NUM_TEST = 360
_DIGITS_SPLIT_SEED = 0

# Own data: `--dataset=folder:PATH` and `--dataset=npz:PATH`.
FOLDER_PREFIX = 'folder:'
NPZ_PREFIX = 'npz:'
# What tf.io.decode_image reads and Keras's image_dataset_from_directory
# lists; other files (README, .DS_Store, labels.csv) are ignored.
IMAGE_EXTENSIONS = ('.bmp', '.gif', '.jpeg', '.jpg', '.png')
# Sub-folders that, next to `train`, hold the eval split (first found wins).
EVAL_FOLDER_NAMES = ('test', 'val', 'validation')
# Files written to model_dir (`save_run_files`).
CLASS_NAMES_FILE = 'class_names.txt'
WHITENING_FILE = 'whitening.json'
# Training images whose pixels give the whitening mean / std of own data.
WHITENING_SAMPLE = 1000
# Mixed into the seeds of the held-out split and of the training order.
_SPLIT_SALT = 0x5b17
_ORDER_SALT = 0x0dd3

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
    class_names: the name of each class index (folder names, npz
      `class_names`, tfds ClassLabel names, '0'..'9' for digits), or None.
    num_skipped_images: unreadable image files left out
      (`--skip_corrupt_images`, folder datasets).
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
  class_names: Optional[Tuple[str, ...]] = None
  num_skipped_images: int = 0

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


def _not_prepared_message(name: str, builder, why: str) -> str:
  """How to get `name` onto disk, for the error when it is missing.

  Args:
    name: the dataset as given.
    builder: its tfds builder.
    why: why it was not downloaded, e.g. '--nodownload was given.'
  """
  # builder.data_dir is <data_root>/<full_name>, full_name = name[/config]/ver.
  data_dir = str(builder.data_dir)
  full_name = builder.info.full_name
  data_root = (data_dir[:-len(full_name)].rstrip('/')
               if data_dir.endswith(full_name) else data_dir)
  lines = [
      f'Dataset {name!r} (tfds {builder.info.full_name}) is not prepared in '
      f'data_dir {data_root!r}: {builder.data_dir}/dataset_info.json does '
      f'not exist. {why}']
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


def _download_and_prepare(name: str, builder) -> None:
  """`builder.download_and_prepare()`, as `tfds.load(download=True)` does.

  Raises:
    DatasetError: the download or preparation failed (offline, a manual
      download, disk full...): the message names the dataset and the
      `tfds build` command.
  """
  if getattr(builder, 'MANUAL_DOWNLOAD_INSTRUCTIONS', None):
    # tfds cannot fetch these (ImageNet): say where to put the files.
    raise DatasetError(_not_prepared_message(
        name, builder, 'It cannot be downloaded automatically.'))
  print(f'[data] downloading and preparing tfds {builder.info.full_name} '
        f'into {builder.data_dir} (once; --nodownload to refuse)', flush=True)
  try:
    builder.download_and_prepare()
  except Exception as e:  # pylint: disable=broad-except
    # Offline machines fail in many ways (DNS, proxies, SSL, timeouts).
    first_line = (str(e).strip().splitlines() or [''])[0][:300]
    raise DatasetError(_not_prepared_message(
        name, builder, f'Downloading it failed ({type(e).__name__}: '
        f'{first_line}).')) from e


@functools.lru_cache(maxsize=16)
def tfds_source(name: str, data_dir: Optional[str],
                 download: bool = False) -> TfdsSource:
  """Opens the tfds builder of `name` and checks it is usable.

  Args:
    name: tfds name (`name[/config][:version]`).
    data_dir: tfds data_dir, or None for tfds's default.
    download: download and prepare the dataset when it is not prepared in
      `data_dir` (the network is only touched then); else refuse.

  Raises:
    DatasetError: unknown name, not prepared in `data_dir` (and not
      downloadable), or not an image classification dataset.
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
        f'Unknown dataset {name!r}: it is neither {DIGITS!r} (embedded), '
        f'{FOLDER_PREFIX}PATH, {NPZ_PREFIX}PATH nor a tfds dataset name, and '
        f'no prepared dataset of that name is in data_dir {data_dir!r}.{hint} '
        'Names: https://www.tensorflow.org/datasets/catalog/overview') from e
  except (AssertionError, ValueError) as e:
    # E.g. a version or config the installed tfds does not know.
    prepared = _prepared_versions(data_dir, base_name(name)) if data_dir else []
    raise DatasetError(
        f'Cannot open tfds dataset {name!r} in data_dir {data_dir!r}: {e}'
        + (f'\nPrepared there: {prepared}.' if prepared else '')) from e
  # `is_prepared` only looks at the local data_dir, so this never touches the
  # network; `as_dataset` on an unprepared builder would fail less clearly.
  if not builder.is_prepared() or not builder.info.splits:
    if not download:
      raise DatasetError(_not_prepared_message(
          name, builder, '--nodownload was given, so supcon_tf does not '
          'download it.'))
    _download_and_prepare(name, builder)
    # A fresh builder reads the metadata just written (split sizes).
    builder = tfds.builder(name, data_dir=data_dir)
    if not builder.is_prepared() or not builder.info.splits:
      raise DatasetError(_not_prepared_message(
          name, builder, 'download_and_prepare() left it unprepared.'))

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
# Own data: image folders and npz archives.


def own_data_path(name: str) -> Optional[Tuple[str, str]]:
  """('folder' | 'npz', PATH) for `folder:PATH` / `npz:PATH`, else None."""
  for prefix in (FOLDER_PREFIX, NPZ_PREFIX):
    if name.startswith(prefix):
      return prefix[:-1], name[len(prefix):]
  return None


@dataclasses.dataclass(frozen=True)
class _OwnSource:
  """A folder or npz dataset, split: what `load_split_records` slices.

  For folders `train` / `test` hold (file paths str [n], labels int32 [n]);
  for npz (images uint8 [n, h, w, c], labels int32 [n]).
  """
  kind: str
  path: str
  class_names: Tuple[str, ...]
  train: Tuple[np.ndarray, np.ndarray]
  test: Tuple[np.ndarray, np.ndarray]
  image_shape: Tuple[Optional[int], Optional[int], int]
  skipped: Tuple[str, ...] = ()


def _held_out_count(n: int, fraction: float) -> int:
  """Images of a class of `n` that the stratified split holds out.

  round(fraction * n) (halves up), but at least 1 so that every class is evaluated, and
  at most n - 1 so that every class is trained on; a class of 1 image stays
  in training.
  """
  if n < 2:
    return 0
  return int(min(n - 1, max(1, np.floor(fraction * n + 0.5))))


def stratified_split(labels: np.ndarray, fraction: float, seed: int
                     ) -> Tuple[np.ndarray, np.ndarray]:
  """Indices (train, test) holding out `fraction` of each class.

  A pure function of (labels, fraction, seed): the same inputs give the same
  split in every run and on every host. Class c's examples are permuted by
  a generator seeded with (seed, c), so adding images to one class leaves
  the split of the others unchanged. Test indices are sorted (classes in
  order); train indices are in a seeded shuffled order, so that the first N
  (`num_images`) cover all classes.

  Args:
    labels: int [n] class of each example, in a fixed (e.g. sorted) order.
    fraction: share of each class to hold out, in (0, 1).
    seed: the split seed (`--seed`).

  Returns:
    (train, test): int64 index arrays, disjoint, together all of range(n).
  """
  labels = np.asarray(labels)
  train, test = [], []
  for c in np.unique(labels):
    members = np.flatnonzero(labels == c)
    rng = np.random.default_rng([seed & 0xffffffff, _SPLIT_SALT, int(c)])
    members = members[rng.permutation(len(members))]
    k = _held_out_count(len(members), fraction)
    test.append(members[:k])
    train.append(members[k:])
  train = np.concatenate(train).astype(np.int64)
  test = np.sort(np.concatenate(test)).astype(np.int64)
  order = np.random.default_rng([seed & 0xffffffff, _ORDER_SALT])
  return train[order.permutation(len(train))], test


def _is_remote(path: str) -> bool:
  return '://' in path


def _image_files(root: str) -> List[str]:
  """Image files under `root` (recursively, following links), sorted."""
  walk = (tf.io.gfile.walk(root) if _is_remote(root) else
          os.walk(root, followlinks=True))
  files = []
  for dirpath, dirnames, filenames in walk:
    dirnames[:] = [d for d in dirnames if not d.startswith('.')]
    files.extend(os.path.join(dirpath, f) for f in filenames
                 if not f.startswith('.') and
                 f.lower().endswith(IMAGE_EXTENSIONS))
  return sorted(files)


def _class_folders(root: str, what: str) -> List[str]:
  names = sorted(n.rstrip('/') for n in tf.io.gfile.listdir(root)
                 if not n.startswith('.') and
                 tf.io.gfile.isdir(os.path.join(root, n)))
  if not names:
    raise DatasetError(
        f'{what}: no class folders in {root}; expected one sub-folder per '
        f'class, {root}/<class_name>/<images>.')
  return names


def _list_folder_tree(root: str, class_names: Sequence[str], what: str,
                      require_images: bool
                      ) -> Tuple[List[str], List[int]]:
  """(paths, labels) of the class folders of `root`, classes in order."""
  paths, labels = [], []
  for label, name in enumerate(class_names):
    folder = os.path.join(root, name)
    if not tf.io.gfile.isdir(folder):
      continue  # A class without eval images.
    files = _image_files(folder)
    if not files and require_images:
      raise DatasetError(
          f'{what}: class folder {folder} has no images '
          f'({", ".join(IMAGE_EXTENSIONS)}); add some or remove the folder.')
    paths.extend(files)
    labels.extend([label] * len(files))
  return paths, labels


def decode_image_file(path: tf.Tensor) -> tf.Tensor:
  """Reads and decodes one image file: uint8 [h, w, 3].

  JPEG, PNG, BMP or GIF (its first frame); grey becomes 3 equal channels,
  RGBA / grey + alpha lose the alpha channel, 16-bit PNGs become 8-bit.

  Args:
    path: string [] file path (local or any tf.io.gfile file system).

  Returns:
    uint8 [height, width, 3].
  """
  image = tf.io.decode_image(tf.io.read_file(path), channels=3,
                             dtype=tf.uint8, expand_animations=False)
  return tf.ensure_shape(image, [None, None, 3])


def find_unreadable_images(paths: Sequence[str]) -> List[str]:
  """The files of `paths` that cannot be read or decoded, in order.

  Every file is decoded once, in parallel in tf.data (errors dropped with
  `ignore_errors`, the survivors' indices collected), so this costs one
  decoding pass over `paths`.
  """
  if not len(paths):  # pylint: disable=g-explicit-length-test
    return []
  ds = tf.data.Dataset.from_tensor_slices(np.asarray(paths, dtype=object))
  ds = ds.enumerate().map(
      lambda i, p: (i, tf.shape(decode_image_file(p))[0]),
      num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)
  ds = ds.ignore_errors().map(lambda i, _: i).batch(4096)
  readable = np.zeros(len(paths), bool)
  for indices in ds.as_numpy_iterator():
    readable[indices] = True
  return [p for p, ok in zip(paths, readable) if not ok]


def _drop_unreadable(paths: List[str], labels: List[int],
                     skipped: List[str]) -> Tuple[List[str], List[int]]:
  """(paths, labels) without unreadable files, which go to `skipped`."""
  bad = set(find_unreadable_images(paths))
  if not bad:
    return paths, labels
  skipped.extend(sorted(bad))
  kept = [(p, l) for p, l in zip(paths, labels) if p not in bad]
  return [p for p, _ in kept], [l for _, l in kept]


@functools.lru_cache(maxsize=8)
def _folder_source(path: str, seed: int, test_fraction: float,
                   skip_corrupt: bool) -> _OwnSource:
  """Lists and splits a class-per-subfolder tree (see the module doc).

  Raises:
    DatasetError: missing path, no class folders, an empty class folder,
      fewer than 2 classes, an eval class that is not a training class.
  """
  what = f'--dataset={FOLDER_PREFIX}{path}'
  if not tf.io.gfile.exists(path):
    raise DatasetError(
        f'{what}: {path} does not exist; pass the root folder of your '
        'images, laid out as PATH/<class_name>/<images> (or PATH/train/... '
        'and PATH/test/...).')
  if not tf.io.gfile.isdir(path):
    raise DatasetError(
        f'{what}: {path} is a file, not a folder; pass the root of a '
        'PATH/<class_name>/<images> tree (use npz:PATH for a NumPy archive).')
  train_root, test_root = path, None
  if tf.io.gfile.isdir(os.path.join(path, 'train')):
    # PATH/train alone is split like PATH (not taken as a class 'train').
    train_root = os.path.join(path, 'train')
    for name in EVAL_FOLDER_NAMES:
      if tf.io.gfile.isdir(os.path.join(path, name)):
        test_root = os.path.join(path, name)
        break
  class_names = _class_folders(train_root, what)
  if len(class_names) < 2:
    raise DatasetError(
        f'{what}: {train_root} has one class folder ({class_names[0]!r}); '
        'SupCon needs at least 2 classes (the other classes are the '
        'negatives): add another class folder.')
  paths, labels = _list_folder_tree(train_root, class_names, what, True)
  if test_root is not None:
    unknown = sorted(set(_class_folders(test_root, what)) - set(class_names))
    if unknown:
      raise DatasetError(
          f'{what}: {test_root} has class folders that {train_root} does not '
          f'have: {unknown[:5]}; the eval classes must be training classes '
          '(rename or remove them).')
    test_paths, test_labels = _list_folder_tree(test_root, class_names, what,
                                                False)
    if not test_paths:
      raise DatasetError(
          f'{what}: {test_root} holds no images; add some, or remove it to '
          'hold out --folder_test_fraction of the training images instead.')
  skipped: List[str] = []
  if skip_corrupt:
    paths, labels = _drop_unreadable(paths, labels, skipped)
    if test_root is not None:
      test_paths, test_labels = _drop_unreadable(test_paths, test_labels,
                                                 skipped)
    if skipped:
      shown = ', '.join(skipped[:3]) + (' ...' if len(skipped) > 3 else '')
      print(f'[data] {what}: skipped {len(skipped)} unreadable image '
            f'file(s) (--skip_corrupt_images): {shown}', flush=True)
  paths_arr = np.asarray(paths, dtype=object)
  labels_arr = np.asarray(labels, dtype=np.int32)
  if test_root is None:
    train_idx, test_idx = stratified_split(labels_arr, test_fraction, seed)
    train = (paths_arr[train_idx], labels_arr[train_idx])
    test = (paths_arr[test_idx], labels_arr[test_idx])
  else:
    order = np.random.default_rng([seed & 0xffffffff, _ORDER_SALT])
    perm = order.permutation(len(paths_arr))
    train = (paths_arr[perm], labels_arr[perm])
    test = (np.asarray(test_paths, dtype=object),
            np.asarray(test_labels, dtype=np.int32))
  for kind, (_, split_labels) in (('training', train), ('eval', test)):
    if not len(split_labels):  # pylint: disable=g-explicit-length-test
      raise DatasetError(
          f'{what}: the {kind} split is empty (all images unreadable?); '
          'add images.')
  return _OwnSource(kind='folder', path=path, class_names=tuple(class_names),
                    train=train, test=test, image_shape=(None, None, 3),
                    skipped=tuple(skipped))


def _npz_images(what: str, key: str, x: np.ndarray) -> np.ndarray:
  """x as uint8 [n, h, w, c], c in (1, 3, 4), or DatasetError."""
  if x.ndim == 3:
    x = x[..., None]
  if x.ndim != 4 or x.shape[-1] not in (1, 3, 4):
    raise DatasetError(
        f'{what}: {key} has shape {x.shape}; expected images [n, height, '
        'width] or [n, height, width, channels] with 1, 3 or 4 channels.')
  if x.dtype == np.uint8:
    return x
  if np.issubdtype(x.dtype, np.floating):
    low, high = (float(x.min()), float(x.max())) if x.size else (0.0, 0.0)
    if low < 0.0 or high > 1.0 or not np.isfinite([low, high]).all():
      raise DatasetError(
          f'{what}: {key} is {x.dtype} with values in [{low:g}, {high:g}]; '
          'float images must be in [0, 1] (or store uint8 0..255).')
    return np.round(x * 255.0).astype(np.uint8)
  raise DatasetError(
      f'{what}: {key} has dtype {x.dtype}; store uint8 0..255 or float '
      'in [0, 1] images.')


def _npz_labels(what: str, key: str, y: np.ndarray, n: int, x_key: str,
                num_classes: Optional[int]) -> np.ndarray:
  """y as int32 [n] in [0, num_classes), or DatasetError."""
  if y.ndim == 2 and y.shape[1] == 1:
    y = y[:, 0]
  if y.ndim != 1:
    raise DatasetError(
        f'{what}: {key} has shape {y.shape}; expected integer class ids [n].')
  if len(y) != n:
    raise DatasetError(
        f'{what}: {x_key} has {n} images but {key} has {len(y)} labels; '
        'they must have the same length.')
  if not (np.issubdtype(y.dtype, np.integer) or
          (np.issubdtype(y.dtype, np.floating) and
           np.array_equal(y, np.round(y)))):
    raise DatasetError(
        f'{what}: {key} has dtype {y.dtype}; labels must be integer class '
        'ids 0..num_classes-1.')
  y = y.astype(np.int64)
  if len(y) and (y.min() < 0 or (num_classes is not None and
                                 y.max() >= num_classes)):
    allowed = (f'0..{num_classes - 1}' if num_classes is not None else
               '>= 0')
    raise DatasetError(
        f'{what}: {key} has labels out of range [{y.min()}, {y.max()}]; '
        f'class ids must be {allowed}'
        + (' (the classes of y_train / class_names).'
           if num_classes is not None else '.'))
  return y.astype(np.int32)


@functools.lru_cache(maxsize=4)
def _npz_source(path: str, seed: int, test_fraction: float) -> _OwnSource:
  """Loads and checks a NumPy archive (see the module doc).

  Raises:
    DatasetError: missing or unreadable file, missing keys, bad shapes,
      dtypes or values, mismatched x / y lengths, labels out of range,
      fewer than 2 classes.
  """
  what = f'--dataset={NPZ_PREFIX}{path}'
  if not tf.io.gfile.exists(path):
    raise DatasetError(
        f'{what}: {path} does not exist; pass a .npz file written with '
        'numpy.savez(PATH, x_train=..., y_train=...[, x_test=..., '
        'y_test=...]).')
  try:
    with tf.io.gfile.GFile(path, 'rb') as f:
      with np.load(f, allow_pickle=False) as archive:
        arrays = {k: archive[k] for k in archive.files}
  except Exception as e:  # pylint: disable=broad-except
    raise DatasetError(
        f'{what}: cannot read {path} as a NumPy .npz archive '
        f'({type(e).__name__}: {str(e)[:200]}); write it with numpy.savez.'
    ) from e
  missing = [k for k in ('x_train', 'y_train') if k not in arrays]
  has_test = 'x_test' in arrays or 'y_test' in arrays
  if has_test:
    missing += [k for k in ('x_test', 'y_test') if k not in arrays]
  if missing:
    raise DatasetError(
        f'{what}: {path} has no {missing} (keys: {sorted(arrays)}); it needs '
        'x_train and y_train, and x_test with y_test or neither.')
  class_names = None
  if 'class_names' in arrays:
    class_names = tuple(str(n) for n in np.asarray(arrays['class_names'])
                        .reshape(-1))
  x_train = _npz_images(what, 'x_train', arrays['x_train'])
  y_train = _npz_labels(what, 'y_train', arrays['y_train'], len(x_train),
                        'x_train',
                        len(class_names) if class_names else None)
  num_classes = (len(class_names) if class_names else
                 int(y_train.max()) + 1 if len(y_train) else 0)
  if len(np.unique(y_train)) < 2:
    raise DatasetError(
        f'{what}: y_train holds {len(np.unique(y_train))} class(es); SupCon '
        'needs at least 2 (the other classes are the negatives).')
  if has_test:
    x_test = _npz_images(what, 'x_test', arrays['x_test'])
    y_test = _npz_labels(what, 'y_test', arrays['y_test'], len(x_test),
                         'x_test', num_classes)
    if x_test.shape[1:3] != x_train.shape[1:3] or not len(x_test):
      raise DatasetError(
          f'{what}: x_test images are {x_test.shape[1:3]} ({len(x_test)} '
          f'of them) but x_train images {x_train.shape[1:3]}; give a '
          'non-empty x_test of the same image size.')
    train, test = (x_train, y_train), (x_test, y_test)
  else:
    train_idx, test_idx = stratified_split(y_train, test_fraction, seed)
    train = (x_train[train_idx], y_train[train_idx])
    test = (x_train[test_idx], y_train[test_idx])
  for arr in (*train, *test):
    arr.setflags(write=False)  # Shared through the cache.
  return _OwnSource(
      kind='npz', path=path,
      class_names=class_names or tuple(str(i) for i in range(num_classes)),
      train=train, test=test,
      image_shape=(x_train.shape[1], x_train.shape[2], 3))


def _own_source(data_config: config_lib.DataConfig) -> _OwnSource:
  kind, path = own_data_path(data_config.dataset)
  if kind == 'folder':
    return _folder_source(path, data_config.seed,
                          data_config.folder_test_fraction,
                          data_config.skip_corrupt_images)
  return _npz_source(path, data_config.seed, data_config.folder_test_fraction)


def _pixel_moments(images: tf.data.Dataset) -> Tuple[np.ndarray, np.ndarray]:
  """Per-channel mean and std of the uint8 [h, w, 3] images, in [0, 1]."""
  def moments(image):
    x = tf.reshape(tf.cast(image, tf.float64) / 255.0, [-1, 3])
    return (tf.reduce_sum(x, 0), tf.reduce_sum(tf.square(x), 0),
            tf.cast(tf.shape(x)[0], tf.float64))

  total, total_sq, count = np.zeros(3), np.zeros(3), 0.0
  ds = images.map(moments, num_parallel_calls=tf.data.AUTOTUNE)
  for s, sq, n in ds.as_numpy_iterator():
    total, total_sq, count = total + s, total_sq + sq, count + n
  mean = total / max(count, 1.0)
  std = np.sqrt(np.maximum(total_sq / max(count, 1.0) - mean ** 2, 0.0))
  return mean, np.maximum(std, 1e-3)  # A constant channel must not divide 0.


@functools.lru_cache(maxsize=8)
def _computed_whitening(data_config: config_lib.DataConfig
                        ) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
  """(mean, std) of the first `WHITENING_SAMPLE` (capped) training images."""
  source = _own_source(data_config)
  count = len(source.train[1])
  if data_config.num_images > 0:
    count = min(count, data_config.num_images)
  count = min(count, WHITENING_SAMPLE)
  if count <= 0:
    return (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
  images, labels = source.train[0][:count], source.train[1][:count]
  if source.kind == 'folder':
    images = images.astype(str)  # object -> unicode: tf.string tensors.
  ds = tf.data.Dataset.from_tensor_slices((images, labels))
  ds = ds.map(_own_decode_fn(source), num_parallel_calls=tf.data.AUTOTUNE)
  try:
    mean, std = _pixel_moments(ds.map(lambda image, _: image))
  except tf.errors.InvalidArgumentError as e:
    raise unreadable_images_error(data_config, e) or e
  return (tuple(float(m) for m in mean), tuple(float(s) for s in std))


def _read_whitening_file(model_dir: Optional[str]):
  if not model_dir:
    return None
  path = os.path.join(model_dir, WHITENING_FILE)
  if not tf.io.gfile.exists(path):
    return None
  try:
    with tf.io.gfile.GFile(path) as f:
      stored = json.load(f)
    return (tuple(float(m) for m in stored['mean']),
            tuple(float(s) for s in stored['std']))
  except (ValueError, KeyError, TypeError) as e:
    raise DatasetError(
        f'{path} is damaged ({type(e).__name__}: {e}); delete it to '
        'recompute the whitening statistics from the training images.'
    ) from e


def _own_decode_fn(source: _OwnSource) -> Callable:
  """record -> (uint8 [h, w, 3], label) of a folder or npz source."""
  if source.kind == 'folder':
    return lambda path, label: (decode_image_file(path), label)
  return lambda image, label: (to_rgb_uint8(image), label)


def _is_decode_error(error: BaseException) -> bool:
  if not isinstance(error, tf.errors.InvalidArgumentError):
    return False
  text = str(error)
  return any(k in text for k in (
      'image file format', 'decode', 'Decode', 'JPEG', 'PNG', 'GIF', 'BMP',
      'jpeg', 'png', 'gif', 'bmp'))


def unreadable_images_error(data_config: config_lib.DataConfig,
                            error: BaseException) -> Optional[DatasetError]:
  """A DatasetError naming the unreadable files behind `error`, or None.

  Called where the input pipeline failed with `error`: for folder datasets
  whose images fail to decode, the files are found by decoding every file
  once (`find_unreadable_images`), so the message can name them.

  Args:
    data_config: the dataset that was being read.
    error: what iterating its pipeline raised.

  Returns:
    The DatasetError to raise instead, or None when `error` is not a decode
    error of a folder dataset.
  """
  own = own_data_path(data_config.dataset)
  if own is None or own[0] != 'folder' or not _is_decode_error(error):
    return None
  source = _own_source(data_config)
  bad = find_unreadable_images(
      list(source.train[0]) + list(source.test[0]))
  text = (str(getattr(error, 'message', error)).strip().splitlines() or
          [''])[0][:200]
  if not bad:
    return DatasetError(
        f'--dataset={data_config.dataset}: an image failed to decode ({text})'
        ' but every file decodes now; was one being written? Run again.')
  more = f' and {len(bad) - 1} more' if len(bad) > 1 else ''
  return DatasetError(
      f'--dataset={data_config.dataset}: cannot decode image file {bad[0]}'
      f'{more} ({text}); delete or replace it, or pass '
      '--skip_corrupt_images to leave unreadable files out.')


def save_run_files(info: DatasetInfo, model_dir: str,
                   whiten: bool = True) -> None:
  """Writes `class_names.txt` (and own data's `whitening.json`) to model_dir.

  `class_names.txt` has one class name per line, line i = class index i.
  `whitening.json` ({"mean": [3], "std": [3], "dataset": name}) is written
  once, for folder and npz datasets when `whiten`, and never replaced: later
  runs on this model_dir (`get_dataset_info(..., model_dir)`) whiten with
  exactly these numbers. Both are written atomically.
  """
  if not model_dir:
    return
  tf.io.gfile.makedirs(model_dir)
  files = {}
  if info.class_names is not None:
    files[CLASS_NAMES_FILE] = ''.join(f'{n}\n' for n in info.class_names)
  if (whiten and own_data_path(info.name) is not None and info.has_whitening
      and not tf.io.gfile.exists(os.path.join(model_dir, WHITENING_FILE))):
    files[WHITENING_FILE] = json.dumps(
        {'mean': list(info.whitening_mean), 'std': list(info.whitening_std),
         'dataset': info.name,
         'num_images': min(WHITENING_SAMPLE, info.num_train_examples)},
        indent=2) + '\n'
  for name, text in files.items():
    path = os.path.join(model_dir, name)
    with tf.io.gfile.GFile(path + '.tmp', 'w') as f:
      f.write(text)
    tf.io.gfile.rename(path + '.tmp', path, overwrite=True)


# -----------------------------------------------------------------------------
# Public API.


def get_dataset_info(data_config: config_lib.DataConfig,
                     model_dir: Optional[str] = None) -> DatasetInfo:
  """Facts about `data_config.dataset` (tfds metadata, file lists, arrays).

  Args:
    data_config: the `data` section of the experiment config.
    model_dir: the run's model_dir, if any: own data (folder / npz) is then
      whitened with the statistics stored there (`save_run_files`) when they
      exist, instead of computing them.

  Returns:
    A `DatasetInfo`; `num_train_examples` is capped by `num_images`.

  Raises:
    DatasetError: unknown, unprepared (and not downloadable), unreadable or
      invalid dataset, or not an image classification dataset.
  """
  name = data_config.dataset
  whitening = WHITENING.get(base_name(name), (None, None))
  skipped = 0
  if own_data_path(name) is not None:
    source = _own_source(data_config)
    num_train, num_eval = len(source.train[1]), len(source.test[1])
    num_classes, image_shape = len(source.class_names), source.image_shape
    class_names = source.class_names
    train_split, eval_split = 'train', 'test'
    skipped = len(source.skipped)
    whitening = (_read_whitening_file(model_dir) or
                 _computed_whitening(data_config))
  elif base_name(name) == DIGITS:
    arrays = _digits_arrays()
    num_train, num_eval = len(arrays['train'][1]), len(arrays['test'][1])
    num_classes, image_shape = 10, (8, 8, 3)
    class_names = tuple(str(i) for i in range(10))
    train_split, eval_split = 'train', 'test'
  else:
    source = tfds_source(name, data_config.data_dir, data_config.download)
    train_split, eval_split = _pick_splits(name, source.split_sizes)
    num_train = source.split_sizes[train_split]
    num_eval = source.split_sizes[eval_split]
    features = source.builder.info.features
    num_classes = int(features[source.label_key].num_classes)
    names = getattr(features[source.label_key], 'names', None)
    class_names = (tuple(str(n) for n in names)
                   if names and len(names) == num_classes else None)
    height, width = features[source.image_key].shape[:2]
    image_shape = (height, width, 3)
  if data_config.num_images > 0:
    num_train = min(num_train, data_config.num_images)
  return DatasetInfo(
      name=name, num_classes=num_classes, num_train_examples=num_train,
      num_eval_examples=num_eval, image_shape=image_shape,
      train_split=train_split, eval_split=eval_split,
      whitening_mean=whitening[0], whitening_std=whitening[1],
      class_names=class_names, num_skipped_images=skipped)


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


def load_split_records(
    data_config: config_lib.DataConfig,
    training: bool,
    input_context: Optional[tf.distribute.InputContext] = None,
) -> Tuple[tf.data.Dataset, Optional[Callable]]:
  """This input pipeline's shard of a split, before decoding.

  Like `load_split` (same sharding, cap, label noise and order), but for
  folder datasets the records are `(file path, label)`, cheap to shuffle, and
  `decode` turns one into `(image, label)`; the pipeline then shuffles paths
  and decodes after shuffling, in parallel. For the other datasets records
  already are `(image, label)` and `decode` is None.

  Returns:
    (records, decode): `records` a finite dataset; `decode` None or a map
    function `(record...) -> (uint8 [h, w, 3], int32 [])`.

  Raises:
    DatasetError: see `load_split`.
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

  decode = None
  if own_data_path(info.name) is not None:
    source = _own_source(data_config)
    items, labels = source.train if training else source.test
    items = items[start:end]
    if source.kind == 'folder':
      items = items.astype(str)  # object -> unicode: tf.string tensors.
    ds = tf.data.Dataset.from_tensor_slices((items, labels[start:end]))
    decode = _own_decode_fn(source)
  elif base_name(info.name) == DIGITS:
    images, labels = _digits_arrays()[split]
    ds = tf.data.Dataset.from_tensor_slices(
        (images[start:end], labels[start:end]))
  else:
    source = tfds_source(info.name, data_config.data_dir,
                          data_config.download)
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
  return ds, decode


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
    int32 []. Order is the split's stored order (deterministic); for folder
    images decoded in parallel (order kept).

  Raises:
    DatasetError: the dataset is unknown, not prepared, or a training shard
      would be empty.
  """
  ds, decode = load_split_records(data_config, training, input_context)
  if decode is not None:
    ds = ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE)
  return ds
