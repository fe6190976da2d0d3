"""distill.py: one jitted train step of a toy MaskTransformer, and the pieces around it."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dimo_jax import defaults, distill, divergence, masking, teachers
from dimo_jax.models.maskgit import MaskTransformer

FROZEN = ("tok_emb", "pos_emb", "bias")


def _config(**overrides):
  c = defaults.reference_config()
  c.train_batch_size = 4
  c.mask_value = 5
  c.mixed_precision = "no"
  # A visible update from the first step on (a warm-up would start at LR 0).
  c.lr_scheduler_type = "constant"
  c.generator_lr = 1e-3
  c.fake_lr = 1e-3
  for key, value in overrides.items():
    c[key] = value
  return c


@pytest.fixture(scope="module")
def model():
  return MaskTransformer(codebook_size=5, num_classes=3, seq_len=8, hidden_dim=16, depth=1,
                         num_heads=2, mlp_dim=32)


@pytest.fixture(scope="module")
def teacher(model):
  # The variables as train.py passes them: {"params": {...}}.
  return jax.jit(model.init)({"params": jax.random.PRNGKey(0)}, jnp.zeros((1, 8), jnp.int32),
                             jnp.zeros((1,), jnp.int32))


def _leaves(tree):
  return {jax.tree_util.keystr(path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _is_frozen(name):
  name = name.removeprefix("['params']")
  return any(name.startswith(f"['{top}']") for top in FROZEN)


class Run:
  """A compiled step, the initial state and two steps taken from it."""

  def __init__(self, model, teacher, **overrides):
    self.config = _config(**overrides)
    self.state0 = distill.create_state(self.config, teacher, jax.random.PRNGKey(1),
                                       distill.FROZEN_WITH_EMB)
    # LLVM at -O0 compiles the step in about a third of the time; the numbers barely move.
    self.step = jax.jit(distill.make_train_step(self.config, teachers.of_module(model))).lower(
        self.state0, teacher).compile(compiler_options={"xla_backend_optimization_level": 0})
    self.state1, self.metrics1 = self.step(self.state0, teacher)
    self.state2, self.metrics2 = self.step(self.state1, teacher)


@pytest.fixture(scope="module")
def frozen_run(model, teacher):
  # The step is compiled once for the whole file; dropout off keeps that compile shorter and
  # changes none of the properties checked here.
  return Run(model, teacher, fix_emb_layer=True, distill_dropout=False)


# ----------------------------------------------------------------------------- EMA

def test_ema_rate():
  decay = 0.9999
  for s in [0, 1, 2, 10, 100, 5000, 10**6]:
    expected = min(decay, (1 + s) / (10 + s))
    assert float(distill.ema_rate(decay, jnp.int32(s))) == pytest.approx(expected, rel=1e-6)
  assert float(distill.ema_rate(decay, 0)) == pytest.approx(0.1)
  assert float(distill.ema_rate(0.5, 100)) == pytest.approx(0.5)


def test_ema_after_the_first_steps(frozen_run, teacher):
  run = frozen_run
  assert float(run.metrics1["ema_rate"]) == pytest.approx(0.1)
  ema1, gen1 = _leaves(run.state1.ema_params), _leaves(run.state1.gen_params)
  for name, t in _leaves(teacher).items():
    expected = np.float32(0.1) * t + np.float32(0.9) * gen1[name]
    np.testing.assert_allclose(ema1[name], expected, rtol=1e-6, atol=1e-8, err_msg=name)
  rate = 2 / 11
  ema2, gen2 = _leaves(run.state2.ema_params), _leaves(run.state2.gen_params)
  for name in ema2:
    np.testing.assert_allclose(ema2[name], rate * ema1[name] + (1 - rate) * gen2[name],
                               rtol=1e-6, atol=1e-8, err_msg=name)


# ----------------------------------------------------------------------------- freezing

def test_fix_emb_layer_freezes_embeddings_bias(frozen_run, teacher):
  run = frozen_run
  before = _leaves(teacher)
  assert sum(_is_frozen(n) for n in before) == 3
  for params in (run.state2.gen_params, run.state2.fake_params):
    after = _leaves(params)
    for name, old in before.items():
      if _is_frozen(name):
        np.testing.assert_array_equal(after[name], old, err_msg=name)
      else:
        assert np.any(after[name] != old), f"{name} did not change"
  assert int(run.metrics1["skipped_generator"]) == 0 and int(run.metrics1["skipped_fake"]) == 0
  assert np.isfinite(float(run.metrics1["loss_generator"]))
  assert int(run.state2.step) == 2


def test_without_fix_emb_layer_everything_trains(teacher):
  """The step's generator optimizer without freezing: every leaf moves (all of them at -lr)."""
  # eps 1e-8 so that a 1e-3 gradient gives an Adam step of -lr to 1e-4
  gen_tx, _ = distill.optimizers(_config(fix_emb_layer=False, adam_epsilon=1e-8))
  grads = jax.tree_util.tree_map(lambda p: jnp.full_like(p, 1e-3), teacher)
  updates, _ = jax.jit(gen_tx.update)(grads, gen_tx.init(teacher), teacher)
  for name, update in _leaves(updates).items():
    np.testing.assert_allclose(update, -1e-3, rtol=1e-4, err_msg=name)


