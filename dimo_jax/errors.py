"""The one error type a user's mistake raises: the CLIs print it as one line, not a traceback.

A `UserError` says which file, key or flag was wrong, what was expected and what was found;
anything else that escapes a CLI is a bug and keeps its traceback.
"""


class UserError(ValueError):
  """Bad input (a config value, a file, a workdir): `python -m dimo_jax.*` prints
  `error: <message>` and exits 1."""
