"""The SupCon model: encoder + projection head + classification head.

`SupConModel` takes its three parts as constructor arguments and returns a dict
keyed by the constants below, all float32:

* `EMBEDDING`: encoder output `[..., feature_dim]`.
* `NORMALIZED_EMBEDDING`: the same, L2-normalised.
* `PROJECTION`: projection head output `[..., projection_dim]` (unit norm).
* `LOGITS`: classification head output `[..., num_classes]`.

As in the reference, both heads read the normalised embedding when
`normalize_embedding` (else the raw one), and the classification head sits
behind a stop-gradient by default, so the cross-entropy loss of stage 2 trains
the classifier only.

Multi-view batches `[batch, views, h, w, c]` go through the encoder as one
batch of `batch * views` images (so batch norm sees every view, as in the
reference) and come back as `[batch, views, ...]`; single-view batches
`[batch, h, w, c]` come back as `[batch, ...]`.
"""

from typing import Dict, Optional

import keras
from keras import ops
import tensorflow as tf

from supcon_tf import config as config_lib
from supcon_tf.models import heads
from supcon_tf.models import resnet

EMBEDDING = 'embedding'
NORMALIZED_EMBEDDING = 'normalized_embedding'
PROJECTION = 'projection'
LOGITS = 'logits'
OUTPUT_KEYS = (EMBEDDING, NORMALIZED_EMBEDDING, PROJECTION, LOGITS)


@keras.saving.register_keras_serializable(package='supcon_tf')
class SupConModel(keras.Model):
  """Encoder, projection head and classification head wired together.

  The parts are tracked as the attributes `encoder`, `projection_head` and
  `classification_head`, so each can be checkpointed on its own
  (`tf.train.Checkpoint(encoder=model.encoder)`), and a full-model checkpoint
  (`tf.train.Checkpoint(model=model)`) holds them under those names.

  Args:
    encoder: Keras model/layer mapping images `[n, h, w, c]` to `[n, dim]`.
    projection_head: Layer mapping `[n, dim]` to `[n, projection_dim]`.
    classification_head: Layer mapping `[n, dim]` to `[n, num_classes]`.
    normalize_embedding: Feed both heads the L2-normalised embedding.
    stop_gradient_before_projection_head: No gradient from the projection head
      into the encoder.
    stop_gradient_before_classification_head: No gradient from the
      classification head into the encoder (reference default: True).
    name: Model name.
    **kwargs: Other `keras.Model` arguments.
  """

  def __init__(self,
               encoder: keras.layers.Layer,
               projection_head: keras.layers.Layer,
               classification_head: keras.layers.Layer,
               normalize_embedding: bool = True,
               stop_gradient_before_projection_head: bool = False,
               stop_gradient_before_classification_head: bool = True,
               name: str = 'supcon_model',
               **kwargs):
    super().__init__(name=name, **kwargs)
    self.encoder = encoder
    self.projection_head = projection_head
    self.classification_head = classification_head
    self.normalize_embedding = normalize_embedding
    self.stop_gradient_before_projection_head = (
        stop_gradient_before_projection_head)
    self.stop_gradient_before_classification_head = (
        stop_gradient_before_classification_head)

  def build(self, input_shape=None):
    """Builds the heads from the encoder's output size.

    Args:
      input_shape: Unused beyond building an unbuilt encoder; the encoder must
        report its `output_shape` (functional models do).
    """
    if not self.encoder.built:
      self.encoder.build(tuple(input_shape)[-4:] if input_shape else None)
    dim = self.encoder.output_shape[-1]
    for head in (self.projection_head, self.classification_head):
      if not head.built:
        head.build((None, dim))

  def call(self, images, training=None) -> Dict[str, tf.Tensor]:
    """Runs the encoder once and both heads.

    Args:
      images: float `[batch, h, w, c]` or multi-view `[batch, views, h, w, c]`.
      training: Batch norm in train mode (batch statistics, moving-average
        updates) when True.

    Returns:
      Dict of float32 tensors keyed by `EMBEDDING`, `NORMALIZED_EMBEDDING`,
      `PROJECTION`, `LOGITS`; each `[batch, dim]`, or `[batch, views, dim]`
      for multi-view input.

    Raises:
      ValueError: if `images` is not of rank 4 or 5.
    """
    rank = len(images.shape)
    if rank not in (4, 5):
      raise ValueError('SupConModel expects images [batch, h, w, c] or '
                       f'[batch, views, h, w, c], got shape {images.shape}.')
    if rank == 5:
      shape = ops.shape(images)
      views = shape[1]
      # Sample-major: the views of one sample are adjacent rows.
      images = ops.reshape(images, (-1,) + tuple(shape[2:]))

    embedding = ops.cast(self.encoder(images, training=training), 'float32')
    normalized_embedding = heads.l2_normalize(embedding, axis=-1)
    head_input = (normalized_embedding if self.normalize_embedding
                  else embedding)
    projection_input = head_input
    if self.stop_gradient_before_projection_head:
      projection_input = ops.stop_gradient(projection_input)
    classification_input = head_input
    if self.stop_gradient_before_classification_head:
      classification_input = ops.stop_gradient(classification_input)
    outputs = {
        EMBEDDING: embedding,
        NORMALIZED_EMBEDDING: normalized_embedding,
        PROJECTION: self.projection_head(projection_input, training=training),
        LOGITS: self.classification_head(classification_input,
                                         training=training),
    }
    outputs = {k: ops.cast(v, 'float32') for k, v in outputs.items()}
    if rank == 5:
      outputs = {k: ops.reshape(v, (-1, views, v.shape[-1]))
                 for k, v in outputs.items()}
    return outputs

  @property
  def encoder_compute_dtype(self) -> str:
    """Compute dtype of the encoder's layers: float32, bfloat16 or float16.

    A training loop wraps its optimizer in `keras.optimizers.LossScaleOptimizer`
    when this is float16.
    """
    for layer in getattr(self.encoder, 'layers', [self.encoder]):
      if layer.weights:
        return layer.compute_dtype
    return self.encoder.compute_dtype

  def get_config(self):
    serialize = keras.saving.serialize_keras_object
    return {
        'name': self.name,
        'trainable': self.trainable,
        'encoder': serialize(self.encoder),
        'projection_head': serialize(self.projection_head),
        'classification_head': serialize(self.classification_head),
        'normalize_embedding': self.normalize_embedding,
        'stop_gradient_before_projection_head':
            self.stop_gradient_before_projection_head,
        'stop_gradient_before_classification_head':
            self.stop_gradient_before_classification_head,
    }

  @classmethod
  def from_config(cls, config, custom_objects=None):
    config = dict(config)
    for key in ('encoder', 'projection_head', 'classification_head'):
      config[key] = keras.saving.deserialize_keras_object(
          config[key], custom_objects=custom_objects)
    return cls(**config)


