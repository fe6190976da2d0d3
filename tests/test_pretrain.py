"""Teacher pretraining: it learns, and what it writes loads back as the same teacher."""

import json
import os

import jax.numpy as jnp
import numpy as np

from configs import synthetic_teacher
from dimo_jax import pretrain, teachers


def test_pretraining_learns_and_saves_a_loadable_teacher(tmp_path):
  config = synthetic_teacher.get_config()
  config.model.update(hidden_dim=32, depth=1, num_heads=2, mlp_dim=64, dropout=0.0)
  config.batch_size, config.num_steps, config.warmup_steps, config.log_every = 64, 600, 10, 50
  config.lr = 3e-3
  path = pretrain.pretrain(config, str(tmp_path))

  with open(os.path.join(path, "model.json")) as f:
    description = json.load(f)
  losses = description["pretraining"]["losses"]
  # Label-smoothed CE starts near log(16) = 2.77 (first log at step 20) and must fall.
  assert losses[0] > 2.4 and losses[-1] < losses[0] - 0.5, losses

  teacher = teachers.load(path)
  assert teacher.model.hidden_dim == 32 and teacher.model.codebook_size == 16
  spec = config.synthetic
  tokens = jnp.full((4, spec.seq_len), teacher.model.mask_id, jnp.int32)
  logits = teacher.logits(tokens, jnp.arange(4), jnp.zeros((4,), bool))
  assert logits.shape == (4, spec.seq_len, spec.codebook_size)
  # Class-conditional: with every token masked, different classes predict different codes.
  assert not np.allclose(logits[0], logits[1], atol=1e-3)
  assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]  # nothing half-written left

  # The teacher records its embeddings' scale, so that Di[M]O's sigma is a share of the signal
  # (as on the release's N(0, 1) embeddings) and not an absolute level.
  table = np.asarray(teacher.variables["params"]["tok_emb"]["embedding"])[:spec.codebook_size]
  scale = teacher.model.emb_noise_scale
  np.testing.assert_allclose(scale, np.sqrt(np.mean(table.astype(np.float64) ** 2)), rtol=1e-4)
  assert description["config"]["emb_noise_scale"] == scale and scale != 1.0


def test_teacher_load_names_the_missing_file(tmp_path):
  try:
    teachers.load(str(tmp_path))
  except FileNotFoundError as e:
    assert "model.json" in str(e) and str(tmp_path) in str(e)
  else:
    raise AssertionError("loading an empty directory must fail")
