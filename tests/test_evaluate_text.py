"""python -m dimo_jax.evaluate on a text-to-image run: CLIP score over a prompt set.

A tiny random Meissonic release (8x8 codes, a 16x16-pixel VQ-VAE) converted as a user converts
the real one, a tiny random CLIPModel converted with `python -m dimo_jax.convert clip`, and a
Di[M]O checkpoint written by hand (its EMA a perturbed copy of the teacher). The reported CLIP
score is recomputed from the saved PNGs and prompts by transformers' own CLIPModel, tokenizer
and image processor; the saved samples are recomputed with the teacher's own decode rule and the
one-step generator sampler called directly, and decoded outside evaluate.
The command line runs in a process with 8 simulated CPU devices (as tests/test_evaluate.py
does) and must give the one-device samples.
"""

from tests.optional import need

need("torch", "transformers")

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import torch
import transformers
from PIL import Image

from dimo_jax import checkpoints, distill, evaluators, samplers, teachers, tokenizers, train
from dimo_jax.convert import clip as convert_clip
from dimo_jax.convert import meissonic
from dimo_jax.teachers import meissonic as meissonic_teacher
from tests.test_clip import TOWER, _randomize, _write_tokenizer
from tests.test_text_to_image import RESOLUTION, _write_snapshot
from tests.test_text_train import tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["a red ball", "a blue cube on a table", "a boat", "the sea at night"]  # tiny_config's
# The CLIP vision tower sees the 16x16 samples at their own size, so transformers' image
# processor does no resampling that could differ from ours.
VISION = dict(TOWER, image_size=RESOLUTION, patch_size=8, hidden_act="gelu")
CHECKPOINT_STEP = 3


def write_clip(root: str):
  """A tiny random CLIPModel folder (with its tokenizer) and its converted model directory;
  returns (folder, directory, the float64 torch model)."""
  src, dst = os.path.join(root, "release"), os.path.join(root, "converted")
  vocab_size = _write_tokenizer(src, meissonic_style=False)
  text_config = dict(TOWER, vocab_size=vocab_size, max_position_embeddings=77,
                     hidden_act="quick_gelu", bos_token_id=vocab_size - 2,
                     eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1)
  model = transformers.CLIPModel(transformers.CLIPConfig(
      text_config=text_config, vision_config=VISION, projection_dim=24)).eval()
  _randomize(model, seed=7)
  model.save_pretrained(src)
  convert_clip.convert(src, dst)
  return src, dst, model.double()


def write_checkpoint(workdir: str, config, teacher) -> dict:
  """A Di[M]O checkpoint at CHECKPOINT_STEP without training: the fresh state with its EMA
  moved off the teacher. Returns the EMA parameters."""
  state = distill.create_state(config, teacher.variables, jax.random.PRNGKey(0),
                               teacher.frozen_with_emb)
  leaves, tree = jax.tree_util.tree_flatten(state.ema_params)
  keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
  ema = jax.tree_util.tree_unflatten(tree, [
      leaf + 0.05 * jax.random.normal(key, leaf.shape) for leaf, key in zip(leaves, keys)])
  manager = checkpoints.manager(workdir, config)
  manager.save(CHECKPOINT_STEP, args=ocp.args.StandardSave(state.replace(ema_params=ema)),
               force=True)
  manager.wait_until_finished()
  with open(os.path.join(workdir, "checkpoints", "config.json"), "w") as f:
    f.write(config.to_json())
  return ema


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
  root = tmp_path_factory.mktemp("evaluate_text")
  _write_snapshot(str(root / "release"))
  teacher_path = str(root / "teacher")
  meissonic.convert(str(root / "release"), teacher_path, resolution=RESOLUTION)
  clip_src, clip_dst, clip_reference = write_clip(str(root / "clip"))
  run = str(root / "run")
  os.makedirs(run)
  # The release's micro-conds at this resolution, as meissonic.prompt_condition builds them.
  config = tiny_config(teacher_path, run, mixed_precision="no", eval_batch_size=8,
                       micro_conds=(float(RESOLUTION), float(RESOLUTION), 0.0, 0.0, 6.0))
  teacher = teachers.load(teacher_path)
  ema = write_checkpoint(run, config, teacher)
  return {"teacher": teacher_path, "run": run, "config": config, "ema": ema,
          "text_teacher": teacher, "clip_src": clip_src, "clip": clip_dst,
          "clip_reference": clip_reference}


