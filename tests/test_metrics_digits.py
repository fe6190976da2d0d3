"""Tests for the digit sample-quality metrics: the Frechet distance and the digit classifier."""

import numpy as np
import pytest
from sklearn.model_selection import train_test_split

from dimo_jax.metrics import digits as evaluation
from dimo_jax.metrics import inception


def _random_spd(rng, dim):
  a = rng.normal(size=(dim, dim))
  return a @ a.T / dim + 0.1 * np.eye(dim)


def _psd_sqrt(s):
  values, vectors = np.linalg.eigh(s)
  return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


@pytest.fixture(scope="module")
def digits():
  return evaluation.load_digit_tokens()


@pytest.fixture(scope="module")
def classifier():
  return evaluation.train_digit_classifier(seed=0)


@pytest.fixture(scope="module")
def real_stats(classifier):
  return evaluation.real_digit_statistics(classifier)


def test_frechet_distance_is_zero_for_identical_statistics():
  rng = np.random.default_rng(0)
  mu, sigma = rng.normal(size=16), _random_spd(rng, 16)
  assert abs(inception.frechet_distance(mu, sigma, mu, sigma)) < 1e-8


def test_frechet_distance_diagonal_closed_form():
  rng = np.random.default_rng(1)
  mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
  a, b = rng.uniform(0.1, 3.0, size=8), rng.uniform(0.1, 3.0, size=8)
  expected = np.sum((mu1 - mu2)**2) + np.sum((np.sqrt(a) - np.sqrt(b))**2)
  got = inception.frechet_distance(mu1, np.diag(a), mu2, np.diag(b))
  assert isinstance(got, float)
  assert got == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("dim", [2, 10, 64])
def test_frechet_distance_matches_symmetric_eigen_route(dim):
  # Tr sqrt(S1 S2) = Tr sqrt(sqrt(S1) S2 sqrt(S1)), and the right side only needs `eigh` of
  # symmetric PSD matrices, independent of the Schur-based `sqrtm` used by the code.
  rng = np.random.default_rng(dim)
  mu1, mu2 = rng.normal(size=dim), rng.normal(size=dim)
  s1, s2 = _random_spd(rng, dim), _random_spd(rng, dim)
  root1 = _psd_sqrt(s1)
  tr_covmean = np.trace(_psd_sqrt(root1 @ s2 @ root1))
  expected = np.sum((mu1 - mu2)**2) + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean
  assert inception.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-6)


def test_frechet_distance_falls_back_to_offset_when_sqrtm_is_not_finite(monkeypatch):
  real_sqrtm = inception.linalg.sqrtm
  calls = []

  def first_call_fails(matrix):
    calls.append(matrix)
    return np.full_like(matrix, np.nan) if len(calls) == 1 else real_sqrtm(matrix)

  monkeypatch.setattr(inception.linalg, "sqrtm", first_call_fails)
  a, b, eps = np.array([1.0, 0.0, 4.0]), np.array([0.0, 0.0, 9.0]), 1e-6
  got = inception.frechet_distance(np.zeros(3), np.diag(a), np.zeros(3), np.diag(b), eps=eps)
  assert len(calls) == 2
  np.testing.assert_allclose(calls[1], np.diag((a + eps) * (b + eps)))
  expected = np.sum(a + b) - 2.0 * np.sum(np.sqrt((a + eps) * (b + eps)))
  assert got == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_rejects_large_imaginary_part():
  with pytest.raises(ValueError, match="imaginary component of magnitude"):
    inception.frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), -np.eye(2))


def test_load_digit_tokens(digits):
  tokens, labels = digits
  assert tokens.shape == (1797, 64) and tokens.dtype == np.int32
  assert labels.shape == (1797,) and labels.dtype == np.int32
  assert tokens.min() == 0 and tokens.max() == 16
  assert set(labels.tolist()) == set(range(10))


