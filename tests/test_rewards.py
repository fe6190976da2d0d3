"""Soft-Di[M]O's reward term and test-time embedding optimization (dimo_jax/rewards.py), on
Di[M]O alone (configs/digits_dimo.py): the reference's x_init, where the bundled teacher's one
step leaves the reward room to rise, and a step fed no real data."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import digits_dimo as digits_config
from dimo_jax import config_check, distill, rewards, sampling, teachers
from dimo_jax.data import digits
from dimo_jax.metrics import digits as digit_metrics
from dimo_jax.models import soft


@pytest.fixture(scope="module")
def reward():
  config = digits_config.get_config()
  config.reward.weight = 1.0
  return rewards.make_reward(config, None)


def test_the_reward_classifier_is_not_the_scorer_and_reads_digits(reward):
  model, _ = rewards.digit_classifier(1)
  assert type(model) is not digit_metrics.DigitMLP
  tokens, labels = digits.load_digit_tokens()
  probs = soft.one_hot(jnp.asarray(tokens), digits.CODEBOOK_SIZE)
  log_p = reward(probs, jnp.asarray(labels))
  assert log_p.shape == (len(labels),) and np.all(np.asarray(log_p) <= 0)
  assert float(jnp.mean(jnp.exp(log_p))) > 0.8  # the right class is likely on real digits
  wrong = reward(probs, jnp.asarray((labels + 1) % 10))
  assert float(jnp.mean(log_p)) > float(jnp.mean(wrong)) + 2.0


def test_soft_images_of_one_hot_codes_are_the_digits_pictures():
  tokens, _ = digits.load_digit_tokens()
  probs = soft.one_hot(jnp.asarray(tokens[:20]), digits.CODEBOOK_SIZE)
  np.testing.assert_allclose(rewards.soft_digit_images(probs),
                             digits.tokens_to_images(tokens[:20]), atol=1e-6)


def test_the_reward_term_reaches_the_generator_logits(reward):
  logits = jax.random.normal(jax.random.PRNGKey(0), (4, 64, 17))
  labels = jnp.arange(4)
  grad = jax.grad(lambda z: rewards.reward_loss(reward, z, labels, 1.0)[0])(logits)
  assert float(jnp.max(jnp.abs(grad))) > 1e-4


def test_tteo_raises_the_reward_of_the_generator(reward):
  config = digits_config.get_config()
  teacher = teachers.load(config.teacher_path)
  model, variables = teacher.model, teacher.variables
  labels = jnp.arange(10)
  rng = jax.random.PRNGKey(3)

  def logits_at(tokens, cond, noise_rng, offset=None, sow=False):
    return model.apply(variables, tokens, cond, emb_noise=jnp.float32(0.1), emb_offset=offset,
                       rngs={"noise": noise_rng}, **({"mutable": ["intermediates"]} if sow else {}))

  def mean_reward(fn):
    _, logits = sampling.generator_sample(fn, rng, labels, 64, 17, 17, config.fixed_ratio)
    return float(jnp.mean(reward(jax.nn.softmax(logits), labels)))

  before = mean_reward(logits_at)
  after = mean_reward(rewards.tteo_logits_fn(logits_at, reward, 10, 0.2, 1.0))
  assert after > before + 0.1, (before, after)


@pytest.mark.parametrize("block,key,value,message", [
    ("reward", "weight", -1.0, "reward.weight must be a finite number >= 0"),
    ("reward", "kind", "imagereward", "reward.kind must be one of 'classifier'"),
    ("reward", "tau", 0.0, "reward.tau must be a finite number > 0"),
    ("tteo", "steps", -1, "tteo.steps must be an integer >= 0"),
    ("tteo", "lr", 0.0, "tteo.lr must be a finite number > 0"),
])
def test_every_reward_and_tteo_value_is_checked(block, key, value, message):
  config = digits_config.get_config()
  config[block][key] = value
  with pytest.raises(config_check.ConfigError, match=message):
    config_check.check(config)


def test_the_reward_needs_the_digits():
  config = digits_config.get_config()
  config.dataset, config.reward.weight = "synthetic", 1.0
  with pytest.raises(config_check.ConfigError,
                     match="reward.kind 'classifier' reads the datasets 'digits', 'digits_text', "
                           "not 'synthetic'"):
    config_check.check(config)


def test_a_reward_step_logs_the_reward(reward):
  config = digits_config.get_config()
  config.reward.weight, config.train_batch_size = 1.0, 8
  teacher = teachers.load(config.teacher_path)
  state = distill.create_state(config, teacher.variables, jax.random.PRNGKey(0),
                               teacher.frozen_with_emb, teacher=teacher)
  _, metrics = jax.jit(distill.make_train_step(config, teacher, reward=reward))(
      state, teacher.variables)
  assert float(metrics["reward"]) < 0 and np.isfinite(float(metrics["loss_reward"]))
