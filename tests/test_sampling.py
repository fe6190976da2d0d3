"""sampling.py with fake logits functions whose outputs are known in closed form."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dimo_jax import sampling

B, L, V, C = 3, 6, 5, 4

_rng = np.random.default_rng(0)
TOKEN_TABLE = _rng.standard_normal((V + 1, V)).astype(np.float32)  # by token id (mask = V)
LABEL_TABLE = _rng.standard_normal((C, V)).astype(np.float32)
NULL_ROW = _rng.standard_normal(V).astype(np.float32)  # the "no class" condition


class RecordingLogits:
  """A LogitsFn: logits[b, l] = TOKEN_TABLE[tokens[b, l]] + (LABEL_TABLE[y_b] or NULL_ROW)."""

  def __init__(self):
    self.calls = []

  def __call__(self, tokens, labels, drop):
    self.calls.append((np.asarray(tokens), np.asarray(labels), np.asarray(drop)))
    cond = jnp.where(drop[:, None], jnp.asarray(NULL_ROW)[None], jnp.asarray(LABEL_TABLE)[labels])
    return jnp.asarray(TOKEN_TABLE)[tokens] + cond[:, None, :]


def _numpy_logits(tokens, labels, drop):
  cond = np.where(drop[:, None], NULL_ROW[None], LABEL_TABLE[labels])
  return TOKEN_TABLE[tokens] + cond[:, None, :]


@pytest.fixture(scope="module")
def batch():
  tokens = _rng.integers(0, V + 1, (B, L)).astype(np.int32)
  labels = np.array([0, 2, 3], np.int32)
  return tokens, labels


# ----------------------------------------------------------------------------- guidance

@pytest.mark.parametrize("cfg", [1.0, 1])
def test_guidance_one_is_a_single_conditional_call(batch, cfg):
  tokens, labels = batch
  fn = RecordingLogits()
  got = sampling.guided_logits(fn, jnp.asarray(tokens), jnp.asarray(labels), cfg)
  assert len(fn.calls) == 1
  call_tokens, call_labels, call_drop = fn.calls[0]
  assert call_tokens.shape == (B, L) and not call_drop.any()
  np.testing.assert_allclose(np.asarray(got), _numpy_logits(tokens, labels, np.zeros(B, bool)),
                             atol=1e-6)


def test_guidance_constant(batch):
  tokens, labels = batch
  fn = RecordingLogits()
  w = 2.5
  got = sampling.guided_logits(fn, jnp.asarray(tokens), jnp.asarray(labels), w)
  assert len(fn.calls) == 1  # conditional and unconditional rows in one batched call
  call_tokens, call_labels, call_drop = fn.calls[0]
  np.testing.assert_array_equal(call_tokens, np.concatenate([tokens, tokens]))
  np.testing.assert_array_equal(call_labels, np.concatenate([labels, labels]))
  np.testing.assert_array_equal(call_drop, np.r_[np.zeros(B, bool), np.ones(B, bool)])
  z_c = _numpy_logits(tokens, labels, np.zeros(B, bool))
  z_u = _numpy_logits(tokens, labels, np.ones(B, bool))
  np.testing.assert_allclose(np.asarray(got), z_u + w * (z_c - z_u), atol=1e-5)


def test_guidance_per_row_and_drop(batch):
  tokens, labels = batch
  fn = RecordingLogits()
  w = np.array([1.0, 2.0, 4.5], np.float32)  # adaptive: one scale per row, 1.0 included
  drop = np.array([False, True, False])
  got = sampling.guided_logits(fn, jnp.asarray(tokens), jnp.asarray(labels), jnp.asarray(w),
                               jnp.asarray(drop))
  assert len(fn.calls) == 1
  np.testing.assert_array_equal(fn.calls[0][2], np.r_[drop, np.ones(B, bool)])
  z_c = _numpy_logits(tokens, labels, drop)
  z_u = _numpy_logits(tokens, labels, np.ones(B, bool))
  np.testing.assert_allclose(np.asarray(got), z_u + w[:, None, None] * (z_c - z_u), atol=1e-5)
  # A dropped row is unconditional whatever its scale.
  np.testing.assert_allclose(np.asarray(got)[1], z_u[1], atol=1e-5)
  # And w = 1 gives the plain conditional logits.
  np.testing.assert_allclose(np.asarray(got)[0], z_c[0], atol=1e-5)


# ----------------------------------------------------------------------------- filtering

def _numpy_top_k(logits, k):
  out = logits.copy()
  for idx in np.ndindex(logits.shape[:-1]):
    kth = np.sort(logits[idx])[::-1][k - 1]
    out[idx][logits[idx] < kth] = -np.inf
  return out


def _numpy_top_p(logits, p):
  out = logits.copy()
  for idx in np.ndindex(logits.shape[:-1]):
    row = logits[idx].astype(np.float64)
    order = np.argsort(-row)
    probs = np.exp(row[order] - row.max())
    probs /= probs.sum()
    mass_before = np.r_[0.0, np.cumsum(probs)[:-1]]
    for rank, col in enumerate(order):
      if rank > 0 and mass_before[rank] > p:  # smallest prefix whose mass reaches p
        out[idx][col] = -np.inf
  return out


@pytest.fixture(scope="module")
def random_logits():
  return (2.0 * np.random.default_rng(3).standard_normal((4, 3, 8))).astype(np.float32)


@pytest.mark.parametrize("k", [1, 3, 8])
def test_top_k(random_logits, k):
  got = np.asarray(sampling.filter_logits(jnp.asarray(random_logits), top_k=k))
  np.testing.assert_array_equal(got, _numpy_top_k(random_logits, k))
  assert np.all(np.isfinite(got).sum(-1) == k)


@pytest.mark.parametrize("p", [1e-3, 0.3, 0.7, 0.95])
def test_top_p(random_logits, p):
  got = np.asarray(sampling.filter_logits(jnp.asarray(random_logits), top_p=p))
  np.testing.assert_array_equal(got, _numpy_top_p(random_logits, p))
  assert np.all(np.isfinite(got).sum(-1) >= 1)  # the most likely token always stays
  # The kept mass reaches p.
  kept = np.where(np.isfinite(got), np.exp(random_logits), 0.0).sum(-1)
  assert np.all(kept / np.exp(random_logits).sum(-1) >= min(p, 1.0) - 1e-6)


def test_top_k_then_top_p(random_logits):
  got = np.asarray(sampling.filter_logits(jnp.asarray(random_logits), top_k=4, top_p=0.6))
  np.testing.assert_array_equal(got, _numpy_top_p(_numpy_top_k(random_logits, 4), 0.6))
  np.testing.assert_array_equal(np.asarray(sampling.filter_logits(jnp.asarray(random_logits))),
                                random_logits)


def test_sample_tokens_respects_the_filter(random_logits):
  draws = sampling.sample_tokens(jax.random.PRNGKey(0), jnp.asarray(random_logits), top_k=1)
  np.testing.assert_array_equal(np.asarray(draws), random_logits.argmax(-1))


# ----------------------------------------------------------------------------- schedule

def _adap_sche(steps, seq_len, mode):
  """The reference's `adap_sche` (train_DIMO_MaskGit.py), re-derived in numpy."""
  r = np.linspace(1, 0, steps)
  val = {"root": 1 - r**0.5, "linear": 1 - r, "square": 1 - r**2,
         "cosine": np.cos(r * math.pi * 0.5), "arccos": np.arccos(r) / (math.pi * 0.5)}[mode]
  sche = np.round(val / val.sum() * seq_len)
  sche[sche == 0] = 1
  sche[-1] += seq_len - sche.sum()
  return sche.astype(int)


