"""Tests of supcon_tf.knn (weighted kNN) and `--mode=eval_knn`."""

import json
import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from supcon_tf import enums
from supcon_tf import models
from supcon_tf.evaluation import knn
from supcon_tf.evaluation import plots
from supcon_tf.evaluation import runner as inference
from tests import analysis_testing
from tests.conftest import mirrored_strategy
from tests.testing import tiny_config


def _clusters(num_classes, per_class, dim, noise, seed):
  rng = np.random.RandomState(seed)
  centres = rng.normal(size=[num_classes, dim])
  labels = np.repeat(np.arange(num_classes), per_class)
  points = centres[labels] + noise * rng.normal(size=[len(labels), dim])
  return points.astype(np.float32), labels.astype(np.int32)


def test_separable_clusters_are_classified_perfectly():
  bank, bank_labels = _clusters(5, 40, 16, 0.05, seed=0)
  rng = np.random.RandomState(1)
  order = rng.permutation(len(bank_labels))
  bank, bank_labels = bank[order], bank_labels[order]
  query, query_labels = _clusters(5, 10, 16, 0.05, seed=0)
  query = query + 0.01 * rng.normal(size=query.shape).astype(np.float32)
  # k = 200 is the whole bank: the temperature-weighted vote still wins.
  accuracies = knn.knn_accuracies(query, query_labels, bank, bank_labels, 5,
                                  ks=(1, 20, 200), temperature=0.07,
                                  chunk_size=7)
  assert accuracies == {1: 1.0, 20: 1.0, 200: 1.0}
  np.testing.assert_array_equal(
      knn.knn_predict(query, bank, bank_labels, 5, k=20), query_labels)


# Bank on the unit circle: label 0 at 0 degrees, two label-1 points between,
# label 2 at 90 degrees.
_BANK = np.array([[1.0, 0.0], [0.8, 0.6], [0.6, 0.8], [0.0, 1.0]], np.float32)
_BANK_LABELS = np.array([0, 1, 1, 2], np.int32)
_QUERY = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)


