"""Converters and model directories never lose what the user owns: a destination is replaced only
when it is a model directory, SRC and what contains it are never touched, and at every instant
either the old or the new directory is whole (interrupted conversions are cleaned up next time)."""

from tests.optional import need

need("torch", "yaml", "safetensors")

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import types

import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import yaml

from dimo_jax import modeldir, tokenizers
from dimo_jax.convert import common, diffusers_vq, google_maskgit, google_vqgan, halton_maskgit
from dimo_jax.convert import taming_vqgan
from dimo_jax.convert.__main__ import main as convert_main
from dimo_jax.convert.common import ConversionError, flatten, unflatten
from tests import test_convert_diffusers_vq as diffusers_case
from tests import test_convert_google_maskgit as google_maskgit_case
from tests import test_convert_google_vqgan as google_vqgan_case
from tests import test_convert_halton_maskgit as halton_case
from tests import test_convert_taming_vqgan as taming_case
from tests.reference.halton_maskgit_torch import ReferenceMaskTransformer

VARIABLES = {"params": {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}}


def _write_model(dst, tag):
  modeldir.write(str(dst), {"kind": "toy", "config": {}, "tag": tag}, VARIABLES)


def _tag(dst):
  with open(os.path.join(dst, modeldir.DESCRIPTION_FILE)) as f:
    return json.load(f)["tag"]


def _user_folder(path):
  path.mkdir(parents=True, exist_ok=True)
  (path / "thesis.tex").write_text("years of work")
  (path / "data").mkdir(exist_ok=True)
  (path / "data" / "run.csv").write_text("1,2,3")
  return path


def _snapshot(path):
  return sorted((os.path.relpath(os.path.join(root, f), path), open(os.path.join(root, f), "rb").read())
                for root, _, files in os.walk(path) for f in files)


def _leftovers(parent):
  return [n for n in os.listdir(parent) if ".tmp-" in n]


def test_a_folder_with_user_files_is_refused_and_kept(tmp_path):
  dst = _user_folder(tmp_path / "mine")
  before = _snapshot(dst)
  with pytest.raises(modeldir.DestinationError, match="no model.json"):
    _write_model(dst, "new")
  assert _snapshot(dst) == before
  assert _leftovers(tmp_path) == []


def test_a_model_directory_is_replaced_whole(tmp_path):
  dst = tmp_path / "teacher"
  _write_model(dst, "old")
  _write_model(dst, "new")
  assert _tag(dst) == "new"
  assert _leftovers(tmp_path) == []


def test_an_empty_folder_becomes_the_model_directory(tmp_path):
  dst = tmp_path / "empty"
  dst.mkdir()
  _write_model(dst, "new")
  assert _tag(dst) == "new"


def test_a_failed_build_keeps_the_old_directory(tmp_path):
  dst = tmp_path / "teacher"
  _write_model(dst, "old")
  before = _snapshot(dst)
  with pytest.raises(RuntimeError):
    with modeldir.staged(str(dst)) as inner:
      os.makedirs(inner)
      (open(os.path.join(inner, modeldir.DESCRIPTION_FILE), "w")).write("{}")
      raise RuntimeError("conversion failed half-way")
  assert _snapshot(dst) == before
  assert _leftovers(tmp_path) == []


def test_a_file_is_refused(tmp_path):
  dst = tmp_path / "weights.bin"
  dst.write_bytes(b"\x00" * 10)
  with pytest.raises(modeldir.DestinationError, match="not a folder"):
    _write_model(dst, "new")
  assert dst.read_bytes() == b"\x00" * 10


def test_a_mount_point_is_refused(tmp_path, monkeypatch):
  dst = tmp_path / "mnt"
  _write_model(dst, "old")  # even a model directory: its contents cannot be swapped out
  real = os.path.realpath(dst)
  monkeypatch.setattr(os.path, "ismount", lambda p: os.path.realpath(p) == real)
  with pytest.raises(modeldir.DestinationError, match="mount point"):
    _write_model(dst, "new")
  assert _tag(dst) == "old"


@pytest.mark.parametrize("where", ["src", "parent", "inside"])
def test_the_source_and_what_contains_it_are_never_touched(tmp_path, where):
  release = tmp_path / "release"
  release.mkdir()
  (release / modeldir.DESCRIPTION_FILE).write_text('{"kind": "x", "config": {}}')  # looks like ours
  (release / "last.ckpt").write_bytes(b"weights")
  dst = {"src": release, "parent": tmp_path, "inside": release / "converted"}[where]
  before = _snapshot(tmp_path)
  with pytest.raises(modeldir.DestinationError, match="source"):
    modeldir.check_destination(str(dst), sources=[str(release)])
  assert _snapshot(tmp_path) == before


