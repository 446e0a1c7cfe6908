"""`--mode=plot_embeddings`: t-SNE of test embeddings, projector files, curves.

Writes, in `model_dir`:

* `embeddings_tsne.png`: a 2-D t-SNE (scikit-learn) of the encoder's
  normalised embedding of up to `--plot_max_points` test images (the first
  ones of the eval split, which tfds stores shuffled), coloured by class.
* `logs/projector/`: the same embeddings for TensorBoard's projector
  (a checkpoint of the embedding matrix, `metadata.tsv` with each point's
  label and class name, `projector_config.pbtxt`); open with
  `tensorboard --logdir model_dir/logs`.
* `training_curves.png`: loss, contrastive_loss, cross_entropy_loss,
  learning_rate and top_1_accuracy against the step, read from the event
  files under `logs/pretrain` and `logs/classifier`, one line per stage.

Figures are drawn with matplotlib when it is installed (`pip install
supcon_tf[plot]`); without it a small numpy rasteriser draws the same plots
(no text: axes, points, lines and a colour key only) and TensorFlow encodes
the PNG, so the mode never needs matplotlib.
"""

import colorsys
import io
import math
import os
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from absl import logging
import numpy as np
import tensorflow as tf

from supcon_tf import config as config_lib
from supcon_tf import distribute
from supcon_tf import models
from supcon_tf.data import datasets
from supcon_tf.evaluation import runner
from supcon_tf.training import checkpoints

TSNE_FILE = 'embeddings_tsne.png'
CURVES_FILE = 'training_curves.png'
PROJECTOR_DIR = os.path.join('logs', 'projector')
CURVE_STAGES = ('pretrain', 'classifier')
CURVE_METRICS = ('loss', 'contrastive_loss', 'cross_entropy_loss',
                 'learning_rate', 'top_1_accuracy')
# Embeddings wider than this are reduced by PCA before t-SNE.
_TSNE_PCA_DIM = 50
# Name of the embedding variable in the projector checkpoint.
_PROJECTOR_TENSOR = 'embedding/.ATTRIBUTES/VARIABLE_VALUE'

# Tableau 10 (matplotlib's default cycle), then evenly spaced hues.
_TAB10 = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40),
          (148, 103, 189), (140, 86, 75), (227, 119, 194), (127, 127, 127),
          (188, 189, 34), (23, 190, 207))


def matplotlib_available() -> bool:
  """Whether matplotlib can be imported (the optional `plot` extra)."""
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    return False
  return True


def palette(n: int) -> np.ndarray:
  """uint8 [n, 3] distinct colours (Tableau 10 first)."""
  colours = list(_TAB10[:n])
  extra = n - len(colours)
  for i in range(extra):
    r, g, b = colorsys.hsv_to_rgb((i * 0.618034) % 1.0, 0.75,
                                  0.55 + 0.4 * (i % 2))
    colours.append((int(255 * r), int(255 * g), int(255 * b)))
  return np.array(colours, np.uint8).reshape([n, 3])


# -----------------------------------------------------------------------------
# t-SNE.


def tsne_2d(embeddings: np.ndarray, seed: int = 0) -> np.ndarray:
  """2-D t-SNE of `embeddings` float [n, d] (n >= 2): float32 [n, 2].

  Wide embeddings (ResNet-50: 2048) are first reduced to 50 dimensions by
  PCA, the usual t-SNE preprocessing, which makes the neighbour search cheap.
  Perplexity is 30 (scikit-learn's default), lowered for tiny n, where it
  must stay below n.
  """
  from sklearn import decomposition  # pylint: disable=g-import-not-at-top
  from sklearn import manifold  # pylint: disable=g-import-not-at-top
  x = np.asarray(embeddings, np.float64)
  n = x.shape[0]
  if n < 2:
    raise ValueError(f't-SNE needs at least 2 points, got {n}.')
  if x.shape[1] > _TSNE_PCA_DIM and n > _TSNE_PCA_DIM:
    x = decomposition.PCA(_TSNE_PCA_DIM, random_state=seed).fit_transform(x)
  perplexity = float(min(30.0, max(1.0, (n - 1) / 3.0)))
  tsne = manifold.TSNE(n_components=2, perplexity=perplexity, init='pca',
                       learning_rate='auto', random_state=seed)
  return tsne.fit_transform(x).astype(np.float32)


