"""The story of a Di[M]O run: mesh, teacher, state, jitted step, loop, checkpoints, evaluation.

`train_and_evaluate(config, workdir)` is what `python -m dimo_jax.main` calls. A workdir holds

  checkpoints/<step>/   orbax checkpoints of the whole `DistillState` (resumed on rerun)
  checkpoints/config.json  the config of the run that wrote them
  samples/              one-step sample grids every `validation_steps`, and `comparison.png`
  metrics.json          teacher at `sampling_step` steps, teacher at 1 step, generator at 1 step
  events.out.tfevents.* TensorBoard scalars and images (clu metric writers)
"""

import dataclasses
import functools
import json
import os
import time
from typing import Any, Callable, Dict, Optional

from absl import logging
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from tqdm.auto import tqdm

from dimo_jax import (checkpoints, config_check, data, defaults, distill, distributed, dtypes,
                      evaluators, metrics, modeldir, outputs, parallel, rewards, samplers,
                      teachers, visualize, writers)
from dimo_jax.errors import UserError


def global_batch_size(config: ml_collections.ConfigDict, batch_devices: int) -> int:
  """The step's batch: `train_batch_size`, or `per_device_batch` x `batch_devices` when set.

  A config gives one of the two (the other -1 or absent), so a per-device recipe such as
  configs/maskgit_imagenet256.py scales with the mesh it runs on.

  `batch_devices` is every device of the mesh (`parallel.batch_devices`): with FSDP the
  `fsdp` axis carries batch slices too.
  """
  per_device = config.get("per_device_batch", -1)
  if per_device is None or per_device <= 0:
    if config.train_batch_size % batch_devices:
      raise config_check.ConfigError(
          f"train_batch_size {config.train_batch_size} does not split over the {batch_devices} "
          f"devices of the mesh; give a multiple of {batch_devices} (or per_device_batch)")
    return config.train_batch_size
  if config.train_batch_size not in (-1, per_device * batch_devices):
    raise config_check.ConfigError(
        f"per_device_batch {per_device} on {batch_devices} devices and train_batch_size "
        f"{config.train_batch_size} disagree; set one of them to -1")
  return per_device * batch_devices


def grid_classes(config: ml_collections.ConfigDict, num_classes: int) -> np.ndarray:
  """int32[R]: the classes the sample grids show, `config.grid_classes` or all of them."""
  classes = config.get("grid_classes")
  return np.asarray(range(num_classes) if classes is None else classes, np.int32)


def class_rows(dataset, codes: np.ndarray, labels: np.ndarray, per_class: int,
               classes: np.ndarray) -> np.ndarray:
  """A grid with up to `per_class` samples of classes[r] in row r: uint8[H, W, 3].

  Every row shows as many samples as the rarest of `classes` has among `labels`.
  """
  per_class = min([per_class] + [int(np.sum(labels == c)) for c in classes])
  rows = [codes[labels == c][:per_class] for c in classes]
  # image_grid fills columns first, so interleave the classes.
  ordered = np.stack(rows, axis=1).reshape(-1, codes.shape[-1])
  return visualize.image_grid(dataset.images(ordered), rows=len(classes))


def eval_labels(config: ml_collections.ConfigDict, num_classes: int) -> np.ndarray:
  """int32[eval_samples]: every class in turn, the same count of each (up to one)."""
  return (np.arange(config.eval_samples) % num_classes).astype(np.int32)


