"""The MaskGIT transformer of google-research/maskgit (JAX), behind MaskTransformer's interface.

The release (maskgit/nets/maskgit_transformer.py) is a BERT-style post-LN transformer. Its
parameter tree, which this module reproduces key for key (so conversion is a structure check):

  Embed_0/word_embeddings/embedding           [vocab, D]   vocab = V + C + 1
  Embed_0/position_embeddings/embedding       [L + 1, D]
  Embed_0/embeddings_ln/{scale,bias}
  TransformerLayer_i/Attention_0/self_attention/{query,key,value}/{kernel [D, H, D/H], bias}
  TransformerLayer_i/Attention_0/self_attention/out/{kernel [H, D/H, D], bias}
  TransformerLayer_i/Attention_0/attention_output_ln/{scale,bias}
  TransformerLayer_i/Mlp_0/{intermediate_output,layer_output}/{kernel,bias}
  TransformerLayer_i/Mlp_0/layer_output_ln/{scale,bias}
  MlmLayer_0/{mlm_dense/{kernel,bias}, mlm_ln/{scale,bias}, mlm_bias/bias [vocab]}

The release's input layout (maskgit/inference.py): the class token label + V FIRST, then the
L visual tokens in row-major order, the mask being id -1, which `jnp.take` wraps to the last
row V + C. This module takes our layout (L visual tokens with mask id V, labels apart), maps
it to the release's, and returns only the visual positions and the V codebook columns.

The release's vocabulary is codes, classes and the mask: there is no unconditional token, so
this teacher cannot be guided: its kind declares no guidance (`teachers.KINDS`) and every
guidance scale must be 1 (see `drop_label` below for what happens otherwise).
"""

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dimo_jax.models import attention as attention_lib
from dimo_jax.models import soft
from dimo_jax.models.maskgit import perturb_input, remat_layer

Dtype = Any

# BERT's LayerNorm epsilon, used by every LayerNorm of the release.
_LN_EPS = 1e-12


class Attention(nn.Module):
  """Self-attention, dropout, then LayerNorm of the residual sum (post-LN).

  `attention` (models/attention.py): `einsum` is flax's own dot_product_attention, which drops
  attention weights; `xla` / `cudnn` replace it by a fused kernel.
  """
  num_heads: int
  dropout: float
  dtype: Dtype
  attention: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
    width = x.shape[-1]
    kernel = attention_lib.resolve(self.attention, self.dtype, width // self.num_heads,
                                   not deterministic and self.dropout > 0)
    fused = {} if kernel == "einsum" else {"attention_fn": attention_lib.flax_attention_fn(kernel)}
    # The release attends over every position (its input mask is all ones), so none is passed.
    y = nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, qkv_features=width, dropout_rate=self.dropout,
        deterministic=deterministic, dtype=self.dtype, name="self_attention", **fused)(x)
    y = nn.Dropout(self.dropout)(y, deterministic=deterministic)
    return nn.LayerNorm(_LN_EPS, dtype=self.dtype, name="attention_output_ln")(y + x)


class Mlp(nn.Module):
  """Dense, tanh-approximate GELU (jax.nn.gelu's default), Dense, dropout, post-LN."""
  intermediate_size: int
  dropout: float
  dtype: Dtype

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
    width = x.shape[-1]
    y = nn.Dense(self.intermediate_size, dtype=self.dtype, name="intermediate_output")(x)
    y = nn.Dense(width, dtype=self.dtype, name="layer_output")(jax.nn.gelu(y, approximate=True))
    y = nn.Dropout(self.dropout)(y, deterministic=deterministic)
    return nn.LayerNorm(_LN_EPS, dtype=self.dtype, name="layer_output_ln")(y + x)


class TransformerLayer(nn.Module):
  """Attention_0 then Mlp_0, each post-LN."""
  num_heads: int
  intermediate_size: int
  dropout: float
  dtype: Dtype
  attention: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
    x = Attention(self.num_heads, self.dropout, self.dtype, self.attention,
                  name="Attention_0")(x, deterministic)
    return Mlp(self.intermediate_size, self.dropout, self.dtype, name="Mlp_0")(x, deterministic)


class Embed(nn.Module):
  """Word + position embeddings, LayerNorm, dropout (the release's Embed, no hidden mapping)."""
  vocab_size: int
  max_positions: int
  features: int
  dropout: float
  dtype: Dtype

  @nn.compact
  def __call__(self, ids: jax.Array, emb_noise: Optional[jax.Array],
               deterministic: bool, probs: Optional[jax.Array] = None,
               codebook_size: int = 0, emb_offset: Optional[jax.Array] = None) -> jax.Array:
    """ids: int32[B, 1 + L], class token first -> float[B, 1 + L, D]. With `probs`
    (float[B, L, codebook_size + 1]), the visual positions embed that distribution instead
    (models/soft.py; the mask column takes the release's mask row, the last)."""
    word = nn.Embed(self.vocab_size, self.features, name="word_embeddings")
    x = word(ids)
    if probs is not None:
      visual = soft.embed(word.embedding, probs, codebook_size, self.vocab_size - 1)
      x = jnp.concatenate([x[:, :1], visual.astype(x.dtype)], axis=1)
    visual = x[:, 1:]
    visual = perturb_input(self, visual, emb_noise, 1.0, emb_offset)
    x = jnp.concatenate([x[:, :1], visual], axis=1)
    positions = nn.Embed(self.max_positions, self.features, name="position_embeddings")(
        jnp.arange(ids.shape[1])[None])
    x = nn.LayerNorm(_LN_EPS, dtype=self.dtype, name="embeddings_ln")(x + positions)
    return nn.Dropout(self.dropout)(x, deterministic=deterministic)


