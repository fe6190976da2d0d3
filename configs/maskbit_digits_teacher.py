"""Pretrains a MaskBit-kind teacher (LFQBert) on the digits in MaskBit's bit layout (CPU).

  python -m dimo_jax.pretrain --config configs/maskbit_digits_teacher.py \
      --workdir runs/maskbit_digits_teacher

Each pixel's grey level (0..16) is an index of 6 bits in 2 sub-tokens of 3 bits
(`data.DigitBits`): 64 positions x 2 splits = 128 sub-tokens of 8 codes, the layout the
release's 14-bit generator has at 256 positions x 2 splits of 7 bits. The recipe is the bundled
digits teacher's (configs/digits_teacher.py) at the same width.
"""

from configs import digits_teacher


def get_config():
  c = digits_teacher.get_config()
  c.dataset = "digits_bits"
  c.model = dict(codebook_bits=6, codebook_splits=2, num_positions=64, num_classes=10,
                 hidden_dim=64, depth=3, num_heads=4, mlp_dim=256, dropout=0.1)
  c.num_steps = 4000
  return c
