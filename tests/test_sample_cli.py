"""python -m dimo_jax.sample: teacher and generator grids, checkpoint lookup, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from dimo_jax import checkpoints, sample, teachers, tokenizers, train
from dimo_jax.models.taming_vqgan import VQModel
from tests.test_train import restore_latest, tiny_config, tiny_teacher

PAD = 1  # pixels between and around the grid's images (visualize.image_grid)


def tiny_tokenizer(path: str) -> str:
  """A random taming VQGAN for the digits teacher: 17 codes, f = 2, so 8x8 codes -> 16x16."""
  model = VQModel(ch=32, out_ch=3, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(),
                  in_channels=3, resolution=16, z_channels=4, n_embed=17, embed_dim=4)
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 2, 2, 3), jnp.float32))
  tokenizers.save(path, model, variables)
  return path


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
  root = tmp_path_factory.mktemp("sample")
  teacher = tiny_teacher(str(root / "teacher"))
  tokenizer = tiny_tokenizer(str(root / "tokenizer"))
  # Two Di[M]O steps, no grids or evaluation: only the checkpoints matter here.
  config = tiny_config(teacher, max_train_steps=2, fake_rounds=1, validation_steps=1000)
  workdir = str(root / "run")
  train.train_and_evaluate(config, workdir)
  return {"teacher": teacher, "tokenizer": tokenizer, "workdir": workdir, "config": config}


def grid_size(labels: int, per_label: int, side: int = 16):
  """(width, height) of a grid of `labels` rows and `per_label` columns of side x side images."""
  return per_label * (side + PAD) + PAD, labels * (side + PAD) + PAD


def run_cli(dirs, tmp_path, *flags):
  out = str(tmp_path / "out" / "grid.png")
  sample.main(["--teacher", dirs["teacher"], "--tokenizer", dirs["tokenizer"], "--out", out,
               *flags])
  return out


def test_teacher_grid_has_a_row_per_label(dirs, tmp_path):
  out = run_cli(dirs, tmp_path, "--steps", "4", "--cfg", "3", "--labels", "1,7,3",
                "--samples_per_label", "2", "--seed", "5", "--sched", "arccos")
  assert Image.open(out).size == grid_size(3, 2)
  assert [p.name for p in (tmp_path / "out").iterdir()] == ["grid.png"]  # no temp file left


def test_generator_grid_from_a_run(dirs, tmp_path):
  out = run_cli(dirs, tmp_path, "--generator", dirs["workdir"], "--labels", "0,9",
                "--samples_per_label", "3")
  assert Image.open(out).size == grid_size(2, 3)


def test_generator_checkpoint_lookup_and_params(dirs):
  teacher = teachers.load(dirs["teacher"])
  step, state = restore_latest(dirs["workdir"], dirs["config"], dirs["teacher"])
  ema, config, found = checkpoints.load_generator(dirs["workdir"], teacher, "ema")
  raw, _, found_raw = checkpoints.load_generator(f"{dirs['workdir']}/checkpoints/{step}",
                                                 teacher, "generator")
  assert found == found_raw == step == 2
  assert config.fixed_ratio == dirs["config"].fixed_ratio
  for got, want in ((ema, state.ema_params), (raw, state.gen_params)):
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_label_out_of_range_names_the_label(dirs, tmp_path, capsys):
  with pytest.raises(SystemExit) as exit_info:
    run_cli(dirs, tmp_path, "--labels", "1,10")
  assert exit_info.value.code == 1
  assert "label 10 is out of range: the teacher has 10 classes" in capsys.readouterr().err
  assert not (tmp_path / "out" / "grid.png").exists()


@pytest.mark.parametrize("flag", ["--teacher", "--tokenizer", "--generator"])
def test_missing_directory_is_named(dirs, tmp_path, capsys, flag):
  missing = str(tmp_path / "nowhere")
  paths = {"--teacher": dirs["teacher"], "--tokenizer": dirs["tokenizer"],
           "--generator": dirs["workdir"], flag: missing}
  with pytest.raises(SystemExit) as exit_info:
    sample.main([arg for name, path in paths.items() for arg in (name, path)]
                + ["--labels", "1", "--out", str(tmp_path / "grid.png")])
  assert exit_info.value.code == 1
  assert f"{flag}: {missing} does not exist" in capsys.readouterr().err


def test_a_directory_without_checkpoints_is_refused(dirs):
  with pytest.raises(FileNotFoundError, match="is not a Di\\[M\\]O workdir"):
    checkpoints.find_checkpoint(dirs["teacher"])


def test_teacher_flags_are_refused_with_a_generator(dirs, tmp_path, capsys):
  with pytest.raises(SystemExit) as exit_info:
    run_cli(dirs, tmp_path, "--generator", dirs["workdir"], "--labels", "1", "--steps", "8")
  assert exit_info.value.code == 2
  assert "--steps set the teacher's decoding" in capsys.readouterr().err


def test_tteo_changes_the_generator_grid_with_the_runs_reward(dirs, tmp_path):
  args = ("--generator", dirs["workdir"], "--labels", "0,9", "--samples_per_label", "2")
  plain = np.asarray(Image.open(run_cli(dirs, tmp_path / "plain", *args)))
  tuned = np.asarray(Image.open(run_cli(dirs, tmp_path / "tteo", *args, "--tteo_steps", "3",
                                        "--tteo_lr", "5")))
  assert plain.shape == tuned.shape and not np.array_equal(plain, tuned)


@pytest.mark.parametrize("flags, status, message", [
    (("--tteo_steps", "2"), 2, "--tteo_steps optimizes a generator's input embeddings"),
    (("--generator", "G", "--class_map", "m.json"), 2,
     "--class_map set test-time embedding optimization: give --tteo_steps"),
    (("--generator", "G", "--tteo_steps", "-1"), 2, "--tteo_steps: expected an integer >= 0"),
    (("--generator", "G", "--tteo_steps", "2", "--tteo_lr", "nan"), 2,
     "--tteo_lr: expected a finite number > 0"),
    (("--generator", "G", "--tteo_steps", "2", "--reward_clip", "C"), 1,
     "--tteo_steps: reward.kind 'clip' reads the datasets 'prompts', not 'digits'"),
    (("--generator", "G", "--tteo_steps", "2", "--reward_inception", "I"), 1,
     "--tteo_steps: reward.kind 'inception' reads the datasets 'imagenet256', not 'digits'"),
])
def test_tteo_flags_are_checked_before_sampling(dirs, tmp_path, capsys, flags, status, message):
  flags = tuple(dirs["workdir"] if f == "G" else f for f in flags)
  with pytest.raises(SystemExit) as exit_info:
    run_cli(dirs, tmp_path, "--labels", "1", *flags)
  assert exit_info.value.code == status
  assert message in capsys.readouterr().err
  assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())
