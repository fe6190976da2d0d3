"""Process start-up: joins the other processes of a multi-host run and turns on the XLA cache.

`initialize()` runs first thing in every process (dimo_jax/main.py calls it), before any JAX
computation. It calls `jax.distributed.initialize()` when, and only when, more than one process
is meant to run. The rule, first match wins:

  1. JAX_NUM_PROCESSES is set: the explicit variables of launch/slurm.sbatch and of a hand-made
     run. JAX_COORDINATOR_ADDRESS (host:port of process 0), JAX_NUM_PROCESSES and
     JAX_PROCESS_ID are passed on as they are; more than one process means distributed.
  2. SLURM_NTASKS > 1: a SLURM job step; JAX reads SLURM's own variables.
  3. A Cloud TPU VM of a pod slice (TPU_WORKER_HOSTNAMES names more than one worker) or a
     multislice job (MEGASCALE_NUM_SLICES > 1): JAX reads the TPU metadata itself.

Anything else is one process (a workstation, one GPU box, a single-host TPU VM), and
`initialize()` leaves JAX alone. Between CPU processes the collectives go through gloo.

The persistent compilation cache lives in DIMO_JAX_CACHE if set ("none" turns it off), else
where JAX_COMPILATION_CACHE_DIR already points, else in ~/.cache/dimo_jax/xla; a `gs://` path
serves a whole TPU pod. A rerun or a resumed run then skips most of its compile time.
"""

import os
from typing import Mapping, Optional

from absl import logging
import jax


def _count(env: Mapping[str, str], name: str) -> int:
  value = env.get(name, "")
  try:
    return int(value) if value else 0
  except ValueError:
    raise ValueError(f"{name} must be an integer, got {value!r}") from None


def multi_process(env: Mapping[str, str] = os.environ) -> Optional[str]:
  """Why this process is one of several (the rule of the module docstring), or None."""
  if env.get("JAX_NUM_PROCESSES"):
    return "JAX_NUM_PROCESSES" if _count(env, "JAX_NUM_PROCESSES") > 1 else None
  if _count(env, "SLURM_NTASKS") > 1:
    return "SLURM_NTASKS"
  if len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1:
    return "TPU_WORKER_HOSTNAMES"
  if _count(env, "MEGASCALE_NUM_SLICES") > 1:
    return "MEGASCALE_NUM_SLICES"
  return None


def cache_dir(env: Mapping[str, str] = os.environ) -> Optional[str]:
  """Where the persistent compilation cache lives (None: off)."""
  path = env.get("DIMO_JAX_CACHE") or jax.config.jax_compilation_cache_dir
  if path is None:
    return os.path.join(os.path.expanduser("~"), ".cache", "dimo_jax", "xla")
  return None if path.lower() == "none" else path


def initialize(env: Mapping[str, str] = os.environ) -> None:
  """Joins a multi-process run if this is one, and turns on the compilation cache.

  Safe to call twice: a process already joined is left as it is.
  """
  path = cache_dir(env)
  if path is not None:
    jax.config.update("jax_compilation_cache_dir", path)
  reason = multi_process(env)
  if reason is None or jax.distributed.is_initialized():
    return
  explicit = reason == "JAX_NUM_PROCESSES"
  if explicit and not (env.get("JAX_COORDINATOR_ADDRESS") and env.get("JAX_PROCESS_ID")):
    raise ValueError("JAX_NUM_PROCESSES is set, so JAX_COORDINATOR_ADDRESS (host:port of "
                     "process 0) and JAX_PROCESS_ID must be too; found "
                     f"JAX_COORDINATOR_ADDRESS={env.get('JAX_COORDINATOR_ADDRESS')!r}, "
                     f"JAX_PROCESS_ID={env.get('JAX_PROCESS_ID')!r}")
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if explicit:
    jax.distributed.initialize(env["JAX_COORDINATOR_ADDRESS"],
                               num_processes=_count(env, "JAX_NUM_PROCESSES"),
                               process_id=_count(env, "JAX_PROCESS_ID"))
  else:
    jax.distributed.initialize()
  logging.info("process %d of %d (%s), %d local devices of %d", jax.process_index(),
               jax.process_count(), reason, jax.local_device_count(), jax.device_count())


def barrier(name: str, timeout_s: int = 3600) -> None:
  """Waits until every process reaches the barrier `name` (a no-op with one process).

  It is the coordination service's barrier, not a collective over devices, so it may wait as
  long as `timeout_s`. Collectives cannot: gloo gives a process group's first collective 30 s
  for every member to arrive, less than two processes' compile times can differ on a loaded
  machine.
  """
  if jax.process_count() == 1:
    return
  from orbax.checkpoint import multihost
  multihost.sync_global_processes(name, timeout=timeout_s,
                                  processes=set(range(jax.process_count())))


def compile_together(fn, *args, name: str):
  """`fn` (a jitted function) compiled for `args`; with several processes, returned only once
  every process has compiled it, so that its first collective finds them all there."""
  if jax.process_count() == 1:
    return fn
  compiled = fn.lower(*args).compile()
  barrier(f"dimo_jax/compiled/{name}")
  return compiled
