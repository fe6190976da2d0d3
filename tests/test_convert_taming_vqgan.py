"""taming-vqgan conversion: a tiny random taming release, converted, against a torch reference."""

from tests.optional import need

need("torch", "yaml")

import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import yaml

from dimo_jax import tokenizers
from dimo_jax.convert import taming_vqgan
from dimo_jax.convert.__main__ import main
from dimo_jax.convert.common import ConversionError
from tests.reference.taming_torch import TamingVQModel

# Two levels (so one Downsample/Upsample), a width change (nin_shortcut on both sides) and
# attention inside the 8x8 levels as well as in `mid`.
DDCONFIG = {"double_z": False, "z_channels": 8, "resolution": 16, "in_channels": 3, "out_ch": 3,
            "ch": 32, "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [8],
            "dropout": 0.0}
N_EMBED, EMBED_DIM = 16, 8
CONFIG = {
    "model": {
        "base_learning_rate": 4.5e-6,
        "target": "taming.models.vqgan.VQModel",
        "params": {
            "embed_dim": EMBED_DIM, "n_embed": N_EMBED, "ddconfig": DDCONFIG,
            "lossconfig": {"target": "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator",
                           "params": {"disc_start": 250001, "disc_weight": 0.8}},
        },
    },
}


def _reference() -> TamingVQModel:
  torch.manual_seed(0)
  model = TamingVQModel(DDCONFIG, N_EMBED, EMBED_DIM).eval()
  # Every parameter random and away from its default (GroupNorm scale 1 / bias 0, zero-ish
  # biases), so that a swapped or untransposed tensor changes the outputs.
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name == "quantize.embedding.weight":
        p.copy_(torch.randn(p.shape))
      elif p.ndim == 4:
        p.copy_(torch.randn(p.shape) / p[0].numel() ** 0.5)
      elif "norm" in name and name.endswith("weight"):
        p.copy_(1.0 + 0.3 * torch.randn(p.shape))
      else:
        p.copy_(0.3 * torch.randn(p.shape))
  return model


def _write_release(folder, state, config=CONFIG):
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, "model.yaml"), "w") as f:
    yaml.safe_dump(config, f)
  checkpoint = {"epoch": 7, "global_step": 1234, "pytorch-lightning_version": "1.0.8",
                "state_dict": state}
  torch.save(checkpoint, os.path.join(folder, "last.ckpt"))


def _release_state(model):
  """The model's state dict plus the loss entries a real release carries."""
  state = dict(model.state_dict())
  state["loss.logvar"] = torch.zeros(())
  state["loss.discriminator.main.0.weight"] = torch.randn(64, 3, 4, 4)
  state["loss.perceptual_loss.net.slice1.0.weight"] = torch.randn(64, 3, 3, 3)
  return state


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  reference = _reference()
  root = tmp_path_factory.mktemp("taming")
  src, dst = str(root / "release"), str(root / "converted")
  _write_release(src, _release_state(reference))
  assert main(["taming-vqgan", "--src", src, "--dst", dst]) == 0
  # The release stores float32; the reference evaluates those same values in float64, because
  # torch's float32 CPU forward itself drifts by ~5e-2 on the low-amplitude encode case below.
  return reference.double(), tokenizers.load(dst)


def test_description(converted):
  _, tok = converted
  assert tok.description["kind"] == "taming-vqgan"
  assert tok.description["source"]["format"] == "taming-transformers"
  assert tok.model.downsample_factor == 2
  assert tok.model.n_embed == N_EMBED and tuple(tok.model.ch_mult) == (1, 2)


def test_decode_matches_reference(converted):
  reference, tok = converted
  codes = np.random.default_rng(1).integers(0, N_EMBED, (2, 8, 8))
  with torch.no_grad():
    expected = reference.decode(torch.from_numpy(codes)).permute(0, 2, 3, 1).numpy()
  images = np.asarray(tok.decode(jnp.asarray(codes, jnp.int32)))
  assert images.shape == (2, 16, 16, 3) and images.dtype == np.float32
  assert np.abs(expected).max() > 0.5  # the comparison is not between near-zero outputs
  np.testing.assert_allclose(images, expected, rtol=0, atol=1e-4)