def evaluate(config: ml_collections.ConfigDict, teacher: teachers.Teacher, mesh, gen_params,
             step: int, workdir: str, dataset, score: metrics.Scorer,
             init_logits: Optional[np.ndarray] = None) -> Dict[str, Dict[str, float]]:
  """Samples the teacher (at `sampling_step` and 1 step) and the generator on the same labels.

  Writes samples/comparison.png and returns {"teacher_<n>step"|"teacher_1step"|
  "generator_1step": {<the dataset's metrics>, "sec_per_image"}}, each the mean over
  `eval_seeds` sampling seeds (eval_seed, eval_seed + 1, ...) with its `<metric>_std` and
  `seeds` (`metrics.over_seeds`): fd and accuracy on digits,
  true_nll, mode_coverage and in_mode on the synthetic set, none yet on ImageNet. With
  `eval_gen_temps`, also "generator_1step_T<t>" for each temperature t (same labels and key).
  `python -m dimo_jax.evaluate` with the same seed (`eval_seed`) and batch draws the same codes.
  `init_logits`: x_init's code logits under `init_codes='teacher'` (default: computed from the
  teacher).
  """
  labels = eval_labels(config, dataset.num_classes)
  classes = grid_classes(config, dataset.num_classes)
  seed = samplers.eval_seed(config)
  runs = {f"teacher_{config.sampling_step}step":
              samplers.run_teacher(config, teacher, config.sampling_step),
          "teacher_1step": samplers.run_teacher(config, teacher, 1),
          "generator_1step": samplers.generator(teacher, gen_params, config, step,
                                                init_logits=init_logits)}
  for temp in config.eval_gen_temps:
    runs[gen_temp_name(temp)] = samplers.generator(teacher, gen_params, config, step, temp,
                                                   init_logits=init_logits)
  if config.tteo.steps > 0:
    tteo = (config.tteo.steps, config.tteo.lr,
            rewards.make_reward(config, dataset, teacher=teacher))
    runs[f"generator_1step_tteo{config.tteo.steps}"] = samplers.generator(
        teacher, gen_params, config, step, tteo=tteo, init_logits=init_logits)
  results, panels = {}, {}
  seeds = config.get("eval_seeds", 1)
  progress = tqdm(total=len(runs) * seeds, desc="final evaluation", unit="sampler-seed",
                  mininterval=2.0, disable=jax.process_index() > 0)
  for name, sampler in runs.items():
    run = samplers.MeshSampler(sampler, mesh, config.eval_batch_size, dataset.condition)
    per_seed = []
    for offset in range(seeds):
      progress.set_postfix(sampler=name, seed=seed + offset)
      codes, seconds = samplers.timed(lambda: run(labels, seed + offset))
      progress.update(1)
      per_seed.append({**score(codes, labels), "sec_per_image": seconds / len(labels)})
      if offset == 0 and not name.startswith("generator_1step_T"):  # one panel is enough
        panels[name.replace("_", " ")] = class_rows(dataset, codes, labels, 10, classes)
    results[name] = metrics.over_seeds(per_seed)
    logging.info("%s: %s", name, results[name])
  progress.close()
  if jax.process_index() == 0:
    visualize.side_by_side(panels, os.path.join(workdir, "samples", "comparison.png"))
  return results


def gen_temp_name(temp: float) -> str:
  """The metrics key of the one-step generator sampled at temperature `temp`."""
  return f"generator_1step_T{float(temp):g}"


class RunError(UserError):
  """A workdir that cannot be (re)started as asked: a changed config, a broken checkpoint, a
  run already using it, training that only skips."""


# Keys a resumed run may change freely: how long it runs, what it logs, saves and evaluates, and
# on which devices. Every other key (the method, the shapes, the teacher, the optimizers, the
# seed) must equal the one in checkpoints/config.json unless `allow_config_change`.
RESUME_FREE_KEYS = frozenset({
    "max_train_steps", "log_every", "validation_steps", "validation_metrics",
    "checkpointing_steps", "checkpoints_total_limit", "final_eval", "eval_samples",
    "eval_batch_size", "eval_gen_temps", "eval_params", "eval_seeds", "sampling_step",
    "sched_mode", "cfg_w", "r_temp", "sm_temp", "grid_classes", "num_devices", "mesh",
    "max_consecutive_skips", "allow_config_change", "gradient_checkpointing", "prompt_cache",
    "tteo", "guidance_annealing", "scale_pow", "writers", "profile_steps", "evals"})


# Keys added after runs were written, each with the value that does what those runs did: a saved
# config without one reads as having that value (the Soft-Di[M]O blocks' defaults: Di[M]O alone).
ADDED_KEYS = {"attention_impl": "auto", "teacher_fingerprint": None,
              "guidance_annealing": "none", "scale_pow": 3.0,
              "writers": ["tensorboard"], "profile_steps": 0, "gradient_accumulation_steps": 1,
              "init_codes": "uniform",
              **{f"{block}.{key}": value
                 for block in ("gan", "reward", "diversity", "anchor", "tteo")
                 for key, value in defaults.reference_config()[block].items()}}


