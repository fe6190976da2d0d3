"""Meissonic transformer: a tiny random release in the diffusers layout, converted, against the
torch reference (upstream diffusers blocks + Meissonic's glue, tests/reference/meissonic_torch.py)."""

from tests.optional import need

need("torch", "safetensors")

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from dimo_jax.convert import meissonic
from dimo_jax.convert.common import ConversionError
from tests.reference.meissonic_torch import MeissonicReference, pipeline_image_ids

# Release-like: down/up sampling on, two double-stream blocks (so index 1 is mapped too), one
# single-stream block, a non-square token grid (a swapped RoPE row/column axis shows).
RELEASE_LIKE = dict(num_layers=2, num_single_layers=1, attention_head_dim=32,
                    num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=64,
                    axes_dims_rope=[8, 12, 12], vocab_size=17, codebook_size=16,
                    downsample=True, upsample=True)
PLAIN = {**RELEASE_LIKE, "num_layers": 1, "downsample": False, "upsample": False}
GRID = {"release_like": (8, 6), "plain": (4, 4)}
TEXT_LEN = 7
MASK_ID = 16  # vocab_size - 1


def _reference(config) -> MeissonicReference:
  torch.manual_seed(0)
  model = MeissonicReference(**config).eval()
  # Every parameter random and away from its initial value (the AdaLN-Zero and output layers
  # included), so that a swapped, untransposed or skipped tensor changes the logits.
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.ndim == 1 and "norm" in name and name.endswith("weight"):
        p.copy_(1.0 + 0.3 * torch.randn(p.shape))
      elif p.ndim == 1:
        p.copy_(0.3 * torch.randn(p.shape))
      elif p.ndim == 2 and name == "embed.embeddings.weight":
        p.copy_(torch.randn(p.shape))
      else:  # linear [out, in], conv [out, in, kh, kw], transposed conv [in, out, kh, kw]
        fan_in = p.shape[0] * p[0, 0].numel() if "upsample" in name else p[0].numel()
        p.copy_(torch.randn(p.shape) / fan_in ** 0.5)
  return model


def _write_release(root, state, config, shards=1):
  folder = os.path.join(root, "transformer")
  os.makedirs(folder, exist_ok=True)
  full = {"_class_name": "Transformer2DModel", "_diffusers_version": "0.30.0", "patch_size": 1,
          "in_channels": 64, "guidance_embeds": False, **config}
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(full, f)
  tensors = {k: v.detach().contiguous() for k, v in state.items()}
  if shards == 1:
    save_file(tensors, os.path.join(folder, meissonic.WEIGHTS_FILE))
    return folder
  names = sorted(tensors)
  weight_map = {}
  for i in range(shards):
    shard = f"diffusion_pytorch_model-{i + 1:05d}-of-{shards:05d}.safetensors"
    part = names[i::shards]
    save_file({k: tensors[k] for k in part}, os.path.join(folder, shard))
    weight_map.update({k: shard for k in part})
  with open(os.path.join(folder, meissonic.INDEX_FILE), "w") as f:
    json.dump({"metadata": {}, "weight_map": weight_map}, f)
  return folder


