"""Beyond the reference: the train-step hooks of GenSCL, label mixing,
distillation and the momentum queue (docs/beyond_reference_training.md).

`Trainer` builds one `TrainStepExtensions` per stage and calls it from its
per-replica step:

  images, targets = ext.prepare(images, labels, step)   # mixing, teacher
  ... forward ...
  if ext.owns_contrastive_loss:                         # GenSCL and/or queue
    per_sample = ext.contrastive_loss(outputs, labels, targets)
  ce targets = targets if targets is not None else one_hot(labels)
  ... apply gradients ...
  ext.after_step(images, labels, targets)               # EMA + enqueue

Everything here acts in stage 1 (the stage that trains the representation,
or the cross-entropy baseline); stage 2, the classifier on the frozen
encoder, trains on the plain labels. With every feature off (the default)
`prepare` returns (images, None) and nothing else is called, so training is
exactly the reference's.
"""

from typing import Dict, Optional

import tensorflow as tf

from supcon_tf import config as config_lib
from supcon_tf import distribute
from supcon_tf import enums
from supcon_tf import losses
from supcon_tf import models
from supcon_tf.data import datasets
from supcon_tf.data import mixing
from supcon_tf.training import distill
from supcon_tf.training import momentum

# Mixed into the seed of the mixing draws, so they are independent of the
# other streams drawn from the same `DataConfig.seed`.
MIX_SALT = 0x313


class TrainStepExtensions:
  """Per-stage state and hooks (build under the strategy's scope).

  Args:
    config: the experiment config.
    info: the dataset's info (class count).
    model: the model being trained.
    stage_index: 1 (pretrain) or 2 (classifier).
  """

  def __init__(self, config: config_lib.ExperimentConfig,
               info: datasets.DatasetInfo, model: models.SupConModel,
               stage_index: int):
    self.config = config
    self.num_classes = info.num_classes
    loss = config.loss
    stage = config.stage_1 if stage_index == 1 else config.stage_2
    active = stage_index == 1
    contrastive = active and stage.contrastive_loss_weight > 0
    self.mix = config.augment.mix if active else enums.MixType.NONE
    self.genscl = contrastive and (
        loss.contrastive_loss == enums.ContrastiveLoss.GENSCL)
    self.teacher: Optional[distill.Teacher] = None
    if active and loss.teacher:
      self.teacher = distill.Teacher(loss.teacher,
                                     image_size=config.augment.image_size,
                                     num_classes=info.num_classes)
    self.momentum: Optional[momentum.MomentumContrast] = None
    if contrastive and loss.queue_size > 0:
      if self.genscl:
        label_shape, label_dtype = (info.num_classes,), tf.float32
      else:
        label_shape, label_dtype = (), tf.int32
      self.momentum = momentum.MomentumContrast(
          models.build_experiment_model(config, info.num_classes), model, loss.queue_size,
          loss.momentum, label_shape=label_shape, label_dtype=label_dtype)

  @property
  def needs_targets(self) -> bool:
    """Whether the step uses soft targets [batch, classes]."""
    return (self.mix != enums.MixType.NONE or self.teacher is not None or
            self.genscl)

  @property
  def owns_contrastive_loss(self) -> bool:
    """Whether `contrastive_loss` replaces `losses.supcon_loss`."""
    return self.genscl or self.momentum is not None

  def checkpoint_objects(self) -> Dict[str, tf.Module]:
    """Training state to checkpoint next to the model and optimizer."""
    return {'momentum_contrast': self.momentum} if self.momentum else {}

  def prepare(self, images, labels, step):
    """Mixes the batch and builds the soft targets.

    Args:
      images: this replica's [batch, views, h, w, 3].
      labels: int [batch].
      step: the optimizer step (seeds the mixing draws with the replica id,
        statelessly, so a resumed run mixes as an uninterrupted one).

    Returns:
      (images, targets): targets float32 [batch, num_classes], or None when
      no feature needs them.
    """
    if not self.needs_targets:
      return images, None
    targets = tf.one_hot(labels, self.num_classes)
    if self.mix != enums.MixType.NONE:
      seed = tf.constant([self.config.data.seed, MIX_SALT], tf.int64)
      seed = tf.random.experimental.stateless_fold_in(
          seed, tf.cast(tf.convert_to_tensor(step), tf.int64))
      seed = tf.random.experimental.stateless_fold_in(
          seed, tf.cast(distribute.replica_id(), tf.int64))
      images, targets = mixing.mix(self.mix, images, targets,
                                   self.config.augment.mix_alpha, seed)
    if self.teacher is not None:
      loss = self.config.loss
      targets = distill.blend_targets(
          targets, self.teacher.probabilities(images,
                                              loss.teacher_temperature),
          loss.teacher_weight)
    return images, targets

  def contrastive_loss(self, outputs, labels, targets) -> tf.Tensor:
    """Per-sample GenSCL / queue-augmented SupCon loss, float32 [batch]."""
    loss = self.config.loss
    features = outputs[models.PROJECTION]
    queue = {}
    if self.momentum is not None:
      queue_features, queue_labels, queue_mask = self.momentum.read_queue()
    if self.genscl:
      if self.momentum is not None:
        queue = dict(extra_features=queue_features, extra_labels=queue_labels,
                     extra_mask=queue_mask)
      return losses.genscl_loss(
          features, targets, temperature=loss.temperature,
          contrast_mode=loss.contrast_mode,
          scale_by_temperature=loss.scale_by_temperature, **queue)
    return losses.supcon_loss_with_queue(
        features, labels if loss.use_labels else None, queue_features,
        queue_labels, queue_mask=queue_mask, temperature=loss.temperature,
        contrast_mode=loss.contrast_mode,
        summation_location=loss.summation_location,
        denominator_mode=loss.denominator_mode,
        scale_by_temperature=loss.scale_by_temperature)

  def after_step(self, images, labels, targets) -> None:
    """After the optimizer step: momentum EMA and enqueue (if enabled)."""
    if self.momentum is None:
      return
    self.momentum.update(images, targets if self.genscl else labels)