def reference_clip_scores(clip_src: str, model, images: list, prompts: list) -> np.ndarray:
  """100 * max(cos, 0) per (image, prompt) by transformers alone."""
  processor = transformers.CLIPImageProcessorPil(
      size={"shortest_edge": RESOLUTION}, crop_size={"height": RESOLUTION, "width": RESOLUTION})
  pixels = processor(images=images, return_tensors="np")["pixel_values"]
  ids = transformers.CLIPTokenizer.from_pretrained(clip_src)(
      prompts, padding="max_length", truncation=True, max_length=77).input_ids
  with torch.no_grad():
    text = model.get_text_features(torch.tensor(ids)).pooler_output.numpy()
    image = model.get_image_features(torch.from_numpy(pixels).double()).pooler_output.numpy()
  cos = (text * image).sum(-1) / np.linalg.norm(text, axis=-1) / np.linalg.norm(image, axis=-1)
  return 100 * np.maximum(cos, 0)


def decoded(teacher_path: str, codes) -> np.ndarray:
  """uint8 pictures of codes int[B, 64], decoded by the release's VQ-VAE outside evaluate."""
  images = tokenizers.load(teacher_path).decode(jnp.asarray(codes).reshape(-1, 8, 8))
  return np.round(np.clip(np.asarray(images), 0, 1) * 255).astype(np.uint8)


def read_samples(workdir: str, tag: str):
  """(images uint8[N, H, W, 3], arr_1, prompts) of a --save_npz evaluation."""
  with np.load(os.path.join(workdir, f"samples_{tag}.npz")) as f:
    images, indices = f["arr_0"], f["arr_1"]
  with open(os.path.join(workdir, f"samples_{tag}_prompts.txt"), encoding="utf-8") as f:
    return images, indices, f.read().splitlines()


@pytest.fixture(scope="module")
def generator_eval(dirs, tmp_path_factory):
  """The generator evaluated on one device: 6 samples over the 4 prompts, one padded batch."""
  workdir = str(tmp_path_factory.mktemp("generator_eval"))
  result = evaluators.evaluate(dirs["config"], workdir, checkpoint=dirs["run"], num_samples=6,
                             seed=1, clip=convert_clip.load_clip(dirs["clip"]), save_png=True,
                             save_npz=True)
  return workdir, result


def test_clip_score_is_that_of_the_saved_images_and_prompts(dirs, generator_eval):
  workdir, result = generator_eval
  tag = str(CHECKPOINT_STEP)
  assert result["step"] == CHECKPOINT_STEP and result["steps"] == 1
  assert result["num_samples"] == 6 and result["num_prompts"] == 4
  assert result["prompts"] == dirs["config"].prompts.file
  assert sorted(result["metrics"]) == ["clip_score"]
  with open(os.path.join(workdir, f"eval_{tag}.json")) as f:
    assert json.load(f) == json.loads(json.dumps(result))
  assert any(name.startswith("events.out.tfevents") for name in os.listdir(workdir))

  images, indices, prompts = read_samples(workdir, tag)
  assert prompts == [PROMPTS[i % 4] for i in range(6)]  # round-robin
  assert images.shape == (6, RESOLUTION, RESOLUTION, 3) and images.dtype == np.uint8
  np.testing.assert_array_equal(indices, [0, 1, 2, 3, 0, 1])
  assert not np.array_equal(images[0], images[4])  # one prompt, two different samples
  pngs = [Image.open(os.path.join(workdir, f"samples_{tag}", f"{i:06d}.png")) for i in range(6)]
  np.testing.assert_array_equal(np.stack([np.asarray(p) for p in pngs]), images)

  expected = reference_clip_scores(dirs["clip_src"], dirs["clip_reference"], pngs, prompts)
  error = abs(result["metrics"]["clip_score"] - float(expected.mean()))
  print(f"clip_score {result['metrics']['clip_score']:.6f}, transformers {expected.mean():.6f}, "
        f"error {error:.2e}")
  assert error <= 1e-3
  assert expected.std() > 0.1  # the per-sample scores differ: a wrong pairing would show
  table = evaluators.table(result).splitlines()
  assert table[0] == "| sampler | steps | N | CLIP |"
  assert table[2] == (f"| generator (ema) step {CHECKPOINT_STEP}, 1 step | 1 | 6 | "
                      f"{result['metrics']['clip_score']:.4g} |")