@pytest.mark.parametrize("mode", ["root", "linear", "square", "cosine", "arccos"])
@pytest.mark.parametrize("steps, seq_len", [(2, 8), (8, 16), (12, 256), (16, 256), (4, 64)])
def test_unmask_schedule(mode, steps, seq_len):
  got = sampling.unmask_schedule(steps, seq_len, mode)
  assert got.shape == (steps,) and got.dtype == np.int32
  assert got.sum() == seq_len
  assert np.all(got >= 1)
  np.testing.assert_array_equal(got, _adap_sche(steps, seq_len, mode))


def test_unmask_schedule_arccos_shape():
  got = sampling.unmask_schedule(12, 256, "arccos")
  # arccos(r) / (pi / 2) at r = linspace(1, 0, 12): few tokens first, most at the end.
  assert got[0] == 1 and np.all(np.diff(got[:-1]) >= 0) and got[-1] > 8 * got[1] / 3
  share = np.arccos(np.linspace(1, 0, 12)) / (np.pi / 2)
  np.testing.assert_allclose(got[1:-1], share[1:-1] / share.sum() * 256, atol=0.5 + 1e-9)


def test_unmask_schedule_single_step():
  np.testing.assert_array_equal(sampling.unmask_schedule(1, 16, "arccos"), [16])
  np.testing.assert_array_equal(sampling.unmask_schedule(1, 16, "linear"), [16])


def test_unmask_schedule_bad_mode():
  with pytest.raises(ValueError):
    sampling.unmask_schedule(8, 16, "exp")
  with pytest.raises(ValueError):
    sampling.unmask_schedule(1, 16, "exp")


