r"""Peak host memory of `supcon_loss` forward + backward, dense vs chunked.

Each configuration runs in its own subprocess (TensorFlow never returns freed
host memory to the OS, so one process per measurement is the only clean
reading). A child builds the inputs, warms up the TF runtime on a tiny batch,
records its resident set (VmRSS), runs forward + backward once in a
tf.function and reports its peak resident set (VmHWM from /proc/self/status;
ru_maxrss from wait4 as a fallback). The table reports

  peak - baseline,

where baseline is the peak of a child that does everything except the big
loss (imports, inputs, runtime warm-up), so the number is the memory the loss
itself needs. The median over --reps children is reported, and the ratio is
against the dense `supcon_loss` in the same run.

  python -m benchmarks.loss_memory                     # 2 x 8192 x 128, CPU
  python -m benchmarks.loss_memory --batch=4096 --chunks=256,1024 --reference
  python -m benchmarks.loss_memory --out=benchmarks/results/loss_memory.txt

On GPU/TPU, host RSS says nothing about device memory; there run
`python -m benchmarks.loss_memory --device=/GPU:0`, which reads the device's
peak from tf.config.experimental.get_memory_info instead (reset per child).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

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

  from benchmarks import loss as loss_bench  # pylint: disable=g-import-not-at-top
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
  if on_device:
    tf.config.experimental.reset_memory_stats(args.device.strip('/'))
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
  if on_device:
    out['device_peak_bytes'] = tf.config.experimental.get_memory_info(
        args.device.strip('/'))['peak']
  print('RESULT ' + json.dumps(out), flush=True)


def _run_child(args, mode, chunk):
  cmd = [sys.executable, '-m', 'benchmarks.loss_memory', '--child',
         f'--mode={mode}', f'--chunk={chunk}', f'--batch={args.batch}',
         f'--views={args.views}', f'--dim={args.dim}',
         f'--num_classes={args.num_classes}', f'--device={args.device}']
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True,
                          cwd=os.path.dirname(os.path.dirname(
                              os.path.abspath(__file__))))
  _, _, rusage = os.wait4(proc.pid, 0)
  stdout, stderr = proc.stdout.read(), proc.stderr.read()
  for line in stdout.splitlines():
    if line.startswith('RESULT '):
      result = json.loads(line[len('RESULT '):])
      if result['hwm_kib'] < 0:  # No /proc: Linux ru_maxrss is in KiB.
        result['hwm_kib'] = rusage.ru_maxrss
      return result
  raise RuntimeError(f'child {mode} chunk={chunk} failed:\n{stderr[-3000:]}')


def run(args):
  """Prints (and returns) the table."""
  on_device = not args.device.upper().startswith('/CPU')
  chunks = [int(c) for c in args.chunks.split(',') if c]
  configs = [('dense', 0)] + [('chunked', c) for c in chunks]
  if args.reference:
    configs.append(('reference', 0))
  results = {c: [] for c in [('baseline', 0)] + configs}
  # Interleave the repetitions so that slow drift (other processes) hits
  # every configuration alike.
  for _ in range(args.reps):
    for config in results:
      results[config].append(_run_child(args, *config))

  def peak_mib(result):
    if on_device:
      return result['device_peak_bytes'] / 2**20
    return result['hwm_kib'] / 1024

  baseline = statistics.median(peak_mib(r) for r in results[('baseline', 0)])
  if on_device:
    baseline = 0.0  # Device peaks were reset after the warm-up.
  n = args.batch * args.views
  dense_n2 = n * n * 4 / 2**20
  header = (f'supcon_loss forward+backward peak memory, batch {args.batch} x '
            f'{args.views} views x {args.dim} dims (N = {n}; one float32 '
            f'N x N matrix = {dense_n2:.0f} MiB), {args.num_classes} classes, '
            f'device {args.device}, median of {args.reps} processes; '
            f'{"device peak" if on_device else "host VmHWM - baseline"} '
            f'(baseline {baseline:.0f} MiB); ratio = / dense')
  lines = [header, '',
           f'{"configuration":24s} {"peak MiB":>9s} {"ratio":>6s} '
           f'{"seconds":>8s} {"loss":>12s} {"|grad|":>10s}',
           '-' * 74]
  print('\n'.join(lines), flush=True)
  dense = None
  for config in configs:
    peaks = [peak_mib(r) - baseline for r in results[config]]
    peak = statistics.median(peaks)
    dense = peak if config[0] == 'dense' else dense
    seconds = statistics.median(r['seconds'] for r in results[config])
    first = results[config][0]
    name = config[0] if not config[1] else f'chunked {config[1]}'
    line = (f'{name:24s} {peak:9.0f} {peak / dense:6.3f} {seconds:8.2f} '
            f'{first["loss"]:12.4f} {first["grad_norm"]:10.6f}')
    lines.append(line)
    print(line, flush=True)
  lines.append('')
  lines.append('seconds: second call (the first one traces). loss = sum of '
               'per-sample losses, |grad| = norm of the gradient w.r.t. the '
               'features: equal across configurations.')
  text = '\n'.join(lines) + '\n'
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, 'w') as f:
      f.write(text)
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