def _flat(tree: Any, prefix: str = "") -> Dict[str, Any]:
  if isinstance(tree, dict):
    out = {}
    for key, value in tree.items():
      out.update(_flat(value, f"{prefix}{key}."))
    return out
  return {prefix[:-1]: tree}


def config_changes(saved: Dict[str, Any], new: Dict[str, Any]) -> Dict[str, Any]:
  """{dotted key: (saved value, new value)} for the keys outside RESUME_FREE_KEYS that differ
  (a key only one of them has counts, with None on the other side)."""
  saved, new = {**ADDED_KEYS, **_flat(saved)}, {**ADDED_KEYS, **_flat(new)}
  changed = {}
  # The teacher is compared by its contents (`teacher_fingerprint`), so that the same teacher
  # given by another spelling of its path, or from another working directory, resumes, and
  # another teacher at the same path does not. A record written before fingerprints compares
  # the resolved paths.
  identity = ("teacher_path",) if saved.get("teacher_fingerprint") else ("teacher_fingerprint",)
  if not saved.get("teacher_fingerprint"):
    resolve = lambda p: os.path.realpath(p) if isinstance(p, str) else p
    saved["teacher_path"] = resolve(saved.get("teacher_path"))
    new["teacher_path"] = resolve(new.get("teacher_path"))
  for key in sorted(set(saved) | set(new)):
    if key.split(".")[0] in RESUME_FREE_KEYS or key in identity:
      continue
    a, b = saved.get(key), new.get(key)
    if isinstance(a, list):  # JSON writes tuples as lists
      a = tuple(a)
    if isinstance(b, list):
      b = tuple(b)
    if a != b:
      changed[key] = (saved.get(key), new.get(key))
  if "teacher_fingerprint" in changed and saved.get("teacher_path") != new.get("teacher_path"):
    changed["teacher_path"] = (saved.get("teacher_path"), new.get("teacher_path"))
  return changed


def check_workdir(workdir: str) -> None:
  """Refuses a workdir that is a file, or lies where this user cannot write (a read-only
  mount), before anything is loaded or compiled."""
  outputs.check_writable_folder(workdir, f"--workdir {workdir}", RunError)


def check_resume(config: ml_collections.ConfigDict, workdir: str) -> Optional[Dict[str, Any]]:
  """Refuses to resume the run in `workdir` with a config whose method keys differ from the one
  that wrote its checkpoints; returns the saved config (None for a new run)."""
  path = os.path.join(workdir, "checkpoints", "config.json")
  folder = os.path.dirname(path)
  steps = (sorted(int(n) for n in os.listdir(folder) if n.isdigit())
           if os.path.isdir(folder) else [])
  if not os.path.isfile(path):
    if steps and not config.allow_config_change:
      # Without the record nothing says which method wrote these steps: refuse rather than
      # resume them under another one.
      raise RunError(f"{folder}: holds steps {', '.join(map(str, steps))} but not config.json, "
                     "the record of the config that wrote them; put it back, start a new "
                     "--workdir, or pass --config.allow_config_change=True to resume them under "
                     "this config")
    return None
  if not steps:
    # A record without a checkpoint: the run that wrote it stopped before its first save (a
    # config that failed at the start); nothing is resumed, so nothing binds the new run.
    return None
  saved = modeldir.read_json(path, "the config of the run that wrote these checkpoints (a JSON "
                             "object)", RunError)
  changed = config_changes(saved, json.loads(config.to_json()))
  if changed and not config.allow_config_change:
    listed = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in list(changed.items())[:8])
    more = f" and {len(changed) - 8} more" if len(changed) > 8 else ""
    raise RunError(f"{path}: the checkpoints of this workdir were written with other method "
                   f"keys: {listed}{more}; resume with the saved values, start a new --workdir, "
                   "or pass --config.allow_config_change=True to change them deliberately")
  return saved


