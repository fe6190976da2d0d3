"""Sample grids from a teacher (multi-step MaskGIT decoding) or a Di[M]O generator (one step).

  python -m dimo_jax.sample --teacher checkpoints/halton_maskgit --tokenizer checkpoints/vqgan \
      --steps 8 --cfg 3 --labels 1,7,282 --out teacher.png
  python -m dimo_jax.sample --generator runs/imagenet256 --teacher checkpoints/halton_maskgit \
      --tokenizer checkpoints/vqgan --labels 1,7,282 --out generator.png
  python -m dimo_jax.sample --teacher checkpoints/meissonic --prompt "a red ball on a blue cube" \
      --prompt "a boat in a cup of water" --out meissonic.png
  python -m dimo_jax.sample --generator runs/meissonic --teacher checkpoints/meissonic \
      --prompt_file prompts.txt --out generator.png

The PNG holds one row per label (or prompt) and --samples_per_label columns of decoded images.
A text-to-image teacher (a `meissonic` directory, whose VQ-VAE is the default --tokenizer) is
sampled with the release's own sampler (`sampling.meissonic_sample`: 64 steps, guidance 9
with --negative_prompt, the release's negative prompt unless given, Gumbel temperature 2 -> 0,
the scheduler config's masking schedule); a generator distilled from it in one step. --teacher
names the module (and, without --generator, the weights). --generator is a Di[M]O workdir, its
`checkpoints/` directory (latest step) or one `checkpoints/<step>`; its EMA parameters are used
unless --params generator, with the run's own config.json for x_init (fixed_ratio), the
embedding noise at that step and the sampling temperature. Images are mapped from the
tokenizer's value range to [0, 1] (`data.value_range`: model.json's "value_range" if present).

The tokenizer must have the teacher's codebook, and the generator the teacher's parameter
shapes; a user's mistake (a missing directory, a label out of range, a damaged checkpoint) is
one `error:` line and exit status 1 (2 for a malformed command line).
"""

import math
import os
import sys
import types
from typing import List, Optional, Sequence

from absl import flags

import numpy as np

from dimo_jax import (checkpoints, cli, config_check, data, defaults, dtypes, modeldir, outputs,
                      parallel, samplers, sampling, teachers, tokenizers, visualize)
from dimo_jax.data import prompts as prompt_files
from dimo_jax.errors import UserError
from dimo_jax.teachers import meissonic

# Teacher decoding flags and their defaults (those of configs/maskgit_imagenet256.py).
_TEACHER_DEFAULTS = {"steps": 8, "cfg": 3.0, "temperature": 4.5, "sched": "arccos"}
# The same flags for a text-to-image teacher: the release's sampler (its inference.py); the
# temperature is where the Gumbel scale starts (it falls linearly to 0); the schedule, when not
# given, is the one the scheduler config names.
_TEXT_DEFAULTS = {"steps": meissonic.SAMPLING_STEPS, "cfg": meissonic.GUIDANCE_SCALE,
                  "temperature": meissonic.TEMPERATURE[0], "sched": None}


class SampleError(UserError):
  """A flag whose value cannot be sampled with: a label out of range, prompts for a
  class-conditional teacher, a schedule the sampler does not know."""


def parse_labels(text: str, num_classes: int) -> np.ndarray:
  """'1,7,282' -> int32[3], each checked against the teacher's `num_classes`."""
  labels = []
  for item in text.split(","):
    try:
      label = int(item)
    except ValueError:
      raise SampleError(f"--labels: {item.strip()!r} is not an integer class label") from None
    if not 0 <= label < num_classes:
      raise SampleError(f"--labels: label {label} is out of range: the teacher has "
                        f"{num_classes} classes (0 to {num_classes - 1})")
    labels.append(label)
  return np.asarray(labels, np.int32)


