"""python -m dimo_jax.tokenize: an image folder becomes shards of codes, resumable, and the
token dataset a Soft-Di[M]O run reads as its real data."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from dimo_jax import data, parallel, tokenize, tokenizers
from dimo_jax.metrics import reference
from tests.test_sample_cli import tiny_tokenizer


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp("tokenize")
  tokenizer = tiny_tokenizer(str(root / "vqgan"))
  rng = np.random.default_rng(0)
  for name, count in (("n01", 3), ("n02", 4)):
    (root / "images" / name / "sub").mkdir(parents=True)
    for i in range(count):
      pixels = rng.integers(0, 256, (24, 20, 3), dtype=np.uint8)
      Image.fromarray(pixels).save(root / "images" / name / "sub" / f"{i}.png")
  (root / "images" / "n01" / "notes.txt").write_text("not an image")
  return root, tokenizer


def test_shards_hold_the_codes_of_every_image_and_its_class(setup, tmp_path):
  root, tokenizer_dir = setup
  out = str(tmp_path / "tokens")
  manifest = tokenize.tokenize(tokenizer_dir, out, images=str(root / "images"), image_size=16,
                               shard_size=3, batch_size=2)
  assert manifest["complete"] and manifest["count"] == 7 and manifest["shards"] == 3
  assert manifest["classes"] == ["n01", "n02"] and manifest["seq_len"] == 64
  tokens, labels = tokenize.TokenShards(out).load([0, 1, 2])
  items, _ = tokenize.folder_items(str(root / "images"))
  images = reference.load_images([p for p, _ in items], 16).astype(np.float32) / 255.0
  tokenizer = tokenizers.load(tokenizer_dir)
  low, high = data.value_range(tokenizer.description)
  expected = np.asarray(tokenizer.encode(images * (high - low) + low)).reshape(7, -1)
  np.testing.assert_array_equal(tokens, expected)
  np.testing.assert_array_equal(labels, [0, 0, 0, 1, 1, 1, 1])


def test_an_interrupted_run_resumes_and_ends_the_same(setup, tmp_path):
  root, tokenizer_dir = setup
  full, partial = str(tmp_path / "full"), str(tmp_path / "partial")
  args = dict(images=str(root / "images"), image_size=16, shard_size=3, batch_size=2)
  tokenize.tokenize(tokenizer_dir, full, **args)
  tokenize.tokenize(tokenizer_dir, partial, **args)
  # as if killed after the first shard: later shards and the completion are missing
  for i in (1, 2):
    os.remove(tokenize.shard_path(partial, i))
  with open(os.path.join(partial, tokenize.MANIFEST)) as f:
    manifest = json.load(f)
  for key in ("complete", "count", "shards", "seq_len"):
    manifest.pop(key)
  with open(os.path.join(partial, tokenize.MANIFEST), "w") as f:
    json.dump(manifest, f)
  with pytest.raises(tokenize.TokenizeError, match="not complete"):
    tokenize.TokenShards(partial)
  tokenize.tokenize(tokenizer_dir, partial, **args)
  a = tokenize.TokenShards(full).load([0, 1, 2])
  b = tokenize.TokenShards(partial).load([0, 1, 2])
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)


def test_other_settings_or_a_foreign_folder_are_refused(setup, tmp_path):
  root, tokenizer_dir = setup
  out = str(tmp_path / "tokens")
  tokenize.tokenize(tokenizer_dir, out, images=str(root / "images"), image_size=16,
                    shard_size=3)
  with pytest.raises(tokenize.TokenizeError, match="image_size 16 -> 32"):
    tokenize.tokenize(tokenizer_dir, out, images=str(root / "images"), image_size=32,
                      shard_size=3)
  mine = tmp_path / "mine"
  mine.mkdir()
  (mine / "thesis.tex").write_text("years of work")
  with pytest.raises(tokenize.TokenizeError, match="holds files but no tokens.json"):
    tokenize.tokenize(tokenizer_dir, str(mine), images=str(root / "images"), image_size=16)
  assert os.listdir(mine) == ["thesis.tex"]


def test_a_token_dataset_of_other_shapes_is_named_as_real_data(setup, tmp_path):
  root, tokenizer_dir = setup
  out = str(tmp_path / "tokens")
  tokenize.tokenize(tokenizer_dir, out, images=str(root / "images"), image_size=16)
  dataset = data.ImageNet256(tokenizer_dir, real_tokens_path=out)
  with pytest.raises(tokenize.TokenizeError, match="64 positions over 17 codes; the teacher's "
                                                   "tokenizer has 256 over 1024"):
    data.real_tokens(dataset)
  small = data.ImageNet256(tokenizer_dir, num_classes=2, seq_len=64, codebook_size=17,
                           real_tokens_path=out)
  tokens, labels = data.real_tokens(small)
  assert tokens.shape == (7, 64) and labels.tolist() == [0, 0, 0, 1, 1, 1, 1]


def test_the_command_line_writes_the_shards_and_names_a_missing_flag(setup, tmp_path, capsys):
  root, tokenizer_dir = setup
  out = str(tmp_path / "tokens")
  tokenize.main(["--tokenizer", tokenizer_dir, "--images", str(root / "images"), "--out", out,
                 "--image_size", "16"])
  assert tokenize.TokenShards(out).manifest["count"] == 7
  with pytest.raises(SystemExit) as exit_info:
    tokenize.main(["--images", str(root / "images")])
  assert exit_info.value.code == 1
  assert capsys.readouterr().err.strip().splitlines()[-1] == (
      "error: --tokenizer and --out are required")


def test_each_process_reads_only_its_shards_and_feeds_its_devices_rows(setup, tmp_path):
  """Shard i belongs to process i mod P: the parts are disjoint and make the whole set; a
  process with no shard is refused by name. The discriminator's batch is drawn from (seed,
  step) alone, each process filling its rows from its own part."""
  from dimo_jax import train
  root, tokenizer_dir = setup
  out = str(tmp_path / "tokens")
  tokenize.tokenize(tokenizer_dir, out, images=str(root / "images"), image_size=16,
                    shard_size=3, batch_size=2)  # 3 shards: 3, 3 and 1 images
  dataset = data.ImageNet256(tokenizer_dir, num_classes=2, seq_len=64, codebook_size=17,
                             real_tokens_path=out)
  whole, whole_labels = data.real_tokens(dataset)
  first, first_labels = data.real_tokens(dataset, 0, 2)  # shards 0 and 2
  second, second_labels = data.real_tokens(dataset, 1, 2)  # shard 1
  assert (len(first), len(second)) == (4, 3)
  np.testing.assert_array_equal(np.concatenate([first[:3], second, first[3:]]), whole)
  np.testing.assert_array_equal(np.concatenate([first_labels[:3], second_labels,
                                                first_labels[3:]]), whole_labels)
  with pytest.raises(tokenize.TokenizeError, match="3 shards for 4 processes"):
    data.real_tokens(dataset, 3, 4)

  feeds = [train.RealFeed(part, labels, None, seed=5, rounds=2, batch=4)
           for part, labels in ((first, first_labels), (second, second_labels))]
  np.testing.assert_array_equal(feeds[0].draws(9), feeds[1].draws(9))  # the same in both
  assert not np.array_equal(feeds[0].draws(9), feeds[0].draws(10))
  rows = feeds[1].rows(feeds[1].draws(9))
  assert rows["tokens"].shape == (2, 4, 64)
  assert all(any(np.array_equal(r, s) for s in second) for r in rows["tokens"].reshape(-1, 64))
  mesh = parallel.make_mesh(1)
  placed = feeds[0](9, mesh)
  np.testing.assert_array_equal(np.asarray(placed["tokens"]),
                                feeds[0].rows(feeds[0].draws(9))["tokens"])
