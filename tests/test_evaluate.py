"""python -m dimo_jax.evaluate: sharded sampling, features, reference files, results on disk.

A tiny digits-shaped teacher with a random 17-code VQGAN (8x8 codes -> 16x16 pictures) stands
in for MaskGIT on ImageNet, and a two-layer network for the FID Inception network (the real
one, with random weights, is checked once, on a folder of images). The 8-device comparison
runs in a subprocess with 8 simulated CPU devices, as tests/test_fsdp.py does.
"""

import json
import os
import subprocess
import sys
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from absl import flags
from PIL import Image

from configs import digits
from dimo_jax import checkpoints, distill, evaluate, evaluators, parallel, teachers
from dimo_jax.metrics import reference
from tests.test_sample_cli import tiny_tokenizer
from tests.test_train import tiny_config, tiny_teacher

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class TinyFeatures(nn.Module):
  """images float32[B, H, W, 3] in [0, 1] -> (pool float32[B, 6], logits float32[B, 12])."""

  @nn.compact
  def __call__(self, images):
    x = nn.relu(nn.Conv(4, (3, 3), strides=2)(images * 2 - 1))
    pool = nn.Dense(6)(jnp.mean(x, axis=(1, 2)))
    return pool, nn.Dense(12)(nn.relu(pool))


def tiny_extractor():
  model = TinyFeatures()
  return types.SimpleNamespace(
      model=model, variables=model.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3))))


def tiny_features(images: np.ndarray) -> np.ndarray:
  """The stand-in's pool features of uint8 images, outside any of evaluate's code."""
  extractor = tiny_extractor()
  return np.asarray(extractor.model.apply(extractor.variables,
                                          jnp.asarray(images, jnp.float32) / 255.0)[0])


def image_config(dirs, **overrides):
  """The digits teacher scored as ImageNet is: decoded by a VQGAN, Inception-style metrics."""
  return tiny_config(dirs["teacher"], dataset="imagenet256", tokenizer_path=dirs["tokenizer"],
                     eval_batch_size=8, **overrides)


def write_checkpoint(workdir: str, config, teacher_path: str, step: int) -> None:
  """A Di[M]O checkpoint without training: the fresh state (generator = teacher) at `step`."""
  teacher = teachers.load(teacher_path)
  state = distill.create_state(config, teacher.variables, jax.random.PRNGKey(0),
                               distill.FROZEN_WITH_EMB)
  manager = checkpoints.manager(workdir, config)
  manager.save(step, args=ocp.args.StandardSave(state), force=True)
  manager.wait_until_finished()
  with open(os.path.join(workdir, "checkpoints", "config.json"), "w") as f:
    f.write(config.to_json())


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
  root = tmp_path_factory.mktemp("evaluate")
  dirs = {"teacher": tiny_teacher(str(root / "teacher")),
          "tokenizer": tiny_tokenizer(str(root / "tokenizer")), "run": str(root / "run")}
  write_checkpoint(dirs["run"], tiny_config(dirs["teacher"]), dirs["teacher"], step=3)
  # Real images for the reference: random colour blocks, 16x16.
  rng = np.random.default_rng(0)
  dirs["real"] = np.repeat(np.repeat(rng.integers(0, 256, (40, 4, 4, 3), dtype=np.uint8), 4, 1),
                           4, 2)
  return dirs


def reference_fid(x, mu, sigma) -> float:
  mu_x, s_x = x.mean(0), np.cov(np.asarray(x, np.float64), rowvar=False)
  values, vectors = np.linalg.eigh(s_x)
  root = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
  middle = np.linalg.eigvalsh(root @ sigma @ root)
  return float(np.sum((mu_x - mu) ** 2) + np.trace(s_x) + np.trace(sigma)
               - 2 * np.sum(np.sqrt(np.clip(middle, 0, None))))


