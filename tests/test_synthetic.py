"""Tests for the closed-form synthetic token dataset."""

import itertools
import math
import os

import numpy as np
import pytest

from dimo_jax.data.synthetic import SyntheticTokens, make_synthetic


def _tiny():
  return make_synthetic(num_classes=2, modes_per_class=3, seq_len=4, codebook_size=3,
                        corruption=0.3, seed=1)


def _all_sequences(data):
  return np.array(list(itertools.product(range(data.codebook_size), repeat=data.seq_len)),
                  dtype=np.int32)


def _brute_force_log_prob(data, seq, label):
  """p(x | c) straight from the generative story, in plain Python floats."""
  eps, v = data.corruption, data.codebook_size
  total = 0.0
  for proto in data.prototypes[label].tolist():
    p = 1.0 / data.modes_per_class
    for token, proto_token in zip(seq, proto):
      p *= (1.0 - eps) + eps / v if token == proto_token else eps / v
    total += p
  return math.log(total)


def _balanced_labels(data, n):
  return (np.arange(n) % data.num_classes).astype(np.int32)


def test_log_prob_matches_brute_force_and_normalizes():
  data = _tiny()
  seqs = _all_sequences(data)
  for label in range(data.num_classes):
    labels = np.full(len(seqs), label, dtype=np.int32)
    log_p = data.log_prob(seqs, labels)
    assert log_p.dtype == np.float64 and log_p.shape == (len(seqs),)
    expected = [_brute_force_log_prob(data, seq, label) for seq in seqs.tolist()]
    np.testing.assert_allclose(log_p, expected, rtol=0, atol=1e-9)
    assert abs(np.exp(log_p).sum() - 1.0) < 1e-9


def test_entropy_matches_enumeration_on_overlapping_modes():
  # V=3, L=4 prototypes overlap heavily, so the Monte-Carlo overlap term is exercised.
  data = _tiny()
  seqs = _all_sequences(data)
  exact = 0.0
  for label in range(data.num_classes):
    log_p = data.log_prob(seqs, np.full(len(seqs), label, dtype=np.int32))
    exact += -(np.exp(log_p) * log_p).sum() / data.num_classes
  assert data.entropy_per_token() == pytest.approx(exact / data.seq_len, rel=5e-3)


def test_sample_shapes_and_determinism():
  data = make_synthetic()
  labels = _balanced_labels(data, 100)
  tokens, modes = data.sample(3, labels)
  assert tokens.dtype == np.int32 and tokens.shape == (100, data.seq_len)
  assert modes.dtype == np.int32 and modes.shape == (100,)
  assert tokens.min() >= 0 and tokens.max() < data.codebook_size
  again, _ = data.sample(np.random.default_rng(3), labels)
  np.testing.assert_array_equal(tokens, again)


def test_true_samples_score_as_data():
  data = make_synthetic()
  labels = _balanced_labels(data, 20_000)
  tokens, modes = data.sample(0, labels)
  metrics = data.synthetic_metrics(tokens, labels)
  assert metrics["true_nll"] == pytest.approx(data.entropy_per_token(), rel=0.02)
  assert metrics["mode_coverage"] == 1.0
  assert metrics["in_mode"] >= 0.99
  assigned = data.assign_modes(tokens, labels)
  assert np.mean(assigned == modes) >= 0.99


def test_mode_collapse_and_noise_are_detected():
  data = make_synthetic()
  labels = _balanced_labels(data, 5_000)
  collapsed, _ = data.sample(0, labels, modes=np.zeros(len(labels), dtype=np.int32))
  assert data.mode_coverage(collapsed, labels) == 1.0 / data.modes_per_class

  noise = np.random.default_rng(0).integers(data.codebook_size, size=(len(labels),
                                                                      data.seq_len))
  metrics = data.synthetic_metrics(noise, labels)
  assert metrics["in_mode"] < 0.01
  assert metrics["true_nll"] > 3 * data.entropy_per_token()


def test_wrong_class_samples_are_not_in_mode():
  data = make_synthetic()
  labels = _balanced_labels(data, 2_000)
  tokens, _ = data.sample(0, labels)
  shifted = (labels + 1) % data.num_classes
  assert data.synthetic_metrics(tokens, shifted)["in_mode"] < 0.01


