"""benchmarks/gpu_suite.py: its CPU smoke run (the real sections at toy sizes) and its counts."""

import argparse
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from benchmarks import gpu_suite
from dimo_jax import distill, teachers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Installed in every process of the suite (sitecustomize, through PYTHONPATH): the device image
# has none of these packages, so here too they are not found.
_BLOCKER = '''
import importlib.machinery
_find = importlib.machinery.PathFinder.find_spec
def _find_spec(name, path=None, target=None):
  if name.split(".")[0] in ("tensorflow", "tensorflow_datasets", "clu"):
    return None  # as if not installed: `import` raises ModuleNotFoundError, find_spec is None
  return _find(name, path, target)
importlib.machinery.PathFinder.find_spec = _find_spec
'''


@pytest.fixture(scope="module")
def blocked_env(tmp_path_factory):
  site = tmp_path_factory.mktemp("site")
  (site / "sitecustomize.py").write_text(_BLOCKER)
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), ROOT]))
  env.pop("XLA_FLAGS", None)
  probe = subprocess.run([sys.executable, "-c", "import clu"], env=env, capture_output=True)
  assert probe.returncode != 0  # the blocker works, so the run below proves something
  return env


@pytest.fixture(scope="module")
def tiny_run(blocked_env, tmp_path_factory):
  out = tmp_path_factory.mktemp("suite")
  proc = subprocess.run([sys.executable, "benchmarks/gpu_suite.py", "--size", "tiny",
                         "--out", str(out), "--budget_s", "1200"],
                        cwd=ROOT, env=blocked_env, capture_output=True, text=True, timeout=1500)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  with open(out / "gpu_suite.json") as f:
    return json.load(f), out, proc.stdout


def test_every_section_reports_at_toy_size_without_tensorflow_or_clu(tiny_run):
  result, out, stdout = tiny_run
  rows = result["rows"]
  failed = [r for r in rows if r.get("failed")]
  assert not failed, failed
  keys = {r.get("key") for r in rows}
  assert {"matmul_tflops", "jax_step_ms_auto", "jax_step_ms_xla", "attention_diff",
          "torch_step_ms_reference", "torch_step_ms_fast", "sample_teacher_end_to_end",
          "sample_generator_end_to_end", "sample_teacher_transformer", "speedup_end_to_end",
          "speedup_transformer", "inception_images_per_s", "meissonic_step_ms_1",
          "meissonic_step_ms_2"} <= keys
  for row in rows:
    if row.get("runs"):
      assert row["value"] > 0 and len(row["all"]) == row["runs"]
  # Timed figures come with their compile time and the command that made each.
  step = next(r for r in rows if r.get("key") == "jax_step_ms_auto")
  assert step["compile_s"] > 0 and step["command"].startswith(
      "python benchmarks/gpu_suite.py --section step")
  assert 0 < step["mfu"] < 1 and step["model_flops"] > 0 and step["pipelined_ms"] > 0
  # A fused kernel and the einsum one compute the same logits.
  assert next(r for r in rows if r.get("key") == "attention_diff")["value"] < 1e-2
  summary = result["summary"]
  assert summary["torch_over_jax"] > 0 and summary["one_step_speedup_end_to_end"] > 1
  assert [m["batch"] for m in summary["meissonic"]] == [1, 2]
  assert set(summary["targets"]) == {"jax_step_1.3x_faster_than_torch",
                                     "one_step_12x_faster_end_to_end"}


def test_the_table_and_log_come_back_under_out(tiny_run):
  result, out, stdout = tiny_run
  table = (out / "gpu_suite.md").read_text()
  assert "| JAX step, attention auto |" in table and "targets:" in table
  assert table.strip() in stdout  # the same table ends the printed output
  log = (out / "gpu_suite.log").read_text()
  for section in gpu_suite.SECTIONS:
    assert f"--section {section}" in log
  assert sorted(os.listdir(out)) == ["gpu_suite.json", "gpu_suite.log", "gpu_suite.md"]


def test_a_failing_section_is_a_row_and_the_meissonic_walk_stops_at_the_first_oom(
    monkeypatch, tmp_path):
  ran = []

  def fake(name, args, extra, timeout, log):
    ran.append((name, tuple(extra)))
    if name == "meissonic" and extra == ["--batch", "2"]:
      return [{"section": name, "figure": "meissonic --batch 2", "value": None, "unit": "",
               "failed": True, "oom": True, "note": "out of memory"}]
    return [{"section": name, "figure": name, "value": 1.0, "unit": "ms", "key": f"k_{name}"}]

  monkeypatch.setattr(gpu_suite, "run_section", fake)
  monkeypatch.setitem(gpu_suite.SIZES["tiny"], "meissonic_batches", (1, 2, 4))
  result = gpu_suite.main(["--size", "tiny", "--out", str(tmp_path), "--sections",
                           "matmul,meissonic"])
  assert ran == [("matmul", ()), ("meissonic", ("--batch", "1")),
                 ("meissonic", ("--batch", "2"))]  # batch 4 is never tried
  assert result["summary"]["meissonic_first_oom"] == "meissonic --batch 2"


def test_a_section_that_exits_reports_why(tmp_path):
  args = argparse.Namespace(out=str(tmp_path), size="tiny")
  with open(tmp_path / "log", "w") as log:
    rows = gpu_suite.run_section("meissonic", args, [], 120, log)
  assert rows[0]["failed"] and "needs --batch" in rows[0]["note"]


def test_the_model_flops_are_what_xla_counts():
  """The analytic count against XLA's cost analysis: a forward pass (XLA adds ~10% of
  elementwise work), and the step as that many passes (one auxiliary round: XLA counts a
  loop's body once)."""
  size = dict(gpu_suite.SIZES["tiny"], hidden=128, depth=2, heads=4, tokens=64, codes=256,
              batch=4)
  model = gpu_suite._maskgit(size, jnp.float32)
  teacher = teachers.of_module(model)
  variables = teacher.init_variables()
  tokens, labels = jnp.zeros((4, 64), jnp.int32), jnp.zeros((4,), jnp.int32)
  forward = gpu_suite.xla_flops(jax.jit(model.apply).lower(variables, tokens, labels).compile())
  ours = 4 * gpu_suite.maskgit_pass_flops(128, 2, 512, 64, 256)
  assert 1.0 <= forward / ours <= 1.15
  for overrides, passes in ((dict(), 10), (dict(true_cfg=1.0), 9)):
    config = gpu_suite._recipe(size)
    config.mixed_precision = "no"
    config.update(overrides)
    assert gpu_suite.dimo_step_passes(config) == passes
    state = distill.create_state(config, variables, jax.random.PRNGKey(1),
                                 teacher.frozen_with_emb)
    step = jax.jit(distill.make_train_step(config, teacher)).lower(state, variables).compile()
    assert 0.95 <= gpu_suite.xla_flops(step) / forward / passes <= 1.12


def test_the_shell_wrapper_runs_the_suite_into_out(blocked_env, tmp_path):
  env = dict(blocked_env, OUT=str(tmp_path / "out"), PYTHON=sys.executable)
  proc = subprocess.run(["bash", "benchmarks/gpu_suite.sh", "--size", "tiny", "--sections",
                         "matmul"], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert "| bf16 matmul 256^3 |" in (tmp_path / "out" / "gpu_suite.md").read_text()
