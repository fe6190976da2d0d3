"""diffusers-vq conversion: tiny random diffusers.VQModel releases, converted, against diffusers."""

from tests.optional import need

need("torch", "diffusers", "safetensors")

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.torch
import torch
from diffusers import VQModel as DiffusersVQModel

from dimo_jax import tokenizers
from dimo_jax.convert import diffusers_vq
from dimo_jax.convert.common import ConversionError

# Two levels (one Downsample/Upsample), a width change (conv_shortcut on both sides), groups of
# 4 channels, and a codebook as wide as the latents, as in Meissonic (vq_embed_dim null).
CONFIG = {
    "in_channels": 3, "out_channels": 3, "block_out_channels": [32, 64],
    "down_block_types": ["DownEncoderBlock2D"] * 2, "up_block_types": ["UpDecoderBlock2D"] * 2,
    "layers_per_block": 1, "norm_num_groups": 8, "num_vq_embeddings": 16, "latent_channels": 4,
    "vq_embed_dim": None, "lookup_from_codebook": True, "force_upcast": True,
}
SIZE, CODES = 16, 8  # image side, code grid side
WEIGHTS = diffusers_vq.WEIGHTS_FILE


def _reference(attention: bool, seed: int = 0) -> DiffusersVQModel:
  torch.manual_seed(seed)
  model = DiffusersVQModel(**CONFIG, mid_block_add_attention=attention).eval()
  # Every parameter random and away from its initial value (GroupNorm scale 1 / bias 0, zero
  # biases), so that a swapped, untransposed or dropped tensor changes the outputs.
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name == "quantize.embedding.weight":
        p.copy_(torch.randn(p.shape))
      elif p.ndim > 1:
        p.copy_(torch.randn(p.shape) / p[0].numel() ** 0.5)
      elif "norm" in name and name.endswith("weight"):
        p.copy_(1.0 + 0.3 * torch.randn(p.shape))
      else:
        p.copy_(0.3 * torch.randn(p.shape))
  return model


def _write_release(folder: str, model: DiffusersVQModel) -> str:
  model.save_pretrained(folder)
  assert sorted(os.listdir(folder)) == ["config.json", WEIGHTS]
  return folder


@pytest.fixture(scope="module", params=[False, True], ids=["no_mid_attention", "mid_attention"])
def converted(request, tmp_path_factory):
  reference = _reference(request.param)
  root = tmp_path_factory.mktemp("diffusers_vq")
  src = _write_release(str(root / "release"), reference)
  dst = str(root / "converted")
  diffusers_vq.convert(src, dst)
  # The release stores float32; the reference evaluates those same values in float64, so that
  # its own rounding does not count against the 1e-4 budget.
  return reference.double(), tokenizers.load(dst), dst


def test_description(converted):
  reference, tok, _ = converted
  assert tok.description["kind"] == "diffusers-vq"
  assert tok.description["value_range"] == [0.0, 1.0]
  assert tok.description["source"]["format"] == "diffusers"
  model = tok.model
  assert model.downsample_factor == 2 and model.vq_embed_dim == CONFIG["latent_channels"]
  assert model.mid_block_add_attention == reference.config.mid_block_add_attention
  has_attention = "attentions_0" in tok.variables["params"]["decoder"]["mid_block"]
  assert has_attention == reference.config.mid_block_add_attention


def test_decode_matches_diffusers(converted):
  reference, tok, _ = converted
  codes = np.random.default_rng(1).integers(0, CONFIG["num_vq_embeddings"], (2, CODES, CODES))
  with torch.no_grad():
    # As Meissonic's pipeline calls it, before its .clip(0, 1).
    expected = reference.decode(torch.from_numpy(codes), force_not_quantize=True,
                                shape=(2, CODES, CODES, CONFIG["latent_channels"])).sample
  expected = expected.permute(0, 2, 3, 1).numpy()
  images = np.asarray(tok.decode(jnp.asarray(codes, jnp.int32)))
  assert images.shape == (2, SIZE, SIZE, 3) and images.dtype == np.float32
  assert np.abs(expected).max() > 0.5  # the comparison is not between near-zero outputs
  error = np.abs(images - expected).max()
  print(f"decode max abs error vs diffusers (attention="
        f"{reference.config.mid_block_add_attention}): {error:.2e}")
  assert error <= 1e-4


