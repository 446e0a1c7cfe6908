r"""Speed of `supcon_loss` against a plain dense TF version of the reference.

`reference_dense_loss` restates the reference release's algorithm
(google-research/google-research, supcon/losses.py): view-major
[A*B, V*B] logits, sample masks tiled to that size with tf.tile, the self mask
from tf.one_hot, positives capped with top_k + scatter_nd, and every sum as a
masked product over the full matrix. Both run forward + backward (the gradient
with respect to the features) in one tf.function on one device, with XLA
jit_compile off and on, interleaved repetition by repetition so that load from
other processes hits both alike; the table reports medians and
ratio = ours / reference (lower is better).

  python -m benchmarks.loss                       # default grid, CPU
  python -m benchmarks.loss --reps=21 --out=benchmarks/results/loss.txt
  CUDA_VISIBLE_DEVICES=0 python -m benchmarks.loss --device=/GPU:0
  python -m benchmarks.loss --tpu=local      # on a Cloud TPU VM (XLA only)
"""

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import numpy as np  # pylint: disable=g-import-not-at-top
import tensorflow as tf  # pylint: disable=g-import-not-at-top

from benchmarks import _report  # pylint: disable=g-import-not-at-top
from supcon_tf import losses  # pylint: disable=g-import-not-at-top


def reference_dense_loss(features, labels=None, *, temperature=0.07,
                         contrast_mode='all_views',
                         summation_location='outside',
                         denominator_mode='all', positives_cap=-1,
                         scale_by_temperature=True):
  """The reference release's dense algorithm, one device (the baseline).

  Args:
    features: float [batch, num_views, dim], L2-normalised.
    labels: None (SimCLR) or float one-hot [batch, num_classes] (the
      reference's label format; the sample mask is labels @ labels^T).
    temperature: softmax temperature.
    contrast_mode: 'all_views' or 'one_view'.
    summation_location: 'outside' (eq. 2) or 'inside' (eq. 3).
    denominator_mode: 'all', 'one_positive' or 'only_negatives'.
    positives_cap: -1 or a multiple of num_views.
    scale_by_temperature: multiply by the temperature.

  Returns:
    float32 [batch] per-sample loss (num_views >= 2, where every anchor has
    a positive; the reference special-cases one view).
  """
  features = tf.cast(features, tf.float32)
  batch = features.shape[0]
  views = features.shape[1]
  # Rows and columns ordered view by view: [v0 b0, v0 b1, ..., v1 b0, ...].
  contrast = tf.reshape(tf.transpose(features, [1, 0, 2]), [views * batch, -1])
  if contrast_mode == 'one_view':
    anchors, anchor_views = features[:, 0], 1
  else:
    anchors, anchor_views = contrast, views
  logits = tf.matmul(anchors, contrast, transpose_b=True) / temperature
  logits -= tf.reduce_max(tf.stop_gradient(logits), axis=1, keepdims=True)
  exp_logits = tf.exp(logits)

  eye = tf.eye(batch)
  if labels is None:
    sample_mask = eye
  else:
    labels = tf.cast(labels, tf.float32)
    sample_mask = tf.matmul(labels, labels, transpose_b=True)
  # 1 everywhere except each anchor's own column.
  own_cols = tf.concat([tf.range(batch) + v * batch
                        for v in range(anchor_views)], axis=0)
  not_self = 1.0 - tf.one_hot(own_cols, views * batch)
  uncapped = tf.tile(sample_mask, [anchor_views, views])
  negatives = 1.0 - uncapped
  if positives_cap > -1:
    keep_per_row = positives_cap // views
    others = tf.minimum(sample_mask, 1.0 - eye)
    _, top_cols = tf.math.top_k(others, keep_per_row)
    top_rows = tf.tile(tf.range(batch)[:, None], [1, keep_per_row])
    picked = tf.reshape(tf.stack([top_rows, top_cols], axis=-1), [-1, 2])
    capped = tf.scatter_nd(picked, tf.ones([batch * keep_per_row]),
                           [batch, batch])
    capped = sample_mask * tf.maximum(capped, eye)
    positives = tf.tile(capped, [anchor_views, views])
  else:
    positives = uncapped
  positives *= not_self
  num_positives = tf.reduce_sum(positives, axis=1)

  negatives_sum = tf.reduce_sum(exp_logits * negatives, axis=1, keepdims=True)
  if denominator_mode == 'all':
    denominator = negatives_sum + tf.reduce_sum(
        exp_logits * positives, axis=1, keepdims=True)
  elif denominator_mode == 'one_positive':
    denominator = exp_logits + negatives_sum
  else:
    denominator = negatives_sum
  if summation_location == 'outside':
    log_prob = tf.reduce_sum((logits - tf.math.log(denominator)) * positives,
                             axis=1)
    log_prob = tf.math.divide_no_nan(log_prob, num_positives)
  else:
    prob = tf.reduce_sum(exp_logits / denominator * positives, axis=1)
    log_prob = tf.math.log(tf.math.divide_no_nan(prob, num_positives))
  loss = -log_prob
  if scale_by_temperature:
    loss *= temperature
  return tf.reduce_mean(tf.reshape(loss, [anchor_views, batch]), axis=0)


# name -> (loss keyword arguments, label kind)
VARIANTS = {
    'default (all_views, outside, all)': ({}, 'ids'),
    'simclr (labels=None)': ({}, 'none'),
    'one-hot labels': ({}, 'one_hot'),
    'inside': ({'summation_location': 'inside'}, 'ids'),
    'one_positive': ({'denominator_mode': 'one_positive'}, 'ids'),
    'only_negatives': ({'denominator_mode': 'only_negatives'}, 'ids'),
    'one_view': ({'contrast_mode': 'one_view'}, 'ids'),
    'positives_cap=4': ({'positives_cap': 4}, 'ids'),
}
QUICK = ('default (all_views, outside, all)', 'simclr (labels=None)',
         'inside', 'one_positive')


