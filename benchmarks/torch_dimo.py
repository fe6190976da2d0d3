"""The Di[M]O train step in eager PyTorch, as the reference (yuanzhi-zhu/DiMO) computes it.

The comparison point for benchmarks/jax_vs_torch.py: one call of `TorchDiMO.step` does what one
generator iteration of the reference's `train_DIMO_MaskGit.py` loop does with `fake_rounds`
auxiliary updates:

  generator:  x_init (uniform codes, round(L * r_init) masked) -> z = G(x_init, y) with embedding
              noise -> x ~ Cat(softmax(z)) -> forward mask (arccos) -> guided teacher (cond +
              uncond in one batch) and auxiliary logits without grad -> Jeffreys gradient g on
              masked tokens -> 1/2 ||z - sg(z - g)||^2 / B backward -> clip, Adam
  auxiliary:  fresh x (no grad) -> its own forward mask -> label-smoothed cross-entropy on the
              masked tokens -> Adam
  EMA of the generator with rate min(decay, (1 + s) / (10 + s)).

The network is the Halton-MaskGIT transformer the reference distills (pre-LN encoder built on
`nn.MultiheadAttention`, `first_layer` / `last_layer` projections, output tied to the token
embedding plus a bias). Like the reference it scores the whole token table at every position and
slices [:L, :V + 1] afterwards, and it calls `nn.MultiheadAttention` with its default
`need_weights=True` (the reference keeps the attention maps), unless `fast_attention` is set.
"""

import copy
import dataclasses
import math

import torch
from torch import nn
import torch.nn.functional as F


class _PreNorm(nn.Module):

  def __init__(self, dim: int, fn: nn.Module):
    super().__init__()
    self.norm = nn.LayerNorm(dim)
    self.fn = fn

  def forward(self, x):
    return self.fn(self.norm(x))


class _Attention(nn.Module):

  def __init__(self, dim: int, heads: int, dropout: float, fast: bool):
    super().__init__()
    self.mha = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
    self.fast = fast

  def forward(self, x):
    return self.mha(x, x, x, need_weights=not self.fast)[0]


def _feed_forward(dim: int, mlp_dim: int, dropout: float) -> nn.Sequential:
  return nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Dropout(dropout),
                       nn.Linear(mlp_dim, dim), nn.Dropout(dropout))


class MaskTransformer(nn.Module):
  """MaskGIT's bidirectional transformer over L visual tokens and one class token.

  Token ids: codes [0, V), mask V, class y -> V + 1 + y, "no class" V + 1 + C.
  """

  def __init__(self, codebook_size: int, num_classes: int, seq_len: int, hidden_dim: int = 768,
               depth: int = 24, num_heads: int = 16, mlp_dim: int = 3072, dropout: float = 0.1,
               fast_attention: bool = False):
    super().__init__()
    self.codebook_size, self.num_classes, self.seq_len = codebook_size, num_classes, seq_len
    vocab = codebook_size + 1 + num_classes + 1
    self.tok_emb = nn.Embedding(vocab, hidden_dim)
    self.pos_emb = nn.Parameter(nn.init.trunc_normal_(torch.zeros(1, seq_len + 1, hidden_dim),
                                                      std=0.02))
    self.first_layer = nn.Sequential(
        nn.LayerNorm(hidden_dim, eps=1e-12), nn.Dropout(dropout),
        nn.Linear(hidden_dim, hidden_dim), nn.GELU(),
        nn.LayerNorm(hidden_dim, eps=1e-12), nn.Dropout(dropout),
        nn.Linear(hidden_dim, hidden_dim))
    self.layers = nn.ModuleList([
        nn.ModuleList([
            _PreNorm(hidden_dim, _Attention(hidden_dim, num_heads, dropout, fast_attention)),
            _PreNorm(hidden_dim, _feed_forward(hidden_dim, mlp_dim, dropout))])
        for _ in range(depth)])
    self.last_layer = nn.Sequential(
        nn.LayerNorm(hidden_dim, eps=1e-12), nn.Dropout(dropout),
        nn.Linear(hidden_dim, hidden_dim), nn.GELU(),
        nn.LayerNorm(hidden_dim, eps=1e-12))
    self.bias = nn.Parameter(torch.zeros(seq_len + 1, vocab))

  def forward(self, tokens, labels, drop_label=None, emb_noise: float = 0.0):
    """tokens: int64[B, L]; labels: int64[B]; drop_label: bool[B] -> float[B, L, V + 1]."""
    class_token = labels + self.codebook_size + 1
    if drop_label is not None:
      class_token = torch.where(drop_label, self.codebook_size + 1 + self.num_classes,
                                class_token)
    x = self.tok_emb(torch.cat([tokens, class_token[:, None]], dim=1))
    if emb_noise > 0:
      visual = x[:, :self.seq_len]
      visual = emb_noise * torch.randn_like(visual) + math.sqrt(1 - emb_noise**2) * visual
      x = torch.cat([visual, x[:, self.seq_len:]], dim=1)
    x = self.first_layer(x + self.pos_emb)
    for attn, ff in self.layers:
      x = x + attn(x)
      x = x + ff(x)
    x = self.last_layer(x)
    logits = x @ self.tok_emb.weight.T + self.bias
    return logits[:, :self.seq_len, :self.codebook_size + 1]


