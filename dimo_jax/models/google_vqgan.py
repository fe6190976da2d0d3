"""The VQGAN image tokenizer of google-research/maskgit (`maskgit/nets/vqgan_tokenizer.py`).

The parameter tree is the one the release stores under "params" in its flax msgpack checkpoint
(`tokenizer_imagenet256_checkpoint`), so conversion is a structure check:

  quantizer/codebook                         float32[codebook_size, embedding_dim]
  encoder/Conv_0/kernel                      3x3 stem, no bias
  encoder/ResBlock_k/{GroupNorm_0,Conv_0,GroupNorm_1,Conv_1[,Conv_2]}
                                             k = level * num_res_blocks + j, then the
                                             num_res_blocks blocks after the last level
  encoder/Conv_1 .. Conv_{L-1}               4x4 stride-2 downsampling (conv_downsample only)
  encoder/GroupNorm_0, encoder/Conv_1        output norm and 1x1 projection to embedding_dim
                                             (Conv_L with conv_downsample)
  decoder/Conv_0                             3x3 from embedding_dim, with bias
  decoder/ResBlock_k                         num_res_blocks blocks first, then per level from
                                             the coarsest
  decoder/Conv_1 .. Conv_{L-1}               3x3 after each nearest-neighbour 2x upsampling
  decoder/GroupNorm_0, decoder/Conv_L        output norm and 3x3 projection to RGB

Every norm is a 32-group GroupNorm (epsilon 1e-6), the activation is swish, and images are
float32 RGB in [0, 1] both ways (the release neither rescales inputs nor clips outputs).
"""

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from dimo_jax.models import soft

Dtype = Any


def _norm(dtype):
  # flax.linen.GroupNorm defaults are the release's: 32 groups, epsilon 1e-6.
  return nn.GroupNorm(dtype=dtype)


class ResBlock(nn.Module):
  """norm, swish, 3x3 conv, norm, swish, 3x3 conv, plus a shortcut.

  When the width changes, the release's 1x1 shortcut conv (Conv_2) takes the block's own
  output, not its input (unlike taming-transformers); the released weights expect exactly that.
  """
  filters: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    residual = x
    y = nn.swish(_norm(self.dtype)(x))
    y = nn.Conv(self.filters, (3, 3), use_bias=False, dtype=self.dtype)(y)
    y = nn.swish(_norm(self.dtype)(y))
    y = nn.Conv(self.filters, (3, 3), use_bias=False, dtype=self.dtype)(y)
    if x.shape[-1] != self.filters:
      residual = nn.Conv(self.filters, (1, 1), use_bias=False, dtype=self.dtype)(y)
    return y + residual


class Encoder(nn.Module):
  """float32[B, H, W, 3] in [0, 1] -> float32[B, H/f, W/f, embedding_dim], f = 2**(levels-1)."""
  filters: int
  num_res_blocks: int
  channel_multipliers: Sequence[int]
  embedding_dim: int
  conv_downsample: bool
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = nn.Conv(self.filters, (3, 3), use_bias=False, dtype=self.dtype)(x)
    levels = len(self.channel_multipliers)
    for i, multiplier in enumerate(self.channel_multipliers):
      filters = self.filters * multiplier
      for _ in range(self.num_res_blocks):
        x = ResBlock(filters, self.dtype)(x)
      if i < levels - 1:
        if self.conv_downsample:
          x = nn.Conv(filters, (4, 4), strides=(2, 2), dtype=self.dtype)(x)
        else:
          # TF-style average pooling: padding cells (odd sizes only) do not count.
          x = nn.avg_pool(x, (2, 2), strides=(2, 2), padding="SAME", count_include_pad=False)
    for _ in range(self.num_res_blocks):
      x = ResBlock(filters, self.dtype)(x)
    x = nn.swish(_norm(self.dtype)(x))
    return nn.Conv(self.embedding_dim, (1, 1), dtype=self.dtype)(x)


