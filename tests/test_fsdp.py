"""Parameter sharding: data x fsdp meshes train as one device does, and fsdp splits the bytes.

The meshes need 8 devices, so the work runs in a subprocess with 8 simulated CPU devices (as
tests/test_train.py does); `_child` is that subprocess's body and prints one JSON line.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from dimo_jax import checkpoints, parallel
from tests.test_train import tiny_teacher

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# name: (num_devices, data, fsdp)
MESHES = {"one": (1, -1, 1), "data8": (8, 8, 1), "data2_fsdp4": (8, 2, 4),
          "fsdp8": (8, 1, -1)}


def device0_share(tree, min_size: int = parallel.MIN_SHARD_SIZE) -> float:
  """Bytes device 0 holds of the big leaves, over their total bytes.

  Big: >= `min_size` elements with an axis that 8 divides, the leaves the sharding rule can
  split on every mesh here (the tiny teacher's (65, 29) output bias cannot be, and stays whole).
  """
  big = [x for x in jax.tree_util.tree_leaves(tree)
         if x.size >= min_size and any(n % 8 == 0 for n in x.shape)]
  device0 = jax.devices()[0]
  held = sum(s.data.nbytes for x in big for s in x.addressable_shards if s.device == device0)
  return held / sum(x.nbytes for x in big)


def _child(teacher_path: str, workdir: str) -> None:
  from dimo_jax import teachers, train
  sys.path.insert(0, os.path.join(REPO, "tests"))
  from test_train import recipe_steps, tiny_config
  assert jax.device_count() == 8, jax.devices()
  teacher = teachers.load(teacher_path)
  config = tiny_config(teacher_path, train_batch_size=16)
  finals, report = {}, {"shares": {}, "restored": {}}
  for name, (devices, data, fsdp) in MESHES.items():
    mesh = parallel.make_mesh(devices, data, fsdp)
    params = parallel.shard_params(teacher.variables, mesh)
    manager = checkpoints.manager(os.path.join(workdir, name), config)
    state = train.initial_state(config, teacher, params, mesh, manager)
    state = recipe_steps(config, teacher, mesh, state, params, 3)  # configs/digits.py's feed
    report["shares"][name] = {"state": device0_share(state), "teacher": device0_share(params)}
    finals[name] = jax.device_get((state.gen_params, state.fake_params, state.ema_params))
    # A checkpoint comes back in the layout the run uses, and equal.
    manager.save(3, args=train.ocp.args.StandardSave(state), force=True)
    manager.wait_until_finished()
    restored = train.initial_state(config, teacher, params, mesh, manager)
    same_place = jax.tree_util.tree_map(
        lambda a, b: a.sharding.is_equivalent_to(b.sharding, a.ndim), state, restored)
    same_value = jax.tree_util.tree_map(
        lambda a, b: bool(np.array_equal(a, b)), state, restored)
    report["restored"][name] = all(jax.tree_util.tree_leaves((same_place, same_value)))
  diff = lambda a, b: max(jax.tree_util.tree_leaves(
      jax.tree_util.tree_map(lambda x, y: float(np.max(np.abs(x - y))), a, b)))
  report["maxdiff"] = {name: diff(finals[name], finals["one"]) for name in MESHES}
  report["moved"] = diff(finals["one"][0], teacher.variables)
  print("REPORT", json.dumps(report))


@pytest.fixture(scope="module")
def report(tmp_path_factory):
  # Widths (32, 64, 96) that divide by 4 and by 8.
  teacher = tiny_teacher(str(tmp_path_factory.mktemp("teacher") / "digits"),
                         hidden_dim=32, num_heads=4, mlp_dim=64)
  workdir = str(tmp_path_factory.mktemp("runs"))
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  script = (f"import sys; sys.path.insert(0, {REPO!r}); from tests import test_fsdp; "
            f"test_fsdp._child({teacher!r}, {workdir!r})")
  out = subprocess.run([sys.executable, "-c", script], env=env, cwd=REPO, capture_output=True,
                       text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-4000:]
  line = [l for l in out.stdout.splitlines() if l.startswith("REPORT ")][-1]
  return json.loads(line[len("REPORT "):])


def test_every_mesh_trains_as_one_device(report):
  assert report["moved"] > 1e-4  # the steps did something ...
  for name, value in report["maxdiff"].items():
    assert value < 1e-5, (name, value)  # ... and the same on every mesh


def test_fsdp_splits_the_parameter_bytes(report):
  shares = report["shares"]
  for name in ("one", "data8"):
    assert shares[name]["state"] == shares[name]["teacher"] == 1.0
  for what in ("state", "teacher"):
    assert shares["data2_fsdp4"][what] < 0.3, shares
    assert shares["fsdp8"][what] < 0.15, shares  # 1/4 and 1/8 exactly


def test_checkpoints_restore_into_the_sharded_layout(report):
  assert all(report["restored"].values()), report["restored"]


def test_mesh_shapes_and_errors():
  # One host device here: the shapes that fit it, and the errors for those that do not.
  assert dict(parallel.make_mesh(1, -1, 1).shape) == {"data": 1, "fsdp": 1}
  assert dict(parallel.make_mesh(1, 1, -1).shape) == {"data": 1, "fsdp": 1}
  with pytest.raises(ValueError, match="at most one of mesh.data and mesh.fsdp may be -1"):
    parallel.make_mesh(1, -1, -1)
  with pytest.raises(ValueError, match=r"a mesh of data=1 x fsdp=2 does not fit the 1 devices"):
    parallel.make_mesh(1, 1, 2)
  with pytest.raises(ValueError, match="mesh.fsdp must be positive or -1"):
    parallel.make_mesh(1, 1, 0)
  with pytest.raises(ValueError, match=r"the global batch 6 does not split over the 4 devices "
                                       r"of the mesh \(data=2 x fsdp=2\)"):
    parallel.batch_constraint(_TwoByTwo(), 6)


class _TwoByTwo:
  """Stands in for a 2 x 2 mesh: the batch check reads only the axis sizes."""
  shape = {"data": 2, "fsdp": 2}


def test_leaf_spec_picks_the_largest_divisible_axis():
  P = jax.sharding.PartitionSpec
  assert parallel.leaf_spec((32, 96), 4) == P(None, "fsdp")
  assert parallel.leaf_spec((65, 32), 8) == P(None, "fsdp")  # 65 does not divide
  assert parallel.leaf_spec((64, 64), 4) == P("fsdp")  # a tie: the first axis
  assert parallel.leaf_spec((65, 29), 4) == P()  # nothing divides
  assert parallel.leaf_spec((96,), 4) == P()  # too small to be worth it
  assert parallel.leaf_spec((32, 96), 1) == P()