# -----------------------------------------------------------------------------
# The numpy rasteriser (no matplotlib).


def _to_pixels(values: np.ndarray, lo: float, hi: float, start: int,
               length: int, flip: bool = False) -> np.ndarray:
  span = hi - lo if hi > lo else 1.0
  frac = (values - lo) / span
  if flip:
    frac = 1.0 - frac
  return np.round(start + frac * (length - 1)).astype(np.int64)


def _disc(image: np.ndarray, y: int, x: int, radius: int, colour) -> None:
  h, w = image.shape[:2]
  for dy in range(-radius, radius + 1):
    for dx in range(-radius, radius + 1):
      if dy * dy + dx * dx <= radius * radius:
        yy, xx = y + dy, x + dx
        if 0 <= yy < h and 0 <= xx < w:
          image[yy, xx] = colour


def _frame(image: np.ndarray, top: int, left: int, height: int, width: int,
           colour=(0, 0, 0)) -> None:
  image[top, left:left + width] = colour
  image[top + height - 1, left:left + width] = colour
  image[top:top + height, left] = colour
  image[top:top + height, left + width - 1] = colour


def _line(image: np.ndarray, y0: int, x0: int, y1: int, x1: int,
          colour) -> None:
  steps = int(max(abs(y1 - y0), abs(x1 - x0), 1))
  t = np.linspace(0.0, 1.0, steps + 1)
  ys = np.round(y0 + t * (y1 - y0)).astype(np.int64)
  xs = np.round(x0 + t * (x1 - x0)).astype(np.int64)
  keep = ((ys >= 0) & (ys < image.shape[0]) & (xs >= 0) &
          (xs < image.shape[1]))
  image[ys[keep], xs[keep]] = colour
  # Two pixels thick, so lines survive downscaled viewing.
  ys2 = np.minimum(ys[keep] + 1, image.shape[0] - 1)
  image[ys2, xs[keep]] = colour


