"""The Meissonic transformer (viiika/Meissonic `src/transformer.py`, `Transformer2DModel`) in Flax.

Meissonic predicts the visual tokens of a 1024-pixel image (64 x 64 codes of an 8192-code VQ-VAE)
from a CLIP text encoding:

  tokens [B, h, w] --embed (table, RMSNorm, 1x1 conv)--> [B, h, w, D]
    (Di[M]O: optionally perturbed, e <- sigma * eps + sqrt(1 - sigma^2) * e)
    --down_block (RMSNorm, 2x2 stride-2 conv, when `downsample`)--> [B, h', w', D]
    --project_to_hidden(_norm)--> image stream [B, h'w', D]
  text [B, T, joint_attention_dim] --context_embedder, encoder_proj_layer_norm--> text stream
  conditioning temb [B, D] = time_text_embed(1000 * timestep, cond_embed([pooled, micro_conds]))
  num_layers double-stream MMDiT blocks (`transformer_blocks`: separate weights per stream,
    joint attention), then num_single_layers single-stream blocks over [text; image]; every
    block is AdaLN-Zero modulated by temb, and attention rotates q and k by 3-axis RoPE
    (text ids (0, 0, 0), image ids (0, row, column) of the h' x w' grid).
  image stream --project_from_hidden(_norm), up_block (RMSNorm, 2x2 stride-2 transposed conv,
    when `upsample`), mlm_layer (1x1 conv, RMSNorm, 1x1 conv)--> logits [B, h, w, codebook_size]

The parameter tree is a one-to-one image of the release's state dict
(`transformer/diffusion_pytorch_model.safetensors`); torch key -> Flax path:

  a `.i.` list index               -> `_i` on the module name: transformer_blocks.3.attn.to_out.0
                                      -> transformer_blocks_3/attn/to_out_0, ff.net.2 -> ff/net_2
  nn.Linear   weight [out, in]     -> kernel [in, out] (transposed); bias -> bias
  nn.Conv2d   weight [O, I, kh, kw] -> kernel [kh, kw, I, O]     (embed.conv, mlm_layer.conv1/2,
                                                                 down_block.downsample.conv)
  nn.ConvTranspose2d weight [I, O, kh, kw] -> kernel [kh, kw, I, O]  (up_block.upsample.conv)
  RMSNorm     weight               -> scale
  nn.Embedding weight              -> embedding                   (embed.embeddings)

Token ids are the release's: codebook ids in [0, codebook_size) and the mask id
vocab_size - 1 (8255 in the release, whose table has vocab_size = 8256 rows).
"""

import dataclasses
import math
from typing import Any, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dimo_jax.models import attention as attention_lib
from dimo_jax.models import soft

Dtype = Any

# Constants of Transformer2DModel.__init__ / forward that its config does not expose.
EPS = 1e-6  # every RMSNorm and LayerNorm of the model
SINUSOID_DIM = 256  # width of the sinusoidal embedding of the timestep and of each micro-cond
NUM_MICRO_CONDS = 5  # (width, height, crop top, crop left, aesthetic score): 5 * 256 = 1280
ROPE_THETA = 10000.0
TIMESTEP_SCALE = 1000.0  # forward() multiplies its `timestep` argument by this


