"""Image tokenizers (VQGANs): a Flax module and its variables, read from a model directory.

A tokenizer directory is a `dimo_jax.modeldir` written by `python -m dimo_jax.convert`.
`model.json["kind"]` picks the Flax module; every kind offers
  encode(images float32[B, H, W, 3]) -> int32[B, h, w]
  decode(codes int32[B, h, w]) -> float32[B, H, W, 3]
in the value range of its release, `__call__(images)` = decode(encode(images)) (which creates
every parameter at init), and a `downsample_factor` property (H / h).
"""

import dataclasses
from typing import Any, Dict

import flax.linen as nn
import jax
import jax.numpy as jnp

from dimo_jax import modeldir

_KINDS = {
    "taming-vqgan": "dimo_jax.models.taming_vqgan:VQModel",
    "google-vqgan": "dimo_jax.models.google_vqgan:VQGAN",
    "diffusers-vq": "dimo_jax.models.diffusers_vq:VQModel",
    "maskbit-vqgan": "dimo_jax.models.maskbit_vqgan:ConvVQModel",
}
# kind -> the number of codes of its module (each names the field its release uses).
_CODEBOOK_SIZE = {"taming-vqgan": lambda model: model.n_embed,
                  "google-vqgan": lambda model: model.codebook_size,
                  "diffusers-vq": lambda model: model.num_vq_embeddings,
                  "maskbit-vqgan": lambda model: model.codebook_size}


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

  @property
  def codebook_size(self) -> int:
    return _CODEBOOK_SIZE[self.description["kind"]](self.model)


def check_pairing(tokenizer: Tokenizer, src: str, codebook_size: int, teacher: str) -> None:
  """Refuses the tokenizer of `src` for a teacher (directory `teacher`) of `codebook_size`
  codes when its codebook differs: it would decode the teacher's codes to other pictures, and
  codes past its codebook to NaN (black) images."""
  if tokenizer.codebook_size != codebook_size:
    raise modeldir.ModelDirError(
        f"{src}: expected a tokenizer of the {codebook_size} codes of the teacher {teacher}, "
        f"found one of {tokenizer.codebook_size} codes; give the tokenizer the teacher was "
        "trained with")


def load(src: str, dtype=jnp.float32) -> Tokenizer:
  """Reads a tokenizer directory written by `python -m dimo_jax.convert`, or the VQ-VAE inside
  a `meissonic` model directory (checked to have the transformer's codebook)."""
  description = modeldir.read_description(src, "tokenizer")
  if description["kind"] != "meissonic":
    return _load(src, description, dtype)
  vqvae = modeldir.part_path(src, description, "vqvae", "VQ-VAE")
  vq_description = modeldir.read_description(vqvae, "tokenizer")
  tokenizer = _load(vqvae, vq_description, dtype)
  codebook_size = description["config"].get("codebook_size")
  if codebook_size is not None:
    check_pairing(tokenizer, vqvae, codebook_size, src)
  return tokenizer


def _load(src: str, description: Dict[str, Any], dtype) -> Tokenizer:
  model = modeldir.build(_KINDS, src, description, "tokenizer", dtype=dtype)
  variables = modeldir.restore(src, lambda: model.init(
      jax.random.PRNGKey(0),
      jnp.zeros((1, model.downsample_factor, model.downsample_factor, 3), jnp.float32)))
  return Tokenizer(model, variables, description)
