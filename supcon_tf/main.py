r"""Command-line entry point: flags -> config -> strategy -> run(mode).

  python -m supcon_tf.main --flagfile=flags/quickstart_digits.cfg \
      --mode=train_then_eval --model_dir=/tmp/supcon

Only this module and `config.py` read absl FLAGS. The config is built once,
validated, and everything below receives it.
"""

import sys

from absl import app
from absl import flags
from absl import logging

from supcon_tf import config as config_lib
from supcon_tf import enums

config_lib.define_flags()
FLAGS = flags.FLAGS


def _not_yet(mode):
  def run(config, strategy):
    del config, strategy
    raise NotImplementedError(f'--mode={mode.value} is not implemented yet.')
  return run


def _handlers():
  """Mode -> callable(config, strategy); imported lazily (TF is heavy)."""
  from supcon_tf import modes  # pylint: disable=g-import-not-at-top
  handlers = {mode: _not_yet(mode) for mode in enums.Mode}
  handlers.update(modes.MODE_HANDLERS)
  return handlers


def run(config: config_lib.ExperimentConfig, strategy=None):
  """Runs `config.runtime.mode`; returns what the mode returns (e.g. metrics)."""
  from supcon_tf import distribute  # pylint: disable=g-import-not-at-top
  if strategy is None:
    r = config.runtime
    strategy = distribute.build_strategy(r.strategy, r.tpu, r.tpu_zone,
                                         r.gcp_project)
  return _handlers()[config.runtime.mode](config, strategy)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  try:
    config = config_lib.config_from_flags(FLAGS)
  except (config_lib.ConfigError, ValueError) as e:
    raise app.UsageError(str(e)) from e
  if FLAGS.dry_run:
    print(config.to_json())
    return 0
  if not FLAGS['verbosity'].present:
    # TF and Keras log a lot at INFO; our progress goes to stdout.
    logging.set_verbosity(logging.WARNING)
  try:
    run(config)
  except NotImplementedError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  return 0


def run_main():
  """Console-script entry point (`supcon_tf ...`)."""
  app.run(main)


if __name__ == '__main__':
  run_main()