def sinusoidal_embedding(t: jax.Array, dim: int = SINUSOID_DIM) -> jax.Array:
  """diffusers' get_timestep_embedding(flip_sin_to_cos=True, downscale_freq_shift=0).

  t: float32[N] -> float32[N, dim], [cos(t * f_k), sin(t * f_k)] with f_k = 10000^(-k / (dim/2)).
  The angles are float32 products, as upstream: at the pipeline's timesteps (step index * 1000,
  up to ~6e4 rad) one ulp of f_k moves them by ~1e-3 rad, so no two implementations agree
  there better than that; at Di[M]O's timestep 0 and at the micro-conds (<= 1024) they do.
  """
  half = dim // 2
  # The exponent is rounded to float32 as upstream computes it: at t = 1024 (a micro-cond) a
  # float64 exponent would already move the angles by ~1e-4.
  exponent = np.float32(-math.log(10000.0)) * np.arange(half, dtype=np.float32) / np.float32(half)
  freqs = np.exp(exponent.astype(np.float64))
  args = t.astype(jnp.float32)[:, None] * jnp.asarray(freqs, jnp.float32)[None, :]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def rotary_tables(ids: np.ndarray, axes_dims: Sequence[int]) -> Tuple[np.ndarray, np.ndarray]:
  """cos, sin float32[S, sum(axes_dims)] of FluxPosEmbed for position ids int[S, n_axes].

  Axis a takes axes_dims[a] channels: pair k of them turns by ids[:, a] * theta^(-2k/dims[a]),
  each angle repeated for the two channels of its pair. Computed in float64, as upstream.
  """
  cos, sin = [], []
  for axis, dim in enumerate(axes_dims):
    freqs = 1.0 / ROPE_THETA ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    angles = np.repeat(np.outer(ids[:, axis].astype(np.float64), freqs), 2, axis=1)
    cos.append(np.cos(angles))
    sin.append(np.sin(angles))
  return (np.concatenate(cos, axis=1).astype(np.float32),
          np.concatenate(sin, axis=1).astype(np.float32))


