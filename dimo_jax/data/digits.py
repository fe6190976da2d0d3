"""The bundled offline dataset: scikit-learn's 8x8 handwritten digits as 64 tokens.

Each pixel of `sklearn.datasets.load_digits` is an integer grey level in [0, 16]; the levels
are the codebook (V = 17), read row-major (L = 64), with the digit as the class (C = 10).
No tokenizer is needed and nothing is downloaded: the images ship inside scikit-learn.
"""

import functools
from typing import Tuple

import numpy as np

CODEBOOK_SIZE = 17
SEQ_LEN = 64
NUM_CLASSES = 10
SIDE = 8


@functools.lru_cache(maxsize=1)
def load_digit_tokens() -> Tuple[np.ndarray, np.ndarray]:
  """All 1797 digits: (tokens int32[1797, 64] in [0, 17), labels int32[1797]); read-only."""
  from sklearn.datasets import load_digits
  digits = load_digits()
  tokens, labels = digits.data.astype(np.int32), digits.target.astype(np.int32)
  tokens.flags.writeable = labels.flags.writeable = False
  return tokens, labels


def tokens_to_images(tokens: np.ndarray) -> np.ndarray:
  """int[N, 64] grey levels -> float32[N, 8, 8] in [0, 1], white ink on black as sklearn."""
  tokens = np.asarray(tokens)
  if tokens.ndim != 2 or tokens.shape[1] != SEQ_LEN:
    raise ValueError(f"expected digit tokens of shape [N, {SEQ_LEN}], got {tokens.shape}")
  return np.clip(tokens, 0, CODEBOOK_SIZE - 1).reshape(-1, SIDE, SIDE).astype(np.float32) / 16.0


def class_balanced_labels(num_samples: int, num_classes: int = NUM_CLASSES) -> np.ndarray:
  """0, 1, ..., C-1, 0, 1, ...: int32[num_samples], equal counts when C divides N."""
  return (np.arange(num_samples) % num_classes).astype(np.int32)
