"""Soft-Di[M]O on a text-to-image teacher (the digits_text toy): the GAN's real data are the
digits with their own prompts, the classifier reward reads the digit a prompt names, and a run
with both terms trains, checkpoints and evaluates."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from configs import digits as digits_config
from configs import digits_text
from dimo_jax import data, pretrain, rewards, train
from dimo_jax.data import digit_prompts, digits
from dimo_jax.models import soft
from tests.test_digit_prompts import _tiny_config


@pytest.fixture(scope="module")
def teacher_path(tmp_path_factory):
  config = _tiny_config()
  config.num_steps = 20
  return pretrain.pretrain(config, str(tmp_path_factory.mktemp("digits_text")))


def test_real_digits_come_with_a_prompt_naming_them():
  dataset = digit_prompts.DigitPrompts.toy()
  tokens, prompt = data.real_tokens(dataset)
  real_tokens, real_digits = digits.load_digit_tokens()
  np.testing.assert_array_equal(tokens, real_tokens)
  np.testing.assert_array_equal(dataset.prompt_labels[prompt], real_digits)
  assert len(np.unique(prompt % len(digit_prompts.TEMPLATES))) == len(digit_prompts.TEMPLATES)
  # The discriminator's real rows are conditioned on their prompts' encodings, as the step's
  # fed conditions are.
  feed = train.RealFeed(tokens, prompt, dataset.conditions.condition, seed=0, rounds=2, batch=6)
  rows = feed.rows(feed.draws(3))
  index = feed.draws(3) % len(tokens)
  np.testing.assert_array_equal(rows["tokens"], tokens[index])
  fed = dataset.conditions.condition(prompt[index])
  assert sorted(rows["cond"]) == sorted(fed) and rows["cond"]["hidden"].shape[:2] == (2, 6)
  for key in fed:
    np.testing.assert_array_equal(rows["cond"][key], fed[key])


def test_the_text_reward_reads_the_digit_the_prompt_names():
  dataset = digit_prompts.DigitPrompts.toy()
  config = digits_config.get_config()
  by_class = rewards.make_reward(config, data.Digits())
  by_prompt = rewards.make_reward(config, dataset)
  tokens, labels = digits.load_digit_tokens()
  probs = soft.one_hot(jnp.asarray(tokens[:30]), digits.CODEBOOK_SIZE)
  cond = dataset.condition(labels[:30])  # each digit's evaluation prompt
  np.testing.assert_allclose(by_prompt(probs, cond), by_class(probs, jnp.asarray(labels[:30])),
                             rtol=1e-6)
  other = dataset.condition((labels[:30] + 3) % 10)
  assert float(jnp.mean(by_prompt(probs, cond))) > float(jnp.mean(by_prompt(probs, other))) + 2


def test_a_text_run_with_the_gan_and_the_reward_trains_and_evaluates(teacher_path, tmp_path):
  config = digits_text.get_config()
  config.teacher_path = teacher_path
  config.train_batch_size, config.max_train_steps, config.fake_rounds = 8, 3, 1
  config.gan.weight, config.reward.weight, config.tteo.steps = 1.0, 0.1, 2
  config.checkpointing_steps, config.validation_steps, config.validation_metrics = 3, 100, False
  config.eval_samples, config.eval_batch_size, config.eval_seeds, config.sampling_step = (
      20, 10, 1, 2)
  results = train.train_and_evaluate(config, str(tmp_path))
  for name in ("generator_1step", "generator_1step_tteo2"):
    assert 0.0 <= results[name]["accuracy"] <= 1.0
  with open(os.path.join(tmp_path, "checkpoints", "config.json")) as f:
    assert json.load(f)["gan"]["weight"] == 1.0