class Decoder(nn.Module):
  """float32[B, h, w, embedding_dim] -> float32[B, h*f, w*f, 3], unclipped."""
  filters: int
  num_res_blocks: int
  channel_multipliers: Sequence[int]
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    filters = self.filters * self.channel_multipliers[-1]
    x = nn.Conv(filters, (3, 3), dtype=self.dtype)(x)
    for _ in range(self.num_res_blocks):
      x = ResBlock(filters, self.dtype)(x)
    for i in reversed(range(len(self.channel_multipliers))):
      filters = self.filters * self.channel_multipliers[i]
      for _ in range(self.num_res_blocks):
        x = ResBlock(filters, self.dtype)(x)
      if i > 0:
        b, h, w, c = x.shape
        x = jax.image.resize(x, (b, 2 * h, 2 * w, c), method="nearest")
        x = nn.Conv(filters, (3, 3), dtype=self.dtype)(x)
    x = nn.swish(_norm(self.dtype)(x))
    return nn.Conv(3, (3, 3), dtype=self.dtype)(x)


class VectorQuantizer(nn.Module):
  """Nearest-neighbour (squared Euclidean) lookup into a learned codebook."""
  codebook_size: int
  embedding_dim: int

  def setup(self):
    init = nn.initializers.variance_scaling(1.0, "fan_in", "uniform")
    self.codebook = self.param("codebook", init, (self.codebook_size, self.embedding_dim),
                               jnp.float32)

  def __call__(self, latents: jax.Array) -> jax.Array:
    """latents: float32[..., D] -> int32[...] ids of the nearest codes."""
    # Full-precision distances: a reduced-precision matmul (TPU/GPU default) can flip argmins.
    cross = jnp.einsum("...d,kd->...k", latents, self.codebook,
                       precision=jax.lax.Precision.HIGHEST)
    distances = (jnp.sum(latents ** 2, -1, keepdims=True) - 2 * cross
                 + jnp.sum(self.codebook ** 2, -1))
    return jnp.argmin(distances, axis=-1).astype(jnp.int32)

  def lookup(self, codes: jax.Array) -> jax.Array:
    """codes: int32[...] -> float32[..., D] codebook entries; soft codes float[..., V (+1)] give
    the expected entry (models/soft.py)."""
    return soft.lookup(self.codebook, codes)


class VQGAN(nn.Module):
  """MaskGIT's VQGAN tokenizer; the defaults are the ImageNet release's (f16, 1024 codes).

  Attributes:
    filters: width of the first level (128).
    num_res_blocks: residual blocks per level and after the last encoder level (2).
    channel_multipliers: width of each level in units of `filters`, finest first; the image
      is downsampled by 2 between consecutive levels (1, 1, 2, 2, 4).
    embedding_dim: width of the latents and codebook entries (256).
    codebook_size: number of codes (1024).
    conv_downsample: encoder downsamples with 4x4 stride-2 convs instead of average pooling
      (False).
    dtype: computation dtype; code selection and the codebook stay float32.
  """
  filters: int = 128
  num_res_blocks: int = 2
  channel_multipliers: Sequence[int] = (1, 1, 2, 2, 4)
  embedding_dim: int = 256
  codebook_size: int = 1024
  conv_downsample: bool = False
  dtype: Dtype = jnp.float32

  def setup(self):
    self.encoder = Encoder(self.filters, self.num_res_blocks, tuple(self.channel_multipliers),
                           self.embedding_dim, self.conv_downsample, self.dtype)
    self.decoder = Decoder(self.filters, self.num_res_blocks, tuple(self.channel_multipliers),
                           self.dtype)
    self.quantizer = VectorQuantizer(self.codebook_size, self.embedding_dim)

  @property
  def downsample_factor(self) -> int:
    return 2 ** (len(self.channel_multipliers) - 1)

  def latents(self, images: jax.Array) -> jax.Array:
    """images: float32[B, H, W, 3] in [0, 1] -> pre-quantization float32[B, h, w, D]."""
    return self.encoder(images.astype(self.dtype)).astype(jnp.float32)

  def encode(self, images: jax.Array) -> jax.Array:
    """images: float32[B, H, W, 3] in [0, 1] -> int32[B, H/f, W/f] nearest codebook ids."""
    return self.quantizer(self.latents(images))

  def decode(self, codes: jax.Array) -> jax.Array:
    """codes: int32[B, h, w] -> float32[B, h*f, w*f, 3], nominally [0, 1], not clipped."""
    embeddings = self.quantizer.lookup(codes)
    return self.decoder(embeddings.astype(self.dtype)).astype(jnp.float32)

  def __call__(self, images: jax.Array) -> jax.Array:
    return self.decode(self.encode(images))