def test_trainable_labels_handle_bare_and_wrapped_params(teacher):
  for tree in (teacher, teacher["params"]):
    labels = _leaves(jax.tree_util.tree_map(
        lambda s: s == "frozen", distill.trainable_labels(tree, True)))
    assert {n for n, v in labels.items() if v} == {n for n in labels if _is_frozen(n)}
    assert not any(_leaves(jax.tree_util.tree_map(
        lambda s: s == "frozen", distill.trainable_labels(tree, False))).values())


# ----------------------------------------------------------------------------- skipping

def _poison(params, module):
  def poison(path, leaf):
    name = jax.tree_util.keystr(path)
    return leaf.at[(0,) * leaf.ndim].set(jnp.nan) if module in name and "kernel" in name else leaf
  return jax.tree_util.tree_map_with_path(poison, params)


def test_non_finite_generator_gradient_skips_the_update(frozen_run, teacher):
  run = frozen_run
  bad = run.state0.replace(gen_params=_poison(run.state0.gen_params, "first_layer"))
  new, metrics = run.step(bad, teacher)
  assert int(metrics["skipped_generator"]) == 1
  assert not np.isfinite(float(metrics["loss_generator"]))
  np.testing.assert_array_equal(np.asarray(new.skipped), [1, 0])
  for name, leaf in _leaves(bad.gen_params).items():
    np.testing.assert_array_equal(_leaves(new.gen_params)[name], leaf, err_msg=name)
  for name, leaf in _leaves(bad.gen_opt_state).items():
    np.testing.assert_array_equal(_leaves(new.gen_opt_state)[name], leaf, err_msg=name)
  # The counter accumulates.
  new2, metrics2 = run.step(new.replace(rng=jax.random.PRNGKey(7)), teacher)
  assert int(metrics2["skipped_generator"]) == 2


def test_non_finite_auxiliary_gradient_skips_its_update(frozen_run, teacher):
  run = frozen_run
  bad = run.state0.replace(fake_params=_poison(run.state0.fake_params, "first_layer"))
  new, metrics = run.step(bad, teacher)
  assert int(metrics["skipped_fake"]) == 1
  # The non-finite divergence terms are zeroed, so the generator step itself goes through.
  assert int(metrics["skipped_generator"]) == 0
  for name, leaf in _leaves(bad.fake_params).items():
    np.testing.assert_array_equal(_leaves(new.fake_params)[name], leaf, err_msg=name)


def test_mask_value_must_match_the_model(model):
  with pytest.raises(ValueError):
    distill.make_train_step(_config(mask_value=1024), teachers.of_module(model))


# ----------------------------------------------------------------------------- auxiliary loss

def test_label_smoothed_ce_matches_torch_formula():
  rng = np.random.default_rng(0)
  logits = (2 * rng.standard_normal((3, 7, 5))).astype(np.float32)
  targets = rng.integers(0, 5, (3, 7)).astype(np.int32)
  mask = rng.random((3, 7)) < 0.6
  s = 0.1
  z = logits.astype(np.float64)
  log_p = z - z.max(-1, keepdims=True)
  log_p -= np.log(np.exp(log_p).sum(-1, keepdims=True))
  nll = -np.take_along_axis(log_p, targets[..., None], -1)[..., 0]
  # torch.nn.functional.cross_entropy(label_smoothing=s, ignore_index=..., reduction='mean').
  per_token = (1 - s) * nll + s * np.mean(-log_p, -1)
  expected = per_token[mask].mean()
  got = divergence.label_smoothed_ce(jnp.asarray(logits), jnp.asarray(targets),
                                     jnp.asarray(mask), s)
  assert float(got) == pytest.approx(expected, rel=1e-5)
  plain = divergence.label_smoothed_ce(jnp.asarray(logits), jnp.asarray(targets),
                                       jnp.asarray(mask), 0.0)
  assert float(plain) == pytest.approx(nll[mask].mean(), rel=1e-5)