def read_prompts(args: types.SimpleNamespace) -> List[str]:
  """The prompts of --prompt (in order) then of --prompt_file (one a line)."""
  prompts = list(args.prompt or [])
  if args.prompt_file is not None:
    try:
      prompts += prompt_files.read_prompt_file(args.prompt_file)
    except ValueError as e:  # not UTF-8, or no prompt in it: the message names the file
      raise SampleError(f"--prompt_file: {e}") from None
  return prompts


def prompt_grid(args: types.SimpleNamespace, prompts: List[str]) -> np.ndarray:
  """The grid of a text-to-image teacher or of its generator: one row a prompt."""
  dtype = dtypes.DTYPES[args.dtype]
  teacher = teachers.load(args.teacher, dtype, with_variables=args.generator is None)
  tokenizer = tokenizers.load(args.tokenizer or args.teacher)
  if args.tokenizer is not None:  # the teacher's own VQ-VAE is checked as it loads
    tokenizers.check_pairing(tokenizer, args.tokenizer, teacher.codebook_size, args.teacher)
  negative = (meissonic.NEGATIVE_PROMPT if args.negative_prompt is None
              else args.negative_prompt)
  all_prompts = prompts * args.samples_per_label  # a block per column, as the labels
  batch = min(args.batch_size, len(all_prompts))

  if args.generator is None:
    flags = {name: _TEXT_DEFAULTS[name] if getattr(args, name) is None else getattr(args, name)
             for name in _TEXT_DEFAULTS}
    schedule = flags["sched"] or teacher.description["scheduler"]["masking_schedule"]
    if schedule not in meissonic.MASKING_SCHEDULES:
      raise SampleError(f"--sched: the text-to-image sampler knows "
                        f"{list(meissonic.MASKING_SCHEDULES)}, got {schedule!r}")
    sampler = samplers.decoding(teacher, flags["steps"], flags["cfg"],
                                {"temperature": (flags["temperature"], 0.0),
                                 "masking_schedule": schedule})
  else:
    params, config, step = checkpoints.load_generator(args.generator, teacher, args.params,
                                                      teacher_dir=args.teacher)
    sampler = samplers.generator(samplers.with_variables_for(teacher, config, args.teacher),
                                 params, config, step,
                                 tteo=tteo_of(args, config, teacher, tokenizer, prompts))

  # Every distinct prompt is encoded once; sample i is conditioned on row i of the table (its
  # `prompt` entry is what a reward looks the prompt up by).
  table = {"prompt": [np.arange(len(prompts), dtype=np.int32)]}
  for start in range(0, len(prompts), batch):
    cond = meissonic.prompt_condition(teacher, prompts[start:start + batch], negative)
    for name, value in cond.items():
      table.setdefault(name, []).append(np.asarray(value))
  table = {name: np.concatenate(parts) for name, parts in table.items()}
  rows = lambda idx: {name: value[np.asarray(idx) % len(prompts)]
                      for name, value in table.items()}
  codes = samplers.MeshSampler(sampler, parallel.make_mesh(), batch, rows)(
      np.arange(len(all_prompts)), args.seed)
  images = data.decode_images(tokenizer, codes, batch)
  return visualize.image_grid(images, rows=len(prompts), scale=1)


def tteo_of(args: types.SimpleNamespace, run, teacher, tokenizer,
            prompts: Optional[List[str]] = None):
  """(steps, lr, reward) of --tteo_steps (None when 0): the run's reward, or the one the
  --reward_inception / --class_map or --reward_clip flags name, checked before any sampling."""
  if not args.tteo_steps:
    return None
  from dimo_jax import rewards
  overrides = {}
  if args.reward_inception is not None or args.class_map is not None:
    overrides.update(kind="inception", inception_path=args.reward_inception or "",
                     class_map=args.class_map or "")
  if args.reward_clip is not None:
    overrides.update(kind="clip", clip_path=args.reward_clip)
  try:
    # What the run drew its prompts from is no matter here: these are the grid's.
    return rewards.for_tteo(run, args.tteo_steps, args.tteo_lr, overrides,
                            "prompts" if prompts is not None else None, teacher=teacher,
                            tokenizer=tokenizer, prompts=prompts)
  except ValueError as e:
    raise SampleError(f"--tteo_steps: {e}") from None


