"""Tests of supcon_tf.data.visualize (the augmentation grid PNG)."""

import numpy as np
import tensorflow as tf

from supcon_tf import config as config_lib
from supcon_tf import enums
from supcon_tf.data import visualize


def _config(**kwargs):
  base = dict(data__dataset='digits', data__num_views=3,
              augment__image_size=24,
              augment__augmentation_type=enums.AugmentationType.SIMCLR,
              augment__blur_probability=0.5, augment__defer_blurring=True)
  base.update(kwargs)
  return config_lib.ExperimentConfig().replace(**base)


def _read_png(path):
  return tf.io.decode_png(tf.io.read_file(path)).numpy()


def test_writes_a_decodable_png_of_the_expected_size(tmp_path):
  config = _config()
  path = str(tmp_path / 'sub' / 'augmentations.png')
  assert visualize.save_augmentation_grid(config, path, num_images=3) == path
  grid = _read_png(path)
  pad, size = visualize.GRID_PADDING, 24
  assert grid.shape == (3 * (size + pad) + pad, 4 * (size + pad) + pad, 3)
  assert grid.shape[:2] == visualize.grid_shape(config, 3)
  assert grid.dtype == np.uint8

  def cell(row, col):
    y, x = pad + row * (size + pad), pad + col * (size + pad)
    return grid[y:y + size, x:x + size].astype(np.int32)

  for row in range(3):
    # The views differ from each other and from the eval crop.
    cells = [cell(row, col) for col in range(4)]
    for a in range(4):
      for b in range(a + 1, 4):
        assert np.abs(cells[a] - cells[b]).mean() > 0.5


def test_same_seed_same_grid(tmp_path):
  config = _config(augment__defer_blurring=False)
  a, b, c = (str(tmp_path / f'{n}.png') for n in 'abc')
  visualize.save_augmentation_grid(config, a, num_images=2, seed=1)
  visualize.save_augmentation_grid(config, b, num_images=2, seed=1)
  visualize.save_augmentation_grid(config, c, num_images=2, seed=2)
  np.testing.assert_array_equal(_read_png(a), _read_png(b))
  assert not np.array_equal(_read_png(a), _read_png(c))