def test_classifier_held_out_accuracy(digits):
  tokens, labels = digits
  train_x, test_x, train_y, test_y = train_test_split(tokens, labels, test_size=0.25,
                                                      stratify=labels, random_state=0)
  held_out = evaluation.train_digit_classifier(seed=0, tokens=train_x, labels=train_y)
  accuracy = np.mean(held_out.predict(test_x) == test_y)
  assert accuracy >= 0.97, accuracy


def test_training_is_deterministic(digits):
  tokens, labels = digits
  first = evaluation.train_digit_classifier(seed=3, steps=20, tokens=tokens, labels=labels)
  second = evaluation.train_digit_classifier(seed=3, steps=20, tokens=tokens, labels=labels)
  np.testing.assert_array_equal(first.features(tokens[:50]), second.features(tokens[:50]))


def test_classifier_output_shapes_and_dtypes(classifier, digits):
  tokens, _ = digits
  features = classifier.features(tokens[:7])
  assert features.shape == (7, evaluation.FEATURE_DIM) and features.dtype == np.float32
  predictions = classifier.predict(tokens[:7])
  assert predictions.shape == (7,) and predictions.dtype == np.int32


def test_metrics_separate_real_digits_from_noise(classifier, real_stats, digits):
  tokens, labels = digits
  order = np.random.default_rng(0).permutation(len(tokens))
  first, second = order[:len(order) // 2], order[len(order) // 2:]
  half_stats = inception.feature_statistics(classifier.features(tokens[second]))
  real = evaluation.digit_metrics(classifier, tokens[first], labels[first], half_stats)

  noise = np.random.default_rng(1).integers(0, 17, size=(len(first), 64), dtype=np.int32)
  fake = evaluation.digit_metrics(classifier, noise, labels[first], real_stats)

  assert all(isinstance(v, float) for v in (*real.values(), *fake.values()))
  assert real["accuracy"] > 0.99
  assert fake["fd"] > 20.0 * real["fd"], (fake["fd"], real["fd"])
  assert fake["accuracy"] < 0.4


def test_real_digit_statistics_shapes(real_stats):
  mu, sigma = real_stats
  assert mu.shape == (64,) and mu.dtype == np.float64
  assert sigma.shape == (64, 64) and sigma.dtype == np.float64
  np.testing.assert_allclose(sigma, sigma.T)


@pytest.mark.parametrize("tokens, message", [
    (np.zeros((4, 63), np.int32), r"shape \[N, 64\], found shape \(4, 63\)"),
    (np.zeros((64,), np.int32), r"shape \[N, 64\], found shape \(64,\)"),
    (np.full((4, 64), 17, np.int32), r"in \[0, 17\), found range \[17, 17\]"),
    (np.full((4, 64), -1, np.int32), r"in \[0, 17\), found range \[-1, -1\]"),
    (np.zeros((4, 64), np.float32), "integer tokens"),
])
def test_bad_tokens_raise(classifier, real_stats, tokens, message):
  with pytest.raises(ValueError, match=message):
    classifier.features(tokens)
  with pytest.raises(ValueError, match=message):
    classifier.predict(tokens)
  with pytest.raises(ValueError, match=message):
    evaluation.digit_metrics(classifier, tokens, np.zeros(len(tokens), np.int32), real_stats)


def test_bad_labels_raise(classifier, real_stats, digits):
  tokens, labels = digits
  with pytest.raises(ValueError, match=r"labels of shape \(10,\), found shape \(9,\)"):
    evaluation.digit_metrics(classifier, tokens[:10], labels[:9], real_stats)
  with pytest.raises(ValueError, match=r"labels in \[0, 10\)"):
    evaluation.digit_metrics(classifier, tokens[:10], np.full(10, 10, np.int32), real_stats)
  with pytest.raises(ValueError, match="both tokens and labels"):
    evaluation.train_digit_classifier(tokens=tokens)


def test_bad_statistics_raise():
  with pytest.raises(ValueError, match=r"means of one shape"):
    inception.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
  with pytest.raises(ValueError, match=r"sigma2 of shape \(3, 3\), found shape \(2, 2\)"):
    inception.frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(2))
  with pytest.raises(ValueError, match=r"features of shape \[N >= 2, F\]"):
    inception.feature_statistics(np.zeros((1, 64)))
