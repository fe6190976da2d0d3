"""The bidirectional MaskGIT transformer of valeoai/Halton-MaskGIT v1.0, in Flax.

The parameter tree is a one-to-one image of that release's PyTorch `MaskTransformer` state
dict, so converting its `.pth` is a key mapping (torch name -> flax path):

  tok_emb.weight                         -> tok_emb/embedding
  pos_emb                                -> pos_emb
  first_layer.{0,4}.{weight,bias}        -> first_layer/layers_{0,4}/{scale,bias}
  first_layer.{2,6}.{weight,bias}        -> first_layer/layers_{2,6}/{kernel (transposed),bias}
  transformer.layers.i.0.norm.*          -> transformer/layers_i/attn/norm/*
  transformer.layers.i.0.fn.mha.in_proj_{weight,bias}
                                         -> transformer/layers_i/attn/mha/in_proj/{kernel,bias}
  transformer.layers.i.0.fn.mha.out_proj.* -> transformer/layers_i/attn/mha/out_proj/*
  transformer.layers.i.1.norm.*          -> transformer/layers_i/ff/norm/*
  transformer.layers.i.1.fn.net.{0,3}.*  -> transformer/layers_i/ff/net/layers_{0,3}/*
  last_layer.{0,4}.* / last_layer.2.*    -> last_layer/layers_{0,4}/* / last_layer/layers_2/*
  bias                                   -> bias

Input layout: L visual tokens (codebook ids in [0, V), mask id V) followed by one class token
(label + V + 1, or the "no class" token V + 1 + num_classes when the label is dropped).
"""

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from dimo_jax.models import attention as attention_lib
from dimo_jax.models import soft

Dtype = Any

# nn.GELU() and nn.LayerNorm() of PyTorch: exact erf GELU, eps 1e-5 unless stated.
_gelu = lambda x: nn.gelu(x, approximate=False)


class MultiheadAttention(nn.Module):
  """torch.nn.MultiheadAttention (batch_first, one fused input projection, dropout on weights).

  `attention`: the kernel (models/attention.py); only `einsum` (and `auto`, which picks it
  while dropout is on) drops attention weights.
  """
  num_heads: int
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  attention: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
    batch, length, width = x.shape
    if width % self.num_heads:
      raise ValueError(f"width {width} is not divisible by num_heads {self.num_heads}")
    head_dim = width // self.num_heads
    qkv = nn.Dense(3 * width, dtype=self.dtype, name="in_proj")(x)
    q, k, v = jnp.split(qkv.reshape(batch, length, 3 * self.num_heads, head_dim), 3, axis=2)
    dropout = None
    if not deterministic and self.dropout > 0.0:
      dropout = lambda w: nn.Dropout(self.dropout)(w, deterministic=False)
    out = attention_lib.attend(q, k, v, self.attention, dropout)
    return nn.Dense(width, dtype=self.dtype, name="out_proj")(out.reshape(batch, length, width))


class AttentionBlock(nn.Module):
  """PreNorm(Attention): the first half of a transformer layer, without the residual."""
  num_heads: int
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  attention: str = "auto"

  @nn.compact
  def __call__(self, x, deterministic):
    y = nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name="norm")(x)
    return MultiheadAttention(self.num_heads, self.dropout, self.dtype, self.attention,
                              name="mha")(y, deterministic)


class MlpBlock(nn.Module):
  """PreNorm(FeedForward): Linear, GELU, Dropout, Linear, Dropout; `net` keeps torch's indices."""
  mlp_dim: int
  dropout: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, deterministic):
    width = x.shape[-1]
    y = nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name="norm")(x)
    return _FeedForward(self.mlp_dim, width, self.dropout, self.dtype, name="net")(y, deterministic)


class _FeedForward(nn.Module):
  """The `net` Sequential of the PyTorch FeedForward (GELU and dropouts have no parameters)."""
  mlp_dim: int
  width: int
  dropout: float
  dtype: Dtype

  @nn.compact
  def __call__(self, x, deterministic):
    x = nn.Dense(self.mlp_dim, dtype=self.dtype, name="layers_0")(x)
    x = nn.Dropout(self.dropout)(_gelu(x), deterministic=deterministic)
    x = nn.Dense(self.width, dtype=self.dtype, name="layers_3")(x)
    return nn.Dropout(self.dropout)(x, deterministic=deterministic)