def _inputs(config, grid, batch=3, seed=0):
  """Row 0 partly masked, row 1 unmasked, row 2 fully masked; the pipeline's micro-conds in
  row 0; timesteps 0 (what Di[M]O passes), 0.5 and 1."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, config["codebook_size"], (batch, *grid))
  tokens[0, :, : grid[1] // 2] = MASK_ID
  tokens[2] = MASK_ID
  return dict(
      tokens=tokens.astype(np.int32),
      encoder_hidden_states=rng.standard_normal(
          (batch, TEXT_LEN, config["joint_attention_dim"])).astype(np.float32),
      pooled=rng.standard_normal((batch, config["pooled_projection_dim"])).astype(np.float32),
      micro_conds=np.array([[1024, 1024, 0, 0, 6], [512, 768, 16, 32, 5.5],
                            [1024, 512, 8, 0, 4]], np.float32)[:batch],
      timestep=np.array([0.0, 0.5, 1.0], np.float32)[:batch])


def _reference_logits(model, inputs, downsample):
  """The release's forward as its pipeline calls it, as float32[B, h*w, V] like the Flax module."""
  height, width = inputs["tokens"].shape[1:]
  # The pipeline's ids: `_prepare_latent_image_ids(h, w)` when the model downsamples (1024 px),
  # `(2h, 2w)` otherwise, so that they cover the grid the blocks see.
  img_ids = pipeline_image_ids(height, width) if downsample else pipeline_image_ids(
      2 * height, 2 * width)
  with torch.no_grad():
    logits = model(torch.from_numpy(inputs["tokens"]).long(),
                   torch.from_numpy(inputs["encoder_hidden_states"]),
                   torch.from_numpy(inputs["pooled"]), torch.from_numpy(inputs["timestep"]),
                   img_ids, torch.zeros(TEXT_LEN, 3), torch.from_numpy(inputs["micro_conds"]))
  batch, vocab = logits.shape[:2]
  return logits.reshape(batch, vocab, -1).permute(0, 2, 1).numpy()


def _apply(model, variables, inputs, **kwargs):
  args = [jnp.asarray(inputs[k]) for k in ("tokens", "encoder_hidden_states", "pooled",
                                           "micro_conds", "timestep")]
  return np.asarray(model.apply(variables, *args, **kwargs))


def _convert(name, tmp_path_factory):
  config = RELEASE_LIKE if name == "release_like" else PLAIN
  reference = _reference(config)
  root = str(tmp_path_factory.mktemp(name))
  _write_release(root, reference.state_dict(), config)
  model, variables = meissonic.transformer_from_folder(root)
  return config, GRID[name], reference, model, variables


@pytest.fixture(scope="module")
def release_like(tmp_path_factory):
  return _convert("release_like", tmp_path_factory)


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
  return _convert("plain", tmp_path_factory)


def test_config(release_like, plain):
  for config, _, _, model, _ in (release_like, plain):
    assert model.num_layers == config["num_layers"]
    assert tuple(model.axes_dims_rope) == (8, 12, 12)
    assert model.downsample == config["downsample"] and model.mask_id == MASK_ID


@pytest.mark.parametrize("name", ["release_like", "plain"])
def test_logits_match_reference(request, name):
  config, grid, reference, model, variables = request.getfixturevalue(name)
  inputs = _inputs(config, grid)
  expected = _reference_logits(reference, inputs, config["downsample"])
  logits = _apply(model, variables, inputs)
  assert logits.shape == (3, grid[0] * grid[1], config["codebook_size"])
  assert logits.dtype == np.float32
  error = np.abs(logits - expected).max()
  print(f"meissonic logits max abs error ({name}): {error:.2e}")
  assert np.abs(expected).max() > 1.0  # not a comparison between near-zero outputs
  assert error < 1e-4
  # The masked tokens matter: rows 0 (half masked) and 2 (all masked) differ.
  assert np.abs(logits[0] - logits[2]).max() > 1e-2


def test_remat_and_bfloat16(release_like):
  config, grid, _, model, variables = release_like
  inputs = _inputs(config, grid)
  logits = _apply(model, variables, inputs)
  np.testing.assert_allclose(_apply(model.clone(remat=True), variables, inputs), logits,
                             rtol=0, atol=1e-5)
  low = _apply(model.clone(dtype=jnp.bfloat16), variables, inputs)
  assert low.dtype == np.float32
  assert np.corrcoef(low.ravel(), logits.ravel())[0, 1] > 0.99


