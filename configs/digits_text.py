"""Di[M]O on the text-conditional toy: a small Meissonic-style teacher over 8x8 digits, each
image conditioned on a prompt naming its digit ("a handwritten seven", "the digit 7", ...).

  python -m dimo_jax.pretrain --config configs/digits_text_teacher.py \
      --workdir runs/digits_text_teacher
  python -m dimo_jax.main --config configs/digits_text.py --workdir runs/digits_text

The Di[M]O recipe of configs/digits_dimo.py (same learning rates, rounds, EMA, schedules) on
the text teacher: the step is fed the CLIP encodings of the prompts it draws, and `accuracy` in
metrics.json is how often the digit classifier reads the prompt's digit in a sample.
"""

from configs import digits_dimo


def get_config():
  c = digits_dimo.get_config()
  c.dataset = "digits_text"
  c.teacher_path = "runs/digits_text_teacher/teacher"
  return c
