"""`python -m dimo_jax.sample` and `python -m dimo_jax.evaluate` on a user's mistakes: a tokenizer
of another codebook than the teacher's, a generator distilled from another teacher, a damaged
checkpoint step, a missing path, a bad flag. Each is one `error:` line and a non-zero exit, and
nothing is sampled or written.

The teacher is the 17-code digits teacher of tests/test_train.py with the 17-code VQGAN of
tests/test_sample_cli.py; the run holds Di[M]O checkpoints at steps 2 and 3 written through the
run's own checkpoint manager (tests/test_evaluate.py's `write_checkpoint`: the state a run
saves, without training it).
"""

import glob
import os
import shutil
import subprocess
import sys

import pytest
from PIL import Image

from dimo_jax import checkpoints, evaluate, evaluators, modeldir, sample
from dimo_jax.errors import UserError
from tests.test_evaluate import image_config, tiny_extractor, write_checkpoint
from tests.test_reliability_modeldirs import small_tokenizer
from tests.test_sample_cli import tiny_tokenizer
from tests.test_train import tiny_config, tiny_teacher

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
  root = tmp_path_factory.mktemp("cli")
  dirs = {"teacher": tiny_teacher(str(root / "teacher")),
          "wide_teacher": tiny_teacher(str(root / "wide_teacher"), hidden_dim=24),
          "tokenizer": tiny_tokenizer(str(root / "tokenizer")),
          "tokenizer16": small_tokenizer(str(root / "tokenizer16"), 16),
          "run": str(root / "run")}
  for step in (2, 3):
    write_checkpoint(dirs["run"], tiny_config(dirs["teacher"]), dirs["teacher"], step=step)
  return dirs


def error_line(capsys) -> str:
  """The one line a refused command printed (all of its stderr)."""
  lines = capsys.readouterr().err.splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), lines
  return lines[0]


def run_sample(dirs, tmp_path, capsys, *flags, status=1, **paths):
  """sample.main refused: returns its error line; no PNG is written."""
  given = {"teacher": dirs["teacher"], "tokenizer": dirs["tokenizer"], **paths}
  out = tmp_path / "grid.png"
  argv = [arg for name, path in given.items() for arg in (f"--{name}", path)]
  with pytest.raises(SystemExit) as exit_info:
    sample.main(argv + ["--out", str(out), *flags])
  assert exit_info.value.code == status
  assert not out.exists()
  return error_line(capsys)


def damage(run: str, step: int, how: str) -> None:
  """Truncates or deletes files of checkpoints/<step>, as a run killed while saving or a disk
  that filled up leaves it."""
  step_dir = os.path.join(run, "checkpoints", str(step))
  if how == "truncated arrays":
    paths = glob.glob(os.path.join(step_dir, "default", "ocdbt.process_0", "d", "*"))
  elif how == "truncated manifest":
    paths = [os.path.join(step_dir, "default", "manifest.ocdbt")]
  elif how == "truncated metadata":
    paths = [os.path.join(step_dir, "default", "_METADATA")]
  else:
    shutil.rmtree(os.path.join(step_dir, "default"))
    return
  assert paths
  for path in paths:
    with open(path, "r+b") as f:
      f.truncate(3)


@pytest.fixture
def damaged_run(dirs, tmp_path):
  def make(how: str, step: int = 3) -> str:
    run = str(tmp_path / "run")
    shutil.copytree(dirs["run"], run)
    damage(run, step, how)
    return run
  return make


# --- 3. pairings that cannot work --------------------------------------------------------------

def test_sample_refuses_a_tokenizer_of_another_codebook(dirs, tmp_path, capsys):
  line = run_sample(dirs, tmp_path, capsys, "--labels", "1,2", "--steps", "2",
                    tokenizer=dirs["tokenizer16"])
  assert (f"{dirs['tokenizer16']}: expected a tokenizer of the 17 codes of the teacher "
          f"{dirs['teacher']}, found one of 16 codes") in line


