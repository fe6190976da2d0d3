"""What every converter shares: its error type and the checks that name file, key and shapes."""

import os
from typing import Any, Callable, Dict, Iterable, Mapping, Optional, Tuple

import numpy as np


class ConversionError(ValueError):
  """A source checkpoint that does not fit the module being built (file, key, shapes)."""


def require_file(path: str, what: str) -> str:
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such file (expected {what})")
  return path


def check_keys(path: str, expected: Iterable[str], found: Iterable[str]) -> None:
  """Raises if `found` lacks any of `expected` or holds keys beyond them."""
  expected, found = set(expected), set(found)
  missing, unexpected = sorted(expected - found), sorted(found - expected)
  if missing or unexpected:
    parts = []
    if missing:
      parts.append(f"missing keys {missing[:10]}" + (" ..." if len(missing) > 10 else ""))
    if unexpected:
      parts.append(f"unexpected keys {unexpected[:10]}" + (" ..." if len(unexpected) > 10 else ""))
    raise ConversionError(f"{path}: " + "; ".join(parts))


def check_shape(path: str, key: str, array: Any, expected: Tuple[int, ...]) -> np.ndarray:
  """`array` as float32 numpy after checking its shape is `expected`."""
  array = np.asarray(array)
  if tuple(array.shape) != tuple(expected):
    raise ConversionError(f"{path}: key {key!r} has shape {tuple(array.shape)}, "
                          f"expected {tuple(expected)}")
  return array.astype(np.float32)


def load_torch_state(path: str, key: Optional[str] = None,
                     what: str = "a PyTorch checkpoint") -> Dict[str, np.ndarray]:
  """The tensors of a torch checkpoint file (those under `key`, or the whole file when None),
  as float32 numpy arrays.

  Needs PyTorch (conversion only: `pip install torch`). Loads with `weights_only=True`, which
  reads plain tensor dicts and refuses arbitrary pickled objects.
  """
  require_file(path, what)
  try:
    import torch
  except ImportError as e:
    raise ConversionError(f"reading {path} needs PyTorch: pip install torch") from e
  try:
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # torch raises many types for a file that is not a checkpoint
    raise ConversionError(f"{path} is not a readable PyTorch checkpoint: {e}") from e
  if key is None:
    if not isinstance(checkpoint, Mapping):
      raise ConversionError(f"{path}: expected a state dict, found a {type(checkpoint).__name__}")
    state = checkpoint
  else:
    if not isinstance(checkpoint, Mapping) or key not in checkpoint:
      found = sorted(checkpoint) if isinstance(checkpoint, Mapping) else type(checkpoint).__name__
      raise ConversionError(f"{path}: expected a dict with key {key!r}, found {found}")
    state = checkpoint[key]
  out = {}
  for name, tensor in state.items():
    if not hasattr(tensor, "detach"):
      where = f"{key}[{name!r}]" if key else repr(name)
      raise ConversionError(f"{path}: {where} is a {type(tensor).__name__}, not a tensor")
    out[name] = tensor.detach().float().cpu().numpy()
  return out


def load_msgpack_tree(path: str) -> Dict[str, Any]:
  """The nested dict of numpy arrays in a flax msgpack checkpoint (google-research/maskgit)."""
  require_file(path, "a flax msgpack checkpoint")
  from flax import serialization
  with open(path, "rb") as f:
    data = f.read()
  try:
    tree = serialization.msgpack_restore(data)
  except Exception as e:  # msgpack raises several types for bytes that are not a checkpoint
    raise ConversionError(f"{path} is not a flax msgpack checkpoint: {e}") from e
  if not isinstance(tree, Mapping):
    raise ConversionError(f"{path}: expected a dict of parameters, found {type(tree).__name__}")
  return tree


def flatten(tree: Mapping[str, Any], sep: str = "/") -> Dict[str, Any]:
  """{"a": {"b": x}} -> {"a/b": x}."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      out.update({f"{key}{sep}{k}": v for k, v in flatten(value, sep).items()})
    else:
      out[str(key)] = value
  return out


def unflatten(flat: Mapping[str, Any], sep: str = "/") -> Dict[str, Any]:
  """{"a/b": x} -> {"a": {"b": x}}."""
  out: Dict[str, Any] = {}
  for key, value in flat.items():
    node = out
    *parents, leaf = key.split(sep)
    for part in parents:
      node = node.setdefault(part, {})
    node[leaf] = value
  return out


def torch_shape(leaf: str, shape: Tuple[int, ...]) -> Tuple[int, ...]:
  """The torch shape of a Flax parameter: conv kernels HWIO are OIHW there, linear [in, out]
  kernels are [out, in]; every other leaf keeps its shape."""
  if leaf == "kernel":
    return (shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4 else tuple(shape[::-1])
  return tuple(shape)


def torch_to_flax(leaf: str, array: np.ndarray) -> np.ndarray:
  """A torch tensor in the Flax layout `torch_shape` describes."""
  if leaf == "kernel":
    return array.transpose(2, 3, 1, 0) if array.ndim == 4 else array.T
  return array


def params_from_torch(path: str, state: Mapping[str, np.ndarray], expected: Mapping[str, Any],
                      torch_name: Callable[[str], str],
                      torch_shape: Callable[[str, Tuple[int, ...]], Tuple[int, ...]],
                      to_flax: Callable[[str, np.ndarray], np.ndarray]) -> Dict[str, Any]:
  """A Flax parameter tree from a torch state dict, every key and shape checked first.

  Args:
    path: the source file, for error messages.
    state: torch name -> float32 array.
    expected: flat Flax path ('a/b/kernel') -> shape-carrying leaf (from `jax.eval_shape`).
    torch_name: Flax path -> the torch key that holds it.
    torch_shape: (Flax leaf name, Flax shape) -> the shape torch stores.
    to_flax: (Flax leaf name, torch array) -> the Flax array (e.g. a transposed kernel).

  Returns:
    The nested parameter dict, shaped as `expected`.
  """
  names = {torch_name(p): p for p in expected}
  check_keys(path, names, state)
  params = {}
  for name, flax_path in names.items():
    leaf = flax_path.rsplit("/", 1)[-1]
    array = check_shape(path, name, state[name], torch_shape(leaf, expected[flax_path].shape))
    params[flax_path] = to_flax(leaf, array)
  return unflatten(params)


def load_safetensors(path: str, what: str = "safetensors weights") -> Dict[str, np.ndarray]:
  """The tensors of a .safetensors file as float32 numpy arrays (no PyTorch needed)."""
  require_file(path, what)
  import safetensors.numpy  # conversion-only dependency (requirements-convert.txt)
  try:
    try:
      state = safetensors.numpy.load_file(path)
    except TypeError:
      # numpy has no bfloat16; the flax reader (ml_dtypes) has, on the host.
      import jax
      import safetensors.flax
      with jax.default_device(jax.devices("cpu")[0]):
        state = safetensors.flax.load_file(path)
  except Exception as e:  # safetensors raises several types for a file that is not one
    raise ConversionError(f"{path} is not a readable safetensors file: {e}") from e
  return {name: np.asarray(array, np.float32) for name, array in state.items()}
