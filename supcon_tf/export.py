"""SavedModel export for serving.

The exported model's `serving_default` signature takes raw images and does
the eval preprocessing itself, so clients send pixels, not tensors shaped for
the network:

  images: uint8 [batch, height, width, 3], any height and width (one size per
          request batch); resized and cropped as `--eval_crop_method` says,
          whitened as in training. The signature declares any shape and
          checks rank and channels itself, with a clear error; a wrong dtype
          is refused by TensorFlow ("expected to be a uint8 tensor").
  returns logits        float32 [batch, num_classes]
          probabilities float32 [batch, num_classes] (softmax of the logits)
          embedding     float32 [batch, dim]  L2-normalised encoder output
          unnormalized_embedding float32 [batch, dim]
          projection    float32 [batch, projection_dim]
          class_index   int32   [batch] argmax of the logits
          class_name    string  [batch] its class name (the folder name for
                        folder:PATH data; `model_dir/class_names.txt`, line
                        i = class i), when the dataset has names (all but
                        tfds datasets without ClassLabel names)

A second signature, `logits_from_preprocessed` (`PREPROCESSED_SIGNATURE_KEY`),
takes float32 images [batch, image_size, image_size, 3] preprocessed as the
training pipeline produces them (augmented, whitened) and returns `logits` and
`probabilities`; the distillation teacher (`distill.py`) uses it.
"""

import os
from typing import Optional

import keras
import tensorflow as tf

from supcon_tf import config as config_lib
from supcon_tf import errors
from supcon_tf import models
from supcon_tf.data import augment
from supcon_tf.data import datasets
from supcon_tf.data import pipeline
from supcon_tf.training import checkpoints

SIGNATURE_KEY = 'serving_default'
PREPROCESSED_SIGNATURE_KEY = 'logits_from_preprocessed'


class ExportError(errors.UserError, RuntimeError):
  """The export cannot be written; the message says why."""


def default_export_dir(config: config_lib.ExperimentConfig) -> str:
  return (config.runtime.export_dir or
          os.path.join(config.runtime.model_dir, checkpoints.EXPORT_DIR))


def check_export_dir(config: config_lib.ExperimentConfig,
                     export_dir: Optional[str] = None,
                     overwrite: Optional[bool] = None) -> str:
  """The export directory, if it may be written; see `export_saved_model`.

  Called before training by `train_then_eval` too, so that a refusal comes
  before hours of training, not after.

  Raises:
    ExportError: no destination, or a non-empty one that may not be replaced.
  """
  if not (export_dir or config.runtime.export_dir or config.runtime.model_dir):
    raise ExportError('--export_dir (or --model_dir) is required to export.')
  export_dir = export_dir or default_export_dir(config)
  if overwrite is None:
    # model_dir/export is the run's own output, rewritten by every
    # train_then_eval; an explicit --export_dir may hold something else.
    overwrite = config.runtime.overwrite or not config.runtime.export_dir
  if (not overwrite and tf.io.gfile.exists(export_dir) and
      tf.io.gfile.listdir(export_dir)):
    raise ExportError(
        f'--export_dir={export_dir} is not empty; pass --overwrite to '
        'replace it, or choose another directory.')
  return export_dir


