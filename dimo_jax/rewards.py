"""Soft-Di[M]O's reward term and test-time embedding optimization (arXiv 2509.22925).

  L_reward = -lambda * E[R(Dec(E_Dec^T p), c)],   p = softmax(z_theta / tau)

The reward sees the decoder fed the generator's *soft* codes (`soft_pictures`: the expected
codebook vector, or MaskBit's expected bits), so its gradient reaches z_theta without sampling.
`config.reward.kind` picks R:

  classifier  digits, digits_text: log p(digit | soft image) under a small CNN trained apart
              from the fd/accuracy scorer (metrics/digits.py: an MLP from seed 0; this one is a
              CNN from seed 1), so that the metric is never the reward; the digit is the class
              label, or the one the prompt names.
  inception   imagenet256: log p(class | picture) under the FID Inception network
              (`reward.inception_path`), whose 1008 outputs are not in ImageNet's class order:
              `reward.class_map` names the output of each of the 1000 classes. FID and IS of a
              run trained on this reward are measured by the network it was trained against.
  clip        prompts (Meissonic): 100 * cos(CLIP image embedding, CLIP text embedding of the
              prompt) (`reward.clip_path`): the CLIP score without its clamp at 0, whose
              gradient would vanish on a picture that misses its prompt (ours).

A `Reward` carries its networks' variables apart from its function, so that a jitted step is
given them as an input (a closed-over array would be compiled into the program as a constant).

Test-time embedding optimization (TTEO, `tteo_logits_fn`): at sampling time, N steps of plain
SGD (lr 0.2 in the paper, no clipping) on an offset added to the generator's input embeddings
of x_init, raising the reward of its soft output; then the codes are sampled as usual.
"""

import dataclasses
import functools
import json
import math
from typing import Any, Callable, Optional, Sequence, Tuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

KINDS = ("classifier", "inception", "clip")
# The datasets each kind reads (the reward term, TTEO).
KIND_DATASETS = {"classifier": ("digits", "digits_text"), "inception": ("imagenet256",),
                 "clip": ("prompts",)}
DATASETS = tuple(d for kind in KINDS for d in KIND_DATASETS[kind])
NUM_IMAGENET_CLASSES = 1000


@dataclasses.dataclass(frozen=True)
class Reward:
  """R: `fn(variables, probs float[B, L, V(+1)], cond) -> float32[B]`, with its `variables`.

  cond: class labels int[B], or a text dataset's cond dict, whose `prompt` entry (prompt
  indices) the reward looks its target up by. `reward(probs, cond)` uses the variables it was
  built with; a jitted caller passes them in as `reward(probs, cond, variables)`.
  """
  fn: Callable[[Any, jax.Array, Any], jax.Array]
  variables: Any = None

  def __call__(self, probs: jax.Array, cond: Any, variables: Any = None) -> jax.Array:
    return self.fn(self.variables if variables is None else variables, probs, cond)


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


