"""Soft-Di[M]O's GAN term (dimo_jax/gan.py and its place in distill.py): the re-masking, the two
losses, where gradients go (the discriminator's loss reaches neither theta nor the teacher; the
generator's GAN term reaches theta through the frozen backbone), bit-identical resume with the
discriminator in the state, and every `gan` value checked before any work."""

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dimo_jax import config_check, distill, gan, teachers, train
from dimo_jax.models.maskgit import MaskTransformer
from tests.test_distill_step import _config as step_config
from tests.test_train import restore_latest, tiny_config, tiny_teacher

V, L = 5, 8


def _config(**gan_overrides):
  """tests/test_distill_step.py's step config (V = 5 codes) with the GAN on."""
  c = step_config()
  c.gan.update(weight=1.0, **gan_overrides)
  return c


@pytest.fixture(scope="module")
def setup():
  model = MaskTransformer(codebook_size=V, num_classes=3, seq_len=L, hidden_dim=16, depth=2,
                          num_heads=2, mlp_dim=32)
  variables = model.init({"params": jax.random.PRNGKey(0)}, jnp.zeros((1, L), jnp.int32),
                         jnp.zeros((1,), jnp.int32))
  teacher = teachers.of_module(model, variables)
  # One discriminator round's real batch, as train.RealFeed feeds the step: [rounds, B, ...].
  batch = step_config().train_batch_size
  real = {"tokens": jax.random.randint(jax.random.PRNGKey(5), (1, batch, L), 0, V),
          "cond": (jnp.arange(batch) % 3)[None]}
  return teacher, real


def _state(config, teacher):
  return distill.create_state(config, teacher.variables, jax.random.PRNGKey(1),
                              distill.FROZEN_WITH_EMB, teacher=teacher)


def _norm(tree):
  return float(sum(jnp.sum(jnp.abs(x)) for x in jax.tree_util.tree_leaves(tree)))


def test_remask_masks_round_L_r_positions_with_the_mask_one_hot():
  probs = gan.soft_tokens(jax.random.normal(jax.random.PRNGKey(0), (64, 20, 7)), 1.0)
  assert probs.shape == (64, 20, 8) and np.allclose(probs[..., -1], 0)
  out, ratio = gan.remask(jax.random.PRNGKey(1), probs, 0.95)
  masked = np.asarray(out[..., -1] == 1.0)
  assert np.all((0 <= ratio) & (ratio < 0.95))
  np.testing.assert_array_equal(masked.sum(1), np.round(20 * np.asarray(ratio)))
  np.testing.assert_array_equal(np.asarray(out)[~masked], np.asarray(probs)[~masked])
  assert np.allclose(np.asarray(out)[masked][:, :-1], 0)
  assert masked.sum(1).max() >= 15  # the whole range is drawn


def test_losses_are_the_stated_formulas():
  real, fake = jnp.array([2.0, -1.0]), jnp.array([0.5, -3.0])
  sig = jax.nn.sigmoid
  np.testing.assert_allclose(gan.generator_loss(fake, "ns"), -np.mean(np.log(sig(fake))),
                             rtol=1e-6)
  np.testing.assert_allclose(
      gan.discriminator_loss(real, fake, "ns"),
      -np.mean(np.log(sig(real))) - np.mean(np.log(1 - sig(fake))), rtol=1e-6)
  np.testing.assert_allclose(gan.generator_loss(fake, "hinge"), 1.25, rtol=1e-6)
  np.testing.assert_allclose(gan.discriminator_loss(real, fake, "hinge"),
                             np.mean([0, 2.0]) + np.mean([1.5, 0]), rtol=1e-6)


def test_layers_are_picked_by_depth_fraction():
  assert gan.pick_layers(24, (0.25, 0.5, 0.75, 1.0)) == (5, 11, 17, 23)
  assert gan.pick_layers(1, (0.25, 0.5, 1.0)) == (0,)
  assert gan.pick_layers(3, (1.0,)) == (2,)


