"""masking.py against the method's equations (docs/method.md), recomputed with NumPy."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from dimo_jax import masking

U_GRID = np.array([0.0, 0.1, 0.25, 0.5, 0.73, 0.9, 0.999], np.float32)


# ----------------------------------------------------------------------------- mask ratios

@pytest.mark.parametrize("mode, expected", [
    ("linear", lambda u: u),
    ("square", lambda u: u * u),
    ("cosine", lambda u: np.cos(np.pi * u / 2)),
    ("arccos", lambda u: np.arccos(u) / (np.pi / 2)),
])
def test_mask_ratio_formulas(mode, expected):
  got = np.asarray(masking.mask_ratio(jnp.asarray(U_GRID), mode))
  np.testing.assert_allclose(got, expected(U_GRID.astype(np.float64)), rtol=1e-5, atol=1e-6)


# CDFs of r = schedule(u), u ~ U[0, 1), derived by hand from the schedules.
_CDFS = {
    "linear": lambda x: np.clip(x, 0, 1),
    "square": lambda x: np.sqrt(np.clip(x, 0, 1)),
    "cosine": lambda x: 1 - 2 * np.arccos(np.clip(x, 0, 1)) / np.pi,
    "arccos": lambda x: 1 - np.cos(np.pi * np.clip(x, 0, 1) / 2),
}


@pytest.mark.parametrize("mode", sorted(_CDFS))
def test_sample_mask_ratio_distribution(mode):
  r = np.asarray(masking.sample_mask_ratio(jax.random.PRNGKey(1), 4000, mode), np.float64)
  assert r.shape == (4000,)
  assert np.all((r >= 0) & (r <= 1))
  assert stats.kstest(r, _CDFS[mode]).pvalue > 1e-3


def test_mage_ratio_is_the_truncated_normal():
  r = np.asarray(masking.sample_mask_ratio(jax.random.PRNGKey(2), 20000, "mage"), np.float64)
  assert np.all((r >= 0.5) & (r <= 1.0))
  mu, std = 0.55, 0.25
  dist = stats.truncnorm((0.5 - mu) / std, (1.0 - mu) / std, loc=mu, scale=std)
  assert abs(r.mean() - dist.mean()) < 0.005
  assert abs(r.std() - dist.std()) < 0.005
  assert stats.kstest(r, dist.cdf).pvalue > 1e-3


def test_bad_ratio_mode_raises():
  with pytest.raises(ValueError):
    masking.mask_ratio(jnp.zeros(3), "mage")  # stochastic: only through sample_mask_ratio
  with pytest.raises(ValueError):
    masking.mask_ratio(jnp.zeros(3), "cubic")
  with pytest.raises(ValueError):
    masking.sample_mask_ratio(jax.random.PRNGKey(0), 3, "cubic")


# ----------------------------------------------------------------------------- counts

def test_num_masked_rounds_with_a_floor_of_one():
  seq_len = 16
  ratios = np.array([0.0, 0.01, 1 / 32, 0.1, 0.3, 0.5, 0.6, 0.74, 0.99, 1.0], np.float32)
  got = np.asarray(masking.num_masked(jnp.asarray(ratios), seq_len))
  expected = np.maximum(np.round(ratios * np.float32(seq_len)), 1).astype(np.int32)
  np.testing.assert_array_equal(got, expected)
  assert got.dtype == np.int32
  assert got[0] == 1  # r = 0 still masks one token
  assert got[-1] == seq_len  # r = 1 masks everything
  assert int(masking.num_masked(jnp.float32(0.6), 256)) == 154  # round(153.6)


def test_random_mask_exact_counts_per_row():
  batch, seq_len = 64, 10
  ratio = jnp.asarray(np.linspace(0.0, 1.0, batch), jnp.float32)
  mask = np.asarray(masking.random_mask(jax.random.PRNGKey(3), ratio, batch, seq_len))
  assert mask.shape == (batch, seq_len) and mask.dtype == bool
  expected = np.maximum(np.round(np.asarray(ratio) * seq_len), 1)
  np.testing.assert_array_equal(mask.sum(1), expected)
  # A scalar ratio applies to every row.
  mask = np.asarray(masking.random_mask(jax.random.PRNGKey(4), jnp.float32(0.3), batch, seq_len))
  np.testing.assert_array_equal(mask.sum(1), np.full(batch, 3))


def test_random_mask_positions_are_uniform():
  batch, seq_len, count = 8000, 8, 2
  mask = np.asarray(masking.random_mask(jax.random.PRNGKey(5), jnp.float32(count / seq_len),
                                        batch, seq_len))
  per_position = mask.sum(0)
  expected = batch * count / seq_len
  chi2 = np.sum((per_position - expected) ** 2 / expected)
  assert stats.chi2.sf(chi2, seq_len - 1) > 1e-3
  # Pairs too: each of the C(8, 2) = 28 subsets equally often.
  pair_ids = [tuple(np.flatnonzero(row)) for row in mask]
  _, pair_counts = np.unique(np.array(pair_ids), axis=0, return_counts=True)
  assert len(pair_counts) == math.comb(seq_len, count)
  expected = batch / math.comb(seq_len, count)
  chi2 = np.sum((pair_counts - expected) ** 2 / expected)
  assert stats.chi2.sf(chi2, len(pair_counts) - 1) > 1e-3


@pytest.mark.parametrize("mode", ["linear", "arccos", "mage"])
def test_forward_mask(mode):
  batch, seq_len, vocab, mask_id = 32, 12, 7, 7
  tokens = jax.random.randint(jax.random.PRNGKey(6), (batch, seq_len), 0, vocab, jnp.int32)
  noisy, mask, ratio = masking.forward_mask(jax.random.PRNGKey(7), tokens, mode, mask_id)
  noisy, mask, ratio, tokens = map(np.asarray, (noisy, mask, ratio, tokens))
  assert noisy.shape == tokens.shape and ratio.shape == (batch,)
  np.testing.assert_array_equal(mask.sum(1), np.maximum(np.round(ratio * seq_len), 1))
  assert np.all(noisy[mask] == mask_id)
  np.testing.assert_array_equal(noisy[~mask], tokens[~mask])
  np.testing.assert_array_equal(noisy == mask_id, mask)  # tokens never hold the mask id
  if mode == "mage":
    assert np.all(ratio >= 0.5)
  assert len(np.unique(ratio)) > batch // 2  # one ratio per row, not per batch


# ----------------------------------------------------------------------------- r_init

def test_parse_fixed_ratio():
  assert masking.parse_fixed_ratio("fix_0.6") == (0.6, 0.6)
  assert masking.parse_fixed_ratio("random_0.1_0.9") == (0.1, 0.9)
  for bad in ["fix", "fix_a", "fix_0.1_0.2", "random_0.1", "random_a_b", "uniform_0.1_0.9", ""]:
    with pytest.raises(ValueError):
      masking.parse_fixed_ratio(bad)


def test_sample_init_ratio():
  assert float(masking.sample_init_ratio(jax.random.PRNGKey(0), "fix_0.6")) == pytest.approx(0.6)
  keys = jax.random.split(jax.random.PRNGKey(8), 400)
  r = np.asarray(jax.vmap(lambda k: masking.sample_init_ratio(k, "random_0.1_0.9"))(keys))
  assert r.shape == (400,)
  assert np.all((r >= 0.1) & (r <= 0.9))
  assert stats.kstest(r, stats.uniform(0.1, 0.8).cdf).pvalue > 1e-3


@pytest.mark.parametrize("spec, ratio", [("fix_0.6", 0.6), ("fix_0.0", 0.0), ("fix_1.0", 1.0),
                                         ("fix_0.03", 0.03)])
def test_init_tokens(spec, ratio):
  batch, seq_len, vocab, mask_id = 16, 20, 6, 6
  r = masking.sample_init_ratio(jax.random.PRNGKey(0), spec)
  x = np.asarray(masking.init_tokens(jax.random.PRNGKey(9), batch, seq_len, vocab, r, mask_id))
  assert x.shape == (batch, seq_len) and x.dtype == np.int32
  expected = max(int(np.round(seq_len * ratio)), 1)
  np.testing.assert_array_equal((x == mask_id).sum(1), np.full(batch, expected))
  codes = x[x != mask_id]
  assert np.all((codes >= 0) & (codes < vocab))
  if ratio == 0.0:  # enough unmasked codes to see every one of them
    assert set(codes.tolist()) == set(range(vocab))


def test_init_tokens_random_ratio_one_per_batch():
  batch, seq_len, vocab = 8, 50, 9
  counts = set()
  for seed in range(5):
    ratio_rng, init_rng = jax.random.split(jax.random.PRNGKey(seed))
    r = np.asarray(masking.sample_init_ratio(ratio_rng, "random_0.1_0.9"))
    x = np.asarray(masking.init_tokens(init_rng, batch, seq_len, vocab, jnp.asarray(r), vocab))
    expected = max(np.round(r * np.float32(seq_len)), 1)
    np.testing.assert_array_equal((x == vocab).sum(1), np.full(batch, expected))
    counts.add(int(expected))
  assert len(counts) > 1


# ----------------------------------------------------------------------------- sigma

def _reference_get_pert(spec: str, step: int) -> float:
  """yuanzhi-zhu/DiMO train_DIMO_MaskGit.py `get_pert`, re-derived in plain Python."""
  if "fix" in spec:
    return float(spec.split("_")[1])
  warmup_iters = int(spec.split("_")[-1])
  if "exp" in spec:
    return 1 - math.exp(-step / warmup_iters)
  if "cos" in spec:
    return 1 - (1 + math.cos(math.pi * min(1, step / warmup_iters))) / 2
  return min(1, step / warmup_iters)


def test_parse_noise_schedule():
  assert masking.parse_noise_schedule("fix_0.1") == ("fix", 0.1)
  assert masking.parse_noise_schedule("fix_0.") == ("fix", 0.0)
  assert masking.parse_noise_schedule("warmup_linear_500") == ("linear", 500.0)
  assert masking.parse_noise_schedule("warmup_500") == ("linear", 500.0)
  assert masking.parse_noise_schedule("warmup_exp_1000") == ("exp", 1000.0)
  assert masking.parse_noise_schedule("warmup_cos_15000") == ("cos", 15000.0)
  for bad in ["fix", "fix_x", "warmup", "warmup_sin_100", "warmup_cos_x", "linear_100", ""]:
    with pytest.raises(ValueError):
      masking.parse_noise_schedule(bad)


@pytest.mark.parametrize("spec", ["fix_0.1", "fix_0.", "warmup_linear_100", "warmup_100",
                                  "warmup_exp_100", "warmup_cos_100"])
def test_noise_level_matches_reference(spec):
  for step in [0, 1, 25, 50, 99, 100, 101, 250, 1000]:
    got = float(masking.noise_level(spec, jnp.int32(step)))
    assert got == pytest.approx(_reference_get_pert(spec, step), abs=1e-6), (spec, step)


def test_noise_level_shapes():
  n = 100
  lin = [float(masking.noise_level("warmup_linear_100", i)) for i in (0, 50, 100, 400)]
  assert lin == pytest.approx([0.0, 0.5, 1.0, 1.0])
  cos = [float(masking.noise_level("warmup_cos_100", i)) for i in (0, 50, 100, 400)]
  assert cos == pytest.approx([0.0, 0.5, 1.0, 1.0], abs=1e-6)
  exp = float(masking.noise_level("warmup_exp_100", 3 * n))
  assert exp == pytest.approx(1 - math.exp(-3.0)) and exp < 1.0
  # Traceable with a traced iteration (the train step computes it inside jit).
  traced = jax.jit(lambda i: masking.noise_level("warmup_cos_100", i))(jnp.int32(25))
  assert float(traced) == pytest.approx(1 - (1 + math.cos(math.pi / 4)) / 2, abs=1e-6)