def test_sample_refuses_a_generator_of_another_teacher(dirs, tmp_path, capsys):
  line = run_sample(dirs, tmp_path, capsys, "--labels", "1", teacher=dirs["wide_teacher"],
                    generator=dirs["run"])
  step_dir = os.path.join(dirs["run"], "checkpoints", "3")
  assert line.startswith(f"error: {dirs['wide_teacher']}/model.json describes params/")
  assert f"but --generator {step_dir} holds (" in line
  assert "of shape (24,)" in line and "holds (16,)" in line
  assert f"distilled from another teacher; give its run's teacher ({dirs['teacher']})" in line


def test_evaluate_refuses_a_tokenizer_of_another_codebook(dirs, tmp_path):
  config = image_config(dict(dirs, tokenizer=dirs["tokenizer16"]))
  with pytest.raises(modeldir.ModelDirError, match=(
      f"{dirs['tokenizer16']}: expected a tokenizer of the 17 codes of the teacher "
      f"{dirs['teacher']}, found one of 16 codes")):
    evaluators.evaluate(config, str(tmp_path), checkpoint=dirs["run"], num_samples=4,
                      extractor=tiny_extractor(), reference=str(tmp_path / "unused.npz"))
  assert not os.listdir(tmp_path)


def test_evaluate_refuses_a_generator_of_another_teacher(dirs, tmp_path):
  config = tiny_config(dirs["wide_teacher"])
  with pytest.raises(checkpoints.GeneratorError) as info:
    evaluators.evaluate(config, str(tmp_path), checkpoint=dirs["run"], num_samples=4)
  step_dir = os.path.join(dirs["run"], "checkpoints", "3")
  assert str(info.value).startswith(f"{dirs['wide_teacher']}/model.json describes params/")
  assert f"but --checkpoint {step_dir} holds (16,)" in str(info.value)


# --- 4. a missing --checkpoint ------------------------------------------------------------------

def test_evaluate_names_a_missing_checkpoint_as_given(dirs, tmp_path):
  missing = str(tmp_path / "nowhere")
  with pytest.raises(FileNotFoundError, match=f"^--checkpoint: {missing} does not exist$"):
    evaluators.evaluate(tiny_config(dirs["teacher"]), str(tmp_path / "out"), checkpoint=missing,
                      num_samples=4)
  # Without --checkpoint the run is the --workdir.
  with pytest.raises(FileNotFoundError, match=f"^--workdir: {missing} does not exist$"):
    evaluators.evaluate(tiny_config(dirs["teacher"]), missing, num_samples=4)


# --- 5. a damaged checkpoint step ---------------------------------------------------------------

DAMAGES = ["truncated arrays", "truncated manifest", "truncated metadata", "deleted item"]


@pytest.mark.parametrize("how", DAMAGES)
def test_sample_names_a_damaged_step_and_what_to_do(dirs, damaged_run, tmp_path, capsys, how):
  run = damaged_run(how)
  root = os.path.join(run, "checkpoints")
  line = run_sample(dirs, tmp_path, capsys, "--labels", "1", generator=run)
  assert line.startswith(f"error: {root}/3: the checkpoint step cannot be read (")
  assert line.endswith(f"delete that folder or pick another step (2: --generator "
                       f"{root}/<step>)")
  assert "tensorstore_spec" not in line
  # The other step still samples.
  out = tmp_path / "step2.png"
  sample.main(["--teacher", dirs["teacher"], "--tokenizer", dirs["tokenizer"], "--generator",
               f"{root}/2", "--labels", "1", "--samples_per_label", "1", "--out", str(out)])
  assert out.exists()


def test_sample_says_when_no_other_step_is_saved(dirs, damaged_run, tmp_path, capsys):
  run = damaged_run("truncated manifest")
  shutil.rmtree(os.path.join(run, "checkpoints", "2"))
  line = run_sample(dirs, tmp_path, capsys, "--labels", "1", generator=run)
  assert line.startswith(f"error: {run}/checkpoints/3: the checkpoint step cannot be read (")
  assert line.endswith(": delete that folder (no other step is saved)")


# --- 4. every user error of sample is one line -------------------------------------------------

def _blank_prompts(tmp_path):
  path = tmp_path / "prompts.txt"
  path.write_text("\n \n")
  return str(path)


