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

`convert(src, dst)` (`python -m dimo_jax.convert meissonic --src SNAPSHOT --dst DST`) reads every
sub-folder of the release and writes one model directory (`dimo_jax.modeldir`):

  DST/model.json      kind "meissonic": the transformer's config, the token grid and image
                      resolution, the scheduler's masking rule, provenance
  DST/params/         the transformer's variables
  DST/text_encoder/   model directory of the CLIP text tower (kind "clip-text")
  DST/tokenizer/      the CLIP tokenizer files, copied (vocab.json, merges.txt, ...)
  DST/vqvae/          tokenizer directory of the VQ-VAE (kind "diffusers-vq")

`dimo_jax.teachers.load(DST)` returns the text-to-image teacher (`dimo_jax.teachers.meissonic`) and
`dimo_jax.tokenizers.load(DST)` the VQ-VAE. Everything is read and checked before anything is
written; DST appears whole or not at all.
"""

import os
import re
from typing import Any, Dict, Iterable, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from dimo_jax import clip_tokenizer, modeldir, tokenizers
from dimo_jax.teachers.meissonic import KIND, MASKING_SCHEDULES, PROMPT_LENGTH
from dimo_jax.convert import clip as convert_clip
from dimo_jax.convert import common, diffusers_vq
from dimo_jax.convert.common import ConversionError
from dimo_jax.models.meissonic import MeissonicTransformer

TRANSFORMER_SUBFOLDER = "transformer"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
INDEX_FILE = WEIGHTS_FILE + ".index.json"

TEXT_ENCODER_KIND = "clip-text"
# The release's sub-folders (diffusers layout); the model directory keeps the names of the three
# it carries over.
RELEASE_SUBFOLDERS = (TRANSFORMER_SUBFOLDER, diffusers_vq.RELEASE_SUBFOLDER,
                      convert_clip.TEXT_ENCODER_SUBFOLDER, clip_tokenizer.RELEASE_SUBFOLDER,
                      "scheduler")
TEXT_ENCODER_DIR = convert_clip.TEXT_ENCODER_SUBFOLDER
TOKENIZER_DIR = clip_tokenizer.RELEASE_SUBFOLDER
VQVAE_DIR = diffusers_vq.RELEASE_SUBFOLDER
SCHEDULER_CONFIG = os.path.join("scheduler", "scheduler_config.json")
# The pipeline's default image side in pixels (1024: 64 x 64 codes of the f16 VQ-VAE).
DEFAULT_RESOLUTION = 1024

# Transformer2DModel.__init__ defaults, for keys a config.json leaves out.
_DEFAULTS = {
    "patch_size": 1, "num_layers": 19, "num_single_layers": 38, "attention_head_dim": 128,
    "num_attention_heads": 24, "joint_attention_dim": 4096, "pooled_projection_dim": 768,
    "guidance_embeds": False, "axes_dims_rope": [16, 56, 56], "vocab_size": 8256,
    "codebook_size": 8192, "downsample": False, "upsample": False,
}
# Integer fields -> their least value (a model may have no layers of one kind).
_INT_FIELDS = {"num_layers": 0, "num_single_layers": 0, "attention_head_dim": 1,
               "num_attention_heads": 1, "joint_attention_dim": 1, "pooled_projection_dim": 1,
               "vocab_size": 1, "codebook_size": 1}
# The torch ModuleLists; other names ending in a number (linear_1) are not indices.
_INDEXED = re.compile(r"^(transformer_blocks|single_transformer_blocks|to_out|net)_(\d+)$")
# Flax leaf -> torch leaf.
_LEAF_NAMES = {"scale": "weight", "embedding": "weight", "kernel": "weight", "bias": "bias"}
_TRANSPOSED_CONV = "up_block/upsample/conv/kernel"


def model_from_config(path: str) -> MeissonicTransformer:
  """The MeissonicTransformer a `transformer/config.json` describes (ConversionError if not)."""
  config = common.read_json(path)
  if not isinstance(config, dict):
    raise ConversionError(f"{path}: expected a JSON object, found {type(config).__name__}")
  c = {**_DEFAULTS, **config}
  if c["guidance_embeds"]:
    raise ConversionError(f"{path}: guidance_embeds true is not supported (the release has false)")
  if c["patch_size"] != 1:
    raise ConversionError(f"{path}: patch_size {c['patch_size']!r} is not supported (expected 1)")
  fields = {k: common.config_int(path, k, c[k], least) for k, least in _INT_FIELDS.items()}
  axes = common.config_ints(path, "axes_dims_rope", c["axes_dims_rope"])
  for key in ("downsample", "upsample"):
    if not isinstance(c[key], bool):
      raise ConversionError(f"{path}: key {key!r} must be true or false, found {c[key]!r}")
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
  return MeissonicTransformer(**fields, axes_dims_rope=axes, downsample=c["downsample"],
                              upsample=c["upsample"])


def _weight_files(folder: str) -> Tuple[str, Iterable[str]]:
  """(the file named in errors, the safetensors files holding the weights)."""
  index = os.path.join(folder, INDEX_FILE)
  if os.path.isfile(index):
    weight_map = common.read_json(index)
    weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(s, str)
                                                   for s in weight_map.values()):
      raise ConversionError(f"{index}: expected a JSON object whose 'weight_map' maps keys to "
                            "shard file names")
    shards = sorted(set(weight_map.values()))
    return index, [common.require_file(os.path.join(folder, s), f"a shard {index} lists")
                   for s in shards]
  single = common.require_file(os.path.join(folder, WEIGHTS_FILE),
                               f"the transformer weights (or {INDEX_FILE} and its shards)")
  return single, [single]


def load_safetensors(paths: Iterable[str]) -> Dict[str, np.ndarray]:
  """The tensors of every shard in `paths` (`common.load_safetensors`); a key in two is
  refused."""
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


def scheduler_from_config(path: str, mask_id: int) -> Dict[str, Any]:
  """{"mask_token_id", "masking_schedule"} of `scheduler/scheduler_config.json`, checked against
  the transformer's mask id (its last token row)."""
  config = common.read_json(common.require_file(path, "the Meissonic scheduler config"))
  if not isinstance(config, dict) or "mask_token_id" not in config:
    raise ConversionError(f"{path}: expected a JSON object with 'mask_token_id'")
  schedule = config.get("masking_schedule", "cosine")
  if schedule not in MASKING_SCHEDULES:
    raise ConversionError(f"{path}: masking_schedule {schedule!r} is not one of "
                          f"{list(MASKING_SCHEDULES)}")
  if config["mask_token_id"] != mask_id:
    raise ConversionError(f"{path}: mask_token_id {config['mask_token_id']!r} is not the "
                          f"transformer's mask id {mask_id} (vocab_size - 1)")
  return {"mask_token_id": mask_id, "masking_schedule": schedule}


