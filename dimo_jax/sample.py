"""Sample grids from a teacher (multi-step MaskGIT decoding) or a Di[M]O generator (one step).

  python -m dimo_jax.sample --teacher checkpoints/halton_maskgit --tokenizer checkpoints/vqgan \
      --steps 8 --cfg 3 --labels 1,7,282 --out teacher.png
  python -m dimo_jax.sample --generator runs/imagenet256 --teacher checkpoints/halton_maskgit \
      --tokenizer checkpoints/vqgan --labels 1,7,282 --out generator.png
  python -m dimo_jax.sample --teacher checkpoints/meissonic --prompt "a red ball on a blue cube" \
      --prompt "a boat in a cup of water" --out meissonic.png
  python -m dimo_jax.sample --generator runs/meissonic --teacher checkpoints/meissonic \
      --prompt-file prompts.txt --out generator.png

The PNG holds one row per label (or prompt) and --samples-per-label columns of decoded images.
A text-to-image teacher (a `meissonic` directory, whose VQ-VAE is the default --tokenizer) is
sampled with the release's own sampler (`sampling.meissonic_sample`: 64 steps, guidance 9
with --negative-prompt, the release's negative prompt unless given, Gumbel temperature 2 -> 0,
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

import argparse
import os
import sys
from typing import List, Optional, Sequence, Tuple

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from dimo_jax import (cli, data, defaults, dtypes, modeldir, parallel, samplers, sampling,
                      teachers, tokenizers, train, visualize)
from dimo_jax.data import prompts as prompt_files
from dimo_jax.errors import UserError
from dimo_jax.teachers import meissonic

# --params -> the field of distill.DistillState that holds those parameters.
_STATE_FIELDS = {"ema": "ema_params", "generator": "gen_params"}
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


class GeneratorError(UserError):
  """A Di[M]O checkpoint (--generator, evaluate's --checkpoint) that cannot be sampled: its step
  cannot be read, or its generator was distilled from another teacher."""


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


def find_checkpoint(path: str, flag: str = "--generator") -> Tuple[str, int]:
  """(checkpoints directory, step) for a workdir, its checkpoints/ or a checkpoints/<step>;
  `flag` names the path in errors."""
  path = os.path.abspath(path)
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


def load_generator(path: str, teacher: teachers.Teacher, which: str, flag: str = "--generator",
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
  field = _STATE_FIELDS[which]
  manager = ocp.CheckpointManager(root, item_handlers=ocp.PyTreeCheckpointHandler())
  step_dir = os.path.join(root, str(step))
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


def read_prompts(args: argparse.Namespace) -> List[str]:
  """The prompts of --prompt (in order) then of --prompt-file (one a line)."""
  prompts = list(args.prompt or [])
  if args.prompt_file is not None:
    try:
      prompts += prompt_files.read_prompt_file(args.prompt_file)
    except ValueError as e:  # not UTF-8, or no prompt in it: the message names the file
      raise SampleError(f"--prompt-file: {e}") from None
  return prompts


def prompt_grid(args: argparse.Namespace, prompts: List[str]) -> np.ndarray:
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
    sampler = samplers.teacher(teacher, flags["steps"], flags["cfg"],
                               {"temperature": (flags["temperature"], 0.0),
                                "masking_schedule": schedule})
  else:
    params, config, step = load_generator(args.generator, teacher, args.params,
                                          teacher_dir=args.teacher)
    sampler = samplers.generator(teacher, params, config, step)

  # Every distinct prompt is encoded once; sample i is conditioned on row i of the table.
  table = {}
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


def sample_grid(args: argparse.Namespace) -> np.ndarray:
  """The grid the flags ask for: uint8[rows*(H+1)+1, cols*(W+1)+1, 3]."""
  for flag, path in (("--teacher", args.teacher), ("--tokenizer", args.tokenizer)):
    if path is not None and not os.path.isdir(path):
      raise FileNotFoundError(f"{flag}: {path} does not exist")
  description = modeldir.read_description(args.teacher, "teacher")
  prompts = read_prompts(args)
  if teachers.kind_of(description, args.teacher).conditioning == teachers.TEXT:
    if not prompts:
      raise SampleError(f"--teacher {args.teacher} is a text-to-image teacher: give --prompt or "
                        "--prompt-file, not --labels")
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
  tokenizers.check_pairing(tokenizer, args.tokenizer, teacher.codebook_size, args.teacher)
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
    try:
      train.check_guidance(config, teacher, keys=("cfg_w",))
    except ValueError as e:
      raise SampleError(f"--cfg: {e}") from None
    sampler = train.teacher_sampler(config, teacher, flags["steps"])
  else:
    params, config, step = load_generator(args.generator, teacher, args.params,
                                          teacher_dir=args.teacher)
    sampler = samplers.generator(teacher, params, config, step)
  codes = samplers.MeshSampler(sampler, parallel.make_mesh(), batch)(all_labels, args.seed)
  images = data.decode_images(tokenizer, codes, batch)
  return visualize.image_grid(images, rows=len(labels), scale=1)


class _Parser(argparse.ArgumentParser):
  """argparse whose command-line errors are one `error:` line (exit status 2)."""

  def error(self, message: str) -> None:
    cli.fail(f"{message} (see {self.prog} --help)", status=2)


def build_parser() -> argparse.ArgumentParser:
  parser = _Parser(prog="python -m dimo_jax.sample", description=__doc__.splitlines()[0])
  parser.add_argument("--teacher", required=True, help="teacher directory (dimo_jax.convert)")
  parser.add_argument("--tokenizer", default=None,
                      help="tokenizer directory (dimo_jax.convert); a text-to-image teacher's "
                           "own VQ-VAE by default")
  parser.add_argument("--generator", default=None,
                      help="Di[M]O workdir or checkpoint: sample its generator in one step")
  parser.add_argument("--params", choices=sorted(_STATE_FIELDS), default="ema",
                      help="with --generator: the EMA or the raw generator parameters")
  parser.add_argument("--labels", default=None, help="comma-separated class labels, one a row")
  parser.add_argument("--prompt", action="append", default=None,
                      help="a prompt, one a row (text-to-image teacher; repeat the flag)")
  parser.add_argument("--prompt-file", default=None,
                      help="a file of prompts, one a line (after the --prompt ones)")
  parser.add_argument("--negative-prompt", default=None,
                      help="the text-to-image teacher's guidance prompt (default: the "
                           "release's negative prompt; '' for none)")
  parser.add_argument("--samples-per-label", type=int, default=4,
                      help="images a row (a label's or a prompt's)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--steps", type=int, default=None,
                      help=f"teacher decoding steps (default {_TEACHER_DEFAULTS['steps']}; "
                           f"text-to-image {_TEXT_DEFAULTS['steps']})")
  parser.add_argument("--cfg", type=float, default=None,
                      help=f"teacher guidance cfg_w (default {_TEACHER_DEFAULTS['cfg']}; "
                           f"text-to-image {_TEXT_DEFAULTS['cfg']})")
  parser.add_argument("--temperature", type=float, default=None,
                      help="teacher confidence-noise temperature r_temp "
                           f"(default {_TEACHER_DEFAULTS['temperature']}; text-to-image: the "
                           f"starting Gumbel scale, {_TEXT_DEFAULTS['temperature']})")
  parser.add_argument("--sched", default=None,
                      help=f"teacher unmasking schedule (default {_TEACHER_DEFAULTS['sched']}; "
                           "text-to-image: cosine or linear, the scheduler config's)")
  parser.add_argument("--batch-size", type=int, default=32, help="images sampled at once")
  parser.add_argument("--dtype", choices=sorted(dtypes.DTYPES), default="fp32",
                      help="compute dtype of the transformer")
  parser.add_argument("--out", required=True, help="the PNG to write")
  return parser


def main(argv: Optional[Sequence[str]] = None) -> None:
  parser = build_parser()
  args = parser.parse_args(argv)
  if args.generator is not None:
    given = [f"--{name}" for name in _TEACHER_DEFAULTS if getattr(args, name) is not None]
    if given:
      parser.error(f"{', '.join(given)} set the teacher's decoding; with --generator "
                   "sampling is one step")
  if args.samples_per_label < 1 or args.batch_size < 1:
    parser.error("--samples-per-label and --batch-size must be at least 1")
  if args.steps is not None and args.steps < 1:
    parser.error(f"--steps: expected at least 1 decoding step, found {args.steps}")
  has_prompts = args.prompt is not None or args.prompt_file is not None
  if (args.labels is None) == (not has_prompts):
    parser.error("give either --labels (class-conditional teacher) or --prompt / --prompt-file "
                 "(text-to-image teacher)")
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