@pytest.mark.parametrize("dst_kind", ["cwd", "src", "parent", "user", "file"])
def test_convert_cli_refuses_before_reading_and_exits_1(tmp_path, monkeypatch, capsys, dst_kind):
  release = _user_folder(tmp_path / "work" / "vqgan")
  (release / "model.yaml").write_text("model: {}")
  monkeypatch.chdir(tmp_path / "work")
  (tmp_path / "work" / "notes.txt").write_text("mine")
  (tmp_path / "work" / "a_file").write_text("mine")
  user = _user_folder(tmp_path / "work" / "user")
  dst = {"cwd": ".", "src": str(release), "parent": str(tmp_path / "work"), "user": str(user),
         "file": "a_file"}[dst_kind]
  before = _snapshot(tmp_path)
  assert convert_main(["taming-vqgan", "--src", str(release), "--dst", dst]) == 1
  err = capsys.readouterr().err
  assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
  assert _snapshot(tmp_path) == before


def _stale_staging(path):
  """A staging folder as `modeldir.staged` marks it, left by a process that is gone."""
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                        capture_output=True, text=True, check=True).stdout.strip()
  path.mkdir()
  (path / ".dimo_jax-staging").write_text(dead)
  return path


def test_leftovers_of_a_killed_conversion_are_removed_and_reported(tmp_path, capsys):
  dst = tmp_path / "teacher"
  _write_model(dst, "old")
  stale = _stale_staging(tmp_path / "teacher.tmp-abc123")
  (stale / "model" / "params").mkdir(parents=True)
  not_ours = tmp_path / "teacher.tmp-user"  # same prefix, but not staged by dimo_jax
  _user_folder(not_ours)
  _write_model(dst, "new")
  assert _tag(dst) == "new"
  assert not stale.exists() and not_ours.exists()
  assert "interrupted conversion" in capsys.readouterr().err


def test_a_kill_between_the_two_renames_restores_the_old_directory(tmp_path, capsys):
  # The old directory waits in the staging folder while the new one moves in; if the process
  # died there, the next conversion puts it back before it starts (and keeps it if it fails).
  dst = tmp_path / "teacher"
  _write_model(dst, "old")
  stale = _stale_staging(tmp_path / "teacher.tmp-xyz")
  os.rename(dst, stale / "old")
  with pytest.raises(RuntimeError):
    with modeldir.staged(str(dst)):
      raise RuntimeError("this conversion fails too")
  assert _tag(dst) == "old"
  assert _leftovers(tmp_path) == []
  assert "restored" in capsys.readouterr().err


def test_a_live_conversion_is_left_alone(tmp_path):
  dst = tmp_path / "teacher"
  busy = tmp_path / "teacher.tmp-live"
  busy.mkdir()
  (busy / ".dimo_jax-staging").write_text(str(os.getppid()))  # a process that is running
  _write_model(dst, "new")
  assert busy.exists()


def test_swap_without_renameat2_still_replaces(tmp_path, monkeypatch):
  dst = tmp_path / "teacher"
  _write_model(dst, "old")
  monkeypatch.setattr(modeldir, "_RENAME_EXCHANGE", 1 << 30)  # an unknown flag: renameat2 fails
  _write_model(dst, "new")
  assert _tag(dst) == "new"
  assert _leftovers(tmp_path) == []


# --- converters refuse wrong weights and report one line --------------------------------------
# (tiny random checkpoints in the real on-disk layouts, built with the converter tests' helpers)

def _halton_state():
  torch.manual_seed(0)
  return dict(ReferenceMaskTransformer(halton_case.GRID, halton_case.WIDTH, halton_case.DEPTH,
                                       halton_case.HEADS, halton_case.MLP, halton_case.CODEBOOK,
                                       halton_case.CLASSES).state_dict())


def _convert_halton(src, dst):
  halton_maskgit.convert(src, str(dst), num_heads=halton_case.HEADS,
                         codebook_size=halton_case.CODEBOOK)


def _one_error_line(capsys):
  """The single `error:` line the CLI wrote to stderr (fails if there are more lines)."""
  lines = capsys.readouterr().err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), lines
  return lines[0]


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.complex64])
def test_torch_weights_of_a_non_float_dtype_are_refused(tmp_path, dtype):
  state = _halton_state()
  state["first_layer.6.weight"] = state["first_layer.6.weight"].to(dtype)
  src = halton_case._save(tmp_path / "bad.pth", state)
  with pytest.raises(ConversionError) as e:
    _convert_halton(src, tmp_path / "teacher")
  name = str(dtype).removeprefix("torch.")
  assert str(e.value) == (f"{src}: key 'first_layer.6.weight' is {name}, expected a "
                          "floating-point tensor")
  assert not (tmp_path / "teacher").exists()


