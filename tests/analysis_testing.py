"""A tiny pretrained model shared by the analysis-mode tests.

`trained_model_dir()` trains tests.train_test.tiny_config for 2 steps of
`--mode=pretrain` once per test process (tracing the train step is most of
the cost) and `copy_trained(dest)` gives each test its own copy, so tests that
write results into model_dir do not see each other's files.
"""

import atexit
import functools
import shutil
import tempfile

import tensorflow as tf

from supcon_tf import enums
from supcon_tf import main as main_lib
from tests.testing import tiny_config

ONE_DEVICE = tf.distribute.OneDeviceStrategy('/cpu:0')


@functools.lru_cache(maxsize=1)
def trained_model_dir() -> str:
  """model_dir of a 2-step tiny pretrain run (read-only: copy it first)."""
  model_dir = tempfile.mkdtemp(prefix='supcon_analysis_')
  atexit.register(shutil.rmtree, model_dir, True)
  config = tiny_config(model_dir)
  main_lib.run(config.replace(runtime__mode=enums.Mode.PRETRAIN), ONE_DEVICE)
  return model_dir


def copy_trained(dest) -> str:
  """A private copy of `trained_model_dir()` at `dest`; returns its path."""
  shutil.copytree(trained_model_dir(), str(dest))
  return str(dest)


def run_mode(config, mode, strategy=ONE_DEVICE):
  return main_lib.run(config.replace(runtime__mode=mode), strategy)
