"""Di[M]O at the real ImageNet-256 size: train-step time, peak memory, sampling speed-up.

  python benchmarks/maskgit_imagenet256.py [--batch 64] [--steps 5] [--dtype bf16]

Random weights in the shape of the Halton-MaskGIT teacher (768 wide, 24 layers, 16 heads, MLP
3072, 256 tokens, 1024 codes, 1000 classes) and the recipe of configs/maskgit_imagenet256.py.
Prints
  - the compile time of the train step, then its median time over --steps steps, per sample
    (one step = one generator update and `fake_rounds` auxiliary updates on the global batch,
    --batch per device);
  - peak memory: the device's `peak_bytes_in_use` on an accelerator, the process's maximum
    resident set on CPU;
  - sampling time per image of the one-step generator and of the teacher at 8 guided steps
    (classifier-free guidance doubles every teacher pass), and their ratio.
"""

import argparse
import os
import resource
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from configs import maskgit_imagenet256  # noqa: E402
from dimo_jax import distill, dtypes, parallel, samplers, sampling, teachers, train  # noqa: E402
from dimo_jax.models.maskgit import MaskTransformer  # noqa: E402

_MIXED_PRECISION = {"bf16": "bf16", "fp32": "no"}  # the dtypes.DTYPES names


def timed_runs(fn, args, repeats: int):
  """(compile seconds, [seconds of each of `repeats` runs]) of a pure `jax.jit`-ed `fn(*args)`."""
  start = time.perf_counter()
  compiled = fn.lower(*args).compile()
  compile_s = time.perf_counter() - start
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - start)
  return compile_s, times


def peak_memory() -> str:
  stats = jax.local_devices()[0].memory_stats()
  if stats and "peak_bytes_in_use" in stats:
    return f"{stats['peak_bytes_in_use'] / 2**30:.2f} GiB device peak_bytes_in_use"
  # ru_maxrss is in KiB on Linux.
  return (f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB "
          "process max RSS (CPU)")


def main():
  on_accelerator = jax.default_backend() != "cpu"
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=64 if on_accelerator else 4,
                      help="train batch per device (default 64 on an accelerator, 4 on CPU)")
  parser.add_argument("--steps", type=int, default=5, help="timed train steps after compiling")
  parser.add_argument("--dtype", choices=sorted(_MIXED_PRECISION), default="bf16")
  parser.add_argument("--sample-batch", type=int, default=None,
                      help="images per sampling call (default: --batch)")
  parser.add_argument("--sample-repeats", type=int, default=3 if on_accelerator else 1)
  parser.add_argument("--depth", type=int, default=24,
                      help="transformer layers: 24 is the real size; fewer only to try the "
                           "script on a machine too small for it")
  args = parser.parse_args()

  config = maskgit_imagenet256.get_config()
  config.mixed_precision = _MIXED_PRECISION[args.dtype]
  config.per_device_batch = args.batch
  mesh = parallel.make_mesh(config.num_devices)
  config.train_batch_size = train.global_batch_size(config, mesh.shape[parallel.DATA])
  model = MaskTransformer(codebook_size=1024, num_classes=1000, seq_len=256, hidden_dim=768,
                          depth=args.depth, num_heads=16, mlp_dim=3072, dropout=0.1,
                          dtype=dtypes.compute_dtype(config))
  teacher = teachers.of_module(model)
  variables = jax.jit(teacher.init_variables)()
  num_params = sum(x.size for x in jax.tree_util.tree_leaves(variables))
  print(f"devices: {jax.device_count()} x {jax.devices()[0].device_kind}; teacher "
        f"{num_params / 1e6:.1f}M parameters ({args.depth} layers); dtype {args.dtype}; global batch "
        f"{config.train_batch_size} ({args.batch} per device)", flush=True)

  # The train step exactly as train.py builds it.
  replicated = parallel.replicated(mesh)
  teacher_params = parallel.replicate(variables, mesh)
  state = parallel.replicate(
      distill.create_state(config, teacher_params, jax.random.PRNGKey(1),
                           teacher.frozen_with_emb), mesh)
  step_fn = jax.jit(
      distill.make_train_step(config, teacher,
                              parallel.batch_constraint(mesh, config.train_batch_size)),
      in_shardings=(replicated, replicated), out_shardings=(replicated, replicated),
      donate_argnums=0)
  start = time.perf_counter()
  compiled = step_fn.lower(state, teacher_params).compile()
  compile_s = time.perf_counter() - start
  times = []
  for _ in range(args.steps):
    start = time.perf_counter()
    state = jax.block_until_ready(compiled(state, teacher_params)[0])
    times.append(time.perf_counter() - start)
  step_s = statistics.median(times)
  print(f"train step: compile {compile_s:.1f} s; median {step_s:.3f} s over {args.steps} "
        f"steps = {step_s / config.train_batch_size * 1e3:.1f} ms per sample", flush=True)
  print(f"peak memory after training steps: {peak_memory()}", flush=True)
  del state

  sample_batch = args.sample_batch or args.batch
  labels = jnp.arange(sample_batch, dtype=jnp.int32) % model.num_classes
  sigma = samplers.generator_noise(config, 0)

  @jax.jit
  def generator(params, rng, labels):
    def gen_fn(tokens, labels_, noise_rng):
      return model.apply(params, tokens, labels_, emb_noise=sigma, rngs={"noise": noise_rng})
    return sampling.generator_sample(gen_fn, rng, labels, model.seq_len, model.codebook_size,
                                     model.mask_id, config.fixed_ratio)[0]

  @jax.jit
  def teacher(params, rng, labels):
    return sampling.maskgit_sample(
        lambda tokens, labels_, drop: model.apply(params, tokens, labels_, drop), rng, labels,
        model.seq_len, model.mask_id, config.sampling_step, config.cfg_w, config.r_temp,
        config.sm_temp, config.sched_mode)

  per_image = {}
  for name, fn in (("generator, 1 step", generator),
                   (f"teacher, {config.sampling_step} steps cfg {config.cfg_w:g}", teacher)):
    compile_s, times = timed_runs(fn, (variables, jax.random.PRNGKey(2), labels),
                                  args.sample_repeats)
    per_image[name] = statistics.median(times) / sample_batch
    print(f"sampling {name}: compile {compile_s:.1f} s; "
          f"{per_image[name] * 1e3:.2f} ms per image (batch {sample_batch})", flush=True)
  gen_s, teacher_s = per_image.values()
  print(f"speed-up of the one-step generator: {teacher_s / gen_s:.1f}x")
  print(f"peak memory overall: {peak_memory()}")


if __name__ == "__main__":
  main()