class TransformerLayer(nn.Module):
  num_heads: int
  mlp_dim: int
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  attention: str = "auto"

  @nn.compact
  def __call__(self, x, deterministic):
    x = x + AttentionBlock(self.num_heads, self.dropout, self.dtype, self.attention,
                           name="attn")(x, deterministic)
    return x + MlpBlock(self.mlp_dim, self.dropout, self.dtype, name="ff")(x, deterministic)


class _Projection(nn.Module):
  """first_layer / last_layer: LN, Dropout, Linear, GELU, LN[, Dropout, Linear] with torch's indices."""
  width: int
  final_linear: bool
  dropout: float
  dtype: Dtype

  @nn.compact
  def __call__(self, x, deterministic):
    x = nn.LayerNorm(epsilon=1e-12, dtype=self.dtype, name="layers_0")(x)
    x = nn.Dropout(self.dropout)(x, deterministic=deterministic)
    x = _gelu(nn.Dense(self.width, dtype=self.dtype, name="layers_2")(x))
    x = nn.LayerNorm(epsilon=1e-12, dtype=self.dtype, name="layers_4")(x)
    if self.final_linear:
      x = nn.Dropout(self.dropout)(x, deterministic=deterministic)
      x = nn.Dense(self.width, dtype=self.dtype, name="layers_6")(x)
    return x


