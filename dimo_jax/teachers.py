"""Teachers: a class-conditional masked transformer and its variables, read from a model directory.

A teacher directory is a `dimo_jax.modeldir` (model.json + orbax params/), written by
`python -m dimo_jax.pretrain` or `python -m dimo_jax.convert`. `model.json["kind"]` picks the
Flax module; every kind has MaskTransformer's call signature
  model.apply(variables, tokens int32[B, L] (mask = V), labels int32[B], drop_label bool[B],
              emb_noise=..., deterministic=...) -> float32[B, L, V]
so Di[M]O distills any of them with the same step (teacher, generator and auxiliary model are
one module with three parameter trees).
"""

import dataclasses
from typing import Any, Dict, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from dimo_jax import modeldir

# kind -> "module:class"; imported on use so a kind's dependencies load only when needed.
_KINDS = {
    "maskgit": "dimo_jax.models.maskgit:MaskTransformer",
    "google-maskgit": "dimo_jax.models.google_maskgit:GoogleMaskGIT",
}


def model_description(model: nn.Module) -> Dict[str, Any]:
  return modeldir.describe(_KINDS, model, "teacher")


def build_model(description: Dict[str, Any], dtype=jnp.float32, src: str = "") -> nn.Module:
  """The module that `description` (model.json of the directory `src`, named in errors)
  describes; `modeldir.ModelDirError` for an unknown kind or a config that does not fit it."""
  return modeldir.build(_KINDS, src, description, "teacher", dtype=dtype)


def save(dst: str, model: nn.Module, variables: Any,
         extra: Optional[Dict[str, Any]] = None) -> None:
  """Writes the teacher at `dst` completely or not at all (`extra` goes into model.json)."""
  modeldir.write(dst, {**model_description(model), **(extra or {})}, variables)


@dataclasses.dataclass(frozen=True)
class Teacher:
  """A loaded class-conditional teacher: its module, variables and description."""
  model: nn.Module
  variables: Any
  description: Dict[str, Any]

  def logits(self, tokens: jax.Array, labels: jax.Array, drop: jax.Array) -> jax.Array:
    """Eval-mode logits: tokens int32[B, h, w] (mask = V) -> float32[B, h*w, V]."""
    return self.model.apply(self.variables, tokens, labels, drop, deterministic=True)


def load(src: str, dtype=jnp.float32) -> Any:
  """Reads a teacher directory written by `save` (or by `python -m dimo_jax.convert`).

  A `meissonic` directory is a text-to-image teacher: `dimo_jax.text_to_image.TextTeacher`.
  """
  description = modeldir.read_description(src, "teacher")
  if description.get("kind") == "meissonic":
    from dimo_jax import text_to_image
    return text_to_image.load(src, dtype)
  model = build_model(description, dtype, src)
  variables = modeldir.restore(src, lambda: model.init(
      {"params": jax.random.PRNGKey(0)},
      jnp.zeros((1, model.seq_len), jnp.int32), jnp.zeros((1,), jnp.int32)))
  return Teacher(model, variables, description)
