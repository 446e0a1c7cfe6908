"""Tests of supcon_tf.data.pipeline.build_dataset (digits and on-disk tfds)."""

import numpy as np
import pytest
import tensorflow as tf

from supcon_tf import config as config_lib
from supcon_tf import enums
from supcon_tf.data import datasets
from supcon_tf.data import pipeline
from supcon_tf.data import samplers
from tests import conftest
from tests import data_testing

SIZE = 16


@pytest.fixture(autouse=True)
def _fresh_builders():
  datasets.tfds_source.cache_clear()
  yield
  datasets.tfds_source.cache_clear()


def _config(**kwargs) -> config_lib.ExperimentConfig:
  base = dict(data__dataset='digits', data__batch_size=8,
              data__eval_batch_size=7, augment__image_size=SIZE,
              augment__augmentation_type=enums.AugmentationType.SIMCLR,
              augment__blur_probability=0.0)
  base.update(kwargs)
  return config_lib.ExperimentConfig().replace(**base)


def _first(ds):
  images, labels = next(iter(ds))
  return images.numpy(), labels.numpy()


def test_train_batches_shapes_and_dtypes():
  ds = pipeline.build_dataset(_config(), None, training=True)
  # Static shapes, as TPU / XLA need.
  assert ds.element_spec == (
      tf.TensorSpec([8, 2, SIZE, SIZE, 3], tf.float32),
      tf.TensorSpec([8], tf.int32))
  images, labels = _first(ds)
  assert images.min() >= 0.0 and images.max() <= 1.0  # digits: no whitening.
  assert labels.min() >= 0 and labels.max() < 10


def test_views_differ():
  images, _ = _first(pipeline.build_dataset(_config(), None, True))
  diff = np.abs(images[:, 0] - images[:, 1]).mean(axis=(1, 2, 3))
  assert np.all(diff > 1e-3), diff


def test_num_views():
  ds = pipeline.build_dataset(_config(data__num_views=3), None, True)
  assert ds.element_spec[0].shape == [8, 3, SIZE, SIZE, 3]


def test_training_repeats_and_each_epoch_is_a_permutation():
  config = _config(data__num_images=16)
  expected = np.sort(
      [l for _, l in datasets.load_split(config.data, True).as_numpy_iterator()])
  ds = pipeline.build_dataset(config, None, True)
  batches = [labels for _, labels in ds.take(6).as_numpy_iterator()]
  for epoch in range(3):  # 16 images = 2 batches of 8 per epoch.
    labels = np.concatenate(batches[2 * epoch:2 * epoch + 2])
    np.testing.assert_array_equal(np.sort(labels), expected)


def test_seeded_determinism():
  def first(seed):
    return _first(pipeline.build_dataset(_config(data__seed=seed), None, True))
  a, b, c = first(1), first(1), first(2)
  np.testing.assert_array_equal(a[0], b[0])
  np.testing.assert_array_equal(a[1], b[1])
  assert not np.array_equal(a[0], c[0])


def test_eval_keeps_the_remainder_and_crops_to_image_size():
  ds = pipeline.build_dataset(_config(), None, training=False)
  assert ds.element_spec == (
      tf.TensorSpec([None, SIZE, SIZE, 3], tf.float32),
      tf.TensorSpec([None], tf.int32))
  sizes, labels = [], []
  for images, batch_labels in ds.as_numpy_iterator():
    assert images.shape[1:] == (SIZE, SIZE, 3)
    sizes.append(len(batch_labels))
    labels.append(batch_labels)
  assert sum(sizes) == 360 and sizes[-1] == 360 % 7
  clean = [l for _, l in datasets.load_split(_config().data, False)
           .as_numpy_iterator()]
  np.testing.assert_array_equal(np.concatenate(labels), clean)  # No shuffle.
  # Eval is deterministic.
  again = _first(pipeline.build_dataset(_config(), None, training=False))[0]
  np.testing.assert_array_equal(_first(ds)[0], again)


def test_bfloat16_option():
  config = _config(augment__allow_mixed_precision=True)
  for training in (True, False):
    ds = pipeline.build_dataset(config, None, training)
    assert ds.element_spec[0].dtype == tf.bfloat16
    assert ds.element_spec[1].dtype == tf.int32


