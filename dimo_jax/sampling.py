"""Every decode rule, each over a pluggable logits function: MaskGIT's confidence-based
parallel decoding (`maskgit_sample`), MaskBit's (`maskbit_sample`, the release's
modeling/modules/sampling.py), Meissonic's scheduler (`meissonic_sample`, the release's
src/scheduler.py) and the one step of a distilled generator (`generator_sample`).

A `LogitsFn` is `(tokens int32[B, L], labels, drop bool[B]) -> float32[B, L, V]`; the teacher,
the generator and the auxiliary model all reduce to one with `functools.partial`. `labels` is
the condition: int32[B] class labels, or any pytree of batch-leading arrays (a text-to-image
model's prompt encodings, see models/meissonic.TextConditioned).
"""

import math
from typing import Any, Callable, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np

from dimo_jax import masking

LogitsFn = Callable[[jax.Array, Any, jax.Array], jax.Array]


def condition_batch(labels: Any) -> int:
  """B of a condition: the leading size of its (first) array."""
  return jax.tree_util.tree_leaves(labels)[0].shape[0]


def _twice(labels: Any) -> Any:
  return jax.tree_util.tree_map(lambda x: jnp.concatenate([x, x]), labels)


def guided_logits(logits_fn: LogitsFn, tokens: jax.Array, labels: jax.Array, cfg,
                  drop: Optional[jax.Array] = None) -> jax.Array:
  """Classifier-free guidance z_u + w (z_c - z_u), in one batched call.

  Args:
    logits_fn: see module docstring.
    tokens: int32[B, L]; labels: the condition (int32[B] or a pytree, see module docstring).
    cfg: guidance scale w, a Python float or float32[B] (adaptive guidance). A Python 1.0 skips
      the unconditional pass altogether.
    drop: bool[B], rows whose conditional branch is itself unconditional (condition dropout).

  Returns:
    float32[B, L, V].
  """
  batch = tokens.shape[0]
  if drop is None:
    drop = jnp.zeros((batch,), bool)
  if isinstance(cfg, (int, float)) and cfg == 1:
    return logits_fn(tokens, labels, drop)
  both = logits_fn(jnp.concatenate([tokens, tokens]), _twice(labels),
                   jnp.concatenate([drop, jnp.ones((batch,), bool)]))
  cond, uncond = both[:batch], both[batch:]
  w = jnp.reshape(jnp.asarray(cfg, jnp.float32), (-1, 1, 1))
  return uncond + w * (cond - uncond)


def filter_logits(logits: jax.Array, top_k: int = 0, top_p: float = 0.0) -> jax.Array:
  """Top-k then top-p (nucleus) filtering: removed entries become -inf.

  Top-p keeps the smallest prefix of the sorted distribution whose mass reaches p, and always
  the most likely token. 0 disables either filter.
  """
  if top_k > 0:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p > 0.0:
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    # Shift right so the token that crosses p is kept.
    remove_sorted = jnp.concatenate(
        [jnp.zeros_like(cum[..., :1], bool), (cum > top_p)[..., :-1]], axis=-1)
    remove = jnp.zeros_like(remove_sorted).at[
        tuple(jnp.indices(order.shape)[:-1]) + (order,)].set(remove_sorted)
    logits = jnp.where(remove, -jnp.inf, logits)
  return logits


def sample_tokens(rng: jax.Array, logits: jax.Array, temperature: float = 1.0, top_k: int = 0,
                  top_p: float = 0.0) -> jax.Array:
  """x ~ Cat(softmax(filter(logits / temperature))): int32[...] from float[..., V]."""
  logits = filter_logits(logits.astype(jnp.float32) / temperature, top_k, top_p)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


# The multi-step sampler's schedules: the share of tokens revealed at r in [1, 0].
_SCHEDULES = {
    "root": lambda r: 1 - r**0.5,
    "linear": lambda r: 1 - r,
    "square": lambda r: 1 - r**2,
    "cosine": lambda r: np.cos(r * math.pi / 2),
    "arccos": lambda r: np.arccos(r) / (math.pi / 2),
}
SCHED_MODES = tuple(sorted(_SCHEDULES))


