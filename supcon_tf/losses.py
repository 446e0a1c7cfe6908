r"""Supervised contrastive loss (Khosla et al., NeurIPS 2020) and its variants.

Notation (paper section 3.2): a batch of `batch` samples with `num_views`
augmented views each is flattened view-major into N = batch * num_views
contrast samples z (L2-normalised by the caller). For an anchor i, P(i) are the
other samples with the same label (never i itself), the negatives those with a
different label, and s_ij = <z_i, z_j> / temperature.

  L_out_i = -1/|P(i)| sum_{p in P(i)} log( exp(s_ip) / D_ip )     (eq. 2)
  L_in_i  = -log( 1/|P(i)| sum_{p in P(i)} exp(s_ip) / D_ip )     (eq. 3)

with the denominator D_ip, per `denominator_mode`:
  ALL:            sum_{j != i} exp(s_ij)  (only capped positives and negatives)
  ONE_POSITIVE:   exp(s_ip) + sum_{n negative} exp(s_in)
  ONLY_NEGATIVES: sum_{n negative} exp(s_in)

Without labels every sample is its own class (SimCLR, Chen et al. 2020).
Under a tf.distribute strategy the anchors are the replica's local batch and the
contrast set is the global batch gathered from every replica, so the result is
exactly the single-device loss on the concatenated batch.

How it is computed (same values as the reference's tiled-mask algorithm, fewer
passes over the [anchors, contrast] matrix; see docs/performance_loss.md):

* Logits live in a 4-D layout s[a, b, v, g] (anchor view a of local sample b
  against view v of global sample g); the sample-level [b, g] masks are never
  tiled to [A*B, V*G].
* The anchor's own entry is set to -inf in place (a scatter of A*B values), so
  exp() removes it from every sum; nothing subtracts it afterwards, which would
  cancel catastrophically when the self term dominates.
* Sums over positives / negatives first add the views up ([a, b, g]) and then
  take one masked dot per row, so masks are [b, g], built from label equality.
* L_out splits as log D_i - 1/|P(i)| sum_p s_ip. With class-id labels and no
  cap the second term is linear in z: <z_i, sum of z over i's class - z_i> / T,
  computed from per-class feature sums in O(N * dim); with denominator ALL the
  first term is a plain log-sum-exp over j != i, so the default configuration
  touches the N x N matrix only for the matmul, one max, one exp and one sum.
* On one device with all views as anchors the logits matrix is the Gram
  matrix Z Z^T, whose gradient is (G + G^T) Z: one matmul instead of two.
* `chunk_size` computes the loss over blocks of anchor samples with a
  tf.custom_gradient that recomputes each block in the backward pass, so
  peak memory is O(N * chunk_size) instead of O(N^2).
"""

import math
from typing import NamedTuple, Optional, Tuple, Union

import keras
import tensorflow as tf

from supcon_tf import distribute
from supcon_tf import enums

ContrastModeLike = Union[enums.LossContrastMode, str]
SummationLike = Union[enums.LossSummationLocation, str]
DenominatorLike = Union[enums.LossDenominatorMode, str]

# Label kinds (static, decided at trace time from the labels' rank).
_NO_LABELS = 'none'  # SimCLR: each sample its own class.
_CLASS_IDS = 'ids'  # [batch] class ids, compared by equality.
_SOFT = 'soft'  # [batch, classes] one-hot / soft rows, compared by dot product.


def _validate(features: tf.Tensor, labels: Optional[tf.Tensor], temperature,
              positives_cap: int, chunk_size):
  """Static checks; returns (local_batch, num_views)."""
  if features.shape.rank is None or features.shape.rank < 3:
    raise ValueError(
        f'supcon_loss: features must have rank >= 3 [batch, num_views, dim], '
        f'got shape {features.shape}.')
  if not features.dtype.is_floating:
    raise ValueError(
        f'supcon_loss: features must be floating point, got {features.dtype}.')
  num_views = features.shape[1]
  if num_views is None:
    raise ValueError('supcon_loss: the num_views dimension (axis 1) of '
                     f'features must be static, got shape {features.shape}.')
  if labels is not None:
    if labels.shape.rank not in (1, 2):
      raise ValueError(
          'supcon_loss: labels must be [batch] class ids or [batch, '
          f'num_classes] one-hot/soft labels, got shape {labels.shape}.')
    if (labels.shape[0] is not None and features.shape[0] is not None and
        labels.shape[0] != features.shape[0]):
      raise ValueError(
          f'supcon_loss: labels batch ({labels.shape[0]}) does not match '
          f'features batch ({features.shape[0]}).')
  if isinstance(temperature, (int, float)) and temperature <= 0:
    raise ValueError(
        f'supcon_loss: temperature must be > 0, got {temperature}.')
  if not isinstance(positives_cap, int) or isinstance(positives_cap, bool):
    raise ValueError(
        f'supcon_loss: positives_cap must be an int, got {positives_cap!r}.')
  if positives_cap < -1 or (positives_cap > -1 and
                            positives_cap % num_views != 0):
    raise ValueError(
        f'supcon_loss: positives_cap must be -1 (no cap) or a non-negative '
        f'multiple of num_views (= {num_views}), got {positives_cap}.')
  if chunk_size is not None and (not isinstance(chunk_size, int) or
                                 isinstance(chunk_size, bool) or
                                 chunk_size < 0):
    raise ValueError(
        f'supcon_loss: chunk_size must be None, 0 (both: no chunking) or a '
        f'positive int, got {chunk_size!r}.')
  return features.shape[0], num_views


