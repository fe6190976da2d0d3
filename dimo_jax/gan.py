"""Soft-Di[M]O's GAN term (Zhu et al., arXiv 2509.22925): a discriminator made of the frozen
teacher's backbone and small trainable heads, shown the generator's *distribution*.

  fake:  p = softmax(z_theta / tau) over the V codes (mask column 0)     float32[B, L, V + 1]
  real:  one_hot(x_0) of data tokens x_0                                 float32[B, L, V + 1]
  both re-masked at r ~ U[0, r_max): round(L * r) positions become the mask (one-hot)
  D(p, c, r) = mean over the chosen layers l of  mean over positions of
               head_l(LN(h_l(E^T p, c)), r)                              float32[B]
  h_l: the teacher's layer-l output (eval mode, frozen); E^T p its soft input embedding.

  generator:      L_GAN = E[-log sigmoid D(fake)]            ('ns'; 'hinge': E[-D(fake)])
  discriminator:  E[-log sigmoid D(real)] + E[-log(1 - sigmoid D(fake))]
                                         ('hinge': E[relu(1 - D(real))] + E[relu(1 + D(fake))])

The paper states the backbone, the heads on several layers, the soft fake input, the re-masking
range and L_GAN. Ours, where it is silent: the head (LayerNorm, Dense to `head_width`, plus a
Dense embedding of r, GELU, Dense to one logit a position, averaged), the layers (fractions of
the depth), the discriminator's loss (non-saturating by default, hinge as an option), its
optimizer, and that the backbone runs in eval mode. The discriminator's loss never reaches the
generator (its fake input is cut from the graph), and the backbone is never updated (its
features are cut from the graph in the discriminator's update; the generator's gradient flows
through them to p, not into them).
"""

import math
import re
from typing import Any, Callable, List, Sequence, Tuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

LOSSES = ("ns", "hinge")
_LAYER = re.compile(r"layer_(\d+)$")


def layer_features(intermediates: Any) -> List[jax.Array]:
  """The outputs every teacher kind sows as `layer_<i>`, in layer order: [float[B, T, D]]."""
  found = {}
  for path, value in flax.traverse_util.flatten_dict(flax.core.unfreeze(intermediates)).items():
    match = _LAYER.match(str(path[-1]))
    if match:
      found[int(match.group(1))] = value[0] if isinstance(value, tuple) else value
  return [found[i] for i in sorted(found)]


def pick_layers(num_layers: int, fractions: Sequence[float]) -> Tuple[int, ...]:
  """The layer indices at `fractions` of the depth (1.0: the last layer), without repeats."""
  return tuple(sorted({min(num_layers - 1, max(0, math.ceil(f * num_layers) - 1))
                       for f in fractions}))


def soft_tokens(logits: jax.Array, tau: float) -> jax.Array:
  """float[B, L, V] generator logits -> float32[B, L, V + 1]: softmax(z / tau), no mass on the
  mask (the generator never emits it)."""
  probs = jax.nn.softmax(logits.astype(jnp.float32) / tau, axis=-1)
  return jnp.pad(probs, ((0, 0), (0, 0), (0, 1)))


def remask(rng: jax.Array, probs: jax.Array, r_max: float) -> Tuple[jax.Array, jax.Array]:
  """Masks round(L * r) positions of each row (r ~ U[0, r_max), uniform positions): their
  distribution becomes the mask's one-hot. -> (float32[B, L, V + 1], r float32[B])."""
  ratio_rng, order_rng = jax.random.split(rng)
  batch, length, width = probs.shape
  ratio = jax.random.uniform(ratio_rng, (batch,), maxval=r_max)
  count = jnp.round(length * ratio).astype(jnp.int32)
  rank = jnp.argsort(jnp.argsort(jax.random.uniform(order_rng, (batch, length)), axis=1), axis=1)
  masked = rank < count[:, None]
  mask = jax.nn.one_hot(width - 1, width, dtype=probs.dtype)
  return jnp.where(masked[..., None], mask, probs), ratio