def test_image_evaluation_scores_the_images_it_saves(dirs, tmp_path):
  mesh = parallel.make_mesh(1)
  ref = reference.image_features([dirs["real"][:25], dirs["real"][25:]], 40, tiny_extractor(),
                                mesh, batch_size=16, keep=30)
  assert ref["features"].shape == (30, 6) and int(ref["count"]) == 40
  np.testing.assert_allclose(ref["features"], tiny_features(dirs["real"])[:30], atol=1e-5)
  reference.write_reference(str(tmp_path / "ref.npz"), ref)

  workdir = str(tmp_path / "eval")
  result = evaluators.evaluate(image_config(dirs), workdir, checkpoint=dirs["run"],
                             num_samples=22, seed=1, extractor=tiny_extractor(),
                             reference=str(tmp_path / "ref.npz"), save_png=True, save_npz=True)
  assert result["step"] == 3 and result["steps"] == 1 and result["num_samples"] == 22
  with open(os.path.join(workdir, "eval_3.json")) as f:
    assert json.load(f) == json.loads(json.dumps(result))
  assert any(name.startswith("events.out.tfevents") for name in os.listdir(workdir))

  with np.load(os.path.join(workdir, "samples_3.npz")) as f:
    images, labels = f["arr_0"], f["arr_1"]
  assert images.shape == (22, 16, 16, 3) and images.dtype == np.uint8
  np.testing.assert_array_equal(labels, np.arange(22) % 10)  # class-balanced, in class order
  assert images.std() > 0 and not np.array_equal(images[0], images[1])
  pngs = sorted(os.listdir(os.path.join(workdir, "samples_3")))
  assert pngs == [f"{i:06d}.png" for i in range(22)]
  np.testing.assert_array_equal(
      np.asarray(Image.open(os.path.join(workdir, "samples_3", "000021.png"))), images[21])

  # The metrics are those of the saved images' features against the reference.
  scores = result["metrics"]
  assert sorted(scores) == ["coverage", "density", "fid", "is", "is_std", "precision", "recall"]
  features = tiny_features(images)
  np.testing.assert_allclose(scores["fid"], reference_fid(features, ref["mu"], ref["sigma"]),
                             rtol=1e-4)
  assert scores["fid"] > 0 and scores["is"] >= 1.0
  table = evaluators.table(result).splitlines()
  assert table[0] == "| sampler | steps | N | FID | IS | Prec. | Rec. | Dens. | Cov. |"
  assert table[2].startswith("| generator (ema) step 3, 1 step | 1 | 22 | ")


def test_adm_reference_batches_are_accepted(dirs, tmp_path):
  mesh = parallel.make_mesh(1)
  features = tiny_features(dirs["real"])
  # ADM's VIRTUAL_imagenet256_labeled.npz: images and their statistics, no features.
  np.savez(tmp_path / "adm.npz", arr_0=dirs["real"], mu=np.full(6, 7.0), sigma=np.eye(6))
  ref = reference.load_reference(str(tmp_path / "adm.npz"), tiny_extractor(), mesh, 16)
  np.testing.assert_array_equal(ref["mu"], np.full(6, 7.0))  # the file's own statistics win
  np.testing.assert_allclose(ref["features"], features, atol=1e-5)
  # Images alone: the statistics come from them too.
  np.savez(tmp_path / "images.npz", arr_0=dirs["real"])
  ref = reference.load_reference(str(tmp_path / "images.npz"), tiny_extractor(), mesh, 16)
  np.testing.assert_allclose(ref["mu"], features.mean(0), atol=1e-5)
  np.testing.assert_allclose(ref["sigma"], np.cov(features, rowvar=False), atol=1e-5)
  np.savez(tmp_path / "bad.npz", mean=np.zeros(6))
  with pytest.raises(ValueError, match=r"bad.npz: expected `mu` and `sigma` \(or `arr_0` "
                                       r"images\), found \['mean'\]"):
    reference.load_reference(str(tmp_path / "bad.npz"), tiny_extractor(), mesh, 16)


def test_image_datasets_need_the_network_and_a_reference(dirs, tmp_path):
  with pytest.raises(ValueError, match="pass --inception and --ref"):
    evaluators.evaluate(image_config(dirs), str(tmp_path), checkpoint=dirs["run"], num_samples=4)