def serving_fn(model: models.SupConModel,
               config: config_lib.ExperimentConfig,
               info: datasets.DatasetInfo):
  """The tf.function behind the serving signature (see module doc)."""
  size = config.augment.image_size
  whitening = pipeline.whitening_constants(info, config.augment)
  dtype = pipeline.output_dtype(config)
  # A constant of the graph: the SavedModel needs no asset file to name
  # classes (a tf.lookup table would; a gather by index is all it takes).
  names = (tf.constant(list(info.class_names), tf.string)
           if info.class_names and len(info.class_names) == info.num_classes
           else None)

  # Any rank in the signature, checked here: a loaded signature does not
  # check shapes, so a wrong rank or channel count would otherwise fail deep
  # inside the preprocessing with an unrelated message.
  # No Python control flow on tensors here, so no autograph (whose analysis of
  # this function was seen to take minutes after other functions' tracing).
  @tf.function(input_signature=[tf.TensorSpec(None, tf.uint8, name='images')],
               autograph=False)
  def serve(images):
    with tf.control_dependencies([
        tf.debugging.assert_rank(
            images, 4, message='images must be uint8 [batch, height, width, '
            '3]: wrong rank'),
        tf.debugging.assert_equal(
            tf.shape(images)[-1], 3, message='images must be uint8 [batch, '
            'height, width, 3]: wrong number of channels (RGB needs 3)')]):
      images = tf.ensure_shape(tf.identity(images), [None, None, None, 3])
    processed = tf.map_fn(
        lambda image: augment.preprocess_for_eval(image, config.augment),
        images, fn_output_signature=tf.TensorSpec([size, size, 3], tf.float32))
    processed = pipeline.finalize_images(processed, whitening, dtype)
    outputs = model(processed, training=False)
    logits = outputs[models.LOGITS]
    result = {
        'logits': logits,
        'probabilities': tf.nn.softmax(logits, axis=-1),
        'embedding': outputs[models.NORMALIZED_EMBEDDING],
        'unnormalized_embedding': outputs[models.EMBEDDING],
        'projection': outputs[models.PROJECTION],
    }
    index = tf.argmax(logits, axis=-1, output_type=tf.int32)
    result['class_index'] = index
    if names is not None:
      result['class_name'] = tf.gather(names, index)
    return result

  return serve


def preprocessed_fn(model: models.SupConModel,
                    config: config_lib.ExperimentConfig):
  """The tf.function behind `PREPROCESSED_SIGNATURE_KEY` (see module doc)."""
  size = config.augment.image_size
  dtype = pipeline.output_dtype(config)

  @tf.function(input_signature=[
      tf.TensorSpec([None, size, size, 3], tf.float32, name='images')])
  def logits_from_preprocessed(images):
    logits = model(tf.cast(images, dtype), training=False)[models.LOGITS]
    return {'logits': logits, 'probabilities': tf.nn.softmax(logits, axis=-1)}

  return logits_from_preprocessed


def export_saved_model(config: config_lib.ExperimentConfig,
                       strategy: Optional[tf.distribute.Strategy] = None,
                       model: Optional[models.SupConModel] = None,
                       export_dir: Optional[str] = None,
                       overwrite: Optional[bool] = None) -> str:
  """Writes the SavedModel of the newest checkpoint in model_dir.

  Args:
    config: the experiment config (architecture and preprocessing).
    strategy: unused beyond variable placement (export runs on one device).
    model: export this model instead of loading the newest checkpoint.
    export_dir: destination; default `--export_dir` or `model_dir/export`.
    overwrite: replace a non-empty `export_dir`. None: `--overwrite` for an
      explicit `--export_dir`; the default `model_dir/export` (the run's own
      export) is always replaced.

  Returns:
    The export directory.

  Raises:
    ExportError: if `export_dir` is not empty and may not be replaced.
  """
  del strategy  # Serving graphs must not capture distributed variables.
  export_dir = check_export_dir(config, export_dir, overwrite)
  info = datasets.get_dataset_info(
      config.data, config.runtime.model_dir)
  if model is None:
    model = checkpoints.load_model_for_inference(config, info)
  if tf.io.gfile.exists(export_dir) and tf.io.gfile.listdir(export_dir):
    tf.io.gfile.rmtree(export_dir)
  archive = keras.export.ExportArchive()
  archive.track(model)
  archive.add_endpoint(SIGNATURE_KEY, serving_fn(model, config, info))
  archive.add_endpoint(PREPROCESSED_SIGNATURE_KEY,
                       preprocessed_fn(model, config))
  archive.write_out(export_dir, verbose=False)
  if config.runtime.model_dir:
    datasets.save_run_files(info, config.runtime.model_dir,
                            config.augment.apply_whitening)
  print(f'[export] SavedModel written to {export_dir}', flush=True)
  return export_dir
