"""Reading a model directory that a user changed by hand: model.json of other shapes than params/,
a model.json or vocab.json that is not what it should be, a Meissonic directory whose parts lie
outside it, a VQ-VAE of another codebook. Each is one `ModelDirError` naming the file.

Every directory is tiny and random: the digits teacher and 17-code VQGAN of tests/test_train.py
and tests/test_sample_cli.py, a small google-maskgit, and a `meissonic` directory written the way
`python -m dimo_jax.pretrain` writes the digits_text teacher (toy CLIP text encoder and
tokenizer), with the 17-code VQGAN as its vqvae/.
"""

import json
import os
import re
import shutil

import jax
import jax.numpy as jnp
import pytest

from configs import digits_text_teacher
from dimo_jax import data, modeldir, pretrain, teachers, tokenizers
from dimo_jax.errors import UserError
from dimo_jax.models.google_maskgit import GoogleMaskGIT
from dimo_jax.models.taming_vqgan import VQModel
from tests.test_sample_cli import tiny_tokenizer
from tests.test_train import tiny_teacher


def tiny_google_maskgit(path: str) -> str:
  model = GoogleMaskGIT(codebook_size=17, num_classes=10, seq_len=64, hidden_size=16,
                        num_layers=1, num_heads=2, intermediate_size=32)
  variables = model.init({"params": jax.random.PRNGKey(0)}, jnp.zeros((1, 64), jnp.int32),
                         jnp.zeros((1,), jnp.int32))
  teachers.save(path, model, variables)
  return path


def tiny_text_teacher(path: str) -> str:
  """A `meissonic` directory of 17 codes on an 8x8 grid: model.json, params/, text_encoder/,
  tokenizer/ (as pretraining on digits_text writes them) and vqvae/ (a 17-code VQGAN)."""
  config = digits_text_teacher.get_config()
  config.text_encoder.update(hidden_size=16, intermediate_size=24, num_attention_heads=2,
                             projection_dim=16)
  config.model.update(num_layers=1, num_single_layers=1, attention_head_dim=8,
                      num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=16,
                      axes_dims_rope=(2, 2, 4))
  teacher = pretrain.build_teacher(config)
  variables = teacher.init_variables(jax.random.PRNGKey(0))
  pretrain.save_text_teacher(path, teacher.model, variables, data.get(config), {})
  tiny_tokenizer(os.path.join(path, "vqvae"))
  edit_json(os.path.join(path, "model.json"), lambda d: dict(d, vqvae="vqvae"))
  return path


def small_tokenizer(path: str, codes: int) -> str:
  """tests/test_sample_cli.py's VQGAN with `codes` codebook entries."""
  model = VQModel(ch=32, out_ch=3, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(),
                  in_channels=3, resolution=16, z_channels=4, n_embed=codes, embed_dim=4)
  tokenizers.save(path, model, model.init(jax.random.PRNGKey(0), jnp.zeros((1, 2, 2, 3))))
  return path


def edit_json(path: str, edit) -> None:
  with open(path) as f:
    value = json.load(f)
  with open(path, "w") as f:
    json.dump(edit(value), f)


def edit_config(path: str, **fields) -> None:
  """Changes fields of the config in model.json of the directory `path`."""
  edit_json(os.path.join(path, "model.json"),
            lambda d: dict(d, config=dict(d["config"], **fields)))


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
  root = tmp_path_factory.mktemp("modeldirs")
  return {"maskgit": tiny_teacher(str(root / "maskgit")),
          "google-maskgit": tiny_google_maskgit(str(root / "google")),
          "tokenizer": tiny_tokenizer(str(root / "tokenizer")),
          "tokenizer16": small_tokenizer(str(root / "tokenizer16"), 16),
          "meissonic": tiny_text_teacher(str(root / "meissonic"))}


@pytest.fixture
def copy(dirs, tmp_path):
  """copy(name) -> a fresh copy of one of the directories, to edit."""
  def make(name):
    dst = str(tmp_path / f"{name}_{len(os.listdir(tmp_path))}")
    shutil.copytree(dirs[name], dst, symlinks=True)
    return dst
  return make


def refused(load, *args, match: str):
  with pytest.raises(modeldir.ModelDirError) as info:
    load(*args)
  assert isinstance(info.value, UserError)
  assert re.search(match, str(info.value)), str(info.value)
  return str(info.value)


def test_the_directories_load(dirs):
  assert teachers.load(dirs["maskgit"]).model.codebook_size == 17
  assert teachers.load(dirs["google-maskgit"]).model.codebook_size == 17
  assert tokenizers.load(dirs["tokenizer"]).codebook_size == 17
  assert tokenizers.load(dirs["tokenizer16"]).codebook_size == 16
  teacher = teachers.load(dirs["meissonic"])
  assert teacher.text_conditioned and teacher.codebook_size == 17
  assert tokenizers.load(dirs["meissonic"]).codebook_size == 17


