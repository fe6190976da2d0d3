"""Mode-covering terms of ours (not in Di[M]O or Soft-Di[M]O).

The data anchor (`anchor.weight`, `data_nll`): the NLL of real data tokens under the generator
fed an x_init made from them (see `data_nll`).

The two-sample terms (`diversity.weight`), on two one-step samples of the same condition from
independent x_init (`diversity.space`):

'tokens': their collision probability

  C = E_{c, x_init, x_init'} [ mean_l  sum_v p_l(v | x_init, c) p_l(v | x_init', c) ]

p = softmax(z_theta / T) of the generator at two independent inputs. sum_v p_l p'_l is the
probability that the two samples agree at position l, so C is the expected share of positions
where two samples of the same class coincide; its expectation over the inputs is
sum_v pbar_l(v | c)^2, pbar the generator's marginal, i.e. exp(-H_2) of that marginal (Renyi-2
entropy). A generator that dropped modes repeats itself across inputs and has a high C: two
samples of a K-mode mixture coincide with probability about 1/K' when K' modes are used.
Minimizing w * C pushes samples of different inputs apart; Di[M]O's term keeps them in the
teacher's modes. Its gradient reaches theta through both samples.

'features': the cosine similarity of their mean last-layer features in the frozen teacher
(fed the soft tokens, as the GAN's discriminator is): token-level agreement is dominated by
the positions two samples of one mode share, so lowering it adds noise inside a mode; the
teacher's features abstract the corruption away, so moving apart there was meant to mean
another mode.

Measured on the six-mode mixture (docs/experiments.md, "Soft-Di[M]O"), neither recovers modes:
'tokens' spreads samples within their modes, 'features' loses modes. Both are off by default.
"""

import jax
import jax.numpy as jnp


def collision(logits_a: jax.Array, logits_b: jax.Array, temp: float = 1.0) -> jax.Array:
  """float[B, L, V] logits of two samples per row (same condition, independent inputs) ->
  float32[]: the mean over rows and positions of sum_v p_a(v) p_b(v), p = softmax(z / temp)."""
  p_a = jax.nn.softmax(logits_a.astype(jnp.float32) / temp, axis=-1)
  p_b = jax.nn.softmax(logits_b.astype(jnp.float32) / temp, axis=-1)
  return jnp.mean(jnp.sum(p_a * p_b, axis=-1))


def data_nll(logits: jax.Array, tokens: jax.Array) -> jax.Array:
  """The data anchor (`anchor.weight`): float[B, L, V] generator logits at an x_init made from
  data tokens int[B, L] (`masking.init_from_tokens`) -> float32[], the mean NLL per token of
  those tokens, -mean log softmax(z)[x_0].

  With q(x_init | x_0) the masking of x_0 and p(x_init) the generator's prior over inputs,
  log p_theta(x_0) >= E_q[log p_theta(x_0 | x_init)] - KL(q || p), and KL does not depend on
  theta: lowering this NLL raises a bound on the generator's likelihood of the data, a
  forward-KL (mode-covering) pull. A mode no input reaches costs its samples' NLL in full,
  and the codes x_0 shows are what point an input at its mode.
  """
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  picked = jnp.take_along_axis(logp, tokens.astype(jnp.int32)[..., None], axis=-1)
  return -jnp.mean(picked)


def feature_similarity(features_a: jax.Array, features_b: jax.Array) -> jax.Array:
  """float[B, T, D] teacher features of two samples per row -> float32[]: the mean over rows
  of the cosine similarity of their position-averaged features."""
  a = jnp.mean(features_a.astype(jnp.float32), axis=1)
  b = jnp.mean(features_b.astype(jnp.float32), axis=1)
  a = a / jnp.linalg.norm(a, axis=-1, keepdims=True).clip(1e-6)
  b = b / jnp.linalg.norm(b, axis=-1, keepdims=True).clip(1e-6)
  return jnp.mean(jnp.sum(a * b, axis=-1))
