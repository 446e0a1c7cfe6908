r"""The fast SupCon kernel: masks, custom-gradient logits ops, chunked blocks.

`supcon.supcon_loss` validates its inputs, gathers the contrast set and then
calls into this module; the notation and the tricks are described in the
docstring of `supcon.py` (and measured in docs/performance_loss.md).
Everything here takes already-laid-out tensors: anchors [A, B, D] divided by
the temperature, the contrast set [V, G, D] and the gathered labels.
"""

import math
from typing import NamedTuple, Optional, Tuple

import tensorflow as tf

from supcon_tf import enums

# Label kinds (static, decided at trace time from the labels' rank).
NO_LABELS = 'none'  # SimCLR: each sample its own class.
CLASS_IDS = 'ids'  # [batch] class ids, compared by equality.
SOFT = 'soft'  # [batch, classes] one-hot / soft rows, compared by dot product.


class Plan(NamedTuple):
  """Static (trace-time) choices of one supcon_loss call."""
  num_anchor_views: int  # A: num_views (ALL_VIEWS) or 1 (ONE_VIEW).
  num_views: int  # V.
  summation: enums.LossSummationLocation
  denominator: enums.LossDenominatorMode
  samples_per_anchor: int  # positives_cap // num_views; -1 = no cap.
  label_kind: str  # NO_LABELS, CLASS_IDS or SOFT.

  @property
  def numerator_from_class_sums(self) -> bool:
    """L_out's sum_p s_ip is computed outside the blocks, in O(N * dim).

    Without a cap the positive weights are the label similarity, so the sum
    is linear in per-class feature sums.
    """
    return (self.samples_per_anchor < 0 and
            self.summation == enums.LossSummationLocation.OUTSIDE)

  @property
  def needs_masks(self) -> bool:
    """False only for L_out / ALL without a cap (the default)."""
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


def _block_masks(rows, self_cols, num_global, global_labels, plan: Plan):
  """Sample-level masks of a block of anchor samples.

  Returns:
    positives: float32 [block, G] (capped) positive-sample weights, including
      the anchor's own sample (its other views are positives).
    negatives: float32 [block, G] negative weights, the uncapped complement
      1 - same (capped-away positives are neither).
    own_positive: float32 [block] positives[b, own column].
  """
  # One-hot of each row's own column (padding rows: all zero), only where
  # it is needed: a [block, G] write.
  capped = plan.samples_per_anchor >= 0
  if plan.label_kind == NO_LABELS or capped:
    diagonal = tf.one_hot(rows, num_global)
  if plan.label_kind == NO_LABELS:
    same = diagonal
  else:
    row_labels = tf.gather(global_labels, self_cols)
    if plan.label_kind == CLASS_IDS:
      same = tf.cast(
          tf.equal(row_labels[:, None], global_labels[None, :]), tf.float32)
    else:
      same = tf.matmul(row_labels, global_labels, transpose_b=True)
  if capped:
    positives = _cap_positives(same, diagonal, plan.samples_per_anchor)
  else:
    positives = same
  negatives = 1.0 - same
  own = tf.stack([tf.range(tf.shape(rows)[0]), self_cols], axis=1)
  return positives, negatives, tf.gather_nd(positives, own)


# -----------------------------------------------------------------------------
# One block of anchors: the part of the loss that needs the logits matrix.


def _sum_over_views(x):
  """[A, block, V, G] -> [A, block, G]: view sums, so masks stay [block, G]."""
  if x.shape[2] == 1:
    return tf.squeeze(x, axis=2)
  return tf.reduce_sum(x, axis=2)


def _masked_row_sum(per_sample, mask):
  """sum_g mask[b, g] * per_sample[a, b, g] -> [A, block]."""
  # (expand_dims is a free reshape; x[None] can be a strided-slice copy.)
  return tf.reduce_sum(per_sample * tf.expand_dims(mask, 0), axis=-1)


def _row_outer(row, mask):
  """row[a, b] * mask[b, g] -> [A, block, 1, G], broadcast over views."""
  return tf.expand_dims(tf.expand_dims(row, 2) * tf.expand_dims(mask, 0), 2)


def _expand_rows(row):
  """[A, block] -> [A, block, 1, 1]."""
  return tf.reshape(row, tf.concat([tf.shape(row), [1, 1]], axis=0))


