"""The one dtype vocabulary of configs, flags and benchmarks: 'fp32' and 'bf16' (and, for
`mixed_precision`, accelerate's 'no', meaning fp32, as the reference configs write it)."""

import jax
import jax.numpy as jnp
import ml_collections

DTYPES = {"fp32": jnp.float32, "bf16": jnp.bfloat16}
# mixed_precision takes accelerate's names: 'no' (no mixed precision: fp32) or 'bf16'.
COMPUTE_DTYPES = {"no": jnp.float32, **DTYPES}


def get(name: str, what: str, vocabulary=DTYPES):
  """The jnp dtype `name` names; ValueError naming `what` (a config key or flag) otherwise."""
  if name not in vocabulary:
    raise ValueError(f"{what} must be one of {sorted(vocabulary)}, got {name!r}")
  return vocabulary[name]


def compute_dtype(config: ml_collections.ConfigDict):
  """The dtype the networks compute in (`mixed_precision`); parameters stay float32."""
  return get(config.mixed_precision, "mixed_precision", COMPUTE_DTYPES)


def hold_teacher(config: ml_collections.ConfigDict, teacher_params):
  """The frozen teacher's parameters in `teacher_dtype`, each leaf where it was placed."""
  dtype = get(config.teacher_dtype, "teacher_dtype")
  return jax.tree_util.tree_map(lambda x: x.astype(dtype), teacher_params)
