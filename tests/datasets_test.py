"""Tests of supcon_tf.data.datasets: info, splits, cap, label noise, sharding."""

import time

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from supcon_tf import config as config_lib
from supcon_tf.data import datasets
from tests import data_testing


@pytest.fixture(autouse=True)
def _fresh_builders():
  # Builders are cached per (name, data_dir); tests reuse names in new dirs
  # and under tfds mocking, so start each test clean.
  datasets.tfds_source.cache_clear()  # pylint: disable=protected-access
  yield
  datasets.tfds_source.cache_clear()  # pylint: disable=protected-access


def _data(**kwargs) -> config_lib.DataConfig:
  kwargs.setdefault('dataset', 'digits')
  return config_lib.DataConfig(**kwargs)


def _ctx(num_pipelines, pipeline_id, replicas=None):
  return tf.distribute.InputContext(
      num_input_pipelines=num_pipelines, input_pipeline_id=pipeline_id,
      num_replicas_in_sync=replicas or num_pipelines)


def _arrays(ds):
  images, labels = [], []
  for image, label in ds.as_numpy_iterator():
    images.append(image)
    labels.append(label)
  return np.stack(images), np.array(labels)


# -----------------------------------------------------------------------------
# digits.


def test_digits_info():
  info = datasets.get_dataset_info(_data())
  assert info.num_classes == 10
  assert info.num_train_examples == 1437
  assert info.num_eval_examples == 360
  assert info.image_shape == (8, 8, 3)
  assert (info.train_split, info.eval_split) == ('train', 'test')
  assert not info.has_whitening


def test_digits_splits_shapes_and_stratification():
  for training, size in ((True, 1437), (False, 360)):
    ds = datasets.load_split(_data(), training)
    assert ds.element_spec == (tf.TensorSpec([8, 8, 3], tf.uint8),
                               tf.TensorSpec([], tf.int32))
    images, labels = _arrays(ds)
    assert images.shape == (size, 8, 8, 3)
    assert images.max() == 255 and images.min() == 0
    # Grey: the three channels are equal.
    np.testing.assert_array_equal(images[..., 0], images[..., 2])
    counts = np.bincount(labels, minlength=10)
    # Stratified: every class in proportion (about 1/10 of the split).
    assert counts.min() >= 0.08 * size and counts.max() <= 0.12 * size


def test_digits_order_is_fixed():
  a = _arrays(datasets.load_split(_data(), True))
  b = _arrays(datasets.load_split(_data(seed=5), True))
  np.testing.assert_array_equal(a[0], b[0])
  np.testing.assert_array_equal(a[1], b[1])


def test_num_images_caps_training_only():
  full_images, full_labels = _arrays(datasets.load_split(_data(), True))
  config = _data(num_images=100)
  info = datasets.get_dataset_info(config)
  assert info.num_train_examples == 100
  assert info.num_eval_examples == 360
  images, labels = _arrays(datasets.load_split(config, True))
  np.testing.assert_array_equal(images, full_images[:100])
  np.testing.assert_array_equal(labels, full_labels[:100])
  assert len(_arrays(datasets.load_split(config, False))[1]) == 360
  # A cap above the split size is no cap.
  big = datasets.get_dataset_info(_data(num_images=10**6))
  assert big.num_train_examples == 1437


# -----------------------------------------------------------------------------
# Label noise.


def test_label_noise_rate_matches_reference_semantics():
  clean = _arrays(datasets.load_split(_data(), True))[1]
  p, k = 0.4, 10
  noisy = _arrays(datasets.load_split(_data(label_noise_prob=p, seed=1),
                                      True))[1]
  assert noisy.min() >= 0 and noisy.max() < k
  # Replaced with a uniform class, which may be the true one.
  expected = p * (k - 1) / k
  std = np.sqrt(expected * (1 - expected) / len(clean))
  assert abs(np.mean(noisy != clean) - expected) < 4 * std
  # The replacement classes are spread over all classes.
  assert len(np.unique(noisy[noisy != clean])) == k


def test_label_noise_is_deterministic_per_seed():
  def labels(seed):
    return _arrays(datasets.load_split(
        _data(label_noise_prob=0.3, seed=seed), True))[1]
  np.testing.assert_array_equal(labels(7), labels(7))
  assert np.any(labels(7) != labels(8))


def test_label_noise_only_in_training():
  clean = _arrays(datasets.load_split(_data(), False))[1]
  noisy = _arrays(datasets.load_split(_data(label_noise_prob=1.0), False))[1]
  np.testing.assert_array_equal(clean, noisy)