class WorkdirLock:
  """An exclusive lock on a workdir for one run (process 0 of it), released when the process
  ends however it ends (`fcntl.flock`), so two runs never write one workdir at once."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, ".lock")
    self.file = None

  def __enter__(self):
    if jax.process_index() > 0:
      return self
    import fcntl
    self.file = open(self.path, "a+")
    try:
      fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      self.file.seek(0)
      holder = self.file.read().strip() or "another process"
      self.file.close()
      self.file = None
      raise RunError(f"{os.path.dirname(self.path)}: in use by another run ({holder}); wait "
                     "for it to finish or choose another --workdir") from None
    self.file.seek(0)
    self.file.truncate()
    self.file.write(f"pid {os.getpid()} on {os.uname().nodename}, since "
                    f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    self.file.flush()
    return self

  def __exit__(self, *exc):
    if self.file is not None:
      self.file.close()  # closing releases the flock
      self.file = None


class SkipWatch:
  """Stops a run whose updates are all skipped: raises `RunError` once `limit` generator updates
  in a row (or `limit` steps whose every auxiliary round) were skipped for a non-finite loss,
  gradient or update. Reads the step's counters only every `limit` steps (no host round trip per
  step)."""

  def __init__(self, limit: int, fake_rounds: int, skipped_before, workdir: str):
    self.limit, self.rounds, self.workdir = limit, fake_rounds, workdir
    self.last = np.asarray(jax.device_get(skipped_before), np.int64)
    self.pending = []
    self.run = np.zeros(2, np.int64)  # steps in a row skipped: generator, auxiliary

  def after(self, step: int, metrics) -> None:
    """`step`: updates done; `metrics`: that step's (device) metrics."""
    if self.limit <= 0:
      return
    self.pending.append((step, metrics["skipped_generator"], metrics["skipped_fake"]))
    if len(self.pending) >= self.limit:
      self.check()

  def check(self) -> None:
    for step, gen, fake in jax.device_get(self.pending):
      now = np.array([gen, fake], np.int64)
      full = (now - self.last) >= np.array([1, self.rounds])
      self.run = np.where(full, self.run + 1, 0)
      self.last = now
      if np.any(self.run >= self.limit):
        which = "generator" if self.run[0] >= self.limit else "auxiliary"
        raise RunError(
            f"{self.workdir}: the last {self.limit} {which} updates (to step {step}) were all "
            "skipped because the loss, a gradient or the update was not finite: check the "
            "teacher's weights for NaN and the learning rates (the checkpoints keep the last "
            "finite state; max_consecutive_skips sets this limit)")
    self.pending = []


# DistillState fields as checkpoints written before psi's rename name them.
_LEGACY_FIELDS = {"fake_params": "aux_params", "fake_opt_state": "aux_opt_state"}


def initial_state(config: ml_collections.ConfigDict, teacher: teachers.Teacher, teacher_params,
                  mesh, manager: ocp.CheckpointManager) -> distill.DistillState:
  """The latest checkpoint of `manager`, else a fresh state; placed by `parallel.param_sharding`.

  Neither path holds a whole replicated copy anywhere: the fresh state is built inside `jit`
  straight into its shardings, and orbax reads a checkpoint's shards into place. A checkpoint
  of before psi's rename (`aux_params`, `aux_opt_state`) is read under its former names. One
  that cannot be read (truncated, another state tree) raises a `RunError` naming its step.
  """
  init = functools.partial(distill.create_state, config, frozen=teacher.frozen_with_emb,
                           teacher=teacher)
  rng = jax.random.PRNGKey(config.global_seed)
  shapes = jax.eval_shape(init, teacher_params, rng)
  sharding = parallel.param_sharding(mesh, shapes)
  step = manager.latest_step()
  if step is None:
    return jax.jit(init, out_shardings=sharding)(teacher_params, rng)
  abstract = jax.tree_util.tree_map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, sharding)
  where = os.path.join(str(manager.directory), str(step))
  damage = checkpoints.checksum_error(where)
  if damage:  # flipped bytes would load silently: the record of the save says otherwise
    raise RunError(f"{where}: cannot restore this checkpoint ({damage}); "
                   f"{_resume_hint(manager, step)}, or choose another --workdir")
  try:
    with modeldir.quiet_failed_reads():
      try:
        return manager.restore(step, args=ocp.args.StandardRestore(abstract))
      except ValueError:  # maybe a checkpoint of before psi's rename: aux_* fields
        legacy = {_LEGACY_FIELDS.get(f.name, f.name): getattr(abstract, f.name)
                  for f in dataclasses.fields(abstract)}
        old = manager.restore(step, args=ocp.args.StandardRestore(legacy))
        logging.info("%s: read with psi's former field names (aux_params, aux_opt_state)", step)
        return distill.DistillState(**{f.name: old[_LEGACY_FIELDS.get(f.name, f.name)]
                                       for f in dataclasses.fields(abstract)})
  except Exception as e:  # orbax raises many types for a damaged or mismatched checkpoint
    raise RunError(f"{where}: cannot restore this checkpoint ({modeldir.first_line(e)}); "
                   f"{_resume_hint(manager, step)}, or choose another --workdir") from None


