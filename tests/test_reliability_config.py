"""Config: every enum and range is checked before anything is written or compiled, an unknown
key names the closest real ones, and the CLIs print one line for a user's mistake."""

import os
import subprocess
import sys

import pytest

from configs import digits as digits_config
from dimo_jax import cli, config_check, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (key, bad value): each failed only when the step was traced, at the final evaluation, after
# step 1 (ZeroDivisionError), or not at all.
BAD_VALUES = [
    ("distil_loss_type", "KL"),
    ("distil_loss_type", "Jeffreys_1.5"),
    ("ratio_mode", "foo"),
    ("ratio_mode_fake", "foo"),
    ("noise_emb_perturb", "fixed_0.1"),
    ("noise_emb_perturb", "fix_1.5"),
    ("noise_emb_perturb", "warmup_cos_0"),
    ("sched_mode", "cosinus"),
    ("fixed_ratio", "fix_2.0"),
    ("fixed_ratio", "random_0.9_0.1"),
    ("checkpointing_steps", 0),
    ("log_every", 0),
    ("validation_steps", 0),
    ("fake_rounds", 0),
    ("max_train_steps", 0),
    ("eval_batch_size", 0),
    ("mixed_precision", "fp16"),
    ("teacher_dtype", "half"),
    ("optimizer_type", "sgd"),
    ("loss_reduction", "avg"),
    ("lr_scheduler_type", "cosine"),
    ("generator_lr", 0.0),
    ("fake_lr", -1e-4),
    ("gen_temp", 0.0),
    ("label_smoothing", 1.0),
    ("alpha_fake", 1.5),
    ("ema_decay", 1.01),
    ("adam_beta2", 1.0),
    ("top_p", 2.0),
    ("max_grad_norm", -1.0),
    ("eval_gen_temps", (0.5, 0.0)),
    ("max_consecutive_skips", -1),
    ("train_batch_size", 0),
    ("global_seed", -5),  # trained and saved, then failed in validation (OverflowError)
]


@pytest.mark.parametrize("key,value", BAD_VALUES, ids=[f"{k}={v}" for k, v in BAD_VALUES])
def test_a_bad_value_is_refused_by_name_before_anything_is_written(key, value, tmp_path):
  config = digits_config.get_config()
  config[key] = value
  workdir = tmp_path / "run"
  with pytest.raises(config_check.ConfigError) as info:
    train.train_and_evaluate(config, str(workdir))
  message = str(info.value)
  # The key itself is named (ratio_mode_fake is not reported as ratio_mode) with its value.
  assert f"{key} " in message and repr(value) in message
  others = [k for k, _ in BAD_VALUES if k != key and k.startswith(key)]
  for other in others:
    assert f"{other} " not in message
  assert not workdir.exists()


PRETRAIN_BAD = [("num_steps", 0), ("batch_size", 0), ("log_every", 0), ("lr", 0.0),
                ("ratio_mode", "cos"), ("drop_label", 1.5), ("final_lr_ratio", -0.1),
                ("warmup_steps", -1), ("label_smoothing", 1.0)]


@pytest.mark.parametrize("key,value", PRETRAIN_BAD, ids=[f"{k}={v}" for k, v in PRETRAIN_BAD])
def test_a_bad_pretraining_value_is_refused_before_anything_is_written(key, value, tmp_path):
  from configs import digits_teacher
  from dimo_jax import pretrain
  config = digits_teacher.get_config()
  config[key] = value
  with pytest.raises(config_check.ConfigError, match=f"{key} .*found {value!r}"):
    pretrain.pretrain(config, str(tmp_path / "teacher"))
  assert not (tmp_path / "teacher").exists()


