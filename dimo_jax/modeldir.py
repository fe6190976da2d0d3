"""Model directories: an orbax tree of Flax variables plus a JSON description, written atomically.

Layout of a model directory (a teacher, a tokenizer, or anything `python -m dimo_jax.convert`
writes):
  model.json   {"kind": <registry name>, "config": {module fields}, ...provenance}
  params/      orbax StandardCheckpointer tree of the Flax variables ({"params": ...})

`write` builds the directory in a temporary sibling and swaps it into place (`staged`), so a
directory that exists is complete: a conversion that fails half-way leaves nothing behind. Only a
dimo_jax model directory is ever replaced: its model.json is ours (an object with "kind" and
"config") and it holds nothing but our parts (`OWN_ENTRIES`). Anything else (a user's folder,
another tool's model.json, a model directory a user added notes to, a mount point) is refused
naming what is not ours. A destination is locked while it is written (`locked`): a second writer
is refused at once.

Reading checks what a user may have changed by hand before any weight is used: model.json must be
a JSON object whose config builds the module (`read_description`, `construct`), params/ must hold
exactly the parameter paths and shapes of that module (`restore`), and a folder that model.json
names must lie inside the directory (`part_path`). Each failure is one `ModelDirError` naming the
file, the key and what was expected and found.
"""

import collections.abc
import contextlib
import ctypes
import dataclasses
import errno
import fcntl
import hashlib
import importlib
import json
import logging
import os
import shutil
import sys
import tempfile
import typing
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple, Type

import flax.linen as nn
import jax
import orbax.checkpoint as ocp

from dimo_jax.errors import UserError

DESCRIPTION_FILE = "model.json"
PARAMS_DIR = "params"


class ModelDirError(UserError):
  """A model directory that cannot be used as its files say (model.json or another JSON file of
  it unreadable or incomplete, a config that builds no module, params/ of other shapes than
  model.json describes, a part's path leading outside the directory), or one that does not fit
  the model it is used with (a tokenizer of another codebook than the teacher's)."""


def description_path(src: str) -> str:
  return os.path.join(src, DESCRIPTION_FILE)


def module_config(module: nn.Module) -> Dict[str, Any]:
  """The constructor fields of a Flax module that define its weights (not dtype, remat, the
  attention kernel, ...)."""
  skip = {"parent", "name", "dtype", "param_dtype", "remat", "attention"}
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


class DestinationError(UserError):
  """A destination that a model directory may not be written to (it holds something else)."""


_STAGING_MARK = ".dimo_jax-staging"  # holds the pid of the process that staged the directory
_RENAME_EXCHANGE = 2  # linux renameat2 flag: swap two paths atomically


def _is_within(path: str, folder: str) -> bool:
  return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _real(path: str) -> str:
  return os.path.realpath(os.path.abspath(path))


# What a model directory holds at its top level: its description, its weights, and the parts a
# text-to-image teacher or a CLIP model carries (model directories of their own, or the files of
# a tokenizer). A folder holding anything else is not replaced.
OWN_ENTRIES = (DESCRIPTION_FILE, PARAMS_DIR, "text_encoder", "tokenizer", "vqvae")


def _is_our_description(path: str) -> bool:
  """Whether the file `path` is a model.json that dimo_jax writes: a JSON object with a string
  "kind" and an object "config" (another tool's model.json, a TF.js model's say, is not)."""
  try:
    with open(path, encoding="utf-8") as f:
      value = json.load(f)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError):
    return False
  return (isinstance(value, dict) and isinstance(value.get("kind"), str)
          and isinstance(value.get("config"), dict))


def foreign_entries(folder: str) -> List[str]:
  """The entries of the model directory `folder` (and of the model directories among its parts)
  that dimo_jax did not write, as paths relative to `folder`."""
  foreign = []
  for name in sorted(os.listdir(folder)):
    if name not in OWN_ENTRIES:
      foreign.append(name)
      continue
    part = os.path.join(folder, name)
    if (name != PARAMS_DIR and os.path.isdir(part) and not os.path.islink(part)
        and os.path.isfile(os.path.join(part, DESCRIPTION_FILE))):
      foreign += [os.path.join(name, inner) for inner in foreign_entries(part)]
  return foreign