def unmask_schedule(steps: int, seq_len: int, sched_mode: str = "arccos") -> np.ndarray:
  """How many tokens the multi-step sampler reveals at each step: int32[steps], summing to L.

  Step i of n reveals a share proportional to the schedule at r = linspace(1, 0, n)[i], at
  least one token, the last step taking whatever is left (the reference's `adap_sche`).
  """
  r = np.linspace(1.0, 0.0, steps)
  if sched_mode not in _SCHEDULES:
    raise ValueError(f"sched_mode must be one of {SCHED_MODES}, got {sched_mode!r}")
  if steps == 1:  # linspace(1, 0, 1) is [1], where every shape is 0: reveal all at once.
    return np.array([seq_len], np.int32)
  share = _SCHEDULES[sched_mode](r)
  counts = np.round(share / share.sum() * seq_len)
  counts[counts == 0] = 1
  counts[-1] += seq_len - counts.sum()
  return counts.astype(np.int32)


@flax.struct.dataclass
class _DecodeState:
  step: jax.Array
  rng: jax.Array
  tokens: jax.Array  # int32[B, L]
  masked: jax.Array  # bool[B, L]


def maskgit_sample(
    logits_fn: LogitsFn,
    rng: jax.Array,
    labels: jax.Array,
    seq_len: int,
    mask_id: int,
    steps: int = 8,
    cfg_w: float = 3.0,
    r_temp: float = 4.5,
    sm_temp: float = 1.0,
    sched_mode: str = "arccos",
) -> jax.Array:
  """MaskGIT's confidence-based parallel decoding, as a `lax.fori_loop`.

  At step i of n every masked token is sampled from the guided prediction (guidance ramped as
  1 + w * i / (n - 1)); its confidence is the log-probability of the sampled code plus Gumbel
  noise of scale r_temp * (1 - i / (n - 1)), so early steps reveal tokens almost at random and
  late ones by confidence. The `unmask_schedule(...)[i]` most confident masked tokens are kept.

  Args:
    logits_fn: see module docstring.
    rng: PRNG key.
    labels: int32[B] or a condition pytree (module docstring).
    seq_len, mask_id: L and the mask token id.
    steps, cfg_w, r_temp, sm_temp, sched_mode: the reference's `sampling_step`, `cfg_w`,
      `r_temp`, `sm_temp` (a multiplier of the logits) and `sched_mode`.

  Returns:
    int32[B, L] codes, no mask left.
  """
  batch = condition_batch(labels)
  schedule = jnp.asarray(unmask_schedule(steps, seq_len, sched_mode))
  ramp_den = max(steps - 1, 1)

  def body(i, state: _DecodeState) -> _DecodeState:
    rng, sample_rng, gumbel_rng = jax.random.split(state.rng, 3)
    ramp = i / ramp_den
    logits = guided_logits(logits_fn, state.tokens, labels, cfg_w * ramp + 1.0)
    log_prob = jax.nn.log_softmax(logits * sm_temp, axis=-1)
    pred = jax.random.categorical(sample_rng, log_prob, axis=-1).astype(jnp.int32)
    conf = jnp.take_along_axis(log_prob, pred[..., None], axis=-1)[..., 0]
    conf = conf + r_temp * (1.0 - ramp) * jax.random.gumbel(gumbel_rng, conf.shape)
    conf = jnp.where(state.masked, conf, -jnp.inf)
    # Keep the k most confident masked tokens; when fewer than k remain, the threshold is
    # -inf and all of them are kept.
    threshold = jax.lax.dynamic_index_in_dim(
        jnp.sort(conf, axis=-1), seq_len - schedule[i], axis=1, keepdims=True)
    reveal = state.masked & (conf >= threshold)
    return _DecodeState(step=state.step + 1, rng=rng,
                        tokens=jnp.where(reveal, pred, state.tokens),
                        masked=state.masked & ~reveal)

  init = _DecodeState(step=jnp.int32(0), rng=rng,
                      tokens=jnp.full((batch, seq_len), mask_id, jnp.int32),
                      masked=jnp.ones((batch, seq_len), bool))
  return jax.lax.fori_loop(0, steps, body, init).tokens


GUIDANCE_ANNEALING = ("none", "linear", "cosine")  # MaskBit's guidance schedules


