"""Where XLA:CPU loses to eager PyTorch on the real-size MaskGIT step: the step taken apart.

  python benchmarks/cpu_gap.py [--batch 2] [--runs 5] [--variants default,fast_math,...]

At the real size (768 wide, 16 heads, MLP 3072, 257 tokens) it times, in float32, in JAX and
in PyTorch on the same cores, the pieces one transformer layer is made of and the layer itself:

  matmul      the MLP's first product [B*T, 768] x [768, 3072]
  gelu        exact (erf) GELU on [B*T, 3072]
  softmax     softmax over [B, 16, T, T] attention logits
  dropout     a p = 0.1 dropout mask over the attention weights [B, 16, T, T]
  layer       one pre-LN layer, forward and backward, dropout off (eval) and on (train);
              layer_eval_xla: eval with XLA's fused attention instead of the einsum kernel

and, with the default options only, the parts the whole step (benchmarks/jax_vs_torch.py) is
made of, at batch 1 (the step's passes are all train mode):

  model_fwd      the 24-layer model's forward pass      (the step makes 5 of them: teacher x2,
  model_fwd_bwd  its forward and backward pass           auxiliary, generator x2 for samples;
  optimizer      one update of the 174M parameters:      and 2 forward+backward: generator,
                 clip, Adam, the finite check             auxiliary; 2 updates; 1 EMA)
  ema            the EMA of the generator

JAX runs each under `jax.jit` (compile excluded); each variant of XLA's CPU options runs in its
own process, since XLA reads its flags once:

  default     as shipped
  fast_math   --xla_cpu_enable_fast_math=true (approximate exp, erf, division)
  xnnpack     --xla_cpu_use_xnnpack=true (XNNPACK kernels for dots and elementwise fusions)
  one_thread  --xla_cpu_multi_thread_eigen=false (Eigen's matmul on one thread)
  rbg         jax_default_prng_impl=rbg: dropout masks from XLA's RngBitGenerator, not
              threefry (another random stream: a new run's choice, not a resumed one's)

Prints one table: milliseconds per piece, JAX / PyTorch per piece and variant.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

VARIANTS = {
    "default": {},
    "fast_math": {"XLA_FLAGS": "--xla_cpu_enable_fast_math=true"},
    "xnnpack": {"XLA_FLAGS": "--xla_cpu_use_xnnpack=true"},
    "one_thread": {"XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false"},
    "rbg": {"JAX_DEFAULT_PRNG_IMPL": "rbg"},
}
PIECES = ("matmul", "gelu", "softmax", "dropout", "layer_eval", "layer_eval_xla", "layer_train")
PARTS = ("model_fwd", "model_fwd_bwd", "optimizer", "ema")
WIDTH, HEADS, MLP, TOKENS = 768, 16, 3072, 257


def timed(fn, runs: int) -> float:
  """Median milliseconds of `runs` calls of `fn` after two warm-up calls."""
  from benchmarks import gpu_suite
  return statistics.median(gpu_suite.median_time(fn, runs, warmup=2)) * 1e3


def jax_pieces(batch: int, runs: int):
  import jax
  import jax.numpy as jnp
  from dimo_jax.models.maskgit import TransformerLayer

  rows = batch * TOKENS
  key = jax.random.PRNGKey(0)
  x = jax.random.normal(key, (rows, WIDTH))
  w = jax.random.normal(key, (WIDTH, MLP)) * 0.02
  h = jax.random.normal(key, (rows, MLP))
  logits = jax.random.normal(key, (batch, HEADS, TOKENS, TOKENS))
  out = {}

  def run(name, fn, *args):
    exe = jax.jit(fn).lower(*args).compile()
    out[name] = timed(lambda: jax.block_until_ready(exe(*args)), runs)

  run("matmul", lambda x, w: x @ w, x, w)
  run("gelu", lambda h: jax.nn.gelu(h, approximate=False), h)
  run("softmax", lambda s: jax.nn.softmax(s, axis=-1), logits)
  run("dropout", lambda k: jax.random.bernoulli(k, 0.9, logits.shape), key)

  layer = TransformerLayer(HEADS, MLP, 0.1, jnp.float32, attention="einsum")
  seq = jax.random.normal(key, (batch, TOKENS, WIDTH))
  params = layer.init(key, seq, True)
  for name, deterministic, kernel in (("layer_eval", True, "einsum"),
                                      ("layer_eval_xla", True, "xla"),
                                      ("layer_train", False, "einsum")):
    def loss(p, s, k, deterministic=deterministic, m=layer.clone(attention=kernel)):
      return jnp.sum(m.apply(p, s, deterministic, rngs={"dropout": k}) ** 2)
    run(name, jax.grad(loss, argnums=(0, 1)), params, seq, key)
  return out


def jax_parts(runs: int):
  """The whole step's parts at the real size, batch 1, float32 (module docstring)."""
  import jax
  import jax.numpy as jnp
  from benchmarks import gpu_suite
  from dimo_jax import distill, teachers

  size = dict(gpu_suite.SIZES["real"], batch=1)
  model = gpu_suite._maskgit(size, jnp.float32)
  teacher = teachers.of_module(model)
  variables = jax.jit(teacher.init_variables)()
  key = jax.random.PRNGKey(0)
  tokens = jax.random.randint(key, (1, TOKENS - 1), 0, size["codes"] + 1)
  labels = jnp.zeros((1,), jnp.int32)
  apply = lambda p, k: model.apply(p, tokens, labels, deterministic=False, rngs={"dropout": k})
  out = {}

  def run(name, fn, *args, donate=()):
    exe = jax.jit(fn, donate_argnums=donate).lower(*args).compile()
    holder = list(args)

    def call():
      result = jax.block_until_ready(exe(*holder))
      if donate:  # the donated state comes back: feed it to the next call
        holder[:len(donate)] = result
    out[name] = timed(call, runs)

  run("model_fwd", apply, variables, key)
  run("model_fwd_bwd", jax.grad(lambda p, k: jnp.sum(apply(p, k) ** 2)), variables, key)
  config = gpu_suite._recipe(size)
  config.mixed_precision = "no"
  gen_tx, _ = distill.optimizers(config, teacher.frozen_with_emb)
  grads = jax.tree_util.tree_map(lambda x: x * 1e-3, variables)
  params = jax.tree_util.tree_map(jnp.array, variables)
  run("optimizer",
      lambda p, o, g: distill._apply_if_finite(gen_tx, g, o, p, jnp.float32(1.0))[:2],
      params, gen_tx.init(params), grads, donate=(0, 1))
  ema = jax.tree_util.tree_map(jnp.array, variables)
  run("ema", lambda e, p: (jax.tree_util.tree_map(lambda a, b: 0.999 * a + 0.001 * b, e, p),),
      ema, variables, donate=(0,))
  return out