def check_destination(dst: str, sources: Iterable[str] = ()) -> None:
  """Raises `DestinationError` unless `dst` may become a model directory: it does not exist, is
  an empty folder, or is a dimo_jax model directory (model.json ours, nothing but `OWN_ENTRIES`);
  it is no mount point; it is neither one of `sources`, nor inside one, nor a folder that
  contains one."""
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
  if not os.listdir(dst):
    return
  description = os.path.join(dst, DESCRIPTION_FILE)
  if not os.path.isfile(description):
    raise DestinationError(f"{dst}: holds files but no {DESCRIPTION_FILE}, so it is not a model "
                           f"directory written by dimo_jax; it is left untouched (choose an "
                           f"empty or new folder)")
  if not _is_our_description(description):
    raise DestinationError(f"{dst}: its {DESCRIPTION_FILE} is not one dimo_jax writes (a JSON "
                           "object with 'kind' and 'config'), so the folder belongs to another "
                           "tool; it is left untouched (choose an empty or new folder)")
  foreign = foreign_entries(dst)
  if foreign:
    shown = ", ".join(foreign[:8]) + (f" and {len(foreign) - 8} more" if len(foreign) > 8 else "")
    raise DestinationError(f"{dst}: a dimo_jax model directory, but it also holds {shown}, which "
                           "dimo_jax did not write and replacing the directory would delete; it "
                           "is left untouched (move them out, or choose another destination)")


_held_locks: Dict[str, int] = {}


def _lock_path(dst: str) -> str:
  """The lock file of the destination `dst`: in the system's temporary folder (never among the
  user's files), named by a hash of the resolved path, so that every spelling of `dst` (relative,
  absolute, through a link) meets the same lock."""
  digest = hashlib.sha256(_real(dst).encode()).hexdigest()[:24]
  return os.path.join(tempfile.gettempdir(), f"dimo_jax-{digest}.lock")


@contextlib.contextmanager
def locked(dst: str) -> Iterator[None]:
  """Holds the lock of the destination `dst` for the block: another process that tries to write
  `dst` meanwhile gets a `DestinationError` at once. Re-entrant within a process (a converter
  locks `dst` before it reads its source, `staged` again when it writes)."""
  path = _lock_path(dst)
  if path in _held_locks:
    yield
    return
  while True:
    try:
      fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
      raise DestinationError(f"{dst}: cannot take its lock {path} ({e.strerror or e})") from e
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      os.close(fd)
      raise DestinationError(f"{dst}: another process is writing it now; wait for it to end "
                             "or choose another destination") from None
    try:
      current = os.stat(path).st_ino
    except FileNotFoundError:
      current = None
    if current == os.fstat(fd).st_ino:  # not a file its previous holder unlinked meanwhile
      break
    os.close(fd)
  _held_locks[path] = fd
  try:
    yield
  finally:
    del _held_locks[path]
    with contextlib.suppress(FileNotFoundError):
      os.unlink(path)
    os.close(fd)


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

  Raises `DestinationError` before anything is built when `dst` may not be written, or while
  another process writes it (`locked`).
  """
  with locked(dst):
    with _staged(dst, sources) as inner:
      yield inner


@contextlib.contextmanager
def _staged(dst: str, sources: Iterable[str]) -> Iterator[str]:
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
    try:
      with quiet_failed_writes():
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(os.path.join(tmp, PARAMS_DIR), jax.device_get(variables))
        checkpointer.wait_until_finished()
    except (OSError, ValueError) as e:
      problem = disk_problem(e)
      if problem is None:
        raise
      raise DestinationError(f"{os.path.abspath(dst)}: cannot write the model directory "
                             f"({problem}); nothing was written there") from None


_JSON_TYPES = {dict: "object", list: "array", str: "string", int: "number", float: "number",
               bool: "boolean", type(None): "null"}


def json_type(value: Any) -> str:
  """The JSON name of a parsed value's type ("object", "array", ...)."""
  return _JSON_TYPES.get(type(value), type(value).__name__)



def fingerprint(src: str) -> str:
  """"sha256:<hex>" of a model directory's contents: every file below it (model.json, params/,
  the parts), by relative path and bytes, in sorted order. Equal for the same teacher wherever
  it lies or however its path is spelled; different as soon as one byte differs."""
  digest = hashlib.sha256()
  root = os.path.realpath(src)
  for folder, dirs, files in sorted(os.walk(root)):
    dirs.sort()
    for name in sorted(files):
      path = os.path.join(folder, name)
      digest.update(os.path.relpath(path, root).encode() + b"\0")
      with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
          digest.update(block)
      digest.update(b"\0")
  return "sha256:" + digest.hexdigest()