def test_emb_noise(release_like):
  config, grid, _, model, variables = release_like
  inputs = _inputs(config, grid)
  clean = _apply(model, variables, inputs)
  key = {"noise": jax.random.PRNGKey(3)}
  np.testing.assert_allclose(_apply(model, variables, inputs, emb_noise=0.0, rngs=key), clean,
                             rtol=0, atol=1e-5)
  noisy = _apply(model, variables, inputs, emb_noise=0.3, rngs=key)
  assert np.abs(noisy - clean).max() > 1e-2
  assert np.abs(_apply(model, variables, inputs, emb_noise=0.3,
                       rngs={"noise": jax.random.PRNGKey(4)}) - noisy).max() > 1e-2
  # At sigma = 1 the token embeddings are all noise: the tokens no longer matter.
  other = dict(inputs, tokens=(inputs["tokens"] + 5) % config["codebook_size"])
  np.testing.assert_allclose(_apply(model, variables, other, emb_noise=1.0, rngs=key),
                             _apply(model, variables, inputs, emb_noise=1.0, rngs=key),
                             rtol=0, atol=1e-5)


def test_noise_formula(release_like):
  """What `down_block` receives is sigma * eps + sqrt(1 - sigma^2) * e, e the output of `embed`,
  eps ~ N(0, I) independent of e (Di[M]O's `noise_emb_perturb`)."""
  config, grid, _, model, variables = release_like
  seen = {}

  def record(next_fun, args, kwargs, context):
    if context.method_name == "__call__" and context.module.name in ("embed", "down_block"):
      out = next_fun(*args, **kwargs)
      seen[context.module.name] = np.asarray(out if context.module.name == "embed" else args[0])
      return out
    return next_fun(*args, **kwargs)

  sigma = 0.6
  with nn.intercept_methods(record):
    _apply(model, variables, _inputs(config, grid), emb_noise=sigma,
           rngs={"noise": jax.random.PRNGKey(1)})
  eps = (seen["down_block"] - np.sqrt(1 - sigma**2) * seen["embed"]) / sigma
  assert abs(eps.mean()) < 0.03 and abs(eps.std() - 1) < 0.03
  assert abs(np.corrcoef(eps.ravel(), seen["embed"].ravel())[0, 1]) < 0.03


def test_sharded_release(tmp_path):
  reference = _reference(PLAIN)
  _write_release(str(tmp_path / "single"), reference.state_dict(), PLAIN)
  _write_release(str(tmp_path / "sharded"), reference.state_dict(), PLAIN, shards=3)
  _, single = meissonic.transformer_from_folder(str(tmp_path / "single" / "transformer"))
  _, sharded = meissonic.transformer_from_folder(str(tmp_path / "sharded"))
  jax.tree.map(np.testing.assert_array_equal, single, sharded)


def _case_missing(state, config):
  del state["single_transformer_blocks.0.attn.norm_k.weight"]
  return "diffusion_pytorch_model.safetensors.*missing keys.*single_transformer_blocks.0.attn.norm_k"


def _case_unexpected(state, config):
  state["transformer_blocks.0.attn.to_out.1.weight"] = torch.zeros(3)
  return "diffusion_pytorch_model.safetensors.*unexpected keys.*transformer_blocks.0.attn.to_out.1"


def _case_shape(state, config):
  state["up_block.upsample.conv.weight"] = torch.zeros(64, 64, 3, 3)
  return (r"diffusion_pytorch_model.safetensors.*up_block.upsample.conv.weight.*"
          r"\(64, 64, 3, 3\).*\(64, 64, 2, 2\)")


def _case_guidance(state, config):
  config["guidance_embeds"] = True
  return "config.json.*guidance_embeds"


def _case_pooled(state, config):
  config["pooled_projection_dim"] = 32
  return "config.json.*pooled_projection_dim 32"


@pytest.mark.parametrize("case", [_case_missing, _case_unexpected, _case_shape, _case_guidance,
                                  _case_pooled])
def test_bad_release_is_refused(tmp_path, case):
  state = dict(_reference(RELEASE_LIKE).state_dict())
  config = dict(RELEASE_LIKE)
  pattern = case(state, config)
  _write_release(str(tmp_path), state, config)
  with pytest.raises(ConversionError, match=pattern):
    meissonic.transformer_from_folder(str(tmp_path))
