"""Soft-Di[M]O's rewards through a tokenizer's decoder (dimo_jax/rewards.py): the soft pictures
of one-hot codes are the decoded pictures, the Inception reward is the FID network's
log-probability of the class (through the class map) and reaches the generator's logits, and the
configs that cannot be scored are refused up front. The CLIP reward is in
tests/test_evaluate_text.py, beside the tiny CLIP it needs."""

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import maskgit_imagenet256
from dimo_jax import config_check, data, defaults, modeldir, rewards, tokenizers
from dimo_jax.models import fid_inception, soft
from tests.test_evaluate import random_inception
from tests.test_sample_cli import tiny_tokenizer

V, SIDE = 17, 8  # the tiny tokenizer's codes and code grid (16x16 pixels)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  return tokenizers.load(tiny_tokenizer(str(tmp_path_factory.mktemp("tok") / "vqgan")))


@pytest.fixture(scope="module")
def inception_dir(tmp_path_factory):
  model = fid_inception.FIDInception()
  dst = str(tmp_path_factory.mktemp("inception") / "fid_inception")
  modeldir.write(dst, {"kind": fid_inception.KIND, "config": {}}, random_inception(model))
  return dst


def _codes(seed, batch=2):
  return jnp.asarray(np.random.default_rng(seed).integers(0, V, (batch, SIDE * SIDE)))


def test_soft_pictures_of_one_hot_codes_are_the_decoded_pictures(tokenizer):
  codes = _codes(0)
  pictures = rewards.soft_pictures(None, tokenizer)(tokenizer.variables,
                                                    soft.one_hot(codes, V))
  expected = data.decode_images(tokenizer, np.asarray(codes))
  np.testing.assert_allclose(np.asarray(pictures), expected, atol=1e-5)
  # A mask column counts as nothing; a mixture is another picture.
  probs = 0.5 * soft.one_hot(codes, V) + 0.5 * soft.one_hot(_codes(1), V)
  mixed = rewards.soft_pictures(None, tokenizer)(tokenizer.variables, probs)
  assert np.abs(np.asarray(mixed) - expected).max() > 1e-3


def _inception_config(tmp_path, inception_dir, class_map):
  config = maskgit_imagenet256.get_config()
  config.reward.update(kind="inception", weight=1.0, inception_path=inception_dir,
                       class_map=str(tmp_path / "classes.json"))
  (tmp_path / "classes.json").write_text(json.dumps(class_map))
  return config


def test_the_inception_reward_is_the_log_probability_of_the_mapped_class(
    tokenizer, inception_dir, tmp_path):
  class_map = list(range(7, 1007))  # class c is output c + 7
  config = _inception_config(tmp_path, inception_dir, class_map)
  reward = rewards.make_reward(config, tokenizer=tokenizer)
  codes, labels = _codes(2), jnp.asarray([3, 990])
  value = reward(soft.one_hot(codes, V), labels)
  extractor = fid_inception.load(inception_dir)
  _, logits = extractor(jnp.asarray(data.decode_images(tokenizer, np.asarray(codes))))
  expected = jax.nn.log_softmax(logits)[jnp.arange(2), labels + 7]
  np.testing.assert_allclose(np.asarray(value), np.asarray(expected), rtol=1e-4, atol=1e-4)
  # Its gradient reaches the generator's logits through the soft codes.
  logits = jax.random.normal(jax.random.PRNGKey(0), (2, SIDE * SIDE, V + 1))
  grad = jax.grad(lambda z: rewards.reward_loss(reward, z, labels, 1.0)[0])(logits)
  assert float(jnp.max(jnp.abs(grad))) > 0


@pytest.mark.parametrize("content, message", [
    ("[1, 2, 3]", "expected 1000 integers in \\[0, 1008\\), found 3"),
    ("cat dog", "expected a JSON list or a whitespace-separated list of 1000 integers"),
    (json.dumps([0] * 999 + [1008]), "expected 1000 integers in \\[0, 1008\\)"),
])
def test_a_bad_class_map_is_named(tmp_path, content, message):
  path = tmp_path / "classes.txt"
  path.write_text(content)
  with pytest.raises(ValueError, match=f"{path}: {message}"):
    rewards.read_class_map(str(path))


@pytest.mark.parametrize("kind, dataset, change, message", [
    ("inception", "imagenet256", {"inception_path": ""}, "needs reward.inception_path"),
    ("inception", "imagenet256", {"class_map": ""}, "needs reward.class_map"),
    ("inception", "digits", {}, "reward.kind 'inception' reads the datasets 'imagenet256', "
                                "not 'digits'"),
    ("clip", "imagenet256", {"clip_path": "x"}, "reward.kind 'clip' reads the datasets "
                                                "'prompts', not 'imagenet256'"),
    ("clip", "prompts", {}, "needs reward.clip_path"),
])
def test_an_image_reward_that_cannot_be_scored_is_refused_up_front(
    tmp_path, kind, dataset, change, message):
  (tmp_path / "classes.json").write_text("[]")
  config = ml_collections.ConfigDict(dict(dataset=dataset, reward=defaults.reward_config(),
                                          tteo=ml_collections.ConfigDict(dict(steps=0, lr=0.2))))
  config.reward.update(kind=kind, weight=1.0, inception_path=str(tmp_path),
                       class_map=str(tmp_path / "classes.json"))
  config.reward.update(change)
  assert any(message in p for p in config_check.reward_problems(config)), \
      config_check.reward_problems(config)
  # TTEO alone asks for the same reward.
  config.reward.weight, config.tteo.steps = 0.0, 4
  assert any(message in p for p in config_check.reward_problems(config))
