"""Throughput of the whole training input pipeline, per augmentation type.

Runs `supcon_tf.data.pipeline.build_dataset` exactly as training does (digits,
8x8 upscaled to --sizes, shuffled, repeated, `num_views` stateless-seeded views
per image, batched, prefetched) and prints source images / second for each
augmentation type at each image size, with the ratio to IDENTITY (random crop
+ flip only) measured in the same run. Each image yields `num_views` views, so
views / second is num_views times the number shown.

`benchmarks/input_pipeline.py` times `augment.preprocess_for_train` alone on
synthetic ImageNet-sized sources; this one times the real pipeline end to end.

  python -m benchmarks.data_pipeline            # ~ minutes on 2 CPU cores
  python -m benchmarks.data_pipeline --quick    # a smoke run

The table is also written to --output (benchmarks/results/data_pipeline.txt).
"""

import argparse
import os
import platform
import time
from typing import List

import tensorflow as tf

from supcon_tf import config as config_lib
from supcon_tf import enums
from supcon_tf.data import pipeline

A = enums.AugmentationType
# (row name, augmentation type, extra AugmentConfig fields).
VARIANTS = (
    ('identity', A.IDENTITY, {}),
    ('simclr (blur deferred)', A.SIMCLR, {}),
    ('simclr (blur in pipeline)', A.SIMCLR, {'defer_blurring': False}),
    ('autoaugment', A.AUTOAUGMENT, {}),
    ('randaugment', A.RANDAUGMENT, {}),
    ('stacked_randaugment', A.STACKED_RANDAUGMENT, {}),
)


def images_per_second(config: config_lib.ExperimentConfig, warmup: int,
                      batches: int) -> float:
  """Source images / s of `batches` training batches after `warmup` ones."""
  iterator = iter(pipeline.build_dataset(config, None, training=True))
  for _ in range(warmup):  # Tracing, thread pools, cache fill, autotune.
    next(iterator)
  start = time.perf_counter()
  for _ in range(batches):
    images, _ = next(iterator)
  images.numpy()
  elapsed = time.perf_counter() - start
  return batches * config.data.batch_size / elapsed


def run(sizes: List[int], batch_size: int, warmup: int, batches: int,
        num_views: int, repeats: int) -> str:
  load = os.getloadavg()[0] if hasattr(os, 'getloadavg') else float('nan')
  lines = [
      f'Input pipeline throughput: supcon_tf.data.pipeline.build_dataset on '
      f'digits, {num_views} views, batch {batch_size}, {batches} timed '
      f'batches after {warmup} warm-up, best of {repeats} round-robin runs.',
      f'Machine: {os.cpu_count()} CPUs ({platform.processor() or "cpu"}), '
      f'TensorFlow {tf.__version__}, load average {load:.1f} at start. '
      'images/s = source images per second.',
      '',
      f'{"augmentation":28s}' + ''.join(
          f'{f"{s}px img/s":>14s}{"ratio":>7s}' for s in sizes),
  ]
  results = {}
  # Round-robin over variants, keeping each one's best run, so that load from
  # other processes on a shared machine skews the ratios less.
  for repeat in range(repeats):
    for size in sizes:
      for name, augmentation_type, extra in VARIANTS:
        config = config_lib.ExperimentConfig().replace(
            data__dataset='digits', data__batch_size=batch_size,
            data__num_views=num_views, augment__image_size=size,
            augment__augmentation_type=augmentation_type,
            **{f'augment__{k}': v for k, v in extra.items()})
        rate = images_per_second(config, warmup, batches)
        results[name, size] = max(results.get((name, size), 0.0), rate)
        print(f'  run {repeat + 1}: {size}px {name}: {rate:.1f} images/s',
              flush=True)
  for name, _, _ in VARIANTS:
    row = f'{name:28s}'
    for size in sizes:
      rate = results[name, size]
      row += f'{rate:14.1f}{rate / results["identity", size]:7.2f}'
    lines.append(row)
  return '\n'.join(lines) + '\n'


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--sizes', type=int, nargs='+', default=[32, 224])
  parser.add_argument('--batch_size', type=int, default=64)
  parser.add_argument('--num_views', type=int, default=2)
  parser.add_argument('--warmup', type=int, default=3)
  parser.add_argument('--batches', type=int, default=10)
  parser.add_argument('--repeats', type=int, default=2)
  parser.add_argument('--quick', action='store_true',
                      help='Batch 16, 1 warm-up, 3 timed batches, 1 run.')
  parser.add_argument('--output', default=os.path.join(
      os.path.dirname(os.path.abspath(__file__)), 'results',
      'data_pipeline.txt'))
  args = parser.parse_args()
  if args.quick:
    args.batch_size, args.warmup, args.batches, args.repeats = 16, 1, 3, 1
  table = run(args.sizes, args.batch_size, args.warmup, args.batches,
              args.num_views, args.repeats)
  print('\n' + table)
  if args.output:
    os.makedirs(os.path.dirname(args.output) or '.', exist_ok=True)
    with open(args.output, 'w') as f:
      f.write(table)
    print(f'Written to {args.output}')


if __name__ == '__main__':
  main()
