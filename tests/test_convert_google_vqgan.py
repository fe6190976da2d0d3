"""google-vqgan: a tiny random checkpoint in maskgit's msgpack layout, converted and compared
against an independent NumPy forward pass (tests/reference/google_vqgan_numpy.py)."""

import os

import jax
import numpy as np
import pytest
from flax import serialization

from dimo_jax import tokenizers
from dimo_jax.convert.__main__ import main
from dimo_jax.convert.common import ConversionError
from dimo_jax.convert.google_vqgan import convert
from dimo_jax.models.google_vqgan import VQGAN
from tests.reference import google_vqgan_numpy as ref

# Two levels (f2), 32 filters so the release's 32-group GroupNorm applies, 16x16 images.
TINY = dict(filters=32, num_res_blocks=2, channel_multipliers=(1, 2), embedding_dim=8,
            codebook_size=16, conv_downsample=False)
# Three levels (f4) with strided-conv downsampling, one block a level.
STRIDED = dict(filters=32, num_res_blocks=1, channel_multipliers=(1, 1, 2), embedding_dim=4,
               codebook_size=8, conv_downsample=True)


def _release_params(rng, filters, num_res_blocks, channel_multipliers, embedding_dim,
                    codebook_size, conv_downsample):
  """The nested "params" dict as maskgit's VQVAE names it, every weight random."""

  def conv(k, cin, cout, bias=True):
    p = {"kernel": rng.normal(size=(k, k, cin, cout)).astype(np.float32) / np.sqrt(k * k * cin)}
    if bias:
      p["bias"] = (0.1 * rng.normal(size=cout)).astype(np.float32)
    return p

  def norm(c):
    return {"scale": (1 + 0.2 * rng.normal(size=c)).astype(np.float32),
            "bias": (0.2 * rng.normal(size=c)).astype(np.float32)}

  def block(cin, cout):
    p = {"GroupNorm_0": norm(cin), "Conv_0": conv(3, cin, cout, bias=False),
         "GroupNorm_1": norm(cout), "Conv_1": conv(3, cout, cout, bias=False)}
    if cin != cout:
      p["Conv_2"] = conv(1, cout, cout, bias=False)
    return p

  widths = [filters * m for m in channel_multipliers]
  levels = len(widths)
  encoder, blocks, convs, width = {"Conv_0": conv(3, 3, filters, bias=False)}, [], 1, filters
  for i, w in enumerate(widths):
    for _ in range(num_res_blocks):
      blocks.append(block(width, w))
      width = w
    if i < levels - 1 and conv_downsample:
      encoder[f"Conv_{convs}"] = conv(4, w, w)
      convs += 1
  blocks += [block(width, width) for _ in range(num_res_blocks)]
  encoder.update({f"ResBlock_{i}": b for i, b in enumerate(blocks)})
  encoder["GroupNorm_0"] = norm(width)
  encoder[f"Conv_{convs}"] = conv(1, width, embedding_dim)

  decoder, blocks = {"Conv_0": conv(3, embedding_dim, widths[-1])}, []
  width = widths[-1]
  blocks += [block(width, width) for _ in range(num_res_blocks)]
  for step, w in enumerate(reversed(widths)):
    for _ in range(num_res_blocks):
      blocks.append(block(width, w))
      width = w
    if step < levels - 1:
      decoder[f"Conv_{step + 1}"] = conv(3, w, w)
  decoder.update({f"ResBlock_{i}": b for i, b in enumerate(blocks)})
  decoder["GroupNorm_0"] = norm(width)
  decoder[f"Conv_{levels}"] = conv(3, width, 3)

  codebook = rng.normal(size=(codebook_size, embedding_dim)).astype(np.float32)
  return {"encoder": encoder, "decoder": decoder, "quantizer": {"codebook": codebook}}


def _write(path, tree):
  with open(path, "wb") as f:
    f.write(serialization.msgpack_serialize(tree))
  return str(path)


def _params_with_spread_codebook(rng, config, images):
  """Random params whose codebook spans the latents, so the images use several codes."""
  params = _release_params(rng, **config)
  z = ref.latents(params, images, config["num_res_blocks"], len(config["channel_multipliers"]),
                  config["conv_downsample"]).reshape(-1, config["embedding_dim"])
  params["quantizer"]["codebook"] = (z.mean(0) + z.std(0) * rng.normal(
      size=params["quantizer"]["codebook"].shape)).astype(np.float32)
  return params


