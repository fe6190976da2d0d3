"""What every converter shares: its error type, the readers of source files, and the checks that
name file, key and what was found (shape, dtype, value)."""

import os
import pickle
import re
import sys
from typing import Any, Callable, Dict, Iterable, Mapping, Optional, Tuple

import jax
import numpy as np

from dimo_jax import modeldir
from dimo_jax.errors import UserError


class ConversionError(UserError):
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


def host_array(array: Any) -> np.ndarray:
  """`array` as a numpy array of its own dtype, except floating types numpy lacks (bfloat16,
  float8), which become float32."""
  array = np.asarray(array)
  if (array.dtype not in (np.float16, np.float32, np.float64)
      and jax.dtypes.issubdtype(array.dtype, np.floating)):
    array = array.astype(np.float32)
  return array


def check_shape(path: str, key: str, array: Any, expected: Tuple[int, ...]) -> np.ndarray:
  """`array`, a source tensor becoming a parameter, as float32 numpy after checking that it is
  floating-point, has the shape `expected` and holds no NaN or Inf."""
  array = host_array(array)
  if not np.issubdtype(array.dtype, np.floating):
    raise ConversionError(f"{path}: key {key!r} is {array.dtype}, expected a floating-point "
                          "tensor")
  if tuple(array.shape) != tuple(expected):
    raise ConversionError(f"{path}: key {key!r} has shape {tuple(array.shape)}, "
                          f"expected {tuple(expected)}")
  values = array.astype(np.float32)
  bad = values.size - np.count_nonzero(np.isfinite(values))
  if bad:
    raise ConversionError(f"{path}: key {key!r} holds {bad} NaN/Inf values")
  return values


def count_layers(path: str, keys: Iterable[str], prefix: str, suffix: str = ".",
                 what: str = "layer") -> int:
  """n, when the keys `{prefix}{i}{suffix}...` number their layers exactly 0 .. n-1 (0 when no
  key does); a key of any other layer is refused before a model of that depth is built.

  Example: count_layers(path, state, "transformer.layers.") counts transformer.layers.i.*.
  """
  pattern = re.compile(re.escape(prefix) + r"(\d+)" + re.escape(suffix))
  first_key: Dict[int, str] = {}  # layer -> its first key, for the message
  for key in keys:
    match = pattern.match(key)
    if match:
      # Beyond 9 digits any index is stray; capping it keeps int() of a huge string out.
      layer = int(match[1]) if len(match[1]) <= 9 else 10 ** 9
      first_key[layer] = min(first_key.get(layer, key), key)
  n = 0
  while n in first_key:
    n += 1
  strays = [layer for layer in first_key if layer > n]
  if strays:
    key = first_key[min(strays)]
    layer = pattern.match(key)[1]
    present = f"the {what}s present are 0-{n - 1}: " if n else ""
    raise ConversionError(f"{path}: key {key!r} is {what} {layer}, but {present}{what} {n} is "
                          f"missing (no key starts with '{prefix}{n}{suffix}')")
  return n


def config_int(path: str, key: str, value: Any, minimum: int = 1) -> int:
  """`value`, config entry `key` of the file `path`, after checking it is an integer >= minimum
  (1: a positive integer, 0: a non-negative one)."""
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    kind = {0: "a non-negative integer", 1: "a positive integer"}.get(
        minimum, f"an integer >= {minimum}")
    raise ConversionError(f"{path}: key {key!r} must be {kind}, found {value!r}")
  return value


def config_ints(path: str, key: str, value: Any, minimum: int = 1,
                allow_empty: bool = False) -> Tuple[int, ...]:
  """`value`, config entry `key` of `path`, as a tuple after checking it is a list of integers
  >= minimum (non-empty unless `allow_empty`)."""
  if (not isinstance(value, (list, tuple)) or (not value and not allow_empty)
      or any(isinstance(v, bool) or not isinstance(v, int) or v < minimum for v in value)):
    kind = "positive integers" if minimum == 1 else f"integers >= {minimum}"
    raise ConversionError(f"{path}: key {key!r} must be a {'' if allow_empty else 'non-empty '}"
                          f"list of {kind}, found {value!r}")
  return tuple(value)


