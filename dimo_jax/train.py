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
from clu import metric_writers
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from tqdm.auto import tqdm

from dimo_jax import (config_check, data, distill, distributed, masking, modeldir, parallel,
                      sampling, teachers, visualize)
from dimo_jax.errors import UserError

_DTYPES = {"no": jnp.float32, "fp32": jnp.float32, "bf16": jnp.bfloat16}


def _dtype(config: ml_collections.ConfigDict, key: str):
  if config[key] not in _DTYPES:
    raise ValueError(f"{key} must be one of {sorted(_DTYPES)}, got {config[key]!r}")
  return _DTYPES[config[key]]


def compute_dtype(config: ml_collections.ConfigDict):
  """The dtype the networks compute in (`mixed_precision`); parameters stay float32."""
  return _dtype(config, "mixed_precision")


def hold_teacher(config: ml_collections.ConfigDict, teacher_params):
  """The frozen teacher's parameters in `teacher_dtype`, each leaf where it was placed."""
  dtype = _dtype(config, "teacher_dtype")
  return jax.tree_util.tree_map(lambda x: x.astype(dtype), teacher_params)


def checkpoint_manager(workdir: str, config: ml_collections.ConfigDict) -> ocp.CheckpointManager:
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


def global_batch_size(config: ml_collections.ConfigDict, batch_devices: int) -> int:
  """The step's batch: `train_batch_size`, or `per_device_batch` x `batch_devices` when set.

  A config gives one of the two (the other -1 or absent), so a per-device recipe such as
  configs/maskgit_imagenet256.py scales with the mesh it runs on.

  `batch_devices` is every device of the mesh (`parallel.batch_devices`): with FSDP the
  `fsdp` axis carries batch slices too.
  """
  per_device = config.get("per_device_batch", -1)
  if per_device is None or per_device <= 0:
    return config.train_batch_size
  if config.train_batch_size not in (-1, per_device * batch_devices):
    raise ValueError(f"per_device_batch {per_device} on {batch_devices} devices and "
                     f"train_batch_size {config.train_batch_size} disagree; set one of them "
                     "to -1")
  return per_device * batch_devices


# Config keys that guide the teacher or drop the condition, with their unguided values.
_UNGUIDED = {"true_cfg": 1.0, "fake_cfg_eval": 1.0, "fake_cfg_train": 1.0,
             "fake_cfg_drop_ratio": 0.0, "cfg_w": 0.0}


def check_guidance(config: ml_collections.ConfigDict, model, keys=tuple(_UNGUIDED)) -> None:
  """Refuses guidance (the config `keys`) for a teacher without an unconditional input."""
  if getattr(model, "supports_guidance", True):
    return
  wrong = {k: config[k] for k in keys if config[k] != _UNGUIDED[k]}
  if wrong:
    expected = ", ".join(f"{k}={_UNGUIDED[k]}" for k in keys)
    raise config_check.ConfigError(
        f"the {type(model).__name__} teacher has no unconditional token, so it "
        f"cannot be guided; set {expected} (found {wrong})")


def generator_noise(config: ml_collections.ConfigDict, step: int) -> float:
  """The embedding-noise level sigma the generator sees after `step` generator updates."""
  return float(masking.noise_level(config.noise_emb_perturb, step * config.fake_rounds))


