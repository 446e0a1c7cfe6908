"""End-to-end tests of the training loop, eval, export and the mode handlers.

Tiny everything (ResNet-18 at width 0.25 on 16 px digits, 2 steps), so each
test costs a few seconds of tracing; they run the real code path.
"""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from supcon_tf import config as config_lib
from supcon_tf import enums
from supcon_tf import models
from supcon_tf.data import datasets
from supcon_tf.training import checkpoints
from supcon_tf.training import trainer as train
from tests import data_testing
from tests import testing
from tests.conftest import mirrored_strategy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The fixtures live in tests/testing.py; these names stay importable from here.
ONE_DEVICE = testing.ONE_DEVICE
tiny_config = testing.tiny_config
free_ports = testing.free_ports
_mode = testing.run_mode
_uint8_images = testing.uint8_images


def test_train_then_eval_writes_everything(tmp_path):
  config = tiny_config(tmp_path)
  results = _mode(config, enums.Mode.TRAIN_THEN_EVAL)
  assert 0.0 <= results['top_1_accuracy'] <= results['top_5_accuracy'] <= 1.0
  assert results['num_examples'] == 64  # One eval batch (max_eval_steps).
  saved = json.loads((tmp_path / 'eval_results.json').read_text())
  assert saved['top_1_accuracy'] == results['top_1_accuracy']
  assert checkpoints.latest_in(str(tmp_path / 'pretrain')).endswith('ckpt-2')
  assert checkpoints.latest_in(str(tmp_path / 'classifier')).endswith('ckpt-2')
  assert config_lib.ExperimentConfig.from_json(
      (tmp_path / 'config.json').read_text()).data.dataset == 'digits'
  assert tf.io.gfile.glob(str(tmp_path / 'logs' / 'pretrain' / 'events.*'))
  assert tf.io.gfile.glob(str(tmp_path / 'logs' / 'eval' / 'events.*'))
  assert (tmp_path / 'export' / 'saved_model.pb').exists()

  # The SavedModel, reloaded in a fresh process, gives the model's outputs.
  info = train.datasets.get_dataset_info(config.data)
  model = checkpoints.load_model_for_inference(config, info)
  images = _uint8_images()
  from supcon_tf import export  # pylint: disable=g-import-not-at-top
  want = export.serving_fn(model, config, info)(tf.constant(images))
  np.save(tmp_path / 'images.npy', images)
  code = (
      'import json, sys, numpy as np, tensorflow as tf\n'
      f'm = tf.saved_model.load({str(tmp_path / "export")!r})\n'
      'f = m.signatures["serving_default"]\n'
      f'x = np.load({str(tmp_path / "images.npy")!r})\n'
      'out = f(images=tf.constant(x))\n'
      'print(json.dumps({k: (v.numpy().astype(str) if v.dtype == tf.string\n'
      '                      else v.numpy()).tolist() for k, v in out.items()}))\n')
  proc = subprocess.run([sys.executable, '-c', code], capture_output=True,
                        text=True, timeout=300,
                        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3'))
  assert proc.returncode == 0, proc.stderr[-2000:]
  got = json.loads(proc.stdout.strip().splitlines()[-1])
  assert set(got) == {'logits', 'probabilities', 'embedding',
                      'unnormalized_embedding', 'projection', 'class_index',
                      'class_name'}
  assert got['class_name'] == [str(i) for i in got['class_index']]
  for key in set(got) - {'class_name'}:
    np.testing.assert_allclose(got[key], want[key].numpy(), rtol=1e-4,
                               atol=1e-5)
  np.testing.assert_allclose(np.sum(got['probabilities'], axis=-1), 1.0,
                             rtol=1e-5)


def test_modes_one_by_one_and_resume(tmp_path, capsys):
  config = tiny_config(tmp_path)
  _mode(config, enums.Mode.PRETRAIN)
  assert checkpoints.latest_in(str(tmp_path / 'pretrain')).endswith('ckpt-2')
  # Resume: a longer run continues at the saved step instead of restarting.
  _mode(config.replace(runtime__max_train_steps=4), enums.Mode.PRETRAIN)
  out = capsys.readouterr().out
  assert 'resuming from' in out and 'at step 2' in out
  assert checkpoints.latest_in(str(tmp_path / 'pretrain')).endswith('ckpt-4')
  # A finished stage is not trained again.
  _mode(config.replace(runtime__max_train_steps=4), enums.Mode.PRETRAIN)
  assert 'already complete' in capsys.readouterr().out

  _mode(config, enums.Mode.CLASSIFIER)
  # Stage 2 really starts from the pretrained encoder...
  info = train.datasets.get_dataset_info(config.data)
  pre = models.build_experiment_model(config, info.num_classes)
  checkpoints.restore_parts(pre, checkpoints.latest_in(
      str(tmp_path / 'pretrain')), True, True, False)
  post = checkpoints.load_model_for_inference(config, info)
  for a, b in zip(pre.encoder.trainable_variables,
                  post.encoder.trainable_variables):
    # ...and leaves it alone (stop-gradient before the classifier).
    np.testing.assert_array_equal(a.numpy(), b.numpy())
  classifier_moved = any(
      not np.array_equal(a.numpy(), b.numpy()) for a, b in zip(
          pre.classification_head.trainable_variables,
          post.classification_head.trainable_variables))
  assert classifier_moved

  results = _mode(config, enums.Mode.EVAL)
  assert 'top_1_accuracy' in results
  export_dir = _mode(config.replace(runtime__export_dir=str(tmp_path / 'sm')),
                     enums.Mode.EXPORT)
  assert (tmp_path / 'sm' / 'saved_model.pb').exists() and export_dir


def test_classifier_without_pretrained_encoder_fails_clearly(tmp_path):
  with pytest.raises(train.TrainingError, match='pretrained encoder'):
    _mode(tiny_config(tmp_path), enums.Mode.CLASSIFIER)


def test_eval_without_checkpoint_fails_clearly(tmp_path):
  with pytest.raises(checkpoints.CheckpointError, match='No checkpoint'):
    _mode(tiny_config(tmp_path), enums.Mode.EVAL)


def test_batch_larger_than_dataset_fails_clearly(tmp_path):
  config = tiny_config(tmp_path, data__num_images=10)
  with pytest.raises(train.TrainingError, match='--batch_size=16'):
    _mode(config, enums.Mode.PRETRAIN)


def test_cross_entropy_baseline_and_simclr(tmp_path):
  # Cross-entropy baseline: stage 1 trains encoder + classifier with CE only.
  ce = tiny_config(
      tmp_path / 'ce', stage_1__contrastive_loss_weight=0.0,
      stage_1__cross_entropy_loss_weight=1.0, stage_2__epochs=0,
      model__stop_gradient_before_classification_head=False)
  _mode(ce, enums.Mode.TRAIN)
  assert not (tmp_path / 'ce' / 'classifier').exists()
  assert 'top_1_accuracy' in _mode(ce, enums.Mode.EVAL)
  # SimCLR: no labels in the contrastive loss; weight decay and LARS path.
  simclr = tiny_config(tmp_path / 'simclr', loss__use_labels=False,
                       stage_1__optimizer=enums.Optimizer.LARS,
                       stage_1__weight_decay=1e-4, stage_2__epochs=0)
  metrics = _mode(simclr, enums.Mode.PRETRAIN)
  assert np.isfinite(metrics['contrastive_loss'])


def test_rmsprop_weight_decay_and_deferred_blur(tmp_path):
  config = tiny_config(
      tmp_path, stage_1__optimizer=enums.Optimizer.RMSPROP,
      stage_1__weight_decay=1e-3, augment__blur_probability=0.5,
      augment__defer_blurring=True, stage_2__epochs=0)
  metrics = _mode(config, enums.Mode.PRETRAIN)
  assert metrics['weight_decay_loss'] > 0
  assert np.isfinite(metrics['loss'])


def test_show_augmentations(tmp_path):
  path = _mode(tiny_config(tmp_path), enums.Mode.SHOW_AUGMENTATIONS)
  image = tf.io.decode_png(tf.io.read_file(path))
  assert image.shape[-1] in (3, 4) and image.shape[0] > 16


def test_warm_start_parts_from_reference_ckpt(tmp_path):
  source = tiny_config(tmp_path / 'src', stage_2__epochs=0)
  _mode(source, enums.Mode.PRETRAIN)
  target = tiny_config(
      tmp_path / 'dst', warm_start__reference_ckpt=str(tmp_path / 'src'),
      warm_start__warm_start_encoder=True, runtime__max_train_steps=1,
      stage_1__base_learning_rate=0.0)
  trainer = train.Trainer(target, ONE_DEVICE, 1)
  trainer.restore_or_initialize()
  info = train.datasets.get_dataset_info(source.data)
  src_model = checkpoints.load_model_for_inference(source, info)
  for a, b in zip(src_model.encoder.weights, trainer.model.encoder.weights):
    np.testing.assert_array_equal(a.numpy(), b.numpy())
  # The projection head was not asked for, so it keeps its fresh init.
  assert not np.array_equal(src_model.projection_head.weights[0].numpy(),
                            trainer.model.projection_head.weights[0].numpy())
  assert not trainer.step.bn_training  # Reference: BN in inference when warm.


def test_mock_tfds_dataset_train_then_eval(tmp_path):
  # tfds's mock needs split metadata on disk (see tests/datasets_test.py).
  data_dir = str(tmp_path / 'tfds')
  data_testing.write_fake_cifar10(data_dir, num_train=40, num_test=12)
  config = tiny_config(tmp_path / 'run', data__dataset='cifar10',
                       data__data_dir=data_dir, data__eval_batch_size=8)
  datasets.tfds_source.cache_clear()  # pylint: disable=protected-access
  try:
    with tfds.testing.mock_data(num_examples=32, data_dir=data_dir):
      results = _mode(config, enums.Mode.TRAIN_THEN_EVAL)
  finally:
    datasets.tfds_source.cache_clear()  # pylint: disable=protected-access
  assert results['dataset'] == 'cifar10' and results['num_examples'] == 8


def test_four_replicas_with_global_bn_equal_one_device(tmp_path):
  """One step on 4 logical devices == one step on one device (same batch)."""
  config = tiny_config(
      tmp_path / 'one', runtime__max_train_steps=1,
      augment__augmentation_type=enums.AugmentationType.IDENTITY,
      model__use_global_batch_norm=True, stage_1__base_learning_rate=1.0)
  trainers = {}
  for name, strategy in (('one', ONE_DEVICE), ('four', mirrored_strategy(4))):
    trainers[name] = train.Trainer(
        config.replace(runtime__model_dir=str(tmp_path / name)), strategy, 1)
  one, four = trainers['one'], trainers['four']
  four.model.set_weights(one.model.get_weights())
  before = [w.copy() for w in one.model.get_weights()]
  m_one = one.train()
  m_four = four.train()
  np.testing.assert_allclose(m_four['contrastive_loss'],
                             m_one['contrastive_loss'], rtol=1e-4)
  moved = False
  for a, b, c in zip(one.model.get_weights(), four.model.get_weights(),
                     before):
    np.testing.assert_allclose(b, a, rtol=1e-3, atol=1e-5)
    moved |= not np.allclose(a, c)
  assert moved


def test_multi_worker_two_processes_agree(tmp_path):
  ports = free_ports(2)
  cluster = {'worker': [f'127.0.0.1:{p}' for p in ports]}
  config = tiny_config(tmp_path / 'run', stage_2__epochs=0,
                       runtime__max_train_steps=2)
  (tmp_path / 'config.json').write_text(config.to_json())
  procs = []
  for task in range(2):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3', TF_CONFIG=json.dumps(
        {'cluster': cluster, 'task': {'type': 'worker', 'index': task}}))
    procs.append(subprocess.Popen(
        [sys.executable, os.path.join(ROOT, 'tests', 'workers',
                                      'multi_worker_train.py'),
         str(tmp_path / 'config.json')],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        cwd=ROOT))
  outputs = []
  for p in procs:
    try:
      out, err = p.communicate(timeout=400)
    finally:
      if p.poll() is None:
        p.kill()
    assert p.returncode == 0, err[-3000:]
    outputs.append(json.loads(out.strip().splitlines()[-1]))
  assert outputs[0]['replicas'] == 2
  np.testing.assert_allclose(outputs[0]['checksum'], outputs[1]['checksum'],
                             rtol=1e-6)
  assert outputs[0]['step'] == outputs[1]['step'] == 2
  # Only the chief's checkpoints are kept in model_dir.
  assert checkpoints.latest_in(str(tmp_path / 'run' / 'pretrain'))


def test_use_xla_step_trains_like_the_plain_step(tmp_path):
  # --use_xla jit-compiles the per-replica step; same weights, same data.
  metrics = {}
  for xla in (False, True):
    keras.utils.set_random_seed(0)
    config = tiny_config(tmp_path / f'xla_{xla}', runtime__use_xla=xla)
    metrics[xla] = train.Trainer(config, ONE_DEVICE, 1).train()
  assert set(metrics[True]) == set(metrics[False])
  for key in ('loss', 'contrastive_loss', 'cross_entropy_loss'):
    np.testing.assert_allclose(metrics[True][key], metrics[False][key],
                               rtol=2e-3, err_msg=key)
