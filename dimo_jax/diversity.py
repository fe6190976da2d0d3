"""A mode-covering term of ours (not in Di[M]O or Soft-Di[M]O): the collision probability of two
one-step samples of the same condition from independent x_init.

  C = E_{c, x_init, x_init'} [ mean_l  sum_v p_l(v | x_init, c) p_l(v | x_init', c) ]

p = softmax(z_theta / T) of the generator at two independent inputs. sum_v p_l p'_l is the
probability that the two samples agree at position l, so C is the expected share of positions
where two samples of the same class coincide; its expectation over the inputs is
sum_v pbar_l(v | c)^2, pbar the generator's marginal, i.e. exp(-H_2) of that marginal (Renyi-2
entropy). A generator that dropped modes repeats itself across inputs and has a high C: two
samples of a K-mode mixture coincide with probability about 1/K' when K' modes are used.
Minimizing w * C pushes samples of different inputs apart; Di[M]O's term keeps them in the
teacher's modes, so the balance spreads them over more modes. Its gradient reaches theta through
both samples.
"""

import jax
import jax.numpy as jnp

def collision(logits_a: jax.Array, logits_b: jax.Array, temp: float = 1.0) -> jax.Array:
  """float[B, L, V] logits of two samples per row (same condition, independent inputs) ->
  float32[]: the mean over rows and positions of sum_v p_a(v) p_b(v), p = softmax(z / temp)."""
  p_a = jax.nn.softmax(logits_a.astype(jnp.float32) / temp, axis=-1)
  p_b = jax.nn.softmax(logits_b.astype(jnp.float32) / temp, axis=-1)
  return jnp.mean(jnp.sum(p_a * p_b, axis=-1))