def test_torch_weights_holding_nan_or_inf_are_refused(tmp_path):
  state = _halton_state()
  table = state["tok_emb.weight"].clone()
  table[0, 0] = table[3, 1] = float("nan")
  table[5, 2] = float("-inf")
  state["tok_emb.weight"] = table
  src = halton_case._save(tmp_path / "bad.pth", state)
  with pytest.raises(ConversionError) as e:
    _convert_halton(src, tmp_path / "teacher")
  assert str(e.value) == f"{src}: key 'tok_emb.weight' holds 3 NaN/Inf values"


@pytest.fixture(scope="module")
def vq_release(tmp_path_factory):
  folder = str(tmp_path_factory.mktemp("vq") / "release")
  return diffusers_case._write_release(folder, diffusers_case._reference(False))


def _edited_vq(vq_release, tmp_path, edit):
  """A copy of the diffusers VQModel release whose safetensors `edit` changed in place."""
  folder = tmp_path / "edited"
  folder.mkdir()
  (folder / "config.json").write_text(open(os.path.join(vq_release, "config.json")).read())
  state = safetensors.numpy.load_file(os.path.join(vq_release, diffusers_vq.WEIGHTS_FILE))
  edit(state)
  safetensors.numpy.save_file(state, str(folder / diffusers_vq.WEIGHTS_FILE))
  return str(folder), str(folder / diffusers_vq.WEIGHTS_FILE)


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.update({"quantize.embedding.weight":
                         s["quantize.embedding.weight"].astype(np.int32)}),
     "key 'quantize.embedding.weight' is int32, expected a floating-point tensor"),
    (lambda s: s["decoder.conv_out.bias"].__setitem__(1, np.inf),
     "key 'decoder.conv_out.bias' holds 1 NaN/Inf values"),
])
def test_safetensors_weights_of_a_wrong_dtype_or_value_are_refused(vq_release, tmp_path, edit,
                                                                   message):
  folder, weights = _edited_vq(vq_release, tmp_path, edit)
  with pytest.raises(ConversionError) as e:
    diffusers_vq.vqvae_from_folder(folder)
  assert str(e.value) == f"{weights}: {message}"


def test_float16_safetensors_weights_are_read(vq_release, tmp_path):
  folder, weights = _edited_vq(vq_release, tmp_path, lambda s: s.update(
      {k: v.astype(np.float16) for k, v in s.items()}))
  _, variables = diffusers_vq.vqvae_from_folder(folder)
  embedding = variables["params"]["quantize"]["embedding"]
  assert embedding.dtype == np.float32
  np.testing.assert_array_equal(
      embedding, safetensors.numpy.load_file(weights)["quantize.embedding.weight"])


LN = google_maskgit_case.LN


@pytest.mark.parametrize("value, message", [
    (np.ones(8, np.int32), f"key {LN!r} is int32, expected a floating-point tensor"),
    (np.array([1, 0, 1, 1, 0, 1, 1, 1], bool), f"key {LN!r} is bool, expected a floating-point"),
    (np.array([1, np.nan, 1, 1, 1, np.nan, 1, 1], np.float32), f"key {LN!r} holds 2 NaN/Inf"),
    (jnp.ones(8, jnp.bfloat16), None),  # bfloat16 is a float: read as float32
])
def test_msgpack_weights_of_a_wrong_dtype_or_value_are_refused(tmp_path, value, message):
  params = flatten(google_maskgit_case._release_params(np.random.default_rng(0),
                                                       **google_maskgit_case.SMALL))
  params[LN] = value
  src = google_maskgit_case._write(tmp_path / "ckpt", {"params": unflatten(params)})
  tree = common.load_msgpack_tree(src)
  if message is None:
    _, variables = google_maskgit.convert_params(src, tree, codebook_size=6)
    leaf = flatten(variables)[f"params/{LN}"]
    assert leaf.dtype == np.float32 and np.all(leaf == 1)
    return
  with pytest.raises(ConversionError, match=f"^{src}: {message}"):
    google_maskgit.convert_params(src, tree, codebook_size=6)


