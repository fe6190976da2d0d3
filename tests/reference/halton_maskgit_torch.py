"""Test-only PyTorch reference of the valeoai/Halton-MaskGIT v1.0 bidirectional transformer.

Written from the release's architecture (branch v1.0, Network/transformer.py) so that its
`state_dict()` has the release's key names and its forward pass is the release's arithmetic:

  ids    = [img_token (L ids, mask = V), class token (y + V + 1, or V + 1 + C when dropped)]
  x      = tok_emb(ids) + pos_emb                                       (pos_emb: [1, L + 1, D])
  x      = first_layer(x)   LN(eps 1e-12), Dropout, Linear, GELU, LN(eps 1e-12), Dropout, Linear
  x      = depth x pre-LN layers: x + MHA(LN(x)); x + FF(LN(x)), FF = Linear, GELU, Dropout,
           Linear, Dropout; LN eps 1e-5; nn.MultiheadAttention(batch_first, dropout on weights)
  x      = last_layer(x)    LN(eps 1e-12), Dropout, Linear, GELU, LN(eps 1e-12)
  logits = x @ tok_emb.weight.T + bias                                   (bias: [L + 1, V + C + 2])
  return logits[:, :L, :V + 1]

Only the tests use it, to check our Flax port against an independent implementation.
"""

import torch
from torch import nn


class _NormThen(nn.Module):
  """LayerNorm, then `fn` (the release's PreNorm: keys `norm.*` and `fn.*`)."""

  def __init__(self, width: int, fn: nn.Module):
    super().__init__()
    self.norm = nn.LayerNorm(width)
    self.fn = fn

  def forward(self, x):
    return self.fn(self.norm(x))


class _SelfAttention(nn.Module):
  """Holds the attention under `mha` and returns only the attended values."""

  def __init__(self, width: int, heads: int, dropout: float):
    super().__init__()
    self.mha = nn.MultiheadAttention(width, heads, dropout=dropout, bias=True, batch_first=True)

  def forward(self, x):
    return self.mha(x, x, x, need_weights=False)[0]


class _Mlp(nn.Module):
  def __init__(self, width: int, mlp_dim: int, dropout: float):
    super().__init__()
    self.net = nn.Sequential(nn.Linear(width, mlp_dim), nn.GELU(), nn.Dropout(dropout),
                             nn.Linear(mlp_dim, width), nn.Dropout(dropout))

  def forward(self, x):
    return self.net(x)


class _Encoder(nn.Module):
  def __init__(self, width: int, depth: int, heads: int, mlp_dim: int, dropout: float):
    super().__init__()
    self.layers = nn.ModuleList(
        nn.ModuleList([_NormThen(width, _SelfAttention(width, heads, dropout)),
                       _NormThen(width, _Mlp(width, mlp_dim, dropout))])
        for _ in range(depth))

  def forward(self, x):
    for attention, mlp in self.layers:
      x = x + attention(x)
      x = x + mlp(x)
    return x


class ReferenceMaskTransformer(nn.Module):
  """The release's MaskTransformer at any size (`grid` x `grid` visual tokens)."""

  def __init__(self, grid: int, width: int, depth: int, heads: int, mlp_dim: int,
               codebook_size: int, num_classes: int, dropout: float = 0.1):
    super().__init__()
    self.grid, self.codebook_size, self.num_classes = grid, codebook_size, num_classes
    vocab = codebook_size + 1 + num_classes + 1
    self.tok_emb = nn.Embedding(vocab, width)
    self.pos_emb = nn.Parameter(nn.init.trunc_normal_(torch.zeros(1, grid * grid + 1, width),
                                                      std=0.02))
    self.first_layer = nn.Sequential(
        nn.LayerNorm(width, eps=1e-12), nn.Dropout(dropout), nn.Linear(width, width), nn.GELU(),
        nn.LayerNorm(width, eps=1e-12), nn.Dropout(dropout), nn.Linear(width, width))
    self.transformer = _Encoder(width, depth, heads, mlp_dim, dropout)
    self.last_layer = nn.Sequential(
        nn.LayerNorm(width, eps=1e-12), nn.Dropout(dropout), nn.Linear(width, width), nn.GELU(),
        nn.LayerNorm(width, eps=1e-12))
    self.bias = nn.Parameter(torch.zeros(grid * grid + 1, vocab))

  def forward(self, img_token: torch.Tensor, y: torch.Tensor,
              drop_label: torch.Tensor) -> torch.Tensor:
    """img_token: int64[B, h, w], y: int64[B], drop_label: bool[B] -> float32[B, h*w, V + 1]."""
    batch = img_token.shape[0]
    seq_len = self.grid * self.grid
    no_class = torch.full_like(y, self.codebook_size + 1 + self.num_classes)
    cls_token = torch.where(drop_label, no_class, y + self.codebook_size + 1)
    ids = torch.cat([img_token.reshape(batch, -1), cls_token[:, None]], dim=1)
    x = self.tok_emb(ids) + self.pos_emb
    x = self.last_layer(self.transformer(self.first_layer(x)))
    logits = x @ self.tok_emb.weight.T + self.bias
    return logits[:, :seq_len, :self.codebook_size + 1]
