"""Two JAX processes on localhost train together and end where one process ends.

Each process is `python -m dimo_jax.main` with 2 simulated CPU devices, joined through
JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID (dimo_jax/distributed.py) and gloo
collectives: a 4-device mesh over two processes. They stop after 2 steps, checkpoint from both
processes into one workdir, and resume to step 4; the result must match one process with one
device and the same global batch. Sample grids and the final evaluation sample with the batch
split over both processes: the metrics must match too.
"""

import json
import os
import socket
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
import pytest

from dimo_jax import checkpoints, train
from tests.test_train import restore_latest, tiny_config, tiny_teacher

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The run both sides make: global batch 8, checkpoints and a one-step grid every 2 steps, a
# final evaluation on 16 samples in batches of 8 (2 per device).
OVERRIDES = dict(train_batch_size=8, max_train_steps=4, lr_warmup_steps=2, log_every=1,
                 validation_steps=2, validation_metrics=False, checkpointing_steps=2,
                 final_eval=True, eval_samples=16, eval_batch_size=8)


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


# Gloo sets up a group the first time the processes run a collective together and waits only
# 30 s (not configurable) for the slower one; on a loaded 2-core machine one process can trail
# the other's compile by that much. That is the machine, not the code: such a run is retried.
_GLOO_TIMEOUT = "Gloo context initialization failed"


def read(log) -> str:
  log.seek(0)
  return log.read()


def wait_all(procs, logs, timeout: float):
  """The outputs of `procs` (written to the files `logs`).

  Once one fails, or reports the gloo timeout, or time is up, the others are killed:
  a failing process otherwise waits in JAX's shutdown barrier for its peers, for minutes.
  """
  deadline = time.monotonic() + timeout
  while any(p.poll() is None for p in procs):
    if (time.monotonic() > deadline or any(p.poll() for p in procs)
        or any(_GLOO_TIMEOUT in read(log) for log in logs)):
      for p in procs:
        if p.poll() is None:
          p.kill()
    time.sleep(0.2)
  outputs = [read(log) for log in logs]
  for log in logs:
    log.close()
  return outputs


def run_two_processes(teacher_path: str, workdir: str, attempts: int = 2, **overrides) -> None:
  """Runs `python -m dimo_jax.main` as processes 0 and 1 of one run, on 2 CPU devices each."""
  flags = [f"--config.{k}={v}" for k, v in {**OVERRIDES, **overrides,
                                             "teacher_path": teacher_path}.items()]
  cmd = [sys.executable, "-m", "dimo_jax.main", "--config",
         os.path.join(REPO, "configs", "digits.py"), "--workdir", workdir] + flags
  for attempt in range(attempts):
    port = free_port()
    procs, logs = [], []
    for rank in range(2):
      env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
                 JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(rank),
                 XLA_FLAGS="--xla_force_host_platform_device_count=2")
      # A file, not a pipe: orbax logs enough to fill a pipe nobody reads until the end.
      logs.append(tempfile.TemporaryFile("w+"))
      procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=logs[-1],
                                    stderr=subprocess.STDOUT))
    outputs = wait_all(procs, logs, timeout=420)
    failed = any(p.returncode for p in procs)
    if not (failed and attempt + 1 < attempts and any(_GLOO_TIMEOUT in o for o in outputs)):
      break
  report = "\n".join(f"process {rank} (exit {p.returncode}):\n{out[-3000:]}"
                     for rank, (p, out) in enumerate(zip(procs, outputs)))
  for rank, (p, out) in enumerate(zip(procs, outputs)):
    assert p.returncode == 0, report
    assert f"process {rank} of 2" in out, out[-4000:]  # it joined the other one


@pytest.fixture(scope="module")
def teacher_path(tmp_path_factory):
  return tiny_teacher(str(tmp_path_factory.mktemp("teacher") / "digits"))


def test_two_processes_with_a_resume_match_one(teacher_path, tmp_path):
  together, alone = str(tmp_path / "together"), str(tmp_path / "alone")
  run_two_processes(teacher_path, together, max_train_steps=2, final_eval=False)
  run_two_processes(teacher_path, together, max_train_steps=4)  # resumes at step 2
  config = tiny_config(teacher_path, **OVERRIDES)
  # configs/digits.py's recipe: x_init's codes from the teacher, and the data anchor, whose real
  # rows each process draws from the whole in-memory dataset, as one process does.
  assert config.init_codes == "teacher" and config.anchor.weight > 0
  metrics_alone = train.train_and_evaluate(config, alone)

  for name in ("samples/ema_step000002.png", "samples/ema_step000004.png",
               "samples/comparison.png"):
    assert os.path.isfile(os.path.join(together, name)), name
  with open(os.path.join(together, "metrics.json")) as f:
    metrics_together = json.load(f)
  assert sorted(metrics_together) == sorted(metrics_alone)
  for run, values in metrics_alone.items():
    for key in ("fd", "accuracy"):
      assert metrics_together[run][key] == pytest.approx(values[key], abs=1e-4), (run, key)

  step_a, a = restore_latest(together, config, teacher_path)
  step_b, b = restore_latest(alone, config, teacher_path)
  assert step_a == step_b == 4
  assert checkpoints.manager(together, config).all_steps() == [2, 4]
  leaves_a, leaves_b = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
  assert len(leaves_a) == len(leaves_b)
  # Equal up to the order of the float sums across processes, which Adam's normalization can
  # raise to ~1e-5 on a parameter whose gradient is near 0 (measured: 1.1e-5 on 1 of 48 values
  # of one leaf, the rest within 1e-7). Real rows drawn from each process's share instead of
  # the whole toy gave differences up to 2.9e-4 on most values of a leaf.
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=3e-5)