def make_reward(config: ml_collections.ConfigDict, dataset=None, *, teacher=None,
                tokenizer=None, prompts: Optional[Sequence[str]] = None) -> Reward:
  """The `Reward` of `config.reward` (config_check allows each kind on its KIND_DATASETS).

  dataset: the run's dataset; `teacher` and `tokenizer` decode soft codes (the image kinds;
  the tokenizer defaults to the dataset's), `prompts` the texts the `prompt` indices of a cond
  dict name (the clip kind; default: the dataset's prompts).
  """
  r = config.reward
  if r.kind == "classifier":
    return classifier_reward(r.classifier_seed, getattr(dataset, "prompt_labels", None))
  tokenizer = tokenizer if tokenizer is not None else dataset.tokenizer
  pictures = soft_pictures(teacher, tokenizer)
  if r.kind == "inception":
    from dimo_jax.models import fid_inception
    extractor = fid_inception.load(r.inception_path)
    class_map = jnp.asarray(read_class_map(r.class_map), jnp.int32)

    def inception(variables, probs, labels):
      _, logits = extractor.model.apply(variables["inception"],
                                        pictures(variables["tokenizer"], probs))
      return jnp.take_along_axis(jax.nn.log_softmax(logits), class_map[labels][:, None],
                                 axis=1)[:, 0]
    return Reward(inception, {"tokenizer": tokenizer.variables,
                              "inception": extractor.variables})
  if r.kind == "clip":
    from dimo_jax.convert import clip as clip_convert
    from dimo_jax.models import clip as clip_model
    clip = clip_convert.load_clip(r.clip_path)
    if prompts is None:
      prompts = dataset.conditions.embeddings.prompts[:-1]
    texts = np.concatenate([np.asarray(clip.text_embeds(list(prompts[i:i + 64])))
                            for i in range(0, len(prompts), 64)])

    def clip_reward(variables, probs, cond):
      pixels = clip_model.preprocess(pictures(variables["tokenizer"], probs),
                                     clip.vision.image_size)
      image = clip.vision.apply(variables["clip"], pixels)
      text = variables["texts"][cond["prompt"]]
      cos = jnp.sum(image * text, -1) / (jnp.linalg.norm(image, axis=-1)
                                         * jnp.linalg.norm(text, axis=-1))
      return 100.0 * cos
    return Reward(clip_reward, {"tokenizer": tokenizer.variables,
                                "clip": clip.variables["vision"],
                                "texts": jnp.asarray(texts, jnp.float32)})
  raise ValueError(f"reward.kind must be one of {KINDS}, got {r.kind!r}")


def classifier_reward(seed: int, prompt_digits: Optional[np.ndarray] = None) -> Reward:
  """log p(digit | soft image) under `digit_classifier(seed)`; the digit is the class label,
  or with `prompt_digits` (int[P], the digit each prompt names) that of `cond["prompt"]`."""
  model, params = digit_classifier(seed)
  table = None if prompt_digits is None else jnp.asarray(prompt_digits, jnp.int32)

  def reward(variables, probs, cond):
    labels = cond if table is None else table[cond["prompt"]]
    logits = model.apply(variables, soft_digit_images(probs))
    return jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=1)[:, 0]
  return Reward(reward, jax.tree_util.tree_map(jnp.asarray, flax.core.unfreeze(params)))


def soft_pictures(teacher, tokenizer) -> Callable[[Any, jax.Array], jax.Array]:
  """`(tokenizer variables, probs float[B, L, V(+1)]) -> float32[B, H, W, 3]` in [0, 1] (clipped,
  as the scored pictures are): the tokenizer's decoder fed soft codes, the expected codebook vector of each position (a mask
  column counts as nothing). A MaskBit teacher's sub-token distributions give each position
  its expected bits (+-1 weighted by p, the mask 0), which its LFQ decoder reads directly."""
  from dimo_jax import data
  low, high = data.value_range(tokenizer.description)
  model = tokenizer.model
  maskbit = teacher is not None and teacher.kind.decode == "maskbit"
  if maskbit:
    from dimo_jax.models import maskbit as maskbit_model
    table = jnp.asarray(maskbit_model.bit_table(teacher.model.bits_per_split))

  def fn(variables, probs):
    probs = probs.astype(jnp.float32)
    if maskbit:
      bits = jnp.einsum("blv,vk->blk", probs, table[:probs.shape[-1]])
      bits = bits.reshape(bits.shape[0], -1, teacher.model.codebook_splits * bits.shape[-1])
      side = math.isqrt(bits.shape[1])
      out = model.apply(variables, bits.reshape(-1, side, side, bits.shape[-1]),
                        method=model.decode_bits)
    else:
      side = math.isqrt(probs.shape[1])
      out = model.apply(variables, probs.reshape(-1, side, side, probs.shape[-1]),
                        method=model.decode)
    return jnp.clip((out.astype(jnp.float32) - low) / (high - low), 0.0, 1.0)
  return fn


