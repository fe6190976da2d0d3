"""Image tokenizers (VQGANs): a Flax module and its variables, read from a model directory.

A tokenizer directory is a `dimo_jax.modeldir` written by `python -m dimo_jax.convert`.
`model.json["kind"]` picks the Flax module; every kind offers
  encode(images float32[B, H, W, 3]) -> int32[B, h, w]
  decode(codes int32[B, h, w]) -> float32[B, H, W, 3]
in the value range of its release, `__call__(images)` = decode(encode(images)) (which creates
every parameter at init), and a `downsample_factor` property (H / h).
"""

import dataclasses
import os
from typing import Any, Dict

import flax.linen as nn
import jax
import jax.numpy as jnp

from dimo_jax import modeldir

_KINDS = {
    "taming-vqgan": "dimo_jax.models.taming_vqgan:VQModel",
    "google-vqgan": "dimo_jax.models.google_vqgan:VQGAN",
    "diffusers-vq": "dimo_jax.models.diffusers_vq:VQModel",
}


def model_description(model: nn.Module) -> Dict[str, Any]:
  return modeldir.describe(_KINDS, model, "tokenizer")


def save(dst: str, model: nn.Module, variables: Any, extra: Dict[str, Any] = None) -> None:
  """Writes the tokenizer at `dst` completely or not at all (`extra` goes into model.json)."""
  modeldir.write(dst, {**model_description(model), **(extra or {})}, variables)


@dataclasses.dataclass(frozen=True)
class Tokenizer:
  """A loaded tokenizer: its module, variables and description; jitted encode and decode."""
  model: nn.Module
  variables: Any
  description: Dict[str, Any]

  def __post_init__(self):
    object.__setattr__(self, "_encode", jax.jit(
        lambda v, x: self.model.apply(v, x, method=self.model.encode)))
    object.__setattr__(self, "_decode", jax.jit(
        lambda v, c: self.model.apply(v, c, method=self.model.decode)))

  def encode(self, images: jax.Array) -> jax.Array:
    """float32[B, H, W, 3] -> int32[B, H/f, W/f] codebook ids."""
    return self._encode(self.variables, images)

  def decode(self, codes: jax.Array) -> jax.Array:
    """int32[B, h, w] codebook ids -> float32[B, h*f, w*f, 3]."""
    return self._decode(self.variables, codes)


def load(src: str, dtype=jnp.float32) -> Tokenizer:
  """Reads a tokenizer directory written by `python -m dimo_jax.convert`, or the VQ-VAE inside
  a `meissonic` model directory."""
  description = modeldir.read_description(src, "tokenizer")
  if description.get("kind") == "meissonic":
    return load(os.path.join(src, description["vqvae"]), dtype)
  cls = modeldir.module_class(_KINDS, description.get("kind"), "tokenizer")
  model = cls(**description["config"], dtype=dtype)
  f = model.downsample_factor
  variables = modeldir.restore(src, lambda: model.init(
      jax.random.PRNGKey(0), jnp.zeros((1, f, f, 3), jnp.float32)))
  return Tokenizer(model, variables, description)
