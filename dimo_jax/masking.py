"""Mask schedules, the forward masking process and Di[M]O's token initialization.

Everything here is a pure function of an explicit `rng`; shapes are static so the functions
trace once under `jit`.

Conventions: `L` visual tokens per image, codebook of `V` codes with ids [0, V), mask id `M`
(= V for the MaskGIT teachers). A *mask ratio* is the share of the `L` positions replaced by
`M`; the forward process always masks exactly round(L * ratio) positions (at least one), as the
reference does, rather than masking each position independently.
"""

import math
from typing import Optional, Tuple

import jax
import jax.numpy as jnp

RATIO_MODES = ("linear", "square", "cosine", "arccos", "mage")

# MAGE's truncated normal over [0.5, 1] for the mask ratio.
_MAGE_MIN, _MAGE_MAX, _MAGE_MU, _MAGE_STD = 0.5, 1.0, 0.55, 0.25


def mask_ratio(u: jax.Array, ratio_mode: str) -> jax.Array:
  """Maps u ~ U[0, 1) to a mask ratio with a deterministic schedule.

  In training, u is the diffusion time and the result the share of tokens hidden from the
  network: `cosine` and `arccos` put most mass on high ratios (mostly masked inputs), `square`
  on low ones.

  Args:
    u: float32[...] in [0, 1).
    ratio_mode: one of linear, square, cosine, arccos (mage is stochastic: see
      `sample_mask_ratio`).

  Returns:
    float32[...] mask ratios in [0, 1].
  """
  if ratio_mode == "linear":
    return u
  if ratio_mode == "square":
    return u**2
  if ratio_mode == "cosine":
    return jnp.cos(u * math.pi / 2)
  if ratio_mode == "arccos":
    return jnp.arccos(u) / (math.pi / 2)
  raise ValueError(f"ratio_mode must be one of {RATIO_MODES[:4]} here, got {ratio_mode!r}")


def sample_mask_ratio(rng: jax.Array, batch_size: int, ratio_mode: str) -> jax.Array:
  """Draws one mask ratio per sequence: float32[batch_size]."""
  if ratio_mode == "mage":
    lower = (_MAGE_MIN - _MAGE_MU) / _MAGE_STD
    upper = (_MAGE_MAX - _MAGE_MU) / _MAGE_STD
    z = jax.random.truncated_normal(rng, lower, upper, (batch_size,))
    return _MAGE_MU + _MAGE_STD * z
  if ratio_mode not in RATIO_MODES:
    raise ValueError(f"ratio_mode must be one of {RATIO_MODES}, got {ratio_mode!r}")
  return mask_ratio(jax.random.uniform(rng, (batch_size,)), ratio_mode)


def num_masked(ratio: jax.Array, seq_len: int) -> jax.Array:
  """round(seq_len * ratio), at least 1: int32[...] (round half to even, as torch does)."""
  return jnp.maximum(jnp.round(seq_len * ratio), 1).astype(jnp.int32)


def random_mask(rng: jax.Array, ratio: jax.Array, batch_size: int, seq_len: int) -> jax.Array:
  """Chooses exactly `num_masked(ratio)` positions per row uniformly at random.

  Args:
    rng: PRNG key.
    ratio: float32[] or float32[batch_size].
    batch_size, seq_len: static sizes.

  Returns:
    bool[batch_size, seq_len], True where the token is masked.
  """
  counts = jnp.broadcast_to(num_masked(ratio, seq_len), (batch_size,))
  # The rank of a position in a random permutation is uniform, so "rank < count" selects a
  # uniformly random subset of exactly `count` positions.
  ranks = jnp.argsort(jax.random.uniform(rng, (batch_size, seq_len)), axis=-1)
  return ranks < counts[:, None]


def forward_mask(
    rng: jax.Array, tokens: jax.Array, ratio_mode: str, mask_id: int
) -> Tuple[jax.Array, jax.Array, jax.Array]:
  """The forward (masking) process q(x_t | x_0) with a ratio drawn from the schedule.

  Args:
    rng: PRNG key.
    tokens: int32[B, L] clean tokens.
    ratio_mode: schedule name (see RATIO_MODES).
    mask_id: id written at masked positions.

  Returns:
    (masked tokens int32[B, L], mask bool[B, L], ratio float32[B]).
  """
  batch_size, seq_len = tokens.shape
  ratio_rng, mask_rng = jax.random.split(rng)
  ratio = sample_mask_ratio(ratio_rng, batch_size, ratio_mode)
  mask = random_mask(mask_rng, ratio, batch_size, seq_len)
  return jnp.where(mask, mask_id, tokens), mask, ratio