def read_json(path: str, expected: str = "a JSON object",
              error: Type[UserError] = ModelDirError) -> Dict[str, Any]:
  """The JSON object in the file `path`; `error` (a UserError) naming the file when it is not
  one."""
  try:
    with open(path, encoding="utf-8") as f:
      value = json.load(f)
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise error(f"{path}: expected {expected}, found text that is not JSON ({e})") from None
  if not isinstance(value, dict):
    raise error(f"{path}: expected {expected}, found a JSON {json_type(value)}")
  return value


def read_description(src: str, what: str) -> Dict[str, Any]:
  """model.json of `src`; `what` ("teacher", "tokenizer") names the expectation in errors."""
  path = description_path(src)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{src} is not a {what} directory: {path} is missing")
  description = read_json(path, f'a JSON object {{"kind": ..., "config": {{...}}}} describing '
                                f"a {what}")
  if "kind" not in description or "config" not in description:
    raise ModelDirError(f"{path}: expected the keys 'kind' and 'config', "
                        f"found {sorted(description)}")
  if not isinstance(description["kind"], str):
    raise ModelDirError(f"{path}: kind: expected the name of a {what} kind (a string), found "
                        f"{description['kind']!r}")
  if not isinstance(description["config"], dict):
    raise ModelDirError(f"{path}: config: expected an object of module fields, found a JSON "
                        f"{json_type(description['config'])}")
  return description


def part_path(src: str, description: Dict[str, Any], key: str, what: str) -> str:
  """The folder inside `src` that model.json names under `key` (a Meissonic directory's
  "vqvae", "text_encoder", "tokenizer"). A path that leads outside `src` (absolute, through
  `..` or a symbolic link) is refused: a model directory is self-contained, and following such
  a path would read whatever it points at."""
  path = description_path(src)
  value = description.get(key)
  if value is None:
    raise ModelDirError(f"{path}: expected the key {key!r} naming the {what} folder inside "
                        f"{src}, found {sorted(description)}")
  if not isinstance(value, str) or not value:
    raise ModelDirError(f"{path}: {key}: expected the name of the {what} folder inside {src}, "
                        f"found {value!r}")
  if os.path.isabs(value):
    raise ModelDirError(f"{path}: {key}: expected a folder inside {src}, found the absolute "
                        f"path {value!r}")
  inner, root = _real(os.path.join(src, value)), _real(src)
  if inner == root or not _is_within(inner, root):
    raise ModelDirError(f"{path}: {key}: expected a folder inside {src}, found {value!r}, which "
                        f"leads to {inner}")
  return os.path.join(src, value)


_PLAIN_TYPES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
_PLURALS = {bool: "booleans", int: "integers", float: "numbers", str: "strings"}


def _fits(value: Any, annotation: Any) -> bool:
  """Whether a JSON value fits a field annotated `annotation` (an int for a float field, a list
  for a sequence); annotations other than plain types and sequences of them are not checked."""
  if annotation is bool:
    return isinstance(value, bool)
  if annotation is int:
    return isinstance(value, int) and not isinstance(value, bool)
  if annotation is float:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
  if annotation is str:
    return isinstance(value, str)
  origin = typing.get_origin(annotation)
  if origin in (tuple, list, collections.abc.Sequence):
    if not isinstance(value, (list, tuple)):
      return False
    args = [a for a in typing.get_args(annotation) if a is not Ellipsis]
    return len(args) != 1 or all(_fits(v, args[0]) for v in value)
  return True


def _expected(annotation: Any) -> str:
  if annotation in _PLAIN_TYPES:
    return _PLAIN_TYPES[annotation]
  args = [a for a in typing.get_args(annotation) if a is not Ellipsis]
  return f"a list of {_PLURALS.get(args[0], 'values')}" if len(args) == 1 else "a list"


