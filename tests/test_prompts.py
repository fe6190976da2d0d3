"""Prompts for text-to-image distillation: prompt files, tfds captions, config selection, CLIP
embeddings against transformers' CLIPTextModelWithProjection, and the embedding cache."""

from tests.optional import need

need("torch", "transformers")

import os
import sys
import types

import jax
import ml_collections
import numpy as np
import pytest
import torch
import transformers

from dimo_jax.convert import clip as convert_clip
from dimo_jax.data import prompts as prompts_lib
from tests.test_clip import TOWER, _randomize, _write_tokenizer

ATOL = 1e-4
PROMPTS = [
    "A photo of a cat sitting on the mat",
    "an astronaut riding a horse on the moon, digital art",
    "Ünïcode café 東京 🙂",
    "the quick brown fox jumps over the lazy dog " * 10,  # truncated to 77 ids
    "wow!",
]
NEGATIVE = "worst quality, blurry"


# --- prompt files ----------------------------------------------------------------------------

def test_read_prompt_file(tmp_path):
  path = tmp_path / "prompts.txt"
  path.write_bytes("\ufeff  a red car \r\n\n\t\nzwei Äpfel  \n   \n東京の夜".encode("utf-8"))
  assert prompts_lib.read_prompt_file(str(path)) == ["a red car", "zwei Äpfel", "東京の夜"]


def test_read_prompt_file_errors(tmp_path):
  missing = str(tmp_path / "missing.txt")
  with pytest.raises(FileNotFoundError, match="missing.txt: no such prompt file"):
    prompts_lib.read_prompt_file(missing)
  blank = tmp_path / "blank.txt"
  blank.write_text(" \n\n\t\n")
  with pytest.raises(ValueError, match="blank.txt: holds no prompt"):
    prompts_lib.read_prompt_file(str(blank))
  latin = tmp_path / "latin1.txt"
  latin.write_bytes("first\ncaf\xe9\n".encode("latin-1"))
  with pytest.raises(ValueError, match=r"latin1.txt:2: not UTF-8"):
    prompts_lib.read_prompt_file(str(latin))


# --- tfds captions -----------------------------------------------------------------------------

def _coco_like(count: int):
  """Examples as tfds.as_numpy yields coco_captions': a Sequence of dicts is a dict of arrays,
  text is bytes, and a top-level feature name holds a '/'."""
  return [{"image": np.zeros((4, 4, 3), np.uint8), "image/id": np.int64(i),
           "captions": {"id": np.arange(3, dtype=np.int64) + 10 * i,
                        "text": np.array([f"caption {i}.{j} é".encode() for j in range(3)]
                                         + [b"  "], dtype=object)[[0, 1, 3, 2]]}}
          for i in range(count)]


def test_tfds_captions_from_the_real_coco_captions_builder():
  """tensorflow-datasets' own mock of coco_captions (its real builder and features, random
  text, nothing downloaded)."""
  from tests.optional import need
  need("tensorflow_datasets", "tensorflow")
  import tensorflow_datasets as tfds
  with tfds.testing.mock_data(num_examples=3):
    captions = prompts_lib.tfds_captions("coco_captions", "train", "captions/text")
    expected = [c.decode("utf-8").strip() for example in tfds.as_numpy(
        tfds.load("coco_captions", split="train", shuffle_files=False))
                for c in example["captions"]["text"]]
  assert captions == [c for c in expected if c]
  assert len(captions) >= 3 and all(isinstance(c, str) for c in captions)


@pytest.fixture
def fake_tfds(monkeypatch):
  """A stand-in tensorflow-datasets module with its `load` and `as_numpy`, recording how
  `load` was called, for examples that the mock cannot shape (bytes, blanks, scalar fields)."""
  calls = []
  datasets = {"coco_captions": _coco_like(4),
              "ag_news_subset": [{"description": b" first story ", "label": np.int64(1)},
                                 {"description": "second story", "label": np.int64(0)}]}

  def load(name, split, data_dir=None, shuffle_files=False):
    calls.append(dict(name=name, split=split, data_dir=data_dir, shuffle_files=shuffle_files))
    return iter(datasets[name])

  module = types.ModuleType("tensorflow_datasets")
  module.load, module.as_numpy = load, lambda dataset: dataset
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", module)
  return calls


def test_tfds_captions_sequence_field(fake_tfds):
  captions = prompts_lib.tfds_captions("coco_captions", "val", "captions/text",
                                       data_dir="/data/tfds")
  # Every non-blank caption of every example, in order, decoded and stripped.
  assert captions == [f"caption {i}.{j} é" for i in range(4) for j in range(3)]
  assert fake_tfds == [dict(name="coco_captions", split="val", data_dir="/data/tfds",
                            shuffle_files=False)]
  assert prompts_lib.tfds_captions("coco_captions", "val", "captions/text", limit=5) == [
      "caption 0.0 é", "caption 0.1 é", "caption 0.2 é", "caption 1.0 é", "caption 1.1 é"]


