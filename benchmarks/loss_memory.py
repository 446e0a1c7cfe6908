r"""Peak memory of `supcon_loss` forward + backward, dense vs chunked.

Each configuration runs in its own subprocess (a process's freed host memory
is not reliably returned to the OS, so one process per measurement is the
only clean reading). A child builds the inputs, warms up the TF runtime on a
tiny batch, runs forward + backward twice in a tf.function and reports:

  rss: its peak resident set (VmHWM from /proc/self/status) minus that of a
    baseline child that does everything but the big loss (imports, inputs,
    runtime warm-up): what the loss costs the process, allocator slack and
    oneDNN scratch included. Median over --reps children.
  tf: the peak bytes of TensorFlow's own allocator during the loss, from
    tf.config.experimental.get_memory_info (on the CPU the child runs with
    TF_CPU_ALLOCATOR_USE_BFC=true, which keeps those statistics): the live
    tensors alone, nearly deterministic. One child.

Ratios are to the dense `supcon_loss` of the same run.

  python -m benchmarks.loss_memory                     # 2 x 8192 x 128, CPU
  python -m benchmarks.loss_memory --batch=2048 --reference --append \
      --out=benchmarks/results/loss_memory.txt

On a GPU, `--device=/GPU:0`: the tf column is then the device's peak (the rss
column still measures the host).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from benchmarks import _report

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')


def _status_kib(field):
  with open('/proc/self/status') as f:
    for line in f:
      if line.startswith(field + ':'):
        return int(line.split()[1])
  return -1


def child(args):
  """Runs one configuration and prints a JSON line with its measurements."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  from benchmarks import loss as loss_bench  # pylint: disable=g-import-not-at-top,line-too-long
  from supcon_tf import losses  # pylint: disable=g-import-not-at-top

  on_device = not args.device.upper().startswith('/CPU')
  rng = np.random.RandomState(0)
  with tf.device(args.device):
    x = rng.randn(args.batch, args.views, args.dim).astype(np.float32)
    x /= np.linalg.norm(x, axis=-1, keepdims=True)
    features = tf.constant(x)
    ids_np = rng.randint(0, args.num_classes, args.batch).astype(np.int32)
    ids = tf.constant(ids_np)
    one_hot = tf.one_hot(ids, args.num_classes)

  chunk = args.chunk or None
  if args.mode == 'reference':
    fn, labels, kwargs = loss_bench.reference_dense_loss, one_hot, {}
  else:
    fn, labels, kwargs = losses.supcon_loss, ids, {'chunk_size': chunk}

  def make_step(step_labels):

    @tf.function
    def step(f):
      with tf.GradientTape() as tape:
        tape.watch(f)
        loss = tf.reduce_sum(fn(f, step_labels, **kwargs))
      return loss, tape.gradient(loss, f)

    return step

  # Runtime warm-up on a tiny batch (thread pools, oneDNN, kernels), so the
  # baseline holds everything but the big loss's own buffers.
  with tf.device(args.device):
    tiny = make_step(labels[:8])
    tiny(features[:8])
  tf_peak_device = args.device.strip('/') if on_device else 'CPU:0'
  tf_stats = on_device or os.environ.get('TF_CPU_ALLOCATOR_USE_BFC') == 'true'
  if tf_stats:
    tf.config.experimental.reset_memory_stats(tf_peak_device)
    tf_before = tf.config.experimental.get_memory_info(tf_peak_device)
  before = _status_kib('VmRSS')
  seconds = 0.0
  if args.mode != 'baseline':
    with tf.device(args.device):
      step = make_step(labels)
      for _ in range(2):  # Time the second call (the first one traces).
        start = time.perf_counter()
        loss, grad = step(features)
        loss = float(loss)
        grad_norm = float(tf.linalg.norm(grad))
        seconds = time.perf_counter() - start
  else:
    loss = grad_norm = 0.0
  out = {'rss_before_kib': before, 'hwm_kib': _status_kib('VmHWM'),
         'loss': loss, 'grad_norm': grad_norm, 'seconds': seconds}
  if tf_stats:
    # Peak bytes of TensorFlow's own allocator above what was live before.
    out['tf_peak_bytes'] = tf.config.experimental.get_memory_info(
        tf_peak_device)['peak'] - tf_before['current']
  print('RESULT ' + json.dumps(out), flush=True)