def test_the_discriminator_loss_reaches_neither_theta_nor_the_teacher(setup):
  teacher, real = setup
  config = _config()
  state = _state(config, teacher)
  losses = distill.make_losses(config, teacher)
  args = (state.disc_params, state.gen_params, teacher.variables, jax.random.PRNGKey(2),
          jnp.float32(0.1), None, jax.tree_util.tree_map(lambda x: x[0], real))
  to_disc, to_gen, to_teacher = jax.grad(lambda *a: losses.disc(*a)[0], argnums=(0, 1, 2))(*args)
  assert _norm(to_disc) > 1e-4
  assert _norm(to_gen) == 0.0 and _norm(to_teacher) == 0.0


def test_the_gan_term_reaches_theta_through_the_frozen_backbone(setup):
  teacher, real = setup
  with_gan, without = _config(), _config()
  without.gan.weight = 0.0
  state = _state(with_gan, teacher)
  args = (state.gen_params, state.fake_params, state.disc_params, teacher.variables,
          jax.random.PRNGKey(3), jnp.float32(0.1), None)
  grad = lambda config: jax.grad(
      lambda *a: distill.make_losses(config, teacher).generator(*a)[0])(*args)
  loss_gan, metrics = distill.make_losses(with_gan, teacher).generator(*args)
  difference = jax.tree_util.tree_map(lambda a, b: a - b, grad(with_gan), grad(without))
  assert _norm(difference) > 1e-6  # the GAN term moves theta ...
  loss_dimo, _ = distill.make_losses(without, teacher).generator(*args)
  np.testing.assert_allclose(loss_gan, loss_dimo + metrics["loss_gan"], rtol=1e-5)  # ... additively


def test_a_gan_step_updates_the_heads_and_never_the_teacher(setup):
  teacher, real = setup
  config = _config()
  state = _state(config, teacher)
  before = jax.tree_util.tree_map(np.asarray, teacher.variables)
  step = jax.jit(distill.make_train_step(config, teacher))
  new, metrics = step(state, teacher.variables, None, real)
  for key in ("loss_gan", "loss_disc", "d_real", "d_fake"):
    assert np.isfinite(metrics[key])
  moved = jax.tree_util.tree_map(lambda a, b: np.any(a != b), new.disc_params, state.disc_params)
  assert all(jax.tree_util.tree_leaves(moved))
  jax.tree_util.tree_map(np.testing.assert_array_equal, before,
                         jax.tree_util.tree_map(np.asarray, teacher.variables))


def test_a_gan_step_without_real_data_is_refused(setup):
  teacher, _ = setup
  config = _config()
  with pytest.raises(ValueError, match="need real data tokens"):
    distill.make_train_step(config, teacher)(_state(config, teacher), teacher.variables)


def test_dimo_alone_keeps_no_discriminator(setup):
  teacher, _ = setup
  config = _config()
  config.gan.weight = 0.0
  state = _state(config, teacher)
  assert state.disc_params is None and state.disc_opt_state is None
  _, metrics = jax.jit(distill.make_train_step(config, teacher))(state, teacher.variables)
  assert "loss_gan" not in metrics and "loss_disc" not in metrics


def assert_resume_is_bit_identical(tmp_path, config, teacher_path):
  """`config(**overrides)` run 4 steps straight and 2 + 2 resumed ends in the same state, bit
  for bit; returns that state."""
  straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
  train.train_and_evaluate(config(), straight)
  train.train_and_evaluate(config(max_train_steps=2), split)
  train.train_and_evaluate(config(), split)  # resumes at step 2
  step_a, a = restore_latest(straight, config(), teacher_path)
  step_b, b = restore_latest(split, config(), teacher_path)
  assert step_a == step_b == 4
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  return a


def test_resume_is_bit_identical_with_the_gan(tmp_path):
  teacher_path = tiny_teacher(str(tmp_path / "teacher"))
  config = lambda **o: _with_gan(tiny_config(teacher_path, **o))
  a = assert_resume_is_bit_identical(tmp_path, config, teacher_path)
  assert a.disc_params is not None
  fresh = _state(config(), teachers.load(teacher_path))
  assert _norm(jax.tree_util.tree_map(lambda x, y: x - y, a.disc_params, fresh.disc_params)) > 0