@pytest.mark.parametrize("case, flags, paths, status, expected", [
    ("missing teacher", ["--labels", "1"], {"teacher": "{tmp}/nowhere"}, 1,
     "error: --teacher: {tmp}/nowhere does not exist"),
    ("label out of range", ["--labels", "1,10"], {}, 1,
     "error: --labels: label 10 is out of range: the teacher has 10 classes (0 to 9)"),
    ("label not a number", ["--labels", "1,x"], {}, 1,
     "error: --labels: 'x' is not an integer class label"),
    ("unknown --params", ["--labels", "1", "--params", "best"], {"generator": "{run}"}, 2,
     "error: flag --params=best: value should be one of <ema|generator>"),
    ("a teacher as tokenizer", ["--labels", "1"], {"tokenizer": "{teacher}"}, 1,
     "error: {teacher}/model.json: kind: expected a tokenizer kind among"),
    ("unknown schedule", ["--labels", "1", "--sched", "cosin"], {}, 1,
     "error: --sched: expected one of"),
    ("prompts for a class teacher", ["--prompt", "a cat"], {}, 1,
     "error: --prompt: --teacher {teacher} is a class-conditional 'maskgit' teacher"),
    ("blank prompt file", ["--prompt_file", "{prompts}"], {}, 1,
     "error: --prompt_file: {prompts}: holds no prompt"),
    ("zero steps", ["--labels", "1", "--steps", "0"], {}, 2,
     "error: --steps: expected 1 to 1024 decoding steps, found 0"),
    # Each of these sampled (or started to) before this check existed.
    ("a million steps", ["--labels", "1", "--steps", "1000000"], {}, 2,
     "error: --steps: expected 1 to 1024 decoding steps, found 1000000"),
    ("cfg nan", ["--labels", "1", "--cfg", "nan"], {}, 2,
     "error: --cfg: expected a finite number >= 0, found nan"),
    ("cfg negative", ["--labels", "1", "--cfg", "-3"], {}, 2,
     "error: --cfg: expected a finite number >= 0, found -3.0"),
    ("temperature negative", ["--labels", "1", "--temperature", "-1"], {}, 2,
     "error: --temperature: expected a finite number >= 0, found -1.0"),
    ("temperature inf", ["--labels", "1", "--temperature", "inf"], {}, 2,
     "error: --temperature: expected a finite number >= 0, found inf"),
    ("seed negative", ["--labels", "1", "--seed", "-5"], {}, 2,
     "error: --seed: expected an integer >= 0, found -5"),
])
def test_every_user_error_of_sample_is_one_line(dirs, tmp_path, capsys, case, flags, paths,
                                                status, expected):
  import time
  names = {"tmp": str(tmp_path), "run": dirs["run"], "teacher": dirs["teacher"],
           "prompts": _blank_prompts(tmp_path)}
  flags = [flag.format(**names) for flag in flags]
  paths = {name: path.format(**names) for name, path in paths.items()}
  start = time.perf_counter()
  line = run_sample(dirs, tmp_path, capsys, *flags, status=status, **paths)
  assert line.startswith(expected.format(**names)), line
  assert time.perf_counter() - start < 10  # refused before any sampling


def test_sample_out_under_a_file_is_refused_before_sampling(dirs, tmp_path, capsys):
  (tmp_path / "notes.txt").write_text("mine")
  with pytest.raises(SystemExit):
    sample.main(["--teacher", dirs["teacher"], "--tokenizer", dirs["tokenizer"], "--labels",
                 "1", "--out", str(tmp_path / "notes.txt" / "grid.png")])
  assert "notes.txt is a file, not a folder" in error_line(capsys)
  assert (tmp_path / "notes.txt").read_text() == "mine"


def test_evaluate_checkpoint_that_is_a_file_says_so(dirs, tmp_path):
  released = tmp_path / "model.pth"
  released.write_bytes(b"not a run")
  with pytest.raises(checkpoints.GeneratorError, match="model.pth is a file; expected a Di"):
    checkpoints.find_checkpoint(str(released), "--checkpoint")


# --- 4, 5. every user error of evaluate is one line -------------------------------------------

def run_evaluate(dirs, workdir, *flags):
  cmd = [sys.executable, "-m", "dimo_jax.evaluate", "--config",
         os.path.join(REPO, "configs", "digits.py"), "--workdir", workdir,
         "--config.eval_batch_size=8", "--num_samples=4", *flags]
  if not any(flag.startswith("--config.teacher_path") for flag in flags):
    cmd.append(f"--config.teacher_path={dirs['teacher']}")
  return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"))


