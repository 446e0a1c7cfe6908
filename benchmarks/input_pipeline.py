r"""Input pipeline throughput: our policies end to end, against Keras 3 and the
TF Model Garden, and the deferred blur.

Three tables, each measured in interleaved rounds (every configuration once
per round, a fresh iterator each time, median over rounds), so that load from
other processes on a shared machine hits all configurations alike:

1. Pipeline: `supcon_tf.data.pipeline.build_dataset` exactly as training
   runs it (digits upscaled by the random resized crop to --sizes, shuffled,
   repeated, 2 stateless-seeded views per image, batched, prefetched), per
   augmentation type, with the ratio to IDENTITY (crop + flip only). tf.data
   computes several batches at once here (map and batch are fused), so each
   round first takes 3 batches to reach a steady state, then times 8 (2 and
   3 with --quick).
2. Baselines: the policy alone on the same uint8 S x S images (uint8 in,
   float32 [0, 1] batches out), ours against the same policy from Keras 3
   (`keras.layers.RandAugment`; for SimCLR a `keras.layers.Pipeline` of
   RandomFlip, RandomColorJitter, RandomGrayscale, RandomGaussianBlur) and from
   the TF Model Garden (`official.vision.ops.augment.RandAugment` /
   `AutoAugment('v0')`). Each runs the way its library intends: ours and the
   Model Garden's per image in `Dataset.map` (as their input pipelines do),
   Keras layers per batch (`Dataset.batch().map(layer)`, their documented
   tf.data use, which amortises per-op overhead over the batch). These maps
   run without parallel calls or prefetching, so that the CPU time of a timed
   window is exactly the work of the batches it returns (with parallel calls,
   batches computed ahead during the warm-up would be counted as free); this
   is the cost per image, which is what a parallel pipeline divides among its
   cores.
3. Deferred blur: `augment.batch_random_blur` on a batch of views in the
   train step (tf.function, XLA) against blurring each view in the pipeline
   (sequential map, as in table 2).
4. Image folders (`--dataset=folder:PATH`): `build_dataset` reading a
   class-per-subfolder tree of JPEG files (read + decode + 2 SimCLR views,
   batched), against `keras.utils.image_dataset_from_directory` (its own
   parallel read, decode and resize to S x S) followed by the same two
   SimCLR views per image (`pipeline.train_views`, whitened with the same
   constants) in a parallel map. The
   files are written once to a temporary folder: digits, coloured with
   noise, saved as S x S JPEGs for 32 px and 256 x 256 JPEGs (decoded, then
   cropped to 224) for 224 px, as CIFAR and ImageNet are fed.

Throughput is reported as images per CPU-second (the process's CPU time, all
threads): on a machine shared with other jobs this is far steadier than
wall-clock images/s, which is shown too. A dedicated host with n free cores
reaches about n times the per-CPU-second figure when the pipeline scales.

The Model Garden baseline needs `pip install --no-deps tf-models-official`
(a benchmark-only dependency, not in setup.py); only
`official/vision/ops/augment.py` is loaded, with stubs for its unused
imports (`tf_keras`, detection configs), so no other package is pulled in.
Without it those columns read n/a.

  python -m benchmarks.input_pipeline            # 5-6 min on 2 busy cores
  python -m benchmarks.input_pipeline --quick    # about 2 min
  python -m benchmarks.input_pipeline --sizes 224 --out ''   # on a TPU host
"""

import argparse
import importlib.util
import os
import statistics
import sys
import tempfile
import time
import types
from typing import Callable, Dict, List, Optional, Tuple

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import keras  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top
import tensorflow as tf  # pylint: disable=g-import-not-at-top

from benchmarks import _report  # pylint: disable=g-import-not-at-top
from supcon_tf import config as config_lib  # pylint: disable=g-import-not-at-top
from supcon_tf import enums  # pylint: disable=g-import-not-at-top
from supcon_tf.data import augment  # pylint: disable=g-import-not-at-top
from supcon_tf.data import datasets  # pylint: disable=g-import-not-at-top
from supcon_tf.data import pipeline  # pylint: disable=g-import-not-at-top

tf.autograph.set_verbosity(0)
A = enums.AugmentationType

