"""The VQGAN of CompVis/taming-transformers (`taming.models.vqgan.VQModel`), in Flax, NHWC.

Encoder, decoder and vector quantizer follow taming/modules/diffusionmodules/model.py and
taming/modules/vqvae/quantize.py: GroupNorm(32 groups, eps 1e-6), swish, pre-activation
residual blocks, single-head spatial self-attention, downsampling by a stride-2 3x3 conv after
padding one zero row and column at the bottom and right, upsampling by nearest-neighbour
doubling then a 3x3 conv, and a codebook looked up by the smallest squared distance. This is an
inference module: dropout (`ddconfig.dropout`) has no effect.

The parameter tree is a one-to-one image of the release's `state_dict` (without its `loss.*`
entries), so converting `last.ckpt` is a key mapping (torch name -> flax path):

  encoder.conv_in.*                          -> encoder/conv_in/*
  encoder.down.i.block.j.{norm1,conv1,norm2,conv2,nin_shortcut}.*
                                             -> encoder/down_i/block_j/{...}/*
  encoder.down.i.attn.j.{norm,q,k,v,proj_out}.*
                                             -> encoder/down_i/attn_j/{...}/*
  encoder.down.i.downsample.conv.*           -> encoder/down_i/downsample/conv/*
  {encoder,decoder}.mid.{block_1,attn_1,block_2}.*
                                             -> {encoder,decoder}/mid/{block_1,attn_1,block_2}/*
  {encoder,decoder}.{norm_out,conv_out}.*    -> {encoder,decoder}/{norm_out,conv_out}/*
  quant_conv.*, post_quant_conv.*            -> quant_conv/*, post_quant_conv/*
  quantize.embedding.weight                  -> quantize/embedding
  decoder.conv_in.*                          -> decoder/conv_in/*
  decoder.up.i.{block.j,attn.j,upsample.conv}.*
                                             -> decoder/up_i/{block_j,attn_j,upsample/conv}/*

Leaves: a conv `weight` [O, I, kh, kw] is the `kernel` [kh, kw, I, O]; a GroupNorm `weight` is
the `scale`; `bias` stays `bias`. Outside `mid`, a torch list index `name.i` is the flax name
`name_i`; `mid`'s own names (`block_1`, `attn_1`, `block_2`) are kept as they are.
"""

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from dimo_jax.models import soft

Dtype = Any


def _swish(x: jax.Array) -> jax.Array:
  return x * jax.nn.sigmoid(x)


def _norm(dtype: Dtype, name: str) -> nn.GroupNorm:
  # torch.nn.GroupNorm computes the variance as E[(x - mean)^2], not E[x^2] - mean^2.
  return nn.GroupNorm(num_groups=32, epsilon=1e-6, dtype=dtype, use_fast_variance=False,
                      name=name)


def _conv(features: int, kernel: int, dtype: Dtype, name: str, strides: int = 1,
          padding: Any = "SAME") -> nn.Conv:
  return nn.Conv(features, (kernel, kernel), strides=(strides, strides), padding=padding,
                 dtype=dtype, name=name)


class ResnetBlock(nn.Module):
  """norm1, swish, conv1, norm2, swish, conv2, plus the input (1x1 conv if the widths differ)."""
  out_channels: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = _conv(self.out_channels, 3, self.dtype, "conv1")(_swish(_norm(self.dtype, "norm1")(x)))
    h = _conv(self.out_channels, 3, self.dtype, "conv2")(_swish(_norm(self.dtype, "norm2")(h)))
    if x.shape[-1] != self.out_channels:
      x = _conv(self.out_channels, 1, self.dtype, "nin_shortcut")(x)
    return x + h


class AttnBlock(nn.Module):
  """Single-head self-attention over the h*w positions with 1x1-conv projections, residual."""
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    batch, height, width, channels = x.shape
    h = _norm(self.dtype, "norm")(x)
    q, k, v = (_conv(channels, 1, self.dtype, name)(h).reshape(batch, height * width, channels)
               for name in ("q", "k", "v"))
    logits = jnp.einsum("bqc,bkc->bqk", q, k) * channels ** -0.5
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(self.dtype)
    h = jnp.einsum("bqk,bkc->bqc", weights, v).reshape(batch, height, width, channels)
    return x + _conv(channels, 1, self.dtype, "proj_out")(h)