def position_ids(text_len: int, height: int, width: int) -> np.ndarray:
  """int32[T + h'w', 3]: text ids all zero, then image ids (0, row, column) in raster order.

  These are the pipeline's `txt_ids` and `_prepare_latent_image_ids` over the grid the
  transformer blocks see (after `down_block`).
  """
  rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
  image = np.stack([np.zeros_like(rows), rows, cols], axis=-1).reshape(-1, 3)
  return np.concatenate([np.zeros((text_len, 3), np.int64), image]).astype(np.int32)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotates channel pairs (2k, 2k+1) of x [B, S, H, Dh] by the angles of cos, sin [S, Dh]."""
  pairs = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
  rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)
  out = x.astype(jnp.float32) * cos[None, :, None, :] + rotated * sin[None, :, None, :]
  return out.astype(x.dtype)


def _rms_norm(name: str, dtype: Dtype) -> nn.RMSNorm:
  return nn.RMSNorm(epsilon=EPS, dtype=dtype, name=name)


def _layer_norm(dtype: Dtype) -> nn.LayerNorm:
  """nn.LayerNorm(elementwise_affine=False, eps=1e-6): no parameters."""
  return nn.LayerNorm(epsilon=EPS, use_bias=False, use_scale=False, dtype=dtype)


def _dense(features: int, name: str, dtype: Dtype, use_bias: bool = True) -> nn.Dense:
  return nn.Dense(features, use_bias=use_bias, dtype=dtype, name=name)


def _conv1x1(features: int, name: str, dtype: Dtype) -> nn.Conv:
  return nn.Conv(features, (1, 1), use_bias=False, dtype=dtype, name=name)


class Attention(nn.Module):
  """diffusers' Attention with the Flux processor: RMS-normed q, k per head, RoPE, and (with
  `joint`) a second set of projections for the text stream, attended to jointly.

  `pre_only` (the single-stream blocks) drops the output projection. `attention` names the
  kernel (models/attention.py).
  """
  num_heads: int
  head_dim: int
  joint: bool = False
  pre_only: bool = False
  dtype: Dtype = jnp.float32
  attention: str = "auto"

  def _heads(self, x, names):
    """q, k, v [B, S, H, Dh] from the three projections `names`."""
    batch, length, _ = x.shape
    inner = self.num_heads * self.head_dim
    return [_dense(inner, name, self.dtype)(x).reshape(
        batch, length, self.num_heads, self.head_dim) for name in names]

  @nn.compact
  def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array,
               context: Optional[jax.Array] = None):
    """x: [B, L, D] (image, or [text; image] when single-stream); context: [B, T, D] text.

    cos, sin: [S, Dh] over the attended sequence (text first). Returns the attention output
    [B, L, D], or (image [B, L, D], text [B, T, D]) when joint.
    """
    q, k, v = self._heads(x, ("to_q", "to_k", "to_v"))
    q = _rms_norm("norm_q", self.dtype)(q)
    k = _rms_norm("norm_k", self.dtype)(k)
    if self.joint:
      cq, ck, cv = self._heads(context, ("add_q_proj", "add_k_proj", "add_v_proj"))
      cq = _rms_norm("norm_added_q", self.dtype)(cq)
      ck = _rms_norm("norm_added_k", self.dtype)(ck)
      q, k, v = (jnp.concatenate(pair, axis=1) for pair in ((cq, q), (ck, k), (cv, v)))
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    out = attention_lib.attend(q, k, v, self.attention)
    out = out.reshape(*out.shape[:2], -1).astype(self.dtype)
    width = x.shape[-1]
    if self.joint:
      text_len = context.shape[1]
      image = _dense(width, "to_out_0", self.dtype)(out[:, text_len:])
      text = _dense(width, "to_add_out", self.dtype)(out[:, :text_len])
      return image, text
    if self.pre_only:
      return out
    return _dense(width, "to_out_0", self.dtype)(out)


class AdaLayerNormZero(nn.Module):
  """LayerNorm modulated by (shift, scale) from temb, plus the other chunks of `linear`.

  Returns (x_norm * (1 + scale) + shift, *the remaining chunks [B, D]); with 6 chunks those are
  gate_msa, shift_mlp, scale_mlp, gate_mlp, with 3 chunks gate.
  """
  chunks: int = 6
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, temb):
    width = x.shape[-1]
    emb = _dense(self.chunks * width, "linear", self.dtype)(nn.silu(temb))
    shift, scale, *rest = jnp.split(emb, self.chunks, axis=-1)
    return (_layer_norm(self.dtype)(x) * (1 + scale[:, None]) + shift[:, None], *rest)


class _GeluProjection(nn.Module):
  """diffusers GELU(approximate="tanh"): its linear layer is `proj`."""
  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    return nn.gelu(_dense(self.features, "proj", self.dtype)(x), approximate=True)


class FeedForward(nn.Module):
  """diffusers FeedForward(activation_fn="gelu-approximate"): net.0 (GELU), net.2 (linear)."""
  mult: int = 4
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    width = x.shape[-1]
    h = _GeluProjection(self.mult * width, self.dtype, name="net_0")(x)
    return _dense(width, "net_2", self.dtype)(h)


class TransformerBlock(nn.Module):
  """Double-stream MMDiT block (`transformer_blocks.i`): per-stream AdaLN-Zero and MLPs,
  joint attention."""
  num_heads: int
  head_dim: int
  dtype: Dtype = jnp.float32
  attention: str = "auto"

  @nn.compact
  def __call__(self, image, text, temb, cos, sin):
    dt = self.dtype
    x, gate_msa, shift_mlp, scale_mlp, gate_mlp = AdaLayerNormZero(6, dt, name="norm1")(image, temb)
    c, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = AdaLayerNormZero(
        6, dt, name="norm1_context")(text, temb)
    attn, context_attn = Attention(self.num_heads, self.head_dim, joint=True, dtype=dt,
                                   attention=self.attention, name="attn")(x, cos, sin, context=c)

    image = image + gate_msa[:, None] * attn
    x = _layer_norm(dt)(image) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
    image = image + gate_mlp[:, None] * FeedForward(dtype=dt, name="ff")(x)

    text = text + c_gate_msa[:, None] * context_attn
    c = _layer_norm(dt)(text) * (1 + c_scale_mlp[:, None]) + c_shift_mlp[:, None]
    text = text + c_gate_mlp[:, None] * FeedForward(dtype=dt, name="ff_context")(c)
    return image, text


class SingleTransformerBlock(nn.Module):
  """Single-stream block (`single_transformer_blocks.i`) over [text; image]: attention and a
  parallel tanh-GELU MLP, concatenated, projected, gated (AdaLN-Zero)."""
  num_heads: int
  head_dim: int
  mlp_ratio: float = 4.0
  dtype: Dtype = jnp.float32
  attention: str = "auto"

  @nn.compact
  def __call__(self, x, temb, cos, sin):
    dt = self.dtype
    width = x.shape[-1]
    h, gate = AdaLayerNormZero(3, dt, name="norm")(x, temb)
    mlp = nn.gelu(_dense(int(width * self.mlp_ratio), "proj_mlp", dt)(h), approximate=True)
    attn = Attention(self.num_heads, self.head_dim, pre_only=True, dtype=dt,
                     attention=self.attention, name="attn")(h, cos, sin)
    out = _dense(width, "proj_out", dt)(jnp.concatenate([attn, mlp], axis=-1))
    return x + gate[:, None] * out


class TimestepEmbedding(nn.Module):
  """diffusers TimestepEmbedding: linear_1, SiLU, linear_2."""
  features: int
  use_bias: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = nn.silu(_dense(self.features, "linear_1", self.dtype, self.use_bias)(x))
    return _dense(self.features, "linear_2", self.dtype, self.use_bias)(x)


class CombinedTimestepTextProjEmbeddings(nn.Module):
  """`time_text_embed`: timestep_embedder(sinusoid(t)) + text_embedder(pooled) (both MLPs)."""
  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, timestep, pooled):
    t = sinusoidal_embedding(timestep).astype(self.dtype)
    t = TimestepEmbedding(self.features, dtype=self.dtype, name="timestep_embedder")(t)
    # PixArtAlphaTextProjection(act_fn="silu") has the same layers as TimestepEmbedding.
    p = TimestepEmbedding(self.features, dtype=self.dtype, name="text_embedder")(pooled)
    return t + p


class UVit2DConvEmbed(nn.Module):
  """`embed`: token table, RMSNorm, 1x1 conv (no bias). int[B, h, w] -> [B, h, w, D]; or soft
  tokens float[B, h, w, codebook_size + 1] (models/soft.py: the codes' rows and the mask's, the
  table's last) -> [B, h, w, D]."""
  vocab_size: int
  features: int
  dtype: Dtype = jnp.float32
  codebook_size: int = 0

  @nn.compact
  def __call__(self, tokens):
    table = nn.Embed(self.vocab_size, self.features, name="embeddings")
    if soft.is_soft(tokens):
      batch, height, width = tokens.shape[:3]
      x = soft.embed(table.embedding, tokens.reshape(batch, height * width, -1),
                     self.codebook_size, self.vocab_size - 1)
      x = x.reshape(batch, height, width, self.features)
    else:
      x = table(tokens.astype(jnp.int32))
    x = _rms_norm("layer_norm", self.dtype)(x)
    return _conv1x1(self.features, "conv", self.dtype)(x)


class Downsample(nn.Module):
  """diffusers Downsample2D(norm_type="rms_norm", kernel_size=2, padding=0): RMSNorm over
  channels, zero pad one row and column at the end, 2x2 stride-2 conv."""
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = _rms_norm("norm", self.dtype)(x)
    return nn.Conv(x.shape[-1], (2, 2), strides=(2, 2), padding=((0, 1), (0, 1)),
                   use_bias=False, dtype=self.dtype, name="conv")(x)


class _ConvTranspose2x2(nn.Module):
  """nn.ConvTranspose2d(kernel_size=2, stride=2, padding=0, bias=False). Its windows do not
  overlap: input pixel (i, j) writes kernel[a, b] . x[i, j] to output pixel (2i + a, 2j + b)."""
  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    batch, height, width, channels = x.shape
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (2, 2, channels, self.features))
    y = jnp.einsum("nijc,abco->niajbo", x, kernel.astype(self.dtype))
    return y.reshape(batch, 2 * height, 2 * width, self.features)