def test_msgpack_tokenizer_codebook_with_nan_is_refused(tmp_path):
  params = google_vqgan_case._release_params(np.random.default_rng(0), **google_vqgan_case.TINY)
  params["quantizer"]["codebook"][2, :] = np.nan
  src = google_vqgan_case._write(tmp_path / "ckpt", {"params": params})
  with pytest.raises(ConversionError) as e:
    google_vqgan.convert(src, str(tmp_path / "tok"))
  assert str(e.value) == f"{src}: key 'quantizer/codebook' holds 8 NaN/Inf values"


@contextlib.contextmanager
def _deadline(seconds):
  """Raises TimeoutError in the block after `seconds` (a converter that would build a model of
  100000 layers fails here instead of hanging the suite)."""
  def expire(signum, frame):
    raise TimeoutError(f"still running after {seconds} s")
  previous = signal.signal(signal.SIGALRM, expire)
  signal.setitimer(signal.ITIMER_REAL, seconds)
  try:
    yield
  finally:
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("layer", [500, 99999])
def test_a_stray_halton_layer_key_is_named_at_once(tmp_path, layer):
  state = _halton_state()
  stray = f"transformer.layers.{layer}.0.fn.norm.weight"
  state[stray] = torch.ones(halton_case.WIDTH)
  src = halton_case._save(tmp_path / "bad.pth", state)
  start = time.monotonic()
  with _deadline(20), pytest.raises(ConversionError) as e:
    _convert_halton(src, tmp_path / "teacher")
  assert time.monotonic() - start < 5
  assert str(e.value) == (f"{src}: key {stray!r} is layer {layer}, but the layers present are "
                          "0-1: layer 2 is missing (no key starts with 'transformer.layers.2.')")


@pytest.mark.parametrize("layer", [500, 99999])
def test_a_stray_google_maskgit_layer_key_is_named_at_once(tmp_path, layer):
  params = flatten(google_maskgit_case._release_params(np.random.default_rng(0),
                                                       **google_maskgit_case.SMALL))
  stray = f"TransformerLayer_{layer}/Mlp_0/layer_output/bias"
  params[stray] = np.zeros(8, np.float32)
  src = google_maskgit_case._write(tmp_path / "ckpt", {"params": unflatten(params)})
  start = time.monotonic()
  with _deadline(20), pytest.raises(ConversionError) as e:
    google_maskgit.convert(src, str(tmp_path / "teacher"), codebook_size=6)
  assert time.monotonic() - start < 5
  assert str(e.value).startswith(f"{src}: key {stray!r} is layer {layer}, but the layers "
                                 "present are 0-0")


def test_a_stray_google_vqgan_block_key_is_named(tmp_path):
  params = google_vqgan_case._release_params(np.random.default_rng(0), **google_vqgan_case.TINY)
  params["encoder"]["ResBlock_500"] = params["encoder"]["ResBlock_0"]
  src = google_vqgan_case._write(tmp_path / "ckpt", {"params": params})
  with pytest.raises(ConversionError) as e:
    google_vqgan.convert(src, str(tmp_path / "tok"))
  assert str(e.value).startswith(f"{src}: key 'encoder/ResBlock_500/Conv_0/kernel' is ResBlock "
                                 "500, but the ResBlocks present are 0-5")


# A Lightning checkpoint pickles objects by class name. These classes would leave a marker file
# if unpickling ever ran their code: `open(marker, "w")` through __reduce__, or __setstate__.

class _OpensMarker:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (open, (self.marker, "w"))


class _WritesOnSetstate:
  def __init__(self, marker):
    self.marker = marker

  def __getstate__(self):
    return {"marker": self.marker}

  def __setstate__(self, state):
    with open(state["marker"], "w") as f:
      f.write("code from the checkpoint ran")


def _foreign_class(module_name, name, monkeypatch):
  """A class pickled as `module_name.name` (a module that is gone again when the file is read),
  whose __setstate__ would leave a marker."""
  cls = type(name, (_WritesOnSetstate,), {"__module__": module_name})
  parts = module_name.split(".")
  for i in range(1, len(parts) + 1):
    monkeypatch.setitem(sys.modules, ".".join(parts[:i]), types.ModuleType(".".join(parts[:i])))
  setattr(sys.modules[module_name], name, cls)
  return cls