class MaskTransformer(nn.Module):
  """MaskGIT's bidirectional transformer over L visual tokens and one class token.

  Attributes:
    codebook_size: V, the number of visual codes; the mask token has id V.
    num_classes: C; the class token of label y is V + 1 + y, the "no class" token V + 1 + C.
    seq_len: L, the number of visual tokens (16 * 16 for ImageNet-256 with an f16 VQGAN).
    hidden_dim, depth, num_heads, mlp_dim: transformer sizes (768, 24, 16, 3072 in the release).
    dropout: dropout rate everywhere (0.1 in the release).
    emb_noise_scale: s, the scale of the visual token embeddings that Di[M]O's perturbation
      e <- sigma * s * eps + sqrt(1 - sigma^2) * e assumes, so that sigma is the same share of
      the signal whatever the embeddings' scale. The release's `tok_emb` is torch's default
      `nn.Embedding` (N(0, 1)) and the reference applies the formula with s = 1: a converted
      release keeps 1.0 and behaves exactly as the reference. Our modules initialize `tok_emb`
      at N(0, 0.02) (LayerNorm follows, so the function does not care), and `dimo_jax.pretrain`
      records the trained table's RMS here, so that sigma = 0.1 is a tenth of the signal there
      too, as in the reference, and not as large as the embedding itself.
    dtype: compute dtype; parameters stay float32.
    remat: recompute each transformer layer's activations in the backward pass instead of
      keeping them (gradient checkpointing); the parameter tree and the values are unchanged.
    attention: the attention kernel, 'auto' | 'einsum' | 'xla' | 'cudnn' (models/attention.py);
      like dtype and remat it is not part of the weights.
  """
  codebook_size: int
  num_classes: int
  seq_len: int
  hidden_dim: int = 768
  depth: int = 24
  num_heads: int = 16
  mlp_dim: int = 3072
  dropout: float = 0.1
  emb_noise_scale: float = 1.0
  dtype: Dtype = jnp.float32
  remat: bool = False
  attention: str = "auto"

  @property
  def mask_id(self) -> int:
    return self.codebook_size

  @property
  def vocab_size(self) -> int:
    return self.codebook_size + 1 + self.num_classes + 1

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
      tokens: int32[B, L] (or [B, h, w]), codebook ids with the mask as id V; or soft tokens
        float[B, L, V + 1], a distribution over the codes and the mask, embedded as E^T p
        (models/soft.py).
      labels: int32[B] class labels in [0, C).
      drop_label: bool[B], True replaces the class by the "no class" token (for guidance).
      emb_noise: float32[] sigma: when given, the visual token embeddings become
        sigma * s * eps + sqrt(1 - sigma^2) * e with eps ~ N(0, I) drawn from the `noise` rng
        collection and s = `emb_noise_scale` (Di[M]O's perturbation of the initial tokens).
      emb_offset: float[B, L, D] added to the visual input embeddings after the noise (test-time
        embedding optimization, rewards.py); those embeddings are sown as
        `intermediates/input_embedding`.
      deterministic: False enables dropout (needs the `dropout` rng collection).

    Returns:
      float32[B, L, V]: logits over the codebook. The release's head also scores the mask,
      class and "no class" tokens; those columns are dropped because no sampler ever emits them.
      The output of every transformer layer is sown as `intermediates/transformer/layer_<i>`
      (read with `mutable=["intermediates"]`: the Soft-Di[M]O discriminator's features).
    """
    batch = tokens.shape[0]
    class_token = labels.astype(jnp.int32) + self.codebook_size + 1
    if drop_label is not None:
      class_token = jnp.where(drop_label, self.codebook_size + 1 + self.num_classes, class_token)
    embed = nn.Embed(self.vocab_size, self.hidden_dim, name="tok_emb",
                     embedding_init=nn.initializers.normal(0.02))
    if soft.is_soft(tokens):
      probs = soft.check(tokens, batch, self.seq_len, self.codebook_size)
      x = jnp.concatenate([soft.embed(embed.embedding, probs, self.codebook_size,
                                      self.mask_id), embed(class_token[:, None])], axis=1)
    else:
      tokens = tokens.reshape(batch, -1)
      if tokens.shape[1] != self.seq_len:
        raise ValueError(f"expected {self.seq_len} visual tokens, got tokens of shape "
                         f"{tokens.shape}")
      x = embed(jnp.concatenate([tokens.astype(jnp.int32), class_token[:, None]], axis=1))
    visual = perturb_input(self, x[:, : self.seq_len], emb_noise, self.emb_noise_scale,
                           emb_offset)
    x = jnp.concatenate([visual, x[:, self.seq_len:]], axis=1)
    pos_emb = self.param("pos_emb", nn.initializers.truncated_normal(0.02),
                         (1, self.seq_len + 1, self.hidden_dim))
    x = (x + pos_emb).astype(self.dtype)

    x = _Projection(self.hidden_dim, True, self.dropout, self.dtype, name="first_layer")(
        x, deterministic)
    x = _Layers(self.depth, self.num_heads, self.mlp_dim, self.dropout, self.dtype, self.remat,
                self.attention, name="transformer")(x, deterministic)
    x = _Projection(self.hidden_dim, False, self.dropout, self.dtype, name="last_layer")(
        x, deterministic)

    bias = self.param("bias", nn.initializers.zeros, (self.seq_len + 1, self.vocab_size))
    # The output head is tied to the input embedding; only the visual rows and codebook
    # columns are ever used, so only those are computed.
    table = embed.embedding[: self.codebook_size].astype(self.dtype)
    logits = jnp.einsum("bld,vd->blv", x[:, : self.seq_len], table)
    return logits.astype(jnp.float32) + bias[: self.seq_len, : self.codebook_size]


def perturb_input(module: nn.Module, visual: jax.Array, emb_noise: Optional[jax.Array],
                  scale: float, emb_offset: Optional[jax.Array]) -> jax.Array:
  """The visual input embeddings as every kind's module perturbs them: Di[M]O's noise
  sigma * s * eps + sqrt(1 - sigma^2) * e (eps from `module`'s `noise` rng collection) when
  `emb_noise` (sigma) is given, then the TTEO offset; the result is sown as
  `intermediates/input_embedding`."""
  if emb_noise is not None:
    eps = jax.random.normal(module.make_rng("noise"), visual.shape, visual.dtype)
    sigma = jnp.asarray(emb_noise, visual.dtype)
    visual = (sigma * jnp.asarray(scale, visual.dtype) * eps
              + jnp.sqrt(1.0 - sigma**2) * visual)
  if emb_offset is not None:
    visual = visual + emb_offset.astype(visual.dtype)
  module.sow("intermediates", "input_embedding", visual)
  return visual


class _Layers(nn.Module):
  """`transformer.layers`: the stack of pre-LN layers."""
  depth: int
  num_heads: int
  mlp_dim: int
  dropout: float
  dtype: Dtype
  remat: bool = False
  attention: str = "auto"

  @nn.compact
  def __call__(self, x, deterministic):
    layer = remat_layer(TransformerLayer, self.remat)
    for i in range(self.depth):
      x = layer(self.num_heads, self.mlp_dim, self.dropout, self.dtype, self.attention,
                name=f"layers_{i}")(x, deterministic)
      self.sow("intermediates", f"layer_{i}", x)
    return x


def remat_layer(layer_class, remat: bool):
  """`layer_class`, wrapped in `nn.remat` when `remat` (its `deterministic` flag static).

  Flax counts the module itself as argument 0, so `(x, deterministic)` are 1 and 2.
  """
  return nn.remat(layer_class, static_argnums=(2,)) if remat else layer_class
