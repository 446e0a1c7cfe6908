r"""Pretraining step throughput (XLA, mixed precision) and host-loop overhead.

Both tables run the real `supcon_tf.train.Trainer` (stage 1, SupCon loss,
momentum optimizer) on a tiny ResNet-18 (width 0.25, CIFAR stem, the model of
tests/train_test.py) at 32 px on digits, 2 views per image.

1. Step: `Trainer._make_loop()` (the per-replica step inside the host loop's
   tf.function) fed one fixed batch from `pipeline.build_dataset`, so that the
   input pipeline costs nothing, for --use_xla off / on x
   --allow_mixed_precision off / on. Each variant is compiled first, then all
   four are timed in interleaved rounds; median ms / step, source images / s
   (each image is 2 views) and the throughput ratio to float32 without XLA.
2. Host loop: `Trainer.train()` itself, with the real input pipeline, at
   --steps_per_loop=1 and =20 (summaries and checkpoints out of the way), and
   a lower bound: the same tf.function running all timed steps in one call
   (the pure in-graph loop, no host work between steps). A wrapper around the
   loop function records when each call starts and returns, so the host's
   own time between calls (metrics to Python, checks, progress line) is
   measured directly as well. t_N = wall time per step with steps_per_loop N;
   overhead = t_N / t_inf - 1 and (t_1 - t_N) / t_N. The Trainer is resumed
   for each measurement (same model, same traced loop, same input iterator),
   the three settings interleaved in rounds.

3. Gradient caching (`--micro_batch_size`): a bigger model and batch (by
   default ResNet-18 at width 0.25 on 32 px random images, per-replica batch
   512 x 2 views; `--cache_width=1` for the full-width model) with no
   caching, M=128 and M=32. Each configuration runs in its own subprocess,
   which reports its peak memory and its time per step. Peak memory on the
   CPU: `tf.config.experimental.get_memory_info('CPU:0')` reports zeros
   there, so the child reads its resident set size (RSS): `step MB` = peak
   RSS (`getrusage` ru_maxrss, the high-water mark) minus the RSS after the
   model is built and the step traced (`get_concrete_function`) but not run,
   i.e. what running the step adds (activations, gradients, workspace). On a
   GPU the child reads the device's `get_memory_info` peak instead.
4. The largest per-replica batch whose step fits a memory budget
   (`--budget_mb` of step memory as in 3), without caching and with M=32:
   the batch doubles from `--budget_start` while it fits, each probe in a
   subprocess (one step).
5. The plain train step (`Trainer._make_loop()`, no caching) against Keras
   `model.fit` of the same model (the projection output) with `SupConLoss`:
   same batch (table 3's), float32, no XLA on both sides, SGD with momentum,
   `steps_per_execution` = the steps per call of ours; interleaved rounds in
   one process.

On a shared machine the wall times are noisy: the load average is printed,
and CPU seconds per step are shown next to the wall times.

  python -m benchmarks.train_step            # about 5 min on 2 cores
  python -m benchmarks.train_step --quick    # about 2-3 min
  python -m benchmarks.train_step --tpu=local --batch=1024 --out=''   # TPU VM
  python -m benchmarks.train_step --tables=cache,budget,fit   # about 15 min
"""

import argparse
import contextlib
import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Dict, List

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import keras  # pylint: disable=g-import-not-at-top
import tensorflow as tf  # pylint: disable=g-import-not-at-top

from benchmarks import _report  # pylint: disable=g-import-not-at-top
from supcon_tf import config as config_lib  # pylint: disable=g-import-not-at-top
from supcon_tf import distribute  # pylint: disable=g-import-not-at-top
from supcon_tf import enums  # pylint: disable=g-import-not-at-top
from supcon_tf import losses  # pylint: disable=g-import-not-at-top
from supcon_tf import models  # pylint: disable=g-import-not-at-top
from supcon_tf.data import datasets  # pylint: disable=g-import-not-at-top
from supcon_tf.data import pipeline  # pylint: disable=g-import-not-at-top
from supcon_tf.training import trainer as train  # pylint: disable=g-import-not-at-top


