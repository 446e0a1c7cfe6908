"""Tiny prepared tfds datasets on disk, for the data tests (no network).

`write_tfds_dataset` writes real tfrecord files plus the metadata tfds reads
(dataset_info.json, features.json), so `tfds.builder(name, data_dir=...)`
finds a prepared dataset: a read-only builder for made-up names, the
registered builder (e.g. cifar10's) for real ones. Split slicing, sharding and
decoding then run exactly as on real data.

Every image encodes its index in the split: pixel [0, 0] holds index % 256 and
pixel [0, 1] holds index // 256 (all channels), so tests can tell which
examples a pipeline produced.
"""

import os
from typing import Callable, Dict, Optional

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds


def image_index(image: np.ndarray) -> int:
  """The split index `write_tfds_dataset` encoded in `image` [h, w, c]."""
  return int(image[0, 0, 0]) + 256 * int(image[0, 1, 0])


def _default_example(features, image_shape, num_classes):
  def fn(index):
    image = np.full(image_shape, 77, np.uint8)
    image[0, 0, :] = index % 256
    image[0, 1, :] = index // 256
    example = {'image': image, 'label': index % num_classes}
    for key in features.keys():
      if key not in example:  # E.g. cifar10's 'id' text feature.
        example[key] = f'example_{index}'
    return example
  return fn


def write_tfds_dataset(
    data_dir: str,
    name: str,
    splits: Dict[str, int],
    version: str = '1.0.0',
    image_shape=(6, 5, 3),
    num_classes: int = 5,
    features=None,
    example_fn: Optional[Callable[[int], dict]] = None,
    supervised_keys=('image', 'label'),
) -> str:
  """Writes a prepared tfds dataset `name:version` under `data_dir`.

  Args:
    data_dir: tfds data_dir.
    name: dataset name, or 'name/config' (a registered one such as 'cifar10'
      uses its builder's features unless `features` is given).
    splits: split name -> number of examples.
    version: dataset version directory.
    image_shape: image shape (for the default features).
    num_classes: label classes (for the default features).
    features: a tfds FeaturesDict; default image + ClassLabel.
    example_fn: index -> example dict; default encodes the index (see module).
    supervised_keys: written into dataset_info.json (None for none).

  Returns:
    The variant directory.
  """
  if features is None:
    features = tfds.features.FeaturesDict({
        'image': tfds.features.Image(shape=image_shape),
        'label': tfds.features.ClassLabel(num_classes=num_classes),
    })
  example_fn = example_fn or _default_example(features, image_shape,
                                              num_classes)
  variant_dir = os.path.join(data_dir, name, version)
  tf.io.gfile.makedirs(variant_dir)
  split_infos = []
  for split, num in splits.items():
    template = tfds.core.ShardedFileTemplate(
        # 'name/config' datasets: files are named after the dataset only.
        data_dir=variant_dir, dataset_name=name.split('/')[0], split=split,
        filetype_suffix='tfrecord')
    path = template.sharded_filepath(shard_index=0, num_shards=1)
    with tf.io.TFRecordWriter(os.fspath(path)) as writer:
      for i in range(num):
        writer.write(features.serialize_example(example_fn(i)))
    num_bytes = os.path.getsize(path)
    split_infos.append(tfds.core.SplitInfo(
        name=split, shard_lengths=[num], num_bytes=num_bytes,
        filename_template=template))
  tfds.folder_dataset.write_metadata(
      data_dir=variant_dir, features=features, split_infos=split_infos,
      supervised_keys=supervised_keys)
  return variant_dir


def write_fake_cifar10(data_dir: str, num_train: int = 40,
                       num_test: int = 12) -> str:
  """A prepared 'cifar10' (the registered builder's version and features)."""
  builder = tfds.builder('cifar10', data_dir=data_dir)
  return write_tfds_dataset(
      data_dir, 'cifar10', {'train': num_train, 'test': num_test},
      version=str(builder.version), image_shape=(32, 32, 3), num_classes=10,
      features=builder.info.features)


def write_fake_corrupted(data_dir: str, dataset: str, config: str,
                         num_examples: int = 12,
                         example_fn: Optional[Callable[[int], dict]] = None
                         ) -> str:
  """A prepared '<dataset>/<config>', e.g. ('cifar10_corrupted', 'fog_3').

  Uses the registered builder's version and features, and its one split
  ('test' for cifar10_corrupted, 'validation' for imagenet2012_corrupted).
  """
  name = f'{dataset}/{config}'
  builder = tfds.builder(name, data_dir=data_dir)
  split = 'validation' if dataset.startswith('imagenet') else 'test'
  image_shape = builder.info.features['image'].shape
  num_classes = builder.info.features['label'].num_classes
  return write_tfds_dataset(
      data_dir, name, {split: num_examples}, version=str(builder.version),
      image_shape=image_shape, num_classes=num_classes,
      features=builder.info.features, example_fn=example_fn)
