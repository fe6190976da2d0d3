"""Soft tokens through the teacher contract: every kind embeds a distribution over the V codes
and the mask as E^T p, so that a one-hot distribution gives the int-token forward (masks
included) and a mixture gives the mixture of embeddings, not of logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dimo_jax import gan, teachers
from dimo_jax.models import soft
from tests.test_teacher_contract import tiny_modules

KINDS = ["maskgit", "google-maskgit", "meissonic"]


def _teacher(name):
  teacher = teachers.of_module(tiny_modules()[name])
  variables = teacher.init_variables(jax.random.PRNGKey(1))
  # Perturb every parameter, so that no zero-initialized bias hides a wrong row of the table.
  leaves, tree = jax.tree_util.tree_flatten(variables)
  keys = jax.random.split(jax.random.PRNGKey(2), len(leaves))
  leaves = [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
  return teachers.Teacher(teacher.model, jax.tree_util.tree_unflatten(tree, leaves),
                          teacher.description)


def _tokens(teacher, batch=3):
  tokens = jax.random.randint(jax.random.PRNGKey(3), (batch, teacher.seq_len), 0,
                              teacher.codebook_size)
  masked = jax.random.bernoulli(jax.random.PRNGKey(4), 0.4, tokens.shape)
  return jnp.where(masked, teacher.mask_id, tokens).at[:, 0].set(teacher.mask_id)


@pytest.mark.parametrize("name", KINDS)
def test_one_hot_soft_tokens_equal_the_int_forward(name):
  teacher = _teacher(name)
  tokens, cond = _tokens(teacher), teacher.example_condition(3)
  fn = teacher.logits_fn(teacher.variables)
  hard = fn(tokens, cond, None)
  probs = soft.one_hot(tokens, teacher.codebook_size)
  np.testing.assert_allclose(fn(probs, cond, None), hard, atol=1e-5, rtol=1e-5)
  # and not by accident: another token at one position changes the output
  other = soft.one_hot(tokens.at[:, 1].set((tokens[:, 1] + 1) % teacher.codebook_size),
                       teacher.codebook_size)
  assert np.max(np.abs(fn(other, cond, None) - hard)) > 1e-3


@pytest.mark.parametrize("name", KINDS)
def test_a_mixture_embeds_the_mixture_of_embeddings(name):
  teacher = _teacher(name)
  cond = teacher.example_condition(3)
  a, b = _tokens(teacher), jnp.full((3, teacher.seq_len), teacher.mask_id)
  pa, pb = (soft.one_hot(t, teacher.codebook_size) for t in (a, b))
  fn = teacher.logits_fn(teacher.variables)
  half = fn(0.5 * pa + 0.5 * pb, cond, None)
  assert half.shape == (3, teacher.seq_len, teacher.codebook_size)
  assert np.all(np.isfinite(half))
  # a nonlinear network: the mixture's logits are not the logits' average
  assert np.max(np.abs(half - 0.5 * (fn(pa, cond, None) + fn(pb, cond, None)))) > 1e-4


@pytest.mark.parametrize("name", KINDS)
def test_soft_tokens_of_another_shape_are_named(name):
  teacher = _teacher(name)
  probs = jnp.ones((3, teacher.seq_len, teacher.codebook_size)) / teacher.codebook_size
  with pytest.raises(ValueError, match="distribution over the 16 codes and the mask"):
    teacher.logits_fn(teacher.variables)(probs, teacher.example_condition(3), None)


@pytest.mark.parametrize("name", KINDS)
def test_every_layer_is_sown_for_the_discriminator(name):
  teacher = _teacher(name)
  probs = soft.one_hot(_tokens(teacher), teacher.codebook_size)
  _, state = teacher.model.apply(teacher.variables, probs, teacher.example_condition(3), None,
                                 mutable=["intermediates"])
  features = gan.layer_features(state["intermediates"])
  assert len(features) == {"maskgit": 1, "google-maskgit": 1, "meissonic": 2}[name]
  assert all(f.shape[0] == 3 and f.ndim == 3 for f in features)
