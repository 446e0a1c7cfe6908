"""Tests of supcon_tf.corruptions: the mCE arithmetic and the mode."""

import json

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from supcon_tf import config as config_lib
from supcon_tf import enums
from supcon_tf import models
from supcon_tf.data import datasets
from supcon_tf.data import pipeline
from supcon_tf.evaluation import corruptions
from supcon_tf.training import checkpoints
from tests import analysis_testing
from tests import data_testing
from tests.testing import tiny_config


@pytest.fixture(autouse=True)
def _fresh_builders():
  datasets.tfds_source.cache_clear()  # pylint: disable=protected-access
  yield
  datasets.tfds_source.cache_clear()  # pylint: disable=protected-access


def test_imagenet_mce_hand_computed():
  errors = {'gaussian_noise': {1: 0.5, 3: 0.7}, 'fog': {1: 0.2, 3: 0.4}}
  summary = corruptions.corruption_summary(
      errors, clean_error=0.1, alexnet_errors=corruptions.ALEXNET_ERRORS)
  assert summary['mean_error'] == pytest.approx(
      {'gaussian_noise': 0.6, 'fog': 0.3})
  assert summary['mean_corruption_error'] == pytest.approx(0.45)
  # CE_c = mean_s E / AlexNet_c: 0.6 / 0.886428 and 0.3 / 0.819324.
  assert summary['corruption_error']['gaussian_noise'] == pytest.approx(
      0.676874, abs=1e-6)
  assert summary['corruption_error']['fog'] == pytest.approx(0.366156,
                                                             abs=1e-6)
  assert summary['mCE'] == pytest.approx((0.676874 + 0.366156) / 2, abs=1e-6)
  # Relative: (0.6 - 0.1) / (0.886428 - 0.43478) and
  # (0.3 - 0.1) / (0.819324 - 0.43478).
  assert summary['relative_corruption_error']['gaussian_noise'] == (
      pytest.approx(1.107057, abs=1e-6))
  assert summary['relative_corruption_error']['fog'] == pytest.approx(
      0.520096, abs=1e-6)
  assert summary['relative_mCE'] == pytest.approx((1.107057 + 0.520096) / 2,
                                                  abs=1e-6)


def test_alexnet_itself_scores_100():
  errors = {c: {s: corruptions.ALEXNET_ERRORS[c] for s in range(1, 6)}
            for c in corruptions.CORRUPTIONS}
  summary = corruptions.corruption_summary(
      errors, corruptions.ALEXNET_CLEAN_ERROR, corruptions.ALEXNET_ERRORS)
  assert summary['mCE'] == pytest.approx(1.0)
  assert summary['relative_mCE'] == pytest.approx(1.0)
  assert len(corruptions.ALEXNET_ERRORS) == 15
  assert set(corruptions.ALEXNET_ERRORS) == set(corruptions.CORRUPTIONS)


def test_cifar_summary_is_unnormalised_and_extras_skip_ce():
  errors = {'fog': {1: 0.1, 2: 0.3}, 'spatter': {1: 0.5}}
  summary = corruptions.corruption_summary(errors, clean_error=0.05)
  assert set(summary) == {'mean_error', 'mean_corruption_error'}
  assert summary['mean_error'] == pytest.approx({'fog': 0.2, 'spatter': 0.5})
  assert summary['mean_corruption_error'] == pytest.approx(0.35)
  # Held-out corruptions have no AlexNet error: not part of (relative) mCE.
  summary = corruptions.corruption_summary(errors, 0.05,
                                           corruptions.ALEXNET_ERRORS)
  assert set(summary['corruption_error']) == {'fog'}
  assert summary['mCE'] == pytest.approx(0.2 / 0.819324)


def test_every_corruption_is_a_tfds_config():
  for dataset in ('cifar10_corrupted', 'imagenet2012_corrupted'):
    builder_cls = tfds.builder_cls(dataset)
    configs = {c.name for c in builder_cls.BUILDER_CONFIGS}
    for c in corruptions.CORRUPTIONS + corruptions.EXTRA_CORRUPTIONS:
      for s in corruptions.SEVERITIES:
        name = corruptions.tfds_config_name(dataset, c, s)
        assert name.split('/', 1)[1] in configs, name
  assert corruptions.tfds_config_name('cifar10_corrupted', 'glass_blur',
                                      2) == (
                                          'cifar10_corrupted/'
                                          'frosted_glass_blur_2')


def test_bad_settings_fail_clearly(tmp_path):
  config = tiny_config(tmp_path, data__data_dir=str(tmp_path))
  with pytest.raises(corruptions.CorruptionError, match='corruption_dataset'):
    analysis_testing.run_mode(config, enums.Mode.EVAL_CORRUPTIONS)
  # Unknown names fail when the config is built (issue 17), naming the flag.
  with pytest.raises(config_lib.ConfigError, match='--corruptions: unknown'):
    config.replace(analysis__corruption_dataset='cifar10_corrupted',
                   analysis__corruptions=('fgo',))


