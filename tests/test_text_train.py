"""configs/meissonic_1024.py, and a text-to-image Di[M]O run from a converted tiny release."""

import os

import jax
import numpy as np
import pytest

from configs import meissonic_1024
from dimo_jax import checkpoints, train
from dimo_jax.convert import meissonic
from dimo_jax.models.meissonic import MeissonicTransformer
from tests.test_text_to_image import RESOLUTION, V, _write_snapshot

# Issue #4's list: the reference configs/DIMO_Meissonic.yaml and train_DIMO_Meissonic.py.
RECIPE = {
    "generator_lr": 1e-6, "fake_lr": 1e-6, "fixed_ratio": "fix_0.5",
    "noise_emb_perturb": "fix_0.3", "distil_loss_type": "Jeffreys_0.", "ratio_mode": "cosine",
    "ratio_mode_fake": "cosine", "true_cfg": 4.0, "distil_neg_prompt": True,
    "micro_conds": (1024.0, 1024.0, 0.0, 0.0, 6.0), "ema_decay": 0.9999,
    "mixed_precision": "bf16", "gradient_checkpointing": True, "per_device_batch": 4,
    "max_train_steps": 20000, "lr_warmup_steps": 100, "max_grad_norm": 1.0,
    "loss_reduction": "sum", "fix_emb_layer": True, "mask_value": 8255, "dataset": "prompts",
    # The teacher in its own dtype (cast_models_to_dtype: false) and in eval mode; Adam eps 1e-6.
    "teacher_dtype": "fp32", "teacher_dropout": False, "adam_epsilon": 1e-6,
    "fake_max_grad_norm": 0.0,
}


def test_the_config_is_the_reference_recipe():
  config = meissonic_1024.get_config()
  assert {key: config[key] for key in RECIPE} == RECIPE
  assert config.negative_prompt.startswith("worst quality, low quality, low res, blurry")
  # 1024 x 1024 pictures: 64 x 64 tokens over 8192 codes, the release's mask id 8255.
  release = MeissonicTransformer()
  assert (release.codebook_size, release.mask_id) == (8192, 8255)
  assert config.micro_conds[:2] == (1024.0, 1024.0)


def test_the_soft_dimo_recipe_is_the_dimo_recipe_plus_the_clip_reward():
  from configs import soft_dimo_meissonic_1024
  from dimo_jax import config_check
  soft = soft_dimo_meissonic_1024.get_config()
  config_check.check(soft)
  own = ("optimizer_type", "adam_weight_decay")
  assert {key: soft[key] for key in RECIPE if key not in own} == {
      key: value for key, value in RECIPE.items() if key not in own}
  assert (soft.reward.kind, soft.reward.weight > 0, soft.gan.weight > 0) == ("clip", True, True)
  assert soft.gan.real_tokens and soft.gan.r_max == 0.95
  assert (soft.optimizer_type, soft.adam_weight_decay) == ("adamw", 0.01)
  soft.reward.clip_path = ""
  with pytest.raises(config_check.ConfigError, match="needs reward.clip_path"):
    config_check.check(soft)


@pytest.fixture(scope="module")
def teacher_path(tmp_path_factory):
  root = tmp_path_factory.mktemp("meissonic")
  _write_snapshot(str(root / "release"))
  meissonic.convert(str(root / "release"), str(root / "converted"), resolution=RESOLUTION)
  return str(root / "converted")


def tiny_config(teacher_path, workdir, **overrides):
  c = meissonic_1024.get_config()
  with open(os.path.join(workdir, "prompts.txt"), "w") as f:
    f.write("a red ball\n\na blue cube on a table\na boat\nthe sea at night\n")
  c.teacher_path = teacher_path
  c.prompts.file = os.path.join(workdir, "prompts.txt")
  c.prompt_cache = os.path.join(workdir, "prompt_embeddings.npz")
  c.mask_value = V
  c.per_device_batch = -1
  c.train_batch_size = 4
  c.max_train_steps = 2
  c.generator_lr = c.fake_lr = 1e-3
  c.lr_warmup_steps = 0
  c.log_every = 1
  c.validation_steps = 2
  c.checkpointing_steps = 2
  c.sampling_step = 2
  c.grid_classes = (0, 1)
  c.final_eval = True
  c.update(overrides)
  return c


def test_a_text_run_trains_samples_and_checkpoints(teacher_path, tmp_path):
  workdir = str(tmp_path)
  config = tiny_config(teacher_path, workdir)
  metrics = train.train_and_evaluate(config, workdir)
  assert sorted(metrics) == ["generator_1step", "teacher_1step", "teacher_2step"]
  assert all(m["sec_per_image"] > 0 for m in metrics.values())
  for name in ("samples/ema_step000002.png", "samples/comparison.png", "prompt_embeddings.npz",
               "metrics.json"):
    assert os.path.isfile(os.path.join(workdir, name)), name
  step, state = restore(workdir, config)
  assert step == 2
  moved = jax.tree_util.tree_map(lambda a, b: float(np.max(np.abs(a - b))),
                                 state["gen_params"], state["ema_params"])
  assert max(jax.tree_util.tree_leaves(moved)) > 0  # the generator trained, the EMA lags it
  assert max(jax.tree_util.tree_leaves(jax.tree_util.tree_map(
      lambda a, b: float(np.max(np.abs(a - b))), state["gen_params"]["params"]["embed"],
      state["ema_params"]["params"]["embed"]))) == 0  # fix_emb_layer: embed frozen


