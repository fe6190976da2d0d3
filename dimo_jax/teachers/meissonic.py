"""Text-to-image teachers (Meissonic): the model directory, its prompt encoder and conditions.

A `meissonic` model directory (written by `python -m dimo_jax.convert meissonic`, layout in
dimo_jax/convert/meissonic.py, or by pretraining on 'digits_text') loads as a `teachers.Teacher`
whose module is the transformer behind `models.meissonic.TextConditioned` and whose `text` is a
`TextStack`:

  TextStack.tokenize(prompts)          -> int32[B, 77], the pipeline's CLIP token ids
  TextStack.encode(input_ids)          -> (encoder_hidden_states float32[B, T, D] = the text
                                          encoder's penultimate hidden states, pooled
                                          float32[B, P] = its projected pooled output)
  prompt_condition(teacher, prompts)   -> the `TextConditioned` cond dict of B prompts

Tokens are codebook ids with the mask as id V, as for the class-conditional teachers; the
release's own mask id (vocab_size - 1) is used inside. Its decode rule is the release's
scheduler (`sampling.meissonic_sample`). Micro-conditioning is the pipeline's: (width, height,
crop top, crop left, aesthetic score) = (resolution, resolution, 0, 0, 6).
"""

import dataclasses
import os
from typing import Any, Dict, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from dimo_jax import clip_tokenizer, modeldir, sampling
from dimo_jax.models.clip import CLIPTextEncoder
from dimo_jax.models.meissonic import NUM_MICRO_CONDS, MeissonicTransformer, TextConditioned
from dimo_jax.teachers import Teacher

KIND = "meissonic"
# The pipeline pads and truncates every prompt to 77 ids, whatever the tokenizer config says.
PROMPT_LENGTH = 77
AESTHETIC_SCORE = 6.0
CROP_COORDS = (0.0, 0.0)
SAMPLING_STEPS = sampling.MEISSONIC_STEPS
GUIDANCE_SCALE = sampling.MEISSONIC_CFG
TEMPERATURE = sampling.MEISSONIC_TEMPERATURE
MASKING_SCHEDULES = sampling.MEISSONIC_SCHEDULES
NEGATIVE_PROMPT = ("worst quality, low quality, low res, blurry, distortion, watermark, logo, "
                   "signature, text, jpeg artifacts, signature, sketch, duplicate, ugly, "
                   "identifying mark")


def micro_conds(resolution: int, batch: int) -> np.ndarray:
  """float32[B, 5]: (resolution, resolution, crop top 0, crop left 0, aesthetic score 6)."""
  row = np.array([resolution, resolution, *CROP_COORDS, AESTHETIC_SCORE], np.float32)
  return np.tile(row, (batch, 1))


def example_condition(transformer: MeissonicTransformer, batch: int = 1,
                      text_len: int = 1) -> Dict[str, jax.Array]:
  """A zero condition dict of the shapes `TextConditioned` reads (for init and abstract trees)."""
  hidden = jnp.zeros((batch, text_len, transformer.joint_attention_dim), jnp.float32)
  pooled = jnp.zeros((batch, transformer.pooled_projection_dim), jnp.float32)
  return {"hidden": hidden, "pooled": pooled, "uncond_hidden": hidden, "uncond_pooled": pooled,
          "micro_conds": jnp.zeros((batch, NUM_MICRO_CONDS), jnp.float32)}


@dataclasses.dataclass(frozen=True)
class TextStack:
  """What turns prompts into a text teacher's condition: the CLIP text tower (float32), its
  variables and the CLIP BPE tokenizer."""
  encoder: CLIPTextEncoder
  variables: Any
  tokenizer: clip_tokenizer.CLIPTokenizer

  def __post_init__(self):
    def encode(variables, input_ids):
      out = self.encoder.apply(variables, input_ids)
      return out["hidden_states"][-2], out["text_embeds"]
    object.__setattr__(self, "_encode", jax.jit(encode))

  def tokenize(self, prompts: Sequence[str]) -> np.ndarray:
    """int32[B, 77]: bos, the prompt's ids, eos, padding (the pipeline's tokenizer call)."""
    return self.tokenizer(list(prompts))

  def encode(self, input_ids) -> Tuple[jax.Array, jax.Array]:
    """int32[B, T] -> (encoder_hidden_states float32[B, T, D], pooled float32[B, P])."""
    return self._encode(self.variables, jnp.asarray(input_ids, jnp.int32))