# ----------------------------------------------------------------------------- decoding

DB, DL, DV = 2, 12, 13


def _decode_recording(r_temp, steps, seed):
  """Runs maskgit_sample with a logits fn that is uniform over the first k[b, l] codes.

  The sampled code's log-probability is then exactly -log k[b, l] whatever is drawn, so the
  confidence order is known; a callback records the tokens the network sees at every step.
  """
  k = np.stack([np.random.default_rng(seed + b).permutation(DL) + 1 for b in range(DB)])
  seen = []

  def logits_fn(tokens, labels, drop):
    jax.debug.callback(lambda t: seen.append(np.asarray(t)), tokens[:DB], ordered=True)
    reps = tokens.shape[0] // DB
    allowed = jnp.arange(DV)[None, None, :] < jnp.tile(jnp.asarray(k), (reps, 1))[..., None]
    return jnp.where(allowed, 0.0, -1e4)

  out = sampling.maskgit_sample(logits_fn, jax.random.PRNGKey(seed), jnp.arange(DB) % 3, DL,
                                mask_id=DV, steps=steps, cfg_w=3.0, r_temp=r_temp)
  return np.asarray(out), np.stack(seen), k


@pytest.mark.parametrize("r_temp, steps", [(0.0, 5), (4.5, 5), (4.5, 1)])
def test_maskgit_sample_follows_the_schedule(r_temp, steps):
  out, seen, k = _decode_recording(r_temp, steps, seed=11)
  schedule = _adap_sche(steps, DL, "arccos") if steps > 1 else np.array([DL])
  assert seen.shape == (steps, DB, DL)
  assert out.shape == (DB, DL) and out.dtype == np.int32
  assert np.all((out >= 0) & (out < DV))  # no mask left
  assert np.all(out < k)  # every code drawn from its own distribution
  masked = np.concatenate([seen == DV, (out == DV)[None]])  # [steps + 1, B, L]
  assert masked[0].all()
  revealed = masked[:-1] & ~masked[1:]
  np.testing.assert_array_equal(revealed.sum(-1), np.repeat(schedule[:, None], DB, 1))
  # Revealed tokens are never masked again, and keep their values to the end.
  assert np.all(masked[1:] <= masked[:-1])
  for i in range(1, steps):
    done = ~masked[i]
    np.testing.assert_array_equal(seen[i][done], out[done])
  if r_temp == 0.0:
    # Most confident (smallest k) first: position with rank j is revealed at the step whose
    # cumulative count first exceeds j.
    rank = np.argsort(np.argsort(k, axis=1), axis=1)
    expected_step = np.searchsorted(np.cumsum(schedule), rank, side="right")
    np.testing.assert_array_equal(revealed.argmax(0), expected_step)


def test_generator_sample():
  batch, seq_len, vocab = 64, 10, 6
  bias = jnp.asarray(np.linspace(-2.0, 2.0, vocab), jnp.float32)

  def run(rng, **kwargs):
    """generator_sample, jitted, with the x_init the generator received."""
    seen = []

    def gen_fn(tokens, labels, noise_rng):
      jax.debug.callback(lambda t: seen.append(np.asarray(t)), tokens)
      return bias + jax.random.normal(noise_rng, tokens.shape + (vocab,))

    codes, logits = jax.jit(lambda r: sampling.generator_sample(
        gen_fn, r, jnp.arange(batch) % 3, seq_len, vocab, vocab, **kwargs))(rng)
    return np.asarray(codes), np.asarray(logits), seen[0]

  # At a low temperature: never the mask id, and mostly the favoured code.
  codes, logits, x_init = run(jax.random.PRNGKey(0), fixed_ratio="fix_0.6", gen_temp=0.5)
  assert codes.shape == (batch, seq_len) and logits.shape == (batch, seq_len, vocab)
  assert np.all((codes >= 0) & (codes < vocab)) and not np.any(codes == vocab)
  assert np.mean(codes == vocab - 1) > 0.5
  np.testing.assert_array_equal((x_init == vocab).sum(1), np.full(batch, 6))
  assert np.all(x_init[x_init != vocab] < vocab)
  # Greedy (top_k = 1) returns the argmax of the generator's logits; r_init is one per batch.
  codes, logits, x_init = run(jax.random.PRNGKey(1), fixed_ratio="random_0.1_0.9", top_k=1)
  np.testing.assert_array_equal(codes, logits.argmax(-1))
  per_row = (x_init == vocab).sum(1)
  assert len(set(per_row.tolist())) == 1 and 1 <= per_row[0] <= 9
