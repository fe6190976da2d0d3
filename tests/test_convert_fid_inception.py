"""fid-inception conversion: random pytorch-fid weights, converted, against a torch reference."""

from tests.optional import need

need("torch")

import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch.nn import functional as F

from dimo_jax.convert import fid_inception
from dimo_jax.convert.common import ConversionError
from dimo_jax.models import fid_inception as model_lib
from tests.reference.fid_inception_torch import FIDInceptionReference, randomize

RELEASE_NAME = "pt_inception-2015-12-05-6726825d.pth"


@pytest.fixture(scope="module")
def reference():
  model = FIDInceptionReference().eval()
  randomize(model, torch.Generator().manual_seed(0))
  return model


@pytest.fixture(scope="module")
def release_state(reference):
  """The reference's state dict: the release's keys, num_batches_tracked counters included."""
  return {k: v.clone() for k, v in reference.state_dict().items()}


@pytest.fixture(scope="module")
def converted(tmp_path_factory, reference, release_state):
  root = tmp_path_factory.mktemp("fid")
  src, dst = str(root / RELEASE_NAME), str(root / "converted")
  torch.save(release_state, src)
  fid_inception.convert(src, dst)
  # The reference evaluates the released float32 values in float64, so the measured difference
  # is the Flax port's float32 error alone.
  return reference.double(), model_lib.load(dst)


def test_description(converted):
  _, extractor = converted
  assert extractor.description["kind"] == "fid-inception"
  assert extractor.description["source"]["format"] == "pytorch-fid"
  assert set(extractor.variables) == {"params", "batch_stats"}


@pytest.mark.parametrize("shape", [(2, 64, 64), (1, 299, 299)])
def test_matches_reference(converted, shape):
  reference, extractor = converted
  batch, height, width = shape
  images = np.random.default_rng(height).uniform(0, 1, (batch, height, width, 3))
  images = images.astype(np.float32)
  with torch.no_grad():
    expected_pool, expected_logits = reference(
        torch.from_numpy(images).permute(0, 3, 1, 2).double())
  pool, logits = extractor(jnp.asarray(images))
  assert pool.shape == (batch, 2048) and logits.shape == (batch, 1008)
  assert pool.dtype == jnp.float32 and logits.dtype == jnp.float32
  pool_error = np.abs(np.asarray(pool) - expected_pool.numpy()).max()
  logits_error = np.abs(np.asarray(logits) - expected_logits.numpy()).max()
  print(f"{shape}: max |pool - reference| {pool_error:.2e} (pool max "
        f"{expected_pool.abs().max():.2f}), max |logits - reference| {logits_error:.2e} "
        f"(logits max {expected_logits.abs().max():.2f})")
  # Outputs of order one, and images whose outputs differ by far more than the tolerance: the
  # comparison sees what the network makes of its input, not only what its biases make.
  assert expected_pool.abs().max() > 0.5 and expected_logits.abs().max() > 0.5
  if batch > 1:
    assert (expected_pool[0] - expected_pool[1]).abs().max() > 1e-2
  assert pool_error <= 1e-4 and logits_error <= 1e-4


# Growing, shrinking (where antialiasing would differ), non-square and already-299 inputs.
@pytest.mark.parametrize("size", [(7, 7), (64, 40), (299, 299), (512, 333), (300, 1000)])
def test_resize_is_torch_bilinear(size):
  images = np.random.default_rng(0).uniform(0, 1, (2, *size, 3)).astype(np.float32)
  expected = F.interpolate(torch.from_numpy(images).permute(0, 3, 1, 2).double(),
                           size=(299, 299), mode="bilinear", align_corners=False)
  resized = np.asarray(model_lib.resize_input(jnp.asarray(images)))
  assert resized.shape == (2, 299, 299, 3)
  np.testing.assert_allclose(resized, expected.permute(0, 2, 3, 1).numpy(), rtol=0, atol=1e-5)


def _case_missing(state):
  del state["Mixed_6c.branch7x7dbl_4.bn.running_var"]
  return r"missing keys.*Mixed_6c.branch7x7dbl_4.bn.running_var"


def _case_unexpected(state):
  state["AuxLogits.fc.weight"] = torch.zeros(1008, 768)
  return r"unexpected keys.*AuxLogits.fc.weight"


def _case_shape(state):
  state["Mixed_7c.branch3x3_2b.conv.weight"] = torch.zeros(384, 384, 1, 3)
  return r"Mixed_7c.branch3x3_2b.conv.weight.*\(384, 384, 1, 3\).*\(384, 384, 3, 1\)"


def _case_fc_shape(state):
  state["fc.weight"] = torch.zeros(1000, 2048)
  return r"fc.weight.*\(1000, 2048\).*\(1008, 2048\)"


@pytest.mark.parametrize("case", [_case_missing, _case_unexpected, _case_shape, _case_fc_shape])
def test_bad_release_is_refused(tmp_path, release_state, case):
  state = dict(release_state)
  pattern = case(state)
  src, dst = str(tmp_path / RELEASE_NAME), str(tmp_path / "out")
  torch.save(state, src)
  with pytest.raises(ConversionError, match=rf"{RELEASE_NAME}: .*{pattern}"):
    fid_inception.convert(src, dst)
  assert sorted(os.listdir(tmp_path)) == [RELEASE_NAME]  # no dst, no half-written temporary


def test_not_a_state_dict(tmp_path):
  src = tmp_path / RELEASE_NAME
  torch.save([torch.zeros(3)], str(src))
  with pytest.raises(ConversionError, match=rf"{RELEASE_NAME}: expected a state dict"):
    fid_inception.convert(str(src), str(tmp_path / "out"))
  src.write_bytes(b"this is not a zip archive")
  with pytest.raises(ConversionError, match=rf"{RELEASE_NAME} is not a readable PyTorch"):
    fid_inception.convert(str(src), str(tmp_path / "out"))
  assert sorted(os.listdir(tmp_path)) == [RELEASE_NAME]
