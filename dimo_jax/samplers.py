"""What is sampled, and the one loop that samples it over a mesh.

A `Sampler` is a teacher at n decoding steps (its kind's own rule, `Teacher.decoder`) or a
Di[M]O generator in one step; `MeshSampler` runs either over every label, a global batch at a time
split over all devices, with the key of the batch starting at sample s being
fold_in(PRNGKey(seed), s): the in-run evaluation, `python -m dimo_jax.evaluate` and
`python -m dimo_jax.sample` draw the same codes for the same seed and batch size.
"""

import dataclasses
import time
from typing import Any, Callable, Dict, Iterator, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import ml_collections
import numpy as np

from dimo_jax import data, masking, parallel, sampling
from dimo_jax.teachers import Teacher


@dataclasses.dataclass(frozen=True)
class Sampler:
  """`fn(inputs, rng, cond) -> codes int32[B, L]` and what names it.

  inputs: what `fn` reads besides the key and the condition (the teacher's variables, or the
  generator's parameters and embedding-noise level), placed on the mesh by `MeshSampler`.
  """
  fn: Callable[[Any, jax.Array, Any], jax.Array]
  inputs: Any
  tag: str  # names output files and metrics
  description: str  # names a table row
  steps: int
  step: int = 0  # the generator's checkpoint step (0 for the teacher)


def decoding(teacher: Teacher, steps: int, cfg: float, options: Dict[str, Any],
             variables: Any = None) -> Sampler:
  """The teacher at `steps` steps of its own decode rule, guidance `cfg` (`Teacher.decoder`);
  `options`: `Teacher.decode_options(config)` or the rule's flags."""
  return Sampler(teacher.decoder(steps, cfg, **options),
                 teacher.variables if variables is None else variables,
                 f"teacher_{steps}step", f"teacher, {steps} steps, cfg_w {cfg:g}", steps)


def eval_seed(config: ml_collections.ConfigDict) -> int:
  """The sampling seed of a run's final evaluation (also `evaluate`'s default)."""
  return config.global_seed + 1


def run_teacher(config: ml_collections.ConfigDict, teacher: Teacher, steps: int,
                variables: Any = None) -> Sampler:
  """The teacher as a run's config samples it: `steps` steps of its own decode rule with the
  run's `cfg_w` (and, for MaskGIT's rule, `r_temp`, `sm_temp`, `sched_mode`)."""
  return decoding(teacher, steps, config.cfg_w, teacher.decode_options(config), variables)


def generator_noise(config: ml_collections.ConfigDict, step: int) -> float:
  """The embedding-noise level sigma a generator sees after `step` generator updates."""
  return float(masking.noise_level(config.noise_emb_perturb, step * config.fake_rounds))


def init_code_logits(run: ml_collections.ConfigDict, teacher: Teacher,
                     variables: Any = None, chunk: int = 64) -> Optional[np.ndarray]:
  """The logits float32[C, L, V] that x_init's codes are drawn from under `init_codes='teacher'`
  (None under 'uniform'): the teacher's own prediction for an all-masked input of each class,
  without guidance or dropout, in chunks of `chunk` classes. `variables`: the teacher's (default
  `teacher.variables`). Computed, never stored: the run's teacher is always at hand.
  """
  if run.get("init_codes", "uniform") == "uniform":
    return None
  if teacher.text_conditioned:
    raise ValueError("init_codes 'teacher' draws x_init's codes per class; "
                     f"{run.teacher_path} is a text-to-image teacher")
  variables = teacher.variables if variables is None else variables
  if variables is None:
    raise ValueError("init_codes 'teacher' needs the teacher's variables")
  apply = jax.jit(lambda v, labels: teacher.model.apply(
      v, jnp.full((labels.shape[0], teacher.seq_len), teacher.mask_id, jnp.int32), labels, None,
      deterministic=True).astype(jnp.float32))
  classes = np.arange(teacher.num_classes, dtype=np.int32)
  # Gathered, since sharded teacher variables may leave the output spread over processes.
  return np.concatenate([
      np.asarray(multihost_utils.process_allgather(apply(variables, classes[i:i + chunk]),
                                                   tiled=True))
      for i in range(0, len(classes), chunk)])


def with_variables_for(teacher: Teacher, run: ml_collections.ConfigDict, src: str) -> Teacher:
  """`teacher`, with its variables read from `src` when the run `run` draws x_init's codes from
  the teacher (`init_codes='teacher'`) and they were not loaded (a generator is otherwise
  sampled with the teacher's module only)."""
  if run.get("init_codes", "uniform") == "uniform" or teacher.variables is not None:
    return teacher
  from dimo_jax import teachers
  return dataclasses.replace(teacher, variables=teachers.load(src).variables)