# Table 1 rows: (name, augmentation type, extra AugmentConfig fields). The
# magnitudes are the flagfiles' (flags/*.cfg); RandAugment has no flagfile,
# M = 9 is the usual ImageNet setting.
PIPELINE_VARIANTS = (
    ('identity (crop + flip)', A.IDENTITY, {}),
    ('simclr, blur deferred', A.SIMCLR, {'augmentation_magnitude': 0.5}),
    ('simclr, blur in pipeline', A.SIMCLR,
     {'augmentation_magnitude': 0.5, 'defer_blurring': False}),
    ('autoaugment', A.AUTOAUGMENT, {'augmentation_magnitude': 1.0}),
    ('randaugment M=9', A.RANDAUGMENT, {'augmentation_magnitude': 9.0}),
    ('stacked_randaugment', A.STACKED_RANDAUGMENT,
     {'augmentation_magnitude': 1.0}),
)


# -----------------------------------------------------------------------------
# Timing.


class Candidate:
  """One configuration: how to build its dataset / step and time a round."""

  def __init__(self, key: Tuple, images_per_item: int,
               make_iterator: Callable[[], Callable[[], object]]):
    self.key = key
    self.images_per_item = images_per_item
    self.make_iterator = make_iterator
    self.cpu_rates: List[float] = []
    self.wall_rates: List[float] = []

  def time_round(self, warmup: int, items: int):
    get_next = self.make_iterator()
    for _ in range(warmup):  # Threads, buffers, cache fill, autotune.
      _wait(get_next())
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(items):
      out = get_next()
    _wait(out)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    images = items * self.images_per_item
    self.cpu_rates.append(images / max(cpu, 1e-9))
    self.wall_rates.append(images / max(wall, 1e-9))
    del get_next  # Stops the iterator's threads before the next candidate.

  @property
  def cpu_rate(self) -> float:
    return statistics.median(self.cpu_rates)

  @property
  def wall_rate(self) -> float:
    return statistics.median(self.wall_rates)


def _wait(out):
  first = tf.nest.flatten(out)[0]
  if hasattr(first, 'numpy'):
    first.numpy()


def _dataset_iterator(make_dataset: Callable[[], tf.data.Dataset]):
  """Builds the dataset once (tracing), a new iterator per round."""
  dataset = make_dataset()

  def make_iterator():
    iterator = iter(dataset)
    return lambda: next(iterator)
  return make_iterator


def _run_rounds(candidates: List[Candidate], rounds: int, warmup: int,
                items: Callable[[Candidate], int], label: str):
  for r in range(rounds):
    start = time.perf_counter()
    for c in candidates:
      c.time_round(warmup, items(c))
    print(f'  {label}: round {r + 1}/{rounds} '
          f'{time.perf_counter() - start:.0f} s', flush=True)


# -----------------------------------------------------------------------------
# Table 1: the real pipeline.


def pipeline_candidates(sizes: List[int], batch: int) -> List[Candidate]:
  candidates = []
  for size in sizes:
    for name, augmentation_type, extra in PIPELINE_VARIANTS:
      config = config_lib.ExperimentConfig().replace(
          data__dataset='digits', data__batch_size=batch, data__num_views=2,
          augment__image_size=size,
          augment__augmentation_type=augmentation_type,
          **{f'augment__{k}': v for k, v in extra.items()})
      candidates.append(Candidate(
          ('pipeline', size, name), batch, _dataset_iterator(
              lambda c=config: pipeline.build_dataset(c, None,
                                                      training=True))))
  return candidates


# -----------------------------------------------------------------------------
# Table 2: ours against Keras 3 and the TF Model Garden.


class _Stub(types.ModuleType):
  """A module whose every attribute is a stub (sub-module or class)."""

  def __getattr__(self, name):
    if name.startswith('__'):
      raise AttributeError(name)
    if name[:1].islower():
      return _Stub(f'{self.__name__}.{name}')
    return type(name, (), {})


