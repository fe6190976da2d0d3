"""Sample-quality evaluation through one registry: the run's evaluations every so many steps
(`config.evals`) and `python -m dimo_jax.evaluate` sample and score with the same functions.

`config.evals` maps a name to a spec (`spec()`): its `type`, when it runs (`every` N generator
updates, and at the steps in `at`; neither: never in the run), `num_samples`, the generator's
`gen_temp` (0: the run's) and the files its type reads:

  fid      imagenet256 (or prompts): FID against `ref`, IS and PRDC, from the FID Inception
           network at `inception_path` (the reference's in-training FID: every 2000 steps and
           at 2000 and 5000, 5000 samples of the EMA at gen_temp 7)
  clip     prompts: CLIP score against the prompts, the CLIP model at `clip_path`
  dataset  digits, digits_bits, digits_text, synthetic: the dataset's own scorer (fd and
           accuracy; true_nll, mode_coverage and in_mode)

Each scores the EMA generator in one step on class-balanced labels (text: the run's prompts,
round-robin) with the run's final-evaluation seed, and its metrics go to TensorBoard as
`eval/<name>/<metric>`.

`evaluate()` is one whole evaluation as `python -m dimo_jax.evaluate` runs it (that module
holds only the command line): a sampler (`teacher_sampler`, `generator_sampler`, or
`text_evaluation` for prompts), N samples at one or several seeds, the scores, eval_<tag>.json
and its `table` row.
"""

import dataclasses
import os
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import jax
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from dimo_jax import (checkpoints, config_check, data, dtypes, metrics, outputs, parallel,
                      rewards, samplers, teachers, tokenizers, writers)
from dimo_jax.data.digits import class_balanced_labels
from dimo_jax.errors import UserError
from dimo_jax.metrics import clip_score, pipeline, reference as references

# type -> the datasets it scores.
TYPES = {"fid": ("imagenet256", "prompts"), "clip": ("prompts",),
         "dataset": ("digits", "digits_bits", "digits_text", "synthetic")}
_FILES = {"fid": ("inception_path", "ref"), "clip": ("clip_path",), "dataset": ()}


def spec(**values) -> ml_collections.ConfigDict:
  """One entry of `config.evals`, its defaults updated by `values`."""
  out = ml_collections.ConfigDict(dict(
      type="dataset", every=0, at=(), num_samples=1000, gen_temp=0.0, inception_path="",
      ref="", clip_path=""))
  out.update(values)
  return out


def runs(entry: ml_collections.ConfigDict) -> bool:
  """Whether an entry of `config.evals` ever runs in the run (`every` or `at` set)."""
  return bool(entry.get("every", 0) or entry.get("at", ()))


def problems(config: ml_collections.ConfigDict) -> List[str]:
  """The bad entries of `config.evals`, each 'evals.<name>.<key> ...'."""
  found = []
  dataset = config.get("dataset", "digits")
  for name, entry in (config.get("evals") or {}).items():
    where = f"evals.{name}"
    kind = entry.get("type")
    if kind not in TYPES:
      found.append(f"{where}.type must be one of {', '.join(map(repr, TYPES))}, found {kind!r}")
      continue
    every, at = entry.get("every", 0), entry.get("at", ())
    if not (isinstance(every, int) and every >= 0):
      found.append(f"{where}.every must be an integer >= 0, found {every!r}")
    if not (isinstance(at, (tuple, list)) and all(isinstance(s, int) and s > 0 for s in at)):
      found.append(f"{where}.at must be a tuple of steps > 0, found {at!r}")
    samples = entry.get("num_samples")
    if not (isinstance(samples, int) and samples >= 1):
      found.append(f"{where}.num_samples must be an integer >= 1, found {samples!r}")
    temp = entry.get("gen_temp", 0.0)
    if not (isinstance(temp, (int, float)) and np.isfinite(temp) and temp >= 0):
      found.append(f"{where}.gen_temp must be a finite number >= 0 (0: the run's), found "
                   f"{temp!r}")
    if not runs(entry):
      continue  # its files are not needed
    if dataset not in TYPES[kind]:
      found.append(f"{where}: type {kind!r} scores the datasets "
                   f"{', '.join(map(repr, TYPES[kind]))}, not {dataset!r}")
    for key in _FILES[kind]:
      if not entry.get(key):
        found.append(f"{where}: type {kind!r} needs {where}.{key}")
  return found


