"""google-maskgit: a tiny random checkpoint in maskgit's msgpack layout, converted and compared
against an independent NumPy forward pass (tests/reference/google_maskgit_numpy.py)."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import serialization

from dimo_jax import defaults, distill, teachers
from dimo_jax.convert.__main__ import main
from dimo_jax.convert.common import ConversionError, flatten, unflatten
from dimo_jax.convert.google_maskgit import convert, convert_params
from tests.reference import google_maskgit_numpy as ref

# The CLI cannot pass codebook_size, so the CLI checkpoint keeps the release's 1024 codes;
# everything else is tiny. 2 x 3 tokens so that a transposed layout would show.
CLI = dict(codebook_size=1024, num_classes=3, height=2, width=3, hidden=16, heads=2, layers=2,
           mlp=32)
SMALL = dict(codebook_size=6, num_classes=2, height=2, width=2, hidden=8, heads=2, layers=1,
             mlp=16)


def _release_params(rng, codebook_size, num_classes, height, width, hidden, heads, layers, mlp):
  """The nested "params" dict as maskgit's Transformer names it, every weight random."""

  def w(*shape, scale=1.0):
    return (scale * rng.normal(size=shape)).astype(np.float32)

  def norm():
    return {"scale": 1 + w(hidden, scale=0.2), "bias": w(hidden, scale=0.2)}

  head_dim = hidden // heads
  vocab = codebook_size + num_classes + 1
  params = {
      "Embed_0": {"word_embeddings": {"embedding": w(vocab, hidden)},
                  "position_embeddings": {"embedding": w(height * width + 1, hidden)},
                  "embeddings_ln": norm()},
      "MlmLayer_0": {"mlm_dense": {"kernel": w(hidden, hidden, scale=hidden**-0.5),
                                   "bias": w(hidden, scale=0.1)},
                     "mlm_ln": norm(), "mlm_bias": {"bias": w(vocab)}},
  }
  for i in range(layers):
    qkv = {n: {"kernel": w(hidden, heads, head_dim, scale=hidden**-0.5),
               "bias": w(heads, head_dim, scale=0.1)} for n in ("query", "key", "value")}
    qkv["out"] = {"kernel": w(heads, head_dim, hidden, scale=hidden**-0.5),
                  "bias": w(hidden, scale=0.1)}
    params[f"TransformerLayer_{i}"] = {
        "Attention_0": {"self_attention": qkv, "attention_output_ln": norm()},
        "Mlp_0": {"intermediate_output": {"kernel": w(hidden, mlp, scale=hidden**-0.5),
                                          "bias": w(mlp, scale=0.1)},
                  "layer_output": {"kernel": w(mlp, hidden, scale=mlp**-0.5),
                                   "bias": w(hidden, scale=0.1)},
                  "layer_output_ln": norm()}}
  return params


def _write(path, tree):
  with open(path, "wb") as f:
    f.write(serialization.msgpack_serialize(tree))
  return str(path)


def _release_ids(tokens, labels, codebook_size):
  """Our layout -> the release's: class token label + V first, row-major codes, mask -1."""
  flat = tokens.reshape(tokens.shape[0], -1)
  flat = np.where(flat == codebook_size, -1, flat)
  return np.concatenate([labels[:, None] + codebook_size, flat], axis=1)


def _inputs(rng, size, batch=3):
  v = size["codebook_size"]
  tokens = rng.integers(0, v, (batch, size["height"], size["width"])).astype(np.int32)
  tokens[rng.random(tokens.shape) < 0.4] = v
  tokens[0, 0, 1] = v
  labels = rng.integers(0, size["num_classes"], batch).astype(np.int32)
  return tokens, labels


@pytest.fixture(scope="module")
def cli_checkpoint(tmp_path_factory):
  rng = np.random.default_rng(0)
  params = _release_params(rng, **CLI)
  path = _write(tmp_path_factory.mktemp("release") / "maskgit_imagenet256_checkpoint",
                {"params": params})
  return path, params


