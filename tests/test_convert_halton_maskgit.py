"""convert/halton_maskgit.py: a Halton-MaskGIT v1.0 `.pth` becomes a teacher with equal logits."""

from tests.optional import need

need("torch")

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from dimo_jax import defaults, distill, teachers
from dimo_jax.convert import halton_maskgit
from dimo_jax.convert.__main__ import main
from dimo_jax.convert.common import ConversionError
from tests.reference.halton_maskgit_torch import ReferenceMaskTransformer

GRID, WIDTH, DEPTH, HEADS, MLP = 4, 32, 2, 4, 64
CODEBOOK, CLASSES = 16, 5
BATCH = 6


@pytest.fixture(scope="module")
def reference():
  torch.manual_seed(0)
  net = ReferenceMaskTransformer(GRID, WIDTH, DEPTH, HEADS, MLP, CODEBOOK, CLASSES)
  with torch.no_grad():
    # Every LayerNorm affine, every bias and the output bias away from their init values, so a
    # mixed-up norm, a dropped bias or a wrong row/column of `bias` shows in the logits.
    for name, p in net.named_parameters():
      if "norm" in name or name.endswith("bias") or name.startswith(("first_layer.0",
                                                                     "first_layer.4",
                                                                     "last_layer.0",
                                                                     "last_layer.4")):
        p.copy_(torch.randn_like(p) * 0.5 + (1.0 if name.endswith("weight") else 0.0))
  return net.eval()


def _save(path, state, **extra):
  torch.save({"iter": 3, "global_epoch": 1, "model_state_dict": state,
              "optimizer_state_dict": {"state": {}, "param_groups": [{"lr": 1e-4}]}, **extra},
             path)
  return str(path)


@pytest.fixture(scope="module")
def converted(reference, tmp_path_factory):
  tmp = tmp_path_factory.mktemp("halton")
  src = _save(tmp / "current.pth", reference.state_dict())
  dst = str(tmp / "teacher")
  assert main(["halton-maskgit", "--src", src, "--dst", dst, "--num-heads", str(HEADS),
               "--codebook-size", str(CODEBOOK)]) == 0
  return dst


def _inputs():
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, CODEBOOK, (BATCH, GRID, GRID))
  tokens[rng.random(tokens.shape) < 0.4] = CODEBOOK  # the mask id
  labels = rng.integers(0, CLASSES, (BATCH,))
  return tokens, labels


