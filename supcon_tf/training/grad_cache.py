"""Gradient caching: a large contrastive batch in the memory of a small one.

Gao et al. 2021, "Scaling Deep Contrastive Learning Batch Size under Memory
Limited Setup" (GradCache). A contrastive loss couples every sample of the
(global) batch, so it cannot be split into independent micro-batches; but it
only couples them through the model *outputs*, which are small. So:

1. Embed: run the model over the replica's batch in micro-batches of
   `micro_batch_size` (M) with no tape, and concatenate the outputs
   (`[batch, ...]` each; the activations of a micro-batch die with it).
2. Loss: compute the loss over the whole replica batch from those outputs,
   under a tape that watches only the outputs, and take its gradient w.r.t.
   each output (the "cached" output gradients). Any cross-replica gather in
   the loss (`distribute.cross_replica_concat`) stays as it is: its gradient
   sums every replica's contribution at this replica's rows, so the cached
   gradient is the exact gradient of the global loss w.r.t. the local outputs.
3. Replay: re-embed each micro-batch under a tape and backpropagate its slice
   of the cached gradients (`tape.gradient(outputs, variables,
   output_gradients=cached)`), summing the variable gradients over the
   micro-batches. By the chain rule the sum is the gradient of the whole
   batch's loss.

Only one micro-batch's activations are alive at a time (plus the outputs of
the whole batch and one gradient accumulator per variable), at the price of a
second forward pass.

Batch norm in training mode normalises each micro-batch with its own
statistics (as per-replica batch norm normalises each replica's batch; with
synchronised batch norm, micro-batch k of every replica together). The result
is then the exact gradient of that model, which is *not* the full-batch
gradient: it equals the full-batch gradient only without batch norm or with
batch norm in inference mode. The moving averages are updated once per
micro-batch, in the replay only: the embedding pass runs under a
`keras.StatelessScope`, which records Keras variable assignments (the
BatchNormalization moving mean / variance) instead of applying them, and the
record is dropped. The replay recomputes the same statistics, so both passes
normalise identically.

Randomness: both passes must compute the same function. The ResNet encoders
and heads have no dropout or other random layers; a forward that draws random
numbers must use stateless ops seeded identically in both passes (e.g. by
the step and the micro-batch index), never Keras `SeedGenerator` state (its
advance is also swallowed by the stateless scope in the embedding pass).

Loops: both passes are `tf.while_loop`s with `parallel_iterations=1`, so the
graph holds one copy of the forward (two for the embedding pass, whose first
micro-batch is peeled off to learn the output structure) and one of its
backward, not `batch / M` copies, and iterations run strictly one after the
other: only one micro-batch is in flight (the memory bound) and batch-norm
updates are applied in order. The gradients are accumulated in loop-carried
tensors (one per variable), which TF updates in place. Exception: under
(MultiWorker)MirroredStrategy with several replicas a replica function cannot
hold a synchronisation point (synchronised batch norm's all-reduce) inside a
`tf.while_loop`, so there the loops are unrolled in Python (`batch / M`
copies of the forward and backward in the graph, still run one after the
other through control dependencies, so the memory bound holds; only the
graph and its build time grow). See `unroll_by_default`.

Mixed precision: pass `scale_loss=optimizer.scale_loss`; the loss is scaled
before its gradient w.r.t. the outputs, so the replay yields the scaled
variable gradients the optimizer expects, exactly as a plain step does.

Call `cached_gradients` outside any `tf.GradientTape`: an enclosing tape would
record the embedding pass and keep its activations alive.
"""

from typing import (Any, Callable, Dict, List, NamedTuple, Optional, Sequence,
                    Tuple)

import keras
import tensorflow as tf

# The names the flag and the per-replica batch go by in error messages.
MICRO_BATCH_FLAG = '--micro_batch_size'

Outputs = Dict[str, tf.Tensor]
LossFn = Callable[[Outputs], Tuple[tf.Tensor, Dict[str, tf.Tensor]]]


class CachedStep(NamedTuple):
  """What `cached_gradients` returns.

  Attributes:
    loss: float32 scalar, the unscaled total returned by `loss_fn`.
    terms: the dict of scalars returned by `loss_fn` (the step's metrics).
    gradients: one entry per variable: the gradient of the (scaled) loss, of
      the variable's dtype and shape, or None when the loss does not depend on
      it (as `tape.gradient` reports it).
    outputs: the model outputs of the whole replica batch, `[batch, ...]`
      each, with no gradient (e.g. for accuracy metrics).
  """
  loss: tf.Tensor
  terms: Dict[str, tf.Tensor]
  gradients: List[Optional[tf.Tensor]]
  outputs: Outputs


