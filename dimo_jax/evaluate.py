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

import json
from typing import Optional

from absl import flags
import jax
from ml_collections import config_flags

from dimo_jax import cli, distributed, evaluators, outputs, parallel
from dimo_jax.evaluators import EvaluateError
from dimo_jax.metrics import reference as references

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Results and samples; the generator's run by "
                               "default.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Di[M]O workdir, its checkpoints/ or a "
                                  "checkpoints/<step> (default: --workdir).")
_PARAMS = flags.DEFINE_enum("params", None, evaluators.PARAMS, "The EMA or the raw generator parameters "
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
    result = evaluators.evaluate(
        _CONFIG.value, _WORKDIR.value, checkpoint=_CHECKPOINT.value, params=_PARAMS.value,
        teacher_steps=_TEACHER_STEPS.value, num_samples=_NUM_SAMPLES.value, seed=_SEED.value,
        batch_size=_BATCH_SIZE.value, extractor=extractor,
        reference=_REF.value, save_png=_SAVE_PNG.value, save_npz=_SAVE_NPZ.value,
        clip=clip, prompts=_PROMPTS.value, cfg=_CFG.value, gen_temp=temp,
        tteo_steps=_TTEO_STEPS.value, tteo_lr=_TTEO_LR.value, seeds=_SEEDS.value)
    if jax.process_index() == 0:
      print(evaluators.table(result))
      print(json.dumps(result, indent=2))


if __name__ == "__main__":
  cli.run(main)