def test_tfds_captions_scalar_field(fake_tfds):
  assert prompts_lib.tfds_captions("ag_news_subset", "train", "description") == [
      "first story", "second story"]


def test_tfds_captions_errors(fake_tfds, monkeypatch):
  with pytest.raises(KeyError) as info:
    prompts_lib.tfds_captions("coco_captions", "val", "captions/caption")
  message = str(info.value)
  assert "coco_captions" in message and "'captions/caption'" in message
  assert "['captions/id', 'captions/text', 'image', 'image/id']" in message
  with pytest.raises(ValueError, match=r"'image/id' of example 0 holds int64, expected text"):
    prompts_lib.tfds_captions("coco_captions", "val", "image/id")
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
  with pytest.raises(ImportError, match="needs the tensorflow-datasets package"):
    prompts_lib.tfds_captions("coco_captions", "val", "captions/text")


# --- config ------------------------------------------------------------------------------------

def _prompts_config(**fields):
  spec = dict(file=None, tfds=None, tfds_split="train", tfds_field=None, tfds_data_dir=None,
              limit=None)
  spec.update(fields)
  return ml_collections.ConfigDict({"prompts": spec})


def test_config_prompts(tmp_path, fake_tfds):
  path = tmp_path / "prompts.txt"
  path.write_text("one\ntwo\n\nthree\n")
  assert prompts_lib.config_prompts(_prompts_config(file=str(path))) == ["one", "two", "three"]
  assert prompts_lib.config_prompts(_prompts_config(file=str(path), limit=2)) == ["one", "two"]
  config = _prompts_config(tfds="coco_captions", tfds_split="validation",
                           tfds_field="captions/text", tfds_data_dir="/d", limit=4)
  assert prompts_lib.config_prompts(config) == [
      "caption 0.0 é", "caption 0.1 é", "caption 0.2 é", "caption 1.0 é"]
  assert fake_tfds[-1] == dict(name="coco_captions", split="validation", data_dir="/d",
                               shuffle_files=False)
  for bad in (_prompts_config(), _prompts_config(file=str(path), tfds="coco_captions")):
    with pytest.raises(ValueError, match="exactly one of `file` and `tfds`"):
      prompts_lib.config_prompts(bad)
  with pytest.raises(ValueError, match="needs `tfds_field`"):
    prompts_lib.config_prompts(_prompts_config(tfds="coco_captions"))


# --- embeddings ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def release(tmp_path_factory):
  """A Meissonic-like root with a tiny random `text_encoder/` and a `tokenizer/` that pads with
  '!', plus the transformers model (float64) and the tokenizer's ids for PROMPTS + NEGATIVE."""
  root = str(tmp_path_factory.mktemp("release"))
  tokenizer_folder = os.path.join(root, "tokenizer")
  vocab_size = _write_tokenizer(tokenizer_folder, meissonic_style=True)
  reference_tokenizer = transformers.CLIPTokenizer.from_pretrained(tokenizer_folder)
  config = transformers.CLIPTextConfig(
      vocab_size=vocab_size, max_position_embeddings=77, projection_dim=24, hidden_act="gelu",
      bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1,
      pad_token_id=reference_tokenizer.pad_token_id, **TOWER)
  model = transformers.CLIPTextModelWithProjection(config).eval()
  _randomize(model, seed=7)
  model.save_pretrained(os.path.join(root, "text_encoder"))
  ids = reference_tokenizer(PROMPTS + [NEGATIVE], padding="max_length", max_length=77,
                            truncation=True).input_ids
  return root, model.double(), np.asarray(ids)


@pytest.fixture(scope="module")
def encoder(release):
  return convert_clip.text_encoder_from_folder(release[0])


def _max_abs(a, b) -> float:
  return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


@pytest.mark.parametrize("batch_size", [4, 64])
def test_encode_prompts_matches_transformers(release, batch_size):
  root, model, ids = release
  # Folders for both, the release-root layout; batch 4 pads the last of 2 batches (6 rows).
  out = prompts_lib.encode_prompts(root, root, PROMPTS, NEGATIVE, batch_size=batch_size)
  with torch.no_grad():
    expected = model(torch.from_numpy(ids).long(), output_hidden_states=True)
  hidden, pooled = expected.hidden_states[-2].numpy(), expected.text_embeds.numpy()
  errors = {"hidden": _max_abs(out.hidden, hidden[:-1]),
            "pooled": _max_abs(out.pooled, pooled[:-1]),
            "neg_hidden": _max_abs(out.neg_hidden, hidden[-1]),
            "neg_pooled": _max_abs(out.neg_pooled, pooled[-1])}
  print(f"prompt embeddings (batch {batch_size}) max abs errors: {errors}")
  assert all(error <= ATOL for error in errors.values()), errors
  assert out.hidden.shape == (5, 77, 32) and out.hidden.dtype == np.float32
  assert out.pooled.shape == (5, 24) and out.neg_hidden.shape == (77, 32)
  assert out.neg_pooled.shape == (24,)
  assert out.prompts == tuple(PROMPTS) and out.negative_prompt == NEGATIVE
  # The penultimate state, not the last one: they differ by a layer.
  assert _max_abs(hidden[:-1], expected.hidden_states[-1].numpy()[:-1]) > 0.1
  assert float(np.abs(pooled).max()) > 0.5
  # Only the prompts and the negative prompt are leaves of the pytree.
  assert len(jax.tree_util.tree_leaves(out)) == 4


