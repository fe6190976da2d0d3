"""CLIP in transformers' on-disk layout (config.json + model.safetensors) -> Flax.

  text_encoder_from_folder(folder)    CLIPTextModelWithProjection (Meissonic's `text_encoder/`)
                                      or a full CLIPModel folder -> (CLIPTextEncoder, variables)
  vision_encoder_from_folder(folder)  CLIPVisionModelWithProjection or a full CLIPModel folder
                                      -> (CLIPVisionEncoder, variables)
  python -m dimo_jax.convert clip --src SRC --dst DST
                                      a full CLIPModel folder (with its tokenizer files) -> a
                                      model directory for CLIP score, read by `load_clip`

Reading needs `safetensors`, not PyTorch. Every tensor of the file must be a parameter of the
module built from config.json and every parameter must be present with the shape the config
implies (`position_ids` buffers, which older transformers saved, are skipped); a missing key,
an unexpected key or a wrong shape stops with a ConversionError naming the file, the key and
the shapes. The key mapping is documented in `dimo_jax.models.clip`.

A full CLIPModel projects both towers to the top-level `projection_dim` and holds
`logit_scale` (kept in the model directory, unused by CLIP score).
"""

import dataclasses
import os
import re
import shutil
from typing import Any, Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from dimo_jax import clip_tokenizer, modeldir
from dimo_jax.convert import common
from dimo_jax.convert.common import ConversionError
from dimo_jax.models.clip import (ACTIVATIONS, CLIPTextEncoder, CLIPVisionEncoder, clip_score,
                                  preprocess)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_DIR = "tokenizer"
TEXT_ENCODER_SUBFOLDER = "text_encoder"
IMAGE_ENCODER_SUBFOLDER = "image_encoder"
TOKENIZER_FILES = (clip_tokenizer.VOCAB_FILE, clip_tokenizer.MERGES_FILE)
OPTIONAL_TOKENIZER_FILES = (clip_tokenizer.CONFIG_FILE, clip_tokenizer.SPECIAL_TOKENS_FILE)
KIND = "clip"
TEXT_PREFIXES = ("text_model", "text_projection")
VISION_PREFIXES = ("vision_model", "visual_projection")
LOGIT_SCALE = "logit_scale"

# transformers' CLIPTextConfig / CLIPVisionConfig / CLIPConfig defaults, which apply to the
# keys a config.json leaves out (config key -> module field).
_TEXT_FIELDS = {
    "vocab_size": ("vocab_size", 49408), "hidden_size": ("hidden_size", 512),
    "intermediate_size": ("intermediate_size", 2048), "projection_dim": ("projection_dim", 512),
    "num_hidden_layers": ("num_hidden_layers", 12),
    "num_attention_heads": ("num_attention_heads", 8),
    "max_position_embeddings": ("max_position_embeddings", 77),
    "hidden_act": ("hidden_act", "quick_gelu"), "layer_norm_eps": ("layer_norm_eps", 1e-5),
    "eos_token_id": ("eos_token_id", 49407),
}
_VISION_FIELDS = {
    "hidden_size": ("hidden_size", 768), "intermediate_size": ("intermediate_size", 3072),
    "projection_dim": ("projection_dim", 512), "num_hidden_layers": ("num_hidden_layers", 12),
    "num_attention_heads": ("num_attention_heads", 12), "image_size": ("image_size", 224),
    "patch_size": ("patch_size", 32), "hidden_act": ("hidden_act", "quick_gelu"),
    "layer_norm_eps": ("layer_norm_eps", 1e-5),
}
_CLIP_PROJECTION_DIM = 512


def _read_config(folder: str) -> Tuple[str, Dict[str, Any]]:
  path = common.require_file(os.path.join(folder, CONFIG_FILE), "a transformers config.json")
  config = common.read_json(path)
  if not isinstance(config, dict):
    raise ConversionError(f"{path}: expected a JSON object, found {type(config).__name__}")
  return path, config


def _is_full_model(config: Dict[str, Any]) -> bool:
  return "text_config" in config or "vision_config" in config


def _sub_config(path: str, config: Dict[str, Any], tower: str) -> Dict[str, Any]:
  """`text_config` / `vision_config` of a CLIPModel config; the `*_config_dict` variant that
  older releases carry overrides it, as transformers reads them."""
  merged = {}
  for key in (f"{tower}_config", f"{tower}_config_dict"):
    value = config.get(key)
    if value is None:
      continue
    if not isinstance(value, dict):
      raise ConversionError(f"{path}: {key} is a {type(value).__name__}, expected an object")
    merged.update(value)
  return merged


