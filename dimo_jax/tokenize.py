"""Tokenizes an image dataset once, for what needs real data tokens (Soft-Di[M]O's discriminator).

  python -m dimo_jax.tokenize --tokenizer checkpoints/vqgan --images /data/imagenet/train \
      --out data/imagenet256_tokens [--image_size 256 --shard_size 10000 --batch_size 64]
  python -m dimo_jax.tokenize --tokenizer checkpoints/vqgan --tfds imagenet2012:train --out ...
  python -m dimo_jax.tokenize --tokenizer checkpoints/meissonic --images /data/laion_subset \
      --captions --image_size 1024 --out data/meissonic_tokens      # image-caption pairs
  python -m dimo_jax.tokenize --tokenizer checkpoints/meissonic --tfds coco_captions:train \
      --caption_field captions/text --image_size 1024 --out data/coco_tokens

Each image is centre-cropped as ADM does (`metrics.reference.center_crop`), scaled to the
tokenizer's value range and encoded; its label is the index of its class folder among the
sorted first-level folders of --images (ImageNet's `train/n01440764/...` layout), or the tfds
`label`. OUT holds

  shard-00000.npz ...  tokens int16[n, h*w] (row-major codes), labels int32[n], and with
                       captions (a text-to-image teacher's real data) captions str[n]
  tokens.json          the settings, the class names, and once every shard is written
                       "complete": true with the count

Every shard is written whole (temporary file, then rename), so an interrupted run resumes where
it stopped: rerun the same command. A different tokenizer, size or source in OUT is refused.
`TokenShards(OUT)` reads them, each process its own shards (`process_shards`).

Captions: with --images and --captions each image's caption is the text file beside it with the
same stem (`photo.jpg` -> `photo.txt`, the img2dataset layout); with --tfds, --caption_field
names the feature (its first text when it holds several, as COCO's five).
"""

import json
import os
import sys
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np
from absl import flags
from tqdm.auto import tqdm

from dimo_jax import cli, modeldir
from dimo_jax.errors import UserError

MANIFEST = "tokens.json"


class TokenizeError(UserError):
  """A tokenization that cannot start or resume as asked."""


def shard_path(out: str, index: int) -> str:
  return os.path.join(out, f"shard-{index:05d}.npz")


def folder_items(folder: str) -> Tuple[List[Tuple[str, int]], List[str]]:
  """([(image path, class index)], class names) of an ImageNet-style folder: one subfolder a
  class (sorted names), images anywhere below it; images directly in `folder` get class 0."""
  from dimo_jax.metrics.reference import IMAGE_SUFFIXES
  if not os.path.isdir(folder):
    raise TokenizeError(f"--images: {folder} is not a folder")
  classes = sorted(n for n in os.listdir(folder) if os.path.isdir(os.path.join(folder, n)))
  items = []
  for root, _, names in os.walk(folder):
    rel = os.path.relpath(root, folder)
    label = 0 if rel == "." else classes.index(rel.split(os.sep)[0])
    items += [(os.path.join(root, n), label) for n in sorted(names)
              if n.lower().endswith(IMAGE_SUFFIXES)]
  if not items:
    raise TokenizeError(f"--images: no {'/'.join(IMAGE_SUFFIXES)} files under {folder}")
  return sorted(items), classes or [os.path.basename(os.path.abspath(folder))]


def _manifest(out: str, settings: Dict) -> Dict:
  """The manifest of `out`, written anew, or the existing one when its settings match."""
  path = os.path.join(out, MANIFEST)
  if os.path.isfile(path):
    saved = modeldir.read_json(path, "the manifest of a token dataset", TokenizeError)
    changed = {k: (saved.get(k), v) for k, v in settings.items() if saved.get(k) != v}
    if changed:
      listed = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items())
      raise TokenizeError(f"{path}: these tokens were made with other settings ({listed}); "
                          "choose another --out")
    return saved
  if os.path.isdir(out) and any(not n.startswith(".") for n in os.listdir(out)):
    raise TokenizeError(f"--out {out}: holds files but no {MANIFEST}; choose a new or empty "
                        "folder")
  os.makedirs(out, exist_ok=True)
  _write_json(path, settings)
  return settings


def _write_json(path: str, value: Dict) -> None:
  tmp = f"{path}.{os.getpid()}.tmp"
  with open(tmp, "w") as f:
    json.dump(value, f, indent=2)
  os.replace(tmp, path)


def _write_shard(path: str, tokens: np.ndarray, labels: np.ndarray,
                 captions: Optional[List[str]] = None) -> None:
  tmp = f"{path}.{os.getpid()}.tmp.npz"
  extra = {} if captions is None else {"captions": np.asarray(captions, dtype=np.str_)}
  np.savez(tmp, tokens=tokens.astype(np.int16), labels=labels.astype(np.int32), **extra)
  os.replace(tmp, path)


