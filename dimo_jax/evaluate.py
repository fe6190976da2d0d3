"""Sample-quality evaluation as the papers report it: N samples, FID, IS and PRDC (issue #5).

  python -m dimo_jax.evaluate --config configs/maskgit_imagenet256.py --workdir runs/imagenet256 \
      --inception checkpoints/fid_inception --ref VIRTUAL_imagenet256_labeled.npz \
      [--checkpoint runs/imagenet256/checkpoints/50000] [--params ema|generator] \
      [--teacher_steps 8 --config.cfg_w=3] [--num_samples 50000] [--save_npz] [--save_png]
  python -m dimo_jax.evaluate stats --inception checkpoints/fid_inception \
      (--images DIR | --tfds imagenet2012:validation) --image_size 256 --out ref.npz

Evaluation draws `num_samples` class-balanced labels (N / C of each class, in the order
0, 1, ..., C-1, 0, 1, ... so every contiguous split of the Inception Score is balanced too) and
samples them with the Di[M]O generator of `--checkpoint` (default: the workdir) in one step, or
with the teacher at `--teacher_steps` decoding steps and the config's guidance (`cfg_w`,
`r_temp`, `sched_mode`). Every global batch is split over all devices of all processes (the
config's mesh); sample i always gets the same random numbers, whatever the device count.

  imagenet256: codes are decoded by the config's tokenizer, quantized to uint8 (the images a
      saved .npz holds, so ADM's evaluation suite on that file sees the same pictures) and fed
      to the FID Inception network. Reported: fid (against --ref), is and is_std, and
      precision, recall, density and coverage (k = 5) against the reference features.
  digits, synthetic: the dataset's own scorer on the codes (fd and accuracy; true_nll,
      mode_coverage and in_mode).

--ref is an .npz with `mu` and `sigma` (pool-feature statistics), as ADM's reference batches
(VIRTUAL_imagenet256_labeled.npz) and `stats` write. PRDC uses its `features` when present
(written by `stats`), else its `arr_0` images (ADM's batches), which go through the network here;
with neither, PRDC is left out. A file with `arr_0` but no `mu` gets its statistics from those
images too.

Results go to W/eval_<tag>.json (tag: the checkpoint step, `<step>_generator` for the raw
parameters, `teacher_<n>step` for the teacher), to TensorBoard under `eval_<tag>/`, and as a
table row on stdout. --save_npz writes W/samples_<tag>.npz (`arr_0` uint8[N, H, W, 3] and
`arr_1` int32[N] labels, ADM's layout) and --save_png W/samples_<tag>/<index>.png.
"""

import dataclasses
import json
import math
import os
import time
import zipfile
from typing import Any, Callable, Dict, Iterable, Iterator, Optional, Tuple

from absl import app, flags
from clu import metric_writers
import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import ml_collections
from ml_collections import config_flags
import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from dimo_jax import (data, distributed, metrics, modeldir, parallel, sample, sampling, teachers,
                      train, visualize)
from dimo_jax.data.digits import class_balanced_labels

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
PARAMS = ("ema", "generator")  # --params: the EMA or the raw generator parameters


@dataclasses.dataclass(frozen=True)
class Sampler:
  """What is sampled: parameters placed on the mesh, the jittable sampling function, names.

  `fn(params, rng, labels int32[B]) -> codes int32[B, L]`.
  """
  params: Any
  fn: Callable[[Any, jax.Array, jax.Array], jax.Array]
  tag: str  # names the output files
  description: str  # names the row of the table
  steps: int
  step: int  # the checkpoint's step (0 for the teacher): TensorBoard's x axis


def teacher_sampler(config: ml_collections.ConfigDict, teacher: teachers.Teacher,
                    steps: int) -> Sampler:
  """MaskGIT decoding at `steps` steps with the config's `cfg_w`, `r_temp`, `sm_temp` and
  `sched_mode`."""
  train.check_guidance(config, teacher.model, keys=("cfg_w",))
  model = teacher.model

  def fn(variables, rng, labels):
    return sampling.maskgit_sample(
        lambda tokens, labels_, drop: model.apply(variables, tokens, labels_, drop),
        rng, labels, model.seq_len, model.mask_id, steps, config.cfg_w, config.r_temp,
        config.sm_temp, config.sched_mode)

  return Sampler(teacher.variables, fn, f"teacher_{steps}step",
                 f"teacher, {steps} steps, cfg_w {config.cfg_w:g}", steps, 0)


