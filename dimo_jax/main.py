"""Runs Di[M]O distillation from a config file.

  python -m dimo_jax.main --config configs/digits.py --workdir runs/digits \
      [--config.max_train_steps=200 ...]

Rerunning with the same workdir resumes from its latest checkpoint. Every process of a
multi-host run (launch/tpu_pod.sh, launch/slurm.sbatch) runs this same command; see
dimo_jax/distributed.py for how a process finds the others.
"""

import json

from absl import app, flags
from ml_collections import config_flags

from dimo_jax import cli, distributed, train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, samples, logs and metrics.json.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  distributed.initialize()  # before any JAX computation, in every process
  metrics = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  print(json.dumps(metrics, indent=2))


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  cli.run(main)
