"""CLIP: towers converted from transformers' on-disk layout against transformers itself, CLIP
score, preprocessing against CLIPImageProcessorPil, and the BPE tokenizer against
transformers.CLIPTokenizer."""

from tests.optional import need

need("torch", "transformers", "safetensors")

import collections
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file
from tokenizers.pre_tokenizers import ByteLevel

from dimo_jax import clip_tokenizer
from dimo_jax.convert import clip as convert_clip
from dimo_jax.convert.common import ConversionError
from dimo_jax.models import clip

ATOL = 1e-4
TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
VISION = dict(TOWER, image_size=32, patch_size=8, projection_dim=16, hidden_act="gelu")

PROMPTS = [
    "A photo of a CAT sitting on the mat",
    "wow!  the   quick\tbrown fox!!",
    "it's 2024, 3.14 the fox's den; they've gone (I'm sure)",
    "  Ünïcode café naïve 東京 🙂 ",
    "<|endoftext|>! x <|ENDOFTEXT|> <|startoftext|>",
    "",
    "an astronaut riding a horse on the moon, digital art, " * 8,  # > 75 tokens: truncated
]


def _randomize(model: torch.nn.Module, seed: int) -> None:
  """Every parameter random and away from its default (LayerNorm 1/0, small init), so that a
  swapped or untransposed tensor changes the outputs."""
  torch.manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name == "logit_scale":
        p.fill_(2.5)
      elif "norm" in name and name.endswith("weight"):
        p.copy_(1.0 + 0.3 * torch.randn(p.shape))
      elif p.ndim >= 2 and "embedding" not in name:
        p.copy_(torch.randn(p.shape) / p[0].numel() ** 0.5)
      elif "embedding" in name:
        p.copy_(torch.randn(p.shape))
      else:
        p.copy_(0.3 * torch.randn(p.shape))


def _max_abs(a, b) -> float:
  return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


# --- text encoder (CLIPTextModelWithProjection, Meissonic's text_encoder/) --------------------

# legacy: the pre-#24773 eos_token_id 2, which pools at the largest id (eos 99 here, padding 0,
# and a token 2 early on that the other rule would pick). eos_id: pooling at the first 7 (the
# padding is 7 as well) while larger content ids follow it, which the legacy rule would pick.
TEXT_CASES = {
    "legacy": dict(eos_token_id=2, bos_token_id=98, pad_token_id=0, hidden_act="gelu"),
    "eos_id": dict(eos_token_id=7, bos_token_id=5, pad_token_id=7, hidden_act="quick_gelu"),
}


def _text_ids(case: str) -> np.ndarray:
  rng = np.random.default_rng(3)
  rows = []
  for length in (3, 9, 14):
    if case == "legacy":
      content = list(rng.integers(3, 98, length))
      content[0] = 2
      rows.append([98] + content + [99] + [0] * (14 - length))
    else:
      content = list(rng.integers(8, 100, length))
      rows.append([5] + content + [7] * (15 - length))
  return np.asarray(rows, np.int32)


@pytest.fixture(scope="module", params=sorted(TEXT_CASES))
def text_release(request, tmp_path_factory):
  config = transformers.CLIPTextConfig(vocab_size=100, projection_dim=24,
                                       max_position_embeddings=20, **TOWER,
                                       **TEXT_CASES[request.param])
  model = transformers.CLIPTextModelWithProjection(config).eval()
  _randomize(model, seed=len(request.param))
  folder = str(tmp_path_factory.mktemp("text_encoder"))
  model.save_pretrained(folder)
  return request.param, folder, model.double()