def tiny_config(model_dir: str, batch: int, image_size: int, width=0.25,
                **overrides) -> config_lib.ExperimentConfig:
  """tests/train_test.py's tiny model, long enough not to stop on its own."""
  return config_lib.ExperimentConfig().replace(
      model__depth=18, model__width=width, model__first_conv_kernel_size=3,
      model__first_conv_stride=1, model__use_initial_max_pool=False,
      model__projection_head_layers=(32, 16),
      data__dataset='digits', data__batch_size=batch,
      augment__image_size=image_size,
      augment__augmentation_type=enums.AugmentationType.SIMCLR,
      augment__blur_probability=0.0,
      stage_1__epochs=10_000, stage_1__warmup_epochs=0,
      stage_1__optimizer=enums.Optimizer.MOMENTUM,
      stage_1__base_learning_rate=0.1,
      runtime__model_dir=model_dir, runtime__max_train_steps=10**6,
      runtime__summary_interval_steps=10**6,
      runtime__save_interval_steps=10**6, **overrides)


def _sync(out: Dict[str, tf.Tensor]) -> float:
  return float(out['loss'])


# -----------------------------------------------------------------------------
# Table 1: XLA x mixed precision.


def step_table(args, strategy, model_root: str) -> str:
  variants = []
  for mixed in (False, True):
    for xla in (False, True):
      config = tiny_config(
          os.path.join(model_root, f'step_{mixed}_{xla}'), args.batch,
          args.image_size, runtime__use_xla=xla,
          augment__allow_mixed_precision=mixed)
      keras.utils.set_random_seed(0)
      trainer = train.Trainer(config, strategy, 1)
      batch = next(iter(pipeline.build_dataset(trainer.data_config, None,
                                               training=True)))
      fixed = strategy.experimental_distribute_dataset(
          tf.data.Dataset.from_tensors(batch).repeat())
      iterator = iter(fixed)
      loop = trainer._make_loop()  # pylint: disable=protected-access
      start = time.perf_counter()
      _sync(loop(iterator, tf.constant(2)))  # Trace and compile.
      compile_s = time.perf_counter() - start
      variants.append(dict(
          precision=(models.mixed_precision_policy() if mixed else 'float32'),
          xla=xla, loop=loop, iterator=iterator, compile_s=compile_s,
          wall=[], cpu=[]))
      print(f'  step: built {variants[-1]["precision"]} xla={xla} '
            f'({compile_s:.0f} s to compile)', flush=True)
  steps = tf.constant(args.step_steps)
  for v in variants:  # An untimed round: the first calls after building
    _sync(v['loop'](v['iterator'], steps))  # all four are still slow.
  for r in range(args.step_rounds):
    for v in variants:
      wall, cpu = time.perf_counter(), time.process_time()
      _sync(v['loop'](v['iterator'], steps))
      v['wall'].append((time.perf_counter() - wall) / args.step_steps)
      v['cpu'].append((time.process_time() - cpu) / args.step_steps)
    print(f'  step: round {r + 1}/{args.step_rounds}: ' + ' '.join(
        f'{v["wall"][-1] * 1e3:.0f}' for v in variants) + ' ms/step',
          flush=True)
  base = statistics.median(variants[0]['wall'])
  rows = []
  for v in variants:
    wall = statistics.median(v['wall'])
    rows.append([v['precision'], 'on' if v['xla'] else 'off',
                 f'{v["compile_s"]:.0f}', f'{wall * 1e3:.0f}',
                 f'{statistics.median(v["cpu"]) * 1e3:.0f}',
                 f'{args.batch / wall:.0f}', f'{base / wall:.2f}'])
  return _report.format_table(['precision', 'xla', 'compile s', 'ms/step',
                               'CPU ms/step', 'img/s', 'ratio'], rows)


# -----------------------------------------------------------------------------
# Table 2: host-loop overhead.


