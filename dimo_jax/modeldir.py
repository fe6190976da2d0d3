"""Model directories: an orbax tree of Flax variables plus a JSON description, written atomically.

Layout of a model directory (a teacher, a tokenizer, or anything `python -m dimo_jax.convert`
writes):
  model.json   {"kind": <registry name>, "config": {module fields}, ...provenance}
  params/      orbax StandardCheckpointer tree of the Flax variables ({"params": ...})

`write` builds the directory in a temporary sibling and swaps it into place (`staged`), so a
directory that exists is complete: a conversion that fails half-way leaves nothing behind, and a
destination that is not a model directory (a user's folder, a release, a mount point) is refused,
never replaced.
"""

import contextlib
import ctypes
import dataclasses
import importlib
import json
import os
import shutil
import sys
import tempfile
from typing import Any, Callable, Dict, Iterable, Iterator

import flax.linen as nn
import jax
import orbax.checkpoint as ocp

DESCRIPTION_FILE = "model.json"
PARAMS_DIR = "params"


def module_config(module: nn.Module) -> Dict[str, Any]:
  """The constructor fields of a Flax module that define its weights (not dtype, remat, ...)."""
  skip = {"parent", "name", "dtype", "param_dtype", "remat"}
  return {f.name: getattr(module, f.name) for f in dataclasses.fields(module)
          if f.init and f.name not in skip}


def module_class(registry: Dict[str, str], kind: str, what: str):
  """The Flax module class that `registry` ({kind: "module:Class"}) names for `kind`.

  Registries name classes by import path so that a kind's dependencies load only when used.
  """
  if kind not in registry:
    raise ValueError(f"unknown {what} kind {kind!r}; known: {sorted(registry)}")
  module, name = registry[kind].split(":")
  return getattr(importlib.import_module(module), name)


def describe(registry: Dict[str, str], module: nn.Module, what: str) -> Dict[str, Any]:
  """{"kind", "config"} of a module instance whose class `registry` names."""
  for kind in registry:
    if type(module) is module_class(registry, kind, what):
      return {"kind": kind, "config": module_config(module)}
  raise ValueError(f"{type(module).__name__} is not a registered {what} module")


class DestinationError(ValueError):
  """A destination that a model directory may not be written to (it holds something else)."""


_STAGING_MARK = ".dimo_jax-staging"  # holds the pid of the process that staged the directory
_RENAME_EXCHANGE = 2  # linux renameat2 flag: swap two paths atomically


def _is_within(path: str, folder: str) -> bool:
  return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _real(path: str) -> str:
  return os.path.realpath(os.path.abspath(path))


def check_destination(dst: str, sources: Iterable[str] = ()) -> None:
  """Raises `DestinationError` unless `dst` may become a model directory: it does not exist, is
  an empty folder, or is a model directory (it holds model.json); it is no mount point; it is
  neither one of `sources`, nor inside one, nor a folder that contains one."""
  real = _real(dst)
  for src in sources:
    src = _real(src)
    if _is_within(src, real) or _is_within(real, src):
      raise DestinationError(f"{dst}: the destination may not be, contain or lie inside the "
                             f"source {src}; choose a folder of its own")
  if not os.path.lexists(dst):
    return
  if os.path.islink(dst):
    raise DestinationError(f"{dst}: is a symbolic link; give the folder itself ({real})")
  if not os.path.isdir(dst):
    raise DestinationError(f"{dst}: exists and is not a folder; a model directory is a folder "
                           f"(remove it or choose another destination)")
  if os.path.ismount(real):
    raise DestinationError(f"{dst}: is a mount point; write the model directory into a folder "
                           f"below it")
  if os.listdir(dst) and not os.path.isfile(os.path.join(dst, DESCRIPTION_FILE)):
    raise DestinationError(f"{dst}: holds files but no {DESCRIPTION_FILE}, so it is not a model "
                           f"directory written by dimo_jax; it is left untouched (choose an "
                           f"empty or new folder)")


