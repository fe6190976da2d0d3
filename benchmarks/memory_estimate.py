"""Per-device memory of a Meissonic Di[M]O run, with and without FSDP (issue #4).

  python benchmarks/memory_estimate.py [--teacher-dtype fp32|bf16] [--per-device-batch 4]
      [--remat | --no-remat] [--devices 1,2,4,8,16,64] [--json OUT]
  python benchmarks/memory_estimate.py --model maskbit [--teacher-dtype ...] [--devices ...]

`--model maskbit` counts the train state of the 14-bit MaskBit release (LFQBert, 1024 wide,
24 layers, 256 positions x 2 splits; configs/maskbit_imagenet256.py, `input_proj`, `class_emb`
and `pos_emb` frozen) the same way, without an activation estimate (the GPU suite's `maskbit`
section measures the step's peak).

The state is the real one at the real size, built abstractly: `jax.eval_shape` of the released
MeissonicTransformer's init (about 1.0e9 parameters) and of `distill.create_state` with the
reference config (`fix_emb_layer`: `embed` and `mlm_layer` frozen, so Adam keeps no moments for
them). Its bytes are counted per component -- teacher, generator, auxiliary, EMA, the two Adam
optimizers -- and split per device by the step's own placement rule, `parallel.leaf_spec`: on an
`fsdp`-device axis a leaf costs a device its largest shard, a replicated leaf all of it. The
rest of the mesh is the data axis, which changes nothing per device at a fixed per-device batch.

The activation memory of the step is an ESTIMATE from the layer shapes (`activation_bytes`),
not a measurement: XLA's CPU compiler is the only one here, it takes about five minutes per
setting on this model, and its buffer assignment (float32 copies of bfloat16 values) is not the
one a GPU or TPU makes. The estimate is the generator update's peak (its backward pass, while
the teacher's and auxiliary model's logits are still live); the auxiliary update holds less.
"""

import argparse
import json
import math
import os
import sys
from typing import Any, Dict, Sequence

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from dimo_jax import defaults, distill, dtypes, parallel  # noqa: E402
from dimo_jax.models import meissonic  # noqa: E402
from dimo_jax.teachers import KINDS  # noqa: E402

GiB = 2**30
# The recipe (yuanzhi-zhu/DiMO configs/DIMO_Meissonic.yaml): 1024-pixel images, 64 x 64 codes,
# a batch of 4 per device, bf16 compute, gradient checkpointing; CLIP text of 77 tokens.
TOKEN_GRID = 64
TEXT_LEN = 77
RECIPE_BATCH = 4
# What `fix_emb_layer` freezes in the Meissonic transformer.
FROZEN = KINDS["meissonic"].frozen_with_emb
FSDP_SIZES = (1, 2, 4, 8, 16, 64)

# Float32 [L, V] tensors live per sample at the generator's backward pass: its logits and their
# cotangent, the guided teacher's (a conditional and an unconditional pass), the auxiliary's,
# the two log-softmaxes and softmaxes and g of the divergence, and a sampling temporary. An
# XLA:CPU compile of the real generator loss grows by 1.46 GiB per sample of batch, ~11 of them.
LOGIT_TENSORS = 10
# Token-wide (width D, compute dtype) tensors a transformer block keeps for its backward pass
# without remat: norms and modulations, q, k, v before and after their norm and RoPE, the
# attention output and its projection, the MLP's 4D hidden before and after GELU, residuals.
SAVED_PER_TOKEN = 24
# Width-D tensors per token outside the blocks, at the full 64 x 64 grid: the embedding and its
# norm and projection, the down/up-sampling convolutions and the mlm layer's first convolution.
STEM_PER_TOKEN = 8

# What a device offers the run: an 80 GB GPU (nvidia-smi reports 81559 MiB for an H100 80GB)
# and a 16 GB TPU v5e core (XLA's limit there is 15.75 GiB). A run fits with 10% to spare for
# fragmentation and collective buffers, is "tight" up to the whole of it.
DEVICES = {"GPU 80GB": 81559 * 2**20, "TPU v5e 16GB": int(15.75 * GiB)}
HEADROOM = 0.9


