"""Pretrains a teacher on the synthetic prototype-mixture tokens (exactly scorable samples).

  python -m dimo_jax.pretrain --config configs/synthetic_teacher.py --workdir runs/synthetic
"""

import ml_collections


def synthetic_spec() -> ml_collections.ConfigDict:
  """10 classes x 4 modes of 16 tokens over 16 codes, 10% of positions resampled uniformly."""
  return ml_collections.ConfigDict(dict(
      num_classes=10, modes_per_class=4, seq_len=16, codebook_size=16, corruption=0.1, seed=0))


def get_config():
  c = ml_collections.ConfigDict()
  c.dataset = "synthetic"
  c.synthetic = synthetic_spec()
  c.seed = 0
  c.model = ml_collections.ConfigDict(dict(
      codebook_size=16, num_classes=10, seq_len=16,
      hidden_dim=64, depth=3, num_heads=4, mlp_dim=256, dropout=0.1))
  c.batch_size = 128
  c.num_steps = 2000
  c.lr = 1e-3
  c.warmup_steps = 100
  c.final_lr_ratio = 0.05
  c.weight_decay = 0.01
  c.max_grad_norm = 1.0
  c.ratio_mode = "arccos"
  c.label_smoothing = 0.1
  c.drop_label = 0.1
  c.masked_only = True
  c.log_every = 250
  return c