@dataclasses.dataclass
class StepConfig:
  """The knobs of configs/DIMO_MaskGit.yaml that shape the step's work."""
  batch: int
  fixed_ratio: float = 0.6
  noise_emb_perturb: float = 0.1
  ratio_mode: str = "arccos"
  true_cfg: float = 2.0
  fake_cfg_eval: float = 1.0
  jeffreys_beta: float = 0.0
  lr: float = 1e-5
  max_grad_norm: float = 1.0
  label_smoothing: float = 0.1
  fake_rounds: int = 1
  ema_decay: float = 0.9999


def _mask_ratio(u, mode: str):
  if mode == "arccos":
    return torch.arccos(u) / (math.pi / 2)
  if mode == "cosine":
    return torch.cos(u * math.pi / 2)
  if mode == "square":
    return u**2
  if mode == "linear":
    return u
  raise ValueError(f"ratio_mode must be arccos, cosine, square or linear, got {mode!r}")


def _random_mask(ratio, batch: int, seq_len: int):
  """Exactly round(L * ratio) (>= 1) uniformly chosen positions per row: bool[B, L]."""
  count = (seq_len * ratio).round().clamp(min=1).long().reshape(-1, 1)
  return torch.rand(batch, seq_len, device=ratio.device).argsort(dim=-1) < count


def _guided(model, tokens, labels, cfg: float):
  """z_u + w (z_c - z_u) from one doubled batch; w = 1 is a single conditional pass."""
  if cfg == 1:
    return model(tokens, labels)
  batch, device = tokens.shape[0], tokens.device
  drop = torch.cat([torch.zeros(batch, dtype=torch.bool, device=device),
                    torch.ones(batch, dtype=torch.bool, device=device)])
  cond, uncond = model(torch.cat([tokens, tokens]), torch.cat([labels, labels]), drop).chunk(2)
  return uncond + cfg * (cond - uncond)