class LogitsOp(NamedTuple):
  """How a block's logits come from the features, and their gradient.

  inputs: the features the logits are computed from (the custom gradient's
    inputs, so only [N, D]-sized tensors pass through its IdentityN).
  forward: inputs -> float32 [A, block, V, G] logits.
  backward: (inputs, d_logits) -> gradients of the inputs.
  set_self: (x [A, block, V, G], Python scalar) -> x with every anchor's own
    entry set to the scalar, in place where TF allows (a TensorScatterUpdate
    copies the whole tensor on CPU; set_diag does not).
  """
  inputs: Tuple[tf.Tensor, ...]
  forward: object
  backward: object
  set_self: object


def _rolled_contrast(contrast, num_anchor_views: int):
  """[V, G, D] -> [A, V * G, D]: copy a starts at contrast view a."""
  dim = tf.shape(contrast)[2]
  return tf.stack([
      tf.reshape(tf.concat([contrast[a:], contrast[:a]], axis=0), [-1, dim])
      for a in range(num_anchor_views)])


def _cross_logits_op(anchors, contrast, first_row, xla: bool) -> LogitsOp:
  """Logits of anchors [A, c, D] against the contrast set [V, G, D].

  Outside XLA, for anchor view a the contrast views are taken in the order
  a, a + 1, ... (mod V), so s[a, b, v, g] pairs anchor (a, b) with contrast
  view (a + v) % V; no sum in the loss depends on that order. Then every
  anchor's own entry, (a, b, 0, first_row + b), lies on diagonal `first_row`
  of each [c, V * G] matrix a, which set_diag overwrites in place.

  Args:
    anchors: [A, c, D] (divided by T).
    contrast: [V, G, D].
    first_row: int32 scalar, global sample index of anchor row 0.
    xla: building for XLA, whose set_diag wants a constant diagonal; there
      the views keep their order (one 2-D matmul) and a scatter, in place in
      XLA, overwrites the entries (a, b, a, first_row + b).
  """
  num_anchor_views = anchors.shape[0]
  if xla:
    return _plain_cross_logits_op(anchors, contrast, first_row)

  def forward(anchors, contrast):
    logits = tf.matmul(anchors, _rolled_contrast(contrast, num_anchor_views),
                       transpose_b=True)  # [A, c, V * G]
    return tf.reshape(logits, tf.concat(
        [tf.shape(anchors)[:2], tf.shape(contrast)[:2]], axis=0))

  def backward(inputs, d_logits):
    anchors, contrast = inputs
    rolled = _rolled_contrast(contrast, num_anchor_views)
    d_flat = tf.reshape(d_logits, tf.concat(
        [tf.shape(anchors)[:2], [-1]], axis=0))  # [A, c, V * G]
    d_anchors = tf.matmul(d_flat, rolled)
    # d rolled = d_flat^T anchors, as (anchors^T d_flat)^T: only the small
    # operand is transposed (no transposed copy of the [c, V * G] block).
    d_rolled = tf.reshape(
        tf.transpose(tf.matmul(anchors, d_flat, transpose_a=True), [0, 2, 1]),
        tf.concat([[num_anchor_views], tf.shape(contrast)], axis=0))
    d_contrast = d_rolled[0]
    for a in range(1, num_anchor_views):  # Undo the roll of copy a.
      d_contrast += tf.concat([d_rolled[a][-a:], d_rolled[a][:-a]], axis=0)
    return d_anchors, d_contrast

  def set_self(x, value):
    shape = tf.shape(x)
    matrices = tf.reshape(x, [shape[0], shape[1], shape[2] * shape[3]])
    # Padding rows past the last column have no own entry.
    length = tf.minimum(shape[1], shape[2] * shape[3] - first_row)
    matrices = tf.linalg.set_diag(
        matrices, tf.fill(tf.stack([shape[0], length]), value), k=first_row)
    return tf.reshape(matrices, shape)

  return LogitsOp((anchors, contrast), forward, backward, set_self)


