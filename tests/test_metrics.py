"""FID statistics, Inception Score and PRDC against plain NumPy/SciPy computations.

The references here are written from the definitions (Heusel et al. 2017 for the Frechet
distance, Salimans et al. 2016 for IS, Naeem et al. 2020 for PRDC) in float64 with
`scipy.spatial.distance.cdist`, an eigendecomposition for the matrix square root and
`scipy.special`, not with dimo_jax's code.
"""

import numpy as np
import pytest
from scipy import special
from scipy.spatial.distance import cdist

from dimo_jax.metrics import inception as metrics


def reference_frechet(x, y) -> float:
  """Frechet distance of Gaussians fitted to x and y, Tr sqrt(S1 S2) via symmetric roots."""
  mu_x, mu_y = x.mean(0), y.mean(0)
  s_x, s_y = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
  values, vectors = np.linalg.eigh(s_x)
  root_x = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
  # sqrt(S1 S2) is similar to sqrt(S1^1/2 S2 S1^1/2), a symmetric PSD matrix.
  middle = np.linalg.eigvalsh(root_x @ s_y @ root_x)
  return float(np.sum((mu_x - mu_y) ** 2) + np.trace(s_x) + np.trace(s_y)
               - 2 * np.sum(np.sqrt(np.clip(middle, 0, None))))


def reference_prdc(real, fake, k):
  real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
  # Column 0 of each sorted row is the point itself.
  real_radius = np.sort(cdist(real, real), axis=1)[:, k]
  fake_radius = np.sort(cdist(fake, fake), axis=1)[:, k]
  d = cdist(real, fake)  # [N, M]
  return {
      "precision": np.mean([np.any(d[:, j] < real_radius) for j in range(len(fake))]),
      "recall": np.mean([np.any(d[i] < fake_radius) for i in range(len(real))]),
      "density": np.mean([np.sum(d[:, j] < real_radius) for j in range(len(fake))]) / k,
      "coverage": np.mean([d[i].min() < real_radius[i] for i in range(len(real))]),
  }


def reference_inception_score(logits, splits):
  scores = []
  for part in np.array_split(special.softmax(np.asarray(logits, np.float64), axis=1), splits):
    marginal = part.mean(axis=0)
    scores.append(np.exp(np.mean(special.rel_entr(part, marginal).sum(axis=1))))
  return np.mean(scores), np.std(scores)


def test_streamed_statistics_match_numpy_cov_far_from_the_origin():
  rng = np.random.default_rng(0)
  # A large common offset: the cancellation E[xx^T] - mu mu^T that the float64, shifted sums
  # are there to survive.
  features = (1000.0 + rng.normal(size=(301, 12)) @ rng.normal(size=(12, 12))).astype(np.float32)
  stats = metrics.FeatureStatistics()
  for start, stop in ((0, 0), (0, 5), (5, 5), (5, 128), (128, 301)):
    stats.update(features[start:stop])
  mu, sigma = stats.mu_sigma()
  assert stats.count == 301
  np.testing.assert_allclose(mu, features.astype(np.float64).mean(0), rtol=1e-12)
  np.testing.assert_allclose(sigma, np.cov(features.astype(np.float64), rowvar=False),
                             rtol=1e-9, atol=1e-9)


def test_statistics_errors_name_the_shapes():
  stats = metrics.FeatureStatistics()
  with pytest.raises(ValueError, match="at least 2 feature vectors, 0 were seen"):
    stats.mu_sigma()
  stats.update(np.zeros((3, 4)))
  with pytest.raises(ValueError,
                     match=r"expected features of shape \[B, 4\], found shape \(2, 5\)"):
    stats.update(np.zeros((2, 5)))


def test_fid_matches_an_eigendecomposition_reference():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(400, 16)) @ rng.normal(size=(16, 16))
  y = 0.5 + rng.normal(size=(300, 16)) @ rng.normal(size=(16, 16)) * 0.8
  stats = metrics.FeatureStatistics()
  stats.update(y)
  got = metrics.fid(x.astype(np.float32), *stats.mu_sigma())
  want = reference_frechet(x.astype(np.float32).astype(np.float64), y)
  assert want > 1.0
  np.testing.assert_allclose(got, want, rtol=1e-6)
  # The same set scores zero against itself.
  stats = metrics.FeatureStatistics()
  stats.update(x)
  assert abs(metrics.fid(x, *stats.mu_sigma())) < 1e-6


def test_inception_score_matches_the_reference_and_its_limits():
  rng = np.random.default_rng(2)
  logits = 3.0 * rng.normal(size=(205, 30))
  mean, std = metrics.inception_score(logits, splits=10)
  want_mean, want_std = reference_inception_score(logits, 10)
  np.testing.assert_allclose([mean, std], [want_mean, want_std], rtol=1e-10)
  assert std > 0
  # Identical predictions carry no information: IS 1. Confident, evenly spread ones: IS = C.
  assert metrics.inception_score(np.tile(logits[:1], (50, 1)), splits=5) == pytest.approx((1, 0))
  confident = 50.0 * np.eye(30)[np.arange(300) % 30]
  assert metrics.inception_score(confident, splits=10)[0] == pytest.approx(30.0, rel=1e-6)
  with pytest.raises(ValueError, match=r"logits of shape \[N >= 10, C\], found shape \(9, 30\)"):
    metrics.inception_score(logits[:9])


@pytest.mark.parametrize("chunk", [7, 1024])
def test_prdc_matches_the_definitions(chunk):
  rng = np.random.default_rng(3)
  real = rng.normal(size=(230, 8))
  # Fakes from a shifted, narrower Gaussian and a far-away lump: every metric strictly
  # between its extremes, so a wrong radius or direction shows.
  fake = np.concatenate([0.7 + 0.8 * rng.normal(size=(150, 8)),
                         6.0 + rng.normal(size=(40, 8))])
  got = metrics.prdc(real.astype(np.float32), fake.astype(np.float32), k=5, chunk=chunk)
  want = reference_prdc(real.astype(np.float32), fake.astype(np.float32), k=5)
  assert sorted(got) == ["coverage", "density", "precision", "recall"]
  for name in want:
    assert 0.0 < want[name] < 1.0, (name, want[name])
    np.testing.assert_allclose(got[name], want[name], atol=1e-12, err_msg=name)


def test_prdc_of_a_set_with_itself_and_reused_radii():
  rng = np.random.default_rng(4)
  real = rng.normal(size=(120, 6)).astype(np.float32)
  fake = rng.normal(size=(90, 6)).astype(np.float32)
  radii = metrics.nearest_neighbour_radii(real, k=3, chunk=50)
  np.testing.assert_allclose(np.sqrt(radii), np.sort(cdist(real, real), axis=1)[:, 3],
                             rtol=1e-5)
  assert metrics.prdc(real, fake, k=3, real_radii=radii) == metrics.prdc(real, fake, k=3)
  # Every point lies in its own ball's neighbourhood: a set fully covers and recalls itself.
  same = metrics.prdc(real, real, k=3)
  assert same["precision"] == same["recall"] == same["coverage"] == 1.0
  with pytest.raises(ValueError, match=r"k=5 need features of shape \[N > 5, F\]"):
    metrics.prdc(real[:5], fake)
  with pytest.raises(ValueError, match=r"shapes \[N, F\] and \[M, F\], found \(120, 6\) and "
                                       r"\(90, 5\)"):
    metrics.prdc(real, fake[:, :5])
