"""Soft-Di[M]O's reward term and test-time embedding optimization (arXiv 2509.22925).

  L_reward = -lambda * E[R(Dec(E_Dec^T p), c)],   p = softmax(z_theta / tau)

The reward sees the decoder fed the generator's *soft* codes, so its gradient reaches z_theta
without sampling. What exists here: on the offline digits, whose "decoder" maps code v to the
grey level v / 16, R is the log-probability of the class under a small CNN trained apart from
the fd/accuracy scorer (metrics/digits.py: an MLP from seed 0; this one is a CNN from seed 1),
so that the metric is never the reward. Rewards through a VQGAN decoder (the Inception logits on
ImageNet, CLIP score for text-to-image) are not built yet.

Test-time embedding optimization (TTEO, `tteo_logits_fn`): at sampling time, N steps of plain
SGD (lr 0.2 in the paper, no clipping) on an offset added to the generator's input embeddings
of x_init, raising the reward of its soft output; then the codes are sampled as usual.
"""

import functools
from typing import Any, Callable, Tuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

KINDS = ("classifier",)
DATASETS = ("digits", "digits_text")  # the datasets a reward exists for (the reward term, TTEO)
# (probs [B, L, V], cond) -> float32[B]; cond: class labels int[B], or a text dataset's cond
# dict, whose `prompt` entry (prompt indices) the reward looks its target up by.
Reward = Callable[[jax.Array, Any], jax.Array]


class DigitCNN(nn.Module):
  """8x8 grey digits -> 10 logits: two 3x3 convolutions (the second strided), a dense layer.
  Deliberately not the scorer's MLP."""

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    x = images[..., None]
    x = nn.gelu(nn.Conv(16, (3, 3))(x))
    x = nn.gelu(nn.Conv(32, (3, 3), strides=2)(x))
    x = nn.gelu(nn.Dense(64)(x.reshape(x.shape[0], -1)))
    return nn.Dense(10)(x)


@functools.lru_cache(maxsize=2)
def digit_classifier(seed: int = 1, steps: int = 1500) -> Tuple[DigitCNN, Any]:
  """The reward's classifier, trained on the 1797 digits (grey levels / 16, light input noise,
  AdamW); deterministic for `seed`, about a second on a CPU."""
  from dimo_jax.data import digits
  tokens, labels = digits.load_digit_tokens()
  images = jnp.asarray(digits.tokens_to_images(tokens))
  targets = jax.nn.one_hot(jnp.asarray(labels), 10)
  model = DigitCNN()
  init_rng, train_rng = jax.random.split(jax.random.PRNGKey(seed))
  params = model.init(init_rng, images[:1])
  tx = optax.adamw(1e-3, weight_decay=1e-4)

  def step(carry, rng):
    params, opt_state = carry
    index_rng, noise_rng = jax.random.split(rng)
    index = jax.random.randint(index_rng, (128,), 0, images.shape[0])
    x = images[index] + 0.1 * jax.random.normal(noise_rng, (128, 8, 8))
    grads = jax.grad(lambda p: optax.softmax_cross_entropy(model.apply(p, x),
                                                           targets[index]).mean())(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), None

  @jax.jit
  def train(params, rng):
    (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), jax.random.split(rng, steps))
    return params

  return model, train(params, train_rng)


def soft_digit_images(probs: jax.Array) -> jax.Array:
  """The digits' decoder fed soft codes: float[B, 64, V(+1)] -> float32[B, 8, 8], the expected
  grey level sum_v p_v * v / 16 (a mask column, if any, counts as black)."""
  from dimo_jax.data import digits
  codes = jnp.arange(probs.shape[-1])
  levels = jnp.where(codes < digits.CODEBOOK_SIZE, codes / (digits.CODEBOOK_SIZE - 1.0), 0.0)
  return jnp.einsum("blv,v->bl", probs.astype(jnp.float32), levels).reshape(
      -1, digits.SIDE, digits.SIDE)


def make_reward(config: ml_collections.ConfigDict, dataset) -> Reward:
  """R(probs, cond) -> float32[B] of `config.reward` for `dataset` (config_check allows the
  classifier reward on DATASETS only): log p(digit | soft image), the digit being the class
  label ('digits') or the one the prompt names ('digits_text', by `cond["prompt"]`)."""
  model, params = digit_classifier(config.reward.classifier_seed)
  params = jax.tree_util.tree_map(jnp.asarray, flax.core.unfreeze(params))
  prompt_digits = (jnp.asarray(dataset.prompt_labels, jnp.int32)
                   if hasattr(dataset, "prompt_labels") else None)

  def reward(probs, cond):
    labels = cond if prompt_digits is None else prompt_digits[cond["prompt"]]
    logits = model.apply(params, soft_digit_images(probs))
    return jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=1)[:, 0]
  return reward


def reward_loss(reward: Reward, gen_logits: jax.Array, labels: jax.Array, tau: float
                ) -> Tuple[jax.Array, jax.Array]:
  """(-E[R(softmax(z / tau), c)], E[R]): the generator's reward term and the mean reward."""
  value = jnp.mean(reward(jax.nn.softmax(gen_logits.astype(jnp.float32) / tau), labels))
  return -value, value


def tteo_logits_fn(logits_at: Callable[..., jax.Array], reward: Reward, steps: int, lr: float,
                   temp: float) -> Callable[..., jax.Array]:
  """TTEO around a generator: `logits_at(tokens, cond, noise_rng, offset)` (offset None or
  float[B, L, D] added to the input embeddings) -> `(tokens, cond, noise_rng) -> logits` after
  `steps` SGD steps of size `lr` on the offset, ascending sum_b R(softmax(z_b / temp), c_b)."""
  def fn(tokens, cond, noise_rng):
    shape = input_embedding_shape(lambda: logits_at(tokens, cond, noise_rng, None, sow=True))

    def objective(offset):
      logits = logits_at(tokens, cond, noise_rng, offset)
      return -jnp.sum(reward(jax.nn.softmax(logits / temp), cond))

    offset = jax.lax.fori_loop(0, steps, lambda _, o: o - lr * jax.grad(objective)(o),
                               jnp.zeros(shape, jnp.float32))
    return logits_at(tokens, cond, noise_rng, offset)
  return fn


def input_embedding_shape(apply_sown: Callable[[], Any]) -> Tuple[int, ...]:
  """The shape of the visual input embeddings a teacher module sows as `input_embedding`
  (read without computing): `apply_sown()` calls it with `mutable=["intermediates"]`."""
  _, state = jax.eval_shape(apply_sown)
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(state["intermediates"]))
  for path, value in flat.items():
    if path[-1] == "input_embedding":
      return tuple(value[0].shape)
  raise ValueError("the generator's module sows no input_embedding")


