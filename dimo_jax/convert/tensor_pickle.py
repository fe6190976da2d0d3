"""A pickle reader for torch checkpoints that builds tensors and nothing else.

Older PyTorch Lightning checkpoints (taming-transformers' `last.ckpt`) pickle, beside their
`state_dict`, callbacks, optimizer and hyper-parameter objects by class name
(`pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint`, `argparse.Namespace`,
omegaconf containers). torch's weights-only reader refuses the whole file for them; unpickling
them for real would import and run whatever the file names. This module is a `pickle_module`
for `torch.load`:

  torch.load(path, map_location="cpu", weights_only=False, pickle_module=tensor_pickle)

Its `Unpickler` resolves a global to the object itself only when torch's weights-only reader
allows it (tensor rebuild functions, storage and dtype types, OrderedDict, ...). Every other
global becomes a fresh subclass of `Inert`: nothing is imported, and what the file passes to the
class (constructor arguments, `__setstate__` state, items) is only recorded, so no `__reduce__`,
`__init__` or `__setstate__` of the real class ever runs. Such an object is never a tensor, so
a state dict holding one is still refused by the converter reading it.
"""

import _compat_pickle
import pickle
from typing import Any, Dict, Tuple

from torch import _weights_only_unpickler


class Inert:
  """What a global outside torch's weights-only allowlist becomes: it records what the file
  gives it (`args`, `kwargs`, `state`, `items`) and does nothing else.

  Attributes:
    origin: "module.name" of the global in the file (a class attribute of each stand-in class).
  """
  origin = ""

  def __new__(cls, *args, **kwargs):
    self = super().__new__(cls)
    self.__dict__.update(args=args, kwargs=kwargs, state=None, items=[])
    return self

  def __init__(self, *args, **kwargs):
    pass  # `__new__` has recorded the arguments; nothing of the real class runs

  def __setstate__(self, state: Any) -> None:
    self.state = state

  def __setitem__(self, key: Any, value: Any) -> None:
    self.items.append((key, value))

  def append(self, item: Any) -> None:
    self.items.append(item)

  def extend(self, items: Any) -> None:
    self.items.extend(items)

  def add(self, item: Any) -> None:
    self.items.append(item)

  def __repr__(self) -> str:
    return f"<{self.origin}, not loaded>"


class Unpickler(pickle.Unpickler):
  """`pickle.Unpickler` whose `find_class` yields torch's allowed globals and `Inert`
  stand-ins for the rest (torch's `torch.load` subclasses it and adds `persistent_load`)."""

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self._stand_ins: Dict[Tuple[str, str], type] = {}

  def find_class(self, module: str, name: str) -> Any:
    # torch saves with protocol 2, which writes Python 2 names (`__builtin__.set`).
    if (module, name) in _compat_pickle.NAME_MAPPING:
      module, name = _compat_pickle.NAME_MAPPING[(module, name)]
    elif module in _compat_pickle.IMPORT_MAPPING:
      module = _compat_pickle.IMPORT_MAPPING[module]
    allowed = _weights_only_unpickler._get_allowed_globals()
    if f"{module}.{name}" in allowed:
      return allowed[f"{module}.{name}"]
    if (module, name) not in self._stand_ins:
      self._stand_ins[(module, name)] = type(name, (Inert,), {"origin": f"{module}.{name}",
                                                              "__module__": __name__})
    return self._stand_ins[(module, name)]


def load(file, **kwargs) -> Any:
  """`pickle.load` with this module's `Unpickler` (torch reads a legacy file's headers so)."""
  return Unpickler(file, **kwargs).load()