def test_stats_command_on_a_folder(dirs, tmp_path, monkeypatch):
  folder = tmp_path / "images" / "sub"
  folder.mkdir(parents=True)
  for i, image in enumerate(dirs["real"][:9]):
    # 32x48: the short side goes to 16 by halving, then the centre 16x16 is kept.
    Image.fromarray(np.kron(image, np.ones((2, 3, 1), np.uint8))).save(folder / f"{i}.png")
  (folder / "notes.txt").write_text("not an image")
  monkeypatch.setattr(evaluate, "load_extractor", lambda path: tiny_extractor())
  out = str(tmp_path / "ref" / "stats.npz")
  try:
    flags.FLAGS(["evaluate", "--images", str(tmp_path / "images"), "--image_size", "16",
                 "--inception", "unused", "--keep_features", "-1", "--out", out])
    evaluate.main(["evaluate", "stats"])
  finally:
    flags.FLAGS.unparse_flags()
  with np.load(out) as f:
    stats = dict(f)
  crops = np.stack([reference.center_crop(Image.open(folder / f"{i}.png"), 16) for i in range(9)])
  assert crops.shape == (9, 16, 16, 3)
  features = tiny_features(crops)
  assert int(stats["count"]) == 9 and stats["features"].shape == (9, 6)
  np.testing.assert_allclose(stats["features"], features, atol=1e-5)
  np.testing.assert_allclose(stats["mu"], features.mean(0), atol=1e-5)


def test_stats_from_a_tfds_dataset(monkeypatch):
  """`--tfds name:split` through tensorflow-datasets' own mock of cifar10 (nothing downloaded)."""
  from tests.optional import need
  need("tensorflow_datasets", "tensorflow")
  import tensorflow_datasets as tfds
  with tfds.testing.mock_data(num_examples=5):
    count, batches = reference.tfds_batches("cifar10:test", 16, 2)
    got = np.concatenate(list(batches))
    images = [example["image"] for example in tfds.as_numpy(
        tfds.load("cifar10", split="test", shuffle_files=False))]
  assert count in (None, 5)
  expected = np.stack([reference.center_crop(Image.fromarray(x), 16) for x in images])
  assert got.shape == (5, 16, 16, 3) and got.dtype == np.uint8
  np.testing.assert_array_equal(got, expected)


def test_center_crop_keeps_the_middle():
  image = np.zeros((20, 40, 3), np.uint8)
  image[:, 10:30] = 255  # the middle 20 columns
  crop = reference.center_crop(Image.fromarray(image), 10)
  assert crop.shape == (10, 10, 3) and crop.min() == 255


def random_inception(model):
  """FIDInception variables drawn in numpy: He-normal kernels, identity batch norms.

  `model.init` would run the 299x299 network op by op (minutes on a busy CPU); only the
  shapes are taken from it.
  """
  rng = np.random.default_rng(0)

  def draw(path, leaf):
    name = jax.tree_util.keystr(path)
    if "kernel" in name:
      fan_in = int(np.prod(leaf.shape[:-1]))
      return rng.normal(0.0, np.sqrt(2.0 / fan_in), leaf.shape).astype(np.float32)
    fill = 1.0 if ("var" in name or "scale" in name) else 0.0
    return np.full(leaf.shape, fill, np.float32)

  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)))
  return jax.tree_util.tree_map_with_path(draw, shapes)


def test_fid_inception_features_with_random_weights():
  from dimo_jax.models import fid_inception
  model = fid_inception.FIDInception()
  extractor = fid_inception.FeatureExtractor(model, random_inception(model), {})
  images = np.random.default_rng(1).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
  stats = reference.image_features([images], 3, extractor, parallel.make_mesh(1), batch_size=3)
  features = stats["features"]
  assert features.shape == (3, fid_inception.POOL_DIM) and int(stats["count"]) == 3
  assert stats["sigma"].shape == (fid_inception.POOL_DIM,) * 2
  np.testing.assert_allclose(stats["mu"], features.astype(np.float64).mean(0), rtol=1e-6)
  np.testing.assert_allclose(stats["sigma"], np.cov(features.astype(np.float64), rowvar=False),
                             rtol=1e-6, atol=1e-9)
  # Distinct images, distinct features: the pictures reached the network.
  assert np.abs(features[0] - features[1]).max() > 1e-3 * np.abs(features).max() > 0