@pytest.mark.parametrize("change, match", [
    (dict(dataset="imagenet256", tokenizer_path=""), "needs tokenizer_path"),
    (dict(teacher_path=""), "teacher_path must name a teacher directory"),
])
def test_a_config_that_cannot_run_is_named_before_anything(change, match, tmp_path):
  config = digits_config.get_config()
  config.update(change)
  with pytest.raises(config_check.ConfigError, match=match):
    train.train_and_evaluate(config, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


def test_pretraining_shorter_than_its_warm_up_is_refused(tmp_path):
  from configs import digits_teacher
  from dimo_jax import pretrain
  config = digits_teacher.get_config()
  config.num_steps = 2  # the default warm-up is 100 steps: optax raised deep inside
  with pytest.raises(config_check.ConfigError, match="warmup_steps .100. must be less than"):
    pretrain.pretrain(config, str(tmp_path / "teacher"))


def test_every_shipped_config_passes():
  import importlib
  for name in ("digits", "digits_text", "synthetic", "maskgit_imagenet256", "meissonic_1024",
               "digits_teacher", "digits_text_teacher", "synthetic_teacher",
               "soft_dimo_maskgit_imagenet256", "maskbit_imagenet256",
               "soft_dimo_maskbit_imagenet256", "maskbit_digits", "maskbit_digits_teacher",
               "soft_dimo_meissonic_1024"):
    config = importlib.import_module(f"configs.{name}").get_config()
    assert config_check.problems(config) == [], name


def test_every_problem_is_listed_at_once():
  config = digits_config.get_config()
  config.log_every = 0
  config.ratio_mode = "foo"
  found = config_check.problems(config)
  assert len(found) == 2
  assert any(p.startswith("log_every ") for p in found)
  assert any(p.startswith("ratio_mode ") for p in found)


def test_closest_keys():
  config = digits_config.get_config()
  assert config_check.closest_keys(config, "fake_rounds") is None
  assert config_check.closest_keys(config, "mesh.data") is None
  assert "fake_rounds" in config_check.closest_keys(config, "fake_round")
  assert "mesh.fsdp" in config_check.closest_keys(config, "mesh.fsdb")
  assert config_check.closest_keys(config, "zzzzqqq") == []


def _main(*flags, timeout=300):
  cmd = [sys.executable, "-m", "dimo_jax.main", "--config",
         os.path.join(REPO, "configs/digits.py"), *flags]
  return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def _one_error_line(out):
  lines = [line for line in out.stderr.splitlines() if line.strip()]
  # absl may log warnings of the platform before the message; the message is the last line and
  # the only one starting with "error:", and there is no traceback.
  assert "Traceback" not in out.stderr, out.stderr[-3000:]
  errors = [line for line in lines if line.startswith("error:")]
  assert len(errors) == 1, out.stderr[-3000:]
  return errors[0]


@pytest.mark.parametrize("flag,near", [("--config.fake_round=4", "fake_rounds"),
                                       ("--config.foo_bar=1", None),
                                       ("--config.mesh.fsdb=2", "mesh.fsdp")])
def test_main_names_an_unknown_key_and_the_closest_real_ones(flag, near, tmp_path):
  out = _main("--workdir", str(tmp_path / "run"), flag)
  assert out.returncode == 2
  line = _one_error_line(out)
  key = flag.split("=")[0].removeprefix("--config.")
  assert f"no key {key!r}" in line
  if near:
    assert near in line
  assert not (tmp_path / "run").exists()


def test_main_prints_one_line_for_a_bad_value(tmp_path):
  out = _main("--workdir", str(tmp_path / "run"), "--config.ratio_mode=foo",
              "--config.checkpointing_steps=0")
  assert out.returncode == 1
  line = _one_error_line(out)
  assert "ratio_mode" in line and "checkpointing_steps" in line
  assert not (tmp_path / "run").exists()


def test_main_prints_one_line_for_a_missing_teacher(tmp_path):
  out = _main("--workdir", str(tmp_path / "run"),
              f"--config.teacher_path={tmp_path / 'nowhere'}")
  assert out.returncode == 1
  assert str(tmp_path / "nowhere") in _one_error_line(out)


def test_pretrain_cli_prints_one_line_for_an_unknown_key(tmp_path):
  cmd = [sys.executable, "-m", "dimo_jax.pretrain", "--config",
         os.path.join(REPO, "configs/digits_teacher.py"), "--workdir", str(tmp_path / "t"),
         "--config.num_step=3"]
  out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert out.returncode == 2
  assert "num_steps" in _one_error_line(out)


def test_unknown_override_reads_the_config_file():
  path = os.path.join(REPO, "configs/digits.py")
  assert cli.unknown_override(["prog", f"--config={path}", "--config.fake_rounds=3"]) is None
  message = cli.unknown_override(["prog", "--config", path, "--config.fake_roundz=3"])
  assert "fake_rounds" in message


@pytest.mark.parametrize("flags, message", [
    (["--modes", "0"], "--modes must be at least 1"),
    (["--corruption", "1.5"], "--corruption must lie in [0, 1)"),
    (["--tokens", "-3"], "--tokens must be at least 1"),
    (["--set", "fake_round=4"], "did you mean fake_rounds"),
    (["--set", "generator_lr=abc"], "generator_lr is a float, found 'abc'"),
    (["--set", "generator_lr=-1"], "generator_lr must be a finite number > 0"),
])
def test_the_synthetic_benchmark_refuses_before_pretraining(flags, message, tmp_path):
  """Each of these spent minutes pretraining a teacher before the typo was found."""
  import time
  start = time.perf_counter()
  out = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "synthetic.py"),
                        "--workdir", str(tmp_path), *flags], capture_output=True, text=True,
                       timeout=120, cwd=REPO)
  assert out.returncode != 0 and message in out.stderr, out.stderr[-2000:]
  assert time.perf_counter() - start < 30
  assert not any(tmp_path.rglob("model.json"))  # no teacher was pretrained


def test_a_shipped_config_is_found_from_any_directory(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  argv = cli.installed_config(["prog", "--config", "configs/digits.py", "--workdir", "w"])
  assert argv[2] == os.path.join(REPO, "configs", "digits.py")
  argv = cli.installed_config(["prog", "--config=configs/synthetic.py:x"])
  assert argv[1] == "--config=" + os.path.join(REPO, "configs", "synthetic.py") + ":x"
  (tmp_path / "configs").mkdir()
  (tmp_path / "configs" / "digits.py").write_text("# the user's own")
  assert cli.installed_config(["prog", "--config", "configs/digits.py"])[2] == "configs/digits.py"
