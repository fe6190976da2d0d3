"""A run's checkpoints: the orbax manager of WORKDIR/checkpoints, finding a step, reading one
generator's parameters out of it, the JSON records written beside them, and the checksums of
every saved step (a step whose files no longer match them is refused by name, as a truncated
one is)."""

import contextlib
import hashlib
import json
import logging
import os
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

import jax
import ml_collections
import orbax.checkpoint as ocp

from dimo_jax import modeldir
from dimo_jax.errors import UserError
from dimo_jax.teachers import Teacher

# --params -> the field of distill.DistillState that holds those parameters.
STATE_FIELDS = {"ema": "ema_params", "generator": "gen_params"}


class GeneratorError(UserError):
  """A Di[M]O checkpoint (--generator, evaluate's --checkpoint) that cannot be sampled: its step
  cannot be read, or its generator was distilled from another teacher."""


def manager(workdir: str, config: ml_collections.ConfigDict) -> ocp.CheckpointManager:
  """The manager of WORKDIR/checkpoints: a step every `checkpointing_steps`, the last
  `checkpoints_total_limit` kept."""
  options = ocp.CheckpointManagerOptions(
      max_to_keep=config.checkpoints_total_limit,
      save_interval_steps=config.checkpointing_steps, create=True)
  return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")),
                               options=options)


def write_json(path: str, obj: Any) -> None:
  """Writes `obj` as JSON through a temporary file, so `path` is never half-written.

  Only process 0 writes: every process of a multi-process run shares the workdir.
  """
  if jax.process_index() > 0:
    return
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


CHECKSUMS = "dimo_jax_checksums.json"  # in each step folder: {relative path: blake2b hex}


def file_digests(step_dir: str) -> Dict[str, str]:
  """{path relative to `step_dir`: blake2b hex digest} of every file below it (the checksum
  record itself excepted)."""
  out = {}
  for root, _, names in os.walk(step_dir):
    for name in names:
      path = os.path.join(root, name)
      rel = os.path.relpath(path, step_dir)
      if rel == CHECKSUMS:
        continue
      digest = hashlib.blake2b(digest_size=16)
      with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
          digest.update(chunk)
      out[rel] = digest.hexdigest()
  return out


def record_checksums(step_dir: str) -> None:
  """Writes the checksums of a finished step's files beside them (process 0; the step is
  complete on the shared disk once the manager has finished saving it)."""
  if os.path.isdir(step_dir):
    write_json(os.path.join(step_dir, CHECKSUMS), file_digests(step_dir))


def damaged_files(step_dir: str) -> Optional[List[str]]:
  """The files of `step_dir` that differ from, or are missing against, its checksum record;
  None when the step has no record (a run killed between saving and recording, or one of
  before the records)."""
  path = os.path.join(step_dir, CHECKSUMS)
  if not os.path.isfile(path):
    return None
  try:
    recorded = modeldir.read_json(path, "a checkpoint's checksum record", GeneratorError)
  except GeneratorError:  # the record itself was damaged with the step
    return [CHECKSUMS]
  found = file_digests(step_dir)
  return sorted(rel for rel, digest in recorded.items() if found.get(rel) != digest)


def checksum_error(step_dir: str) -> Optional[str]:
  """Why `step_dir` is damaged, in a few words naming its first changed file; None if not."""
  damaged = damaged_files(step_dir)
  if not damaged:
    return None
  more = f" and {len(damaged) - 1} more" if len(damaged) > 1 else ""
  return (f"{damaged[0]}{more} no longer match the checksums recorded when the step was "
          "saved")


class SaveError(UserError):
  """A checkpoint that could not be saved for the disk's sake (full, read-only)."""


class ChecksumRecorder:
  """Saves a training loop's steps and records the checksums of each once its save has
  finished: before the next save starts (orbax would wait for the previous one there anyway)
  and at the end (`finish`), so saving stays asynchronous. A save that fails on a full or
  read-only disk raises one `SaveError` naming the step and the step to resume from."""

  def __init__(self, manager: ocp.CheckpointManager):
    self.manager, self.pending = manager, []
    # Orbax's writer threads log a failed save (with tracebacks) after `save` has returned;
    # its exception, raised when the save is waited for, says it once.
    self._quiet = modeldir.DropOrbaxErrors()
    logging.getLogger("absl").addFilter(self._quiet)
    self._hook = sys.unraisablehook
    sys.unraisablehook = modeldir.closed_loop_filter(self._hook)

  def all_steps(self) -> Sequence[int]:
    return self.manager.all_steps()

  def save(self, step: int, *args, **kwargs) -> None:
    self.flush()
    with self._disk(step):
      self.manager.save(step, *args, **kwargs)
    self.pending.append(step)

  def flush(self) -> None:
    if self.pending:
      with self._disk(self.pending[-1]):
        self.manager.wait_until_finished()
        for step in self.pending:
          record_checksums(os.path.join(str(self.manager.directory), str(step)))
      self.pending = []

  def finish(self) -> None:
    try:
      with self._disk(self.pending[-1] if self.pending else None):
        self.manager.wait_until_finished()
      self.flush()
      sys.unraisablehook = self._hook  # (a failed save leaves it: its callbacks come late)
    finally:
      logging.getLogger("absl").removeFilter(self._quiet)

  @contextlib.contextmanager
  def _disk(self, step: Optional[int]):
    try:
      with modeldir.quiet_failed_writes():
        yield
    except (OSError, ValueError) as e:
      problem = modeldir.disk_problem(e)
      if problem is None:
        raise
      self.pending = []
      saved = [s for s in self.manager.all_steps() if step is None or s < step]
      resume = (f"it resumes from step {max(saved)}" if saved else "it starts over")
      raise SaveError(f"{self.manager.directory}: cannot save checkpoint step {step} "
                      f"({problem}); free space (or make the folder writable) and rerun the "
                      f"same command: {resume}") from None


