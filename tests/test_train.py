"""The run as a whole: sharded step equality, bit-identical resume, the main entry point."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import digits as digits_config
from dimo_jax import checkpoints, teachers, train
from dimo_jax.data import digits
from dimo_jax.models.maskgit import MaskTransformer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_teacher(path: str, hidden_dim: int = 16, num_heads: int = 2, mlp_dim: int = 32) -> str:
  """A random-weight digits-shaped teacher: the real layout at a toy size."""
  model = MaskTransformer(codebook_size=digits.CODEBOOK_SIZE, num_classes=digits.NUM_CLASSES,
                          seq_len=digits.SEQ_LEN, hidden_dim=hidden_dim, depth=1,
                          num_heads=num_heads, mlp_dim=mlp_dim, dropout=0.1)
  variables = model.init({"params": jax.random.PRNGKey(0)},
                         jnp.zeros((1, digits.SEQ_LEN), jnp.int32), jnp.zeros((1,), jnp.int32))
  teachers.save(path, model, variables)
  return path


def tiny_config(teacher_path: str, **overrides):
  c = digits_config.get_config()
  c.teacher_path = teacher_path
  c.train_batch_size = 8
  c.max_train_steps = 4
  c.lr_warmup_steps = 2
  c.log_every = 1
  c.validation_steps = 2
  c.checkpointing_steps = 2
  c.eval_samples = 20
  c.eval_batch_size = 10
  c.final_eval = False
  c.update(overrides)
  return c


def recipe_inputs(config, teacher, mesh):
  """What a step of configs/digits.py's recipe is fed on `mesh` besides the state and the
  teacher, as `train.train_and_evaluate` feeds it: `fed(step)` -> the step's trailing inputs
  (the data anchor's real batch, x_init's code table from the teacher)."""
  from dimo_jax import data, parallel, samplers
  feed = train.RealFeed.of_run(config, data.get(config), teacher.codebook_size)
  init_logits = parallel.replicate(
      samplers.init_code_logits(config, teacher, teacher.variables), mesh)
  return lambda step: train.step_inputs(None, feed(step, mesh), None, init_logits)


def recipe_steps(config, teacher, mesh, state, teacher_params, steps, step_teacher=None):
  """`state` after `steps` steps of `train.jit_train_step` (with `step_teacher`, default
  `teacher`) fed as `recipe_inputs` feeds them."""
  fed = recipe_inputs(config, teacher, mesh)
  _, real, _, init_logits = fed(0)  # (conditions, real, reward_vars, init_logits)
  step = train.jit_train_step(config, step_teacher or teacher, mesh, state, teacher_params,
                              real=real, init_logits=init_logits)
  for i in range(steps):
    state, _ = step(state, teacher_params, *fed(i))
  return state


@pytest.fixture(scope="module")
def teacher_path(tmp_path_factory):
  return tiny_teacher(str(tmp_path_factory.mktemp("teacher") / "digits"))


def restore_latest(workdir, config, teacher_path):
  teacher = teachers.load(teacher_path)
  from dimo_jax import distill
  abstract = jax.tree_util.tree_map(
      ocp.utils.to_shape_dtype_struct,
      distill.create_state(config, teacher.variables, jax.random.PRNGKey(0),
                           distill.FROZEN_WITH_EMB, teacher=teacher))
  manager = checkpoints.manager(workdir, config)
  return manager.latest_step(), manager.restore(manager.latest_step(),
                                                args=ocp.args.StandardRestore(abstract))


def test_resume_is_bit_identical(teacher_path, tmp_path):
  straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
  train.train_and_evaluate(tiny_config(teacher_path), straight)
  train.train_and_evaluate(tiny_config(teacher_path, max_train_steps=2), split)
  train.train_and_evaluate(tiny_config(teacher_path), split)  # resumes at step 2
  step_a, a = restore_latest(straight, tiny_config(teacher_path), teacher_path)
  step_b, b = restore_latest(split, tiny_config(teacher_path), teacher_path)
  assert step_a == step_b == 4
  leaves_a, leaves_b = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
  assert len(leaves_a) == len(leaves_b)
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  # The run moved: the generator is no longer the teacher.
  teacher = teachers.load(teacher_path)
  moved = [not np.array_equal(g, t) for g, t in zip(
      jax.tree_util.tree_leaves(a.gen_params), jax.tree_util.tree_leaves(teacher.variables))]
  assert any(moved)


def test_checkpoints_keep_the_limit_and_the_config(teacher_path, tmp_path):
  workdir = str(tmp_path / "run")
  config = tiny_config(teacher_path, max_train_steps=6, checkpoints_total_limit=2)
  train.train_and_evaluate(config, workdir)
  manager = checkpoints.manager(workdir, config)
  assert manager.all_steps() == [4, 6]
  with open(os.path.join(workdir, "checkpoints", "config.json")) as f:
    assert json.load(f)["max_train_steps"] == 6
  assert sorted(os.listdir(os.path.join(workdir, "samples"))) == [
      "ema_step000002.png", "ema_step000004.png", "ema_step000006.png"]
  assert any(name.startswith("events.out.tfevents") for name in os.listdir(workdir))


_SHARDED = textwrap.dedent("""
    import sys
    import jax, numpy as np
    sys.path.insert(0, {repo!r}); sys.path.insert(0, {tests!r})
    from test_train import recipe_inputs, tiny_config
    from dimo_jax import distill, parallel, teachers
    assert jax.device_count() == 8, jax.devices()
    config = tiny_config({teacher!r}, train_batch_size=16)
    teacher = teachers.load({teacher!r})
    # configs/digits.py's recipe: x_init's codes from the teacher, the data anchor's real batch.
    assert config.init_codes == "teacher" and config.anchor.weight > 0
    finals = []
    for devices in (8, 1):
      mesh = parallel.make_mesh(devices)
      fed = recipe_inputs(config, teacher, mesh)
      rep = parallel.replicated(mesh)
      params = parallel.replicate(teacher.variables, mesh)
      state = parallel.replicate(
          distill.create_state(config, params, jax.random.PRNGKey(7), distill.FROZEN_WITH_EMB),
          mesh)
      step = jax.jit(distill.make_train_step(
          config, teacher, parallel.batch_constraint(mesh, config.train_batch_size)),
          out_shardings=(rep, rep))
      for i in range(3):
        state, metrics = step(state, params, *fed(i))
      finals.append(jax.device_get((state.gen_params, state.fake_params, state.ema_params)))
    diffs = jax.tree_util.tree_map(lambda a, b: float(np.max(np.abs(a - b))), *finals)
    moved = jax.tree_util.tree_map(lambda a, b: float(np.max(np.abs(a - b))),
                                   finals[1][0], teacher.variables)
    print("MAXDIFF", max(jax.tree_util.tree_leaves(diffs)))
    print("MOVED", max(jax.tree_util.tree_leaves(moved)))
