"""Reference statistics of real images, and the image metrics of samples against them.

A reference is {"mu", "sigma"[, "features"]} of the FID Inception network's pool features: an
.npz as ADM's reference batches (VIRTUAL_imagenet256_labeled.npz: `mu`, `sigma`, `arr_0`
images) or as `python -m dimo_jax.evaluate stats` writes it (`image_features` over a folder or a
tfds split, each image centre-cropped as ADM does).
"""

import os
from typing import Dict, Iterable, Iterator, Optional, Tuple

import jax
import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from dimo_jax import parallel, samplers
from dimo_jax.errors import UserError
from dimo_jax.metrics import inception
from dimo_jax.metrics.pipeline import features_fn

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


class ReferenceError(UserError):
  """A reference .npz that cannot be scored against: missing statistics, other features."""


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
  batch_size = parallel.round_batch(batch_size, mesh)
  featurize = jax.jit(features_fn(extractor), out_shardings=parallel.batch_sharded(mesh))
  variables = parallel.replicate(extractor.variables, mesh)
  stats = inception.FeatureStatistics()
  kept = []
  progress = tqdm(total=total, unit="img", desc="features", mininterval=2.0,
                  disable=jax.process_index() > 0)
  for images in batches:
    for start in range(0, len(images), batch_size):
      chunk = images[start:start + batch_size]
      padded = parallel.pad_rows(chunk, batch_size)
      placed = parallel.place_rows(lambda rows: padded[rows], np.arange(batch_size), mesh)
      pool, _ = samplers.gather(featurize(variables, placed), len(chunk))
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
        raise ReferenceError(f"{path}: arr_0 should be uint8[N, H, W, 3] images, found "
                            f"{images.dtype}{list(images.shape)}")
      computed = image_features([images], len(images), extractor, mesh, batch_size)
      found = {**computed, **{k: v for k, v in found.items() if k in ("mu", "sigma")}}
    files = f.files
  if "mu" not in found or "sigma" not in found:
    raise ReferenceError(f"{path}: expected `mu` and `sigma` (or `arr_0` images), found {files}")
  dim = found["mu"].shape
  if len(dim) != 1 or found["sigma"].shape != dim * 2:
    raise ReferenceError(f"{path}: expected mu [F] and sigma [F, F], found "
                        f"{found['mu'].shape} and {found['sigma'].shape}")
  return found


def image_metrics(pool: np.ndarray, logits: np.ndarray,
                  reference: Dict[str, np.ndarray]) -> Dict[str, float]:
  """fid, is, is_std and (with reference features) precision, recall, density, coverage."""
  if pool.shape[1:] != reference["mu"].shape:
    raise ReferenceError(f"the reference statistics are of {reference['mu'].shape[0]} "
                        f"features, the network gives {pool.shape[1]}")
  scores = {"fid": inception.fid(pool, reference["mu"], reference["sigma"])}
  scores["is"], scores["is_std"] = inception.inception_score(logits)
  if "features" in reference:
    scores.update(inception.prdc(reference["features"], pool))
  return scores


def write_reference(path: str, stats: Dict[str, np.ndarray]) -> None:
  """Saves `image_features`' output as an .npz (process 0 only, never half-written)."""
  if jax.process_index() > 0:
    return
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp.npz"
  np.savez(tmp, **stats)
  os.replace(tmp, path)