class Bias(nn.Module):
  """The release's `mlm_bias`: one learned bias per vocabulary entry."""
  size: int

  @nn.compact
  def __call__(self) -> jax.Array:
    return self.param("bias", nn.initializers.zeros, (self.size,))


class MlmLayer(nn.Module):
  """Dense, GELU, LayerNorm, then the tied word-embedding table and a bias."""
  codebook_size: int
  dtype: Dtype

  @nn.compact
  def __call__(self, x: jax.Array, table: jax.Array) -> jax.Array:
    """x: float[B, L, D], table: float32[vocab, D] -> float32[B, L, V]."""
    width = x.shape[-1]
    x = jax.nn.gelu(nn.Dense(width, dtype=self.dtype, name="mlm_dense")(x), approximate=True)
    x = nn.LayerNorm(_LN_EPS, dtype=self.dtype, name="mlm_ln")(x)
    bias = Bias(table.shape[0], name="mlm_bias")()
    # Only the codebook columns are ever sampled, so only those are computed.
    codes = table[: self.codebook_size].astype(self.dtype)
    logits = jnp.einsum("bld,vd->blv", x, codes)
    return logits.astype(jnp.float32) + bias[: self.codebook_size]


class GoogleMaskGIT(nn.Module):
  """MaskGIT's class-conditional transformer as released by google-research/maskgit.

  Attributes:
    codebook_size: V, the number of visual codes; our mask token has id V.
    num_classes: C; the release's class token of label y is V + y, its mask token V + C.
    seq_len: L, the number of visual tokens (256 for ImageNet-256; the release's sequence is
      L + 1 long, class token first).
    hidden_size, num_layers, num_heads, intermediate_size: transformer sizes (768, 24, 16,
      3072 in maskgit/configs/maskgit_class_cond_config.py).
    dropout: hidden and attention-probability dropout rate (0.1 in the release).
    dtype: compute dtype; parameters stay float32.
    remat: gradient checkpointing of every TransformerLayer (values and parameters unchanged).
    attention: the attention kernel (models/attention.py), not part of the weights.
  """
  codebook_size: int
  num_classes: int
  seq_len: int
  hidden_size: int = 768
  num_layers: int = 24
  num_heads: int = 16
  intermediate_size: int = 3072
  dropout: float = 0.1
  dtype: Dtype = jnp.float32
  remat: bool = False
  attention: str = "auto"

  @property
  def mask_id(self) -> int:
    return self.codebook_size

  @property
  def vocab_size(self) -> int:
    """The release's vocabulary: V codes, C class tokens, one mask token (last)."""
    return self.codebook_size + self.num_classes + 1

  @property
  def release_mask_id(self) -> int:
    """The row the release's mask id -1 selects."""
    return self.vocab_size - 1

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
    """Logits of the clean visual tokens.

    Args:
      tokens: int32[B, L] (or [B, h, w], row-major), codebook ids with the mask as id V; or
        soft tokens float[B, L, V + 1] (models/soft.py).
      labels: int32[B] class labels in [0, C).
      drop_label: bool[B] or None. The release cannot drop its condition: rows where it is
        True raise a ValueError when the array is concrete, and get NaN logits under tracing,
        so that a guided run of this kind fails loudly instead of silently ignoring guidance.
      emb_noise: float32[] sigma: when given, the visual word embeddings become
        sigma * eps + sqrt(1 - sigma^2) * e with eps ~ N(0, I) drawn from the `noise` rng
        collection, before the position embedding is added (as MaskTransformer).
      emb_offset: float[B, L, D] added to the visual word embeddings after the noise (as
        MaskTransformer).
      deterministic: False enables dropout (needs the `dropout` rng collection).

    Returns:
      float32[B, L, V]: logits over the codebook. The release also scores its class and mask
      tokens and the class position; those are dropped because no sampler ever emits them.
    """
    batch = tokens.shape[0]
    probs = None
    if soft.is_soft(tokens):
      probs = soft.check(tokens, batch, self.seq_len, self.codebook_size)
      tokens = jnp.zeros((batch, self.seq_len), jnp.int32)  # replaced by the soft embedding
    tokens = tokens.reshape(batch, -1).astype(jnp.int32)
    if tokens.shape[1] != self.seq_len:
      raise ValueError(f"expected {self.seq_len} visual tokens, got tokens of shape {tokens.shape}")
    visual = jnp.where(tokens == self.mask_id, self.release_mask_id, tokens)
    class_token = labels.astype(jnp.int32) + self.codebook_size
    ids = jnp.concatenate([class_token[:, None], visual], axis=1)

    embed = Embed(self.vocab_size, self.seq_len + 1, self.hidden_size, self.dropout, self.dtype,
                  name="Embed_0")
    x = embed(ids, emb_noise, deterministic, probs, self.codebook_size, emb_offset)
    layer = remat_layer(TransformerLayer, self.remat)
    for i in range(self.num_layers):
      x = layer(self.num_heads, self.intermediate_size, self.dropout, self.dtype, self.attention,
                name=f"TransformerLayer_{i}")(x, deterministic)
      self.sow("intermediates", f"layer_{i}", x)
    table = embed.variables["params"]["word_embeddings"]["embedding"]
    logits = MlmLayer(self.codebook_size, self.dtype, name="MlmLayer_0")(x[:, 1:], table)

    if drop_label is not None:
      if not isinstance(drop_label, jax.core.Tracer) and np.any(np.asarray(drop_label)):
        raise ValueError("google-maskgit has no unconditional token: drop_label must be all "
                         "False (use guidance scale 1 with this teacher)")
      logits = jnp.where(jnp.asarray(drop_label)[:, None, None], jnp.nan, logits)
    return logits