def generate(sampler: samplers.Sampler, labels: np.ndarray, mesh, batch_size: int, seed: int,
             tokenizer=None, extractor=None,
             sink: Optional[Callable[[int, Dict[str, np.ndarray]], None]] = None,
             condition: Callable[[np.ndarray], Any] = data.class_condition,
             clip=None, image_codes=None, runner: Optional[samplers.MeshSampler] = None,
             inputs: Any = None) -> Dict[str, Any]:
  """Samples every label, a global batch at a time (`samplers.MeshSampler`); gathers the
  results on every process.

  Args:
    sampler: what is sampled.
    labels: int32[N] (class labels, or prompt indices with `condition`).
    mesh: the device mesh; `batch_size` is rounded up to a multiple of its device count.
    seed: the batch starting at sample s uses the key fold_in(PRNGKey(seed), s).
    tokenizer, extractor: decode codes to images, and images to Inception features.
    sink: called on process 0 as sink(start, {"codes"[, "images" uint8[b, H, W, 3]]}) for
      every batch.
    condition: labels -> the sampler's condition (`data.class_condition`, or
      `PromptConditions.condition`).
    clip: a convert.clip.Clip whose image tower embeds the decoded images.
    image_codes: the sampler's tokens -> the tokenizer's codes (`Teacher.image_codes`).
    runner: a `runner_for` of these arguments, compiled once and reused (the run's
      evaluations); `inputs` then replace the sampler's (the generator's parameters now).

  Returns:
    {"codes": int32[N, L], "pool": float32[N, F], "logits": float32[N, C] (the last two with
    an extractor), "clip": float32[N, P] (with clip), "images_per_second": rate after the
    first batch (which compiles; None with one batch)}.
  """
  if runner is None:
    runner = runner_for(sampler, mesh, batch_size, tokenizer, extractor, condition, clip,
                        image_codes)
  keep = ("codes",) + (() if extractor is None else ("pool", "logits"))
  keep += () if clip is None else ("clip",)
  parts = {name: [] for name in keep}
  progress = tqdm(total=len(labels), unit="img", desc=f"eval_{sampler.tag}", mininterval=2.0,
                  disable=jax.process_index() > 0)
  started, timed = None, 0
  wanted = keep + (("images",) if sink is not None and tokenizer is not None else ())
  for start, host in runner.batches(labels, seed, inputs, keep=wanted):
    for name in keep:
      parts[name].append(host[name])
    if sink is not None and jax.process_index() == 0:
      sink(start, host)
    progress.update(len(host["codes"]))
    if started is None:
      started = time.perf_counter()
    else:
      timed += len(host["codes"])
  progress.close()
  result = {name: np.concatenate(values) for name, values in parts.items()}
  elapsed = time.perf_counter() - started
  result["images_per_second"] = timed / elapsed if timed and elapsed > 0 else None
  return result


def runner_for(sampler: samplers.Sampler, mesh, batch_size: int, tokenizer=None, extractor=None,
               condition: Callable[[np.ndarray], Any] = data.class_condition, clip=None,
               image_codes=None) -> samplers.MeshSampler:
  """The compiled sampler-then-score pipeline `generate` runs (see its arguments)."""
  if (extractor is not None or clip is not None) and tokenizer is None:
    raise ValueError("image metrics need the decoded images: pass the tokenizer")
  aux = {"tokenizer": None if tokenizer is None else tokenizer.variables,
         "extractor": None if extractor is None else extractor.variables,
         "clip": None if clip is None else clip.variables["vision"]}
  return samplers.MeshSampler(sampler, mesh, batch_size, condition,
                              pipeline.image_pipeline(tokenizer, extractor, clip, image_codes),
                              aux)


def score(out: Dict[str, Any], labels: np.ndarray, dataset=None, ref=None, clip=None,
          prompts: Optional[Sequence[str]] = None) -> Dict[str, float]:
  """The metrics of `generate`'s output: the dataset's scorer (toys), FID/IS/PRDC against
  `ref` (with pool features), CLIP score against `prompts[labels]` (with CLIP embeddings)."""
  scores = {}
  if dataset is not None:
    scores.update(metrics.scorer(dataset)(out["codes"], labels))
  if ref is not None:
    scores.update(references.image_metrics(out["pool"], out["logits"], ref))
  if clip is not None:
    scores["clip_score"] = clip_score.clip_score(
        out["clip"], clip_score.prompt_embeds(clip, list(prompts))[labels])
  return scores


