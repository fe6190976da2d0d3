"""How samples are scored.

  inception   FID, Inception Score, precision/recall/density/coverage on the FID Inception
              network's features; the Frechet distance every FD here uses
  reference   the reference statistics of real images (`evaluate stats`), samples against them
  pipeline    codes -> uint8 images -> features / CLIP embeddings, on the device
  clip_score  CLIP score of samples against their prompts
  digits      the offline digits' Frechet distance and accuracy in a small classifier's features

`scorer(dataset)` is what a dataset's in-run evaluation (and `evaluate` on it) reports on the
codes alone: each dataset names its scorer (`dataset.scorer`).
"""

from typing import Callable, Dict, Sequence

import numpy as np

Scorer = Callable[[np.ndarray, np.ndarray], Dict[str, float]]
SCORERS = ("digits", "digits_bits", "synthetic", None)  # what a dataset's `scorer` may name


def scorer(dataset) -> Scorer:
  """(tokens int[N, L], labels int[N]) -> {metric: float} for `dataset`: "digits" -> fd and
  accuracy (`metrics.digits`; "digits_bits" of MaskBit sub-tokens merged to grey levels),
  "synthetic" -> true_nll, mode_coverage and in_mode (the mixture's exact likelihood,
  `data.synthetic`), None -> nothing (images are scored by `evaluate`)."""
  if dataset.scorer in ("digits", "digits_bits"):
    from dimo_jax.metrics import digits
    score = digits.scorer()
    if dataset.scorer == "digits":
      return score
    return lambda tokens, labels: score(dataset.full_codes(tokens), labels)
  if dataset.scorer == "synthetic":
    return dataset.distribution.synthetic_metrics
  if dataset.scorer is None:
    return lambda tokens, labels: {}
  raise ValueError(f"unknown scorer {dataset.scorer!r}; known: {SCORERS}")


def over_seeds(runs: Sequence[Dict[str, float]]) -> Dict[str, float]:
  """The metrics of evaluations that differ only in their sampling seed: each metric's mean,
  its spread as `<metric>_std` (the standard deviation over seeds, 0 for one seed) and the
  number of seeds as `seeds`. One evaluation of 1000 digits moves fd by about +-0.06 between
  seeds, so a claim rests on the mean."""
  out = {}
  for key in runs[0]:
    values = np.asarray([run[key] for run in runs], np.float64)
    out[key] = float(values.mean())
    if not key.endswith("_std"):
      out[f"{key}_std"] = float(values.std())
  out["seeds"] = len(runs)
  return out