def _lightning_release(folder, state_dict, markers, monkeypatch):
  """A taming release whose last.ckpt is an older Lightning checkpoint: beside `state_dict`,
  callbacks keyed by class, optimizer states and hyper-parameters as pickled objects."""
  os.makedirs(folder)
  with open(os.path.join(folder, "model.yaml"), "w") as f:
    yaml.safe_dump(taming_case.CONFIG, f)
  with monkeypatch.context() as m:
    model_checkpoint = _foreign_class("pytorch_lightning.callbacks.model_checkpoint",
                                      "ModelCheckpoint", m)
    dict_config = _foreign_class("omegaconf.dictconfig", "DictConfig", m)
    checkpoint = {
        "epoch": 7, "global_step": 1234, "pytorch-lightning_version": "1.0.8",
        "state_dict": state_dict,
        "callbacks": {model_checkpoint: {"best_model_score": torch.tensor(0.25),
                                         "monitor": "val/rec_loss"},
                      "resume": model_checkpoint(markers[0])},
        "optimizer_states": [{"state": {0: {"exp_avg": torch.zeros(3)}},
                              "param_groups": [{"lr": 4.5e-6, "params": [0]}]}],
        "lr_schedulers": [],
        "hparams_name": "args",
        "hyper_parameters": argparse.Namespace(base_learning_rate=4.5e-6, config=dict_config(
            markers[1])),
        "loops": [_OpensMarker(markers[2]), _WritesOnSetstate(markers[3])],
    }
    torch.save(checkpoint, os.path.join(folder, "last.ckpt"))
  return os.path.join(folder, "last.ckpt")


def test_a_lightning_checkpoint_reads_its_tensors_and_runs_nothing(tmp_path, monkeypatch):
  state = taming_case._release_state(taming_case._reference())
  state["loss.discriminator.main.1.num_batches_tracked"] = torch.tensor(17)  # int64, ignored
  markers = [str(tmp_path / f"marker{i}") for i in range(4)]
  src, dst = str(tmp_path / "release"), str(tmp_path / "tok")
  ckpt = _lightning_release(src, state, markers, monkeypatch)
  with pytest.raises(Exception, match="Unsupported global"):
    torch.load(ckpt, weights_only=True)  # what the converter read before
  taming_vqgan.convert(src, dst)
  assert not any(os.path.exists(m) for m in markers)
  params = tokenizers.load(dst).variables["params"]
  np.testing.assert_array_equal(params["quantize"]["embedding"],
                                state["quantize.embedding.weight"].numpy())
  np.testing.assert_array_equal(params["decoder"]["conv_out"]["kernel"],
                                state["decoder.conv_out.weight"].numpy().transpose(2, 3, 1, 0))


@pytest.mark.parametrize("where", ["entry", "state_dict"])
def test_a_lightning_state_dict_that_is_not_tensors_is_refused(tmp_path, monkeypatch, where):
  state = taming_case._release_state(taming_case._reference())
  markers = [str(tmp_path / f"marker{i}") for i in range(5)]
  if where == "entry":
    state["encoder.conv_in.weight"] = _WritesOnSetstate(markers[4])
    message = "state_dict['encoder.conv_in.weight'] is a _WritesOnSetstate, not a tensor"
  else:
    state = _OpensMarker(markers[4])
    message = "'state_dict' is a open, expected a dict of tensors"
  src = str(tmp_path / "release")
  ckpt = _lightning_release(src, state, markers, monkeypatch)
  with pytest.raises(ConversionError) as e:
    taming_vqgan.convert(src, str(tmp_path / "tok"))
  assert str(e.value) == f"{ckpt}: {message}"
  assert not any(os.path.exists(m) for m in markers)


# --- the command line: one `error:` line, exit status 1 ----------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["taming-vqgan", "--num-heads", "8"],
     "error: taming-vqgan does not take --num-heads (it takes no options)"),
    (["google-vqgan", "--codebook-size", "5"],
     "error: google-vqgan does not take --codebook-size (it takes no options)"),
    (["halton-maskgit", "--resolution", "256", "--num-heads", "8"],
     "error: halton-maskgit does not take --resolution (it takes --num-heads, --codebook-size, "
     "--num-classes)"),
])
def test_cli_refuses_an_option_the_converter_does_not_take(tmp_path, capsys, argv, message):
  src, dst = tmp_path / "release", tmp_path / "out"
  src.mkdir()
  assert convert_main(argv[:1] + ["--src", str(src), "--dst", str(dst)] + argv[1:]) == 1
  assert _one_error_line(capsys) == message
  assert not dst.exists()


def _vq_folder(tmp_path, **config):
  folder = tmp_path / "vq"
  folder.mkdir()
  (folder / "config.json").write_text(json.dumps({**diffusers_case.CONFIG, **config}))
  (folder / diffusers_vq.WEIGHTS_FILE).write_bytes(b"never read")
  return str(folder), str(folder / "config.json")