def test_text_encoder_matches_transformers(text_release):
  case, folder, reference = text_release
  module, variables = convert_clip.text_encoder_from_folder(folder)
  assert module.eos_token_id == TEXT_CASES[case]["eos_token_id"]
  assert module.hidden_act == TEXT_CASES[case]["hidden_act"] and module.projection_dim == 24
  ids = _text_ids(case)
  # The two pooling rules disagree on these ids, so picking the wrong one fails below.
  assert (ids.argmax(-1) != (ids == module.eos_token_id).argmax(-1)).all()

  out = module.apply(variables, jnp.asarray(ids))
  with torch.no_grad():
    t_ids = torch.from_numpy(ids).long()
    expected = reference(t_ids, output_hidden_states=True)
    pooled = reference.text_model(t_ids).pooler_output
  errors = {
      "last_hidden_state": _max_abs(out["last_hidden_state"], expected.last_hidden_state),
      "penultimate": _max_abs(out["hidden_states"][-2], expected.hidden_states[-2]),
      "pooled": _max_abs(out["pooled"], pooled),
      "text_embeds": _max_abs(out["text_embeds"], expected.text_embeds),
  }
  print(f"text encoder ({case}) max abs errors: {errors}")
  assert len(out["hidden_states"]) == len(expected.hidden_states) == 3
  for ours, theirs in zip(out["hidden_states"], expected.hidden_states):
    assert _max_abs(ours, theirs) <= ATOL
  assert all(error <= ATOL for error in errors.values()), errors
  assert out["text_embeds"].shape == (3, 24) and out["text_embeds"].dtype == jnp.float32
  assert float(np.abs(expected.text_embeds.numpy()).max()) > 0.5  # not near-zero outputs


def test_text_encoder_bfloat16_compute_is_close(text_release):
  case, folder, _ = text_release
  module, variables = convert_clip.text_encoder_from_folder(folder, dtype=jnp.bfloat16)
  full, _ = convert_clip.text_encoder_from_folder(folder)
  ids = jnp.asarray(_text_ids(case))
  low = module.apply(variables, ids)["text_embeds"]
  high = full.apply(variables, ids)["text_embeds"]
  assert low.dtype == jnp.float32
  scale = float(jnp.abs(high).max())
  assert 0 < _max_abs(low, high) < 0.1 * scale


# --- vision encoder -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def vision_release(tmp_path_factory):
  model = transformers.CLIPVisionModelWithProjection(
      transformers.CLIPVisionConfig(**VISION)).eval()
  _randomize(model, seed=11)
  folder = str(tmp_path_factory.mktemp("vision_encoder"))
  model.save_pretrained(folder)
  return folder, model.double()


def test_vision_encoder_matches_transformers(vision_release):
  folder, reference = vision_release
  module, variables = convert_clip.vision_encoder_from_folder(folder)
  pixels = np.random.default_rng(4).normal(size=(2, 32, 32, 3)).astype(np.float32)
  embeds = module.apply(variables, jnp.asarray(pixels))
  with torch.no_grad():
    expected = reference(torch.from_numpy(pixels).permute(0, 3, 1, 2).double()).image_embeds
  error = _max_abs(embeds, expected)
  print(f"vision encoder image_embeds max abs error: {error:.2e}")
  assert embeds.shape == (2, 16) and error <= ATOL
  assert float(expected.abs().max()) > 0.5
  with pytest.raises(ValueError, match="pixel_values"):
    module.apply(variables, jnp.zeros((1, 24, 24, 3)))


# --- preprocessing and score ----------------------------------------------------------------------

def _smooth_uint8(shape, seed) -> np.ndarray:
  """A smooth random image, so that resampling differences stay small."""
  rng = np.random.default_rng(seed)
  coarse = rng.uniform(0, 255, (4, 4, 3))
  rows = np.linspace(0, 3, shape[0])[:, None]
  cols = np.linspace(0, 3, shape[1])[None, :]
  r0, c0 = np.floor(rows).astype(int).clip(0, 2), np.floor(cols).astype(int).clip(0, 2)
  fr, fc = (rows - r0)[..., None], (cols - c0)[..., None]
  image = (coarse[r0, c0] * (1 - fr) * (1 - fc) + coarse[r0 + 1, c0] * fr * (1 - fc)
           + coarse[r0, c0 + 1] * (1 - fr) * fc + coarse[r0 + 1, c0 + 1] * fr * fc)
  return image.round().astype(np.uint8)