def parse_fixed_ratio(fixed_ratio) -> Tuple[float, float]:
  """`fix_0.6` -> (0.6, 0.6); `random_0.1_0.9` -> (0.1, 0.9): the range of r_init.

  A bare number (the Meissonic recipe writes `fixed_ratio: 0.5`) means `fix_<number>`.
  """
  if isinstance(fixed_ratio, (int, float)) and not isinstance(fixed_ratio, bool):
    return float(fixed_ratio), float(fixed_ratio)
  parts = str(fixed_ratio).split("_")
  try:
    if parts[0] == "fix" and len(parts) == 2:
      return float(parts[1]), float(parts[1])
    if parts[0] == "random" and len(parts) == 3:
      return float(parts[1]), float(parts[2])
  except ValueError:
    pass
  raise ValueError("fixed_ratio must look like 'fix_0.6', 'random_0.1_0.9' or 0.6, "
                   f"got {fixed_ratio!r}")


def sample_init_ratio(rng: jax.Array, fixed_ratio) -> jax.Array:
  """r_init for one batch (the reference draws one value per batch): float32[]."""
  low, high = parse_fixed_ratio(fixed_ratio)
  if low == high:
    return jnp.float32(low)
  return jax.random.uniform(rng, (), minval=low, maxval=high)


INIT_CODES = ("uniform", "teacher")  # config.init_codes: where x_init's visible codes come from


def init_tokens(
    rng: jax.Array, batch_size: int, seq_len: int, codebook_size: int, ratio: jax.Array,
    mask_id: int, code_logits: Optional[jax.Array] = None
) -> jax.Array:
  """x_init, the generator's entropy source: random codes, `ratio` of them masked.

  The codes are uniform (Di[M]O), or with `code_logits` float32[batch_size, seq_len, V] drawn
  from Cat(softmax(code_logits)) at each position (`init_codes='teacher'`, ours: the teacher's
  prediction for an all-masked input, so each visible code is a plausible one of its class).

  Returns:
    int32[batch_size, seq_len]; exactly num_masked(ratio) entries per row equal `mask_id`.
  """
  code_rng, mask_rng = jax.random.split(rng)
  if code_logits is None:
    codes = jax.random.randint(code_rng, (batch_size, seq_len), 0, codebook_size,
                               dtype=jnp.int32)
  else:
    codes = jax.random.categorical(jax.random.fold_in(rng, 7), code_logits).astype(jnp.int32)
  mask = random_mask(mask_rng, ratio, batch_size, seq_len)
  return jnp.where(mask, mask_id, codes)


def init_from_tokens(rng: jax.Array, tokens: jax.Array, ratio: jax.Array,
                     mask_id: int) -> jax.Array:
  """An x_init made from data tokens int[B, L]: `ratio` of each row masked as `init_tokens`
  masks, the other positions keeping the row's codes (the data anchor's input, ours)."""
  mask = random_mask(rng, ratio, tokens.shape[0], tokens.shape[1])
  return jnp.where(mask, mask_id, tokens.astype(jnp.int32))


def parse_noise_schedule(noise_emb_perturb: str) -> Tuple[str, float]:
  """`fix_0.1` -> ("fix", 0.1); `warmup_exp_1000` -> ("exp", 1000.); `warmup_1000` is linear."""
  parts = str(noise_emb_perturb).split("_")
  try:
    if parts[0] == "fix" and len(parts) == 2:
      return "fix", float(parts[1])
    if parts[0] == "warmup" and len(parts) == 2:
      return "linear", float(parts[1])
    if parts[0] == "warmup" and len(parts) == 3 and parts[1] in ("linear", "exp", "cos"):
      return parts[1], float(parts[2])
  except ValueError:
    pass
  raise ValueError(
      "noise_emb_perturb must look like 'fix_0.1', 'warmup_linear_N', 'warmup_exp_N' or "
      f"'warmup_cos_N', got {noise_emb_perturb!r}")


def noise_level(noise_emb_perturb: str, iteration: jax.Array) -> jax.Array:
  """sigma, the embedding-noise level at a training iteration: float32[].

  The warm-ups rise from 0 to 1 over N iterations (exp: 1 - exp(-i/N), never quite 1).
  """
  kind, value = parse_noise_schedule(noise_emb_perturb)
  i = jnp.asarray(iteration, jnp.float32)
  if kind == "fix":
    return jnp.float32(value)
  if kind == "linear":
    return jnp.minimum(1.0, i / value)
  if kind == "exp":
    return 1.0 - jnp.exp(-i / value)
  return 1.0 - (1.0 + jnp.cos(math.pi * jnp.minimum(1.0, i / value))) / 2
