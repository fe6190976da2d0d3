"""Test-only PyTorch reference of the taming-transformers VQGAN (CompVis/taming-transformers).

Written from the architecture's description, NCHW as upstream, with the module attributes laid
out so that `state_dict()` has the release's key names (encoder.down.0.block.0.norm1.weight,
encoder.mid.attn_1.q.bias, quantize.embedding.weight, decoder.up.1.upsample.conv.weight, ...).
Inference only: no dropout, no losses.
"""

import torch
from torch import nn
from torch.nn import functional as F


def group_norm(channels: int) -> nn.GroupNorm:
  return nn.GroupNorm(32, channels, eps=1e-6, affine=True)


def swish(x: torch.Tensor) -> torch.Tensor:
  return x * torch.sigmoid(x)


class Resnet(nn.Module):

  def __init__(self, cin: int, cout: int):
    super().__init__()
    self.norm1, self.conv1 = group_norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
    self.norm2, self.conv2 = group_norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
    if cin != cout:
      self.nin_shortcut = nn.Conv2d(cin, cout, 1)

  def forward(self, x):
    h = self.conv1(swish(self.norm1(x)))
    h = self.conv2(swish(self.norm2(h)))
    skip = self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x
    return skip + h


class Attention(nn.Module):

  def __init__(self, c: int):
    super().__init__()
    self.norm = group_norm(c)
    self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

  def forward(self, x):
    b, c, height, width = x.shape
    h = self.norm(x)
    q = self.q(h).flatten(2)  # b, c, n
    k = self.k(h).flatten(2)
    v = self.v(h).flatten(2)
    attn = torch.softmax(torch.einsum("bci,bcj->bij", q, k) / c ** 0.5, dim=-1)
    out = torch.einsum("bij,bcj->bci", attn, v).reshape(b, c, height, width)
    return x + self.proj_out(out)


class Down(nn.Module):

  def __init__(self, c: int):
    super().__init__()
    self.conv = nn.Conv2d(c, c, 3, stride=2)

  def forward(self, x):
    return self.conv(F.pad(x, (0, 1, 0, 1)))


class Up(nn.Module):

  def __init__(self, c: int):
    super().__init__()
    self.conv = nn.Conv2d(c, c, 3, padding=1)

  def forward(self, x):
    return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _middle(c: int) -> nn.Module:
  mid = nn.Module()
  mid.block_1, mid.attn_1, mid.block_2 = Resnet(c, c), Attention(c), Resnet(c, c)
  return mid


def _run_level(level: nn.Module, x: torch.Tensor) -> torch.Tensor:
  for i, block in enumerate(level.block):
    x = block(x)
    if len(level.attn):
      x = level.attn[i](x)
  return x


class TamingEncoder(nn.Module):

  def __init__(self, ch, ch_mult, num_res_blocks, attn_resolutions, in_channels, resolution,
               z_channels):
    super().__init__()
    self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
    self.down = nn.ModuleList()
    widths = [ch] + [ch * m for m in ch_mult]
    res = resolution
    for i in range(len(ch_mult)):
      level = nn.Module()
      level.block = nn.ModuleList(
          Resnet(widths[i] if j == 0 else widths[i + 1], widths[i + 1])
          for j in range(num_res_blocks))
      level.attn = nn.ModuleList(
          Attention(widths[i + 1]) for _ in range(num_res_blocks if res in attn_resolutions else 0))
      if i < len(ch_mult) - 1:
        level.downsample = Down(widths[i + 1])
        res //= 2
      self.down.append(level)
    self.mid = _middle(widths[-1])
    self.norm_out = group_norm(widths[-1])
    self.conv_out = nn.Conv2d(widths[-1], z_channels, 3, padding=1)

  def forward(self, x):
    h = self.conv_in(x)
    for level in self.down:
      h = _run_level(level, h)
      if hasattr(level, "downsample"):
        h = level.downsample(h)
    h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
    return self.conv_out(swish(self.norm_out(h)))


class TamingDecoder(nn.Module):

  def __init__(self, ch, out_ch, ch_mult, num_res_blocks, attn_resolutions, resolution,
               z_channels):
    super().__init__()
    n = len(ch_mult)
    c = ch * ch_mult[-1]
    res = resolution // 2 ** (n - 1)
    self.conv_in = nn.Conv2d(z_channels, c, 3, padding=1)
    self.mid = _middle(c)
    levels = [None] * n
    for i in reversed(range(n)):
      cout = ch * ch_mult[i]
      level = nn.Module()
      level.block = nn.ModuleList(
          Resnet(c if j == 0 else cout, cout) for j in range(num_res_blocks + 1))
      level.attn = nn.ModuleList(
          Attention(cout) for _ in range(num_res_blocks + 1 if res in attn_resolutions else 0))
      if i > 0:
        level.upsample = Up(cout)
        res *= 2
      levels[i] = level
      c = cout
    self.up = nn.ModuleList(levels)
    self.norm_out = group_norm(c)
    self.conv_out = nn.Conv2d(c, out_ch, 3, padding=1)

  def forward(self, z):
    h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
    for level in reversed(self.up):
      h = _run_level(level, h)
      if hasattr(level, "upsample"):
        h = level.upsample(h)
    return self.conv_out(swish(self.norm_out(h)))


class Quantizer(nn.Module):

  def __init__(self, n_embed: int, embed_dim: int):
    super().__init__()
    self.embedding = nn.Embedding(n_embed, embed_dim)

  def distances(self, z):
    """z: [B, D, h, w] -> squared distances [B, h, w, n_embed], computed directly (float64)."""
    diff = z.permute(0, 2, 3, 1).double()[..., None, :] - self.embedding.weight.double()
    return (diff ** 2).sum(-1)


class TamingVQModel(nn.Module):
  """VQModel: encoder, quant_conv, quantize, post_quant_conv, decoder; NCHW tensors."""

  def __init__(self, ddconfig: dict, n_embed: int, embed_dim: int):
    super().__init__()
    d = ddconfig
    self.encoder = TamingEncoder(d["ch"], d["ch_mult"], d["num_res_blocks"], d["attn_resolutions"],
                                 d["in_channels"], d["resolution"], d["z_channels"])
    self.decoder = TamingDecoder(d["ch"], d["out_ch"], d["ch_mult"], d["num_res_blocks"],
                                 d["attn_resolutions"], d["resolution"], d["z_channels"])
    self.quantize = Quantizer(n_embed, embed_dim)
    self.quant_conv = nn.Conv2d(d["z_channels"], embed_dim, 1)
    self.post_quant_conv = nn.Conv2d(embed_dim, d["z_channels"], 1)

  def latents(self, x):
    """[B, 3, H, W] -> pre-quantization latents [B, embed_dim, h, w]."""
    return self.quant_conv(self.encoder(x))

  def encode(self, x):
    """[B, 3, H, W] -> (codes int64[B, h, w], squared distances float64[B, h, w, n_embed])."""
    d = self.quantize.distances(self.latents(x))
    return d.argmin(-1), d

  def decode(self, codes):
    """int[B, h, w] -> images [B, out_ch, H, W]."""
    z = self.quantize.embedding(codes).permute(0, 3, 1, 2)
    return self.decoder(self.post_quant_conv(z))