class RunEvaluation:
  """One entry of `config.evals` in a run: `due(step)`, then `evaluation(params, step)` ->
  its metrics for the generator parameters `params` after `step` updates.

  `extractor` and `clip` may be given loaded (tests, or shared between entries); otherwise
  they are read from the spec's paths when the run starts, before any step.
  """

  def __init__(self, name: str, entry: ml_collections.ConfigDict, config, teacher, dataset,
               mesh, params, extractor=None, clip=None, init_logits=None):
    self.name, self.entry, self.mesh = name, entry, mesh
    self.every, self.at = int(entry.every), tuple(entry.get("at", ()))
    self.config = config
    self.batch_size = parallel.round_batch(config.eval_batch_size, mesh)
    self.seed = samplers.eval_seed(config)
    gen_temp = float(entry.gen_temp) or None
    self.sampler = samplers.generator(teacher, params, config, 0, gen_temp=gen_temp,
                                      init_logits=init_logits)
    text = teacher.text_conditioned
    self.dataset = dataset if entry.type == "dataset" else None
    self.prompts = None
    if text:
      self.labels = np.arange(entry.num_samples) % dataset.num_classes
    else:
      self.labels = class_balanced_labels(entry.num_samples, teacher.num_classes)
    tokenizer, self.ref, self.clip = None, None, None
    if entry.type == "fid":
      if extractor is None:
        from dimo_jax.models import fid_inception
        extractor = fid_inception.load(entry.inception_path)
      tokenizer = dataset.tokenizer
      self.ref = references.load_reference(entry.ref, extractor, mesh, self.batch_size)
    else:
      extractor = None
    if entry.type == "clip":
      if clip is None:
        from dimo_jax.convert import clip as convert_clip
        clip = convert_clip.load_clip(entry.clip_path)
      tokenizer, self.clip = dataset.tokenizer, clip
      self.prompts = list(dataset.conditions.embeddings.prompts[:-1])
    self.tokenizer, self.extractor = tokenizer, extractor
    self.runner = runner_for(self.sampler, mesh, self.batch_size, tokenizer, extractor,
                             dataset.condition, self.clip, teacher.image_codes)

  def due(self, step: int) -> bool:
    return (self.every > 0 and step % self.every == 0) or step in self.at

  def __call__(self, params, step: int) -> Dict[str, float]:
    sigma = np.float32(samplers.generator_noise(self.config, step))
    out = generate(self.sampler, self.labels, self.mesh, self.batch_size, self.seed,
                   self.tokenizer, self.extractor, runner=self.runner,
                   inputs=samplers.generator_inputs(self.sampler, params, sigma),
                   clip=self.clip)
    return score(out, self.labels, self.dataset, self.ref, self.clip, self.prompts)


def for_run(config, teacher, dataset, mesh, params, init_logits=None) -> List[RunEvaluation]:
  """The run's evaluations: every entry of `config.evals` that ever runs (`init_logits`: the
  run's x_init code logits, see `samplers.init_code_logits`)."""
  return [RunEvaluation(name, entry, config, teacher, dataset, mesh, params,
                        init_logits=init_logits)
          for name, entry in (config.get("evals") or {}).items() if runs(entry)]


# --- One evaluation, as `python -m dimo_jax.evaluate` runs it --------------------------------

PARAMS = ("ema", "generator")  # --params: the EMA or the raw generator parameters


class EvaluateError(UserError):
  """Flags or files an evaluation cannot run with: a missing scorer, a reference .npz of other
  features, options of the teacher given for the generator, ..."""


def teacher_sampler(config: ml_collections.ConfigDict, teacher: teachers.Teacher,
                    steps: int) -> samplers.Sampler:
  """The teacher at `steps` steps of its own decode rule with the config's `cfg_w` (MaskGIT's
  rule also reads `r_temp`, `sm_temp`, `sched_mode`; Meissonic's is the release's scheduler,
  guided against the negative prompt), as the run's own final evaluation samples it."""
  try:
    config_check.check_guidance(config, teacher, keys=("cfg_w",))
  except ValueError as e:
    raise EvaluateError(f"--cfg / --config.cfg_w: {e}") from None
  return samplers.run_teacher(config, teacher, steps)


