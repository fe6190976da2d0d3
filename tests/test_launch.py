"""The launch scripts, in their dry-run mode, and the rule that decides who is distributed."""

import os
import shlex
import subprocess

import pytest

from dimo_jax import distributed

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = ["-m", "dimo_jax.main", "--config", "configs/x.py", "--workdir", "gs://b/run",
         "--config.lr=1e-5"]


def dry_run(script: str, env: dict, *args: str) -> subprocess.CompletedProcess:
  """Runs launch/`script` with DRY_RUN=1 in an environment holding only `env` and PATH."""
  env = {"PATH": os.environ["PATH"], "HOME": "/home/u", "DRY_RUN": "1", **env}
  return subprocess.run([os.path.join(REPO, "launch", script), *args], env=env,
                        capture_output=True, text=True, timeout=30)


TPU = dict(TPU_NAME="pod", ZONE="us-central2-b", CONFIG="configs/x.py", WORKDIR="gs://b/run")


def test_tpu_pod_runs_main_on_every_worker():
  setup = "pip install -e .[tpu] -c constraints.txt"
  out = dry_run("tpu_pod.sh", dict(TPU, PROJECT="proj", SETUP=setup),
                "--config.lr=1e-5")
  assert out.returncode == 0, out.stderr
  argv = shlex.split(out.stdout)
  assert argv[:-2] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod", "--zone",
                       "us-central2-b", "--project", "proj", "--worker=all"]
  assert argv[-2] == "--command"
  remote = argv[-1].split(" && ")
  assert remote[:2] == ["cd ~/dimo_jax", "pip install -e .[tpu] -c constraints.txt"]
  assert shlex.split(remote[2]) == ["python3"] + TRAIN


def test_tpu_pod_defaults_leave_out_project_and_setup():
  out = dry_run("tpu_pod.sh", dict(TPU, REPO_DIR="/srv/dimo", PYTHON="/venv/bin/python"))
  assert out.returncode == 0, out.stderr
  argv = shlex.split(out.stdout)
  assert "--project" not in argv
  assert argv[-1] == ("cd /srv/dimo && /venv/bin/python -m dimo_jax.main --config configs/x.py "
                      "--workdir gs://b/run")


@pytest.mark.parametrize("name", sorted(TPU))
def test_tpu_pod_names_a_missing_variable(name):
  out = dry_run("tpu_pod.sh", {k: v for k, v in TPU.items() if k != name})
  assert out.returncode != 0 and name in out.stderr and not out.stdout


@pytest.fixture
def slurm(tmp_path):
  """A SLURM allocation of two nodes, with a stand-in `scontrol` that expands the node list."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  scontrol = bin_dir / "scontrol"
  scontrol.write_text("#!/bin/sh\necho gpu-a; echo gpu-b\n")
  scontrol.chmod(0o755)
  path = f"{bin_dir}{os.pathsep}{os.environ['PATH']}"
  return dict(PATH=path, SLURM_JOB_NODELIST="gpu-[a-b]", SLURM_JOB_NUM_NODES="2",
              SLURM_JOB_ID="4100", CONFIG="configs/x.py", WORKDIR="gs://b/run")


def parse_slurm(stdout: str):
  """({exported variable: value}, srun argv) from a dry run's output."""
  lines = stdout.strip().splitlines()
  exports = dict(shlex.split(line)[1].split("=", 1) for line in lines[:-1])
  return exports, shlex.split(lines[-1])


@pytest.mark.parametrize("mode,tasks,per_node,gpus_per_task", [
    (None, 16, 8, 1), ("gpu", 16, 8, 1), ("node", 2, 1, 8)])
def test_slurm_starts_one_process_per_gpu_or_per_node(slurm, mode, tasks, per_node,
                                                      gpus_per_task):
  env = dict(slurm, GPUS_PER_NODE="8", **({"MODE": mode} if mode else {}))
  out = dry_run("slurm.sbatch", env, "--config.lr=1e-5")
  assert out.returncode == 0, out.stderr
  exports, argv = parse_slurm(out.stdout)
  assert exports == {"JAX_COORDINATOR_ADDRESS": f"gpu-a:{4100 % 4096 + 61440}",
                     "JAX_NUM_PROCESSES": str(tasks)}
  assert argv[:6] == ["srun", "--nodes=2", f"--ntasks={tasks}", f"--ntasks-per-node={per_node}",
                      f"--gpus-per-task={gpus_per_task}", "--kill-on-bad-exit=1"]
  python = argv.index("python")
  assert argv[python + 1:] == TRAIN
  # Each task takes its process id from SLURM_PROCID, then becomes the python command.
  wrapper = argv[6:python]
  assert wrapper[:2] == ["bash", "-c"] and "JAX_PROCESS_ID=\"${SLURM_PROCID}\"" in wrapper[2]
  task = subprocess.run(wrapper + ["printenv", "JAX_PROCESS_ID"], env=dict(SLURM_PROCID="5"),
                        capture_output=True, text=True)
  assert task.stdout == "5\n"


@pytest.mark.parametrize("name", ["CONFIG", "WORKDIR", "SLURM_JOB_NODELIST"])
def test_slurm_names_a_missing_variable(slurm, name):
  out = dry_run("slurm.sbatch", {k: v for k, v in slurm.items() if k != name})
  assert out.returncode != 0 and name in out.stderr and not out.stdout


def test_slurm_refuses_an_unknown_mode(slurm):
  out = dry_run("slurm.sbatch", dict(slurm, MODE="socket"))
  assert out.returncode != 0 and "MODE must be gpu or node, got socket" in out.stderr


@pytest.mark.parametrize("env,reason", [
    ({}, None),
    ({"JAX_NUM_PROCESSES": "1", "SLURM_NTASKS": "8"}, None),  # explicit wins
    ({"JAX_NUM_PROCESSES": "2"}, "JAX_NUM_PROCESSES"),
    ({"SLURM_NTASKS": "1"}, None),
    ({"SLURM_NTASKS": "4"}, "SLURM_NTASKS"),
    ({"TPU_WORKER_HOSTNAMES": "t-0"}, None),  # a single-host TPU VM
    ({"TPU_WORKER_HOSTNAMES": "t-0,t-1,t-2,t-3"}, "TPU_WORKER_HOSTNAMES"),
    ({"MEGASCALE_NUM_SLICES": "2"}, "MEGASCALE_NUM_SLICES"),
])
def test_who_is_distributed(env, reason):
  assert distributed.multi_process(env) == reason


def test_cache_dir():
  assert distributed.cache_dir({"DIMO_JAX_CACHE": "gs://b/xla"}) == "gs://b/xla"
  assert distributed.cache_dir({"DIMO_JAX_CACHE": "none"}) is None


def test_explicit_variables_must_come_together():
  with pytest.raises(ValueError, match="JAX_COORDINATOR_ADDRESS .* and JAX_PROCESS_ID"):
    distributed.initialize({"JAX_NUM_PROCESSES": "2", "DIMO_JAX_CACHE": "none"})
