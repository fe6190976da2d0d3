"""The device suite: every figure a user picks dimo_jax for, measured on one accelerator in one call.

  python benchmarks/gpu_suite.py --out OUT              # the real sizes (one GPU, ~8 minutes)
  python benchmarks/gpu_suite.py --out OUT --size tiny  # the same code at toy sizes (CPU, CI)

Each section runs in its own process (`--section NAME`), so that an out-of-memory or a kernel a
device refuses costs one row, not the call, and each starts with a clean peak-memory counter:

  matmul     the chip's measured bf16 matrix-product rate (8192^3): the MFU denominator
  step       the Di[M]O train step at MaskGIT's real size (768 wide, 24 layers, 16 heads, 256
             tokens + class, 1024 codes, 174M), the recipe of configs/maskgit_imagenet256.py in
             bf16 at global batch 64, once per attention kernel (`auto`: the reference's op, which
             drops attention weights; `cudnn` (`xla` off a GPU): fused, without that dropout);
             step time, images/s, model FLOPs; cuDNN's logits against the einsum kernel's; and
             the Soft-Di[M]O step (GAN on, the fused kernel) beside it
  torch      the same step in eager PyTorch on the same device (benchmarks/torch_dimo.py,
             torch.autocast bf16), with the attention maps the reference keeps and without
  sampling   batch 64 through the VQGAN decoder: the teacher at 8 guided steps (16 transformer
             passes) and the one-step generator, images/s, end to end and transformer alone
  inception  FID Inception pool features (float32, the precision `evaluate` scores with)
  maskbit    the Di[M]O and Soft-Di[M]O steps on MaskBit's 14-bit release size (LFQBert 1024
             wide, 24 layers, 16 heads, 256 positions x 2 splits of 128 codes, 1000 classes),
             the recipe of configs/maskbit_imagenet256.py in bf16 at global batch 64: step time,
             images/s and peak device memory
  meissonic  the 1B Meissonic recipe at 1024 px (random weights in the released shapes), remat,
             teacher held in bf16: peak device memory and step time per batch size, one process
             each, until one does not fit; beside benchmarks/memory_estimate.py's estimate

Every timed figure is the median of several runs after warm-up; compile time is reported
apart. The orchestrator writes under --out: gpu_suite.log (everything every section printed),
gpu_suite.json (every row) and gpu_suite.md (the final table). --budget_s bounds the whole
call: a section that would start with too little time left is reported as skipped.

It imports neither tensorflow, tensorflow-datasets nor clu, which the device image lacks
(tests/test_gpu_suite.py runs the tiny suite with those imports blocked).
"""

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SECTIONS = ("matmul", "step", "torch", "sampling", "inception", "maskbit", "meissonic")
# The seconds a section needs at least, on a GPU at the real size (start, compile, runs): one
# that would start with less left is skipped. Measured on no device yet: compile-time guesses.
MIN_SECONDS = {"matmul": 20, "step": 150, "torch": 40, "sampling": 60, "inception": 40,
               "maskbit": 90, "meissonic": 150}

# The two sizes. `real` is the paper's: MaskGIT ImageNet-256 and Meissonic at 1024 px.
SIZES = {
    "real": dict(
        matmul=8192, hidden=768, depth=24, heads=16, tokens=256, codes=1024, classes=1000,
        batch=64, step_runs=10, sample_batch=64, sample_runs=5,
        vqgan=dict(ch=128, out_ch=3, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2,
                   attn_resolutions=(16,), in_channels=3, resolution=256, z_channels=256,
                   n_embed=1024, embed_dim=256),
        inception_batch=200, inception_side=256, inception_runs=5,
        meissonic={}, meissonic_grid=64, meissonic_text=77, meissonic_batches=(4, 16, 32, 48, 64, 96),
        meissonic_runs=3, torch_runs=10,
        maskbit=dict(codebook_bits=14, codebook_splits=2, num_positions=256, num_classes=1000,
                     hidden_dim=1024, depth=24, num_heads=16, mlp_dim=4096)),
    "tiny": dict(
        matmul=256, hidden=64, depth=2, heads=4, tokens=16, codes=32, classes=10,
        batch=4, step_runs=3, sample_batch=4, sample_runs=2,
        vqgan=dict(ch=32, out_ch=3, ch_mult=(1, 1, 2), num_res_blocks=1,
                   attn_resolutions=(4,), in_channels=3, resolution=16, z_channels=8,
                   n_embed=32, embed_dim=8),
        inception_batch=2, inception_side=32, inception_runs=2,
        meissonic=dict(num_layers=1, num_single_layers=1, attention_head_dim=16,
                       num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                       axes_dims_rope=(4, 6, 6), vocab_size=40, codebook_size=32),
        meissonic_grid=8, meissonic_text=5, meissonic_batches=(1, 2), meissonic_runs=2,
        torch_runs=3,
        maskbit=dict(codebook_bits=6, codebook_splits=2, num_positions=16, num_classes=10,
                     hidden_dim=64, depth=2, num_heads=4, mlp_dim=128)),
}


