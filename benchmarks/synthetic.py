"""Di[M]O where the data distribution is known: teacher at n steps and 1 step vs generator.

  python benchmarks/synthetic.py [--workdir runs/synthetic] [--steps 2400]
      [--modes 4 --corruption 0.1 --seed 0 --tokens 16 --codes 16 --classes 10]
      [--teacher_steps 6000]
      [--set fixed_ratio=random_0.1_0.9 --set noise_emb_perturb=fix_0.1 ...]

Pretrains a teacher on the prototype mixture of that spec with configs/synthetic_teacher.py
(unless WORKDIR/<spec>/teacher already holds one), distills it with configs/synthetic.py (each
`--set key=value` overrides one of its keys), and prints exact fidelity (the true
distribution's NLL per token of the samples, lower is better; the data's own entropy is the
floor a perfect sampler reaches on average), diversity (share of the modes covered) and the
share of samples in a mode, for every sampler of the final evaluation, then the generator
against the targets: NLL <= 1.25x, coverage >= 0.97x, in-mode >= 0.8x the 8-step teacher's
(the Soft-Di[M]O issue's bar; the Di[M]O study of docs/experiments.md used 0.95x).
"""

import argparse
import ast
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import synthetic, synthetic_teacher  # noqa: E402
from dimo_jax import config_check, data, pretrain, train  # noqa: E402

TARGETS = {"true_nll": ("<=", 1.25), "mode_coverage": (">=", 0.97), "in_mode": (">=", 0.8)}


def spec_name(spec) -> str:
  return (f"c{spec.num_classes}_k{spec.modes_per_class}_l{spec.seq_len}_v{spec.codebook_size}"
          f"_eps{spec.corruption:g}_s{spec.seed}")


def teacher_recipe(spec, teacher_steps=None):
  """configs/synthetic_teacher.py for `spec` (pretrained `teacher_steps` long if given), and the
  folder of that teacher and its runs: the spec's name, with `_t<steps>` for another length."""
  config = synthetic_teacher.get_config(spec)
  name = spec_name(spec)
  if teacher_steps is not None:
    config.num_steps = teacher_steps
    name += f"_t{teacher_steps}"
  return config, name


def override(config, assignment: str) -> None:
  """Sets `key=value` on `config` (value read as a Python literal, else as a string); a dotted
  key (`gan.weight=2`) names a key of a block."""
  key, sep, text = assignment.partition("=")
  near = config_check.closest_keys(config, key) if sep else []
  if not sep or near is not None:
    hint = f" (did you mean {' or '.join(near)}?)" if near else ""
    raise SystemExit(f"error: --set {assignment}: expected KEY=VALUE with a key of "
                     f"configs/synthetic.py{hint}")
  *blocks, name = key.split(".")
  node = config
  for block in blocks:
    node = node[block]
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    value = text
  if isinstance(node[name], float) and isinstance(value, int):
    value = float(value)
  try:
    node[name] = value
  except TypeError:  # ml_collections keeps a key's type: 'abc' for a float
    raise SystemExit(f"error: --set {assignment}: {key} is a {type(node[name]).__name__}, "
                     f"found {value!r}") from None