def _resume_hint(manager: ocp.CheckpointManager, step: int) -> str:
  earlier = [s for s in manager.all_steps() if s < step]
  return (f"delete that folder to resume from step {max(earlier)}" if earlier
          else "delete that folder to start over")


def step_inputs(conditions=None, real=None, reward_vars=None, init_logits=None) -> tuple:
  """What the step is called with after (state, teacher_params): (conditions, real,
  reward_vars, init_logits) without its trailing Nones (conditions None in a
  class-conditional run)."""
  inputs = (conditions, real, reward_vars, init_logits)
  count = len(inputs)
  while count and inputs[count - 1] is None:
    count -= 1
  return inputs[:count]


def jit_train_step(config: ml_collections.ConfigDict, teacher: teachers.Teacher, mesh, state,
                   teacher_params, conditions=None, real=None, reward_vars=None,
                   init_logits=None, reward=None) -> Callable:
  """`distill.make_train_step` jitted to keep `state`, `teacher_params` (and the fed
  `conditions` of a text-to-image run, see `place_conditions`) where they are; `real`: the
  GAN's real batches of the step (`RealFeed`), placed like the conditions; `reward`: the reward
  term's `rewards.Reward` and `reward_vars` its variables, replicated; `init_logits`: x_init's
  code logits (`samplers.init_code_logits`), replicated. The step is called with
  `(state, teacher_params, *step_inputs(conditions, real, reward_vars, init_logits))`.

  The state's buffers are donated: the step updates them in place.
  """
  where = lambda tree: jax.tree_util.tree_map(lambda x: x.sharding, tree)
  in_shardings = (where(state), where(teacher_params)) + tuple(
      None if x is None else where(x)
      for x in step_inputs(conditions, real, reward_vars, init_logits))
  return jax.jit(
      distill.make_train_step(config, teacher,
                              parallel.batch_constraint(mesh, config.train_batch_size), reward),
      in_shardings=in_shardings,
      out_shardings=(where(state), parallel.replicated(mesh)),
      donate_argnums=0)


@dataclasses.dataclass(frozen=True)
class RealFeed:
  """Real data as the step is fed it: `feed(step, mesh)` -> {"tokens": int[rounds, B, L],
  "cond": labels int32[rounds, B] or a text cond dict [rounds, B, ...]}, a global batch of B
  rows for each of `rounds` (`distill.real_rounds`: Soft-Di[M]O's discriminator updates, then
  our data anchor), split over the mesh's batch axis.

  Each process builds only its devices' rows, from the part of the data it holds
  (`data.real_tokens`: its shards of a token set on disk, all of an in-memory toy): row j of
  round r is its row u[r, j] mod n, with u drawn from (seed, step) alone, the same in every
  process, so that a resumed run is fed what an uninterrupted one was and no process ever
  reads another's shards (a toy is fed the same rows at any process count).

  Attributes:
    tokens, labels: this process's rows (n of them).
    condition: a text dataset's prompt indices -> cond dict; None for class labels.
  """
  tokens: np.ndarray
  labels: np.ndarray
  condition: Optional[Callable[[np.ndarray], Dict[str, np.ndarray]]]
  seed: int
  rounds: int
  batch: int

  def draws(self, step: int) -> np.ndarray:
    """uint[rounds, B]: what picks the rows of step `step`."""
    return np.random.default_rng((self.seed, 7919, step)).integers(
        0, 2 ** 62, (self.rounds, self.batch))

  def rows(self, draws: np.ndarray) -> Dict[str, Any]:
    index = np.asarray(draws) % len(self.tokens)
    labels = self.labels[index]
    return {"tokens": self.tokens[index],
            "cond": labels if self.condition is None else self.condition(labels)}

  def __call__(self, step: int, mesh) -> Dict[str, Any]:
    return parallel.place_rows(self.rows, self.draws(step), mesh, axis=1)

  @classmethod
  def of_run(cls, config: ml_collections.ConfigDict, dataset,
             codebook_size: int) -> Optional["RealFeed"]:
    """The run's real data as this process feeds it (Soft-Di[M]O's discriminator, our data
    anchor), None when neither is on: the part this process holds, int16 where the codes fit
    (half the memory of an ImageNet token set)."""
    if not distill.real_rounds(config):
      return None
    tokens, labels, condition = data.real_data(dataset, jax.process_index(),
                                               jax.process_count())
    dtype = np.int16 if codebook_size <= np.iinfo(np.int16).max else np.int32
    return cls(np.asarray(tokens, dtype), np.asarray(labels, np.int32), condition,
               config.global_seed, distill.real_rounds(config), config.train_batch_size)