def load_model_garden_augment() -> Tuple[Optional[types.ModuleType], str]:
  """`official/vision/ops/augment.py` alone, or (None, why not).

  Importing it as `official.vision.ops.augment` would run
  `official/vision/__init__.py`, which needs tf_keras, gin, yaml and more; the
  file itself only uses them in detection ops that are not run here.
  """
  spec = importlib.util.find_spec('official')
  if spec is None or not spec.submodule_search_locations:
    return None, 'tf-models-official not installed'
  path = os.path.join(list(spec.submodule_search_locations)[0], 'vision',
                      'ops', 'augment.py')
  if not os.path.exists(path):
    return None, f'{path} not found'
  stubbed = ('tf_keras', 'official', 'official.vision',
             'official.vision.configs', 'official.vision.configs.common',
             'official.vision.ops', 'official.vision.ops.box_ops')
  saved = {name: sys.modules.get(name) for name in stubbed}
  for name in stubbed:
    if saved[name] is None:
      sys.modules[name] = _Stub(name)
  try:
    file_spec = importlib.util.spec_from_file_location(
        '_model_garden_augment', path)
    module = importlib.util.module_from_spec(file_spec)
    file_spec.loader.exec_module(module)
  except Exception as e:  # pylint: disable=broad-except
    return None, f'loading {path} failed: {e!r}'
  finally:
    for name, previous in saved.items():
      if previous is None:
        sys.modules.pop(name, None)
  version = 'unknown'
  try:
    from importlib import metadata  # pylint: disable=g-import-not-at-top
    version = metadata.version('tf-models-official')
  except Exception:  # pylint: disable=broad-except
    pass
  return module, version


def _source_images(size: int, count: int = 256) -> np.ndarray:
  """uint8 [count, size, size, 3]: digits, bilinearly upscaled."""
  images, _ = datasets._digits_arrays()['train']  # pylint: disable=protected-access
  images = tf.image.resize(images[:count].astype(np.float32), [size, size])
  return np.clip(np.round(images.numpy()), 0, 255).astype(np.uint8)


def _per_image(images: np.ndarray, batch: int,
               fn: Callable[[tf.Tensor, tf.Tensor], tf.Tensor]):
  """fn(uint8 image, stateless seed) per image in Dataset.map, batched."""
  def make():
    base = tf.constant([0, 1], tf.int64)
    ds = tf.data.Dataset.from_tensor_slices(images).repeat().enumerate()
    ds = ds.map(lambda i, x: fn(
        x, tf.random.experimental.stateless_fold_in(base, i)))
    return ds.batch(batch)
  return _dataset_iterator(make)


def _per_batch(images: np.ndarray, batch: int, layer: keras.layers.Layer):
  """A Keras preprocessing layer on float [0, 1] batches in Dataset.map."""
  def make():
    ds = tf.data.Dataset.from_tensor_slices(images).repeat().batch(batch)
    return ds.map(lambda x: layer(tf.cast(x, tf.float32) / 255.))
  return _dataset_iterator(make)


def _ours_simclr(x, seed):
  flip_seed, seed = augment.split_seed(seed, 2)
  image = augment.random_flip(augment.to_float_image(x), flip_seed)
  return augment.simclr_augment(image, strength=0.5, blur_probability=0.5,
                                seed=seed)


def _keras_simclr(size: int) -> keras.layers.Layer:
  """SimCLR-like: flip, colour jitter (always), grayscale 0.2, blur 0.5."""
  radius = augment.blur_radius(size)
  layers = [
      keras.layers.RandomFlip('horizontal'),
      keras.layers.RandomColorJitter(
          value_range=(0, 1), brightness_factor=0.4, contrast_factor=0.4,
          saturation_factor=(0.3, 0.7), hue_factor=0.1),
      keras.layers.RandomGrayscale(0.2),
  ]
  if radius > 0:
    layers.append(keras.layers.RandomGaussianBlur(
        factor=(0.5, 0.5), kernel_size=2 * radius + 1, sigma=(0.1, 2.0),
        value_range=(0, 1)))
  return keras.layers.Pipeline(layers)


# (policy, implementation) -> what builds its candidate. Policies: the
# paper's settings; RandAugment at M = 10 (Keras factor 1.0).
BASELINE_POLICIES = ('randaugment N=2 M=10', 'autoaugment v0',
                     'simclr (flip, jitter, gray, blur)')
IMPLEMENTATIONS = ('ours', 'keras', 'model_garden')