class _Plan(NamedTuple):
  """Static (trace-time) choices of one supcon_loss call."""
  num_anchor_views: int  # A: num_views (ALL_VIEWS) or 1 (ONE_VIEW).
  num_views: int  # V.
  summation: enums.LossSummationLocation
  denominator: enums.LossDenominatorMode
  samples_per_anchor: int  # positives_cap // num_views; -1 = no cap.
  label_kind: str  # _NO_LABELS, _CLASS_IDS or _SOFT.

  @property
  def hard_uncapped(self) -> bool:
    """Positives are exactly the other members of the anchor's class."""
    return self.label_kind != _SOFT and self.samples_per_anchor < 0

  @property
  def numerator_from_class_sums(self) -> bool:
    """L_out's sum_p s_ip is computed outside the blocks, in O(N * dim)."""
    return (self.hard_uncapped and
            self.summation == enums.LossSummationLocation.OUTSIDE)

  @property
  def needs_masks(self) -> bool:
    """False only for the default L_out / ALL with hard, uncapped labels."""
    return not (self.numerator_from_class_sums and
                self.denominator == enums.LossDenominatorMode.ALL)


# -----------------------------------------------------------------------------
# Masks, per block of anchor samples.


def _cap_positives(same, diagonal, samples_per_anchor: int):
  """Keeps the first `samples_per_anchor` other positive samples of each row.

  "First" is by global column index (top_k keeps the lower index on ties), so
  the choice is the same on one device, under any number of replicas and in
  any block of rows. The anchor's own sample (its other views) is always kept.

  Args:
    same: [rows, global_batch] same-class mask.
    diagonal: [rows, global_batch] one-hot of each anchor's own column.
    samples_per_anchor: positives_cap // num_views.

  Returns:
    [rows, global_batch] capped positive-sample mask.
  """
  others = tf.minimum(same, 1.0 - diagonal)
  if samples_per_anchor == 0:
    keep = tf.zeros_like(same)
  else:
    k = tf.minimum(samples_per_anchor, tf.shape(same)[1])
    _, idx = tf.math.top_k(others, k=k)
    keep = tf.reduce_max(tf.one_hot(idx, tf.shape(same)[1]), axis=1)
  return same * tf.maximum(keep, diagonal)


def _block_masks(rows, self_cols, num_global, global_labels, plan: _Plan):
  """Sample-level masks of a block of anchor samples.

  Returns:
    positives: float32 [block, G] (capped) positive-sample weights, including
      the anchor's own sample (its other views are positives).
    negatives: float32 [block, G] negative weights, the uncapped complement
      1 - same (capped-away positives are neither).
    own_positive: float32 [block] positives[b, own column].
    own_negative: float32 [block] negatives[b, own column] (non-zero only for
      soft labels, whose self-similarity y.y can be < 1).
  """
  diagonal = tf.one_hot(rows, num_global)  # Padding rows: all zero.
  if plan.label_kind == _NO_LABELS:
    same = diagonal
  else:
    row_labels = tf.gather(global_labels, self_cols)
    if plan.label_kind == _CLASS_IDS:
      same = tf.cast(
          tf.equal(row_labels[:, None], global_labels[None, :]), tf.float32)
    else:
      same = tf.matmul(row_labels, global_labels, transpose_b=True)
  if plan.samples_per_anchor >= 0:
    positives = _cap_positives(same, diagonal, plan.samples_per_anchor)
  else:
    positives = same
  negatives = 1.0 - same
  own = tf.stack([tf.range(tf.shape(rows)[0]), self_cols], axis=1)
  return (positives, negatives, tf.gather_nd(positives, own),
          tf.gather_nd(negatives, own))


# -----------------------------------------------------------------------------
# One block of anchors: the part of the loss that needs the logits matrix.


def _self_indices(self_cols, num_anchor_views: int):
  """int32 [A * block, 4]: the (a, b, a, own column) entries of the logits."""
  block = tf.shape(self_cols)[0]
  a = tf.repeat(tf.range(num_anchor_views), block)
  b = tf.tile(tf.range(block), [num_anchor_views])
  return tf.stack([a, b, a, tf.gather(self_cols, b)], axis=1)


