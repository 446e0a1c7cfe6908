"""A PNG grid of training views, to check augmentations by eye.

`python -m supcon_tf.main --mode=show_augmentations` calls
`save_augmentation_grid(config, model_dir/augmentations.png)`.
"""

import dataclasses
import os
from typing import Tuple

import tensorflow as tf

from supcon_tf import config as config_lib
from supcon_tf.data import augment
from supcon_tf.data import datasets
from supcon_tf.data import pipeline

# Gap between cells and around the grid, in pixels, drawn white so that the
# edges of dark images stay visible.
GRID_PADDING = 2
_GAP_VALUE = 255


def grid_shape(config: config_lib.ExperimentConfig,
               num_images: int) -> Tuple[int, int]:
  """(height, width) in pixels of the PNG `save_augmentation_grid` writes.

  Rows: `num_images`; columns: the eval crop plus `num_views` views; each cell
  image_size square, with GRID_PADDING pixels between and around cells.
  """
  size, pad = config.augment.image_size, GRID_PADDING
  columns = 1 + config.data.num_views
  return (num_images * (size + pad) + pad, columns * (size + pad) + pad)


def _to_uint8(image: tf.Tensor) -> tf.Tensor:
  """float [h, w, 3] in [0, 1] -> uint8, clipped (augmentations may overshoot)."""
  image = tf.clip_by_value(tf.cast(image, tf.float32), 0.0, 1.0)
  return tf.cast(tf.round(image * 255.0), tf.uint8)


def augmentation_grid(config: config_lib.ExperimentConfig, num_images: int = 4,
                      seed: int = 0) -> tf.Tensor:
  """The grid image that `save_augmentation_grid` encodes.

  Row i shows training image i (the first `num_images` of the train split, in
  stored order): its eval crop, then `config.data.num_views` training views.
  Images are shown before whitening, as [0, 1] -> 0..255. When blurring is
  deferred to the accelerator (`augment.should_defer_blur`), the input
  pipeline emits unblurred views and the train step blurs them; the grid
  applies that blur here too (`augment.batch_random_blur`), so it shows what
  the model sees.

  Args:
    config: experiment config (dataset, image_size, augmentation options).
    num_images: rows of the grid.
    seed: seeds the views; the same seed gives the same grid.

  Returns:
    uint8 [height, width, 3], (height, width) = `grid_shape(config, num_images)`.
  """
  if num_images < 1:
    raise ValueError(f'num_images must be >= 1, got {num_images}.')
  # Clean labels and no cap: only the pixels matter here.
  data_config = dataclasses.replace(config.data, label_noise_prob=0.0,
                                    num_images=0)
  source = datasets.load_split(data_config, training=True).take(num_images)
  size, pad = config.augment.image_size, GRID_PADDING
  height, width = grid_shape(config, num_images)
  rows = []
  base_seed = tf.constant([seed, 0], tf.int64)
  for i, (image, _) in enumerate(source):
    cells = [augment.preprocess_for_eval(image, config.augment)]
    image_seed = tf.random.experimental.stateless_fold_in(base_seed, i)
    views = pipeline.train_views(image, config.augment, config.data.num_views,
                                 image_seed)
    if augment.should_defer_blur(config.augment):
      views = augment.batch_random_blur(
          views, config.augment.blur_probability,
          sigma_per_image=config.augment.blur_sigma_per_image,
          seed=tf.random.experimental.stateless_fold_in(image_seed, -1))
    cells.extend(tf.unstack(views))
    row = []
    for cell in cells:
      row.append(tf.fill([size, pad, 3], tf.constant(_GAP_VALUE, tf.uint8)))
      row.append(_to_uint8(cell))
    row.append(tf.fill([size, pad, 3], tf.constant(_GAP_VALUE, tf.uint8)))
    rows.append(tf.fill([pad, width, 3], tf.constant(_GAP_VALUE, tf.uint8)))
    rows.append(tf.concat(row, axis=1))
  if len(rows) // 2 < num_images:
    raise ValueError(
        f'The train split of {config.data.dataset!r} has only {len(rows) // 2}'
        f' images; asked for {num_images}.')
  rows.append(tf.fill([pad, width, 3], tf.constant(_GAP_VALUE, tf.uint8)))
  grid = tf.concat(rows, axis=0)
  return tf.ensure_shape(grid, [height, width, 3])


def save_augmentation_grid(config: config_lib.ExperimentConfig, path: str,
                           num_images: int = 4, seed: int = 0) -> str:
  """Writes `augmentation_grid(config, num_images, seed)` as a PNG at `path`.

  Args:
    config: experiment config.
    path: output file; parent directories are created.
    num_images: rows of the grid (source images).
    seed: seeds the augmentations.

  Returns:
    `path`.
  """
  grid = augmentation_grid(config, num_images=num_images, seed=seed)
  parent = os.path.dirname(path)
  if parent:
    tf.io.gfile.makedirs(parent)
  tf.io.write_file(path, tf.io.encode_png(grid))
  return path
