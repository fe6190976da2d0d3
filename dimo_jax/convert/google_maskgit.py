"""google-research/maskgit's `maskgit_imagenet256_checkpoint` -> a `google-maskgit` teacher.

The release writes `flax.serialization.to_bytes` of the transformer's variables,
{"params": {"Embed_0": ..., "TransformerLayer_i": ..., "MlmLayer_0": ...}}, which its
inference.py passes to `Transformer.apply` as they are. `dimo_jax.models.google_maskgit`
reproduces that tree key for key, so converting is reading the sizes off the shapes and
checking every key and shape; a bare parameter tree, or one under a train state's
"params" / "target" / "optimizer" entries, is found as well (the other entries of such a
state, optimizer moments and the like, are ignored).

What the weights tell: the width D, the heads H (query kernel [D, H, D/H]), the MLP width,
the number of layers, L + 1 positions and the vocabulary V + C + 1. What they cannot tell is
how the vocabulary splits into V codes and C classes: `codebook_size` says it (default 1024,
the release's VQGAN), and C follows.
"""

from typing import Any, Dict, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp

from dimo_jax import teachers
from dimo_jax.convert.common import (ConversionError, check_keys, check_shape, count_layers,
                                     flatten, load_msgpack_tree, unflatten)
from dimo_jax.models.google_maskgit import GoogleMaskGIT

_WORD = "Embed_0/word_embeddings/embedding"
_POSITION = "Embed_0/position_embeddings/embedding"
_QUERY = "TransformerLayer_0/Attention_0/self_attention/query/kernel"
_MLP = "TransformerLayer_0/Mlp_0/intermediate_output/kernel"
# Entries under which a saved train state may hold the parameters, outermost first.
_WRAPPERS = ("optimizer", "target", "params")


def _find_params(path: str, tree: Mapping[str, Any]) -> Mapping[str, Any]:
  """The subtree holding Embed_0, looking through the wrappers a train state may add."""
  node = tree
  while "Embed_0" not in node:
    inner = next((node[k] for k in _WRAPPERS if isinstance(node.get(k), Mapping)), None)
    if inner is None:
      raise ConversionError(f"{path}: no MaskGIT transformer parameters (a tree with "
                            f"'Embed_0') found; top-level keys {sorted(tree)}")
    node = inner
  return node


def _shape(path: str, flat: Mapping[str, Any], key: str, ndim: int):
  if key not in flat:
    raise ConversionError(f"{path}: missing key {key!r}")
  shape = tuple(getattr(flat[key], "shape", ()))
  if len(shape) != ndim:
    raise ConversionError(f"{path}: key {key!r} has shape {shape}, expected {ndim} dimensions")
  return shape


def build_model(path: str, flat: Mapping[str, Any], codebook_size: int,
                num_heads: Optional[int] = None) -> GoogleMaskGIT:
  """The module whose sizes the checkpoint's shapes give (see the module docstring)."""
  vocab, width = _shape(path, flat, _WORD, 2)
  positions, _ = _shape(path, flat, _POSITION, 2)
  _, heads, _ = _shape(path, flat, _QUERY, 3)
  _, intermediate = _shape(path, flat, _MLP, 2)
  if num_heads is not None and num_heads != heads:
    raise ConversionError(f"{path}: key {_QUERY!r} has {heads} heads, but num_heads={num_heads}")
  num_classes = vocab - codebook_size - 1
  if num_classes < 1:
    raise ConversionError(f"{path}: key {_WORD!r} has {vocab} rows, too few for "
                          f"codebook_size={codebook_size} codes, a class and the mask token")
  # TransformerLayer_0 .. _{n-1}; a gap or a stray index is refused before the model is built.
  num_layers = count_layers(path, flat, "TransformerLayer_", "/")
  return GoogleMaskGIT(codebook_size=codebook_size, num_classes=num_classes,
                       seq_len=positions - 1, hidden_size=width, num_layers=num_layers,
                       num_heads=heads, intermediate_size=intermediate)


def convert_params(path: str, tree: Mapping[str, Any], codebook_size: int = 1024,
                   num_heads: Optional[int] = None) -> Tuple[GoogleMaskGIT, Dict[str, Any]]:
  """(module, variables {"params": ...}) from a restored release tree, every key checked."""
  flat = flatten(_find_params(path, tree))
  model = build_model(path, flat, codebook_size, num_heads)
  expected = flatten(jax.eval_shape(lambda: model.init(
      {"params": jax.random.PRNGKey(0)}, jnp.zeros((1, model.seq_len), jnp.int32),
      jnp.zeros((1,), jnp.int32)))["params"])
  check_keys(path, expected, flat)
  params: Dict[str, Any] = {
      key: check_shape(path, key, flat[key], spec.shape) for key, spec in expected.items()}
  return model, {"params": unflatten(params)}


def convert(src: str, dst: str, codebook_size: int = 1024, num_heads: Optional[int] = None,
            **options) -> None:
  """Converts the msgpack checkpoint `src` into the teacher directory `dst`.

  Args:
    src: the release's `maskgit_imagenet{256,512}_checkpoint` (flax msgpack).
    dst: the model directory to write (completely or not at all).
    codebook_size: V, the tokenizer's codebook size (1024 in the release); the classes are
      the remaining vocabulary rows but the last (the mask token).
    num_heads: when given, checked against the heads the attention kernels hold.
    **options: any other option is refused (this converter reads everything else).
  """
  if options:
    raise ConversionError(f"{src}: google-maskgit takes no options {sorted(options)}")
  model, variables = convert_params(src, load_msgpack_tree(src), codebook_size, num_heads)
  teachers.save(dst, model, variables, extra={"source": {
      "format": "google-research/maskgit msgpack", "path": src}})