def test_the_clip_reward_is_the_unclamped_clip_score_of_the_decoded_soft_codes(dirs):
  """rewards' 'clip' kind: 100 cos(CLIP image of the soft picture, CLIP text of the prompt that
  cond['prompt'] names); on one-hot codes the picture is the decoded one."""
  from dimo_jax import data, rewards
  from dimo_jax.models import soft
  config = dirs["config"].copy_and_resolve_references()
  config.reward.update(kind="clip", weight=1.0, clip_path=dirs["clip"])
  teacher = dirs["text_teacher"]
  tokenizer = tokenizers.load(dirs["teacher"])
  reward = rewards.make_reward(config, teacher=teacher, tokenizer=tokenizer, prompts=PROMPTS)
  codes = np.random.default_rng(0).integers(0, teacher.codebook_size, (3, teacher.seq_len))
  prompt = np.asarray([2, 0, 3])
  value = reward(soft.one_hot(jnp.asarray(codes), teacher.codebook_size),
                 {"prompt": jnp.asarray(prompt)})
  clip = convert_clip.load_clip(dirs["clip"])
  image = np.asarray(clip.image_embeds(jnp.asarray(data.decode_images(tokenizer, codes))))
  text = np.asarray(clip.text_embeds([PROMPTS[i] for i in prompt]))
  cos = np.sum(image * text, -1) / np.linalg.norm(image, axis=-1) / np.linalg.norm(text, axis=-1)
  np.testing.assert_allclose(np.asarray(value), 100 * cos, atol=1e-3)
  logits = jax.random.normal(jax.random.PRNGKey(0), (3, teacher.seq_len,
                                                     teacher.codebook_size + 1))
  grad = jax.grad(lambda z: rewards.reward_loss(reward, z, {"prompt": jnp.asarray(prompt)},
                                                1.0)[0])(logits)
  assert float(jnp.max(jnp.abs(grad))) > 0


def test_generator_samples_are_the_one_step_sampler_of_the_ema(dirs, generator_eval):
  """The saved samples against the one-step sampler (sample.py's generator path) called on the
  checkpoint's EMA, fed the prompts as the teacher encodes them: batch 0's key, the padded
  batch of 8 (padding rows take prompt 0)."""
  config, teacher = dirs["config"], dirs["text_teacher"]
  images = read_samples(generator_eval[0], str(CHECKPOINT_STEP))[0]
  cond = meissonic_teacher.prompt_condition(teacher, [PROMPTS[i] for i in (0, 1, 2, 3, 0, 1, 0, 0)])
  key = jax.random.fold_in(jax.random.PRNGKey(1), 0)

  def one_step(params):
    sampler = samplers.generator(teacher, params, config, CHECKPOINT_STEP)
    return np.asarray(jax.jit(sampler.fn)(sampler.inputs, key, cond))

  codes = one_step(dirs["ema"])
  expected = decoded(dirs["teacher"], codes)[:6]
  assert np.abs(images.astype(int) - expected).max() <= 1  # rounding of the last float bit
  # The teacher's own parameters give other samples: the EMA was read.
  assert not np.array_equal(codes, one_step(teacher.variables))


