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
`training/momentum.py`, `queue.py`) join the contrast set: they are targets and softmax entries,
never anchors, and are the same on every replica (not gathered).
"""

from typing import Union

import keras
import tensorflow as tf

from supcon_tf import distribute
from supcon_tf import enums
from supcon_tf.losses import layout

ContrastModeLike = Union[enums.LossContrastMode, str]

LABEL_SIMILARITIES = ('dot', 'cosine')



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
  layout.check_temperature(temperature, name)
  features = layout.flatten_features(features, name)
  labels = layout.labels_tensor(soft_labels, name)
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

  anchors, contrast, self_columns, offset, num_global = layout.anchors_and_contrast(
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
    weights = layout.label_similarity_matrix(labels, global_labels, label_similarity)
  weights = tf.tile(weights, [num_anchor_views, num_views])

  if extra_features is not None:
    extra, mask, extra_weights = layout.extra_contrast_samples(
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
      tf.where(excluded, tf.fill(tf.shape(logits), layout.EXCLUDED_LOGIT), logits),
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
    layout.check_temperature(float(temperature), 'GenSCLLoss')
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