class _TimedLoop:
  """Wraps the Trainer's loop function; records (start, end, steps) per call.

  The results are read back before returning, so `end` is when the steps
  finished; the host loop converts them to Python right after anyway.
  """

  def __init__(self, fn):
    self.fn = fn
    self.calls = []

  def __call__(self, iterator, num_steps):
    start, cpu_start = time.perf_counter(), time.process_time()
    out = self.fn(iterator, num_steps)
    for value in out.values():
      value.numpy()
    self.calls.append(dict(start=start, end=time.perf_counter(),
                           cpu_start=cpu_start, cpu_end=time.process_time(),
                           steps=int(num_steps)))
    return out


def _train_more(trainer: train.Trainer, steps_per_loop: int,
                steps: int) -> List:
  """Resumes `trainer` for `steps` more steps; returns its loop calls."""
  step = int(trainer.optimizer.iterations.numpy())
  trainer.config = trainer.config.replace(
      runtime__steps_per_loop=steps_per_loop)
  trainer.plan = dataclasses.replace(trainer.plan, total_steps=step + steps)
  trainer._loop_fn.calls = []  # pylint: disable=protected-access
  with open(os.devnull, 'w') as devnull, contextlib.redirect_stdout(devnull):
    trainer.train()  # Progress lines go to /dev/null, as to a log file.
  return trainer._loop_fn.calls  # pylint: disable=protected-access


def _per_step(calls) -> Dict[str, float]:
  """Seconds per step: in the loop function, between calls, in all; CPU."""
  steps = sum(c['steps'] for c in calls)

  def split(begin, end):
    inside = sum(c[end] - c[begin] for c in calls)
    gaps = [b[begin] - a[end] for a, b in zip(calls, calls[1:])]
    # The gap after the last call is the end of train() (a checkpoint), not
    # a step: the mean gap stands in for it.
    return inside, statistics.mean(gaps) * len(calls) if gaps else 0.0

  inside, host = split('start', 'end')
  cpu_inside, cpu_host = split('cpu_start', 'cpu_end')
  return dict(inside=inside / steps, host=host / steps,
              total=(inside + host) / steps,
              cpu=(cpu_inside + cpu_host) / steps)


def loop_table(args, strategy, model_root: str) -> str:
  config = tiny_config(os.path.join(model_root, 'loop'), args.batch,
                       args.image_size, runtime__steps_per_loop=1)
  keras.utils.set_random_seed(0)
  trainer = train.Trainer(config, strategy, 1)
  raw_loop = trainer._make_loop()  # pylint: disable=protected-access
  trainer._loop_fn = _TimedLoop(raw_loop)  # pylint: disable=protected-access
  # Resuming normally rebuilds the input stream at the resumed position; here
  # one stream serves every measurement so that none pays its start-up.
  make_iterator = trainer.make_iterator

  def keep_iterator(start_step):
    if trainer.iterator is None:
      return make_iterator(start_step)
    return trainer.iterator
  trainer.make_iterator = keep_iterator
  # Warm-up: trace the loop, fill the input pipeline's cache and buffers.
  _train_more(trainer, args.loop_n, args.loop_n + 2)
  results = {1: [], args.loop_n: [], 'inf': []}
  for r in range(args.loop_rounds):
    for n in (1, args.loop_n):
      steps = args.loop_steps_1 if n == 1 else args.loop_steps
      results[n].append(_per_step(_train_more(trainer, n, steps)))
    bound = _TimedLoop(raw_loop)
    bound(trainer.iterator, tf.constant(args.loop_steps))
    results['inf'].append(_per_step(bound.calls))
    print(f'  loop: round {r + 1}/{args.loop_rounds}', flush=True)

  def med(key, part):
    return statistics.median(x[part] for x in results[key])

  t_inf, c_inf = med('inf', 'total'), med('inf', 'cpu')
  t_n, c_n = med(args.loop_n, 'total'), med(args.loop_n, 'cpu')
  rows = []
  for key, name in ((1, 'steps_per_loop=1'),
                    (args.loop_n, f'steps_per_loop={args.loop_n}'),
                    ('inf', 'one in-graph loop (bound)')):
    total = med(key, 'total')
    host, cpu = med(key, 'host'), med(key, 'cpu')
    rows.append([name, f'{total * 1e3:.1f}', f'{med(key, "inside") * 1e3:.1f}',
                 f'{host * 1e3:.2f}', f'{host / total * 100:.2f}%',
                 f'{cpu * 1e3:.0f}',
                 f'{(total / t_inf - 1) * 100:+.1f}% / '
                 f'{(cpu / c_inf - 1) * 100:+.1f}%',
                 f'{(total - t_n) / t_n * 100:+.1f}% / '
                 f'{(cpu - c_n) / c_n * 100:+.1f}%'])
  return _report.format_table(
      ['host loop', 'ms/step', 'in tf.function', 'host ms/step', 'host share',
       'CPU ms/step', 'vs bound (wall / CPU)',
       f'vs N={args.loop_n} (wall / CPU)'], rows)