# --------------------------------------------------------------------------------------------
# Counting and timing.

def maskgit_pass_flops(hidden: int, depth: int, mlp: int, tokens: int, codes: int) -> int:
  """Matrix-product FLOPs of one MaskTransformer forward pass of one sample (L tokens + class).

  first_layer: two D x D dense layers; per layer: the fused q, k, v projection, q k^T, the
  weighted sum of v, the output projection and the two MLP layers; last_layer: one D x D; the
  head over the L visual tokens and V codes. Elementwise work (norms, softmax, GELU) is left
  out, as model-FLOPs utilization counts it.
  """
  t = tokens + 1
  layer = 2 * t * hidden * 3 * hidden + 2 * 2 * t * t * hidden + 2 * t * hidden * hidden \
      + 2 * 2 * t * hidden * mlp
  return 2 * 2 * t * hidden * hidden + depth * layer + 2 * t * hidden * hidden \
      + 2 * tokens * hidden * codes


def dimo_step_passes(config) -> int:
  """Forward-pass equivalents per sample of one Di[M]O step (a backward pass counts 2).

  Generator update: the generator forward and backward (3), the teacher (2 when guided), the
  auxiliary model (2 when guided). Each auxiliary round: a generator forward for fresh samples
  (1) and the auxiliary forward and backward (3, doubled when trained guided).
  """
  guided = lambda w: 2 if w != 1.0 else 1
  generator = 3 + guided(config.true_cfg) + guided(config.fake_cfg_eval)
  fake_round = 1 + 3 * guided(config.fake_cfg_train)
  return generator + config.fake_rounds * fake_round


def median_time(fn: Callable[[], Any], runs: int, warmup: int = 1) -> List[float]:
  """Seconds of each of `runs` calls of `fn` (which blocks until its work is done), after
  `warmup` untimed calls."""
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(runs):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return times


def time_steps(exe, state, rest: Sequence[Any], runs: int, warmup: int):
  """([seconds of each of `runs` blocked steps], seconds per step of `runs` steps dispatched
  back to back with one wait at the end) of a compiled step that donates its state:
  `exe(state, *rest) -> (state, metrics)`. The second shows whether anything in the step waits
  on the host."""
  import jax
  for _ in range(warmup):
    state = jax.block_until_ready(exe(state, *rest)[0])
  times = []
  for _ in range(runs):
    start = time.perf_counter()
    state = jax.block_until_ready(exe(state, *rest)[0])
    times.append(time.perf_counter() - start)
  start = time.perf_counter()
  for _ in range(runs):
    state = exe(state, *rest)[0]
  jax.block_until_ready(state)
  return times, (time.perf_counter() - start) / runs


def compiled(fn, *args):
  """(executable, seconds to lower and compile) of a `jax.jit`-ed `fn` at `args`."""
  start = time.perf_counter()
  exe = fn.lower(*args).compile()
  return exe, time.perf_counter() - start


def xla_flops(exe) -> Optional[float]:
  cost = exe.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return (cost or {}).get("flops")


def peak_bytes() -> Optional[int]:
  """The device's peak bytes in use in this process (None where the backend keeps no count)."""
  import jax
  stats = jax.local_devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use")


class Rows:
  """The rows a section reports: printed as they come, written to --json at the end."""

  def __init__(self, section: str, command: str):
    self.section, self.command, self.rows = section, command, []

  def add(self, figure: str, value, unit: str = "", compile_s: Optional[float] = None,
          times: Optional[Sequence[float]] = None, note: str = "", **extra):
    row = {"section": self.section, "figure": figure, "value": value, "unit": unit,
           "compile_s": compile_s, "runs": len(times) if times else None,
           "all": list(times) if times else None, "note": note, "command": self.command,
           **extra}
    self.rows.append(row)
    shown = f"{value:.4g}" if isinstance(value, float) else str(value)
    print(f"[{self.section}] {figure}: {shown} {unit}"
          + (f" (compile {compile_s:.1f} s)" if compile_s is not None else "")
          + (f" -- {note}" if note else ""), flush=True)
    return row


