"""SavedModel export for serving.

The exported model's `serving_default` signature takes raw images and does
the eval preprocessing itself, so clients send pixels, not tensors shaped for
the network:

  images: uint8 [batch, height, width, 3], any height and width (one size per
          request batch); resized and cropped as `--eval_crop_method` says,
          whitened as in training.
  returns logits        float32 [batch, num_classes]
          probabilities float32 [batch, num_classes] (softmax of the logits)
          embedding     float32 [batch, dim]  L2-normalised encoder output
          unnormalized_embedding float32 [batch, dim]
          projection    float32 [batch, projection_dim]
"""

import os
from typing import Optional

import keras
import tensorflow as tf

from supcon_tf import checkpoints
from supcon_tf import config as config_lib
from supcon_tf import models
from supcon_tf.data import augment
from supcon_tf.data import datasets
from supcon_tf.data import pipeline

SIGNATURE_KEY = 'serving_default'


class ExportError(RuntimeError):
  """The export cannot be written; the message says why."""


def default_export_dir(config: config_lib.ExperimentConfig) -> str:
  return (config.runtime.export_dir or
          os.path.join(config.runtime.model_dir, checkpoints.EXPORT_DIR))


def serving_fn(model: models.SupConModel,
               config: config_lib.ExperimentConfig,
               info: datasets.DatasetInfo):
  """The tf.function behind the serving signature (see module doc)."""
  size = config.augment.image_size
  whitening = pipeline.whitening_constants(info, config.augment)
  dtype = pipeline.output_dtype(config)

  @tf.function(input_signature=[
      tf.TensorSpec([None, None, None, 3], tf.uint8, name='images')])
  def serve(images):
    processed = tf.map_fn(
        lambda image: augment.preprocess_for_eval(image, config.augment),
        images, fn_output_signature=tf.TensorSpec([size, size, 3], tf.float32))
    processed = pipeline.finalize_images(processed, whitening, dtype)
    outputs = model(processed, training=False)
    logits = outputs[models.LOGITS]
    return {
        'logits': logits,
        'probabilities': tf.nn.softmax(logits, axis=-1),
        'embedding': outputs[models.NORMALIZED_EMBEDDING],
        'unnormalized_embedding': outputs[models.EMBEDDING],
        'projection': outputs[models.PROJECTION],
    }

  return serve


def export_saved_model(config: config_lib.ExperimentConfig,
                       strategy: Optional[tf.distribute.Strategy] = None,
                       model: Optional[models.SupConModel] = None,
                       export_dir: Optional[str] = None,
                       overwrite: bool = True) -> str:
  """Writes the SavedModel of the newest checkpoint in model_dir.

  Args:
    config: the experiment config (architecture and preprocessing).
    strategy: unused beyond variable placement (export runs on one device).
    model: export this model instead of loading the newest checkpoint.
    export_dir: destination; default `--export_dir` or `model_dir/export`.
    overwrite: replace a non-empty `export_dir`.

  Returns:
    The export directory.

  Raises:
    ExportError: if `export_dir` is not empty and `overwrite` is False.
  """
  del strategy  # Serving graphs must not capture distributed variables.
  info = datasets.get_dataset_info(config.data)
  if model is None:
    model = checkpoints.load_model_for_inference(config, info)
  export_dir = export_dir or default_export_dir(config)
  if tf.io.gfile.exists(export_dir) and tf.io.gfile.listdir(export_dir):
    if not overwrite:
      raise ExportError(
          f'--export_dir={export_dir} is not empty; pass --overwrite to '
          'replace it.')
    tf.io.gfile.rmtree(export_dir)
  archive = keras.export.ExportArchive()
  archive.track(model)
  archive.add_endpoint(SIGNATURE_KEY, serving_fn(model, config, info))
  archive.write_out(export_dir, verbose=False)
  print(f'[export] SavedModel written to {export_dir}', flush=True)
  return export_dir
