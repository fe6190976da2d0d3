"""Files that `sample` and `evaluate` write: an existing file is replaced only when it is of the
kind the command writes (a PNG for a PNG, an .npz for an .npz), so a mistyped `--out thesis.tex`
never turns a user's document into image bytes. `--overwrite` lifts the check where a command
offers it. `NpzWriter` streams ADM's .npz of samples, `SampleSink` keeps an evaluation's
samples as PNGs and/or that .npz.
"""

import os
import zipfile
from typing import Dict, List, Optional

import jax
import numpy as np

from dimo_jax import visualize
from dimo_jax.errors import UserError

# The first bytes of each kind of output; an .npz is a zip archive (empty: the end record).
SIGNATURES = {
    "png": ((b"\x89PNG\r\n\x1a\n",), "a PNG image"),
    "npz": ((b"PK\x03\x04", b"PK\x05\x06"), "an .npz archive"),
}


class OutputError(UserError):
  """An output path that would replace something the command did not write."""


def check_writable_folder(folder: str, what: str, error=None) -> None:
  """Raises `error` (OutputError by default) naming `what` unless `folder` can be created or
  written: the nearest existing folder of its path must be a folder (not a file) this user
  may write into (not on a read-only mount)."""
  error = error or OutputError
  folder = os.path.abspath(folder)
  while not os.path.isdir(folder) and os.path.dirname(folder) != folder:
    if os.path.lexists(folder):
      raise error(f"{what}: {folder} is a file, not a folder")
    folder = os.path.dirname(folder)
  if not os.access(folder, os.W_OK | os.X_OK):
    raise error(f"{what}: cannot write into {folder} (read-only, or not this user's)")


def check_replaceable(path: str, kind: str, flag: str, overwrite: bool = False) -> None:
  """Raises `OutputError` unless writing the `kind` output ("png", "npz") at `path` (given by
  `flag`) loses nothing: `path` does not exist, or is a file of that kind, or `overwrite` is set
  and it is a file. A folder is never replaced. The folder it goes into (or the nearest one
  that exists) must be writable: this is checked before any work is done."""
  check_writable_folder(os.path.dirname(os.path.abspath(path)), f"{flag} {path}", OutputError)
  if not os.path.lexists(path):
    return
  if os.path.isdir(path):
    raise OutputError(f"{flag} {path}: is a folder; give the path of the file to write")
  if overwrite:
    return
  signatures, what = SIGNATURES[kind]
  try:
    with open(path, "rb") as f:
      head = f.read(max(len(s) for s in signatures))
  except OSError as e:
    raise OutputError(f"{flag} {path}: exists and cannot be read ({e.strerror or e}), so it "
                      "is not replaced") from e
  if not any(head.startswith(s) for s in signatures):
    raise OutputError(f"{flag} {path}: exists and is not {what}, so it is not replaced "
                      "(choose another path, or pass --overwrite to replace it)")


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