# --------------------------------------------------------------------------------------------
# Sections. Each takes (size dict, Rows, args) and imports what it needs.

def section_matmul(size, rows, args):
  import jax
  import jax.numpy as jnp
  n = size["matmul"]
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.bfloat16)
  b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.bfloat16)
  exe, compile_s = compiled(jax.jit(lambda a, b: a @ b), a, b)
  times = median_time(lambda: jax.block_until_ready(exe(a, b)), runs=10, warmup=3)
  rate = 2 * n**3 / statistics.median(times)
  rows.add(f"bf16 matmul {n}^3", rate / 1e12, "TFLOP/s", compile_s, times, key="matmul_tflops")


def _maskgit(size, dtype, attention="auto"):
  from dimo_jax.models.maskgit import MaskTransformer
  return MaskTransformer(codebook_size=size["codes"], num_classes=size["classes"],
                         seq_len=size["tokens"], hidden_dim=size["hidden"], depth=size["depth"],
                         num_heads=size["heads"], mlp_dim=4 * size["hidden"], dropout=0.1,
                         dtype=dtype, attention=attention)


def _recipe(size, attention="auto"):
  from configs import maskgit_imagenet256
  config = maskgit_imagenet256.get_config()
  config.train_batch_size = size["batch"]
  config.per_device_batch = size["batch"]
  config.mask_value = size["codes"]
  config.attention_impl = attention
  return config


def fused_kernel() -> str:
  """The fused attention kernel this backend has: cuDNN's on a GPU, XLA's elsewhere."""
  import jax
  return "cudnn" if jax.default_backend() == "gpu" else "xla"


def section_step(size, rows, args):
  import jax
  import jax.numpy as jnp
  import numpy as np
  from dimo_jax import distill, teachers

  model = _maskgit(size, jnp.bfloat16)
  teacher = teachers.of_module(model)
  variables = jax.jit(teacher.init_variables)()
  count = sum(x.size for x in jax.tree_util.tree_leaves(variables))
  rows.add("MaskGIT parameters", count / 1e6, "M", key="params_m")
  flops = size["batch"] * maskgit_pass_flops(size["hidden"], size["depth"], 4 * size["hidden"],
                                             size["tokens"], size["codes"])
  fused = fused_kernel()

  # The fused kernel against the einsum one on the teacher's deterministic logits (bf16).
  tokens = jax.random.randint(jax.random.PRNGKey(3), (size["batch"], size["tokens"]), 0,
                              size["codes"] + 1)
  labels = jnp.arange(size["batch"], dtype=jnp.int32) % size["classes"]
  logits = {k: np.asarray(jax.jit(model.clone(attention=k).apply)(variables, tokens, labels))
            for k in ("einsum", fused)}
  diff = float(np.max(np.abs(logits[fused] - logits["einsum"])))
  scale = float(np.max(np.abs(logits["einsum"])))
  rows.add(f"{fused} vs einsum attention: teacher logits max |diff|", diff, "",
           note=f"logits up to {scale:.3g} in magnitude, bf16", key="attention_diff")

  for attention in ("auto", fused):
    config = _recipe(size, attention)
    passes = dimo_step_passes(config)
    step_teacher = teacher.with_model(model.clone(attention=attention))
    state = distill.create_state(config, variables, jax.random.PRNGKey(1),
                                 teacher.frozen_with_emb)
    step = jax.jit(distill.make_train_step(config, step_teacher), donate_argnums=0)
    exe, compile_s = compiled(step, state, variables)
    times, pipelined = time_steps(exe, state, (variables,), size["step_runs"], warmup=2)
    median = statistics.median(times)
    what = ("the reference's op: einsum with attention-weight dropout" if attention == "auto"
            else f"{attention}: fused, no attention-weight dropout")
    rows.add(f"JAX step, attention {attention}", median * 1e3, "ms", compile_s, times,
             note=what, key=f"jax_step_ms_{attention}", model_flops=passes * flops,
             xla_flops=xla_flops(exe), pipelined_ms=pipelined * 1e3,
             images_per_s=size["batch"] / median)

  # Soft-Di[M]O: the same step with the GAN term (weight 1, one discriminator update a step:
  # the frozen teacher's backbone with heads on four layers; random tokens as its real data).
  config = _recipe(size, fused)
  config.gan.weight = 1.0
  step_teacher = teacher.with_model(model.clone(attention=fused))
  state = distill.create_state(config, variables, jax.random.PRNGKey(1),
                               teacher.frozen_with_emb, teacher=step_teacher)
  real = {"tokens": jax.random.randint(jax.random.PRNGKey(4), (1, size["batch"], size["tokens"]),
                                       0, size["codes"]),
          "cond": (jnp.arange(size["batch"]) % size["classes"])[None]}
  step = jax.jit(distill.make_train_step(config, step_teacher), donate_argnums=0)
  exe, compile_s = compiled(step, state, variables, None, real)
  times, pipelined = time_steps(exe, state, (variables, None, real), size["step_runs"], warmup=2)
  median = statistics.median(times)
  rows.add(f"Soft-Di[M]O step (GAN on), attention {fused}", median * 1e3, "ms", compile_s,
           times, note="the Di[M]O step plus the GAN term and one discriminator update",
           key="soft_dimo_step_ms", pipelined_ms=pipelined * 1e3,
           images_per_s=size["batch"] / median)