def torch_pieces(batch: int, runs: int):
  import torch
  from torch import nn
  from benchmarks import torch_dimo

  torch.set_flush_denormal(True)
  torch.manual_seed(0)
  rows = batch * TOKENS
  x, w = torch.randn(rows, WIDTH), torch.randn(WIDTH, MLP) * 0.02
  h, logits = torch.randn(rows, MLP), torch.randn(batch, HEADS, TOKENS, TOKENS)
  out = {}
  with torch.no_grad():
    out["matmul"] = timed(lambda: x @ w, runs)
    out["gelu"] = timed(lambda: torch.nn.functional.gelu(h), runs)
    out["softmax"] = timed(lambda: torch.softmax(logits, -1), runs)
    out["dropout"] = timed(lambda: torch.empty_like(logits).bernoulli_(0.9), runs)

  class Layer(nn.Module):  # the reference's pre-LN layer, as benchmarks/torch_dimo.py builds it
    def __init__(self):
      super().__init__()
      self.attn = torch_dimo._PreNorm(WIDTH, torch_dimo._Attention(WIDTH, HEADS, 0.1, False))
      self.ff = torch_dimo._PreNorm(WIDTH, torch_dimo._feed_forward(WIDTH, MLP, 0.1))

    def forward(self, s):
      s = s + self.attn(s)
      return s + self.ff(s)

  layer = Layer()
  seq = torch.randn(batch, TOKENS, WIDTH, requires_grad=True)
  def step():
    layer.zero_grad(set_to_none=True)
    (layer(seq) ** 2).sum().backward()

  for name, train in (("layer_eval", False), ("layer_train", True)):
    layer.train(train)
    out[name] = timed(step, runs)
  out["layer_eval_xla"] = out["layer_eval"]  # PyTorch's one eval layer, for the ratio
  return out