def _check_parts(src: str, model: MeissonicTransformer, text, tokenizer, vqvae,
                 resolution: int) -> Tuple[int, int]:
  """Checks that the release's parts fit together; returns the token grid (h, w)."""
  text_config = os.path.join(src, TEXT_ENCODER_DIR, CONFIG_FILE)
  if text.hidden_size != model.joint_attention_dim:
    raise ConversionError(f"{text_config}: hidden_size {text.hidden_size} is not the "
                          f"transformer's joint_attention_dim {model.joint_attention_dim}")
  if text.projection_dim != model.pooled_projection_dim:
    raise ConversionError(f"{text_config}: projection_dim {text.projection_dim} is not the "
                          f"transformer's pooled_projection_dim {model.pooled_projection_dim}")
  if text.max_position_embeddings < PROMPT_LENGTH:
    raise ConversionError(f"{text_config}: max_position_embeddings "
                          f"{text.max_position_embeddings} is below the pipeline's prompt "
                          f"length {PROMPT_LENGTH}")
  largest_id = max(tokenizer.vocab.values())
  if largest_id >= text.vocab_size:
    raise ConversionError(f"{os.path.join(src, TOKENIZER_DIR)}: token id {largest_id} is beyond "
                          f"the text encoder's vocab_size {text.vocab_size}")
  vq_config = os.path.join(src, VQVAE_DIR, CONFIG_FILE)
  if vqvae.num_vq_embeddings != model.codebook_size:
    raise ConversionError(f"{vq_config}: num_vq_embeddings {vqvae.num_vq_embeddings} is not the "
                          f"transformer's codebook_size {model.codebook_size}")
  factor = vqvae.downsample_factor
  side = resolution // factor
  if resolution % factor or side < 1 or (model.downsample and side % 2):
    raise ConversionError(f"resolution {resolution} must be a multiple of the VQ-VAE's "
                          f"downsampling {factor}" + (", with an even number of codes a side "
                                                      "(the transformer downsamples)"
                                                      if model.downsample else ""))
  return side, side


def convert(src: str, dst: str, resolution: int = DEFAULT_RESOLUTION) -> None:
  """Converts the Meissonic release at `src` (diffusers layout) into the model directory `dst`
  (module docstring), for images of `resolution` x `resolution` pixels."""
  for name in RELEASE_SUBFOLDERS:
    if not os.path.isdir(os.path.join(src, name)):
      raise ConversionError(f"{os.path.join(src, name)}: no such folder (a Meissonic release "
                            f"holds {', '.join(n + '/' for n in RELEASE_SUBFOLDERS)})")
  model, variables = transformer_from_folder(os.path.join(src, TRANSFORMER_SUBFOLDER))
  scheduler = scheduler_from_config(os.path.join(src, SCHEDULER_CONFIG), model.mask_id)
  text, text_variables = convert_clip.text_encoder_from_folder(
      os.path.join(src, TEXT_ENCODER_DIR))
  tokenizer_src = os.path.join(src, TOKENIZER_DIR)
  tokenizer = convert_clip.load_tokenizer(tokenizer_src, max_length=PROMPT_LENGTH)
  vqvae, vqvae_variables = diffusers_vq.vqvae_from_folder(os.path.join(src, VQVAE_DIR))
  grid = _check_parts(src, model, text, tokenizer, vqvae, resolution)

  source = os.path.abspath(src)
  description = {
      "kind": KIND, "config": modeldir.module_config(model),
      "resolution": resolution, "token_grid": list(grid), "scheduler": scheduler,
      "text_encoder": TEXT_ENCODER_DIR, "tokenizer": TOKENIZER_DIR, "vqvae": VQVAE_DIR,
      "source": {"format": "diffusers (Meissonic)", "folder": source},
  }
  with modeldir.staged(dst) as inner:
    # Each part is written into one staging directory that becomes `dst` in a single rename.
    modeldir.write(inner, description, variables)
    modeldir.write(os.path.join(inner, TEXT_ENCODER_DIR),
                   {"kind": TEXT_ENCODER_KIND, "config": modeldir.module_config(text),
                    "source": {"format": "transformers CLIPTextModelWithProjection",
                               "folder": os.path.join(source, TEXT_ENCODER_DIR)}},
                   text_variables)
    tokenizers.save(os.path.join(inner, VQVAE_DIR), vqvae, vqvae_variables,
                    extra={"value_range": list(diffusers_vq.VALUE_RANGE),
                           "source": {"format": "diffusers",
                                      "folder": os.path.join(source, VQVAE_DIR)}})
    convert_clip.copy_tokenizer_files(tokenizer_src, os.path.join(inner, TOKENIZER_DIR))
