"""Projection head and classification head (reference semantics).

Both heads take rank-2 inputs `[batch, dim]` and are Keras layers with
`get_config`, so they serialise and checkpoint on their own.

Projection head (`supcon/projection_head.py` of the reference): one Dense layer
per entry of `feature_dims`; between consecutive layers an optional batch norm
(with or without beta) and a ReLU; no bias on the last layer, nor on layers
followed by batch norm; kernels ~ N(0, 0.01^2), biases zero; output
L2-normalised. Classification head (`supcon/classification_head.py`): one Dense
layer with bias, kernel zero or Glorot-uniform initialised.
"""

from typing import Sequence, Union

import keras
from keras import ops

from supcon_tf.models import resnet

DTypeLike = Union[None, str, keras.DTypePolicy]


def l2_normalize(x, axis: int = -1, epsilon: float = 1e-12):
  """`x / max(||x||_2, sqrt(epsilon))` along `axis`, like tf.nn.l2_normalize.

  Args:
    x: Float tensor (any shape); computed and returned in float32 because a
      norm over thousands of bfloat16 values loses too much precision.
    axis: Axis to normalise.
    epsilon: Lower bound of the squared norm (avoids division by zero).

  Returns:
    float32 tensor of the shape of `x`.
  """
  x = ops.cast(x, 'float32')
  square_sum = ops.sum(ops.square(x), axis=axis, keepdims=True)
  return x * ops.rsqrt(ops.maximum(square_sum, epsilon))


def _check_rank_2(layer_name: str, shape) -> None:
  if len(shape) != 2:
    raise ValueError(f'{layer_name} expects inputs of rank 2 [batch, dim], got '
                     f'shape {tuple(shape)}.')


@keras.saving.register_keras_serializable(package='supcon_tf')
class ProjectionHead(keras.layers.Layer):
  """MLP projection head with L2-normalised output.

  Input: `[batch, dim]` float. Output: `[batch, feature_dims[-1]]` float32
  (unit norm when `normalize_output`), or the input normalised when
  `feature_dims` is empty.

  Args:
    feature_dims: Units of each Dense layer, e.g. `(2048, 128)`.
    normalize_output: L2-normalise the output.
    use_batch_norm: Batch norm between each Dense layer and its ReLU (not after
      the last layer).
    use_batch_norm_beta: Whether those batch norms have a beta.
    use_global_batch_norm: Batch-norm moments reduced across replicas.
    dtype: Dtype policy (e.g. `'mixed_bfloat16'`).
    **kwargs: `keras.layers.Layer` arguments (`name`, ...).
  """

  def __init__(self,
               feature_dims: Sequence[int] = (2048, 128),
               normalize_output: bool = True,
               use_batch_norm: bool = False,
               use_batch_norm_beta: bool = False,
               use_global_batch_norm: bool = True,
               dtype: DTypeLike = None,
               name: str = 'projection_head',
               **kwargs):
    super().__init__(name=name, dtype=dtype, **kwargs)
    self.feature_dims = tuple(int(d) for d in feature_dims)
    self.normalize_output = normalize_output
    self.use_batch_norm = use_batch_norm
    self.use_batch_norm_beta = use_batch_norm_beta
    self.use_global_batch_norm = use_global_batch_norm
    # Each sublayer is its own attribute (applied in the order of
    # `_sublayer_names`): tf.train.Checkpoint does not follow the layers of a
    # list attribute of a Keras 3 layer, only attributes that are layers.
    self._sublayer_names = []
    for i, units in enumerate(self.feature_dims):
      is_last = i + 1 == len(self.feature_dims)
      self._add_sublayer(f'dense_{i}', keras.layers.Dense(
          units, use_bias=not is_last and not use_batch_norm,
          kernel_initializer=keras.initializers.RandomNormal(stddev=0.01),
          bias_initializer='zeros', name=f'dense_{i}', dtype=dtype))
      if not is_last:
        if use_batch_norm:
          self._add_sublayer(f'batch_norm_{i}', resnet.batch_norm(
              f'batch_norm_{i}', synchronized=use_global_batch_norm,
              center=use_batch_norm_beta, dtype=dtype))
        self._add_sublayer(f'relu_{i}',
                           keras.layers.ReLU(name=f'relu_{i}', dtype=dtype))

  def _add_sublayer(self, name: str, layer: keras.layers.Layer) -> None:
    setattr(self, name, layer)
    self._sublayer_names.append(name)

  @property
  def sublayers(self):
    """The Dense / BatchNormalization / ReLU layers, in order."""
    return [getattr(self, name) for name in self._sublayer_names]

  def build(self, input_shape):
    _check_rank_2(self.name, input_shape)
    shape = tuple(input_shape)
    for layer in self.sublayers:
      layer.build(shape)
      shape = layer.compute_output_shape(shape)

  def call(self, inputs, training=None):
    x = inputs
    for layer in self.sublayers:
      if isinstance(layer, keras.layers.BatchNormalization):
        x = layer(x, training=training)
      else:
        x = layer(x)
    if self.normalize_output:
      return l2_normalize(x, axis=-1)
    return ops.cast(x, 'float32')

  def compute_output_shape(self, input_shape):
    dim = self.feature_dims[-1] if self.feature_dims else input_shape[-1]
    return (input_shape[0], dim)

  def get_config(self):
    config = super().get_config()
    config.update(
        feature_dims=list(self.feature_dims),
        normalize_output=self.normalize_output,
        use_batch_norm=self.use_batch_norm,
        use_batch_norm_beta=self.use_batch_norm_beta,
        use_global_batch_norm=self.use_global_batch_norm)
    return config


@keras.saving.register_keras_serializable(package='supcon_tf')
class ClassificationHead(keras.layers.Layer):
  """Linear classifier: `[batch, dim]` -> logits `[batch, num_classes]`.

  Args:
    num_classes: Number of output logits.
    zero_initialize: Zero kernel (else Glorot uniform); the bias is always
      zero-initialised.
    dtype: Dtype policy; logits come out in its compute dtype (SupConModel
      casts them to float32).
    **kwargs: `keras.layers.Layer` arguments (`name`, ...).
  """

  def __init__(self,
               num_classes: int,
               zero_initialize: bool = False,
               dtype: DTypeLike = None,
               name: str = 'classification_head',
               **kwargs):
    super().__init__(name=name, dtype=dtype, **kwargs)
    if num_classes < 1:
      raise ValueError(f'num_classes={num_classes} must be positive.')
    self.num_classes = int(num_classes)
    self.zero_initialize = zero_initialize
    self.dense = keras.layers.Dense(
        self.num_classes,
        kernel_initializer='zeros' if zero_initialize else 'glorot_uniform',
        bias_initializer='zeros', name='dense', dtype=dtype)

  def build(self, input_shape):
    _check_rank_2(self.name, input_shape)
    self.dense.build(tuple(input_shape))

  def call(self, inputs, training=None):
    del training  # No train-time behaviour.
    return self.dense(inputs)

  def compute_output_shape(self, input_shape):
    return (input_shape[0], self.num_classes)

  def get_config(self):
    config = super().get_config()
    config.update(num_classes=self.num_classes,
                  zero_initialize=self.zero_initialize)
    return config

