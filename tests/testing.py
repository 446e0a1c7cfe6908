"""Fixtures shared by the end-to-end tests: a tiny config, one-device runs.

`tiny_config` trains a ResNet-18 at width 0.25 on 16 px digits for 2 steps
(a few seconds of tracing per run); `run_mode` runs one --mode of it through
`main.run`. tests/train_test.py re-exports these names (other test files import
them from there).
"""

import numpy as np
import tensorflow as tf

from supcon_tf import config as config_lib
from supcon_tf import enums
from supcon_tf import main as main_lib

ONE_DEVICE = tf.distribute.OneDeviceStrategy('/cpu:0')


def tiny_config(model_dir, **overrides) -> config_lib.ExperimentConfig:
  """A config that trains in seconds on digits."""
  base = config_lib.ExperimentConfig().replace(
      model__depth=18, model__width=0.25, model__first_conv_kernel_size=3,
      model__first_conv_stride=1, model__use_initial_max_pool=False,
      model__projection_head_layers=(32, 16),
      data__dataset='digits', data__batch_size=16, data__eval_batch_size=64,
      augment__image_size=16,
      augment__augmentation_type=enums.AugmentationType.SIMCLR,
      augment__blur_probability=0.0,
      stage_1__epochs=1, stage_1__warmup_epochs=0,
      stage_1__optimizer=enums.Optimizer.MOMENTUM,
      stage_1__base_learning_rate=0.1,
      stage_2__epochs=1, stage_2__warmup_epochs=0,
      stage_2__optimizer=enums.Optimizer.MOMENTUM,
      runtime__model_dir=str(model_dir), runtime__max_train_steps=2,
      runtime__max_eval_steps=1, runtime__steps_per_loop=2,
      runtime__summary_interval_steps=1, runtime__save_interval_steps=1)
  return base.replace(**overrides) if overrides else base


def run_mode(config, mode, strategy=ONE_DEVICE):
  """main.run of `config` in `mode` (on one CPU device by default)."""
  return main_lib.run(config.replace(runtime__mode=mode), strategy)


def uint8_images(n=3, h=11, w=13, seed=0):
  """Random uint8 images `[n, h, w, 3]` (serving-signature inputs)."""
  return np.random.RandomState(seed).randint(0, 256, [n, h, w, 3]).astype(
      np.uint8)


def free_ports(n):
  """`n` TCP ports on 127.0.0.1 free right now (for TF_CONFIG clusters)."""
  import socket  # pylint: disable=g-import-not-at-top
  socks = [socket.socket() for _ in range(n)]
  for s in socks:
    s.bind(('127.0.0.1', 0))
  ports = [s.getsockname()[1] for s in socks]
  for s in socks:
    s.close()
  return ports