def _sum_over_views(x):
  """[A, block, V, G] -> [A, block, G]: view sums, so masks stay [block, G]."""
  if x.shape[2] == 1:
    return x[:, :, 0]
  return tf.reduce_sum(x, axis=2)


def _masked_row_sum(per_sample, mask):
  """sum_g mask[b, g] * per_sample[a, b, g] -> [A, block]."""
  return tf.reduce_sum(per_sample * mask[None], axis=-1)


def _row_outer(row, mask):
  """row[a, b] * mask[b, g] -> [A, block, 1, G], broadcast over views."""
  return (row[:, :, None] * mask[None])[:, :, None, :]


def _self_setter(self_idx, self_diagonal):
  """Returns set_self(x, value): x [A, block, V, G] with the anchors' own
  entries replaced by the scalar `value`.

  Args:
    self_idx: int32 [A * block, 4] positions of the anchors' own entries.
    self_diagonal: None, or an int32 scalar k such that the own entries are
      exactly diagonal k of x viewed as [A * block, V * G] (one anchor view,
      or all anchors on one device). Then set_diag writes them in place; a
      TensorScatterUpdate copies the whole N x N tensor on CPU.
  """
  if self_diagonal is None:
    num_self = tf.shape(self_idx)[:1]

    def scatter(x, value):
      return tf.tensor_scatter_nd_update(x, self_idx, tf.fill(num_self, value))

    return scatter

  def set_diagonal(x, value):
    shape = tf.shape(x)
    flat = tf.reshape(x, [shape[0] * shape[1], shape[2] * shape[3]])
    flat = tf.linalg.set_diag(flat, tf.fill(tf.shape(flat)[:1], value),
                              k=self_diagonal)
    return tf.reshape(flat, shape)

  return set_diagonal


