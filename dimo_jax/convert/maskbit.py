"""MaskBit releases (markweberdev/maskbit) -> teacher and tokenizer directories.

  python -m dimo_jax.convert maskbit --src maskbit_generator_14bit.bin \
      --config maskbit_generator_14bit.yaml --dst checkpoints/maskbit
  python -m dimo_jax.convert maskbit-tokenizer --src maskbit_tokenizer_14bit.bin \
      --config maskbit_tokenizer_14bit.yaml --dst checkpoints/maskbit_tokenizer

Each release file is a flat `torch.save` state dict (no prefix); the architecture is described
only by the repository's YAML (configs/generator/*.yaml, configs/tokenizer/*.yaml), hence
--config. Read from it:

  generator  model.mlm_model: model_cls (must be lfq_bert), hidden_dim, depth, heads, mlp_dim,
             dropout, codebook_splits, use_prenorm, and the sampler's guidance_scale,
             guidance_annealing, scale_pow, randomize_temperature, softmax_temperature,
             num_steps, gen_mask_schedule_strategy (kept in model.json as `release_sampler`);
             model.vq_model: token_size (the bits; the YAML's `codebook_size` is wrong for
             lookup-free quantization, and the release's scripts overwrite it with
             2^token_size, as we do) and quantizer_type (must be lookup-free).
  tokenizer  model.vq_model: token_size, hidden_channels, channel_mult, num_resolutions,
             num_res_blocks (num_res_blocks_decoder), sample_with_conv, num_channels.

The class count and the number of positions come from the weights (`class_emb.weight` rows - 1,
`pos_emb` length - 1). The released generator files store the input projection as
`token_emb.*`, which both upstream loaders rename to `input_proj.*`; either spelling is read (not
both). Buffers the modules derive (`bits_to_indices`, the quantizer's `codebook`) are checked
against what they must hold and not stored. The key mapping is in models/maskbit.py and
models/maskbit_vqgan.py.
"""

import os
import re
from typing import Any, Dict

import jax
import jax.numpy as jnp
import numpy as np

from dimo_jax import teachers, tokenizers
from dimo_jax.convert import common
from dimo_jax.convert.common import ConversionError
from dimo_jax.models import maskbit
from dimo_jax.models.maskbit_vqgan import ConvVQModel

# What the upstream sampler reads from model.mlm_model, kept in model.json as the release's.
SAMPLER_KEYS = ("guidance_scale", "guidance_annealing", "scale_pow", "randomize_temperature",
                "softmax_temperature", "num_steps", "gen_mask_schedule_strategy")
OLD_INPUT_PROJ = "token_emb."  # the released generator files' spelling of input_proj.


def read_yaml(path: str) -> Dict[str, Any]:
  common.require_file(path, "a MaskBit YAML config (configs/generator or configs/tokenizer)")
  import yaml  # conversion-only dependency (the [convert] extra)
  with open(path) as f:
    try:
      config = yaml.safe_load(f)
    except yaml.YAMLError as e:
      raise ConversionError(f"{path} is not valid YAML: {e}") from e
  if not isinstance(config, dict):
    raise ConversionError(f"{path}: expected a YAML mapping, found {type(config).__name__}")
  return config


def _get(path: str, config: Dict[str, Any], dotted: str, default: Any = KeyError) -> Any:
  node = config
  for part in dotted.split("."):
    if not isinstance(node, dict) or part not in node:
      if default is not KeyError:
        return default
      raise ConversionError(f"{path}: missing key {dotted!r}")
    node = node[part]
  return node


def _lfq_bits(path: str, config: Dict[str, Any]) -> int:
  quantizer = _get(path, config, "model.vq_model.quantizer_type")
  if quantizer != "lookup-free":
    raise ConversionError(f"{path}: key 'model.vq_model.quantizer_type' must be 'lookup-free' "
                          f"(MaskBit's bit tokens), found {quantizer!r}")
  return common.config_int(path, "model.vq_model.token_size",
                           _get(path, config, "model.vq_model.token_size"))


def _bool(path: str, key: str, value: Any) -> bool:
  if not isinstance(value, bool):
    raise ConversionError(f"{path}: key {key!r} must be true or false, found {value!r}")
  return value


def _check_bit_buffer(path: str, state: Dict[str, np.ndarray], key: str, bits: int) -> None:
  """`key` (optional) must hold 2^0 .. 2^(bits-1), the buffer the module derives."""
  if key in state and not np.array_equal(np.asarray(state[key]).ravel(), 2 ** np.arange(bits)):
    raise ConversionError(f"{path}: key {key!r} holds {np.asarray(state[key]).ravel()[:8]}, "
                          f"expected the powers 2^0 .. 2^{bits - 1}")


