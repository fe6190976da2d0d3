"""Di[M]O where the data distribution is known: teacher at n steps and 1 step vs generator.

  python benchmarks/synthetic.py [--workdir runs/synthetic] [--steps 600]

Pretrains a teacher on the prototype mixture of configs/synthetic_teacher.py (unless WORKDIR
already holds one), distills it with configs/synthetic.py, and prints exact fidelity (the true
distribution's NLL per token of the samples, lower is better; the data's own entropy is the
floor a perfect sampler reaches on average) and diversity (share of the 40 modes covered).
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import synthetic, synthetic_teacher  # noqa: E402
from dimo_jax import data, pretrain, train  # noqa: E402


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", default="runs/synthetic")
  parser.add_argument("--steps", type=int, default=None, help="Di[M]O generator updates")
  args = parser.parse_args()

  teacher_dir = os.path.join(args.workdir, "teacher")
  if not os.path.isdir(teacher_dir):
    pretrain.pretrain(synthetic_teacher.get_config(), args.workdir)
  config = synthetic.get_config()
  config.teacher_path = teacher_dir
  if args.steps is not None:
    config.max_train_steps = args.steps
  metrics = train.train_and_evaluate(config, os.path.join(args.workdir, "dimo"))

  entropy = data.get(config).distribution.entropy_per_token()
  print(f"\nsynthetic prototype mixture, {config.eval_samples} samples each; "
        f"data entropy {entropy:.3f} nats/token")
  print(f"{'sampler':<16}{'true_nll':>10}{'mode_coverage':>15}{'in_mode':>9}{'ms/image':>10}")
  for name, values in metrics.items():
    print(f"{name:<16}{values['true_nll']:>10.3f}{values['mode_coverage']:>15.3f}"
          f"{values['in_mode']:>9.3f}{values['sec_per_image'] * 1e3:>10.3f}")
  print(json.dumps(metrics))


if __name__ == "__main__":
  main()
