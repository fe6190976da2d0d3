"""dimo_jax/writers.py: TensorBoard events without TensorFlow (read back here), window means,
and orbax kept at WARNING."""

import glob
import logging
import os
import struct
import subprocess
import sys

import jax.numpy as jnp
import numpy as np

from dimo_jax import writers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read_events(folder):
  """Every Event proto of the TFRecord event files in `folder` (length, crc, data, crc)."""
  from tensorboardX.proto import event_pb2
  events = []
  for path in sorted(glob.glob(f"{folder}/**/events.out.tfevents.*", recursive=True)):
    with open(path, "rb") as f:
      data = f.read()
    offset = 0
    while offset < len(data):
      (length,) = struct.unpack("<Q", data[offset:offset + 8])
      event = event_pb2.Event()
      event.ParseFromString(data[offset + 12:offset + 12 + length])
      events.append(event)
      offset += 12 + length + 4
  return events


def scalars(events):
  return {(v.tag, e.step): v.simple_value for e in events for v in e.summary.value
          if v.HasField("simple_value")}


def test_scalars_images_and_hparams_reach_the_event_file(tmp_path):
  writer = writers.Writer(str(tmp_path), config={"lr": 0.1})
  writer.write_scalars(5, {"loss": 0.25, "steps_per_s": 3.0})
  writer.write_images(5, {"grid": np.zeros((1, 4, 6, 3), np.uint8)})
  writer.write_hparams({"generator_lr": 1e-4, "gan": {"weight": 1.0}, "writers": ("tensorboard",)},
                       {"final/fd": 0.5})
  writer.close()
  events = read_events(tmp_path)
  found = scalars(events)
  assert found[("loss", 5)] == 0.25 and found[("steps_per_s", 5)] == 3.0
  tags = {v.tag for e in events for v in e.summary.value}
  assert "grid" in tags
  assert any(v.metadata.plugin_data.plugin_name == "hparams" for e in events
             for v in e.summary.value)
  assert found[("final/fd", 0)] == 0.5


def test_a_run_imports_no_tensorflow():
  """The core install has no TensorFlow: training, evaluation and the writers import without
  it (tensorflow-datasets only when a tfds dataset is named)."""
  # main and evaluate each define --config: one process each.
  for modules in ("dimo_jax.main, dimo_jax.sample, dimo_jax.writers, dimo_jax.tokenize",
                  "dimo_jax.evaluate, dimo_jax.pretrain"):
    code = (f"import sys; import {modules}; "
            "bad = [m for m in ('tensorflow', 'tensorflow_datasets') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_window_mean_is_the_mean_of_the_window_and_restarts():
  window = writers.WindowMean()
  for value in (1.0, 2.0, 6.0):
    window.add({"loss": jnp.float32(value)})
  first = window.result()
  assert first["loss"] == 3.0 and first["steps_per_s"] > 0
  window.add({"loss": jnp.float32(10.0)})
  assert window.result()["loss"] == 10.0


def test_orbax_info_is_dropped_and_its_warnings_kept():
  writers.quiet_orbax()
  logger = logging.getLogger("absl")
  record = lambda level, path: logging.LogRecord("absl", level, path, 1, "m", None, None)
  assert not logger.filter(record(logging.INFO, "/x/site-packages/orbax/checkpoint/a.py"))
  assert logger.filter(record(logging.WARNING, "/x/site-packages/orbax/checkpoint/a.py"))
  assert logger.filter(record(logging.INFO, "/x/dimo_jax/train.py"))


ORPHAN_TASK = """
import asyncio, gc, sys
from absl import logging as absl_logging
from dimo_jax import writers
if sys.argv[1] == "quiet":
  writers.quiet_orbax()
async def read():  # a sibling read of a damaged checkpoint: fails, and nobody awaits it
  raise ValueError("OUT_OF_RANGE: byte range not valid")
async def main():
  asyncio.get_running_loop().create_task(read())
  await asyncio.sleep(0.01)
asyncio.run(main())
gc.collect()
print("error: the checkpoint step cannot be read", file=sys.stderr)
"""


def test_a_failed_sibling_read_prints_no_traceback_once_orbax_is_quiet():
  """The flake of the damaged-checkpoint CLI test: asyncio logs an unretrieved task's exception
  as a traceback when the task is collected, before the one-line error."""
  run = lambda mode: subprocess.run([sys.executable, "-c", ORPHAN_TASK, mode], cwd=REPO,
                                    capture_output=True, text=True, timeout=120).stderr
  assert "Task exception was never retrieved" in run("loud")  # the test can fail
  quiet = run("quiet")
  assert "Traceback" not in quiet and "never retrieved" not in quiet, quiet
  assert quiet.strip().endswith("error: the checkpoint step cannot be read")


def test_the_hyper_parameters_flatten_to_scalars_and_strings():
  flat = writers.flat_hparams({"a": 1, "b": {"c": 0.5, "d": (1, 2)}, "e": None})
  assert flat == {"a": 1, "b.c": 0.5, "b.d": "(1, 2)", "e": "None"}


def test_a_run_writes_window_means_a_profile_and_its_final_metrics(tmp_path):
  """A short run: TensorBoard holds the window means with steps/s and images/s, a jax.profiler
  trace is written for `profile_steps`, and no step-1 checkpoint is made."""
  from dimo_jax import train
  from tests.test_train import tiny_config, tiny_teacher
  teacher = tiny_teacher(str(tmp_path / "teacher"))
  workdir = tmp_path / "run"
  train.train_and_evaluate(tiny_config(teacher, max_train_steps=4, log_every=2,
                                       checkpointing_steps=4, checkpoints_total_limit=5,
                                       profile_steps=1,
                                       validation_metrics=False), str(workdir))
  found = scalars(read_events(workdir))
  assert {("loss_generator", 2), ("loss_generator", 4), ("steps_per_s", 4),
          ("images_per_s", 4)} <= set(found)
  assert found[("images_per_s", 4)] == found[("steps_per_s", 4)] * 8
  assert list((workdir / "profile").rglob("*.xplane.pb"))
  # orbax's initial-save policy used to add step 1
  assert sorted(os.listdir(workdir / "checkpoints")) == ["4", "config.json"]


def test_a_run_with_the_wandb_writer_logs_its_scalars_offline(tmp_path, monkeypatch):
  """`config.writers` with 'wandb': an offline wandb run (no network) under the workdir whose
  record file holds the window means and the final metrics the TensorBoard writer gets."""
  from tests.optional import need
  need("wandb")
  from dimo_jax import train
  from tests.test_train import tiny_config, tiny_teacher
  monkeypatch.setenv("WANDB_MODE", "offline")
  monkeypatch.setenv("WANDB_SILENT", "true")
  teacher = tiny_teacher(str(tmp_path / "teacher"))
  workdir = tmp_path / "run"
  train.train_and_evaluate(tiny_config(teacher, max_train_steps=2, log_every=2,
                                       writers=("tensorboard", "wandb"),
                                       validation_metrics=False), str(workdir))
  runs = glob.glob(str(workdir / "wandb" / "offline-run-*" / "*.wandb"))
  assert len(runs) == 1, os.listdir(workdir)
  with open(runs[0], "rb") as f:
    record = f.read()
  found = scalars(read_events(workdir))
  for key in ("loss_generator", "steps_per_s", "images_per_s"):
    assert key.encode() in record and (key, 2) in found
  assert f"{found[('loss_generator', 2)]:.6}"[:6].encode() in record
