"""diffusers VQModel (Meissonic's `vqvae/` folder) -> a tokenizer directory.

  python -m dimo_jax.convert diffusers-vq --src SRC --dst DST

SRC is a diffusers `VQModel` folder, `config.json` + `diffusion_pytorch_model.safetensors` as
`save_pretrained` writes them (Meissonic's release root, whose `vqvae/` holds them, works too).
Reading needs `safetensors`, not PyTorch. Every tensor of the file must be a parameter of
`dimo_jax.models.diffusers_vq.VQModel` and every parameter must be there, with the shape the
config implies; config values that would make diffusers compute something this module does not
(other block types, `norm_type` "spatial", another activation) are refused. The key mapping is
documented in that module. model.json records `value_range` [0, 1], Meissonic's image range.
"""

import os
import re
from typing import Any, Dict, Tuple

import jax
import jax.numpy as jnp

from dimo_jax import tokenizers
from dimo_jax.convert import common
from dimo_jax.convert.common import ConversionError
from dimo_jax.models.diffusers_vq import VQModel

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
RELEASE_SUBFOLDER = "vqvae"
# Meissonic's pipeline decodes to [0, 1] (it clips there) and encodes unnormalised [0, 1] images.
VALUE_RANGE = (0.0, 1.0)

# diffusers.VQModel.__init__ defaults, which apply to the keys a config.json leaves out.
_DEFAULTS = {
    "in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D"], "block_out_channels": [64], "layers_per_block": 1,
    "act_fn": "silu", "latent_channels": 3, "num_vq_embeddings": 256, "norm_num_groups": 32,
    "vq_embed_dim": None, "norm_type": "group", "mid_block_add_attention": True,
}
_INDEXED = r"(down_blocks|up_blocks|resnets|attentions|downsamplers|upsamplers|to_out)_(\d+)"


def model_from_config(path: str) -> VQModel:
  """The VQModel a diffusers config.json describes; ConversionError naming the file and key."""
  config = common.read_json(path)
  if not isinstance(config, dict):
    raise ConversionError(f"{path}: expected a JSON object, found {type(config).__name__}")
  if config.get("_class_name", "VQModel") != "VQModel":
    raise ConversionError(f"{path}: _class_name is {config['_class_name']!r}, expected 'VQModel'")
  c = {**_DEFAULTS, **config}

  def refuse(key: str, expected: str) -> None:
    raise ConversionError(f"{path}: {key} {c[key]!r} is not supported (expected {expected})")

  def positive(key: str) -> int:
    return common.config_int(path, key, c[key])

  widths = common.config_ints(path, "block_out_channels", c["block_out_channels"])
  levels = len(widths)
  for key, block in (("down_block_types", "DownEncoderBlock2D"),
                     ("up_block_types", "UpDecoderBlock2D")):
    if not isinstance(c[key], list) or c[key] != [block] * levels:
      refuse(key, f"{levels} x {block!r}, one per block_out_channels entry")
  if c["act_fn"] not in ("silu", "swish"):
    refuse("act_fn", "'silu'")
  if c["norm_type"] != "group":
    refuse("norm_type", "'group'; the spatial norm is not implemented")
  groups = positive("norm_num_groups")
  if any(w % groups for w in widths):
    refuse("block_out_channels", f"a list of multiples of norm_num_groups {groups}")
  if not isinstance(c["mid_block_add_attention"], bool):
    refuse("mid_block_add_attention", "true or false")
  latent_channels = positive("latent_channels")
  return VQModel(
      in_channels=positive("in_channels"), out_channels=positive("out_channels"),
      block_out_channels=widths, layers_per_block=positive("layers_per_block"),
      latent_channels=latent_channels, num_vq_embeddings=positive("num_vq_embeddings"),
      vq_embed_dim=latent_channels if c["vq_embed_dim"] is None else positive("vq_embed_dim"),
      norm_num_groups=groups, mid_block_add_attention=c["mid_block_add_attention"])


def torch_name(path: str) -> str:
  """Flax path -> diffusers key (decoder/up_blocks_1/resnets_0/conv1/kernel ->
  decoder.up_blocks.1.resnets.0.conv1.weight)."""
  *modules, leaf = path.split("/")
  if modules == ["quantize"]:
    return "quantize.embedding.weight"
  parts = [re.sub(rf"^{_INDEXED}$", r"\1.\2", name) for name in modules]
  return ".".join(parts + ["bias" if leaf == "bias" else "weight"])


def _release_files(folder: str) -> Tuple[str, str]:
  """(config.json, safetensors) of a VQModel folder, or of the `vqvae/` of a release root."""
  if (not os.path.isfile(os.path.join(folder, CONFIG_FILE))
      and os.path.isdir(os.path.join(folder, RELEASE_SUBFOLDER))):
    folder = os.path.join(folder, RELEASE_SUBFOLDER)
  return (common.require_file(os.path.join(folder, CONFIG_FILE), "the diffusers VQModel config"),
          common.require_file(os.path.join(folder, WEIGHTS_FILE), "the diffusers VQModel weights"))


def vqvae_from_folder(folder: str) -> Tuple[VQModel, Dict[str, Any]]:
  """The Flax VQModel and its variables {"params": ...} from a diffusers VQModel folder."""
  config_path, weights_path = _release_files(folder)
  model = model_from_config(config_path)
  state = common.load_safetensors(weights_path, "the diffusers safetensors weights")
  f = model.downsample_factor
  images = jnp.zeros((1, f, f, model.in_channels), jnp.float32)
  abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), images)
  params = common.params_from_torch(weights_path, state, common.flatten(abstract["params"]),
                                    torch_name, common.torch_shape, common.torch_to_flax)
  return model, {"params": params}


def convert(src: str, dst: str) -> None:
  """Converts the diffusers VQModel in folder `src` into a tokenizer directory at `dst`."""
  config_path, weights_path = _release_files(src)
  model, variables = vqvae_from_folder(src)
  tokenizers.save(dst, model, variables,
                  extra={"value_range": list(VALUE_RANGE),
                         "source": {"format": "diffusers",
                                    "config": os.path.abspath(config_path),
                                    "weights": os.path.abspath(weights_path)}})