def _square(path: str, key: str, value: Any) -> int:
  """image_size / patch_size: a positive int, or a pair of equal ones."""
  if isinstance(value, (list, tuple)):
    if len(value) != 2 or value[0] != value[1]:
      raise ConversionError(f"{path}: {key} {value!r} is not square; only square is supported")
    value = value[0]
  return common.config_int(path, key, value)


def _module_fields(path: str, config: Dict[str, Any], fields: Dict[str, Tuple[str, Any]],
                   prefix: str = "") -> Dict[str, Any]:
  """The module fields of `config` (keys named `prefix` + key in errors: 'text_config.')."""
  out = {}
  for key, (field, default) in fields.items():
    value = config.get(key)
    value = default if value is None else value
    name = prefix + key
    if key in ("image_size", "patch_size"):
      value = _square(path, name, value)
    elif key == "hidden_act":
      value = str(value)
    elif key == "layer_norm_eps":
      if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConversionError(f"{path}: key {name!r} must be a positive number, found {value!r}")
      value = float(value)
    else:
      value = common.config_int(path, name, value, minimum=0 if key == "eos_token_id" else 1)
    out[field] = value
  if out["hidden_act"] not in ACTIVATIONS:
    raise ConversionError(f"{path}: hidden_act {out['hidden_act']!r} is not supported "
                          f"(expected one of {sorted(ACTIVATIONS)})")
  if out["hidden_size"] % out["num_attention_heads"]:
    raise ConversionError(f"{path}: hidden_size {out['hidden_size']} is not divisible by "
                          f"num_attention_heads {out['num_attention_heads']}")
  return out


def _projection_dim(path: str, config: Dict[str, Any]) -> int:
  """The top-level projection_dim of a CLIPModel config (both towers project to it)."""
  value = config.get("projection_dim")
  return _CLIP_PROJECTION_DIM if value is None else common.config_int(path, "projection_dim",
                                                                      value)


def text_module(path: str, config: Dict[str, Any], dtype=jnp.float32) -> CLIPTextEncoder:
  """The CLIPTextEncoder a config.json describes (a CLIPTextConfig or a full CLIPConfig)."""
  if _is_full_model(config):
    fields = _module_fields(path, _sub_config(path, config, "text"), _TEXT_FIELDS,
                            "text_config.")
    fields["projection_dim"] = _projection_dim(path, config)
  else:
    fields = _module_fields(path, config, _TEXT_FIELDS)
  return CLIPTextEncoder(**fields, dtype=dtype)


def vision_module(path: str, config: Dict[str, Any], dtype=jnp.float32) -> CLIPVisionEncoder:
  """The CLIPVisionEncoder a config.json describes (a CLIPVisionConfig or a full CLIPConfig)."""
  if _is_full_model(config):
    sub = _sub_config(path, config, "vision")
    fields = _module_fields(path, sub, _VISION_FIELDS, "vision_config.")
    fields["projection_dim"] = _projection_dim(path, config)
  else:
    sub = config
    fields = _module_fields(path, config, _VISION_FIELDS)
  if sub.get("num_channels") not in (None, 3):
    raise ConversionError(f"{path}: num_channels {sub['num_channels']} is not supported "
                          "(expected 3)")
  if fields["image_size"] % fields["patch_size"]:
    raise ConversionError(f"{path}: image_size {fields['image_size']} is not a multiple of "
                          f"patch_size {fields['patch_size']}")
  return CLIPVisionEncoder(**fields, dtype=dtype)


def load_safetensors(path: str) -> Dict[str, np.ndarray]:
  """The tensors of a .safetensors file (`common.load_safetensors`), `position_ids` buffers (int64,
  not parameters) left out."""
  state = common.load_safetensors(path, "the transformers safetensors weights")
  return {name: array for name, array in state.items() if not name.endswith(".position_ids")}


def torch_name(path: str) -> str:
  """Flax path -> transformers key (text_model/encoder/layers_3/mlp/fc1/kernel ->
  text_model.encoder.layers.3.mlp.fc1.weight)."""
  *modules, leaf = path.split("/")
  parts = [re.sub(r"^layers_(\d+)$", r"layers.\1", name) for name in modules]
  if leaf == "class_embedding":
    return ".".join(parts + [leaf])
  return ".".join(parts + ["bias" if leaf == "bias" else "weight"])