def sample_grid(args: types.SimpleNamespace) -> np.ndarray:
  """The grid the flags ask for: uint8[rows*(H+1)+1, cols*(W+1)+1, 3]."""
  for flag, path in (("--teacher", args.teacher), ("--tokenizer", args.tokenizer)):
    if path is not None and not os.path.isdir(path):
      raise FileNotFoundError(f"{flag}: {path} does not exist")
  description = modeldir.read_description(args.teacher, "teacher")
  prompts = read_prompts(args)
  if teachers.kind_of(description, args.teacher).conditioning == teachers.TEXT:
    if not prompts:
      raise SampleError(f"--teacher {args.teacher} is a text-to-image teacher: give --prompt or "
                        "--prompt_file, not --labels")
    return prompt_grid(args, prompts)
  if prompts:
    raise SampleError(f"--prompt: --teacher {args.teacher} is a class-conditional "
                      f"{description['kind']!r} teacher; give --labels")
  if args.tokenizer is None:
    raise SampleError("--tokenizer is required with a class-conditional teacher")
  teacher = teachers.load(args.teacher, dtypes.DTYPES[args.dtype],
                          with_variables=args.generator is None)
  labels = parse_labels(args.labels, teacher.num_classes)
  tokenizer = tokenizers.load(args.tokenizer)
  tokenizers.check_pairing(tokenizer, args.tokenizer, teacher.image_codebook_size, args.teacher)
  # Label l in row l: image_grid fills columns first, so the labels repeat as a block.
  all_labels = np.tile(labels, args.samples_per_label)
  batch = min(args.batch_size, len(all_labels))

  if args.generator is None:
    flags = {name: _TEACHER_DEFAULTS[name] if getattr(args, name) is None else getattr(args, name)
             for name in _TEACHER_DEFAULTS}
    if args.cfg is None and not teacher.supports_guidance:
      flags["cfg"] = 0.0  # google-maskgit has no unconditional token
    if flags["sched"] not in sampling.SCHED_MODES:
      raise SampleError(f"--sched: expected one of {list(sampling.SCHED_MODES)}, found "
                        f"{flags['sched']!r}")
    config = defaults.reference_config()
    config.update(cfg_w=flags["cfg"], r_temp=flags["temperature"], sched_mode=flags["sched"])
    if teacher.kind.decode == "maskbit":  # the release's guidance annealing, from its YAML
      release = teacher.description.get("release_sampler") or {}
      config.update({key: release[key] for key in ("guidance_annealing", "scale_pow")
                     if release.get(key) is not None})
    try:
      config_check.check_guidance(config, teacher, keys=("cfg_w",))
    except ValueError as e:
      raise SampleError(f"--cfg: {e}") from None
    sampler = samplers.run_teacher(config, teacher, flags["steps"])
  else:
    params, config, step = checkpoints.load_generator(args.generator, teacher, args.params,
                                                      teacher_dir=args.teacher)
    sampler = samplers.generator(samplers.with_variables_for(teacher, config, args.teacher),
                                 params, config, step,
                                 tteo=tteo_of(args, config, teacher, tokenizer))
  codes = samplers.MeshSampler(sampler, parallel.make_mesh(), batch)(all_labels, args.seed)
  images = data.decode_images(tokenizer, teacher.image_codes(codes), batch)
  return visualize.image_grid(images, rows=len(labels), scale=1)


# The command's own flags: a FlagValues apart from absl's global one, so that `main` can be
# called in a process that also holds `dimo_jax.evaluate`'s (--seed, --cfg, ...).
FLAGS = flags.FlagValues()
flags.DEFINE_string("teacher", None, "teacher directory (dimo_jax.convert)", flag_values=FLAGS)
flags.DEFINE_string("tokenizer", None, "tokenizer directory (dimo_jax.convert); a text-to-image "
                    "teacher's own VQ-VAE by default", flag_values=FLAGS)
