"""Tests of the stage-1 embedding monitor and the progress line."""

import json

import numpy as np
import tensorflow as tf

from supcon_tf import enums
from supcon_tf import modes
from supcon_tf.data import datasets
from supcon_tf.evaluation import embedding_stats
from supcon_tf.evaluation import monitor as monitor_lib
from supcon_tf.evaluation import plots
from supcon_tf.evaluation import runner
from supcon_tf.training import checkpoints
from supcon_tf.training import trainer
from tests import analysis_testing
from tests.train_test import tiny_config


def test_monitor_knn_equals_eval_knn_on_the_same_subset(tmp_path):
  model_dir = analysis_testing.copy_trained(tmp_path / 'run')
  config = tiny_config(model_dir, analysis__knn_k=(5, 20),
                       analysis__monitor_bank_size=200,
                       analysis__monitor_query_size=64)
  info = datasets.get_dataset_info(config.data)
  model = checkpoints.load_model_for_inference(config, info)
  monitor = monitor_lib.EmbeddingMonitor(config, analysis_testing.ONE_DEVICE)
  scalars = monitor(model, 7)
  # eval_knn with the train split cut to the bank and one 64-image batch of
  # queries sees the same images, in the same preprocessing.
  knn_results = analysis_testing.run_mode(
      config.replace(data__num_images=200, runtime__max_eval_steps=1),
      enums.Mode.EVAL_KNN)
  assert knn_results['knn_num_bank_examples'] == 200
  for k in (5, 20):
    assert scalars[f'knn_top_1_accuracy@{k}'] == (
        knn_results[f'knn_top_1_accuracy@{k}'])
  # The collapse indicators are embedding_stats of the 64 query embeddings.
  queries = monitor.embed(model, False, 64)
  assert queries[runner.LABELS].shape == (64,)
  want = embedding_stats.embedding_stats(
      queries['normalized_embedding'], queries[runner.LABELS])
  for name in monitor_lib.STATS:
    np.testing.assert_allclose(scalars[name], want[name], rtol=1e-6)
  saved = json.loads((tmp_path / 'run' / 'eval_results.json').read_text())
  assert saved['monitor_step'] == 7 and saved['monitor_num_examples'] == 64
  assert saved['monitor_knn_top_1_accuracy@5'] == scalars[
      'knn_top_1_accuracy@5']
  assert saved['knn_top_1_accuracy@5'] == scalars['knn_top_1_accuracy@5']


def test_monitor_runs_at_epoch_boundaries_and_line_shows_trained_terms(
    tmp_path, capsys):
  # 64 images / batch 16 = 4 steps per epoch; 2.5 epochs = 10 steps; the
  # monitor every epoch ends the chunks of 3 steps at 4 and 8, and runs at
  # the last step (10).
  config = tiny_config(
      tmp_path, data__num_images=64, stage_1__epochs=2.5,
      runtime__max_train_steps=0, runtime__steps_per_loop=3,
      runtime__summary_interval_steps=100, runtime__save_interval_steps=100,
      analysis__monitor_every_epochs=1.0, analysis__monitor_bank_size=64,
      analysis__monitor_query_size=32, analysis__knn_k=(20,))
  modes.run_pretrain(config.replace(runtime__mode='pretrain'),
                     analysis_testing.ONE_DEVICE)
  out = capsys.readouterr().out
  scalars = plots.read_scalars(str(tmp_path / 'logs' / 'pretrain'))
  steps, values = scalars['monitor/knn_top_1_accuracy@20']
  assert list(steps) == [4, 8, 10]
  assert np.all((0 <= values) & (values <= 1))
  for name in monitor_lib.STATS:
    assert list(scalars[f'monitor/{name}'][0]) == [4, 8, 10]
  assert list(scalars['contrastive_loss'][0]) == [10]
  assert out.count('monitor: knn_top_1_accuracy@20=') == 3
  assert 'epoch 1.0 monitor' in out and 'epoch 2.5 monitor' in out
  assert "[pretrain] monitor: " in out and "of the stage's" in out
  progress = [l for l in out.splitlines() if l.startswith('[pretrain] 10/10')]
  assert progress and 'contrastive_loss=' in progress[0]
  assert 'knn_top_1_accuracy@20=' in progress[0]
  # The untrained head's terms: in TensorBoard, not on the line.
  assert 'top_1_accuracy=' not in progress[0].replace('knn_top_1', '')
  assert 'cross_entropy_loss=' not in progress[0]
  assert 'top_1_accuracy' in scalars and 'cross_entropy_loss' in scalars
  # The classifier stage (and the CE baseline) trains the head: shown.
  stage_2 = trainer.Trainer(config, analysis_testing.ONE_DEVICE, 2)
  metrics = {'cross_entropy_loss': 1.0, 'top_1_accuracy': 0.5, 'loss': 1.0}
  assert stage_2.progress_metrics(metrics) == metrics
  # No monitor in stage 2: never.
  assert stage_2.next_monitor_step(0) == stage_2.plan.total_steps + 1


def test_next_monitor_step_with_fractional_epochs(tmp_path):
  # 1437 / 16 = 89.8 steps per epoch; every 0.5 epoch = 44.9 steps.
  config = tiny_config(tmp_path, stage_1__epochs=2, runtime__max_train_steps=0,
                       analysis__monitor_every_epochs=0.5)
  stage = trainer.Trainer(config, tf.distribute.get_strategy(), 1,
                          monitor=lambda model, step: {})
  assert stage.plan.total_steps == 179
  got, step = [], 0
  while step < stage.plan.total_steps:
    step = stage.next_monitor_step(step)
    got.append(step)
  assert got == [45, 90, 135, 179]