def section_maskbit(size, rows, args):
  import jax
  import jax.numpy as jnp
  from configs import maskbit_imagenet256
  from dimo_jax import distill, teachers
  from dimo_jax.models.maskbit import LFQBert

  fused = fused_kernel()
  model = LFQBert(**size["maskbit"], dtype=jnp.bfloat16, attention=fused)
  teacher = teachers.of_module(model)
  variables = jax.jit(teacher.init_variables)()
  count = sum(x.size for x in jax.tree_util.tree_leaves(variables))
  rows.add("MaskBit LFQBert parameters", count / 1e6, "M", key="maskbit_params_m")
  for gan in (0.0, 1.0):
    config = maskbit_imagenet256.get_config()
    config.train_batch_size = config.per_device_batch = size["batch"]
    config.mask_value = model.mask_id
    config.attention_impl = fused
    config.gan.weight = gan
    state = distill.create_state(config, variables, jax.random.PRNGKey(1),
                                 teacher.frozen_with_emb, teacher=teacher)
    real = None
    if gan:
      real = {"tokens": jax.random.randint(jax.random.PRNGKey(4),
                                           (1, size["batch"], model.seq_len), 0,
                                           model.codebook_size),
              "cond": (jnp.arange(size["batch"]) % model.num_classes)[None]}
    step = jax.jit(distill.make_train_step(config, teacher), donate_argnums=0)
    exe, compile_s = compiled(step, state, variables, None, real)
    times, pipelined = time_steps(exe, state, (variables, None, real), size["step_runs"],
                                  warmup=2)
    median = statistics.median(times)
    peak = peak_bytes()
    name = "Soft-Di[M]O (GAN on)" if gan else "Di[M]O"
    rows.add(f"MaskBit {name} step, attention {fused}", median * 1e3, "ms", compile_s, times,
             note=f"{model.seq_len} sub-tokens of {model.codebook_size} codes, bf16",
             key=f"maskbit_{'soft_' if gan else ''}step_ms", pipelined_ms=pipelined * 1e3,
             images_per_s=size["batch"] / median,
             peak_gib=None if peak is None else peak / 2**30)


def section_torch(size, rows, args):
  import torch
  from benchmarks import torch_dimo
  device = "cuda" if torch.cuda.is_available() else "cpu"
  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
  if device == "cpu":
    torch.set_flush_denormal(True)  # as benchmarks/jax_vs_torch.py: XLA:CPU flushes them too
  for fast in (False, True):
    torch.manual_seed(0)
    teacher = torch_dimo.MaskTransformer(
        size["codes"], size["classes"], size["tokens"], size["hidden"], size["depth"],
        size["heads"], 4 * size["hidden"], 0.1, fast_attention=fast)
    trainer = torch_dimo.TorchDiMO(teacher, torch_dimo.StepConfig(batch=size["batch"]), True,
                                   device)
    times = median_time(lambda: (trainer.step(), sync()), size["torch_runs"], warmup=3)
    label = "need_weights=False (fused SDPA)" if fast else "need_weights=True, as the reference"
    rows.add(f"PyTorch eager step, {label}", statistics.median(times) * 1e3, "ms", None, times,
             note=f"torch {torch.__version__} on {device}, autocast bf16",
             key=f"torch_step_ms_{'fast' if fast else 'reference'}")


def _vqgan(size, dtype):
  import jax
  import jax.numpy as jnp
  from dimo_jax.models.taming_vqgan import VQModel
  model = VQModel(**size["vqgan"], dtype=dtype)
  side = size["vqgan"]["resolution"]
  variables = jax.jit(model.init)(jax.random.PRNGKey(5), jnp.zeros((1, side, side, 3)))
  return model, variables