def num_micro_batches(batch_size: int, micro_batch_size: Optional[int]) -> int:
  """How many micro-batches a replica batch splits into.

  Args:
    batch_size: the per-replica batch (static).
    micro_batch_size: M, or None / 0 for no splitting.

  Returns:
    `batch_size // micro_batch_size` (1 without splitting).

  Raises:
    ValueError: M is negative, larger than the batch or does not divide it;
      the message names `--micro_batch_size` and the per-replica batch.
  """
  if not micro_batch_size:
    return 1
  if (micro_batch_size < 0 or micro_batch_size > batch_size or
      batch_size % micro_batch_size):
    divisors = [d for d in range(1, batch_size + 1) if batch_size % d == 0]
    raise ValueError(
        f'{MICRO_BATCH_FLAG}={micro_batch_size} must divide the per-replica '
        f'batch of {batch_size} (global batch / replicas); divisors of '
        f'{batch_size}: {divisors}.')
  return batch_size // micro_batch_size


def _static_batch(inputs) -> int:
  sizes = {t.shape[0] for t in tf.nest.flatten(inputs)}
  if len(sizes) != 1 or None in sizes:
    raise ValueError(
        'Gradient caching needs every input to have the same static batch '
        'size (drop_remainder=True); got leading dimensions '
        f'{sorted(sizes, key=str)}.')
  return sizes.pop()


