"""Scaled dot-product attention with a selectable kernel, shared by the teachers' transformers.

`attention` (a module field, `config.attention_impl` in a run) names the kernel:

  einsum  softmax(q k^T / sqrt(d)) v written out, dropout on the attention weights when it is
          on: what torch's nn.MultiheadAttention computes, and the only kernel that can drop
          attention weights.
  xla     jax.nn.dot_product_attention(implementation='xla'): XLA's fused attention.
  cudnn   jax.nn.dot_product_attention(implementation='cudnn'): cuDNN's flash attention (GPU
          only; bf16 or fp16, a head dim that is a multiple of 8 and at most 128). A sequence of
          odd length is padded by one position that no query attends to (`_even`): jax's cuDNN
          rule refuses odd lengths in a training step, and MaskGIT's 256 + 1 tokens are odd.
  auto    the reference's computation whatever the device: `einsum` while attention weights
          are dropped, otherwise `cudnn` where it applies (a CUDA GPU, its dtypes and shapes)
          and `xla` elsewhere.

The fused kernels take no dropout (jax's public API has none; the cuDNN kernel's own needs a
compile-time seed, which would repeat one mask every step), so `xla` and `cudnn` chosen while
attention dropout is on train WITHOUT dropout on the attention weights; every other dropout of
the model stays. That is a change of the method (docs/performance.md, "Attention kernels"), which
`auto` never makes.
"""

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("auto", "einsum", "xla", "cudnn")
# cuDNN flash attention's limits as jax checks them (fused_attention_stablehlo): a head dim that
# is a multiple of 8 and at most 128 (256 from Hopper on), in a 16-bit float.
_CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)
_CUDNN_MAX_HEAD_DIM = 128


def cudnn_applies(dtype, head_dim: int) -> bool:
  """Whether cuDNN flash attention takes heads of `head_dim` in `dtype` on this process's
  default backend."""
  return (jax.default_backend() == "gpu" and jnp.dtype(dtype) in _CUDNN_DTYPES
          and head_dim % 8 == 0 and head_dim <= _CUDNN_MAX_HEAD_DIM)


def resolve(attention: str, dtype, head_dim: int, drops_weights: bool) -> str:
  """The kernel `attention` ('auto' or a kernel) stands for on heads of `head_dim` in `dtype`,
  `drops_weights` telling whether dropout on the attention weights is on."""
  if attention not in IMPLEMENTATIONS:
    raise ValueError(f"attention must be one of {', '.join(IMPLEMENTATIONS)}, got {attention!r}")
  if attention != "auto":
    return attention
  if drops_weights:
    return "einsum"
  return "cudnn" if cudnn_applies(dtype, head_dim) else "xla"


def _even(x: jax.Array) -> jax.Array:
  """x [B, T, H, D] with one zero row appended when T is odd."""
  if x.shape[1] % 2 == 0:
    return x
  return jnp.pad(x, ((0, 0), (0, 1), (0, 0), (0, 0)))


def fused(q: jax.Array, k: jax.Array, v: jax.Array, implementation: str) -> jax.Array:
  """jax.nn.dot_product_attention with `implementation` ('xla' | 'cudnn'): [B, T, H, D]."""
  if implementation == "xla":
    return jax.nn.dot_product_attention(q, k, v, implementation="xla")
  length, batch = q.shape[1], q.shape[0]
  if length % 2 == 0 and k.shape[1] % 2 == 0:
    return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
  # The padded key is masked through the sequence lengths; the padded query row is dropped.
  lengths = lambda n: jnp.full((batch,), n, jnp.int32)
  out = jax.nn.dot_product_attention(
      _even(q), _even(k), _even(v), implementation="cudnn",
      query_seq_lengths=lengths(length), key_value_seq_lengths=lengths(k.shape[1]))
  return out[:, :length]


def einsum(q: jax.Array, k: jax.Array, v: jax.Array, dropout=None) -> jax.Array:
  """softmax(q k^T / sqrt(d)) v with the softmax in float32 and `dropout(weights)` when given."""
  scale = jnp.sqrt(q.shape[-1]).astype(q.dtype)
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / scale
  weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(q.dtype)
  if dropout is not None:
    weights = dropout(weights)
  return jnp.einsum("bhqk,bkhd->bqhd", weights, v)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, attention: str = "auto",
           dropout=None) -> jax.Array:
  """Attention of q [B, T, H, D] over k, v [B, S, H, D] with the kernel `attention` stands for.

  `dropout`: None, or the dropout to apply to the attention weights (a callable), which only
  `einsum` applies (module docstring).
  """
  kernel = resolve(attention, q.dtype, q.shape[-1], dropout is not None)
  if kernel == "einsum":
    return einsum(q, k, v, dropout)
  return fused(q, k, v, kernel)


def flax_attention_fn(kernel: str):
  """`kernel` ('xla' | 'cudnn') as the `attention_fn` of flax's MultiHeadDotProductAttention,
  which calls it with q, k, v [B, T, H, D] and its mask and dropout arguments (a fused kernel
  takes none of them: no mask is ever passed, and dropout is the einsum kernel's)."""
  def attention_fn(query, key, value, *args, **kwargs):
    del args, kwargs
    return fused(query, key, value, kernel)
  return attention_fn