def test_toy_cli_writes_results_samples_and_the_table(dirs, tmp_path):
  workdir = str(tmp_path / "cli")
  cmd = [sys.executable, "-m", "dimo_jax.evaluate", "--config",
         os.path.join(REPO, "configs", "digits.py"), "--workdir", workdir,
         f"--config.teacher_path={dirs['teacher']}", "--config.eval_batch_size=8",
         "--teacher_steps=2", "--num_samples=12", "--save_npz", "--save_png"]
  out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert out.returncode == 0, out.stderr[-4000:]
  with open(os.path.join(workdir, "eval_teacher_2step.json")) as f:
    result = json.load(f)
  assert result["steps"] == 2 and result["step"] == 0
  assert sorted(result["metrics"]) == ["accuracy", "fd"]
  assert 0 <= result["metrics"]["accuracy"] <= 1 and result["metrics"]["fd"] > 0
  assert result["images_per_second"] > 0  # two batches: the second is timed
  assert "| sampler | steps | N | accuracy | fd |" in out.stdout
  assert "| teacher, 2 steps, cfg_w 0 | 2 | 12 |" in out.stdout
  with np.load(os.path.join(workdir, "samples_teacher_2step.npz")) as f:
    assert f["arr_0"].shape == (12, 8, 8, 3) and f["arr_0"].dtype == np.uint8
  assert len(os.listdir(os.path.join(workdir, "samples_teacher_2step"))) == 12


def test_the_generator_is_evaluated_at_each_gen_temp(dirs, tmp_path):
  config = digits.get_config()
  config.teacher_path, config.eval_batch_size = dirs["teacher"], 8
  results = {t: evaluators.evaluate(config, str(tmp_path), checkpoint=dirs["run"], num_samples=16,
                                  gen_temp=t) for t in (0.25, 4.0)}
  for t, result in results.items():
    assert f"gen_temp {t:g}" in result["sampler"]
    assert os.path.isfile(os.path.join(tmp_path, f"eval_{result['step']}_T{t:g}.json"))
  assert results[0.25]["metrics"] != results[4.0]["metrics"]
  with pytest.raises(ValueError, match="gen_temp"):
    evaluators.evaluate(config, str(tmp_path), checkpoint=dirs["run"], num_samples=4, gen_temp=0.0)


def _child(teacher_path: str, tokenizer_path: str, run: str) -> None:
  """Body of the 8-device subprocess: the same samples and features on every mesh."""
  from dimo_jax import data
  assert jax.device_count() == 8, jax.devices()
  config = image_config({"teacher": teacher_path, "tokenizer": tokenizer_path})
  teacher = teachers.load(teacher_path)
  tokenizer = data.get(config).tokenizer
  labels = np.arange(20, dtype=np.int32) % 10
  outs = {}
  for name, devices in (("one", 1), ("eight", 8)):
    mesh = parallel.make_mesh(devices)
    sampler = evaluators.generator_sampler(run, teacher, "ema")
    outs[name] = evaluators.generate(sampler, labels, mesh, 8, seed=3, tokenizer=tokenizer,
                                   extractor=tiny_extractor())
  report = {name: {"codes_equal": bool(np.array_equal(out["codes"], outs["one"]["codes"])),
                   "pool": float(np.max(np.abs(out["pool"] - outs["one"]["pool"]))),
                   "logits": float(np.max(np.abs(out["logits"] - outs["one"]["logits"])))}
            for name, out in outs.items()}
  report["distinct"] = len({row.tobytes() for row in outs["one"]["codes"]})
  print("REPORT", json.dumps(report))


