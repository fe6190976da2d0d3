"""Pretrains the text-conditional toy teacher: a small Meissonic transformer on scikit-learn's
8x8 digits, each conditioned on a prompt naming it (dimo_jax/data/digit_prompts.py). CPU, minutes.

  python -m dimo_jax.pretrain --config configs/digits_text_teacher.py \
      --workdir runs/digits_text_teacher

The teacher directory (runs/digits_text_teacher/teacher) is a `meissonic` model directory with
the toy CLIP text encoder and tokenizer inside; Di[M]O distills it with `dataset='digits_text'`
and `teacher_path` pointing there.
"""

import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.dataset = "digits_text"
  c.seed = 0
  c.token_grid = (8, 8)
  # The toy CLIP tower (digit_prompts.TOY_ENCODER): its hidden_size is the transformer's
  # joint_attention_dim and its projection_dim the transformer's width.
  c.text_encoder = ml_collections.ConfigDict(dict(
      hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
      projection_dim=32))
  c.model = ml_collections.ConfigDict(dict(
      num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
      joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6),
      vocab_size=18, codebook_size=17, downsample=False, upsample=False))
  c.batch_size = 64
  c.num_steps = 3000
  c.lr = 1e-3
  c.warmup_steps = 100
  c.final_lr_ratio = 0.05
  c.weight_decay = 0.01
  c.max_grad_norm = 1.0
  c.ratio_mode = "arccos"
  c.label_smoothing = 0.1
  c.drop_label = 0.1
  c.masked_only = True  # as configs/digits_teacher.py, which measured why
  c.log_every = 250
  return c