def against_teacher(metrics, teacher: str):
  """{sampler: {metric: ratio to the teacher's}} for every generator row, and whether it meets
  TARGETS."""
  out = {}
  for name, values in metrics.items():
    if not name.startswith("generator"):
      continue
    ratios = {k: values[k] / max(metrics[teacher][k], 1e-12) for k in TARGETS}
    ok = all(ratios[k] <= bound if op == "<=" else ratios[k] >= bound
             for k, (op, bound) in TARGETS.items())
    out[name] = {**ratios, "meets_targets": ok}
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", default="runs/synthetic")
  parser.add_argument("--steps", type=int, default=None, help="Di[M]O generator updates")
  parser.add_argument("--teacher_steps", type=int, default=None,
                      help="pretrain the teacher this many steps (default: the num_steps of "
                           "configs/synthetic_teacher.py); teacher and runs go to WORKDIR/<spec>_t<N>")
  default = synthetic_teacher.synthetic_spec()
  parser.add_argument("--classes", type=int, default=default.num_classes)
  parser.add_argument("--modes", type=int, default=default.modes_per_class,
                      help="prototype sequences (modes) per class")
  parser.add_argument("--tokens", type=int, default=default.seq_len)
  parser.add_argument("--codes", type=int, default=default.codebook_size)
  parser.add_argument("--corruption", type=float, default=default.corruption)
  parser.add_argument("--seed", type=int, default=default.seed, help="the mixture's seed")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="override a key of configs/synthetic.py (repeatable)")
  args = parser.parse_args()
  for flag in ("classes", "modes", "tokens", "codes"):
    if getattr(args, flag) < 1:
      parser.error(f"--{flag} must be at least 1, found {getattr(args, flag)}")
  if not 0 <= args.corruption < 1:
    parser.error(f"--corruption must lie in [0, 1), found {args.corruption}")
  for flag in ("steps", "teacher_steps"):
    if getattr(args, flag) is not None and getattr(args, flag) < 1:
      parser.error(f"--{flag} must be at least 1, found {getattr(args, flag)}")

  spec = synthetic_teacher.synthetic_spec()
  spec.update(num_classes=args.classes, modes_per_class=args.modes, seq_len=args.tokens,
              codebook_size=args.codes, corruption=args.corruption, seed=args.seed)
  teacher_config, folder = teacher_recipe(spec, args.teacher_steps)
  root = os.path.join(args.workdir, folder)
  teacher_dir = os.path.join(root, "teacher")
  # Every override and value is checked before the minutes of teacher pretraining.
  config = synthetic.get_config(spec)
  config.teacher_path = teacher_dir
  if args.steps is not None:
    config.max_train_steps = args.steps
  for assignment in args.set:
    override(config, assignment)
  try:
    config_check.check(config, "--set")
  except config_check.ConfigError as e:
    raise SystemExit(f"error: {e}") from None
  if not os.path.isdir(teacher_dir):
    pretrain.pretrain(teacher_config, root)
  # A run's folder names what it changed, so a rerun with other settings never resumes into
  # it (train refuses that anyway: the method keys would differ from its config.json).
  run = "dimo" + "".join("_" + a.replace("=", "-") for a in args.set)
  if args.steps is not None:
    run += f"_steps-{args.steps}"
  metrics = train.train_and_evaluate(config, os.path.join(root, run))

  entropy = data.get(config).distribution.entropy_per_token()
  teacher = f"teacher_{config.sampling_step}step"
  print(f"\nsynthetic prototype mixture {folder}, {config.eval_samples} samples each; "
        f"data entropy {entropy:.3f} nats/token")
  print(f"{'sampler':<22}{'true_nll':>10}{'mode_coverage':>15}{'in_mode':>9}{'ms/image':>10}")
  for name, values in metrics.items():
    print(f"{name:<22}{values['true_nll']:>10.3f}{values['mode_coverage']:>15.3f}"
          f"{values['in_mode']:>9.3f}{values['sec_per_image'] * 1e3:>10.3f}")
  ratios = against_teacher(metrics, teacher)
  targets = ", ".join(f"{k} {op} {bound:g}x" for k, (op, bound) in TARGETS.items())
  print(f"\nagainst {teacher} (targets: {targets})")
  for name, r in ratios.items():
    print(f"{name:<22}{r['true_nll']:>10.2f}{r['mode_coverage']:>15.2f}{r['in_mode']:>9.2f}"
          f"   {'meets' if r['meets_targets'] else 'misses'}")
  print(json.dumps({"spec": spec.to_dict(), "teacher_steps": teacher_config.num_steps,
                    "overrides": args.set, "metrics": metrics,
                    "against_teacher": ratios}))


if __name__ == "__main__":
  main()
