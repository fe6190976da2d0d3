"""benchmarks/memory_estimate.py: byte counts of the abstract train state against hand counts.

A tiny MeissonicTransformer (width 32, one block of each kind) is counted through the script's
functions; the expected bytes are computed here from the dimensions and the dtypes alone. The
real-size model is only traced (`jax.eval_shape`), which takes seconds.
"""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import memory_estimate as me
from dimo_jax import defaults
from dimo_jax.models.meissonic import MeissonicTransformer

WIDTH, VOCAB, CODES = 32, 65, 64
TINY = dict(num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
            joint_attention_dim=WIDTH, pooled_projection_dim=WIDTH, axes_dims_rope=(4, 6, 6),
            vocab_size=VOCAB, codebook_size=CODES)
GRID, TEXT = 8, 5


def frozen_params(width: int, vocab: int, codes: int) -> int:
  """`embed` (table, RMSNorm scale, bias-free 1x1 conv) and `mlm_layer` (conv, scale, conv)."""
  return (vocab * width + width + width * width) + (width * width + width + width * codes)


def config(teacher_dtype="fp32", remat=True, mixed_precision="bf16"):
  c = defaults.reference_config()
  c.fix_emb_layer = True
  c.teacher_dtype = teacher_dtype
  c.gradient_checkpointing = remat
  c.mixed_precision = mixed_precision
  return c


@pytest.fixture(scope="module")
def tiny():
  model = MeissonicTransformer(**TINY, dtype=jnp.bfloat16)
  variables = me.abstract_teacher(model, GRID, TEXT)
  return model, variables, me.num_params(variables)


def test_state_bytes_match_the_hand_count(tiny):
  model, variables, params = tiny
  trainable = params - frozen_params(WIDTH, VOCAB, CODES)
  for teacher_dtype, teacher_bytes in (("fp32", 4), ("bf16", 2)):
    state = me.abstract_state(config(teacher_dtype), variables)
    parts = {name: me.tree_bytes(tree)
             for name, tree in me.state_components(state, variables, teacher_dtype).items()}
    assert parts[f"teacher ({teacher_dtype})"] == teacher_bytes * params
    for name in ("generator (fp32)", "auxiliary (fp32)", "EMA (fp32)",
                 "gradient (fp32, transient)"):
      assert parts[name] == 4 * params, name
    # Two float32 moments of the trainable leaves only, plus the optimizers' int32 counters.
    for name in ("Adam generator (mu, nu)", "Adam auxiliary (mu, nu)"):
      assert 0 <= parts[name] - 2 * 4 * trainable <= 16, (name, parts[name], trainable)
    assert parts["step, key, counters"] == 4 + 8 + 8  # int32 step, uint32[2] key, int32[2]


def _hand_share(shape, fsdp):
  """Elements a device holds: split by fsdp when big enough and some axis divides, else all."""
  size = math.prod(shape)
  if fsdp > 1 and size >= 1024 and any(n % fsdp == 0 for n in shape):
    return size // fsdp
  return size


