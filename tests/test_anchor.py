"""Our data anchor (`anchor.weight`, diversity.data_nll): the x_init made from data tokens, the
NLL it scores, its place in the generator's loss (the last batch of the real feed, with the GAN
on too), bit-identical resume with it on, and its values checked before any work."""

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dimo_jax import config_check, distill, diversity, masking, train
from tests.test_gan import (L, V, _norm, _state, assert_resume_is_bit_identical,  # noqa: F401
                            setup)  # the fixture
from tests.test_distill_step import _config as step_config
from tests.test_train import tiny_config, tiny_teacher


def _config(anchor=1.0, **gan):
  c = step_config()
  c.anchor.weight = anchor
  c.gan.update(**gan)
  return c


def test_x_init_from_tokens_keeps_the_codes_where_it_does_not_mask():
  tokens = jax.random.randint(jax.random.PRNGKey(0), (32, 20), 0, V)
  x_init = np.asarray(masking.init_from_tokens(jax.random.PRNGKey(1), tokens, 0.9, V))
  masked = x_init == V
  np.testing.assert_array_equal(masked.sum(1), 18)  # round(20 * 0.9) per row, as init_tokens
  np.testing.assert_array_equal(x_init[~masked], np.asarray(tokens)[~masked])
  assert len({tuple(row) for row in masked}) > 1  # each row its own positions


def test_the_data_nll_is_the_cross_entropy_of_the_tokens():
  logits = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 4))
  tokens = jnp.array([[0, 3, 1], [2, 2, 0]])
  logp = np.asarray(jax.nn.log_softmax(logits))
  expected = -np.mean([logp[b, l, tokens[b, l]] for b in range(2) for l in range(3)])
  np.testing.assert_allclose(diversity.data_nll(logits, tokens), expected, rtol=1e-6)
  # descending it raises the data token's probability and lowers every other one
  grad = np.asarray(jax.grad(diversity.data_nll)(logits, tokens))
  assert grad[0, 1, 3] < 0 and np.all(np.delete(grad[0, 1], 3) > 0)


def _args(state, teacher):
  return (state.gen_params, state.fake_params, state.disc_params, teacher.variables,
          jax.random.PRNGKey(3), jnp.float32(0.1), None, None, None)


def test_the_anchor_is_added_to_the_generator_loss_and_reaches_theta(setup):
  teacher, real = setup
  config = _config(2.0)
  state = _state(config, teacher)
  batch = jax.tree_util.tree_map(lambda x: x[0], real)
  loss_fn = lambda c, b: distill.make_losses(c, teacher).generator(*_args(state, teacher), b)
  total, metrics = loss_fn(config, batch)
  plain, _ = loss_fn(_config(0.0), None)
  assert 0 < float(metrics["loss_anchor"]) < 2 * np.log(V)
  np.testing.assert_allclose(total, plain + 2.0 * L * metrics["loss_anchor"], rtol=1e-5)
  # the data it is given is what it scores: other tokens, another loss and another gradient
  other = {**batch, "tokens": (batch["tokens"] + 1) % V}
  assert float(loss_fn(config, other)[1]["loss_anchor"]) != float(metrics["loss_anchor"])
  grad = lambda b: jax.grad(lambda p: distill.make_losses(config, teacher).generator(
      p, *_args(state, teacher)[1:], b)[0])(state.gen_params)
  assert _norm(jax.tree_util.tree_map(lambda a, b: a - b, grad(batch), grad(other))) > 1e-6


def test_a_step_feeds_the_anchor_the_last_real_batch(setup):
  """With the GAN on, the first `disc_rounds` batches are the discriminator's and the last one
  the anchor's: changing only the last one moves theta's update, changing only the others
  moves the heads and not theta's update."""
  teacher, real = setup
  config = _config(1.0, weight=1.0, disc_rounds=2)
  assert distill.real_rounds(config) == 3 and distill.real_rounds(_config(1.0)) == 1
  assert distill.real_rounds(_config(0.0)) == 0
  fed = jax.tree_util.tree_map(lambda x: jnp.concatenate([x, x, x]), real)
  shift = lambda rounds: {**fed, "tokens": fed["tokens"].at[rounds].set(
      (fed["tokens"][rounds] + 1) % V)}
  state = _state(config, teacher)
  step = jax.jit(distill.make_train_step(config, teacher))
  base, metrics = step(state, teacher.variables, None, fed)
  last, _ = step(state, teacher.variables, None, shift(slice(2, 3)))
  first, _ = step(state, teacher.variables, None, shift(slice(0, 2)))
  assert np.isfinite(metrics["loss_anchor"]) and np.isfinite(metrics["loss_disc"])
  diff = lambda a, b: _norm(jax.tree_util.tree_map(lambda x, y: x - y, a, b))
  assert diff(base.gen_params, last.gen_params) > 0
  assert diff(base.gen_params, first.gen_params) == 0
  assert diff(base.disc_params, first.disc_params) > 0
  with pytest.raises(ValueError, match="need real data tokens"):
    distill.make_train_step(_config(1.0), teacher)(_state(_config(1.0), teacher),
                                                   teacher.variables)


def test_the_anchor_weight_decays_linearly_to_zero_when_asked(setup):
  steps = jnp.array([0, 250, 500, 1000, 2000])
  np.testing.assert_allclose(distill.anchor_weight(_config(0.2), steps), 0.2)
  config = _config(0.2)
  config.anchor.decay_steps = 1000
  np.testing.assert_allclose(distill.anchor_weight(config, steps), [0.2, 0.15, 0.1, 0, 0],
                             atol=1e-7)
  # the step weighs the term by it: at step 1000 the generator's loss is Di[M]O's alone
  teacher, real = setup
  state = _state(config, teacher).replace(step=jnp.int32(1000))
  _, metrics = jax.jit(distill.make_train_step(config, teacher))(state, teacher.variables,
                                                                 None, real)
  assert float(metrics["anchor_weight"]) == 0.0
  np.testing.assert_allclose(metrics["loss_generator"], metrics["loss_dm"], rtol=1e-6)


def test_resume_is_bit_identical_with_the_anchor(tmp_path):
  teacher_path = tiny_teacher(str(tmp_path / "teacher"))

  def config(**overrides):
    c = tiny_config(teacher_path, **overrides)
    c.anchor.weight = 0.5
    return c
  assert_resume_is_bit_identical(tmp_path, config, teacher_path)


@pytest.mark.parametrize("value,dataset,message", [
    (-1.0, "digits", "anchor.weight must be a finite number >= 0, found -1.0"),
    (float("nan"), "digits", "anchor.weight must be a finite number >= 0"),
    (1.0, "prompts", "anchor.weight > 0 on prompts needs gan.real_tokens"),
    ((1.0, -1), "digits", "anchor.decay_steps must be an integer >= 0, found -1"),
])
def test_every_anchor_value_is_checked_before_any_work(tmp_path, value, dataset, message):
  config = tiny_config(str(tmp_path / "no_teacher_needed"), dataset=dataset)
  config.anchor.weight, config.anchor.decay_steps = value if isinstance(value, tuple) else (
      value, 0)
  start = time.time()
  with pytest.raises(config_check.ConfigError, match=message):
    train.train_and_evaluate(config, str(tmp_path / "run"))
  assert time.time() - start < 5 and not (tmp_path / "run" / "checkpoints").exists()