@pytest.mark.parametrize("shape,atol", [((32, 32), 1e-5), ((41, 32), 1e-5), ((32, 47), 1e-5),
                                        ((64, 80), 0.03), ((20, 30), 0.03)])
def test_preprocess_matches_clip_image_processor(shape, atol):
  from PIL import Image
  processor = transformers.CLIPImageProcessorPil(size={"shortest_edge": 32},
                                                 crop_size={"height": 32, "width": 32})
  image = _smooth_uint8(shape, seed=sum(shape))
  expected = processor(images=[Image.fromarray(image)], return_tensors="np")["pixel_values"]
  ours = clip.preprocess(jnp.asarray(image[None] / 255.0, jnp.float32), 32)
  error = _max_abs(ours, expected.transpose(0, 2, 3, 1))
  print(f"preprocess {shape}: max abs error {error:.2e}")
  # Without resizing only the crop offset and normalization matter; with it, the processor's
  # rounding to uint8 after resizing (1/255 / std ~ 0.015) dominates.
  assert ours.shape == (1, 32, 32, 3) and error <= atol


def test_clip_score_definition():
  image = jnp.asarray([[1.0, 0.0], [2.0, 0.0], [1.0, 1.0]])
  text = jnp.asarray([[3.0, 3.0], [-1.0, 0.1], [1.0, 1.0]])
  np.testing.assert_allclose(clip.clip_score(image, text), [100 / np.sqrt(2), 0.0, 100.0],
                             rtol=1e-6)


# --- tokenizer ------------------------------------------------------------------------------

_CORPUS = ("a photo of a cat sitting on the mat the quick brown fox jumps over the lazy dog "
           "an astronaut riding a horse on the moon digital art highly detailed trending on "
           "artstation what we are doing they have gone cafe tokyo sure")


def _merges(count: int):
  """A few BPE merges learned on _CORPUS (most frequent pair first), in CLIP's </w> form."""
  words = collections.Counter(_CORPUS.split())
  symbols = {w: tuple(w[:-1]) + (w[-1] + "</w>",) for w in words}
  merges = []
  for _ in range(count):
    pairs = collections.Counter()
    for word, s in symbols.items():
      for pair in zip(s, s[1:]):
        pairs[pair] += words[word]
    if not pairs:
      break
    best = max(pairs, key=lambda pair: (pairs[pair], pair))
    merges.append(best)
    for word, s in symbols.items():
      merged, i = [], 0
      while i < len(s):
        if i + 1 < len(s) and (s[i], s[i + 1]) == best:
          merged.append(s[i] + s[i + 1])
          i += 2
        else:
          merged.append(s[i])
          i += 1
      symbols[word] = tuple(merged)
  return merges


def _write_tokenizer(folder: str, meissonic_style: bool) -> int:
  """CLIP's vocabulary layout (256 byte symbols, the same with </w>, merges, then the two
  special tokens) with 150 merges; returns the vocabulary size. The Meissonic-style folder pads
  with `!` (special_tokens_map.json overriding tokenizer_config.json, AddedToken dicts)."""
  os.makedirs(folder, exist_ok=True)
  alphabet = sorted(ByteLevel.alphabet())
  vocab = {}
  for symbol in alphabet + [a + "</w>" for a in alphabet]:
    vocab[symbol] = len(vocab)
  merges = _merges(150)
  for left, right in merges:
    vocab.setdefault(left + right, len(vocab))
  for special in ("<|startoftext|>", "<|endoftext|>"):
    vocab[special] = len(vocab)
  with open(os.path.join(folder, "vocab.json"), "w") as f:
    json.dump(vocab, f)
  with open(os.path.join(folder, "merges.txt"), "w") as f:
    f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
  if meissonic_style:
    added = lambda content: {"__type": "AddedToken", "content": content, "lstrip": False,
                             "normalized": True, "rstrip": False, "single_word": False}
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
      json.dump({"tokenizer_class": "CLIPTokenizer", "model_max_length": 77,
                 "do_lower_case": True, "bos_token": added("<|startoftext|>"),
                 "eos_token": added("<|endoftext|>"), "unk_token": added("<|endoftext|>"),
                 "pad_token": "<|endoftext|>"}, f)
    with open(os.path.join(folder, "special_tokens_map.json"), "w") as f:
      json.dump({"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
                 "unk_token": "<|endoftext|>", "pad_token": "!"}, f)
  return len(vocab)


