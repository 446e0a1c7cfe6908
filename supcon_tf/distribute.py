"""Strategy construction and the one cross-replica helper everything uses.

`build_strategy` is called once, in `main`; library code only ever asks for the
current strategy / replica context, so the same code runs on one device, several
GPUs, several workers and TPU pods.
"""

import json
import os
from typing import Optional

from absl import logging
import tensorflow as tf

from supcon_tf import enums
from supcon_tf import errors


def num_replicas_in_sync() -> int:
  """Replicas of the current strategy (1 outside any strategy)."""
  return tf.distribute.get_strategy().num_replicas_in_sync


def in_cross_replica_gather_context() -> bool:
  """True inside a replica context of a strategy with more than one replica."""
  ctx = tf.distribute.get_replica_context()
  return ctx is not None and ctx.num_replicas_in_sync > 1


def replica_id() -> tf.Tensor:
  """Global index of this replica in its sync group, int32 scalar (0 outside)."""
  ctx = tf.distribute.get_replica_context()
  if ctx is None:
    return tf.constant(0, tf.int32)
  rid = ctx.replica_id_in_sync_group
  return tf.cast(rid, tf.int32)


def cross_replica_concat(tensor: tf.Tensor) -> tf.Tensor:
  """Concatenates `tensor` from every replica along axis 0, in replica order.

  Differentiable: the gradient reaching a replica's input is the sum over all
  replicas of the gradients of the gathered copy at that replica's rows, which
  is what makes a loss computed on the gathered batch exact under a strategy.

  Args:
    tensor: [local_batch, ...] on each replica.

  Returns:
    [num_replicas * local_batch, ...]; `tensor` itself outside a multi-replica
    replica context.
  """
  if not in_cross_replica_gather_context():
    return tensor
  ctx = tf.distribute.get_replica_context()
  if not tensor.device:
    # MultiWorkerMirroredStrategy does not place replica ops on a device and
    # its all_gather then has no destination ("destinations can not be
    # empty"): pin the value to this replica's device.
    worker_devices = ctx.strategy.extended.worker_devices
    local_id = getattr(ctx, '_local_replica_id', 0)
    local_id = local_id if isinstance(local_id, int) else 0
    with tf.device(worker_devices[local_id % len(worker_devices)]):
      tensor = tf.identity(tensor)
  return ctx.all_gather(tensor, axis=0)


class TFConfigError(errors.UserError, ValueError):
  """The TF_CONFIG environment variable is malformed; the message says how."""


def parse_tf_config() -> Optional[dict]:
  """TF_CONFIG as a dict (None when unset), checked for the usual mistakes.

  Raises:
    TFConfigError: not JSON, no object, a cluster that is not
      {job: ["host:port", ...]}, or a task whose type / index is not in it.
  """
  raw = os.environ.get('TF_CONFIG', '')
  if not raw.strip():
    return None
  try:
    tf_config = json.loads(raw)
  except json.JSONDecodeError as e:
    raise TFConfigError(f'TF_CONFIG is not valid JSON ({e}): {raw[:200]!r}'
                        ) from e
  if not isinstance(tf_config, dict):
    raise TFConfigError(
        'TF_CONFIG must be a JSON object {"cluster": {...}, "task": {...}}, '
        f'got {raw[:200]!r}.')
  cluster = tf_config.get('cluster', {})
  if not isinstance(cluster, dict) or not all(
      isinstance(v, list) and all(isinstance(a, str) and ':' in a for a in v)
      for v in cluster.values()):
    raise TFConfigError(
        'TF_CONFIG "cluster" must map job names to lists of "host:port" '
        f'addresses, e.g. {{"worker": ["10.0.0.1:2222"]}}; got {cluster!r}.')
  task = tf_config.get('task')
  if cluster and not isinstance(task, dict):
    raise TFConfigError(
        'TF_CONFIG has a "cluster" but no "task" object, e.g. '
        f'{{"type": "worker", "index": 0}}; got {task!r}.')
  if task:
    task_type, index = task.get('type'), task.get('index', 0)
    if task_type not in cluster:
      raise TFConfigError(
          f'TF_CONFIG task type {task_type!r} is not a job of the cluster '
          f'(jobs: {sorted(cluster)}).')
    if (not isinstance(index, int) or isinstance(index, bool) or
        not 0 <= index < len(cluster[task_type])):
      raise TFConfigError(
          f'TF_CONFIG task index {index!r} is out of range: job '
          f'{task_type!r} has {len(cluster[task_type])} task(s).')
  return tf_config


