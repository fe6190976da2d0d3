"""x_init's visible codes drawn from the teacher (`init_codes='teacher'`, ours): the draw follows
the logits, the logits are the teacher's all-masked prediction of each class, a run with them
resumes bit for bit, and a generator sampled without the teacher's variables loaded reads them.
"""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dimo_jax import config_check, evaluators, masking, samplers, teachers, train
from tests.test_train import restore_latest, tiny_config, tiny_teacher


@pytest.fixture(scope="module")
def teacher_path(tmp_path_factory):
  return tiny_teacher(str(tmp_path_factory.mktemp("teacher") / "digits"))


def test_visible_codes_follow_the_logits():
  batch, seq_len, vocab = 64, 12, 7
  ratio = jnp.float32(0.5)
  wanted = (np.arange(seq_len) * 3) % vocab
  sure = np.full((batch, seq_len, vocab), -1e9, np.float32)
  sure[:, np.arange(seq_len), wanted] = 0.0
  x = np.asarray(masking.init_tokens(jax.random.PRNGKey(1), batch, seq_len, vocab, ratio, vocab,
                                     jnp.asarray(sure)))
  uniform = np.asarray(masking.init_tokens(jax.random.PRNGKey(1), batch, seq_len, vocab, ratio,
                                           vocab))
  np.testing.assert_array_equal(x == vocab, uniform == vocab)  # the same positions masked
  visible = x != vocab
  np.testing.assert_array_equal(x[visible], np.broadcast_to(wanted, x.shape)[visible])
  assert not np.array_equal(uniform[visible], x[visible])
  # Two equally likely codes at every position: both drawn, nothing else.
  pair = np.full((batch, seq_len, vocab), -1e9, np.float32)
  pair[..., 2:4] = 0.0
  y = np.asarray(masking.init_tokens(jax.random.PRNGKey(2), batch, seq_len, vocab, ratio, vocab,
                                     jnp.asarray(pair)))
  codes = y[y != vocab]
  assert set(codes.tolist()) == {2, 3} and 0.4 < np.mean(codes == 2) < 0.6


def test_logits_are_the_teachers_all_masked_prediction(teacher_path):
  teacher = teachers.load(teacher_path)
  run = tiny_config(teacher_path, init_codes="teacher")
  table = samplers.init_code_logits(run, teacher, chunk=3)  # 10 classes in chunks of 3
  assert table.shape == (teacher.num_classes, teacher.seq_len, teacher.codebook_size)
  for label in (0, 4, 9):
    masked = jnp.full((1, teacher.seq_len), teacher.mask_id, jnp.int32)
    expected = teacher.model.apply(teacher.variables, masked, jnp.array([label], jnp.int32),
                                   None, deterministic=True)[0]
    np.testing.assert_allclose(table[label], np.asarray(expected), rtol=1e-5, atol=1e-5)
  uniform = tiny_config(teacher_path, init_codes="uniform")
  assert samplers.init_code_logits(uniform, teacher) is None


def test_config_refuses_unknown_sources_and_text_teachers():
  config = tiny_config("unused", init_codes="data")
  assert any(p.startswith("init_codes must be one of 'uniform', 'teacher'")
             for p in config_check.problems(config))
  text_teacher = types.SimpleNamespace(text_conditioned=True, supports_guidance=True)
  with pytest.raises(config_check.ConfigError, match="init_codes 'teacher' draws x_init's codes"):
    config_check.check_guidance(tiny_config("t", init_codes="teacher"), text_teacher)


def test_run_resumes_bit_identical_and_evaluate_reads_the_teacher(teacher_path, tmp_path):
  config = lambda **kw: tiny_config(teacher_path, init_codes="teacher", **kw)
  straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
  train.train_and_evaluate(config(), straight)
  train.train_and_evaluate(config(max_train_steps=2), split)
  train.train_and_evaluate(config(), split)
  _, a = restore_latest(straight, config(), teacher_path)
  _, b = restore_latest(split, config(), teacher_path)
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

  # `evaluate` loads the teacher without its variables; the sampler reads them for x_init, and
  # samples what the sampler given the loaded teacher samples.
  labels = np.arange(20, dtype=np.int32) % 10
  bare = teachers.load(teacher_path, with_variables=False)
  sampler = evaluators.generator_sampler(straight, bare, "ema", teacher_dir=teacher_path)
  params, run, step = evaluators.checkpoints.load_generator(straight, bare, "ema")
  full = samplers.generator(teachers.load(teacher_path), params, run, step)
  uniform = samplers.generator(teachers.load(teacher_path), params,
                               tiny_config(teacher_path, init_codes="uniform"), step)
  mesh = evaluators.parallel.make_mesh()
  draw = lambda s: samplers.MeshSampler(s, mesh, 10)(labels, 3)
  np.testing.assert_array_equal(draw(sampler), draw(full))
  assert not np.array_equal(draw(full), draw(uniform))
