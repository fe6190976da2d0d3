"""The device side of scoring: codes -> decoded uint8 images -> FID Inception features and CLIP
image embeddings, one jitted function after the sampler (`samplers.MeshSampler`'s `post`)."""

import math
from typing import Any, Callable, Dict, Optional, Tuple

import jax
import jax.numpy as jnp

from dimo_jax import data
from dimo_jax.models import clip as clip_model


def to_uint8(images: jax.Array) -> jax.Array:
  """float[..., H, W, 3] in [0, 1] -> uint8, rounded as a saved PNG is."""
  return jnp.round(jnp.clip(images, 0.0, 1.0) * 255.0).astype(jnp.uint8)


def features_fn(extractor) -> Callable[[Any, jax.Array], Tuple[jax.Array, jax.Array]]:
  """(variables, uint8[B, H, W, 3]) -> (pool float32[B, F], logits float32[B, C]) of the FID
  network.

  `extractor` has `.model` and `.variables` (dimo_jax.models.fid_inception.load).
  """
  return lambda variables, images: extractor.model.apply(
      variables, images.astype(jnp.float32) / 255.0)


def image_pipeline(tokenizer=None, extractor=None, clip=None, image_codes=None
                   ) -> Optional[Callable[[Any, jax.Array], Dict[str, jax.Array]]]:
  """What follows sampling on the device (`samplers.MeshSampler`'s `post`):
  (aux, codes) -> {"images" uint8[B, H, W, 3][, "pool", "logits"][, "clip"]}; None without a
  tokenizer.

  aux: {"tokenizer", "extractor", "clip"} variables (None without them; "clip" those of the
  CLIP vision tower of `clip`, a convert.clip.Clip). "clip" is the CLIP image embedding
  float32[B, P] of each uint8 image.
  """
  if tokenizer is None:
    return None
  featurize = features_fn(extractor) if extractor is not None else None
  low, high = data.value_range(tokenizer.description)

  def post(aux, codes):
    if image_codes is not None:
      codes = image_codes(codes)
    side = math.isqrt(codes.shape[1])
    pictures = tokenizer.model.apply(aux["tokenizer"], codes.reshape(-1, side, side),
                                     method=tokenizer.model.decode)
    out = {"images": to_uint8((pictures.astype(jnp.float32) - low) / (high - low))}
    if featurize is not None:
      out["pool"], out["logits"] = featurize(aux["extractor"], out["images"])
    if clip is not None:
      pixels = clip_model.preprocess(out["images"].astype(jnp.float32) / 255.0,
                                     clip.vision.image_size)
      out["clip"] = clip.vision.apply(aux["clip"], pixels)
    return out

  return post
