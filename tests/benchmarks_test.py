"""The benchmark scripts still run (no timings are asserted: speed is
measured by running them, see README "Performance").

The loss benchmark runs for real on a tiny batch and writes its table; the
others, whose smallest runs take a minute or more here, are imported and
print their options.
"""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3', PYTHONPATH=ROOT)
  return subprocess.run([sys.executable, '-m', *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)


def test_loss_benchmark_tiny_run_writes_its_table(tmp_path):
  out = tmp_path / 'loss.txt'
  proc = _run('benchmarks.loss', '--variants=quick', '--reps=1', '--warmup=1',
              '--xla=off', '--batch=32', f'--out={out}')
  assert proc.returncode == 0, proc.stderr[-3000:]
  table = out.read_text()
  # One row per quick variant: reference ms, ours ms, their ratio, max|dloss|.
  lines = table.splitlines()
  first = next(i for i, line in enumerate(lines) if line.startswith('---')) + 1
  rows = lines[first:lines.index('', first)]
  assert len(rows) == 4 and rows[0].startswith('default'), table
  for row in rows:  # Both implementations agree on every variant.
    assert float(row.split()[-1]) < 1e-4, table


@pytest.mark.parametrize('name', ['loss_memory', 'models', 'train_step',
                                  'input_pipeline'])
def test_benchmark_imports_and_has_options(name):
  proc = _run(f'benchmarks.{name}', '--help')
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert '--out' in proc.stdout