class Samplers:
  """Jitted eval-mode samplers of the teacher (multi-step) and of a generator (one step).

  A batch of labels is split over every device of `mesh` (all local devices when None) and the
  codes come back replicated, so every process of a multi-process run holds all of them.
  """

  def __init__(self, config: ml_collections.ConfigDict, teacher: teachers.Teacher,
               mesh: Optional[Mesh] = None, model=None,
               condition: Callable[[np.ndarray], Any] = lambda labels: labels):
    """`model`: what the samplers call (default `teacher.model`; a text teacher's
    `conditioned()` adapter); `condition`: labels int32[B] -> the model's condition (the labels
    themselves, or a text dataset's prompt encodings)."""
    self.config = config
    self.teacher_variables = teacher.variables
    self.condition = condition
    model = teacher.model if model is None else model
    mesh = parallel.make_mesh() if mesh is None else mesh
    self._replicated = parallel.replicated(mesh)
    self._labels = (parallel.batch_sharded(mesh)
                    if config.eval_batch_size % parallel.batch_devices(mesh) == 0
                    else self._replicated)

    def teacher_fn(variables):
      return lambda tokens, labels, drop: model.apply(variables, tokens, labels, drop)
    # Guided as in distillation (a text teacher against the negative prompt).
    teacher_condition = getattr(model, "teacher_condition", lambda labels: labels)

    @functools.partial(jax.jit, static_argnames="steps", out_shardings=self._replicated)
    def teacher_sample(variables, rng, labels, steps):
      return sampling.maskgit_sample(
          teacher_fn(variables), rng, teacher_condition(labels), model.seq_len, model.mask_id,
          steps,
          config.cfg_w, config.r_temp, config.sm_temp, config.sched_mode)

    @functools.partial(jax.jit, static_argnames="gen_temp", out_shardings=self._replicated)
    def generator_sample(params, rng, labels, sigma, gen_temp):
      def gen_fn(tokens, labels_, noise_rng):
        return model.apply(params, tokens, labels_, emb_noise=sigma, rngs={"noise": noise_rng})
      return sampling.generator_sample(
          gen_fn, rng, labels, model.seq_len, model.codebook_size, model.mask_id,
          config.fixed_ratio, gen_temp, config.top_k, config.top_p)[0]

    self._teacher_sample = teacher_sample
    self._generator_sample = generator_sample

  def _batched(self, sample_fn: Callable, rng: jax.Array, labels: np.ndarray) -> np.ndarray:
    size = self.config.eval_batch_size
    out = []
    for start in range(0, len(labels), size):
      chunk = labels[start:start + size]
      padded = np.pad(chunk, (0, size - len(chunk)))  # one compiled shape for every batch
      # Host values placed on the mesh: every process passes the same, as jit requires.
      key = jax.device_put(np.asarray(jax.random.fold_in(rng, start)), self._replicated)
      cond = jax.tree_util.tree_map(lambda x: jax.device_put(np.asarray(x), self._labels),
                                    self.condition(padded.astype(np.int32)))
      codes = sample_fn(key, cond)
      out.append(np.asarray(codes)[: len(chunk)])
    return np.concatenate(out)

  def teacher(self, rng, labels, steps: int) -> np.ndarray:
    """int32[N, L] codes from the teacher at `steps` decoding steps."""
    return self._batched(
        lambda r, l: self._teacher_sample(self.teacher_variables, r, l, steps), rng, labels)

  def generator(self, params, rng, labels, sigma: float,
                gen_temp: Optional[float] = None) -> np.ndarray:
    """int32[N, L] codes from a generator in one step, at `gen_temp` (default the config's)."""
    sigma = jax.device_put(np.float32(sigma), self._replicated)
    gen_temp = float(self.config.gen_temp if gen_temp is None else gen_temp)
    return self._batched(lambda r, l: self._generator_sample(params, r, l, sigma, gen_temp),
                         rng, labels)


def timed(sample: Callable[[], np.ndarray]):
  """(samples, seconds) of a second call: the first compiles (and warms caches)."""
  sample()
  start = time.perf_counter()
  out = sample()
  return out, time.perf_counter() - start


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


