"""taming-transformers VQGAN (folder with model.yaml + last.ckpt) -> a tokenizer directory.

  python -m dimo_jax.convert taming-vqgan --src SRC --dst DST

SRC holds `model.yaml` (the taming config: `model.params.ddconfig`, `n_embed`, `embed_dim`)
and `last.ckpt` (a Lightning checkpoint; its `state_dict` is read). The checkpoint's `loss.*`
entries (discriminator, LPIPS) are training-only and skipped; every other key must be a
parameter of `dimo_jax.models.taming_vqgan.VQModel` and every parameter must be present, with
the shape the yaml implies. The key mapping is documented in that module.
"""

import os
import re
from typing import Any, Tuple

import jax
import jax.numpy as jnp

from dimo_jax import tokenizers
from dimo_jax.convert import common
from dimo_jax.convert.common import ConversionError
from dimo_jax.models.taming_vqgan import VQModel

CONFIG_FILE = "model.yaml"
CHECKPOINT_FILE = "last.ckpt"
IGNORED_PREFIX = "loss."

_REQUIRED_DDCONFIG = ("ch", "out_ch", "ch_mult", "num_res_blocks", "attn_resolutions",
                      "in_channels", "resolution", "z_channels")


def model_from_config(path: str) -> VQModel:
  """The VQModel a taming yaml describes; ConversionError naming the file and the missing key."""
  import yaml  # conversion-only dependency (the [convert] extra)
  with open(path) as f:
    try:
      config = yaml.safe_load(f)
    except yaml.YAMLError as e:
      raise ConversionError(f"{path} is not valid YAML: {e}") from e

  def get(node: Any, dotted: str) -> Any:
    for part in dotted.split("."):
      if not isinstance(node, dict) or part not in node:
        raise ConversionError(f"{path}: missing key {dotted!r}")
      node = node[part]
    return node

  ddconfig = get(config, "model.params.ddconfig")
  params = config["model"]["params"]
  if not isinstance(ddconfig, dict):
    raise ConversionError(f"{path}: model.params.ddconfig is a {type(ddconfig).__name__}, "
                          "expected a mapping")
  missing = [k for k in _REQUIRED_DDCONFIG if k not in ddconfig]
  if missing:
    raise ConversionError(f"{path}: missing keys {['model.params.ddconfig.' + k for k in missing]}")
  for key in ("n_embed", "embed_dim"):
    get(config, f"model.params.{key}")
  # Options taming's Encoder/Decoder/VQModel accept that would change the computation: refuse
  # them rather than convert into a different network. Other ddconfig keys are ignored upstream.
  if ddconfig.get("double_z", True):  # taming's Encoder defaults to True
    raise ConversionError(f"{path}: model.params.ddconfig.double_z must be false for a VQGAN "
                          f"(found {ddconfig.get('double_z', 'nothing, i.e. the default true')})")
  if not ddconfig.get("resamp_with_conv", True):
    raise ConversionError(f"{path}: model.params.ddconfig.resamp_with_conv false is not supported")
  if ddconfig.get("give_pre_end", False):
    raise ConversionError(f"{path}: model.params.ddconfig.give_pre_end true is not supported")
  if params.get("remap") is not None:
    raise ConversionError(f"{path}: model.params.remap (a remapped codebook) is not supported")

  def positive(dotted: str) -> int:
    return common.config_int(path, dotted, get(config, dotted))

  def ints(dotted: str, allow_empty: bool = False) -> Tuple[int, ...]:
    return common.config_ints(path, dotted, get(config, dotted), allow_empty=allow_empty)

  dropout = ddconfig.get("dropout", 0.0)
  if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
    raise ConversionError(f"{path}: key 'model.params.ddconfig.dropout' must be a number in "
                          f"[0, 1), found {dropout!r}")
  d = "model.params.ddconfig."
  return VQModel(
      ch=positive(d + "ch"), out_ch=positive(d + "out_ch"), ch_mult=ints(d + "ch_mult"),
      num_res_blocks=positive(d + "num_res_blocks"),
      attn_resolutions=ints(d + "attn_resolutions", allow_empty=True),
      in_channels=positive(d + "in_channels"), resolution=positive(d + "resolution"),
      z_channels=positive(d + "z_channels"), n_embed=positive("model.params.n_embed"),
      embed_dim=positive("model.params.embed_dim"), dropout=float(dropout), double_z=False)


def torch_name(path: str) -> str:
  """Flax path -> torch key (down_0/block_1/conv1/kernel -> down.0.block.1.conv1.weight)."""
  *modules, leaf = path.split("/")
  if modules == ["quantize"]:
    return "quantize.embedding.weight"
  parts = []
  for i, name in enumerate(modules):
    match = re.fullmatch(r"(down|up|block|attn)_(\d+)", name)
    inside_mid = i > 0 and modules[i - 1] == "mid"
    parts.append(f"{match[1]}.{match[2]}" if match and not inside_mid else name)
  return ".".join(parts + ["bias" if leaf == "bias" else "weight"])


def _torch_shape(leaf: str, shape: Tuple[int, ...]) -> Tuple[int, ...]:
  """The torch shape of a flax parameter (conv kernels HWIO are OIHW there)."""
  return (shape[3], shape[2], shape[0], shape[1]) if leaf == "kernel" else tuple(shape)


def convert(src: str, dst: str) -> None:
  """Converts the taming VQGAN in folder `src` into a tokenizer directory at `dst`."""
  config_path = common.require_file(os.path.join(src, CONFIG_FILE),
                                    "the taming-transformers config")
  ckpt_path = common.require_file(os.path.join(src, CHECKPOINT_FILE),
                                  "the taming-transformers Lightning checkpoint")
  model = model_from_config(config_path)
  state = {k: v for k, v in common.load_torch_state(ckpt_path, "state_dict").items()
           if not k.startswith(IGNORED_PREFIX)}

  f = model.downsample_factor
  images = jnp.zeros((1, f, f, model.in_channels), jnp.float32)
  abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), images)
  expected = common.flatten(abstract["params"])
  params = common.params_from_torch(
      ckpt_path, state, expected, torch_name, _torch_shape,
      lambda leaf, array: array.transpose(2, 3, 1, 0) if leaf == "kernel" else array)
  tokenizers.save(dst, model, {"params": params},
                  extra={"source": {"format": "taming-transformers",
                                    "config": os.path.abspath(config_path),
                                    "checkpoint": os.path.abspath(ckpt_path)}})