def section_sampling(size, rows, args):
  import jax
  import jax.numpy as jnp
  from dimo_jax import samplers, sampling, teachers

  model = _maskgit(size, jnp.bfloat16)
  variables = jax.jit(teachers.of_module(model).init_variables)()
  config = _recipe(size)
  vqgan, vq_variables = _vqgan(size, jnp.float32)
  side = math.isqrt(size["tokens"])
  if side * side != size["tokens"] or side * vqgan.downsample_factor != size["vqgan"]["resolution"]:
    raise ValueError(f"{size['tokens']} tokens do not tile the VQGAN's "
                     f"{size['vqgan']['resolution']} px")
  batch = size["sample_batch"]
  labels = jnp.arange(batch, dtype=jnp.int32) % size["classes"]
  sigma = samplers.generator_noise(config, 0)

  def generator_codes(params, rng):
    def gen_fn(tokens, labels_, noise_rng):
      return model.apply(params, tokens, labels_, emb_noise=sigma, rngs={"noise": noise_rng})
    return sampling.generator_sample(gen_fn, rng, labels, model.seq_len, model.codebook_size,
                                     model.mask_id, config.fixed_ratio)[0]

  def teacher_codes(params, rng):
    return sampling.maskgit_sample(
        lambda tokens, labels_, drop: model.apply(params, tokens, labels_, drop), rng, labels,
        model.seq_len, model.mask_id, config.sampling_step, config.cfg_w, config.r_temp,
        config.sm_temp, config.sched_mode)

  def with_decode(codes_fn):
    def fn(params, rng):
      codes = codes_fn(params, rng).reshape(batch, side, side)
      return vqgan.apply(vq_variables, codes, method=vqgan.decode)
    return fn

  passes = {"teacher": 2 * config.sampling_step, "generator": 1}
  per_image = {}
  for name, codes_fn in (("generator", generator_codes), ("teacher", teacher_codes)):
    for part, fn in (("transformer", codes_fn), ("end to end", with_decode(codes_fn))):
      exe, compile_s = compiled(jax.jit(fn), variables, jax.random.PRNGKey(2))
      times = median_time(lambda: jax.block_until_ready(exe(variables, jax.random.PRNGKey(2))),
                          size["sample_runs"], warmup=1)
      per_image[name, part] = statistics.median(times) / batch
      label = (f"teacher {config.sampling_step} steps, guidance {config.cfg_w:g}"
               if name == "teacher" else "generator, 1 step")
      rows.add(f"sampling {label}, {part}", batch / statistics.median(times), "images/s",
               compile_s, times, note=f"batch {batch}, {passes[name]} transformer passes"
               + (", VQGAN decode included" if part == "end to end" else ""),
               key=f"sample_{name}_{part.replace(' ', '_')}")
  for part in ("transformer", "end to end"):
    rows.add(f"one-step speed-up, {part}",
             per_image["teacher", part] / per_image["generator", part], "x",
             key=f"speedup_{part.replace(' ', '_')}",
             note=f"limit {passes['teacher']}x for the transformer part")


def section_inception(size, rows, args):
  import jax
  from dimo_jax.models import fid_inception
  model = fid_inception.FIDInception()  # float32, precision "highest": what `evaluate` runs
  variables = jax.jit(fid_inception.init_variables, static_argnums=0)(model)
  batch, side = size["inception_batch"], size["inception_side"]
  images = jax.random.uniform(jax.random.PRNGKey(0), (batch, side, side, 3))
  exe, compile_s = compiled(jax.jit(model.apply), variables, images)
  times = median_time(lambda: jax.block_until_ready(exe(variables, images)),
                      size["inception_runs"], warmup=1)
  rows.add("FID Inception pool features", batch / statistics.median(times), "images/s",
           compile_s, times, note=f"batch {batch} of {side}x{side} resized to 299, float32 "
           "precision highest", key="inception_images_per_s")


