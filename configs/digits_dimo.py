"""Di[M]O alone on the bundled digits teacher: configs/digits.py without our diversity recipe.

  python -m dimo_jax.main --config configs/digits_dimo.py --workdir runs/digits_dimo

x_init as the reference draws it (60% masked, uniform codes) and no data anchor; every other
value is configs/digits.py's. The text and MaskBit toys start from it: their teachers were
measured with it (a text teacher has no per-class code table, and the anchor on prompts needs
`gan.real_tokens`).
"""

from configs import digits


def get_config():
  c = digits.get_config()
  c.fixed_ratio = "fix_0.6"  # the reference's r_init
  c.init_codes = "uniform"
  c.anchor.weight = 0.0
  return c
