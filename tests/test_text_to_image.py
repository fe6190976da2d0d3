"""Meissonic as a text-to-image teacher: a tiny random release in the diffusers layout, converted
into one model directory, loaded; prompt encoding against transformers, logits against the
converted transformer and the torch reference, the sampler's rule against diffusers'
AmusedScheduler, the sample CLI."""

from tests.optional import need

need("torch", "transformers", "diffusers", "safetensors")

import json
import math
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import torch
import transformers
from diffusers import AmusedScheduler
from diffusers.schedulers.scheduling_amused import gumbel_noise as amused_gumbel_noise
from PIL import Image
from safetensors.numpy import load_file, save_file

import dataclasses

from dimo_jax import samplers, sample, sampling, teachers, tokenizers
from dimo_jax.convert import __main__ as convert_cli
from dimo_jax.convert import meissonic
from dimo_jax.teachers import meissonic as meissonic_teacher
from dimo_jax.convert.common import ConversionError
from tests.test_clip import TOWER, _randomize, _write_tokenizer
from tests.test_convert_diffusers_vq import _reference as vq_reference
from tests.reference.meissonic_torch import pipeline_image_ids
from tests.test_meissonic_transformer import RELEASE_LIKE, _reference, _write_release

V = RELEASE_LIKE["codebook_size"]  # 16 codes; the release's mask id is 16 as well
RESOLUTION = 16  # the tiny VQ-VAE downsamples by 2: an 8 x 8 token grid
GRID = (8, 8)
PROMPTS = ["a red ball on top of a blue cube", "wow! a boat in a cup of water"]
NEGATIVE = "blurry, low quality"
ATOL = 1e-4


def _write_snapshot(root: str):
  """A tiny random Meissonic release: transformer/, vqvae/, text_encoder/, tokenizer/,
  scheduler/. Returns the torch transformer and text encoder (float64) as references."""
  transformer = _reference(RELEASE_LIKE)
  _write_release(root, transformer.state_dict(), RELEASE_LIKE)
  vq_reference(attention=False).save_pretrained(os.path.join(root, "vqvae"))
  vocab_size = _write_tokenizer(os.path.join(root, "tokenizer"), meissonic_style=True)
  config = transformers.CLIPTextConfig(
      vocab_size=vocab_size, projection_dim=RELEASE_LIKE["pooled_projection_dim"],
      max_position_embeddings=77, hidden_act="gelu", bos_token_id=vocab_size - 2,
      eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1,
      **dict(TOWER, hidden_size=RELEASE_LIKE["joint_attention_dim"]))
  text = transformers.CLIPTextModelWithProjection(config).eval()
  _randomize(text, seed=3)
  text.save_pretrained(os.path.join(root, "text_encoder"))
  AmusedScheduler(mask_token_id=V, masking_schedule="cosine").save_pretrained(
      os.path.join(root, "scheduler"))
  return transformer, text.double()


@pytest.fixture(scope="module")
def release(tmp_path_factory):
  root = tmp_path_factory.mktemp("meissonic")
  src = str(root / "release")
  transformer, text = _write_snapshot(src)
  dst = str(root / "converted")
  # Through the command line, as a user converts the release.
  assert convert_cli.main(["meissonic", "--src", src, "--dst", dst,
                           "--resolution", str(RESOLUTION)]) == 0
  return {"src": src, "dst": dst, "transformer": transformer, "text": text,
          "teacher": teachers.load(dst)}