def torch_parts(runs: int):
  import torch
  from benchmarks import torch_dimo

  torch.set_flush_denormal(True)
  torch.manual_seed(0)
  model = torch_dimo.MaskTransformer(1024, 1000, TOKENS - 1).train()
  trainer = torch_dimo.TorchDiMO(model, torch_dimo.StepConfig(batch=1), False)
  net = trainer.generator
  tokens = torch.randint(0, 1025, (1, TOKENS - 1))
  labels = torch.zeros(1, dtype=torch.long)
  out = {}
  with torch.no_grad():
    out["model_fwd"] = timed(lambda: net(tokens, labels), runs)

  def fwd_bwd():
    net.zero_grad(set_to_none=True)
    (net(tokens, labels).float() ** 2).sum().backward()

  out["model_fwd_bwd"] = timed(fwd_bwd, runs)
  for p in net.parameters():
    p.grad = p.detach() * 1e-3

  def update():  # what `TorchDiMO.generator_update` does after its backward pass
    torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
    trainer.gen_opt.step()

  out["optimizer"] = timed(update, runs)
  out["ema"] = timed(trainer.update_ema, runs)
  return out


def child(args):
  result = {"jax": jax_pieces(args.batch, args.runs)}
  if args.torch:
    result["jax"].update(jax_parts(args.runs))
    result["torch"] = {**torch_pieces(args.batch, args.runs), **torch_parts(args.runs)}
  print("RESULT " + json.dumps(result), flush=True)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--runs", type=int, default=5)
  parser.add_argument("--variants", default=",".join(VARIANTS))
  parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--torch", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.child:
    return child(args)
  names = args.variants.split(",")
  unknown = set(names) - set(VARIANTS)
  if unknown:
    parser.error(f"unknown variants {sorted(unknown)}; known: {', '.join(VARIANTS)}")
  results = {}
  for i, name in enumerate(names):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_DEFAULT_PRNG_IMPL")}
    env.update(VARIANTS[name])
    command = [sys.executable, os.path.abspath(__file__), "--child", "--batch", str(args.batch),
               "--runs", str(args.runs)] + (["--torch"] if i == 0 else [])
    proc = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True)
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode or not line:
      print(f"{name}: failed: {(proc.stderr or proc.stdout).strip().splitlines()[-1:]}")
      continue
    got = json.loads(line[0][len("RESULT "):])
    results[name] = got["jax"]
    if "torch" in got:
      results["torch"] = got["torch"]
    print(f"{name}: " + ", ".join(f"{k} {v:.1f} ms" for k, v in got["jax"].items()), flush=True)
  torch_ms = results.get("torch", {})
  print(f"\nbatch {args.batch} x {TOKENS} tokens, float32, median of {args.runs}; ms "
        "(JAX / PyTorch in brackets)")
  print(f"{'piece':<14}" + "".join(f"{n:>18}" for n in results))
  for piece in PIECES + PARTS:
    cells = []
    for name, values in results.items():
      if piece not in values:
        cells.append("")
      elif name == "torch":
        cells.append(f"{torch_ms[piece]:.1f}")
      else:
        ratio = values[piece] / torch_ms[piece] if piece in torch_ms else float("nan")
        cells.append(f"{values[piece]:.1f} ({ratio:.2f}x)")
    print(f"{piece:<14}" + "".join(f"{c:>18}" for c in cells))
  return results


if __name__ == "__main__":
  main()
