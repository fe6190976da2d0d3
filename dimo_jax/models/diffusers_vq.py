"""The VQ-VAE of diffusers (`diffusers.VQModel`), as Meissonic and aMUSEd release it, in Flax, NHWC.

Encoder, decoder and quantizer follow diffusers' autoencoders/vae.py (`Encoder`, `Decoder`,
`VectorQuantizer`) with `DownEncoderBlock2D` / `UpDecoderBlock2D` levels and a
`UNetMidBlock2D`: GroupNorm (`norm_num_groups` groups, eps 1e-6), SiLU, pre-activation residual
blocks (`ResnetBlock2D`, a 1x1 `conv_shortcut` where the width changes), downsampling by a
stride-2 3x3 conv after one zero row and column at the bottom and right, upsampling by
nearest-neighbour doubling then a 3x3 conv, and in the mid block one single-head spatial
self-attention (linear projections, head width = channels) only when `mid_block_add_attention`.
The decoder's levels have `layers_per_block + 1` residual blocks. Only `norm_type="group"` is
built (the spatially conditioned norm of `norm_type="spatial"` is not). Inference only: no
dropout, no commitment loss.

Value range: the module maps images to codes and back without rescaling, so it works in the
range its release was trained on. Meissonic's (and aMUSEd's) is [0, 1]: their pipelines feed
`VaeImageProcessor(do_normalize=False)` images, and clip the decoder output with
`.clip(0, 1)`; Meissonic's training data path applies no [-1, 1] normalisation by default.

The parameter tree is a one-to-one image of the release's `diffusion_pytorch_model.safetensors`:

  {encoder,decoder}.conv_in.*, .conv_norm_out.*, .conv_out.*
                                             -> {encoder,decoder}/{conv_in,conv_norm_out,conv_out}/*
  encoder.down_blocks.i.resnets.j.{norm1,conv1,norm2,conv2,conv_shortcut}.*
                                             -> encoder/down_blocks_i/resnets_j/{...}/*
  encoder.down_blocks.i.downsamplers.0.conv.*
                                             -> encoder/down_blocks_i/downsamplers_0/conv/*
  decoder.up_blocks.i.{resnets.j,upsamplers.0.conv}.*
                                             -> decoder/up_blocks_i/{resnets_j,upsamplers_0/conv}/*
  {encoder,decoder}.mid_block.resnets.j.*    -> {encoder,decoder}/mid_block/resnets_j/*
  {encoder,decoder}.mid_block.attentions.0.{group_norm,to_q,to_k,to_v,to_out.0}.*
                                             -> .../mid_block/attentions_0/{...,to_out_0}/*
  quant_conv.*, post_quant_conv.*            -> quant_conv/*, post_quant_conv/*
  quantize.embedding.weight                  -> quantize/embedding

Leaves: a conv `weight` [O, I, kh, kw] is the `kernel` [kh, kw, I, O]; a linear `weight` [O, I]
is the `kernel` [I, O]; a GroupNorm `weight` is the `scale`; `bias` stays `bias`. A torch list
index `name.i` is the flax name `name_i`. diffusers numbers `up_blocks` from the lowest
resolution up, and so does this module.
"""

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from dimo_jax.models import soft
# diffusers' Downsample2D (downsample_padding=0: torch pads (0, 1, 0, 1) by hand, then a stride-2
# 3x3 conv) and Upsample2D (nearest x2, 3x3 conv) compute exactly taming's, also named `conv`.
from dimo_jax.models.taming_vqgan import Downsample as Downsample2D
from dimo_jax.models.taming_vqgan import Upsample as Upsample2D

Dtype = Any


def _norm(groups: int, dtype: Dtype, name: str) -> nn.GroupNorm:
  # torch.nn.GroupNorm computes the variance as E[(x - mean)^2], not E[x^2] - mean^2.
  return nn.GroupNorm(num_groups=groups, epsilon=1e-6, dtype=dtype, use_fast_variance=False,
                      name=name)


def _conv(features: int, kernel: int, dtype: Dtype, name: str, strides: int = 1,
          padding: Any = "SAME") -> nn.Conv:
  return nn.Conv(features, (kernel, kernel), strides=(strides, strides), padding=padding,
                 dtype=dtype, name=name)


class ResnetBlock2D(nn.Module):
  """norm1, SiLU, conv1, norm2, SiLU, conv2, plus the input (1x1 conv_shortcut if widths differ)."""
  out_channels: int
  groups: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = nn.silu(_norm(self.groups, self.dtype, "norm1")(x))
    h = _conv(self.out_channels, 3, self.dtype, "conv1")(h)
    h = nn.silu(_norm(self.groups, self.dtype, "norm2")(h))
    h = _conv(self.out_channels, 3, self.dtype, "conv2")(h)
    if x.shape[-1] != self.out_channels:
      x = _conv(self.out_channels, 1, self.dtype, "conv_shortcut")(x)
    return x + h


