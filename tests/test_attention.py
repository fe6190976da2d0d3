"""The selectable attention kernels (dimo_jax/models/attention.py) agree, and the cuDNN one lowers.

cuDNN cannot run on a CPU. What is checked here instead: the padding the `cudnn` kernel adds for
odd lengths (run through XLA's kernel with the same sequence-length masking), and that the real
modules' train steps lower for CUDA with cuDNN's fused attention in their forward and backward
passes (jax's cuDNN version probe patched, since this machine has no cuDNN).
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dimo_jax import config_check, train
from dimo_jax.models import attention
from dimo_jax.models.google_maskgit import GoogleMaskGIT
from dimo_jax.models.maskgit import MaskTransformer, MultiheadAttention
from dimo_jax.models.meissonic import MeissonicTransformer


def _qkv(length, dtype=jnp.float32, heads=4, head_dim=16, batch=2):
  keys = jax.random.split(jax.random.PRNGKey(length), 3)
  return [jax.random.normal(k, (batch, length, heads, head_dim), dtype) for k in keys]


def _maskgit(seq_len=16, dtype=jnp.float32, **kwargs):
  return MaskTransformer(codebook_size=32, num_classes=10, seq_len=seq_len, hidden_dim=64, depth=2,
                         num_heads=4, mlp_dim=128, dtype=dtype, **kwargs)


def _inputs(seq_len, batch=3):
  tokens = jax.random.randint(jax.random.PRNGKey(1), (batch, seq_len), 0, 33)
  return tokens, jnp.arange(batch, dtype=jnp.int32), jnp.array([False, True, False][:batch])


def test_auto_keeps_the_reference_op_while_attention_weights_are_dropped(monkeypatch):
  assert attention.resolve("auto", jnp.bfloat16, 48, drops_weights=True) == "einsum"
  assert attention.resolve("auto", jnp.bfloat16, 48, drops_weights=False) == "xla"  # a CPU
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert attention.resolve("auto", jnp.bfloat16, 48, drops_weights=False) == "cudnn"
  assert attention.resolve("auto", jnp.bfloat16, 48, drops_weights=True) == "einsum"
  # cuDNN flash attention takes 16-bit floats and head dims that are multiples of 8, <= 128.
  assert attention.resolve("auto", jnp.float32, 48, drops_weights=False) == "xla"
  assert attention.resolve("auto", jnp.float16, 12, drops_weights=False) == "xla"
  assert attention.resolve("auto", jnp.bfloat16, 256, drops_weights=False) == "xla"
  assert attention.resolve("cudnn", jnp.float32, 12, drops_weights=True) == "cudnn"
  with pytest.raises(ValueError, match="attention must be one of"):
    attention.resolve("flash", jnp.float32, 16, False)


@pytest.mark.parametrize("length", [16, 17])
def test_the_kernels_compute_the_same_attention(length):
  q, k, v = _qkv(length)
  plain = attention.einsum(q, k, v)
  # An independent reference: per head, softmax(q k^T / sqrt(d)) v in float64 numpy.
  qn, kn, vn = (np.asarray(x, np.float64) for x in (q, k, v))
  scores = np.einsum("bqhd,bkhd->bhqk", qn, kn) / np.sqrt(q.shape[-1])
  weights = np.exp(scores - scores.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  reference = np.einsum("bhqk,bkhd->bqhd", weights, vn)
  np.testing.assert_allclose(plain, reference, atol=2e-5)
  np.testing.assert_allclose(attention.fused(q, k, v, "xla"), reference, atol=2e-5)


def test_the_cudnn_padding_of_an_odd_length_masks_the_added_key(monkeypatch):
  """The cuDNN kernel's padding, run through XLA's kernel with the same length masking."""
  calls = []
  original = jax.nn.dot_product_attention

  def as_xla(q, k, v, *args, implementation=None, **kwargs):
    calls.append((q.shape, kwargs.get("key_value_seq_lengths") is not None))
    assert implementation == "cudnn"
    return original(q, k, v, *args, implementation="xla", **kwargs)

  monkeypatch.setattr(jax.nn, "dot_product_attention", as_xla)
  for length in (17, 16):
    q, k, v = _qkv(length)
    out = attention.fused(q, k, v, "cudnn")
    assert out.shape == q.shape
    np.testing.assert_allclose(out, attention.einsum(q, k, v), atol=2e-5)
    # The gradient through the padding reaches only the real rows, and equals the plain one.
    loss = lambda fn: lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v)))
    got = jax.grad(loss(lambda *a: attention.fused(*a, "cudnn")), argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(loss(attention.einsum), argnums=(0, 1, 2))(q, k, v)
    for g, w in zip(got, want):
      np.testing.assert_allclose(g, w, atol=2e-5)
  assert calls[0] == ((2, 18, 4, 16), True)  # 17 padded to 18, its last key masked
  assert calls[-1] == ((2, 16, 4, 16), False)  # an even length goes in as it is


@pytest.mark.parametrize("dtype,atol", [(jnp.float32, 2e-5), (jnp.bfloat16, 0.15)])
def test_maskgit_logits_and_gradients_agree_across_kernels(dtype, atol):
  tokens, labels, drop = _inputs(16)
  model = _maskgit(dtype=dtype)
  variables = model.init(jax.random.PRNGKey(0), tokens, labels)

  def run(kernel):
    m = model.clone(attention=kernel)
    logits = m.apply(variables, tokens, labels, drop)
    grad = jax.grad(lambda p: jnp.mean(jax.nn.log_softmax(m.apply(p, tokens, labels, drop))
                                       [..., 0]))(variables)
    return logits, grad

  (want, want_grad), (got, got_grad) = run("einsum"), run("xla")
  np.testing.assert_allclose(got, want, atol=atol)
  for g, w in zip(jax.tree_util.tree_leaves(got_grad), jax.tree_util.tree_leaves(want_grad)):
    np.testing.assert_allclose(g, w, atol=atol, rtol=0.05 if dtype == jnp.bfloat16 else 1e-4)
  # `auto` on this CPU is XLA's kernel, bit for bit.
  np.testing.assert_array_equal(model.apply(variables, tokens, labels, drop), got)


def test_only_the_einsum_kernel_drops_attention_weights():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 9, 32))
  layer = MultiheadAttention(num_heads=4, dropout=0.5)
  variables = layer.init(jax.random.PRNGKey(1), x, True)
  rngs = {"dropout": jax.random.PRNGKey(2)}
  clean = layer.apply(variables, x, True)
  for kernel in ("auto", "einsum"):
    dropped = layer.clone(attention=kernel).apply(variables, x, False, rngs=rngs)
    assert not np.allclose(dropped, clean, atol=1e-3), kernel
  fused = layer.clone(attention="xla").apply(variables, x, False, rngs=rngs)
  np.testing.assert_allclose(fused, clean, atol=1e-6)


def test_google_maskgit_and_meissonic_agree_across_kernels():
  tokens, labels, _ = _inputs(16)
  model = GoogleMaskGIT(codebook_size=32, num_classes=10, seq_len=16, hidden_size=32,
                        num_layers=2, num_heads=4, intermediate_size=64)
  variables = model.init(jax.random.PRNGKey(0), tokens, labels)
  outs = [model.clone(attention=k).apply(variables, tokens, labels) for k in ("einsum", "xla")]
  np.testing.assert_allclose(outs[1], outs[0], atol=2e-5)

  transformer = MeissonicTransformer(num_layers=1, num_single_layers=1, attention_head_dim=16,
                                     num_attention_heads=2, joint_attention_dim=24,
                                     pooled_projection_dim=32, axes_dims_rope=(4, 6, 6),
                                     vocab_size=40, codebook_size=32)
  grid = jax.random.randint(jax.random.PRNGKey(3), (2, 4, 4), 0, 32)
  args = (grid, jax.random.normal(jax.random.PRNGKey(4), (2, 5, 24)),
          jax.random.normal(jax.random.PRNGKey(5), (2, 32)), jnp.ones((2, 5)), jnp.zeros((2,)))
  variables = transformer.init(jax.random.PRNGKey(0), *args)
  outs = [transformer.clone(attention=k).apply(variables, *args) for k in ("einsum", "xla")]
  np.testing.assert_allclose(outs[1], outs[0], atol=5e-5)


def _cuda_custom_calls(fn, *args):
  text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
  return re.findall(r"custom_call @([\w$]+)", text)


@pytest.fixture
def cudnn_probe(monkeypatch):
  """jax asks the CUDA plugin for cuDNN's version before building a cuDNN call; there is none
  here, so it answers 9.10 (the device image's cuDNN is 9.x)."""
  from jax._src.cudnn import fused_attention_stablehlo
  monkeypatch.setattr(fused_attention_stablehlo, "check_cudnn_version", lambda: 91000)


@pytest.mark.parametrize("seq_len", [16, 15])  # 17 and 16 positions with the class token
def test_a_maskgit_train_step_lowers_to_cudnn_flash_attention(cudnn_probe, seq_len):
  tokens, labels, drop = _inputs(seq_len)
  model = _maskgit(seq_len, jnp.bfloat16)
  variables = model.init(jax.random.PRNGKey(0), tokens, labels)
  cudnn = model.clone(attention="cudnn")

  def loss(params):
    logits = cudnn.apply(params, tokens, labels, drop, deterministic=False,
                         rngs={"dropout": jax.random.PRNGKey(1)})
    return jnp.sum(logits)

  calls = _cuda_custom_calls(jax.grad(loss), variables)
  assert calls.count("__cudnn$fmhaSoftmax") == 2  # one forward per layer
  assert calls.count("__cudnn$fmhaSoftmaxBackward") == 2
  # XLA's kernel lowers to no custom call at all.
  xla = model.clone(attention="xla")
  assert not [c for c in _cuda_custom_calls(
      lambda p: xla.apply(p, tokens, labels, drop), variables) if "cudnn$fmha" in c]


def test_the_meissonic_sequence_lowers_to_cudnn(cudnn_probe):
  transformer = MeissonicTransformer(num_layers=1, num_single_layers=1, attention_head_dim=16,
                                     num_attention_heads=2, joint_attention_dim=24,
                                     pooled_projection_dim=32, axes_dims_rope=(4, 6, 6),
                                     vocab_size=40, codebook_size=32, dtype=jnp.bfloat16)
  args = (jnp.zeros((2, 4, 4), jnp.int32), jnp.zeros((2, 5, 24)), jnp.zeros((2, 32)),
          jnp.ones((2, 5)), jnp.zeros((2,)))  # 5 text + 4 image tokens: odd
  variables = transformer.init(jax.random.PRNGKey(0), *args)
  cudnn = transformer.clone(attention="cudnn")
  calls = _cuda_custom_calls(jax.grad(lambda p: jnp.sum(cudnn.apply(p, *args))), variables)
  assert calls.count("__cudnn$fmhaSoftmaxBackward") == 2


def test_attention_impl_is_checked_and_an_older_run_resumes_as_auto():
  from configs import digits
  config = digits.get_config()
  config.attention_impl = "flash"
  with pytest.raises(config_check.ConfigError, match="attention_impl must be one of"):
    config_check.check(config)
  config.attention_impl = "auto"
  saved = config.to_dict()
  del saved["attention_impl"]  # a run written before the key existed
  assert train.config_changes(saved, config.to_dict()) == {}
  config.attention_impl = "xla"
  assert train.config_changes(saved, config.to_dict()) == {"attention_impl": ("auto", "xla")}


def test_the_module_field_is_not_part_of_the_weights():
  from dimo_jax import modeldir
  assert "attention" not in modeldir.module_config(_maskgit(attention="xla"))
