"""Times the Di[M]O train step of dimo_jax against eager PyTorch on the same machine, in one run.

  python benchmarks/jax_vs_torch.py --hidden 768 --depth 24 --heads 16 --tokens 256 \
      --codes 1024 --batch 64 --dtype bf16 --steps 5 [--profile]

Both sides build the MaskGIT transformer at the given size with random weights (1000 classes,
MLP 4x wide, dropout 0.1) and run the recipe of configs/maskgit_imagenet256.py: guidance 2 for
the teacher, FKL, arccos masking, one auxiliary round, Adam with clipping, EMA. JAX runs
`dimo_jax.distill.make_train_step` jitted (compile time reported on its own); PyTorch runs
benchmarks/torch_dimo.py eagerly (`torch.autocast` for bf16). Each side does --warmup untimed
steps, then --steps timed steps; the medians are printed with the ratio torch / jax (> 1: JAX is
faster).

--gan-weight W (> 0) also times the Soft-Di[M]O step (the GAN term of weight W on the teacher's
backbone, one discriminator update; random tokens as its real data) and prints its cost against
the Di[M]O step. --profile splits the time between the two halves of the step: JAX is also compiled with no
auxiliary round (its generator half), PyTorch's halves are timed directly. The JAX step's FLOPs
(XLA's cost analysis) and the rate achieved are printed too, for a utilization figure.
"""

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import torch  # noqa: E402

from benchmarks import torch_dimo  # noqa: E402
from configs import maskgit_imagenet256  # noqa: E402
from dimo_jax import distill, teachers  # noqa: E402
from dimo_jax.models.maskgit import MaskTransformer  # noqa: E402

_NUM_CLASSES = 1000
_MIXED_PRECISION = {"bf16": "bf16", "fp32": "no"}  # the dtypes.DTYPES names


def jax_config(args, fake_rounds: int, gan_weight: float = 0.0):
  config = maskgit_imagenet256.get_config()
  config.mixed_precision = _MIXED_PRECISION[args.dtype]
  config.train_batch_size = args.batch
  config.mask_value = args.codes
  config.fake_rounds = fake_rounds
  config.gan.weight = gan_weight
  return config


def time_jax(args, model, variables, fake_rounds: int, gan_weight: float = 0.0):
  """(compile s, [step s], flops per step or None) of the jitted train step (Soft-Di[M]O's with
  `gan_weight` > 0)."""
  config = jax_config(args, fake_rounds, gan_weight)
  teacher = teachers.of_module(model)
  state = distill.create_state(config, variables, jax.random.PRNGKey(1),
                               teacher.frozen_with_emb, teacher=teacher)
  real = None
  if gan_weight > 0:
    batch = config.train_batch_size
    real = {"tokens": jax.random.randint(jax.random.PRNGKey(2), (1, batch, args.tokens), 0,
                                         args.codes),
            "cond": (jnp.arange(batch) % _NUM_CLASSES)[None]}
  step_fn = jax.jit(distill.make_train_step(config, teacher), donate_argnums=0)
  inputs = (variables,) if real is None else (variables, None, real)
  start = time.perf_counter()
  compiled = step_fn.lower(state, *inputs).compile()
  compile_s = time.perf_counter() - start
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = (cost or {}).get("flops")
  times = []
  for i in range(args.warmup + args.steps):
    start = time.perf_counter()
    state = jax.block_until_ready(compiled(state, *inputs)[0])
    if i >= args.warmup:
      times.append(time.perf_counter() - start)
  return compile_s, times, flops


def time_torch(args):
  """[step s], [generator half s], [auxiliary half s] of the eager PyTorch step."""
  # XLA:CPU flushes denormals to zero; eager CPU PyTorch does not by default, and the teacher's
  # near-zero gradients made early steps up to 10x slower with denormal arithmetic.
  torch.set_flush_denormal(True)
  torch.manual_seed(0)
  teacher = torch_dimo.MaskTransformer(
      args.codes, _NUM_CLASSES, args.tokens, args.hidden, args.depth, args.heads,
      4 * args.hidden, 0.1, fast_attention=args.torch_fast_attention)
  trainer = torch_dimo.TorchDiMO(teacher, torch_dimo.StepConfig(batch=args.batch),
                                 args.dtype == "bf16")
  steps, gens, auxs = [], [], []
  for i in range(args.warmup + args.steps):
    start = time.perf_counter()
    trainer.generator_update()
    middle = time.perf_counter()
    trainer.fake_update()
    trainer.update_ema()
    trainer.global_step += 1
    end = time.perf_counter()
    if i >= args.warmup:
      steps.append(end - start)
      gens.append(middle - start)
      auxs.append(end - middle)
  return steps, gens, auxs