# ----------------------------------------------------------------------------- learning rates

def _diffusers_constant_with_warmup(step, warmup):
  """diffusers' get_constant_schedule_with_warmup multiplier."""
  return step / max(1.0, warmup) if step < warmup else 1.0


@pytest.mark.parametrize("warmup", [0, 1, 7])
def test_lr_schedule(warmup):
  lr = 3e-4
  c = _config(lr_scheduler_type="constant_with_warmup", lr_warmup_steps=warmup)
  schedule = distill.lr_schedule(c, lr)
  for step in range(12):
    expected = lr * _diffusers_constant_with_warmup(step, warmup)
    assert float(schedule(step)) == pytest.approx(expected, rel=1e-6, abs=1e-12), step
  constant = distill.lr_schedule(_config(lr_scheduler_type="constant"), lr)
  assert float(constant(0)) == pytest.approx(lr)
  with pytest.raises(ValueError):
    distill.lr_schedule(_config(lr_scheduler_type="cosine"), lr)


def test_generator_schedule_advances_fake_rounds_per_update():
  """With a constant gradient the first Adam moments are exact, so each update is -lr_k."""
  lr, warmup, rounds = 1e-2, 10, 3
  c = _config(lr_scheduler_type="constant_with_warmup", lr_warmup_steps=warmup,
              fake_rounds=rounds, generator_lr=lr, fake_lr=lr)
  params = {"w": jnp.zeros((2,), jnp.float32)}
  grads = {"w": jnp.full((2,), 0.5, jnp.float32)}
  for tx, per_update in zip(distill.optimizers(c), (rounds, 1)):
    state, p = tx.init(params), params
    for k in range(6):
      updates, state = tx.update(grads, state, p)
      expected = lr * _diffusers_constant_with_warmup(k * per_update, warmup)
      np.testing.assert_allclose(np.asarray(updates["w"]), -expected, rtol=1e-4, atol=1e-12)
      p = jax.tree_util.tree_map(lambda a, b: a + b, p, updates)


# ----------------------------------------------------------------------------- the reference recipe

def _call_modes(config, model, teacher):
  """(perturbed, deterministic) of every model call of one traced train step, in call order:
  the generator's calls carry the embedding noise, the teacher's and auxiliary model's not."""
  calls = []

  def interceptor(next_fun, args, kwargs, context):
    if isinstance(context.module, MaskTransformer) and context.method_name == "__call__":
      calls.append((kwargs.get("emb_noise") is not None, kwargs.get("deterministic", True)))
    return next_fun(*args, **kwargs)

  state = distill.create_state(config, teacher, jax.random.PRNGKey(0),
                               teachers.of_module(model).frozen_with_emb)
  with nn.intercept_methods(interceptor):
    jax.eval_shape(distill.make_train_step(config, teachers.of_module(model)), state, teacher)
  return calls


@pytest.mark.parametrize("teacher_dropout", [True, False])
def test_teacher_dropout_is_switched_apart_from_the_generator_and_auxiliary(
    model, teacher, teacher_dropout):
  calls = _call_modes(_config(distill_dropout=True, teacher_dropout=teacher_dropout, true_cfg=1.0,
                              fake_rounds=1), model, teacher)
  # generator loss: generator, teacher, auxiliary; auxiliary round: generator, auxiliary.
  assert [perturbed for perturbed, _ in calls] == [True, False, False, True, False]
  assert calls[1] == (False, not teacher_dropout)
  assert all(not det for i, (_, det) in enumerate(calls) if i != 1)


def test_the_reference_defaults_keep_the_teacher_in_train_mode():
  config = defaults.reference_config()
  assert config.distill_dropout and config.teacher_dropout
  # Adam eps 1e-6 under bf16, the generator clipped, the auxiliary model not.
  assert (config.mixed_precision, config.adam_epsilon) == ("bf16", 1e-6)
  assert config.max_grad_norm == 1.0 and config.fake_max_grad_norm == 0.0


