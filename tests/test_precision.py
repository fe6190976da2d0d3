"""Memory knobs change where bytes go, not what is computed: remat and a bf16-held teacher."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dimo_jax import checkpoints, dtypes, modeldir, parallel, teachers, train
from dimo_jax.models.google_maskgit import GoogleMaskGIT
from dimo_jax.models.maskgit import MaskTransformer
from tests.test_train import recipe_steps, tiny_config, tiny_teacher

MODELS = {
    "maskgit": lambda remat: MaskTransformer(codebook_size=12, num_classes=3, seq_len=6,
                                             hidden_dim=16, depth=2, num_heads=2, mlp_dim=32,
                                             dropout=0.1, remat=remat),
    "google-maskgit": lambda remat: GoogleMaskGIT(codebook_size=12, num_classes=3, seq_len=6,
                                                  hidden_size=16, num_layers=2, num_heads=2,
                                                  intermediate_size=32, dropout=0.1,
                                                  remat=remat),
}


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_remat_keeps_parameters_and_gradients(kind):
  tokens = jax.random.randint(jax.random.PRNGKey(1), (4, 6), 0, 13)
  labels = jnp.array([0, 1, 2, 0])
  plain, remat = MODELS[kind](False), MODELS[kind](True)
  variables = plain.init(jax.random.PRNGKey(0), tokens, labels)
  shapes = lambda tree: jax.tree_util.tree_map(jnp.shape, tree)
  assert shapes(remat.init(jax.random.PRNGKey(0), tokens, labels)) == shapes(variables)

  def grads(model):
    # Dropout on, so the recomputed forward must draw the same masks as the stored one.
    loss = lambda v: jnp.sum(jnp.tanh(model.apply(
        v, tokens, labels, deterministic=False, rngs={"dropout": jax.random.PRNGKey(2)})))
    return jax.jit(jax.grad(loss))(variables)

  g_plain, g_remat = grads(plain), grads(remat)
  moved = max(float(jnp.max(jnp.abs(g))) for g in jax.tree_util.tree_leaves(g_plain))
  assert moved > 1e-3
  # Recomputation regroups float sums (about 1e-5 relative); other dropout masks or a missing
  # layer would change gradients by their own size.
  for a, b in zip(jax.tree_util.tree_leaves(g_plain), jax.tree_util.tree_leaves(g_remat)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_remat_is_not_written_into_model_json():
  assert "remat" not in modeldir.module_config(MODELS["maskgit"](True))


def test_remat_step_matches_and_bf16_teacher_halves_its_bytes(tmp_path):
  path = tiny_teacher(str(tmp_path / "teacher"))
  teacher = teachers.load(path)
  mesh = parallel.make_mesh(1)
  results = {}
  for name, overrides in {"plain": {}, "remat": dict(gradient_checkpointing=True),
                          "bf16": dict(teacher_dtype="bf16")}.items():
    config = tiny_config(path, **overrides)
    stepped = teacher.with_model(teacher.model.clone(remat=config.gradient_checkpointing))
    params = parallel.shard_params(teacher.variables, mesh)
    manager = checkpoints.manager(str(tmp_path / name), config)
    state = train.initial_state(config, stepped, params, mesh, manager)
    held = dtypes.hold_teacher(config, params)
    state = recipe_steps(config, teacher, mesh, state, held, 2, step_teacher=stepped)
    results[name] = (jax.device_get(state), held)

  plain_state, plain_teacher = results["plain"]
  nbytes = lambda tree: sum(x.nbytes for x in jax.tree_util.tree_leaves(tree))
  # bf16: half the teacher's bytes; the trained networks and their optimizers stay float32.
  bf16_state, bf16_teacher = results["bf16"]
  assert {x.dtype for x in jax.tree_util.tree_leaves(bf16_teacher)} == {jnp.dtype(jnp.bfloat16)}
  assert nbytes(bf16_teacher) * 2 == nbytes(plain_teacher)
  for tree in (bf16_state.gen_params, bf16_state.fake_params, bf16_state.ema_params,
               bf16_state.gen_opt_state):
    floats = [x for x in jax.tree_util.tree_leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
    assert floats and all(x.dtype == jnp.float32 for x in floats)

  def diff(a, b):
    return max(float(np.max(np.abs(np.asarray(x, np.float32) - np.asarray(y, np.float32))))
               for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))
  # The generator moved; remat reproduces the plain step; a bf16 teacher nearly does.
  assert diff(plain_state.gen_params, plain_teacher) > 1e-4
  assert diff(results["remat"][0], plain_state) <= 1e-5
  assert diff(bf16_state.gen_params, plain_state.gen_params) <= 1e-3


def test_a_wrong_teacher_dtype_is_named(tmp_path):
  config = tiny_config("unused", teacher_dtype="fp8")
  with pytest.raises(ValueError, match="teacher_dtype must be one of"):
    dtypes.hold_teacher(config, {"w": jnp.zeros(2)})