def test_encode_matches_diffusers(converted):
  reference, tok, _ = converted
  images = np.random.default_rng(2).uniform(0, 1, (2, SIZE, SIZE, 3)).astype(np.float32)
  with torch.no_grad():
    x = torch.from_numpy(images).permute(0, 3, 1, 2).double()
    latents_ref = reference.encode(x).latents
    _, _, (_, _, expected_codes) = reference.quantize(latents_ref)
    flat = latents_ref.permute(0, 2, 3, 1).reshape(-1, latents_ref.shape[1])
    distances = torch.cdist(flat, reference.quantize.embedding.weight).numpy()
  expected_codes = expected_codes.numpy().reshape(2, CODES, CODES)
  expected_latents = latents_ref.permute(0, 2, 3, 1).numpy()
  latents = np.asarray(tok.model.apply(tok.variables, jnp.asarray(images),
                                       method=tok.model.latents))
  error = np.abs(latents - expected_latents).max()
  print(f"encoder latents max abs error vs diffusers: {error:.2e}")
  assert error <= 1e-4

  codes = np.asarray(tok.encode(jnp.asarray(images)))
  assert codes.shape == (2, CODES, CODES) and codes.dtype == np.int32
  # Compare ids only where the nearest code wins clearly: a near-tie may flip on rounding.
  nearest_two = np.sort(distances, axis=-1)[:, :2].reshape(2, CODES, CODES, 2)
  clear = nearest_two[..., 1] - nearest_two[..., 0] > 1e-3
  assert clear.mean() > 0.9
  np.testing.assert_array_equal(codes[clear], expected_codes[clear])
  assert len(np.unique(codes)) > 3  # the codebook lookup is exercised, not one constant id


def test_call_is_decode_of_encode(converted):
  _, tok, _ = converted
  images = jnp.asarray(np.random.default_rng(3).uniform(0, 1, (1, SIZE, SIZE, 3)), jnp.float32)
  round_trip = tok.model.apply(tok.variables, images)  # not jitted: rounding may differ
  np.testing.assert_allclose(np.asarray(round_trip), np.asarray(tok.decode(tok.encode(images))),
                             rtol=0, atol=1e-5)


def test_bfloat16_compute(converted):
  _, tok, dst = converted
  codes = jnp.asarray(np.random.default_rng(4).integers(0, 16, (1, CODES, CODES)), jnp.int32)
  tok16 = tokenizers.load(dst, dtype=jnp.bfloat16)
  assert tok16.model.dtype == jnp.bfloat16
  images, images16 = np.asarray(tok.decode(codes)), np.asarray(tok16.decode(codes))
  assert images16.dtype == np.float32
  assert 0 < np.abs(images16 - images).max() < 0.1 * np.abs(images).max()