def prompt_condition(teacher: Teacher, prompts: Sequence[str],
                     negative_prompt: str = "") -> Dict[str, jax.Array]:
  """The cond dict of B prompts: their encodings, the negative prompt's as the unconditional
  branch (what guidance and a dropped condition use; "" as the pipeline's default) and the
  pipeline's micro-conds."""
  if isinstance(prompts, str) or not len(prompts):
    raise ValueError(f"expected a non-empty list of prompts, got {prompts!r:.80}")
  hidden, pooled = teacher.text.encode(teacher.text.tokenize(list(prompts) + [negative_prompt]))
  batch = len(prompts)
  return {"hidden": hidden[:batch], "pooled": pooled[:batch],
          "uncond_hidden": jnp.broadcast_to(hidden[batch:], hidden[:batch].shape),
          "uncond_pooled": jnp.broadcast_to(pooled[batch:], pooled[:batch].shape),
          "micro_conds": jnp.asarray(micro_conds(int(teacher.description["resolution"]),
                                                 batch))}


def describe(adapter: TextConditioned, **extra) -> Dict[str, Any]:
  """The model.json of a transformer behind `adapter` (one token a pixel unless `extra` says
  otherwise; the scheduler's cosine schedule)."""
  transformer = adapter.transformer
  return {"kind": KIND, "config": modeldir.module_config(transformer),
          "resolution": adapter.height, "token_grid": [adapter.height, adapter.width],
          "scheduler": {"mask_token_id": transformer.mask_id, "masking_schedule": "cosine"},
          **extra}


def _check_description(path: str, description: Dict[str, Any]) -> None:
  """The keys of a `meissonic` model.json besides its transformer config."""
  def positive(value):
    return isinstance(value, int) and not isinstance(value, bool) and value > 0

  grid = description.get("token_grid")
  if not (isinstance(grid, list) and len(grid) == 2 and all(map(positive, grid))):
    raise modeldir.ModelDirError(f"{path}: token_grid: expected two positive integers [h, w], "
                                 f"found {grid!r}")
  # prompt_length is optional (the pipeline's 77 by default).
  for key in ["resolution"] + (["prompt_length"] if "prompt_length" in description else []):
    if not positive(description.get(key)):
      raise modeldir.ModelDirError(f"{path}: {key}: expected a positive integer, found "
                                   f"{description.get(key)!r}")
  scheduler = description.get("scheduler")
  schedule = scheduler.get("masking_schedule") if isinstance(scheduler, dict) else None
  if schedule not in MASKING_SCHEDULES:
    raise modeldir.ModelDirError(f"{path}: scheduler: expected an object whose masking_schedule "
                                 f"is one of {list(MASKING_SCHEDULES)}, found {scheduler!r}")


def _read_tokenizer(folder: str, max_length: int) -> clip_tokenizer.CLIPTokenizer:
  """The CLIP tokenizer of a model directory's `tokenizer/` folder; a JSON file of it that does
  not parse is named (json's own error names no file)."""
  for name in (clip_tokenizer.VOCAB_FILE, clip_tokenizer.CONFIG_FILE,
               clip_tokenizer.SPECIAL_TOKENS_FILE):
    path = os.path.join(folder, name)
    if os.path.isfile(path):
      modeldir.read_json(path)
  try:
    return clip_tokenizer.load(folder, max_length=max_length)
  except ValueError as e:  # its messages name the file and line
    raise modeldir.ModelDirError(str(e)) from e


def load(src: str, dtype=jnp.float32, with_variables: bool = True) -> Teacher:
  """Reads a `meissonic` model directory; `dtype` is the transformer's compute dtype; without
  `with_variables` the transformer's parameters are not read (the text encoder's are).

  Every file is checked before it is used (`dimo_jax.modeldir`): model.json's keys, the config
  of the transformer and of the text encoder against their params/, and the folders model.json
  names, which must lie inside `src`.
  """
  description = modeldir.read_description(src, "teacher")
  path = modeldir.description_path(src)
  if description["kind"] != KIND:
    raise modeldir.ModelDirError(f"{path}: kind: expected {KIND!r}, found "
                                 f"{description['kind']!r}")
  _check_description(path, description)
  model = modeldir.construct(MeissonicTransformer, src, description["config"], dtype=dtype)
  teacher = Teacher(TextConditioned(model, *description["token_grid"]), None, description)
  variables = modeldir.restore(src, teacher.init_variables) if with_variables else None

  text_dir = modeldir.part_path(src, description, "text_encoder", "text encoder")
  text_description = modeldir.read_description(text_dir, "text encoder")
  text_encoder = modeldir.construct(CLIPTextEncoder, text_dir, text_description["config"])
  text_variables = modeldir.restore(text_dir, lambda: text_encoder.init(
      jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32)))
  tokenizer = _read_tokenizer(
      modeldir.part_path(src, description, "tokenizer", "CLIP tokenizer"),
      description.get("prompt_length", PROMPT_LENGTH))
  return dataclasses.replace(teacher, variables=variables,
                             text=TextStack(text_encoder, text_variables, tokenizer))
