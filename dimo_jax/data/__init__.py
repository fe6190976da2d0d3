"""The token datasets a run can name in its config (`config.dataset`).

Each gives what pretraining, the sample grids and the final evaluation need:
  sizes:        num_classes, seq_len, codebook_size
  train_batch:  (np.random.Generator, batch) -> (tokens int32[B, L], labels int32[B])
  images:       tokens int[N, L] -> float32[N, h, w] in [0, 1] for the grids
  make_scorer:  () -> (tokens, labels) -> {metric: float}; digits: fd and accuracy in a trained
                classifier's features, synthetic: true_nll, mode_coverage and in_mode.
"""

import dataclasses
import math
from typing import Callable, Dict

import ml_collections
import numpy as np

Scorer = Callable[[np.ndarray, np.ndarray], Dict[str, float]]


@dataclasses.dataclass(frozen=True)
class Digits:
  """scikit-learn's 1797 8x8 handwritten digits, 17 grey levels as 17 tokens."""
  num_classes: int = 10
  seq_len: int = 64
  codebook_size: int = 17

  def train_batch(self, rng: np.random.Generator, batch: int):
    from dimo_jax.data import digits
    tokens, labels = digits.load_digit_tokens()
    index = rng.integers(0, len(tokens), batch)
    return tokens[index], labels[index]

  def images(self, tokens) -> np.ndarray:
    from dimo_jax.data import digits
    return digits.tokens_to_images(tokens)

  def make_scorer(self) -> Scorer:
    from dimo_jax import evaluation
    classifier = evaluation.train_digit_classifier(seed=0)
    real_stats = evaluation.real_digit_statistics(classifier)
    return lambda tokens, labels: evaluation.digit_metrics(classifier, tokens, labels, real_stats)


@dataclasses.dataclass(frozen=True)
class Synthetic:
  """Prototype mixtures with per-token corruption: exact likelihood and mode coverage."""
  spec: ml_collections.ConfigDict

  @property
  def distribution(self):
    from dimo_jax.data import synthetic
    return synthetic.make_synthetic(**self.spec.to_dict())

  @property
  def num_classes(self) -> int:
    return self.spec.num_classes

  @property
  def seq_len(self) -> int:
    return self.spec.seq_len

  @property
  def codebook_size(self) -> int:
    return self.spec.codebook_size

  def train_batch(self, rng: np.random.Generator, batch: int):
    labels = rng.integers(0, self.num_classes, batch).astype(np.int32)
    return self.distribution.sample(rng, labels)[0], labels

  def images(self, tokens) -> np.ndarray:
    """Each sequence as a near-square grey image, one pixel per token."""
    tokens = np.asarray(tokens, np.float32)
    width = math.ceil(math.sqrt(self.seq_len))
    height = math.ceil(self.seq_len / width)
    padded = np.pad(tokens, ((0, 0), (0, height * width - self.seq_len)))
    return padded.reshape(-1, height, width) / (self.codebook_size - 1)

  def make_scorer(self) -> Scorer:
    return self.distribution.synthetic_metrics


def get(config: ml_collections.ConfigDict):
  """The dataset a config names: 'digits' or 'synthetic' (with `config.synthetic`)."""
  name = config.get("dataset", "digits")
  if name == "digits":
    return Digits()
  if name == "synthetic":
    return Synthetic(config.synthetic)
  raise ValueError(f"unknown dataset {name!r}; known: 'digits', 'synthetic'")