def generator_from_state(path: str, config_path: str, config: Dict[str, Any],
                         state: Dict[str, np.ndarray]) -> maskbit.LFQBert:
  """The LFQBert of the YAML `config` (read from `config_path`) with the weights' sizes."""
  mlm = "model.mlm_model."
  model_cls = _get(config_path, config, mlm + "model_cls")
  if model_cls != "lfq_bert":
    raise ConversionError(f"{config_path}: key 'model.mlm_model.model_cls' must be 'lfq_bert' "
                          f"(MaskBit's bit-token generator), found {model_cls!r}")
  bits = _lfq_bits(config_path, config)
  ints = {key: common.config_int(config_path, mlm + key, _get(config_path, config, mlm + key))
          for key in ("hidden_dim", "depth", "heads", "mlp_dim", "codebook_splits")}
  if bits % ints["codebook_splits"]:
    raise ConversionError(f"{config_path}: model.vq_model.token_size {bits} is not divisible by "
                          f"model.mlm_model.codebook_splits {ints['codebook_splits']}")
  if ints["hidden_dim"] % ints["heads"]:
    raise ConversionError(f"{config_path}: model.mlm_model.hidden_dim {ints['hidden_dim']} is "
                          f"not divisible by model.mlm_model.heads {ints['heads']}")
  dropout = _get(config_path, config, mlm + "dropout", 0.1)
  if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
    raise ConversionError(f"{config_path}: key 'model.mlm_model.dropout' must be a number in "
                          f"[0, 1), found {dropout!r}")
  prenorm = _bool(config_path, mlm + "use_prenorm",
                  _get(config_path, config, mlm + "use_prenorm", False))
  for key, ndim in (("class_emb.weight", 2), ("pos_emb", 3)):
    if key not in state or state[key].ndim != ndim:
      found = "missing" if key not in state else f"of shape {tuple(state[key].shape)}"
      raise ConversionError(f"{path}: key {key!r} is {found}, expected {ndim} dimensions (the "
                            "class count and positions are read from it)")
  return maskbit.LFQBert(
      codebook_bits=bits, codebook_splits=ints["codebook_splits"],
      num_positions=state["pos_emb"].shape[1] - 1,
      num_classes=state["class_emb.weight"].shape[0] - 1,
      hidden_dim=ints["hidden_dim"], depth=ints["depth"], num_heads=ints["heads"],
      mlp_dim=ints["mlp_dim"], dropout=float(dropout), use_prenorm=prenorm)


def generator_torch_name(path: str) -> str:
  """Flax path -> the release's key (module docstring of models/maskbit.py)."""
  *modules, leaf = path.split("/")
  suffix = {"kernel": "weight", "scale": "weight", "embedding": "weight"}.get(leaf, leaf)
  if not modules:
    return leaf  # pos_emb
  if modules[0] == "transformer":
    _, layer, block, *rest = modules
    head = f"transformer.layers.{layer.removeprefix('layers_')}.{0 if block == 'attn' else 1}"
    if rest == ["mha", "in_proj"]:
      return f"{head}.mha.in_proj_{suffix}"
    name = ".".join(rest).replace("net_", "net.")
    return f"{head}.{name}.{suffix}"
  if modules[0] == "first_layer":
    return f"first_layer.0.{suffix}"
  module = re.sub(r"_(\d+)$", r".\1", modules[0])  # last_layer_2 -> last_layer.2
  return f"{module}.{suffix}"


def _rename_input_proj(path: str, state: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
  old = [k for k in state if k.startswith(OLD_INPUT_PROJ)]
  if old and any(k.startswith("input_proj.") for k in state):
    raise ConversionError(f"{path}: holds both {old[0]!r} and an input_proj.* key; the release "
                          "spells the input projection one way or the other")
  return {("input_proj." + k[len(OLD_INPUT_PROJ):] if k in old else k): v
          for k, v in state.items()}


def convert(src: str, dst: str, config: str = None) -> None:
  """Converts a MaskBit generator `.bin` (with its YAML `config`) into a teacher directory."""
  if config is None:
    raise ConversionError("maskbit: --config is required (the release's "
                          "configs/generator/maskbit_generator_*.yaml)")
  state = _rename_input_proj(src, common.load_torch_state(src, what="a MaskBit generator .bin"))
  yaml_config = read_yaml(config)
  model = generator_from_state(src, config, yaml_config, state)
  _check_bit_buffer(src, state, "bits_to_indices", model.bits_per_split)
  state.pop("bits_to_indices", None)
  abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                            jnp.zeros((1, model.seq_len), jnp.int32), jnp.zeros((1,), jnp.int32))
  params = common.params_from_torch(src, state, common.flatten(abstract["params"]),
                                    generator_torch_name, common.torch_shape, common.torch_to_flax)
  model = model.clone(emb_noise_scale=maskbit.embedding_rms({"params": params}))
  sampler = {key: _get(config, yaml_config, "model.mlm_model." + key, None)
             for key in SAMPLER_KEYS}
  teachers.save(dst, model, {"params": params},
                extra={"source": {"format": "maskbit", "checkpoint": os.path.abspath(src),
                                  "config": os.path.abspath(config)},
                       "release_sampler": sampler})


