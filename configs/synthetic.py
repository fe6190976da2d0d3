"""Di[M]O on the synthetic prototype mixture, where fidelity and diversity are exact.

  python benchmarks/synthetic.py        # pretrains the teacher, distills, prints the table

The distillation settings are those of configs/digits.py; the teacher comes from
configs/synthetic_teacher.py.
"""

from configs import digits, synthetic_teacher


def get_config():
  c = digits.get_config()
  c.dataset = "synthetic"
  c.synthetic = synthetic_teacher.synthetic_spec()
  c.teacher_path = "runs/synthetic/teacher"
  c.mask_value = c.synthetic.codebook_size
  return c
