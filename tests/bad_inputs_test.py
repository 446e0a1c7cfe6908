"""Bad inputs fail with a message that names the problem.

One case per row of the table in docs/failure_behaviour.md: flags, datasets,
the loss API, the serving signature, TF_CONFIG and model_dir misuse. Cheap
checks first; the few that need a model share it.
"""

import os
import subprocess
import sys

from absl import flags
import numpy as np
import pytest
import tensorflow as tf

from supcon_tf import config as config_lib
from supcon_tf import distribute
from supcon_tf import enums
from supcon_tf import export
from supcon_tf import losses
from supcon_tf import models
from supcon_tf.data import datasets
from supcon_tf.evaluation import classify
from supcon_tf.training import checkpoints
from supcon_tf.training import trainer as train
from tests import data_testing
from tests.testing import ONE_DEVICE
from tests.testing import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _parse(*args) -> config_lib.ExperimentConfig:
  fv = flags.FlagValues()
  config_lib.define_flags(fv)
  fv(['supcon_tf', *args])
  return config_lib.config_from_flags(fv)


# -----------------------------------------------------------------------------
# Flags.


@pytest.mark.parametrize('args, error, pattern', [
    (['--batchsize=32'], flags.UnrecognizedFlagError,
     r"Unknown command line flag 'batchsize'"),
    (['--stage_1_optimizer=sgd'], flags.IllegalFlagValueError,
     r'stage_1_optimizer.*sgd.*rmsprop.*lars'),
    (['--mode=fit'], flags.IllegalFlagValueError,
     r'--mode=fit.*pretrain.*train_then_eval'),
    (['--resnet_depth=17'], config_lib.ConfigError,
     r'--resnet_depth: 17 is not one of \(18, 34, 50, 101, 152, 200\)'),
    (['--batch_size=0'], config_lib.ConfigError, r'--batch_size: must be > 0'),
    (['--temperature=0'], config_lib.ConfigError,
     r'--temperature: must be > 0, got 0.0'),
    (['--crop_area_range=0.5'], config_lib.ConfigError,
     r'--crop_area_range: needs two values'),
    (['--projection_head_layers=128,big'], config_lib.ConfigError,
     r'--projection_head_layers: expected integers'),
    (['--positives_cap=3'], config_lib.ConfigError,
     r'--positives_cap: .*multiple of num_views \(= 2\), got 3'),
    (['--label_noise_prob=1.5'], config_lib.ConfigError,
     r'--label_noise_prob: must be in \[0, 1\]'),
    (['--resnet_depth=abc'], flags.IllegalFlagValueError,
     r'resnet_depth.*abc'),
])
def test_bad_flag_values(args, error, pattern):
  with pytest.raises(error, match=pattern):
    _parse(*args)


