"""One worker of the 2-process MultiWorkerMirroredStrategy test.

Usage: TF_CONFIG=... python multi_worker_train.py CONFIG_JSON
Prints one JSON line: the step reached, the replica count and a checksum of
the trained weights (equal on every worker when training is in sync).
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))))

import numpy as np  # pylint: disable=g-import-not-at-top

from supcon_tf import config as config_lib  # pylint: disable=g-import-not-at-top
from supcon_tf import distribute  # pylint: disable=g-import-not-at-top
from supcon_tf import enums  # pylint: disable=g-import-not-at-top
from supcon_tf.training import trainer as train  # pylint: disable=g-import-not-at-top


def main(path):
  with open(path) as f:
    config = config_lib.ExperimentConfig.from_json(f.read())
  strategy = distribute.build_strategy(enums.StrategyType.MULTI_WORKER)
  trainer = train.Trainer(config, strategy, 1)
  trainer.train()
  checksum = float(sum(np.sum(np.abs(w)) for w in trainer.model.get_weights()))
  print(json.dumps({'step': int(trainer.optimizer.iterations.numpy()),
                    'replicas': strategy.num_replicas_in_sync,
                    'checksum': checksum}))


if __name__ == '__main__':
  main(sys.argv[1])