def test_hand_computed_votes():
  e = math.exp
  # Query 0 has cosine 1, .8, .6, 0 with the bank rows; query 1 0, .6, .8, 1.
  cases = {
      # (k, T): expected scores [query, class], up to a factor per query.
      (3, 1.0): [[e(1), e(.8) + e(.6), 0], [0, e(.6) + e(.8), e(1)]],
      (3, 0.1): [[e(10), e(8) + e(6), 0], [0, e(6) + e(8), e(10)]],
      (2, 1.0): [[e(1), e(.8), 0], [0, e(.8), e(1)]],
      (4, 1.0): [[e(1), e(.8) + e(.6), e(0)], [e(0), e(.6) + e(.8), e(1)]],
  }
  predictions = {(3, 1.0): [1, 1], (3, 0.1): [0, 2], (2, 1.0): [0, 2],
                 (4, 1.0): [1, 1]}
  for (k, t), want in cases.items():
    # Scaling the inputs changes nothing: similarities are cosines.
    scores = knn.knn_scores(3.0 * _QUERY, 0.5 * _BANK, _BANK_LABELS, 3, [k],
                            temperature=t)[k]
    want = np.array(want)
    np.testing.assert_allclose(
        scores / scores.sum(-1, keepdims=True),
        want / want.sum(-1, keepdims=True), rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(
        knn.knn_predict(_QUERY, _BANK, _BANK_LABELS, 3, k=k, temperature=t),
        predictions[(k, t)])
  # More neighbours than bank rows: k is clamped to the bank.
  np.testing.assert_array_equal(
      knn.knn_predict(_QUERY, _BANK, _BANK_LABELS, 3, k=50, temperature=1.0),
      [1, 1])


def test_chunked_equals_unchunked():
  rng = np.random.RandomState(3)
  bank = rng.normal(size=[97, 12]).astype(np.float32)
  bank_labels = rng.randint(0, 7, size=[97]).astype(np.int32)
  query = rng.normal(size=[41, 12]).astype(np.float32)
  whole = knn.knn_scores(query, bank, bank_labels, 7, [5, 20], 0.1,
                         chunk_size=0)
  for chunk in (1, 8, 40, 41, 1000):
    chunked = knn.knn_scores(query, bank, bank_labels, 7, [5, 20], 0.1,
                             chunk_size=chunk)
    for k in (5, 20):
      # Matmul blocking differs with the chunk shape: float32 round-off.
      np.testing.assert_allclose(chunked[k], whole[k], rtol=1e-5, atol=1e-6)
      np.testing.assert_array_equal(
          knn.knn_predict(query, bank, bank_labels, 7, k, 0.1, chunk),
          np.argmax(whole[k], axis=-1))


def test_small_temperature_stays_finite():
  rng = np.random.RandomState(4)
  bank = rng.normal(size=[30, 4]).astype(np.float32)
  scores = knn.knn_scores(bank[:5], bank, np.arange(30) % 3, 3, [10],
                          temperature=1e-3)[10]
  assert np.all(np.isfinite(scores)) and np.all(scores.max(-1) > 0)


def test_bad_arguments():
  with pytest.raises(ValueError, match='temperature'):
    knn.knn_predict(_QUERY, _BANK, _BANK_LABELS, 3, k=1, temperature=0.0)
  with pytest.raises(ValueError, match='k must be'):
    knn.knn_predict(_QUERY, _BANK, _BANK_LABELS, 3, k=0)
  with pytest.raises(ValueError, match='empty'):
    knn.knn_predict(_QUERY, _BANK[:0], _BANK_LABELS[:0], 3, k=1)


class TinyEmbedder(keras.Model):
  """Stands in for SupConModel in `inference.predict` (cheap to trace)."""

  def __init__(self):
    super().__init__()
    self.dense = keras.layers.Dense(
        6, kernel_initializer=keras.initializers.RandomNormal(seed=0))

  def call(self, images, training=False):
    flat = tf.reshape(images, [tf.shape(images)[0], -1])
    return {models.NORMALIZED_EMBEDDING:
                tf.math.l2_normalize(self.dense(flat), axis=-1)}


def test_predict_on_two_replicas_equals_one_device():
  # 360 test digits in per-replica batches of 32: the last step is uneven
  # (32 + 8 examples), which strategy.gather must handle.
  config = tiny_config('/tmp/unused', data__eval_batch_size=64)
  outputs = {}
  for name, strategy in (('one', analysis_testing.ONE_DEVICE),
                         ('two', mirrored_strategy(2))):
    with strategy.scope():
      model = TinyEmbedder()
      model(tf.zeros([1, 16, 16, 3]))
    outputs[name] = inference.predict(
        model, strategy, lambda ctx: inference.eval_batches(config, ctx),
        [models.NORMALIZED_EMBEDDING])
  assert outputs['one'][inference.LABELS].shape == (360,)
  for key in outputs['one']:
    np.testing.assert_allclose(outputs['two'][key], outputs['one'][key],
                               rtol=1e-5, atol=1e-6)


def test_eval_knn_mode_merges_results(tmp_path):
  model_dir = analysis_testing.copy_trained(tmp_path / 'run')
  # A linear eval already wrote its results: they must survive.
  (tmp_path / 'run' / 'eval_results.json').write_text(
      json.dumps({'top_1_accuracy': 0.25, 'dataset': 'digits'}))
  config = tiny_config(model_dir, analysis__knn_k=(20, 200),
                       analysis__knn_chunk_size=16)
  results = analysis_testing.run_mode(config, enums.Mode.EVAL_KNN)
  assert results['knn_num_bank_examples'] == 1437  # The whole train split.
  assert results['knn_num_examples'] == 64  # max_eval_steps=1 batch.
  for k in (20, 200):
    assert 0.0 <= results[f'knn_top_1_accuracy@{k}'] <= 1.0
  # Random-ish features of 2 training steps are still far above chance
  # (0.1) on digits with a 20-neighbour vote.
  assert results['knn_top_1_accuracy@20'] > 0.3
  saved = json.loads((tmp_path / 'run' / 'eval_results.json').read_text())
  assert saved['top_1_accuracy'] == 0.25 and saved['dataset'] == 'digits'
  assert saved['knn_top_1_accuracy@20'] == results['knn_top_1_accuracy@20']
  scalars = plots.read_scalars(str(tmp_path / 'run' / 'logs' / 'eval'))
  steps, values = scalars['knn_top_1_accuracy@200']
  assert list(steps) == [2]  # The checkpoint's step.
  np.testing.assert_allclose(values, [results['knn_top_1_accuracy@200']],
                             rtol=1e-6)