def test_label_noise_does_not_depend_on_sharding():
  config = _data(label_noise_prob=0.5, seed=3)
  whole = _arrays(datasets.load_split(config, True))[1]
  shards = [_arrays(datasets.load_split(config, True, _ctx(3, i)))[1]
            for i in range(3)]
  np.testing.assert_array_equal(np.concatenate(shards), whole)


# -----------------------------------------------------------------------------
# Sharding.


@pytest.mark.parametrize('num_examples,num_shards', [(10, 3), (7, 7), (1437, 2)])
def test_shard_bounds_cover_disjointly(num_examples, num_shards):
  bounds = [datasets.shard_bounds(num_examples, num_shards, i)
            for i in range(num_shards)]
  assert bounds[0][0] == 0 and bounds[-1][1] == num_examples
  for (_, end), (start, _) in zip(bounds, bounds[1:]):
    assert end == start
  sizes = [e - s for s, e in bounds]
  assert max(sizes) - min(sizes) <= 1


def test_two_pipelines_get_disjoint_shards_covering_the_data():
  config = _data(num_images=301)
  whole_images, whole_labels = _arrays(datasets.load_split(config, True))
  parts = [_arrays(datasets.load_split(config, True, _ctx(2, i)))
           for i in range(2)]
  assert [len(p[1]) for p in parts] == [150, 151]
  np.testing.assert_array_equal(
      np.concatenate([p[0] for p in parts]), whole_images)
  np.testing.assert_array_equal(
      np.concatenate([p[1] for p in parts]), whole_labels)


def test_shard_per_host_false_reads_everything_in_training():
  config = _data(num_images=50, shard_per_host=False)
  for i in range(2):
    assert len(_arrays(datasets.load_split(config, True, _ctx(2, i)))[1]) == 50
  # Eval is always sharded: each example is scored once over all hosts.
  sizes = [len(_arrays(datasets.load_split(config, False, _ctx(2, i)))[1])
           for i in range(2)]
  assert sizes == [180, 180]


def test_empty_training_shard_raises():
  with pytest.raises(datasets.DatasetError, match='empty'):
    datasets.load_split(_data(num_images=1), True, _ctx(2, 0))


# -----------------------------------------------------------------------------
# tfds datasets (prepared on disk, no network).


def test_any_tfds_dataset_by_name(tmp_path):
  data_testing.write_tfds_dataset(
      str(tmp_path), 'supcon_tiny_grey', {'train': 23, 'validation': 9},
      image_shape=(6, 5, 1), num_classes=4)
  config = _data(dataset='supcon_tiny_grey', data_dir=str(tmp_path))
  info = datasets.get_dataset_info(config)
  assert info.num_classes == 4
  assert (info.num_train_examples, info.num_eval_examples) == (23, 9)
  assert info.image_shape == (6, 5, 3)  # Grey is served as RGB.
  assert (info.train_split, info.eval_split) == ('train', 'validation')
  assert not info.has_whitening
  ds = datasets.load_split(config, True)
  assert ds.element_spec == (tf.TensorSpec([6, 5, 3], tf.uint8),
                             tf.TensorSpec([], tf.int32))
  images, labels = _arrays(ds)
  assert [data_testing.image_index(x) for x in images] == list(range(23))
  np.testing.assert_array_equal(labels, np.arange(23) % 4)
  assert len(_arrays(datasets.load_split(config, False))[1]) == 9


def test_tfds_cap_and_sharding(tmp_path):
  data_testing.write_tfds_dataset(str(tmp_path), 'supcon_tiny',
                                  {'train': 30, 'test': 10})
  config = _data(dataset='supcon_tiny', data_dir=str(tmp_path), num_images=21)
  assert datasets.get_dataset_info(config).num_train_examples == 21
  seen = []
  for i in range(2):
    images, _ = _arrays(datasets.load_split(config, True, _ctx(2, i)))
    seen.append([data_testing.image_index(x) for x in images])
  assert seen == [list(range(0, 10)), list(range(10, 21))]


