"""MaskBit: the generator and tokenizer releases convert (both key spellings, post- and
pre-norm) to modules equal to an independent PyTorch reference, the kind keeps the teacher
contract, and its decode rule keeps and re-masks what the release's `sample` does."""

from tests.optional import need

need("torch", "yaml")

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import yaml

from dimo_jax import sampling, teachers, tokenizers
from dimo_jax.convert.__main__ import main
from dimo_jax.models import maskbit, soft
from tests.reference.maskbit_torch import (ReferenceLFQBert, ReferenceVQGANPlus,
                                           reference_sample)

POSITIONS, WIDTH, DEPTH, HEADS, MLP, BITS, SPLITS, CLASSES = 4, 32, 2, 4, 64, 6, 2, 5
V = 2 ** (BITS // SPLITS)


def _perturbed(net):
  """Every norm affine and bias away from its init, so a swapped norm or dropped bias shows."""
  torch.manual_seed(1)
  with torch.no_grad():
    for name, p in net.named_parameters():
      if "norm" in name or name.endswith("bias") or name.startswith("first_layer"):
        p.copy_(torch.randn_like(p) * 0.5 + (1.0 if name.endswith("weight") else 0.0))
  return net.eval()


def _generator_yaml(path, prenorm, **overrides):
  mlm = dict(model_cls="lfq_bert", hidden_dim=WIDTH, depth=DEPTH, heads=HEADS, mlp_dim=MLP,
             dropout=0.1, codebook_splits=SPLITS, use_prenorm=prenorm, guidance_scale=7.1,
             guidance_annealing="cosine", scale_pow=3.0, randomize_temperature=7.8,
             softmax_temperature=1.0, num_steps=64, gen_mask_schedule_strategy="arccos")
  mlm.update(overrides)
  # codebook_size is wrong for LFQ in the release's YAMLs: it must be ignored
  config = {"model": {"vq_model": {"quantizer_type": "lookup-free", "token_size": BITS,
                                   "codebook_size": 4096, "num_resolutions": 3},
                      "mlm_model": mlm}}
  path.write_text(yaml.safe_dump(config))
  return str(path)


@pytest.fixture(scope="module", params=[(False, "token_emb"), (True, "input_proj")],
                ids=["postnorm-token_emb", "prenorm-input_proj"])
def generator(request, tmp_path_factory):
  prenorm, spelling = request.param
  torch.manual_seed(0)
  net = _perturbed(ReferenceLFQBert(POSITIONS, WIDTH, DEPTH, HEADS, MLP, BITS, SPLITS, CLASSES,
                                    prenorm))
  tmp = tmp_path_factory.mktemp("maskbit")
  state = {k.replace("input_proj", spelling): v for k, v in net.state_dict().items()}
  torch.save(state, tmp / "gen.bin")
  dst = str(tmp / "teacher")
  assert main(["maskbit", "--src", str(tmp / "gen.bin"), "--config",
               _generator_yaml(tmp / "gen.yaml", prenorm), "--dst", dst]) == 0
  return net, dst, tmp


def test_generator_logits_equal_the_reference(generator):
  net, dst, _ = generator
  teacher = teachers.load(dst)
  assert teacher.kind.name == "maskbit" and teacher.seq_len == POSITIONS * SPLITS
  assert teacher.codebook_size == V and teacher.mask_id == V and teacher.num_classes == CLASSES
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, V, (6, POSITIONS, SPLITS))
  tokens[rng.random(tokens.shape) < 0.4] = V
  labels = rng.integers(0, CLASSES, (6,))
  drop = np.array([False, True] * 3)
  with torch.no_grad():
    expected = net(torch.as_tensor(tokens), torch.as_tensor(labels), torch.as_tensor(drop))
  ours = teacher.logits(jnp.asarray(tokens.reshape(6, -1)), jnp.asarray(labels), jnp.asarray(drop))
  np.testing.assert_allclose(np.asarray(ours), expected.numpy().reshape(6, -1, V), atol=1e-4,
                             rtol=1e-4)
  # The class and the drop matter, and so does one sub-token (not a constant output).
  assert np.abs(np.asarray(ours[0] - ours[1])).max() > 1e-3