@pytest.mark.parametrize("shape, fsdp, elements", [
    ((1, 1, 32, 64), 4, 32 * 64 // 4),
    ((65, 32), 4, 65 * 32 // 4),  # only the 32-axis divides
    ((1025,), 4, 1025),  # no axis divides: replicated
    ((32,), 4, 32),  # too small to split
    ((3, 5, 7, 11), 4, 1155),
    ((64, 48), 16, 64 * 48 // 16),
    ((64, 48), 1, 64 * 48),
])
def test_leaf_share(shape, fsdp, elements):
  assert me.leaf_bytes(shape, np.float32, fsdp) == 4 * elements
  assert me.leaf_bytes(shape, jnp.bfloat16, fsdp) == 2 * elements


def test_tree_share_follows_the_rule_leaf_by_leaf(tiny):
  _, variables, params = tiny
  leaves = jax.tree_util.tree_leaves(variables)
  for fsdp in (2, 4, 8):
    expected = 4 * sum(_hand_share(x.shape, fsdp) for x in leaves)
    assert me.tree_bytes(variables, fsdp) == expected
    # Some leaves really are split, and small ones are not: neither all nor 1/fsdp of the bytes.
    assert 4 * params / fsdp < expected < 4 * params


def test_activation_estimate_by_hand(tiny):
  model, variables, params = tiny
  batch, tokens = 3, (GRID // 2) ** 2 + TEXT  # downsampled grid plus the text
  saved = tokens * me.SAVED_PER_TOKEN * WIDTH * 2 + 2 * tokens**2 * (4 + 2)  # 2 heads
  block_max = max(me.num_params(variables["params"][n])
                  for n in ("transformer_blocks_0", "single_transformer_blocks_0"))
  plain = me.activation_bytes(model, variables, batch, False, 2, 1, GRID, TEXT)
  remat = me.activation_bytes(model, variables, batch, True, 2, 1, GRID, TEXT)
  logits = batch * me.LOGIT_TENSORS * GRID**2 * CODES * 4
  assert plain["activations: logits"] == remat["activations: logits"] == logits
  assert plain["activations: blocks"] == batch * 2 * saved
  assert remat["activations: blocks"] == batch * (2 * tokens * WIDTH * 2 + saved)
  assert plain["activations: stem"] == batch * me.STEM_PER_TOKEN * GRID**2 * WIDTH * 2
  assert plain["activations: weight copy"] == 2 * params
  assert remat["activations: weight copy"] == 2 * block_max
  # Float32 compute on one device reads the parameters themselves.
  f32 = me.activation_bytes(model, variables, batch, False, 4, 1, GRID, TEXT)
  assert f32["activations: weight copy"] == 0


def test_estimate_totals_and_verdicts(tiny):
  model, _, params = tiny
  result = me.estimate(model, config(), (1, 4), batch=2, grid=GRID, text_len=TEXT)
  assert result["params"] == params
  assert result["trainable_params"] == params - frozen_params(WIDTH, VOCAB, CODES)
  for f in (1, 4):
    rows = result["rows"]
    states = sum(v[f] for name, v in rows.items() if not name.startswith("activations"))
    assert result["states"][f] == states
    assert result["totals"][f] == states + sum(
        v[f] for name, v in rows.items() if name.startswith("activations"))
  assert result["states"][4] < result["states"][1]
  assert me.verdict(90, 100) == "fits"
  assert me.verdict(95, 100) == "tight"
  assert me.verdict(101, 100) == "no"


def test_real_size_script(tmp_path, capsys):
  out = tmp_path / "memory.json"
  result = me.main(["--devices", "1,8", "--teacher-dtype", "bf16", "--json", str(out)])
  params = result["params"]
  assert 0.95e9 < params < 1.05e9
  assert result["trainable_params"] == params - frozen_params(1024, 8256, 8192)
  rows = json.loads(out.read_text())["rows"]
  assert rows["teacher (bf16)"]["1"] == 2 * params
  assert rows["generator (fp32)"]["1"] == 4 * params
  # Every big leaf of the release splits 8 ways; only norms and biases stay whole.
  assert 4 * params / 8 <= rows["generator (fp32)"]["8"] < 1.01 * 4 * params / 8
  printed = capsys.readouterr().out
  assert "GPU 80GB" in printed and "TPU v5e 16GB" in printed and "fsdp=8" in printed


def test_maskbit_state_bytes_match_the_hand_count():
  # LFQBert of 6 bits in 2 splits, 16 positions, 5 classes, width 32, one layer, MLP 64.
  sizes = dict(codebook_bits=6, codebook_splits=2, num_positions=16, num_classes=5,
               hidden_dim=32, depth=1, num_heads=2, mlp_dim=64)
  width, mlp = 32, 64
  frozen = (6 * width + width) + 6 * width + 17 * width  # input_proj, class_emb, pos_emb
  block = (3 * width * width + 3 * width + width * width + width + 2 * width  # attention, norm
           + width * mlp + mlp + mlp * width + width + 2 * width)  # feed-forward, norm
  rest = 2 * width + (width * width + width + 2 * width) + (width * 16 + 16)
  params = frozen + block + rest
  result = me.maskbit_states(config(teacher_dtype="bf16"), [1, 2], sizes)
  assert result["params"] == params
  rows = result["rows"]
  assert rows["teacher (bf16)"][1] == 2 * params
  for name in ("generator (fp32)", "auxiliary (fp32)", "EMA (fp32)"):
    assert rows[name][1] == 4 * params
  # Adam keeps two moments of what it trains: the frozen embeddings have none.
  # (+ a few bytes: the optimizer chain's int32 step counts)
  assert 0 <= rows["Adam generator (mu, nu)"][1] - 2 * 4 * (params - frozen) <= 16
  assert result["states"][2] < result["states"][1]