def ms(seconds: float) -> str:
  return f"{seconds * 1e3:.1f} ms"


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--hidden", type=int, default=768)
  parser.add_argument("--depth", type=int, default=24)
  parser.add_argument("--heads", type=int, default=16)
  parser.add_argument("--tokens", type=int, default=256, help="visual tokens L")
  parser.add_argument("--codes", type=int, default=1024, help="codebook size V")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--dtype", choices=sorted(_MIXED_PRECISION), default="bf16")
  parser.add_argument("--steps", type=int, default=5, help="timed steps after the warm-up")
  parser.add_argument("--warmup", type=int, default=2,
                      help="untimed steps first (oneDNN picks and caches its kernels on the "
                           "first eager steps)")
  parser.add_argument("--profile", action="store_true",
                      help="also time the generator and auxiliary halves separately")
  parser.add_argument("--gan-weight", type=float, default=0.0,
                      help="> 0: also time the Soft-Di[M]O step with this GAN weight")
  parser.add_argument("--jax-only", action="store_true",
                      help="time the JAX step alone (e.g. to compare XLA flags or allocators)")
  parser.add_argument("--torch-fast-attention", action="store_true",
                      help="call nn.MultiheadAttention with need_weights=False (the reference "
                           "keeps the attention maps, which rules out the fused kernel)")
  args = parser.parse_args()

  model = MaskTransformer(codebook_size=args.codes, num_classes=_NUM_CLASSES, seq_len=args.tokens,
                          hidden_dim=args.hidden, depth=args.depth, num_heads=args.heads,
                          mlp_dim=4 * args.hidden, dropout=0.1,
                          dtype=jnp.bfloat16 if args.dtype == "bf16" else jnp.float32)
  variables = jax.jit(model.init)({"params": jax.random.PRNGKey(0)},
                                  jnp.zeros((1, args.tokens), jnp.int32),
                                  jnp.zeros((1,), jnp.int32))
  num_params = sum(x.size for x in jax.tree_util.tree_leaves(variables))
  print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), torch "
        f"{torch.__version__} on cpu with {torch.get_num_threads()} threads", flush=True)
  print(f"model: hidden {args.hidden}, depth {args.depth}, heads {args.heads}, tokens "
        f"{args.tokens}, codes {args.codes}: {num_params / 1e6:.1f}M parameters; batch "
        f"{args.batch}; dtype {args.dtype}; median of {args.steps} steps after {args.warmup} "
        "warm-up",
        flush=True)

  compile_s, jax_times, flops = time_jax(args, model, variables, fake_rounds=1)
  jax_s = statistics.median(jax_times)
  print(f"jax:   compile {compile_s:.1f} s; step {ms(jax_s)} (all: "
        f"{', '.join(ms(t) for t in jax_times)})", flush=True)
  if not args.jax_only:
    torch_times, torch_gen, torch_aux = time_torch(args)
    torch_s = statistics.median(torch_times)
    print(f"torch: step {ms(torch_s)} (all: {', '.join(ms(t) for t in torch_times)})",
          flush=True)
    print(f"ratio torch / jax: {torch_s / jax_s:.2f}x", flush=True)

  if args.gan_weight > 0:
    gan_compile_s, gan_times, _ = time_jax(args, model, variables, 1, args.gan_weight)
    gan_s = statistics.median(gan_times)
    print(f"jax soft-dimo: compile {gan_compile_s:.1f} s; step {ms(gan_s)} (all: "
          f"{', '.join(ms(t) for t in gan_times)}); {gan_s / jax_s:.2f}x the Di[M]O step",
          flush=True)
  if flops:
    rate = flops / jax_s
    print(f"jax step: {flops / 1e9:.1f} GFLOP (XLA cost analysis), {rate / 1e9:.1f} GFLOP/s "
          "achieved", flush=True)
  if args.profile and not args.jax_only:
    gen_compile_s, gen_times, _ = time_jax(args, model, variables, fake_rounds=0)
    gen_s = statistics.median(gen_times)
    print(f"profile jax:   generator half {ms(gen_s)} (compile {gen_compile_s:.1f} s), "
          f"auxiliary half + EMA {ms(jax_s - gen_s)} (by difference)", flush=True)
    print(f"profile torch: generator half {ms(statistics.median(torch_gen))}, auxiliary half + "
          f"EMA {ms(statistics.median(torch_aux))}", flush=True)


if __name__ == "__main__":
  main()
