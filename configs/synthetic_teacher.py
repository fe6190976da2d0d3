"""Pretrains a teacher on the synthetic prototype-mixture tokens (exactly scorable samples).

  python -m dimo_jax.pretrain --config configs/synthetic_teacher.py --workdir runs/synthetic

The recipe of configs/digits_teacher.py on 16-token sequences over 16 codes. Its 2000 steps learn
mixtures of up to six modes per class; with seven or eight the loss is still falling and the
teacher is weak (22% of 8-step samples in a mode), and 6000 steps make it sound (91%):
`benchmarks/synthetic.py --teacher_steps 6000` or `--config.num_steps=6000` (docs/experiments.md).
"""

import ml_collections

from configs import digits_teacher


def synthetic_spec() -> ml_collections.ConfigDict:
  """10 classes x 4 modes of 16 tokens over 16 codes, 10% of positions resampled uniformly."""
  return ml_collections.ConfigDict(dict(
      num_classes=10, modes_per_class=4, seq_len=16, codebook_size=16, corruption=0.1, seed=0))


def get_config(spec: ml_collections.ConfigDict = None):
  """`spec`: the mixture (default `synthetic_spec()`); the model is sized to it."""
  spec = synthetic_spec() if spec is None else spec
  c = digits_teacher.get_config()
  c.dataset = "synthetic"
  c.synthetic = spec
  c.model.update(codebook_size=spec.codebook_size, num_classes=spec.num_classes,
                 seq_len=spec.seq_len)
  c.batch_size = 128
  c.num_steps = 2000
  c.log_every = 250
  return c
