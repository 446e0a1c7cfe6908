"""Test-session set-up shared by every test file.

The CPU is split into 16 logical devices before TensorFlow initialises, so that
multi-replica behaviour (MirroredStrategy with 2, 4 or 8 replicas) is tested on
this machine. Single-device tests are unaffected: ops still default to CPU:0.

Use `mirrored_strategy(n)` rather than building MirroredStrategy yourself:
every new strategy numbers its collective groups from 1, and two strategies of
different sizes abort each other's collectives ("joining a group with size 2,
but that group has size 4"). Each size gets one cached strategy with its own
collective key range (TF's test hook `_collective_key_base`).
"""

import functools
import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import tensorflow as tf  # pylint: disable=g-import-not-at-top

NUM_LOGICAL_CPUS = 8


def _split_cpu():
  cpus = tf.config.list_physical_devices('CPU')
  try:
    tf.config.set_logical_device_configuration(
        cpus[0], [tf.config.LogicalDeviceConfiguration()] * NUM_LOGICAL_CPUS)
  except RuntimeError:
    # Already initialised (e.g. a test file configured devices first).
    pass


_split_cpu()


def logical_cpus(n):
  """Names of the first `n` logical CPU devices."""
  devices = [d.name for d in tf.config.list_logical_devices('CPU')]
  if len(devices) < n:
    raise RuntimeError(f'Need {n} logical CPUs, have {len(devices)}.')
  return devices[:n]


@functools.lru_cache(maxsize=None)
def mirrored_strategy(n):
  """One cached MirroredStrategy over `n` logical CPUs (see module doc)."""
  # The base is copied by the strategy at construction; distinct per size.
  tf.distribute.MirroredStrategy._collective_key_base = 1000 * n  # pylint: disable=protected-access
  try:
    return tf.distribute.MirroredStrategy(logical_cpus(n))
  finally:
    tf.distribute.MirroredStrategy._collective_key_base = 0  # pylint: disable=protected-access