def section_meissonic(size, rows, args):
  """One batch size (--batch) of the 1B recipe; the orchestrator walks the sizes."""
  import jax
  import jax.numpy as jnp
  from configs import meissonic_1024
  from dimo_jax import distill, dtypes, teachers
  from dimo_jax.models import meissonic
  from dimo_jax.teachers import meissonic as meissonic_teacher

  batch, grid, text_len = args.batch, size["meissonic_grid"], size["meissonic_text"]
  config = meissonic_1024.get_config()
  config.teacher_dtype = "bf16"
  config.gradient_checkpointing = True
  config.per_device_batch = config.train_batch_size = batch
  transformer = meissonic.MeissonicTransformer(**size["meissonic"], dtype=jnp.bfloat16)
  config.mask_value = transformer.mask_id
  model = meissonic.TextConditioned(transformer, grid, grid)
  teacher = teachers.of_module(model)
  variables = jax.jit(teacher.init_variables)()
  state = jax.jit(lambda v: distill.create_state(config, v, jax.random.PRNGKey(1),
                                                 teacher.frozen_with_emb))(variables)
  variables = jax.jit(lambda v: dtypes.hold_teacher(config, v))(variables)

  def cond(*lead):
    one = meissonic_teacher.example_condition(transformer, 1, text_len)
    noise = lambda x, k: jax.random.normal(jax.random.PRNGKey(k), (*lead, *x.shape[1:]), x.dtype)
    out = {k: noise(v, i) for i, (k, v) in enumerate(one.items())}
    out["neg_hidden"], out["neg_pooled"] = out["uncond_hidden"], out["uncond_pooled"]
    return out

  fed = {"generator": cond(batch), "auxiliary": cond(config.fake_rounds, batch)}
  step_teacher = teacher.with_model(model.clone(remat=True))
  step = jax.jit(distill.make_train_step(config, step_teacher), donate_argnums=0)
  exe, compile_s = compiled(step, state, variables, fed)
  times, _ = time_steps(exe, state, (variables, fed), size["meissonic_runs"], warmup=1)
  peak = peak_bytes()
  memory = exe.memory_analysis()
  temp = getattr(memory, "temp_size_in_bytes", None) if memory is not None else None
  count = sum(x.size for x in jax.tree_util.tree_leaves(variables))
  rows.add(f"Meissonic step, batch {batch}", statistics.median(times) * 1e3, "ms", compile_s,
           times, key=f"meissonic_step_ms_{batch}", batch=batch,
           peak_gib=None if peak is None else peak / 2**30,
           temp_gib=None if temp is None else temp / 2**30, params_b=count / 1e9,
           note=(f"peak {peak / 2**30:.2f} GiB" if peak is not None
                 else "no device memory count on this backend"))


# --------------------------------------------------------------------------------------------
# The orchestrator.

def environment() -> Dict[str, str]:
  import jax
  info = {"jax": jax.__version__, "backend": jax.default_backend(),
          "device": jax.devices()[0].device_kind, "devices": str(jax.device_count())}
  try:
    import torch
    info["torch"] = torch.__version__
    info["torch_cuda"] = str(torch.cuda.is_available())
  except ImportError:
    info["torch"] = "absent"
  return info


def run_section(name: str, args, extra: Sequence[str], timeout: float, log) -> List[Dict]:
  """Runs one section in a child process; its rows, or one row saying why there are none."""
  out = os.path.join(args.out, f".{name}{''.join(extra).replace('-', '_')}.json")
  command = [sys.executable, os.path.abspath(__file__), "--section", name, "--size", args.size,
             "--json", out, *extra]
  shown = f"python benchmarks/gpu_suite.py --section {name} --size {args.size} {' '.join(extra)}"
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  # JAX takes 75% of a GPU by default; the memory figures want (nearly) all of it.
  env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", ".95")
  start = time.perf_counter()
  try:
    proc = subprocess.run(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=timeout)
    output, code = proc.stdout, proc.returncode
  except subprocess.TimeoutExpired as e:
    output = e.stdout if isinstance(e.stdout, str) else (e.stdout or b"").decode()
    code = "timeout"
  log.write(f"\n===== {shown.strip()} ({time.perf_counter() - start:.0f} s, exit {code})\n")
  log.write(output)
  log.flush()
  if code == 0 and os.path.exists(out):
    with open(out) as f:
      rows = json.load(f)
    os.remove(out)
    return rows
  lines = [line for line in output.strip().splitlines() if line.strip()]
  # The exception's own line, not the traceback note jax prints after it.
  errors = [line for line in lines if re.match(r"^[\w.]*(Error|Exception|Exhausted)\b", line)]
  last = (errors or lines or ["no output"])[-1]
  why = "timed out" if code == "timeout" else f"exit {code}: {last[:200]}"
  oom = "RESOURCE_EXHAUSTED" in output or "out of memory" in output.lower()
  return [{"section": name, "figure": f"{name} {' '.join(extra)}".strip(), "value": None,
           "unit": "", "note": "out of memory" if oom else why, "command": shown.strip(),
           "failed": True, "oom": oom}]


