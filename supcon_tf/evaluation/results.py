"""Where evaluation results go: one JSON file per model_dir, and TensorBoard.

Every evaluation mode (eval, eval_knn, eval_corruptions, eval_retrieval,
the training monitor) merges its keys into `model_dir/eval_results.json`, so
no mode erases another's, and writes its scalars under `model_dir/logs/eval`.
"""

import json
import os
from typing import Dict

import tensorflow as tf


def checkpoint_step(checkpoint: str) -> int:
  """The step number of a checkpoint prefix `.../ckpt-N`, or 0."""
  if not checkpoint:
    return 0
  tail = checkpoint.rsplit('-', 1)[-1]
  return int(tail) if tail.isdigit() else 0


def merge_json(path: str, updates: Dict) -> Dict:
  """Adds `updates` to the JSON object in `path` (created if missing).

  Keys not in `updates` are kept, so modes that write the same file (eval,
  eval_knn) do not erase each other's results.

  Returns:
    The merged object, as written.
  """
  merged: Dict = {}
  if tf.io.gfile.exists(path):
    with tf.io.gfile.GFile(path) as f:
      try:
        merged = json.loads(f.read())
      except ValueError:
        merged = {}
    if not isinstance(merged, dict):
      merged = {}
  merged.update(updates)
  parent = os.path.dirname(path)
  if parent:
    tf.io.gfile.makedirs(parent)
  with tf.io.gfile.GFile(path, 'w') as f:
    f.write(json.dumps(merged, indent=2, sort_keys=True))
  return merged


def write_scalars(log_dir: str, scalars: Dict[str, float], step: int) -> None:
  """TensorBoard scalars `scalars` at `step` in `log_dir`."""
  writer = tf.summary.create_file_writer(log_dir)
  with writer.as_default(step=step):
    for name, value in scalars.items():
      tf.summary.scalar(name, value)
  writer.flush()
  writer.close()


def publish(model_dir: str, results_file: str, updates: Dict,
            scalars: Dict[str, float], checkpoint: str) -> None:
  """Merges `updates` into `model_dir/results_file` and writes `scalars`.

  The one way an evaluation mode records what it measured: the JSON keeps
  other modes' keys, and the TensorBoard scalars (`model_dir/logs/eval`) are
  stamped with the evaluated checkpoint's step. Call on the chief only.
  """
  merge_json(os.path.join(model_dir, results_file), updates)
  write_scalars(os.path.join(model_dir, 'logs', 'eval'), scalars,
                checkpoint_step(checkpoint))
