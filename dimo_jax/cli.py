"""How every `python -m dimo_jax.*` command reports a user's mistake: one line, exit status 1.

  error: runs/x/checkpoints/config.json: resuming with other method keys: fake_rounds 2 -> 4

`run(main)` replaces `absl.app.run(main)`: a `UserError` (and a missing or unwritable file)
escaping `main` is printed as `error: <message>`; a flag that names no key of the config
(`--config.fake_round=4`) is reported with the closest real keys. Anything else is a bug and
keeps its traceback.
"""

import importlib.util
import os
import sys
from typing import Callable, List, Optional, Sequence

from absl import app, flags

from dimo_jax.errors import UserError

# Errors of the file system that are the user's to fix (a path that is missing, a folder that
# is read-only), printed as one line like a UserError.
USER_OS_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError,
                  FileExistsError)


def fail(message: str, status: int = 1) -> None:
  """Prints `error: message` (one line) and exits with `status`."""
  print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
  sys.exit(status)


def _config_file(argv: Sequence[str], name: str) -> Optional[str]:
  """The value of `--name=PATH` or `--name PATH` in `argv`."""
  for i, arg in enumerate(argv):
    if arg.startswith(f"--{name}="):
      return arg.split("=", 1)[1]
    if arg == f"--{name}" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _load_config(spec: str):
  """The ConfigDict of a config file argument `path.py[:arg]`, as config_flags reads it."""
  path, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("_dimo_jax_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def unknown_override(argv: Sequence[str], name: str = "config") -> Optional[str]:
  """The message for the first `--name.<key>=...` of `argv` whose key the config file lacks,
  or None when every override names a real key (or the file cannot be read)."""
  from dimo_jax import config_check
  spec = _config_file(argv, name)
  if spec is None or not os.path.isfile(spec.partition(":")[0]):
    return None
  try:
    config = _load_config(spec)
  except Exception:  # the file's own error is what flags parsing reports
    return None
  prefix = f"--{name}."
  for arg in argv:
    if not arg.startswith(prefix):
      continue
    key = arg[len(prefix):].split("=", 1)[0]
    near = config_check.closest_keys(config, key)
    if near is not None:
      hint = f"; did you mean {' or '.join(near)}?" if near else ""
      return f"{arg.split('=', 1)[0]}: {spec} has no key {key!r}{hint}"
  return None


def installed_config(argv: List[str], name: str = "config") -> List[str]:
  """`argv` with a `--config configs/<file>.py[:arg]` that does not exist from the working
  directory replaced by the installed `configs` package's file of that name, so that the
  README's commands work from any directory once the package is installed."""
  out = list(argv)
  for i, arg in enumerate(out):
    if arg.startswith(f"--{name}="):
      prefix, spec = f"--{name}=", arg.split("=", 1)[1]
    elif arg == f"--{name}" and i + 1 < len(out):
      prefix, spec, i = "", out[i + 1], i + 1
    else:
      continue
    path, sep, rest = spec.partition(":")
    if os.path.exists(path) or not path.startswith("configs/"):
      continue
    import configs
    candidate = os.path.join(os.path.dirname(os.path.abspath(configs.__file__)),
                             path[len("configs/"):])
    if os.path.isfile(candidate):
      out[i] = prefix + candidate + sep + rest
  return out


def parse_flags(argv: List[str], config_flag: Optional[str] = "config") -> List[str]:
  """absl flag parsing whose failures are one line (a mistyped config key gets its closest
  real keys)."""
  if config_flag:
    argv = installed_config(argv, config_flag)
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # config_flags raises KeyError / AttributeError chains for a bad key
    message = unknown_override(argv, config_flag) if config_flag else None
    fail(message or f"{type(e).__name__}: {e}", status=2)


def run(main: Callable[[List[str]], None], config_flag: Optional[str] = "config") -> None:
  """`absl.app.run(main)` with user errors printed as one line (see the module docstring)."""
  def guarded(argv):
    from dimo_jax import writers
    writers.quiet_orbax()
    try:
      main(argv)
    except UserError as e:
      fail(e)
    except USER_OS_ERRORS as e:
      fail(f"{e.filename}: {e.strerror}" if getattr(e, "filename", None) else e)
  app.run(guarded, flags_parser=lambda argv: parse_flags(argv, config_flag))
