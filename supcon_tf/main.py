r"""Command-line entry point: flags -> config -> strategy -> run(mode).

  python -m supcon_tf.main --flagfile=flags/quickstart_digits.cfg \
      --mode=train_then_eval --model_dir=/tmp/supcon

Only this module and `config.py` read absl FLAGS. The config is built once,
validated, and everything below receives it.

Exit status: 0 done; 1 a user error (`errors.UserError`, the base of every
user-facing error) with a one-line message naming the problem (`--verbosity=1`
adds the traceback), or a bad flag value (one `error:` line too);
2 a mode that is not implemented; 75 (`trainer.PREEMPTED_EXIT_CODE`) stopped by
SIGTERM after saving a checkpoint: run the same command again to resume.
"""

import sys
import traceback

from absl import app
from absl import flags
from absl import logging

from supcon_tf import config as config_lib
from supcon_tf import enums
from supcon_tf import errors

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


def _preflight(config: config_lib.ExperimentConfig):
  """Checks that would otherwise fail late (after imports or training)."""
  config_lib.check_model_dir(config)
  if config.runtime.mode == enums.Mode.TRAIN_THEN_EVAL:
    from supcon_tf import export  # pylint: disable=g-import-not-at-top
    export.check_export_dir(config)


def run(config: config_lib.ExperimentConfig, strategy=None):
  """Runs `config.runtime.mode`; returns what the mode returns (e.g. metrics)."""
  _preflight(config)
  from supcon_tf import distribute  # pylint: disable=g-import-not-at-top
  if strategy is None:
    r = config.runtime
    strategy = distribute.build_strategy(r.strategy, r.tpu, r.tpu_zone,
                                         r.gcp_project)
  try:
    return _handlers()[config.runtime.mode](config, strategy)
  except Exception as e:  # pylint: disable=broad-except
    # An image of a folder dataset that does not decode surfaces as a bare
    # TF error from whichever mode read it; name the file instead.
    from supcon_tf.data import datasets  # pylint: disable=g-import-not-at-top
    named = datasets.unreadable_images_error(config.data, e)
    if named is None:
      raise
    raise named from e


def main(argv):
  if len(argv) > 1:
    print(f'error: Unexpected arguments: {argv[1:]} (flags are --name=value).',
          file=sys.stderr, flush=True)
    return 1
  try:
    config = config_lib.config_from_flags(FLAGS)
  except (errors.UserError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr, flush=True)
    return 1
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
  except Exception as e:  # pylint: disable=broad-except
    if not isinstance(e, errors.UserError):
      from supcon_tf.training import trainer  # pylint: disable=g-import-not-at-top
      if isinstance(e, trainer.Preempted):
        print(str(e), file=sys.stderr, flush=True)
        return trainer.PREEMPTED_EXIT_CODE
      raise
    if FLAGS['verbosity'].present:
      traceback.print_exc()
    print(f'error: {e}', file=sys.stderr, flush=True)
    return 1
  return 0


def parse_flags(argv):
  """absl's flag parsing, with a bad flag as one `error:` line (exit 1)."""
  try:
    return FLAGS(argv)
  except flags.Error as e:
    print(f'error: {e}', file=sys.stderr, flush=True)
    sys.exit(1)


def run_main():
  """Console-script entry point (`supcon_tf ...`)."""
  app.run(main, flags_parser=parse_flags)


if __name__ == '__main__':
  run_main()