def evaluate(config: ml_collections.ConfigDict, samplers: Samplers, gen_params, step: int,
             workdir: str, dataset, score: data.Scorer) -> Dict[str, Dict[str, float]]:
  """Samples the teacher (at `sampling_step` and 1 step) and the generator on the same labels.

  Writes samples/comparison.png and returns {"teacher_<n>step"|"teacher_1step"|
  "generator_1step": {<the dataset's metrics>, "sec_per_image"}}: fd and accuracy on digits,
  true_nll, mode_coverage and in_mode on the synthetic set, none yet on ImageNet. With
  `eval_gen_temps`, also "generator_1step_T<t>" for each temperature t (same labels and key).
  """
  labels = eval_labels(config, dataset.num_classes)
  classes = grid_classes(config, dataset.num_classes)
  rng = jax.random.PRNGKey(config.global_seed + 1)
  sigma = generator_noise(config, step)
  runs = {
      f"teacher_{config.sampling_step}step":
          lambda: samplers.teacher(rng, labels, config.sampling_step),
      "teacher_1step": lambda: samplers.teacher(rng, labels, 1),
      "generator_1step": lambda: samplers.generator(gen_params, rng, labels, sigma),
  }
  for temp in config.eval_gen_temps:
    runs[gen_temp_name(temp)] = functools.partial(samplers.generator, gen_params, rng, labels,
                                                  sigma, temp)
  metrics, panels = {}, {}
  for name, run in runs.items():
    codes, seconds = timed(run)
    metrics[name] = {**score(codes, labels), "sec_per_image": seconds / len(labels)}
    if not name.startswith("generator_1step_T"):  # one panel of the generator is enough
      panels[name.replace("_", " ")] = class_rows(dataset, codes, labels, 10, classes)
    logging.info("%s: %s", name, metrics[name])
  if jax.process_index() == 0:
    visualize.side_by_side(panels, os.path.join(workdir, "samples", "comparison.png"))
  return metrics


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
    "eval_batch_size", "eval_gen_temps", "eval_params", "sampling_step", "sched_mode", "cfg_w",
    "r_temp", "sm_temp", "grid_classes", "num_devices", "mesh", "max_consecutive_skips",
    "allow_config_change", "gradient_checkpointing", "prompt_cache"})


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
  saved, new = _flat(saved), _flat(new)
  changed = {}
  for key in sorted(set(saved) | set(new)):
    if key.split(".")[0] in RESUME_FREE_KEYS:
      continue
    a, b = saved.get(key), new.get(key)
    if isinstance(a, list):  # JSON writes tuples as lists
      a = tuple(a)
    if isinstance(b, list):
      b = tuple(b)
    if a != b:
      changed[key] = (saved.get(key), new.get(key))
  return changed


def check_resume(config: ml_collections.ConfigDict, workdir: str) -> Optional[Dict[str, Any]]:
  """Refuses to resume the run in `workdir` with a config whose method keys differ from the one
  that wrote its checkpoints; returns the saved config (None for a new run)."""
  path = os.path.join(workdir, "checkpoints", "config.json")
  if not os.path.isfile(path):
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


def initial_state(config: ml_collections.ConfigDict, model, teacher_params, mesh,
                  manager: ocp.CheckpointManager) -> distill.DistillState:
  """The latest checkpoint of `manager`, else a fresh state; placed by `parallel.param_sharding`.

  Neither path holds a whole replicated copy anywhere: the fresh state is built inside `jit`
  straight into its shardings, and orbax reads a checkpoint's shards into place. A checkpoint
  that cannot be read (truncated, another state tree) raises a `RunError` naming its step.
  """
  init = functools.partial(distill.create_state, config, frozen=distill.frozen_prefixes(model))
  rng = jax.random.PRNGKey(config.global_seed)
  shapes = jax.eval_shape(init, teacher_params, rng)
  sharding = parallel.param_sharding(mesh, shapes)
  step = manager.latest_step()
  if step is None:
    return jax.jit(init, out_shardings=sharding)(teacher_params, rng)
  abstract = jax.tree_util.tree_map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, sharding)
  try:
    with modeldir.quiet_failed_reads():
      return manager.restore(step, args=ocp.args.StandardRestore(abstract))
  except Exception as e:  # orbax raises many types for a damaged or mismatched checkpoint
    where = os.path.join(str(manager.directory), str(step))
    earlier = [s for s in manager.all_steps() if s < step]
    hint = (f"delete that folder to resume from step {max(earlier)}" if earlier
            else "delete that folder to start over")
    raise RunError(f"{where}: cannot restore this checkpoint ({modeldir.first_line(e)}); "
                   f"{hint}, or choose another --workdir") from None