def test_per_replica_batch_from_input_context():
  ctx = tf.distribute.InputContext(num_input_pipelines=1, input_pipeline_id=0,
                                   num_replicas_in_sync=2)
  ds = pipeline.build_dataset(_config(), ctx, True)
  assert ds.element_spec[0].shape[0] == 4
  eval_ds = pipeline.build_dataset(_config(data__eval_batch_size=8), ctx, False)
  assert _first(eval_ds)[0].shape[0] == 4


def test_sharded_pipelines_see_disjoint_examples(tmp_path):
  # Labels = example index here, so labels identify examples.
  data_testing.write_tfds_dataset(str(tmp_path), 'supcon_tiny',
                                  {'train': 40, 'test': 8}, num_classes=64)
  config = _config(data__dataset='supcon_tiny', data__data_dir=str(tmp_path),
                   data__num_images=32, data__batch_size=16)
  seen = []
  for i in range(2):
    ctx = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=i,
                                     num_replicas_in_sync=2)
    # Per replica 8; 16 examples per shard = 2 batches = one epoch.
    ds = pipeline.build_dataset(config, ctx, True)
    assert ds.element_spec[0].shape == [8, 2, SIZE, SIZE, 3]
    labels = np.concatenate([l for _, l in ds.take(2).as_numpy_iterator()])
    seen.append(set(labels.tolist()))
    assert len(seen[-1]) == 16
  assert not seen[0] & seen[1]
  assert seen[0] | seen[1] == set(range(32))


def test_distribute_datasets_from_function():
  strategy = conftest.mirrored_strategy(2)
  config = _config()
  dist = strategy.distribute_datasets_from_function(
      lambda ctx: pipeline.build_dataset(config, ctx, training=True))
  images, labels = next(iter(dist))
  local = strategy.experimental_local_results(images)
  assert len(local) == 2
  assert local[0].shape == (4, 2, SIZE, SIZE, 3)
  assert strategy.experimental_local_results(labels)[0].shape == (4,)


def test_whitening(tmp_path):
  data_testing.write_fake_cifar10(str(tmp_path), num_train=16, num_test=10)
  kwargs = dict(data__dataset='cifar10', data__data_dir=str(tmp_path),
                augment__eval_crop_method=enums.EvalCropMethod.IDENTITY,
                augment__image_size=32)
  plain = _first(pipeline.build_dataset(
      _config(augment__apply_whitening=False, **kwargs), None, False))[0]
  white = _first(pipeline.build_dataset(
      _config(augment__apply_whitening=True, **kwargs), None, False))[0]
  info = datasets.get_dataset_info(_config(**kwargs).data)
  np.testing.assert_allclose(
      white, (plain - np.array(info.whitening_mean)) /
      np.array(info.whitening_std), rtol=1e-5, atol=1e-5)
  assert plain.min() >= 0 and plain.max() <= 1
  # Train batches are whitened too (and come from the on-disk tfds files).
  train = _first(pipeline.build_dataset(
      _config(augment__apply_whitening=True, **kwargs), None, True))[0]
  assert train.shape == (8, 2, 32, 32, 3)
  assert train.min() < 0


def test_steps_per_epoch():
  info = datasets.get_dataset_info(_config().data)
  assert pipeline.steps_per_epoch(info, 100) == 14  # 1437 // 100.
  assert pipeline.steps_per_epoch(info, 4096) == 1
  with pytest.raises(ValueError):
    pipeline.steps_per_epoch(info, 0)


def test_epochs_run_in_order_and_end_on_an_empty_source():
  source = tf.data.Dataset.range(3)

  def one_epoch(epoch):
    return tf.data.Dataset.range(epoch * 10, epoch * 10 + 2)

  stream = pipeline._epochs(2, one_epoch, source)  # pylint: disable=protected-access
  assert [int(x) for x in stream.take(5)] == [20, 21, 30, 31, 40]
  # No data: the stream ends at once instead of running through
  # _MAX_EPOCHS empty epochs inside one GetNext (a hang, see _epochs).
  empty = pipeline._epochs(0, lambda e: source.take(0), source.take(0))  # pylint: disable=protected-access
  assert list(empty) == []