def place_conditions(conditions, indices: Dict[str, np.ndarray], mesh) -> Dict[str, Any]:
  """The step's fed conditions on the mesh, each process gathering only its devices' rows.

  Args:
    conditions: a `data.prompts.PromptConditions` (`condition(indices) -> cond dict`).
    indices: {"generator": int[B], "auxiliary": int[rounds, B]} prompt indices, the same in
      every process (`PromptConditions.draw`).
  """
  return {name: parallel.place_rows(conditions.condition, idx, mesh, np.ndim(idx) - 1)
          for name, idx in indices.items()}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> Dict[str, Any]:
  """Distills the teacher at `config.teacher_path`; returns (and writes) metrics.json.

  Every value of `config` is checked first (`config_check`), a resumed run's against the config
  that wrote its checkpoints, and one run at a time holds `workdir` (`WorkdirLock`).
  """
  config_check.check(config)
  check_workdir(workdir)
  os.makedirs(workdir, exist_ok=True)
  with WorkdirLock(workdir):
    return _train_and_evaluate(config, workdir)


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> Dict[str, Any]:
  os.makedirs(os.path.join(workdir, "samples"), exist_ok=True)
  try:
    mesh = parallel.make_mesh(config.num_devices, config.mesh.data, config.mesh.fsdp)
  except ValueError as e:  # a mesh these devices cannot hold: the config's to fix
    raise config_check.ConfigError(f"num_devices / mesh: {e}") from None
  config = config.copy_and_resolve_references()
  config.train_batch_size = global_batch_size(config, parallel.batch_devices(mesh))
  teacher = teachers.load(config.teacher_path, dtypes.compute_dtype(config))
  # The run records its teacher by resolved path and by contents (`config_changes`).
  with config.unlocked():
    config.teacher_path = os.path.realpath(config.teacher_path)
    config.teacher_fingerprint = modeldir.fingerprint(config.teacher_path)
  if config.mask_value not in teacher.mask_values:
    raise config_check.ConfigError(
        f"mask_value {config.mask_value} is not the mask id of the teacher {config.teacher_path} "
        f"({' or '.join(map(str, teacher.mask_values))})")
  teacher = teacher.with_model(teacher.model.clone(attention=config.attention_impl))
  if config.attention_impl in ("xla", "cudnn") and config.distill_dropout:
    logging.warning("attention_impl %r is a fused kernel: the attention weights are not dropped "
                    "(the reference drops them; every other dropout stays)",
                    config.attention_impl)
  dataset = data.get(config, teacher)
  if teacher.kind.conditioning != dataset.conditioning:
    raise config_check.ConfigError(
        f"{config.teacher_path} is a {teacher.kind.conditioning}-conditioned teacher; "
        f"config.dataset {config.get('dataset')!r} conditions on "
        f"{dataset.conditioning} (text teachers: 'prompts' or 'digits_text')")
  config_check.check_guidance(config, teacher)
  teacher_params = parallel.shard_params(teacher.variables, mesh)
  # The step calls the teacher's module rematerialized when asked; the samplers do not.
  step_teacher = teacher.with_model(teacher.model.clone(remat=config.gradient_checkpointing))

  # Real data (Soft-Di[M]O's discriminator, our data anchor): each process holds its part and
  # feeds its devices' rows of every step's batches.
  real_feed = RealFeed.of_run(config, dataset, teacher.codebook_size)

  # The reward term's networks, replicated once and given to the step as an input.
  reward = reward_vars = None
  if distill.reward_enabled(config):
    reward = rewards.make_reward(config, dataset, teacher=teacher)
    reward_vars = parallel.replicate(reward.variables, mesh)

  # x_init's code logits (init_codes 'teacher'), from the float32 teacher, replicated once.
  # Computed once: the step, the validation and the evaluations all draw from it.
  code_logits = samplers.init_code_logits(config, teacher, teacher_params)
  init_logits = None if code_logits is None else parallel.replicate(code_logits, mesh)

  def fed(step: int):
    """What step `step` is fed besides the state and the teacher: the conditions of a
    text-to-image run (placed on the mesh), the GAN's real data tokens, the reward's
    networks, x_init's code logits."""
    real = None if real_feed is None else real_feed(step, mesh)
    if not teacher.text_conditioned:
      return step_inputs(None, real, reward_vars, init_logits)
    indices = dataset.train_conditions(step, config.train_batch_size, config.fake_rounds,
                                       config.get("gradient_accumulation_steps", 1))
    return step_inputs(place_conditions(dataset.conditions, indices, mesh), real, reward_vars,
                       init_logits)

  saved = check_resume(config, workdir)
  manager = checkpoints.manager(workdir, config)
  # theta, psi and the EMA start from the float32 teacher before it is (maybe) cast down.
  state = initial_state(config, teacher, teacher_params, mesh, manager)
  # The record of the run is written only once the state it describes was restored (or built);
  # a deliberate change keeps the previous record beside it.
  config_path = os.path.join(workdir, "checkpoints", "config.json")
  if saved is not None and config_changes(saved, json.loads(config.to_json())):
    checkpoints.write_json(
        os.path.join(workdir, "checkpoints", f"config.step{int(state.step)}.json"), saved)
  checkpoints.write_json(config_path, json.loads(config.to_json()))
  teacher_params = dtypes.hold_teacher(config, teacher_params)
  # The samplers use the placed copy, so no whole teacher stays on one device.
  teacher = dataclasses.replace(teacher, variables=teacher_params)
  if int(state.step):
    logging.info("resumed from step %d", int(state.step))
  example = fed(int(state.step))
  step_fn = distributed.compile_together(
      jit_train_step(config, step_teacher, mesh, state, teacher_params, *example,
                     reward=reward),
      state, teacher_params, *example, name="train_step")
  writer = writers.create(workdir, config)
  if int(state.step) == 0 and jax.process_index() == 0:
    from clu import parameter_overview
    logging.info("generator parameters:\n%s",
                 parameter_overview.get_parameter_overview(state.gen_params))
  # The digits scorer trains its feature classifier: build it once, and only if it is used.
  score = metrics.scorer(dataset) if config.validation_metrics or config.final_eval else None
  # One compiled one-step sampler for every validation, fed the parameters of the moment.
  validation = samplers.MeshSampler(
      samplers.generator(teacher, state.ema_params, config, int(state.step),
                         init_logits=code_logits), mesh,
      config.eval_batch_size, dataset.condition)

  # The config's evaluations during the run (`config.evals`), compiled once.
  run_evals = evaluators.for_run(config, teacher, dataset, mesh, state.ema_params, code_logits)

  start_step = int(state.step)
  watch = SkipWatch(config.max_consecutive_skips, config.fake_rounds, state.skipped, workdir)
  progress = tqdm(range(start_step, config.max_train_steps), initial=start_step,
                  total=config.max_train_steps, desc="Di[M]O", mininterval=2.0,
                  disable=jax.process_index() > 0)
  saver = checkpoints.ChecksumRecorder(manager)
  try:
    state = _loop(config, progress, step_fn, state, teacher_params, fed, watch, writer,
                  validation, dataset, score, saver, workdir, run_evals)
  finally:  # a stopped run still finishes the checkpoint it was writing, and records it
    saver.finish()
  writer.flush()

  if not config.final_eval:
    writer.close()
    return {}
  params = state.ema_params if config.eval_params == "ema" else state.gen_params
  results = evaluate(config, teacher, mesh, params, int(state.step), workdir, dataset, score,
                     code_logits)
  checkpoints.write_json(os.path.join(workdir, "metrics.json"), results)
  final = {f"final/{sampler}/{k}": v for sampler, values in results.items()
           for k, v in values.items() if isinstance(v, (int, float))}
  writer.write_scalars(int(state.step), final)
  writer.write_hparams(config, final, int(state.step))
  writer.close()
  return results