def _meissonic_release(tmp_path, **config):
  root = tmp_path / "meissonic"
  for name in ("transformer", "vqvae", "text_encoder", "tokenizer", "scheduler"):
    (root / name).mkdir(parents=True)
  (root / "transformer" / "config.json").write_text(json.dumps(config))
  return str(root), str(root / "transformer" / "config.json")


def _clip_folder(tmp_path, text=None, vision=None, vocab=None):
  folder = tmp_path / "clip"
  folder.mkdir()
  (folder / "vocab.json").write_text(
      json.dumps({"<|startoftext|>": 0, "<|endoftext|>": 1}) if vocab is None else vocab)
  (folder / "merges.txt").write_text("#version: 0.2\n")
  (folder / "config.json").write_text(json.dumps(
      {"text_config": text or {}, "vision_config": vision or {}, "projection_dim": 8}))
  return str(folder), str(folder / "config.json")


def _taming_folder(tmp_path, **params):
  folder = tmp_path / "taming"
  folder.mkdir()
  config = yaml.safe_load(yaml.safe_dump(taming_case.CONFIG))
  config["model"]["params"].update(params)
  (folder / "model.yaml").write_text(yaml.safe_dump(config))
  (folder / "last.ckpt").write_bytes(b"never read")
  return str(folder), str(folder / "model.yaml")


@pytest.mark.parametrize("kind, build, message", [
    ("diffusers-vq", lambda t: _vq_folder(t, num_vq_embeddings=-5),
     "key 'num_vq_embeddings' must be a positive integer, found -5"),
    ("diffusers-vq", lambda t: _vq_folder(t, norm_num_groups=0),
     "key 'norm_num_groups' must be a positive integer, found 0"),
    ("diffusers-vq", lambda t: _vq_folder(t, block_out_channels=[32, -64]),
     "key 'block_out_channels' must be a non-empty list of positive integers, found [32, -64]"),
    ("meissonic", lambda t: _meissonic_release(t, num_attention_heads=0),
     "key 'num_attention_heads' must be a positive integer, found 0"),
    ("meissonic", lambda t: _meissonic_release(t, codebook_size=-3),
     "key 'codebook_size' must be a positive integer, found -3"),
    ("clip", lambda t: _clip_folder(t, text={"num_attention_heads": 0}),
     "key 'text_config.num_attention_heads' must be a positive integer, found 0"),
    ("clip", lambda t: _clip_folder(t, vision={"patch_size": -8}),
     "key 'vision_config.patch_size' must be a positive integer, found -8"),
    ("taming-vqgan", lambda t: _taming_folder(t, n_embed=0),
     "key 'model.params.n_embed' must be a positive integer, found 0"),
])
def test_cli_names_an_invalid_config_value(tmp_path, capsys, kind, build, message):
  src, config = build(tmp_path)
  assert convert_main([kind, "--src", src, "--dst", str(tmp_path / "out")]) == 1
  assert _one_error_line(capsys) == f"error: {config}: {message}"


@pytest.mark.parametrize("kind, build, culprit", [
    ("clip", lambda t: _clip_folder(t, vocab='{"<|startoftext|>": 0,'), "vocab.json"),
    ("diffusers-vq", lambda t: _vq_folder(t), "config.json"),
    ("meissonic", lambda t: _meissonic_release(t), os.path.join("transformer", "config.json")),
])
def test_cli_names_a_file_that_is_not_json(tmp_path, capsys, kind, build, culprit):
  src, _ = build(tmp_path)
  path = os.path.join(src, culprit)
  if culprit != "vocab.json":
    with open(path, "w") as f:
      f.write("{not json")
  assert convert_main([kind, "--src", src, "--dst", str(tmp_path / "out")]) == 1
  assert _one_error_line(capsys).startswith(
      f"error: {path}: expected a JSON object, found text that is not JSON")


def _garbage_msgpack(tmp_path):
  src = tmp_path / "tokenizer_checkpoint"
  src.write_bytes(b"\xc1 not msgpack")  # reading it would fail with a message about src
  return str(src)


@pytest.mark.parametrize("dst_kind", ["file", "below_a_file"])
def test_cli_refuses_a_destination_that_cannot_be_a_folder_before_reading(tmp_path, capsys,
                                                                          dst_kind):
  (tmp_path / "a_file").write_text("mine")
  dst = {"file": tmp_path / "a_file", "below_a_file": tmp_path / "a_file" / "tok"}[dst_kind]
  assert convert_main(["google-vqgan", "--src", _garbage_msgpack(tmp_path),
                       "--dst", str(dst)]) == 1
  line = _one_error_line(capsys)
  assert line.startswith(f"error: {dst}: ") and "not a folder" in line, line
  assert (tmp_path / "a_file").read_text() == "mine"