def _tf_config_has_cluster() -> bool:
  tf_config = parse_tf_config()
  if not tf_config:
    return False
  cluster = tf_config.get('cluster', {})
  return sum(len(v) for v in cluster.values()) > 1


def resolve_strategy_type(strategy: enums.StrategyType,
                          tpu: str) -> enums.StrategyType:
  """Picks the concrete strategy for AUTO from the flags and the hardware."""
  strategy = enums.parse_enum(enums.StrategyType, strategy)
  if strategy != enums.StrategyType.AUTO:
    return strategy
  if tpu:
    return enums.StrategyType.TPU
  if _tf_config_has_cluster():
    return enums.StrategyType.MULTI_WORKER
  if len(tf.config.list_physical_devices('GPU')) > 1:
    return enums.StrategyType.MIRRORED
  return enums.StrategyType.ONE_DEVICE


def build_strategy(strategy: enums.StrategyType = enums.StrategyType.AUTO,
                   tpu: str = '',
                   tpu_zone: Optional[str] = None,
                   gcp_project: Optional[str] = None
                   ) -> tf.distribute.Strategy:
  """Builds the tf.distribute strategy (call once, before building models).

  Args:
    strategy: AUTO picks TPU when `tpu` is set, MultiWorkerMirrored when
      TF_CONFIG names a cluster, Mirrored with more than one GPU, else one
      device.
    tpu: Cloud TPU name or grpc:// address (`'local'` for a TPU VM).
    tpu_zone: GCE zone of the TPU.
    gcp_project: GCP project of the TPU.

  Returns:
    The strategy.
  """
  kind = resolve_strategy_type(strategy, tpu)
  logging.info('Building %s strategy.', kind.name)
  if kind == enums.StrategyType.TPU:
    resolver = tf.distribute.cluster_resolver.TPUClusterResolver(
        tpu=tpu or None, zone=tpu_zone, project=gcp_project)
    if tpu not in ('', 'local'):
      tf.config.experimental_connect_to_cluster(resolver)
    tf.tpu.experimental.initialize_tpu_system(resolver)
    return tf.distribute.TPUStrategy(resolver)
  if kind == enums.StrategyType.MULTI_WORKER:
    parse_tf_config()  # A clear message instead of a hang or a deep error.
    return tf.distribute.MultiWorkerMirroredStrategy()
  if kind == enums.StrategyType.MIRRORED:
    return tf.distribute.MirroredStrategy()
  gpus = tf.config.list_logical_devices('GPU')
  return tf.distribute.OneDeviceStrategy(gpus[0].name if gpus else '/cpu:0')


def worker_id(strategy: tf.distribute.Strategy) -> int:
  """Index of this worker (task) in a multi-worker job; 0 otherwise."""
  resolver = getattr(strategy, 'cluster_resolver', None)
  if resolver is None or not getattr(resolver, 'task_type', None):
    return 0
  return int(resolver.task_id or 0)


def is_chief(strategy: tf.distribute.Strategy) -> bool:
  """Whether this process writes checkpoints, summaries and results.

  Every worker of a MultiWorkerMirroredStrategy must take part in saving (the
  save is collective), but only the chief's files are kept: `task_type` chief,
  or worker 0 when the cluster has no chief.
  """
  resolver = getattr(strategy, 'cluster_resolver', None)
  if resolver is None or not getattr(resolver, 'task_type', None):
    return True
  task_type = resolver.task_type
  if task_type == 'chief':
    return True
  has_chief = 'chief' in resolver.cluster_spec().as_dict()
  return task_type == 'worker' and not has_chief and worker_id(strategy) == 0
