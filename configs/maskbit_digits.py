"""Di[M]O on a MaskBit-kind teacher: the digits in MaskBit's bit layout, minutes on a CPU.

  python -m dimo_jax.pretrain --config configs/maskbit_digits_teacher.py \
      --workdir runs/maskbit_digits_teacher
  python -m dimo_jax.main --config configs/maskbit_digits.py --workdir runs/maskbit_digits

The Di[M]O digits recipe (configs/digits_dimo.py) on 128 sub-tokens of 8 codes (64 pixels x 2
splits of 3 bits). The teacher samples with MaskBit's decode rule (`sampling.maskbit_sample`):
the 128 sub-tokens masked jointly, without guidance as the digits teacher, and Gumbel
confidence noise r_temp (1 - progress).
"""

from configs import digits_dimo


def get_config():
  c = digits_dimo.get_config()
  c.dataset = "digits_bits"
  c.teacher_path = "runs/maskbit_digits_teacher/teacher"
  c.mask_value = 8  # V = 2^3, the mask id of each sub-token
  c.guidance_annealing = "none"
  return c