class Heads(nn.Module):
  """One small head per chosen layer: [float[B, T, D]] features, float32[B] ratio ->
  float32[B] logits (the heads' mean)."""
  width: int = 128

  @nn.compact
  def __call__(self, features: Sequence[jax.Array], ratio: jax.Array) -> jax.Array:
    # r and its Fourier features, so that a head can tell a lightly from a heavily masked input.
    freqs = jnp.arange(1, 5, dtype=jnp.float32) * jnp.pi
    r = jnp.concatenate([ratio[:, None], jnp.sin(ratio[:, None] * freqs),
                         jnp.cos(ratio[:, None] * freqs)], axis=-1)
    logits = []
    for i, h in enumerate(features):
      h = nn.LayerNorm(name=f"norm_{i}")(h.astype(jnp.float32))
      h = nn.Dense(self.width, name=f"hidden_{i}")(h)
      h = nn.gelu(h + nn.Dense(self.width, name=f"ratio_{i}")(r)[:, None])
      logits.append(jnp.mean(nn.Dense(1, name=f"out_{i}")(h)[..., 0], axis=1))
    return jnp.mean(jnp.stack(logits), axis=0)


def backbone_features(model: Any, teacher_params: Any, probs: jax.Array, cond: Any,
                      fractions: Sequence[float]) -> List[jax.Array]:
  """The teacher's (eval mode) outputs of the layers at `fractions` of its depth, for soft
  tokens float[B, L, V + 1]: [float[B, T, D]]."""
  _, state = model.apply(teacher_params, probs, cond, None, deterministic=True,
                         mutable=["intermediates"])
  features = layer_features(state["intermediates"])
  return [features[i] for i in pick_layers(len(features), fractions)]


def init_heads(rng: jax.Array, heads: Heads, model: Any, teacher_params: Any, cond: Any,
               seq_len: int, codebook_size: int, fractions: Sequence[float]) -> Any:
  """Fresh variables of `heads` for the teacher's features (shapes read without computing)."""
  probs = jnp.zeros((1, seq_len, codebook_size + 1), jnp.float32)
  features = jax.eval_shape(lambda p: backbone_features(model, p, probs, cond, fractions),
                            teacher_params)
  zeros = [jnp.zeros(f.shape, jnp.float32) for f in features]
  return heads.init(rng, zeros, jnp.zeros((1,), jnp.float32))


def make_discriminator(model: Any, heads: Heads, fractions: Sequence[float]
                       ) -> Callable[..., jax.Array]:
  """D(disc_params, teacher_params, probs, cond, ratio, cut_features=False) -> float32[B].

  `model` is the teacher's module (the shared call of teachers/__init__.py); `cut_features`
  stops the gradient at the features (the discriminator's own update needs none through the
  backbone).
  """
  def discriminator(disc_params, teacher_params, probs, cond, ratio, cut_features=False):
    features = backbone_features(model, teacher_params, probs, cond, fractions)
    if cut_features:
      features = jax.lax.stop_gradient(features)
    return heads.apply(disc_params, features, ratio)
  return discriminator


def generator_loss(d_fake: jax.Array, loss: str) -> jax.Array:
  """L_GAN of the generator: E[-log sigmoid D(fake)] ('ns') or E[-D(fake)] ('hinge')."""
  if loss == "hinge":
    return -jnp.mean(d_fake)
  return jnp.mean(jax.nn.softplus(-d_fake))


def discriminator_loss(d_real: jax.Array, d_fake: jax.Array, loss: str) -> jax.Array:
  """The discriminator's loss on real and fake logits float32[B] (module docstring)."""
  if loss == "hinge":
    return jnp.mean(jax.nn.relu(1.0 - d_real)) + jnp.mean(jax.nn.relu(1.0 + d_fake))
  return jnp.mean(jax.nn.softplus(-d_real)) + jnp.mean(jax.nn.softplus(d_fake))