def find_checkpoint(path: str, flag: str = "--generator") -> Tuple[str, int]:
  """(checkpoints directory, step) for a workdir, its checkpoints/ or a checkpoints/<step>;
  `flag` names the path in errors."""
  path = os.path.abspath(path)
  if os.path.isfile(path):
    raise GeneratorError(f"{flag}: {path} is a file; expected a Di[M]O workdir, its "
                         "checkpoints/ or a checkpoints/<step> folder (a released .pth is "
                         "converted with python -m dimo_jax.convert, then given as --teacher)")
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{flag}: {path} does not exist")
  candidates = [(os.path.join(path, "checkpoints"), None), (path, None)]
  if os.path.basename(path).isdigit():
    candidates.append((os.path.dirname(path), int(os.path.basename(path))))
  for root, step in candidates:
    if not os.path.isfile(os.path.join(root, "config.json")):
      continue
    steps = ocp.CheckpointManager(root).all_steps()
    if step is None and steps:
      step = max(steps)
    if step in steps:
      return root, step
  raise FileNotFoundError(
      f"{flag}: {path} is not a Di[M]O workdir, its checkpoints/ or a checkpoints/<step> "
      "(expected checkpoints/config.json next to saved steps)")


def _run_config(root: str) -> ml_collections.ConfigDict:
  """checkpoints/config.json: the config of the run that saved the steps."""
  return ml_collections.ConfigDict(modeldir.read_json(
      os.path.join(root, "config.json"), "the JSON object of the run's config", GeneratorError))


def _unreadable(root: str, step: int, steps: Sequence[int], flag: str, why: str) -> GeneratorError:
  """The error of a step that cannot be read: delete it, or pick one of the others."""
  others = sorted(s for s in steps if s != step)
  pick = (f"delete that folder or pick another step ({', '.join(map(str, others))}: "
          f"{flag} {root}/<step>)" if others else "delete that folder (no other step is saved)")
  return GeneratorError(f"{os.path.join(root, str(step))}: the checkpoint step cannot be read "
                        f"({why}); it is incomplete or damaged (a run killed while saving?): "
                        f"{pick}")


def load_generator(path: str, teacher: Teacher, which: str, flag: str = "--generator",
                   teacher_dir: str = ""):
  """(params, run config, step) of the Di[M]O checkpoint at `path`.

  Args:
    path: see `find_checkpoint`.
    teacher: the teacher (its variables are not read): its module's parameter tree is the
      generator's.
    which: 'ema' or 'generator' (the raw parameters).
    flag, teacher_dir: the flag that gave `path` and the teacher's directory, named in errors.

  Raises `GeneratorError` when the step cannot be read, or when its parameters have other
  paths or shapes than the teacher's (a generator distilled from another teacher).
  """
  root, step = find_checkpoint(path, flag)
  config = _run_config(root)
  abstract = jax.eval_shape(teacher.init_variables)
  field = STATE_FIELDS[which]
  manager = ocp.CheckpointManager(root, item_handlers=ocp.PyTreeCheckpointHandler())
  step_dir = os.path.join(root, str(step))
  damage = checksum_error(step_dir)  # first: damaged metadata would give a vaguer reason
  if damage:
    raise _unreadable(root, step, manager.all_steps(), flag, damage)
  try:
    stored = manager.item_metadata(step)
  except modeldir.READ_ERRORS as e:
    raise _unreadable(root, step, manager.all_steps(), flag, modeldir.first_line(e)) from e
  stored = getattr(stored, "tree", stored)
  if not isinstance(stored, dict) or field not in stored:
    found = sorted(stored) if isinstance(stored, dict) else "no parameter tree"
    raise _unreadable(root, step, manager.all_steps(), flag,
                      f"expected a Di[M]O state holding {field}, found {found}")
  described_by = (modeldir.description_path(teacher_dir) if teacher_dir
                  else "the teacher's model.json")
  difference = modeldir.shape_difference(abstract, stored[field], described_by,
                                         f"{flag} {step_dir}")
  if difference:
    run_teacher = config.get("teacher_path")
    raise GeneratorError(f"{difference}: the generator was distilled from another teacher; give "
                         + (f"its run's teacher ({run_teacher})" if run_teacher else "that one"))
  # Only the one parameter tree is read, not the optimizer states and the other networks.
  item = {field: abstract}
  try:
    with modeldir.quiet_failed_reads():
      restored = manager.restore(step, args=ocp.args.PyTreeRestore(
          item=item, partial_restore=True,
          restore_args=ocp.checkpoint_utils.construct_restore_args(item)))
  except modeldir.READ_ERRORS as e:
    raise _unreadable(root, step, manager.all_steps(), flag, modeldir.first_line(e)) from e
  return jax.device_put(restored[field]), config, step