def test_the_release_sampler_and_the_noise_scale_are_kept(generator):
  _, dst, _ = generator
  teacher = teachers.load(dst)
  assert teacher.description["release_sampler"]["guidance_scale"] == 7.1
  kernel = np.asarray(teacher.variables["params"]["input_proj"]["kernel"], np.float64)
  bias = np.asarray(teacher.variables["params"]["input_proj"]["bias"], np.float64)
  bits = np.random.default_rng(0).choice([-1.0, 1.0], (20000, BITS))
  rms = np.sqrt(np.mean((bits @ kernel + bias) ** 2))
  assert abs(teacher.model.emb_noise_scale - rms) < 0.02 * rms


def test_fix_emb_layer_freezes_the_bit_projection_class_and_positions():
  assert teachers.KINDS["maskbit"].frozen_with_emb == ("input_proj", "class_emb", "pos_emb")


def test_merge_and_split_invert_each_other_as_the_release_combines():
  indices = np.random.default_rng(0).integers(0, 2 ** 14, (3, 256))
  sub = maskbit.split_codes(indices, 2, 7)
  assert sub.shape == (3, 512)
  np.testing.assert_array_equal(sub[:, 0::2], indices & 127)  # sub-token 0: the low bits
  np.testing.assert_array_equal(sub[:, 1::2], indices >> 7)
  np.testing.assert_array_equal(maskbit.merge_splits(sub, 2, 7), indices)


@pytest.mark.parametrize("change, message", [
    ({"model_cls": "bert"}, "model_cls' must be 'lfq_bert'"),
    ({"codebook_splits": 4}, "not divisible by model.mlm_model.codebook_splits"),
    ({"use_prenorm": "yes"}, "use_prenorm' must be true or false"),
])
def test_a_config_that_does_not_fit_is_one_line(generator, tmp_path, capsys, change, message):
  _, _, tmp = generator
  config = _generator_yaml(tmp_path / "bad.yaml", False, **change)
  assert main(["maskbit", "--src", str(tmp / "gen.bin"), "--config", config,
               "--dst", str(tmp_path / "out")]) == 1
  err = capsys.readouterr().err.strip()
  assert err.startswith("error:") and message in err and "\n" not in err
  assert not os.path.exists(tmp_path / "out")


def test_missing_config_and_both_spellings_are_refused(generator, tmp_path, capsys):
  net, _, tmp = generator
  assert main(["maskbit", "--src", str(tmp / "gen.bin"), "--dst", str(tmp_path / "a")]) == 1
  assert "--config is required" in capsys.readouterr().err
  state = dict(net.state_dict())
  state["token_emb.weight"] = state["input_proj.weight"]
  torch.save(state, tmp_path / "both.bin")
  assert main(["maskbit", "--src", str(tmp_path / "both.bin"), "--config",
               _generator_yaml(tmp_path / "g.yaml", net.prenorm), "--dst",
               str(tmp_path / "b")]) == 1
  assert "holds both 'token_emb.weight'" in capsys.readouterr().err


def test_a_wrong_shape_is_named(generator, tmp_path, capsys):
  net, _, _ = generator
  state = dict(net.state_dict())
  state["prediction_layer.weight"] = state["prediction_layer.weight"][:-1]
  torch.save(state, tmp_path / "short.bin")
  assert main(["maskbit", "--src", str(tmp_path / "short.bin"), "--config",
               _generator_yaml(tmp_path / "g.yaml", net.prenorm), "--dst",
               str(tmp_path / "c")]) == 1
  err = capsys.readouterr().err
  assert "'prediction_layer.weight' has shape (15, 32), expected (16, 32)" in err


# ---- tokenizer -------------------------------------------------------------------------------

# The generator's 6 bits, so that the two pair: 4 positions = a 2x2 grid of 8x8 pixels.
TOK_BITS, TOK_HIDDEN, TOK_MULT, TOK_BLOCKS = BITS, 32, (1, 1, 2), 2


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  torch.manual_seed(0)
  net = ReferenceVQGANPlus(TOK_BITS, TOK_HIDDEN, TOK_MULT, TOK_BLOCKS)
  torch.manual_seed(2)
  with torch.no_grad():
    for name, p in net.named_parameters():
      if "norm" in name or name.endswith("bias"):
        p.copy_(torch.randn_like(p) * 0.3 + (1.0 if name.endswith("weight") else 0.0))
  net.eval()
  tmp = tmp_path_factory.mktemp("maskbit_tok")
  torch.save(net.state_dict(), tmp / "tok.bin")
  config = {"model": {"vq_model": {
      "model_class": "vqgan+", "quantizer_type": "lookup-free", "token_size": TOK_BITS,
      "codebook_size": 4096, "num_channels": 3, "hidden_channels": TOK_HIDDEN,
      "channel_mult": list(TOK_MULT), "num_resolutions": len(TOK_MULT),
      "num_res_blocks": TOK_BLOCKS, "sample_with_conv": True}}}
  (tmp / "tok.yaml").write_text(yaml.safe_dump(config))
  dst = str(tmp / "tokenizer")
  assert main(["maskbit-tokenizer", "--src", str(tmp / "tok.bin"), "--config",
               str(tmp / "tok.yaml"), "--dst", dst]) == 0
  return net, dst


