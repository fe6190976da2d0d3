"""MaskBit's generator `LFQBert` (markweberdev/maskbit, modeling/bert.py), in Flax.

MaskBit's tokenizer gives every image position an index of `codebook_bits` bits (lookup-free
quantization). The generator splits it into m = `codebook_splits` sub-tokens of bits/m bits,
sub-token i holding bits [i * bits/m, (i + 1) * bits/m), least significant first
(modeling/modules/factorization.py). Each sub-token takes V = 2^(bits/m) values; V is the mask.

Behind the teacher contract the n positions x m splits are L = n * m sub-tokens of V codes,
position-major (sub-token i of position p at index p * m + i):

  apply(variables, tokens int32[B, n * m] (mask = V) | probs float[B, n * m, V + 1],
        labels int32[B], drop bool[B]) -> float32[B, n * m, V]

The input embedding is the release's: each sub-token's bits as +-1 (all 0 for a masked one),
the n x bits bit vector through one Linear `input_proj`, the class embedding appended last,
learned `pos_emb`, `first_layer` (LayerNorm, dropout), a BERT of post-norm (or pre-norm)
blocks, `last_layer` (Linear, GELU, LayerNorm) and `prediction_layer` -> m * V logits per
position. A soft input embeds as expected bits: sum_v p_v * bits(v), the mask column adding 0.

The parameter tree is a one-to-one image of the release's state dict:

  class_emb.weight                      -> class_emb/embedding
  input_proj.{weight,bias} (or token_emb.*, the released files' spelling)
                                        -> input_proj/{kernel (transposed),bias}
  pos_emb                               -> pos_emb
  first_layer.0.{weight,bias}           -> first_layer/{scale,bias}
  transformer.layers.i.0.mha.in_proj_{weight,bias}, .0.mha.out_proj.*
                                        -> transformer/layers_i/attn/mha/{in_proj,out_proj}/*
  transformer.layers.i.0.norm.*         -> transformer/layers_i/attn/norm/*
  transformer.layers.i.1.net.{0,2}.*    -> transformer/layers_i/ff/net_{0,2}/*
  transformer.layers.i.1.norm.*         -> transformer/layers_i/ff/norm/*
  norm_after_transformer.* (pre-norm)   -> norm_after_transformer/*
  last_layer.0.* / last_layer.2.*       -> last_layer_0/* / last_layer_2/*
  prediction_layer.*                    -> prediction_layer/*
  bits_to_indices (a buffer: 2^c)       -> checked by the converter, not a parameter
"""

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dimo_jax.models import soft
from dimo_jax.models.maskgit import MultiheadAttention, perturb_input, remat_layer

Dtype = Any
_EPS = 1e-12  # every LayerNorm of the release
_gelu = lambda x: nn.gelu(x, approximate=False)  # torch.nn.GELU()


def bit_table(bits_per_split: int) -> np.ndarray:
  """float32[V + 1, bits/m]: row v holds the bits of code v as +-1, least significant first;
  row V (the mask) is all 0 (the release's `preprocess_tokens`)."""
  codes = np.arange(2 ** bits_per_split)[:, None]
  bits = ((codes >> np.arange(bits_per_split)) & 1).astype(np.float32) * 2.0 - 1.0
  return np.concatenate([bits, np.zeros((1, bits_per_split), np.float32)])


def merge_splits(tokens, splits: int, bits_per_split: int):
  """Sub-tokens int[B, n * m] (position-major) -> full indices int32[B, n]:
  sum_i t_i << (i * bits/m), the release's `combine_factorized_tokens`."""
  xp = jnp if isinstance(tokens, jax.Array) else np
  tokens = xp.asarray(tokens).astype(xp.int32)
  tokens = tokens.reshape(tokens.shape[0], -1, splits)
  shifts = xp.asarray(np.arange(splits) * bits_per_split, xp.int32)
  return (tokens << shifts).sum(-1).astype(xp.int32)


def split_codes(indices, splits: int, bits_per_split: int):
  """Full indices int[B, n] -> sub-tokens int32[B, n * m] (`merge_splits` inverted; the
  release's `split_factorized_tokens`)."""
  xp = jnp if isinstance(indices, jax.Array) else np
  indices = xp.asarray(indices).astype(xp.int32)
  shifts = xp.asarray(np.arange(splits) * bits_per_split, xp.int32)
  parts = (indices[..., None] >> shifts) & ((1 << bits_per_split) - 1)
  return parts.reshape(indices.shape[0], -1).astype(xp.int32)