def test_layout_and_load(release):
  dst, teacher = release["dst"], release["teacher"]
  assert sorted(os.listdir(dst)) == ["model.json", "params", "text_encoder", "tokenizer",
                                     "vqvae"]
  assert sorted(os.listdir(os.path.dirname(dst))) == ["converted", "release"]  # no temp left
  assert isinstance(teacher, teachers.Teacher) and teacher.text_conditioned
  assert teacher.description["kind"] == "meissonic"
  assert (teacher.model.height, teacher.model.width) == GRID
  assert teacher.description["resolution"] == RESOLUTION
  assert teacher.description["scheduler"] == {"mask_token_id": V, "masking_schedule": "cosine"}
  assert teacher.mask_id == V and teacher.model.mask_id == V  # ours V, the release's 17 - 1

  tok = tokenizers.load(dst)
  assert tok.description["kind"] == "diffusers-vq" and tok.description["value_range"] == [0, 1]
  codes = np.random.default_rng(1).integers(0, V, (2, *GRID))
  reference = vq_reference(attention=False).double()
  with torch.no_grad():
    expected = reference.decode(torch.from_numpy(codes), force_not_quantize=True,
                                shape=(2, *GRID, 4)).sample.permute(0, 2, 3, 1).numpy()
  images = np.asarray(tok.decode(jnp.asarray(codes, jnp.int32)))
  assert images.shape == (2, RESOLUTION, RESOLUTION, 3)
  assert np.abs(images - expected).max() <= ATOL


def test_encode_prompt_matches_transformers(release):
  teacher, text = release["teacher"], release["text"]
  ids = teacher.text.tokenize(PROMPTS + [NEGATIVE])
  expected_ids = transformers.CLIPTokenizer.from_pretrained(
      os.path.join(release["src"], "tokenizer"))(
          PROMPTS + [NEGATIVE], padding="max_length", truncation=True, max_length=77).input_ids
  np.testing.assert_array_equal(ids, np.asarray(expected_ids))

  hidden, pooled = teacher.text.encode(ids)
  with torch.no_grad():
    out = text(torch.from_numpy(ids).long(), output_hidden_states=True)
  errors = (np.abs(np.asarray(hidden) - out.hidden_states[-2].numpy()).max(),
            np.abs(np.asarray(pooled) - out.text_embeds.numpy()).max())
  print(f"encode_prompt max abs errors (penultimate hidden, text_embeds): {errors}")
  assert hidden.shape == (3, 77, RELEASE_LIKE["joint_attention_dim"])
  assert pooled.shape == (3, RELEASE_LIKE["pooled_projection_dim"])
  assert hidden.dtype == pooled.dtype == jnp.float32
  assert max(errors) <= ATOL
  # The penultimate state, not the last one (which passes through final_layer_norm).
  assert np.abs(out.hidden_states[-2].numpy() - out.last_hidden_state.numpy()).max() > 0.1

  cond = meissonic_teacher.prompt_condition(teacher, PROMPTS, NEGATIVE)
  np.testing.assert_allclose(cond["hidden"], hidden[:2], atol=1e-6)
  np.testing.assert_allclose(cond["uncond_pooled"], np.tile(pooled[2:], (2, 1)), atol=1e-6)
  np.testing.assert_array_equal(cond["micro_conds"],
                                [[RESOLUTION, RESOLUTION, 0, 0, 6]] * 2)


def _token_inputs(batch=3, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, V, (batch, *GRID))
  tokens[0, :, :4] = V
  tokens[2] = V
  return tokens.astype(np.int32)


def _cond(hidden, pooled, conds, uncond_hidden=None, uncond_pooled=None):
  return {"hidden": hidden, "pooled": pooled, "micro_conds": conds,
          "uncond_hidden": hidden if uncond_hidden is None else uncond_hidden,
          "uncond_pooled": pooled if uncond_pooled is None else uncond_pooled}