def construct(cls, src: str, config: Dict[str, Any], **kwargs) -> nn.Module:
  """`cls(**config, **kwargs)` for the config of model.json of `src`, each key checked first:
  a field of `cls` (not one the loader sets, as dtype), of its annotated type; every field
  without a default given. `ModelDirError` names the file and the key otherwise.

  A list for a tuple field becomes a tuple: JSON has no tuples, and a module is hashed when it
  is a jit static argument.
  """
  path = description_path(src)
  fields = {f.name: f for f in dataclasses.fields(cls)
            if f.init and f.name not in ("parent", "name")}
  settable = sorted(set(fields) - set(kwargs))
  for key, value in config.items():
    if key not in settable:
      raise ModelDirError(f"{path}: config: {key!r} is not a field of {cls.__name__}; expected "
                          f"keys among {settable}")
    if not _fits(value, fields[key].type):
      raise ModelDirError(f"{path}: config: {key}: expected {_expected(fields[key].type)}, "
                          f"found {value!r}")
  missing = [name for name in settable if name not in config
             and fields[name].default is dataclasses.MISSING
             and fields[name].default_factory is dataclasses.MISSING]
  if missing:
    raise ModelDirError(f"{path}: config: expected the {cls.__name__} fields {missing}, which "
                        "have no default; they are missing")
  config = {key: tuple(value) if typing.get_origin(fields[key].type) is tuple else value
            for key, value in config.items()}
  return cls(**config, **kwargs)


def build(registry: Dict[str, str], src: str, description: Dict[str, Any], what: str,
          **kwargs) -> nn.Module:
  """The module of the registered kind that `description` (model.json of `src`) describes,
  built by `construct` with `kwargs` (dtype, ...)."""
  kind = description["kind"]
  if kind not in registry:
    raise ModelDirError(f"{description_path(src)}: kind: expected a {what} kind among "
                        f"{sorted(registry)}, found {kind!r}")
  return construct(module_class(registry, kind, what), src, description["config"], **kwargs)


def _key_name(key: Any) -> str:
  for attribute in ("key", "name", "idx"):
    if hasattr(key, attribute):
      return str(getattr(key, attribute))
  return str(key)


