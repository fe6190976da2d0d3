"""Converters from released teacher and tokenizer checkpoints to `dimo_jax.modeldir` directories.

  python -m dimo_jax.convert KIND --src SRC --dst DST
      [--num-heads 16] [--codebook-size 1024 | --num-classes 1000]   (halton-maskgit)
      [--config RELEASE.yaml]                                        (maskbit, maskbit-tokenizer)

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
maskbit              maskbit_generator_*.bin --config maskbit_generator_*.yaml
                     (markweberdev/maskbit LFQBert)                 teachers.load
maskbit-tokenizer    maskbit_tokenizer_*.bin --config maskbit_tokenizer_*.yaml
                     (MaskBit's VQGAN+ with lookup-free quantization)  tokenizers.load

Every converter checks each key, shape and dtype of the source against the Flax module it
builds, and every value (no NaN or Inf), and stops with a `ConversionError` naming the file, the
key and what it expected and found; DST is written completely or not at all, and only ever
replaces a dimo_jax model directory: a DST that holds other files (another tool's model.json, or
a model directory with the user's files added), is being written by another conversion, is a
mount point, is, contains or lies inside SRC, or cannot be written (a read-only folder) is
refused (`modeldir.DestinationError`) before anything is read. No checkpoint is unpickled with
code execution (see common.py).
"""

import functools
import importlib
import inspect
import os
from typing import Callable, Tuple

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
    "maskbit": "dimo_jax.convert.maskbit:convert",
    "maskbit-tokenizer": "dimo_jax.convert.maskbit:convert_tokenizer",
}


def _convert_function(kind: str) -> Callable[..., None]:
  if kind not in CONVERTERS:
    raise ValueError(f"unknown conversion kind {kind!r}; known: {', '.join(sorted(CONVERTERS))}")
  module, name = CONVERTERS[kind].split(":")
  return getattr(importlib.import_module(module), name)


def options(kind: str) -> Tuple[str, ...]:
  """The keyword options (`num_heads`, ...) the converter of `kind` takes besides src and dst."""
  parameters = inspect.signature(_convert_function(kind)).parameters.values()
  return tuple(p.name for p in parameters if p.name not in ("src", "dst")
               and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))


def check_writable(dst: str) -> None:
  """Raises `modeldir.DestinationError` unless `dst` can be written: `modeldir.staged` creates
  a staging folder beside it (in the nearest existing folder of its path) and renames an
  existing `dst` away, which needs write access to both."""
  folder = os.path.dirname(os.path.abspath(dst))
  while not os.path.lexists(folder):
    folder = os.path.dirname(folder)
  if not os.path.isdir(folder):
    raise modeldir.DestinationError(f"{dst}: cannot be created, {folder} is not a folder")
  targets = [folder] + ([dst] if os.path.isdir(dst) else [])
  for target in targets:
    if not os.access(target, os.W_OK | os.X_OK):
      raise modeldir.DestinationError(f"{dst}: cannot write there, {target} is read-only or "
                                      "not writable by this user")


def converter(kind: str) -> Callable[..., None]:
  """The function `convert(src, dst, **options)` of `kind`, which first checks that `dst` may be
  written (`modeldir.check_destination`, with `src` kept out of reach, and `check_writable`),
  and holds `dst`'s lock from then on, so that a second conversion into it is refused before it
  reads anything."""
  convert = _convert_function(kind)

  @functools.wraps(convert)
  def checked(src: str, dst: str, **options) -> None:
    with modeldir.locked(dst):
      modeldir.check_destination(dst, sources=[src] + ([options["config"]]
                                                       if options.get("config") else []))
      check_writable(dst)
      convert(src, dst, **options)

  return checked