def tokenizer_from_config(path: str) -> ConvVQModel:
  config = read_yaml(path)
  vq = "model.vq_model."
  bits = _lfq_bits(path, config)
  mult = common.config_ints(path, vq + "channel_mult", _get(path, config, vq + "channel_mult"))
  levels = common.config_int(path, vq + "num_resolutions",
                             _get(path, config, vq + "num_resolutions"))
  if levels != len(mult):
    raise ConversionError(f"{path}: key 'model.vq_model.num_resolutions' is {levels}, but "
                          f"channel_mult {list(mult)} has {len(mult)} levels")
  hidden = common.config_int(path, vq + "hidden_channels",
                             _get(path, config, vq + "hidden_channels"))
  if any((hidden * m) % 32 for m in mult):
    raise ConversionError(f"{path}: hidden_channels {hidden} x channel_mult {list(mult)} must be "
                          "multiples of 32 (GroupNorm's 32 groups)")
  blocks = common.config_int(path, vq + "num_res_blocks", _get(path, config, vq + "num_res_blocks"))
  return ConvVQModel(
      token_size=bits, hidden_channels=hidden, channel_mult=mult, num_res_blocks=blocks,
      num_res_blocks_decoder=common.config_int(
          path, vq + "num_res_blocks_decoder",
          _get(path, config, vq + "num_res_blocks_decoder", blocks)),
      sample_with_conv=_bool(path, vq + "sample_with_conv",
                             _get(path, config, vq + "sample_with_conv", False)),
      num_channels=common.config_int(path, vq + "num_channels",
                                     _get(path, config, vq + "num_channels", 3)))


def tokenizer_torch_name(path: str) -> str:
  """encoder/down_2/res_blocks_1/conv1/kernel -> encoder.down.2.res_blocks.1.conv1.weight."""
  *modules, leaf = path.split("/")
  suffix = {"kernel": "weight", "scale": "weight"}.get(leaf, leaf)
  parts = [re.sub(r"^(down|up|res_blocks)_(\d+)$", r"\1.\2", m) for m in modules]
  return ".".join(parts + [suffix])


def convert_tokenizer(src: str, dst: str, config: str = None) -> None:
  """Converts a MaskBit tokenizer `.bin` (with its YAML `config`) into a tokenizer directory."""
  if config is None:
    raise ConversionError("maskbit-tokenizer: --config is required (the release's "
                          "configs/tokenizer/maskbit_tokenizer_*.yaml)")
  model = tokenizer_from_config(config)
  state = common.load_torch_state(src, what="a MaskBit tokenizer .bin")
  _check_bit_buffer(src, state, "quantize.bits_to_indices", model.token_size)
  if "quantize.codebook" in state:
    expected = maskbit.bit_table(model.token_size)[:-1]  # the +-1 bits of every code
    if np.asarray(state["quantize.codebook"]).shape != expected.shape or not np.array_equal(
        state["quantize.codebook"], expected):
      raise ConversionError(f"{src}: key 'quantize.codebook' is not the +-1 bit table of "
                            f"{model.token_size} bits (shape {expected.shape})")
  state = {k: v for k, v in state.items() if not k.startswith("quantize.")}
  f = model.downsample_factor
  abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                            jnp.zeros((1, f, f, model.num_channels), jnp.float32))
  params = common.params_from_torch(src, state, common.flatten(abstract["params"]),
                                    tokenizer_torch_name, common.torch_shape, common.torch_to_flax)
  tokenizers.save(dst, model, {"params": params},
                  extra={"value_range": [0.0, 1.0],
                         "source": {"format": "maskbit-tokenizer",
                                    "checkpoint": os.path.abspath(src),
                                    "config": os.path.abspath(config)}})
