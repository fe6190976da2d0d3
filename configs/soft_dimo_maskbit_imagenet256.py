"""Soft-Di[M]O on ImageNet 256x256 with the 14-bit MaskBit teacher: the paper's long run.

  python -m dimo_jax.tokenize --tokenizer checkpoints/maskbit_tokenizer \
      --images /data/imagenet/train --out data/imagenet256_maskbit_tokens
  python -m dimo_jax.main --config configs/soft_dimo_maskbit_imagenet256.py \
      --workdir runs/soft_maskbit256

configs/maskbit_imagenet256.py plus the GAN on the teacher's backbone. The paper (arXiv
2509.22925) gives for its longer MaskBit run: generator lr 5e-7, w_GAN 200, AdamW with weight
decay 0.01, r_max 0.95. Everything else is ours (not measured at this size; no machine here
runs it). The token dataset holds the tokenizer's full 14-bit indices; they are split into the
teacher's sub-tokens as they are read.
"""

from configs import maskbit_imagenet256, soft_dimo_maskgit_imagenet256


def get_config():
  c = maskbit_imagenet256.get_config()
  c.generator_lr = 5e-7  # the paper's
  c.optimizer_type = "adamw"  # the paper's
  c.adam_weight_decay = 0.01  # the paper's
  # The GAN block of the MaskGIT recipe (r_max 0.95 the paper's; loss, layers, lr and rounds
  # ours, see that file), with the paper's MaskBit weight and this tokenizer's token set.
  c.gan = soft_dimo_maskgit_imagenet256.get_config().gan
  c.gan.weight = 200.0  # the paper's
  c.gan.real_tokens = "data/imagenet256_maskbit_tokens"
  return c