def param_shapes(tree: Any) -> Dict[str, Tuple[int, ...]]:
  """{"params/tok_emb/embedding": shape} of every array of a variable tree (arrays, abstract
  arrays, or the array metadata orbax keeps of a checkpoint)."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {"/".join(_key_name(k) for k in path): tuple(getattr(leaf, "shape", ()))
          for path, leaf in flat}


def shape_difference(expected: Any, stored: Any, described_by: str,
                     stored_in: str) -> Optional[str]:
  """The first parameter whose path or shape differs between the tree a module builds
  (`expected`, which `described_by` describes) and the tree found in `stored_in` (`stored`, e.g.
  its orbax metadata), said in a sentence; None when they agree."""
  want, have = param_shapes(expected), param_shapes(stored)
  for key, shape in want.items():
    if key not in have:
      return f"{described_by} describes {key} of shape {shape} but {stored_in} has no {key}"
    if have[key] != shape:
      return f"{described_by} describes {key} of shape {shape} but {stored_in} holds {have[key]}"
  for key, shape in have.items():
    if key not in want:
      return f"{stored_in} holds {key} of shape {shape}, which {described_by} does not describe"
  return None


# What a module's init raises for a config value it cannot build with (a width of 0, a string
# for a size, heads that do not divide the width).
_BUILD_ERRORS = (TypeError, ValueError, ArithmeticError, AssertionError)
# What orbax and tensorstore raise for a checkpoint folder that is truncated or damaged.
READ_ERRORS = (OSError, ValueError, KeyError)


def first_line(error: BaseException, limit: int = 300) -> str:
  """The first line of an exception's message with its type ("ValueError: DATA_LOSS: ..."),
  without the JSON spec tensorstore appends and cut at `limit` characters."""
  lines = str(error).strip().splitlines()
  text = (lines[0] if lines else "").split(" [tensorstore_spec")[0]
  if len(text) > limit:
    text = text[:limit] + " ..."
  return f"{type(error).__name__}: {text}"


@contextlib.contextmanager
def quiet_failed_reads() -> Iterator[None]:
  """Wraps a checkpoint read. When one array fails to read, tensorstore still finishes the
  others and calls back into the event loop that orbax has closed by then; the RuntimeErrors
  of those callbacks would print tracebacks around the one error line. They are dropped while
  the read runs and, when it fails, afterwards (the callbacks come late)."""
  previous = sys.unraisablehook
  sys.unraisablehook = closed_loop_filter(previous)
  yield
  sys.unraisablehook = previous


def closed_loop_filter(previous: Callable[[Any], None]) -> Callable[[Any], None]:
  """An unraisable hook that drops tensorstore's late callbacks into an event loop orbax has
  closed (RuntimeError 'Event loop is closed') and passes everything else to `previous`."""
  def hook(unraisable):
    if not (isinstance(unraisable.exc_value, RuntimeError)
            and "Event loop is closed" in str(unraisable.exc_value)):
      previous(unraisable)
  return hook


# What a failed write says about the disk (tensorstore reports it inside a ValueError).
_DISK_FULL = ("No space left on device", "os_error_code='28'", "Disk quota exceeded",
              "os_error_code='122'")
_READ_ONLY = ("Read-only file system", "os_error_code='30'")


def disk_problem(error: BaseException) -> Optional[str]:
  """"no space left on device" / "read-only file system" when `error` (an OSError, or orbax's
  ValueError around tensorstore's) is the disk's doing; None otherwise."""
  errno_ = getattr(error, "errno", None)
  text = str(error)
  if errno_ in (errno.ENOSPC, errno.EDQUOT) or any(s in text for s in _DISK_FULL):
    return "no space left on device"
  if errno_ == errno.EROFS or any(s in text for s in _READ_ONLY):
    return "read-only file system"
  return None


class DropOrbaxErrors(logging.Filter):
  """Drops the ERROR records (with their tracebacks) orbax's writer threads log for a failed
  write: the write's own exception says it once."""

  def filter(self, record: logging.LogRecord) -> bool:
    return "/orbax/" not in record.pathname


@contextlib.contextmanager
def quiet_failed_writes() -> Iterator[None]:
  """Wraps an orbax save: a save that fails on a full or read-only disk raises once, without
  the tracebacks its threads log and the late callbacks into a closed event loop print
  (`quiet_failed_reads`)."""
  logger = logging.getLogger("absl")
  drop = DropOrbaxErrors()
  logger.addFilter(drop)
  try:
    with quiet_failed_reads():
      yield
  finally:
    logger.removeFilter(drop)


def restore(src: str, init_fn: Callable[[], Any]) -> Any:
  """Restores the variables of `src` into the tree structure that `init_fn()` would build.

  Raises `ModelDirError` when the config of model.json builds no module (`init_fn` fails),
  when params/ holds other parameter paths or shapes than that module's (a model.json edited
  after the weights were written), or when params/ is missing or cannot be read.
  """
  path = description_path(src)
  try:
    abstract = jax.eval_shape(init_fn)
  except _BUILD_ERRORS as e:
    raise ModelDirError(f"{path}: config: expected the fields of a module that can be built, "
                        f"found values it fails on ({first_line(e)})") from e
  params = os.path.join(src, PARAMS_DIR)
  if not os.path.isdir(params):
    raise ModelDirError(f"{params}: missing; a model directory holds {DESCRIPTION_FILE} and "
                        f"{PARAMS_DIR}/, the weights it describes")

  def unreadable(why: str) -> ModelDirError:
    return ModelDirError(f"{params}: cannot be read as the orbax tree of the weights ({why}); it "
                         "is incomplete or damaged: write the model directory again")

  checkpointer = ocp.StandardCheckpointer()
  try:
    stored = checkpointer.metadata(os.path.abspath(params))
  except READ_ERRORS as e:
    raise unreadable(first_line(e)) from e
  stored = getattr(stored, "item_metadata", stored)
  if stored is None:  # orbax returns no tree (and logs a warning) when it cannot read it
    raise unreadable("no parameter tree could be read")
  difference = shape_difference(abstract, getattr(stored, "tree", stored), path, params)
  if difference:
    raise ModelDirError(f"{difference}; {DESCRIPTION_FILE} and {PARAMS_DIR}/ were not written "
                        f"together (was {DESCRIPTION_FILE} edited?)")
  try:
    with quiet_failed_reads():
      return checkpointer.restore(os.path.abspath(params), abstract)
  except READ_ERRORS as e:
    raise unreadable(first_line(e)) from e