def _read_only_cli(folder, argv):
  """Runs `python -m dimo_jax.convert argv` with `folder` read-only: (returncode, stderr).

  As a user, the folder is chmod 0o555; as root (who writes there anyway) the folder's parent is
  bind-mounted read-only over itself in a private mount namespace of the child (`unshare -m`),
  so `folder` lies on a read-only file system without being a mount point.
  """
  cmd = [sys.executable, "-m", "dimo_jax.convert", *argv]
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  if os.geteuid() != 0:
    folder.chmod(0o555)
    try:
      out = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, timeout=300)
    finally:
      folder.chmod(0o755)
  else:
    parent = folder.parent
    script = (f"mount --bind {parent} {parent} && mount -o remount,ro,bind {parent} && exec "
              + " ".join(map(repr, cmd)))
    out = subprocess.run(["unshare", "-m", "sh", "-c", script], cwd=repo, capture_output=True,
                         text=True, timeout=300)
    assert "mount:" not in out.stderr and "unshare:" not in out.stderr, out.stderr
  return out.returncode, out.stderr


@pytest.mark.parametrize("dst_kind", ["inside", "itself"])
def test_cli_refuses_a_read_only_destination_before_reading(tmp_path, dst_kind):
  src = _garbage_msgpack(tmp_path)
  folder = tmp_path / "ro" / "read_only"
  folder.mkdir(parents=True)
  dst = folder / "tok" if dst_kind == "inside" else folder
  code, stderr = _read_only_cli(folder, ["google-vqgan", "--src", src, "--dst", str(dst)])
  lines = [line for line in stderr.splitlines() if line.strip()]
  errors = [line for line in lines if line.startswith("error:")]
  assert code == 1 and len(errors) == 1 and "Traceback" not in stderr, stderr
  assert errors[0].startswith(f"error: {dst}: cannot write there"), errors[0]
  assert "read-only" in errors[0]
  assert os.listdir(folder) == []


# Issue 22, "destroyed": a destination is replaced only when it is wholly a dimo_jax model
# directory, and only by one writer at a time.

def test_a_folder_with_another_tools_model_json_is_refused_and_kept(tmp_path):
  dst = tmp_path / "tfjs"
  dst.mkdir()
  (dst / "model.json").write_text(json.dumps({"format": "layers-model", "modelTopology": {},
                                              "weightsManifest": []}))
  (dst / "paper.tex").write_text("years of work")
  before = _snapshot(dst)
  with pytest.raises(modeldir.DestinationError, match="belongs to another tool"):
    _write_model(dst, "new")
  assert _snapshot(dst) == before
  assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("added", [("NOTES.md",), ("my_evals/fid.txt",),
                                   ("text_encoder/NOTES.md",)])
def test_a_model_directory_holding_user_files_is_refused_naming_them(tmp_path, added):
  dst = tmp_path / "teacher"
  _write_model(dst, "old")
  if added[0].startswith("text_encoder/"):  # a part that is a model directory of its own
    modeldir.write(str(dst / "text_encoder"), {"kind": "toy", "config": {}}, VARIABLES)
  for name in added:
    (dst / name).parent.mkdir(parents=True, exist_ok=True)
    (dst / name).write_text("mine")
  before = _snapshot(dst)
  shown = added[0].split("/")[0] if added[0].startswith("my_evals") else added[0]
  with pytest.raises(modeldir.DestinationError, match=f"also holds {shown}"):
    _write_model(dst, "new")
  assert _snapshot(dst) == before and _tag(dst) == "old"


def test_the_convert_cli_refuses_a_model_directory_with_user_files(tmp_path, capsys):
  dst = tmp_path / "vqgan"
  _write_model(dst, "old")
  (dst / "NOTES.md").write_text("mine")
  before = _snapshot(dst)
  src = str(tmp_path / "release")
  taming_case._write_release(src, taming_case._release_state(taming_case._reference()))
  assert convert_main(["taming-vqgan", "--src", src, "--dst", str(dst)]) == 1
  err = capsys.readouterr().err
  assert err.startswith("error: ") and "NOTES.md" in err and len(err.strip().splitlines()) == 1
  assert _snapshot(dst) == before


_HOLD = """
import sys, time
from dimo_jax import modeldir
with modeldir.staged(sys.argv[1]) as inner:
  print("holding", flush=True)
  time.sleep(float(sys.argv[2]))
"""