def _example_input(module) -> jax.Array:
  if isinstance(module, CLIPTextEncoder):
    return jnp.zeros((1, 1), jnp.int32)
  return jnp.zeros((1, module.image_size, module.image_size, 3), jnp.float32)


def init_variables(module) -> Any:
  """Fresh variables of a CLIPTextEncoder or CLIPVisionEncoder (their tree is what conversion
  fills in)."""
  return module.init(jax.random.PRNGKey(0), _example_input(module))


def _tower_params(path: str, state: Dict[str, np.ndarray], module) -> Dict[str, Any]:
  abstract = jax.eval_shape(lambda: init_variables(module))
  expected = common.flatten(abstract["params"])
  return common.params_from_torch(path, state, expected, torch_name, common.torch_shape,
                                  common.torch_to_flax)


def _select(state: Dict[str, np.ndarray], prefixes: Sequence[str]) -> Dict[str, np.ndarray]:
  return {k: v for k, v in state.items() if k.split(".", 1)[0] in prefixes}


def _from_folder(folder: str, subfolder: str, prefixes: Sequence[str], build, dtype):
  if (not os.path.isfile(os.path.join(folder, CONFIG_FILE))
      and os.path.isdir(os.path.join(folder, subfolder))):
    folder = os.path.join(folder, subfolder)
  config_path, config = _read_config(folder)
  module = build(config_path, config, dtype)
  weights_path = os.path.join(folder, WEIGHTS_FILE)
  state = load_safetensors(weights_path)
  if _is_full_model(config):
    # The other tower's weights and logit_scale belong to the same file; they are checked by
    # `convert`, which reads the whole model.
    state = _select(state, prefixes)
  return module, {"params": _tower_params(weights_path, state, module)}


def text_encoder_from_folder(folder: str, dtype=jnp.float32) -> Tuple[CLIPTextEncoder, Any]:
  """(module, variables) of the text tower in `folder` (config.json + model.safetensors), or
  in its `text_encoder/` (a Meissonic release root)."""
  return _from_folder(folder, TEXT_ENCODER_SUBFOLDER, TEXT_PREFIXES, text_module, dtype)


def vision_encoder_from_folder(folder: str,
                               dtype=jnp.float32) -> Tuple[CLIPVisionEncoder, Any]:
  """(module, variables) of the vision tower in `folder` (config.json + model.safetensors), or
  in its `image_encoder/` (the diffusers name of that subfolder)."""
  return _from_folder(folder, IMAGE_ENCODER_SUBFOLDER, VISION_PREFIXES, vision_module, dtype)


def _full_model(src: str):
  """(text module, vision module, variables {"text", "vision", "logit_scale"}) of a CLIPModel."""
  config_path, config = _read_config(src)
  if not _is_full_model(config):
    raise ConversionError(f"{config_path}: expected a CLIPModel config with text_config and "
                          f"vision_config, found model_type {config.get('model_type')!r}")
  text, vision = text_module(config_path, config), vision_module(config_path, config)
  weights_path = os.path.join(src, WEIGHTS_FILE)
  state = load_safetensors(weights_path)
  other = sorted(k for k in state if k.split(".", 1)[0] not in TEXT_PREFIXES + VISION_PREFIXES)
  common.check_keys(weights_path, [LOGIT_SCALE], other)
  logit_scale = common.check_shape(weights_path, LOGIT_SCALE, state[LOGIT_SCALE], ())
  variables = {
      "text": {"params": _tower_params(weights_path, _select(state, TEXT_PREFIXES), text)},
      "vision": {"params": _tower_params(weights_path, _select(state, VISION_PREFIXES), vision)},
      LOGIT_SCALE: logit_scale,
  }
  return text, vision, variables


