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

KINDS = ["maskgit", "google-maskgit", "meissonic", "maskbit"]


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
  assert len(features) == {"maskgit": 1, "google-maskgit": 1, "meissonic": 2,
                           "maskbit": 1}[name]
  assert all(f.shape[0] == 3 and f.ndim == 3 for f in features)


def _tiny_tokenizers():
  from dimo_jax.models import diffusers_vq, google_vqgan, taming_vqgan
  return {
      "taming-vqgan": taming_vqgan.VQModel(ch=32, out_ch=3, ch_mult=(1, 2), num_res_blocks=1,
                                           attn_resolutions=(), in_channels=3, resolution=16,
                                           z_channels=4, n_embed=17, embed_dim=4),
      "google-vqgan": google_vqgan.VQGAN(filters=32, num_res_blocks=1, channel_multipliers=(1, 2),
                                         embedding_dim=4, codebook_size=17),
      "diffusers-vq": diffusers_vq.VQModel(in_channels=3, out_channels=3,
                                           block_out_channels=(32, 64), layers_per_block=1,
                                           latent_channels=4, num_vq_embeddings=17,
                                           vq_embed_dim=4, norm_num_groups=8),
  }


@pytest.mark.parametrize("kind", ["taming-vqgan", "google-vqgan", "diffusers-vq"])
def test_tokenizers_decode_soft_codes(kind):
  model = _tiny_tokenizers()[kind]
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)))
  codes = jax.random.randint(jax.random.PRNGKey(1), (2, 4, 4), 0, 17)
  decode = lambda c: model.apply(variables, c, method=model.decode)
  hard = decode(codes)
  for width in (17, 18):  # the codes alone, or with a mask column
    np.testing.assert_allclose(decode(jax.nn.one_hot(codes, width)), hard, atol=1e-5)
  # a mixture decodes the expected codebook vector, not the expected picture
  other = (codes + 1) % 17
  half = decode(0.5 * jax.nn.one_hot(codes, 17) + 0.5 * jax.nn.one_hot(other, 17))
  assert np.max(np.abs(half - 0.5 * (hard + decode(other)))) > 1e-4