@pytest.mark.parametrize("drop", [False, True])
def test_logits_match_the_torch_reference(reference, converted, drop):
  teacher = teachers.load(converted)
  assert teacher.description["kind"] == "maskgit"
  assert teacher.description["config"] == dict(
      codebook_size=CODEBOOK, num_classes=CLASSES, seq_len=GRID * GRID, hidden_dim=WIDTH,
      depth=DEPTH, num_heads=HEADS, mlp_dim=MLP, dropout=0.1, emb_noise_scale=1.0)
  tokens, labels = _inputs()
  # A mix of kept and dropped labels, so both class-token rows are exercised in one batch too.
  drops = np.full((BATCH,), drop) if drop else np.arange(BATCH) % 2 == 1
  with torch.no_grad():
    want = reference(torch.from_numpy(tokens), torch.from_numpy(labels),
                     torch.from_numpy(drops)).numpy()
  assert want.shape == (BATCH, GRID * GRID, CODEBOOK + 1)
  got = np.asarray(teacher.logits(jnp.asarray(tokens, jnp.int32), jnp.asarray(labels, jnp.int32),
                                  jnp.asarray(drops)))
  assert got.shape == (BATCH, GRID * GRID, CODEBOOK)
  # The release also returns the mask token's column; ours scores the codebook only.
  np.testing.assert_allclose(got, want[..., :CODEBOOK], rtol=0, atol=1e-4)


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod."])
def test_wrapped_state_dicts_convert(reference, converted, tmp_path, prefix):
  state = {prefix + k: v for k, v in reference.state_dict().items()}
  dst = str(tmp_path / "teacher")
  halton_maskgit.convert(_save(tmp_path / "ddp.pth", state), dst, num_heads=HEADS,
                         num_classes=CLASSES)
  ours, plain = teachers.load(dst).variables, teachers.load(converted).variables
  for a, b in zip(jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(plain)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _edited(reference, drop=(), add=None, replace=None):
  state = {k: v for k, v in reference.state_dict().items() if k not in drop}
  state.update(add or {})
  state.update(replace or {})
  return state


@pytest.mark.parametrize("state_edit, key", [
    (dict(drop=["transformer.layers.1.0.fn.mha.out_proj.bias"]),
     "transformer.layers.1.0.fn.mha.out_proj.bias"),
    (dict(drop=["pos_emb"]), "pos_emb"),
    (dict(add={"transformer.layers.0.0.fn.mha.bias_k": torch.zeros(1, 1, WIDTH)}),
     "transformer.layers.0.0.fn.mha.bias_k"),
    (dict(replace={"first_layer.6.weight": torch.zeros(WIDTH, WIDTH + 1)}),
     "first_layer.6.weight"),
    (dict(replace={"bias": torch.zeros(GRID * GRID + 1, CODEBOOK + CLASSES + 1)}), "bias"),
])
def test_bad_state_dicts_are_refused(reference, tmp_path, state_edit, key):
  src = _save(tmp_path / "bad.pth", _edited(reference, **state_edit))
  dst = tmp_path / "teacher"
  with pytest.raises(ConversionError) as e:
    halton_maskgit.convert(src, str(dst), num_heads=HEADS, codebook_size=CODEBOOK)
  assert src in str(e.value) and key in str(e.value)
  assert not dst.exists() and os.listdir(tmp_path) == ["bad.pth"]


def test_other_bad_inputs_are_refused(reference, tmp_path, capsys):
  src = _save(tmp_path / "ok.pth", reference.state_dict())
  dst = tmp_path / "teacher"
  cases = [
      (dict(num_heads=5, codebook_size=CODEBOOK), src, "num_heads 5"),
      # Neither V nor C: ImageNet's 1024 + 1000 do not fit a 23-row table.
      (dict(num_heads=HEADS), src, "tok_emb.weight"),
      (dict(num_heads=HEADS, codebook_size=CODEBOOK, num_classes=CLASSES + 1), src,
       "tok_emb.weight"),
  ]
  text = tmp_path / "notes.pth"
  text.write_text("not a checkpoint\n")
  cases.append((dict(num_heads=HEADS), str(text), "not a readable PyTorch checkpoint"))
  other = str(tmp_path / "lightning.ckpt")
  torch.save({"state_dict": reference.state_dict()}, other)
  cases.append((dict(num_heads=HEADS), other, "model_state_dict"))
  for options, path, words in cases:
    with pytest.raises(ConversionError) as e:
      halton_maskgit.convert(path, str(dst), **options)
    assert path in str(e.value) and words in str(e.value), (options, str(e.value))
    assert not dst.exists()
  # The command line reports the same errors and exits 1.
  assert main(["halton-maskgit", "--src", src, "--dst", str(dst), "--num-heads", "5",
               "--codebook-size", str(CODEBOOK)]) == 1
  assert "num_heads 5" in capsys.readouterr().err and not dst.exists()


def test_distillation_starts_from_a_converted_teacher(converted):
  """A Di[M]O run from the converted checkpoint: finite losses that move, a generator that moves."""
  teacher = teachers.load(converted)
  config = defaults.reference_config()
  config.train_batch_size = 4
  config.mask_value = CODEBOOK
  config.mixed_precision = "no"
  config.lr_scheduler_type = "constant"
  config.generator_lr = config.fake_lr = 1e-3
  config.distill_dropout = False  # a shorter compile; dropout is not what is tested here
  state = distill.create_state(config, teacher.variables, jax.random.PRNGKey(0),
                               teacher.frozen_with_emb)
  step = jax.jit(distill.make_train_step(config, teacher)).lower(
      state, teacher.variables).compile(compiler_options={"xla_backend_optimization_level": 0})
  start, losses = state, []
  for _ in range(5):
    state, metrics = step(state, teacher.variables)
    losses.append(float(metrics["loss_generator"]))
    assert all(np.isfinite(float(v)) for v in metrics.values()), metrics
    assert int(metrics["skipped_generator"]) == 0 and int(metrics["skipped_fake"]) == 0
  assert losses[0] != losses[-1]
  before = jax.tree_util.tree_leaves(start.gen_params["params"]["transformer"])
  after = jax.tree_util.tree_leaves(state.gen_params["params"]["transformer"])
  assert all(np.any(np.asarray(a) != np.asarray(b)) for a, b in zip(before, after))


def _first_layer_input(model, variables, tokens, labels, sigma, monkeypatch, eps):
  """The embeddings entering `first_layer` (after the perturbation and pos_emb), float32[B, L+1, D],
  with the perturbation's eps ~ N(0, I) replaced by `eps`."""
  monkeypatch.setattr(jax.random, "normal", lambda key, shape, dtype=jnp.float32: eps[:, :shape[1]])
  seen = []

  def interceptor(next_fun, args, kwargs, context):
    if context.module.name == "first_layer" and context.method_name == "__call__":
      seen.append(np.asarray(args[0]))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    model.apply(variables, tokens, labels, emb_noise=sigma, rngs={"noise": jax.random.PRNGKey(0)})
  return seen[0]


@pytest.mark.parametrize("sigma", [0.1, 0.3])
def test_embedding_noise_of_a_converted_teacher_is_the_reference_formula(
    reference, converted, monkeypatch, sigma):
  """e <- sigma * eps + sqrt(1 - sigma^2) * e on the release's own (N(0, 1)) embeddings, as
  the reference computes it: the converted teacher carries emb_noise_scale 1.0."""
  teacher = teachers.load(converted)
  assert teacher.model.emb_noise_scale == 1.0
  tokens, labels = _inputs()
  length = GRID * GRID
  eps = np.random.default_rng(1).standard_normal((BATCH, length, WIDTH)).astype(np.float32)
  got = _first_layer_input(teacher.model, teacher.variables, tokens, labels, sigma, monkeypatch,
                           eps)
  state = {k: v.detach().numpy() for k, v in reference.state_dict().items()}
  table, pos = state["tok_emb.weight"], state["pos_emb"]
  ids = np.concatenate([tokens.reshape(BATCH, -1), labels[:, None] + CODEBOOK + 1], axis=1)
  expected = table[ids]
  expected[:, :length] = sigma * eps + np.sqrt(1 - sigma**2) * expected[:, :length]
  np.testing.assert_allclose(got, expected + pos, rtol=1e-5, atol=1e-5)