@pytest.mark.parametrize("timestep", [0.0, 7.0])
def test_logits_are_the_transformer_with_the_release_mask_id(release, timestep):
  """The teacher's call (our mask id V, a cond dict) against the converted transformer called
  directly and against the torch reference, both with the release's mask id."""
  teacher = release["teacher"]
  tokens = _token_inputs()
  rng = np.random.default_rng(1)
  hidden = rng.standard_normal((3, 77, RELEASE_LIKE["joint_attention_dim"]), np.float32)
  pooled = rng.standard_normal((3, RELEASE_LIKE["pooled_projection_dim"]), np.float32)
  conds = np.array([[16, 16, 0, 0, 6]] * 3, np.float32)
  at = teachers.Teacher(dataclasses.replace(teacher.model, timestep=timestep),
                        teacher.variables, teacher.description)
  logits = np.asarray(jax.jit(at.logits)(tokens, _cond(hidden, pooled, conds)))
  assert logits.shape == (3, GRID[0] * GRID[1], V) and logits.dtype == np.float32

  model, variables = meissonic.transformer_from_folder(release["src"])
  release_tokens = np.where(tokens == V, model.mask_id, tokens)
  times = np.full((3,), timestep, np.float32)
  direct = np.asarray(jax.jit(model.apply)(variables, release_tokens, hidden, pooled, conds,
                                           times))
  np.testing.assert_allclose(logits, direct, atol=1e-5)  # jitted against eager
  # The mask matters (rows 0 and 2 are masked): the same call with the codes unmasked differs.
  other = np.asarray(at.logits(np.where(tokens == V, 3, tokens), _cond(hidden, pooled, conds)))
  assert np.abs(other[0] - logits[0]).max() > 1e-3

  with torch.no_grad():  # the torch reference, called as the pipeline calls the release
    expected = release["transformer"](
        torch.from_numpy(release_tokens).long(), torch.from_numpy(hidden),
        torch.from_numpy(pooled), torch.from_numpy(times), pipeline_image_ids(*GRID),
        torch.zeros(hidden.shape[1], 3), torch.from_numpy(conds))
  expected = expected.reshape(3, V, -1).permute(0, 2, 1).numpy()
  error = np.abs(logits - expected).max()
  print(f"teacher logits max abs error vs the torch reference: {error:.2e}")
  assert error <= ATOL


def test_conditioned_adapter_takes_the_negative_prompt_when_dropped(release):
  teacher = release["teacher"]
  cond = meissonic_teacher.prompt_condition(teacher, PROMPTS + ["a third prompt"], NEGATIVE)
  tokens = _token_inputs()
  drop = jnp.array([False, True, True])
  logits = jax.jit(teacher.logits)(tokens, cond, drop)
  conditional = teacher.logits(tokens, cond)
  negative = teacher.logits(tokens, {**cond, "hidden": cond["uncond_hidden"],
                                     "pooled": cond["uncond_pooled"]})
  np.testing.assert_allclose(logits[0], conditional[0], atol=1e-5)
  np.testing.assert_allclose(logits[1:], negative[1:], atol=1e-5)
  assert np.abs(conditional[1] - negative[1]).max() > 1e-3  # the prompts do matter


# --- the sampler ---------------------------------------------------------------------------------