def _plain_cross_logits_op(anchors, contrast, first_row) -> LogitsOp:
  """`_cross_logits_op` for XLA: views in order, a scatter for own entries."""
  num_anchor_views = anchors.shape[0]

  def forward(anchors, contrast):
    dim = tf.shape(anchors)[2]
    logits = tf.matmul(tf.reshape(anchors, [-1, dim]),
                       tf.reshape(contrast, [-1, dim]), transpose_b=True)
    return tf.reshape(logits, tf.concat(
        [tf.shape(anchors)[:2], tf.shape(contrast)[:2]], axis=0))

  def backward(inputs, d_logits):
    anchors, contrast = inputs
    dim = tf.shape(anchors)[2]
    flat_a = tf.reshape(anchors, [-1, dim])
    d_flat = tf.reshape(d_logits, [tf.shape(flat_a)[0], -1])
    d_anchors = tf.matmul(d_flat, tf.reshape(contrast, [-1, dim]))
    d_contrast = tf.matmul(d_flat, flat_a, transpose_a=True)
    return (tf.reshape(d_anchors, tf.shape(anchors)),
            tf.reshape(d_contrast, tf.shape(contrast)))

  rows = tf.shape(anchors)[1]
  own_cols = tf.minimum(first_row + tf.range(rows),
                        tf.shape(contrast)[1] - 1)
  a = tf.repeat(tf.range(num_anchor_views), rows)
  b = tf.tile(tf.range(rows), [num_anchor_views])
  self_idx = tf.stack([a, b, a, tf.gather(own_cols, b)], axis=1)

  def set_self(x, value):
    return tf.tensor_scatter_nd_update(
        x, self_idx, tf.fill(tf.shape(self_idx)[:1], value))

  return LogitsOp((anchors, contrast), forward, backward, set_self)


def gram_logits_op(scaled) -> LogitsOp:
  """s = Z Z^T for Z = contrast / sqrt(T) [V, G, D], all anchors on one device.

  The gradient is (G + G^T) Z: one [N, N] x [N, D] matmul instead of the two
  of autodiff (the matmuls dominate the cost of the loss). The anchors' own
  entries are the diagonal of the [N, N] matrix.
  """

  def forward(scaled):
    shape = tf.shape(scaled)
    flat = tf.reshape(scaled, [-1, shape[2]])
    gram = tf.matmul(flat, flat, transpose_b=True)
    return tf.reshape(gram, tf.concat([shape[:2], shape[:2]], axis=0))

  def backward(inputs, d_logits):
    scaled, = inputs
    shape = tf.shape(scaled)
    flat = tf.reshape(scaled, [-1, shape[2]])
    d_gram = tf.reshape(d_logits, [tf.shape(flat)[0], -1])
    return (tf.reshape(
        tf.matmul(d_gram + tf.transpose(d_gram), flat), shape),)

  def set_self(x, value):
    shape = tf.shape(x)
    flat = tf.reshape(x, [shape[0] * shape[1], shape[2] * shape[3]])
    flat = tf.linalg.set_diag(flat, tf.fill(tf.shape(flat)[:1], value))
    return tf.reshape(flat, shape)

  return LogitsOp((scaled,), forward, backward, set_self)


