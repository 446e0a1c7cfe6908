"""Knowledge distillation from a teacher SavedModel (`--teacher=DIR`).

As GenSCL (Kim et al., 2022) does, the teacher's softened predictions are
blended into the training targets:

  targets = (1 - w) * labels + w * softmax(teacher_logits / T)

with w = `--teacher_weight` and T = `--teacher_temperature`; `labels` are the
one-hot (or CutMix / Mixup-mixed) labels. The targets feed the GenSCL loss
and the cross-entropy (SupCon keeps its hard labels).

The teacher is any SavedModel with a `logits_from_preprocessed` signature
taking float32 images [None, image_size, image_size, 3] as the input
pipeline produces them (augmented, whitened) and returning `logits`; our own
exports (`--mode=export`, `export.PREPROCESSED_SIGNATURE_KEY`) have it. The
uint8 `serving_default` signature is not used: training images are already
preprocessed. The teacher must have been trained with the same preprocessing
(dataset whitening) and label set.

In the train step the teacher runs on every view of the (mixed) images, with
no gradient; its probabilities are averaged over the views, since the labels
are per sample.
"""

import os
from typing import Optional

import tensorflow as tf

from supcon_tf import config as config_lib
from supcon_tf import export

SIGNATURE_KEY = export.PREPROCESSED_SIGNATURE_KEY


class TeacherError(config_lib.ConfigError):
  """The --teacher SavedModel is missing or unusable; the message says why."""


def blend_targets(labels, teacher_probabilities, weight) -> tf.Tensor:
  """(1 - weight) * labels + weight * teacher_probabilities, float32."""
  labels = tf.cast(labels, tf.float32)
  weight = tf.cast(weight, tf.float32)
  return (1.0 - weight) * labels + weight * tf.cast(teacher_probabilities,
                                                    tf.float32)


class Teacher:
  """A frozen teacher loaded from a SavedModel directory.

  Load under the strategy's scope (its variables are then mirrored like the
  student's) and call inside the replica step.

  Args:
    path: SavedModel directory (e.g. our `model_dir/export`).
    image_size: expected side of the preprocessed images, checked against the
      signature when given.
    num_classes: expected number of logits, checked when given.

  Raises:
    TeacherError: no SavedModel at `path`, no `logits_from_preprocessed`
      signature, or a mismatching image size or class count.
  """

  def __init__(self, path: str, image_size: Optional[int] = None,
               num_classes: Optional[int] = None):
    self.path = path
    if not (tf.io.gfile.exists(os.path.join(path, 'saved_model.pb')) or
            tf.io.gfile.exists(os.path.join(path, 'saved_model.pbtxt'))):
      raise TeacherError(
          f'--teacher={path}: no SavedModel there (no saved_model.pb). Pass '
          'the directory written by --mode=export.')
    try:
      self._loaded = tf.saved_model.load(path)
    except (OSError, ValueError, tf.errors.OpError) as e:
      raise TeacherError(f'--teacher={path}: cannot load the SavedModel: '
                         f'{e}') from e
    signatures = dict(self._loaded.signatures)
    if SIGNATURE_KEY not in signatures:
      raise TeacherError(
          f'--teacher={path}: the SavedModel has no {SIGNATURE_KEY!r} '
          f'signature (it has {sorted(signatures)}), which takes float32 '
          'images preprocessed as in training. Re-export the teacher with '
          'this version (--mode=export --model_dir=TEACHER_RUN).')
    self._fn = signatures[SIGNATURE_KEY]
    _, kwargs = self._fn.structured_input_signature
    if len(kwargs) != 1:
      raise TeacherError(f'--teacher={path}: {SIGNATURE_KEY!r} must take one '
                         f'input (images), got {sorted(kwargs)}.')
    self._input_name, spec = next(iter(kwargs.items()))
    self.image_size = spec.shape[1]
    if image_size is not None and spec.shape[1:3] != [image_size, image_size]:
      raise TeacherError(
          f'--teacher={path}: the teacher takes images of shape '
          f'{spec.shape}, but training images are {image_size}x{image_size} '
          '(--image_size).')
    outputs = self._fn.structured_outputs
    if 'logits' not in outputs:
      raise TeacherError(f'--teacher={path}: {SIGNATURE_KEY!r} returns no '
                         f'logits (outputs: {sorted(outputs)}).')
    self.num_classes = outputs['logits'].shape[-1]
    if num_classes is not None and self.num_classes != num_classes:
      raise TeacherError(
          f'--teacher={path}: the teacher predicts {self.num_classes} '
          f'classes, the dataset has {num_classes}.')

  def logits(self, images) -> tf.Tensor:
    """float32 [n, classes] teacher logits of images [n, s, s, 3], no grad."""
    images = tf.stop_gradient(tf.cast(images, tf.float32))
    return tf.stop_gradient(
        self._fn(**{self._input_name: images})['logits'])

  def probabilities(self, images, temperature: float = 1.0) -> tf.Tensor:
    """softmax(logits / T) per sample, averaged over the views.

    Args:
      images: [batch, views, s, s, 3] or [batch, s, s, 3].
      temperature: softening temperature T > 0.

    Returns:
      float32 [batch, classes].
    """
    images = tf.convert_to_tensor(images)
    multi_view = images.shape.rank == 5
    if multi_view:
      shape = tf.shape(images)
      images = tf.reshape(images, tf.concat([[-1], shape[2:]], axis=0))
    probabilities = tf.nn.softmax(
        self.logits(images) / tf.cast(temperature, tf.float32), axis=-1)
    if multi_view:
      probabilities = tf.reduce_mean(
          tf.reshape(probabilities, [shape[0], shape[1], -1]), axis=1)
    return probabilities
