r"""Generalized supervised contrastive loss (GenSCL; Kim et al., 2022).

GenSCL (https://arxiv.org/abs/2206.00384) replaces SupCon's hard positive set
by a cross-entropy between two distributions over the other contrast samples:
the label similarity and the latent similarity. For an anchor i and every
other contrast sample j != i (all views of every sample, including the
anchor's own other views):

  target  t_ij = <y_i, y_j> / sum_{k != i} <y_i, y_k>
  predict p_ij = exp(s_ij) / sum_{k != i} exp(s_ik),  s_ij = <z_i, z_j> / T
  L_i = -sum_{j != i} t_ij log p_ij
      = logsumexp_{k != i} s_ik - sum_{j != i} t_ij s_ij

With soft labels y (mixed labels from CutMix / Mixup, or blended with a
teacher's predictions) the target is soft; with one-hot labels t_ij is uniform
over the positives and L_i is exactly SupCon's L_out with denominator ALL
(paper eq. 2 of Khosla et al.): `supcon_loss(..., summation_location='outside',
denominator_mode='all')`.

Differences from the GenSCL release (PyTorch): there each view carries its
own (separately mixed) label; here labels are per sample, shared by its views
(our mixing uses one partner and lambda for all views of a sample, see
`supcon_tf/data/mixing.py`). The release compares labels by cosine
similarity; the default here is the dot product (the issue's definition; the
two agree for one-hot labels) and `label_similarity='cosine'` gives the
release's.

Under a tf.distribute strategy the anchors are the replica's local batch and
the contrast set is the global batch gathered with
`distribute.cross_replica_concat` (features and labels), the anchors' own
columns offset by `replica_id * local_batch`, so the loss and its gradients
equal the single-device ones on the concatenated batch.

Optionally, extra contrast samples (e.g. a momentum queue of keys, see
`momentum.py`) join the contrast set: they are targets and softmax entries,
never anchors, and are the same on every replica (not gathered).
"""

from typing import Union

import keras
import tensorflow as tf

from supcon_tf import distribute
from supcon_tf import enums

ContrastModeLike = Union[enums.LossContrastMode, str]

LABEL_SIMILARITIES = ('dot', 'cosine')

# Logit of excluded entries (the anchor itself, empty queue slots): exp() of
# it is 0 in float32, and unlike -inf a row with nothing left stays finite.
_EXCLUDED_LOGIT = -1e9


def flatten_features(features: tf.Tensor, name: str) -> tf.Tensor:
  """Checks and casts contrastive features to float32 [batch, views, dim].

  Args:
    features: float [batch, num_views, dim, ...] (trailing dims flattened),
      any float dtype.
    name: the calling function's name, for error messages.

  Returns:
    float32 [batch, num_views, dim] with a static num_views.

  Raises:
    ValueError: bad rank, dtype or dynamic num_views.
  """
  features = tf.convert_to_tensor(features)
  if features.shape.rank is None or features.shape.rank < 3:
    raise ValueError(
        f'{name}: features must have rank >= 3 [batch, num_views, dim], got '
        f'shape {features.shape}.')
  if not features.dtype.is_floating:
    raise ValueError(
        f'{name}: features must be floating point, got {features.dtype}.')
  if features.shape[1] is None:
    raise ValueError(f'{name}: the num_views dimension (axis 1) of features '
                     f'must be static, got shape {features.shape}.')
  if features.dtype != tf.float32:
    features = tf.cast(features, tf.float32)
  if features.shape.rank > 3:
    features = tf.reshape(features,
                          tf.concat([tf.shape(features)[:2], [-1]], axis=0))
  return features


def anchors_and_contrast(features: tf.Tensor, num_anchor_views: int):
  """The dense layout shared by GenSCL and the queue-augmented SupCon.

  Args:
    features: float32 [local_batch, num_views, dim].
    num_anchor_views: A, 1 (view 0 only) or num_views.

  Returns:
    anchors: float32 [A * B, dim], row a * B + b = view a of local sample b.
    contrast: float32 [V * G, dim], row v * G + g = view v of global sample
      g (the global batch under a strategy, gathered differentiably).
    self_columns: int32 [A * B], the column of each anchor in `contrast`.
    offset: int32 scalar, global index of local sample 0.
    num_global: int32 scalar G.
  """
  local_batch = tf.shape(features)[0]
  global_features = distribute.cross_replica_concat(features)
  num_global = tf.shape(global_features)[0]
  offset = distribute.replica_id() * local_batch
  dim = tf.shape(features)[2]
  contrast = tf.reshape(tf.transpose(global_features, [1, 0, 2]), [-1, dim])
  anchors = tf.reshape(
      tf.transpose(features[:, :num_anchor_views], [1, 0, 2]), [-1, dim])
  anchor_view = tf.repeat(tf.range(num_anchor_views), local_batch)
  anchor_sample = tf.tile(tf.range(local_batch), [num_anchor_views])
  self_columns = anchor_view * num_global + offset + anchor_sample
  return anchors, contrast, self_columns, offset, num_global