@pytest.mark.parametrize("meissonic_style", [True, False])
def test_tokenizer_matches_transformers(tmp_path, meissonic_style):
  folder = str(tmp_path / "tokenizer")
  _write_tokenizer(folder, meissonic_style)
  ours = clip_tokenizer.load(str(tmp_path))  # a release root: its tokenizer/ is read
  reference = transformers.CLIPTokenizer.from_pretrained(folder)
  assert ours.pad_token == reference.pad_token == ("!" if meissonic_style else "<|endoftext|>")
  ids = ours(PROMPTS)
  expected = reference(PROMPTS, padding="max_length", truncation=True, max_length=77).input_ids
  assert ids.shape == (len(PROMPTS), 77) and ids.dtype == np.int32
  for prompt, row, expected_row in zip(PROMPTS, ids, expected):
    assert list(row) == list(expected_row), prompt
  # The merges are exercised (not every word falls apart into bytes) and the long prompt is
  # truncated to bos + 75 + eos.
  assert ours.vocab["the</w>"] in ids[0] or ours.vocab["the</w>"] in ids[1]
  long_ids = ours.encode(PROMPTS[-1])
  assert len(long_ids) > 75 and list(ids[-1]) == [ours.bos_id] + long_ids[:75] + [ours.eos_id]


# --- a full CLIPModel: conversion to a model directory, CLIP score -----------------------------

@pytest.fixture(scope="module")
def clip_release(tmp_path_factory):
  root = tmp_path_factory.mktemp("clip")
  src = str(root / "release")
  vocab_size = _write_tokenizer(src, meissonic_style=False)
  text_config = dict(TOWER, vocab_size=vocab_size, max_position_embeddings=77,
                     projection_dim=16, hidden_act="quick_gelu", bos_token_id=vocab_size - 2,
                     eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1)
  config = transformers.CLIPConfig(text_config=text_config, vision_config=VISION,
                                   projection_dim=24)
  model = transformers.CLIPModel(config).eval()
  _randomize(model, seed=5)
  model.save_pretrained(src)
  dst = str(root / "converted")
  convert_clip.convert(src, dst)
  return src, dst, model.double()


def test_clip_model_directory_scores_like_transformers(clip_release):
  src, dst, reference = clip_release
  loaded = convert_clip.load_clip(dst)
  assert loaded.description["kind"] == "clip"
  assert loaded.text.projection_dim == loaded.vision.projection_dim == 24
  assert float(loaded.variables["logit_scale"]) == 2.5

  prompts = PROMPTS[:3]
  images = np.stack([_smooth_uint8((32, 40), seed) for seed in range(3)]) / 255.0
  images = jnp.asarray(images, jnp.float32)
  ids = transformers.CLIPTokenizer.from_pretrained(src)(
      prompts, padding="max_length", truncation=True, max_length=77).input_ids
  pixels = np.array(clip.preprocess(images, 32)).transpose(0, 3, 1, 2)
  with torch.no_grad():
    text = reference.get_text_features(torch.tensor(ids)).pooler_output.numpy()
    image = reference.get_image_features(torch.from_numpy(pixels).double()).pooler_output.numpy()
  cos = (text * image).sum(-1) / np.linalg.norm(text, axis=-1) / np.linalg.norm(image, axis=-1)

  errors = {"text_embeds": _max_abs(loaded.text_embeds(prompts), text),
            "image_embeds": _max_abs(loaded.image_embeds(images), image),
            "score": _max_abs(loaded.score(images, prompts), 100 * np.maximum(cos, 0))}
  print(f"CLIPModel max abs errors: {errors}")
  assert all(error <= ATOL for error in errors.values()), errors

  # Either tower can also be read straight from the CLIPModel folder.
  module, variables = convert_clip.text_encoder_from_folder(src)
  out = module.apply(variables, jnp.asarray(ids))
  assert _max_abs(out["text_embeds"], text) <= ATOL


