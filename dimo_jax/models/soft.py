"""Soft tokens: a distribution over the V codes and the mask in place of int token ids.

Soft-Di[M]O shows the teacher (and the tokenizer's decoder) the generator's distribution
p = softmax(z_theta / tau) instead of a sampled token: the input embedding becomes the expected
one, e~ = E^T p. Every teacher module takes either

  tokens int32[B, L] (or [B, h, w]), codebook ids with the mask as id V, or
  probs  float[B, L, V + 1], a distribution over the V codes and the mask (last column),

and a one-hot `probs` embeds exactly as the int tokens it encodes.
"""

import jax
import jax.numpy as jnp


def is_soft(tokens: jax.Array) -> bool:
  """Whether `tokens` is a distribution (a float array) rather than int token ids."""
  return jnp.issubdtype(jnp.asarray(tokens).dtype, jnp.floating)


def one_hot(tokens: jax.Array, codebook_size: int) -> jax.Array:
  """int[B, L] ids (mask = V) -> float32[B, L, V + 1], the distribution that puts all its mass
  on each token."""
  return jax.nn.one_hot(tokens, codebook_size + 1, dtype=jnp.float32)


def check(probs: jax.Array, batch: int, seq_len: int, codebook_size: int) -> jax.Array:
  """`probs` as float[B, L, V + 1], or a ValueError naming the shape expected and found."""
  if probs.shape != (batch, seq_len, codebook_size + 1):
    raise ValueError(f"expected soft tokens of shape {(batch, seq_len, codebook_size + 1)} "
                     f"(a distribution over the {codebook_size} codes and the mask), got "
                     f"{probs.shape}")
  return probs


def embed(table: jax.Array, probs: jax.Array, codebook_size: int, mask_row: int) -> jax.Array:
  """E^T p: float[B, L, V + 1] over the codes (rows 0..V-1 of `table`) and the mask (row
  `mask_row` of `table`, float[N, D]) -> float[B, L, D]."""
  codes = jnp.einsum("blv,vd->bld", probs[..., :codebook_size], table[:codebook_size],
                     precision=jax.lax.Precision.HIGHEST)
  return codes + probs[..., codebook_size:] * table[mask_row]


def lookup(table: jax.Array, codes: jax.Array) -> jax.Array:
  """A tokenizer's codebook lookup: int[...] codes -> table rows float[..., D]; or soft codes
  float[..., N (+ 1)] -> sum_v p_v * table[v] (a mask column past the N codes is dropped: it
  has no codebook vector). The decoders fed this decode soft codes (Soft-Di[M]O's rewards)."""
  if not is_soft(codes):
    return jnp.take(table, codes, axis=0)
  count = table.shape[0]
  if codes.shape[-1] not in (count, count + 1):
    raise ValueError(f"expected soft codes over the {count} codes of the codebook (last "
                     f"dimension {count}, or {count + 1} with the mask), got {codes.shape}")
  return jnp.einsum("...v,vd->...d", codes[..., :count].astype(table.dtype), table,
                    precision=jax.lax.Precision.HIGHEST)