def test_tokenizer_encode_is_exact_and_decode_equals_the_reference(tokenizer):
  net, dst = tokenizer
  tok = tokenizers.load(dst)
  assert tok.codebook_size == 2 ** TOK_BITS and tok.model.downsample_factor == 4
  images = np.random.default_rng(0).random((2, 16, 16, 3)).astype(np.float32)
  with torch.no_grad():
    expected_codes = net.encode(torch.as_tensor(images).permute(0, 3, 1, 2)).numpy()
  codes = np.asarray(tok.encode(jnp.asarray(images)))
  np.testing.assert_array_equal(codes, expected_codes)
  assert len(np.unique(codes)) > 3
  grid = np.random.default_rng(1).integers(0, 2 ** TOK_BITS, (2, 4, 4))
  with torch.no_grad():
    expected = net.decode(torch.as_tensor(grid)).permute(0, 2, 3, 1).numpy()
  np.testing.assert_allclose(np.asarray(tok.decode(jnp.asarray(grid))), expected, atol=1e-4,
                             rtol=1e-4)


def test_tokenizer_decodes_soft_codes_as_expected_bits(tokenizer):
  _, dst = tokenizer
  tok = tokenizers.load(dst)
  grid = jnp.asarray(np.random.default_rng(1).integers(0, 2 ** TOK_BITS, (1, 4, 4)))
  model = tok.model
  hard = model.apply(tok.variables, grid, method=model.decode)
  bits = model.apply(tok.variables, grid, method=model.bits)
  np.testing.assert_allclose(model.apply(tok.variables, bits, method=model.decode_bits), hard,
                             atol=1e-5)
  halfway = model.apply(tok.variables, 0.5 * bits, method=model.decode_bits)
  assert np.abs(np.asarray(halfway - hard)).max() > 1e-3


def test_the_rewards_soft_pictures_read_sub_token_distributions_as_bits(generator, tokenizer):
  """rewards.soft_pictures of one-hot sub-tokens is the picture of their merged indices."""
  from dimo_jax import data, rewards
  _, teacher_dir, _ = generator
  _, tokenizer_dir = tokenizer
  teacher, tok = teachers.load(teacher_dir), tokenizers.load(tokenizer_dir)
  tokens = jnp.asarray(np.random.default_rng(3).integers(0, V, (2, POSITIONS * SPLITS)))
  pictures = rewards.soft_pictures(teacher, tok)(tok.variables, soft.one_hot(tokens, V))
  expected = data.decode_images(tok, np.asarray(teacher.image_codes(tokens)))
  np.testing.assert_allclose(np.asarray(pictures), expected, atol=1e-5)


def test_a_tokenizer_with_a_wrong_codebook_buffer_is_refused(tokenizer, tmp_path, capsys):
  net, dst = tokenizer
  state = dict(net.state_dict())
  state["quantize.codebook"] = -state["quantize.codebook"]
  torch.save(state, tmp_path / "tok.bin")
  config = os.path.join(os.path.dirname(dst), "tok.yaml")
  assert main(["maskbit-tokenizer", "--src", str(tmp_path / "tok.bin"), "--config", config,
               "--dst", str(tmp_path / "out")]) == 1
  assert "'quantize.codebook' is not the +-1 bit table" in capsys.readouterr().err


