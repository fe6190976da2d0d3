"""Meissonic's release (diffusers layout, MeissonFlow/Meissonic) -> Flax modules and variables.

The release root holds `transformer/`, `vqvae/`, `text_encoder/`, `tokenizer/`, `scheduler/`.
This file reads `transformer/`: `config.json` (the `Transformer2DModel` arguments) and
`diffusion_pytorch_model.safetensors`, or the shards a `diffusion_pytorch_model.safetensors.index.json`
lists. Reading needs `safetensors`, not PyTorch. Every tensor must be a parameter of
`dimo_jax.models.meissonic.MeissonicTransformer` and every parameter must be there with the shape
the config implies; the key mapping is documented in that module.

Config values that would make the release's code compute something the Flax module does not are
refused: `guidance_embeds` true (a guidance embedding), `patch_size` other than 1.
`in_channels` is stored by the release but unused by its forward, so it is ignored.
"""

import json
import os
import re
from typing import Any, Dict, Iterable, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from dimo_jax.convert import common
from dimo_jax.convert.common import ConversionError
from dimo_jax.models.meissonic import MeissonicTransformer

TRANSFORMER_SUBFOLDER = "transformer"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
INDEX_FILE = WEIGHTS_FILE + ".index.json"

# Transformer2DModel.__init__ defaults, for keys a config.json leaves out.
_DEFAULTS = {
    "patch_size": 1, "num_layers": 19, "num_single_layers": 38, "attention_head_dim": 128,
    "num_attention_heads": 24, "joint_attention_dim": 4096, "pooled_projection_dim": 768,
    "guidance_embeds": False, "axes_dims_rope": [16, 56, 56], "vocab_size": 8256,
    "codebook_size": 8192, "downsample": False, "upsample": False,
}
_INT_FIELDS = ("num_layers", "num_single_layers", "attention_head_dim", "num_attention_heads",
               "joint_attention_dim", "pooled_projection_dim", "vocab_size", "codebook_size")
# The torch ModuleLists; other names ending in a number (linear_1) are not indices.
_INDEXED = re.compile(r"^(transformer_blocks|single_transformer_blocks|to_out|net)_(\d+)$")
# Flax leaf -> torch leaf.
_LEAF_NAMES = {"scale": "weight", "embedding": "weight", "kernel": "weight", "bias": "bias"}
_TRANSPOSED_CONV = "up_block/upsample/conv/kernel"


def model_from_config(path: str) -> MeissonicTransformer:
  """The MeissonicTransformer a `transformer/config.json` describes (ConversionError if not)."""
  with open(path) as f:
    try:
      config = json.load(f)
    except json.JSONDecodeError as e:
      raise ConversionError(f"{path} is not valid JSON: {e}") from e
  if not isinstance(config, dict):
    raise ConversionError(f"{path}: expected a JSON object, found {type(config).__name__}")
  c = {**_DEFAULTS, **config}
  if c["guidance_embeds"]:
    raise ConversionError(f"{path}: guidance_embeds true is not supported (the release has false)")
  if c["patch_size"] != 1:
    raise ConversionError(f"{path}: patch_size {c['patch_size']!r} is not supported (expected 1)")
  try:
    fields = {k: int(c[k]) for k in _INT_FIELDS}
    axes = tuple(int(a) for a in c["axes_dims_rope"])
  except (TypeError, ValueError) as e:
    raise ConversionError(f"{path}: a config value has the wrong type: {e}") from e
  width = fields["num_attention_heads"] * fields["attention_head_dim"]
  if sum(axes) != fields["attention_head_dim"] or any(a % 2 for a in axes):
    raise ConversionError(f"{path}: axes_dims_rope {list(axes)} must be even and sum to "
                          f"attention_head_dim {fields['attention_head_dim']}")
  if fields["pooled_projection_dim"] != width:
    raise ConversionError(
        f"{path}: pooled_projection_dim {fields['pooled_projection_dim']} must equal "
        f"num_attention_heads * attention_head_dim = {width} (time_text_embed projects "
        "cond_embed's output with it)")
  if fields["vocab_size"] <= fields["codebook_size"]:
    raise ConversionError(f"{path}: vocab_size {fields['vocab_size']} leaves no mask id above "
                          f"codebook_size {fields['codebook_size']}")
  return MeissonicTransformer(**fields, axes_dims_rope=axes, downsample=bool(c["downsample"]),
                              upsample=bool(c["upsample"]))