def jit_train_step(config: ml_collections.ConfigDict, model, mesh, state, teacher_params,
                   conditions=None) -> Callable:
  """`distill.make_train_step` jitted to keep `state`, `teacher_params` (and the fed
  `conditions` of a text-to-image run, see `place_conditions`) where they are.

  The state's buffers are donated: the step updates them in place.
  """
  where = lambda tree: jax.tree_util.tree_map(lambda x: x.sharding, tree)
  in_shardings = (where(state), where(teacher_params))
  if conditions is not None:
    in_shardings += (where(conditions),)
  return jax.jit(
      distill.make_train_step(config, model,
                              parallel.batch_constraint(mesh, config.train_batch_size)),
      in_shardings=in_shardings,
      out_shardings=(where(state), parallel.replicated(mesh)),
      donate_argnums=0)


def place_conditions(conditions, indices: Dict[str, np.ndarray], mesh) -> Dict[str, Any]:
  """The step's fed conditions on the mesh, each process gathering only its devices' rows.

  Args:
    conditions: a `data.prompts.PromptConditions` (`condition(indices) -> cond dict`).
    indices: {"generator": int[B], "auxiliary": int[rounds, B]} prompt indices, the same in
      every process (`PromptConditions.draw`).
  """
  row = {k: v.shape[1:] for k, v in conditions.condition(np.zeros((1,), np.int64)).items()}

  def place(idx: np.ndarray) -> Dict[str, jax.Array]:
    sharding = parallel.batch_sharded_at(mesh, idx.ndim - 1)
    def leaf(key):
      return jax.make_array_from_callback(
          idx.shape + row[key], sharding,
          lambda where: conditions.condition(idx[where[:idx.ndim]])[key])
    return {key: leaf(key) for key in row}

  return {name: place(np.asarray(idx)) for name, idx in indices.items()}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> Dict[str, Any]:
  """Distills the teacher at `config.teacher_path`; returns (and writes) metrics.json.

  Every value of `config` is checked first (`config_check`), a resumed run's against the config
  that wrote its checkpoints, and one run at a time holds `workdir` (`WorkdirLock`).
  """
  config_check.check(config)
  os.makedirs(workdir, exist_ok=True)
  with WorkdirLock(workdir):
    return _train_and_evaluate(config, workdir)


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> Dict[str, Any]:
  os.makedirs(os.path.join(workdir, "samples"), exist_ok=True)
  mesh = parallel.make_mesh(config.num_devices, config.mesh.data, config.mesh.fsdp)
  config = config.copy_and_resolve_references()
  config.train_batch_size = global_batch_size(config, parallel.batch_devices(mesh))
  teacher = teachers.load(config.teacher_path, compute_dtype(config))
  dataset = data.get(config)
  # A text-to-image teacher is called through its adapter, with prompt encodings fed per step.
  text = hasattr(teacher, "conditioned")
  if text and not hasattr(dataset, "conditions"):
    raise ValueError(f"{config.teacher_path} is a text-to-image teacher: config.dataset must "
                     f"name prompts ('prompts' or 'digits_text'), not {config.get('dataset')!r}")
  plain_model = teacher.conditioned() if text else teacher.model
  model = plain_model.clone(remat=config.gradient_checkpointing)
  check_guidance(config, model)
  teacher_params = parallel.shard_params(teacher.variables, mesh)

  def fed(step: int):
    """The conditions step `step` is fed (a text-to-image run), placed on the mesh."""
    if not text:
      return ()
    indices = dataset.train_conditions(step, config.train_batch_size, config.fake_rounds)
    return (place_conditions(dataset.conditions, indices, mesh),)

  saved = check_resume(config, workdir)
  manager = checkpoint_manager(workdir, config)
  # theta, psi and the EMA start from the float32 teacher before it is (maybe) cast down.
  state = initial_state(config, model, teacher_params, mesh, manager)
  # The record of the run is written only once the state it describes was restored (or built);
  # a deliberate change keeps the previous record beside it.
  config_path = os.path.join(workdir, "checkpoints", "config.json")
  if saved is not None and config_changes(saved, json.loads(config.to_json())):
    write_json(os.path.join(workdir, "checkpoints", f"config.step{int(state.step)}.json"), saved)
  write_json(config_path, json.loads(config.to_json()))
  teacher_params = hold_teacher(config, teacher_params)
  # The samplers use the placed copy, so no whole teacher stays on one device.
  teacher = dataclasses.replace(teacher, variables=teacher_params)
  if int(state.step):
    logging.info("resumed from step %d", int(state.step))
  example = fed(int(state.step))
  step_fn = distributed.compile_together(
      jit_train_step(config, model, mesh, state, teacher_params, *example),
      state, teacher_params, *example, name="train_step")
  samplers = Samplers(config, teacher, mesh, model=plain_model,
                      condition=dataset.condition if text else (lambda labels: labels))
  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  classes = grid_classes(config, dataset.num_classes)
  grid_labels = np.repeat(classes, 8)
  labels = eval_labels(config, dataset.num_classes)
  # The digits scorer trains its feature classifier: build it once, and only if it is used.
  score = dataset.make_scorer() if config.validation_metrics or config.final_eval else None

  start_step = int(state.step)
  watch = SkipWatch(config.max_consecutive_skips, config.fake_rounds, state.skipped, workdir)
  progress = tqdm(range(start_step, config.max_train_steps), initial=start_step,
                  total=config.max_train_steps, desc="Di[M]O", mininterval=2.0,
                  disable=jax.process_index() > 0)
  try:
    state = _loop(config, progress, step_fn, state, teacher_params, fed, watch, writer,
                  samplers, dataset, classes, grid_labels, labels, score, manager, workdir)
  finally:  # a stopped run still finishes the checkpoint it was writing
    manager.wait_until_finished()
  writer.flush()

  if not config.final_eval:
    return {}
  params = state.ema_params if config.eval_params == "ema" else state.gen_params
  metrics = evaluate(config, samplers, params, int(state.step), workdir, dataset, score)
  write_json(os.path.join(workdir, "metrics.json"), metrics)
  return metrics


