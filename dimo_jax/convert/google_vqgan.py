"""google-research/maskgit's VQGAN tokenizer (flax msgpack) -> a tokenizer directory.

  python -m dimo_jax.convert google-vqgan --src tokenizer_imagenet256_checkpoint --dst DST

The release is `flax.serialization.to_bytes` of the variables its `maskgit/inference.py`
passes straight to `VQVAE.apply`: {"params": {"encoder", "decoder", "quantizer"}}, with the
tree of `dimo_jax.models.google_vqgan.VQGAN`. Every size is read from the shapes: the codebook
gives codebook_size and embedding_dim, the encoder stem gives filters, the decoder's conv count
gives the number of levels, the encoder's residual block count gives num_res_blocks, the first
block of each encoder level gives its channel multiplier, and extra encoder convs mean
conv_downsample. What the shapes cannot tell (32-group GroupNorm, swish, [0, 1] images) is
fixed in the module as the release has it.
"""

import os
from typing import Any, Dict, Mapping, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from dimo_jax import tokenizers
from dimo_jax.convert import common
from dimo_jax.models.google_vqgan import VQGAN


def _shape(path: str, flat: Mapping[str, Any], key: str) -> Tuple[int, ...]:
  if key not in flat:
    raise common.ConversionError(f"{path}: missing key {key!r} (needed to infer the model size)")
  return tuple(np.shape(flat[key]))


def _count(path: str, flat: Mapping[str, Any], prefix: str, name: str) -> int:
  """How many of prefix/name_0, prefix/name_1, ... exist; they must run from 0 without gaps
  (`common.count_layers` names a stray one)."""
  return common.count_layers(path, flat, f"{prefix}/{name}_", "/", what=name)


def infer_config(path: str, flat: Mapping[str, Any]) -> Dict[str, Any]:
  """VQGAN constructor fields read from the shapes of the flattened params tree of `path`."""
  codebook_size, embedding_dim = _shape(path, flat, "quantizer/codebook")
  filters = _shape(path, flat, "encoder/Conv_0/kernel")[-1]
  # The decoder has an input conv, one conv after each of the L - 1 upsamplings, an output conv.
  levels = _count(path, flat, "decoder", "Conv") - 1
  if levels < 1:
    raise common.ConversionError(f"{path}: missing key 'decoder/Conv_0/kernel' or "
                                 f"'decoder/Conv_1/kernel' (needed to count the levels)")
  # The encoder has its stem and output convs, plus L - 1 strided ones when conv_downsample.
  conv_downsample = _count(path, flat, "encoder", "Conv") > 2
  # num_res_blocks per level, and num_res_blocks more after the last level.
  num_res_blocks = max(_count(path, flat, "encoder", "ResBlock") // (levels + 1), 1)
  multipliers = []
  for level in range(levels):
    key = f"encoder/ResBlock_{level * num_res_blocks}/Conv_0/kernel"
    width = _shape(path, flat, key)[-1]
    if width % filters:
      raise common.ConversionError(f"{path}: key {key!r} has {width} output channels, expected a "
                                   f"multiple of filters={filters} (from encoder/Conv_0/kernel)")
    multipliers.append(width // filters)
  return dict(filters=int(filters), num_res_blocks=int(num_res_blocks),
              channel_multipliers=tuple(multipliers), embedding_dim=int(embedding_dim),
              codebook_size=int(codebook_size), conv_downsample=bool(conv_downsample))


def convert(src: str, dst: str, **options) -> None:
  """Writes the tokenizer of the maskgit msgpack `src` as a tokenizer directory at `dst`."""
  if options:
    raise common.ConversionError(f"google-vqgan reads every size from {src}; it takes no "
                                 f"options, got {sorted(options)}")
  tree = common.load_msgpack_tree(src)
  common.check_keys(src, ["params"], tree)
  if not isinstance(tree["params"], Mapping):
    raise common.ConversionError(f"{src}: 'params' is a {type(tree['params']).__name__}, "
                                 f"expected a dict of parameters")
  flat = common.flatten(tree["params"])
  model = VQGAN(**infer_config(src, flat))
  f = model.downsample_factor
  abstract = jax.eval_shape(
      lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, f, f, 3), jnp.float32)))
  expected = {key: value.shape for key, value in common.flatten(abstract["params"]).items()}
  common.check_keys(src, expected, flat)
  params = {key: common.check_shape(src, key, flat[key], shape)
            for key, shape in expected.items()}
  tokenizers.save(dst, model, {"params": common.unflatten(params)},
                  extra={"source": {"format": "google-research/maskgit flax msgpack",
                                    "file": os.path.abspath(src)}})
