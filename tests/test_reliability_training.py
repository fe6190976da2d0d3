"""Training faults: an update that overflows is skipped, a run that only skips stops with an
error, a resumed run keeps the record of the run that wrote its checkpoints, one run at a time
holds a workdir, and a damaged checkpoint names its step."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dimo_jax import checkpoints, distill, teachers, train
from dimo_jax.models.maskgit import MaskTransformer
from tests.test_distill_step import _config, _leaves
from tests.test_train import restore_latest, tiny_teacher
from tests.test_train import tiny_config as _tiny_config


def tiny_config(teacher_path, **overrides):
  # No validation metrics: the digits scorer would train its classifier in every run.
  return _tiny_config(teacher_path, **{"validation_metrics": False, **overrides})


@pytest.fixture(scope="module")
def teacher_path(tmp_path_factory):
  return tiny_teacher(str(tmp_path_factory.mktemp("teacher") / "digits"))


@pytest.fixture(scope="module")
def nan_teacher_path(tmp_path_factory, teacher_path):
  teacher = teachers.load(teacher_path)
  poisoned = jax.tree_util.tree_map(lambda x: jnp.full_like(x, jnp.nan), teacher.variables)
  path = str(tmp_path_factory.mktemp("nan") / "digits")
  teachers.save(path, teacher.model, poisoned)
  return path


def _config_json(workdir):
  with open(os.path.join(workdir, "checkpoints", "config.json")) as f:
    return json.load(f)


# ------------------------------------------------------------------ the update itself

def test_an_update_that_overflows_is_skipped():
  # lr 1e39 is finite as a Python float but infinite in float32: finite loss and gradients,
  # an infinite update. It used to be applied (NaN in generator, auxiliary model and EMA).
  model = MaskTransformer(codebook_size=5, num_classes=3, seq_len=8, hidden_dim=16, depth=1,
                          num_heads=2, mlp_dim=32)
  teacher = model.init({"params": jax.random.PRNGKey(0)}, jnp.zeros((1, 8), jnp.int32),
                       jnp.zeros((1,), jnp.int32))
  config = _config(generator_lr=1e39, fake_lr=1e39, distill_dropout=False)
  state = distill.create_state(config, teacher, jax.random.PRNGKey(1), distill.FROZEN_WITH_EMB)
  step = jax.jit(distill.make_train_step(config, teachers.of_module(model)))
  new, metrics = step(state, teacher)
  assert np.isfinite(float(metrics["loss_generator"]))
  assert np.isfinite(float(metrics["gen_grad_norm"]))
  assert int(metrics["skipped_generator"]) == 1
  assert int(metrics["skipped_fake"]) == config.fake_rounds
  for tree in ("gen_params", "fake_params", "ema_params"):
    for name, leaf in _leaves(getattr(new, tree)).items():
      assert np.all(np.isfinite(leaf)), (tree, name)
      np.testing.assert_array_equal(leaf, _leaves(getattr(state, tree))[name])


# ------------------------------------------------------------------ runs that only skip

def test_a_run_whose_updates_all_overflow_stops_with_an_error(teacher_path, tmp_path):
  config = tiny_config(teacher_path, generator_lr=1e39, fake_lr=1e39, max_train_steps=12,
                       lr_warmup_steps=0, max_consecutive_skips=3, checkpointing_steps=100)
  with pytest.raises(train.RunError, match="last 3 generator updates .* skipped"):
    train.train_and_evaluate(config, str(tmp_path / "run"))


def test_a_nan_teacher_stops_the_run(nan_teacher_path, tmp_path):
  config = tiny_config(nan_teacher_path, max_train_steps=12, max_consecutive_skips=4)
  with pytest.raises(train.RunError, match="skipped .* NaN"):
    train.train_and_evaluate(config, str(tmp_path / "run"))


def test_zero_disables_the_stop(nan_teacher_path, tmp_path):
  config = tiny_config(nan_teacher_path, max_train_steps=3, max_consecutive_skips=0)
  train.train_and_evaluate(config, str(tmp_path / "run"))


def test_skip_watch_counts_runs_of_skipped_steps():
  watch = train.SkipWatch(3, 2, np.array([0, 0]), "w")
  # generator skipped at steps 1, 2, then fine at 3, then skipped at 4, 5: never 3 in a row.
  for step, gen, fake in ((1, 1, 0), (2, 2, 1), (3, 2, 1), (4, 3, 1), (5, 4, 1)):
    watch.after(step, {"skipped_generator": gen, "skipped_fake": fake})
  watch.check()
  # auxiliary: a step counts only when all its 2 rounds were skipped.
  watch.after(6, {"skipped_generator": 4, "skipped_fake": 3})
  watch.after(7, {"skipped_generator": 4, "skipped_fake": 5})
  with pytest.raises(train.RunError, match="last 3 auxiliary updates \\(to step 8\\)"):
    watch.after(8, {"skipped_generator": 4, "skipped_fake": 7})  # the third read triggers it


# ------------------------------------------------------------------ resume

@pytest.fixture
def finished(teacher_path, tmp_path):
  """A run of 2 steps (checkpoint at 2) and its config.json."""
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(tiny_config(teacher_path, max_train_steps=2), workdir)
  return workdir, _config_json(workdir)


@pytest.mark.parametrize("change", [dict(ratio_mode="square"), dict(fake_rounds=3),
                                    dict(generator_lr=3e-3), dict(optimizer_type="adamw"),
                                    dict(global_seed=1)])
def test_a_resume_with_other_method_keys_is_refused_and_the_record_kept(
    finished, teacher_path, change):
  workdir, before = finished
  key = next(iter(change))
  with pytest.raises(train.RunError, match=f"other method keys: {key} "):
    train.train_and_evaluate(tiny_config(teacher_path, max_train_steps=4, **change), workdir)
  assert _config_json(workdir) == before
  assert max(checkpoints.manager(workdir, tiny_config(teacher_path)).all_steps()) == 2


def test_a_resume_with_another_teacher_is_refused(finished, tmp_path):
  workdir, before = finished
  other = tiny_teacher(str(tmp_path / "other"), hidden_dim=8)
  with pytest.raises(train.RunError, match="teacher_path"):
    train.train_and_evaluate(tiny_config(other, max_train_steps=4), workdir)
  assert _config_json(workdir) == before


def test_a_finished_run_relaunched_with_a_bad_value_writes_nothing(finished, teacher_path):
  workdir, before = finished
  from dimo_jax import config_check
  with pytest.raises(config_check.ConfigError, match="ratio_mode"):
    train.train_and_evaluate(tiny_config(teacher_path, ratio_mode="foo"), workdir)
  assert _config_json(workdir) == before


def test_run_length_and_logging_may_change_on_resume(finished, teacher_path):
  workdir, _ = finished
  train.train_and_evaluate(tiny_config(teacher_path, max_train_steps=4, log_every=2,
                                       eval_samples=10), workdir)
  assert _config_json(workdir)["max_train_steps"] == 4


def test_a_deliberate_change_is_allowed_and_the_old_record_kept(finished, teacher_path):
  workdir, before = finished
  train.train_and_evaluate(tiny_config(teacher_path, max_train_steps=4, ratio_mode="square",
                                       allow_config_change=True), workdir)
  assert _config_json(workdir)["ratio_mode"] == "square"
  with open(os.path.join(workdir, "checkpoints", "config.step2.json")) as f:
    assert json.load(f) == before


def test_the_record_is_written_only_after_the_restore(finished, teacher_path, tmp_path):
  # A checkpoint that cannot be restored leaves the record of the run as it was.
  workdir, before = finished
  step_dir = os.path.join(workdir, "checkpoints", "2")
  for root, _, files in os.walk(step_dir):
    for name in files:
      with open(os.path.join(root, name), "r+b") as f:
        f.truncate(max(0, os.path.getsize(os.path.join(root, name)) // 3))
  with pytest.raises(train.RunError, match=r"checkpoints/2: cannot restore .*delete that folder"):
    train.train_and_evaluate(tiny_config(teacher_path, max_train_steps=4), workdir)
  assert _config_json(workdir) == before


def test_a_damaged_latest_checkpoint_names_the_step_to_delete(teacher_path, tmp_path):
  workdir = str(tmp_path / "run")
  config = tiny_config(teacher_path, max_train_steps=4, checkpointing_steps=2)
  train.train_and_evaluate(config, workdir)
  step_dir = os.path.join(workdir, "checkpoints", "4")
  for root, _, files in os.walk(step_dir):
    for name in files:
      os.remove(os.path.join(root, name))
  with pytest.raises(train.RunError) as info:
    train.train_and_evaluate(tiny_config(teacher_path, max_train_steps=6), workdir)
  assert "checkpoints/4: cannot restore" in str(info.value)
  assert "resume from step 2" in str(info.value)
  # Deleting the named step resumes from the one before, as the message says.
  import shutil
  shutil.rmtree(step_dir)
  train.train_and_evaluate(tiny_config(teacher_path, max_train_steps=6), workdir)
  step, _ = restore_latest(workdir, tiny_config(teacher_path), teacher_path)
  assert step == 6


# ------------------------------------------------------------------ one run per workdir

def test_a_second_run_on_a_held_workdir_is_refused(teacher_path, tmp_path):
  workdir = tmp_path / "run"
  workdir.mkdir()
  with train.WorkdirLock(str(workdir)):
    with pytest.raises(train.RunError, match="in use by another run"):
      train.train_and_evaluate(tiny_config(teacher_path, max_train_steps=2), str(workdir))
    assert not (workdir / "checkpoints").exists()
  # Released: the run proceeds.
  train.train_and_evaluate(tiny_config(teacher_path, max_train_steps=2), str(workdir))


def test_the_lock_is_released_when_its_holder_dies(teacher_path, tmp_path):
  import subprocess
  import sys
  workdir = tmp_path / "run"
  workdir.mkdir()
  code = ("import fcntl, os, sys; f = open(sys.argv[1], 'a+'); "
          "fcntl.flock(f, fcntl.LOCK_EX); os._exit(0)")
  subprocess.run([sys.executable, "-c", code, str(workdir / ".lock")], check=True)
  train.train_and_evaluate(tiny_config(teacher_path, max_train_steps=2), str(workdir))


def test_a_record_that_is_not_json_is_named(finished, teacher_path):
  workdir, _ = finished
  path = os.path.join(workdir, "checkpoints", "config.json")
  with open(path, "w") as f:
    f.write("{half a config")
  with pytest.raises(train.RunError, match=f"{path}: expected the config of the run .* not JSON"):
    train.train_and_evaluate(tiny_config(teacher_path, max_train_steps=4), workdir)


def test_a_checkpoint_of_before_the_rename_of_psi_resumes(teacher_path, tmp_path):
  """A state saved with psi's former field names (aux_params, aux_opt_state) is read back, every
  leaf in its place; the renamed fields are what it becomes."""
  from dimo_jax import parallel
  config = tiny_config(teacher_path)
  teacher = teachers.load(teacher_path)
  mesh = parallel.make_mesh(1)
  state = distill.create_state(config, teacher.variables, jax.random.PRNGKey(3),
                               teacher.frozen_with_emb)
  moved = jax.tree_util.tree_map(lambda x: x + 1 if x.dtype == jnp.float32 else x,
                                 state.fake_params)
  state = state.replace(fake_params=moved)
  old = {{"fake_params": "aux_params", "fake_opt_state": "aux_opt_state"}.get(k, k): v
         for k, v in vars(state).items()}
  manager = checkpoints.manager(str(tmp_path), config)
  manager.save(5, args=train.ocp.args.StandardSave(old), force=True)
  manager.wait_until_finished()
  restored = train.initial_state(config, teacher, teacher.variables, mesh, manager)
  assert isinstance(restored, distill.DistillState)
  for name in ("fake_params", "gen_params", "fake_opt_state"):
    for key, leaf in _leaves(getattr(state, name)).items():
      np.testing.assert_array_equal(_leaves(getattr(restored, name))[key], leaf, err_msg=key)


# ------------------------------------------------------------------ refused before any work

def _refused_quickly(fn, error, match, seconds=15.0):
  """`fn()` raises `error` matching `match` within `seconds` (no compile, no training)."""
  import time
  start = time.perf_counter()
  with pytest.raises(error, match=match):
    fn()
  assert time.perf_counter() - start < seconds


def test_a_batch_that_does_not_split_over_the_devices_is_a_config_error():
  from dimo_jax import config_check
  config = _config()
  config.train_batch_size, config.per_device_batch = 12, -1
  with pytest.raises(config_check.ConfigError, match="does not split over the 8 devices"):
    train.global_batch_size(config, 8)


@pytest.mark.parametrize("change, match", [
    (dict(num_devices=3), "num_devices / mesh: asked for 3 devices"),
    (dict(mesh={"data": -1, "fsdp": 3}), "num_devices / mesh: a mesh of"),
    (dict(mask_value=5), "mask_value 5 is not the mask id of the teacher"),
], ids=["num_devices", "fsdp", "mask_value"])
def test_mesh_and_mask_errors_are_one_line_before_any_compile(teacher_path, tmp_path, change,
                                                              match):
  from dimo_jax import config_check
  config = tiny_config(teacher_path)
  for key, value in change.items():
    if isinstance(value, dict):
      config[key].update(value)
    else:
      config[key] = value
  _refused_quickly(lambda: train.train_and_evaluate(config, str(tmp_path / "w")),
                   config_check.ConfigError, match)
  # ... and the refused run left no record that would bind the corrected one
  config = tiny_config(teacher_path, max_train_steps=2)
  train.train_and_evaluate(config, str(tmp_path / "w"))


def test_a_failed_first_attempt_does_not_bind_the_corrected_run(teacher_path, tmp_path):
  """A run that stops before its first checkpoint has written checkpoints/config.json; the
  rerun with a corrected value is not refused as a method change."""
  workdir = str(tmp_path / "w")
  os.makedirs(os.path.join(workdir, "checkpoints"))
  with open(os.path.join(workdir, "checkpoints", "config.json"), "w") as f:
    json.dump(json.loads(tiny_config(teacher_path, generator_lr=1.0).to_json()), f)
  train.train_and_evaluate(tiny_config(teacher_path, max_train_steps=2), workdir)
  assert _config_json(workdir)["generator_lr"] != 1.0


def test_a_workdir_that_is_a_file_is_named(teacher_path, tmp_path):
  path = tmp_path / "notes.txt"
  path.write_text("mine")
  _refused_quickly(lambda: train.train_and_evaluate(tiny_config(teacher_path), str(path)),
                   train.RunError, "is a file, not a folder")
  assert path.read_text() == "mine"


def test_pretrain_refuses_its_destination_before_training(tmp_path):
  from configs import synthetic_teacher
  from dimo_jax import modeldir, pretrain
  workdir = tmp_path / "w"
  (workdir / "teacher").mkdir(parents=True)
  (workdir / "teacher" / "thesis.tex").write_text("mine")
  config = synthetic_teacher.get_config()
  config.num_steps = 100000  # would run for an hour if the check came after it
  _refused_quickly(lambda: pretrain.pretrain(config, str(workdir)), modeldir.DestinationError,
                   "holds files but no model.json")
  assert (workdir / "teacher" / "thesis.tex").read_text() == "mine"
  afile = tmp_path / "afile"
  afile.write_text("mine")
  _refused_quickly(lambda: pretrain.pretrain(config, str(afile)), modeldir.DestinationError,
                   "not a folder")


# ------------------------------------------------------------------ the teacher, by contents

def test_the_same_teacher_by_another_path_resumes(teacher_path, tmp_path, monkeypatch):
  """The record holds the resolved path and a fingerprint of the teacher's files: a relative
  path from another working directory, or a symlink, is the same teacher."""
  workdir = str(tmp_path / "w")
  monkeypatch.chdir(os.path.dirname(teacher_path))
  train.train_and_evaluate(tiny_config(os.path.basename(teacher_path), max_train_steps=2), workdir)
  record = _config_json(workdir)
  assert record["teacher_path"] == os.path.realpath(teacher_path)
  assert record["teacher_fingerprint"].startswith("sha256:")
  link = tmp_path / "link"
  link.symlink_to(teacher_path)
  monkeypatch.chdir(tmp_path)
  train.train_and_evaluate(tiny_config("link", max_train_steps=4), workdir)
  assert "4" in os.listdir(os.path.join(workdir, "checkpoints"))


def test_another_teacher_at_the_same_path_is_refused(teacher_path, tmp_path):
  """The teacher at the run's path was replaced (here: its noise scale, one value of
  model.json): the contents differ, so the resume is refused though the path is the same."""
  import shutil
  copy = str(tmp_path / "teacher")
  shutil.copytree(teacher_path, copy)
  workdir = str(tmp_path / "w")
  train.train_and_evaluate(tiny_config(copy, max_train_steps=2), workdir)
  with open(os.path.join(copy, "model.json")) as f:
    description = json.load(f)
  description["config"]["emb_noise_scale"] = 0.5
  with open(os.path.join(copy, "model.json"), "w") as f:
    json.dump(description, f)
  with pytest.raises(train.RunError, match="teacher_fingerprint"):
    train.train_and_evaluate(tiny_config(copy, max_train_steps=4), workdir)


def test_steps_without_their_record_are_not_resumed_silently(teacher_path, tmp_path):
  workdir = str(tmp_path / "w")
  train.train_and_evaluate(tiny_config(teacher_path, max_train_steps=2), workdir)
  os.remove(os.path.join(workdir, "checkpoints", "config.json"))
  with pytest.raises(train.RunError, match="holds steps 2 but not config.json"):
    train.train_and_evaluate(tiny_config(teacher_path, max_train_steps=4, generator_lr=0.5),
                             workdir)
  train.train_and_evaluate(tiny_config(teacher_path, max_train_steps=4, generator_lr=0.5,
                                       allow_config_change=True), workdir)
  assert _config_json(workdir)["generator_lr"] == 0.5


def test_flipped_bytes_in_a_checkpoint_are_named_not_loaded(teacher_path, tmp_path, capsys):
  """16 bytes XOR-ed in ten places of the orbax data files: the step's checksums (recorded
  when it was saved) no longer match, and both a resume and `sample --generator` refuse it by
  name instead of loading other numbers."""
  from dimo_jax import sample
  from tests.test_sample_cli import tiny_tokenizer
  workdir = str(tmp_path / "run")
  config = tiny_config(teacher_path, max_train_steps=4, checkpointing_steps=2)
  train.train_and_evaluate(config, workdir)
  step_dir = os.path.join(workdir, "checkpoints", "4")
  assert os.path.isfile(os.path.join(step_dir, checkpoints.CHECKSUMS))
  assert checkpoints.damaged_files(step_dir) == []
  data_files = sorted(os.path.join(root, name) for root, _, names in os.walk(step_dir)
                      for name in names if name != checkpoints.CHECKSUMS
                      and os.path.getsize(os.path.join(root, name)) > 256)
  rng = np.random.default_rng(0)
  for i in range(10):
    path = data_files[i % len(data_files)]
    with open(path, "r+b") as f:
      offset = int(rng.integers(0, os.path.getsize(path) - 16))
      f.seek(offset)
      chunk = bytearray(f.read(16))
      f.seek(offset)
      f.write(bytes(b ^ 0x5A for b in chunk))
  assert checkpoints.damaged_files(step_dir)
  with pytest.raises(train.RunError, match=r"checkpoints/4: cannot restore this checkpoint "
                     r"\(.* no longer match the checksums recorded when the step was saved\); "
                     r"delete that folder to resume from step 2"):
    train.train_and_evaluate(tiny_config(teacher_path, max_train_steps=6), workdir)
  with pytest.raises(SystemExit):
    sample.main(["--teacher", teacher_path, "--tokenizer",
                 tiny_tokenizer(str(tmp_path / "tok")), "--generator", workdir, "--labels", "1",
                 "--out", str(tmp_path / "grid.png")])
  err = capsys.readouterr().err
  assert "checkpoints/4: the checkpoint step cannot be read" in err
  assert "no longer match the checksums" in err and not (tmp_path / "grid.png").exists()


def test_a_checkpoint_that_meets_a_full_disk_is_one_line(teacher_path, tmp_path, monkeypatch):
  """orbax's ValueError around tensorstore's ENOSPC (as measured on a full tmpfs) becomes one
  SaveError naming the step and where the run will resume; its writer threads' error logs are
  dropped (their exception says it once)."""
  import orbax.checkpoint as ocp
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(tiny_config(teacher_path, max_train_steps=2, checkpointing_steps=2),
                           workdir)
  real_save = ocp.CheckpointManager.save

  def full(self, step, *args, **kwargs):
    if step >= 4:
      raise ValueError("RESOURCE_EXHAUSTED: Error writing local file: No space left on device "
                       "[os_error_code='28']")
    return real_save(self, step, *args, **kwargs)
  monkeypatch.setattr(ocp.CheckpointManager, "save", full)
  with pytest.raises(checkpoints.SaveError, match=r"checkpoints: cannot save checkpoint step 4 "
                     r"\(no space left on device\); free space .* it resumes from step 2"):
    train.train_and_evaluate(tiny_config(teacher_path, max_train_steps=4, checkpointing_steps=2),
                             workdir)
  monkeypatch.setattr(ocp.CheckpointManager, "save", real_save)
  train.train_and_evaluate(tiny_config(teacher_path, max_train_steps=4, checkpointing_steps=2),
                           workdir)
  step, _ = restore_latest(workdir, tiny_config(teacher_path), teacher_path)
  assert step == 4
