"""Image-generation metrics on Inception features: FID, Inception Score and PRDC.

The features are those of the FID Inception network (dimo_jax/models/fid_inception.py): the
2048 pool features of every image and the 1008 logits of its classifier head.

- FID: the Frechet distance between Gaussians fitted to the pool features of the samples and
  of a reference set. The statistics stream (`FeatureStatistics`) so that a reference set of a
  million images never has to sit in memory; the distance itself is `frechet_distance`
  (float64 `scipy.linalg.sqrtm`, the community's way), which the digits' scorer shares.
- Inception Score: exp(E_x KL(p(y|x) || p(y))) over the softmax of the 1008 logits, computed on
  10 contiguous splits, reported as mean and standard deviation over the splits.
- Precision, recall, density and coverage (Naeem et al. 2020, "Reliable Fidelity and Diversity
  Metrics for Generative Models"), precision and recall being Kynkaanniemi et al. 2019's with
  k-nearest-neighbour radii: each real (fake) point owns a ball whose radius is the distance to
  its k-th nearest other real (fake) point.
    precision = share of fakes inside at least one real ball
    recall    = share of reals inside at least one fake ball
    density   = (1 / k) * mean over fakes of the number of real balls that hold it
    coverage  = share of reals whose own ball holds at least one fake
  "Inside" is strict (distance < radius), as in the authors' `prdc` package. The pairwise
  distances are computed in JAX, a block of rows at a time, so 50 000 x 50 000 pairs never
  exist at once.
"""

import functools
from typing import Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from scipy import linalg

IS_SPLITS = 10
PRDC_K = 5


def feature_statistics(features) -> Tuple[np.ndarray, np.ndarray]:
  """Mean and covariance of features: float[N, F] with N >= 2 -> (float64[F], float64[F, F])."""
  features = np.asarray(features, dtype=np.float64)
  if features.ndim != 2 or features.shape[0] < 2:
    raise ValueError(f"expected features of shape [N >= 2, F], found shape {features.shape}")
  return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
  """Frechet distance between Gaussians: ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrt(S1 S2)).

  Follows the reference FID computation: if `sqrtm(S1 S2)` is not finite (a singular
  product), `eps * I` is added to both covariances; a complex square root whose diagonal has
  an imaginary part above 1e-3 is an error, a smaller one is numerical noise and dropped.

  Args:
    mu1: float[F] mean of the first set.
    sigma1: float[F, F] covariance of the first set.
    mu2: float[F] mean of the second set.
    sigma2: float[F, F] covariance of the second set.
    eps: diagonal offset for the singular fallback.

  Returns:
    The distance as a python float.
  """
  mu1 = np.atleast_1d(np.asarray(mu1, np.float64))
  mu2 = np.atleast_1d(np.asarray(mu2, np.float64))
  sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
  sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
  if mu1.ndim != 1 or mu1.shape != mu2.shape:
    raise ValueError(f"expected means of one shape [F], found shapes {mu1.shape} and {mu2.shape}")
  dim = mu1.shape[0]
  for name, sigma in (("sigma1", sigma1), ("sigma2", sigma2)):
    if sigma.shape != (dim, dim):
      raise ValueError(f"expected {name} of shape ({dim}, {dim}), found shape {sigma.shape}")

  diff = mu1 - mu2
  covmean = linalg.sqrtm(sigma1 @ sigma2)
  if not np.isfinite(covmean).all():
    offset = eps * np.eye(dim)
    covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
  if np.iscomplexobj(covmean):
    if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
      raise ValueError("sqrtm(sigma1 @ sigma2) has an imaginary component of magnitude "
                       f"{np.max(np.abs(covmean.imag))}")
    covmean = covmean.real
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))