def _swap(new: str, dst: str, old: str) -> None:
  """Puts the folder `new` at `dst`; the previous `dst` ends up at `old`. With renameat2 the
  swap is one atomic step; elsewhere two renames, between which `old` is whole (and restored by
  the next `staged` of `dst` should the process die there)."""
  libc = ctypes.CDLL(None, use_errno=True)
  renameat2 = getattr(libc, "renameat2", None)
  if renameat2 is not None:
    at_fdcwd = -100
    if renameat2(at_fdcwd, os.fsencode(new), at_fdcwd, os.fsencode(dst), _RENAME_EXCHANGE) == 0:
      os.rename(new, old)  # `new` now names the previous directory
      return
  os.rename(dst, old)
  os.rename(new, dst)


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # alive, owned by another user
    pass
  return True


def _recover_leftovers(dst: str) -> None:
  """Cleans up what interrupted `staged` builds of `dst` left beside it, and says so on stderr:
  a previous directory caught between the two renames of `_swap` is moved back to `dst`, staging
  folders are removed. Only folders marked by `staged` and whose process is gone are touched."""
  parent, prefix = os.path.dirname(dst), os.path.basename(dst) + ".tmp-"
  for name in sorted(os.listdir(parent)):
    staging = os.path.join(parent, name)
    mark = os.path.join(staging, _STAGING_MARK)
    if not name.startswith(prefix) or not os.path.isfile(mark):
      continue
    try:
      with open(mark) as f:
        pid = int(f.read().strip() or 0)
    except (OSError, ValueError):
      pid = 0
    if pid and pid != os.getpid() and _pid_alive(pid):
      continue
    old = os.path.join(staging, "old")
    if os.path.isdir(old) and not os.path.lexists(dst):
      os.rename(old, dst)
      print(f"note: restored {dst} from an interrupted conversion ({staging})", file=sys.stderr)
    shutil.rmtree(staging, ignore_errors=True)
    print(f"note: removed {staging}, left by an interrupted conversion", file=sys.stderr)


@contextlib.contextmanager
def staged(dst: str, sources: Iterable[str] = ()) -> Iterator[str]:
  """A path to build the model directory `dst` at. When the block ends without an error the new
  directory takes the place of `dst` (`_swap`); otherwise it is removed. `dst` is never seen
  half-written, and only a model directory (`check_destination`) is ever replaced.

  Raises `DestinationError` before anything is built when `dst` may not be written.
  """
  check_destination(dst, sources)
  dst = os.path.abspath(dst)
  parent = os.path.dirname(dst)
  try:
    os.makedirs(parent, exist_ok=True)
    _recover_leftovers(dst)
    staging = tempfile.mkdtemp(prefix=os.path.basename(dst) + ".tmp-", dir=parent)
  except OSError as e:
    raise DestinationError(f"{dst}: cannot write there ({e.strerror or e})") from e
  try:
    with open(os.path.join(staging, _STAGING_MARK), "w") as f:
      f.write(str(os.getpid()))
    inner = os.path.join(staging, "model")
    yield inner
    check_destination(dst, sources)  # the block may have run for minutes
    if os.path.lexists(dst):
      _swap(inner, dst, os.path.join(staging, "old"))
    else:
      os.rename(inner, dst)
  finally:
    shutil.rmtree(staging, ignore_errors=True)


def write(dst: str, description: Dict[str, Any], variables: Any,
          sources: Iterable[str] = ()) -> None:
  """Writes `description` (JSON) and `variables` (orbax) at `dst`, completely or not at all
  (`staged`; `sources` are paths `dst` must stay clear of)."""
  with staged(dst, sources) as tmp:
    os.makedirs(tmp)
    with open(os.path.join(tmp, DESCRIPTION_FILE), "w") as f:
      json.dump(description, f, indent=2)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.join(tmp, PARAMS_DIR), jax.device_get(variables))
    checkpointer.wait_until_finished()


def read_description(src: str, what: str) -> Dict[str, Any]:
  """model.json of `src`; `what` ("teacher", "tokenizer") names the expectation in errors."""
  path = os.path.join(src, DESCRIPTION_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{src} is not a {what} directory: {path} is missing")
  with open(path) as f:
    description = json.load(f)
  if "kind" not in description or "config" not in description:
    raise ValueError(f"{path}: expected the keys 'kind' and 'config', found {sorted(description)}")
  return description


def restore(src: str, init_fn: Callable[[], Any]) -> Any:
  """Restores the variables of `src` into the tree structure that `init_fn()` would build."""
  abstract = jax.eval_shape(init_fn)
  return ocp.StandardCheckpointer().restore(os.path.abspath(os.path.join(src, PARAMS_DIR)),
                                            abstract)
