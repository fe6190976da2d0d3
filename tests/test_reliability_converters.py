"""Converters and model directories never lose what the user owns: a destination is replaced only
when it is a model directory, SRC and what contains it are never touched, and at every instant
either the old or the new directory is whole (interrupted conversions are cleaned up next time)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from dimo_jax import modeldir
from dimo_jax.convert.__main__ import main as convert_main

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