class FeatureStatistics:
  """Mean and covariance of features seen a batch at a time, accumulated in float64 on the host.

  Why float64 on the host: the covariance is E[x x^T] - mu mu^T, a difference of two large
  numbers for Inception's non-negative pool features (means near their spreads); in float32
  over 50 000 samples the cancellation costs several digits, and FID differences between good
  models are a few tenths. The sums are also taken around the first batch's mean (a shift that
  leaves the covariance unchanged) so that what is subtracted is small. The host's float64
  matrix product of a [B, 2048] batch is cheap next to the network that made it.
  """

  def __init__(self):
    self.count = 0
    self._shift = None
    self._sum = None
    self._outer = None

  def update(self, features) -> None:
    """Adds a batch: float[B, F] (B may be 0)."""
    features = np.asarray(features, np.float64)
    if features.ndim != 2:
      raise ValueError(f"expected features of shape [B, F], found shape {features.shape}")
    if self._shift is None:
      if not len(features):
        return
      dim = features.shape[1]
      self._shift = features.mean(axis=0)
      self._sum = np.zeros(dim)
      self._outer = np.zeros((dim, dim))
    elif features.shape[1] != self._shift.shape[0]:
      raise ValueError(f"expected features of shape [B, {self._shift.shape[0]}], found shape "
                       f"{features.shape}")
    centred = features - self._shift
    self.count += len(features)
    self._sum += centred.sum(axis=0)
    self._outer += centred.T @ centred

  def mu_sigma(self) -> Tuple[np.ndarray, np.ndarray]:
    """(mu float64[F], sigma float64[F, F]), the unbiased covariance as `np.cov`'s."""
    if self.count < 2:
      raise ValueError(f"the covariance needs at least 2 feature vectors, {self.count} were seen")
    mean = self._sum / self.count
    sigma = (self._outer - self.count * np.outer(mean, mean)) / (self.count - 1)
    return self._shift + mean, sigma


def fid(features, mu_ref, sigma_ref) -> float:
  """FID of features float[N, F] against reference statistics (float[F], float[F, F])."""
  stats = FeatureStatistics()
  stats.update(features)
  mu, sigma = stats.mu_sigma()
  return frechet_distance(mu, sigma, mu_ref, sigma_ref)


def inception_score(logits, splits: int = IS_SPLITS) -> Tuple[float, float]:
  """(mean, std) over `splits` contiguous splits of exp(E KL(p(y|x) || p(y))).

  Args:
    logits: float[N, C] classifier logits (C = 1008 for the FID Inception network), N >= splits.
    splits: how many contiguous, equal-sized splits (the last takes the remainder of N).
  """
  logits = np.asarray(logits, np.float64)
  if logits.ndim != 2 or len(logits) < splits:
    raise ValueError(f"expected logits of shape [N >= {splits}, C], found shape {logits.shape}")
  log_p = logits - logits.max(axis=1, keepdims=True)
  log_p -= np.log(np.exp(log_p).sum(axis=1, keepdims=True))
  scores = []
  for part in np.array_split(log_p, splits):
    log_marginal = np.log(np.exp(part).mean(axis=0))
    kl = (np.exp(part) * (part - log_marginal)).sum(axis=1)
    scores.append(np.exp(kl.mean()))
  return float(np.mean(scores)), float(np.std(scores))


def _pad_rows(x: np.ndarray, size: int) -> np.ndarray:
  return np.pad(x, ((0, size - len(x)), (0, 0)))


@jax.jit
def _squared_distances(a: jax.Array, b: jax.Array) -> jax.Array:
  """float32[n, F], float32[m, F] -> float32[n, m] squared Euclidean distances.

  Through |a|^2 + |b|^2 - 2 a.b, with the product at full float32 precision: TPUs and
  recent GPUs otherwise multiply float32 in bfloat16 or TF32, which moves the k-NN radii.
  """
  cross = jnp.matmul(a, b.T, precision=jax.lax.Precision.HIGHEST)
  squared = jnp.sum(a * a, axis=1)[:, None] + jnp.sum(b * b, axis=1)[None, :] - 2.0 * cross
  return jnp.maximum(squared, 0.0)


@functools.partial(jax.jit, static_argnames="k")
def _kth_neighbour_block(rows: jax.Array, points: jax.Array, k: int) -> jax.Array:
  """Squared distance from each of rows float32[n, F] to its k-th nearest other point.

  `rows` are members of `points`: the nearest "neighbour" at distance 0 is the row itself,
  so the k-th other point is the (k+1)-th smallest distance.
  """
  negated, _ = jax.lax.top_k(-_squared_distances(rows, points), k + 1)
  return -negated[:, k]


