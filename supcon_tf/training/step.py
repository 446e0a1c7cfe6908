"""The per-replica train step: which losses (chosen once), and take a step.

`LossPlan` is decided once, when the trainer is built, from the stage's loss
weights and the extensions (GenSCL / momentum queue own the contrastive
term). `TrainStep` holds the model, optimizer and extensions of one stage and
runs one step on one replica: deferred blur, extension inputs (mixing,
teacher targets), forward, the per-example losses reduced by the global
batch, weight decay, gradients, apply, extension updates (EMA, enqueue).
Bookkeeping (checkpoints, summaries, progress) lives in `trainer.py`.

With `micro_batch_size` (stage 1's `--micro_batch_size`) the forward and
gradients go through gradient caching (`grad_cache.cached_gradients`): the
replica batch is embedded in micro-batches, the loss (contrastive, GenSCL /
queue, cross-entropy, weight decay) is taken over the whole batch, and each
micro-batch is replayed with its cached output gradient. Blur, mixing and the
teacher run once, before, on the whole batch; the optimizer step and the
extension updates after, as without caching.
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
from supcon_tf.training import grad_cache

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
    micro_batch_size: embed the replica batch in micro-batches of this many
      images (gradient caching); 0 = one pass over the whole batch. Must
      divide the per-replica batch (`grad_cache.num_micro_batches`).
  """

  def __init__(self, config: config_lib.ExperimentConfig,
               model: models.SupConModel, optimizer,
               extensions: extensions_lib.TrainStepExtensions,
               loss_plan: LossPlan, global_batch: int, num_classes: int,
               weight_decay_variables, defer_blur: bool, bn_training: bool,
               check_gradients: bool, micro_batch_size: int = 0):
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
    self.micro_batch_size = micro_batch_size

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

  def gradients(self, images: tf.Tensor, labels: tf.Tensor, targets
                ) -> Tuple[tf.Tensor, Dict[str, tf.Tensor], list]:
    """The total loss, its terms and the (scaled) gradients of one batch.

    Args:
      images: float [batch, views, h, w, c], after blur and mixing.
      labels: int [batch].
      targets: float [batch, num_classes] or None (`extensions.prepare`).

    Returns:
      (total, terms, gradients): the unscaled total loss, the metric terms
      and one gradient (or None) per `self.train_vars`, scaled by the
      optimizer's loss scale. With `micro_batch_size` the gradients are the
      cached ones (`grad_cache.cached_gradients`).
    """
    def loss_fn(outputs):
      # The momentum queue / GenSCL loss only reads the outputs (and the
      # queue), so it is part of the whole-batch loss.
      total, terms = self.loss_terms(outputs, labels, targets)
      if self.loss_plan.weight_decay > 0:
        terms['weight_decay_loss'] = self.weight_decay_loss()
        total += terms['weight_decay_loss']
      return total, terms

    forward = lambda x: self.model(x, training=self.bn_training)  # pylint: disable=unnecessary-lambda-assignment
    if self.micro_batch_size:
      cached = grad_cache.cached_gradients(
          forward, loss_fn, images, self.train_vars, self.micro_batch_size,
          scale_loss=self.optimizer.scale_loss)
      return cached.loss, cached.terms, cached.gradients
    with tf.GradientTape() as tape:
      total, terms = loss_fn(forward(images))
      scaled = self.optimizer.scale_loss(total)
    return total, terms, tape.gradient(scaled, self.train_vars)

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
    total, terms, grads = self.gradients(images, labels, targets)
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