def orchestrate(args) -> Dict[str, Any]:
  os.makedirs(args.out, exist_ok=True)
  size = SIZES[args.size]
  deadline = time.perf_counter() + args.budget_s
  chosen = [s for s in SECTIONS if s in args.sections.split(",")]
  scale = 1.0 if args.size == "real" else 0.0  # tiny sections need no reserve
  rows: List[Dict] = []
  info = environment()
  print(f"gpu_suite --size {args.size}: {info}", flush=True)
  with open(os.path.join(args.out, "gpu_suite.log"), "w") as log:
    log.write(json.dumps(info) + "\n")
    for name in chosen:
      runs = ([["--batch", str(b)] for b in size["meissonic_batches"]]
              if name == "meissonic" else [[]])
      for extra in runs:
        left = deadline - time.perf_counter()
        if left < MIN_SECONDS[name] * scale or left <= 0:
          rows.append({"section": name, "figure": f"{name} {' '.join(extra)}".strip(),
                       "value": None, "unit": "", "failed": True, "skipped": True,
                       "note": f"skipped: {left:.0f} s of the budget left"})
          print(f"[{name}] skipped {' '.join(extra)}: {left:.0f} s left", flush=True)
          continue
        got = run_section(name, args, extra, left, log)
        for row in got:
          if row.get("failed"):
            print(f"[{name}] {row['figure']}: {row['note']}", flush=True)
        rows.extend(got)
        if name == "meissonic" and got[-1].get("failed"):
          break  # the next batch size does not fit either
  result = {"environment": info, "size": args.size, "rows": rows,
            "summary": summarize(rows, args.size)}
  with open(os.path.join(args.out, "gpu_suite.json"), "w") as f:
    json.dump(result, f, indent=1)
  table = render(result)
  with open(os.path.join(args.out, "gpu_suite.md"), "w") as f:
    f.write(table + "\n")
  print("\n" + table, flush=True)
  return result


def _value(rows, key):
  for row in rows:
    if row.get("key") == key and row.get("value") is not None:
      return row
  return None


def summarize(rows: List[Dict], size: str) -> Dict[str, Any]:
  """The derived figures: MFU, the PyTorch ratio, the memory column, and the targets."""
  out: Dict[str, Any] = {}
  matmul = _value(rows, "matmul_tflops")
  steps = [r for r in rows if str(r.get("key", "")).startswith("jax_step_ms_")]
  if matmul:
    for row in steps:
      row["mfu"] = row["model_flops"] / (row["value"] / 1e3) / (matmul["value"] * 1e12)
  torch_ref = _value(rows, "torch_step_ms_reference")
  best = min((r for r in steps), key=lambda r: r["value"], default=None)
  if torch_ref and best:
    out["torch_over_jax"] = torch_ref["value"] / best["value"]
    out["torch_over_jax_kernel"] = best["key"].rsplit("_", 1)[-1]
    exact = _value(rows, "jax_step_ms_auto")
    if exact:
      out["torch_over_jax_reference_op"] = torch_ref["value"] / exact["value"]
  soft = _value(rows, "soft_dimo_step_ms")
  # The Di[M]O step of the same (fused) kernel; the orchestrator does not start a backend.
  plain = next((r for r in steps if r["key"] != "jax_step_ms_auto"), None)
  if soft and plain:
    out["soft_dimo_over_dimo_step"] = soft["value"] / plain["value"]
  speedup = _value(rows, "speedup_end_to_end")
  if speedup:
    out["one_step_speedup_end_to_end"] = speedup["value"]
  memory = [r for r in rows if str(r.get("key", "")).startswith("meissonic_step_ms_")]
  if memory:
    out["meissonic"] = [{"batch": r["batch"], "step_ms": r["value"], "peak_gib": r["peak_gib"],
                         "estimate_gib": meissonic_estimate(r["batch"], size)} for r in memory]
  oom = [r for r in rows if r.get("section") == "meissonic" and r.get("oom")]
  if oom:
    out["meissonic_first_oom"] = oom[0]["figure"]
  out["targets"] = {
      "jax_step_1.3x_faster_than_torch": (None if "torch_over_jax" not in out
                                          else out["torch_over_jax"] >= 1.3),
      "one_step_12x_faster_end_to_end": (None if speedup is None else speedup["value"] >= 12),
  }
  return out


def meissonic_estimate(batch: int, size: str) -> Optional[float]:
  """benchmarks/memory_estimate.py's replicated total at `batch` (GiB), for the real size."""
  if size != "real":
    return None
  from benchmarks import memory_estimate
  from dimo_jax import defaults
  from dimo_jax.models import meissonic
  config = defaults.reference_config()
  config.fix_emb_layer = True
  config.mixed_precision = "bf16"
  config.teacher_dtype = "bf16"
  config.gradient_checkpointing = True
  model = meissonic.MeissonicTransformer(dtype="bfloat16", remat=True)
  return memory_estimate.estimate(model, config, [1], batch)["totals"][1] / 2**30


