"""valeoai/Halton-MaskGIT v1.0 `.pth` -> a teacher directory (`dimo_jax.models.maskgit`).

  python -m dimo_jax.convert halton-maskgit --src current.pth --dst DST [--num-heads 16]
      [--codebook-size 1024] [--num-classes 1000]

SRC is what the release's trainer saves (branch v1.0, Trainer/trainer.py `save_network`): a
dict whose `model_state_dict` is the `MaskTransformer` state dict (`iter`, `global_epoch`,
`optimizer_state_dict` are ignored). Keys prefixed `module.` (DistributedDataParallel) or
`_orig_mod.` (torch.compile) are accepted. The key mapping is documented in
dimo_jax/models/maskgit.py.

The sizes come from the weights:
  hidden_dim   tok_emb.weight columns
  seq_len L    pos_emb length - 1 (the class token has the last position)
  depth        the layers i of transformer.layers.i.*, which must run 0 .. depth-1 (a key of
               any other layer is refused by name before a model is built)
  mlp_dim      rows of transformer.layers.0.1.fn.net.0.weight
  V + C        tok_emb.weight rows - 2 (codes, mask, classes, "no class"; `bias` has as many
               columns)
Nothing in the weights separates the codebook size V from the class count C, nor gives the
number of heads: they are options, with the release's ImageNet-256 values as defaults (1024
codes, 1000 classes, 16 heads). Give one of V and C and the other follows from the table size.
Dropout is set to the release's 0.1 (it only matters when the teacher is fine-tuned).
"""

import os
from typing import Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from dimo_jax import teachers
from dimo_jax.convert import common
from dimo_jax.convert.common import ConversionError
from dimo_jax.models.maskgit import MaskTransformer

STATE_KEY = "model_state_dict"
# Prefixes a wrapper adds in front of every key: DDP's `.module`, torch.compile's `._orig_mod`.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
IMAGENET_CODEBOOK_SIZE = 1024
IMAGENET_NUM_CLASSES = 1000
RELEASE_DROPOUT = 0.1


