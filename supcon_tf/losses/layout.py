"""Layout helpers shared by every contrastive loss of the package.

Each loss takes features [batch, num_views, dim] and labels (None, [batch]
class ids or [batch, num_classes] soft rows); these helpers check and flatten
them, split anchors from the (cross-replica) contrast set, compare labels and
append extra contrast samples (a momentum queue). No loss module reaches into
another loss's file: what two of them need lives here.
"""

import tensorflow as tf

from supcon_tf import distribute

# Logit of excluded entries (the anchor itself, empty queue slots): exp() of
# it is 0 in float32, and unlike -inf a row with nothing left stays finite.
EXCLUDED_LOGIT = -1e9


def check_temperature(temperature, name: str) -> None:
  """Raises ValueError unless a Python-number temperature is > 0.

  (A tensor temperature is the caller's responsibility: it cannot be read at
  trace time.)
  """
  if isinstance(temperature, (int, float)) and temperature <= 0:
    raise ValueError(f'{name}: temperature must be > 0, got {temperature}.')


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