def maskbit_guidance(step, steps: int, guidance_scale: float, annealing: str = "none",
                     scale_pow: float = 3.0):
  """MaskBit's guidance scale at 0-based step `step` of `steps`: the release's s_i, applied as
  cond + s_i (cond - uncond). 'none': s; 'linear': s i / n; 'cosine': s (1 - cos((i / n)^p pi))
  / 2 with p = scale_pow."""
  if annealing == "none":
    return guidance_scale
  t = step / steps
  if annealing == "linear":
    return guidance_scale * t
  if annealing == "cosine":
    return guidance_scale * (1.0 - jnp.cos((t ** scale_pow) * jnp.pi)) / 2.0
  raise ValueError(f"guidance_annealing must be one of {GUIDANCE_ANNEALING}, got {annealing!r}")


def maskbit_mask_counts(steps: int, seq_len: int, sched_mode: str = "arccos") -> np.ndarray:
  """int32[steps]: floor(L * ratio(progress_i)) with progress_i = (i + 1) / n and the ratio
  clamped to [1e-6, 1], in float32 as the release computes it (`get_masking_ratio`)."""
  if sched_mode not in _SCHEDULES:
    raise ValueError(f"sched_mode must be one of {SCHED_MODES}, got {sched_mode!r}")
  progress = (np.arange(steps, dtype=np.float32) + 1) / np.float32(steps)
  ratio = np.clip(_SCHEDULES[sched_mode](progress).astype(np.float32), 1e-6, 1.0)
  return np.floor(ratio * np.float32(seq_len)).astype(np.int32)


def maskbit_step(tokens: jax.Array, logits: jax.Array, sample_gumbel: jax.Array,
                 conf_gumbel: jax.Array, mask_count: jax.Array, progress: jax.Array,
                 mask_id: int, r_temp: float = 7.8, sm_temp: float = 1.0):
  """One step of MaskBit's `sample` over the L = n * m sub-tokens jointly.

  Every masked sub-token is drawn from softmax(logits * sm_temp) (the Gumbel-max draw with
  `sample_gumbel`); its confidence is the log-probability of the draw plus Gumbel noise
  `conf_gumbel` of scale r_temp (1 - progress), +inf for sub-tokens already known. With k =
  min(max(mask_count, 1), masked - 1) (torch.clamp's order; `masked` counted in the first
  row, as the release does), every sub-token whose confidence is at most the k-th smallest is
  masked again.

  Args:
    tokens: int32[B, L] (mask = mask_id); logits: float32[B, L, V] (guided).
    sample_gumbel: float32[B, L, V]; conf_gumbel: float32[B, L] standard Gumbel noise.
    mask_count: int32[], floor(L * ratio) of this step (`maskbit_mask_counts`).
    progress: float32[], (i + 1) / n.

  Returns:
    (next tokens int32[B, L] with the re-masked sub-tokens, the drawn tokens int32[B, L]).
  """
  probs = jax.nn.softmax(logits.astype(jnp.float32) * sm_temp, axis=-1)
  masked = tokens == mask_id
  drawn = jnp.argmax(jnp.log(probs) + sample_gumbel, axis=-1).astype(jnp.int32)
  pred = jnp.where(masked, drawn, tokens)
  conf = jnp.take_along_axis(probs, pred[..., None], axis=-1)[..., 0]
  conf = jnp.where(masked, jnp.log(conf), jnp.inf) + conf_gumbel * r_temp * (1.0 - progress)
  remaining = masked[0].sum().astype(jnp.int32)
  k = jnp.minimum(jnp.maximum(mask_count, 1), remaining - 1)
  index = jnp.mod(k - 1, tokens.shape[1])  # k = 0 reads the largest, as torch's [-1] does
  threshold = jax.lax.dynamic_index_in_dim(jnp.sort(conf, axis=-1), index, axis=1)
  return jnp.where(conf <= threshold, mask_id, pred), pred


@flax.struct.dataclass
class _MaskBitState:
  rng: jax.Array
  tokens: jax.Array  # int32[B, L], masks included
  drawn: jax.Array  # int32[B, L], the last step's draw