def _contrast_terms(logits_op: LogitsOp, own_logit, own_negative, masks,
                    num_positives, plan: Plan):
  """The logits-reading part of the loss, with a hand-written gradient.

  Autodiff of the same expressions would materialise several more N x N
  temporaries per step (broadcast reduction gradients, the gradient of the
  stop-gradient row shift, a copy for the scatter); the gradient below is one
  to three elementwise passes over the saved exp(logits). Notation per anchor
  row i: E_ij = exp(s_ij - m_i) with the anchor's own entry 0, N_i = sum of
  negatives, u_i the upstream gradient.

  Args:
    logits_op: the [A, block, V, G] logits from their features.
    own_logit: float32 [A, block] s_ii, needed for soft labels (their
      negatives include the anchor's own entry with weight 1 - y.y) and for
      the numerator of capped L_out; else None.
    own_negative: float32 [block] that weight 1 - y.y (soft labels), or None.
    masks: None (no cap, L_out / ALL: no mask needed) or (positives
      [block, G], negatives [block, G], own_positive [block]) sample weights.
    num_positives: float32 [A, block] |P(i)| (None without masks).
    plan: static options.

  Returns:
    float32 [A, block] terms (see `block_terms`).
  """
  soft = own_negative is not None
  outside = plan.summation == enums.LossSummationLocation.OUTSIDE
  # Capped L_out keeps its numerator here (its positives are not a class).
  numerator_here = outside and not plan.numerator_from_class_sums
  denominator_mode = plan.denominator
  with_own = own_logit is not None
  set_self = logits_op.set_self

  def forward(logits, own_logit):
    """-> (terms, backward: upstream -> (d_logits, d_own_logit))."""
    numerator = None
    if numerator_here:
      # sum_p w_ip s_ip = sum_g w[b, g] sum_v s[a, b, v, g] - w[b, b] s_ii,
      # read before the own entry is overwritten.
      positives, _, own_positive = masks
      logit_view_sums = _sum_over_views(logits)
      numerator = (_masked_row_sum(logit_view_sums, positives) -
                   tf.expand_dims(own_positive, 0) * own_logit)
      with tf.control_dependencies([logit_view_sums]):
        logits = tf.identity(logits)  # (Then set_self can work in place.)
    # The anchor is never in a sum: exp(-inf) = 0 removes it from all of them
    # (A * block writes instead of an N x N mask product).
    logits = set_self(logits, -math.inf)
    # Row max over the other samples for stability; it cancels from every
    # term, so it gets no gradient. A row with no other sample has -inf.
    shift = tf.reduce_max(logits, axis=[2, 3])
    shift = tf.where(tf.math.is_finite(shift), shift, tf.zeros_like(shift))
    own_exp = None
    if soft:
      shift = tf.maximum(shift, own_logit)  # So exp(own - shift) <= 1.
      own_exp = tf.expand_dims(own_negative, 0) * tf.exp(own_logit - shift)
    exp_logits = tf.exp(logits - _expand_rows(shift))

    if masks is None:
      # eq. 2's D_i = sum_{j != i} exp(s_ij): the whole row, no mask (weights
      # neg + pos = 1 off the anchor's own entry when nothing is capped).
      den = tf.reduce_sum(exp_logits, axis=[2, 3])
      if soft:
        den += own_exp
      den = tf.where(den > 0, den, tf.ones_like(den))

      def backward_lse(upstream):  # d log D_i / d s_ij = E_ij / D_i.
        alpha = upstream / den
        return exp_logits * _expand_rows(alpha), (
            alpha * own_exp if soft else None)

      return tf.math.log(den) + shift, backward_lse

    positives, negatives, own_positive = masks
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
    if soft:
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
        return exp_logits * weights, alpha * own_exp if soft else None

    else:
      # ONE_POSITIVE: D_ip = E_ip + N_i differs per positive, one more pass.
      # The own entry is set to 1 so that it adds log 1 = 0 / 0 / 1 = 0.
      n = safe(negatives_sum)
      den = set_self(exp_logits + _expand_rows(n), 1.0)
      if outside:
        # -log(E/(E + N)) = log(E + N) - log E; sum_p log E_ip is the
        # numerator minus |P| m_i.
        terms = _masked_row_sum(_sum_over_views(tf.math.log(den)),
                                positives) / count + shift

        def backward(upstream):
          # t = 1/|P| sum_p log(E_p + N): dt/dE_p = 1/(|P| (E_p + N)),
          # dt/dN = c = 1/|P| sum_p 1/(E_p + N), dN/ds_ij = neg_ij E_ij.
          inverse = set_self(1.0 / den, 0.0)
          c = _masked_row_sum(_sum_over_views(inverse), positives) / count
          weights = (inverse * _row_outer(upstream / count, positives) +
                     _row_outer(upstream * c, negatives))
          return exp_logits * weights, (
              upstream * c * own_exp if soft else None)

      else:
        ratio = exp_logits / den  # E/(E + N); 0 at the anchor's own entry.
        mean_ratio = safe(_masked_row_sum(_sum_over_views(ratio), positives))
        terms = -tf.math.log(mean_ratio) + tf.math.log(count)

        def backward(upstream):
          # t = -log Q, Q = sum_p Y_p, Y = E/(E + N), Z = Y (1 - Y):
          # E dt/dE_p = -Z_p / Q, dt/dN = sum_p Z_p / (Q N).
          z = ratio * (1.0 - ratio)
          c = tf.math.divide_no_nan(
              _masked_row_sum(_sum_over_views(z), positives), mean_ratio * n)
          d_logits = (exp_logits * _row_outer(upstream * c, negatives) -
                      z * _row_outer(upstream / mean_ratio, positives))
          return d_logits, upstream * c * own_exp if soft else None

    if not numerator_here:
      return terms, backward

    def backward_with_numerator(upstream):
      # terms -= numerator / |P|: d/ds_ij = -w_ij / |P| (own entry
      # included, cancelled by d/d s_ii = +w_bb / |P| through own_logit).
      d_logits, d_own = backward(upstream)
      beta = upstream / count
      d_own_numerator = beta * tf.expand_dims(own_positive, 0)
      return (d_logits - _row_outer(beta, positives),
              d_own_numerator if d_own is None else d_own + d_own_numerator)

    return terms - numerator / count, backward_with_numerator

  num_inputs = len(logits_op.inputs)

  @tf.custom_gradient
  def core(*args):
    inputs = args[:num_inputs]
    terms, backward = forward(logits_op.forward(*inputs),
                              args[num_inputs] if with_own else None)

    def grad(upstream):
      d_logits, d_own = backward(upstream)
      grads = list(logits_op.backward(inputs, d_logits))
      return grads + [d_own] if with_own else grads

    return terms, grad

  return core(*logits_op.inputs, *([own_logit] if with_own else []))