def abstract_teacher(model: meissonic.MeissonicTransformer, grid: int = TOKEN_GRID,
                     text_len: int = TEXT_LEN) -> Any:
  """The teacher's Flax variables {"params": ...} as float32 ShapeDtypeStructs (no memory)."""
  spec = jax.ShapeDtypeStruct
  inputs = (spec((1, grid, grid), jnp.int32),
            spec((1, text_len, model.joint_attention_dim), jnp.float32),
            spec((1, model.pooled_projection_dim), jnp.float32),
            spec((1, meissonic.NUM_MICRO_CONDS), jnp.float32), spec((1,), jnp.float32))
  return jax.eval_shape(model.init, jax.random.PRNGKey(0), *inputs)


def abstract_state(config, variables: Any, frozen=FROZEN) -> distill.DistillState:
  """`distill.create_state` of `variables` under `jax.eval_shape`: the run's train state."""
  return jax.eval_shape(
      lambda v, rng: distill.create_state(config, v, rng, frozen=frozen),
      variables, jax.random.PRNGKey(config.global_seed))


# The 14-bit MaskBit release's generator (configs/generator/maskbit_generator_14bit.yaml).
MASKBIT_14BIT = dict(codebook_bits=14, codebook_splits=2, num_positions=256, num_classes=1000,
                     hidden_dim=1024, depth=24, num_heads=16, mlp_dim=4096)


def maskbit_states(config, fsdp_sizes: Sequence[int], sizes=None) -> Dict[str, Any]:
  """Bytes per device of the MaskBit run's train state (teacher, generator, auxiliary, EMA,
  Adam moments, gradient) for every fsdp size."""
  from dimo_jax.models.maskbit import LFQBert
  model = LFQBert(**(sizes or MASKBIT_14BIT), dtype=jnp.bfloat16)
  variables = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                             jax.ShapeDtypeStruct((1, model.seq_len), jnp.int32),
                             jax.ShapeDtypeStruct((1,), jnp.int32))
  frozen = KINDS["maskbit"].frozen_with_emb
  components = state_components(abstract_state(config, variables, frozen), variables,
                                config.teacher_dtype)
  rows = {name: {f: tree_bytes(tree, f) for f in fsdp_sizes} for name, tree in components.items()}
  return {"params": num_params(variables), "fsdp": list(fsdp_sizes), "rows": rows,
          "states": {f: sum(rows[name][f] for name in rows) for f in fsdp_sizes}}


def print_maskbit(result: Dict[str, Any]) -> None:
  sizes = result["fsdp"]
  print(f"MaskBit 14-bit Di[M]O, {result['params'] / 1e6:.1f}M parameters; GiB per device "
        "(train state and gradient; activations: benchmarks/gpu_suite.py --sections maskbit)")
  print(f"{'component':<28}" + "".join(
      f"{'replicated' if f == 1 else f'fsdp={f}':>12}" for f in sizes))
  for name, values in list(result["rows"].items()) + [("= states + gradient",
                                                       result["states"])]:
    print(f"{name:<28}" + "".join(f"{values[f] / GiB:>12.2f}" for f in sizes))


def num_params(tree: Any) -> int:
  return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(tree))


def leaf_bytes(shape: Sequence[int], dtype, fsdp: int) -> int:
  """Bytes one device holds of a leaf placed by `parallel.leaf_spec` on an `fsdp` axis."""
  spec = parallel.leaf_spec(tuple(shape), fsdp)
  split = 1 if parallel.FSDP not in tuple(spec) else fsdp
  return math.prod(shape) * np.dtype(dtype).itemsize // split


def tree_bytes(tree: Any, fsdp: int = 1) -> int:
  """Bytes per device of every leaf of `tree` (arrays or ShapeDtypeStructs)."""
  return sum(leaf_bytes(x.shape, x.dtype, fsdp) for x in jax.tree_util.tree_leaves(tree))


def as_dtype(tree: Any, dtype) -> Any:
  return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype), tree)


def state_components(state: distill.DistillState, variables: Any, teacher_dtype: str
                     ) -> Dict[str, Any]:
  """Name -> abstract tree of everything held across steps, plus the step's float32 gradient.

  The gradient covers every generator leaf (frozen ones get theirs zeroed by the optimizer,
  after it is computed); XLA places it like its parameter.
  """
  return {
      f"teacher ({teacher_dtype})": as_dtype(variables, dtypes.DTYPES[teacher_dtype]),
      "generator (fp32)": state.gen_params,
      "auxiliary (fp32)": state.fake_params,
      "EMA (fp32)": state.ema_params,
      "Adam generator (mu, nu)": state.gen_opt_state,
      "Adam auxiliary (mu, nu)": state.fake_opt_state,
      "step, key, counters": (state.step, state.rng, state.skipped),
      "gradient (fp32, transient)": as_dtype(state.gen_params, jnp.float32),
  }