def maskbit_sample(
    logits_fn: LogitsFn,
    rng: jax.Array,
    labels: jax.Array,
    seq_len: int,
    mask_id: int,
    steps: int = 64,
    guidance_scale: float = 7.1,
    r_temp: float = 7.8,
    sm_temp: float = 1.0,
    sched_mode: str = "arccos",
    guidance_annealing: str = "cosine",
    scale_pow: float = 3.0,
) -> jax.Array:
  """MaskBit's decode rule (markweberdev/maskbit modeling/modules/sampling.py `sample`) as a
  `lax.fori_loop` of `maskbit_step`s; the defaults are the 14-bit release's.

  Guidance is cond + s_i (cond - uncond) with s_i from `maskbit_guidance`; 0 makes one
  conditional pass. The last step's draw is returned (its re-masking is moot).

  Returns:
    int32[B, L] sub-token codes, no mask left.
  """
  batch = condition_batch(labels)
  counts = jnp.asarray(maskbit_mask_counts(steps, seq_len, sched_mode))

  def body(i, state: _MaskBitState) -> _MaskBitState:
    rng, sample_rng, conf_rng = jax.random.split(state.rng, 3)
    tokens = state.tokens
    if guidance_scale == 0:
      logits = logits_fn(tokens, labels, jnp.zeros((batch,), bool))
    else:
      scale = maskbit_guidance(i, steps, guidance_scale, guidance_annealing, scale_pow)
      logits = guided_logits(logits_fn, tokens, labels, 1.0 + jnp.asarray(scale, jnp.float32))
    sample_gumbel = jax.random.gumbel(sample_rng, logits.shape, jnp.float32)
    conf_gumbel = jax.random.gumbel(conf_rng, tokens.shape, jnp.float32)
    progress = (i + 1).astype(jnp.float32) / steps
    nxt, pred = maskbit_step(tokens, logits, sample_gumbel, conf_gumbel, counts[i], progress,
                             mask_id, r_temp, sm_temp)
    return _MaskBitState(rng=rng, tokens=nxt, drawn=pred)

  start = jnp.full((batch, seq_len), mask_id, jnp.int32)
  return jax.lax.fori_loop(0, steps, body, _MaskBitState(rng, start, start)).drawn


def generator_sample(
    gen_logits_fn: Callable[..., jax.Array],
    rng: jax.Array,
    labels: jax.Array,
    seq_len: int,
    codebook_size: int,
    mask_id: int,
    fixed_ratio: str = "fix_0.6",
    gen_temp: float = 1.0,
    top_k: int = 0,
    top_p: float = 0.0,
    init_logits: Optional[jax.Array] = None,
):
  """One step of the distilled generator: x_init -> logits -> sampled codes.

  Args:
    gen_logits_fn: `(tokens, labels, noise_rng) -> float32[B, L, V]`, the generator with its
      embedding noise already bound (the noise needs its own rng).
    rng: PRNG key.
    labels: int32[B] or a condition pytree (module docstring).
    seq_len, codebook_size, mask_id: L, V, M.
    fixed_ratio: r_init spec (`fix_0.6`, `random_0.1_0.9`).
    gen_temp, top_k, top_p: sampling of the generator's categorical.
    init_logits: None (x_init's codes uniform), or float32[C, L, V], the logits of each class's
      x_init codes (`init_codes='teacher'`, `samplers.init_code_logits`); `labels` are then
      class labels.

  Returns:
    (codes int32[B, L], logits float32[B, L, V]).
  """
  ratio_rng, init_rng, noise_rng, sample_rng = jax.random.split(rng, 4)
  ratio = masking.sample_init_ratio(ratio_rng, fixed_ratio)
  x_init = masking.init_tokens(init_rng, condition_batch(labels), seq_len, codebook_size, ratio,
                               mask_id, None if init_logits is None else init_logits[labels])
  logits = gen_logits_fn(x_init, labels, noise_rng)
  return sample_tokens(sample_rng, logits, gen_temp, top_k, top_p), logits