class Downsample(nn.Module):
  """Stride-2 3x3 conv; torch pads (0, 1, 0, 1) by hand, i.e. one zero row/column at the end."""
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return _conv(x.shape[-1], 3, self.dtype, "conv", strides=2, padding=((0, 1), (0, 1)))(x)


class Upsample(nn.Module):
  """Nearest-neighbour x2 then a 3x3 conv."""
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return _conv(x.shape[-1], 3, self.dtype, "conv")(x)


class _Level(nn.Module):
  """One resolution of the encoder (`down.i`) or decoder (`up.i`): blocks, attention, resampling.

  `resample` is "down", "up" or "" (the last encoder level and the first decoder level have none).
  """
  out_channels: int
  num_blocks: int
  attention: bool
  resample: str
  dtype: Dtype

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for j in range(self.num_blocks):
      x = ResnetBlock(self.out_channels, self.dtype, name=f"block_{j}")(x)
      if self.attention:
        x = AttnBlock(self.dtype, name=f"attn_{j}")(x)
    if self.resample == "down":
      x = Downsample(self.dtype, name="downsample")(x)
    elif self.resample == "up":
      x = Upsample(self.dtype, name="upsample")(x)
    return x


class _Mid(nn.Module):
  """block_1, attn_1, block_2 at the lowest resolution."""
  dtype: Dtype

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    channels = x.shape[-1]
    x = ResnetBlock(channels, self.dtype, name="block_1")(x)
    x = AttnBlock(self.dtype, name="attn_1")(x)
    return ResnetBlock(channels, self.dtype, name="block_2")(x)


class Encoder(nn.Module):
  """float[B, H, W, in_channels] -> float[B, H/f, W/f, z_channels] (f = 2**(len(ch_mult)-1))."""
  ch: int
  ch_mult: Sequence[int]
  num_res_blocks: int
  attn_resolutions: Sequence[int]
  resolution: int
  z_channels: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = _conv(self.ch, 3, self.dtype, "conv_in")(x)
    # Attention placement follows the configured resolution, not the input's, as in taming.
    res = self.resolution
    levels = len(self.ch_mult)
    for i, mult in enumerate(self.ch_mult):
      last = i == levels - 1
      x = _Level(self.ch * mult, self.num_res_blocks, res in self.attn_resolutions,
                 "" if last else "down", self.dtype, name=f"down_{i}")(x)
      res = res if last else res // 2
    x = _Mid(self.dtype, name="mid")(x)
    x = _swish(_norm(self.dtype, "norm_out")(x))
    return _conv(self.z_channels, 3, self.dtype, "conv_out")(x)


class Decoder(nn.Module):
  """float[B, h, w, z_channels] -> float[B, h*f, w*f, out_ch]."""
  ch: int
  out_ch: int
  ch_mult: Sequence[int]
  num_res_blocks: int
  attn_resolutions: Sequence[int]
  resolution: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, z: jax.Array) -> jax.Array:
    levels = len(self.ch_mult)
    x = _conv(self.ch * self.ch_mult[-1], 3, self.dtype, "conv_in")(z)
    x = _Mid(self.dtype, name="mid")(x)
    res = self.resolution // 2 ** (levels - 1)
    # torch builds `up` from the lowest resolution and stores it under its level index i.
    for i in reversed(range(levels)):
      x = _Level(self.ch * self.ch_mult[i], self.num_res_blocks + 1, res in self.attn_resolutions,
                 "up" if i else "", self.dtype, name=f"up_{i}")(x)
      res = res * 2 if i else res
    x = _swish(_norm(self.dtype, "norm_out")(x))
    return _conv(self.out_ch, 3, self.dtype, "conv_out")(x)