def _contrast_terms(logits, own_logit, set_self, masks, num_positives,
                    plan: _Plan):
  """The logits-reading part of the loss, with a hand-written gradient.

  Autodiff of the same expressions would materialise several more N x N
  temporaries per step (broadcast reduction gradients, the gradient of the
  stop-gradient row shift, a copy for the scatter); the gradient below is one
  or two elementwise passes over the saved exp(logits). Notation per anchor
  row i: E_ij = exp(s_ij - m_i) with the anchor's own entry 0, N_i = sum of
  negatives, P_i = sum of positives, u_i the upstream gradient.

  Args:
    logits: float32 [A, block, V, G].
    own_logit: float32 [A, block] s_ii (soft labels only: their negatives
      include the anchor's own entry with weight 1 - y.y), else None.
    set_self: from `_self_setter`.
    masks: None (hard labels, no cap, L_out / ALL: no mask needed) or
      (positives [block, G], negatives [block, G], own_negative [block]).
    num_positives: float32 [A, block] |P(i)| (None without masks).
    plan: static options.

  Returns:
    float32 [A, block] terms (see `_block_terms`).
  """
  soft = own_logit is not None
  outside = plan.summation == enums.LossSummationLocation.OUTSIDE
  denominator_mode = plan.denominator

  def forward(logits, own_logit):
    # The anchor is never in a sum: exp(-inf) = 0 removes it from all of them
    # (A * block writes instead of an N x N mask product).
    logits = set_self(logits, -math.inf)
    # Row max over the other samples for stability; it cancels from every
    # term, so it gets no gradient. A row with no other sample has -inf.
    shift = tf.reduce_max(logits, axis=[2, 3])
    shift = tf.where(tf.math.is_finite(shift), shift, tf.zeros_like(shift))
    if soft:
      shift = tf.maximum(shift, own_logit)  # So exp(own - shift) <= 1.
    exp_logits = tf.exp(logits - shift[:, :, None, None])

    if masks is None:
      # eq. 2's D_i = sum_{j != i} exp(s_ij): the whole row, no mask.
      den = tf.reduce_sum(exp_logits, axis=[2, 3])
      den = tf.where(den > 0, den, tf.ones_like(den))

      def backward_lse(upstream):  # d log D_i / d s_ij = E_ij / D_i.
        return exp_logits * (upstream / den)[:, :, None, None], None

      return tf.math.log(den) + shift, backward_lse

    positives, negatives, own_negative = masks
    has_positive = num_positives > 0
    ones = tf.ones_like(shift)

    def safe(x):
      # Anchors without a positive are zeroed by the caller; keep their
      # terms and gradients finite. (Anchors with one keep the reference's
      # behaviour, e.g. +inf for ONLY_NEGATIVES without any negative.)
      return tf.where(has_positive, x, ones)

    count = safe(num_positives)
    view_sums = _sum_over_views(exp_logits)  # [A, block, G]
    negatives_sum = _masked_row_sum(view_sums, negatives)
    own_exp = None
    if soft:
      own_exp = own_negative[None] * tf.exp(own_logit - shift)
      negatives_sum += own_exp

    if denominator_mode != enums.LossDenominatorMode.ONE_POSITIVE:
      if denominator_mode == enums.LossDenominatorMode.ALL or not outside:
        positives_sum = safe(_masked_row_sum(view_sums, positives))
      if denominator_mode == enums.LossDenominatorMode.ALL:
        den = safe(negatives_sum + positives_sum)
        den_mask = negatives + positives
      else:
        den = safe(negatives_sum)
        den_mask = negatives
      if outside:
        terms = tf.math.log(den) + shift  # eq. 2 without its numerator.
      else:
        # eq. 3 with a per-anchor D: log D - log sum_p E_ip + log |P|.
        terms = (tf.math.log(den) - tf.math.log(positives_sum) +
                 tf.math.log(count))

      def backward(upstream):
        alpha = upstream / den
        weights = _row_outer(alpha, den_mask)
        if not outside:
          weights -= _row_outer(upstream / positives_sum, positives)
        d_own = alpha * own_exp if soft else None
        return exp_logits * weights, d_own

      return terms, backward

    # ONE_POSITIVE: D_ip = E_ip + N_i differs per positive, one more pass.
    # The anchor's own entry is set to 1 so that it adds log 1 = 0 / 0 / 1.
    n = safe(negatives_sum)
    den = exp_logits + n[:, :, None, None]
    den = set_self(den, 1.0)
    if outside:
      # -log(E/(E + N)) = log(E + N) - log E; sum_p log E_ip is the
      # numerator (minus |P| m_i), left to the caller.
      terms = (_masked_row_sum(_sum_over_views(tf.math.log(den)), positives)
               / count + shift)

      def backward_one_positive_out(upstream):
        # t = 1/|P| sum_p log(E_p + N):  dt/dE_p = 1/(|P| (E_p + N)),
        # dt/dN = c = 1/|P| sum_p 1/(E_p + N), dN/ds_ij = neg_ij E_ij.
        inverse = set_self(1.0 / den, 0.0)
        c = _masked_row_sum(_sum_over_views(inverse), positives) / count
        weights = (inverse * _row_outer(upstream / count, positives) +
                   _row_outer(upstream * c, negatives))
        d_own = upstream * c * own_exp if soft else None
        return exp_logits * weights, d_own

      return terms, backward_one_positive_out

    ratio = exp_logits / den  # E/(E + N); 0 at the anchor's own entry.
    mean_ratio = safe(_masked_row_sum(_sum_over_views(ratio), positives))
    terms = -tf.math.log(mean_ratio) + tf.math.log(count)

    def backward_one_positive_in(upstream):
      # t = -log Q, Q = sum_p Y_p, Y = E/(E + N), Z = Y (1 - Y):
      # E dt/dE_p = -Z_p / Q, dt/dN = sum_p Z_p / (Q N).
      z = ratio * (1.0 - ratio)
      c = tf.math.divide_no_nan(
          _masked_row_sum(_sum_over_views(z), positives), mean_ratio * n)
      d_logits = (exp_logits * _row_outer(upstream * c, negatives) -
                  z * _row_outer(upstream / mean_ratio, positives))
      d_own = upstream * c * own_exp if soft else None
      return d_logits, d_own

    return terms, backward_one_positive_in

  if soft:

    @tf.custom_gradient
    def core_soft(logits, own_logit):
      terms, backward = forward(logits, own_logit)
      return terms, backward

    return core_soft(logits, own_logit)

  @tf.custom_gradient
  def core(logits):
    terms, backward = forward(logits, None)
    return terms, lambda upstream: backward(upstream)[0]

  return core(logits)