def _split(tensor: tf.Tensor, n: int) -> tf.Tensor:
  """[n * m, ...] -> [n, m, ...], so that `tf.gather(_, i)` keeps static shapes."""
  return tf.reshape(tensor, [n, tensor.shape[0] // n] + tensor.shape[1:])


def _plain_step(forward, loss_fn, inputs, variables, scale_loss) -> CachedStep:
  """One tape over the whole batch: what a step without caching does."""
  with tf.GradientTape() as tape:
    outputs = forward(inputs)
    loss, terms = loss_fn(outputs)
    scaled = scale_loss(loss)
  gradients = tape.gradient(scaled, variables)
  outputs = {k: tf.stop_gradient(v) for k, v in outputs.items()}
  return CachedStep(loss, terms, list(gradients), outputs)


def unroll_by_default() -> bool:
  """Whether the micro-batch loops are unrolled in the current context.

  MirroredStrategy and MultiWorkerMirroredStrategy cannot run a
  synchronisation point (`ReplicaContext.all_reduce`, which synchronised
  batch norm calls) inside a `tf.while_loop` of a replica function ("merge_call
  called while defining a new graph"), so in their replica contexts with more
  than one replica the loops are unrolled in Python. TPU replicas and a single
  replica keep the `tf.while_loop`.
  """
  ctx = tf.distribute.get_replica_context()
  return (ctx is not None and ctx.num_replicas_in_sync > 1 and
          not isinstance(ctx.strategy, tf.distribute.TPUStrategy))


def _micro(tensors, i):
  """Micro-batch `i` (int or int32 scalar) of split tensors (static shape)."""
  return tf.nest.map_structure(lambda t: tf.gather(t, i), tensors)


def _after(state, fn):
  """fn(), its ops ordered after the tensors of `state` (graph mode).

  Unrolled iterations are independent but for the variables, so the executor
  could run them concurrently and keep several micro-batches' activations
  alive; the control dependency makes them run one after another.
  """
  with tf.control_dependencies([t for t in tf.nest.flatten(state)
                               if isinstance(t, tf.Tensor)]):
    return fn()


def _embed(forward, micro_inputs, n: int, unroll: bool) -> Outputs:
  """Pass 1: the outputs of every micro-batch, concatenated, without a tape.

  Batch-norm moving averages are left untouched (stateless scope).
  """
  def embed_one(i):
    # A fresh scope per micro-batch: its records are tensors of this
    # iteration and must not leak into the next.
    with keras.StatelessScope():
      outputs = forward(_micro(micro_inputs, i))
    return {k: tf.stop_gradient(v) for k, v in outputs.items()}

  parts = [embed_one(0)]
  if unroll:
    for i in range(1, n):
      parts.append(_after(parts[-1], lambda i=i: embed_one(i)))
    return {k: tf.concat([p[k] for p in parts], axis=0) for k in parts[0]}

  # The first micro-batch, peeled off, gives the output keys, dtypes, shapes.
  first = parts[0]
  keys = sorted(first)
  arrays = [tf.TensorArray(first[k].dtype, size=n, element_shape=first[k].shape)
            .write(0, first[k]) for k in keys]

  def body(i, arrays):
    outputs = embed_one(i)
    return i + 1, [a.write(i, outputs[k]) for a, k in zip(arrays, keys)]

  _, arrays = tf.while_loop(lambda i, _: i < n, body, (tf.constant(1), arrays),
                            parallel_iterations=1)
  return {k: tf.reshape(a.stack(), [n * first[k].shape[0]] +
                        first[k].shape[1:])
          for k, a in zip(keys, arrays)}


def _replay(forward, micro_inputs, micro_cotangents: Dict[str, tf.Tensor],
            variables: Sequence[Any], n: int,
            unroll: bool) -> List[Optional[tf.Tensor]]:
  """Pass 3: the sum over micro-batches of the vector-Jacobian products.

  Runs the forward for real (batch-norm moving averages update once per
  micro-batch).
  """
  keys = sorted(micro_cotangents)
  # Whether the tape reached each variable; recorded while the body is traced
  # (graph) or run (eager), identical for every iteration.
  connected = [False] * len(variables)

  def step(i, accumulators):
    with tf.GradientTape() as tape:
      outputs = forward(_micro(micro_inputs, i))
    if not keys:  # No output reaches the loss: only the statistics update.
      return accumulators
    grads = tape.gradient(
        [outputs[k] for k in keys], variables,
        output_gradients=[tf.gather(micro_cotangents[k], i) for k in keys])
    updated = []
    for j, (acc, g) in enumerate(zip(accumulators, grads)):
      if g is None:
        updated.append(acc)
        continue
      connected[j] = True
      updated.append(acc + tf.convert_to_tensor(g))  # IndexedSlices -> dense.
    return updated

  sums = [tf.zeros(v.shape, tf.as_dtype(v.dtype)) for v in variables]
  if unroll:
    for i in range(n):
      sums = _after(sums, lambda i=i, sums=sums: step(i, sums))
  else:
    _, sums = tf.while_loop(lambda i, _: i < n,
                            lambda i, sums: (i + 1, step(i, sums)),
                            (tf.constant(0), sums), parallel_iterations=1)
  return [s if c else None for s, c in zip(sums, connected)]


def cached_gradients(forward: Callable[[Any], Outputs],
                     loss_fn: LossFn,
                     inputs: Any,
                     variables: Sequence[Any],
                     micro_batch_size: Optional[int],
                     *,
                     scale_loss: Optional[Callable[[tf.Tensor],
                                                   tf.Tensor]] = None,
                     unroll: Optional[bool] = None) -> CachedStep:
  """The gradient of a batch-coupled loss, embedding in micro-batches.

  Works eagerly, inside `tf.function` and in a replica context
  (`strategy.run`). With `micro_batch_size` None, 0 or equal to the batch it
  is exactly the plain step (one tape over forward and loss).

  Args:
    forward: maps a micro-batch of `inputs` (same structure, leading
      dimension M) to a dict of tensors `[M, ...]`, e.g.
      `lambda x: model(x, training=True)` (SupConModel: images
      `[M, views, h, w, 3]` -> PROJECTION `[M, views, dim]`, LOGITS, ...).
      Called several times per micro-batch; it must compute the same function
      each time (no unseeded randomness).
    loss_fn: maps the outputs of the whole replica batch (`[batch, ...]`
      each, constants: no gradient path to the variables) to `(loss, terms)`:
      float32 scalar, this replica's share of the total loss (per-sample
      losses summed and divided by the global batch, as the train step does),
      and a dict of scalars to report. It may gather across replicas
      (`supcon_loss` does). It may also read the variables directly, e.g. for
      weight decay: that gradient is added as is.
    inputs: a tensor or nest of tensors with the same static leading
      dimension, the replica batch (e.g. images `[batch, views, h, w, 3]`).
    variables: the variables to differentiate (e.g.
      `model.trainable_variables`).
    micro_batch_size: M, dividing the batch; None or 0 for no caching.
    scale_loss: e.g. `optimizer.scale_loss` (LossScaleOptimizer under
      float16); the returned gradients are then scaled like the loss.
    unroll: unroll the micro-batch loops in Python (`batch / M` copies of
      the forward in the graph, run one after another) instead of
      `tf.while_loop`; None = `unroll_by_default()` (needed for synchronised
      batch norm under MirroredStrategy).

  Returns:
    A `CachedStep` (loss, terms, gradients aligned with `variables`, outputs).

  Raises:
    ValueError: the inputs have no common static batch, or M does not divide
      it (naming `--micro_batch_size` and the per-replica batch).
  """
  scale_loss = scale_loss or (lambda loss: loss)
  variables = list(variables)
  batch = _static_batch(inputs)
  n = num_micro_batches(batch, micro_batch_size)
  if n == 1:
    return _plain_step(forward, loss_fn, inputs, variables, scale_loss)

  if unroll is None:
    unroll = unroll_by_default()
  micro_inputs = tf.nest.map_structure(lambda t: _split(t, n), inputs)
  outputs = _embed(forward, micro_inputs, n, unroll)

  keys = sorted(outputs)
  with tf.GradientTape() as tape:
    tape.watch([outputs[k] for k in keys])
    loss, terms = loss_fn(outputs)
    scaled = scale_loss(loss)
  grads = tape.gradient(scaled, [outputs[k] for k in keys] + variables)
  output_grads, direct = grads[:len(keys)], grads[len(keys):]
  # Outputs the loss does not read (e.g. the embedding) are not replayed.
  cotangents = {k: _split(tf.convert_to_tensor(g), n)
                for k, g in zip(keys, output_grads) if g is not None}

  replayed = _replay(forward, micro_inputs, cotangents, variables, n, unroll)
  gradients = []
  for r, d in zip(replayed, direct):
    if d is not None:
      d = tf.convert_to_tensor(d)
    gradients.append(d if r is None else r if d is None else r + d)
  return CachedStep(loss, terms, gradients, outputs)