# --- errors ---------------------------------------------------------------------------------

def _edited_copy(src: str, dst: str, edit) -> str:
  os.makedirs(dst)
  with open(os.path.join(src, "config.json")) as f:
    config = json.load(f)
  state = load_file(os.path.join(src, "model.safetensors"))
  edit(config, state)
  with open(os.path.join(dst, "config.json"), "w") as f:
    json.dump(config, f)
  save_file(state, os.path.join(dst, "model.safetensors"))
  return dst


def _missing(config, state):
  del state["text_model.encoder.layers.1.mlp.fc2.bias"]


def _wrong_shape(config, state):
  state["text_projection.weight"] = state["text_projection.weight"][:, :-1].copy()


def _unexpected(config, state):
  state["text_model.encoder.layers.2.mlp.fc1.bias"] = np.zeros(64, np.float32)


def _buffer(config, state):
  state["text_model.embeddings.position_ids"] = np.arange(20, dtype=np.int64)[None]


def _bad_act(config, state):
  config["hidden_act"] = "relu"


@pytest.mark.parametrize("edit,message", [
    (_missing, r"missing keys \['text_model\.encoder\.layers\.1\.mlp\.fc2\.bias'\]"),
    (_wrong_shape, r"'text_projection\.weight' has shape \(24, 31\), expected \(24, 32\)"),
    (_unexpected, r"unexpected keys \['text_model\.encoder\.layers\.2\.mlp\.fc1\.bias'\]"),
    (_bad_act, r"config\.json: hidden_act 'relu' is not supported"),
    (_buffer, None),
])
def test_conversion_errors(text_release, tmp_path, edit, message):
  _, folder, _ = text_release
  edited = _edited_copy(folder, str(tmp_path / "edited"), edit)
  if message is None:  # a saved position_ids buffer is not a parameter and is skipped
    convert_clip.text_encoder_from_folder(edited)
    return
  with pytest.raises(ConversionError, match=message) as info:
    convert_clip.text_encoder_from_folder(edited)
  assert edited in str(info.value)


def test_text_encoder_from_release_root(text_release, tmp_path):
  _, folder, _ = text_release
  _edited_copy(folder, str(tmp_path / "text_encoder"), lambda c, s: None)
  module, variables = convert_clip.text_encoder_from_folder(str(tmp_path))
  _, direct = convert_clip.text_encoder_from_folder(folder)
  ids = jnp.asarray(_text_ids(text_release[0]))
  assert _max_abs(module.apply(variables, ids)["text_embeds"],
                  module.apply(direct, ids)["text_embeds"]) == 0.0


def test_convert_needs_the_tokenizer_and_a_full_model(clip_release, text_release, tmp_path):
  src, _, _ = clip_release
  without_tokenizer = _edited_copy(src, str(tmp_path / "no_tokenizer"), lambda c, s: None)
  with pytest.raises(FileNotFoundError, match="vocab.json"):
    convert_clip.convert(without_tokenizer, str(tmp_path / "out"))
  _, text_folder, _ = text_release
  only_text = str(tmp_path / "only_text")
  _edited_copy(text_folder, only_text, lambda c, s: None)
  _write_tokenizer(only_text, meissonic_style=False)
  with pytest.raises(ConversionError, match="expected a CLIPModel config"):
    convert_clip.convert(only_text, str(tmp_path / "out"))
  assert not os.path.exists(tmp_path / "out")