class Attention(nn.Module):
  """diffusers' mid-block `Attention`: one head as wide as the channels, residual, over h*w."""
  groups: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    batch, height, width, channels = x.shape
    h = _norm(self.groups, self.dtype, "group_norm")(x).reshape(batch, height * width, channels)
    q, k, v = (nn.Dense(channels, dtype=self.dtype, name=name)(h)
               for name in ("to_q", "to_k", "to_v"))
    logits = jnp.einsum("bqc,bkc->bqk", q, k) * channels ** -0.5
    # diffusers builds this block with upcast_softmax=True.
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(self.dtype)
    h = jnp.einsum("bqk,bkc->bqc", weights, v)
    h = nn.Dense(channels, dtype=self.dtype, name="to_out_0")(h)
    return x + h.reshape(batch, height, width, channels)


class _Level(nn.Module):
  """One `DownEncoderBlock2D` (resample "down") or `UpDecoderBlock2D` ("up"); "" for none."""
  out_channels: int
  num_layers: int
  groups: int
  resample: str
  dtype: Dtype

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for j in range(self.num_layers):
      x = ResnetBlock2D(self.out_channels, self.groups, self.dtype, name=f"resnets_{j}")(x)
    if self.resample == "down":
      x = Downsample2D(self.dtype, name="downsamplers_0")(x)
    elif self.resample == "up":
      x = Upsample2D(self.dtype, name="upsamplers_0")(x)
    return x


class UNetMidBlock2D(nn.Module):
  """resnets_0, [attentions_0,] resnets_1 at the lowest resolution."""
  groups: int
  add_attention: bool
  dtype: Dtype

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    channels = x.shape[-1]
    x = ResnetBlock2D(channels, self.groups, self.dtype, name="resnets_0")(x)
    if self.add_attention:
      x = Attention(self.groups, self.dtype, name="attentions_0")(x)
    return ResnetBlock2D(channels, self.groups, self.dtype, name="resnets_1")(x)


class Encoder(nn.Module):
  """float[B, H, W, in] -> float[B, H/f, W/f, latent_channels], f = 2**(len(block_out_channels)-1)."""
  block_out_channels: Sequence[int]
  layers_per_block: int
  groups: int
  latent_channels: int
  mid_block_add_attention: bool
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = _conv(self.block_out_channels[0], 3, self.dtype, "conv_in")(x)
    last = len(self.block_out_channels) - 1
    for i, channels in enumerate(self.block_out_channels):
      x = _Level(channels, self.layers_per_block, self.groups, "" if i == last else "down",
                 self.dtype, name=f"down_blocks_{i}")(x)
    x = UNetMidBlock2D(self.groups, self.mid_block_add_attention, self.dtype, name="mid_block")(x)
    x = nn.silu(_norm(self.groups, self.dtype, "conv_norm_out")(x))
    return _conv(self.latent_channels, 3, self.dtype, "conv_out")(x)


class Decoder(nn.Module):
  """float[B, h, w, latent_channels] -> float[B, h*f, w*f, out_channels]."""
  block_out_channels: Sequence[int]
  layers_per_block: int
  groups: int
  out_channels: int
  mid_block_add_attention: bool
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, z: jax.Array) -> jax.Array:
    widths = tuple(reversed(self.block_out_channels))
    x = _conv(widths[0], 3, self.dtype, "conv_in")(z)
    x = UNetMidBlock2D(self.groups, self.mid_block_add_attention, self.dtype, name="mid_block")(x)
    last = len(widths) - 1
    for i, channels in enumerate(widths):
      x = _Level(channels, self.layers_per_block + 1, self.groups, "" if i == last else "up",
                 self.dtype, name=f"up_blocks_{i}")(x)
    x = nn.silu(_norm(self.groups, self.dtype, "conv_norm_out")(x))
    return _conv(self.out_channels, 3, self.dtype, "conv_out")(x)


