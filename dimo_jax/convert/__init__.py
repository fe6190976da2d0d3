"""Converters from released teacher and tokenizer checkpoints to `dimo_jax.modeldir` directories.

  python -m dimo_jax.convert KIND --src SRC --dst DST
      [--num-heads 16] [--codebook-size 1024 | --num-classes 1000]   (halton-maskgit)

KIND                 SRC                                            DST loads with
halton-maskgit       .pth with model_state_dict (valeoai/Halton-MaskGIT v1.0)   teachers.load
taming-vqgan         folder with model.yaml + last.ckpt (taming-transformers)   tokenizers.load
google-maskgit       flax msgpack maskgit_imagenet256_checkpoint                teachers.load
google-vqgan         flax msgpack tokenizer_imagenet256_checkpoint              tokenizers.load
diffusers-vq         folder with config.json + diffusion_pytorch_model.safetensors
                     (diffusers VQModel: Meissonic's vqvae/, or the release root)  tokenizers.load
meissonic            Meissonic release root (transformer/, vqvae/, text_encoder/, tokenizer/,
                     scheduler/; diffusers layout) [--resolution 1024]   teachers.load, tokenizers.load
fid-inception        pytorch-fid pt_inception-2015-12-05-6726825d.pth (state dict)   models.fid_inception.load
clip                 folder with config.json + model.safetensors + vocab.json + merges.txt
                     (transformers CLIPModel, for CLIP score)       convert.clip.load_clip

Every converter checks each key and shape of the source against the Flax module it builds and
stops with a `ConversionError` naming the file, the key and both shapes; DST is written
completely or not at all, and only ever replaces a model directory: a DST that holds other files,
is a mount point, or is, contains or lies inside SRC is refused (`modeldir.DestinationError`)
before anything is read.
"""

import functools
import importlib
from typing import Callable

from dimo_jax import modeldir

# kind -> "module:function"; a converter's heavy imports (torch, yaml) load only when it runs.
CONVERTERS = {
    "halton-maskgit": "dimo_jax.convert.halton_maskgit:convert",
    "taming-vqgan": "dimo_jax.convert.taming_vqgan:convert",
    "google-maskgit": "dimo_jax.convert.google_maskgit:convert",
    "google-vqgan": "dimo_jax.convert.google_vqgan:convert",
    "diffusers-vq": "dimo_jax.convert.diffusers_vq:convert",
    "meissonic": "dimo_jax.convert.meissonic:convert",
    "fid-inception": "dimo_jax.convert.fid_inception:convert",
    "clip": "dimo_jax.convert.clip:convert",
}


def converter(kind: str) -> Callable[..., None]:
  """The function `convert(src, dst, **options)` of `kind`, which first checks that `dst` may be
  written (`modeldir.check_destination`, with `src` kept out of reach)."""
  if kind not in CONVERTERS:
    raise ValueError(f"unknown conversion kind {kind!r}; known: {', '.join(sorted(CONVERTERS))}")
  module, name = CONVERTERS[kind].split(":")
  convert = getattr(importlib.import_module(module), name)

  @functools.wraps(convert)
  def checked(src: str, dst: str, **options) -> None:
    modeldir.check_destination(dst, sources=[src])
    convert(src, dst, **options)

  return checked