@pytest.mark.parametrize("case", ["missing checkpoint", "damaged step", "unknown --params",
                                  "missing teacher"])
def test_every_user_error_of_evaluate_is_one_line(dirs, damaged_run, tmp_path, case):
  missing = str(tmp_path / "nowhere")
  if case == "missing checkpoint":
    flags, expected = [f"--checkpoint={missing}"], f"error: --checkpoint: {missing} does not exist"
  elif case == "damaged step":
    run = damaged_run("truncated arrays")
    flags = [f"--checkpoint={run}"]
    expected = f"error: {run}/checkpoints/3: the checkpoint step cannot be read ("
  elif case == "unknown --params":
    flags, expected = [f"--checkpoint={dirs['run']}", "--params=best"], "error: "
  else:
    flags = [f"--checkpoint={dirs['run']}", f"--config.teacher_path={missing}"]
    expected = f"error: {missing} is not a teacher directory: {missing}/model.json is missing"
  workdir = str(tmp_path / "eval")
  out = run_evaluate(dirs, workdir, *flags)
  assert out.returncode != 0
  assert "Traceback" not in out.stderr, out.stderr[-3000:]
  errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and errors[0].startswith(expected), out.stderr[-3000:]
  if case == "damaged step":
    assert errors[0].endswith(f"delete that folder or pick another step (2: --checkpoint "
                              f"{run}/checkpoints/<step>)")
  if case == "unknown --params":
    assert "--params" in errors[0] and "best" in errors[0]
  assert not glob.glob(os.path.join(workdir, "eval_*.json"))


# Issue 22, "destroyed": sample and evaluate replace only their own kind of output.

def test_sample_never_replaces_a_file_that_is_not_a_png(dirs, tmp_path, capsys):
  thesis = tmp_path / "thesis.tex"
  thesis.write_text("years of work")
  with pytest.raises(SystemExit) as exit_info:
    sample.main(["--teacher", dirs["teacher"], "--tokenizer", dirs["tokenizer"], "--labels", "1",
                 "--out", str(thesis)])
  assert exit_info.value.code == 1
  assert "thesis.tex: exists and is not a PNG image" in error_line(capsys)
  assert thesis.read_text() == "years of work"


def test_sample_replaces_its_own_png_and_a_file_only_with_overwrite(dirs, tmp_path, capsys):
  grid = tmp_path / "grid.png"
  argv = ["--teacher", dirs["teacher"], "--tokenizer", dirs["tokenizer"], "--labels", "1",
          "--steps", "2", "--out", str(grid)]
  sample.main(argv)
  first = grid.read_bytes()
  sample.main(argv + ["--seed", "3"])  # a PNG is its own kind of output
  assert grid.read_bytes() != first
  notes = tmp_path / "notes.txt"
  notes.write_text("mine")
  sample.main(argv[:-1] + [str(notes), "--overwrite"])
  assert notes.read_bytes().startswith(b"\x89PNG")
  assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.png", "notes.txt"]


def test_sample_into_a_folder_is_refused_and_leaves_nothing(dirs, tmp_path, capsys):
  folder = tmp_path / "pictures"
  folder.mkdir()
  with pytest.raises(SystemExit):
    sample.main(["--teacher", dirs["teacher"], "--tokenizer", dirs["tokenizer"], "--labels", "1",
                 "--out", str(folder)])
  assert "is a folder" in error_line(capsys)
  assert os.listdir(tmp_path) == ["pictures"] and os.listdir(folder) == []


def test_evaluate_stats_never_replaces_a_file_that_is_not_an_npz(tmp_path, capsys):
  from absl import flags
  notes = tmp_path / "notes.txt"
  notes.write_text("mine")
  (tmp_path / "images").mkdir()
  Image.new("RGB", (16, 16)).save(tmp_path / "images" / "0.png")
  try:
    flags.FLAGS(["evaluate", "--images", str(tmp_path / "images"), "--inception", "unused",
                 "--out", str(notes)])
    with pytest.raises(UserError, match="exists and is not an .npz archive"):
      evaluate.main(["evaluate", "stats"])
  finally:
    flags.FLAGS.unparse_flags()
  assert notes.read_text() == "mine"
