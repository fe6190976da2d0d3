"""The Di[M]O step on a text-to-image teacher: fed prompt encodings, negative-prompt guidance."""

import functools
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dimo_jax import defaults, distill, teachers
from dimo_jax.models.meissonic import MeissonicTransformer, TextConditioned

BATCH, ROUNDS, TEXT_LEN, TEXT_DIM, WIDTH, CODES, GRID = 4, 2, 5, 24, 32, 16, 4


def tiny_model() -> TextConditioned:
  transformer = MeissonicTransformer(
      num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
      joint_attention_dim=TEXT_DIM, pooled_projection_dim=WIDTH, axes_dims_rope=(4, 6, 6),
      vocab_size=CODES + 1, codebook_size=CODES, downsample=False, upsample=False)
  return TextConditioned(transformer, GRID, GRID)


def conditions(seed: int, leading=(BATCH,)):
  """A random condition dict with the given leading axes (prompt, empty and negative prompt)."""
  rng = np.random.default_rng(seed)
  hidden = lambda: rng.normal(size=leading + (TEXT_LEN, TEXT_DIM)).astype(np.float32)
  pooled = lambda: rng.normal(size=leading + (WIDTH,)).astype(np.float32)
  micro = np.broadcast_to(np.float32([1024, 1024, 0, 0, 6]), leading + (5,))
  return {"hidden": hidden(), "pooled": pooled(), "uncond_hidden": hidden(),
          "uncond_pooled": pooled(), "neg_hidden": hidden(), "neg_pooled": pooled(),
          "micro_conds": np.array(micro)}


def tiny_config(**overrides):
  c = defaults.reference_config()
  c.train_batch_size = BATCH
  c.fake_rounds = ROUNDS
  c.mask_value = CODES
  c.fixed_ratio = "fix_0.5"
  c.noise_emb_perturb = "fix_0.3"
  c.ratio_mode = c.ratio_mode_fake = "cosine"
  c.generator_lr = c.fake_lr = 1e-3
  c.lr_warmup_steps = 0
  c.update(overrides)
  return c


@pytest.fixture(scope="module")
def teacher():
  model = tiny_model()
  cond = jax.tree_util.tree_map(lambda x: x[:1], conditions(0))
  variables = model.init({"params": jax.random.PRNGKey(0)},
                         jnp.zeros((1, GRID * GRID), jnp.int32), cond)
  # Perturb every parameter: AdaLN-Zero starts at zero and would hide the condition.
  leaves, tree = jax.tree_util.tree_flatten(variables)
  keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
  leaves = [x + 0.2 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
  return model, jax.tree_util.tree_unflatten(tree, leaves)


@functools.lru_cache(maxsize=None)
def jitted_step(model, true_cfg: float):
  """One compile per guidance scale: the step's config is otherwise the same everywhere."""
  return jax.jit(distill.make_train_step(tiny_config(true_cfg=true_cfg),
                                         teachers.of_module(model)))


def run(model, variables, config, fed, steps: int = 1):
  state = distill.create_state(config, variables, jax.random.PRNGKey(3),
                               teachers.of_module(model).frozen_with_emb)
  step = jitted_step(model, config.true_cfg)
  for _ in range(steps):
    state, metrics = step(state, variables, fed)
  return state, metrics


def fed_conditions(seed: int):
  return {"generator": conditions(seed), "auxiliary": conditions(seed + 1, (ROUNDS, BATCH))}


def max_diff(a, b):
  return max(float(jnp.max(jnp.abs(x - y)))
             for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def test_text_step_trains_the_generator_and_keeps_frozen_layers(teacher):
  model, variables = teacher
  state, metrics = run(model, variables, tiny_config(true_cfg=4.0), fed_conditions(10), steps=2)
  assert all(np.isfinite(float(v)) for v in metrics.values())
  assert int(state.skipped.sum()) == 0
  params, start = state.gen_params["params"], variables["params"]
  for name in ("embed", "mlm_layer"):  # fix_emb_layer, as the reference freezes them
    assert max_diff(params[name], start[name]) == 0.0
  for name in ("transformer_blocks_0", "context_embedder", "cond_embed"):
    assert max_diff(params[name], start[name]) > 0.0
  assert max_diff(state.fake_params["params"]["single_transformer_blocks_0"],
                  start["single_transformer_blocks_0"]) > 0.0


def test_teacher_guidance_uses_the_negative_prompt(teacher):
  """true_cfg != 1: the negative prompt steers the generator; the auxiliary model, unguided and
  without condition dropout (fake_cfg_* = 1), never sees the empty prompt."""
  model, variables = teacher
  base = fed_conditions(20)
  swap = lambda key: {**base, "generator": {**base["generator"],
                                            key: conditions(99)[key]}}
  guided = tiny_config(true_cfg=4.0)
  reference, _ = run(model, variables, guided, base)
  other_negative, _ = run(model, variables, guided, swap("neg_hidden"))
  other_empty, _ = run(model, variables, guided, swap("uncond_hidden"))
  assert max_diff(other_negative.gen_params, reference.gen_params) > 1e-6
  assert max_diff(other_empty.gen_params, reference.gen_params) == 0.0

  unguided = tiny_config(true_cfg=1.0)
  reference, _ = run(model, variables, unguided, base)
  other_negative, _ = run(model, variables, unguided, swap("neg_hidden"))
  assert max_diff(other_negative.gen_params, reference.gen_params) == 0.0


def test_the_release_mask_id_is_accepted_as_mask_value(teacher):
  model, _ = teacher
  teacher = teachers.of_module(model)
  distill.make_train_step(tiny_config(mask_value=CODES), teacher)
  assert set(teacher.mask_values) == {CODES, model.transformer.mask_id}
  distill.make_train_step(tiny_config(mask_value=model.transformer.mask_id), teacher)
  with pytest.raises(ValueError, match="mask_value 3 does not match"):
    distill.make_train_step(tiny_config(mask_value=3), teacher)


def test_accumulated_micro_batches_each_read_their_own_prompts(teacher):
  """gradient_accumulation_steps 2: the fed conditions carry a micro-batch axis before B, and
  micro-batch i is conditioned on its row i: a second row of other prompts gives another
  update than the first row repeated."""
  model, variables = teacher
  config = tiny_config(gradient_accumulation_steps=2)
  step = jax.jit(distill.make_train_step(config, teachers.of_module(model)))
  state = distill.create_state(config, variables, jax.random.PRNGKey(3),
                               teachers.of_module(model).frozen_with_emb)
  rows = conditions(10, (2, BATCH))
  repeated = jax.tree_util.tree_map(lambda x: np.stack([x[0], x[0]]), rows)
  auxiliary = conditions(11, (ROUNDS, 2, BATCH))
  new_rows, metrics = step(state, variables, {"generator": rows, "auxiliary": auxiliary})
  new_repeated, _ = step(state, variables, {"generator": repeated, "auxiliary": auxiliary})
  assert all(np.isfinite(float(v)) for v in metrics.values())
  assert max_diff(new_rows.gen_params, new_repeated.gen_params) > 0.0
  assert max_diff(new_rows.fake_params, state.fake_params) > 0.0
  # The host draws prompts in that layout.
  from dimo_jax.data.digit_prompts import DigitPrompts
  drawn = DigitPrompts.toy().train_conditions(4, BATCH, ROUNDS, 2)
  assert drawn["generator"].shape == (2, BATCH)
  assert drawn["auxiliary"].shape == (ROUNDS, 2, BATCH)