def block_params(variables: Any) -> int:
  """Parameters of the largest transformer block (what remat gathers and casts at a time)."""
  params = variables["params"]
  return max(num_params(params[name]) for name in params
             if name.startswith(("transformer_blocks_", "single_transformer_blocks_")))


def activation_bytes(model: meissonic.MeissonicTransformer, variables: Any, batch: int,
                     remat: bool, compute_bytes: int, fsdp: int, grid: int = TOKEN_GRID,
                     text_len: int = TEXT_LEN) -> Dict[str, int]:
  """An estimate of the generator update's transient bytes per device at `batch` per device.

  logits:  LOGIT_TENSORS float32 [L, V] per sample (L = grid^2 codes, V = codebook_size).
  blocks:  per sample and block, SAVED_PER_TOKEN width-D tensors per token of the N-token joint
           sequence plus the attention scores (float32) and probabilities (compute dtype),
           heads x N x N each -- XLA's attention, no flash kernel; with remat a block keeps only
           its input, and one block at a time holds the rest while it is recomputed.
  stem:    STEM_PER_TOKEN width-D tensors per code of the full grid, per sample.
  weights: the compute-dtype copy of the generator's weights (gathered whole under FSDP) that
           its backward pass reads: all of them without remat, one block's with it. None when
           the parameters are used as they are (float32 compute, nothing sharded).
  """
  width, heads = model.width, model.num_attention_heads
  cells = (grid // 2) ** 2 if model.downsample else grid**2
  tokens = cells + text_len
  blocks = model.num_layers + model.num_single_layers
  saved = tokens * SAVED_PER_TOKEN * width * compute_bytes
  scores = heads * tokens**2 * (4 + compute_bytes)
  block_input = tokens * width * compute_bytes
  per_block = saved + scores
  block_bytes = blocks * block_input + per_block if remat else blocks * per_block
  copied = compute_bytes != 4 or fsdp > 1
  weights = (block_params(variables) if remat else num_params(variables)) * compute_bytes
  return {
      "activations: logits": batch * LOGIT_TENSORS * grid**2 * model.codebook_size * 4,
      "activations: blocks": batch * block_bytes,
      "activations: stem": batch * STEM_PER_TOKEN * grid**2 * width * compute_bytes,
      "activations: weight copy": weights if copied else 0,
  }


def verdict(total: int, capacity: int) -> str:
  if total <= HEADROOM * capacity:
    return "fits"
  return "tight" if total <= capacity else "no"


def estimate(model: meissonic.MeissonicTransformer, config, fsdp_sizes: Sequence[int],
             batch: int, grid: int = TOKEN_GRID, text_len: int = TEXT_LEN) -> Dict[str, Any]:
  """Bytes per device of every component for every fsdp size, totals and verdicts.

  `config`: a `defaults.reference_config()`; its teacher_dtype, mixed_precision and
  gradient_checkpointing say how the teacher is held, the compute dtype and remat.
  """
  variables = abstract_teacher(model, grid, text_len)
  state = abstract_state(config, variables)
  components = state_components(state, variables, config.teacher_dtype)
  compute_bytes = 2 if config.mixed_precision == "bf16" else 4
  rows = {name: {f: tree_bytes(tree, f) for f in fsdp_sizes} for name, tree in components.items()}
  states = {f: sum(rows[name][f] for name in components) for f in fsdp_sizes}
  activations = {f: activation_bytes(model, variables, batch, config.gradient_checkpointing,
                                     compute_bytes, f, grid, text_len) for f in fsdp_sizes}
  for name in activations[fsdp_sizes[0]]:
    rows[name] = {f: activations[f][name] for f in fsdp_sizes}
  totals = {f: states[f] + sum(activations[f].values()) for f in fsdp_sizes}
  trainable = sum(math.prod(x.shape) for x, label in zip(
      jax.tree_util.tree_leaves(variables),
      jax.tree_util.tree_leaves(distill.trainable_labels(
          variables, config.fix_emb_layer, FROZEN))) if label == "train")
  return {
      "params": num_params(variables),
      "trainable_params": trainable,
      "per_device_batch": batch,
      "teacher_dtype": config.teacher_dtype,
      "compute_dtype": config.mixed_precision,
      "remat": bool(config.gradient_checkpointing),
      "fsdp": list(fsdp_sizes),
      "rows": rows,
      "states": states,
      "totals": totals,
      "verdicts": {device: {f: verdict(totals[f], capacity) for f in fsdp_sizes}
                   for device, capacity in DEVICES.items()},
  }


def print_report(result: Dict[str, Any]) -> None:
  sizes = result["fsdp"]
  head = ["replicated" if f == 1 else f"fsdp={f}" for f in sizes]
  print(f"Meissonic Di[M]O, {result['params'] / 1e9:.3f}e9 parameters "
        f"({result['trainable_params'] / 1e9:.3f}e9 trainable: embed and mlm_layer frozen); "
        f"GiB per device")
  print(f"{'component':<28}" + "".join(f"{h:>12}" for h in head))
  line = lambda name, values: print(f"{name:<28}" + "".join(
      f"{values[f] / GiB:>12.2f}" for f in sizes))
  for name, values in result["rows"].items():
    if name.startswith("activations"):
      continue
    line(name, values)
  line("= states + gradient", result["states"])
  for name, values in result["rows"].items():
    if name.startswith("activations"):
      line(name, values)
  line("= total (estimate)", result["totals"])
  print()
  for device, capacity in DEVICES.items():
    print(f"{device + f' ({capacity / GiB:.2f} GiB)':<28}"
          + "".join(f"{result['verdicts'][device][f]:>12}" for f in sizes))
  print()
  print("Assumptions:")
  print(f"  per-device batch {result['per_device_batch']} at 1024 px ({TOKEN_GRID}x{TOKEN_GRID}"
        f" codes, {TEXT_LEN} text tokens); compute {result['compute_dtype']}, teacher held in "
        f"{result['teacher_dtype']}, remat {'on' if result['remat'] else 'off'}; "
        "generator, auxiliary, EMA and Adam moments float32.")
  print("  fsdp=N: every leaf of >= 1024 elements split N ways along its largest divisible axis"
        " (parallel.leaf_spec); the data axis is the rest of the devices.")
  print("  States and gradient are counted from the real abstract train state; the activation "
        "rows are an estimate from layer shapes (XLA attention, no flash kernel; see "
        "activation_bytes), not a compiled measurement.")
  print(f"  fits: total <= {HEADROOM:.0%} of the device; tight: <= 100%; no: over. On GPUs set "
        "XLA_PYTHON_CLIENT_MEM_FRACTION=.95 (JAX preallocates 75% by default).")


def main(argv=None) -> Dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--teacher-dtype", choices=sorted(dtypes.DTYPES), default="fp32")
  parser.add_argument("--per-device-batch", type=int, default=RECIPE_BATCH)
  parser.add_argument("--remat", action=argparse.BooleanOptionalAction, default=True,
                      help="gradient checkpointing of every transformer block (the recipe's)")
  parser.add_argument("--devices", default=",".join(map(str, FSDP_SIZES)),
                      help="comma-separated fsdp sizes; 1 is fully replicated")
  parser.add_argument("--json", default=None, help="also write the numbers (bytes) here")
  parser.add_argument("--model", choices=("meissonic", "maskbit"), default="meissonic",
                      help="whose run: the 1B Meissonic recipe, or the 14-bit MaskBit release")
  args = parser.parse_args(argv)
  sizes = [int(s) for s in args.devices.split(",")]
  if any(s < 1 for s in sizes) or args.per_device_batch < 1:
    parser.error(f"fsdp sizes and the batch must be positive, got --devices {args.devices} "
                 f"--per-device-batch {args.per_device_batch}")

  config = defaults.reference_config()
  config.fix_emb_layer = True
  config.mixed_precision = "bf16"
  config.teacher_dtype = args.teacher_dtype
  config.gradient_checkpointing = args.remat
  if args.model == "maskbit":
    result = maskbit_states(config, sizes)
    print_maskbit(result)
  else:
    model = meissonic.MeissonicTransformer(dtype=jnp.bfloat16, remat=args.remat)
    result = estimate(model, config, sizes, args.per_device_batch)
    print_report(result)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=1)
  return result


if __name__ == "__main__":
  main()
