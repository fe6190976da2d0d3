"""Text-to-image teachers (Meissonic): prompt encoding, logits, the release's multi-step sampler
and the one-step sampler of a distilled generator.

A `meissonic` model directory (written by `python -m dimo_jax.convert meissonic`, layout in
dimo_jax/convert/meissonic.py) loads as a `TextTeacher`:

  tokenize(prompts)                  -> int32[B, 77], the pipeline's CLIP token ids
  encode_prompt(input_ids)           -> (encoder_hidden_states float32[B, T, D] = the text
                                        encoder's penultimate hidden states, pooled float32[B, P]
                                        = its projected pooled output, `text_embeds`)
  logits(tokens int32[B, h, w], encoder_hidden_states, pooled, micro_conds float32[B, 5],
         timestep float32[B])        -> float32[B, h*w, V]
  conditioned()                      -> the `TextConditioned` adapter the Di[M]O step calls

Tokens are codebook ids with the mask as id V, as for the class-conditional teachers; the
release's own mask id (vocab_size - 1) is used inside. `timestep` is the released transformer's
forward argument (multiplied by 1000 there): the pipeline passes its step index N-1 ... 0,
Di[M]O passes 0.

`meissonic_sample` is the release's sampler (src/pipeline.py + src/scheduler.py, the same rule
as diffusers' AmusedScheduler): starting from all masks, at step i of N (timestep N-1-i)

  z = z_neg + w (z_cond - z_neg)        guidance with the negative prompt, w = 9, when w > 1
  x0 ~ Cat(softmax(z)) at every position; positions already known keep their code
  c = log(max(p(x0), 1e-20)) + tau_i * g    g = -log(-log(u)) (u ~ U[0, 1), both logs clamped
                                            at 1e-20), tau_i = linspace(2, 0, N)[i]; known
                                            positions take p = float32 max, so never lose
  n_i = max(1, min(#masked - 1, floor(L * cos(pi/2 * (i+1)/N))))   ("linear": 1 - (i+1)/N)
  the n_i positions of lowest confidence (c below the n_i-th smallest) are masked again;
  the last step (timestep 0) keeps every sampled code.

Micro-conditioning is the pipeline's: (width, height, crop top, crop left, aesthetic score) =
(resolution, resolution, 0, 0, 6), i.e. (1024, 1024, 0, 0, 6) for the release.
"""

import dataclasses
import functools
import math
import os
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

import flax
import jax
import jax.numpy as jnp
import numpy as np

from dimo_jax import clip_tokenizer, modeldir, sampling
from dimo_jax.models.clip import CLIPTextEncoder
from dimo_jax.models.meissonic import NUM_MICRO_CONDS, MeissonicTransformer, TextConditioned

KIND = "meissonic"
# The pipeline pads and truncates every prompt to 77 ids, whatever the tokenizer config says.
PROMPT_LENGTH = 77
AESTHETIC_SCORE = 6.0
CROP_COORDS = (0.0, 0.0)
# What the release's inference.py and Di[M]O's validation sample with.
SAMPLING_STEPS = 64
GUIDANCE_SCALE = 9.0
TEMPERATURE = (2.0, 0.0)
NEGATIVE_PROMPT = ("worst quality, low quality, low res, blurry, distortion, watermark, logo, "
                   "signature, text, jpeg artifacts, signature, sketch, duplicate, ugly, "
                   "identifying mark")
MASKING_SCHEDULES = ("cosine", "linear")  # what the release's Scheduler.step knows
_PROB_FLOOR = 1e-20  # the release clamps probabilities and uniforms here before each log

# logits_fn(tokens int32[B, L] (mask = V), cond, drop bool[B], timestep float32[]) -> [B, L, V]
TimedLogitsFn = Callable[[jax.Array, Any, jax.Array, jax.Array], jax.Array]


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


def init_variables(adapter: TextConditioned) -> Any:
  """Fresh variables {"params": ...} of the adapter's transformer (the tree checkpoints hold)."""
  tokens = jnp.zeros((1, adapter.seq_len), jnp.int32)
  return adapter.init({"params": jax.random.PRNGKey(0)}, tokens,
                      example_condition(adapter.transformer))


