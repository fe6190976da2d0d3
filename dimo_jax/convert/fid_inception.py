"""pytorch-fid's Inception weights (pt_inception-2015-12-05-6726825d.pth) -> a model directory.

  python -m dimo_jax.convert fid-inception --src FILE --dst DST

SRC is the plain state dict pytorch-fid releases (torchvision Inception3 key names, 1008-class
`fc`, no AuxLogits). Every key must be a variable of `dimo_jax.models.fid_inception.FIDInception`
and every variable must be present with its shape; BatchNorm `num_batches_tracked` counters
(present in state dicts saved by newer PyTorch) are ignored. The key mapping is documented in
that module. DST loads with `dimo_jax.models.fid_inception.load`.
"""

import os

import jax

from dimo_jax import modeldir
from dimo_jax.convert import common
from dimo_jax.models import fid_inception

IGNORED_SUFFIX = ".num_batches_tracked"

# Flax leaf -> torch parameter or buffer name.
_TORCH_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias",
               "mean": "running_mean", "var": "running_var"}


def torch_name(path: str) -> str:
  """Flax path -> torch key (params/Mixed_5b/branch1x1/bn/scale -> Mixed_5b.branch1x1.bn.weight)."""
  _, *modules, leaf = path.split("/")
  return ".".join(modules + [_TORCH_LEAF[leaf]])


def convert(src: str, dst: str) -> None:
  """Converts pytorch-fid's Inception state dict at `src` into a model directory at `dst`."""
  state = common.load_torch_state(src, what="pytorch-fid's Inception weights (a state dict)")
  state = {k: v for k, v in state.items() if not k.endswith(IGNORED_SUFFIX)}
  model = fid_inception.FIDInception()
  expected = common.flatten(jax.eval_shape(lambda: fid_inception.init_variables(model)))
  variables = common.params_from_torch(src, state, expected, torch_name, common.torch_shape,
                                       common.torch_to_flax)
  modeldir.write(dst, {"kind": fid_inception.KIND, "config": {},
                       "source": {"format": "pytorch-fid", "checkpoint": os.path.abspath(src)}},
                 variables)