def strip_wrapper_prefixes(path: str, state: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
  """The state dict with `module.` / `_orig_mod.` (in any nesting) removed from its keys."""
  out = {}
  for key, value in state.items():
    name = key
    while name.startswith(WRAPPER_PREFIXES):
      name = name.split(".", 1)[1]
    if name in out:
      raise ConversionError(f"{path}: keys {key!r} and another both name {name!r} once the "
                            f"wrapper prefixes {list(WRAPPER_PREFIXES)} are removed")
    out[name] = value
  return out


def torch_name(path: str) -> str:
  """Flax path -> torch key, e.g. transformer/layers_3/attn/mha/in_proj/kernel ->
  transformer.layers.3.0.fn.mha.in_proj_weight (see dimo_jax/models/maskgit.py)."""
  *modules, leaf = path.split("/")
  if modules == ["tok_emb"]:
    return "tok_emb.weight"
  if not modules:  # pos_emb, bias: bare parameters
    return leaf
  suffix = "bias" if leaf == "bias" else "weight"
  if modules[0] in ("first_layer", "last_layer"):
    return f"{modules[0]}.{modules[1].removeprefix('layers_')}.{suffix}"
  _, layer, block, *rest = modules  # transformer/layers_i/{attn,ff}/...
  i = layer.removeprefix("layers_")
  if block == "attn":
    head = f"transformer.layers.{i}.0"
    if rest == ["norm"]:
      return f"{head}.norm.{suffix}"
    if rest == ["mha", "in_proj"]:  # nn.MultiheadAttention keeps q, k, v in one parameter
      return f"{head}.fn.mha.in_proj_{suffix}"
    return f"{head}.fn.mha.out_proj.{suffix}"
  head = f"transformer.layers.{i}.1"
  if rest == ["norm"]:
    return f"{head}.norm.{suffix}"
  return f"{head}.fn.net.{rest[1].removeprefix('layers_')}.{suffix}"


def _torch_shape(leaf: str, shape: Tuple[int, ...]) -> Tuple[int, ...]:
  """torch.nn.Linear stores [out, in]; flax Dense kernels are [in, out]."""
  return tuple(reversed(shape)) if leaf == "kernel" else tuple(shape)


def _size(path: str, state: Dict[str, np.ndarray], key: str, ndim: int) -> Tuple[int, ...]:
  """The shape of `state[key]`, which a size is read from, after checking it is there."""
  if key not in state:
    raise ConversionError(f"{path}: missing key {key!r} (needed to read the model's sizes); "
                          f"found {len(state)} keys, e.g. {sorted(state)[:5]}")
  shape = tuple(state[key].shape)
  if len(shape) != ndim:
    raise ConversionError(f"{path}: key {key!r} has shape {shape}, expected {ndim} dimensions")
  return shape


def _vocabulary(path: str, rows: int, codebook_size: Optional[int],
                num_classes: Optional[int]) -> Tuple[int, int]:
  """(V, C) with V + 1 + C + 1 == rows, from the options (ImageNet defaults when neither)."""
  if codebook_size is None and num_classes is None:
    codebook_size, num_classes = IMAGENET_CODEBOOK_SIZE, IMAGENET_NUM_CLASSES
  elif codebook_size is None:
    codebook_size = rows - 2 - num_classes
  elif num_classes is None:
    num_classes = rows - 2 - codebook_size
  if codebook_size < 1 or num_classes < 1 or codebook_size + num_classes + 2 != rows:
    raise ConversionError(
        f"{path}: key 'tok_emb.weight' has {rows} rows, which does not fit codebook_size "
        f"{codebook_size} + mask + num_classes {num_classes} + 'no class' = "
        f"{codebook_size + num_classes + 2}; give the right --codebook-size / --num-classes")
  return codebook_size, num_classes


def model_from_state(path: str, state: Dict[str, np.ndarray], num_heads: int,
                     codebook_size: Optional[int] = None,
                     num_classes: Optional[int] = None) -> MaskTransformer:
  """The MaskTransformer whose parameters have the shapes of `state` (module docstring)."""
  rows, width = _size(path, state, "tok_emb.weight", 2)
  seq_len = _size(path, state, "pos_emb", 3)[1] - 1
  mlp_dim = _size(path, state, "transformer.layers.0.1.fn.net.0.weight", 2)[0]
  depth = common.count_layers(path, state, "transformer.layers.")
  if num_heads < 1 or width % num_heads:
    raise ConversionError(f"{path}: key 'tok_emb.weight' gives the width {width}, which "
                          f"num_heads {num_heads} does not divide")
  if seq_len < 1:
    raise ConversionError(f"{path}: key 'pos_emb' has shape {state['pos_emb'].shape}, expected "
                          "[1, L + 1, width] with L >= 1 visual tokens")
  codebook_size, num_classes = _vocabulary(path, rows, codebook_size, num_classes)
  return MaskTransformer(codebook_size=codebook_size, num_classes=num_classes, seq_len=seq_len,
                         hidden_dim=width, depth=depth, num_heads=num_heads, mlp_dim=mlp_dim,
                         dropout=RELEASE_DROPOUT)


def convert(src: str, dst: str, num_heads: int = 16, codebook_size: Optional[int] = None,
            num_classes: Optional[int] = None) -> None:
  """Converts the Halton-MaskGIT v1.0 checkpoint `src` into a teacher directory at `dst`.

  Args:
    src: the `.pth` file the release's trainer saved.
    dst: the teacher directory to write (replaced if it exists; written only if all fits).
    num_heads: attention heads (16 in every released size; not readable from the weights).
    codebook_size, num_classes: V and C (module docstring); ImageNet's 1024 and 1000 if neither.
  """
  state = strip_wrapper_prefixes(src, common.load_torch_state(src, STATE_KEY))
  model = model_from_state(src, state, num_heads, codebook_size, num_classes)

  abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                            jnp.zeros((1, model.seq_len), jnp.int32), jnp.zeros((1,), jnp.int32))
  expected = common.flatten(abstract["params"])
  params = common.params_from_torch(
      src, state, expected, torch_name, _torch_shape,
      lambda leaf, array: array.T if leaf == "kernel" else array)
  teachers.save(dst, model, {"params": params},
                extra={"source": {"format": "halton-maskgit", "checkpoint": os.path.abspath(src)}})