@dataclasses.dataclass(frozen=True)
class TextTeacher:
  """A loaded Meissonic teacher (module docstring): transformer, CLIP text encoder, tokenizer.

  Attributes:
    model: the MeissonicTransformer (compute dtype as loaded); variables: its {"params": ...}.
    text_encoder, text_variables: the CLIP text tower (float32) and its variables.
    tokenizer: the CLIP BPE tokenizer (77 ids a prompt).
    description: model.json (token_grid, resolution, scheduler, ...).
  """
  model: MeissonicTransformer
  variables: Any
  text_encoder: CLIPTextEncoder
  text_variables: Any
  tokenizer: clip_tokenizer.CLIPTokenizer
  description: Dict[str, Any]

  def __post_init__(self):
    def encode(variables, input_ids):
      out = self.text_encoder.apply(variables, input_ids)
      return out["hidden_states"][-2], out["text_embeds"]

    def logits(variables, tokens, hidden, pooled, conds, timestep):
      tokens = jnp.where(tokens == self.mask_id, self.model.mask_id, tokens.astype(jnp.int32))
      return self.model.apply(variables, tokens, hidden, pooled, conds, timestep)

    object.__setattr__(self, "_encode", jax.jit(encode))
    object.__setattr__(self, "_logits", jax.jit(logits))

  @property
  def token_grid(self) -> Tuple[int, int]:
    """(h, w): the codes of one image."""
    height, width = self.description["token_grid"]
    return int(height), int(width)

  @property
  def seq_len(self) -> int:
    return self.token_grid[0] * self.token_grid[1]

  @property
  def codebook_size(self) -> int:
    return self.model.codebook_size

  @property
  def mask_id(self) -> int:
    """V: our mask id (the release's is model.mask_id = vocab_size - 1)."""
    return self.model.codebook_size

  @property
  def resolution(self) -> int:
    return int(self.description["resolution"])

  @property
  def masking_schedule(self) -> str:
    return self.description["scheduler"]["masking_schedule"]

  def tokenize(self, prompts: Sequence[str]) -> np.ndarray:
    """int32[B, 77]: bos, the prompt's ids, eos, padding (the pipeline's tokenizer call)."""
    return self.tokenizer(list(prompts))

  def encode_prompt(self, input_ids: jax.Array) -> Tuple[jax.Array, jax.Array]:
    """int32[B, T] -> (encoder_hidden_states float32[B, T, D], pooled float32[B, P])."""
    return self._encode(self.text_variables, jnp.asarray(input_ids, jnp.int32))

  def condition(self, prompts: Sequence[str], negative_prompt: str = "") -> Dict[str, jax.Array]:
    """The `cond` dict of `TextConditioned` for B prompts: their encodings, the negative
    prompt's (what guidance and a dropped condition use; "" as the pipeline's default) and the
    pipeline's micro-conds."""
    if isinstance(prompts, str) or not len(prompts):
      raise ValueError(f"expected a non-empty list of prompts, got {prompts!r:.80}")
    hidden, pooled = self.encode_prompt(self.tokenize(list(prompts) + [negative_prompt]))
    batch = len(prompts)
    return {"hidden": hidden[:batch], "pooled": pooled[:batch],
            "uncond_hidden": jnp.broadcast_to(hidden[batch:], hidden[:batch].shape),
            "uncond_pooled": jnp.broadcast_to(pooled[batch:], pooled[:batch].shape),
            "micro_conds": jnp.asarray(micro_conds(self.resolution, batch))}

  def logits(self, tokens: jax.Array, encoder_hidden_states: jax.Array, pooled: jax.Array,
             micro_conds: jax.Array, timestep: jax.Array) -> jax.Array:
    """tokens int32[B, h, w] (mask = V) -> float32[B, h*w, V] (see MeissonicTransformer)."""
    return self._logits(self.variables, jnp.asarray(tokens), encoder_hidden_states, pooled,
                        jnp.asarray(micro_conds, jnp.float32),
                        jnp.asarray(timestep, jnp.float32))

  def conditioned(self, timestep: float = 0.0) -> TextConditioned:
    """The adapter the Di[M]O step and the samplers call (timestep: Di[M]O's 0)."""
    return TextConditioned(self.model, *self.token_grid, timestep=timestep)

  def sample(self, rng: jax.Array, cond: Dict[str, jax.Array], steps: int = SAMPLING_STEPS,
             cfg: float = GUIDANCE_SCALE, temperature=TEMPERATURE,
             masking_schedule: Optional[str] = None) -> jax.Array:
    """int32[B, h*w] codes from the release's sampler (`meissonic_sample`); the masking
    schedule is the scheduler config's unless given."""
    return _teacher_sample(self.conditioned(), self.variables, rng, cond, steps, float(cfg),
                           _temperature_key(temperature),
                           masking_schedule or self.masking_schedule)


def _temperature_key(temperature) -> Union[float, Tuple[float, float]]:
  """A hashable temperature (a jit static argument)."""
  if isinstance(temperature, (tuple, list)):
    return float(temperature[0]), float(temperature[1])
  return float(temperature)


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


