"""divergence.py against numpy: the token-level gradients and the surrogate loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dimo_jax import divergence

V = 6


def _softmax(z):
  z = z - z.max(-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(-1, keepdims=True)


def _kl(p, q):
  return np.sum(p * (np.log(p) - np.log(q)), axis=-1)


def _numpy_gradient(teacher, aux, beta, t_temp=1.0, a_temp=1.0):
  """The token gradient in float64: (1-b)(p_psi - p_phi) + b p_psi (log p_psi - log p_phi - KL)."""
  p_phi = _softmax(teacher.astype(np.float64) / t_temp)
  p_psi = _softmax(aux.astype(np.float64) / a_temp)
  fkl = p_psi - p_phi
  rkl = p_psi * (np.log(p_psi) - np.log(p_phi) - _kl(p_psi, p_phi)[..., None])
  return (1 - beta) * fkl + beta * rkl


@pytest.fixture(scope="module")
def logits():
  rng = np.random.default_rng(0)
  teacher = (2.0 * rng.standard_normal((2, 3, V))).astype(np.float32)
  aux = (2.0 * rng.standard_normal((2, 3, V))).astype(np.float32)
  return teacher, aux


@pytest.mark.parametrize("name, beta", [("FKL", 0.0), ("RKL", 1.0), ("Jeffreys_0.", 0.0),
                                        ("Jeffreys_0.3", 0.3), ("Jeffreys_1", 1.0)])
def test_logit_gradient_formulas(logits, name, beta):
  teacher, aux = logits
  got = divergence.logit_gradient(jnp.asarray(teacher), jnp.asarray(aux), name)
  assert got.shape == teacher.shape and got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got), _numpy_gradient(teacher, aux, beta), atol=1e-6)


def test_fkl_and_rkl_differ(logits):
  teacher, aux = logits
  fkl = np.asarray(divergence.logit_gradient(jnp.asarray(teacher), jnp.asarray(aux), "FKL"))
  rkl = np.asarray(divergence.logit_gradient(jnp.asarray(teacher), jnp.asarray(aux), "RKL"))
  assert np.abs(fkl - rkl).max() > 1e-2
  # Both are gradients w.r.t. logits of a softmax: they sum to zero over the codebook.
  np.testing.assert_allclose(fkl.sum(-1), 0.0, atol=1e-6)
  np.testing.assert_allclose(rkl.sum(-1), 0.0, atol=1e-6)


@pytest.mark.parametrize("name, beta", [("FKL", 0.0), ("RKL", 1.0), ("Jeffreys_0.3", 0.3)])
def test_temperatures_divide_their_own_logits(logits, name, beta):
  teacher, aux = logits
  got = divergence.logit_gradient(jnp.asarray(teacher), jnp.asarray(aux), name,
                                  teacher_temp=2.0, fake_temp=0.5)
  np.testing.assert_allclose(np.asarray(got), _numpy_gradient(teacher, aux, beta, 2.0, 0.5),
                             atol=1e-6)
  swapped = _numpy_gradient(teacher, aux, beta, 0.5, 2.0)
  assert np.abs(np.asarray(got) - swapped).max() > 1e-3


def test_bfloat16_inputs_give_float32():
  t = jnp.zeros((2, V), jnp.bfloat16)
  a = jnp.ones((2, V), jnp.bfloat16).at[:, 0].set(3.0)
  got = divergence.logit_gradient(t, a, "Jeffreys_0.5")
  assert got.dtype == jnp.float32 and got.shape == (2, V)


@pytest.mark.parametrize("bad", ["KL", "fkl", "Jeffreys_", "Jeffreys_x", "Jeffreys_1.5",
                                 "Jeffreys_-0.1", ""])
def test_bad_loss_type_raises(bad):
  with pytest.raises(ValueError):
    divergence.logit_gradient(jnp.zeros((1, V)), jnp.zeros((1, V)), bad)


def test_shape_mismatch_raises():
  with pytest.raises(ValueError):
    divergence.logit_gradient(jnp.zeros((1, V)), jnp.zeros((1, V + 1)), "FKL")


# ----------------------------------------------------------------------------- true gradients

def _finite_difference(f, z, eps=1e-6):
  grad = np.zeros_like(z)
  for i in range(z.size):
    dz = np.zeros_like(z)
    dz.flat[i] = eps
    grad.flat[i] = (f(z + dz) - f(z - dz)) / (2 * eps)
  return grad


@pytest.mark.parametrize("name, beta", [("FKL", 0.0), ("RKL", 1.0), ("Jeffreys_0.3", 0.3)])
def test_gradients_are_derivatives_of_the_divergences(name, beta):
  """g = d/dz [(1 - b) KL(p_phi || softmax(z)) + b KL(softmax(z) || p_phi)] at z = aux logits."""
  rng = np.random.default_rng(1)
  for _ in range(3):
    teacher = 1.5 * rng.standard_normal(V)
    aux = 1.5 * rng.standard_normal(V)
    p_phi = _softmax(teacher)
    divergence_fn = lambda z: ((1 - beta) * _kl(p_phi, _softmax(z))
                               + beta * _kl(_softmax(z), p_phi))
    expected = _finite_difference(divergence_fn, aux)
    got = divergence.logit_gradient(jnp.asarray(teacher, jnp.float32),
                                    jnp.asarray(aux, jnp.float32), name)
    np.testing.assert_allclose(np.asarray(got), expected, atol=2e-6)


# ----------------------------------------------------------------------------- surrogate loss

@pytest.fixture(scope="module")
def surrogate_case():
  rng = np.random.default_rng(2)
  batch, seq_len = 3, 5
  gen_logits = rng.standard_normal((batch, seq_len, V)).astype(np.float32)
  g = rng.standard_normal((batch, seq_len, V)).astype(np.float32)
  mask = rng.random((batch, seq_len)) < 0.5
  mask[0, 0], mask[0, 1] = True, False
  return gen_logits, g, mask


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_surrogate_gradient_is_masked_g(surrogate_case, reduction):
  gen_logits, g, mask = surrogate_case
  batch, seq_len, vocab = gen_logits.shape
  loss, grad = jax.value_and_grad(divergence.surrogate_loss)(
      jnp.asarray(gen_logits), jnp.asarray(g), jnp.asarray(mask), reduction)
  masked_g = np.where(mask[..., None], g, 0.0)
  # The reference: 0.5 * mse_loss(z, sg(z - g), reduction), then / batch size for 'sum';
  # torch's 'mean' averages over every entry of z.
  denominator = batch if reduction == "sum" else batch * seq_len * vocab
  np.testing.assert_allclose(np.asarray(grad), masked_g / denominator, rtol=1e-6, atol=1e-8)
  assert float(loss) == pytest.approx(0.5 * np.sum(masked_g**2) / denominator, rel=1e-5)


def test_surrogate_zeroes_non_finite_g(surrogate_case):
  gen_logits, g, mask = surrogate_case
  g = g.copy()
  g[0, 0, 0], g[0, 0, 1], g[0, 0, 2] = np.nan, np.inf, -np.inf  # a masked position
  g[0, 1, 0] = np.nan  # an unmasked one
  loss, grad = jax.value_and_grad(divergence.surrogate_loss)(
      jnp.asarray(gen_logits), jnp.asarray(g), jnp.asarray(mask), "sum")
  grad = np.asarray(grad)
  assert np.isfinite(float(loss)) and np.all(np.isfinite(grad))
  expected = np.where(mask[..., None] & np.isfinite(g), g, 0.0) / gen_logits.shape[0]
  np.testing.assert_allclose(grad, expected, rtol=1e-6, atol=1e-8)
  assert np.all(grad[0, 0, :3] == 0.0)


def test_surrogate_bad_reduction_raises(surrogate_case):
  gen_logits, g, mask = surrogate_case
  with pytest.raises(ValueError):
    divergence.surrogate_loss(jnp.asarray(gen_logits), jnp.asarray(g), jnp.asarray(mask), "none")
