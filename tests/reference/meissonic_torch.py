"""Test-only PyTorch reference of Meissonic's transformer (viiika/Meissonic `Transformer2DModel`).

Where Meissonic imports its parts from diffusers, they are the upstream diffusers classes here:
the attention (`FluxAttention` with its Flux processor: what `Attention(qk_norm="rms_norm",
processor=FluxAttnProcessor2_0())` became upstream, with the same parameter names),
`AdaLayerNormZero`, `AdaLayerNormZeroSingle`, `FeedForward`, `RMSNorm`, `TimestepEmbedding`,
`CombinedTimestepTextProjEmbeddings`, `get_timestep_embedding`, `Downsample2D`, `Upsample2D` and
the 3-axis rotary embedding `FluxPosEmbed`. The Meissonic-specific glue (its double and single
stream blocks, the token embedding, the MLM head, the down/up blocks and the forward pass) is
written here from the release's description, with attribute names that make `state_dict()` hold
the release's keys. Inference only.
"""

from typing import Sequence

import torch
from diffusers.models.attention import FeedForward
from diffusers.models.downsampling import Downsample2D
from diffusers.models.embeddings import (CombinedTimestepTextProjEmbeddings, TimestepEmbedding,
                                         get_timestep_embedding)
from diffusers.models.normalization import AdaLayerNormZero, AdaLayerNormZeroSingle, RMSNorm
from diffusers.models.transformers.transformer_flux import FluxAttention, FluxPosEmbed
from diffusers.models.upsampling import Upsample2D
from torch import nn

EPS = 1e-6
MICRO_COND_DIM = 256
NUM_MICRO_CONDS = 5


class DoubleStreamBlock(nn.Module):
  """`transformer_blocks.i`: AdaLN-Zero on each stream, joint attention, per-stream MLPs."""

  def __init__(self, dim: int, heads: int, head_dim: int):
    super().__init__()
    self.norm1 = AdaLayerNormZero(dim)
    self.norm1_context = AdaLayerNormZero(dim)
    self.attn = FluxAttention(query_dim=dim, heads=heads, dim_head=head_dim, out_dim=dim,
                              added_kv_proj_dim=dim, context_pre_only=False, bias=True, eps=EPS)
    self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=EPS)
    self.ff = FeedForward(dim=dim, dim_out=dim, activation_fn="gelu-approximate")
    self.norm2_context = nn.LayerNorm(dim, elementwise_affine=False, eps=EPS)
    self.ff_context = FeedForward(dim=dim, dim_out=dim, activation_fn="gelu-approximate")

  def forward(self, image, text, temb, rotary):
    x, gate, shift_mlp, scale_mlp, gate_mlp = self.norm1(image, emb=temb)
    c, c_gate, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(text, emb=temb)
    attn, context_attn = self.attn(x, encoder_hidden_states=c, image_rotary_emb=rotary)
    image = image + gate.unsqueeze(1) * attn
    x = self.norm2(image) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
    image = image + gate_mlp.unsqueeze(1) * self.ff(x)
    text = text + c_gate.unsqueeze(1) * context_attn
    c = self.norm2_context(text) * (1 + c_scale_mlp[:, None]) + c_shift_mlp[:, None]
    text = text + c_gate_mlp.unsqueeze(1) * self.ff_context(c)
    return image, text


class SingleStreamBlock(nn.Module):
  """`single_transformer_blocks.i`: attention and MLP in parallel on [text; image]."""

  def __init__(self, dim: int, heads: int, head_dim: int, mlp_ratio: float = 4.0):
    super().__init__()
    hidden = int(dim * mlp_ratio)
    self.norm = AdaLayerNormZeroSingle(dim)
    self.proj_mlp = nn.Linear(dim, hidden)
    self.act_mlp = nn.GELU(approximate="tanh")
    self.proj_out = nn.Linear(dim + hidden, dim)
    self.attn = FluxAttention(query_dim=dim, heads=heads, dim_head=head_dim, out_dim=dim,
                              bias=True, eps=EPS, pre_only=True)

  def forward(self, x, temb, rotary):
    h, gate = self.norm(x, emb=temb)
    mlp = self.act_mlp(self.proj_mlp(h))
    attn = self.attn(h, image_rotary_emb=rotary)
    return x + gate.unsqueeze(1) * self.proj_out(torch.cat([attn, mlp], dim=2))


class ConvEmbed(nn.Module):
  """`embed`: token table, RMSNorm, 1x1 conv; [B, h, w] ids -> [B, D, h, w]."""

  def __init__(self, vocab_size: int, dim: int):
    super().__init__()
    self.embeddings = nn.Embedding(vocab_size, dim)
    self.layer_norm = RMSNorm(dim, EPS, True)
    self.conv = nn.Conv2d(dim, dim, kernel_size=1, bias=False)

  def forward(self, ids):
    return self.conv(self.layer_norm(self.embeddings(ids)).permute(0, 3, 1, 2))