def test_sample_draws_a_maskbit_teacher_through_its_tokenizer(generator, tokenizer, tmp_path):
  from PIL import Image
  from dimo_jax import sample
  _, teacher_dir, _ = generator
  _, tokenizer_dir = tokenizer
  out = str(tmp_path / "grid.png")
  sample.main(["--teacher", teacher_dir, "--tokenizer", tokenizer_dir, "--labels", "0,3",
               "--samples_per_label", "2", "--steps", "4", "--out", out])
  grid = np.asarray(Image.open(out))
  assert grid.shape == (2 * 9 + 1, 2 * 9 + 1, 3)  # 2 rows x 2 columns of 8x8, 1-px borders
  # and the sub-tokens reach the tokenizer merged: a wrong pairing is refused by name
  teacher = teachers.load(teacher_dir)
  assert teacher.image_codebook_size == 2 ** BITS
  tokens = jnp.asarray([[1, 2, 3, 4, 5, 6, 7, 0]])
  np.testing.assert_array_equal(teacher.image_codes(tokens), [[1 + 16, 3 + 32, 5 + 48, 7]])


def test_real_imagenet_tokens_are_the_teachers_sub_tokens(generator, tokenizer, tmp_path):
  """`python -m dimo_jax.tokenize` with the MaskBit tokenizer writes full indices; the GAN's
  real data reads them as the teacher's sub-tokens, which merge back to those indices."""
  from PIL import Image
  from dimo_jax import data, tokenize
  _, teacher_dir, _ = generator
  _, tokenizer_dir = tokenizer
  (tmp_path / "images" / "n01").mkdir(parents=True)
  rng = np.random.default_rng(0)
  for i in range(3):
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(
        tmp_path / "images" / "n01" / f"{i}.png")
  out = str(tmp_path / "tokens")
  manifest = tokenize.tokenize(tokenizer_dir, out, images=str(tmp_path / "images"),
                               image_size=8, shard_size=2, batch_size=2)
  assert (manifest["seq_len"], manifest["codebook_size"]) == (POSITIONS, 2 ** BITS)
  teacher = teachers.load(teacher_dir)
  dataset = data.ImageNet256(tokenizer_dir, real_tokens_path=out, teacher=teacher)
  tokens, labels = dataset.real_tokens()
  assert tokens.shape == (3, POSITIONS * SPLITS) and tokens.max() < V
  np.testing.assert_array_equal(teacher.image_codes(tokens),
                                tokenize.TokenShards(out).load([0, 1])[0])
  assert dataset.images(tokens).shape == (3, 8, 8, 3)


# ---- decode rule -----------------------------------------------------------------------------

def _toy_logits(table, uncond_table):
  """A logits function both frameworks compute the same: a per-position table, shifted by how
  many sub-tokens of the row are still masked (so the step's state matters)."""
  def jax_fn(tokens, labels, drop):
    masked = (tokens == V).sum(-1).astype(jnp.float32)[:, None, None]
    base = jnp.where(drop[:, None, None], jnp.asarray(uncond_table), jnp.asarray(table))
    return base + 0.25 * masked * jnp.asarray(table)

  def torch_fn(tokens, drop):
    flat = tokens.reshape(tokens.shape[0], -1)
    masked = (flat == V).sum(-1).float()[:, None, None]
    base = torch.as_tensor(np.array(uncond_table if drop else table))
    return (base + 0.25 * masked * torch.as_tensor(table)).reshape(
        tokens.shape[0], POSITIONS, SPLITS, V)
  return jax_fn, torch_fn


# 12 steps over 8 sub-tokens reach the release's clamp k = masked - 1 (and its k = 0 quirk).
@pytest.mark.parametrize("annealing, guidance, steps", [("none", 0.0, 6), ("linear", 2.0, 6),
                                                        ("cosine", 7.1, 6), ("cosine", 7.1, 12)])