class TorchDiMO:
  """Teacher, generator, auxiliary model, EMA and two Adam optimizers; `step()` trains once.

  Every network stays in train mode (dropout on), as the reference trains; `fix_emb_layer`
  freezes the embedding table, the positional embedding and the output bias. `device`: where
  the networks live and every random draw is made ('cpu', 'cuda', ...); bf16 is
  `torch.autocast` on that device's type, as accelerate's mixed precision runs the reference.
  """

  def __init__(self, teacher: MaskTransformer, config: StepConfig, bf16: bool,
               device: str = "cpu"):
    self.config, self.bf16 = config, bf16
    self.device = torch.device(device)
    teacher = teacher.to(self.device)
    self.teacher = teacher.train().requires_grad_(False)
    self.generator = copy.deepcopy(teacher).train()
    self.fake = copy.deepcopy(teacher).train()
    self.ema = copy.deepcopy(teacher).requires_grad_(False)
    for net in (self.generator, self.fake):
      for name, p in net.named_parameters():
        p.requires_grad_(name.split(".")[0] not in ("tok_emb", "pos_emb", "bias"))
    # The reference lowers Adam's epsilon to 1e-6 under 16-bit mixed precision.
    eps = 1e-6 if bf16 else 1e-8
    make = lambda net: torch.optim.Adam([p for p in net.parameters() if p.requires_grad],
                                        lr=config.lr, eps=eps)
    self.gen_opt, self.fake_opt = make(self.generator), make(self.fake)
    self.global_step = 0

  def _autocast(self):
    return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

  def _generate(self):
    """One generator step on fresh x_init: (logits float[B, L, V + 1], codes, labels)."""
    c, net = self.config, self.generator
    labels = torch.randint(0, net.num_classes, (c.batch,), device=self.device)
    codes = torch.randint(0, net.codebook_size, (c.batch, net.seq_len), device=self.device)
    init_mask = _random_mask(torch.tensor(c.fixed_ratio, device=self.device), c.batch,
                             net.seq_len)
    x_init = torch.where(init_mask, net.codebook_size, codes)
    with self._autocast():
      logits = net(x_init, labels, emb_noise=c.noise_emb_perturb)
    sample = torch.distributions.Categorical(probs=torch.softmax(logits.float(), -1)).sample()
    return logits, sample, labels

  def _forward_mask(self, codes):
    c, seq_len = self.config, codes.shape[1]
    ratio = _mask_ratio(torch.rand(codes.shape[0], device=codes.device), c.ratio_mode)
    mask = _random_mask(ratio, codes.shape[0], seq_len)
    return torch.where(mask, self.generator.codebook_size, codes), mask

  def generator_update(self) -> float:
    c = self.config
    self.gen_opt.zero_grad(set_to_none=True)
    logits, codes, labels = self._generate()
    noisy, mask = self._forward_mask(codes)
    with torch.no_grad():
      with self._autocast():
        true_logits = _guided(self.teacher, noisy, labels, c.true_cfg)
        fake_logits = _guided(self.fake, noisy, labels, c.fake_cfg_eval)
      log_p_true = torch.log_softmax(true_logits.float(), -1)
      log_p_fake = torch.log_softmax(fake_logits.float(), -1)
      p_true, p_fake = log_p_true.exp(), log_p_fake.exp()
      grad = (1 - c.jeffreys_beta) * (p_fake - p_true)
      if c.jeffreys_beta > 0:
        log_ratio = log_p_fake - log_p_true
        kl = (p_fake * log_ratio).sum(-1, keepdim=True)
        grad = grad + c.jeffreys_beta * p_fake * (log_ratio - kl)
      grad = torch.nan_to_num(torch.where(mask[..., None], grad, 0.0))
    z = logits.float()
    loss = 0.5 * F.mse_loss(z, (z - grad).detach(), reduction="sum") / c.batch
    loss.backward()
    if c.max_grad_norm > 0:
      nn.utils.clip_grad_norm_(self.generator.parameters(), c.max_grad_norm)
    self.gen_opt.step()
    return loss.item()

  def fake_update(self) -> float:
    c = self.config
    self.fake_opt.zero_grad(set_to_none=True)
    with torch.no_grad():
      _, codes, labels = self._generate()
    noisy, mask = self._forward_mask(codes)
    with self._autocast():
      logits = self.fake(noisy, labels)
    targets = torch.where(mask, codes, -1)
    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=-1, label_smoothing=c.label_smoothing)
    loss.backward()
    self.fake_opt.step()
    return loss.item()

  @torch.no_grad()
  def update_ema(self):
    s = self.global_step
    rate = min(self.config.ema_decay, (1 + s) / (10 + s))
    for e, p in zip(self.ema.parameters(), self.generator.parameters()):
      e.mul_(rate).add_(p, alpha=1 - rate)

  def step(self):
    """One generator update, `fake_rounds` auxiliary updates, one EMA update: (loss_g, loss_f)."""
    loss_g = self.generator_update()
    loss_f = [self.fake_update() for _ in range(self.config.fake_rounds)]
    self.update_ema()
    self.global_step += 1
    return loss_g, sum(loss_f) / max(len(loss_f), 1)