def _inputs(batch, views, dim, num_classes, seed=0):
  rng = np.random.RandomState(seed)
  x = rng.randn(batch, views, dim).astype(np.float32)
  x /= np.linalg.norm(x, axis=-1, keepdims=True)
  ids = rng.randint(0, num_classes, batch).astype(np.int32)
  return (tf.constant(x), tf.constant(ids),
          tf.constant(np.eye(num_classes, dtype=np.float32)[ids]))


def _step(loss_fn, labels, kwargs, jit):
  """tf.function: features -> (sum of per-sample losses, d/dfeatures)."""

  @tf.function(jit_compile=jit)
  def step(features):
    with tf.GradientTape() as tape:
      tape.watch(features)
      per_sample = loss_fn(features, labels, **kwargs)
      loss = tf.reduce_sum(per_sample)
    return per_sample, tape.gradient(loss, features)

  return step


def _time(step, features):
  """(wall seconds, process CPU seconds) of one call."""
  start, start_cpu = time.perf_counter(), time.process_time()
  loss, grad = step(features)
  loss.numpy()
  grad.numpy()
  return time.perf_counter() - start, time.process_time() - start_cpu


def _use_tpu(args):
  """Initialises the TPU system (as distribute.build_strategy does)."""
  resolver = tf.distribute.cluster_resolver.TPUClusterResolver(
      tpu=args.tpu)
  if args.tpu != 'local':
    tf.config.experimental_connect_to_cluster(resolver)
  tf.tpu.experimental.initialize_tpu_system(resolver)
  args.device, args.xla = '/TPU:0', 'on'  # TPU programs are always XLA.


def run(args):
  """Prints (and returns) the table."""
  if args.tpu:
    _use_tpu(args)
  with tf.device(args.device):
    features, ids, one_hot = _inputs(args.batch, args.views, args.dim,
                                     args.num_classes)
  names = list(VARIANTS) if args.variants == 'all' else list(QUICK)
  jits = {'off': [False], 'on': [True], 'both': [False, True]}[args.xla]
  header = (f'supcon_loss forward+backward, batch {args.batch} x {args.views} '
            f'views x {args.dim} dims (N = {args.batch * args.views}), '
            f'{args.num_classes} classes, device {args.device}, '
            f'{os.cpu_count()} CPUs; median of {args.reps} interleaved '
            f'repetitions, ms; ratio = ours / reference')
  lines = [header, '',
           f'{"":36s} {"":>4s} {"wall":>23s} {"process CPU time":>23s}',
           f'{"variant":36s} {"xla":>4s} {"reference":>9s} {"ours":>7s} '
           f'{"ratio":>5s} {"reference":>9s} {"ours":>7s} {"ratio":>5s} '
           f'{"max|dloss|":>10s}',
           '-' * 99]
  print('\n'.join(lines), flush=True)
  for name in names:
    kwargs, kind = VARIANTS[name]
    ours_labels = {'ids': ids, 'none': None, 'one_hot': one_hot}[kind]
    ref_labels = None if kind == 'none' else one_hot
    for jit in jits:
      with tf.device(args.device):
        ref = _step(reference_dense_loss, ref_labels, kwargs, jit)
        ours = _step(losses.supcon_loss, ours_labels, kwargs, jit)
        # Warm-up (tracing, compilation) and a check that both agree.
        ref_loss, _ = ref(features)
        ours_loss, _ = ours(features)
        for _ in range(args.warmup):
          _time(ref, features)
          _time(ours, features)
        ref_t, ours_t = [], []
        for _ in range(args.reps):
          ref_t.append(_time(ref, features))
          ours_t.append(_time(ours, features))
      r, o = (statistics.median(t[0] for t in ref_t),
              statistics.median(t[0] for t in ours_t))
      r_cpu, o_cpu = (statistics.median(t[1] for t in ref_t),
                      statistics.median(t[1] for t in ours_t))
      diff = float(tf.reduce_max(tf.abs(ref_loss - ours_loss)))
      line = (f'{name:36s} {"on" if jit else "off":>4s} {r * 1e3:9.1f} '
              f'{o * 1e3:7.1f} {o / r:5.2f} {r_cpu * 1e3:9.1f} '
              f'{o_cpu * 1e3:7.1f} {o_cpu / r_cpu:5.2f} {diff:10.2e}')
      lines.append(line)
      print(line, flush=True)
  lines.append('')
  lines.append('max|dloss|: largest per-sample loss difference between the '
               'two (float32 rounding). Process CPU time (all threads) is '
               'less sensitive than wall time to other load on shared cores.')
  text = '\n'.join(lines) + '\n'
  _report.save(text, args.out)
  return text


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--batch', type=int, default=1024)
  parser.add_argument('--views', type=int, default=2)
  parser.add_argument('--dim', type=int, default=128)
  parser.add_argument('--num_classes', type=int, default=100)
  parser.add_argument('--reps', type=int, default=15)
  parser.add_argument('--warmup', type=int, default=2)
  parser.add_argument('--xla', choices=['off', 'on', 'both'], default='both')
  parser.add_argument('--variants', choices=['quick', 'all'], default='all')
  parser.add_argument('--device', default='/CPU:0')
  parser.add_argument('--tpu', default='',
                      help='TPU name or grpc address, "local" on a TPU VM.')
  parser.add_argument('--out', default='')
  run(parser.parse_args(argv))


if __name__ == '__main__':
  sys.exit(main())
