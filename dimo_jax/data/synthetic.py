"""A class-conditional token dataset with a closed-form distribution, for exact sample scoring.

`C` classes, each with `K` prototype sequences ("modes") of `L` tokens over a codebook of `V`
codes. A sample of class c picks a mode k uniformly, then each position independently keeps the
prototype token with probability 1 - eps and otherwise takes a code uniform over all `V` (which
may again be the prototype token). So per position

    p(x_l | c, k) = (1 - eps) + eps / V   if x_l == proto[c, k, l]
                    eps / V                otherwise,

and p(x | c) = (1/K) sum_k prod_l p(x_l | c, k) is known exactly. A generative model's samples
are then scored with
  * `true_nll`: the data distribution's negative log-likelihood of the samples per token
    (fidelity; a model sampling the data distribution reaches `entropy_per_token`),
  * `mode_coverage`: the share of the C * K (class, mode) pairs hit by at least one sample
    (diversity; a model collapsed onto one mode per class scores 1 / K),
  * `in_mode`: the share of samples close enough to some prototype of their own class to be a
    plausible data sample (see `assign_modes`).

Everything is numpy (float64 for probabilities); arrays from jax are accepted and converted.
"""

import dataclasses
from typing import Dict, Optional, Tuple, Union

import numpy as np
import scipy.special
import scipy.stats

# A true sample lies within the Hamming threshold of its prototype with this probability.
_IN_MODE_QUANTILE = 0.999