def read_class_map(path: str) -> np.ndarray:
  """int[1000]: the Inception output of each ImageNet class (sorted-synset order), from a JSON
  list or a text file of 1000 integers (e.g. the `target_class` of each synset in TF's
  imagenet_2012_challenge_label_map_proto). One `ValueError` line names what is wrong."""
  if not path:
    raise ValueError("reward.class_map: the inception reward needs the file that maps each of "
                     "the 1000 ImageNet classes to its FID Inception output")
  with open(path) as f:
    text = f.read()
  try:
    values = json.loads(text) if text.lstrip().startswith("[") else text.split()
    table = np.asarray([int(v) for v in values])
  except (ValueError, TypeError):
    raise ValueError(f"{path}: expected a JSON list or a whitespace-separated list of "
                     f"{NUM_IMAGENET_CLASSES} integers") from None
  from dimo_jax.models import fid_inception
  outputs = fid_inception.NUM_CLASSES
  if table.shape != (NUM_IMAGENET_CLASSES,) or table.min() < 0 or table.max() >= outputs:
    raise ValueError(f"{path}: expected {NUM_IMAGENET_CLASSES} integers in [0, {outputs}), "
                     f"found {table.size} in [{table.min()}, {table.max()}]")
  return table


def reward_loss(reward: Reward, gen_logits: jax.Array, labels: Any, tau: float,
                variables: Any = None) -> Tuple[jax.Array, jax.Array]:
  """(-E[R(softmax(z / tau), c)], E[R]): the generator's reward term and the mean reward."""
  value = jnp.mean(reward(jax.nn.softmax(gen_logits.astype(jnp.float32) / tau), labels,
                          variables))
  return -value, value


def for_tteo(run: ml_collections.ConfigDict, steps: int, lr: Optional[float] = None,
             reward_overrides: Optional[dict] = None, dataset_name: Optional[str] = None,
             dataset=None, teacher=None, tokenizer=None,
             prompts: Optional[Sequence[str]] = None) -> Tuple[int, float, Reward]:
  """(steps, lr, Reward) of test-time embedding optimization of a run's generator (`sample`
  and `evaluate --tteo_steps`): the run's `reward` block (the defaults where a run recorded
  before it lacks keys) updated by `reward_overrides`, checked as config_check checks it, for
  `dataset_name` (default the run's). Raises ValueError naming the first problem before any
  network is read. `lr` defaults to the run's tteo.lr; the rest are `make_reward`'s."""
  from dimo_jax import config_check, data, defaults
  config = run.copy_and_resolve_references()
  with config.unlocked():
    config.reward = defaults.reward_config()
    config.reward.update({k: v for k, v in (run.get("reward") or {}).items()
                          if k in config.reward})
    config.reward.update(reward_overrides or {})
    config.tteo = defaults.tteo_config()
    config.tteo.update({k: v for k, v in (run.get("tteo") or {}).items() if k in config.tteo})
    config.tteo.steps = steps
    if dataset_name is not None:
      config.dataset = dataset_name
  problems = config_check.reward_problems(config)
  if problems:
    raise ValueError(problems[0])
  if dataset is None and config.reward.kind == "classifier":
    dataset = data.get(config, teacher)
  reward = make_reward(config, dataset, teacher=teacher, tokenizer=tokenizer, prompts=prompts)
  return steps, config.tteo.lr if lr is None else lr, reward


def tteo_logits_fn(logits_at: Callable[..., jax.Array], reward: Reward, steps: int, lr: float,
                   temp: float, reward_variables: Any = None) -> Callable[..., jax.Array]:
  """TTEO around a generator: `logits_at(tokens, cond, noise_rng, offset)` (offset None or
  float[B, L, D] added to the input embeddings) -> `(tokens, cond, noise_rng) -> logits` after
  `steps` SGD steps of size `lr` on the offset, ascending sum_b R(softmax(z_b / temp), c_b)
  (R with `reward_variables`, default its own)."""
  def fn(tokens, cond, noise_rng):
    shape = input_embedding_shape(lambda: logits_at(tokens, cond, noise_rng, None, sow=True))

    def objective(offset):
      logits = logits_at(tokens, cond, noise_rng, offset)
      return -jnp.sum(reward(jax.nn.softmax(logits / temp), cond, reward_variables))

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