flags.DEFINE_string("generator", None, "Di[M]O workdir or checkpoint: sample its generator in "
                    "one step", flag_values=FLAGS)
flags.DEFINE_enum("params", "ema", sorted(checkpoints.STATE_FIELDS), "with --generator: the EMA "
                  "or the raw generator parameters", flag_values=FLAGS)
flags.DEFINE_string("labels", None, "comma-separated class labels, one a row", flag_values=FLAGS)
flags.DEFINE_multi_string("prompt", None, "a prompt, one a row (text-to-image teacher; repeat "
                          "the flag)", flag_values=FLAGS)
flags.DEFINE_string("prompt_file", None, "a file of prompts, one a line (after the --prompt "
                    "ones)", flag_values=FLAGS)
flags.DEFINE_string("negative_prompt", None, "the text-to-image teacher's guidance prompt "
                    "(default: the release's negative prompt; '' for none)", flag_values=FLAGS)
flags.DEFINE_integer("samples_per_label", 4, "images a row (a label's or a prompt's)",
                     flag_values=FLAGS)
flags.DEFINE_integer("seed", 0, "sampling seed", flag_values=FLAGS)
flags.DEFINE_integer("steps", None, f"teacher decoding steps (default "
                     f"{_TEACHER_DEFAULTS['steps']}; text-to-image {_TEXT_DEFAULTS['steps']})",
                     flag_values=FLAGS)
flags.DEFINE_float("cfg", None, f"teacher guidance cfg_w (default {_TEACHER_DEFAULTS['cfg']}; "
                   f"text-to-image {_TEXT_DEFAULTS['cfg']})", flag_values=FLAGS)
flags.DEFINE_float("temperature", None, "teacher confidence-noise temperature r_temp (default "
                   f"{_TEACHER_DEFAULTS['temperature']}; text-to-image: the starting Gumbel "
                   f"scale, {_TEXT_DEFAULTS['temperature']})", flag_values=FLAGS)
flags.DEFINE_string("sched", None, f"teacher unmasking schedule (default "
                    f"{_TEACHER_DEFAULTS['sched']}; text-to-image: cosine or linear, the "
                    "scheduler config's)", flag_values=FLAGS)
flags.DEFINE_integer("tteo_steps", 0, "with --generator: test-time embedding optimization, "
                     "SGD steps on the input embeddings raising the reward (Soft-Di[M]O); the "
                     "run's reward unless --reward_inception or --reward_clip", flag_values=FLAGS)
flags.DEFINE_float("tteo_lr", None, "its step size (default: the run's tteo.lr, 0.2)",
                   flag_values=FLAGS)
flags.DEFINE_string("reward_inception", None, "TTEO reward: the FID Inception directory "
                    "(class-conditional; with --class_map)", flag_values=FLAGS)
flags.DEFINE_string("class_map", None, "TTEO reward: the Inception output of each of the 1000 "
                    "classes (rewards.read_class_map)", flag_values=FLAGS)
flags.DEFINE_string("reward_clip", None, "TTEO reward: a CLIP model directory "
                    "(text-to-image; CLIP score against the prompt)", flag_values=FLAGS)
flags.DEFINE_integer("batch_size", 32, "images sampled at once", flag_values=FLAGS)
flags.DEFINE_enum("dtype", "fp32", sorted(dtypes.DTYPES), "compute dtype of the transformer",
                  flag_values=FLAGS)
flags.DEFINE_string("out", None, "the PNG to write (an existing file is replaced only when it "
                    "is a PNG)", flag_values=FLAGS)
flags.DEFINE_bool("overwrite", False, "let --out replace an existing file that is not a PNG",
                  flag_values=FLAGS)