@pytest.mark.parametrize("config", [TINY, STRIDED], ids=["avgpool", "strided"])
def test_matches_numpy_reference(tmp_path, config):
  rng = np.random.default_rng(0)
  images = rng.uniform(size=(2, 16, 16, 3)).astype(np.float32)
  params = _params_with_spread_codebook(rng, config, images)
  src = _write(tmp_path / "tokenizer_checkpoint", {"params": params})
  dst = str(tmp_path / "tok")
  assert main(["google-vqgan", "--src", src, "--dst", dst]) == 0

  tok = tokenizers.load(dst)
  assert tok.description["kind"] == "google-vqgan"
  assert tok.description["config"] == {**config,
                                       "channel_multipliers": list(config["channel_multipliers"])}
  nrb, levels = config["num_res_blocks"], len(config["channel_multipliers"])
  f = 2 ** (levels - 1)
  assert tok.model.downsample_factor == f

  z_ref = ref.latents(params, images, nrb, levels, config["conv_downsample"])
  z = tok.model.apply(tok.variables, images, method=tok.model.latents)
  np.testing.assert_allclose(np.asarray(z), z_ref, rtol=0, atol=1e-4)

  codes_ref = ref.quantize(params, z_ref)
  # Guard against near-ties that float32 rounding could legitimately flip.
  codebook = params["quantizer"]["codebook"].astype(np.float64)
  d = np.sort(((z_ref[..., None, :] - codebook) ** 2).sum(-1), axis=-1)
  assert (d[..., 1] - d[..., 0]).min() > 1e-4
  assert len(np.unique(codes_ref)) > 1
  codes = tok.encode(images)
  assert codes.dtype == np.int32 and codes.shape == (2, 16 // f, 16 // f)
  np.testing.assert_array_equal(np.asarray(codes), codes_ref)

  other = rng.integers(0, config["codebook_size"], size=codes_ref.shape)
  for c in (codes_ref, other):
    out = tok.decode(c.astype(np.int32))
    assert out.shape == (2, 16, 16, 3) and out.dtype == np.float32
    np.testing.assert_allclose(np.asarray(out), ref.decode(params, c, nrb, levels),
                               rtol=0, atol=1e-4)

  roundtrip = tok.model.apply(tok.variables, images)
  np.testing.assert_allclose(np.asarray(roundtrip), np.asarray(tok.decode(codes)),
                             rtol=0, atol=1e-5)


def _corrupt_missing(params):
  del params["encoder"]["ResBlock_1"]["GroupNorm_0"]["scale"]
  return {"params": params}, "encoder/ResBlock_1/GroupNorm_0/scale"


def _corrupt_missing_codebook(params):
  del params["quantizer"]["codebook"]
  return {"params": params}, "quantizer/codebook"


def _corrupt_unexpected(params):
  params["decoder"]["ResBlock_1"]["Conv_7"] = {"kernel": np.zeros((1, 1, 64, 64), np.float32)}
  return {"params": params}, "decoder/ResBlock_1/Conv_7/kernel"


def _corrupt_shape(params):
  params["decoder"]["Conv_0"]["bias"] = np.zeros((63,), np.float32)
  return {"params": params}, "decoder/Conv_0/bias"


def _corrupt_no_params(params):
  return {"target": params}, "params"


@pytest.mark.parametrize("corrupt", [_corrupt_missing, _corrupt_missing_codebook,
                                     _corrupt_unexpected, _corrupt_shape, _corrupt_no_params])
def test_bad_checkpoint_names_file_and_key_and_writes_nothing(tmp_path, corrupt):
  tree, key = corrupt(_release_params(np.random.default_rng(1), **TINY))
  src = _write(tmp_path / "tokenizer_checkpoint", tree)
  dst = str(tmp_path / "tok")
  with pytest.raises(ConversionError) as info:
    convert(src, dst)
  assert src in str(info.value) and key in str(info.value)
  if corrupt is _corrupt_shape:
    assert "(63,)" in str(info.value) and "(64,)" in str(info.value)
  assert not os.path.exists(dst)
  assert main(["google-vqgan", "--src", src, "--dst", dst]) == 1
  assert not os.path.exists(dst)


def test_not_a_msgpack_file(tmp_path):
  src = tmp_path / "tokenizer_checkpoint"
  src.write_bytes(b"\xc1 this is not msgpack \x00\xff")
  dst = str(tmp_path / "tok")
  with pytest.raises(ConversionError, match=str(src)):
    convert(str(src), dst)
  assert not os.path.exists(dst)


def test_release_defaults_match_imagenet_tokenizer():
  model = VQGAN()
  abstract = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), np.zeros((1, 16, 16, 3))))
  params = abstract["params"]
  assert model.downsample_factor == 16
  assert params["quantizer"]["codebook"].shape == (1024, 256)
  assert params["encoder"]["Conv_1"]["kernel"].shape == (1, 1, 512, 256)
  assert params["decoder"]["Conv_5"]["kernel"].shape == (3, 3, 128, 3)
  assert sorted(k for k in params["encoder"] if k.startswith("ResBlock")) == sorted(
      f"ResBlock_{i}" for i in range(12))