def test_cli_conversion_matches_numpy_reference(cli_checkpoint, tmp_path):
  src, params = cli_checkpoint
  dst = str(tmp_path / "teacher")
  assert main(["google-maskgit", "--src", src, "--dst", dst]) == 0
  teacher = teachers.load(dst)
  assert teacher.description["kind"] == "google-maskgit"
  assert teacher.description["config"] == dict(
      codebook_size=1024, num_classes=3, seq_len=6, hidden_size=16, num_layers=2, num_heads=2,
      intermediate_size=32, dropout=0.1)
  model = teacher.model
  assert (model.mask_id, model.seq_len, model.codebook_size, model.num_classes) == (
      1024, 6, 1024, 3)

  tokens, labels = _inputs(np.random.default_rng(1), CLI)
  got = np.asarray(teacher.logits(jnp.asarray(tokens), jnp.asarray(labels),
                                  jnp.zeros((3,), bool)))
  expected = ref.forward({"params": params}, _release_ids(tokens, labels, 1024))
  assert got.shape == (3, 6, 1024) and got.dtype == np.float32
  np.testing.assert_allclose(got, expected[:, 1:, :1024], atol=1e-4, rtol=0)
  # The label matters: the class token is read.
  other = np.asarray(teacher.logits(jnp.asarray(tokens), jnp.asarray((labels + 1) % 3),
                                    jnp.zeros((3,), bool)))
  assert np.abs(other - got).max() > 1e-3


@pytest.fixture(scope="module")
def small():
  rng = np.random.default_rng(2)
  params = _release_params(rng, **SMALL)
  model, variables = convert_params("small", {"params": params}, codebook_size=6)
  return params, model, variables


def test_codebook_size_option_and_train_state_wrappers(small):
  params, model, variables = small
  assert (model.codebook_size, model.num_classes, model.seq_len) == (6, 2, 4)
  tokens, labels = _inputs(np.random.default_rng(3), SMALL)
  got = np.asarray(model.apply(variables, jnp.asarray(tokens), jnp.asarray(labels)))
  expected = ref.forward({"params": params}, _release_ids(tokens, labels, 6))
  np.testing.assert_allclose(got, expected[:, 1:, :6], atol=1e-4, rtol=0)
  # A bare tree and an old flax.optim state find the same parameters.
  for tree in (params, {"optimizer": {"target": {"params": params}, "state": {"step": 3}}}):
    _, wrapped = convert_params("state", tree, codebook_size=6)
    for key, value in flatten(variables).items():
      np.testing.assert_array_equal(flatten(wrapped)[key], value)


def test_emb_noise_and_drop_label(small):
  _, model, variables = small
  tokens, labels = _inputs(np.random.default_rng(4), SMALL)
  tokens, labels = jnp.asarray(tokens), jnp.asarray(labels)
  plain = model.apply(variables, tokens, labels)
  noised = jax.jit(lambda sigma, key: model.apply(variables, tokens, labels, emb_noise=sigma,
                                                  rngs={"noise": key}))
  key = jax.random.PRNGKey(5)
  np.testing.assert_allclose(noised(0.0, key), plain, atol=1e-5)
  noisy = noised(0.5, key)
  assert np.abs(noisy - plain).max() > 1e-3
  np.testing.assert_array_equal(noisy, noised(0.5, key))

  assert teachers.KINDS["google-maskgit"].guidance is False
  np.testing.assert_array_equal(model.apply(variables, tokens, labels, jnp.zeros(3, bool)), plain)
  drop = jnp.array([False, True, False])
  with pytest.raises(ValueError, match="no unconditional token"):
    model.apply(variables, tokens, labels, drop)
  traced = jax.jit(lambda d: model.apply(variables, tokens, labels, d))(drop)
  assert np.all(np.isnan(traced[1])) and np.all(np.isfinite(traced[jnp.array([0, 2])]))


def test_fix_emb_layer_freezes_the_tables_and_output_bias(small):
  """distill's optimizer labels, driven by the kind's frozen_with_emb, freeze exactly those."""
  from dimo_jax import distill
  _, _, variables = small
  labels = flatten(distill.trainable_labels(
      variables, True, teachers.KINDS["google-maskgit"].frozen_with_emb))
  frozen = {k for k, v in labels.items() if v == "frozen"}
  assert frozen == {"params/Embed_0/word_embeddings/embedding",
                    "params/Embed_0/position_embeddings/embedding",
                    "params/MlmLayer_0/mlm_bias/bias"}
  assert set(labels.values()) == {"frozen", "train"}