def baseline_candidates(sizes: List[int], batch: int,
                        mg: Optional[types.ModuleType]) -> List[Candidate]:
  candidates = []
  to_float = augment.to_float_image
  for size in sizes:
    images = _source_images(size)
    builders: Dict[Tuple[str, str], Callable] = {
        (BASELINE_POLICIES[0], 'ours'): lambda: _per_image(
            images, batch, lambda x, s: augment.randaugment(
                to_float(x), 2, 10., seed=s)),
        (BASELINE_POLICIES[0], 'keras'): lambda: _per_batch(
            images, batch, keras.layers.RandAugment(
                value_range=(0, 1), num_ops=2, factor=1.0)),
        (BASELINE_POLICIES[1], 'ours'): lambda: _per_image(
            images, batch, lambda x, s: augment.autoaugment(
                to_float(x), seed=s)),
        (BASELINE_POLICIES[2], 'ours'): lambda: _per_image(
            images, batch, _ours_simclr),
        (BASELINE_POLICIES[2], 'keras'): lambda: _per_batch(
            images, batch, _keras_simclr(size)),
    }
    if mg is not None:
      rand_augment = mg.RandAugment(num_layers=2, magnitude=10.)
      auto_augment = mg.AutoAugment('v0')
      builders[BASELINE_POLICIES[0], 'model_garden'] = lambda: _per_image(
          images, batch,
          lambda x, s: tf.cast(rand_augment.distort(x), tf.float32) / 255.)
      builders[BASELINE_POLICIES[1], 'model_garden'] = lambda: _per_image(
          images, batch,
          lambda x, s: tf.cast(auto_augment.distort(x), tf.float32) / 255.)
    for (policy, implementation), build in builders.items():
      candidates.append(Candidate(('baseline', size, policy, implementation),
                                  batch, build()))
  return candidates


# -----------------------------------------------------------------------------
# Table 3: deferred blur.


def blur_candidates(sizes: List[int], batch: int) -> List[Candidate]:
  candidates = []
  for size in sizes:
    images = tf.random.stateless_uniform([batch, size, size, 3], [0, 0])

    def in_pipeline(images=images):
      def make():
        base = tf.constant([0, 2], tf.int64)
        ds = tf.data.Dataset.from_tensor_slices(images).repeat().enumerate()
        ds = ds.map(lambda i, x: augment.random_apply(
            lambda im, s: augment.random_gaussian_blur(im, seed=s), 0.5, x,
            tf.random.experimental.stateless_fold_in(base, i)))
        return ds.batch(batch)
      return _dataset_iterator(make)

    candidates.append(Candidate(('blur', size, 'in pipeline (tf.data map)'),
                                batch, in_pipeline()))
    for name, jit in (('deferred, tf.function', False),
                      ('deferred, XLA', True)):
      fn = tf.function(
          lambda x, s: augment.batch_random_blur(x, 0.5, seed=s),
          jit_compile=jit)
      counter = [0]

      def make_iterator(fn=fn, images=images, counter=counter):
        def step():
          counter[0] += 1
          return fn(images, tf.constant([3, counter[0]], tf.int64))
        return step
      make_iterator()()  # Trace / compile outside the timing.
      candidates.append(Candidate(('blur', size, name), batch,
                                  make_iterator))
  return candidates


# -----------------------------------------------------------------------------
# Table 4: image folders, ours against Keras's image_dataset_from_directory.

FOLDER_CLASSES = 10


def write_jpeg_folder(root: str, size: int, count: int) -> str:
  """`count` size x size JPEGs in FOLDER_CLASSES class folders under root."""
  images, labels = datasets._digits_arrays()['train']  # pylint: disable=protected-access
  rng = np.random.RandomState(size)
  for i in range(count):
    label = int(labels[i % len(labels)])
    folder = os.path.join(root, f'class_{label % FOLDER_CLASSES}')
    os.makedirs(folder, exist_ok=True)
    image = tf.image.resize(
        images[i % len(images)].astype(np.float32), [size, size]).numpy()
    image = image * rng.uniform(0.3, 1.0, [1, 1, 3]) + rng.normal(
        0, 12, image.shape)
    encoded = tf.io.encode_jpeg(
        np.clip(np.round(image), 0, 255).astype(np.uint8), quality=90)
    tf.io.write_file(os.path.join(folder, f'{i:05d}.jpg'), encoded)
  return root


