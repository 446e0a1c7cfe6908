"""`python -m supcon_tf.main` for one worker of the reliability tests.

Usage: TF_CONFIG=... python main_worker.py FLAGS...
Same as the command line, except that MultiWorkerMirroredStrategy checks its
peers every `SUPCON_TEST_HEALTH_INTERVAL` seconds (TF's default is 30), so
that a test sees a dead peer detected in seconds.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))))

# pylint: disable=g-import-not-at-top
from tensorflow.python.distribute import collective_all_reduce_strategy

from supcon_tf import main

interval = os.environ.get('SUPCON_TEST_HEALTH_INTERVAL')
if interval:
  collective_all_reduce_strategy.CollectiveAllReduceExtended._check_health_interval = float(interval)  # pylint: disable=protected-access

if __name__ == '__main__':
  main.run_main()