def test_missing_data_says_how_to_prepare(tmp_path):
  config = tiny_config(tmp_path, data__data_dir=str(tmp_path / 'tfds'),
                       analysis__corruption_dataset='cifar10_corrupted',
                       analysis__corruptions=('fog',),
                       analysis__severities=(1, 3))
  with pytest.raises(datasets.DatasetError) as e:
    analysis_testing.run_mode(config, enums.Mode.EVAL_CORRUPTIONS)
  message = str(e.value)
  assert 'cifar10_corrupted/fog_1, cifar10_corrupted/fog_3' in message
  assert 'tfds build cifar10_corrupted/fog_1 cifar10_corrupted/fog_3' in (
      message)


# Each fake corrupted set: a constant grey image (all examples alike, so the
# model predicts one class p for the whole set) and the number of examples
# labelled p; the others get label p + 1, so the error is known.
_SETS = {('gaussian_noise', 1): (30, 12), ('gaussian_noise', 3): (200, 6),
         ('fog', 1): (120, 3), ('fog', 3): (77, 0)}
_NUM = 12


def test_eval_corruptions_on_fake_cifar10_c(tmp_path, capsys):
  model_dir = analysis_testing.copy_trained(tmp_path / 'run')
  data_dir = str(tmp_path / 'tfds')
  config = tiny_config(
      model_dir, data__data_dir=data_dir,
      analysis__corruption_dataset='cifar10_corrupted',
      analysis__corruptions=('gaussian_noise', 'fog'),
      analysis__severities=(3, 1))
  info = datasets.get_dataset_info(config.data)
  model = checkpoints.load_model_for_inference(config, info)
  want = {}
  for (corruption, severity), (grey, num_right) in _SETS.items():
    image = np.full([32, 32, 3], grey, np.uint8)
    view = pipeline.eval_view(tf.constant(image), config.augment)
    logits = model(view[None], training=False)[models.LOGITS]
    p = int(np.argmax(logits.numpy()[0]))

    def example(i, image=image, p=p, num_right=num_right):
      return {'image': image, 'label': p if i < num_right else (p + 1) % 10}

    data_testing.write_fake_corrupted(
        data_dir, 'cifar10_corrupted', f'{corruption}_{severity}',
        num_examples=_NUM, example_fn=example)
    want.setdefault(corruption, {})[str(severity)] = 1 - num_right / _NUM

  results = analysis_testing.run_mode(config, enums.Mode.EVAL_CORRUPTIONS)
  assert set(results['errors']) == set(want)
  for corruption, by_severity in want.items():
    assert results['errors'][corruption] == pytest.approx(by_severity)
  assert results['mean_error'] == pytest.approx(
      {'gaussian_noise': 0.25, 'fog': 0.875})
  assert results['mean_corruption_error'] == pytest.approx(0.5625)
  assert results['severities'] == [1, 3]
  assert results['num_examples']['cifar10_corrupted/fog_3'] == _NUM
  assert not results['complete']
  assert 'mCE' not in results  # CIFAR-10-C: unnormalised only.
  assert 0.0 <= results['clean_error'] <= 1.0
  assert results['clean_num_examples'] == 64  # max_eval_steps=1 batch.
  saved = json.loads((tmp_path / 'run' / 'corruption_results.json')
                     .read_text())
  assert saved['mean_corruption_error'] == pytest.approx(0.5625)
  out = capsys.readouterr().out
  assert 'corruption' in out and 'gaussian_noise' in out
  assert '87.50' in out and '56.25' in out  # fog mean; overall mean.


def test_imagenet_c_reports_mce(tmp_path):
  """ImageNet-C path: pre-cropped 224 px images, CE and relative mCE."""
  data_dir = str(tmp_path / 'tfds')
  clean = tfds.builder('imagenet2012', data_dir=data_dir)
  data_testing.write_tfds_dataset(
      data_dir, 'imagenet2012', {'train': 4, 'validation': 6},
      version=str(clean.version), image_shape=(40, 30, 3),
      num_classes=1000, features=clean.info.features)
  for severity in (2, 5):
    data_testing.write_fake_corrupted(
        data_dir, 'imagenet2012_corrupted', f'contrast_{severity}',
        num_examples=5)
  config = tiny_config(tmp_path / 'run', data__dataset='imagenet2012',
                       data__data_dir=data_dir, data__eval_batch_size=4,
                       runtime__max_eval_steps=0,  # Whole splits.
                       analysis__corruptions=('contrast',),
                       analysis__severities=(2, 5))
  info = datasets.get_dataset_info(config.data)
  assert info.num_classes == 1000 and info.eval_split == 'validation'
  model = models.build_model(config.model, info.num_classes)
  results = corruptions.evaluate_corruptions(
      config, analysis_testing.ONE_DEVICE, model=model)
  assert results['dataset'] == 'imagenet2012_corrupted'
  assert results['num_examples'] == {'imagenet2012_corrupted/contrast_2': 5,
                                     'imagenet2012_corrupted/contrast_5': 5}
  assert results['clean_num_examples'] == 6
  mean = results['mean_error']['contrast']
  assert results['corruption_error']['contrast'] == pytest.approx(
      mean / 0.853204)
  assert results['mCE'] == pytest.approx(mean / 0.853204)
  assert results['relative_mCE'] == pytest.approx(
      (mean - results['clean_error']) / (0.853204 - 0.43478))
  assert not results['complete']