class Upsample(nn.Module):
  """diffusers Upsample2D(use_conv_transpose=True, kernel_size=2, padding=0, norm rms_norm):
  RMSNorm over channels, then the 2x2 stride-2 transposed conv."""
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = _rms_norm("norm", self.dtype)(x)
    return _ConvTranspose2x2(x.shape[-1], self.dtype, name="conv")(x)


class ConvMlmLayer(nn.Module):
  """`mlm_layer`: 1x1 conv, RMSNorm, 1x1 conv to the codebook logits (no biases)."""
  codebook_size: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = _conv1x1(x.shape[-1], "conv1", self.dtype)(x)
    x = _rms_norm("layer_norm", self.dtype)(x)
    return _conv1x1(self.codebook_size, "conv2", self.dtype)(x)


class _Resample(nn.Module):
  """Simple_UVitBlock: holds `downsample` or `upsample` (or neither), nothing else."""
  kind: Optional[str]
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    if self.kind == "downsample":
      return Downsample(self.dtype, name="downsample")(x)
    if self.kind == "upsample":
      return Upsample(self.dtype, name="upsample")(x)
    return x


class MeissonicTransformer(nn.Module):
  """Meissonic's `Transformer2DModel` (module docstring); fields are its config.json's.

  Attributes:
    num_layers: double-stream blocks (14 in the release).
    num_single_layers: single-stream blocks (28).
    attention_head_dim, num_attention_heads: 128 and 8; the width D is their product (1024).
    joint_attention_dim: width of the text encoder hidden states (1024).
    pooled_projection_dim: width of the pooled text embedding (1024); must equal D, because
      `time_text_embed` projects `cond_embed`'s D-wide output with a layer built for it.
    axes_dims_rope: RoPE channels per position axis (16, 56, 56); sums to attention_head_dim.
    vocab_size: rows of the token table (8256); the mask id is vocab_size - 1.
    codebook_size: V, the number of logits per token (8192).
    downsample, upsample: the 2x down/up sampling around the transformer blocks (both true).
    dtype: compute dtype; parameters stay float32, logits are float32.
    remat: recompute each block's activations in the backward pass (gradient checkpointing);
      the parameter tree and the values are unchanged.
    attention: the attention kernel, 'auto' | 'einsum' | 'xla' | 'cudnn' (models/attention.py).
  """
  num_layers: int = 14
  num_single_layers: int = 28
  attention_head_dim: int = 128
  num_attention_heads: int = 8
  joint_attention_dim: int = 1024
  pooled_projection_dim: int = 1024
  axes_dims_rope: Tuple[int, ...] = (16, 56, 56)
  vocab_size: int = 8256
  codebook_size: int = 8192
  downsample: bool = True
  upsample: bool = True
  dtype: Dtype = jnp.float32
  remat: bool = False
  attention: str = "auto"

  @property
  def mask_id(self) -> int:
    return self.vocab_size - 1

  @property
  def width(self) -> int:
    return self.num_attention_heads * self.attention_head_dim

  def _check(self, tokens, encoder_hidden_states, pooled, micro_conds, timestep):
    if sum(self.axes_dims_rope) != self.attention_head_dim:
      raise ValueError(f"axes_dims_rope {tuple(self.axes_dims_rope)} must sum to "
                       f"attention_head_dim {self.attention_head_dim}")
    if self.pooled_projection_dim != self.width:
      raise ValueError(f"pooled_projection_dim {self.pooled_projection_dim} must equal "
                       f"num_attention_heads * attention_head_dim = {self.width}")
    batch = tokens.shape[0]
    soft_last = self.codebook_size + 1 if soft.is_soft(tokens) else None
    expected = {"tokens": (tokens, 4 if soft_last else 3, soft_last),
                "encoder_hidden_states": (encoder_hidden_states, 3, self.joint_attention_dim),
                "pooled": (pooled, 2, self.pooled_projection_dim),
                "micro_conds": (micro_conds, 2, NUM_MICRO_CONDS), "timestep": (timestep, 1, None)}
    for name, (array, ndim, last) in expected.items():
      if (array.ndim != ndim or array.shape[0] != batch
          or (last is not None and array.shape[-1] != last)):
        raise ValueError(f"{name} has shape {array.shape}; expected {ndim} dimensions, batch "
                         f"{batch}" + (f" and last dimension {last}" if last else ""))
    if self.downsample and (tokens.shape[1] % 2 or tokens.shape[2] % 2):
      raise ValueError(f"downsample needs an even token grid, got tokens of shape {tokens.shape}")

  @nn.compact
  def __call__(
      self,
      tokens: jax.Array,
      encoder_hidden_states: jax.Array,
      pooled: jax.Array,
      micro_conds: jax.Array,
      timestep: jax.Array,
      *,
      emb_noise: Optional[jax.Array] = None,
      emb_offset: Optional[jax.Array] = None,
  ) -> jax.Array:
    """Logits of the clean tokens.

    Args:
      tokens: int32[B, h, w], codebook ids in [0, codebook_size), masked positions `mask_id`;
        or soft tokens float[B, h, w, codebook_size + 1] whose last column is the mask
        (models/soft.py). Each block's image stream is sown as `intermediates/layer_<i>`
        (double blocks first, then single).
      encoder_hidden_states: float[B, T, joint_attention_dim], the text encoder's penultimate
        hidden states.
      pooled: float[B, pooled_projection_dim], the text encoder's projected pooled output.
      micro_conds: float32[B, 5] = (width, height, crop top, crop left, aesthetic score);
        the release's pipeline and Di[M]O pass (1024, 1024, 0, 0, 6).
      timestep: float32[B], what the PyTorch forward receives as `timestep` (it multiplies it by
        1000 before the sinusoidal embedding). The release's pipeline passes its step index
        (N-1 ... 0), its trainer the mask ratio * 1000; Di[M]O passes its ratio cast to an
        integer tensor (`long`) then * 1000, i.e. 0.
      emb_noise: float32[] sigma: when given, the output of `embed` becomes
        sigma * eps + sqrt(1 - sigma^2) * e with eps ~ N(0, I) drawn from the `noise` rng
        collection (Di[M]O's `noise_emb_perturb`), at every image position.
      emb_offset: float[B, h * w, D] added to that output after the noise (test-time embedding
        optimization, rewards.py); it is sown as `intermediates/input_embedding`.

    Returns:
      float32[B, h * w, codebook_size], positions in raster order.
    """
    self._check(tokens, encoder_hidden_states, pooled, micro_conds, timestep)
    dt, width = self.dtype, self.width
    batch, height, width_tokens = tokens.shape[:3]

    micro = sinusoidal_embedding(micro_conds.reshape(-1)).reshape(batch, -1)
    cond = jnp.concatenate([pooled.astype(jnp.float32), micro], axis=-1).astype(dt)
    cond = TimestepEmbedding(width, use_bias=False, dtype=dt, name="cond_embed")(cond)
    temb = CombinedTimestepTextProjEmbeddings(width, dt, name="time_text_embed")(
        timestep.astype(jnp.float32) * TIMESTEP_SCALE, cond)

    x = UVit2DConvEmbed(self.vocab_size, width, dt, self.codebook_size, name="embed")(tokens)
    if emb_noise is not None:
      eps = jax.random.normal(self.make_rng("noise"), x.shape, jnp.float32)
      sigma = jnp.asarray(emb_noise, jnp.float32)
      x = (sigma * eps + jnp.sqrt(1.0 - sigma**2) * x.astype(jnp.float32)).astype(dt)
    if emb_offset is not None:
      x = x + emb_offset.reshape(x.shape).astype(dt)
    self.sow("intermediates", "input_embedding", x.reshape(batch, height * width_tokens, -1))

    text = _dense(width, "context_embedder", dt)(encoder_hidden_states.astype(dt))
    text = _rms_norm("encoder_proj_layer_norm", dt)(text)

    x = _Resample("downsample" if self.downsample else None, dt, name="down_block")(x)
    grid = x.shape[1:3]
    image = x.reshape(batch, grid[0] * grid[1], width)
    image = _rms_norm("project_to_hidden_norm", dt)(image)
    image = _dense(width, "project_to_hidden", dt, use_bias=False)(image)

    text_len = text.shape[1]
    cos, sin = (jnp.asarray(t) for t in rotary_tables(
        position_ids(text_len, *grid), self.axes_dims_rope))

    double = nn.remat(TransformerBlock) if self.remat else TransformerBlock
    for i in range(self.num_layers):
      image, text = double(self.num_attention_heads, self.attention_head_dim, dt,
                           self.attention, name=f"transformer_blocks_{i}")(
                               image, text, temb, cos, sin)
      self.sow("intermediates", f"layer_{i}", image)
    joint = jnp.concatenate([text, image], axis=1)
    single = nn.remat(SingleTransformerBlock) if self.remat else SingleTransformerBlock
    for i in range(self.num_single_layers):
      joint = single(self.num_attention_heads, self.attention_head_dim, dtype=dt,
                     attention=self.attention,
                     name=f"single_transformer_blocks_{i}")(joint, temb, cos, sin)
      self.sow("intermediates", f"layer_{self.num_layers + i}", joint[:, text_len:])
    image = joint[:, text_len:]

    image = _rms_norm("project_from_hidden_norm", dt)(image)
    image = _dense(width, "project_from_hidden", dt, use_bias=False)(image)
    x = image.reshape(batch, *grid, width)
    x = _Resample("upsample" if self.upsample else None, dt, name="up_block")(x)
    if x.shape[1:3] != (height, width_tokens):
      raise ValueError(f"downsample {self.downsample} / upsample {self.upsample} map a "
                       f"{height}x{width_tokens} token grid to {x.shape[1]}x{x.shape[2]}")
    logits = ConvMlmLayer(self.codebook_size, dt, name="mlm_layer")(x)
    return logits.reshape(batch, height * width_tokens, self.codebook_size).astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class TextConditioned:
  """A MeissonicTransformer behind the call the Di[M]O step and samplers make of every teacher.

    apply(variables, tokens int32[B, L] (mask = V), cond, drop_label bool[B] | None,
          emb_noise=..., deterministic=..., rngs=...) -> float32[B, L, V]

  `cond` is a dict of batch-leading arrays: `hidden` float[B, T, joint_attention_dim] and
  `pooled` float[B, P] (the prompt's text encoding), `uncond_hidden` / `uncond_pooled` (what a
  dropped condition becomes: the empty prompt's encoding, or the negative prompt's for a guided
  teacher) and `micro_conds` float32[B, 5]. Our mask id V (= codebook_size) is mapped to the
  release's (vocab_size - 1); the timestep is Di[M]O's constant (see MeissonicTransformer).
  The transformer has no dropout: `deterministic` is accepted and has no effect.
  """
  transformer: MeissonicTransformer
  height: int
  width: int
  timestep: float = 0.0

  @property
  def codebook_size(self) -> int:
    return self.transformer.codebook_size

  @property
  def mask_id(self) -> int:
    return self.codebook_size

  @property
  def seq_len(self) -> int:
    return self.height * self.width

  def clone(self, **updates) -> "TextConditioned":
    """A copy whose transformer has `updates` (e.g. remat=True)."""
    return dataclasses.replace(self, transformer=self.transformer.clone(**updates))

  def init(self, rngs, tokens, cond, drop_label=None, **kwargs):
    return self._call(self.transformer.init, rngs, tokens, cond, drop_label, **kwargs)

  def apply(self, variables, tokens, cond, drop_label=None, **kwargs):
    return self._call(self.transformer.apply, variables, tokens, cond, drop_label, **kwargs)

  def _call(self, fn, first, tokens, cond, drop_label, *, emb_noise=None, emb_offset=None,
            deterministic=True, rngs=None, mutable=False):
    del deterministic
    batch = tokens.shape[0]
    if soft.is_soft(tokens):
      soft.check(tokens, batch, self.seq_len, self.codebook_size)
      tokens = tokens.reshape(batch, self.height, self.width, self.codebook_size + 1)
    else:
      tokens = tokens.reshape(batch, self.height, self.width).astype(jnp.int32)
      tokens = jnp.where(tokens == self.mask_id, self.transformer.mask_id, tokens)
    hidden, pooled = cond["hidden"], cond["pooled"]
    if drop_label is not None:
      hidden = jnp.where(drop_label[:, None, None], cond["uncond_hidden"], hidden)
      pooled = jnp.where(drop_label[:, None], cond["uncond_pooled"], pooled)
    timestep = jnp.full((batch,), self.timestep, jnp.float32)
    kwargs = {} if rngs is None else {"rngs": rngs}
    if mutable:
      kwargs["mutable"] = mutable
    return fn(first, tokens, hidden, pooled, cond["micro_conds"], timestep, emb_noise=emb_noise,
              emb_offset=emb_offset, **kwargs)