def _run_child(args, mode, chunk, tf_allocator_stats=False):
  """Runs one child; returns its RESULT dict."""
  cmd = [sys.executable, '-m', 'benchmarks.loss_memory', '--child',
         f'--mode={mode}', f'--chunk={chunk}', f'--batch={args.batch}',
         f'--views={args.views}', f'--dim={args.dim}',
         f'--num_classes={args.num_classes}', f'--device={args.device}']
  env = dict(os.environ)
  if tf_allocator_stats:
    # TF's BFC allocator on the CPU keeps peak-bytes statistics.
    env['TF_CPU_ALLOCATOR_USE_BFC'] = 'true'
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, env=env,
                          cwd=os.path.dirname(os.path.dirname(
                              os.path.abspath(__file__))))
  stdout, stderr = proc.communicate()
  for line in stdout.splitlines():
    if line.startswith('RESULT '):
      return json.loads(line[len('RESULT '):])
  raise RuntimeError(f'child {mode} chunk={chunk} failed:\n{stderr[-3000:]}')


def run(args):
  """Prints (and returns) the table."""
  on_device = not args.device.upper().startswith('/CPU')
  chunks = [int(c) for c in args.chunks.split(',') if c]
  configs = [('dense', 0)] + [('chunked', c) for c in chunks]
  if args.reference:
    configs.append(('reference', 0))
  rss = {c: [] for c in [('baseline', 0)] + configs}
  # Interleave the repetitions so that slow drift (other processes) hits
  # every configuration alike.
  for _ in range(args.reps):
    for config in rss:
      rss[config].append(_run_child(args, *config))
  # One more child per configuration for TensorFlow's own allocator peak
  # (deterministic up to op scheduling; on a device it is the device peak).
  tf_peak = {c: _run_child(args, *c, tf_allocator_stats=True)['tf_peak_bytes']
             / 2**20 for c in configs}

  baseline = statistics.median(r['hwm_kib'] / 1024 for r in rss[('baseline', 0)])
  n = args.batch * args.views
  header = (
      f'supcon_loss forward+backward peak memory, batch {args.batch} x '
      f'{args.views} views x {args.dim} dims (N = {n}; one float32 N x N '
      f'matrix = {n * n * 4 / 2**20:.0f} MiB), {args.num_classes} classes, '
      f'device {args.device}.\n'
      f'rss: host VmHWM of the process minus the baseline process '
      f'({baseline:.0f} MiB), median of {args.reps} processes. '
      f'tf: peak bytes of TensorFlow\'s allocator '
      f'({"device" if on_device else "CPU BFC"}), one process. '
      f'Ratios are to dense.')
  lines = [header, '',
           f'{"configuration":16s} {"rss MiB":>8s} {"ratio":>6s} '
           f'{"tf MiB":>8s} {"ratio":>6s} {"seconds":>8s} {"loss":>11s} '
           f'{"|grad|":>10s}',
           '-' * 80]
  print('\n'.join(lines), flush=True)
  dense_rss = statistics.median(r['hwm_kib'] / 1024 - baseline
                                for r in rss[('dense', 0)])
  for config in configs:
    peak = statistics.median(r['hwm_kib'] / 1024 - baseline
                             for r in rss[config])
    seconds = statistics.median(r['seconds'] for r in rss[config])
    first = rss[config][0]
    name = config[0] if not config[1] else f'chunked {config[1]}'
    line = (f'{name:16s} {peak:8.0f} {peak / dense_rss:6.3f} '
            f'{tf_peak[config]:8.0f} '
            f'{tf_peak[config] / tf_peak[("dense", 0)]:6.3f} '
            f'{seconds:8.2f} {first["loss"]:11.3f} {first["grad_norm"]:10.5f}')
    lines.append(line)
    print(line, flush=True)
  lines.append('')
  lines.append('seconds: the second call (the first one traces), median. '
               'loss = sum of per-sample losses and |grad| = norm of its '
               'gradient w.r.t. the features, equal across configurations.')
  text = '\n'.join(lines) + '\n'
  _report.save(text + ('\n' if args.append else ''), args.out, args.append)
  return text


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--batch', type=int, default=8192)
  parser.add_argument('--views', type=int, default=2)
  parser.add_argument('--dim', type=int, default=128)
  parser.add_argument('--num_classes', type=int, default=1000)
  parser.add_argument('--chunks', default='256,1024,2048')
  parser.add_argument('--reference', action='store_true',
                      help='Also measure reference_dense_loss (about 3x the '
                      'dense peak: mind the host memory).')
  parser.add_argument('--reps', type=int, default=3)
  parser.add_argument('--device', default='/CPU:0')
  parser.add_argument('--out', default='')
  parser.add_argument('--append', action='store_true',
                      help='Append the table to --out instead of replacing.')
  # Internal: one measurement.
  parser.add_argument('--child', action='store_true', help=argparse.SUPPRESS)
  parser.add_argument('--mode', default='dense', help=argparse.SUPPRESS)
  parser.add_argument('--chunk', type=int, default=0, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.child:
    child(args)
  else:
    run(args)


if __name__ == '__main__':
  sys.exit(main())
