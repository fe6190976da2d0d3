"""Teacher checkpoints: an orbax parameter tree plus a JSON model description.

Layout of a teacher directory:
  model.json   {"kind": "maskgit", "config": {MaskTransformer fields}}
  params/      orbax StandardCheckpointer tree of the Flax variables ({"params": ...})

`save` writes into a temporary sibling directory and renames it into place, so a directory
that exists is complete.
"""

import dataclasses
import json
import os
import shutil
import tempfile
from typing import Any, Dict, Optional

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from dimo_jax.models.maskgit import MaskTransformer

_KINDS = {"maskgit": MaskTransformer}
_MODEL_FIELDS = ("codebook_size", "num_classes", "seq_len", "hidden_dim", "depth", "num_heads",
                 "mlp_dim", "dropout")


def model_description(model: MaskTransformer) -> Dict[str, Any]:
  return {"kind": "maskgit", "config": {f: getattr(model, f) for f in _MODEL_FIELDS}}


def build_model(description: Dict[str, Any], dtype=jnp.float32) -> MaskTransformer:
  kind = description.get("kind")
  if kind not in _KINDS:
    raise ValueError(f"unknown teacher kind {kind!r}; known: {sorted(_KINDS)}")
  return _KINDS[kind](**description["config"], dtype=dtype)


def save(dst: str, model: MaskTransformer, variables: Any,
         extra: Optional[Dict[str, Any]] = None) -> None:
  """Writes the teacher at `dst` completely or not at all (`extra` goes into model.json)."""
  dst = os.path.abspath(dst)
  parent = os.path.dirname(dst)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=os.path.basename(dst) + ".tmp-", dir=parent)
  try:
    with open(os.path.join(tmp, "model.json"), "w") as f:
      json.dump({**model_description(model), **(extra or {})}, f, indent=2)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.join(tmp, "params"), jax.device_get(variables))
    checkpointer.wait_until_finished()
    if os.path.exists(dst):
      shutil.rmtree(dst)
    os.replace(tmp, dst)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


@dataclasses.dataclass(frozen=True)
class Teacher:
  """A loaded class-conditional teacher: its module, variables and description."""
  model: MaskTransformer
  variables: Any
  description: Dict[str, Any]

  def logits(self, tokens: jax.Array, labels: jax.Array, drop: jax.Array) -> jax.Array:
    """Eval-mode logits: tokens int32[B, h, w] (mask = V) -> float32[B, h*w, V]."""
    return self.model.apply(self.variables, tokens, labels, drop, deterministic=True)


def load(src: str, dtype=jnp.float32) -> Teacher:
  """Reads a teacher directory written by `save` (or by `python -m dimo_jax.convert`)."""
  description_file = os.path.join(src, "model.json")
  if not os.path.isfile(description_file):
    raise FileNotFoundError(f"{src} is not a teacher checkpoint: {description_file} is missing")
  with open(description_file) as f:
    description = json.load(f)
  model = build_model(description, dtype)
  abstract = jax.eval_shape(
      lambda: model.init({"params": jax.random.PRNGKey(0)},
                         jnp.zeros((1, model.seq_len), jnp.int32), jnp.zeros((1,), jnp.int32)))
  variables = ocp.StandardCheckpointer().restore(os.path.abspath(os.path.join(src, "params")),
                                                  abstract)
  return Teacher(model, variables, description)