def generator_sampler(checkpoint: str, teacher: teachers.Teacher, which: str,
                      gen_temp: Optional[float] = None, flag: str = "--checkpoint",
                      teacher_dir: str = "", tteo=None) -> samplers.Sampler:
  """The Di[M]O generator at `checkpoint` (see `checkpoints.find_checkpoint`) in one step, with its
  run's x_init ratio, embedding noise at that step and sampling temperature (or `gen_temp`).

  teacher: its module is the generator's (a text teacher's generator ignores the cond dict's
  unconditional and negative entries: it is never guided); its variables are not read.
  flag, teacher_dir: the flag that gave `checkpoint` and the teacher's directory, for errors.
  tteo: (steps, lr, reward) of test-time embedding optimization (`samplers.generator`).
  """
  params, run, step = checkpoints.load_generator(checkpoint, teacher, which, flag, teacher_dir)
  teacher = samplers.with_variables_for(teacher, run, teacher_dir or run.teacher_path)
  return samplers.generator(teacher, params, run, step, gen_temp, which, tteo)


_TABLE_COLUMNS = (("fid", "FID"), ("is", "IS"), ("precision", "Prec."), ("recall", "Rec."),
                  ("density", "Dens."), ("coverage", "Cov."), ("clip_score", "CLIP"))


def table(result: Dict[str, Any]) -> str:
  """The markdown header and row of one result: sampler, steps, N, then its metrics (over
  several seeds: each metric's mean +- its spread, and the number of seeds)."""
  scores = result["metrics"]
  names = [(k, t) for k, t in _TABLE_COLUMNS if k in scores]
  names += [(k, k) for k in sorted(scores) if k not in dict(_TABLE_COLUMNS)
            and k != "is_std" and not (k.endswith("_std") and k[:-4] in scores)]

  def cell(key):
    if key == "seeds":
      return str(scores[key])
    spread = f" ± {scores[key + '_std']:.2g}" if key + "_std" in scores else ""
    return f"{scores[key]:.4g}{spread}"

  head = ["sampler", "steps", "N"] + [t for _, t in names]
  row = [result["sampler"], str(result["steps"]), str(result["num_samples"])]
  row += [cell(k) for k, _ in names]
  return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
                    "| " + " | ".join(row) + " |"])


def prompt_config(config: ml_collections.ConfigDict,
                  prompts: Optional[str] = None) -> ml_collections.ConfigDict:
  """The config whose `prompts` dataset evaluation reads: `prompts` (a file) in place of the
  config's own prompt source, and the teacher's unconditional branch the config's negative
  prompt. The run's prompt cache is read only when it holds exactly these encodings; other
  prompts are encoded afresh and not cached (an evaluation set is encoded once)."""
  config = config.copy_and_resolve_references()
  if prompts is not None or not config.distil_neg_prompt:
    config.prompt_cache = None
    config.distil_neg_prompt = True
  if prompts is not None:
    config.prompts.file, config.prompts.tfds, config.prompts.limit = prompts, None, None
  return config


def prompt_source(config: ml_collections.ConfigDict) -> str:
  """Where `config.prompts` reads its prompts: the file, or 'tfds:name:split/field'."""
  spec = config.prompts
  if spec.get("file"):
    return spec.file
  return f"tfds:{spec.tfds}:{spec.get('tfds_split', 'train')}/{spec.get('tfds_field')}"


@dataclasses.dataclass(frozen=True)
class TextEvaluation:
  """What a text-to-image evaluation samples (module docstring).

  Attributes:
    sampler: the generator's or the teacher's.
    labels: int32[N], the prompt index of each sample.
    prompts: the P prompts.
    condition: prompt indices int[n] -> the `TextConditioned` cond dict (host arrays).
    tokenizer: the teacher's VQ-VAE.
    source: where the prompts come from (a file, or a tfds field).
  """
  sampler: samplers.Sampler
  labels: np.ndarray
  prompts: Tuple[str, ...]
  condition: Callable[[np.ndarray], Dict[str, np.ndarray]]
  tokenizer: Any
  source: str