def convert(src: str, dst: str) -> None:
  """Converts the CLIPModel folder `src` (config.json, model.safetensors, vocab.json,
  merges.txt [, tokenizer_config.json, special_tokens_map.json]) into a model directory at
  `dst`: model.json, params/ and tokenizer/ (the tokenizer files, copied), all or nothing."""
  for name in TOKENIZER_FILES:
    common.require_file(os.path.join(src, name), "the CLIP tokenizer that CLIP score needs")
  load_tokenizer(src)  # refuse a tokenizer that would only fail at evaluation time
  text, vision, variables = _full_model(src)
  description = {
      "kind": KIND,
      "config": {"text": modeldir.module_config(text), "vision": modeldir.module_config(vision)},
      "source": {"format": "transformers CLIPModel", "folder": os.path.abspath(src)},
  }
  # The tokenizer files go inside the same all-or-nothing rename as the weights.
  with modeldir.staged(dst) as inner:
    modeldir.write(inner, description, variables)
    copy_tokenizer_files(src, os.path.join(inner, TOKENIZER_DIR))


def load_tokenizer(folder: str, max_length: Optional[int] = None) -> clip_tokenizer.CLIPTokenizer:
  """`clip_tokenizer.load(folder, max_length)`, its errors as ConversionErrors; a JSON file of
  the tokenizer that does not parse is named."""
  for name in (clip_tokenizer.VOCAB_FILE, clip_tokenizer.CONFIG_FILE,
               clip_tokenizer.SPECIAL_TOKENS_FILE):
    if os.path.isfile(os.path.join(folder, name)):
      common.read_json(os.path.join(folder, name))
  try:
    return clip_tokenizer.load(folder, max_length=max_length)
  except (ValueError, FileNotFoundError) as e:
    raise ConversionError(str(e)) from e


def copy_tokenizer_files(src: str, dst: str) -> None:
  """Copies the CLIP tokenizer files of folder `src` (those present) into a new folder `dst`."""
  os.makedirs(dst)
  for name in TOKENIZER_FILES + OPTIONAL_TOKENIZER_FILES:
    if os.path.isfile(os.path.join(src, name)):
      shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))


@dataclasses.dataclass(frozen=True)
class Clip:
  """A converted CLIPModel: both towers, their variables, the tokenizer, and CLIP score.

  variables: {"text": text variables, "vision": vision variables, "logit_scale": float32[]}.
  """
  text: CLIPTextEncoder
  vision: CLIPVisionEncoder
  variables: Any
  tokenizer: clip_tokenizer.CLIPTokenizer
  description: Dict[str, Any]

  def __post_init__(self):
    object.__setattr__(self, "_text_embeds", jax.jit(
        lambda v, ids: self.text.apply(v, ids)["text_embeds"]))
    object.__setattr__(self, "_image_embeds", jax.jit(
        lambda v, images: self.vision.apply(v, preprocess(images, self.vision.image_size))))

  def text_embeds(self, prompts: List[str]) -> jax.Array:
    """float32[B, projection_dim] for B prompts."""
    return self._text_embeds(self.variables["text"], jnp.asarray(self.tokenizer(prompts)))

  def image_embeds(self, images: jax.Array) -> jax.Array:
    """float32[B, H, W, 3] in [0, 1] (any size; `preprocess`ed inside) -> float32[B, P]."""
    return self._image_embeds(self.variables["vision"], images)

  def score(self, images: jax.Array, prompts: List[str]) -> jax.Array:
    """float32[B]: 100 * max(cos, 0) of each image (in [0, 1]) with its prompt."""
    if len(prompts) != images.shape[0]:
      raise ValueError(f"{images.shape[0]} images but {len(prompts)} prompts")
    return clip_score(self.image_embeds(images), self.text_embeds(prompts))


def load_clip(src: str, dtype=jnp.float32) -> Clip:
  """Reads a model directory written by `convert`."""
  description = modeldir.read_description(src, "CLIP model")
  if description["kind"] != KIND:
    raise ValueError(f"{src}: model.json kind is {description['kind']!r}, expected {KIND!r}")
  text = CLIPTextEncoder(**description["config"]["text"], dtype=dtype)
  vision = CLIPVisionEncoder(**description["config"]["vision"], dtype=dtype)
  variables = modeldir.restore(src, lambda: {
      "text": init_variables(text), "vision": init_variables(vision),
      LOGIT_SCALE: jnp.zeros((), jnp.float32)})
  tokenizer = clip_tokenizer.load(os.path.join(src, TOKENIZER_DIR))
  if tokenizer.max_length > text.max_position_embeddings:
    # Keep the end-of-text token when the folder's tokenizer allows more than the model's
    # positions.
    tokenizer = clip_tokenizer.load(os.path.join(src, TOKENIZER_DIR),
                                    max_length=text.max_position_embeddings)
  return Clip(text, vision, variables, tokenizer, description)