class ProfileWindow:
  """`config.profile_steps` = N > 0: a `jax.profiler` trace of the N steps after the first one
  of this process (which compiles), written under WORKDIR/profile (TensorBoard's profile tab,
  or Perfetto)."""

  def __init__(self, steps: int, start: int, workdir: str):
    self.first, self.last = start + 1, start + 1 + steps
    self.on, self.enabled = False, steps > 0 and jax.process_index() == 0
    self.folder = os.path.join(workdir, "profile")

  def before(self, step: int) -> None:
    if self.enabled and step == self.first:
      jax.profiler.start_trace(self.folder)
      self.on = True

  def after(self, done: int, state) -> None:
    if self.on and done == self.last:
      jax.block_until_ready(state)
      jax.profiler.stop_trace()
      self.on = False
      logging.info("profile of steps %d-%d written to %s", self.first + 1, self.last,
                   self.folder)


def _loop(config, progress, step_fn, state, teacher_params, fed, watch, writer, validation,
          dataset, score, manager, workdir, run_evals=()):
  """The training loop: steps, logs, validation grids, the config's evaluations (`run_evals`,
  `evaluators.RunEvaluation`s) and checkpoints (`manager`: a `checkpoints.ChecksumRecorder`);
  returns the last state."""
  classes = grid_classes(config, dataset.num_classes)
  grid_labels = np.repeat(classes, 8)
  labels = eval_labels(config, dataset.num_classes)
  window = writers.WindowMean()
  profile = ProfileWindow(config.get("profile_steps", 0), int(state.step), workdir)
  for step in progress:
    profile.before(step)
    state, metrics = step_fn(state, teacher_params, *fed(step))
    done = step + 1
    profile.after(done, state)
    watch.after(done, metrics)
    window.add(metrics)
    if done % config.log_every == 0 or done == config.max_train_steps:
      scalars = window.result()  # the window's means and its steps/s
      scalars["images_per_s"] = (scalars["steps_per_s"] * config.train_batch_size
                                 * config.get("gradient_accumulation_steps", 1))
      writer.write_scalars(done, scalars)
      progress.set_postfix(loss_g=f"{scalars['loss_generator']:.3g}",
                           loss_fake=f"{scalars['loss_fake']:.3g}",
                           img_s=f"{scalars['images_per_s']:.3g}")
    if done % config.validation_steps == 0:
      sigma = np.float32(samplers.generator_noise(config, done))
      codes = validation(grid_labels, 0,
                         samplers.generator_inputs(validation.sampler, state.ema_params, sigma))
      grid = class_rows(dataset, codes, grid_labels, 8, classes)
      if jax.process_index() == 0:
        visualize.save_png(grid, os.path.join(workdir, "samples", f"ema_step{done:06d}.png"))
      writer.write_images(done, {"ema_one_step": grid[None]})
      if config.validation_metrics:
        for name, params in (("ema", state.ema_params), ("generator", state.gen_params)):
          codes = validation(labels, 1,
                             samplers.generator_inputs(validation.sampler, params, sigma))
          writer.write_scalars(done, {f"val_{name}/{k}": v
                                      for k, v in score(codes, labels).items()})
    for evaluation in run_evals:
      if evaluation.due(done):
        scores = evaluation(state.ema_params, done)
        logging.info("step %d, eval %s: %s", done, evaluation.name, scores)
        writer.write_scalars(done, {f"eval/{evaluation.name}/{k}": v for k, v in scores.items()
                                    if isinstance(v, (int, float))})
    if done % config.checkpointing_steps == 0:  # no step-1 save (orbax's initial-save policy)
      manager.save(done, args=ocp.args.StandardSave(state))
  watch.check()
  if int(state.step) not in manager.all_steps():
    manager.save(int(state.step), args=ocp.args.StandardSave(state), force=True)
  return state