def block_terms(anchors, contrast, first_row, global_labels, plan: Plan,
                 logits_op: Optional[LogitsOp] = None
                 ) -> Tuple[tf.Tensor, Optional[tf.Tensor]]:
  """Per-anchor loss terms of a block of anchor samples.

  Everything that reads the [A, block, V, G] logits happens here; the chunked
  path calls this once per block (and again in the backward pass).

  The logits s[a, b, v, g] = <z_anchor, z_contrast> / T pair the block's
  anchors (view a of sample b) with every contrast view v of every global
  sample g.

  Args:
    anchors: float32 [A, block, D], the block's anchors already divided by T.
    contrast: float32 [V, G, D], the gathered contrast set.
    first_row: int32 scalar, global sample index of the block's row 0 (rows
      >= G are padding: their terms are garbage but finite).
    global_labels: None, [G] class ids or [G, K] soft labels.
    plan: static options.
    logits_op: how to compute the logits (default: `_cross_logits_op`).

  Returns:
    terms: float32 [A, block]. For L_out without a cap, log D_i + m_i
      (denominator ALL / ONLY_NEGATIVES) or 1/|P| sum_p log(E_ip + N_i) + m_i
      (ONE_POSITIVE): the numerator 1/|P| sum_p s_ip is left to the caller
      (`class_sum_numerator`). Otherwise the whole loss of anchors that
      have a positive.
    num_positives: float32 [A, block] |P(i)|, or None when the caller
      computes it (no masks needed).
  """
  num_global = tf.shape(contrast)[1]
  rows = first_row + tf.range(tf.shape(anchors)[1])
  self_cols = tf.minimum(rows, num_global - 1)
  soft = plan.label_kind == SOFT
  outside = plan.summation == enums.LossSummationLocation.OUTSIDE
  numerator_here = outside and not plan.numerator_from_class_sums

  own_logit = None
  if soft or numerator_here:
    # s_ii from the features, O(block * D): <anchor, its contrast copy>.
    own = tf.gather(contrast[:plan.num_anchor_views], self_cols, axis=1)
    own_logit = tf.reduce_sum(anchors * own, axis=-1)  # [A, block]

  own_negative = None
  if soft:
    # negatives[b, own column] = 1 - y.y, non-zero for soft labels.
    row_labels = tf.gather(global_labels, self_cols)
    own_negative = 1.0 - tf.reduce_sum(row_labels * row_labels, axis=-1)

  masks = num_positives = None
  if plan.needs_masks:
    positives, negatives, own_positive = _block_masks(
        rows, self_cols, num_global, global_labels, plan)
    # |P(i)|: every view of every positive sample, minus the anchor itself.
    num_positives = (plan.num_views * tf.reduce_sum(positives, axis=1) -
                     own_positive)
    num_positives = tf.broadcast_to(num_positives[None],
                                    tf.shape(anchors)[:2])  # [A, block]
    masks = (positives, negatives, own_positive)

  if logits_op is None:
    logits_op = _cross_logits_op(anchors, contrast, first_row,
                                 in_xla_context())
  terms = _contrast_terms(logits_op, own_logit, own_negative, masks,
                          num_positives, plan)
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