# --- Meissonic's scheduler (the release's src/scheduler.py, diffusers' AmusedScheduler) --------
# Starting from all masks, at step i of N (timestep N-1-i):
#   z = z_neg + w (z_cond - z_neg)        guidance with the negative prompt when w > 1
#   x0 ~ Cat(softmax(z)) at every position; positions already known keep their code
#   c = log(max(p(x0), 1e-20)) + tau_i * g    g = -log(-log(u)) (u ~ U[0, 1), both logs clamped
#                                             at 1e-20), tau_i = linspace(2, 0, N)[i]; known
#                                             positions take p = float32 max, so never lose
#   n_i = max(1, min(#masked - 1, floor(L * cos(pi/2 * (i+1)/N))))   ("linear": 1 - (i+1)/N)
#   the n_i positions of lowest confidence are masked again; the last step keeps every code.

# What the release's inference.py and Di[M]O's validation sample with.
MEISSONIC_STEPS = 64
MEISSONIC_CFG = 9.0
MEISSONIC_TEMPERATURE = (2.0, 0.0)
MEISSONIC_SCHEDULES = ("cosine", "linear")  # what the release's Scheduler.step knows
_PROB_FLOOR = 1e-20  # the release clamps probabilities and uniforms here before each log

# logits_fn(tokens int32[B, L] (mask = V), cond, drop bool[B], timestep float32[]) -> [B, L, V]
TimedLogitsFn = Callable[[jax.Array, Any, jax.Array, jax.Array], jax.Array]


def temperatures(steps: int, temperature=MEISSONIC_TEMPERATURE) -> np.ndarray:
  """float32[steps]: the Gumbel scale of each step, as `Scheduler.set_timesteps` lays it out:
  linspace(t0, t1) for a pair, linspace(t, 0.01) for a number."""
  if isinstance(temperature, (tuple, list)):
    return np.linspace(temperature[0], temperature[1], steps, dtype=np.float32)
  return np.linspace(temperature, 0.01, steps, dtype=np.float32)


def mask_ratio(step: jax.Array, steps: int, masking_schedule: str = "cosine") -> jax.Array:
  """float32[]: the share of tokens still masked after step `step` (0-based) of `steps`."""
  if masking_schedule not in MEISSONIC_SCHEDULES:
    raise ValueError(f"masking_schedule must be one of {MEISSONIC_SCHEDULES}, "
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
    steps: int = MEISSONIC_STEPS,
    cfg: float = MEISSONIC_CFG,
    temperature=MEISSONIC_TEMPERATURE,
    masking_schedule: str = "cosine",
) -> jax.Array:
  """The release's multi-step sampler (module docstring) as a `lax.fori_loop`.

  Args:
    logits_fn: (tokens int32[B, L], cond, drop bool[B], timestep float32[]) -> float32[B, L, V];
      `drop` rows take the negative prompt (`TextConditioned` does this with `cond`).
    rng: PRNG key.
    cond: the condition pytree, batch-leading (`teachers.meissonic.prompt_condition`).
    seq_len, mask_id: L and the mask id logits_fn expects.
    steps: N (the release samples with 64).
    cfg: guidance scale w; at most 1 means no guidance (no negative-prompt pass), as the
      pipeline.
    temperature: Gumbel scale, a pair (start, end) or a number (`temperatures`).
    masking_schedule: the scheduler config's, 'cosine' or 'linear'.

  Returns:
    int32[B, L] codes, no mask left.
  """
  batch = condition_batch(cond)
  taus = jnp.asarray(temperatures(steps, temperature))

  def body(i, state: _SampleState) -> _SampleState:
    rng, step_rng = jax.random.split(state.rng)
    # The pipeline's timesteps run N-1 ... 0 and reach the transformer unchanged.
    timestep = (steps - 1 - i).astype(jnp.float32)
    fn = lambda tokens, cond_, drop: logits_fn(tokens, cond_, drop, timestep)
    logits = (guided_logits(fn, state.tokens, cond, cfg) if cfg > 1
              else fn(state.tokens, cond, jnp.zeros((batch,), bool)))
    tokens = scheduler_step(step_rng, logits, state.tokens, i, steps, taus[i], mask_id,
                            masking_schedule)
    return _SampleState(rng=rng, tokens=tokens)

  init = _SampleState(rng=rng, tokens=jnp.full((batch, seq_len), mask_id, jnp.int32))
  return jax.lax.fori_loop(0, steps, body, init).tokens