def mixed_precision_policy() -> str:
  """Name of the mixed dtype policy suited to the visible hardware.

  bfloat16 on CPU/TPU and on GPUs with native bfloat16 (compute capability
  8.0+: A100, H100, ...), where it needs no loss scaling; float16 on older
  GPUs (V100, T4), whose tensor cores lack bfloat16.

  Returns:
    `'mixed_bfloat16'` or `'mixed_float16'`.
  """
  gpus = tf.config.list_physical_devices('GPU')
  if not gpus:
    return 'mixed_bfloat16'
  for gpu in gpus:
    capability = tf.config.experimental.get_device_details(gpu).get(
        'compute_capability')
    if capability is None or tuple(capability) < (8, 0):
      return 'mixed_float16'
  return 'mixed_bfloat16'


def build_model(model_config: config_lib.ModelConfig,
                num_classes: int,
                mixed_precision: bool = False,
                policy: Optional[str] = None) -> SupConModel:
  """Builds (and creates the variables of) a SupConModel from the config.

  Call inside `strategy.scope()` to place the variables for a strategy.

  Args:
    model_config: Architecture options.
    num_classes: Logits of the classification head.
    mixed_precision: Run the layers under `mixed_precision_policy()` (float32
      variables, bfloat16/float16 compute). Outputs stay float32. The global
      Keras policy is not touched.
    policy: Explicit dtype policy name for every layer; overrides
      `mixed_precision`.

  Returns:
    A built `SupConModel` taking images `[batch, h, w, 3]` or
    `[batch, views, h, w, 3]`.
  """
  if policy is None:
    policy = mixed_precision_policy() if mixed_precision else 'float32'
  c = model_config
  encoder = resnet.build_encoder(
      depth=c.depth, width=c.width, architecture=c.architecture,
      first_conv_kernel_size=c.first_conv_kernel_size,
      first_conv_stride=c.first_conv_stride,
      use_initial_max_pool=c.use_initial_max_pool,
      use_global_batch_norm=c.use_global_batch_norm, dtype=policy)
  projection_head = heads.ProjectionHead(
      feature_dims=c.projection_head_layers, normalize_output=True,
      use_batch_norm=c.use_projection_batch_norm,
      use_batch_norm_beta=c.use_projection_batch_norm_beta,
      use_global_batch_norm=c.use_global_batch_norm, dtype=policy)
  classification_head = heads.ClassificationHead(
      num_classes, zero_initialize=c.zero_initialize_classifier, dtype=policy)
  model = SupConModel(
      encoder, projection_head, classification_head,
      normalize_embedding=c.normalize_embedding,
      stop_gradient_before_projection_head=(
          c.stop_gradient_before_projection_head),
      stop_gradient_before_classification_head=(
          c.stop_gradient_before_classification_head))
  model.build((None, None, None, 3))
  return model


def build_experiment_model(config: config_lib.ExperimentConfig,
                           num_classes: int) -> SupConModel:
  """The model of an experiment (call under `strategy.scope()`).

  Args:
    config: the experiment config (architecture, mixed precision).
    num_classes: of the dataset.
  """
  return build_model(config.model, num_classes,
                     mixed_precision=config.augment.allow_mixed_precision)