@pytest.mark.parametrize("tokens, labels, match", [
    (np.zeros((4, 15), np.int32), np.zeros(4, np.int32), r"shape \[4, 16\]"),
    (np.zeros(16, np.int32), np.zeros(1, np.int32), r"shape \[1, 16\]"),
    (np.zeros((4, 16), np.int32), np.zeros(3, np.int32), r"shape \[3, 16\]"),
    (np.zeros((4, 16), np.float32), np.zeros(4, np.int32), "integer"),
    (np.full((4, 16), 16, np.int32), np.zeros(4, np.int32), r"\[0, 16\)"),
    (np.full((4, 16), -1, np.int32), np.zeros(4, np.int32), r"\[0, 16\)"),
    (np.zeros((4, 16), np.int32), np.full(4, 10, np.int32), r"\[0, 10\)"),
    (np.zeros((4, 16), np.int32), np.zeros((4, 1), np.int32), r"labels must be"),
])
def test_invalid_inputs_raise(tokens, labels, match):
  data = make_synthetic()
  for method in (data.log_prob, data.nll_per_token, data.assign_modes, data.mode_coverage,
                 data.synthetic_metrics):
    with pytest.raises(ValueError, match=match):
      method(tokens, labels)


def test_invalid_construction_raises():
  protos = np.zeros((2, 2, 4), np.int32)
  with pytest.raises(ValueError, match="corruption"):
    SyntheticTokens(prototypes=protos, corruption=0.0, codebook_size=4)
  with pytest.raises(ValueError, match="prototype codes"):
    SyntheticTokens(prototypes=protos + 4, corruption=0.1, codebook_size=4)
  with pytest.raises(ValueError, match=r"\[C, K, L\]"):
    SyntheticTokens(prototypes=protos[0], corruption=0.1, codebook_size=4)


def test_the_benchmark_takes_the_mixture_and_overrides_from_the_command_line():
  import importlib.util
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      "benchmarks", "synthetic.py")
  spec = importlib.util.spec_from_file_location("synthetic_benchmark", path)
  bench = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(bench)
  from configs import synthetic as synthetic_config, synthetic_teacher
  mixture = synthetic_teacher.synthetic_spec()
  mixture.update(modes_per_class=6, corruption=0.05, seed=1, codebook_size=32)
  assert bench.spec_name(mixture) == "c10_k6_l16_v32_eps0.05_s1"
  recipe, name = bench.teacher_recipe(mixture)
  assert (recipe.num_steps, name) == (2000, "c10_k6_l16_v32_eps0.05_s1")
  recipe, name = bench.teacher_recipe(mixture, 6000)  # a longer teacher lives apart
  assert (recipe.num_steps, name) == (6000, "c10_k6_l16_v32_eps0.05_s1_t6000")
  teacher = synthetic_teacher.get_config(mixture)
  assert (teacher.model.codebook_size, teacher.synthetic.modes_per_class) == (32, 6)
  config = synthetic_config.get_config(mixture)
  assert config.mask_value == 32 and config.synthetic.seed == 1
  bench.override(config, "generator_lr=1")  # an int where a float belongs stays a float
  bench.override(config, "fixed_ratio=random_0.1_0.9")
  assert config.generator_lr == 1.0 and isinstance(config.generator_lr, float)
  assert config.fixed_ratio == "random_0.1_0.9"
  with pytest.raises(SystemExit, match="no_such_key"):
    bench.override(config, "no_such_key=1")
  with pytest.raises(SystemExit, match="did you mean fake_rounds"):
    bench.override(config, "fake_round=2")
  metrics = {"teacher_8step": {"true_nll": 1.0, "mode_coverage": 1.0, "in_mode": 0.9},
             "generator_1step": {"true_nll": 1.2, "mode_coverage": 0.97, "in_mode": 0.8},
             "generator_1step_T2": {"true_nll": 1.3, "mode_coverage": 1.0, "in_mode": 0.9},
             "generator_1step_T0.5": {"true_nll": 1.0, "mode_coverage": 0.96, "in_mode": 0.9}}
  ratios = bench.against_teacher(metrics, "teacher_8step")
  assert ratios["generator_1step"]["meets_targets"]
  assert not ratios["generator_1step_T2"]["meets_targets"]  # NLL 1.3x > 1.25x
  assert not ratios["generator_1step_T0.5"]["meets_targets"]  # coverage 0.96x < 0.97x
