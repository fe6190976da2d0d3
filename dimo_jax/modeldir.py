"""Model directories: an orbax tree of Flax variables plus a JSON description, written atomically.

Layout of a model directory (a teacher, a tokenizer, or anything `python -m dimo_jax.convert`
writes):
  model.json   {"kind": <registry name>, "config": {module fields}, ...provenance}
  params/      orbax StandardCheckpointer tree of the Flax variables ({"params": ...})

`write` builds the directory in a temporary sibling and renames it into place, so a directory
that exists is complete: a conversion that fails half-way leaves nothing behind.
"""

import contextlib
import dataclasses
import importlib
import json
import os
import shutil
import tempfile
from typing import Any, Callable, Dict, Iterator

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


@contextlib.contextmanager
def staged(dst: str) -> Iterator[str]:
  """A path to build the directory `dst` at: when the block ends without an error it replaces
  `dst` in one rename; otherwise it is removed. `dst` is never seen half-written."""
  dst = os.path.abspath(dst)
  parent = os.path.dirname(dst)
  os.makedirs(parent, exist_ok=True)
  staging = tempfile.mkdtemp(prefix=os.path.basename(dst) + ".tmp-", dir=parent)
  try:
    inner = os.path.join(staging, "model")
    yield inner
    if os.path.exists(dst):
      shutil.rmtree(dst)
    os.replace(inner, dst)
  finally:
    shutil.rmtree(staging, ignore_errors=True)


def write(dst: str, description: Dict[str, Any], variables: Any) -> None:
  """Writes `description` (JSON) and `variables` (orbax) at `dst`, completely or not at all."""
  with staged(dst) as tmp:
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
