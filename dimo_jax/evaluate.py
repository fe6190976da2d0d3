"""Sample-quality evaluation as the papers report it: N samples, FID, IS, PRDC and CLIP score
(issue #5).

  python -m dimo_jax.evaluate --config configs/maskgit_imagenet256.py --workdir runs/imagenet256 \
      --inception checkpoints/fid_inception --ref VIRTUAL_imagenet256_labeled.npz \
      [--checkpoint runs/imagenet256/checkpoints/50000] [--params ema|generator] \
      [--teacher_steps 8 --config.cfg_w=3] [--num_samples 50000] [--save_npz] [--save_png]
  python -m dimo_jax.evaluate --config configs/meissonic_1024.py --workdir runs/meissonic \
      --clip checkpoints/clip --prompts coco_prompts.txt [--teacher_steps 64 [--cfg 9]] \
      [--inception checkpoints/fid_inception --ref coco_ref.npz] [--num_samples 30000]
  python -m dimo_jax.evaluate stats --inception checkpoints/fid_inception \
      (--images DIR | --tfds imagenet2012:validation) --image_size 256 --out ref.npz

Class-conditional evaluation draws `num_samples` (default 50 000) class-balanced labels (N / C
of each class, in the order 0, 1, ..., C-1, 0, 1, ... so every contiguous split of the Inception
Score is balanced too) and samples them with the Di[M]O generator of `--checkpoint` (default:
the workdir) in one step, or with the teacher at `--teacher_steps` decoding steps and the
config's guidance (`cfg_w` or --cfg, `r_temp`, `sched_mode`). Every global batch is split over
all devices of all processes (the config's mesh); sample i always gets the same random numbers,
whatever the device count, and the default --seed is that of the run's own final evaluation
(`samplers`: the same codes as its metrics.json for the same samples and batch).

  imagenet256: codes are decoded by the config's tokenizer, quantized to uint8 (the images a
      saved .npz holds, so ADM's evaluation suite on that file sees the same pictures) and fed
      to the FID Inception network. Reported: fid (against --ref), is and is_std, and
      precision, recall, density and coverage (k = 5) against the reference features.
  digits, synthetic: the dataset's own scorer on the codes (fd and accuracy; true_nll,
      mode_coverage and in_mode).

Text-to-image evaluation (dataset 'prompts', a `meissonic` teacher) draws one sample per prompt
of the prompt set: the config's `prompts` (data/prompts.config_prompts), or the file --prompts
names (one prompt a line) in their place; with --num_samples, the prompts repeat round-robin
(sample i has prompt i mod P) up to that count. Each process builds the prompt encodings of its
own devices' rows only. The generator samples in one step (its run's x_init ratio, embedding
noise and temperature); the teacher with its own rule, the release's scheduler
(`sampling.meissonic_sample`, --teacher_steps steps, guidance --cfg or the config's `cfg_w`,
against the config's `negative_prompt`). Codes are decoded by the teacher's VQ-VAE and
quantized to uint8. Reported:
clip_score, the mean over samples of 100 * max(cos, 0) between the CLIP image embedding of the
sample (the uint8 image, CLIP's own preprocessing) and the text embedding of its prompt, with
the model --clip names (`python -m dimo_jax.convert clip`); and fid, is and PRDC as above when
--inception and --ref are given.

--ref is an .npz with `mu` and `sigma` (pool-feature statistics), as ADM's reference batches
(VIRTUAL_imagenet256_labeled.npz) and `stats` write. PRDC uses its `features` when present
(written by `stats`), else its `arr_0` images (ADM's batches), which go through the network here;
with neither, PRDC is left out. A file with `arr_0` but no `mu` gets its statistics from those
images too.

Results go to W/eval_<tag>.json (tag: the checkpoint step, `<step>_generator` for the raw
parameters, `teacher_<n>step` for the teacher), to TensorBoard under `eval_<tag>/`, and as a
table row on stdout. --save_npz writes W/samples_<tag>.npz (`arr_0` uint8[N, H, W, 3] and
`arr_1` int32[N] labels, ADM's layout; for text, prompt indices) and --save_png
W/samples_<tag>/<index>.png; for text, either also writes W/samples_<tag>_prompts.txt, the
prompt of sample i on line i + 1 (line breaks inside a prompt written as spaces).

Before sampling, the config's tokenizer must have the teacher's codebook and the checkpoint's
generator the teacher's parameter shapes. A user's mistake (a missing --checkpoint, a damaged
checkpoint step, a flag the evaluation cannot honour) is one `error:` line and exit status 1.
"""