def _weight_files(folder: str) -> Tuple[str, Iterable[str]]:
  """(the file named in errors, the safetensors files holding the weights)."""
  index = os.path.join(folder, INDEX_FILE)
  if os.path.isfile(index):
    with open(index) as f:
      try:
        weight_map = json.load(f)["weight_map"]
      except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ConversionError(f"{index}: expected JSON with a 'weight_map' ({e})") from e
    shards = sorted(set(weight_map.values()))
    return index, [common.require_file(os.path.join(folder, s), f"a shard {index} lists")
                   for s in shards]
  single = common.require_file(os.path.join(folder, WEIGHTS_FILE),
                               f"the transformer weights (or {INDEX_FILE} and its shards)")
  return single, [single]


def load_safetensors(paths: Iterable[str]) -> Dict[str, np.ndarray]:
  """The tensors of every shard in `paths`, as float32 numpy arrays; a key in two is refused."""
  state = {}
  for path in paths:
    for name, array in common.load_safetensors(path, "a transformer weights shard").items():
      if name in state:
        raise ConversionError(f"{path}: key {name!r} is also in another shard")
      state[name] = array
  return state


def torch_name(path: str) -> str:
  """Flax path -> torch key (transformer_blocks_0/ff/net_0/proj/kernel ->
  transformer_blocks.0.ff.net.0.proj.weight)."""
  *modules, leaf = path.split("/")
  parts = []
  for name in modules:
    match = _INDEXED.match(name)
    parts.extend([match[1], match[2]] if match else [name])
  return ".".join(parts + [_LEAF_NAMES[leaf]])


def _torch_shape(path: str, shape: Tuple[int, ...]) -> Tuple[int, ...]:
  """The torch shape of a Flax parameter (linear [in, out] is [out, in] there, conv kernels
  HWIO are OIHW, the transposed conv's HWIO is IOHW)."""
  if path == _TRANSPOSED_CONV:
    return (shape[2], shape[3], shape[0], shape[1])
  if path.endswith("/kernel"):
    return (shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4 else tuple(shape[::-1])
  return tuple(shape)


def _to_flax(path: str, array: np.ndarray) -> np.ndarray:
  if path == _TRANSPOSED_CONV:
    return array.transpose(2, 3, 0, 1)
  if path.endswith("/kernel"):
    return array.transpose(2, 3, 1, 0) if array.ndim == 4 else array.T
  return array


def params_from_state(path: str, model: MeissonicTransformer,
                      state: Dict[str, np.ndarray]) -> Dict[str, Any]:
  """The Flax parameter tree of `model` from a torch state dict, every key and shape checked."""
  grid = 2 if model.downsample else 1
  abstract = jax.eval_shape(
      model.init, jax.random.PRNGKey(0), jnp.zeros((1, grid, grid), jnp.int32),
      jnp.zeros((1, 1, model.joint_attention_dim)), jnp.zeros((1, model.pooled_projection_dim)),
      jnp.zeros((1, 5)), jnp.zeros((1,)))
  expected = common.flatten(abstract["params"])
  names = {torch_name(p): p for p in expected}
  common.check_keys(path, names, state)
  params = {}
  for name, flax_path in names.items():
    array = common.check_shape(path, name, state[name],
                               _torch_shape(flax_path, expected[flax_path].shape))
    params[flax_path] = _to_flax(flax_path, array)
  return common.unflatten(params)


def transformer_from_folder(folder: str) -> Tuple[MeissonicTransformer, Dict[str, Any]]:
  """The Flax transformer and its variables {"params": ...} from Meissonic's `transformer/`
  folder (or the release root holding it)."""
  if (not os.path.isfile(os.path.join(folder, CONFIG_FILE))
      and os.path.isdir(os.path.join(folder, TRANSFORMER_SUBFOLDER))):
    folder = os.path.join(folder, TRANSFORMER_SUBFOLDER)
  config_path = common.require_file(os.path.join(folder, CONFIG_FILE),
                                    "the Meissonic transformer config")
  model = model_from_config(config_path)
  weights_path, files = _weight_files(folder)
  state = load_safetensors(files)
  return model, {"params": params_from_state(weights_path, model, state)}
