"""LARS and ReferenceRMSprop under MirroredStrategy equal a single device.

Two logical CPU devices must be configured before TensorFlow initialises its
runtime, which another test in the same pytest process may already have done;
so the pytest test runs this file as a fresh subprocess, where `_main` sets
up the devices first.
"""

import os
import subprocess
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_OK = 'OPTIM_DISTRIBUTED_OK'


def test_mirrored_matches_single_device():
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2',
             PYTHONPATH=os.pathsep.join(
                 p for p in (_ROOT, os.environ.get('PYTHONPATH')) if p))
  result = subprocess.run([sys.executable, os.path.abspath(__file__)],
                          cwd=_ROOT, env=env, capture_output=True, text=True,
                          timeout=300, check=False)
  output = result.stdout + result.stderr
  assert result.returncode == 0, output[-5000:]
  assert _OK in result.stdout, output[-5000:]


def _main():
  """Trains a tiny model two steps on 1 and on 2 replicas; compares weights."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  cpu = tf.config.list_physical_devices('CPU')[0]
  tf.config.set_logical_device_configuration(
      cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
  import keras  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from supcon_tf import config as config_lib  # pylint: disable=g-import-not-at-top
  from supcon_tf import optim  # pylint: disable=g-import-not-at-top

  global_batch = 8
  x = tf.random.stateless_normal((2, global_batch, 4), seed=(3, 4))
  y = tf.random.stateless_normal((2, global_batch, 2), seed=(5, 6))
  devices = [d.name for d in tf.config.list_logical_devices('CPU')]
  assert len(devices) == 2, devices

  def make_model():
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((4,)), keras.layers.Dense(3),
                             keras.layers.Dense(2)])

  def make_optimizer(kind, model):
    stage = config_lib.StageConfig(optimizer=kind, weight_decay=0.05,
                                   rmsprop_epsilon=1e-3)
    schedule = optim.StageSchedule(1.0, steps_per_epoch=1.0, total_epochs=4.0,
                                   warmup_epochs=1.0)
    chosen = [layer.kernel for layer in model.layers]  # Kernels, no biases.
    opt = optim.build_optimizer(stage, schedule, weight_decay_variables=chosen)
    if isinstance(opt, optim.LARS):
      # A larger trust coefficient so that adaptation visibly matters.
      opt.eta = 0.1
    return opt

  def per_replica_loss(model, xb, yb):
    # Sum over the local batch / global batch: replica gradients then add up
    # (the optimizer all-reduces with SUM) to the global-batch mean.
    return tf.reduce_sum(tf.square(model(xb) - yb)) / global_batch

  def train(kind, strategy):
    with strategy.scope():
      model = make_model()
      opt = make_optimizer(kind, model)
      # Eagerly, as model.fit does: optimizer slots created lazily inside a
      # tf.function under MirroredStrategy fail to initialise (any Keras
      # optimizer, SGD included).
      opt.build(model.trainable_variables)

    @tf.function
    def step(xs, ys):
      def replica_fn(xb, yb):
        with tf.GradientTape() as tape:
          loss = per_replica_loss(model, xb, yb)
        grads = tape.gradient(loss, model.trainable_variables)
        opt.apply_gradients(zip(grads, model.trainable_variables))
      strategy.run(replica_fn, args=(xs, ys))

    n = strategy.num_replicas_in_sync
    for i in range(2):
      def split(ctx, t=None):
        k = global_batch // n
        return t[ctx.replica_id_in_sync_group * k:
                 (ctx.replica_id_in_sync_group + 1) * k]
      xs = strategy.experimental_distribute_values_from_function(
          lambda ctx, i=i: split(ctx, x[i]))
      ys = strategy.experimental_distribute_values_from_function(
          lambda ctx, i=i: split(ctx, y[i]))
      step(xs, ys)
    if isinstance(opt, optim.LARS):
      dense1 = model.layers[0]
      assert opt.is_decayed(dense1.kernel) and opt.is_adapted(dense1.kernel)
      assert not opt.is_decayed(dense1.bias)
      assert not opt.is_adapted(dense1.bias)
    return [v.numpy() for v in model.weights]

  for kind in ('lars', 'rmsprop'):
    single = train(kind, tf.distribute.OneDeviceStrategy(devices[0]))
    mirrored = train(kind, tf.distribute.MirroredStrategy(devices))
    initial = [v.numpy() for v in make_model().weights]
    for s, m, w0 in zip(single, mirrored, initial):
      assert not np.allclose(s, w0), (kind, 'weights did not move')
      np.testing.assert_allclose(m, s, rtol=1e-5, atol=1e-6, err_msg=kind)
  print(_OK)


if __name__ == '__main__':
  _main()