def generator_sampler(checkpoint: str, model, which: str) -> Sampler:
  """The Di[M]O generator at `checkpoint` (see `sample.find_checkpoint`) in one step, with its
  run's x_init ratio, embedding noise at that step and sampling temperature."""
  params, run, step = sample.load_generator(checkpoint, model, which)
  sigma = train.generator_noise(run, step)

  def fn(params, rng, labels):
    def logits_fn(tokens, labels_, noise_rng):
      return model.apply(params, tokens, labels_, emb_noise=sigma, rngs={"noise": noise_rng})
    return sampling.generator_sample(
        logits_fn, rng, labels, model.seq_len, model.codebook_size, model.mask_id,
        run.fixed_ratio, run.gen_temp, run.top_k, run.top_p)[0]

  tag = f"{step}" if which == "ema" else f"{step}_{which}"
  return Sampler(params, fn, tag, f"generator ({which}) step {step}, 1 step", 1, step)


def global_batch(requested: int, mesh) -> int:
  """`requested` rounded up to a multiple of the mesh's device count."""
  devices = parallel.batch_devices(mesh)
  return max(1, math.ceil(requested / devices)) * devices


def sharded_batch(values: np.ndarray, size: int, mesh) -> jax.Array:
  """values[B <= size, ...] padded to `size` rows, split over the mesh's devices.

  Every process holds the whole of `values`; each builds only its devices' rows, so this
  works the same in one process and in many.
  """
  padded = np.concatenate([values, np.zeros((size - len(values),) + values.shape[1:],
                                            values.dtype)])
  return jax.make_array_from_callback(padded.shape, parallel.batch_sharded(mesh),
                                      lambda index: padded[index])


def gather(tree: Any, count: int) -> Any:
  """The first `count` rows of every batch-sharded leaf, as numpy arrays on every process."""
  return jax.tree_util.tree_map(lambda x: np.asarray(x)[:count],
                                multihost_utils.process_allgather(tree, tiled=True))


def to_uint8(images: jax.Array) -> jax.Array:
  """float[..., H, W, 3] in [0, 1] -> uint8, rounded as a saved PNG is."""
  return jnp.round(jnp.clip(images, 0.0, 1.0) * 255.0).astype(jnp.uint8)


def features_fn(extractor) -> Callable[[Any, jax.Array], Tuple[jax.Array, jax.Array]]:
  """(variables, uint8[B, H, W, 3]) -> (pool float32[B, F], logits float32[B, C]) of the FID
  network.

  `extractor` has `.model` and `.variables` (dimo_jax.models.fid_inception.load).
  """
  return lambda variables, images: extractor.model.apply(
      variables, images.astype(jnp.float32) / 255.0)


def make_pipeline(sampler: Sampler, mesh, tokenizer=None, extractor=None) -> Callable:
  """The jitted batch: (params, aux, seed, index, labels) -> {"codes"[, "images", "pool",
  "logits"]}, every output split over the mesh like `labels`.

  aux: {"tokenizer", "extractor"} variables (or None without them). The key of batch `index`
  is fold_in(PRNGKey(seed), index): made inside, so every process derives the same one.
  """
  featurize = features_fn(extractor) if extractor is not None else None
  if tokenizer is not None:
    low, high = data.value_range(tokenizer.description)

  def run(params, aux, seed, index, labels):
    rng = jax.random.fold_in(jax.random.PRNGKey(seed), index)
    codes = sampler.fn(params, rng, labels)
    out = {"codes": codes}
    if tokenizer is not None:
      side = math.isqrt(codes.shape[1])
      pictures = tokenizer.model.apply(aux["tokenizer"], codes.reshape(-1, side, side),
                                       method=tokenizer.model.decode)
      out["images"] = to_uint8((pictures.astype(jnp.float32) - low) / (high - low))
      if featurize is not None:
        out["pool"], out["logits"] = featurize(aux["extractor"], out["images"])
    return out

  return jax.jit(run, out_shardings=parallel.batch_sharded(mesh))


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


