"""The teacher contract: every kind declared once, found from its module, and never probed."""

import glob
import os
import re

import jax.numpy as jnp
import pytest

from dimo_jax import modeldir, teachers
from dimo_jax.models.google_maskgit import GoogleMaskGIT
from dimo_jax.models.maskbit import LFQBert
from dimo_jax.models.maskgit import MaskTransformer
from dimo_jax.models.meissonic import MeissonicTransformer, TextConditioned

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_modules():
  meissonic = MeissonicTransformer(
      num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
      joint_attention_dim=16, pooled_projection_dim=16, axes_dims_rope=(2, 2, 4),
      vocab_size=17, codebook_size=16, downsample=False, upsample=False)
  return {"maskgit": MaskTransformer(codebook_size=16, num_classes=3, seq_len=4, hidden_dim=16,
                                     depth=1, num_heads=2, mlp_dim=32),
          "google-maskgit": GoogleMaskGIT(codebook_size=16, num_classes=3, seq_len=4,
                                          hidden_size=16, num_layers=1, num_heads=2,
                                          intermediate_size=32),
          "meissonic": TextConditioned(meissonic, 2, 2),
          # 2 positions x 2 splits of 4 bits: L = 4 sub-tokens of V = 16 codes
          "maskbit": LFQBert(codebook_bits=8, codebook_splits=2, num_positions=2,
                             num_classes=3, hidden_dim=16, depth=1, num_heads=2, mlp_dim=32)}


def test_every_kind_declares_what_the_code_asks():
  assert sorted(teachers.KINDS) == ["google-maskgit", "maskbit", "maskgit", "meissonic"]
  for kind in teachers.KINDS.values():
    assert kind.conditioning in (teachers.CLASS, teachers.TEXT)
    assert kind.decode in ("maskgit", "maskbit", "meissonic") and kind.frozen_with_emb
    module, name = kind.module.split(":")
    assert modeldir.module_class({kind.name: kind.module}, kind.name, "teacher").__name__ == name


@pytest.mark.parametrize("name", ["maskgit", "google-maskgit", "meissonic", "maskbit"])
def test_a_module_becomes_the_teacher_of_its_kind(name):
  teacher = teachers.of_module(tiny_modules()[name])
  assert teacher.kind.name == name and teacher.description["kind"] == name
  assert teacher.text_conditioned == (name == "meissonic")
  assert teacher.num_classes == (None if name == "meissonic" else 3)
  variables = teacher.init_variables()
  logits = teachers.Teacher(teacher.model, variables, teacher.description).logits(
      jnp.full((2, 4), teacher.mask_id, jnp.int32), teacher.example_condition(2))
  assert logits.shape == (2, 4, 16)


def test_no_code_probes_a_teacher_or_a_module_for_what_it_can_do():
  probe = re.compile(r"\b(hasattr|getattr)\(\s*(self\.)?(teacher|model|adapter|module)\b")
  found = []
  for path in glob.glob(os.path.join(REPO, "dimo_jax", "**", "*.py"), recursive=True):
    with open(path) as f:
      for number, line in enumerate(f, 1):
        if probe.search(line):
          found.append(f"{os.path.relpath(path, REPO)}:{number}: {line.strip()}")
  # modeldir reads a module's own dataclass fields to write its model.json: not a probe.
  assert [line for line in found if "dataclasses.fields(module)" not in line] == []
