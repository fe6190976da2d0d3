"""Soft-Di[M]O on Meissonic (text-to-image, 1024x1024): configs/meissonic_1024.py (the Di[M]O
recipe) plus the GAN on the teacher's backbone, fed image-caption pairs, and the CLIP-score
reward through the VQ-VAE decoder (dimo_jax/gan.py, dimo_jax/rewards.py).

  python -m dimo_jax.convert clip --src clip-vit-large-patch14/ --dst checkpoints/clip
  python -m dimo_jax.tokenize --tokenizer checkpoints/meissonic --images /data/laion_aesthetic \
      --captions --image_size 1024 --out data/meissonic_tokens
  python -m dimo_jax.main --config configs/soft_dimo_meissonic_1024.py \
      --workdir runs/soft_meissonic --config.prompts.file=prompts.txt
  python -m dimo_jax.sample --generator runs/soft_meissonic --teacher checkpoints/meissonic \
      --prompt "a boat in a cup of water" --tteo_steps 8 --out generator_tteo.png

The paper (arXiv 2509.22925) distilled Meissonic with the GAN term and four rewards (CLIP score,
ImageReward, HPS, aesthetics) and gives none of their weights for this teacher. Of the rewards,
CLIP score is built. The discriminator's real side is a token set made once from captioned
images (above; its fake side is conditioned on the run's prompts). Every value marked "ours" is
our choice, unmeasured at this size (no machine here runs it).
"""

from configs import meissonic_1024


def get_config():
  c = meissonic_1024.get_config()
  c.reward.kind = "clip"
  c.reward.clip_path = "checkpoints/clip"  # python -m dimo_jax.convert clip (see above)
  # ours: 100 cos is ~30 on a matching picture; with Di[M]O's surrogate summed over the 4096
  # tokens this weight keeps the reward's gradient a small part of the step's
  c.reward.weight = 0.1
  c.reward.tau = 1.0  # ours
  c.optimizer_type = "adamw"  # the paper's MaskBit run (AdamW, weight decay 0.01)
  c.adam_weight_decay = 0.01
  c.tteo.lr = 0.2  # the paper's; TTEO is a sampling option (sample/evaluate --tteo_steps)
  c.gan.real_tokens = "data/meissonic_tokens"  # python -m dimo_jax.tokenize --captions (above)
  c.gan.weight = 1.0  # ours
  c.gan.r_max = 0.95  # the paper's
  c.gan.layers = (0.25, 0.5, 0.75, 1.0)  # ours: of the 14 + 28 blocks, image stream
  return c