def generate(sampler: Sampler, labels: np.ndarray, mesh, batch_size: int, seed: int,
             tokenizer=None, extractor=None,
             sink: Optional[Callable[[int, Dict[str, np.ndarray]], None]] = None
             ) -> Dict[str, Any]:
  """Samples every label, a global batch at a time; gathers the results on every process.

  Args:
    sampler: see `Sampler`; its params already placed on `mesh`.
    labels: int32[N].
    mesh: the device mesh; `batch_size` must be a multiple of its device count.
    seed: batch b uses the key fold_in(PRNGKey(seed), b).
    tokenizer, extractor: decode codes to images, and images to Inception features.
    sink: called on process 0 as sink(start, {"codes"[, "images" uint8[b, H, W, 3]]}) for
      every batch.

  Returns:
    {"codes": int32[N, L], "pool": float32[N, F], "logits": float32[N, C] (the last two with
    an extractor), "images_per_second": rate after the first batch (which compiles; None
    with one batch)}.
  """
  if batch_size % parallel.batch_devices(mesh):
    raise ValueError(f"the batch {batch_size} does not split over the "
                     f"{parallel.batch_devices(mesh)} devices of the mesh")
  pipeline = make_pipeline(sampler, mesh, tokenizer, extractor)
  aux = parallel.replicate({
      "tokenizer": None if tokenizer is None else tokenizer.variables,
      "extractor": None if extractor is None else extractor.variables}, mesh)
  keep = ("codes",) if extractor is None else ("codes", "pool", "logits")
  parts = {name: [] for name in keep}
  progress = tqdm(total=len(labels), unit="img", desc=f"eval_{sampler.tag}", mininterval=2.0,
                  disable=jax.process_index() > 0)
  started, timed = None, 0
  for index, start in enumerate(range(0, len(labels), batch_size)):
    chunk = labels[start:start + batch_size]
    out = pipeline(sampler.params, aux, np.uint32(seed), np.int32(index),
                   sharded_batch(chunk, batch_size, mesh))
    wanted = {name: out[name] for name in keep}
    if sink is not None and "images" in out:
      wanted["images"] = out["images"]
    host = gather(wanted, len(chunk))
    for name in keep:
      parts[name].append(host[name])
    if sink is not None and jax.process_index() == 0:
      sink(start, host)
    progress.update(len(chunk))
    if started is None:
      started = time.perf_counter()
    else:
      timed += len(chunk)
  progress.close()
  result = {name: np.concatenate(values) for name, values in parts.items()}
  elapsed = time.perf_counter() - started
  result["images_per_second"] = timed / elapsed if timed and elapsed > 0 else None
  return result


def load_images(paths: Iterable[str], size: int) -> np.ndarray:
  """Image files -> uint8[n, size, size, 3], each centre-cropped after a resize (`center_crop`)."""
  out = []
  for path in paths:
    with Image.open(path) as image:
      out.append(center_crop(image, size))
  return np.stack(out)