# At amplitude 1e-3 the first GroupNorm (one channel a group) sees a variance near its epsilon,
# so a wrong epsilon or variance formula shows.
@pytest.mark.parametrize("amplitude", [1.0, 1e-3])
def test_encode_matches_reference(converted, amplitude):
  reference, tok = converted
  images = np.random.default_rng(2).uniform(-amplitude, amplitude, (2, 16, 16, 3))
  images = images.astype(np.float32)
  with torch.no_grad():
    x = torch.from_numpy(images).permute(0, 3, 1, 2).double()
    expected_latents = reference.latents(x).permute(0, 2, 3, 1).numpy()
    expected_codes, distances = reference.encode(x)
  latents = tok.model.apply(tok.variables, jnp.asarray(images), method=tok.model.latents)
  np.testing.assert_allclose(np.asarray(latents), expected_latents, rtol=0, atol=1e-4)

  codes = np.asarray(tok.encode(jnp.asarray(images)))
  assert codes.shape == (2, 8, 8) and codes.dtype == np.int32
  # Compare ids only where the nearest code wins clearly: a near-tie may flip on rounding.
  nearest_two = np.sort(distances.numpy(), axis=-1)[..., :2]
  clear = nearest_two[..., 1] - nearest_two[..., 0] > 1e-3
  assert clear.mean() > 0.9
  np.testing.assert_array_equal(codes[clear], expected_codes.numpy()[clear])
  assert len(np.unique(codes)) > 3  # the codebook lookup is exercised, not one constant id


def _case_missing(state, config):
  del state["decoder.up.1.attn.1.k.bias"]
  return "decoder.up.1.attn.1.k.bias"


def _case_unexpected(state, config):
  state["encoder.down.0.extra.weight"] = torch.zeros(3)
  return "encoder.down.0.extra.weight"


def _case_shape(state, config):
  state["encoder.down.1.block.0.nin_shortcut.weight"] = torch.zeros(64, 32, 3, 3)
  return r"encoder.down.1.block.0.nin_shortcut.weight.*\(64, 32, 3, 3\).*\(64, 32, 1, 1\)"


def _case_yaml_key(state, config):
  del config["model"]["params"]["ddconfig"]["z_channels"]
  return "model.params.ddconfig.z_channels"


def _case_double_z(state, config):
  config["model"]["params"]["ddconfig"]["double_z"] = True
  return "double_z"


@pytest.mark.parametrize("case", [_case_missing, _case_unexpected, _case_shape, _case_yaml_key,
                                  _case_double_z])
def test_bad_release_is_refused(tmp_path, case):
  state = _release_state(_reference())
  config = yaml.safe_load(yaml.safe_dump(CONFIG))
  pattern = case(state, config)
  src, dst = str(tmp_path / "release"), str(tmp_path / "out")
  _write_release(src, state, config)
  culprit = "model.yaml" if case in (_case_yaml_key, _case_double_z) else "last.ckpt"
  with pytest.raises(ConversionError, match=rf"{culprit}.*{pattern}"):
    taming_vqgan.convert(src, dst)
  assert sorted(os.listdir(tmp_path)) == ["release"]  # no dst, no half-written temporary


def test_not_a_checkpoint(tmp_path):
  src = tmp_path / "release"
  _write_release(str(src), _release_state(_reference()))
  (src / "last.ckpt").write_bytes(b"this is not a zip archive")
  with pytest.raises(ConversionError, match=r"last.ckpt is not a readable PyTorch checkpoint"):
    taming_vqgan.convert(str(src), str(tmp_path / "out"))
  assert sorted(os.listdir(tmp_path)) == ["release"]


def test_missing_config(tmp_path):
  src = tmp_path / "release"
  _write_release(str(src), _release_state(_reference()))
  os.remove(src / "model.yaml")
  with pytest.raises(FileNotFoundError, match="model.yaml"):
    taming_vqgan.convert(str(src), str(tmp_path / "out"))
  assert main(["taming-vqgan", "--src", str(src), "--dst", str(tmp_path / "out")]) == 1
  assert sorted(os.listdir(tmp_path)) == ["release"]