def generator(teacher: Teacher, params: Any, run: ml_collections.ConfigDict, step: int,
              gen_temp: Optional[float] = None, which: str = "ema",
              tteo: Optional[Tuple[int, float, Callable]] = None,
              init_logits: Optional[np.ndarray] = None) -> Sampler:
  """A Di[M]O generator (parameters `params` of the teacher's module) in one step, as its run
  `run` samples it: x_init (`fixed_ratio`, `init_codes`), the embedding noise after `step`
  updates, no guidance, then Cat(softmax(z / gen_temp)) with the run's top-k / top-p filtering.
  `gen_temp` defaults to the run's. `tteo` = (steps, lr, reward): first that many SGD steps on
  the input embeddings to raise the reward (`rewards.tteo_logits_fn`). `init_logits`: x_init's
  code logits under `init_codes='teacher'` (default: `init_code_logits` from the teacher's
  variables)."""
  temp = float(run.gen_temp if gen_temp is None else gen_temp)
  model = teacher.model
  if init_logits is None:
    init_logits = init_code_logits(run, teacher)

  def fn(inputs, rng, cond):
    variables, sigma, reward_variables, code_logits = inputs

    def logits_at(tokens, cond_, noise_rng, offset=None, sow=False):
      return model.apply(variables, tokens, cond_, emb_noise=sigma, emb_offset=offset,
                         rngs={"noise": noise_rng},
                         **({"mutable": ["intermediates"]} if sow else {}))

    logits_fn = logits_at
    if tteo is not None and tteo[0] > 0:
      from dimo_jax import rewards
      logits_fn = rewards.tteo_logits_fn(logits_at, tteo[2], tteo[0], tteo[1], temp,
                                         reward_variables)
    return sampling.generator_sample(logits_fn, rng, cond, teacher.seq_len,
                                     teacher.codebook_size, teacher.mask_id, run.fixed_ratio,
                                     temp, run.top_k, run.top_p, code_logits)[0]

  tag = f"{step}" if which == "ema" else f"{step}_{which}"
  description = f"generator ({which}) step {step}, 1 step"
  if gen_temp is not None:
    tag, description = f"{tag}_T{temp:g}", f"{description}, gen_temp {temp:g}"
  if tteo is not None and tteo[0] > 0:
    tag, description = f"{tag}_tteo{tteo[0]}", f"{description}, TTEO {tteo[0]} x lr {tteo[1]:g}"
  use_tteo = tteo is not None and tteo[0] > 0
  return Sampler(fn, (params, np.float32(generator_noise(run, step)),
                      tteo[2].variables if use_tteo else None, init_logits), tag, description,
                 1, step)


def generator_inputs(sampler: Sampler, params: Any, sigma: np.float32) -> tuple:
  """A `generator` sampler's inputs with other parameters and noise level (the validation of a
  run, fed the parameters of the moment); its TTEO reward and x_init code logits are kept."""
  return (params, sigma) + tuple(sampler.inputs[2:])


def padded_batches(count: int, batch_size: int) -> Iterator[Tuple[int, int]]:
  """(start, rows) of every batch of `count` samples: the last one is padded to `batch_size`."""
  for start in range(0, count, batch_size):
    yield start, min(batch_size, count - start)


def gather(tree: Any, count: int) -> Any:
  """The first `count` rows of every batch-sharded leaf, as numpy arrays on every process."""
  return jax.tree_util.tree_map(lambda x: np.asarray(x)[:count],
                                multihost_utils.process_allgather(tree, tiled=True))


class MeshSampler:
  """A `Sampler` jitted over a mesh, optionally followed on the device by `post`
  (`post(post_inputs, codes) -> {name: [B, ...]}`: decoding, features).

  Args:
    sampler: what is sampled.
    mesh: its devices; `batch_size` is rounded up to a multiple of their count.
    rows: label indices int[n] -> the condition of n rows (`data.class_condition`, or a text
      dataset's `PromptConditions.condition`).
  """

  def __init__(self, sampler: Sampler, mesh, batch_size: int,
               rows: Callable[[np.ndarray], Any] = data.class_condition,
               post: Optional[Callable[[Any, jax.Array], Dict[str, jax.Array]]] = None,
               post_inputs: Any = None):
    self.sampler, self.mesh, self.rows = sampler, mesh, rows
    self.batch_size = parallel.round_batch(batch_size, mesh)
    self.inputs = parallel.shard_params(sampler.inputs, mesh)
    self.post_inputs = parallel.replicate(post_inputs, mesh)

    def run(inputs, post_inputs, seed, start, cond):
      rng = jax.random.fold_in(jax.random.PRNGKey(seed), start)
      codes = sampler.fn(inputs, rng, cond)
      return {"codes": codes, **({} if post is None else post(post_inputs, codes))}

    self._run = jax.jit(run, out_shardings=parallel.batch_sharded(mesh))

  def batches(self, labels: np.ndarray, seed: int, inputs: Any = None,
              keep: Optional[Sequence[str]] = None) -> Iterator[Tuple[int, Dict[str, Any]]]:
    """(start, outputs of the batch's real rows as numpy arrays, on every process).

    `inputs` replaces the sampler's (a generator's parameters as training goes on), placed like
    them; `keep` names the outputs gathered to the host (default all).
    """
    inputs = self.inputs if inputs is None else parallel.shard_params(inputs, self.mesh)
    labels = np.asarray(labels)
    for start, count in padded_batches(len(labels), self.batch_size):
      chunk = parallel.pad_rows(labels[start:start + count], self.batch_size)
      cond = parallel.place_rows(self.rows, chunk, self.mesh)
      out = self._run(inputs, self.post_inputs, np.uint32(seed), np.int32(start), cond)
      yield start, gather(out if keep is None else {k: out[k] for k in keep}, count)

  def __call__(self, labels: np.ndarray, seed: int, inputs: Any = None) -> np.ndarray:
    """int32[N, L] codes of every label (see `batches`)."""
    return np.concatenate([out["codes"] for _, out in self.batches(labels, seed, inputs)])


def timed(sample: Callable[[], np.ndarray]):
  """(samples, seconds) of a second call: the first compiles (and warms caches)."""
  sample()
  start = time.perf_counter()
  out = sample()
  return out, time.perf_counter() - start
