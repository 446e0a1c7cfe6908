"""Tests of supcon_tf.plots and `--mode=plot_embeddings`."""

import os

import numpy as np
import pytest
import tensorflow as tf

from supcon_tf import enums
from supcon_tf.evaluation import knn
from supcon_tf.evaluation import plots
from tests import analysis_testing
from tests.testing import tiny_config


def _read_png(path):
  return tf.io.decode_png(tf.io.read_file(path), channels=3).numpy()


def _assert_drawn(image, min_colours=3):
  """Decoded, non-blank: mostly background but with several drawn colours."""
  assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
  pixels = image.reshape([-1, 3])
  background = np.all(pixels == pixels[0], axis=-1).mean()
  assert 0.3 < background < 0.995, background
  assert len(np.unique(pixels, axis=0)) >= min_colours


def _clusters(seed=0):
  rng = np.random.RandomState(seed)
  centres = 5.0 * rng.normal(size=[3, 8])
  labels = np.repeat(np.arange(3), 30)
  return (centres[labels] + 0.2 * rng.normal(size=[90, 8])).astype(
      np.float32), labels


def test_tsne_keeps_separable_clusters_apart():
  embeddings, labels = _clusters()
  points = plots.tsne_2d(embeddings, seed=0)
  assert points.shape == (90, 2) and np.all(np.isfinite(points))
  # In the 2-D map every point's nearest neighbours share its class.
  assert knn.knn_accuracies(points, labels, points, labels, 3, [5],
                            temperature=1.0)[5] == 1.0


@pytest.mark.parametrize('use_matplotlib', [False, True])
def test_scatter_png(tmp_path, use_matplotlib):
  if use_matplotlib and not plots.matplotlib_available():
    pytest.skip('matplotlib not installed')
  embeddings, labels = _clusters()
  path = plots.save_scatter(embeddings[:, :2], labels, ['a', 'b', 'c'],
                            str(tmp_path / 'sub' / 'scatter.png'),
                            title='clusters', use_matplotlib=use_matplotlib)
  image = _read_png(path)
  _assert_drawn(image, min_colours=4)
  if not use_matplotlib:
    # The three class colours are drawn.
    for colour in plots.palette(3):
      assert np.any(np.all(image == colour, axis=-1))


def test_numpy_scatter_places_points():
  points = np.array([[0.0, 0.0], [1.0, 1.0]])
  image = plots.scatter_image(points, np.array([0, 1]), 2, size=100,
                              radius=1)
  red, blue = plots.palette(2)[1], plots.palette(2)[0]
  # Class 0 at the bottom left of the frame, class 1 at the top right (the
  # colour key is right of x = 100).
  ys, xs = np.nonzero(np.all(image[:, :100] == blue, axis=-1))
  assert ys.min() > 70 and xs.max() < 30
  ys, xs = np.nonzero(np.all(image[:, :100] == red, axis=-1))
  assert ys.max() < 30 and xs.min() > 70


def _write_summaries(log_dir, values):
  writer = tf.summary.create_file_writer(log_dir)
  with writer.as_default():
    for step, value in values:
      tf.summary.scalar('loss', value, step=step)
      tf.summary.scalar('learning_rate', 0.1 * step, step=step)
  writer.close()


def test_read_scalars_and_curves(tmp_path):
  _write_summaries(str(tmp_path / 'logs' / 'pretrain'),
                   [(1, 3.0), (2, 2.0), (3, 1.5)])
  _write_summaries(str(tmp_path / 'logs' / 'classifier'), [(1, 2.5),
                                                           (2, 0.5)])
  scalars = plots.read_scalars(str(tmp_path / 'logs' / 'pretrain'))
  steps, values = scalars['loss']
  np.testing.assert_array_equal(steps, [1, 2, 3])
  np.testing.assert_allclose(values, [3.0, 2.0, 1.5])
  curves = plots.training_curves(str(tmp_path))
  assert list(curves) == ['pretrain', 'classifier']
  assert set(curves['pretrain']) == {'loss', 'learning_rate'}
  for use_matplotlib in (False, True):
    if use_matplotlib and not plots.matplotlib_available():
      continue
    path = plots.save_curves(curves, str(tmp_path / f'c{use_matplotlib}.png'),
                             use_matplotlib=use_matplotlib)
    _assert_drawn(_read_png(path))
  # The fallback draws one colour per stage.
  image = _read_png(str(tmp_path / 'cFalse.png'))
  for colour in plots.palette(2):
    assert np.any(np.all(image == colour, axis=-1))


def test_plot_embeddings_mode_without_matplotlib(tmp_path, monkeypatch):
  monkeypatch.setattr(plots, 'matplotlib_available', lambda: False)
  model_dir = analysis_testing.copy_trained(tmp_path / 'run')
  config = tiny_config(model_dir, analysis__plot_max_points=50)
  paths = analysis_testing.run_mode(config, enums.Mode.PLOT_EMBEDDINGS)
  assert paths['tsne'] == os.path.join(model_dir, 'embeddings_tsne.png')
  _assert_drawn(_read_png(paths['tsne']), min_colours=5)
  _assert_drawn(_read_png(paths['curves']))
  projector_dir = os.path.join(model_dir, 'logs', 'projector')
  lines = open(os.path.join(projector_dir, 'metadata.tsv')).read().splitlines()
  assert lines[0] == 'label\tclass' and len(lines) == 51
  assert all(line.split('\t')[0] == line.split('\t')[1] for line in lines[1:])
  pbtxt = open(os.path.join(projector_dir, 'projector_config.pbtxt')).read()
  assert 'metadata.tsv' in pbtxt and 'embedding/.ATTRIBUTES' in pbtxt
  embedding = tf.train.load_variable(
      tf.train.latest_checkpoint(projector_dir),
      'embedding/.ATTRIBUTES/VARIABLE_VALUE')
  assert embedding.shape == (50, 128)
  np.testing.assert_allclose(np.linalg.norm(embedding, axis=-1), 1.0,
                             rtol=1e-5)


def test_plot_embeddings_mode_with_matplotlib(tmp_path):
  if not plots.matplotlib_available():
    pytest.skip('matplotlib not installed')
  model_dir = analysis_testing.copy_trained(tmp_path / 'run')
  config = tiny_config(model_dir, analysis__plot_max_points=30)
  paths = analysis_testing.run_mode(config, enums.Mode.PLOT_EMBEDDINGS)
  _assert_drawn(_read_png(paths['tsne']), min_colours=5)
  _assert_drawn(_read_png(paths['curves']))