def test_decode_rule_keeps_and_remasks_what_the_release_does(annealing, guidance, steps):
  batch, r_temp = 3, 7.8
  rng = np.random.default_rng(0)
  table = rng.normal(size=(POSITIONS * SPLITS, V)).astype(np.float32)
  uncond = rng.normal(size=table.shape).astype(np.float32)
  jax_fn, torch_fn = _toy_logits(table, uncond)
  labels = jnp.zeros((batch,), jnp.int32)
  key = jax.random.PRNGKey(5)
  # The noise maskbit_sample draws, re-drawn here with its key splits.
  sample_noise, conf_noise, state = [], [], key
  for _ in range(steps):
    state, sample_rng, conf_rng = jax.random.split(state, 3)
    sample_noise.append(np.asarray(jax.random.gumbel(sample_rng, (batch,) + table.shape)))
    conf_noise.append(np.asarray(jax.random.gumbel(conf_rng, (batch, table.shape[0]))))
  history = reference_sample(
      torch_fn, batch, POSITIONS, SPLITS, V, steps, guidance, annealing, 3.0, r_temp,
      [torch.tensor(n.reshape(batch, POSITIONS, SPLITS, V)) for n in sample_noise],
      [torch.tensor(n.reshape(batch, POSITIONS, SPLITS)) for n in conf_noise])
  # Step for step through maskbit_step.
  tokens = jnp.full((batch, POSITIONS * SPLITS), V, jnp.int32)
  counts = sampling.maskbit_mask_counts(steps, POSITIONS * SPLITS, "arccos")
  for i, (expected_tokens, expected_drawn) in enumerate(history):
    if guidance == 0:
      logits = jax_fn(tokens, labels, jnp.zeros((batch,), bool))
    else:
      scale = sampling.maskbit_guidance(i, steps, guidance, annealing, 3.0)
      logits = sampling.guided_logits(jax_fn, tokens, labels, 1.0 + jnp.asarray(scale))
    tokens, drawn = sampling.maskbit_step(tokens, logits, jnp.asarray(sample_noise[i]),
                                          jnp.asarray(conf_noise[i]), counts[i],
                                          jnp.float32((i + 1) / steps), V, r_temp)
    np.testing.assert_array_equal(np.asarray(tokens), expected_tokens.reshape(batch, -1).numpy(),
                                  err_msg=f"step {i}")
    np.testing.assert_array_equal(np.asarray(drawn), expected_drawn.reshape(batch, -1).numpy())
  # and the jitted loop returns the release's final draw
  final = jax.jit(lambda k: sampling.maskbit_sample(
      jax_fn, k, labels, POSITIONS * SPLITS, V, steps, guidance, r_temp, 1.0, "arccos",
      annealing, 3.0))(key)
  np.testing.assert_array_equal(np.asarray(final), history[-1][1].reshape(batch, -1).numpy())
  assert (np.asarray(final) < V).all()


# ---- the offline toy: a MaskBit-kind teacher pretrained and distilled ------------------------

def test_a_maskbit_teacher_pretrains_and_distills_end_to_end(tmp_path):
  from configs import maskbit_digits, maskbit_digits_teacher
  from dimo_jax import data, pretrain, train

  dataset = data.get(maskbit_digits.get_config())
  tokens, _ = dataset.train_batch(np.random.default_rng(0), 8)
  assert tokens.shape == (8, 128) and tokens.max() < 8
  np.testing.assert_array_equal(dataset.full_codes(tokens),
                                (tokens[:, 0::2] + 8 * tokens[:, 1::2]).clip(max=16))

  config = maskbit_digits_teacher.get_config()
  config.model.update(hidden_dim=32, depth=1, num_heads=2, mlp_dim=64)
  config.num_steps, config.warmup_steps, config.log_every = 60, 5, 20
  path = pretrain.pretrain(config, str(tmp_path / "pretrain"))
  teacher = teachers.load(path)
  assert teacher.kind.name == "maskbit" and teacher.seq_len == 128 and teacher.mask_id == 8
  assert teacher.model.emb_noise_scale == maskbit.embedding_rms(teacher.variables)
  losses = teacher.description["pretraining"]["losses"]
  assert losses[-1] < losses[0], losses

  run = maskbit_digits.get_config()
  run.teacher_path = path
  run.max_train_steps, run.train_batch_size, run.log_every = 4, 16, 2
  run.validation_steps = run.checkpointing_steps = 4
  run.eval_samples, run.eval_batch_size, run.eval_seeds = 64, 32, 2
  metrics = train.train_and_evaluate(run, str(tmp_path / "dimo"))
  for name in ("teacher_8step", "generator_1step"):
    assert metrics[name]["seeds"] == 2 and np.isfinite(metrics[name]["fd"])
  # The generator moved away from its teacher, except what fix_emb_layer keeps: the bit
  # projection, the class table and the positions.
  from dimo_jax import checkpoints
  params, _, step = checkpoints.load_generator(str(tmp_path / "dimo"), teacher, "generator")
  assert step == 4
  start = teacher.variables["params"]
  for name in ("input_proj", "class_emb", "pos_emb"):
    jax.tree_util.tree_map(np.testing.assert_array_equal, params["params"][name], start[name])
  moved = jax.tree_util.tree_map(lambda a, b: float(np.abs(np.asarray(a) - b).max()),
                                 params["params"]["prediction_layer"], start["prediction_layer"])
  assert max(jax.tree_util.tree_leaves(moved)) > 0