class _Attention(nn.Module):
  """BertAttention: torch.nn.MultiheadAttention, dropout, residual, LayerNorm (after the
  residual in the post-norm release, before the attention in pre-norm)."""
  num_heads: int
  dropout: float
  prenorm: bool
  dtype: Dtype
  attention: str

  @nn.compact
  def __call__(self, x, deterministic):
    norm = nn.LayerNorm(epsilon=_EPS, dtype=self.dtype, name="norm")
    mha = MultiheadAttention(self.num_heads, self.dropout, self.dtype, self.attention, name="mha")
    drop = nn.Dropout(self.dropout)
    if self.prenorm:
      return x + drop(mha(norm(x), deterministic), deterministic=deterministic)
    return norm(x + drop(mha(x, deterministic), deterministic=deterministic))


class _FeedForward(nn.Module):
  """BertFeedForward: Linear, GELU, Linear, Dropout (`net.0`, `net.2`), residual, LayerNorm."""
  mlp_dim: int
  dropout: float
  prenorm: bool
  dtype: Dtype

  @nn.compact
  def __call__(self, x, deterministic):
    norm = nn.LayerNorm(epsilon=_EPS, dtype=self.dtype, name="norm")

    def net(y):
      y = _gelu(nn.Dense(self.mlp_dim, dtype=self.dtype, name="net_0")(y))
      y = nn.Dense(x.shape[-1], dtype=self.dtype, name="net_2")(y)
      return nn.Dropout(self.dropout)(y, deterministic=deterministic)

    return x + net(norm(x)) if self.prenorm else norm(x + net(x))


class BertLayer(nn.Module):
  num_heads: int
  mlp_dim: int
  dropout: float
  prenorm: bool
  dtype: Dtype = jnp.float32
  attention: str = "auto"

  @nn.compact
  def __call__(self, x, deterministic):
    x = _Attention(self.num_heads, self.dropout, self.prenorm, self.dtype, self.attention,
                   name="attn")(x, deterministic)
    return _FeedForward(self.mlp_dim, self.dropout, self.prenorm, self.dtype, name="ff")(
        x, deterministic)


class _Encoder(nn.Module):
  """`transformer.layers`; every layer's output is sown as `layer_<i>`."""
  depth: int
  num_heads: int
  mlp_dim: int
  dropout: float
  prenorm: bool
  dtype: Dtype
  remat: bool
  attention: str

  @nn.compact
  def __call__(self, x, deterministic):
    layer = remat_layer(BertLayer, self.remat)
    for i in range(self.depth):
      x = layer(self.num_heads, self.mlp_dim, self.dropout, self.prenorm, self.dtype,
                self.attention, name=f"layers_{i}")(x, deterministic)
      self.sow("intermediates", f"layer_{i}", x)
    return x