@dataclasses.dataclass(frozen=True)
class SyntheticTokens:
  """The distribution above, given its prototypes.

  Attributes:
    prototypes: int32[C, K, L], codes in [0, V).
    corruption: eps in (0, 1], the probability that a position is resampled uniformly.
    codebook_size: V >= 2.
  """

  prototypes: np.ndarray
  corruption: float
  codebook_size: int

  def __post_init__(self):
    protos = np.asarray(self.prototypes)
    if protos.ndim != 3 or not np.issubdtype(protos.dtype, np.integer):
      raise ValueError(f"prototypes must be an integer array [C, K, L], got {protos.dtype}"
                       f"{list(protos.shape)}")
    if self.codebook_size < 2:
      raise ValueError(f"codebook_size must be >= 2, got {self.codebook_size}")
    if protos.size and (protos.min() < 0 or protos.max() >= self.codebook_size):
      raise ValueError(f"prototype codes must lie in [0, {self.codebook_size}), found "
                       f"[{protos.min()}, {protos.max()}]")
    # eps = 0 would give zero probability to every non-prototype sequence (infinite NLL).
    if not 0.0 < self.corruption <= 1.0:
      raise ValueError(f"corruption must lie in (0, 1], got {self.corruption}")
    object.__setattr__(self, "prototypes", protos.astype(np.int32))

  @property
  def num_classes(self) -> int:
    """C."""
    return self.prototypes.shape[0]

  @property
  def modes_per_class(self) -> int:
    """K."""
    return self.prototypes.shape[1]

  @property
  def seq_len(self) -> int:
    """L."""
    return self.prototypes.shape[2]

  @property
  def _log_hit(self) -> float:
    """log p(x_l | c, k) when x_l is the prototype token."""
    return float(np.log1p(-self.corruption + self.corruption / self.codebook_size))

  @property
  def _log_miss(self) -> float:
    """log p(x_l | c, k) for each of the V - 1 other tokens."""
    return float(np.log(self.corruption / self.codebook_size))

  def _check_labels(self, labels) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
      raise ValueError(f"labels must be an integer array [N], got {labels.dtype}"
                       f"{list(labels.shape)}")
    if labels.size and (labels.min() < 0 or labels.max() >= self.num_classes):
      raise ValueError(f"labels must lie in [0, {self.num_classes}), found "
                       f"[{labels.min()}, {labels.max()}]")
    return labels.astype(np.int64)

  def _check(self, tokens, labels) -> Tuple[np.ndarray, np.ndarray]:
    labels = self._check_labels(labels)
    tokens = np.asarray(tokens)
    expected = [labels.shape[0], self.seq_len]
    if list(tokens.shape) != expected or not np.issubdtype(tokens.dtype, np.integer):
      raise ValueError(f"tokens must be an integer array of shape {expected} (N from labels), "
                       f"got {tokens.dtype}{list(tokens.shape)}")
    if tokens.size and (tokens.min() < 0 or tokens.max() >= self.codebook_size):
      raise ValueError(f"tokens must lie in [0, {self.codebook_size}), found "
                       f"[{tokens.min()}, {tokens.max()}]")
    return tokens.astype(np.int64), labels

  def _matches(self, tokens: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """int64[N, K]: positions where sample i agrees with prototype k of its class."""
    return (tokens[:, None, :] == self.prototypes[labels]).sum(axis=-1)

  def sample(self, rng: Union[np.random.Generator, int], labels,
             modes: Optional[np.ndarray] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Draws one sample per label.

    Args:
      rng: a numpy Generator, or an int seed for a fresh one.
      labels: int[N] classes in [0, C).
      modes: optional int[N] modes in [0, K) to draw from instead of uniform ones (e.g. to
        build a mode-collapsed reference sampler).

    Returns:
      (tokens int32[N, L] in [0, V), modes int32[N] in [0, K)).
    """
    rng = np.random.default_rng(rng)
    labels = self._check_labels(labels)
    n = labels.shape[0]
    if modes is None:
      modes = rng.integers(self.modes_per_class, size=n)
    else:
      modes = np.asarray(modes)
      if modes.shape != (n,) or (n and (modes.min() < 0 or modes.max() >= self.modes_per_class)):
        raise ValueError(f"modes must be int[{n}] in [0, {self.modes_per_class}), got shape "
                         f"{list(modes.shape)}")
    tokens = self.prototypes[labels, modes]
    resample = rng.random((n, self.seq_len)) < self.corruption
    noise = rng.integers(self.codebook_size, size=(n, self.seq_len))
    return np.where(resample, noise, tokens).astype(np.int32), modes.astype(np.int32)

  def log_prob(self, tokens, labels) -> np.ndarray:
    """Exact log p(x | c): float64[N] for tokens int[N, L] and labels int[N]."""
    tokens, labels = self._check(tokens, labels)
    matches = self._matches(tokens, labels)
    log_joint = matches * self._log_hit + (self.seq_len - matches) * self._log_miss
    return scipy.special.logsumexp(log_joint, axis=-1) - np.log(self.modes_per_class)

  def nll_per_token(self, tokens, labels) -> float:
    """`true_nll`: mean over samples of -log p(x | c) / L, in nats per token.

    Lower is more faithful to the data, but a sampler can beat `entropy_per_token` by
    emitting only prototypes (low NLL, low diversity); read it together with `mode_coverage`.
    """
    return float(-self.log_prob(tokens, labels).mean() / self.seq_len)

  def entropy_per_token(self, num_samples: int = 2 ** 16, seed: int = 0) -> float:
    """H(x | c) / L in nats, classes weighted uniformly: the `true_nll` of a perfect sampler.

    With k* the mode a sample was drawn from and r_j = p(x | c, j) / p(x | c, k*),
      -log p(x | c) = log K - log p(x | c, k*) - log sum_j r_j.
    The middle term's expectation is exactly L times the per-position entropy of the corruption
    channel; only the last term, the (small) overlap between modes, is estimated by Monte Carlo
    with `num_samples` samples stratified over (class, mode) from the fixed `seed`, so the
    estimate is exact when modes do not overlap and has very low variance otherwise.
    """
    v, eps = self.codebook_size, self.corruption
    p_hit = 1.0 - eps + eps / v
    channel_entropy = -(scipy.special.xlogy(p_hit, p_hit)
                        + (v - 1) * scipy.special.xlogy(eps / v, eps / v))
    num_pairs = self.num_classes * self.modes_per_class
    per_pair = max(1, -(-num_samples // num_pairs))
    pair = np.repeat(np.arange(num_pairs), per_pair)
    labels, modes = pair // self.modes_per_class, pair % self.modes_per_class
    tokens, _ = self.sample(seed, labels, modes=modes)
    matches = self._matches(tokens.astype(np.int64), labels)
    own = matches[np.arange(len(pair)), modes]
    log_ratios = (matches - own[:, None]) * (self._log_hit - self._log_miss)
    overlap = scipy.special.logsumexp(log_ratios, axis=-1).mean()
    entropy = np.log(self.modes_per_class) + self.seq_len * channel_entropy - overlap
    return float(entropy / self.seq_len)

  def hamming_threshold(self) -> int:
    """The Hamming distance a true sample stays within from its prototype w.p. 0.999.

    The distance is Binomial(L, eps (V - 1) / V): a resampled position lands on another code
    with probability (V - 1) / V.
    """
    p_off = self.corruption * (self.codebook_size - 1) / self.codebook_size
    return int(scipy.stats.binom.ppf(_IN_MODE_QUANTILE, self.seq_len, p_off))

  def assign_modes(self, tokens, labels) -> np.ndarray:
    """int32[N]: the most likely mode of class labels[i] for sample i, or -1 if none fits.

    The most likely mode is the nearest prototype in Hamming distance (p(x | c, k) decreases
    with it). A sample is assigned only when that distance is <= `hamming_threshold()`, so
    ~99.9% of true samples are assigned and off-distribution samples are not.
    """
    tokens, labels = self._check(tokens, labels)
    distances = self.seq_len - self._matches(tokens, labels)
    nearest = distances.argmin(axis=-1)
    within = distances[np.arange(len(nearest)), nearest] <= self.hamming_threshold()
    return np.where(within, nearest, -1).astype(np.int32)

  def _coverage(self, modes: np.ndarray, labels: np.ndarray) -> float:
    hit = np.unique(labels[modes >= 0] * self.modes_per_class + modes[modes >= 0])
    return hit.size / (self.num_classes * self.modes_per_class)

  def mode_coverage(self, tokens, labels) -> float:
    """`mode_coverage`: share of the C * K (class, mode) pairs assigned at least one sample.

    1.0 means every mode of every class was produced; a sampler collapsed onto one mode per
    class scores 1 / K. It needs enough samples per class (about K log K) to reach 1.0.
    """
    tokens, labels = self._check(tokens, labels)
    return self._coverage(self.assign_modes(tokens, labels), labels)

  def synthetic_metrics(self, tokens, labels) -> Dict[str, float]:
    """{"true_nll", "mode_coverage", "in_mode"} for tokens int[N, L] and labels int[N].

    `in_mode` is the share of samples assigned to some mode of their own class (see
    `assign_modes`): ~0.999 for data samples, ~0 for noise or samples of the wrong class.
    """
    tokens, labels = self._check(tokens, labels)
    modes = self.assign_modes(tokens, labels)
    return {
        "true_nll": self.nll_per_token(tokens, labels),
        "mode_coverage": self._coverage(modes, labels),
        "in_mode": float((modes >= 0).mean()),
    }


def make_synthetic(num_classes: int = 10, modes_per_class: int = 4, seq_len: int = 16,
                   codebook_size: int = 16, corruption: float = 0.1,
                   seed: int = 0) -> SyntheticTokens:
  """A `SyntheticTokens` whose C * K prototypes are i.i.d. uniform code sequences.

  Two random prototypes differ in L (V - 1) / V positions on average (15 of 16 at the
  defaults, where the Hamming threshold is 6), so modes are well separated and each is
  learnable as a fixed sequence; tiny codebooks or short sequences can make modes overlap.
  """
  rng = np.random.default_rng(seed)
  prototypes = rng.integers(codebook_size, size=(num_classes, modes_per_class, seq_len))
  return SyntheticTokens(prototypes=prototypes.astype(np.int32), corruption=corruption,
                         codebook_size=codebook_size)