# -----------------------------------------------------------------------------
# Tables 3-5: gradient caching (memory, time), batch under a budget, model.fit.


def _rss_mb() -> float:
  with open('/proc/self/statm') as f:
    return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 2**20


def _fixed_data(batch: int, image_size: int) -> tf.data.Dataset:
  """One fixed random batch, repeated: no input pipeline in the way."""
  images = tf.random.stateless_uniform([batch, 2, image_size, image_size, 3],
                                       [1, 2])
  labels = tf.random.stateless_uniform([batch], [3, 4], maxval=10,
                                       dtype=tf.int32)
  return tf.data.Dataset.from_tensors((images, labels)).repeat()


def _random_batch(strategy, batch: int, image_size: int):
  return strategy.experimental_distribute_dataset(
      _fixed_data(batch, image_size))


def _any_batch_size():
  """Lets the Trainer take batches larger than digits' 1437 training images
  (tables 3-5 feed random images; only the step count reads the size)."""
  get_info = datasets.get_dataset_info

  def patched(data_config):
    return dataclasses.replace(get_info(data_config),
                               num_train_examples=10**7)
  train.datasets.get_dataset_info = patched


def child(spec: Dict) -> Dict:
  """One configuration in this (fresh) process: peak memory, time/step."""
  _any_batch_size()
  strategy = distribute.build_strategy(tpu=spec.get('tpu', ''))
  batch = spec['batch'] * strategy.num_replicas_in_sync
  with tempfile.TemporaryDirectory() as model_dir:
    config = tiny_config(model_dir, batch, spec['image_size'],
                         width=spec['width'],
                         runtime__micro_batch_size=spec['micro'])
    keras.utils.set_random_seed(0)
    trainer = train.Trainer(config, strategy, 1)
    iterator = iter(_random_batch(strategy, batch, spec['image_size']))
    loop = trainer._make_loop()  # pylint: disable=protected-access
    one = tf.constant(1)
    loop.get_concrete_function(iterator, one)  # Trace, do not run.
    device = strategy.extended.worker_devices[0]
    gpu = 'GPU' in device.upper()
    if gpu:
      tf.config.experimental.reset_memory_stats(device)
    before = _rss_mb()
    _sync(loop(iterator, one))  # The first run: the peak.
    times, cpus = [], []
    for _ in range(spec['steps']):
      wall, cpu = time.perf_counter(), time.process_time()
      _sync(loop(iterator, one))
      times.append(time.perf_counter() - wall)
      cpus.append(time.process_time() - cpu)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out = dict(spec, rss_before_mb=before, peak_rss_mb=peak,
               step_mb=peak - before)
    if gpu:
      out['step_mb'] = tf.config.experimental.get_memory_info(
          device)['peak'] / 2**20
    if times:
      out.update(s_per_step=statistics.median(times),
                 cpu_s_per_step=statistics.median(cpus))
    return out