def test_cifar10_prepared_on_disk(tmp_path):
  data_testing.write_fake_cifar10(str(tmp_path), num_train=20, num_test=6)
  config = _data(dataset='cifar10', data_dir=str(tmp_path))
  info = datasets.get_dataset_info(config)
  assert info.num_classes == 10
  assert (info.num_train_examples, info.num_eval_examples) == (20, 6)
  assert info.image_shape == (32, 32, 3)
  # The reference's [-1, 1] constants, expressed for [0, 1] images.
  np.testing.assert_allclose(info.whitening_mean, (0.4914, 0.4822, 0.4465),
                             atol=1e-6)
  np.testing.assert_allclose(info.whitening_std, (0.2023, 0.1994, 0.2010),
                             atol=1e-6)
  images, labels = _arrays(datasets.load_split(config, False))
  assert images.shape == (6, 32, 32, 3) and images.dtype == np.uint8
  assert labels.dtype == np.int32


def test_cifar10_under_tfds_mock_data(tmp_path):
  # tfds's mock generates random examples instead of reading the files; the
  # split sizes come from the metadata written here (the pip package of tfds
  # ships no metadata, and without it the mocked splits are empty).
  data_testing.write_fake_cifar10(str(tmp_path), num_train=50, num_test=20)
  config = _data(dataset='cifar10', data_dir=str(tmp_path))
  with tfds.testing.mock_data(num_examples=6, data_dir=str(tmp_path)):
    info = datasets.get_dataset_info(config)
    assert (info.num_classes, info.num_train_examples) == (10, 50)
    images, labels = _arrays(datasets.load_split(config, True))
  assert images.shape == (6, 32, 32, 3) and images.dtype == np.uint8
  assert labels.dtype == np.int32 and labels.max() < 10


def test_cifar100_whitening_constants():
  assert datasets.WHITENING['cifar100'][0] == (0.5071, 0.4865, 0.4409)
  # Versions and configs do not change the constants.
  assert datasets.base_name('cifar10:3.0.2') == 'cifar10'
  assert datasets.base_name('imagenet2012_subset/10pct') == (
      'imagenet2012_subset')
  assert 'imagenet2012' not in datasets.WHITENING  # As the reference.


def test_not_an_image_classification_dataset(tmp_path):
  features = tfds.features.FeaturesDict({
      'image': tfds.features.Image(shape=(4, 4, 3)),
      'target': tfds.features.Scalar(dtype=np.float32),
  })
  data_testing.write_tfds_dataset(
      str(tmp_path), 'supcon_regression', {'train': 3, 'test': 2},
      features=features, supervised_keys=('image', 'target'),
      example_fn=lambda i: {'image': np.zeros((4, 4, 3), np.uint8),
                            'target': float(i)})
  with pytest.raises(datasets.DatasetError, match='not an image classif'):
    datasets.get_dataset_info(
        _data(dataset='supcon_regression', data_dir=str(tmp_path)))


# -----------------------------------------------------------------------------
# Missing datasets fail fast and say what to do.


def _raises_quickly(config, *patterns):
  start = time.monotonic()
  with pytest.raises(datasets.DatasetError) as e:
    datasets.load_split(config, True)
  assert time.monotonic() - start < 20
  for pattern in patterns:
    assert pattern in str(e.value), str(e.value)
  return str(e.value)


def test_unprepared_tfds_dataset(tmp_path):
  _raises_quickly(_data(dataset='cifar10', data_dir=str(tmp_path),
                        download=False),
                  'not prepared', 'tfds build cifar10', str(tmp_path),
                  'digits', '--nodownload')


def test_unprepared_imagenet_explains_manual_download(tmp_path):
  _raises_quickly(_data(dataset='imagenet2012', data_dir=str(tmp_path)),
                  'manual download', 'ILSVRC2012_img_train.tar',
                  'downloads/manual')


def test_unknown_dataset(tmp_path):
  _raises_quickly(_data(dataset='no_such_dataset_xyz', data_dir=str(tmp_path)),
                  'Unknown dataset')
  message = _raises_quickly(_data(dataset='cifar_10', data_dir=str(tmp_path)),
                            'Unknown dataset')
  assert "'cifar10'" in message  # Did you mean.


def test_other_version_prepared_is_listed(tmp_path):
  data_testing.write_fake_cifar10(str(tmp_path), num_train=2, num_test=2)
  version = str(tfds.builder('cifar10', data_dir=str(tmp_path)).version)
  tf.io.gfile.rename(str(tmp_path / 'cifar10' / version),
                     str(tmp_path / 'cifar10' / '9.9.9'))
  message = _raises_quickly(_data(dataset='cifar10', data_dir=str(tmp_path),
                                  download=False), 'not prepared')
  assert 'cifar10/9.9.9' in message