def test_encode_prompts_padding_does_not_change_results(release, encoder):
  root = release[0]
  one = prompts_lib.encode_prompts(encoder, root, PROMPTS, NEGATIVE, batch_size=1)
  padded = prompts_lib.encode_prompts(encoder, root, PROMPTS, NEGATIVE, batch_size=4)
  for name in ("hidden", "pooled", "neg_hidden", "neg_pooled"):
    assert _max_abs(getattr(one, name), getattr(padded, name)) <= 1e-5, name


# --- cache -------------------------------------------------------------------------------------

def test_cache_hit_and_misses(release, encoder, tmp_path, monkeypatch):
  root = release[0]
  tokenizer = prompts_lib.clip_tokenizer.load(root)
  path = str(tmp_path / "cache" / "embeddings.npz")
  calls = []
  encode = prompts_lib.encode_prompts

  def counting(*args, **kwargs):
    calls.append(args[2])
    return encode(*args, **kwargs)

  monkeypatch.setattr(prompts_lib, "encode_prompts", counting)
  first = prompts_lib.cached_prompt_embeddings(path, encoder, tokenizer, PROMPTS[:3], NEGATIVE,
                                               batch_size=2)
  assert len(calls) == 1 and os.path.isfile(path)
  assert os.listdir(os.path.dirname(path)) == ["embeddings.npz"]  # no temporary file left

  def refuse(*args, **kwargs):
    raise AssertionError("recomputed although the cache matches")

  monkeypatch.setattr(prompts_lib, "encode_prompts", refuse)
  hit = prompts_lib.cached_prompt_embeddings(path, encoder, tokenizer, PROMPTS[:3], NEGATIVE)
  for name in ("hidden", "pooled", "neg_hidden", "neg_pooled"):
    np.testing.assert_array_equal(getattr(hit, name), getattr(first, name))
  assert hit.prompts == tuple(PROMPTS[:3]) and hit.negative_prompt == NEGATIVE

  monkeypatch.setattr(prompts_lib, "encode_prompts", counting)
  module, variables = encoder
  nudged = jax.tree_util.tree_map(lambda x: x, variables)
  nudged["params"]["text_projection"]["kernel"] = (
      nudged["params"]["text_projection"]["kernel"] + 1e-3)
  misses = [(encoder, PROMPTS[1:4], NEGATIVE),  # other prompts
            (encoder, PROMPTS[1:4], ""),  # other negative prompt
            ((module, nudged), PROMPTS[1:4], "")]  # other weights
  outs = []
  for text_encoder, prompts, negative in misses:
    count = len(calls)
    out = prompts_lib.cached_prompt_embeddings(path, text_encoder, tokenizer, prompts, negative)
    assert len(calls) == count + 1, (prompts, negative)
    assert out.prompts == tuple(prompts) and out.negative_prompt == negative
    # The stale file was replaced: the same request now hits.
    monkeypatch.setattr(prompts_lib, "encode_prompts", refuse)
    again = prompts_lib.cached_prompt_embeddings(path, text_encoder, tokenizer, prompts,
                                                 negative)
    np.testing.assert_array_equal(again.pooled, out.pooled)
    monkeypatch.setattr(prompts_lib, "encode_prompts", counting)
    outs.append(out)
  # A changed weight changes the embeddings, so reusing the old ones would have been wrong.
  assert _max_abs(outs[2].pooled, outs[1].pooled) > 1e-4


def test_unreadable_cache_is_recomputed(release, encoder, tmp_path):
  root = release[0]
  path = tmp_path / "embeddings.npz"
  path.write_bytes(b"not an npz")
  out = prompts_lib.cached_prompt_embeddings(str(path), encoder, root, PROMPTS[:2])
  assert out.hidden.shape == (2, 77, 32)
  with np.load(path) as data:
    np.testing.assert_array_equal(data["hidden"], out.hidden)
    assert len(str(data["key"])) == 64


def test_fingerprints_see_config_and_tokenizer(release, encoder, tmp_path):
  module, variables = encoder
  base = prompts_lib.encoder_fingerprint(module, variables)
  assert prompts_lib.encoder_fingerprint(module, variables) == base
  assert prompts_lib.encoder_fingerprint(module.clone(layer_norm_eps=1e-6), variables) != base
  tokenizer = prompts_lib.clip_tokenizer.load(release[0])
  shorter = prompts_lib.clip_tokenizer.load(release[0], max_length=40)
  assert (prompts_lib.tokenizer_fingerprint(tokenizer)
          != prompts_lib.tokenizer_fingerprint(shorter))