def center_crop(image: Image.Image, size: int) -> np.ndarray:
  """ADM's reference-batch preprocessing: shrink by halves (box filter) while the short side
  is at least 2 x size, bicubic to a short side of `size`, crop the centre: uint8[size, size, 3]."""
  image = image.convert("RGB")
  while min(image.size) >= 2 * size:
    image = image.resize(tuple(s // 2 for s in image.size), resample=Image.BOX)
  scale = size / min(image.size)
  image = image.resize(tuple(round(s * scale) for s in image.size), resample=Image.BICUBIC)
  array = np.asarray(image)
  top, left = (array.shape[0] - size) // 2, (array.shape[1] - size) // 2
  return array[top:top + size, left:left + size]


def folder_batches(folder: str, size: int, batch_size: int) -> Tuple[int, Iterator[np.ndarray]]:
  """(count, batches uint8[<= batch_size, size, size, 3]) of every image file under `folder`."""
  paths = sorted(os.path.join(root, name) for root, _, names in os.walk(folder)
                 for name in names if name.lower().endswith(IMAGE_SUFFIXES))
  if not paths:
    raise FileNotFoundError(f"--images: no {'/'.join(IMAGE_SUFFIXES)} files under {folder}")
  return len(paths), (load_images(paths[i:i + batch_size], size)
                      for i in range(0, len(paths), batch_size))


def tfds_batches(spec: str, size: int, batch_size: int
                 ) -> Tuple[Optional[int], Iterator[np.ndarray]]:
  """(count, batches) of the `image` feature of a tensorflow-datasets 'name:split'.

  count is the split's size in the dataset's metadata (None when it has none: the progress bar
  then counts without a total).
  """
  import tensorflow_datasets as tfds  # only this sub-command needs it
  name, _, split = spec.partition(":")
  split = split or "train"
  dataset, info = tfds.load(name, split=split, shuffle_files=False, with_info=True)
  try:
    count = info.splits[split].num_examples or None
  except KeyError:
    count = None

  def batches():
    chunk = []
    for example in tfds.as_numpy(dataset):
      chunk.append(center_crop(Image.fromarray(example["image"]), size))
      if len(chunk) == batch_size:
        yield np.stack(chunk)
        chunk = []
    if chunk:
      yield np.stack(chunk)

  return count, batches()


def image_features(batches: Iterable[np.ndarray], total: int, extractor, mesh,
                   batch_size: int, keep: int = -1) -> Dict[str, np.ndarray]:
  """Streams uint8 image batches (the same on every process) through the FID network.

  Returns:
    {"mu": float64[F], "sigma": float64[F, F], "features": float32[min(keep, N), F] (keep -1:
    all), "count": N}.
  """
  batch_size = global_batch(batch_size, mesh)
  featurize = jax.jit(features_fn(extractor), out_shardings=parallel.batch_sharded(mesh))
  variables = parallel.replicate(extractor.variables, mesh)
  stats = metrics.FeatureStatistics()
  kept = []
  progress = tqdm(total=total, unit="img", desc="features", mininterval=2.0,
                  disable=jax.process_index() > 0)
  for images in batches:
    for start in range(0, len(images), batch_size):
      chunk = images[start:start + batch_size]
      pool, _ = gather(featurize(variables, sharded_batch(chunk, batch_size, mesh)), len(chunk))
      stats.update(pool)
      if keep < 0 or sum(map(len, kept)) < keep:
        kept.append(pool)
      progress.update(len(chunk))
  progress.close()
  mu, sigma = stats.mu_sigma()
  features = np.concatenate(kept)
  return {"mu": mu, "sigma": sigma, "features": features if keep < 0 else features[:keep],
          "count": np.int64(stats.count)}


def load_reference(path: str, extractor, mesh, batch_size: int) -> Dict[str, np.ndarray]:
  """{"mu", "sigma"[, "features"]} of a reference .npz (see the module docstring)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--ref: {path} does not exist")
  with np.load(path) as f:
    found = {name: f[name] for name in ("mu", "sigma", "features") if name in f.files}
    if "features" not in found and "arr_0" in f.files:
      images = f["arr_0"]
      if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"{path}: arr_0 should be uint8[N, H, W, 3] images, found "
                         f"{images.dtype}{list(images.shape)}")
      computed = image_features([images], len(images), extractor, mesh, batch_size)
      found = {**computed, **{k: v for k, v in found.items() if k in ("mu", "sigma")}}
    files = f.files
  if "mu" not in found or "sigma" not in found:
    raise ValueError(f"{path}: expected `mu` and `sigma` (or `arr_0` images), found {files}")
  dim = found["mu"].shape
  if len(dim) != 1 or found["sigma"].shape != dim * 2:
    raise ValueError(f"{path}: expected mu [F] and sigma [F, F], found {found['mu'].shape} and "
                     f"{found['sigma'].shape}")
  return found


def image_metrics(pool: np.ndarray, logits: np.ndarray,
                  reference: Dict[str, np.ndarray]) -> Dict[str, float]:
  """fid, is, is_std and (with reference features) precision, recall, density, coverage."""
  if pool.shape[1:] != reference["mu"].shape:
    raise ValueError(f"the reference statistics are of {reference['mu'].shape[0]} features, "
                     f"the network gives {pool.shape[1]}")
  scores = {"fid": metrics.fid(pool, reference["mu"], reference["sigma"])}
  scores["is"], scores["is_std"] = metrics.inception_score(logits)
  if "features" in reference:
    scores.update(metrics.prdc(reference["features"], pool))
  return scores


_TABLE_COLUMNS = (("fid", "FID"), ("is", "IS"), ("precision", "Prec."), ("recall", "Rec."),
                  ("density", "Dens."), ("coverage", "Cov."))


def table(result: Dict[str, Any]) -> str:
  """The markdown header and row of one result: sampler, steps, N, then its metrics."""
  names = [(k, t) for k, t in _TABLE_COLUMNS if k in result["metrics"]]
  names += [(k, k) for k in sorted(result["metrics"]) if k not in dict(_TABLE_COLUMNS)
            and k != "is_std"]
  head = ["sampler", "steps", "N"] + [t for _, t in names]
  row = [result["sampler"], str(result["steps"]), str(result["num_samples"])]
  row += [f"{result['metrics'][k]:.4g}" for k, _ in names]
  return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
                    "| " + " | ".join(row) + " |"])


def evaluate(config: ml_collections.ConfigDict, workdir: str, checkpoint: Optional[str] = None,
             params: Optional[str] = None, teacher_steps: int = 0, num_samples: int = 50000,
             seed: int = 0, batch_size: int = 0, extractor=None, reference: Optional[str] = None,
             save_png: bool = False, save_npz: bool = False) -> Dict[str, Any]:
  """Samples, scores and writes one evaluation (see the module docstring); returns its result.

  Args:
    config: the run's config (dataset, teacher, tokenizer, mesh, precision, guidance).
    workdir: where results and samples go; the generator's run by default.
    checkpoint: a Di[M]O workdir, its checkpoints/ or one checkpoints/<step>.
    params: 'ema' or 'generator' (default: config.eval_params).
    teacher_steps: > 0 evaluates the teacher at this many steps instead of the generator.
    num_samples, seed: N and the sampling seed.
    batch_size: the global batch (default config.eval_batch_size), rounded up to a multiple
      of the device count.
    extractor: the FID network (`.model`, `.variables`), required on imagenet256.
    reference: the reference .npz, required on imagenet256.
    save_png, save_npz: keep the samples.
  """
  params = params or config.get("eval_params", "ema")
  if params not in PARAMS:
    raise ValueError(f"params must be one of {PARAMS}, got {params!r}")
  if num_samples < 1 or teacher_steps < 0:
    raise ValueError(f"expected num_samples >= 1 and teacher_steps >= 0, found {num_samples} "
                     f"and {teacher_steps}")
  dataset = data.get(config)
  images_mode = isinstance(dataset, data.ImageNet256)
  if images_mode and (extractor is None or reference is None):
    raise ValueError(f"dataset {config.dataset!r} is scored with the FID Inception network: "
                     "pass --inception and --ref")
  mesh = parallel.make_mesh(config.num_devices, config.mesh.data, config.mesh.fsdp)
  batch_size = global_batch(batch_size or config.eval_batch_size, mesh)
  dtype = train.compute_dtype(config)
  if teacher_steps:
    teacher = teachers.load(config.teacher_path, dtype)
    model, sampler = teacher.model, teacher_sampler(config, teacher, teacher_steps)
  else:
    # Only the module: the checkpoint's parameters replace the teacher's.
    model = teachers.build_model(modeldir.read_description(config.teacher_path, "teacher"),
                                 dtype)
    sampler = generator_sampler(checkpoint or workdir, model, params)
  sampler = dataclasses.replace(sampler, params=parallel.shard_params(sampler.params, mesh))
  tokenizer = dataset.tokenizer if images_mode else None
  ref = load_reference(reference, extractor, mesh, batch_size) if images_mode else None

  labels = class_balanced_labels(num_samples, model.num_classes)
  os.makedirs(workdir, exist_ok=True)
  sink = SampleSink(workdir, sampler.tag, dataset, labels, save_png, save_npz)
  out = generate(sampler, labels, mesh, batch_size, seed, tokenizer,
                 extractor if images_mode else None, sink if sink.active else None)
  sink.close()
  if images_mode:
    scores = image_metrics(out["pool"], out["logits"], ref)
  else:
    scores = dataset.make_scorer()(out["codes"], labels)
  result = {"sampler": sampler.description, "steps": sampler.steps, "step": sampler.step,
            "num_samples": num_samples, "seed": seed, "reference": reference,
            "images_per_second": out["images_per_second"], "metrics": scores}
  train.write_json(os.path.join(workdir, f"eval_{sampler.tag}.json"), result)
  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  writer.write_scalars(sampler.step, {f"eval_{sampler.tag}/{k}": v for k, v in scores.items()})
  writer.flush()
  return result


class SampleSink:
  """Keeps the samples on process 0: W/samples_<tag>/<index>.png and/or W/samples_<tag>.npz.

  Toy datasets have no decoder on the device: their pictures are `dataset.images(codes)`,
  grey levels repeated over three channels.
  """

  def __init__(self, workdir: str, tag: str, dataset, labels: np.ndarray, save_png: bool,
               save_npz: bool):
    self.dataset, self.labels = dataset, labels
    self.active = save_png or save_npz
    writer = jax.process_index() == 0
    self.png_dir = os.path.join(workdir, f"samples_{tag}") if save_png and writer else None
    if self.png_dir is not None:
      os.makedirs(self.png_dir, exist_ok=True)
    self.npz = (NpzWriter(os.path.join(workdir, f"samples_{tag}.npz"), len(labels))
                if save_npz and writer else None)

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


def write_reference(path: str, stats: Dict[str, np.ndarray]) -> None:
  """Saves `image_features`' output as an .npz (process 0 only, never half-written)."""
  if jax.process_index() > 0:
    return
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp.npz"
  np.savez(tmp, **stats)
  os.replace(tmp, path)


_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Results and samples; the generator's run by "
                               "default.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Di[M]O workdir, its checkpoints/ or a "
                                  "checkpoints/<step> (default: --workdir).")
_PARAMS = flags.DEFINE_enum("params", None, PARAMS, "The EMA or the raw generator parameters "
                            "(default: the config's eval_params).")
_TEACHER_STEPS = flags.DEFINE_integer("teacher_steps", 0, "Evaluate the teacher at this many "
                                      "decoding steps instead of the generator.")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 50000, "Samples to draw, class-balanced.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 0, "Global batch (default: the config's "
                                   "eval_batch_size), rounded up to a multiple of the devices.")
_INCEPTION = flags.DEFINE_string("inception", None, "FID Inception directory "
                                 "(python -m dimo_jax.convert fid-inception).")
_REF = flags.DEFINE_string("ref", None, "Reference .npz: mu and sigma, and features or arr_0.")
_SAVE_PNG = flags.DEFINE_bool("save_png", False, "Save every sample as a PNG.")
_SAVE_NPZ = flags.DEFINE_bool("save_npz", False, "Save the samples as one .npz (ADM's layout).")
_IMAGES = flags.DEFINE_string("images", None, "stats: a folder of images (searched recursively).")
_TFDS = flags.DEFINE_string("tfds", None, "stats: a tensorflow-datasets 'name:split'.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 256, "stats: side of the centre crop.")
_KEEP = flags.DEFINE_integer("keep_features", 10000, "stats: pool features kept for PRDC "
                             "(-1: all).")
_OUT = flags.DEFINE_string("out", None, "stats: the .npz to write.")


def load_extractor(path: Optional[str]):
  if path is None:
    return None
  from dimo_jax.models import fid_inception  # only image datasets need the network
  return fid_inception.load(path)


def stats_main() -> None:
  """`python -m dimo_jax.evaluate stats`: reference mu, sigma and features of real images."""
  if (_IMAGES.value is None) == (_TFDS.value is None) or _OUT.value is None:
    raise app.UsageError("stats needs --out and one of --images, --tfds")
  if _INCEPTION.value is None:
    raise app.UsageError("stats needs --inception")
  mesh = parallel.make_mesh()
  batch_size = global_batch(_BATCH_SIZE.value or 64, mesh)
  if _IMAGES.value is not None:
    count, batches = folder_batches(_IMAGES.value, _IMAGE_SIZE.value, batch_size)
  else:
    count, batches = tfds_batches(_TFDS.value, _IMAGE_SIZE.value, batch_size)
  stats = image_features(batches, count, load_extractor(_INCEPTION.value), mesh, batch_size,
                         _KEEP.value)
  write_reference(_OUT.value, stats)
  print(f"wrote {_OUT.value}: {int(stats['count'])} images, "
        f"{stats['mu'].shape[0]} features, {len(stats['features'])} kept")


def main(argv) -> None:
  distributed.initialize()  # before any JAX computation, in every process
  if argv[1:] == ["stats"]:
    stats_main()
    return
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]} (the one sub-command is 'stats')")
  if _CONFIG.value is None or _WORKDIR.value is None:
    raise app.UsageError("--config and --workdir are required")
  result = evaluate(
      _CONFIG.value, _WORKDIR.value, checkpoint=_CHECKPOINT.value, params=_PARAMS.value,
      teacher_steps=_TEACHER_STEPS.value, num_samples=_NUM_SAMPLES.value, seed=_SEED.value,
      batch_size=_BATCH_SIZE.value, extractor=load_extractor(_INCEPTION.value),
      reference=_REF.value, save_png=_SAVE_PNG.value, save_npz=_SAVE_NPZ.value)
  if jax.process_index() == 0:
    print(table(result))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
  app.run(main)
