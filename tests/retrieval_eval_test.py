"""Tests of `--mode=eval_retrieval` and of modes merging their results."""

import json

import numpy as np

from supcon_tf import enums
from supcon_tf.data import datasets
from supcon_tf.evaluation import plots
from supcon_tf.evaluation import retrieval
from supcon_tf.evaluation import runner
from supcon_tf.training import checkpoints
from tests import analysis_testing
from tests.train_test import tiny_config


def test_eval_then_knn_then_retrieval_keep_every_key(tmp_path):
  model_dir = analysis_testing.copy_trained(tmp_path / 'run')
  config = tiny_config(model_dir, analysis__knn_k=(20,),
                       analysis__retrieval_chunk_size=16,
                       analysis__retrieval_ks=(1, 4))
  path = tmp_path / 'run' / 'eval_results.json'
  keys = set()
  for mode in (enums.Mode.EVAL, enums.Mode.EVAL_KNN,
               enums.Mode.EVAL_RETRIEVAL):
    results = analysis_testing.run_mode(config, mode)
    saved = json.loads(path.read_text())
    assert not keys & set(results), f'{mode} overwrote {keys & set(results)}'
    keys |= set(results)
    assert keys <= set(saved)  # Nothing of an earlier mode was lost.
  # The numbers are retrieval_metrics of the embeddings, chunked or not.
  info = datasets.get_dataset_info(config.data)
  model = checkpoints.load_model_for_inference(config, info)
  model_runner = runner.Runner(model, analysis_testing.ONE_DEVICE)
  queries = model_runner.predict(
      lambda ctx: runner.eval_batches(config, ctx), ['normalized_embedding'],
      max_batches=1)
  bank = model_runner.predict(
      lambda ctx: runner.eval_batches(config, ctx, training_split=True),
      ['normalized_embedding'])
  loo = retrieval.retrieval_metrics(queries['normalized_embedding'],
                                    queries['labels'], ks=(1, 4))
  vs_train = retrieval.retrieval_metrics(
      queries['normalized_embedding'], queries['labels'],
      bank['normalized_embedding'], bank['labels'], ks=(1, 4),
      clustering=False)
  assert results['retrieval_num_examples'] == 64
  assert results['retrieval_num_bank_examples'] == 1437
  for name in ('precision_at_1', 'r_precision', 'map_at_r', 'recall_at_1',
               'recall_at_4'):
    np.testing.assert_allclose(results[f'retrieval_loo_{name}'], loo[name],
                               rtol=1e-6)
    np.testing.assert_allclose(results[f'retrieval_vs_train_{name}'],
                               vs_train[name], rtol=1e-6)
  np.testing.assert_allclose(results['retrieval_nmi'], loo['nmi'], rtol=1e-6)
  # Two training steps already embed digits far above chance (0.1).
  assert results['retrieval_vs_train_precision_at_1'] > 0.3
  scalars = plots.read_scalars(str(tmp_path / 'run' / 'logs' / 'eval'))
  steps, values = scalars['retrieval_loo_map_at_r']
  assert list(steps) == [2]
  np.testing.assert_allclose(values, [loo['map_at_r']], rtol=1e-6)
  assert 'retrieval_loo_num_queries_evaluated' not in scalars