""")


def test_eight_devices_match_one(teacher_path):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  script = _SHARDED.format(repo=REPO, tests=os.path.join(REPO, "tests"), teacher=teacher_path)
  out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                       timeout=600)
  assert out.returncode == 0, out.stderr[-4000:]
  values = dict(line.split() for line in out.stdout.splitlines()
                if line.startswith(("MAXDIFF", "MOVED")))
  assert float(values["MOVED"]) > 1e-4  # the step did something ...
  assert float(values["MAXDIFF"]) < 1e-5  # ... and the same on 8 devices as on 1


def test_main_writes_metrics_samples_and_checkpoints(teacher_path, tmp_path):
  workdir = str(tmp_path / "main")
  cmd = [sys.executable, "-m", "dimo_jax.main", "--config", os.path.join(REPO, "configs/digits.py"),
         "--workdir", workdir, f"--config.teacher_path={teacher_path}",
         "--config.train_batch_size=8", "--config.max_train_steps=2",
         "--config.eval_samples=20", "--config.eval_batch_size=10",
         "--config.validation_steps=2", "--config.checkpointing_steps=2",
         "--config.eval_gen_temps=(0.25, 4.0)"]
  out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-4000:]
  with open(os.path.join(workdir, "metrics.json")) as f:
    metrics = json.load(f)
  assert sorted(metrics) == ["generator_1step", "generator_1step_T0.25", "generator_1step_T4",
                             "teacher_1step", "teacher_8step"]
  # A sharper and a flatter generator are different samplers.
  assert metrics["generator_1step_T0.25"]["fd"] != metrics["generator_1step_T4"]["fd"]
  for values in metrics.values():  # each the mean over configs/digits.py's five seeds
    assert sorted(values) == ["accuracy", "accuracy_std", "fd", "fd_std", "sec_per_image",
                              "sec_per_image_std", "seeds"]
    assert 0.0 <= values["accuracy"] <= 1.0 and values["fd"] >= 0 and values["sec_per_image"] > 0
    assert values["seeds"] == 5 and values["fd_std"] > 0
  assert os.path.isfile(os.path.join(workdir, "samples", "comparison.png"))
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "2"))


def test_unknown_eval_params_is_refused_before_any_work(teacher_path, tmp_path):
  workdir = tmp_path / "bad"
  with pytest.raises(ValueError, match="eval_params must be one of 'ema', 'generator', found 'EMA'"):
    train.train_and_evaluate(tiny_config(teacher_path, eval_params="EMA"), str(workdir))
  assert not workdir.exists()