def _run_child(spec: Dict, timeout: int = 1800) -> Dict:
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3')
  proc = subprocess.run(
      [sys.executable, '-m', 'benchmarks.train_step',
       '--child=' + json.dumps(spec)], capture_output=True, text=True,
      timeout=timeout, env=env)
  lines = [l for l in proc.stdout.splitlines() if l.startswith('{')]
  if proc.returncode != 0 or not lines:
    # Out of memory (killed) counts as not fitting.
    return dict(spec, failed=f'exit {proc.returncode}: '
                f'{proc.stderr.strip().splitlines()[-1:]}')
  return json.loads(lines[-1])


def cache_table(args) -> str:
  rows, results = [], []
  for micro in (0, 128, 32):
    spec = dict(batch=args.cache_batch, micro=micro, width=args.cache_width,
                image_size=args.image_size, steps=args.cache_steps,
                tpu=args.tpu)
    results.append(_run_child(spec))
    r = results[-1]
    print(f'  cache: M={micro or "-"}: ' + (
        r.get('failed') or f'{r["step_mb"]:.0f} MB, '
        f'{r["s_per_step"]:.2f} s/step'), flush=True)
  base = results[0]
  for r in results:
    if 'failed' in r:
      rows.append([str(r['micro'] or 'off'), r['failed']] + [''] * 6)
      continue
    rows.append([
        f'M={r["micro"]}' if r['micro'] else 'off',
        f'{r["peak_rss_mb"]:.0f}', f'{r["step_mb"]:.0f}',
        f'{r["step_mb"] / base["step_mb"]:.2f}',
        f'{r["s_per_step"]:.2f}', f'{r["cpu_s_per_step"]:.2f}',
        f'{args.cache_batch / r["s_per_step"]:.0f}',
        f'{r["s_per_step"] / base["s_per_step"]:.2f} / '
        f'{r["cpu_s_per_step"] / base["cpu_s_per_step"]:.2f}'])
  return _report.format_table(
      ['micro-batch', 'peak RSS MB', 'step MB', 'memory ratio', 's/step',
       'CPU s/step', 'img/s', 'time ratio (wall / CPU)'], rows)


def budget_table(args) -> str:
  """Per configuration: from --budget_start, halve until the step fits the
  budget or double while it does (each probe one subprocess)."""
  rows = []
  for micro in (0, 32):
    probes = {}

    def fits(batch, micro=micro, probes=probes):
      r = _run_child(dict(batch=batch, micro=micro, width=args.cache_width,
                          image_size=args.image_size, steps=0, tpu=args.tpu))
      probes[batch] = r.get('step_mb', float('inf'))
      print(f'  budget: M={micro or "-"} batch {batch}: ' +
            (r.get('failed') or f'{r["step_mb"]:.0f} MB'), flush=True)
      return 'failed' not in r and r['step_mb'] <= args.budget_mb

    batch, largest = args.budget_start, 0
    if fits(batch):
      largest = batch
      while batch * 2 <= args.budget_max and fits(batch * 2):
        batch *= 2
        largest = batch
    else:
      while batch // 2 >= max(micro, 1) and batch // 2 > 0:
        batch //= 2
        if fits(batch):
          largest = batch
          break
    capped = largest * 2 > args.budget_max and largest == batch
    rows.append([f'M={micro}' if micro else 'off',
                 f'{largest}{"+" if capped else ""}',
                 ' '.join(f'{b}:{m:.0f}' for b, m in sorted(probes.items()))])
  return _report.format_table(
      ['micro-batch', 'largest batch', 'probes (batch:step MB)'], rows)