class VectorQuantizer(nn.Module):
  """The codebook `embedding` float32[num_vq_embeddings, vq_embed_dim] and nearest-entry lookup."""
  num_embeddings: int
  embed_dim: int

  def setup(self):
    # diffusers initialises the codebook uniformly in +-1/n; a converted release overwrites it.
    n = self.num_embeddings
    self.embedding = self.param(
        "embedding", lambda key, shape: jax.random.uniform(key, shape, jnp.float32, -1 / n, 1 / n),
        (n, self.embed_dim))

  def __call__(self, z: jax.Array) -> jax.Array:
    """float[B, h, w, embed_dim] -> int32[B, h, w]: argmin_n ||z - e_n|| (first on ties)."""
    z = z.astype(jnp.float32)
    e = self.embedding
    # diffusers takes the argmin of torch.cdist, the same order as the squared distances here;
    # full precision keeps TPU matmuls from flipping near-ties.
    distances = (jnp.sum(z**2, axis=-1, keepdims=True) + jnp.sum(e**2, axis=-1)
                 - 2 * jnp.einsum("bhwd,nd->bhwn", z, e, precision=jax.lax.Precision.HIGHEST))
    return jnp.argmin(distances, axis=-1).astype(jnp.int32)

  def lookup(self, codes: jax.Array) -> jax.Array:
    """int32[B, h, w] -> float32[B, h, w, embed_dim]; soft codes float[B, h, w, V (+1)] give
    the expected codebook vector (models/soft.py)."""
    return soft.lookup(self.embedding, codes)


class VQModel(nn.Module):
  """diffusers' VQModel; the fields are the config.json entries that shape the computation.

  Meissonic's `vqvae/config.json` (the aMUSEd VQ-GAN): in_channels 3, out_channels 3,
  block_out_channels (128, 256, 256, 512, 768) (so f = 16), layers_per_block 2,
  latent_channels 64, num_vq_embeddings 8192, vq_embed_dim null (= latent_channels),
  norm_num_groups 32, mid_block_add_attention false, act_fn "silu", norm_type "group",
  every block type DownEncoderBlock2D / UpDecoderBlock2D. `scaling_factor`, `sample_size`,
  `force_upcast` and `lookup_from_codebook` do not change what encode and decode compute.

  Attributes:
    in_channels, out_channels: image channels in and out.
    block_out_channels: width of each level, highest resolution first.
    layers_per_block: residual blocks per encoder level (the decoder has one more).
    latent_channels: encoder output and decoder input width.
    num_vq_embeddings, vq_embed_dim: codebook size and code width (config.json's null
      vq_embed_dim means latent_channels; the converter writes the number).
    norm_num_groups: groups of every GroupNorm.
    mid_block_add_attention: whether the mid blocks hold their self-attention.
    dtype: compute dtype; parameters, quantization and outputs stay float32.
  """
  in_channels: int
  out_channels: int
  block_out_channels: Sequence[int]
  layers_per_block: int
  latent_channels: int
  num_vq_embeddings: int
  vq_embed_dim: int
  norm_num_groups: int = 32
  mid_block_add_attention: bool = True
  dtype: Dtype = jnp.float32

  @property
  def downsample_factor(self) -> int:
    return 2 ** (len(self.block_out_channels) - 1)

  def setup(self):
    widths = tuple(self.block_out_channels)
    self.encoder = Encoder(widths, self.layers_per_block, self.norm_num_groups,
                           self.latent_channels, self.mid_block_add_attention, self.dtype)
    self.decoder = Decoder(widths, self.layers_per_block, self.norm_num_groups, self.out_channels,
                           self.mid_block_add_attention, self.dtype)
    self.quant_conv = _conv(self.vq_embed_dim, 1, self.dtype, None)
    self.post_quant_conv = _conv(self.latent_channels, 1, self.dtype, None)
    self.quantize = VectorQuantizer(self.num_vq_embeddings, self.vq_embed_dim)

  def latents(self, images: jax.Array) -> jax.Array:
    """float32[B, H, W, in_channels] -> float32[B, H/f, W/f, vq_embed_dim], before quantization."""
    return self.quant_conv(self.encoder(images.astype(self.dtype))).astype(jnp.float32)

  def encode(self, images: jax.Array) -> jax.Array:
    """float32[B, H, W, in_channels] in [0, 1] (Meissonic) -> int32[B, H/f, W/f] codebook ids."""
    return self.quantize(self.latents(images))

  def decode(self, codes: jax.Array) -> jax.Array:
    """int32[B, h, w] codebook ids -> float32[B, h*f, w*f, out_channels], about [0, 1], unclipped.

    What diffusers computes as `decode(codes, force_not_quantize=True, shape=...)` with
    `lookup_from_codebook`, i.e. Meissonic's pipeline before its `.clip(0, 1)`.
    """
    z = self.quantize.lookup(codes).astype(self.dtype)
    return self.decoder(self.post_quant_conv(z)).astype(jnp.float32)

  def __call__(self, images: jax.Array) -> jax.Array:
    """decode(encode(images)); `init` through it creates every parameter."""
    return self.decode(self.encode(images))
