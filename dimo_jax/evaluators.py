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
"""

import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import jax
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from dimo_jax import data, metrics, parallel, samplers
from dimo_jax.data.digits import class_balanced_labels
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
               mesh, params, extractor=None, clip=None):
    self.name, self.entry, self.mesh = name, entry, mesh
    self.every, self.at = int(entry.every), tuple(entry.get("at", ()))
    self.config = config
    self.batch_size = parallel.round_batch(config.eval_batch_size, mesh)
    self.seed = samplers.eval_seed(config)
    gen_temp = float(entry.gen_temp) or None
    self.sampler = samplers.generator(teacher, params, config, 0, gen_temp=gen_temp)
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
                   inputs=(params, sigma, None), clip=self.clip)
    return score(out, self.labels, self.dataset, self.ref, self.clip, self.prompts)


def for_run(config, teacher, dataset, mesh, params) -> List[RunEvaluation]:
  """The run's evaluations: every entry of `config.evals` that ever runs."""
  return [RunEvaluation(name, entry, config, teacher, dataset, mesh, params)
          for name, entry in (config.get("evals") or {}).items() if runs(entry)]
