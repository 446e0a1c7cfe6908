"""The error types of a user's mistake; no TensorFlow.

Every error the package raises for bad input (a flag, a path, a dataset, a
checkpoint, an environment variable) derives from `UserError`: its message
names the problem and the fix, so `main` prints it as one `error:` line
without a traceback (`--verbosity=1` adds it). Each module's own class keeps
its other base (`ValueError`, `RuntimeError`) for callers that catch those.
Anything that is not a UserError is a bug and keeps its traceback.
"""


class UserError(Exception):
  """A mistake of the user's, explained by the message alone."""


class ConfigError(UserError, ValueError):
  """An invalid configuration value; the message names the flag."""