class VectorQuantizer(nn.Module):
  """The codebook `embedding` float32[n_embed, embed_dim] and nearest-entry lookup."""
  n_embed: int
  embed_dim: int

  def setup(self):
    self.embedding = self.param(
        "embedding", nn.initializers.uniform(1.0 / self.n_embed), (self.n_embed, self.embed_dim))

  def __call__(self, z: jax.Array) -> jax.Array:
    """float[B, h, w, embed_dim] -> int32[B, h, w]: argmin_n ||z - e_n||^2 (first on ties)."""
    z = z.astype(jnp.float32)
    e = self.embedding
    # The expansion |z|^2 + |e|^2 - 2 z.e is what taming computes; full precision keeps TPU
    # matmuls from flipping near-ties.
    distances = (jnp.sum(z**2, axis=-1, keepdims=True) + jnp.sum(e**2, axis=-1)
                 - 2 * jnp.einsum("bhwd,nd->bhwn", z, e, precision=jax.lax.Precision.HIGHEST))
    return jnp.argmin(distances, axis=-1).astype(jnp.int32)

  def lookup(self, codes: jax.Array) -> jax.Array:
    """int32[B, h, w] -> float32[B, h, w, embed_dim]; soft codes float[B, h, w, V (+1)] give
    the expected codebook vector (models/soft.py)."""
    return soft.lookup(self.embedding, codes)


class VQModel(nn.Module):
  """taming-transformers' VQModel; fields are the release's `ddconfig` plus n_embed, embed_dim.

  Attributes:
    ch, out_ch, ch_mult, num_res_blocks, attn_resolutions, dropout, in_channels, resolution,
      z_channels, double_z: `model.params.ddconfig` of the release's yaml (ImageNet f16: 128, 3,
      (1, 1, 2, 2, 4), 2, (16,), 0.0, 3, 256, 256, False). `double_z` must be False: taming's
      `quant_conv` reads z_channels, not the 2 * z_channels that double_z would emit.
    n_embed, embed_dim: codebook size and code width (1024, 256).
    dtype: compute dtype; parameters, quantization and outputs stay float32.
  """
  ch: int
  out_ch: int
  ch_mult: Sequence[int]
  num_res_blocks: int
  attn_resolutions: Sequence[int]
  in_channels: int
  resolution: int
  z_channels: int
  n_embed: int
  embed_dim: int
  dropout: float = 0.0
  double_z: bool = False
  dtype: Dtype = jnp.float32

  @property
  def downsample_factor(self) -> int:
    return 2 ** (len(self.ch_mult) - 1)

  def setup(self):
    if self.double_z:
      raise ValueError("double_z=True is not a VQGAN: quant_conv reads z_channels channels, "
                       "and the encoder would emit 2 * z_channels")
    ch_mult, attn = tuple(self.ch_mult), tuple(self.attn_resolutions)
    self.encoder = Encoder(self.ch, ch_mult, self.num_res_blocks, attn, self.resolution,
                           self.z_channels, self.dtype)
    self.decoder = Decoder(self.ch, self.out_ch, ch_mult, self.num_res_blocks, attn,
                           self.resolution, self.dtype)
    self.quant_conv = _conv(self.embed_dim, 1, self.dtype, None)
    self.post_quant_conv = _conv(self.z_channels, 1, self.dtype, None)
    self.quantize = VectorQuantizer(self.n_embed, self.embed_dim)

  def latents(self, images: jax.Array) -> jax.Array:
    """float32[B, H, W, in_channels] in [-1, 1] -> float32[B, H/f, W/f, embed_dim], unquantized."""
    return self.quant_conv(self.encoder(images.astype(self.dtype))).astype(jnp.float32)

  def encode(self, images: jax.Array) -> jax.Array:
    """float32[B, H, W, in_channels] in [-1, 1] -> int32[B, H/f, W/f] codebook ids."""
    return self.quantize(self.latents(images))

  def decode(self, codes: jax.Array) -> jax.Array:
    """int32[B, h, w] codebook ids -> float32[B, h*f, w*f, out_ch], about [-1, 1], unclipped."""
    z = self.quantize.lookup(codes).astype(self.dtype)
    return self.decoder(self.post_quant_conv(z)).astype(jnp.float32)

  def __call__(self, images: jax.Array) -> jax.Array:
    """decode(encode(images)); `init` through it creates every parameter."""
    return self.decode(self.encode(images))