class LFQBert(nn.Module):
  """MaskBit's bit-token generator over n positions x m splits (module docstring).

  Attributes:
    codebook_bits: bits of a full index (the tokenizer's `token_size`, 14 in the release).
    codebook_splits: m, sub-tokens per position (2 in the release).
    num_positions: n, image positions (16 * 16 at 256 px with the f16 tokenizer).
    num_classes: C; class_emb has C + 1 rows, row C the dropped label.
    hidden_dim, depth, num_heads, mlp_dim: 1024, 24, 16, 4096 in the 14-bit release.
    dropout: everywhere (0.1 in the release).
    use_prenorm: the block layout (False in every release config).
    emb_noise_scale: s of Di[M]O's embedding perturbation, which acts on the projected bit
      vectors (input_proj's output): their RMS over uniformly random bits, which
      `embedding_rms` computes (ours: the reference has no MaskBit code).
    dtype, remat, attention: compute dtype, gradient checkpointing, attention kernel (not
      part of the weights).
  """
  codebook_bits: int
  codebook_splits: int
  num_positions: int
  num_classes: int
  hidden_dim: int = 1024
  depth: int = 24
  num_heads: int = 16
  mlp_dim: int = 4096
  dropout: float = 0.1
  use_prenorm: bool = False
  emb_noise_scale: float = 1.0
  dtype: Dtype = jnp.float32
  remat: bool = False
  attention: str = "auto"

  @property
  def bits_per_split(self) -> int:
    return self.codebook_bits // self.codebook_splits

  @property
  def codebook_size(self) -> int:
    """V, the codes of one sub-token."""
    return 2 ** self.bits_per_split

  @property
  def mask_id(self) -> int:
    return self.codebook_size

  @property
  def seq_len(self) -> int:
    """L = n * m sub-tokens."""
    return self.num_positions * self.codebook_splits

  def merge(self, tokens):
    """Sub-tokens int[B, L] -> the tokenizer's full indices int32[B, n]."""
    return merge_splits(tokens, self.codebook_splits, self.bits_per_split)

  @nn.compact
  def __call__(
      self,
      tokens: jax.Array,
      labels: jax.Array,
      drop_label: Optional[jax.Array] = None,
      *,
      emb_noise: Optional[jax.Array] = None,
      emb_offset: Optional[jax.Array] = None,
      deterministic: bool = True,
  ) -> jax.Array:
    """Logits of the clean sub-tokens.

    Args:
      tokens: int32[B, L] (or [B, n, m], [B, h, w, m]) sub-token codes with the mask as V; or
        soft tokens float[B, L, V + 1] (models/soft.py), embedded as expected bits.
      labels: int32[B] classes in [0, C).
      drop_label: bool[B], True gives the dropped label C (classifier-free guidance).
      emb_noise: float32[] sigma: the projected bit vectors become
        sigma * s * eps + sqrt(1 - sigma^2) * e, eps ~ N(0, I) from the `noise` rng collection.
      emb_offset: float[B, n, D] added to the projected bit vectors after the noise (TTEO);
        those are sown as `intermediates/input_embedding`.
      deterministic: False enables dropout (needs the `dropout` rng collection).

    Returns:
      float32[B, L, V]; every transformer layer's output is sown as
      `intermediates/transformer/layer_<i>`.
    """
    if self.codebook_bits % self.codebook_splits:
      raise ValueError(f"codebook_bits {self.codebook_bits} is not divisible by codebook_splits "
                       f"{self.codebook_splits}")
    batch = tokens.shape[0]
    table = jnp.asarray(bit_table(self.bits_per_split))
    if soft.is_soft(tokens):
      probs = soft.check(tokens, batch, self.seq_len, self.codebook_size)
      bits = jnp.einsum("blv,vc->blc", probs.astype(jnp.float32), table,
                        precision=jax.lax.Precision.HIGHEST)
    else:
      tokens = tokens.reshape(batch, -1)
      if tokens.shape[1] != self.seq_len:
        raise ValueError(f"expected {self.seq_len} sub-tokens ({self.num_positions} positions x "
                         f"{self.codebook_splits} splits), got tokens of shape {tokens.shape}")
      bits = jnp.take(table, tokens.astype(jnp.int32), axis=0)
    bits = bits.reshape(batch, self.num_positions, self.codebook_bits)
    projected = nn.Dense(self.hidden_dim, dtype=self.dtype, name="input_proj")(bits)
    visual = perturb_input(self, projected, emb_noise, self.emb_noise_scale, emb_offset)

    label = labels.astype(jnp.int32)
    if drop_label is not None:
      label = jnp.where(drop_label, self.num_classes, label)
    class_emb = nn.Embed(self.num_classes + 1, self.hidden_dim, name="class_emb",
                         embedding_init=nn.initializers.truncated_normal(0.02))
    x = jnp.concatenate([visual, class_emb(label)[:, None].astype(visual.dtype)], axis=1)
    pos_emb = self.param("pos_emb", nn.initializers.truncated_normal(0.02),
                         (1, self.num_positions + 1, self.hidden_dim))
    x = (x + pos_emb).astype(self.dtype)
    x = nn.LayerNorm(epsilon=_EPS, dtype=self.dtype, name="first_layer")(x)
    x = nn.Dropout(self.dropout)(x, deterministic=deterministic)
    x = _Encoder(self.depth, self.num_heads, self.mlp_dim, self.dropout, self.use_prenorm,
                 self.dtype, self.remat, self.attention, name="transformer")(x, deterministic)
    if self.use_prenorm:
      x = nn.LayerNorm(epsilon=_EPS, dtype=self.dtype, name="norm_after_transformer")(x)
    x = _gelu(nn.Dense(self.hidden_dim, dtype=self.dtype, name="last_layer_0")(x))
    x = nn.LayerNorm(epsilon=_EPS, dtype=self.dtype, name="last_layer_2")(x)
    logits = nn.Dense(self.codebook_splits * self.codebook_size, dtype=self.dtype,
                      name="prediction_layer")(x[:, : self.num_positions])
    return logits.astype(jnp.float32).reshape(batch, self.seq_len, self.codebook_size)


def embedding_rms(variables: Any) -> float:
  """The RMS of input_proj(b) over uniformly random +-1 bit vectors b, in closed form
  (E[b b^T] = I): sqrt((||W||_F^2 + ||c||^2) / D). A teacher records it as `emb_noise_scale`."""
  proj = variables["params"]["input_proj"]
  kernel = np.asarray(jax.device_get(proj["kernel"]), np.float64)
  bias = np.asarray(jax.device_get(proj["bias"]), np.float64)
  return round(float(np.sqrt((np.sum(kernel**2) + np.sum(bias**2)) / kernel.shape[1])), 6)