def folder_candidates(sizes: List[int], batch: int, count: int,
                      tmp: str) -> List[Candidate]:
  candidates = []
  for size in sizes:
    source_size = 32 if size <= 64 else 256
    root = write_jpeg_folder(os.path.join(tmp, f'jpeg_{size}'), source_size,
                             count)
    config = config_lib.ExperimentConfig().replace(
        data__dataset=f'folder:{root}', data__batch_size=batch,
        data__num_views=2, augment__image_size=size,
        augment__augmentation_type=A.SIMCLR,
        augment__augmentation_magnitude=0.5)
    candidates.append(Candidate(
        ('folder', size, 'ours'), batch, _dataset_iterator(
            lambda c=config: pipeline.build_dataset(c, None, training=True))))

    def keras_folder(config=config, root=root, size=size):
      ds = keras.utils.image_dataset_from_directory(
          root, image_size=(size, size), batch_size=None, shuffle=True,
          seed=0, verbose=False)
      base = tf.constant([0, 4], tf.int64)
      # The same whitening as ours, so both do the same work per image.
      whitening = pipeline.whitening_constants(
          datasets.get_dataset_info(config.data), config.augment)

      def views(index, example):
        image, label = example
        image = tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)
        views = pipeline.train_views(
            image, config.augment, 2,
            tf.random.experimental.stateless_fold_in(base, index))
        return pipeline.finalize_images(views, whitening, tf.float32), label

      ds = ds.repeat().enumerate().map(views,
                                       num_parallel_calls=tf.data.AUTOTUNE)
      return ds.batch(batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)

    candidates.append(Candidate(('folder', size, 'keras'), batch,
                                _dataset_iterator(keras_folder)))
  return candidates


def folder_table(results: Dict[Tuple, Candidate], sizes: List[int]) -> str:
  header = ['px', 'source JPEG', 'ours img/s', 'keras img/s', 'ratio',
            'ours img/CPU-s', 'keras img/CPU-s', 'ratio']
  rows = []
  for size in sizes:
    ours, theirs = (results['folder', size, 'ours'],
                    results['folder', size, 'keras'])
    source = 32 if size <= 64 else 256
    rows.append([str(size), f'{source}x{source}', f'{ours.wall_rate:.0f}',
                 f'{theirs.wall_rate:.0f}',
                 f'{ours.wall_rate / theirs.wall_rate:.2f}',
                 f'{ours.cpu_rate:.0f}', f'{theirs.cpu_rate:.0f}',
                 f'{ours.cpu_rate / theirs.cpu_rate:.2f}'])
  return _report.format_table(header, rows)


# -----------------------------------------------------------------------------
# Tables.


def pipeline_table(results: Dict[Tuple, Candidate], sizes: List[int]) -> str:
  header = ['augmentation']
  for size in sizes:
    header += [f'{size}px img/CPU-s', 'wall img/s', 'ratio']
  rows = []
  for name, _, _ in PIPELINE_VARIANTS:
    row = [name]
    for size in sizes:
      c = results['pipeline', size, name]
      base = results['pipeline', size, PIPELINE_VARIANTS[0][0]]
      row += [f'{c.cpu_rate:.0f}', f'{c.wall_rate:.0f}',
              f'{c.cpu_rate / base.cpu_rate:.2f}']
    rows.append(row)
  return _report.format_table(header, rows)


def baseline_table(results: Dict[Tuple, Candidate], sizes: List[int]) -> str:
  header = ['policy', 'px', 'ours', 'keras', 'model garden', 'ours/keras',
            'ours/mg']
  rows = []
  for size in sizes:
    for policy in BASELINE_POLICIES:
      rates = {}
      for implementation in IMPLEMENTATIONS:
        c = results.get(('baseline', size, policy, implementation))
        rates[implementation] = c.cpu_rate if c else None

      def show(rate):
        return 'n/a' if rate is None else f'{rate:.0f}'

      def ratio(other):
        return ('n/a' if rates[other] is None else
                f'{rates["ours"] / rates[other]:.2f}')
      rows.append([policy, str(size), show(rates['ours']),
                   show(rates['keras']), show(rates['model_garden']),
                   ratio('keras'), ratio('model_garden')])
  return _report.format_table(header, rows)