def _release_counts(seq_len: int, steps: int, schedule: str) -> list:
  """Tokens the release unmasks at each step, from its rule in plain Python (float32 as torch)."""
  masked, counts = seq_len, []
  for i in range(steps):
    if i == steps - 1:
      after = 0
    else:
      ratio = np.float32(i + 1) / np.float32(steps)
      share = (np.cos(ratio * np.float32(math.pi) / 2) if schedule == "cosine"
               else 1 - ratio)
      after = max(1, min(masked - 1, int(np.floor(np.float32(seq_len) * np.float32(share)))))
    counts.append(masked - after)
    masked = after
  return counts


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
@pytest.mark.parametrize("step", [0, 5, 10, 11])
def test_unmasking_rule_matches_amused_scheduler(schedule, step):
  steps, batch, seq_len, vocab = 12, 3, 48, V
  scheduler = AmusedScheduler(mask_token_id=vocab, masking_schedule=schedule)
  scheduler.set_timesteps(steps, temperature=(2, 0))
  np.testing.assert_allclose(sampling.temperatures(steps), scheduler.temperatures.numpy(),
                             rtol=1e-6)

  rng = np.random.default_rng(step)
  logits = (2.0 * rng.standard_normal((batch, seq_len, vocab))).astype(np.float32)
  sample = rng.integers(0, vocab, (batch, seq_len))
  # Rows with many, some and few masked tokens (the last one hits the "#masked - 1" bound).
  for row, count in enumerate((seq_len, 30, 3)):
    sample[row, rng.permutation(seq_len)[:count]] = vocab
  generator = torch.Generator().manual_seed(7)
  out = scheduler.step(torch.from_numpy(logits), int(scheduler.timesteps[step]),
                       torch.from_numpy(sample), generator=generator)

  # The same draws again: the sampled codes, then the Gumbel noise.
  replay = torch.Generator().manual_seed(7)
  probs = torch.from_numpy(logits).softmax(-1)
  pred = torch.multinomial(probs.reshape(-1, vocab), 1, generator=replay).view(batch, seq_len)
  gumbel = amused_gumbel_noise(torch.zeros(batch, seq_len), generator=replay)
  masked = sample == vocab
  pred = np.where(masked, pred.numpy(), sample)
  np.testing.assert_array_equal(pred, out.pred_original_sample.numpy())

  selected = np.take_along_axis(np.asarray(jax.nn.softmax(logits, -1)), pred[..., None], -1)
  again = sampling.remask(jnp.asarray(masked), jnp.asarray(selected[..., 0]),
                          jnp.asarray(gumbel.numpy()), jnp.int32(step), steps,
                          jnp.float32(scheduler.temperatures[step]), schedule)
  ours = np.where(np.asarray(again), vocab, pred)
  expected = out.prev_sample.numpy()
  np.testing.assert_array_equal(ours == vocab, expected == vocab)  # which tokens stay masked
  np.testing.assert_array_equal(ours, expected)
  kept = (expected == vocab).sum(-1)
  if step == steps - 1:
    assert (kept == 0).all()
  else:
    ratio = np.float32(step + 1) / np.float32(steps)
    share = np.cos(ratio * np.float32(math.pi) / 2) if schedule == "cosine" else 1 - ratio
    bound = np.floor(np.float32(seq_len) * np.float32(share))
    np.testing.assert_array_equal(kept, np.maximum(1, np.minimum(masked.sum(-1) - 1, bound)))


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_sampler_reveals_the_release_counts_at_the_pipeline_timesteps(schedule):
  """A fake transformer that is sure of code `timestep`: each position's final code tells the
  step that revealed it, so the codes count the tokens unmasked at each step."""
  steps, batch, seq_len = 8, 2, 64

  def logits_fn(tokens, cond, drop, timestep):
    del cond, drop
    code = jnp.asarray(timestep, jnp.int32)
    return jnp.where(jnp.arange(V) == code, 40.0, -40.0) * jnp.ones((*tokens.shape, 1))

  cond = {"hidden": jnp.zeros((batch, 1))}
  codes = np.asarray(sampling.meissonic_sample(
      logits_fn, jax.random.PRNGKey(0), cond, seq_len, V, steps=steps, cfg=9.0,
      masking_schedule=schedule))
  assert codes.shape == (batch, seq_len) and codes.dtype == np.int32
  assert ((codes >= 0) & (codes < V)).all()  # no mask left
  expected = _release_counts(seq_len, steps, schedule)
  for row in codes:
    # Step i runs at timestep N - 1 - i.
    revealed = [int(np.sum(row == steps - 1 - i)) for i in range(steps)]
    assert revealed == expected


def test_teacher_sampler_and_one_step_sampler(release):
  teacher = release["teacher"]
  cond = meissonic_teacher.prompt_condition(teacher, PROMPTS, NEGATIVE)
  decode = jax.jit(teacher.decoder(4, sampling.MEISSONIC_CFG))
  codes = np.asarray(decode(teacher.variables, jax.random.PRNGKey(0), cond))
  again = np.asarray(decode(teacher.variables, jax.random.PRNGKey(0), cond))
  other = np.asarray(decode(teacher.variables, jax.random.PRNGKey(1), cond))
  assert codes.shape == (2, 64) and ((codes >= 0) & (codes < V)).all()
  np.testing.assert_array_equal(codes, again)
  assert (codes != other).any()

  run = defaults_config(fixed_ratio="fix_0.5", noise_emb_perturb="fix_0.3")
  one_step = samplers.generator(teacher, teacher.variables, run, 0)
  one = np.asarray(jax.jit(one_step.fn)(one_step.inputs, jax.random.PRNGKey(0), cond))
  assert one.shape == (2, 64) and ((one >= 0) & (one < V)).all()
  again = np.asarray(jax.jit(one_step.fn)(one_step.inputs, jax.random.PRNGKey(0), cond))
  np.testing.assert_array_equal(one, again)


def defaults_config(**overrides):
  from dimo_jax import defaults
  config = defaults.reference_config()
  config.update(overrides)
  return config


# --- bad releases ------------------------------------------------------------------------------