def _block_terms(logits, anchors, contrast, rows, global_labels, plan: _Plan,
                 self_diagonal=None) -> Tuple[tf.Tensor, Optional[tf.Tensor]]:
  """Per-anchor loss terms of a block of anchor samples.

  Everything that reads the [A, block, V, G] logits happens here; the chunked
  path calls this once per block (and again in the backward pass).

  Args:
    logits: float32 [A, block, V, G]: s = <z_anchor, z_contrast> / T of the
      block's anchors (view a of sample b) against every contrast view v of
      every global sample g.
    anchors: float32 [A, block, D], the block's anchors already divided by T.
    contrast: float32 [V, G, D], the gathered contrast set.
    rows: int32 [block] global sample index of each block row; rows >= G are
      padding (their terms are garbage but finite).
    global_labels: None, [G] class ids or [G, K] soft labels.
    plan: static options.
    self_diagonal: see `_self_setter`.

  Returns:
    terms: float32 [A, block]. For L_out with class-id labels and no cap,
      log D_i (denominator ALL / ONLY_NEGATIVES) or 1/|P| sum_p log(E_ip +
      N_i) + m_i (ONE_POSITIVE): the numerator sum_p s_ip is left to the
      caller. Otherwise the whole loss of anchors that have a positive.
    num_positives: float32 [A, block] |P(i)|, or None when the caller
      computes it (no masks needed).
  """
  num_global = tf.shape(logits)[3]
  self_cols = tf.minimum(rows, num_global - 1)
  self_idx = _self_indices(self_cols, plan.num_anchor_views)
  soft = plan.label_kind == _SOFT
  outside = plan.summation == enums.LossSummationLocation.OUTSIDE
  numerator_here = outside and not plan.numerator_from_class_sums

  own_logit = None
  if soft or numerator_here:
    # s_ii from the features, O(block * D).
    own = tf.gather_nd(
        contrast, tf.stack([self_idx[:, 0], self_idx[:, 3]], axis=1))
    own_logit = tf.reduce_sum(
        anchors * tf.reshape(own, tf.shape(anchors)), axis=-1)  # [A, block]

  masks = num_positives = None
  if plan.needs_masks:
    positives, negatives, own_positive, own_negative = _block_masks(
        rows, self_cols, num_global, global_labels, plan)
    # |P(i)|: every view of every positive sample, minus the anchor itself.
    num_positives = (plan.num_views * tf.reduce_sum(positives, axis=1) -
                     own_positive)
    num_positives = tf.broadcast_to(num_positives[None],
                                    tf.shape(logits)[:2])  # [A, block]
    masks = (positives, negatives, own_negative)

  terms = _contrast_terms(logits, own_logit if soft else None,
                          _self_setter(self_idx, self_diagonal), masks,
                          num_positives, plan)

  if numerator_here:
    # sum_p w_ip s_ip = <z_i, sum_g w[b, g] sum_v z_vg> - w[b, own] s_ii: one
    # [block, G] x [G, D] matmul instead of a masked N x N pass.
    weighted = tf.matmul(positives, tf.reduce_sum(contrast, axis=0))
    numerator = (tf.reduce_sum(anchors * weighted[None], axis=-1) -
                 own_positive[None] * own_logit)
    terms -= numerator / tf.where(num_positives > 0, num_positives,
                                  tf.ones_like(num_positives))
  return terms, num_positives


# -----------------------------------------------------------------------------
# The numerator of L_out from per-class feature sums.


def _dense_class_ids(labels):
  """int32 [G] -> int32 [G]: equal labels get equal ids in [0, G).

  A sort rather than tf.unique so that it compiles with XLA (static shapes).
  """
  order = tf.argsort(labels, direction='DESCENDING')
  ordered = tf.gather(labels, order)
  starts = tf.cast(tf.not_equal(ordered[1:], ordered[:-1]), tf.int32)
  ids = tf.cumsum(tf.concat([tf.zeros([1], tf.int32), starts], axis=0))
  return tf.scatter_nd(order[:, None], ids, tf.shape(labels))


def _class_sum_numerator(anchors, local, contrast, offset, global_labels,
                         plan: _Plan):
  """sum_{p in P(i)} s_ip and |P(i)| for class-id labels without a cap.

  sum_p <z_i, z_p> / T = <z_i / T, S_c - z_i> with S_c the sum of every view
  of every sample of the anchor's class c: O(N * D) instead of an N x N pass,
  and differentiable by plain autodiff.

  Args:
    anchors: [A, B, D] local anchors divided by T.
    local: [A, B, D] the same anchors, not divided (z_i for the self term).
    contrast: [V, G, D] gathered contrast set.
    offset: int32 scalar, global index of local sample 0.
    global_labels: None or [G] class ids.
    plan: static options.

  Returns:
    (numerator [A, B], num_positives [A, B]) float32.
  """
  local_batch = tf.shape(anchors)[1]
  rows = offset + tf.range(local_batch)
  view_sum = tf.reduce_sum(contrast, axis=0)  # [G, D]
  if plan.label_kind == _NO_LABELS:
    class_sum = tf.gather(view_sum, rows)
    class_size = tf.ones(tf.shape(rows), tf.float32)
  else:
    num_global = tf.shape(global_labels)[0]
    ids = _dense_class_ids(global_labels)
    sums = tf.math.unsorted_segment_sum(view_sum, ids, num_global)
    sizes = tf.math.unsorted_segment_sum(
        tf.ones([num_global], tf.float32), ids, num_global)
    row_ids = tf.gather(ids, rows)
    class_sum, class_size = tf.gather(sums, row_ids), tf.gather(sizes, row_ids)
  numerator = tf.reduce_sum(anchors * (class_sum[None] - local), axis=-1)
  num_positives = plan.num_views * class_size - 1.0
  return numerator, tf.broadcast_to(num_positives[None],
                                    tf.shape(numerator))


# -----------------------------------------------------------------------------
# Dense and chunked evaluation of the blocks.


@tf.custom_gradient
def _symmetric_gram(z):
  """Z Z^T, [N, D] -> [N, N], with the gradient (G + G^T) Z (one matmul).

  Autodiff of matmul(z, z, transpose_b=True) would run two [N, N] x [N, D]
  matmuls, one per operand; the matmuls dominate the loss's cost.
  """

  def grad(upstream):
    return tf.matmul(upstream + tf.transpose(upstream), z)

  return tf.matmul(z, z, transpose_b=True), grad