def load(src: str, dtype=jnp.float32) -> TextTeacher:
  """Reads a `meissonic` model directory; `dtype` is the transformer's compute dtype.

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
  adapter = TextConditioned(model, *description["token_grid"])
  variables = modeldir.restore(src, lambda: init_variables(adapter))

  text_dir = modeldir.part_path(src, description, "text_encoder", "text encoder")
  text_description = modeldir.read_description(text_dir, "text encoder")
  text_encoder = modeldir.construct(CLIPTextEncoder, text_dir, text_description["config"])
  text_variables = modeldir.restore(text_dir, lambda: text_encoder.init(
      jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32)))
  tokenizer = _read_tokenizer(
      modeldir.part_path(src, description, "tokenizer", "CLIP tokenizer"),
      description.get("prompt_length", PROMPT_LENGTH))
  return TextTeacher(model, variables, text_encoder, text_variables, tokenizer, description)


# --- the release's scheduler -------------------------------------------------------------------

def temperatures(steps: int, temperature=TEMPERATURE) -> np.ndarray:
  """float32[steps]: the Gumbel scale of each step, as `Scheduler.set_timesteps` lays it out:
  linspace(t0, t1) for a pair, linspace(t, 0.01) for a number."""
  if isinstance(temperature, (tuple, list)):
    return np.linspace(temperature[0], temperature[1], steps, dtype=np.float32)
  return np.linspace(temperature, 0.01, steps, dtype=np.float32)


def mask_ratio(step: jax.Array, steps: int, masking_schedule: str = "cosine") -> jax.Array:
  """float32[]: the share of tokens still masked after step `step` (0-based) of `steps`."""
  if masking_schedule not in MASKING_SCHEDULES:
    raise ValueError(f"masking_schedule must be one of {MASKING_SCHEDULES}, "
                     f"got {masking_schedule!r}")
  ratio = (jnp.asarray(step, jnp.float32) + 1) / jnp.float32(steps)
  if masking_schedule == "cosine":
    return jnp.cos(ratio * jnp.float32(math.pi) / 2)
  return 1 - ratio


def gumbel_noise(rng: jax.Array, shape) -> jax.Array:
  """float32[shape]: -log(-log(u)), u ~ U[0, 1), each log's argument clamped at 1e-20."""
  u = jax.random.uniform(rng, shape, jnp.float32)
  return -jnp.log(jnp.maximum(-jnp.log(jnp.maximum(u, _PROB_FLOOR)), _PROB_FLOOR))


def remask(masked: jax.Array, selected_probs: jax.Array, gumbel: jax.Array, step: jax.Array,
           steps: int, temperature: jax.Array, masking_schedule: str = "cosine") -> jax.Array:
  """Which positions the scheduler masks again after step `step`: bool[B, L].

  Args:
    masked: bool[B, L], the positions masked before this step.
    selected_probs: float32[B, L], the probability of the code sampled at each position.
    gumbel: float32[B, L], standard Gumbel noise (`gumbel_noise`).
    step, steps: the 0-based step index and N; at the last step nothing is masked.
    temperature: float32[], the step's Gumbel scale (`temperatures(steps)[step]`).
    masking_schedule: 'cosine' or 'linear'.
  """
  seq_len = masked.shape[-1]
  count = jnp.floor(seq_len * mask_ratio(step, steps, masking_schedule))
  count = jnp.minimum(masked.sum(-1).astype(jnp.float32) - 1, count)
  count = jnp.maximum(count, 1).astype(jnp.int32)
  # Known positions get the largest float, as the release does, so their confidence tops any
  # masked one's.
  probs = jnp.where(masked, selected_probs, jnp.finfo(jnp.float32).max)
  confidence = jnp.log(jnp.maximum(probs, _PROB_FLOOR)) + temperature * gumbel
  cutoff = jnp.take_along_axis(jnp.sort(confidence, axis=-1), count[:, None], axis=-1)
  return (confidence < cutoff) & (step < steps - 1)


def scheduler_step(rng: jax.Array, logits: jax.Array, tokens: jax.Array, step: jax.Array,
                   steps: int, temperature: jax.Array, mask_id: int,
                   masking_schedule: str = "cosine") -> jax.Array:
  """One step of the release's `Scheduler.step`: int32[B, L] tokens (mask = mask_id) and the
  (guided) logits float32[B, L, V] -> the next tokens int32[B, L]."""
  sample_rng, noise_rng = jax.random.split(rng)
  logits = logits.astype(jnp.float32)
  masked = tokens == mask_id
  pred = jax.random.categorical(sample_rng, logits, axis=-1).astype(jnp.int32)
  pred = jnp.where(masked, pred, tokens)
  probs = jax.nn.softmax(logits, axis=-1)
  selected = jnp.take_along_axis(probs, pred[..., None], axis=-1)[..., 0]
  again = remask(masked, selected, gumbel_noise(noise_rng, masked.shape), step, steps,
                 temperature, masking_schedule)
  return jnp.where(again, mask_id, pred)