def _eight_device_report(call: str) -> dict:
  """The JSON a `test_evaluate.<call>` child prints after "REPORT ", run in a process with 8
  simulated CPU devices."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  script = (f"import sys; sys.path.insert(0, {REPO!r}); from tests import test_evaluate; "
            f"test_evaluate.{call}")
  out = subprocess.run([sys.executable, "-c", script], env=env, cwd=REPO, capture_output=True,
                       text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-4000:]
  line = [l for l in out.stdout.splitlines() if l.startswith("REPORT ")][-1]
  return json.loads(line[len("REPORT "):])


def test_eight_devices_give_the_features_of_one(dirs):
  report = _eight_device_report(
      f"_child({dirs['teacher']!r}, {dirs['tokenizer']!r}, {dirs['run']!r})")
  assert report.pop("distinct") == 20  # the samples differ from one another
  for name, values in report.items():
    assert values["codes_equal"], name
    assert values["pool"] < 1e-5 and values["logits"] < 1e-5, (name, values)


def test_over_seeds_is_the_mean_and_spread_of_each_metric():
  from dimo_jax import metrics
  out = metrics.over_seeds([{"fd": 0.4, "accuracy": 1.0}, {"fd": 0.6, "accuracy": 0.9}])
  assert out["fd"] == pytest.approx(0.5) and out["fd_std"] == pytest.approx(0.1)
  assert out["accuracy"] == pytest.approx(0.95) and out["seeds"] == 2


def test_evaluate_seeds_flag_reports_the_mean_over_seeds(dirs, tmp_path, capsys, monkeypatch):
  from dimo_jax import data, metrics
  config_file = tmp_path / "config.py"
  config_file.write_text(
      "from tests.test_train import tiny_config\n"
      f"def get_config():\n  return tiny_config({dirs['teacher']!r})\n")
  monkeypatch.syspath_prepend(REPO)
  seen = []
  real_generate = evaluators.generate

  def spy(sampler, labels, mesh, batch_size, seed, *args, **kwargs):
    out = real_generate(sampler, labels, mesh, batch_size, seed, *args, **kwargs)
    seen.append((seed, metrics.scorer(data.Digits())(out["codes"], labels)["fd"]))
    return out

  monkeypatch.setattr(evaluators, "generate", spy)
  workdir = str(tmp_path / "eval")
  try:
    flags.FLAGS(["evaluate", f"--config={config_file}", f"--workdir={workdir}",
                 f"--checkpoint={dirs['run']}", "--num_samples=20", "--seed=7", "--seeds=3"])
    evaluate.main(["evaluate"])
  finally:
    flags.FLAGS.unparse_flags()
  assert [seed for seed, _ in seen] == [7, 8, 9]
  fds = np.array([fd for _, fd in seen])
  assert len(set(fds.tolist())) > 1  # the seeds draw other samples
  with open(os.path.join(workdir, "eval_3.json")) as f:
    saved = json.load(f)
  assert saved["seed"] == [7, 8, 9] and saved["metrics"]["seeds"] == 3
  assert saved["metrics"]["fd"] == pytest.approx(fds.mean())
  assert saved["metrics"]["fd_std"] == pytest.approx(fds.std())
  assert f"{fds.mean():.4g} ± " in capsys.readouterr().out


def _fid_child(teacher_path: str, tokenizer_path: str, run: str, workdir: str) -> None:
  """Body of the 8-device subprocess: `evaluate` and the run's evaluator registry score the
  same checkpoint to the same FID."""
  assert jax.device_count() == 8, jax.devices()
  dirs = {"teacher": teacher_path, "tokenizer": tokenizer_path}
  print("REPORT", json.dumps(_fid_both(dirs, run, workdir)))


def _fid_both(dirs, run: str, workdir: str) -> dict:
  """{"evaluate": FID of evaluate.evaluate, "registry": FID of evaluators.RunEvaluation} of the
  checkpoint `run` (22 samples, the run's final-evaluation seed, all devices)."""
  from dimo_jax import data, evaluators
  rng = np.random.default_rng(0)
  real = np.repeat(np.repeat(rng.integers(0, 256, (40, 4, 4, 3), dtype=np.uint8), 4, 1), 4, 2)
  config = image_config(dirs)
  mesh = parallel.make_mesh(config.num_devices)
  ref = os.path.join(workdir, "ref.npz")
  reference.write_reference(ref, reference.image_features([real], 40, tiny_extractor(), mesh,
                                                          batch_size=16, keep=30))
  result = evaluators.evaluate(config, os.path.join(workdir, "eval"), checkpoint=run,
                             num_samples=22, extractor=tiny_extractor(), reference=ref)
  teacher = teachers.load(dirs["teacher"])
  params, _, step = checkpoints.load_generator(run, teacher, "ema")
  entry = evaluators.spec(type="fid", every=1, num_samples=22, ref=ref, inception_path="-")
  evaluation = evaluators.RunEvaluation("fid", entry, config, teacher, data.get(config, teacher),
                                        mesh, params, extractor=tiny_extractor())
  scores = evaluation(params, step)
  return {"evaluate": result["metrics"]["fid"], "registry": scores["fid"],
          "is": [result["metrics"]["is"], scores["is"]], "devices": jax.device_count()}


def test_the_run_evaluator_gives_the_fid_of_evaluate(dirs, tmp_path):
  both = _fid_both(dirs, dirs["run"], str(tmp_path))
  assert both["evaluate"] > 0
  np.testing.assert_allclose(both["registry"], both["evaluate"], rtol=1e-6)
  np.testing.assert_allclose(*both["is"], rtol=1e-6)


def test_on_eight_devices_the_run_evaluator_gives_the_fid_of_evaluate(dirs, tmp_path):
  both = _eight_device_report(f"_fid_child({dirs['teacher']!r}, {dirs['tokenizer']!r}, "
                              f"{dirs['run']!r}, {str(tmp_path)!r})")
  assert both["devices"] == 8 and both["evaluate"] > 0
  np.testing.assert_allclose(both["registry"], both["evaluate"], rtol=1e-6)


def test_a_run_scores_its_evaluations_on_schedule_into_tensorboard(dirs, tmp_path):
  from dimo_jax import evaluators, train
  from tests.test_writers import read_events, scalars
  config = tiny_config(dirs["teacher"], max_train_steps=4, validation_steps=100,
                       validation_metrics=False)
  config.evals = {"digits": evaluators.spec(type="dataset", every=3, at=(2,), num_samples=20)}
  train.train_and_evaluate(config, str(tmp_path))
  values = scalars(read_events(str(tmp_path)))
  assert sorted(step for tag, step in values if tag == "eval/digits/fd") == [2, 3]
  assert all(np.isfinite(v) for (tag, _), v in values.items() if tag.startswith("eval/"))


@pytest.mark.parametrize("entry, message", [
    (dict(type="kid"), "evals.x.type must be one of 'fid', 'clip', 'dataset'"),
    (dict(type="fid", every=100), "evals.x: type 'fid' scores the datasets 'imagenet256', "
                                  "'prompts', not 'digits'"),
    (dict(type="dataset", every=-1), "evals.x.every must be an integer >= 0"),
    (dict(type="dataset", at=(0,)), "evals.x.at must be a tuple of steps > 0"),
    (dict(type="dataset", num_samples=0), "evals.x.num_samples must be an integer >= 1"),
])
def test_every_evaluation_value_is_checked_up_front(entry, message):
  from dimo_jax import config_check, evaluators
  config = digits.get_config()
  config.evals = {"x": evaluators.spec(**entry)}
  with pytest.raises(config_check.ConfigError, match=message.replace("(", r"\(")):
    config_check.check(config)


def test_the_imagenet_recipe_scores_fid_as_the_reference_does():
  from configs import maskgit_imagenet256
  from dimo_jax import config_check
  config = maskgit_imagenet256.get_config()
  fid = config.evals.fid
  assert (fid.type, fid.every, tuple(fid.at), fid.num_samples, fid.gen_temp) == (
      "fid", 2000, (2000, 5000), 5000, 7.0)
  config_check.check(config)
  config.evals.fid.ref = ""
  with pytest.raises(config_check.ConfigError, match="needs evals.fid.ref"):
    config_check.check(config)