def test_the_auxiliary_gradients_are_not_clipped_unless_asked(teacher):
  """Two steps with gradients of norm ~100 then ~1: clipped to norm 1 both look alike to Adam,
  unclipped they do not; the generator clips (max_grad_norm 1), the auxiliary model does not."""
  config = _config(fix_emb_layer=False, adam_epsilon=1e-8)
  gen_tx, fake_tx = distill.optimizers(config)
  unit = jax.tree_util.tree_map(lambda p: jnp.ones_like(p), teacher)
  norm = float(optax.tree.norm(unit))
  big = jax.tree_util.tree_map(lambda g: g * 100.0 / norm, unit)
  small = jax.tree_util.tree_map(lambda g: g / norm, unit)

  def second_update(tx):
    state = tx.init(teacher)
    _, state = tx.update(big, state, teacher)
    updates, _ = tx.update(small, state, teacher)
    return jax.tree_util.tree_leaves(updates)[0]

  def adam_second_update(g1, g2):
    adam = optax.adam(config.fake_lr, config.adam_beta1, config.adam_beta2,
                      eps=config.adam_epsilon)
    state = adam.init(teacher)
    _, state = adam.update(g1, state, teacher)
    return jax.tree_util.tree_leaves(adam.update(g2, state, teacher)[0])[0]

  np.testing.assert_allclose(second_update(fake_tx), adam_second_update(big, small), rtol=1e-5)
  np.testing.assert_allclose(second_update(gen_tx), adam_second_update(small, small), rtol=1e-5)
  clipped_aux = distill.optimizers(_config(fix_emb_layer=False, adam_epsilon=1e-8,
                                           fake_max_grad_norm=1.0))[1]
  np.testing.assert_allclose(second_update(clipped_aux), adam_second_update(small, small),
                             rtol=1e-5)


def test_gradient_accumulation_is_the_mean_of_the_micro_batch_gradients(model, teacher):
  """k = 2 micro-batches: the generator and each auxiliary round update once, with the mean
  of the gradients of two batches drawn with fold_in(key, 0) and fold_in(key, 1), which is the
  gradient of the mean loss over their union (the reference divides each micro-batch loss by
  k before backward)."""
  config = _config(gradient_accumulation_steps=2, fake_rounds=1, max_grad_norm=0.0,
                   distill_dropout=False, teacher_dropout=False)
  t = teachers.of_module(model)
  state = distill.create_state(config, teacher, jax.random.PRNGKey(1), distill.FROZEN_WITH_EMB)
  new, metrics = jax.jit(distill.make_train_step(config, t))(state, teacher)

  losses = distill.make_losses(config, t)
  _, gen_rng, fake_rng = jax.random.split(state.rng, 3)
  sigma = masking.noise_level(config.noise_emb_perturb, 0)
  grad = jax.value_and_grad(losses.generator, has_aux=True)
  parts = [grad(state.gen_params, state.fake_params, None, teacher,
                jax.random.fold_in(gen_rng, i), sigma, None) for i in range(2)]
  mean = jax.tree_util.tree_map(lambda a, b: (a + b) / 2, parts[0][1], parts[1][1])
  gen_tx, fake_tx = distill.optimizers(config)
  updates, _ = gen_tx.update(mean, state.gen_opt_state, state.gen_params)
  expected = optax.apply_updates(state.gen_params, updates)
  for name, value in _leaves(new.gen_params).items():
    np.testing.assert_allclose(value, _leaves(expected)[name], atol=1e-6, err_msg=name)
  np.testing.assert_allclose(metrics["loss_generator"],
                             (parts[0][0][0] + parts[1][0][0]) / 2, rtol=1e-5)
  # One micro-batch alone is another update: the second batch counted.
  updates, _ = gen_tx.update(parts[0][1], state.gen_opt_state, state.gen_params)
  alone = optax.apply_updates(state.gen_params, updates)
  assert max(np.abs(a - b).max() for a, b in zip(
      jax.tree_util.tree_leaves(alone), jax.tree_util.tree_leaves(new.gen_params))) > 1e-6

  fake = jax.value_and_grad(losses.fake, has_aux=True)
  round_rng = jax.random.fold_in(fake_rng, 0)
  parts = [fake(state.fake_params, new.gen_params, jax.random.fold_in(round_rng, i), sigma,
                None)[1] for i in range(2)]
  mean = jax.tree_util.tree_map(lambda a, b: (a + b) / 2, *parts)
  updates, _ = fake_tx.update(mean, state.fake_opt_state, state.fake_params)
  expected = optax.apply_updates(state.fake_params, updates)
  for name, value in _leaves(new.fake_params).items():
    np.testing.assert_allclose(value, _leaves(expected)[name], atol=1e-6, err_msg=name)
