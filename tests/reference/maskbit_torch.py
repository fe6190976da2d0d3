"""Test-only PyTorch references for MaskBit (markweberdev/maskbit has no pip package), written
from the architecture's public description: the LFQBert generator, the VQGAN+ tokenizer with
lookup-free quantization, and the release's `sample` loop with its noise passed in. Module and
parameter names follow the release's state dict, so `state_dict()` is a release-layout file."""

import math

import torch
import torch.nn.functional as F


class _Attention(torch.nn.Module):
  def __init__(self, dim, heads, prenorm):
    super().__init__()
    self.mha = torch.nn.MultiheadAttention(dim, heads, dropout=0.0, batch_first=True, bias=True)
    self.norm = torch.nn.LayerNorm(dim, eps=1e-12)
    self.prenorm = prenorm

  def forward(self, x):
    if self.prenorm:
      y = self.norm(x)
      return x + self.mha(y, y, y, need_weights=False)[0]
    return self.norm(x + self.mha(x, x, x, need_weights=False)[0])


class _FeedForward(torch.nn.Module):
  def __init__(self, dim, hidden, prenorm):
    super().__init__()
    self.net = torch.nn.Sequential(torch.nn.Linear(dim, hidden), torch.nn.GELU(),
                                   torch.nn.Linear(hidden, dim), torch.nn.Dropout(0.0))
    self.norm = torch.nn.LayerNorm(dim, eps=1e-12)
    self.prenorm = prenorm

  def forward(self, x):
    return x + self.net(self.norm(x)) if self.prenorm else self.norm(x + self.net(x))


class _Encoder(torch.nn.Module):
  def __init__(self, dim, depth, heads, mlp, prenorm):
    super().__init__()
    self.layers = torch.nn.ModuleList(
        torch.nn.ModuleList([_Attention(dim, heads, prenorm), _FeedForward(dim, mlp, prenorm)])
        for _ in range(depth))

  def forward(self, x):
    for attn, ff in self.layers:
      x = ff(attn(x))
    return x


class ReferenceLFQBert(torch.nn.Module):
  """tokens int64[B, n, m] (mask = 2^(bits/m)) -> logits [B, n, m, 2^(bits/m)]."""

  def __init__(self, positions, dim, depth, heads, mlp, bits, splits, classes, prenorm=False):
    super().__init__()
    self.positions, self.splits, self.classes = positions, splits, classes
    self.sub_bits = bits // splits
    self.size = 2 ** self.sub_bits
    self.register_buffer("bits_to_indices", (2 ** torch.arange(self.sub_bits)).int())
    self.class_emb = torch.nn.Embedding(classes + 1, dim)
    self.input_proj = torch.nn.Linear(bits, dim)
    self.pos_emb = torch.nn.Parameter(torch.randn(1, positions + 1, dim) * 0.02)
    self.first_layer = torch.nn.Sequential(torch.nn.LayerNorm(dim, eps=1e-12),
                                           torch.nn.Dropout(0.0))
    self.transformer = _Encoder(dim, depth, heads, mlp, prenorm)
    self.prenorm = prenorm
    if prenorm:
      self.norm_after_transformer = torch.nn.LayerNorm(dim, eps=1e-12)
    self.last_layer = torch.nn.Sequential(torch.nn.Linear(dim, dim), torch.nn.GELU(),
                                          torch.nn.LayerNorm(dim, eps=1e-12))
    self.prediction_layer = torch.nn.Linear(dim, splits * self.size)

  def forward(self, tokens, labels, drop):
    batch = tokens.shape[0]
    masked = tokens == self.size
    bits = ((tokens[..., None].int() & self.bits_to_indices) != 0).float() * 2 - 1
    bits[masked] = 0.0
    x = self.input_proj(bits.reshape(batch, self.positions, -1))
    label = torch.where(drop, torch.full_like(labels, self.classes), labels)
    x = torch.cat([x, self.class_emb(label)[:, None]], dim=1) + self.pos_emb
    x = self.transformer(self.first_layer(x))
    if self.prenorm:
      x = self.norm_after_transformer(x)
    logits = self.prediction_layer(self.last_layer(x))[:, : self.positions]
    return logits.reshape(batch, self.positions, self.splits, self.size)