def _with_gan(config):
  config.gan.update(weight=1.0, disc_rounds=2)
  return config


@pytest.mark.parametrize("key,value,message", [
    ("loss", "wasserstein", "gan.loss must be one of 'ns', 'hinge'"),
    ("weight", -1.0, "gan.weight must be a number in [0, inf)"),
    ("weight", float("nan"), "gan.weight must be a number"),
    ("r_max", 0.0, "gan.r_max must be a number in (0, 1]"),
    ("r_max", 1.5, "gan.r_max must be a number in (0, 1]"),
    ("tau", 0.0, "gan.tau must be a number in (0, inf)"),
    ("layers", (), "gan.layers must be a non-empty tuple"),
    ("layers", (0.0, 1.0), "gan.layers must be a non-empty tuple"),
    ("head_width", 0, "gan.head_width must be an integer >= 1"),
    ("disc_rounds", 0, "gan.disc_rounds must be an integer >= 1"),
    ("lr", -1e-4, "gan.lr must be a number in (0, inf)"),
    ("adam_beta2", 1.0, "gan.adam_beta2 must be a number in [0, 1)"),
])
def test_every_gan_value_is_checked_before_any_work(tmp_path, key, value, message):
  config = tiny_config(str(tmp_path / "no_teacher_needed"))
  config.gan[key] = value
  start = time.time()
  with pytest.raises(config_check.ConfigError, match=message.replace("(", r"\(").replace(
      ")", r"\)").replace("[", r"\[").replace("]", r"\]")):
    train.train_and_evaluate(config, str(tmp_path / "run"))
  assert time.time() - start < 5 and not (tmp_path / "run" / "checkpoints").exists()


def test_the_gan_needs_a_dataset_with_real_tokens(tmp_path):
  config = tiny_config(str(tmp_path / "t"), dataset="prompts")
  config.gan.weight = 1.0
  with pytest.raises(config_check.ConfigError, match="gan.weight > 0 on prompts needs "
                     "gan.real_tokens, a token dataset made by python -m dimo_jax.tokenize with "
                     "--captions"):
    config_check.check(config)


def test_the_collision_term_is_the_probability_that_two_samples_agree():
  from dimo_jax import diversity
  a = jnp.log(jnp.array([[[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]]]) + 1e-30)
  b = jnp.log(jnp.array([[[0.5, 0.0, 0.5], [0.0, 1.0, 0.0]]]) + 1e-30)
  np.testing.assert_allclose(diversity.collision(a, b), (0.25 + 0.0) / 2, atol=1e-6)
  np.testing.assert_allclose(diversity.collision(a, a), (0.5 + 1.0) / 2, atol=1e-6)
  # descending it moves the second sample's mass away from where the first one's is
  grad = jax.grad(lambda z: diversity.collision(a, z))(jnp.zeros((1, 2, 3)))
  assert grad[0, 1, 0] > 0 and grad[0, 1, 1] < 0


def test_the_diversity_term_is_added_to_the_generator_loss(setup):
  teacher, _ = setup
  config = _config()
  config.gan.weight, config.diversity.weight = 0.0, 2.0
  state = _state(config, teacher)
  args = (state.gen_params, state.fake_params, None, teacher.variables, jax.random.PRNGKey(3),
          jnp.float32(0.1), None)
  total, metrics = distill.make_losses(config, teacher).generator(*args)
  config.diversity.weight = 0.0
  plain, _ = distill.make_losses(config, teacher).generator(*args)
  assert 0 < float(metrics["loss_diversity"]) < 1
  np.testing.assert_allclose(total, plain + 2.0 * L * metrics["loss_diversity"], rtol=1e-5)
  config.diversity.update(weight=2.0, space="features")
  total, metrics = distill.make_losses(config, teacher).generator(*args)
  assert -1 <= float(metrics["loss_diversity"]) <= 1
  np.testing.assert_allclose(total, plain + 2.0 * L * metrics["loss_diversity"], rtol=1e-5)