# --- 1. model.json describing other shapes than params/ ----------------------------------------

@pytest.mark.parametrize("name, fields, key, described, stored", [
    # The output bias: a row a position (64 + the class token), a column a token id (17 codes,
    # the mask, 10 classes and "no class").
    ("maskgit", {"codebook_size": 18}, "params/bias", "(65, 30)", "(65, 29)"),
    ("maskgit", {"hidden_dim": 24, "mlp_dim": 48}, "params/first_layer/layers_0/bias",
     "(24,)", "(16,)"),
    ("google-maskgit", {"num_classes": 11}, "params/Embed_0/word_embeddings/embedding",
     "(29, 16)", "(28, 16)"),
])
def test_a_teacher_model_json_of_other_shapes_is_refused(copy, name, fields, key, described,
                                                         stored):
  src = copy(name)
  edit_config(src, **fields)
  message = refused(teachers.load, src, match="")
  assert message.startswith(f"{src}/model.json describes {key} of shape {described} but "
                            f"{src}/params holds {stored}")


def test_a_tokenizer_model_json_of_other_shapes_is_refused(copy):
  src = copy("tokenizer")
  edit_config(src, n_embed=18)
  message = refused(tokenizers.load, src, match="")
  assert message.startswith(f"{src}/model.json describes params/quantize/embedding of shape "
                            f"(18, 4) but {src}/params holds (17, 4)")


def test_a_meissonic_model_json_of_other_shapes_is_refused(copy):
  src = copy("meissonic")
  edit_config(src, codebook_size=16, vocab_size=17)
  refused(teachers.load, src, match=rf"^{src}/model.json describes params/\S+ of shape "
                                    rf"\([\d, ]+\) but {src}/params holds \(")
  src = copy("meissonic")
  edit_config(os.path.join(src, "text_encoder"), intermediate_size=32)
  refused(teachers.load, src, match=rf"^{src}/text_encoder/model.json describes params/\S+ of "
                                    rf"shape \([\d, ]+\) but {src}/text_encoder/params holds")


def test_params_missing_or_holding_more_layers_than_model_json_describes(copy):
  src = copy("maskgit")
  edit_config(src, depth=2)
  refused(teachers.load, src, match=rf"^{src}/model.json describes params/transformer/layers_1"
                                    rf"\S* of shape \([\d, ]+\) but {src}/params has no ")
  src = copy("maskgit")
  edit_config(src, depth=0)
  refused(teachers.load, src, match=rf"^{src}/params holds params/transformer/layers_0\S* of "
                                    rf"shape \([\d, ]+\), which {src}/model.json does not "
                                    "describe")


def test_damaged_params_are_named(copy):
  src = copy("tokenizer")
  for folder, _, names in os.walk(os.path.join(src, "params")):
    for name in names:
      if name == "manifest.ocdbt":
        with open(os.path.join(folder, name), "r+b") as f:
          f.truncate(5)
  refused(tokenizers.load, src, match=rf"^{src}/params: cannot be read .*write the model "
                                      "directory again")


# --- 2. model.json and vocab.json that are not what they should be -----------------------------

def _write(text):
  def edit(path):
    with open(os.path.join(path, "model.json"), "w") as f:
      f.write(text)
  return edit


def _set(**keys):
  return lambda path: edit_json(os.path.join(path, "model.json"), lambda d: {
      k: v for k, v in dict(d, **keys).items() if v is not None})


BAD_DESCRIPTIONS = {
    "not JSON": (_write('{"kind": "maskgit", '), "expected a JSON object .* found text that is "
                 "not JSON"),
    "not an object": (_write("[1, 2]"), "expected a JSON object .* found a JSON array"),
    "no kind": (_set(kind=None), r"expected the keys 'kind' and 'config', found \['config'"),
    "no config": (_set(config=None), r"expected the keys 'kind' and 'config', found \["),
    "config not an object": (_set(config=[16]), "config: expected an object of module fields, "
                             "found a JSON array"),
    "unknown kind": (_set(kind="maskgit-v2"), "kind: expected a (teacher|tokenizer) kind among "
                     r"\[.*\], found 'maskgit-v2'"),
}


@pytest.mark.parametrize("case", sorted(BAD_DESCRIPTIONS))
@pytest.mark.parametrize("name, load", [("maskgit", teachers.load),
                                        ("tokenizer", tokenizers.load),
                                        ("meissonic", teachers.load)])
def test_an_invalid_model_json_is_named(copy, name, load, case):
  edit, match = BAD_DESCRIPTIONS[case]
  src = copy(name)
  edit(src)
  refused(load, src, match=rf"^{src}/model.json: {match}")