def test_teacher_over_a_prompt_file_is_the_release_sampler(dirs, tmp_path):
  config, teacher = dirs["config"], dirs["text_teacher"]
  prompt_file = tmp_path / "eval_prompts.txt"
  prompt_file.write_text("a green tree\n\na cat on a mat\n", encoding="utf-8")
  workdir = str(tmp_path / "teacher")
  result = evaluators.evaluate(config, workdir, teacher_steps=2, cfg=3.0, prompts=str(prompt_file),
                             num_samples=3, seed=2, clip=convert_clip.load_clip(dirs["clip"]),
                             save_npz=True)
  assert result["sampler"] == "teacher, 2 steps, cfg_w 3" and result["steps"] == 2
  assert result["num_samples"] == 3 and result["num_prompts"] == 2
  assert result["prompts"] == str(prompt_file)
  assert 0 <= result["metrics"]["clip_score"] <= 100
  assert os.path.isfile(os.path.join(workdir, "eval_teacher_2step.json"))
  images, indices, prompts = read_samples(workdir, "teacher_2step")
  assert prompts == ["a green tree", "a cat on a mat", "a green tree"]
  np.testing.assert_array_equal(indices, [0, 1, 0])

  # The release's sampler guided against the config's negative prompt, on the padded batch.
  batch = [prompts[i] for i in (0, 1, 0)] + ["a green tree"] * 5
  rng = jax.random.fold_in(jax.random.PRNGKey(2), 0)
  decode = jax.jit(teacher.decoder(2, 3.0))
  codes = decode(teacher.variables, rng,
                 meissonic_teacher.prompt_condition(teacher, batch, config.negative_prompt))
  assert np.abs(images.astype(int) - decoded(dirs["teacher"], codes)[:3]).max() <= 1
  # Against the empty prompt the samples differ: the negative prompt is what guides.
  other = decode(teacher.variables, rng, meissonic_teacher.prompt_condition(teacher, batch, ""))
  assert not np.array_equal(np.asarray(codes), np.asarray(other))
  # The run's prompt cache holds the training prompts, untouched by another prompt set.
  cache = config.prompt_cache
  assert not os.path.exists(cache) or os.path.getmtime(cache) < os.path.getmtime(prompt_file)


def test_text_evaluation_needs_a_scorer_and_the_prompts_dataset(dirs, tmp_path):
  with pytest.raises(ValueError, match="pass --clip"):
    evaluators.evaluate(dirs["config"], str(tmp_path), checkpoint=dirs["run"])
  with pytest.raises(ValueError, match="needs both --inception and --ref"):
    evaluators.evaluate(dirs["config"], str(tmp_path), checkpoint=dirs["run"],
                      reference="ref.npz")
  config = dirs["config"].copy_and_resolve_references()
  config.dataset = "digits"
  with pytest.raises(ValueError, match="from dataset 'prompts', not 'digits'"):
    evaluators.evaluate(config, str(tmp_path), checkpoint=dirs["run"],
                      clip=convert_clip.load_clip(dirs["clip"]))
  with pytest.raises(ValueError, match="the generator samples unguided"):
    evaluators.evaluate(dirs["config"], str(tmp_path), checkpoint=dirs["run"], cfg=2.0)


def test_cli_on_eight_devices_gives_the_samples_of_one(dirs, generator_eval, tmp_path):
  """The command line in a process with 8 simulated devices, the run's config given as flags:
  the same images, prompts and CLIP score as the one-device evaluation."""
  config, workdir = dirs["config"], str(tmp_path / "cli")
  micro = ",".join(f"{x:g}" for x in config.micro_conds)
  cmd = [sys.executable, "-m", "dimo_jax.evaluate", "--config",
         os.path.join(REPO, "configs", "meissonic_1024.py"), "--workdir", workdir,
         f"--checkpoint={dirs['run']}", f"--config.teacher_path={dirs['teacher']}",
         f"--config.prompts.file={config.prompts.file}",
         f"--config.prompt_cache={config.prompt_cache}", f"--config.micro_conds=({micro})",
         "--config.mixed_precision=no", "--config.eval_batch_size=8", f"--clip={dirs['clip']}",
         "--num_samples=6", "--seed=1", "--save_npz"]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
  assert out.returncode == 0, out.stderr[-4000:]
  tag = str(CHECKPOINT_STEP)
  with open(os.path.join(workdir, f"eval_{tag}.json")) as f:
    result = json.load(f)
  expected = generator_eval[1]
  assert "| sampler | steps | N | CLIP |" in out.stdout
  assert f"| generator (ema) step {CHECKPOINT_STEP}, 1 step | 1 | 6 |" in out.stdout
  assert abs(result["metrics"]["clip_score"] - expected["metrics"]["clip_score"]) < 1e-4
  ours, theirs = read_samples(workdir, tag), read_samples(generator_eval[0], tag)
  np.testing.assert_array_equal(ours[0], theirs[0])
  assert ours[2] == theirs[2]