def nearest_neighbour_radii(features, k: int = PRDC_K, chunk: int = 1024) -> np.ndarray:
  """Squared k-NN radius of every point of float[N, F] (N > k) among the others: float32[N]."""
  features = np.asarray(features, np.float32)
  if features.ndim != 2 or len(features) <= k:
    raise ValueError(f"k-NN radii with k={k} need features of shape [N > {k}, F], found shape "
                     f"{features.shape}")
  points = jnp.asarray(features)
  chunk = min(chunk, len(features))
  out = []
  for start in range(0, len(features), chunk):
    rows = features[start:start + chunk]
    # One compiled shape for every block: the last is padded and its padding dropped.
    out.append(np.asarray(_kth_neighbour_block(jnp.asarray(_pad_rows(rows, chunk)), points,
                                               k))[: len(rows)])
  return np.concatenate(out)


@jax.jit
def _cross_block(real: jax.Array, valid: jax.Array, real_radii: jax.Array, fake: jax.Array,
                 fake_radii: jax.Array):
  """The PRDC counts of one block of reals against every fake.

  Args:
    real: float32[n, F], a block of reals (padded rows have `valid` False).
    valid: bool[n].
    real_radii: float32[n] squared k-NN radii of the block's reals.
    fake: float32[M, F], all fakes.
    fake_radii: float32[M] their squared k-NN radii.

  Returns:
    (fake_in_some_ball bool[M], balls_holding_fake int32[M], real_recalled bool[n],
     real_covered bool[n]), the first two over this block's reals only.
  """
  squared = _squared_distances(real, fake)
  inside_real = (squared < real_radii[:, None]) & valid[:, None]
  inside_fake = squared < fake_radii[None, :]
  return (jnp.any(inside_real, axis=0), jnp.sum(inside_real, axis=0, dtype=jnp.int32),
          jnp.any(inside_fake, axis=1), jnp.min(squared, axis=1) < real_radii)


def prdc(real, fake, k: int = PRDC_K, chunk: int = 1024,
         real_radii: Optional[np.ndarray] = None) -> Dict[str, float]:
  """Precision, recall, density and coverage of fakes against reals (see module docstring).

  Args:
    real: float[N, F] reference features, N > k.
    fake: float[M, F] sample features, M > k.
    k: the neighbour that sets a ball's radius (5, as Naeem et al.).
    chunk: rows of reals (and of points, for the radii) per block; a block holds
      chunk x max(N, M) distances.
    real_radii: the squared radii of `real` (`nearest_neighbour_radii(real, k)`), when one
      reference set scores many sample sets.

  Returns:
    {"precision", "recall", "density", "coverage"}: python floats; all but density in [0, 1].
  """
  real = np.asarray(real, np.float32)
  fake = np.asarray(fake, np.float32)
  if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
    raise ValueError(f"expected real and fake features of shapes [N, F] and [M, F], found "
                     f"{real.shape} and {fake.shape}")
  if real_radii is None:
    real_radii = nearest_neighbour_radii(real, k, chunk)
  elif np.shape(real_radii) != (len(real),):
    raise ValueError(f"expected real_radii of shape ({len(real)},), found {np.shape(real_radii)}")
  fake_radii = jnp.asarray(nearest_neighbour_radii(fake, k, chunk))
  fake_points = jnp.asarray(fake)
  chunk = min(chunk, len(real))
  in_some_ball = np.zeros(len(fake), bool)
  balls_holding = np.zeros(len(fake), np.int64)
  recalled, covered = [], []
  for start in range(0, len(real), chunk):
    rows = real[start:start + chunk]
    n = len(rows)
    valid = np.arange(chunk) < n
    radii = np.pad(np.asarray(real_radii[start:start + chunk], np.float32), (0, chunk - n))
    any_ball, count, recall_hit, cover_hit = _cross_block(
        jnp.asarray(_pad_rows(rows, chunk)), jnp.asarray(valid), jnp.asarray(radii),
        fake_points, fake_radii)
    in_some_ball |= np.asarray(any_ball)
    balls_holding += np.asarray(count)
    recalled.append(np.asarray(recall_hit)[:n])
    covered.append(np.asarray(cover_hit)[:n])
  return {
      "precision": float(in_some_ball.mean()),
      "recall": float(np.concatenate(recalled).mean()),
      "density": float(balls_holding.mean() / k),
      "coverage": float(np.concatenate(covered).mean()),
  }