def _drop_folder(src):
  os.rename(os.path.join(src, "vqvae"), os.path.join(src, "vqvae_moved"))
  return "vqvae"


def _drop_key(src):
  path = os.path.join(src, "text_encoder", "model.safetensors")
  state = load_file(path)
  del state["text_model.final_layer_norm.weight"]
  save_file(state, path)
  return "text_model.final_layer_norm.weight"


def _wrong_mask_id(src):
  path = os.path.join(src, "scheduler", "scheduler_config.json")
  with open(path) as f:
    config = json.load(f)
  with open(path, "w") as f:
    json.dump(dict(config, mask_token_id=3), f)
  return "mask_token_id 3"


def _codebook_mismatch(src):
  path = os.path.join(src, "vqvae", "config.json")
  state_path = os.path.join(src, "vqvae", meissonic.WEIGHTS_FILE)
  with open(path) as f:
    config = json.load(f)
  with open(path, "w") as f:
    json.dump(dict(config, num_vq_embeddings=8), f)
  state = load_file(state_path)
  state["quantize.embedding.weight"] = state["quantize.embedding.weight"][:8]
  save_file(state, state_path)
  return "num_vq_embeddings 8"


@pytest.mark.parametrize("edit", [_drop_folder, _drop_key, _wrong_mask_id, _codebook_mismatch])
def test_bad_release_is_refused_and_leaves_nothing(release, tmp_path, edit):
  src = str(tmp_path / "release")
  shutil.copytree(release["src"], src)
  named = edit(src)
  dst = tmp_path / "out" / "converted"
  with pytest.raises(ConversionError, match=named):
    meissonic.convert(src, str(dst), resolution=RESOLUTION)
  assert not dst.exists()
  assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_resolution_must_fit_the_token_grid(release, tmp_path):
  with pytest.raises(ConversionError, match="even number of codes"):
    meissonic.convert(release["src"], str(tmp_path / "odd"), resolution=18)
  assert not (tmp_path / "odd").exists()


# --- python -m dimo_jax.sample --prompt ---------------------------------------------------------

def _grid_size(rows, cols, side=RESOLUTION):
  return cols * (side + 1) + 1, rows * (side + 1) + 1


def test_sample_cli_teacher_grid(release, tmp_path):
  out = str(tmp_path / "grid.png")
  prompt_file = tmp_path / "prompts.txt"
  prompt_file.write_text("a third prompt\n\n")
  # Batches of 2 at 4 steps: the sampler compiled by the test above is reused.
  sample.main(["--teacher", release["dst"], "--prompt", PROMPTS[0], "--prompt_file",
               str(prompt_file), "--steps", "4", "--samples_per_label", "2", "--batch_size", "2",
               "--out", out])
  assert Image.open(out).size == _grid_size(2, 2)


def test_sample_cli_generator_grid(release, tmp_path):
  """A Di[M]O workdir holding generator and EMA parameters (here the teacher's)."""
  teacher = release["teacher"]
  root = tmp_path / "run" / "checkpoints"
  manager = ocp.CheckpointManager(str(root))
  manager.save(2, args=ocp.args.StandardSave({"gen_params": teacher.variables,
                                               "ema_params": teacher.variables}))
  manager.wait_until_finished()
  with open(root / "config.json", "w") as f:
    json.dump({"fixed_ratio": 0.5, "noise_emb_perturb": "fix_0.3", "fake_rounds": 1,
               "gen_temp": 1.0, "top_k": 0, "top_p": 0.0}, f)
  out = str(tmp_path / "gen.png")
  sample.main(["--teacher", release["dst"], "--generator", str(tmp_path / "run"),
               "--prompt", PROMPTS[0], "--samples_per_label", "2", "--out", out])
  assert Image.open(out).size == _grid_size(1, 2)


def test_sample_cli_refuses_labels_for_a_text_teacher(release, tmp_path, capsys):
  with pytest.raises(SystemExit) as exit_info:
    sample.main(["--teacher", release["dst"], "--labels", "1", "--out",
                 str(tmp_path / "x.png")])
  assert exit_info.value.code == 1
  assert "text-to-image teacher: give --prompt" in capsys.readouterr().err