def labels_tensor(labels, name: str):
  """None, int32 [n] class ids or float32 [n, classes] soft labels."""
  if labels is None:
    return None
  labels = tf.convert_to_tensor(labels)
  if labels.shape.rank not in (1, 2):
    raise ValueError(
        f'{name}: labels must be [batch] class ids or [batch, num_classes] '
        f'one-hot/soft labels, got shape {labels.shape}.')
  if labels.shape.rank == 1:
    return (tf.cast(labels, tf.int32) if labels.dtype.is_integer
            else tf.cast(labels, tf.float32))
  return tf.cast(labels, tf.float32)


def extra_contrast_samples(labels, local_batch, extra_features, extra_labels,
                           extra_mask, label_similarity: str, name: str):
  """Extra contrast samples (e.g. a momentum queue) as the losses use them.

  Args:
    labels: None or this replica's labels, from `labels_tensor`.
    local_batch: number of local samples (rows of the similarity).
    extra_features: float [m, dim]; no gradient flows into them.
    extra_labels: labels of the extra samples, the same kind as `labels`.
    extra_mask: None (all valid) or float [m], 0 for empty slots.
    label_similarity: `label_similarity_matrix` kind.
    name: the calling loss, for error messages.

  Returns:
    (features float32 [m, dim], mask float32 [m], similarity float32
    [local_batch, m] of each local sample to each extra one; 0 without
    labels).
  """
  extra = tf.stop_gradient(tf.cast(tf.convert_to_tensor(extra_features),
                                   tf.float32))
  num_extra = tf.shape(extra)[0]
  mask = (tf.ones([num_extra], tf.float32) if extra_mask is None else
          tf.cast(tf.convert_to_tensor(extra_mask), tf.float32))
  if labels is None:
    similarity = tf.zeros([local_batch, num_extra], tf.float32)
  else:
    extra_labels = tf.stop_gradient(labels_tensor(extra_labels, name))
    similarity = label_similarity_matrix(labels, extra_labels,
                                         label_similarity)
  return extra, mask, similarity


def label_similarity_matrix(row_labels: tf.Tensor, column_labels: tf.Tensor,
                            kind: str = 'dot') -> tf.Tensor:
  """Label similarity [rows, columns]: equality of ids, or <y_i, y_j>.

  Args:
    row_labels: [rows] class ids or [rows, classes] soft labels.
    column_labels: same kind as `row_labels`, [columns] or [columns, classes].
    kind: 'dot' or 'cosine' (soft labels; ids compare by equality either way).

  Returns:
    float32 [rows, columns].
  """
  if row_labels.shape.rank == 1:
    return tf.cast(tf.equal(row_labels[:, None], column_labels[None, :]),
                   tf.float32)
  if kind == 'cosine':
    row_labels = tf.math.l2_normalize(row_labels, axis=-1)
    column_labels = tf.math.l2_normalize(column_labels, axis=-1)
  return tf.matmul(row_labels, column_labels, transpose_b=True)