class _SameConv(torch.nn.Conv2d):
  """TF "SAME" padding: the extra row/column at the end."""

  def forward(self, x):
    pads = []
    for size, k, s in zip(x.shape[-2:][::-1], self.kernel_size[::-1], self.stride[::-1]):
      total = max((math.ceil(size / s) - 1) * s + k - size, 0)
      pads += [total // 2, total - total // 2]
    return super().forward(F.pad(x, pads))


def _norm(channels):
  return torch.nn.GroupNorm(32, channels, eps=1e-6)


class _Block(torch.nn.Module):
  def __init__(self, cin, cout):
    super().__init__()
    self.norm1, self.conv1 = _norm(cin), _SameConv(cin, cout, 3, bias=False)
    self.norm2, self.conv2 = _norm(cout), _SameConv(cout, cout, 3, bias=False)
    self.changes = cin != cout
    if self.changes:
      self.nin_shortcut = _SameConv(cout, cout, 1, bias=False)

  def forward(self, x):
    h = self.conv2(F.silu(self.norm2(self.conv1(F.silu(self.norm1(x))))))
    return h + (self.nin_shortcut(h) if self.changes else x)


class _Stage(torch.nn.Module):
  def __init__(self, cin, cout, blocks, resample=None):
    super().__init__()
    self.res_blocks = torch.nn.ModuleList(_Block(cin if j == 0 else cout, cout)
                                          for j in range(blocks))
    self.resample = resample
    if resample == "down":
      self.down_conv = _SameConv(cout, cout, 3, stride=2)
    elif resample == "up":
      self.upsample_conv = _SameConv(cout, cout, 3)

  def forward(self, x):
    for block in self.res_blocks:
      x = block(x)
    if self.resample == "down":
      x = self.down_conv(x)
    elif self.resample == "up":
      x = self.upsample_conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
    return x


class _VQEncoder(torch.nn.Module):
  def __init__(self, bits, hidden, mult, blocks):
    super().__init__()
    full = (1,) + tuple(mult)
    self.conv_in = _SameConv(3, hidden, 3, bias=False)
    self.down = torch.nn.ModuleList(
        _Stage(hidden * full[i], hidden * full[i + 1], blocks,
               "down" if i < len(mult) - 1 else None) for i in range(len(mult)))
    top = hidden * mult[-1]
    self.mid = _Stage(top, top, blocks)
    self.norm_out = _norm(top)
    self.conv_out = _SameConv(top, bits, 1)

  def forward(self, x):
    x = self.conv_in(x)
    for stage in self.down:
      x = stage(x)
    return self.conv_out(F.silu(self.norm_out(self.mid(x))))


class _VQDecoder(torch.nn.Module):
  def __init__(self, bits, hidden, mult, blocks):
    super().__init__()
    full = tuple(mult) + (mult[-1],)
    top = hidden * mult[-1]
    self.conv_in = _SameConv(bits, top, 3)
    self.mid = _Stage(top, top, blocks)
    self.up = torch.nn.ModuleList(
        _Stage(hidden * full[i + 1], hidden * full[i], blocks, "up" if i > 0 else None)
        for i in reversed(range(len(mult))))
    self.norm_out = _norm(hidden * mult[0])
    self.conv_out = _SameConv(hidden * mult[0], 3, 3)

  def forward(self, z):
    x = self.mid(self.conv_in(z))
    for stage in self.up:
      x = stage(x)
    return self.conv_out(F.silu(self.norm_out(x)))


class _Quantizer(torch.nn.Module):
  def __init__(self, bits):
    super().__init__()
    self.register_buffer("bits_to_indices", (2 ** torch.arange(bits)).int())
    codes = torch.arange(2 ** bits)
    self.register_buffer("codebook", ((codes[:, None].int() & self.bits_to_indices) != 0).float()
                         * 2 - 1)


class ReferenceVQGANPlus(torch.nn.Module):
  """images [B, 3, H, W] in [0, 1] <-> indices [B, h, w]."""

  def __init__(self, bits, hidden, mult, blocks):
    super().__init__()
    self.encoder = _VQEncoder(bits, hidden, mult, blocks)
    self.decoder = _VQDecoder(bits, hidden, mult, blocks)
    self.quantize = _Quantizer(bits)

  def encode(self, images):
    z = self.encoder(images)
    return ((z > 0).int() * self.quantize.bits_to_indices[:, None, None]).sum(1)

  def decode(self, indices):
    bits = ((indices[..., None].int() & self.quantize.bits_to_indices) != 0).float() * 2 - 1
    return self.decoder(bits.permute(0, 3, 1, 2))


def reference_sample(logits_fn, batch, positions, splits, mask, steps, guidance, annealing,
                     scale_pow, randomize_temperature, sample_noise, conf_noise,
                     softmax_temperature=1.0):
  """The release's `sample` loop over [B, n, m] sub-tokens with the arccos schedule, its two
  random draws replaced by the given noise: `sample_noise[i]` [B, n, m, V] Gumbel noise for the
  categorical draw (Gumbel-max), `conf_noise[i]` [B, n, m] for the confidence. Returns every
  step's (tokens after re-masking, drawn tokens)."""
  tokens = torch.full((batch, positions, splits), mask)
  is_masked = tokens == mask
  history = []
  for i in range(steps):
    progress = (i + 1) / steps
    cond = logits_fn(tokens, False)
    if guidance != 0:
      uncond = logits_fn(tokens, True)
      if annealing == "none":
        step_scale = 1.0
      elif annealing == "linear":
        step_scale = i / steps
      else:
        step_scale = (1 - torch.cos(((i / steps) ** (torch.ones(1) * scale_pow)) * torch.pi)) / 2
      logits = cond + guidance * step_scale * (cond - uncond)
    else:
      logits = cond
    probs = torch.softmax(logits / softmax_temperature, dim=-1)
    drawn = torch.argmax(torch.log(probs) + sample_noise[i], dim=-1)
    num_masked = torch.sum(is_masked, dim=(1, 2))[0]
    drawn = torch.where(is_masked, drawn, tokens)
    confidence = torch.gather(probs, -1, drawn.unsqueeze(-1)).squeeze(-1)
    confidence = torch.where(is_masked, confidence, torch.inf)
    confidence = torch.log(confidence) + conf_noise[i] * randomize_temperature * (1 - progress)
    ratio = torch.clamp(torch.acos(torch.tensor(progress)) / (math.pi * 0.5), 1e-6, 1.0)
    mask_len = torch.floor(ratio * positions * splits)
    count = torch.clamp(mask_len, torch.ones_like(num_masked), num_masked - 1).long()
    threshold = torch.sort(confidence.view(batch, -1), dim=-1).values[:, count - 1]
    tokens = torch.where(confidence <= threshold[:, None, None], mask, drawn)
    is_masked = tokens == mask
    history.append((tokens.clone(), drawn.clone()))
  return history