def text_evaluation(config: ml_collections.ConfigDict, teacher: teachers.Teacher,
                    checkpoint: str, params: str, teacher_steps: int = 0,
                    prompts: Optional[str] = None, num_samples: Optional[int] = None,
                    flag: str = "--checkpoint") -> TextEvaluation:
  """The prompts, their conditions and the sampler of a text-to-image evaluation.

  Args:
    config: the run's config (dataset 'prompts', a `meissonic` teacher; `cfg_w` guides it).
    teacher: the loaded teacher (its text encoder encodes the prompts).
    checkpoint: the Di[M]O checkpoint (see `checkpoints.find_checkpoint`), unused for the teacher.
    params: 'ema' or 'generator'.
    teacher_steps: > 0 samples the teacher with its own rule at this many steps.
    prompts: a prompt file replacing the config's prompt source.
    num_samples: N (default P, every prompt once).
    flag: the flag that gave `checkpoint`, named in errors.
  """
  if config.get("dataset") != "prompts":
    raise EvaluateError(f"{config.teacher_path} is a text-to-image teacher: evaluation reads its "
                        f"prompts from dataset 'prompts', not {config.get('dataset')!r}")
  config = prompt_config(config, prompts)
  dataset = data.get(config, teacher)
  if teacher_steps:
    sampler = teacher_sampler(config, teacher, teacher_steps)
  else:
    sampler = generator_sampler(checkpoint, teacher, params, flag=flag,
                                teacher_dir=config.teacher_path)
  conditions = dataset.conditions
  count = conditions.num_prompts
  labels = (np.arange(num_samples or count) % count).astype(np.int32)
  return TextEvaluation(sampler, labels, tuple(conditions.embeddings.prompts[:-1]),
                        conditions.condition, dataset.tokenizer, prompt_source(config))