@pytest.mark.parametrize("name, fields, match", [
    ("maskgit", {"hidden_dims": 16}, r"config: 'hidden_dims' is not a field of MaskTransformer; "
     r"expected keys among \[.*'hidden_dim'"),
    ("maskgit", {"hidden_dim": "16"}, "config: hidden_dim: expected an integer, found '16'"),
    ("maskgit", {"dropout": True}, "config: dropout: expected a number, found True"),
    ("maskgit", {"dtype": "bfloat16"}, "config: 'dtype' is not a field of MaskTransformer"),
    ("maskgit", {"num_heads": 3}, "config: expected the fields of a module that can be built, "
     "found values it fails on .*not divisible by num_heads 3"),
    ("tokenizer", {"ch_mult": "12"}, "config: ch_mult: expected a list of integers, found '12'"),
    ("meissonic", {"axes_dims_rope": [2, "x", 4]}, "config: axes_dims_rope: expected a list of "
     "integers"),
])
def test_a_config_with_a_bad_value_is_named(copy, name, fields, match):
  src = copy(name)
  edit_config(src, **fields)
  load = tokenizers.load if name == "tokenizer" else teachers.load
  refused(load, src, match=rf"^{src}/model.json: {match}")


def test_a_config_missing_a_required_field_is_named(copy):
  src = copy("maskgit")
  edit_json(os.path.join(src, "model.json"), lambda d: dict(d, config={
      k: v for k, v in d["config"].items() if k != "seq_len"}))
  refused(teachers.load, src, match=rf"^{src}/model.json: config: expected the MaskTransformer "
                                    r"fields \['seq_len'\]")


@pytest.mark.parametrize("key, value, match", [
    ("token_grid", [8], r"token_grid: expected two positive integers \[h, w\], found \[8\]"),
    ("resolution", "8", "resolution: expected a positive integer, found '8'"),
    ("scheduler", {"masking_schedule": "arccos"}, "scheduler: expected an object whose "
     "masking_schedule is one of"),
])
def test_meissonic_keys_with_bad_values_are_named(copy, key, value, match):
  src = copy("meissonic")
  edit_json(os.path.join(src, "model.json"), lambda d: dict(d, **{key: value}))
  refused(teachers.load, src, match=rf"^{src}/model.json: {match}")


@pytest.mark.parametrize("content, found", [("{not json", "text that is not JSON"),
                                            ('["a", "b"]', "a JSON array")])
def test_an_invalid_vocab_json_is_named(copy, content, found):
  src = copy("meissonic")
  with open(os.path.join(src, "tokenizer", "vocab.json"), "w") as f:
    f.write(content)
  refused(teachers.load, src, match=rf"^{src}/tokenizer/vocab.json: expected a JSON object, "
                                    f"found {found}")


# --- 2. Meissonic parts outside the directory --------------------------------------------------

PARTS = {"vqvae": tokenizers.load, "tokenizer": teachers.load, "text_encoder": teachers.load}


@pytest.mark.parametrize("key", sorted(PARTS))
@pytest.mark.parametrize("where", ["parent", "absolute", "symlink"])
def test_a_part_outside_the_directory_is_refused(copy, tmp_path, key, where):
  """The part exists outside (a whole copy of it), so following the path would work: it must
  be refused, not followed."""
  src = copy("meissonic")
  outside = tmp_path / f"outside_{key}"
  shutil.copytree(os.path.join(src, key), outside)
  if where == "parent":
    value = os.path.join("..", outside.name)
  elif where == "absolute":
    value = str(outside)
  else:
    shutil.rmtree(os.path.join(src, key))
    os.symlink(outside, os.path.join(src, key))
    value = key
  edit_json(os.path.join(src, "model.json"), lambda d: dict(d, **{key: value}))
  message = refused(PARTS[key], src, match=rf"^{src}/model.json: {key}: expected a folder "
                                           f"inside {src}, found ")
  assert repr(value) in message


@pytest.mark.parametrize("key", sorted(PARTS))
def test_a_part_naming_the_directory_itself_is_refused(copy, key):
  src = copy("meissonic")
  edit_json(os.path.join(src, "model.json"), lambda d: dict(d, **{key: "."}))
  refused(PARTS[key], src, match=rf"^{src}/model.json: {key}: expected a folder inside {src}, "
                                 r"found '\.'")


def test_a_vqvae_of_another_codebook_is_refused(copy, dirs):
  src = copy("meissonic")
  shutil.rmtree(os.path.join(src, "vqvae"))
  shutil.copytree(dirs["tokenizer16"], os.path.join(src, "vqvae"))
  refused(tokenizers.load, src, match=rf"^{src}/vqvae: expected a tokenizer of the 17 codes of "
                                      f"the teacher {src}, found one of 16 codes")