class MlmHead(nn.Module):
  """`mlm_layer`: 1x1 conv, RMSNorm over channels, 1x1 conv to codebook logits."""

  def __init__(self, dim: int, codebook_size: int):
    super().__init__()
    self.conv1 = nn.Conv2d(dim, dim, kernel_size=1, bias=False)
    self.layer_norm = RMSNorm(dim, EPS, True)
    self.conv2 = nn.Conv2d(dim, codebook_size, kernel_size=1, bias=False)

  def forward(self, x):
    x = self.layer_norm(self.conv1(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    return self.conv2(x)


class Resample(nn.Module):
  """`down_block` / `up_block`: an optional diffusers Downsample2D or Upsample2D."""

  def __init__(self, dim: int, down: bool, up: bool):
    super().__init__()
    self.downsample = Downsample2D(dim, use_conv=True, padding=0, name="Conv2d_0", kernel_size=2,
                                   norm_type="rms_norm", eps=EPS, elementwise_affine=True,
                                   bias=False) if down else None
    self.upsample = Upsample2D(dim, use_conv_transpose=True, kernel_size=2, padding=0,
                               name="conv", norm_type="rms_norm", eps=EPS,
                               elementwise_affine=True, bias=False,
                               interpolate=False) if up else None

  def forward(self, x):
    if self.downsample is not None:
      x = self.downsample(x)
    if self.upsample is not None:
      x = self.upsample(x)
    return x


def pipeline_image_ids(height: int, width: int) -> torch.Tensor:
  """The pipeline's `_prepare_latent_image_ids(height, width)`: (0, row, col) on the
  (height // 2) x (width // 2) grid, raster order."""
  ids = torch.zeros(height // 2, width // 2, 3)
  ids[..., 1] += torch.arange(height // 2)[:, None]
  ids[..., 2] += torch.arange(width // 2)[None, :]
  return ids.reshape(-1, 3)


class MeissonicReference(nn.Module):
  """Transformer2DModel with the release's config fields as arguments."""

  def __init__(self, num_layers: int, num_single_layers: int, attention_head_dim: int,
               num_attention_heads: int, joint_attention_dim: int, pooled_projection_dim: int,
               axes_dims_rope: Sequence[int], vocab_size: int, codebook_size: int,
               downsample: bool, upsample: bool):
    super().__init__()
    dim = num_attention_heads * attention_head_dim
    self.pos_embed = FluxPosEmbed(theta=10000, axes_dim=list(axes_dims_rope))
    self.time_text_embed = CombinedTimestepTextProjEmbeddings(
        embedding_dim=dim, pooled_projection_dim=pooled_projection_dim)
    self.context_embedder = nn.Linear(joint_attention_dim, dim)
    self.transformer_blocks = nn.ModuleList(
        [DoubleStreamBlock(dim, num_attention_heads, attention_head_dim)
         for _ in range(num_layers)])
    self.single_transformer_blocks = nn.ModuleList(
        [SingleStreamBlock(dim, num_attention_heads, attention_head_dim)
         for _ in range(num_single_layers)])
    self.embed = ConvEmbed(vocab_size, dim)
    self.mlm_layer = MlmHead(dim, codebook_size)
    self.cond_embed = TimestepEmbedding(MICRO_COND_DIM * NUM_MICRO_CONDS + pooled_projection_dim,
                                        dim, sample_proj_bias=False)
    self.encoder_proj_layer_norm = RMSNorm(dim, EPS, True)
    self.project_to_hidden_norm = RMSNorm(dim, EPS, True)
    self.project_to_hidden = nn.Linear(dim, dim, bias=False)
    self.project_from_hidden_norm = RMSNorm(dim, EPS, True)
    self.project_from_hidden = nn.Linear(dim, dim, bias=False)
    self.down_block = Resample(dim, downsample, False)
    self.up_block = Resample(dim, False, upsample)

  def forward(self, hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids,
              txt_ids, micro_conds):
    """Logits [B, codebook_size, h, w] of token ids [B, h, w], as the release returns them."""
    batch = hidden_states.shape[0]
    micro = get_timestep_embedding(micro_conds.flatten(), MICRO_COND_DIM, flip_sin_to_cos=True,
                                   downscale_freq_shift=0).reshape(batch, -1)
    cond = self.cond_embed(torch.cat([pooled_projections, micro.to(pooled_projections.dtype)], 1))
    x = self.embed(hidden_states)
    text = self.encoder_proj_layer_norm(self.context_embedder(encoder_hidden_states))
    x = self.down_block(x)
    _, channels, height, width = x.shape
    image = x.permute(0, 2, 3, 1).reshape(batch, height * width, channels)
    image = self.project_to_hidden(self.project_to_hidden_norm(image))
    temb = self.time_text_embed(timestep.to(image.dtype) * 1000, cond)
    rotary = self.pos_embed(torch.cat([txt_ids, img_ids], dim=0))
    for block in self.transformer_blocks:
      image, text = block(image, text, temb, rotary)
    joint = torch.cat([text, image], dim=1)
    for block in self.single_transformer_blocks:
      joint = block(joint, temb, rotary)
    image = self.project_from_hidden(self.project_from_hidden_norm(joint[:, text.shape[1]:]))
    x = image.reshape(batch, height, width, channels).permute(0, 3, 1, 2)
    return self.mlm_layer(self.up_block(x))