def render(result: Dict[str, Any]) -> str:
  """The final table (markdown): every row, then the derived figures."""
  info = result["environment"]
  lines = [f"device: {info['device']} ({info['backend']}), jax {info['jax']}, torch "
           f"{info.get('torch')}; size {result['size']}", "",
           "| figure | value | compile | median of | command |", "|---|---|---|---|---|"]
  for row in result["rows"]:
    value = row.get("value")
    if value is None:
      shown = row.get("note", "")
    else:
      shown = f"{value:.4g} {row['unit']}".strip()
      extras = []
      if row.get("mfu") is not None:
        extras.append(f"MFU {row['mfu']:.1%}")
      if row.get("images_per_s") is not None:
        extras.append(f"{row['images_per_s']:.1f} images/s")
      if row.get("pipelined_ms") is not None:
        extras.append(f"{row['pipelined_ms']:.4g} ms pipelined")
      if row.get("peak_gib") is not None:
        extras.append(f"peak {row['peak_gib']:.2f} GiB")
      if extras:
        shown += " (" + ", ".join(extras) + ")"
    compile_s = row.get("compile_s")
    lines.append(f"| {row['figure']} | {shown} | "
                 f"{'' if compile_s is None else f'{compile_s:.1f} s'} | "
                 f"{row.get('runs') or ''} | `{row.get('command', '')}` |")
  summary = result["summary"]
  lines.append("")
  if "torch_over_jax" in summary:
    lines.append(f"PyTorch eager / JAX step: {summary['torch_over_jax']:.2f}x (JAX with "
                 f"attention {summary['torch_over_jax_kernel']})"
                 + (f"; {summary['torch_over_jax_reference_op']:.2f}x with the reference's op"
                    if "torch_over_jax_reference_op" in summary else ""))
  if "soft_dimo_over_dimo_step" in summary:
    lines.append(f"Soft-Di[M]O step / Di[M]O step: {summary['soft_dimo_over_dimo_step']:.2f}x")
  if "one_step_speedup_end_to_end" in summary:
    lines.append(f"one-step generator vs 8-step guided teacher, end to end: "
                 f"{summary['one_step_speedup_end_to_end']:.1f}x")
  for row in summary.get("meissonic", []):
    est = "" if row["estimate_gib"] is None else f", estimate {row['estimate_gib']:.2f} GiB"
    peak = "n/a" if row["peak_gib"] is None else f"{row['peak_gib']:.2f} GiB"
    lines.append(f"Meissonic batch {row['batch']}: step {row['step_ms']:.4g} ms, measured peak "
                 f"{peak}{est}")
  if "meissonic_first_oom" in summary:
    lines.append(f"Meissonic: {summary['meissonic_first_oom']} does not fit")
  lines.append("targets: " + ", ".join(f"{k} {'n/a' if v is None else ('met' if v else 'MISSED')}"
                                       for k, v in summary["targets"].items()))
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="gpu_suite_out", help="folder for the log, JSON, table")
  parser.add_argument("--size", choices=sorted(SIZES), default="real")
  parser.add_argument("--budget_s", type=float, default=480.0,
                      help="seconds for the whole suite; sections that would start with less "
                           "than they need are skipped")
  parser.add_argument("--sections", default=",".join(SECTIONS),
                      help=f"comma-separated, of {', '.join(SECTIONS)}")
  parser.add_argument("--section", choices=SECTIONS, default=None,
                      help="run one section in this process (what the orchestrator starts)")
  parser.add_argument("--json", default=None, help="with --section: write its rows here")
  parser.add_argument("--batch", type=int, default=None, help="with --section meissonic")
  args = parser.parse_args(argv)
  unknown = set(args.sections.split(",")) - set(SECTIONS)
  if unknown:
    parser.error(f"unknown sections {sorted(unknown)}; known: {', '.join(SECTIONS)}")
  if args.section is None:
    return orchestrate(args)
  if args.section == "meissonic" and args.batch is None:
    parser.error("--section meissonic needs --batch")
  command = (f"python benchmarks/gpu_suite.py --section {args.section} --size {args.size}"
             + (f" --batch {args.batch}" if args.batch else ""))
  rows = Rows(args.section, command)
  globals()[f"section_{args.section}"](SIZES[args.size], rows, args)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(rows.rows, f)
  return rows.rows


if __name__ == "__main__":
  main()