def class_sum_numerator(anchors, local, contrast, offset, global_labels,
                         plan: Plan):
  """sum_{p in P(i)} s_ip and |P(i)| without a cap.

  sum_p <z_i, z_p> / T = <z_i / T, S_c - z_i> with S_c the sum of every view
  of every sample of the anchor's class c: O(N * D) instead of an N x N pass,
  and differentiable by plain autodiff. Soft labels weigh sample g by
  y_b . y_g, so S = y_b Y^T (sum_v z_vg) via a [K, D] per-class sum.

  Args:
    anchors: [A, B, D] local anchors divided by T.
    local: [A, B, D] the same anchors, not divided (z_i for the self term).
    contrast: [V, G, D] gathered contrast set.
    offset: int32 scalar, global index of local sample 0.
    global_labels: None, [G] class ids or [G, K] soft labels.
    plan: static options.

  Returns:
    (numerator [A, B], num_positives [A, B]) float32.
  """
  local_batch = tf.shape(anchors)[1]
  rows = offset + tf.range(local_batch)
  view_sum = tf.reduce_sum(contrast, axis=0)  # [G, D]
  own_weight = 1.0  # same[b, b]: the anchor's weight as its own positive.
  if plan.label_kind == NO_LABELS:
    class_sum = tf.gather(view_sum, rows)
    class_size = tf.ones(tf.shape(rows), tf.float32)
  elif plan.label_kind == SOFT:
    row_labels = tf.gather(global_labels, rows)  # [B, K]
    per_class = tf.matmul(global_labels, view_sum, transpose_a=True)
    class_sum = tf.matmul(row_labels, per_class)  # sum_g same[b, g] z_g
    class_size = tf.linalg.matvec(row_labels,
                                  tf.reduce_sum(global_labels, axis=0))
    own_weight = tf.reduce_sum(row_labels * row_labels, axis=-1)
  else:
    num_global = tf.shape(global_labels)[0]
    ids = _dense_class_ids(global_labels)
    sums = tf.math.unsorted_segment_sum(view_sum, ids, num_global)
    sizes = tf.math.unsorted_segment_sum(
        tf.ones([num_global], tf.float32), ids, num_global)
    row_ids = tf.gather(ids, rows)
    class_sum, class_size = tf.gather(sums, row_ids), tf.gather(sizes, row_ids)
  if plan.label_kind == SOFT:
    own_term = own_weight[None, :, None] * local
  else:
    own_term = local
  numerator = tf.reduce_sum(anchors * (class_sum[None] - own_term), axis=-1)
  num_positives = plan.num_views * class_size - own_weight
  return numerator, tf.broadcast_to(num_positives[None],
                                    tf.shape(numerator))


# -----------------------------------------------------------------------------
# Dense and chunked evaluation of the blocks.


def in_xla_context() -> bool:
  """True while tracing for XLA (jit_compile=True, TPU).

  There the gradient's transposed add of `gram_logits_op` is a strided,
  cache-unfriendly fusion that costs more than the second matmul it saves.
  """
  try:
    from tensorflow.python.ops import control_flow_util  # pylint: disable=g-import-not-at-top,g-direct-tensorflow-import
    return control_flow_util.GraphOrParentsInXlaContext(
        tf.compat.v1.get_default_graph())
  except (ImportError, AttributeError):
    return False


def chunked_terms(anchors, contrast, offset, global_labels, plan: Plan,
                   chunk_size: int):
  """`block_terms` over blocks of at most `chunk_size` anchor samples.

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
    Same as `block_terms` for all B local samples.
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

  def terms_of_block(anchors_k, contrast_k, k):
    return block_terms(anchors_k, contrast_k, offset + k * block_size,
                        global_labels, plan)

  def unblock(stacked):
    # [K, A, block] -> [A, B].
    flat = tf.reshape(tf.transpose(stacked, [1, 0, 2]),
                      [num_anchor_views, -1])
    return flat[:, :batch]

  @tf.custom_gradient
  def run(blocks, contrast):

    def forward(k, terms_ta, counts_ta):
      terms, counts = terms_of_block(blocks[k], contrast, k)
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
          terms_k, _ = terms_of_block(anchors_k, contrast, k)
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
