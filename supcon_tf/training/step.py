"""The per-replica train step: which losses (chosen once), and take a step.

`LossPlan` is decided once, when the trainer is built, from the stage's loss
weights and the extensions (GenSCL / momentum queue own the contrastive
term). `TrainStep` holds the model, optimizer and extensions of one stage and
runs one step on one replica: deferred blur, extension inputs (mixing,
teacher targets), forward, the per-example losses reduced by the global
batch, weight decay, gradients, apply, extension updates (EMA, enqueue).
Bookkeeping (checkpoints, summaries, progress) lives in `trainer.py`.
"""

import dataclasses
from typing import Dict, Optional, Tuple

import keras
import tensorflow as tf

from supcon_tf import config as config_lib
from supcon_tf import distribute
from supcon_tf import enums
from supcon_tf import losses
from supcon_tf import models
from supcon_tf.data import augment
from supcon_tf.training import extensions as extensions_lib

# Mixed into the seed of the deferred blur so that it is independent of the
# input pipeline's streams drawn from the same `DataConfig.seed`.
BLUR_SALT = 0xb1e


@dataclasses.dataclass(frozen=True)
class LossPlan:
  """Which loss terms one stage trains with; fixed for the whole stage."""
  contrastive_weight: float  # 0 = no contrastive term.
  contrastive_by_extension: bool  # GenSCL / momentum queue own the term.
  cross_entropy_weight: float  # 0 = the CE term is reported, not trained.
  weight_decay: float  # 0 = none; LARS applies its own decay.

  @property
  def contrastive(self) -> bool:
    return self.contrastive_weight > 0

  @property
  def trains_classifier(self) -> bool:
    return self.cross_entropy_weight > 0


def plan_losses(config: config_lib.ExperimentConfig,
                stage: config_lib.StageConfig,
                extensions: extensions_lib.TrainStepExtensions,
                has_weight_decay_variables: bool) -> LossPlan:
  """The loss terms of `stage` (LARS decays weights inside the optimizer)."""
  del config
  decay = stage.weight_decay if (
      stage.optimizer != enums.Optimizer.LARS and
      has_weight_decay_variables) else 0.0
  return LossPlan(
      contrastive_weight=stage.contrastive_loss_weight,
      contrastive_by_extension=extensions.owns_contrastive_loss,
      cross_entropy_weight=stage.cross_entropy_loss_weight,
      weight_decay=decay)