def restore(workdir, config):
  """The latest checkpoint as a plain tree (no abstract state needed)."""
  manager = checkpoints.manager(workdir, config)
  step = manager.latest_step()
  return step, manager.restore(step)


def test_fed_conditions_are_split_over_the_batch_axis(teacher_path, tmp_path):
  from dimo_jax import data, parallel
  config = tiny_config(teacher_path, str(tmp_path))
  dataset = data.get(config)
  mesh = parallel.make_mesh(1)
  indices = dataset.train_conditions(5, 4, 2)
  placed = train.place_conditions(dataset.conditions, indices, mesh)
  expected = {name: dataset.condition(idx) for name, idx in indices.items()}
  for name in ("generator", "auxiliary"):
    for key, value in expected[name].items():
      np.testing.assert_array_equal(np.asarray(placed[name][key]), value)
  assert placed["auxiliary"]["hidden"].shape[:2] == (2, 4)
  assert dataset.num_classes == 4  # the blank line is not a prompt
  # The empty prompt is what a dropped condition becomes, the negative prompt the teacher's.
  cond = dataset.condition(np.array([0]))
  assert not np.allclose(cond["uncond_hidden"], cond["neg_hidden"])
  assert jax.tree_util.tree_all(jax.tree_util.tree_map(
      lambda x: x.shape[0] == 1, cond))


def _caption_folder(root, count=5):
  """An img2dataset-style folder: photo.png beside photo.txt, RESOLUTION pixels."""
  from PIL import Image
  rng = np.random.default_rng(0)
  os.makedirs(root)
  captions = [f"a picture number {i}" for i in range(count)]
  for i, caption in enumerate(captions):
    Image.fromarray(rng.integers(0, 256, (RESOLUTION, RESOLUTION, 3), dtype=np.uint8)).save(
        os.path.join(root, f"{i:03d}.png"))
    with open(os.path.join(root, f"{i:03d}.txt"), "w") as f:
      f.write(caption + "\n")
  return captions


def test_image_caption_pairs_are_a_text_runs_real_data(teacher_path, tmp_path):
  """tokenize --captions stores each image's caption; the GAN's real rows of a Meissonic run
  are those tokens conditioned on their captions' encodings, and a run with the GAN trains."""
  from dimo_jax import data, teachers, tokenize
  from dimo_jax.data import prompts
  captions = _caption_folder(str(tmp_path / "images"))
  out = str(tmp_path / "tokens")
  tokenize.tokenize(teacher_path, out, images=str(tmp_path / "images"), image_size=RESOLUTION,
                    captions=True, shard_size=2)
  shards = tokenize.TokenShards(out)
  assert shards.captions([0, 1, 2]) == captions

  workdir = str(tmp_path / "run")
  os.makedirs(workdir)
  config = tiny_config(teacher_path, workdir, max_train_steps=2, final_eval=False)
  config.gan.update(weight=1.0, real_tokens=out)
  dataset = data.get(config)
  tokens, index, condition = dataset.real_data(1, 2)  # shard 1: images 2 and 3
  np.testing.assert_array_equal(tokens, shards.load([1])[0])
  cond = condition(np.array([[1, 0]]))
  teacher = teachers.load(teacher_path)
  own = prompts.encode_prompts((teacher.text.encoder, teacher.text.variables),
                               teacher.text.tokenizer, [captions[3], captions[2]])
  np.testing.assert_allclose(cond["hidden"][0], own.hidden, atol=1e-5)
  assert cond["hidden"].shape[:2] == (1, 2)
  np.testing.assert_allclose(cond["uncond_hidden"][0, 0],
                             dataset.condition(np.array([0]))["uncond_hidden"][0], atol=1e-5)

  train.train_and_evaluate(config, workdir)
  _, state = restore(workdir, config)
  assert state["disc_params"] is not None

  config.gan.real_tokens = ""
  from dimo_jax import config_check
  with pytest.raises(config_check.ConfigError, match="on prompts needs gan.real_tokens"):
    config_check.check(config)


def test_a_missing_caption_is_named(teacher_path, tmp_path, capsys):
  from dimo_jax import tokenize
  _caption_folder(str(tmp_path / "images"), count=2)
  os.remove(tmp_path / "images" / "001.txt")
  with pytest.raises(SystemExit):
    tokenize.main(["--tokenizer", teacher_path, "--images", str(tmp_path / "images"),
                   "--captions", "--image_size", str(RESOLUTION), "--out", str(tmp_path / "t")])
  err = capsys.readouterr().err
  assert f"001.png has no caption file {tmp_path / 'images' / '001.txt'}" in err