def test_release_root_and_bfloat16_weights(tmp_path):
  """Meissonic's release root (with vqvae/) converts, and bf16 weights are read without torch."""
  folder = _write_release(str(tmp_path / "release" / "vqvae"), _reference(False))
  weights = os.path.join(folder, WEIGHTS)
  state = {k: v.bfloat16() for k, v in safetensors.torch.load_file(weights).items()}
  safetensors.torch.save_file(state, weights, metadata={"format": "pt"})
  model, variables = diffusers_vq.vqvae_from_folder(str(tmp_path / "release"))
  state = {k: v.float().numpy() for k, v in state.items()}
  params = variables["params"]
  np.testing.assert_array_equal(params["quantize"]["embedding"],
                                state["quantize.embedding.weight"])
  np.testing.assert_array_equal(params["decoder"]["conv_out"]["kernel"],
                                state["decoder.conv_out.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(params["encoder"]["mid_block"]["resnets_1"]["norm2"]["scale"],
                                state["encoder.mid_block.resnets.1.norm2.weight"])
  assert model.block_out_channels == (32, 64)


def _case_missing(state, config):
  del state["decoder.mid_block.attentions.0.to_k.bias"]
  return WEIGHTS, r"missing keys.*decoder.mid_block.attentions.0.to_k.bias"


def _case_unexpected(state, config):
  state["encoder.down_blocks.0.extra.weight"] = torch.zeros(3)
  return WEIGHTS, r"unexpected keys.*encoder.down_blocks.0.extra.weight"


def _case_shape(state, config):
  state["encoder.down_blocks.1.resnets.0.conv_shortcut.weight"] = torch.zeros(64, 32, 3, 3)
  return WEIGHTS, (r"encoder.down_blocks.1.resnets.0.conv_shortcut.weight.*\(64, 32, 3, 3\)"
                   r".*\(64, 32, 1, 1\)")


def _case_linear_shape(state, config):
  state["encoder.mid_block.attentions.0.to_q.weight"] = torch.zeros(64, 32)
  return WEIGHTS, r"encoder.mid_block.attentions.0.to_q.weight.*\(64, 32\).*\(64, 64\)"


def _case_attention_flag(state, config):
  # A config without mid-block attention next to weights that have it.
  config["mid_block_add_attention"] = False
  return WEIGHTS, r"unexpected keys.*mid_block.attentions.0"


def _case_spatial_norm(state, config):
  config["norm_type"] = "spatial"
  return "config.json", "norm_type 'spatial'"


def _case_block_type(state, config):
  config["down_block_types"] = ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]
  return "config.json", "down_block_types.*AttnDownEncoderBlock2D"


def _case_groups(state, config):
  config["norm_num_groups"] = 24
  return "config.json", "block_out_channels.*norm_num_groups 24"


@pytest.mark.parametrize("case", [_case_missing, _case_unexpected, _case_shape,
                                  _case_linear_shape, _case_attention_flag, _case_spatial_norm,
                                  _case_block_type, _case_groups])
def test_bad_release_is_refused(tmp_path, case):
  src = _write_release(str(tmp_path / "release"), _reference(True))
  weights, config_path = os.path.join(src, WEIGHTS), os.path.join(src, "config.json")
  state = safetensors.torch.load_file(weights)
  with open(config_path) as f:
    config = json.load(f)
  culprit, pattern = case(state, config)
  safetensors.torch.save_file(state, weights, metadata={"format": "pt"})
  with open(config_path, "w") as f:
    json.dump(config, f)
  with pytest.raises(ConversionError, match=rf"{culprit}.*{pattern}"):
    diffusers_vq.convert(src, str(tmp_path / "out"))
  assert sorted(os.listdir(tmp_path)) == ["release"]  # no dst, no half-written temporary


def test_not_a_safetensors_file(tmp_path):
  src = _write_release(str(tmp_path / "release"), _reference(False))
  with open(os.path.join(src, WEIGHTS), "wb") as f:
    f.write(b"this is not a safetensors file")
  with pytest.raises(ConversionError, match=rf"{WEIGHTS} is not a readable safetensors file"):
    diffusers_vq.convert(src, str(tmp_path / "out"))
  assert sorted(os.listdir(tmp_path)) == ["release"]


def test_missing_weights(tmp_path):
  src = _write_release(str(tmp_path / "release"), _reference(False))
  os.remove(os.path.join(src, WEIGHTS))
  with pytest.raises(FileNotFoundError, match=WEIGHTS):
    diffusers_vq.convert(src, str(tmp_path / "out"))
  assert sorted(os.listdir(tmp_path)) == ["release"]