def blur_table(results: Dict[Tuple, Candidate], sizes: List[int]) -> str:
  header = ['blur p=0.5', 'px', 'radius', 'img/CPU-s', 'wall img/s',
            'ratio']
  rows = []
  for size in sizes:
    base = results['blur', size, 'in pipeline (tf.data map)']
    for name in ('in pipeline (tf.data map)', 'deferred, tf.function',
                 'deferred, XLA'):
      c = results['blur', size, name]
      rows.append([name, str(size), str(augment.blur_radius(size)),
                   f'{c.cpu_rate:.0f}', f'{c.wall_rate:.0f}',
                   f'{c.cpu_rate / base.cpu_rate:.2f}'])
  return _report.format_table(header, rows)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--quick', action='store_true',
                      help='Smaller batches, 2 rounds (about 2 minutes).')
  parser.add_argument('--sizes', type=int, nargs='+', default=[32, 224])
  parser.add_argument('--rounds', type=int, default=None)
  parser.add_argument('--tables', default='pipeline,baselines,blur,folder')
  parser.add_argument('--folder_images', type=int, default=None,
                      help='JPEG files per size in the folder table '
                      '(default 512, 256 with --quick).')
  parser.add_argument('--out', default='benchmarks/results/input_pipeline.txt',
                      help="Where to save the tables; '' = do not save.")
  args = parser.parse_args()
  quick = args.quick
  rounds = args.rounds or (2 if quick else 3)
  tables = set(args.tables.split(','))
  pipeline_batch = 32 if quick else 64
  baseline_batch = 16 if quick else 32
  load_start = os.getloadavg()[0]
  start = time.perf_counter()

  def items(c: Candidate) -> int:
    table, size = c.key[:2]
    if table in ('pipeline', 'folder'):
      # Several batches are computed in parallel (map_and_batch fusion):
      # after the warm-up the pipeline is in a steady state, and a window of
      # many batches keeps the in-flight ones a small share of it.
      return 3 if quick else 8
    # Sequential maps: the window is exact; about the same work per window.
    if quick:
      return 2 if size <= 64 else 1
    return 8 if size <= 64 else 2

  mg, mg_info = load_model_garden_augment()
  results: Dict[Tuple, Candidate] = {}
  out = []
  if 'pipeline' in tables:
    candidates = pipeline_candidates(args.sizes, pipeline_batch)
    _run_rounds(candidates, rounds, 2 if quick else 3, items, 'pipeline')
    results.update({c.key: c for c in candidates})
    out += ['', f'1. Training pipeline: build_dataset on digits, 2 views, '
            f'batch {pipeline_batch}; ratio = img/CPU-s over identity.',
            pipeline_table(results, args.sizes)]
  if 'baselines' in tables:
    candidates = baseline_candidates(args.sizes, baseline_batch, mg)
    _run_rounds(candidates, rounds, 1, items, 'baselines')
    results.update({c.key: c for c in candidates})
    out += ['', '2. Policy only, img/CPU-s (uint8 in, float32 batches of '
            f'{baseline_batch} out); ours and the Model Garden per image in '
            'Dataset.map, Keras layers per batch. ratio > 1: ours is faster.',
            baseline_table(results, args.sizes)]
  if 'blur' in tables:
    blur_batch = 32 if quick else 64
    candidates = blur_candidates(args.sizes, blur_batch)
    _run_rounds(candidates, rounds, 1 if quick else 2, items, 'blur')
    results.update({c.key: c for c in candidates})
    out += ['', f'3. Gaussian blur of {blur_batch}-view batches, p = 0.5, '
            'sigma ~ U(0.1, 2), radius = size // 20 (the reference); ratio '
            'over in-pipeline.',
            blur_table(results, args.sizes)]
  if 'folder' in tables:
    folder_batch = 32 if quick else 64
    count = args.folder_images or (256 if quick else 512)
    with tempfile.TemporaryDirectory() as tmp:
      candidates = folder_candidates(args.sizes, folder_batch, count, tmp)
      _run_rounds(candidates, rounds, 2 if quick else 3, items, 'folder')
    results.update({c.key: c for c in candidates})
    out += ['', f'4. Image folders ({count} JPEGs, {FOLDER_CLASSES} class '
            'folders): read + decode + 2 SimCLR views, batch '
            f'{folder_batch}; ours = build_dataset(folder:PATH), keras = '
            'image_dataset_from_directory + the same views; ratio > 1: ours '
            'is faster.',
            folder_table(results, args.sizes)]
  header = (
      f'# benchmarks/input_pipeline.py {"--quick" if quick else ""}: median '
      f'of {rounds} interleaved rounds, {time.perf_counter() - start:.0f} s\n'
      f'{_report.machine_line()}  tf-models-official '
      f'{mg_info if mg is not None else "n/a (" + mg_info + ")"}\n'
      f'# load average {load_start:.1f} at the start, '
      f'{os.getloadavg()[0]:.1f} at the end (1 min); img/CPU-s = images per '
      'CPU-second of this process (steady under load), wall img/s = what '
      'this shared machine gave.')
  text = header + '\n' + '\n'.join(out) + '\n'
  print('\n' + text)
  _report.save(text, args.out)


if __name__ == '__main__':
  main()