PROG = "python -m dimo_jax.sample"
# More decoding steps than this is a typo: every released teacher decodes in at most 256
# (MaskBit's longest), and each step is a full forward pass.
MAX_STEPS = 1024


def usage_error(message: str) -> None:
  """A malformed command line: one `error:` line, exit status 2."""
  cli.fail(f"{message} (see {PROG} --help)", status=2)


def parse_flags(argv: Sequence[str]) -> types.SimpleNamespace:
  """The flags of `argv` (without the program name) as attributes, checked for what no
  directory is needed to refuse."""
  FLAGS.unparse_flags()  # `main` may be called more than once in a process
  if {"-h", "--help", "--helpfull"} & set(argv):
    print(f"{__doc__.splitlines()[0]}\n\nusage: {PROG} [flags]\n\n{FLAGS.get_help()}")
    raise SystemExit(0)
  try:
    FLAGS([PROG] + list(argv))
  except flags.Error as e:
    usage_error(str(e))
  args = types.SimpleNamespace(**{name: FLAGS[name].value for name in FLAGS})
  missing = [f"--{name}" for name in ("teacher", "out") if getattr(args, name) is None]
  if missing:
    usage_error(f"{' and '.join(missing)} required")
  if args.generator is not None:
    given = [f"--{name}" for name in _TEACHER_DEFAULTS if getattr(args, name) is not None]
    if given:
      usage_error(f"{', '.join(given)} set the teacher's decoding; with --generator "
                  "sampling is one step")
  tteo_flags = [f"--{name}" for name in ("tteo_lr", "reward_inception", "class_map",
                                           "reward_clip") if getattr(args, name) is not None]
  if args.tteo_steps < 0:
    usage_error(f"--tteo_steps: expected an integer >= 0, found {args.tteo_steps}")
  if (args.tteo_steps or tteo_flags) and args.generator is None:
    usage_error("--tteo_steps optimizes a generator's input embeddings: give --generator")
  if tteo_flags and not args.tteo_steps:
    usage_error(f"{', '.join(tteo_flags)} set test-time embedding optimization: give "
                "--tteo_steps")
  if args.tteo_lr is not None and not (math.isfinite(args.tteo_lr) and args.tteo_lr > 0):
    usage_error(f"--tteo_lr: expected a finite number > 0, found {args.tteo_lr}")
  if args.samples_per_label < 1 or args.batch_size < 1:
    usage_error("--samples_per_label and --batch_size must be at least 1")
  if args.steps is not None and not 1 <= args.steps <= MAX_STEPS:
    usage_error(f"--steps: expected 1 to {MAX_STEPS} decoding steps, found {args.steps}")
  if args.seed < 0:
    usage_error(f"--seed: expected an integer >= 0, found {args.seed}")
  for name in ("cfg", "temperature"):
    value = getattr(args, name)
    if value is not None and not (math.isfinite(value) and value >= 0):
      usage_error(f"--{name}: expected a finite number >= 0, found {value}")
  has_prompts = args.prompt is not None or args.prompt_file is not None
  if (args.labels is None) == (not has_prompts):
    usage_error("give either --labels (class-conditional teacher) or --prompt / --prompt_file "
                "(text-to-image teacher)")
  try:
    outputs.check_replaceable(args.out, "png", "--out", args.overwrite)
  except outputs.OutputError as e:
    cli.fail(e)
  return args


def main(argv: Optional[Sequence[str]] = None) -> None:
  args = parse_flags(sys.argv[1:] if argv is None else argv)
  try:
    grid = sample_grid(args)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    visualize.save_png(grid, args.out)
  except UserError as e:
    cli.fail(e)
  except cli.USER_OS_ERRORS as e:
    cli.fail(f"{e.filename}: {e.strerror}" if getattr(e, "filename", None) else e)
  print(f"wrote {args.out}: {grid.shape[1]}x{grid.shape[0]} pixels", file=sys.stderr)


if __name__ == "__main__":
  main()