def _main(*args, env=None):
  return subprocess.run(
      [sys.executable, '-m', 'supcon_tf.main', *args], capture_output=True,
      text=True, cwd=ROOT, timeout=300,
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3', **(env or {})))


def test_command_line_reports_usage_and_run_errors_without_traceback(
    tmp_path):
  # A bad value: absl's usage error, exit 1, the flag named.
  bad = _main('--resnet_depth=17', '--dry_run')
  assert bad.returncode == 1
  assert '--resnet_depth: 17 is not one of' in bad.stderr
  stray = _main('pretrain')
  assert stray.returncode == 1 and "Unexpected arguments: ['pretrain']" in (
      stray.stderr)
  # A run error: one line, no traceback, exit 1.
  run = _main('--mode=pretrain', '--dataset=digits')
  assert run.returncode == 1, run.stderr[-2000:]
  assert ('error: --model_dir is required for --mode=pretrain' in
          run.stderr)
  assert 'Traceback' not in run.stderr


# -----------------------------------------------------------------------------
# Datasets and the training set-up.


def test_unknown_dataset(tmp_path):
  with pytest.raises(datasets.DatasetError,
                     match=r"Unknown dataset 'cifar_10'.*Did you mean.*cifar10"):
    datasets.get_dataset_info(config_lib.DataConfig(
        dataset='cifar_10', data_dir=str(tmp_path)))


def test_dataset_not_prepared(tmp_path):
  with pytest.raises(datasets.DatasetError,
                     match=r"Dataset 'mnist' .* is not prepared in data_dir"):
    datasets.get_dataset_info(config_lib.DataConfig(
        dataset='mnist', data_dir=str(tmp_path), download=False))


def _digits_info(**overrides):
  return datasets.get_dataset_info(
      dataclasses_replace(config_lib.DataConfig(dataset='digits'), **overrides))


def dataclasses_replace(obj, **changes):
  import dataclasses  # pylint: disable=g-import-not-at-top
  return dataclasses.replace(obj, **changes)


def test_empty_training_split():
  info = dataclasses_replace(_digits_info(), num_train_examples=0)
  with pytest.raises(train.TrainingError,
                     match=r"training split 'train' of digits is empty"):
    train.plan_stage(tiny_config('/x'), info, 1)


def test_num_images_larger_than_the_dataset():
  config = tiny_config('/x', data__num_images=5000)
  with pytest.raises(train.TrainingError,
                     match=r'--num_images=5000 is larger than the training '
                     r'split of digits \(1437 images\)'):
    train.plan_stage(config, datasets.get_dataset_info(config.data), 1)


def test_batch_larger_than_the_dataset():
  config = tiny_config('/x', data__batch_size=2048)
  with pytest.raises(train.TrainingError,
                     match=r'--batch_size=2048 is larger than the training '
                     r'set \(1437 images of digits\)'):
    train.plan_stage(config, datasets.get_dataset_info(config.data), 1)


def test_missing_model_dir():
  config = tiny_config('')
  with pytest.raises(train.TrainingError,
                     match='--model_dir is required for --mode=train_then_eval'):
    train.train_stage(config, ONE_DEVICE, 1)
  with pytest.raises(checkpoints.CheckpointError,
                     match='--model_dir is required for --mode=eval'):
    classify.evaluate(config.replace(runtime__mode=enums.Mode.EVAL), ONE_DEVICE)


def test_eval_and_export_without_checkpoint(tmp_path):
  with pytest.raises(checkpoints.CheckpointError,
                     match=r"No checkpoint in --model_dir=.*: train first"):
    classify.evaluate(tiny_config(tmp_path), ONE_DEVICE)
  with pytest.raises(checkpoints.CheckpointError, match='No checkpoint'):
    export.export_saved_model(tiny_config(tmp_path))


def test_classifier_without_pretrained_encoder(tmp_path):
  with pytest.raises(train.TrainingError,
                     match=r'classifier stage needs a pretrained encoder: run '
                     r'--mode=pretrain'):
    train.train_stage(tiny_config(tmp_path), ONE_DEVICE, 2)


def test_reference_ckpt_that_does_not_exist(tmp_path):
  config = tiny_config(tmp_path / 'run',
                       warm_start__reference_ckpt=str(tmp_path / 'nothing'),
                       warm_start__warm_start_encoder=True)
  with pytest.raises(train.TrainingError,
                     match=r'--reference_ckpt=.*nothing: no checkpoint found'):
    train.train_stage(config, ONE_DEVICE, 1)


def _corrupt_images(directory):
  """Replaces the encoded image of every record under `directory`."""
  for path in tf.io.gfile.glob(os.path.join(directory, '*.tfrecord*')):
    records = []
    for raw in tf.data.TFRecordDataset(path):
      example = tf.train.Example.FromString(raw.numpy())
      example.features.feature['image'].bytes_list.value[0] = b'not an image'
      records.append(example.SerializeToString())
    with tf.io.TFRecordWriter(path) as writer:
      for record in records:
        writer.write(record)


def test_corrupt_image_files(tmp_path):
  data_dir = str(tmp_path / 'tfds')
  variant = data_testing.write_tfds_dataset(
      data_dir, 'broken_images', {'train': 40, 'test': 8},
      image_shape=(8, 8, 3), num_classes=4)
  _corrupt_images(variant)
  config = tiny_config(tmp_path / 'run', data__dataset='broken_images',
                       data__data_dir=data_dir, stage_2__epochs=0,
                       runtime__max_train_steps=1)
  datasets.tfds_source.cache_clear()  # pylint: disable=protected-access
  try:
    with pytest.raises(datasets.DatasetError) as info:
      train.train_stage(config, ONE_DEVICE, 1)
  finally:
    datasets.tfds_source.cache_clear()  # pylint: disable=protected-access
  message = str(info.value)
  assert 'reading the training data of broken_images failed' in message
  assert 'corrupt or truncated image or record file' in message
  assert not checkpoints.latest_in(str(tmp_path / 'run' / 'pretrain'))


@pytest.mark.parametrize('value, pattern', [
    ('{"cluster": ', r'TF_CONFIG is not valid JSON'),
    ('[1, 2]', r'TF_CONFIG must be a JSON object'),
    ('{"cluster": {"worker": "localhost:1"}, "task": {"type": "worker"}}',
     r'"cluster" must map job names to lists of "host:port"'),
    ('{"cluster": {"worker": ["localhost:1", "localhost:2"]}}',
     r'has a "cluster" but no "task"'),
    ('{"cluster": {"worker": ["localhost:1"]}, '
     '"task": {"type": "chief", "index": 0}}',
     r"task type 'chief' is not a job of the cluster \(jobs: \['worker'\]\)"),
    ('{"cluster": {"worker": ["localhost:1", "localhost:2"]}, '
     '"task": {"type": "worker", "index": 2}}',
     r"task index 2 is out of range: job 'worker' has 2 task\(s\)"),
])
def test_bad_tf_config(monkeypatch, value, pattern):
  monkeypatch.setenv('TF_CONFIG', value)
  with pytest.raises(distribute.TFConfigError, match=pattern):
    distribute.build_strategy(enums.StrategyType.AUTO)


def test_model_dir_of_another_experiment(tmp_path):
  checkpoints.write_config(tiny_config(tmp_path))
  with pytest.raises(checkpoints.ConfigMismatchError,
                     match=r'(?s)holds another experiment.*model.depth: 18 in '
                     r'config.json, 34 now.*--override_config'):
    train.train_stage(tiny_config(tmp_path, model__depth=34), ONE_DEVICE, 1)


def test_export_dir_not_empty(tmp_path):
  (tmp_path / 'sm').mkdir()
  (tmp_path / 'sm' / 'keep.txt').write_text('x')
  config = tiny_config(tmp_path / 'run', runtime__export_dir=str(
      tmp_path / 'sm'))
  with pytest.raises(export.ExportError,
                     match=r'--export_dir=.*sm is not empty; pass --overwrite'):
    export.export_saved_model(config)


# -----------------------------------------------------------------------------
# The loss API.


def _features(batch=4, views=2, dim=8):
  return tf.math.l2_normalize(
      tf.random.stateless_normal([batch, views, dim], [1, 2]), axis=-1)


@pytest.mark.parametrize('call, pattern', [
    (lambda: losses.supcon_loss(tf.zeros([4, 8])),
     r'features must have rank >= 3 \[batch, num_views, dim\], got shape '
     r'\(4, 8\)'),
    (lambda: losses.supcon_loss(tf.zeros([4, 2, 8], tf.int32)),
     r'features must be floating point, got .*int32'),
    (lambda: losses.supcon_loss(_features(), tf.constant([0, 1, 0])),
     r'labels batch \(3\) does not match features batch \(4\)'),
    (lambda: losses.supcon_loss(_features(), tf.zeros([4, 2, 2])),
     r'labels must be \[batch\] class ids or \[batch, num_classes\]'),
    (lambda: losses.supcon_loss(_features(), contrast_mode='every_view'),
     r"Unknown LossContrastMode value 'every_view'; allowed: all_views, "
     r'one_view'),
    (lambda: losses.supcon_loss(_features(), denominator_mode='most'),
     r"Unknown LossDenominatorMode value 'most'; allowed: all, one_positive, "
     r'only_negatives'),
    (lambda: losses.supcon_loss(_features(), temperature=0.0),
     r'temperature must be > 0, got 0.0'),
    (lambda: losses.supcon_loss(_features(), positives_cap=3),
     r'positives_cap must be -1 \(no cap\) or a non-negative multiple of '
     r'num_views \(= 2\), got 3'),
    (lambda: losses.SupConLoss(summation_location='middle'),
     r"Unknown LossSummationLocation value 'middle'"),
])
def test_bad_loss_calls(call, pattern):
  with pytest.raises(ValueError, match=pattern):
    call()


# -----------------------------------------------------------------------------
# The serving signature.


@pytest.fixture(scope='module')
def serving(tmp_path_factory):
  """The serving signature of an exported (untrained) tiny model."""
  directory = tmp_path_factory.mktemp('export')
  config = tiny_config(directory / 'run')
  info = datasets.get_dataset_info(config.data)
  model = models.build_experiment_model(config, info.num_classes)
  path = export.export_saved_model(config, model=model,
                                   export_dir=str(directory / 'sm'))
  return tf.saved_model.load(path).signatures[export.SIGNATURE_KEY]


def test_serving_accepts_uint8_images(serving):
  out = serving(images=tf.zeros([2, 11, 13, 3], tf.uint8))
  assert out['logits'].shape == (2, 10)


@pytest.mark.parametrize('images, pattern', [
    (np.zeros([2, 16, 16, 3], np.float32),
     r'expected to be a uint8 tensor but is a float tensor'),
    (np.zeros([2, 16, 16, 1], np.uint8),
     r'images must be uint8 \[batch, height, width, 3\]: wrong number of '
     r'channels \(RGB needs 3\)'),
    (np.zeros([2, 16, 16, 4], np.uint8), r'wrong number of channels'),
    (np.zeros([16, 16, 3], np.uint8),
     r'Shape of tensor images \[16,16,3\] is not compatible with expected '
     r'shape \[\?,\?,\?,3\]'),
])
def test_serving_rejects_wrong_dtype_channels_and_rank(serving, images,
                                                        pattern):
  with pytest.raises(tf.errors.InvalidArgumentError, match=pattern):
    serving(images=tf.constant(images))


def test_serving_rejects_unknown_input_name(serving):
  with pytest.raises(TypeError, match=r"missing a required argument: 'images'"):
    serving(image=tf.zeros([1, 8, 8, 3], tf.uint8))
