"""CLIP score: the mean over samples of 100 * max(cos, 0) between the CLIP image embedding of
a sample and the CLIP text embedding of its prompt."""

from typing import Sequence

import numpy as np

from dimo_jax.models import clip as clip_model


def prompt_embeds(clip, prompts: Sequence[str], batch_size: int = 64) -> np.ndarray:
  """float32[P, D]: the CLIP text embedding of every prompt, `batch_size` at a time (the last
  batch padded with its last prompt, so one shape is compiled)."""
  out = []
  for start in range(0, len(prompts), batch_size):
    chunk = list(prompts[start:start + batch_size])
    padded = chunk + chunk[-1:] * (batch_size - len(chunk))
    out.append(np.asarray(clip.text_embeds(padded), np.float32)[:len(chunk)])
  return np.concatenate(out)


def clip_score(image_embeds: np.ndarray, text_embeds: np.ndarray) -> float:
  """The mean over samples of 100 * max(cos, 0): float[N, D] and float[N, D] -> float."""
  return float(np.mean(np.asarray(clip_model.clip_score(image_embeds, text_embeds),
                                  np.float64)))
