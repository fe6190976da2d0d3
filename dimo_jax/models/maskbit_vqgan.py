"""MaskBit's tokenizer (VQGAN+ with lookup-free quantization; markweberdev/maskbit,
modeling/conv_vqgan.py `ConvVQModel`, modeling/modules/autoencoder.py), in Flax.

  encode(images float32[B, H, W, 3] in [0, 1]) -> int32[B, h, w] indices of `token_size` bits
  decode(codes int32[B, h, w]) -> float32[B, H, W, 3] (about [0, 1]; callers clip)
  decode_bits(bits float[B, h, w, token_size]) -> images: the decoder fed +-1 bits, or expected
    bits of soft codes (Soft-Di[M]O's rewards; `models.maskbit.bit_table`)

Lookup-free quantization: channel c of the encoder's output gives bit c, +1 where it is > 0;
the index is sum_c [z_c > 0] 2^c, and decoding maps an index back to its +-1 bits. Convolutions
pad TF-style ("SAME", the extra row and column at the end), GroupNorm has 32 groups and eps
1e-6, and a residual block that changes width adds a 1x1 convolution of its *output* (not of
its input) as the release does.

Parameter paths mirror the state dict: `encoder.down.2.res_blocks.1.conv1.weight` ->
encoder/down_2/res_blocks_1/conv1/kernel (OIHW -> HWIO), GroupNorm weight -> scale. The
quantizer's buffers (`quantize.bits_to_indices`, `quantize.codebook`) are derived, not stored.
"""

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any


def _conv(features: int, kernel: int, stride: int = 1, bias: bool = True, name=None,
          dtype=jnp.float32):
  return nn.Conv(features, (kernel, kernel), (stride, stride), padding="SAME", use_bias=bias,
                 dtype=dtype, name=name)


def _norm(name, dtype):
  return nn.GroupNorm(num_groups=32, epsilon=1e-6, dtype=dtype, name=name)


class ResidualBlock(nn.Module):
  out_channels: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    h = _conv(self.out_channels, 3, bias=False, name="conv1", dtype=self.dtype)(
        nn.silu(_norm("norm1", self.dtype)(x)))
    h = _conv(self.out_channels, 3, bias=False, name="conv2", dtype=self.dtype)(
        nn.silu(_norm("norm2", self.dtype)(h)))
    if x.shape[-1] != self.out_channels:
      return h + _conv(self.out_channels, 1, bias=False, name="nin_shortcut", dtype=self.dtype)(h)
    return h + x


class Stage(nn.Module):
  """ResidualStage, DownsamplingStage (`down`: conv stride 2 or 2x2 average pool) or
  UpsamplingStage (`up`: nearest x2, then a 3x3 conv)."""
  out_channels: int
  num_res_blocks: int
  resample: str = "none"  # none | down_conv | down_pool | up
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    for j in range(self.num_res_blocks):
      x = ResidualBlock(self.out_channels, self.dtype, name=f"res_blocks_{j}")(x)
    if self.resample == "down_conv":
      x = _conv(x.shape[-1], 3, 2, name="down_conv", dtype=self.dtype)(x)
    elif self.resample == "down_pool":
      x = nn.avg_pool(x, (2, 2), (2, 2))
    elif self.resample == "up":
      x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
      x = _conv(self.out_channels, 3, name="upsample_conv", dtype=self.dtype)(x)
    return x


class ConvEncoder(nn.Module):
  token_size: int
  hidden_channels: int
  channel_mult: Sequence[int]
  num_res_blocks: int
  sample_with_conv: bool
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    mult = (1,) + tuple(self.channel_mult)
    x = _conv(self.hidden_channels, 3, bias=False, name="conv_in", dtype=self.dtype)(x)
    levels = len(self.channel_mult)
    for i in range(levels):
      resample = ("none" if i == levels - 1
                  else "down_conv" if self.sample_with_conv else "down_pool")
      x = Stage(self.hidden_channels * mult[i + 1], self.num_res_blocks, resample, self.dtype,
                name=f"down_{i}")(x)
    x = Stage(x.shape[-1], self.num_res_blocks, dtype=self.dtype, name="mid")(x)
    x = nn.silu(_norm("norm_out", self.dtype)(x))
    return _conv(self.token_size, 1, name="conv_out", dtype=self.dtype)(x)


class ConvDecoder(nn.Module):
  """The release's (non-legacy) decoder: `up.0` is the coarsest level."""
  num_channels: int
  hidden_channels: int
  channel_mult: Sequence[int]
  num_res_blocks: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, z):
    mult = tuple(self.channel_mult) + (self.channel_mult[-1],)
    levels = len(self.channel_mult)
    x = _conv(self.hidden_channels * self.channel_mult[-1], 3, name="conv_in", dtype=self.dtype)(z)
    x = Stage(x.shape[-1], self.num_res_blocks, dtype=self.dtype, name="mid")(x)
    for k, i in enumerate(reversed(range(levels))):
      x = Stage(self.hidden_channels * mult[i], self.num_res_blocks, "up" if i > 0 else "none",
                self.dtype, name=f"up_{k}")(x)
    x = nn.silu(_norm("norm_out", self.dtype)(x))
    return _conv(self.num_channels, 3, name="conv_out", dtype=self.dtype)(x)


class ConvVQModel(nn.Module):
  """The MaskBit tokenizer (module docstring). Sizes are the YAML's `model.vq_model`:
  token_size 14, hidden_channels 128, channel_mult (1, 1, 2, 2, 4) (num_resolutions is its
  length), num_res_blocks 2, sample_with_conv True in the 14-bit release."""
  token_size: int
  hidden_channels: int = 128
  channel_mult: Sequence[int] = (1, 1, 2, 2, 4)
  num_res_blocks: int = 2
  num_res_blocks_decoder: int = 0  # 0: num_res_blocks (the YAML's optional key)
  sample_with_conv: bool = True
  num_channels: int = 3
  dtype: Dtype = jnp.float32

  @property
  def codebook_size(self) -> int:
    return 2 ** self.token_size

  @property
  def downsample_factor(self) -> int:
    return 2 ** (len(self.channel_mult) - 1)

  def setup(self):
    self.encoder = ConvEncoder(self.token_size, self.hidden_channels, tuple(self.channel_mult),
                               self.num_res_blocks, self.sample_with_conv, self.dtype)
    self.decoder = ConvDecoder(self.num_channels, self.hidden_channels, tuple(self.channel_mult),
                               self.num_res_blocks_decoder or self.num_res_blocks, self.dtype)

  def encode(self, images: jax.Array) -> jax.Array:
    z = self.encoder(images.astype(self.dtype)).astype(jnp.float32)
    weights = jnp.asarray(2 ** np.arange(self.token_size), jnp.int32)
    return jnp.sum((z > 0).astype(jnp.int32) * weights, axis=-1)

  def bits(self, codes: jax.Array) -> jax.Array:
    """int[B, h, w] indices -> float32[B, h, w, token_size] +-1 bits (the implicit codebook)."""
    bits = (codes.astype(jnp.int32)[..., None] >> jnp.arange(self.token_size)) & 1
    return bits.astype(jnp.float32) * 2.0 - 1.0

  def decode_bits(self, bits: jax.Array) -> jax.Array:
    return self.decoder(bits.astype(self.dtype)).astype(jnp.float32)

  def decode(self, codes: jax.Array) -> jax.Array:
    return self.decode_bits(self.bits(codes))

  def __call__(self, images: jax.Array) -> jax.Array:
    return self.decode(self.encode(images))
