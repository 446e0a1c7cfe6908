"""Throughput of the augmentation policies and of the deferred blur.

Prints one table of images / second per training policy (and the eval crop),
with the ratio to the IDENTITY policy (random crop + flip only), and one table
for `batch_random_blur` (eager vs XLA) against in-pipeline blurring.

Synthetic uint8 images of --source_size pass through
`augment.preprocess_for_train` inside `tf.data.Dataset.map` with stateless
seeds, as `supcon_tf.data.pipeline` does, so the numbers are CPU input-pipeline
costs per host. Example:

  python -m benchmarks.input_pipeline --image_size=224 --num_images=512
"""

import argparse
import time
from typing import Callable, Dict, List, Tuple

import numpy as np
import tensorflow as tf

from supcon_tf import enums
from supcon_tf.config import AugmentConfig
from supcon_tf.data import augment


def _dataset(images: np.ndarray, fn: Callable[[tf.Tensor, tf.Tensor],
                                              tf.Tensor]) -> tf.data.Dataset:
  """Endless stream of fn(image, stateless seed), as the train pipeline."""
  ds = tf.data.Dataset.from_tensor_slices(images).repeat().enumerate()
  base = tf.constant([0, 1], tf.int64)

  def map_fn(index, image):
    return fn(image, tf.random.experimental.stateless_fold_in(base, index))

  return ds.map(map_fn, num_parallel_calls=tf.data.AUTOTUNE).prefetch(
      tf.data.AUTOTUNE)


def _images_per_second(ds: tf.data.Dataset, num_images: int,
                       repeats: int) -> float:
  """Best of `repeats` timings of `num_images` images from one iterator.

  One iterator for all timings: instantiating the map function (large for
  AutoAugment's 25 branches) is a one-off cost, not a per-image one.
  """
  iterator = iter(ds)
  for _ in range(max(num_images // 4, 8)):  # Warm up threads and buffers.
    next(iterator)
  best = 0.
  for _ in range(repeats):
    start = time.perf_counter()
    for _ in range(num_images):
      next(iterator)
    best = max(best, num_images / (time.perf_counter() - start))
  return best


def policy_table(args) -> List[Tuple[str, float]]:
  h, w = args.source_size
  images = np.random.RandomState(0).randint(
      0, 256, (args.num_images, h, w, 3)).astype(np.uint8)
  base = AugmentConfig(image_size=args.image_size, defer_blurring=True)
  configs: Dict[str, AugmentConfig] = {
      'identity (crop+flip)': AugmentConfig(
          image_size=args.image_size,
          augmentation_type=enums.AugmentationType.IDENTITY),
      'simclr, blur deferred': AugmentConfig(
          image_size=args.image_size,
          augmentation_type=enums.AugmentationType.SIMCLR),
      'simclr, blur in pipeline': AugmentConfig(
          image_size=args.image_size,
          augmentation_type=enums.AugmentationType.SIMCLR,
          defer_blurring=False),
      'simclr, pytorch jitter': AugmentConfig(
          image_size=args.image_size,
          augmentation_type=enums.AugmentationType.SIMCLR,
          use_pytorch_color_jitter=True),
      'simclr, warp p=0.5': AugmentConfig(
          image_size=args.image_size,
          augmentation_type=enums.AugmentationType.SIMCLR,
          warp_probability=0.5),
      'autoaugment': AugmentConfig(
          image_size=args.image_size,
          augmentation_type=enums.AugmentationType.AUTOAUGMENT,
          augmentation_magnitude=1.0),
      'randaugment M=9': AugmentConfig(
          image_size=args.image_size,
          augmentation_type=enums.AugmentationType.RANDAUGMENT,
          augmentation_magnitude=9.),
      'stacked randaugment': AugmentConfig(
          image_size=args.image_size,
          augmentation_type=enums.AugmentationType.STACKED_RANDAUGMENT,
          augmentation_magnitude=1.0),
  }
  rows = []
  for name, config in configs.items():
    ds = _dataset(images, lambda x, s, c=config: augment.preprocess_for_train(
        x, c, seed=s))
    rows.append((name, _images_per_second(ds, args.num_images, args.repeats)))
  ds = _dataset(images, lambda x, s: augment.preprocess_for_eval(x, base))
  rows.append(('eval crop', _images_per_second(ds, args.num_images,
                                               args.repeats)))
  return rows


def blur_table(args) -> List[Tuple[str, float]]:
  size, batch = args.image_size, args.blur_batch
  images = tf.random.uniform([batch, size, size, 3], seed=0)
  eager = tf.function(lambda x: augment.batch_random_blur(x, 0.5))
  xla = tf.function(lambda x: augment.batch_random_blur(x, 0.5),
                    jit_compile=True)
  rows = []
  for name, fn in (('batch_random_blur, tf.function', eager),
                   ('batch_random_blur, XLA', xla)):
    fn(images).numpy()  # Compile.
    best = 0.
    for _ in range(args.repeats):
      start = time.perf_counter()
      fn(images).numpy()
      best = max(best, batch / (time.perf_counter() - start))
    rows.append((name, best))
  return rows


def _print(title: str, rows: List[Tuple[str, float]], reference: float):
  print(f'\n{title}')
  print(f'{"":32s} {"images/s":>10s} {"ratio":>7s}')
  for name, rate in rows:
    print(f'{name:32s} {rate:10.1f} {rate / reference:7.2f}')


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--image_size', type=int, default=224)
  parser.add_argument('--source_size', type=int, nargs=2, default=(375, 500),
                      metavar=('H', 'W'), help='Synthetic input image size.')
  parser.add_argument('--num_images', type=int, default=256)
  parser.add_argument('--blur_batch', type=int, default=64)
  parser.add_argument('--repeats', type=int, default=2)
  args = parser.parse_args()
  print(f'image_size={args.image_size} source={args.source_size} '
        f"num_images={args.num_images}")
  rows = policy_table(args)
  _print('Training policies (tf.data, per host; ratio to identity)', rows,
         rows[0][1])
  blur_rows = blur_table(args)
  _print('Deferred blur per image (ratio to tf.function)', blur_rows,
         blur_rows[0][1])


if __name__ == '__main__':
  main()
