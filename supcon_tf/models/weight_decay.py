"""Which variables weight decay applies to, chosen by sub-module.

The reference filtered `tf.trainable_variables()` by name substrings
('Encoder', 'batch_normalization', 'bias'). Names are fragile in Keras 3
(layer names are user-chosen and uniquified), so here the parts are selected by
object: the model's `encoder`, `projection_head` and `classification_head`
attributes; normalisation layers are found by type and biases as the `bias`
attribute of their layer.
"""

from typing import Iterable, List, Set

import keras
import tensorflow as tf

# Normalisation parameters (gamma, beta) are never decayed.
_NORMALIZATION_LAYERS = (keras.layers.BatchNormalization,
                         keras.layers.LayerNormalization,
                         keras.layers.GroupNormalization)


def _all_layers(module: keras.layers.Layer) -> List[keras.layers.Layer]:
  """`module` and every layer nested in it (functional or subclassed)."""
  # pylint: disable=protected-access
  return list(module._flatten_layers(include_self=True, recursive=True))


def _excluded_ids(module: keras.layers.Layer, include_bias: bool) -> Set[int]:
  excluded = set()
  for layer in _all_layers(module):
    if isinstance(layer, _NORMALIZATION_LAYERS):
      excluded.update(id(v) for v in layer.weights)
    elif not include_bias and getattr(layer, 'bias', None) is not None:
      excluded.add(id(layer.bias))
  return excluded


def weight_decay_variables(model: keras.Model,
                           use_encoder: bool = True,
                           use_projection_head: bool = True,
                           use_classification_head: bool = False,
                           include_bias: bool = True) -> List[tf.Variable]:
  """Trainable variables that weight decay applies to.

  Args:
    model: A model with `encoder`, `projection_head` and `classification_head`
      attributes (e.g. `SupConModel`).
    use_encoder: Include the encoder's variables.
    use_projection_head: Include the projection head's variables.
    use_classification_head: Include the classification head's variables.
    include_bias: Include biases (Dense / convolution `bias` weights).

  Returns:
    The selected variables, in model order and without duplicates: the same
    objects as in `model.trainable_variables` (Keras variables, usable wherever
    a `tf.Variable` is). Batch-norm (and other normalisation) parameters are
    never selected, nor are non-trainable variables (e.g. of a frozen part).
  """
  parts = ((use_encoder, model.encoder),
           (use_projection_head, model.projection_head),
           (use_classification_head, model.classification_head))
  selected, seen = [], set()
  for use, part in parts:
    if not use:
      continue
    excluded = _excluded_ids(part, include_bias)
    for variable in part.trainable_variables:
      if id(variable) not in excluded and id(variable) not in seen:
        seen.add(id(variable))
        selected.append(variable)
  return selected


def l2_weight_decay(variables: Iterable[tf.Variable]) -> tf.Tensor:
  """Sum of `tf.nn.l2_loss` (half the squared L2 norm) over `variables`.

  The caller multiplies by the weight-decay coefficient, as the reference does.

  Args:
    variables: Float variables (any shapes and float dtypes).

  Returns:
    float32 scalar; 0 for no variables.
  """
  losses = [tf.nn.l2_loss(tf.cast(tf.convert_to_tensor(v), tf.float32))
            for v in variables]
  if not losses:
    return tf.constant(0.0, tf.float32)
  return tf.add_n(losses)