def test_a_destination_being_written_is_refused_at_once(tmp_path):
  dst = tmp_path / "new" / "teacher"
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(dst), "60"], cwd=repo,
                            stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "holding"
    start = time.time()
    for spelling in (str(dst), os.path.relpath(dst)):  # every spelling meets the same lock
      with pytest.raises(modeldir.DestinationError, match="another process is writing it"):
        _write_model(spelling, "second")
    assert time.time() - start < 5
    assert not dst.exists()
  finally:
    holder.kill()
    holder.wait()
  _write_model(dst, "after")  # the lock of a killed writer is free again
  assert _tag(dst) == "after"


def test_two_conversions_at_once_one_writes_the_other_is_refused(tmp_path):
  dst = tmp_path / "teacher"
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  script = ("import sys, time\nfrom dimo_jax import modeldir\n"
            "with modeldir.staged(sys.argv[1]) as inner:\n"
            "  time.sleep(3)\n"
            "  import os; os.makedirs(inner); open(os.path.join(inner, 'model.json'), 'w')"
            ".write('{\"kind\": \"toy\", \"config\": {}, \"tag\": \"' + sys.argv[2] + '\"}')\n"
            "print('wrote', sys.argv[2])\n")
  runs = [subprocess.Popen([sys.executable, "-c", script, str(dst), tag], cwd=repo,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
          for tag in ("a", "b")]
  results = [(run.wait(), *run.communicate()) for run in runs]
  codes = sorted(code for code, _, _ in results)
  assert codes[0] == 0 and codes[1] != 0, results
  winner = next(out.split()[1] for code, out, _ in results if code == 0)
  loser_err = next(err for code, _, err in results if code != 0)
  assert "another process is writing it" in loser_err
  assert _tag(dst) == winner


class _RunsACommand:
  """What a hostile checkpoint pickles: os.system on unpickling."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f"touch {self.marker}",))


def test_a_blocked_global_is_refused_by_its_name(tmp_path):
  state = taming_case._release_state(taming_case._reference())
  src = tmp_path / "release"
  src.mkdir()
  (src / "model.yaml").write_text(yaml.safe_dump(taming_case.CONFIG))
  marker = tmp_path / "pwned"
  torch.save({"state_dict": state, "extra": _RunsACommand(marker)}, src / "last.ckpt")
  with pytest.raises(ConversionError) as e:
    taming_vqgan.convert(str(src), str(tmp_path / "tok"))
  message = str(e.value)
  assert "it names the global posix.system" in message or "nt.system" in message, message
  assert "weights_only" not in message and "will likely succeed" not in message
  assert not marker.exists() and not (tmp_path / "tok").exists()


def test_ignored_entries_holding_pickled_objects_are_named(tmp_path, monkeypatch, capsys):
  state = taming_case._release_state(taming_case._reference())
  markers = [str(tmp_path / f"marker{i}") for i in range(4)]
  src, dst = str(tmp_path / "release"), str(tmp_path / "tok")
  _lightning_release(src, state, markers, monkeypatch)
  taming_vqgan.convert(src, dst)
  err = capsys.readouterr().err
  assert "note: " in err and "ignored the entries 'callbacks', 'hyper_parameters', 'loops'" in err
  assert "argparse.Namespace" in err and "omegaconf.dictconfig.DictConfig" in err
  assert not any(os.path.exists(m) for m in markers)


_DISK_FULL = ValueError(
    'RESOURCE_EXHAUSTED: Error writing "params.w/0" in OCDBT database at local file "/x/": '
    'Failed to write 8871936 bytes to file 5: No space left on device [os_error_code=\'28\']')


def test_a_conversion_onto_a_full_disk_is_one_line_and_leaves_nothing(tmp_path, monkeypatch,
                                                                      capsys):
  """What orbax raises when tensorstore meets ENOSPC (a ValueError, measured on a 300 kB
  tmpfs): one `error:` line naming the destination and the cause, no staging folder left."""
  import orbax.checkpoint as ocp
  src = tmp_path / "release"
  src.mkdir()
  (src / "model.yaml").write_text(yaml.safe_dump(taming_case.CONFIG))
  torch.save({"state_dict": taming_case._release_state(taming_case._reference())},
             src / "last.ckpt")

  def full(self, *args, **kwargs):
    raise _DISK_FULL
  monkeypatch.setattr(ocp.StandardCheckpointer, "save", full)
  dst = tmp_path / "out" / "tok"
  assert convert_main(["taming-vqgan", "--src", str(src), "--dst", str(dst)]) == 1
  assert _one_error_line(capsys) == (f"error: {dst}: cannot write the model directory (no space "
                                     "left on device); nothing was written there")
  assert not dst.exists() and not [p for p in os.listdir(tmp_path / "out") if ".tmp-" in p]