def _loop(config, progress, step_fn, state, teacher_params, fed, watch, writer, samplers,
          dataset, classes, grid_labels, labels, score, manager, workdir):
  """The training loop: steps, logs, validation grids and checkpoints; returns the last state."""
  for step in progress:
    state, metrics = step_fn(state, teacher_params, *fed(step))
    done = step + 1
    watch.after(done, metrics)
    if done % config.log_every == 0 or done == config.max_train_steps:
      scalars = {k: float(v) for k, v in jax.device_get(metrics).items()}
      writer.write_scalars(done, scalars)
      progress.set_postfix(loss_g=f"{scalars['loss_generator']:.3g}",
                           loss_fake=f"{scalars['loss_fake']:.3g}")
    if done % config.validation_steps == 0:
      sigma = generator_noise(config, done)
      codes = samplers.generator(state.ema_params, jax.random.PRNGKey(0), grid_labels, sigma)
      grid = class_rows(dataset, codes, grid_labels, 8, classes)
      if jax.process_index() == 0:
        visualize.save_png(grid, os.path.join(workdir, "samples", f"ema_step{done:06d}.png"))
      writer.write_images(done, {"ema_one_step": grid[None]})
      if config.validation_metrics:
        for name, params in (("ema", state.ema_params), ("generator", state.gen_params)):
          codes = samplers.generator(params, jax.random.PRNGKey(1), labels, sigma)
          writer.write_scalars(done, {f"val_{name}/{k}": v
                                      for k, v in score(codes, labels).items()})
    manager.save(done, args=ocp.args.StandardSave(state))
  watch.check()
  if int(state.step) not in manager.all_steps():
    manager.save(int(state.step), args=ocp.args.StandardSave(state), force=True)
  return state