def scatter_image(points: np.ndarray, labels: np.ndarray, num_classes: int,
                  size: int = 640, radius: int = 3) -> np.ndarray:
  """A scatter plot as uint8 [size, size + key, 3], drawn without matplotlib.

  White background, black frame, one disc per point in its class colour,
  and a column of colour swatches (class 0 at the top) on the right.
  """
  margin = 16
  key_width = 40 if num_classes <= 40 else 0
  image = np.full([size, size + key_width, 3], 255, np.uint8)
  plot = size - 2 * margin
  _frame(image, margin - 4, margin - 4, plot + 8, plot + 8)
  colours = palette(max(num_classes, 1))
  if len(points):
    x = _to_pixels(points[:, 0], points[:, 0].min(), points[:, 0].max(),
                   margin, plot)
    y = _to_pixels(points[:, 1], points[:, 1].min(), points[:, 1].max(),
                   margin, plot, flip=True)
    for xi, yi, label in zip(x, y, labels):
      _disc(image, int(yi), int(xi), radius, colours[int(label) % len(colours)])
  if key_width:
    swatch = max(4, min(16, (size - 2 * margin) // max(num_classes, 1) - 2))
    for c in range(num_classes):
      top = margin + c * (swatch + 2)
      image[top:top + swatch, size + 8:size + 8 + swatch] = colours[c]
  return image


def curves_image(curves: Mapping[str, Mapping[str, Tuple[np.ndarray,
                                                           np.ndarray]]],
                 metrics: Sequence[str], panel: Tuple[int, int] = (220, 320),
                 columns: int = 3) -> np.ndarray:
  """Line plots as uint8 [H, W, 3], drawn without matplotlib.

  One framed panel per metric (in `metrics` order, `columns` per row); in
  each, one line per stage (`curves[stage][metric] = (steps, values)`),
  coloured by stage in the order of `curves` (blue, orange, ...), scaled to
  fill the panel.
  """
  rows = max(1, math.ceil(len(metrics) / columns))
  ph, pw = panel
  margin = 12
  image = np.full([rows * ph, columns * pw, 3], 255, np.uint8)
  colours = palette(max(len(curves), 1))
  for m, metric in enumerate(metrics):
    top, left = (m // columns) * ph + margin, (m % columns) * pw + margin
    height, width = ph - 2 * margin, pw - 2 * margin
    _frame(image, top, left, height, width)
    series = [(i, c[metric]) for i, c in enumerate(curves.values())
              if metric in c and len(c[metric][0])]
    if not series:
      continue
    all_steps = np.concatenate([s[1][0] for s in series])
    all_values = np.concatenate([s[1][1] for s in series])
    lo_x, hi_x = float(all_steps.min()), float(all_steps.max())
    lo_y, hi_y = float(all_values.min()), float(all_values.max())
    if hi_y <= lo_y:
      lo_y, hi_y = lo_y - 1.0, hi_y + 1.0  # A flat line in the middle.
    inner = 4
    for i, (steps, values) in series:
      xs = _to_pixels(steps, lo_x, hi_x, left + inner, width - 2 * inner)
      ys = _to_pixels(values, lo_y, hi_y, top + inner, height - 2 * inner,
                      flip=True)
      if len(xs) == 1:
        _disc(image, int(ys[0]), int(xs[0]), 2, colours[i])
      for j in range(len(xs) - 1):
        _line(image, int(ys[j]), int(xs[j]), int(ys[j + 1]), int(xs[j + 1]),
              colours[i])
  return image


def write_png(image: np.ndarray, path: str) -> str:
  """Encodes uint8 [h, w, 3] as PNG at `path` (any tf.io.gfile path)."""
  parent = os.path.dirname(path)
  if parent:
    tf.io.gfile.makedirs(parent)
  tf.io.write_file(path, tf.io.encode_png(tf.constant(image, tf.uint8)))
  return path


def _save_figure(fig, path: str) -> str:
  from matplotlib.backends import backend_agg  # pylint: disable=g-import-not-at-top
  backend_agg.FigureCanvasAgg(fig)
  buffer = io.BytesIO()
  fig.savefig(buffer, format='png', dpi=100)
  parent = os.path.dirname(path)
  if parent:
    tf.io.gfile.makedirs(parent)
  with tf.io.gfile.GFile(path, 'wb') as f:
    f.write(buffer.getvalue())
  return path


# -----------------------------------------------------------------------------
# Figures.


def save_scatter(points: np.ndarray, labels: np.ndarray,
                 class_names: Sequence[str], path: str, title: str = '',
                 use_matplotlib: Optional[bool] = None) -> str:
  """Scatter PNG of `points` float [n, 2] coloured by `labels` int [n].

  `use_matplotlib`: None = when installed; False forces the numpy drawing.
  """
  num_classes = len(class_names)
  if use_matplotlib is None:
    use_matplotlib = matplotlib_available()
  if not use_matplotlib:
    return write_png(scatter_image(points, labels, num_classes), path)
  from matplotlib import figure  # pylint: disable=g-import-not-at-top
  fig = figure.Figure(figsize=(8, 7))
  ax = fig.add_subplot(1, 1, 1)
  colours = palette(max(num_classes, 1)) / 255.0
  for c in range(num_classes):
    mask = labels == c
    if np.any(mask):
      ax.scatter(points[mask, 0], points[mask, 1], s=6, color=colours[c],
                 label=class_names[c])
  if num_classes <= 20:
    ax.legend(markerscale=3, fontsize=8, loc='best')
  ax.set_xticks([])
  ax.set_yticks([])
  ax.set_title(title)
  fig.tight_layout()
  return _save_figure(fig, path)


def save_curves(curves: Mapping[str, Mapping[str, Tuple[np.ndarray,
                                                          np.ndarray]]],
                path: str, metrics: Sequence[str] = CURVE_METRICS,
                use_matplotlib: Optional[bool] = None,
                xlabel: str = 'step') -> str:
  """Training-curve PNG: one panel per metric, one line per stage."""
  if use_matplotlib is None:
    use_matplotlib = matplotlib_available()
  if not use_matplotlib:
    return write_png(curves_image(curves, metrics), path)
  from matplotlib import figure  # pylint: disable=g-import-not-at-top
  columns = 3
  rows = max(1, math.ceil(len(metrics) / columns))
  fig = figure.Figure(figsize=(4.2 * columns, 3.2 * rows))
  colours = palette(max(len(curves), 1)) / 255.0
  for m, metric in enumerate(metrics):
    ax = fig.add_subplot(rows, columns, m + 1)
    for i, (stage, stage_curves) in enumerate(curves.items()):
      if metric in stage_curves:
        steps, values = stage_curves[metric]
        ax.plot(steps, values, color=colours[i], label=stage,
                marker='.' if len(steps) < 20 else None)
    ax.set_title(metric)
    ax.set_xlabel(xlabel)
    ax.grid(alpha=0.3)
    if ax.lines:
      ax.legend(fontsize=8)
  fig.tight_layout()
  return _save_figure(fig, path)


# -----------------------------------------------------------------------------
# TensorBoard.


def read_scalars(log_dir: str) -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
  """{tag: (steps int64 [n], values float64 [n])} from the event files.

  Reads every `events.*` file of `log_dir` (not subdirectories), in name
  (= creation time) order; a step written twice (a resumed run) keeps its
  last value. Handles TF2 tensor summaries and TF1 `simple_value`s.
  """
  pattern = os.path.join(log_dir, 'events.out.tfevents.*')
  by_tag: Dict[str, Dict[int, float]] = {}
  for path in sorted(tf.io.gfile.glob(pattern)):
    try:
      for record in tf.data.TFRecordDataset(path):
        event = tf.compat.v1.Event.FromString(record.numpy())
        for value in event.summary.value:
          if value.HasField('simple_value'):
            number = float(value.simple_value)
          elif value.HasField('tensor'):
            array = tf.make_ndarray(value.tensor)
            if array.size != 1 or not np.issubdtype(array.dtype, np.number):
              continue
            number = float(array.reshape([]))
          else:
            continue
          by_tag.setdefault(value.tag, {})[int(event.step)] = number
    except tf.errors.DataLossError:
      logging.warning('Truncated event file %s; read what was there.', path)
  return {tag: (np.array(sorted(d), np.int64),
                np.array([d[s] for s in sorted(d)], np.float64))
          for tag, d in by_tag.items()}


def training_curves(model_dir: str, stages: Sequence[str] = CURVE_STAGES,
                    metrics: Sequence[str] = CURVE_METRICS
                    ) -> Dict[str, Dict[str, Tuple[np.ndarray, np.ndarray]]]:
  """{stage: {metric: (steps, values)}} of the stages that have summaries."""
  curves = {}
  for stage in stages:
    scalars = read_scalars(os.path.join(model_dir, 'logs', stage))
    chosen = {m: scalars[m] for m in metrics if m in scalars}
    if chosen:
      curves[stage] = chosen
  return curves


def write_projector(embeddings: np.ndarray, labels: np.ndarray,
                    class_names: Sequence[str], log_dir: str) -> str:
  """TensorBoard projector files for `embeddings` float [n, d] in `log_dir`.

  Returns:
    The path of `projector_config.pbtxt`.
  """
  tf.io.gfile.makedirs(log_dir)
  metadata = os.path.join(log_dir, 'metadata.tsv')
  with tf.io.gfile.GFile(metadata, 'w') as f:
    # Two columns, so the first line is a header (the projector's rule).
    f.write('label\tclass\n')
    for label in labels:
      name = class_names[int(label)] if int(label) < len(class_names) else ''
      f.write(f'{int(label)}\t{name}\n'.replace('\t\n', '\t-\n'))
  checkpoint = tf.train.Checkpoint(
      embedding=tf.Variable(np.asarray(embeddings, np.float32),
                            trainable=False))
  checkpoint.save(os.path.join(log_dir, 'embedding.ckpt'))
  path = os.path.join(log_dir, 'projector_config.pbtxt')
  try:
    from tensorboard.plugins import projector  # pylint: disable=g-import-not-at-top
  except ImportError:
    projector = None
  if projector is not None:
    config = projector.ProjectorConfig()
    embedding = config.embeddings.add()
    embedding.tensor_name = _PROJECTOR_TENSOR
    embedding.metadata_path = 'metadata.tsv'
    projector.visualize_embeddings(log_dir, config)
  else:
    with tf.io.gfile.GFile(path, 'w') as f:
      f.write('embeddings {\n'
              f'  tensor_name: "{_PROJECTOR_TENSOR}"\n'
              '  metadata_path: "metadata.tsv"\n}\n')
  return path


# -----------------------------------------------------------------------------
# The mode.


def class_names(data_config: config_lib.DataConfig,
                info: datasets.DatasetInfo) -> List[str]:
  """Human-readable class names (tfds ClassLabel names), else the indices."""
  if info.class_names is not None and len(info.class_names) == (
      info.num_classes):
    return list(info.class_names)
  if datasets.base_name(info.name) != datasets.DIGITS:
    try:
      source = datasets.tfds_source(info.name, data_config.data_dir)
      names = source.builder.info.features[source.label_key].names
      if names and len(names) == info.num_classes:
        return [str(n) for n in names]
    except (datasets.DatasetError, AttributeError, KeyError):
      pass
  return [str(i) for i in range(info.num_classes)]


def plot_embeddings(config: config_lib.ExperimentConfig,
                    strategy: tf.distribute.Strategy,
                    model: Optional[models.SupConModel] = None
                    ) -> Dict[str, str]:
  """Writes the t-SNE PNG, projector files and curves; returns their paths."""
  model_dir = config.runtime.model_dir
  config_lib.check_model_dir(config)
  info = datasets.get_dataset_info(config.data, model_dir)
  if model is None:
    model = checkpoints.load_model_for_inference(config, info, strategy)
  max_points = config.analysis.plot_max_points
  max_batches = math.ceil(max_points / config.data.eval_batch_size)
  if config.runtime.max_eval_steps:
    max_batches = min(max_batches, config.runtime.max_eval_steps)
  key = models.NORMALIZED_EMBEDDING
  outputs = runner.predict(
      model, strategy,
      lambda ctx: runner.eval_batches(config, ctx, training_split=False),
      [key], max_batches=max_batches)
  embeddings = outputs[key][:max_points]
  labels = outputs[runner.LABELS][:max_points]
  names = class_names(config.data, info)
  paths: Dict[str, str] = {}
  if not distribute.is_chief(strategy):
    return paths
  print(f'[plot_embeddings] t-SNE of {len(labels)} {info.name} '
        f'{info.eval_split} embeddings (dim {embeddings.shape[-1]})',
        flush=True)
  points = tsne_2d(embeddings, seed=config.data.seed)
  paths['tsne'] = save_scatter(
      points, labels, names, os.path.join(model_dir, TSNE_FILE),
      title=f't-SNE of {info.name} {info.eval_split} embeddings '
            f'({len(labels)} images)')
  paths['projector'] = write_projector(
      embeddings, labels, names, os.path.join(model_dir, PROJECTOR_DIR))
  curves = training_curves(model_dir)
  if curves:
    paths['curves'] = save_curves(curves,
                                  os.path.join(model_dir, CURVES_FILE))
  else:
    print('[plot_embeddings] no training summaries under '
          f'{os.path.join(model_dir, "logs")}/{{pretrain,classifier}}: '
          'training_curves.png not written', flush=True)
  for what, path in paths.items():
    print(f'[plot_embeddings] wrote {what}: {path}', flush=True)
  return paths


def run_plot_embeddings(config: config_lib.ExperimentConfig,
                        strategy: tf.distribute.Strategy) -> Dict[str, str]:
  """The `--mode=plot_embeddings` handler."""
  return plot_embeddings(config, strategy)