def _balanced_steps(config, steps, start_step=0, num_pipelines=1,
                    replicas=1):
  """[steps] global (images, labels) of the balanced stream, all pipelines.

  Each pipeline yields per-replica batches; its `replicas / num_pipelines`
  consecutive batches of one step are its slice of that step's global batch.
  """
  per_pipeline = replicas // num_pipelines
  streams = []
  for i in range(num_pipelines):
    ctx = tf.distribute.InputContext(num_input_pipelines=num_pipelines,
                                     input_pipeline_id=i,
                                     num_replicas_in_sync=replicas)
    ds = pipeline.build_dataset(config, ctx, True, start_step=start_step)
    streams.append(list(ds.take(steps * per_pipeline).as_numpy_iterator()))
  out = []
  for s in range(steps):
    parts = [b for stream in streams
             for b in stream[s * per_pipeline:(s + 1) * per_pipeline]]
    out.append((np.concatenate([p[0] for p in parts]),
                np.concatenate([p[1] for p in parts])))
  return out


def test_balanced_batches_through_the_pipeline():
  # 12 images: 4 classes x M = 3 per global batch, on 2 hosts x 2 replicas
  # (3 images per replica), with label noise (the sampler balances the
  # labels the loss sees).
  config = _config(data__batch_size=12, data__samples_per_class=3,
                   data__label_noise_prob=0.3, augment__image_size=8)
  steps = _balanced_steps(config, 4, num_pipelines=2, replicas=4)
  images, labels = pipeline.random_access_split(
      config.data, datasets.get_dataset_info(config.data))
  assert images.shape[0] == 1437
  noisy = labels.numpy()
  clean = datasets._digits_arrays()['train'][1]  # pylint: disable=protected-access
  assert (noisy != clean).any()  # Label noise is applied, as in training.
  for batch_images, batch_labels in steps:
    assert batch_images.shape == (12, 2, 8, 8, 3)
    groups = batch_labels.reshape(4, 3)
    assert (groups == groups[:, :1]).all()  # Exactly M per class...
    assert len(set(groups[:, 0])) == 4  # ...of 4 distinct classes.
  # Steps differ, and equal samplers.balanced_indices of (seed, step).
  assert len({tuple(l) for _, l in steps}) == 4
  for s, (_, batch_labels) in enumerate(steps):
    idx = samplers.balanced_indices(noisy, 12, 3, config.data.seed, s)
    np.testing.assert_array_equal(batch_labels, noisy[idx.numpy()])
  # Resume at step 2: the same images and augmentations as steps 2 and 3.
  resumed = _balanced_steps(config, 2, start_step=2, num_pipelines=2,
                            replicas=4)
  for (a_images, a_labels), (b_images, b_labels) in zip(steps[2:], resumed):
    np.testing.assert_array_equal(a_labels, b_labels)
    np.testing.assert_array_equal(a_images, b_images)
  # The same stream on one host with one replica.
  single = _balanced_steps(config, 2)
  for (a_images, a_labels), (b_images, b_labels) in zip(steps, single):
    np.testing.assert_array_equal(a_labels, b_labels)


def test_balanced_batches_need_enough_classes_and_random_access(
    tmp_path, monkeypatch):
  with pytest.raises(config_lib.ConfigError, match='samples_per_class'):
    # 12 classes per batch, digits has 10.
    pipeline.build_dataset(_config(data__batch_size=24,
                                   data__samples_per_class=2), None, True)
  with pytest.raises(config_lib.ConfigError, match='multiple of'):
    _config(data__batch_size=10, data__samples_per_class=3)
  data_testing.write_tfds_dataset(str(tmp_path), 'supcon_tiny',
                                  {'train': 20, 'test': 4}, num_classes=4)
  big = _config(data__dataset='supcon_tiny', data__data_dir=str(tmp_path),
                data__samples_per_class=2)
  # Small enough: works on tfds data too.
  _, labels = _first(pipeline.build_dataset(big, None, True))
  assert (labels.reshape(4, 2) == labels.reshape(4, 2)[:, :1]).all()
  monkeypatch.setattr(pipeline, '_MAX_CACHE_BYTES', 10)  # "ImageNet".
  with pytest.raises(datasets.DatasetError, match='random access'):
    pipeline.build_dataset(big, None, True)
