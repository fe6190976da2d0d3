"""Soft-Di[M]O on ImageNet 256x256 with the Halton-MaskGIT teacher: configs/maskgit_imagenet256.py
(the Di[M]O recipe) plus the GAN term on the teacher's backbone (dimo_jax/gan.py).

  python -m dimo_jax.tokenize --tokenizer checkpoints/vqgan --images /data/imagenet/train \
      --out data/imagenet256_tokens
  python -m dimo_jax.main --config configs/soft_dimo_maskgit_imagenet256.py \
      --workdir runs/soft_imagenet256

The paper (arXiv 2509.22925) gives the form of the GAN term, r_max 0.95, and for its longer
MaskBit run w_GAN 200 with lr 5e-7 and AdamW (weight decay 0.01); it does not give its MaskGIT
run's weight or learning rates. Every value marked "ours" below is our choice and has not been
measured at this size (no machine here runs it): on the toys the GAN sharpened the samples and
lost modes as the discriminator grew stronger (docs/experiments.md, "Soft-Di[M]O"), so start
with a small weight and watch recall. The reward term (the FID Inception's log-probability
of the class through the VQGAN decoder, rewards.py) is one switch away:
--config.reward.weight=0.1 with reward.inception_path and reward.class_map (the FID and IS of
such a run are then measured by the network it was trained against).
"""

from configs import maskgit_imagenet256


def get_config():
  c = maskgit_imagenet256.get_config()
  c.gan.real_tokens = "data/imagenet256_tokens"  # python -m dimo_jax.tokenize (see above)
  c.gan.weight = 1.0  # ours
  c.gan.r_max = 0.95  # the paper's
  c.gan.loss = "ns"  # ours: the paper does not state the discriminator's loss
  c.gan.layers = (0.25, 0.5, 0.75, 1.0)  # ours: heads on layers 6, 12, 18 and 24 of 24
  c.gan.lr = 1e-4  # ours
  c.gan.disc_rounds = 1  # ours
  c.reward.kind = "inception"
  c.reward.inception_path = "checkpoints/fid_inception"  # python -m dimo_jax.convert fid-inception
  c.reward.class_map = "data/inception_classes.txt"  # 1000 integers (rewards.read_class_map)
  c.reward.weight = 0.0  # off: see above
  return c
