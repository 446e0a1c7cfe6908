"""Prints comparison tables of finished runs.

  python -m supcon_tf.evaluation.report runs/quickstart/supcon runs/quickstart/cross_entropy
  python -m supcon_tf.evaluation.report --plot=monitor.png DIR...

Each argument is a model_dir with `config.json` and `eval_results.json`
(optionally `wall_time_s`, written by scripts/quickstart.sh). Printed: the
linear-eval table; the retrieval table when `--mode=eval_retrieval` ran;
the stage-1 monitor's kNN top-1 per monitored epoch when
`--monitor_every_epochs` was on. `--plot=PATH` also draws the monitor's
curves over epochs (from TensorBoard, `logs/pretrain`), one line per run.
"""

import json
import os
import sys
from typing import Dict, List, Optional, Tuple

import numpy as np

from supcon_tf import config as config_lib

# The monitor's scalars drawn by `--plot` (TensorBoard `monitor/<name>`).
MONITOR_PLOT = ('knn_top_1_accuracy@20', 'positive_cosine', 'negative_cosine',
                'alignment', 'uniformity', 'dimension_std_scaled')
# Retrieval metrics in the table (`retrieval_eval.py` keys without prefix).
RETRIEVAL_COLUMNS = (('precision_at_1', 'P@1'), ('r_precision', 'R-prec'),
                     ('map_at_r', 'MAP@R'), ('recall_at_1', 'R@1'),
                     ('recall_at_2', 'R@2'), ('recall_at_4', 'R@4'),
                     ('recall_at_8', 'R@8'))


def method_name(config: config_lib.ExperimentConfig) -> str:
  """SupCon / SimCLR / cross-entropy, from the stage-1 loss weights."""
  stage = config.stage_1
  if stage.contrastive_loss_weight > 0:
    name = 'SupCon' if config.loss.use_labels else 'SimCLR'
    if stage.cross_entropy_loss_weight > 0:
      name += ' + CE'
    return name
  return 'Cross-entropy'


def load_run(model_dir: str) -> Dict[str, object]:
  """The row of one run; raises FileNotFoundError naming a missing file."""
  with open(os.path.join(model_dir, 'config.json')) as f:
    config = config_lib.ExperimentConfig.from_json(f.read())
  with open(os.path.join(model_dir, 'eval_results.json')) as f:
    results = json.load(f)
  wall = None
  wall_path = os.path.join(model_dir, 'wall_time_s')
  if os.path.exists(wall_path):
    with open(wall_path) as f:
      wall = float(f.read().strip())
  return {
      'method': method_name(config),
      'dataset': results.get('dataset', config.data.dataset),
      'encoder': f'ResNet-{config.model.depth} x{config.model.width:g}',
      'epochs': f'{config.stage_1.epochs:g}+{config.stage_2.epochs:g}',
      'top_1': results['top_1_accuracy'],
      'top_5': results['top_5_accuracy'],
      'wall_s': wall,
      'model_dir': model_dir,
      'results': results,
      'config': config,
  }


def format_retrieval_table(rows: List[Dict[str, object]]) -> Optional[str]:
  """Markdown table of the retrieval metrics, or None if none ran."""
  rows = [r for r in rows if 'retrieval_loo_map_at_r' in r['results']]
  if not rows:
    return None
  header = ' | '.join(name for _, name in RETRIEVAL_COLUMNS)
  lines = [f'| method | queries vs | {header} | NMI | AMI |',
           '|---|---|' + '---|' * (len(RETRIEVAL_COLUMNS) + 2)]
  for r in rows:
    results = r['results']
    for setting, shown in (('loo', 'test (leave-one-out)'),
                           ('vs_train', 'train')):
      cells = ' | '.join(
          f'{100 * results.get(f"retrieval_{setting}_{key}", np.nan):.1f}'
          for key, _ in RETRIEVAL_COLUMNS)
      nmi, ami = (f'{results[f"retrieval_{k}"]:.3f}' if setting == 'loo'
                  else '' for k in ('nmi', 'ami'))
      lines.append(f'| {r["method"]} | {shown} | {cells} | {nmi} | {ami} |')
  return '\n'.join(lines)


