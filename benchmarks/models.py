r"""Training throughput of the SupCon model: float32 vs mixed precision, XLA.

One step is what a training step costs apart from the optimizer and the loss:
a training-mode forward pass of the whole `SupConModel` (encoder, projection
head, classifier) and the gradient of a scalar of its outputs with respect to
every trainable variable, in one `tf.function`, XLA `jit_compile` off or on.
For each (model, image size) the four variants are compiled first, then timed
in interleaved rounds so that load from other processes hits them alike; the
table reports the median step time, images/s and the throughput ratio to the
float32 / no-XLA variant of the same run (higher is better).

32 px images use the CIFAR stem (3x3 stride-1 convolution, no max pool), 224 px
the ImageNet stem (7x7 stride-2 convolution, max pool). Mixed precision is
`supcon_tf.models.mixed_precision_policy()`: bfloat16 on CPU (and on GPUs of
compute capability 8.0+), float16 on older GPUs.

  python -m benchmarks.models                      # --quick grid, CPU
  python -m benchmarks.models --full               # bigger batches, more rounds
  python -m benchmarks.models --depths=50 --sizes=224 --batch_224=64 \
      --device=/GPU:0 --out=''                     # on a GPU machine
"""

import argparse
import os
import statistics
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import keras  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top
import tensorflow as tf  # pylint: disable=g-import-not-at-top

from benchmarks import _report  # pylint: disable=g-import-not-at-top
from supcon_tf import config  # pylint: disable=g-import-not-at-top
from supcon_tf import models  # pylint: disable=g-import-not-at-top

_NUM_CLASSES = 10


def _model_config(depth: int, image_size: int) -> config.ModelConfig:
  cifar = image_size <= 64
  return config.ModelConfig(
      depth=depth, first_conv_kernel_size=3 if cifar else 7,
      first_conv_stride=1 if cifar else 2, use_initial_max_pool=not cifar)


def _train_step_fn(model: models.SupConModel, jit_compile: bool):
  """Forward (training mode) + gradients of all trainable variables."""
  variables = model.trainable_variables
  weights = tf.constant(np.linspace(-1.0, 1.0, 128), tf.float32)

  @tf.function(jit_compile=jit_compile)
  def step(images):
    with tf.GradientTape() as tape:
      out = model(images, training=True)
      # Every output takes part so that no branch is pruned; the classifier's
      # input is behind a stop-gradient (as in training).
      loss = (tf.reduce_sum(out[models.PROJECTION] * weights) +
              tf.reduce_mean(out[models.LOGITS]))
    grads = tape.gradient(loss, variables)
    # A scalar that depends on every gradient, so none is skipped.
    return tf.add_n([tf.reduce_sum(tf.cast(g, tf.float32)) for g in grads])

  return step


def _variants(depth, image_size, batch, device, policy):
  """Builds the four (precision, XLA) variants of one model and compiles them.

  Returns:
    List of dicts with the variant's name fields, its step function, its
    images and the compile (first call) time.
  """
  images = tf.random.stateless_uniform(
      (batch, image_size, image_size, 3), seed=(0, 0))
  variants = []
  for mixed in (False, True):
    keras.utils.set_random_seed(0)
    with tf.device(device):
      model = models.build_model(_model_config(depth, image_size),
                                 _NUM_CLASSES, mixed_precision=mixed)
    for xla in (False, True):
      step = _train_step_fn(model, xla)
      start = time.perf_counter()
      with tf.device(device):
        float(step(images))
      variants.append(dict(
          precision=policy if mixed else 'float32', xla=xla, step=step,
          images=images, compile_s=time.perf_counter() - start, times=[]))
  return variants


def _time_rounds(variants, rounds, device):
  for _ in range(rounds):
    for v in variants:
      start = time.perf_counter()
      with tf.device(device):
        float(v['step'](v['images']))  # float() waits for the result.
      v['times'].append(time.perf_counter() - start)


def _rows(depth, image_size, batch, variants):
  base = statistics.median(variants[0]['times'])
  rows = []
  for v in variants:
    median = statistics.median(v['times'])
    rows.append([
        f'ResNet-{depth}', f'{image_size}', 'cifar' if image_size <= 64 else
        'imagenet', f'{batch}', v['precision'], 'on' if v['xla'] else 'off',
        f'{v["compile_s"]:.1f}', f'{median * 1e3:.0f}',
        f'{batch / median:.1f}', f'{base / median:.2f}'])
  return rows


def _format_table(rows):
  header = ['model', 'px', 'stem', 'batch', 'precision', 'xla', 'compile_s',
            'ms/step', 'images/s', 'ratio']
  widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]

  def line(row):
    return '  '.join(c.rjust(w) for c, w in zip(row, widths))

  return '\n'.join([line(header), line(['-' * w for w in widths])] +
                   [line(r) for r in rows])


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  mode = parser.add_mutually_exclusive_group()
  mode.add_argument('--quick', action='store_true', default=True,
                    help='Small batches, few rounds (default).')
  mode.add_argument('--full', action='store_true',
                    help='Bigger batches and more rounds.')
  parser.add_argument('--depths', default='18,50')
  parser.add_argument('--sizes', default='32,224')
  parser.add_argument('--batch_32', type=int, default=None)
  parser.add_argument('--batch_224', type=int, default=None)
  parser.add_argument('--rounds', type=int, default=None)
  parser.add_argument('--device', default='/CPU:0')
  parser.add_argument('--out', default='benchmarks/results/models.txt',
                      help="Where to save the table; '' = do not save.")
  args = parser.parse_args()
  full = args.full
  rounds = args.rounds or (10 if full else 5)
  batch_for = {32: args.batch_32 or (32 if full else 8),
               224: args.batch_224 or (8 if full else 2)}
  policy = models.mixed_precision_policy()

  rows = []
  start = time.perf_counter()
  for depth in (int(d) for d in args.depths.split(',')):
    for size in (int(s) for s in args.sizes.split(',')):
      batch = batch_for.get(size, batch_for[224])
      variants = _variants(depth, size, batch, args.device, policy)
      _time_rounds(variants, rounds, args.device)
      rows += _rows(depth, size, batch, variants)
      print(_format_table(rows[-4:]), flush=True)
  table = _format_table(rows)
  header = (
      f'# benchmarks/models.py {"--full" if full else "--quick"}: '
      'SupConModel forward (training) + backward, median of '
      f'{rounds} interleaved rounds\n'
      f'{_report.machine_line()}  device={args.device}  '
      f'total {time.perf_counter() - start:.0f} s  '
      f'load average {os.getloadavg()[0]:.1f} (1 min, at the end)\n'
      '# ratio = images/s over the float32 / XLA-off row of the same model '
      'and size (higher is better)\n')
  print('\n' + header + table)
  _report.save(header + table + '\n', args.out)


if __name__ == '__main__':
  main()