class TrainStep:
  """One replica's train step of one stage (call under `strategy.run`).

  Args:
    config: the experiment config.
    model: the SupConModel (built under the strategy's scope).
    optimizer: its optimizer (slots built).
    extensions: GenSCL / mixing / teacher / momentum queue of the stage.
    loss_plan: the loss terms (`plan_losses`).
    global_batch: images per step over all replicas (losses divide by it).
    num_classes: of the dataset.
    weight_decay_variables: the variables the L2 term covers.
    defer_blur: blur the batch here rather than in tf.data (the reference
      does so in every training step, whatever the stage and views).
    bn_training: run batch norm in training mode.
    check_gradients: report the gradient norm (non-finite detection).
  """

  def __init__(self, config: config_lib.ExperimentConfig,
               model: models.SupConModel, optimizer,
               extensions: extensions_lib.TrainStepExtensions,
               loss_plan: LossPlan, global_batch: int, num_classes: int,
               weight_decay_variables, defer_blur: bool, bn_training: bool,
               check_gradients: bool):
    self.config = config
    self.model = model
    self.optimizer = optimizer
    self.extensions = extensions
    self.loss_plan = loss_plan
    self.global_batch = global_batch
    self.num_classes = num_classes
    self.wd_vars = weight_decay_variables
    self.defer_blur = defer_blur
    self.bn_training = bn_training
    self.check_gradients = check_gradients
    self.train_vars = model.trainable_variables

  def blur(self, images: tf.Tensor) -> tf.Tensor:
    """Deferred blur of [batch, views, h, w, c] images.

    As the reference, all views of the replica's batch form one blur batch
    with one sigma (`--blur_sigma_per_image`: one per image). Stateless, keyed
    by (seed, step, replica): a resumed run blurs the same images as an
    uninterrupted one, with no RNG state to save.
    """
    config = self.config
    seed = tf.constant([config.data.seed, BLUR_SALT], tf.int64)
    seed = tf.random.experimental.stateless_fold_in(
        seed, tf.cast(tf.convert_to_tensor(self.optimizer.iterations),
                      tf.int64))
    seed = tf.random.experimental.stateless_fold_in(
        seed, tf.cast(distribute.replica_id(), tf.int64))
    shape = tf.shape(images)
    flat = tf.reshape(images, tf.concat([[-1], shape[2:]], axis=0))
    flat = augment.batch_random_blur(
        flat, config.augment.blur_probability, seed=seed,
        sigma_per_image=config.augment.blur_sigma_per_image)
    return tf.reshape(flat, shape)

  def loss_terms(self, outputs: Dict[str, tf.Tensor], labels: tf.Tensor,
                 targets: Optional[tf.Tensor]
                 ) -> Tuple[tf.Tensor, Dict[str, tf.Tensor]]:
    """The weighted total loss of this replica and its terms.

    Args:
      outputs: the model's output dict for the replica's batch.
      labels: int [batch] class ids.
      targets: float [batch, num_classes] soft targets (mixing, teacher) or
        None.

    Returns:
      (total, terms): scalars, each already divided by the global batch
      (weight decay by the number of replicas), so summing over replicas
      gives the global value.
    """
    config, plan = self.config, self.loss_plan
    logits = outputs[models.LOGITS]
    if len(logits.shape) == 3:
      logits = logits[:, 0]  # The reference's classifier reads view 0.
    terms = {}
    total = tf.constant(0.0)
    if plan.contrastive:
      if plan.contrastive_by_extension:  # GenSCL / momentum queue.
        per_sample = self.extensions.contrastive_loss(outputs, labels,
                                                      targets)
      else:
        per_sample = losses.supcon_loss(
            outputs[models.PROJECTION],
            labels if config.loss.use_labels else None,
            temperature=config.loss.temperature,
            contrast_mode=config.loss.contrast_mode,
            summation_location=config.loss.summation_location,
            denominator_mode=config.loss.denominator_mode,
            positives_cap=config.loss.positives_cap,
            scale_by_temperature=config.loss.scale_by_temperature,
            chunk_size=config.loss.loss_chunk_size or None)
      terms['contrastive_loss'] = tf.reduce_sum(per_sample) / self.global_batch
      total += plan.contrastive_weight * terms['contrastive_loss']
    one_hot = tf.one_hot(labels, self.num_classes)
    if targets is not None:  # Mixed and / or distilled soft targets.
      one_hot = targets
    ce = keras.losses.categorical_crossentropy(
        one_hot, logits, from_logits=True,
        label_smoothing=config.loss.label_smoothing)
    terms['cross_entropy_loss'] = tf.reduce_sum(ce) / self.global_batch
    if plan.trains_classifier:
      total += plan.cross_entropy_weight * terms['cross_entropy_loss']
    correct = tf.cast(tf.math.in_top_k(labels, logits, 1), tf.float32)
    terms['top_1_accuracy'] = tf.reduce_sum(correct) / self.global_batch
    return total, terms

  def weight_decay_loss(self) -> tf.Tensor:
    """This replica's share of the L2 term (gradients are summed)."""
    replicas = tf.distribute.get_strategy().num_replicas_in_sync
    return (self.loss_plan.weight_decay *
            models.l2_weight_decay(self.wd_vars) / replicas)

  def __call__(self, images: tf.Tensor, labels: tf.Tensor
               ) -> Dict[str, tf.Tensor]:
    """One step on this replica's batch; returns its metric shares.

    Args:
      images: float [batch, views, h, w, c] (views = 1 for the classifier).
      labels: int [batch].
    """
    if self.defer_blur:
      images = self.blur(images)
    # CutMix / Mixup and teacher targets (None when neither nor GenSCL).
    images, targets = self.extensions.prepare(images, labels,
                                              self.optimizer.iterations)
    with tf.GradientTape() as tape:
      outputs = self.model(images, training=self.bn_training)
      total, terms = self.loss_terms(outputs, labels, targets)
      if self.loss_plan.weight_decay > 0:
        terms['weight_decay_loss'] = self.weight_decay_loss()
        total += terms['weight_decay_loss']
      scaled = self.optimizer.scale_loss(total)
    grads = tape.gradient(scaled, self.train_vars)
    pairs = [(g, v) for g, v in zip(grads, self.train_vars) if g is not None]
    if self.check_gradients:
      # This replica's gradient norm, averaged over replicas by the SUM
      # reduction; NaN / inf in any gradient makes it non-finite, which the
      # host loop reports even when the loss itself is still finite.
      terms['gradient_norm'] = (
          tf.linalg.global_norm([g for g, _ in pairs]) /
          tf.distribute.get_strategy().num_replicas_in_sync)
    self.optimizer.apply_gradients(pairs)
    self.extensions.after_step(images, labels, targets)  # EMA, enqueue.
    terms['loss'] = total
    return terms