def monitor_curves(row: Dict[str, object]
                   ) -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
  """{monitor scalar: (epochs, values)} of a run's stage 1 (may be empty)."""
  from supcon_tf.data import datasets  # pylint: disable=g-import-not-at-top
  from supcon_tf.evaluation import plots  # pylint: disable=g-import-not-at-top
  scalars = plots.read_scalars(
      os.path.join(row['model_dir'], 'logs', 'pretrain'))
  config = row['config']
  steps_per_epoch = (datasets.get_dataset_info(config.data).num_train_examples
                     / config.data.batch_size)
  return {tag[len('monitor/'):]: (steps / steps_per_epoch, values)
          for tag, (steps, values) in scalars.items()
          if tag.startswith('monitor/')}


def format_monitor_table(rows: List[Dict[str, object]],
                         curves: List[Dict]) -> Optional[str]:
  """Markdown table of the monitor's first kNN accuracy per epoch."""
  knn = [sorted(k for k in c if k.startswith('knn_')) for c in curves]
  if not any(knn):
    return None
  key = next(k[0] for k in knn if k)
  epochs = sorted({round(float(e), 1) for c in curves if key in c
                   for e in c[key][0]})
  lines = ['| epoch | ' + ' | '.join(
      f'{r["method"]} {key}' for r in rows) + ' |',
           '|---|' + '---|' * len(rows)]
  for epoch in epochs:
    cells = []
    for c in curves:
      found = [v for e, v in zip(*c.get(key, ([], []))) if
               round(float(e), 1) == epoch]
      cells.append(f'{100 * found[-1]:.1f}%' if found else '-')
    lines.append(f'| {epoch:g} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def format_table(rows: List[Dict[str, object]]) -> str:
  """A Markdown table of the rows."""
  lines = ['| method | dataset | encoder | epochs (stage 1+2) | top-1 | top-5 '
           '| wall time |',
           '|---|---|---|---|---|---|---|']
  for r in rows:
    wall = f'{r["wall_s"]:.0f} s' if r['wall_s'] is not None else '-'
    lines.append(f'| {r["method"]} | {r["dataset"]} | {r["encoder"]} | '
                 f'{r["epochs"]} | {100 * r["top_1"]:.1f}% | '
                 f'{100 * r["top_5"]:.1f}% | {wall} |')
  return '\n'.join(lines)


def main(argv: List[str]) -> int:
  plot = [a.split('=', 1)[1] for a in argv[1:] if a.startswith('--plot=')]
  model_dirs = [a for a in argv[1:] if not a.startswith('--plot=')]
  if not model_dirs:
    print(__doc__, file=sys.stderr)
    return 2
  rows = []
  for model_dir in model_dirs:
    try:
      rows.append(load_run(model_dir))
    except FileNotFoundError as e:
      print(f'error: {model_dir} has no finished run ({e.filename} missing)',
            file=sys.stderr)
      return 1
  print(format_table(rows))
  retrieval_table = format_retrieval_table(rows)
  if retrieval_table:
    print('\nRetrieval (embedding, test images as queries; %):')
    print(retrieval_table)
  curves = [monitor_curves(r) for r in rows]
  monitor_table = format_monitor_table(rows, curves)
  if monitor_table:
    print('\nStage-1 monitor, weighted kNN top-1 on the monitor subsets:')
    print(monitor_table)
  if plot and any(curves):
    from supcon_tf.evaluation import plots  # pylint: disable=g-import-not-at-top
    path = plots.save_curves(
        {r['method']: c for r, c in zip(rows, curves)}, plot[0],
        metrics=[m for m in MONITOR_PLOT if any(m in c for c in curves)],
        xlabel='epoch')
    print(f'\nMonitor curves: {path}')
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv))