def evaluate(config: ml_collections.ConfigDict, workdir: str, checkpoint: Optional[str] = None,
             params: Optional[str] = None, teacher_steps: int = 0,
             num_samples: Optional[int] = None, seed: Optional[int] = None, batch_size: int = 0,
             extractor=None, reference: Optional[str] = None, save_png: bool = False,
             save_npz: bool = False, clip=None, prompts: Optional[str] = None,
             cfg: Optional[float] = None, gen_temp: Optional[float] = None,
             tteo_steps: int = 0, tteo_lr: Optional[float] = None,
             seeds: int = 1) -> Dict[str, Any]:
  """Samples, scores and writes one evaluation (`python -m dimo_jax.evaluate`, whose module
  docstring says what is sampled and scored, calls it); returns its result.

  Args:
    config: the run's config (dataset, teacher, tokenizer, mesh, precision, guidance).
    workdir: where results and samples go; the generator's run by default.
    checkpoint: a Di[M]O workdir, its checkpoints/ or one checkpoints/<step>.
    params: 'ema' or 'generator' (default: config.eval_params).
    teacher_steps: > 0 evaluates the teacher at this many steps instead of the generator.
    num_samples: N (default 50 000; text-to-image: every prompt once).
    seed: the sampling seed (default the run's own final evaluation's, `train.eval_seed`: with
      the same batch size and samples the codes are those of its metrics.json).
    batch_size: the global batch (default config.eval_batch_size), rounded up to a multiple
      of the device count.
    extractor: the FID network (`.model`, `.variables`), required on imagenet256.
    reference: the reference .npz, required on imagenet256.
    save_png, save_npz: keep the samples.
    clip: a convert.clip.Clip (`load_clip`) for CLIP score (text-to-image).
    prompts: a prompt file replacing the config's prompts (text-to-image).
    cfg: the teacher's guidance scale (default: config.cfg_w).
    gen_temp: the generator's sampling temperature (default: its run's `gen_temp`).
    tteo_steps, tteo_lr: test-time embedding optimization of the generator's input embeddings
      against the run's reward (rewards.py; digits only): SGD steps (0: off) and their size
      (default: the config's tteo.lr).
    seeds: evaluate at sampling seeds seed, seed + 1, ...: each metric is then the mean over
      them with its `<metric>_std` and `seeds` (`metrics.over_seeds`).
  """
  params = params or config.get("eval_params", "ema")
  if params not in PARAMS:
    raise EvaluateError(f"params must be one of {PARAMS}, got {params!r}")
  if seeds < 1:
    raise EvaluateError(f"--seeds: expected at least 1 sampling seed, found {seeds}")
  if (num_samples is not None and num_samples < 1) or teacher_steps < 0:
    raise EvaluateError(f"expected num_samples >= 1 and teacher_steps >= 0, found {num_samples} "
                        f"and {teacher_steps}")
  if gen_temp is not None and (teacher_steps or not gen_temp > 0):
    raise EvaluateError(f"gen_temp is the one-step generator's temperature, > 0; found {gen_temp}"
                        + (" with teacher_steps" if teacher_steps else ""))
  if cfg is not None and not teacher_steps:
    raise EvaluateError("cfg is the teacher's guidance: the generator samples unguided in one step "
                        "(pass teacher_steps)")
  mesh = parallel.make_mesh(config.num_devices, config.mesh.data, config.mesh.fsdp)
  batch_size = parallel.round_batch(batch_size or config.eval_batch_size, mesh)
  seed = samplers.eval_seed(config) if seed is None else seed
  # The generator's run: --checkpoint, else the --workdir results go to.
  flag = "--checkpoint" if checkpoint else "--workdir"
  if cfg is not None:
    config = config.copy_and_resolve_references()
    config.cfg_w = cfg
  # The generator's parameters come from its checkpoint: the teacher's are read only to sample it.
  teacher = teachers.load(config.teacher_path, dtypes.compute_dtype(config),
                          with_variables=bool(teacher_steps))
  condition, text = data.class_condition, None
  if teacher.text_conditioned:
    if gen_temp is not None:
      raise EvaluateError("gen_temp sweeps are for class-conditional runs so far; a text run's "
                          "generator samples at its config's gen_temp")
    if (extractor is None) != (reference is None):
      raise EvaluateError("FID of text-to-image samples needs both --inception and --ref")
    if clip is None and extractor is None:
      raise EvaluateError("nothing to score text-to-image samples with: pass --clip (CLIP score) "
                          "and/or --inception with --ref (FID)")
    text = text_evaluation(config, teacher, checkpoint or workdir, params, teacher_steps,
                           prompts, num_samples, flag)
    dataset, sampler, labels = None, text.sampler, text.labels
    condition, tokenizer, images_mode = text.condition, text.tokenizer, extractor is not None
  else:
    if prompts is not None or clip is not None:
      raise EvaluateError(f"prompts and CLIP score are for text-to-image teachers; "
                          f"{config.teacher_path} is class-conditional")
    dataset = data.get(config, teacher)
    images_mode = isinstance(dataset, data.ImageNet256)
    if images_mode and (extractor is None or reference is None):
      raise EvaluateError(f"dataset {config.dataset!r} is scored with the FID Inception network: "
                          "pass --inception and --ref")
    tokenizer = dataset.tokenizer if images_mode else None
    if tokenizer is not None:
      tokenizers.check_pairing(tokenizer, config.tokenizer_path, teacher.image_codebook_size,
                               config.teacher_path)
    if teacher_steps:
      sampler = teacher_sampler(config, teacher, teacher_steps)
    else:
      tteo = None
      if tteo_steps:
        try:
          tteo = rewards.for_tteo(config, tteo_steps, tteo_lr, dataset=dataset,
                                  teacher=teacher)
        except ValueError as e:
          raise EvaluateError(f"--tteo_steps: test-time embedding optimization uses the run's "
                              f"reward: {e}") from None
      sampler = generator_sampler(checkpoint or workdir, teacher, params, gen_temp, flag,
                                  config.teacher_path, tteo)
    labels = class_balanced_labels(num_samples or 50000, teacher.num_classes)
  ref = (references.load_reference(reference, extractor, mesh, batch_size) if images_mode
         else None)

  if save_npz:
    outputs.check_replaceable(os.path.join(workdir, f"samples_{sampler.tag}.npz"), "npz",
                              "--save_npz")
  os.makedirs(workdir, exist_ok=True)
  sink = outputs.SampleSink(workdir, sampler.tag, dataset, labels, save_png, save_npz,
                    None if text is None else [text.prompts[i] for i in labels])
  per_seed, speeds = [], []
  for offset in range(seeds):  # the samples of the first seed are the ones kept
    out = generate(sampler, labels, mesh, batch_size, seed + offset, tokenizer,
                   extractor if images_mode else None,
                   sink if sink.active and offset == 0 else None, condition=condition, clip=clip,
                   image_codes=teacher.image_codes)
    per_seed.append(score(
        out, labels, dataset if text is None and not images_mode else None, ref, clip,
        None if text is None else text.prompts))
    speeds.append(out["images_per_second"])
  sink.close()
  scores = per_seed[0] if seeds == 1 else metrics.over_seeds(per_seed)
  result = {"sampler": sampler.description, "tag": sampler.tag, "steps": sampler.steps,
            "step": sampler.step, "num_samples": len(labels),
            "seed": seed if seeds == 1 else list(range(seed, seed + seeds)),
            "reference": reference, "images_per_second": speeds[-1], "metrics": scores}
  if text is not None:
    result.update(prompts=text.source, num_prompts=len(text.prompts))
  checkpoints.write_json(os.path.join(workdir, f"eval_{sampler.tag}.json"), result)
  writer = writers.create(workdir, config)
  writer.write_scalars(sampler.step, {f"eval_{sampler.tag}/{k}": v for k, v in scores.items()})
  writer.close()
  return result