@flax.struct.dataclass
class _SampleState:
  rng: jax.Array
  tokens: jax.Array  # int32[B, L]


def meissonic_sample(
    logits_fn: TimedLogitsFn,
    rng: jax.Array,
    cond: Any,
    seq_len: int,
    mask_id: int,
    steps: int = SAMPLING_STEPS,
    cfg: float = GUIDANCE_SCALE,
    temperature=TEMPERATURE,
    masking_schedule: str = "cosine",
) -> jax.Array:
  """The release's multi-step sampler (module docstring) as a `lax.fori_loop`.

  Args:
    logits_fn: (tokens int32[B, L], cond, drop bool[B], timestep float32[]) -> float32[B, L, V];
      `drop` rows take the negative prompt (`TextConditioned` does this with `cond`).
    rng: PRNG key.
    cond: the condition pytree, batch-leading (`TextTeacher.condition`).
    seq_len, mask_id: L and the mask id logits_fn expects.
    steps: N (the release samples with 64).
    cfg: guidance scale w; at most 1 means no guidance (no negative-prompt pass), as the
      pipeline.
    temperature: Gumbel scale, a pair (start, end) or a number (`temperatures`).
    masking_schedule: the scheduler config's, 'cosine' or 'linear'.

  Returns:
    int32[B, L] codes, no mask left.
  """
  batch = sampling.condition_batch(cond)
  taus = jnp.asarray(temperatures(steps, temperature))

  def body(i, state: _SampleState) -> _SampleState:
    rng, step_rng = jax.random.split(state.rng)
    # The pipeline's timesteps run N-1 ... 0 and reach the transformer unchanged.
    timestep = (steps - 1 - i).astype(jnp.float32)
    fn = lambda tokens, cond_, drop: logits_fn(tokens, cond_, drop, timestep)
    logits = (sampling.guided_logits(fn, state.tokens, cond, cfg) if cfg > 1
              else fn(state.tokens, cond, jnp.zeros((batch,), bool)))
    tokens = scheduler_step(step_rng, logits, state.tokens, i, steps, taus[i], mask_id,
                            masking_schedule)
    return _SampleState(rng=rng, tokens=tokens)

  init = _SampleState(rng=rng, tokens=jnp.full((batch, seq_len), mask_id, jnp.int32))
  return jax.lax.fori_loop(0, steps, body, init).tokens


def adapter_logits_fn(adapter: TextConditioned, variables: Any) -> TimedLogitsFn:
  """The `meissonic_sample` logits function of a transformer behind `TextConditioned`."""
  def fn(tokens, cond, drop, timestep):
    return dataclasses.replace(adapter, timestep=timestep).apply(variables, tokens, cond, drop)
  return fn


@functools.partial(jax.jit, static_argnames=("adapter", "steps", "cfg", "temperature",
                                             "masking_schedule"))
def _teacher_sample(adapter, variables, rng, cond, steps, cfg, temperature, masking_schedule):
  return meissonic_sample(adapter_logits_fn(adapter, variables), rng, cond, adapter.seq_len,
                          adapter.mask_id, steps, cfg, temperature, masking_schedule)


@functools.partial(jax.jit, static_argnames=("adapter", "fixed_ratio", "gen_temp", "top_k",
                                             "top_p"))
def one_step_sample(adapter: TextConditioned, params: Any, rng: jax.Array, cond: Any,
                    fixed_ratio=0.5, sigma=0.0, gen_temp: float = 1.0, top_k: int = 0,
                    top_p: float = 0.0) -> jax.Array:
  """int32[B, L] codes of a distilled generator in one step, as Di[M]O samples it: x_init
  (`fixed_ratio` of the positions masked, the rest random codes), embedding noise `sigma`,
  no guidance, timestep 0 (the adapter's), then Cat(softmax(z / gen_temp)) with optional top-k /
  top-p filtering.

  Args:
    adapter: the teacher's `TextConditioned` (`TextTeacher.conditioned()`).
    params: the generator's variables {"params": ...} (the transformer's tree).
    rng: PRNG key; cond: `TextTeacher.condition(prompts)` (only hidden, pooled, micro_conds are
      read).
    fixed_ratio, sigma, gen_temp, top_k, top_p: the run's `fixed_ratio`, embedding noise level,
      `gen_temp`, `top_k`, `top_p` (all but sigma are compile-time constants).
  """
  def gen_fn(tokens, cond_, noise_rng):
    return adapter.apply(params, tokens, cond_, emb_noise=sigma, rngs={"noise": noise_rng})
  return sampling.generator_sample(gen_fn, rng, cond, adapter.seq_len, adapter.codebook_size,
                                   adapter.mask_id, fixed_ratio, gen_temp, top_k, top_p)[0]