def read_json(path: str, expected: str = "a JSON object") -> Dict[str, Any]:
  """The JSON object in the file `path`; ConversionError naming the file when it is not one
  (`modeldir.read_json`)."""
  return modeldir.read_json(path, expected, ConversionError)


def _torch_load(path: str) -> Any:
  """The object a torch checkpoint holds, read without running code the file names.

  torch's weights-only reader comes first. A file it refuses only for a global outside its
  allowlist (a Lightning checkpoint's callbacks, hyper-parameters, ...) is read again with
  `tensor_pickle`, which builds the same tensors and leaves every other object an inert
  stand-in (never the file's class).
  """
  import torch
  try:
    return torch.load(path, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as e:
    # A global torch blocks outright (os, subprocess, builtins.eval, ...) is refused as it is;
    # one merely outside the allowlist (a Lightning callback) gets the inert reader.
    if not _forbidden_global(e) or "is blocked" in str(e):
      raise
  from dimo_jax.convert import tensor_pickle
  # weights_only=False is what torch requires with a pickle_module; tensor_pickle is the
  # restriction.
  return torch.load(path, map_location="cpu", weights_only=False, pickle_module=tensor_pickle)


_GLOBAL = re.compile(r"(?:unsupported GLOBAL|Unsupported global: GLOBAL)\s+([\w.]+)")


def _forbidden_global(error: Exception) -> Optional[str]:
  """"module.name" of the global a torch weights-only error names, or None."""
  found = _GLOBAL.search(str(error))
  return found.group(1) if found else None


def _reason(error: Exception) -> str:
  """The line of a torch error that says what is wrong (torch's weights-only errors are a page
  of advice around one line, whose advice to load with weights_only=False must never be
  followed for a file that names a forbidden global: that is how a pickle runs code)."""
  text = str(error)
  name = _forbidden_global(error)
  if name is not None:
    return (f"it names the global {name}, which a checkpoint of tensors has no need of and "
            "which loading would run; it was not loaded")
  if "WeightsUnpickler error: " in text:
    text = text.split("WeightsUnpickler error: ", 1)[1]
  return next((line.strip() for line in text.splitlines() if line.strip()),
              type(error).__name__)


def _inert_objects(value: Any, depth: int = 0):
  """Every `tensor_pickle.Inert` stand-in inside `value` (dicts, lists, tuples; what the file
  gave a stand-in is searched too), to a nesting depth of 20."""
  from dimo_jax.convert import tensor_pickle
  if depth > 20:
    return
  if isinstance(value, tensor_pickle.Inert):
    yield value
    value = (value.args, value.kwargs, value.state, value.items)
  if isinstance(value, Mapping):
    for k, v in value.items():
      yield from _inert_objects(k, depth + 1)
      yield from _inert_objects(v, depth + 1)
  elif isinstance(value, (list, tuple)):
    for v in value:
      yield from _inert_objects(v, depth + 1)


def _holds_inert(value: Any) -> bool:
  return next(_inert_objects(value), None) is not None


def _inert_origins(checkpoint: Mapping, key: str) -> set:
  """The globals ("module.name") of the stand-ins outside `checkpoint[key]`."""
  return {obj.origin for name, value in checkpoint.items() if name != key
          for obj in _inert_objects(value)}


def _torch_to_numpy(tensor: Any) -> np.ndarray:
  """A CPU numpy copy of a torch tensor, its dtype kept but for floating types numpy lacks
  (bfloat16, float8), which become float32."""
  import torch
  tensor = torch.Tensor.detach(tensor).cpu()
  if tensor.is_floating_point() and tensor.dtype not in (torch.float16, torch.float32,
                                                         torch.float64):
    tensor = tensor.float()
  return tensor.numpy()


def load_torch_state(path: str, key: Optional[str] = None,
                     what: str = "a PyTorch checkpoint") -> Dict[str, np.ndarray]:
  """The tensors of a torch checkpoint file (those under `key`, or the whole file when None),
  as numpy arrays of their own dtype (bfloat16 and float8 become float32); the parameters'
  dtypes and values are checked where they become parameters (`check_shape`).

  Needs PyTorch (conversion only: `pip install torch`). Nothing the file names is ever run
  (`_torch_load`): plain tensor dicts load with `weights_only=True`, Lightning checkpoints with
  other pickled objects through `tensor_pickle`; an entry under `key` that is not a tensor is
  refused either way.
  """
  require_file(path, what)
  try:
    import torch
  except ImportError as e:
    raise ConversionError(f"reading {path} needs PyTorch: pip install torch") from e
  try:
    checkpoint = _torch_load(path)
  except Exception as e:  # torch raises many types for a file that is not a checkpoint
    raise ConversionError(f"{path} is not a readable PyTorch checkpoint: {_reason(e)}") from e
  if key is None:
    if not isinstance(checkpoint, Mapping):
      raise ConversionError(f"{path}: expected a state dict, found a {type(checkpoint).__name__}")
    state = checkpoint
  else:
    if not isinstance(checkpoint, Mapping) or key not in checkpoint:
      found = (sorted(checkpoint, key=str) if isinstance(checkpoint, Mapping)
               else type(checkpoint).__name__)
      raise ConversionError(f"{path}: expected a dict with key {key!r}, found {found}")
    state = checkpoint[key]
    ignored = [name for name in checkpoint if name != key and _holds_inert(checkpoint[name])]
    if ignored:  # pickled objects outside torch's allowlist, kept inert and left unused
      print(f"note: {path}: ignored the entries {', '.join(map(repr, ignored))} beside {key!r} "
            "(pickled objects that were not loaded: "
            f"{', '.join(sorted(_inert_origins(checkpoint, key)))})", file=sys.stderr)
    if not isinstance(state, Mapping):
      raise ConversionError(f"{path}: {key!r} is a {type(state).__name__}, expected a dict of "
                            "tensors")
  out = {}
  for name, tensor in state.items():
    where = f"{key}[{name!r}]" if key else repr(name)
    if not isinstance(name, str):
      raise ConversionError(f"{path}: {where} has a {type(name).__name__} key, expected a "
                            "string")
    if not isinstance(tensor, torch.Tensor):
      raise ConversionError(f"{path}: {where} is a {type(tensor).__name__}, not a tensor")
    try:
      out[name] = _torch_to_numpy(tensor)
    except (RuntimeError, TypeError) as e:  # sparse, quantized, or a dtype numpy lacks
      raise ConversionError(f"{path}: {where} is a {tensor.dtype} tensor that cannot be read "
                            f"as an array ({_reason(e)})") from e
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
  """A Flax parameter tree from a torch state dict, every key, shape, dtype and value checked
  first (`check_keys`, `check_shape`).

  Args:
    path: the source file, for error messages.
    state: torch name -> numpy array as the loaders return it (its own dtype).
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
  """The tensors of a .safetensors file as numpy arrays of their own dtype (bfloat16 and float8
  become float32; no PyTorch needed); `check_shape` checks them where they become parameters."""
  require_file(path, what)
  import safetensors.numpy  # conversion-only dependency (the [convert] extra)
  try:
    try:
      state = safetensors.numpy.load_file(path)
    except TypeError:
      # numpy has no bfloat16; the flax reader (ml_dtypes) has, on the host.
      import safetensors.flax
      with jax.default_device(jax.devices("cpu")[0]):
        state = safetensors.flax.load_file(path)
  except Exception as e:  # safetensors raises several types for a file that is not one
    raise ConversionError(f"{path} is not a readable safetensors file: {e}") from e
  return {name: host_array(array) for name, array in state.items()}
