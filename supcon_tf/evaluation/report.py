"""Prints a comparison table of finished runs.

  python -m supcon_tf.evaluation.report runs/quickstart/supcon runs/quickstart/cross_entropy

Each argument is a model_dir with `config.json` and `eval_results.json`
(optionally `wall_time_s`, written by scripts/quickstart.sh).
"""

import json
import os
import sys
from typing import Dict, List

from supcon_tf import config as config_lib


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
  }


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
  if len(argv) < 2:
    print(__doc__, file=sys.stderr)
    return 2
  rows = []
  for model_dir in argv[1:]:
    try:
      rows.append(load_run(model_dir))
    except FileNotFoundError as e:
      print(f'error: {model_dir} has no finished run ({e.filename} missing)',
            file=sys.stderr)
      return 1
  print(format_table(rows))
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv))