def _broken(params, edit):
  flat = flatten(params)
  edit(flat)
  return unflatten(flat)


LN = "TransformerLayer_0/Mlp_0/layer_output_ln/scale"


@pytest.mark.parametrize("edit, words", [
    (lambda f: f.pop(LN), ["missing", LN]),
    (lambda f: f.pop("Embed_0/word_embeddings/embedding"),
     ["missing", "Embed_0/word_embeddings/embedding"]),
    (lambda f: f.update({"TransformerLayer_0/Mlp_0/extra/kernel": np.zeros(3, np.float32)}),
     ["unexpected", "TransformerLayer_0/Mlp_0/extra/kernel"]),
    (lambda f: f.update({"TransformerLayer_2/Mlp_0/layer_output/bias": np.zeros(8, np.float32)}),
     ["missing", "TransformerLayer_1/"]),
    (lambda f: f.update({LN: np.ones(9, np.float32)}), [LN, "(9,)", "(8,)"]),
])
def test_bad_checkpoints_name_file_and_key(small, tmp_path, edit, words):
  params = small[0]
  src = _write(tmp_path / "ckpt", {"params": _broken(params, edit)})
  dst = tmp_path / "teacher"
  with pytest.raises(ConversionError) as error:
    convert(src, str(dst), codebook_size=6)
  for word in [src] + words:
    assert word in str(error.value)
  assert not dst.exists() and os.listdir(tmp_path) == ["ckpt"]


def test_not_a_checkpoint_and_wrong_heads(small, tmp_path):
  src = tmp_path / "garbage"
  src.write_bytes(b"\xc1 this is not msgpack")
  dst = tmp_path / "teacher"
  with pytest.raises(ConversionError, match=str(src)):
    convert(str(src), str(dst))
  assert main(["google-maskgit", "--src", str(src), "--dst", str(dst)]) == 1
  good = _write(tmp_path / "ckpt", {"params": small[0]})
  with pytest.raises(ConversionError, match="num_heads=4"):
    convert(good, str(dst), codebook_size=6, num_heads=4)
  with pytest.raises(ConversionError, match="1024"):
    convert(good, str(dst))  # 9 vocabulary rows cannot hold 1024 codes
  assert not dst.exists()


def test_one_distillation_step_is_finite(small):
  _, model, teacher = small
  c = defaults.reference_config()
  c.train_batch_size = 2
  c.mask_value = model.mask_id
  c.mixed_precision = "no"
  c.true_cfg = 1.0
  c.lr_scheduler_type = "constant"
  state = distill.create_state(c, teacher, jax.random.PRNGKey(1),
                               teachers.of_module(model).frozen_with_emb)
  step_fn = distill.make_train_step(c, teachers.of_module(model))
  step = jax.jit(step_fn).lower(state, teacher).compile(
      compiler_options={"xla_backend_optimization_level": 0})
  state, metrics = step(state, teacher)
  assert np.isfinite(float(metrics["loss_generator"]))
  assert int(metrics["skipped_generator"]) == 0 and int(metrics["skipped_fake"]) == 0
  assert int(state.step) == 1


def test_a_run_refuses_guidance_for_this_teacher(small):
  from dimo_jax import config_check
  GOOGLE = teachers.of_module(small[1])
  c = defaults.reference_config()  # true_cfg 2, cfg_w 3, condition dropout 0.1
  with pytest.raises(ValueError, match="true_cfg.*cfg_w") as e:
    config_check.check_guidance(c, GOOGLE)
  assert "fake_cfg_drop_ratio" in str(e.value)
  c.update(true_cfg=1.0, cfg_w=0.0, fake_cfg_drop_ratio=0.0)
  config_check.check_guidance(c, GOOGLE)
  c.true_cfg = 3.0
  config_check.check_guidance(c, GOOGLE, keys=("cfg_w",))  # what sampling alone checks