def _in_xla_context() -> bool:
  """True while tracing for XLA (jit_compile=True, TPU).

  There the gradient's transposed add of `_symmetric_gram` is a strided,
  cache-unfriendly fusion that costs more than the second matmul it saves.
  """
  try:
    from tensorflow.python.ops import control_flow_util  # pylint: disable=g-import-not-at-top,g-direct-tensorflow-import
    return control_flow_util.GraphOrParentsInXlaContext(
        tf.compat.v1.get_default_graph())
  except (ImportError, AttributeError):
    return False


def _logits(anchors, contrast):
  """[A, c, D] x [V, G, D] -> [A, c, V, G] as one plain 2-D matmul."""
  a_shape, c_shape = tf.shape(anchors), tf.shape(contrast)
  dim = a_shape[2]
  flat = tf.matmul(tf.reshape(anchors, [-1, dim]),
                   tf.reshape(contrast, [-1, dim]), transpose_b=True)
  return tf.reshape(flat, tf.concat([a_shape[:2], c_shape[:2]], axis=0))


def _chunked_terms(anchors, contrast, offset, global_labels, plan: _Plan,
                   chunk_size: int):
  """`_block_terms` over blocks of at most `chunk_size` anchor samples.

  The forward pass keeps only the per-anchor terms; the gradient recomputes
  each block's logits (tf.custom_gradient + a per-block GradientTape), so the
  live N x N-sized data is one [A, block, V, G] block at a time. The local
  batch is split into K = ceil(B / chunk_size) equal blocks, zero-padded at
  the end when K does not divide B (static shapes for XLA and TPU); padding
  rows get no upstream gradient and are sliced off.

  Args:
    anchors: [A, B, D] local anchors divided by T.
    contrast: [V, G, D] gathered contrast set (gradients flow back through
      the gather).
    offset: int32 scalar, global index of local sample 0.
    global_labels: None, [G] class ids or [G, K] soft labels (no gradient).
    plan: static options.
    chunk_size: at most this many anchor samples per block.

  Returns:
    Same as `_block_terms` for all B local samples.
  """
  num_anchor_views = plan.num_anchor_views
  static_batch, dim = anchors.shape[1], tf.shape(anchors)[2]
  if static_batch is not None:  # Python ints: static block shapes.
    batch = static_batch
    num_chunks = -(-batch // chunk_size)
    block_size = -(-batch // num_chunks)
  else:
    batch = tf.shape(anchors)[1]
    num_chunks = (batch + chunk_size - 1) // chunk_size
    block_size = (batch + num_chunks - 1) // num_chunks
  padded = tf.pad(anchors, [[0, 0], [0, num_chunks * block_size - batch],
                            [0, 0]])
  # [K, A, block, D]: block k is blocks[k], a static-shaped slice.
  blocks = tf.transpose(
      tf.reshape(padded, [num_anchor_views, num_chunks, block_size, dim]),
      [1, 0, 2, 3])
  with_counts = plan.needs_masks

  def block_terms(anchors_k, contrast_k, k):
    rows = offset + k * block_size + tf.range(block_size)
    return _block_terms(_logits(anchors_k, contrast_k), anchors_k,
                        contrast_k, rows, global_labels, plan)

  def unblock(stacked):
    # [K, A, block] -> [A, B].
    flat = tf.reshape(tf.transpose(stacked, [1, 0, 2]),
                      [num_anchor_views, -1])
    return flat[:, :batch]

  @tf.custom_gradient
  def run(blocks, contrast):

    def forward(k, terms_ta, counts_ta):
      terms, counts = block_terms(blocks[k], contrast, k)
      terms_ta = terms_ta.write(k, terms)
      if with_counts:
        counts_ta = counts_ta.write(k, counts)
      return k + 1, terms_ta, counts_ta

    # parallel_iterations=1: one block alive at a time is the point.
    _, terms_ta, counts_ta = tf.while_loop(
        lambda k, *_: k < num_chunks, forward,
        (tf.constant(0), tf.TensorArray(tf.float32, size=num_chunks),
         tf.TensorArray(tf.float32, size=num_chunks)),
        parallel_iterations=1)
    outputs = [terms_ta.stack()]  # [K, A, block]
    if with_counts:
      outputs.append(counts_ta.stack())

    def grad(upstream, *unused_count_grads):

      def backward(k, d_contrast, d_blocks_ta):
        anchors_k = blocks[k]
        with tf.GradientTape() as tape:
          tape.watch([anchors_k, contrast])
          terms_k, _ = block_terms(anchors_k, contrast, k)
        d_anchors_k, d_contrast_k = tape.gradient(
            terms_k, [anchors_k, contrast], output_gradients=upstream[k],
            unconnected_gradients=tf.UnconnectedGradients.ZERO)
        return (k + 1, d_contrast + tf.convert_to_tensor(d_contrast_k),
                d_blocks_ta.write(k, d_anchors_k))

      _, d_contrast, d_blocks_ta = tf.while_loop(
          lambda k, *_: k < num_chunks, backward,
          (tf.constant(0), tf.zeros_like(contrast),
           tf.TensorArray(tf.float32, size=num_chunks)),
          parallel_iterations=1)
      return d_blocks_ta.stack(), d_contrast

    return outputs, grad

  outputs = run(blocks, contrast)
  terms = unblock(outputs[0])
  counts = unblock(outputs[1]) if with_counts else None
  return terms, counts


def supcon_loss(features,
                labels=None,
                *,
                temperature=0.07,
                contrast_mode: ContrastModeLike = 'all_views',
                summation_location: SummationLike = 'outside',
                denominator_mode: DenominatorLike = 'all',
                positives_cap: int = -1,
                scale_by_temperature: bool = True,
                chunk_size: Optional[int] = None) -> tf.Tensor:
  """Per-sample supervised contrastive loss.

  Args:
    features: float [batch, num_views, dim] (extra trailing dims are
      flattened), L2-normalised by the caller; any float dtype, computed in
      float32. Under a strategy, the replica's local batch.
    labels: None (SimCLR: each sample its own class), int [batch] class ids, or
      float [batch, num_classes] one-hot / soft labels. Not differentiated.
    temperature: softmax temperature, > 0.
    contrast_mode: 'all_views' (every view is an anchor) or 'one_view' (only
      view 0 is).
    summation_location: 'outside' (L_out, eq. 2) or 'inside' (L_in, eq. 3).
    denominator_mode: 'all', 'one_positive' or 'only_negatives'.
    positives_cap: keep at most this many positives besides the anchor's own
      views (a multiple of num_views; -1 = no cap). Capped-away positives are
      neither positives nor negatives.
    scale_by_temperature: multiply the loss by `temperature`, so the gradient
      scale does not depend on it.
    chunk_size: None or 0: compute the [anchors, contrast] logits at once.
      A positive int: compute the loss and its gradient over blocks of
      `chunk_size` local samples (times the anchor views each), recomputing
      each block in the backward pass, so peak memory is
      O(chunk_size * num_views * global_batch * num_views) instead of
      O(N^2). Same values (to float rounding) for every variant, at the price
      of one more logits matmul per block in the backward pass.

  Returns:
    float32 [batch]: each sample's loss, the mean over its anchor views.
    Anchors without any positive contribute 0.

  Raises:
    ValueError: on a bad rank, batch mismatch, temperature, cap, chunk size or
      mode.
  """
  contrast_mode = enums.parse_enum(enums.LossContrastMode, contrast_mode)
  summation_location = enums.parse_enum(enums.LossSummationLocation,
                                        summation_location)
  denominator_mode = enums.parse_enum(enums.LossDenominatorMode,
                                      denominator_mode)
  features = tf.convert_to_tensor(features)
  if labels is not None:
    labels = tf.convert_to_tensor(labels)
  static_batch, num_views = _validate(features, labels, temperature,
                                      positives_cap, chunk_size)

  if features.dtype != tf.float32:
    # (Casting a float32 tensor to float32 can cut it from an eager tape.)
    features = tf.cast(features, tf.float32)
  if features.shape.rank > 3:
    features = tf.reshape(features,
                          tf.concat([tf.shape(features)[:2], [-1]], axis=0))
  local_batch = tf.shape(features)[0]

  # Contrast set: the global batch (identity outside a multi-replica context).
  multi_replica = distribute.in_cross_replica_gather_context()
  global_features = distribute.cross_replica_concat(features)
  offset = distribute.replica_id() * local_batch
  rows = offset + tf.range(local_batch)

  if labels is None:
    label_kind, global_labels = _NO_LABELS, None
  else:
    if labels.shape.rank == 1:
      label_kind = _CLASS_IDS
      # Class ids compare by equality, whatever their dtype (Keras casts
      # y_true to the loss dtype).
      labels = tf.cast(labels, tf.int32) if labels.dtype.is_integer else (
          tf.cast(labels, tf.float32))
    else:
      label_kind = _SOFT
      labels = tf.cast(labels, tf.float32)
    global_labels = tf.stop_gradient(distribute.cross_replica_concat(labels))

  num_anchor_views = (1 if contrast_mode == enums.LossContrastMode.ONE_VIEW
                      else num_views)
  plan = _Plan(num_anchor_views=num_anchor_views, num_views=num_views,
               summation=summation_location, denominator=denominator_mode,
               samples_per_anchor=(positives_cap // num_views
                                   if positives_cap > -1 else -1),
               label_kind=label_kind)

  temperature = tf.cast(temperature, tf.float32)
  # View-major layouts: contrast [V, G, D], anchors [A, B, D] (divided by T).
  contrast = tf.transpose(global_features, [1, 0, 2])
  local = tf.transpose(features[:, :num_anchor_views], [1, 0, 2])
  anchors = local / temperature

  chunked = bool(chunk_size) and (static_batch is None or
                                  chunk_size < static_batch)
  if chunked:
    terms, num_positives = _chunked_terms(anchors, contrast, offset,
                                          global_labels, plan, chunk_size)
  else:
    xla = _in_xla_context()
    if not multi_replica and num_anchor_views == num_views and not xla:
      # Anchors and contrast are the same N samples: a Gram matrix.
      scaled = tf.reshape(contrast, [-1, tf.shape(contrast)[2]]) * (
          tf.math.rsqrt(temperature))
      logits = tf.reshape(_symmetric_gram(scaled),
                          tf.concat([tf.shape(contrast)[:2]] * 2, axis=0))
    else:
      logits = _logits(anchors, contrast)
    # Row (a, b) meets itself at column (a, offset + b) of the flattened
    # [A * B, V * G] logits: a single diagonal when A == 1 or G == B. (XLA
    # wants a constant diagonal; its scatter is in place anyway.)
    self_diagonal = None
    if (num_anchor_views == 1 or not multi_replica) and not xla:
      self_diagonal = offset
    terms, num_positives = _block_terms(logits, anchors, contrast, rows,
                                        global_labels, plan, self_diagonal)

  if plan.numerator_from_class_sums:
    numerator, num_positives = _class_sum_numerator(
        anchors, local, contrast, offset, global_labels, plan)
  has_positive = num_positives > 0
  if plan.numerator_from_class_sums:
    # eq. 2: log D_i - 1/|P(i)| sum_p s_ip (the row shift cancels).
    terms -= numerator / tf.where(has_positive, num_positives,
                                  tf.ones_like(num_positives))
  loss = tf.where(has_positive, terms, tf.zeros_like(terms))
  if scale_by_temperature:
    loss = loss * temperature
  return tf.reduce_mean(loss, axis=0)


@keras.saving.register_keras_serializable(package='supcon_tf')
class SupConLoss(keras.losses.Loss):
  """Keras wrapper of `supcon_loss`.

  `y_true` are the labels (int [batch] or one-hot [batch, classes]) and `y_pred`
  the features [batch, num_views, dim]. With `use_labels=False`, `y_true` is
  ignored (SimCLR). The default reduction averages the per-sample losses; in a
  custom distributed loop use `reduction=None` and divide the sum by the global
  batch. `chunk_size` (keyword-only) bounds the loss's memory, see
  `supcon_loss`.
  """

  def __init__(self,
               temperature=0.07,
               contrast_mode: ContrastModeLike = 'all_views',
               summation_location: SummationLike = 'outside',
               denominator_mode: DenominatorLike = 'all',
               positives_cap: int = -1,
               scale_by_temperature: bool = True,
               use_labels: bool = True,
               reduction='sum_over_batch_size',
               name='supcon_loss',
               *,
               chunk_size: Optional[int] = None,
               **kwargs):
    super().__init__(reduction=reduction, name=name, **kwargs)
    if temperature <= 0:
      raise ValueError(f'SupConLoss: temperature must be > 0, got '
                       f'{temperature}.')
    self.temperature = float(temperature)
    self.contrast_mode = enums.parse_enum(enums.LossContrastMode,
                                          contrast_mode)
    self.summation_location = enums.parse_enum(enums.LossSummationLocation,
                                               summation_location)
    self.denominator_mode = enums.parse_enum(enums.LossDenominatorMode,
                                             denominator_mode)
    self.positives_cap = int(positives_cap)
    self.scale_by_temperature = bool(scale_by_temperature)
    self.use_labels = bool(use_labels)
    if chunk_size is not None and (not isinstance(chunk_size, int) or
                                   isinstance(chunk_size, bool) or
                                   chunk_size < 0):
      raise ValueError(f'SupConLoss: chunk_size must be None or an int >= 0, '
                       f'got {chunk_size!r}.')
    self.chunk_size = chunk_size or None

  def call(self, y_true, y_pred):
    return supcon_loss(
        y_pred,
        labels=y_true if self.use_labels else None,
        temperature=self.temperature,
        contrast_mode=self.contrast_mode,
        summation_location=self.summation_location,
        denominator_mode=self.denominator_mode,
        positives_cap=self.positives_cap,
        scale_by_temperature=self.scale_by_temperature,
        chunk_size=self.chunk_size)

  def get_config(self):
    config = super().get_config()
    config.update(
        temperature=self.temperature,
        contrast_mode=self.contrast_mode.name.lower(),
        summation_location=self.summation_location.name.lower(),
        denominator_mode=self.denominator_mode.name.lower(),
        positives_cap=self.positives_cap,
        scale_by_temperature=self.scale_by_temperature,
        use_labels=self.use_labels,
        chunk_size=self.chunk_size)
    return config