def fit_table(args, strategy, model_root: str) -> str:
  """Our plain step vs Keras model.fit, interleaved rounds."""
  _any_batch_size()
  batch = args.cache_batch * strategy.num_replicas_in_sync
  config = tiny_config(os.path.join(model_root, 'fit'), batch,
                       args.image_size, width=args.cache_width)
  keras.utils.set_random_seed(0)
  trainer = train.Trainer(config, strategy, 1)
  iterator = iter(_random_batch(strategy, batch, args.image_size))
  loop = trainer._make_loop()  # pylint: disable=protected-access
  steps = tf.constant(args.fit_steps)

  class _Projection(keras.Model):
    def __init__(self, model):
      super().__init__(name='projection_only')
      self.inner = model

    def call(self, images, training=False):
      return self.inner(images, training=training)[models.PROJECTION]

  with strategy.scope():
    keras.utils.set_random_seed(0)
    fit_model = _Projection(models.build_experiment_model(config, 10))
    fit_model.compile(
        optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
        loss=losses.SupConLoss(temperature=config.loss.temperature),
        jit_compile=False, steps_per_execution=args.fit_steps)
  fit_data = _fixed_data(batch, args.image_size)

  class _EpochTimer(keras.callbacks.Callback):
    """Wall and CPU time of the fit() epoch (not fit()'s own set-up)."""

    def on_epoch_begin(self, epoch, logs=None):
      self.start = (time.perf_counter(), time.process_time())

    def on_epoch_end(self, epoch, logs=None):
      self.took = (time.perf_counter() - self.start[0],
                   time.process_time() - self.start[1])

  timer = _EpochTimer()

  def run_fit():
    fit_model.fit(fit_data, steps_per_epoch=args.fit_steps, epochs=1,
                  verbose=0, callbacks=[timer])
    return timer.took

  _sync(loop(iterator, steps))  # Trace and warm up both.
  run_fit()
  ours, theirs = [], []
  def run_ours():
    wall, cpu = time.perf_counter(), time.process_time()
    _sync(loop(iterator, steps))
    return time.perf_counter() - wall, time.process_time() - cpu

  for r in range(args.fit_rounds):
    # Alternate which goes first: the machine's load drifts.
    first, second = (run_ours, run_fit) if r % 2 == 0 else (run_fit,
                                                            run_ours)
    a, b = first(), second()
    o, t = (a, b) if r % 2 == 0 else (b, a)
    ours.append(tuple(x / args.fit_steps for x in o))
    theirs.append(tuple(x / args.fit_steps for x in t))
    print(f'  fit: round {r + 1}/{args.fit_rounds}: ours '
          f'{ours[-1][0]:.2f} s/step, model.fit {theirs[-1][0]:.2f} s/step',
          flush=True)
  rows = []
  o, t = [[statistics.median(x[i] for x in runs) for i in (0, 1)]
          for runs in (ours, theirs)]
  for name, (wall, cpu) in (('Trainer (plain step)', o),
                            ('Keras model.fit + SupConLoss', t)):
    rows.append([name, f'{wall:.2f}', f'{cpu:.2f}', f'{batch / wall:.0f}',
                 f'{t[0] / wall:.2f} / {t[1] / cpu:.2f}'])
  return _report.format_table(
      ['train step', 's/step', 'CPU s/step', 'img/s',
       'img/s over model.fit (wall / CPU)'], rows)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--quick', action='store_true',
                      help='Batch 32, fewer steps and rounds.')
  parser.add_argument('--batch', type=int, default=None,
                      help='Global batch (images; 2 views each). Default 64.')
  parser.add_argument('--image_size', type=int, default=32)
  parser.add_argument('--tables', default='step,loop',
                      help='Comma-separated: step, loop, cache (gradient '
                      'caching), budget, fit (vs Keras model.fit).')
  parser.add_argument('--cache_batch', type=int, default=512,
                      help='Tables 3 and 5: per-replica batch (images).')
  parser.add_argument('--cache_width', type=float, default=0.25,
                      help='Tables 3-5: ResNet-18 width (1 = full).')
  parser.add_argument('--cache_steps', type=int, default=2,
                      help='Table 3: timed steps per configuration.')
  parser.add_argument('--budget_mb', type=float, default=1000,
                      help='Table 4: step-memory budget (MB).')
  parser.add_argument('--budget_start', type=int, default=512)
  parser.add_argument('--budget_max', type=int, default=4096)
  parser.add_argument('--fit_steps', type=int, default=3,
                      help='Table 5: steps per call / per fit() epoch.')
  parser.add_argument('--fit_rounds', type=int, default=5)
  parser.add_argument('--child', default='', help=argparse.SUPPRESS)
  parser.add_argument('--loop_n', type=int, default=20)
  parser.add_argument('--tpu', default='',
                      help='TPU name or "local"; default: this host\'s '
                      'devices (one GPU if there is one, else the CPU).')
  parser.add_argument('--out', default='benchmarks/results/train_step.txt',
                      help="Where to save the tables; '' = do not save.")
  args = parser.parse_args()
  if args.child:  # One configuration of tables 3 and 4.
    print(json.dumps(child(json.loads(args.child))), flush=True)
    return
  quick = args.quick
  args.batch = args.batch or (32 if quick else 64)
  args.step_steps = 2 if quick else 3
  args.step_rounds = 3 if quick else 5
  args.loop_rounds = 1 if quick else 2
  args.loop_steps = 2 * args.loop_n  # Two chunks: one gap measured.
  args.loop_steps_1 = args.loop_n
  tables = set(args.tables.split(','))
  strategy = distribute.build_strategy(tpu=args.tpu)
  load_start = os.getloadavg()[0]
  start = time.perf_counter()
  out = []
  with tempfile.TemporaryDirectory() as model_root:
    if 'step' in tables:
      out += ['', f'1. Pretraining step, batch {args.batch} x 2 views at '
              f'{args.image_size} px, input fixed in memory; median of '
              f'{args.step_rounds} interleaved rounds of {args.step_steps} '
              'steps; ratio = img/s over float32 without XLA.',
              step_table(args, strategy, model_root)]
    if 'loop' in tables:
      out += ['', f'2. Host loop: Trainer.train() with the input pipeline, '
              f'median of {args.loop_rounds} interleaved rounds '
              f'({args.loop_steps_1} steps at N=1, {args.loop_steps} at '
              f'N={args.loop_n} and in the bound). host ms/step = time '
              'between loop calls per step (measured directly); vs bound = '
              't_N / t_inf - 1; vs N = (t - t_N) / t_N; wall differences of '
              'a few % are noise on a shared machine, CPU time is steadier.',
              loop_table(args, strategy, model_root)]
    if 'cache' in tables:
      out += ['', f'3. Gradient caching (--micro_batch_size): ResNet-18 '
              f'width {args.cache_width:g} at {args.image_size} px, '
              f'per-replica batch {args.cache_batch} x 2 views, float32; one '
              'subprocess per row. step MB = peak RSS - RSS with the model '
              'built and the step traced but not run; time = median of '
              f'{args.cache_steps} steps; ratios over no caching.',
              cache_table(args)]
    if 'budget' in tables:
      out += ['', f'4. Largest per-replica batch (from {args.budget_start}, '
              'halved or doubled) whose step MB (as in 3) is <= '
              f'{args.budget_mb:g} MB; "+" = the search stopped at '
              f'{args.budget_max}.', budget_table(args)]
    if 'fit' in tables:
      out += ['', f'5. Plain train step vs Keras model.fit (same model, '
              f'SupConLoss, batch {args.cache_batch} x 2 views, float32, no '
              f'XLA), median of {args.fit_rounds} interleaved rounds of '
              f'{args.fit_steps} steps.',
              fit_table(args, strategy, model_root)]
  device = strategy.extended.worker_devices[0]
  header = (
      f'# benchmarks/train_step.py {"--quick" if quick else ""}: '
      f'ResNet-18 (tables 1-2: width 0.25, digits; 3-5: width '
      f'{args.cache_width:g}, random images), SupCon stage 1, '
      f'{time.perf_counter() - start:.0f} s\n'
      f'{_report.machine_line()}  device={device}  '
      f'{strategy.num_replicas_in_sync} replica(s)\n'
      f'# load average {load_start:.1f} at the start, '
      f'{os.getloadavg()[0]:.1f} at the end (1 min)')
  text = header + '\n' + '\n'.join(out) + '\n'
  print('\n' + text)
  _report.save(text, args.out)


if __name__ == '__main__':
  main()