import dataclasses
import json
import os
import zipfile
from typing import Any, Callable, Dict, List, Optional, Tuple

from absl import flags
import jax
import ml_collections
from ml_collections import config_flags
import numpy as np

from dimo_jax import (checkpoints, cli, config_check, data, distributed, dtypes, evaluators,
                      metrics, outputs, parallel, rewards, samplers, teachers, tokenizers,
                      visualize, writers)
from dimo_jax.evaluators import generate
from dimo_jax.data.digits import class_balanced_labels
from dimo_jax.errors import UserError
from dimo_jax.metrics import reference as references

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
  return samplers.generator(teacher, params, run, step, gen_temp, which, tteo)


class NpzWriter:
  """Writes an .npz with `arr_0` uint8[N, H, W, 3] a batch at a time (ADM's sample layout).

  The images are streamed into the zip member, so 50 000 of them never sit in memory at once;
  `np.load` reads the file as one written by `np.savez`.
  """

  def __init__(self, path: str, total: int):
    self.path, self.total, self.written = path, total, 0
    self._tmp = path + ".tmp"
    self._zip = zipfile.ZipFile(self._tmp, "w", allowZip64=True)
    self._member = None

  def add(self, images: np.ndarray) -> None:
    images = np.ascontiguousarray(images, np.uint8)
    if self._member is None:
      self._member = self._zip.open("arr_0.npy", "w", force_zip64=True)
      header = np.lib.format.header_data_from_array_1_0(images)
      header["shape"] = (self.total,) + images.shape[1:]
      np.lib.format.write_array_header_2_0(self._member, header)
    self._member.write(images.tobytes())
    self.written += len(images)

  def close(self, labels: np.ndarray) -> None:
    """Ends `arr_0` (which must hold `total` images), adds `arr_1` = labels."""
    if self.written != self.total:
      raise ValueError(f"{self.path}: {self.written} images written, {self.total} announced")
    self._member.close()
    with self._zip.open("arr_1.npy", "w", force_zip64=True) as f:
      np.lib.format.write_array(f, np.asarray(labels))
    self._zip.close()
    os.replace(self._tmp, self.path)


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
  """Samples, scores and writes one evaluation (see the module docstring); returns its result.

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
  sink = SampleSink(workdir, sampler.tag, dataset, labels, save_png, save_npz,
                    None if text is None else [text.prompts[i] for i in labels])
  per_seed, speeds = [], []
  for offset in range(seeds):  # the samples of the first seed are the ones kept
    out = generate(sampler, labels, mesh, batch_size, seed + offset, tokenizer,
                   extractor if images_mode else None,
                   sink if sink.active and offset == 0 else None, condition=condition, clip=clip,
                   image_codes=teacher.image_codes)
    per_seed.append(evaluators.score(
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


class SampleSink:
  """Keeps the samples on process 0: W/samples_<tag>/<index>.png and/or W/samples_<tag>.npz,
  and for text-to-image W/samples_<tag>_prompts.txt (sample i's prompt on line i + 1).

  Toy datasets have no decoder on the device: their pictures are `dataset.images(codes)`,
  grey levels repeated over three channels.
  """

  def __init__(self, workdir: str, tag: str, dataset, labels: np.ndarray, save_png: bool,
               save_npz: bool, prompts: Optional[List[str]] = None):
    self.dataset, self.labels = dataset, labels
    self.active = save_png or save_npz
    writer = jax.process_index() == 0
    self.png_dir = os.path.join(workdir, f"samples_{tag}") if save_png and writer else None
    if self.png_dir is not None:
      os.makedirs(self.png_dir, exist_ok=True)
    self.npz = (NpzWriter(os.path.join(workdir, f"samples_{tag}.npz"), len(labels))
                if save_npz and writer else None)
    if prompts is not None and self.active and writer:
      with open(os.path.join(workdir, f"samples_{tag}_prompts.txt"), "w", encoding="utf-8") as f:
        f.write("".join(" ".join(prompt.splitlines()) + "\n" for prompt in prompts))

  def __call__(self, start: int, batch: Dict[str, np.ndarray]) -> None:
    images = batch.get("images")
    if images is None:
      pictures = np.asarray(self.dataset.images(batch["codes"]), np.float32)
      if pictures.ndim == 3:
        pictures = np.repeat(pictures[..., None], 3, axis=-1)
      images = np.round(np.clip(pictures, 0.0, 1.0) * 255.0).astype(np.uint8)
    if self.png_dir is not None:
      for offset, image in enumerate(images):
        visualize.save_png(image, os.path.join(self.png_dir, f"{start + offset:06d}.png"))
    if self.npz is not None:
      self.npz.add(images)

  def close(self) -> None:
    if self.npz is not None:
      self.npz.close(self.labels)


_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Results and samples; the generator's run by "
                               "default.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Di[M]O workdir, its checkpoints/ or a "
                                  "checkpoints/<step> (default: --workdir).")
_PARAMS = flags.DEFINE_enum("params", None, PARAMS, "The EMA or the raw generator parameters "
                            "(default: the config's eval_params).")
_TEACHER_STEPS = flags.DEFINE_integer("teacher_steps", 0, "Evaluate the teacher at this many "
                                      "decoding steps instead of the generator.")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", None, "Samples to draw: class-balanced "
                                    "(default 50000), or text-to-image prompts round-robin "
                                    "(default: every prompt once).")
_SEED = flags.DEFINE_integer("seed", None, "Sampling seed (default: that of the run's own "
                             "final evaluation, the config's global_seed + 1).")
_GEN_TEMPS = flags.DEFINE_list("gen_temps", [], "The generator at each of these sampling "
                               "temperatures (e.g. 1,2,4,7,10), one evaluation each; default: "
                               "its run's gen_temp.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 0, "Global batch (default: the config's "
                                   "eval_batch_size), rounded up to a multiple of the devices.")
_INCEPTION = flags.DEFINE_string("inception", None, "FID Inception directory "
                                 "(python -m dimo_jax.convert fid-inception).")
_REF = flags.DEFINE_string("ref", None, "Reference .npz: mu and sigma, and features or arr_0.")
_CFG = flags.DEFINE_float("cfg", None, "With --teacher_steps: the teacher's guidance scale "
                          "(default: the config's cfg_w; a text-to-image teacher is guided against "
                          "the config's negative_prompt).")
_CLIP = flags.DEFINE_string("clip", None, "Text-to-image: CLIP model directory for CLIP score "
                            "(python -m dimo_jax.convert clip).")
_PROMPTS = flags.DEFINE_string("prompts", None, "Text-to-image: a prompt file (one a line) in "
                               "place of the config's prompts.")
_SAVE_PNG = flags.DEFINE_bool("save_png", False, "Save every sample as a PNG.")
_SAVE_NPZ = flags.DEFINE_bool("save_npz", False, "Save the samples as one .npz (ADM's layout).")
_IMAGES = flags.DEFINE_string("images", None, "stats: a folder of images (searched recursively).")
_TFDS = flags.DEFINE_string("tfds", None, "stats: a tensorflow-datasets 'name:split'.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 256, "stats: side of the centre crop.")
_KEEP = flags.DEFINE_integer("keep_features", 10000, "stats: pool features kept for PRDC "
                             "(-1: all).")
_OUT = flags.DEFINE_string("out", None, "stats: the .npz to write.")
_TTEO_STEPS = flags.DEFINE_integer("tteo_steps", 0, "Test-time embedding optimization: SGD "
                                   "steps on the generator's input embeddings raising the "
                                   "run's reward (digits), 0 off.")
_TTEO_LR = flags.DEFINE_float("tteo_lr", None, "Its step size (default: the config's tteo.lr).")
_SEEDS = flags.DEFINE_integer("seeds", 1, "Evaluate at this many sampling seeds (--seed, "
                              "--seed + 1, ...) and report each metric's mean and spread.")


def load_extractor(path: Optional[str]):
  if path is None:
    return None
  from dimo_jax.models import fid_inception  # only image datasets need the network
  return fid_inception.load(path)


def load_clip(path: Optional[str]):
  if path is None:
    return None
  from dimo_jax.convert import clip  # only text-to-image evaluation needs it
  return clip.load_clip(path)


def stats_main() -> None:
  """`python -m dimo_jax.evaluate stats`: reference mu, sigma and features of real images."""
  if (_IMAGES.value is None) == (_TFDS.value is None) or _OUT.value is None:
    raise EvaluateError("stats needs --out and one of --images, --tfds")
  if _INCEPTION.value is None:
    raise EvaluateError("stats needs --inception")
  outputs.check_replaceable(_OUT.value, "npz", "--out")
  mesh = parallel.make_mesh()
  batch_size = parallel.round_batch(_BATCH_SIZE.value or 64, mesh)
  if _IMAGES.value is not None:
    count, batches = references.folder_batches(_IMAGES.value, _IMAGE_SIZE.value, batch_size)
  else:
    count, batches = references.tfds_batches(_TFDS.value, _IMAGE_SIZE.value, batch_size)
  stats = references.image_features(batches, count, load_extractor(_INCEPTION.value), mesh,
                                    batch_size, _KEEP.value)
  references.write_reference(_OUT.value, stats)
  print(f"wrote {_OUT.value}: {int(stats['count'])} images, "
        f"{stats['mu'].shape[0]} features, {len(stats['features'])} kept")


def main(argv) -> None:
  distributed.initialize()  # before any JAX computation, in every process
  if argv[1:] == ["stats"]:
    stats_main()
    return
  if len(argv) > 1:
    raise EvaluateError(f"unexpected arguments: {argv[1:]} (the one sub-command is 'stats')")
  if _CONFIG.value is None or _WORKDIR.value is None:
    raise EvaluateError("--config and --workdir are required")
  try:
    temps = [float(t) for t in _GEN_TEMPS.value] or [None]
  except ValueError:
    raise EvaluateError(f"--gen_temps: expected numbers, found {_GEN_TEMPS.value}") from None
  if _TTEO_STEPS.value < 0 or (_TTEO_LR.value is not None and not _TTEO_LR.value > 0):
    raise EvaluateError(f"--tteo_steps must be >= 0 and --tteo_lr > 0, found "
                        f"{_TTEO_STEPS.value} and {_TTEO_LR.value}")
  extractor, clip = load_extractor(_INCEPTION.value), load_clip(_CLIP.value)
  for temp in temps:
    result = evaluate(
        _CONFIG.value, _WORKDIR.value, checkpoint=_CHECKPOINT.value, params=_PARAMS.value,
        teacher_steps=_TEACHER_STEPS.value, num_samples=_NUM_SAMPLES.value, seed=_SEED.value,
        batch_size=_BATCH_SIZE.value, extractor=extractor,
        reference=_REF.value, save_png=_SAVE_PNG.value, save_npz=_SAVE_NPZ.value,
        clip=clip, prompts=_PROMPTS.value, cfg=_CFG.value, gen_temp=temp,
        tteo_steps=_TTEO_STEPS.value, tteo_lr=_TTEO_LR.value, seeds=_SEEDS.value)
    if jax.process_index() == 0:
      print(table(result))
      print(json.dumps(result, indent=2))


if __name__ == "__main__":
  cli.run(main)