def genscl_loss(features,
                soft_labels,
                *,
                temperature=0.07,
                contrast_mode: ContrastModeLike = 'all_views',
                scale_by_temperature: bool = True,
                label_similarity: str = 'dot',
                extra_features=None,
                extra_labels=None,
                extra_mask=None) -> tf.Tensor:
  """Per-sample GenSCL loss (see the module docstring).

  Args:
    features: float [batch, num_views, dim] (extra trailing dims are
      flattened), L2-normalised by the caller; any float dtype, computed in
      float32. Under a strategy, the replica's local batch.
    soft_labels: float [batch, num_classes] label distributions (one-hot,
      mixed, or blended with a teacher), or int [batch] class ids (then
      label similarity is equality: one-hot), or None (each sample its own
      class: the SimCLR limit). Not differentiated.
    temperature: softmax temperature T, > 0.
    contrast_mode: 'all_views' (every view is an anchor) or 'one_view' (only
      view 0 is; the contrast set still holds every view).
    scale_by_temperature: multiply the loss by `temperature` (as SupCon).
    label_similarity: 'dot' (<y_i, y_j>) or 'cosine' (the GenSCL release).
    extra_features: optional float [num_extra, dim] extra contrast samples
      (e.g. a momentum queue), never anchors, identical on every replica, no
      gradient.
    extra_labels: their labels, the same kind as `soft_labels` ([num_extra]
      or [num_extra, num_classes]); ignored when `soft_labels` is None (then
      every extra sample is a negative).
    extra_mask: optional float/bool [num_extra], 0 for slots to ignore
      entirely (an unfilled queue); default all 1.

  Returns:
    float32 [batch]: each sample's loss, the mean over its anchor views.
    Anchors whose label has zero similarity to every other sample (no
    positive) contribute 0.

  Raises:
    ValueError: bad rank, batch mismatch, temperature or mode.
  """
  name = 'genscl_loss'
  contrast_mode = enums.parse_enum(enums.LossContrastMode, contrast_mode)
  if label_similarity not in LABEL_SIMILARITIES:
    raise ValueError(f'{name}: label_similarity must be one of '
                     f'{LABEL_SIMILARITIES}, got {label_similarity!r}.')
  if isinstance(temperature, (int, float)) and temperature <= 0:
    raise ValueError(f'{name}: temperature must be > 0, got {temperature}.')
  features = flatten_features(features, name)
  labels = labels_tensor(soft_labels, name)
  if (labels is not None and labels.shape[0] is not None and
      features.shape[0] is not None and labels.shape[0] != features.shape[0]):
    raise ValueError(
        f'{name}: labels batch ({labels.shape[0]}) does not match features '
        f'batch ({features.shape[0]}).')
  num_views = features.shape[1]
  num_anchor_views = (1 if contrast_mode == enums.LossContrastMode.ONE_VIEW
                      else num_views)
  local_batch = tf.shape(features)[0]
  temperature = tf.cast(temperature, tf.float32)

  anchors, contrast, self_columns, offset, num_global = anchors_and_contrast(
      features, num_anchor_views)
  logits = tf.matmul(anchors / temperature, contrast, transpose_b=True)
  num_columns = tf.shape(contrast)[0]
  excluded = tf.cast(tf.one_hot(self_columns, num_columns), tf.bool)

  # Label similarity of each local sample to each global one, [B, G], then
  # broadcast over the views: [A * B, V * G].
  if labels is None:
    weights = tf.one_hot(offset + tf.range(local_batch), num_global)
  else:
    global_labels = tf.stop_gradient(distribute.cross_replica_concat(labels))
    weights = label_similarity_matrix(labels, global_labels, label_similarity)
  weights = tf.tile(weights, [num_anchor_views, num_views])

  if extra_features is not None:
    extra, mask, extra_weights = extra_contrast_samples(
        labels, local_batch, extra_features, extra_labels, extra_mask,
        label_similarity, name)
    extra_logits = tf.matmul(anchors / temperature, extra, transpose_b=True)
    extra_weights = tf.tile(extra_weights * mask[None, :],
                            [num_anchor_views, 1])
    logits = tf.concat([logits, extra_logits], axis=1)
    weights = tf.concat([weights, extra_weights], axis=1)
    extra_excluded = tf.broadcast_to(mask[None, :] <= 0,
                                     tf.shape(extra_logits))
    excluded = tf.concat([excluded, extra_excluded], axis=1)

  kept_logits = tf.where(excluded, tf.zeros_like(logits), logits)
  log_normalizer = tf.reduce_logsumexp(
      tf.where(excluded, tf.fill(tf.shape(logits), _EXCLUDED_LOGIT), logits),
      axis=1)
  weights = tf.stop_gradient(tf.where(excluded, tf.zeros_like(weights),
                                      weights))
  total_weight = tf.reduce_sum(weights, axis=1)
  has_positive = total_weight > 0
  targets = weights / tf.where(has_positive, total_weight,
                               tf.ones_like(total_weight))[:, None]
  loss = log_normalizer - tf.reduce_sum(targets * kept_logits, axis=1)
  loss = tf.where(has_positive, loss, tf.zeros_like(loss))
  if scale_by_temperature:
    loss = loss * temperature
  return tf.reduce_mean(tf.reshape(loss, [num_anchor_views, -1]), axis=0)


@keras.saving.register_keras_serializable(package='supcon_tf')
class GenSCLLoss(keras.losses.Loss):
  """Keras wrapper of `genscl_loss`.

  `y_true` are the labels (soft / one-hot [batch, classes] or int ids
  [batch]) and `y_pred` the features [batch, num_views, dim]. The default
  reduction averages the per-sample losses; in a custom distributed loop use
  `reduction=None` and divide the sum by the global batch.
  """

  def __init__(self,
               temperature=0.07,
               contrast_mode: ContrastModeLike = 'all_views',
               scale_by_temperature: bool = True,
               label_similarity: str = 'dot',
               reduction='sum_over_batch_size',
               name='genscl_loss',
               **kwargs):
    super().__init__(reduction=reduction, name=name, **kwargs)
    if temperature <= 0:
      raise ValueError(f'GenSCLLoss: temperature must be > 0, got '
                       f'{temperature}.')
    if label_similarity not in LABEL_SIMILARITIES:
      raise ValueError(f'GenSCLLoss: label_similarity must be one of '
                       f'{LABEL_SIMILARITIES}, got {label_similarity!r}.')
    self.temperature = float(temperature)
    self.contrast_mode = enums.parse_enum(enums.LossContrastMode,
                                          contrast_mode)
    self.scale_by_temperature = bool(scale_by_temperature)
    self.label_similarity = label_similarity

  def call(self, y_true, y_pred):
    return genscl_loss(y_pred, y_true, temperature=self.temperature,
                       contrast_mode=self.contrast_mode,
                       scale_by_temperature=self.scale_by_temperature,
                       label_similarity=self.label_similarity)

  def get_config(self):
    config = super().get_config()
    config.update(
        temperature=self.temperature,
        contrast_mode=self.contrast_mode.name.lower(),
        scale_by_temperature=self.scale_by_temperature,
        label_similarity=self.label_similarity)
    return config