def read_caption(image_path: str) -> str:
  """The caption of an image in an img2dataset-style folder: the .txt beside it, same stem."""
  path = os.path.splitext(image_path)[0] + ".txt"
  try:
    with open(path, encoding="utf-8") as f:
      return " ".join(f.read().split())
  except FileNotFoundError:
    raise TokenizeError(f"--captions: {image_path} has no caption file {path}") from None
  except UnicodeDecodeError:
    raise TokenizeError(f"--captions: {path} is not UTF-8 text") from None


def tokenize(tokenizer_dir: str, out: str, images: Optional[str] = None,
             tfds_spec: Optional[str] = None, image_size: int = 256, shard_size: int = 10000,
             batch_size: int = 64, captions: bool = False,
             caption_field: Optional[str] = None) -> Dict:
  """Writes the shards of OUT (module docstring) that are not there yet; returns the manifest.
  `captions` (an image folder) or `caption_field` (tfds) store each image's caption too."""
  from dimo_jax import data, tokenizers
  from dimo_jax.metrics import reference
  if (images is None) == (tfds_spec is None):
    raise TokenizeError("give one of --images, --tfds")
  if captions and images is None:
    raise TokenizeError("--captions reads the .txt beside each image of --images; with --tfds "
                        "give --caption_field")
  if caption_field and tfds_spec is None:
    raise TokenizeError("--caption_field names a tfds feature; with --images give --captions")
  if image_size < 1 or shard_size < 1 or batch_size < 1:
    raise TokenizeError("--image_size, --shard_size and --batch_size must be at least 1")
  tokenizer = tokenizers.load(tokenizer_dir)
  if tokenizer.codebook_size > np.iinfo(np.int16).max:
    raise TokenizeError(f"{tokenizer_dir}: {tokenizer.codebook_size} codes do not fit int16")
  low, high = data.value_range(tokenizer.description)
  if images is not None:
    items, classes = folder_items(images)
    count: Optional[int] = len(items)
  else:
    items, classes, count = None, None, None
  settings = {"tokenizer": os.path.abspath(tokenizer_dir), "image_size": image_size,
              "shard_size": shard_size, "codebook_size": tokenizer.codebook_size,
              "source": os.path.abspath(images) if images else f"tfds:{tfds_spec}",
              "classes": classes,
              "captions": "txt" if captions else (caption_field or None)}
  manifest = _manifest(out, settings)
  if manifest.get("complete"):
    print(f"{out}: complete ({manifest['count']} images)", file=sys.stderr)
    return manifest

  def examples(start: int) -> Iterator[Tuple[np.ndarray, int, Optional[str]]]:
    if items is not None:
      for path, label in items[start:]:
        yield (reference.load_images([path], image_size)[0], label,
               read_caption(path) if captions else None)
      return
    import tensorflow_datasets as tfds  # only a tfds source needs it
    from PIL import Image
    from dimo_jax.data import prompts
    name, _, split = tfds_spec.partition(":")
    dataset = tfds.load(name, split=split or "train", shuffle_files=False).skip(start)
    for example in tfds.as_numpy(dataset):
      caption = None
      if caption_field:
        texts = [t for t in prompts.example_texts(example, caption_field) if t]
        if not texts:
          raise TokenizeError(f"--caption_field {caption_field}: an example of {tfds_spec} "
                              "holds no text there")
        caption = texts[0]
      yield (reference.center_crop(Image.fromarray(example["image"]), image_size),
             int(example.get("label", 0)), caption)

  done = 0
  while os.path.isfile(shard_path(out, done // shard_size)) and (count is None or done < count):
    done += shard_size
  if count is not None:
    done = min(done, count)
  progress = tqdm(total=count, initial=done, unit="img", desc="tokenize", mininterval=2.0)
  shard, pending_images, pending_labels, codes, labels = done // shard_size, [], [], [], []
  texts = []
  with_captions = settings["captions"] is not None

  def flush_batch():
    if pending_images:
      batch = np.stack(pending_images).astype(np.float32) / 255.0 * (high - low) + low
      codes.append(np.asarray(tokenizer.encode(batch)).reshape(len(batch), -1))
      labels.extend(pending_labels)
      progress.update(len(batch))
      pending_images.clear()
      pending_labels.clear()

  def write():
    _write_shard(shard_path(out, shard), np.concatenate(codes), np.asarray(labels),
                 texts if with_captions else None)

  for image, label, caption in examples(done):
    pending_images.append(image)
    pending_labels.append(label)
    texts.append(caption)
    if len(pending_images) == batch_size:
      flush_batch()
    if sum(map(len, codes)) + len(pending_images) == shard_size:
      flush_batch()
      write()
      shard, codes, labels, texts = shard + 1, [], [], []
  flush_batch()
  if codes:
    write()
    shard += 1
  progress.close()
  total = sum(int(np.load(shard_path(out, i))["labels"].shape[0]) for i in range(shard))
  manifest = {**manifest, "complete": True, "count": total, "shards": shard,
              "seq_len": int(np.load(shard_path(out, 0))["tokens"].shape[1])}
  _write_json(os.path.join(out, MANIFEST), manifest)
  print(f"wrote {out}: {total} images in {shard} shards", file=sys.stderr)
  return manifest


class TokenShards:
  """A token dataset written by `tokenize`: `process_shards(i, n)` are process i's shards of n,
  `load(shards)` their tokens int32[N, L] and labels int32[N]."""

  def __init__(self, folder: str):
    path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(path):
      raise TokenizeError(f"{folder}: no {MANIFEST}; make it with python -m dimo_jax.tokenize")
    self.folder, self.manifest = folder, modeldir.read_json(path, "a token dataset manifest",
                                                            TokenizeError)
    if not self.manifest.get("complete"):
      raise TokenizeError(f"{path}: the tokenization is not complete; rerun the command that "
                          "made it to finish it")

  def process_shards(self, process_index: int, process_count: int) -> List[int]:
    return [i for i in range(self.manifest["shards"]) if i % process_count == process_index]

  def shards_for(self, seq_len: int, codebook_size: int, process_index: int,
                 process_count: int) -> List[int]:
    """Process `process_index`'s shards, refused (one line) when the tokens are not of
    `seq_len` positions over `codebook_size` codes (the teacher's tokenizer's) or when there are
    fewer shards than processes."""
    manifest = self.manifest
    if (manifest.get("seq_len"), manifest.get("codebook_size")) != (seq_len, codebook_size):
      raise TokenizeError(
          f"{self.folder}: tokens of {manifest.get('seq_len')} positions over "
          f"{manifest.get('codebook_size')} codes; the teacher's tokenizer has {seq_len} over "
          f"{codebook_size}")
    mine = self.process_shards(process_index, process_count)
    if not mine:
      raise TokenizeError(f"{self.folder}: {manifest['shards']} shards for {process_count} "
                          "processes; every process needs one (tokenize with a smaller "
                          "--shard_size)")
    return mine

  def load(self, shards: List[int]) -> Tuple[np.ndarray, np.ndarray]:
    parts = [np.load(shard_path(self.folder, i)) for i in shards]
    return (np.concatenate([p["tokens"] for p in parts]).astype(np.int32),
            np.concatenate([p["labels"] for p in parts]).astype(np.int32))

  def captions(self, shards: List[int]) -> List[str]:
    """The captions of `shards`' images, in `load`'s order (a dataset made with captions)."""
    if not self.manifest.get("captions"):
      raise TokenizeError(f"{self.folder}: these tokens have no captions; a text-to-image "
                          "teacher's real data is made with --captions or --caption_field")
    return [str(c) for i in shards for c in np.load(shard_path(self.folder, i))["captions"]]


# The command's own flags, apart from absl's global FlagValues (evaluate defines --images, --out
# and --batch_size there with other meanings, and both modules may be imported in one process).
FLAGS = flags.FlagValues()
flags.DEFINE_string("tokenizer", None, "Tokenizer directory (python -m dimo_jax.convert "
                    "taming-vqgan ...).", flag_values=FLAGS)
flags.DEFINE_string("images", None, "An image folder, one subfolder a class.", flag_values=FLAGS)
flags.DEFINE_string("tfds", None, "A tensorflow-datasets 'name:split' with image and label.",
                    flag_values=FLAGS)
flags.DEFINE_string("out", None, "The token dataset folder (shards + tokens.json).",
                    flag_values=FLAGS)
flags.DEFINE_integer("image_size", 256, "Side of the centre crop.", flag_values=FLAGS)
flags.DEFINE_integer("shard_size", 10000, "Images a shard.", flag_values=FLAGS)
flags.DEFINE_integer("batch_size", 64, "Images encoded at once.", flag_values=FLAGS)
flags.DEFINE_bool("captions", False, "With --images: store each image's caption, the .txt "
                  "file beside it (a text-to-image teacher's real data).", flag_values=FLAGS)
flags.DEFINE_string("caption_field", None, "With --tfds: the caption feature, e.g. "
                    "captions/text (its first text).", flag_values=FLAGS)
PROG = "python -m dimo_jax.tokenize"


def main(argv=None) -> None:
  argv = sys.argv[1:] if argv is None else list(argv)
  if {"-h", "--help", "--helpfull"} & set(argv):
    print(f"{__doc__.splitlines()[0]}\n\nusage: {PROG} [flags]\n\n{FLAGS.get_help()}")
    raise SystemExit(0)
  FLAGS.unparse_flags()
  try:
    rest = FLAGS([PROG] + argv)
  except flags.Error as e:
    cli.fail(f"{e} (see {PROG} --help)", status=2)
  try:
    if len(rest) > 1:
      raise TokenizeError(f"unexpected arguments: {rest[1:]}")
    if FLAGS.tokenizer is None or FLAGS.out is None:
      raise TokenizeError("--tokenizer and --out are required")
    tokenize(FLAGS.tokenizer, FLAGS.out, FLAGS.images, FLAGS.tfds, FLAGS.image_size,
             FLAGS.shard_size, FLAGS.batch_size, FLAGS.captions, FLAGS.caption_field)
  except UserError as e:
    cli.fail(e)
  except cli.USER_OS_ERRORS as e:
    cli.fail(f"{e.filename}: {e.strerror}" if getattr(e, "filename", None) else e)


if __name__ == "__main__":
  main()