@pytest.fixture(scope="module")
def text_run(dirs, tmp_path_factory, monkeypatch_module):
  """A tiny text-to-image run with its final evaluation, counting every restore of a model
  directory and every VQ-VAE load, and keeping the codes each in-run sampler drew."""
  from dimo_jax import data, metrics, modeldir
  workdir = str(tmp_path_factory.mktemp("text_run"))
  config = dirs["config"].copy_and_resolve_references()
  config.update(max_train_steps=2, validation_steps=1, checkpointing_steps=2,
                eval_samples=6, sampling_step=8, final_eval=True)
  restores, vqvae_loads, codes = {}, [], []
  restore, load_tokenizer = modeldir.restore, tokenizers.load

  def counting_restore(src, init_fn):
    restores[os.path.abspath(src)] = restores.get(os.path.abspath(src), 0) + 1
    return restore(src, init_fn)

  def counting_load(src, *args, **kwargs):
    vqvae_loads.append(src)
    return load_tokenizer(src, *args, **kwargs)

  def recording_scorer(dataset):
    assert isinstance(dataset, data.TextPrompts)
    return lambda tokens, labels: codes.append(np.asarray(tokens)) or {}

  monkeypatch_module.setattr(modeldir, "restore", counting_restore)
  monkeypatch_module.setattr(tokenizers, "load", counting_load)
  monkeypatch_module.setattr(metrics, "scorer", recording_scorer)
  metrics = train.train_and_evaluate(config, workdir)
  monkeypatch_module.undo()
  return {"config": config, "metrics": metrics, "restores": restores,
          "vqvae_loads": vqvae_loads, "codes": dict(zip(metrics, codes))}


@pytest.fixture(scope="module")
def monkeypatch_module():
  with pytest.MonkeyPatch.context() as patch:
    yield patch


def test_a_text_run_reads_its_teacher_and_vqvae_once(dirs, text_run):
  teacher = os.path.abspath(dirs["teacher"])
  # The transformer and the text encoder: one restore each, though the dataset, the step and
  # every sampler use them; the VQ-VAE once for the two validation grids and the comparison.
  assert text_run["restores"] == {teacher: 1, os.path.join(teacher, "text_encoder"): 1,
                                  os.path.join(teacher, "vqvae"): 1}
  assert text_run["vqvae_loads"] == [dirs["teacher"]]
  assert sorted(text_run["metrics"]) == ["generator_1step", "teacher_1step", "teacher_8step"]


def test_the_in_run_teacher_is_the_one_evaluate_samples(dirs, text_run, tmp_path, monkeypatch):
  """metrics.json's teacher_8step and `evaluate --teacher_steps 8` at the default seed draw the
  same codes: one sampler (the release's scheduler, guided against the negative prompt)."""
  drawn = []
  generate = evaluators.generate
  monkeypatch.setattr(evaluators, "generate",
                      lambda *a, **k: drawn.append(generate(*a, **k)) or drawn[-1])
  config = text_run["config"]
  evaluators.evaluate(config, str(tmp_path), teacher_steps=8, num_samples=config.eval_samples,
                    clip=convert_clip.load_clip(dirs["clip"]))
  in_run = text_run["codes"]["teacher_8step"]
  np.testing.assert_array_equal(drawn[0]["codes"], in_run)
  # The release's rule, not MaskGIT's: the same steps, key and prompts under MaskGIT's decoding
  # give other codes.
  teacher = dirs["text_teacher"]
  cond = dataset_condition(config, teacher, np.arange(config.eval_samples) % 4)
  key = jax.random.fold_in(jax.random.PRNGKey(samplers.eval_seed(config)), 0)
  maskgit = teachers.Teacher(teacher.model, teacher.variables,
                             {**teacher.description, "kind": "maskgit"})
  padded = jax.tree_util.tree_map(lambda x: np.concatenate([x, x[:1], x[:1]]), cond)
  other = np.asarray(jax.jit(maskgit.decoder(8, config.cfg_w, r_temp=config.r_temp,
                                             sm_temp=config.sm_temp,
                                             sched_mode=config.sched_mode))(
      teacher.variables, key, teacher.guided_condition(padded)))[:config.eval_samples]
  assert not np.array_equal(other, in_run)


def dataset_condition(config, teacher, labels):
  from dimo_jax import data
  return data.get(config, teacher).condition(labels)
