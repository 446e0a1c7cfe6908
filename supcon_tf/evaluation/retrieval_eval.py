"""`--mode=eval_retrieval`: the embedding measured as metric learning does.

The metrics of `retrieval.py` (precision@1, R-precision, MAP@R, recall@k,
NMI / AMI; Musgrave et al. 2020) on the encoder's L2-normalised embedding, in
eval preprocessing, in two settings:

* `retrieval_loo_<metric>`: test images as queries against the other test
  images (leave-one-out), the usual protocol of the metric-learning
  benchmarks;
* `retrieval_vs_train_<metric>`: test images as queries against the train
  split (as training reads it: `num_images` cap and label noise included),
  the setting of the kNN eval;
* `retrieval_nmi`, `retrieval_ami`: k-means on the test embeddings, one
  cluster per class.

Queries are the eval split, capped at `--max_eval_steps` batches like
`--mode=eval` and `--mode=eval_knn`. Every key starts with `retrieval_`, so
merging into `model_dir/eval_results.json` never touches another mode's keys;
the metrics also go to TensorBoard (`logs/eval`) at the checkpoint's step.

Memory: the train embeddings are kept on the host as float32 [N, d] (as in
`eval_knn`; ImageNet ResNet-50: 10.5 GB); queries are scored
`--retrieval_chunk_size` at a time (a [chunk, N] similarity block) and only
`--retrieval_max_neighbours` neighbours per query are kept ([queries, K]
indices), never [queries, N].
"""

from typing import Dict, Optional

import tensorflow as tf

from supcon_tf import config as config_lib
from supcon_tf import distribute
from supcon_tf import models
from supcon_tf.data import datasets
from supcon_tf.evaluation import results as results_lib
from supcon_tf.evaluation import retrieval
from supcon_tf.evaluation import runner
from supcon_tf.training import checkpoints

PREFIX = 'retrieval_'
# The neighbour metrics shown in TensorBoard and the report (the counts stay
# in the JSON file only).
HEADLINE = ('precision_at_1', 'r_precision', 'map_at_r')


def prefixed(setting: str, metrics: Dict[str, float]) -> Dict[str, float]:
  """{'retrieval_<setting>_<name>': value}."""
  return {f'{PREFIX}{setting}_{k}': v for k, v in metrics.items()}


def evaluate_retrieval(config: config_lib.ExperimentConfig,
                       strategy: tf.distribute.Strategy,
                       model: Optional[models.SupConModel] = None) -> Dict:
  """Runs the retrieval evaluation of the model in model_dir.

  Returns:
    The results: `retrieval_loo_*` and `retrieval_vs_train_*` (see
    `retrieval.retrieval_metrics` for the metric names), `retrieval_nmi`,
    `retrieval_ami`, and the sizes and checkpoint.
  """
  analysis = config.analysis
  info = datasets.get_dataset_info(config.data, config.runtime.model_dir)
  if model is None:
    model = checkpoints.load_model_for_inference(config, info, strategy)
  key = models.NORMALIZED_EMBEDDING
  print(f'[eval_retrieval] embedding {info.num_train_examples} train and the '
        f'{info.eval_split} images of {info.name}', flush=True)
  bank, queries = runner.embed_bank_and_queries(config, strategy, model,
                                                info, key)
  options = dict(ks=analysis.retrieval_ks,
                 chunk_size=analysis.retrieval_chunk_size,
                 max_neighbours=analysis.retrieval_max_neighbours,
                 seed=config.data.seed)
  loo = retrieval.retrieval_metrics(queries[key], queries[runner.LABELS],
                                    clustering=True, **options)
  clusters = {name: loo.pop(name) for name in ('nmi', 'ami')}
  vs_train = retrieval.retrieval_metrics(
      queries[key], queries[runner.LABELS], bank[key], bank[runner.LABELS],
      clustering=False, **options)
  checkpoint = checkpoints.latest_model_checkpoint(
      config.runtime.model_dir) or ''
  results = {**prefixed('loo', loo), **prefixed('vs_train', vs_train),
             **{PREFIX + k: v for k, v in clusters.items()}}
  results.update({
      PREFIX + 'num_examples': int(queries[key].shape[0]),
      PREFIX + 'num_bank_examples': int(bank[key].shape[0]),
      PREFIX + 'embedding_dim': int(queries[key].shape[-1]),
      PREFIX + 'checkpoint': checkpoint,
  })
  scalars = {k: v for k, v in results.items()
             if isinstance(v, float) and 'num_' not in k}
  model_dir = config.runtime.model_dir
  if model_dir and distribute.is_chief(strategy):
    results_lib.publish(model_dir, checkpoints.EVAL_RESULTS_FILE, results,
                        scalars, checkpoint)
  for setting, metrics in (('test vs test (leave-one-out)', loo),
                           ('test vs train', vs_train)):
    shown = ', '.join(
        f'{name} {metrics[name]:.4f}' for name in
        HEADLINE + tuple(f'recall_at_{k}' for k in analysis.retrieval_ks))
    print(f'[eval_retrieval] {info.name} {setting}: {shown}', flush=True)
  print(f'[eval_retrieval] k-means on the {results[PREFIX + "num_examples"]} '
        f'test embeddings: NMI {clusters["nmi"]:.4f}, AMI '
        f'{clusters["ami"]:.4f}', flush=True)
  return results


def run_eval_retrieval(config: config_lib.ExperimentConfig,
                       strategy: tf.distribute.Strategy) -> Dict:
  """The `--mode=eval_retrieval` handler."""
  return evaluate_retrieval(config, strategy)
