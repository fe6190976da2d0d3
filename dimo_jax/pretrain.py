"""MaskGIT teacher pretraining: masked-token cross-entropy on a token dataset.

The recipe of the MaskGIT teachers Di[M]O distills: a mask ratio from the schedule
(`ratio_mode`, arccos by default), exactly round(L * r) tokens masked, label-smoothed
cross-entropy on the masked tokens, and the class replaced by the "no class" token with
probability `drop_label` so the teacher also learns the unconditional model that
classifier-free guidance needs.

  python -m dimo_jax.pretrain --config configs/digits_teacher.py --workdir runs/teacher
"""

import json
import os
import time

from absl import app, flags, logging
import flax
import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_flags
import numpy as np
import optax
from tqdm.auto import tqdm

from dimo_jax import data, masking, parallel, teachers
from dimo_jax.distill import label_smoothed_ce
from dimo_jax.models.maskgit import MaskTransformer

_CONFIG = config_flags.DEFINE_config_file("config", None, "Teacher pretraining config.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where the teacher is written.")


@flax.struct.dataclass
class PretrainState:
  step: jax.Array
  params: dict
  opt_state: optax.OptState


def build_model(config: ml_collections.ConfigDict) -> MaskTransformer:
  return MaskTransformer(**config.model.to_dict())


def make_optimizer(config):
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, config.lr, config.warmup_steps, config.num_steps, config.lr * config.final_lr_ratio)
  return optax.chain(optax.clip_by_global_norm(config.max_grad_norm),
                     optax.adamw(schedule, 0.9, 0.98, weight_decay=config.weight_decay))


def make_train_step(config, model, tx):
  def loss_fn(params, tokens, labels, rng):
    mask_rng, drop_rng, dropout_rng = jax.random.split(rng, 3)
    noisy, mask, _ = masking.forward_mask(mask_rng, tokens, config.ratio_mode, model.mask_id)
    drop = jax.random.uniform(drop_rng, labels.shape) < config.drop_label
    logits = model.apply(params, noisy, labels, drop, deterministic=False,
                         rngs={"dropout": dropout_rng})
    target_mask = mask if config.masked_only else jnp.ones_like(mask)
    return label_smoothed_ce(logits, tokens, target_mask, config.label_smoothing)

  def train_step(state, tokens, labels, rng):
    loss, grads = jax.value_and_grad(loss_fn)(state.params, tokens, labels, rng)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    return PretrainState(state.step + 1, optax.apply_updates(state.params, updates),
                         opt_state), loss
  return train_step


def pretrain(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Trains a teacher on `config.dataset` ('digits' | 'synthetic'); returns its directory."""
  dataset = data.get(config)
  model = build_model(config)
  sizes = (model.num_classes, model.seq_len, model.codebook_size)
  expected = (dataset.num_classes, dataset.seq_len, dataset.codebook_size)
  if sizes != expected:
    raise ValueError(f"config.model (classes, tokens, codes) = {sizes} does not fit the "
                     f"{config.dataset} dataset's {expected}")
  tx = make_optimizer(config)
  mesh = parallel.make_mesh()
  rng = jax.random.PRNGKey(config.seed)
  init_rng, rng = jax.random.split(rng)
  variables = model.init({"params": init_rng}, jnp.zeros((1, model.seq_len), jnp.int32),
                         jnp.zeros((1,), jnp.int32))
  state = parallel.replicate(PretrainState(jnp.int32(0), variables, tx.init(variables)), mesh)
  step_fn = jax.jit(make_train_step(config, model, tx), donate_argnums=0)
  data_rng = np.random.default_rng(config.seed)
  batch_sharding = parallel.batch_sharded(mesh)

  losses = []
  start = time.time()
  for step in tqdm(range(config.num_steps), desc="pretrain teacher", mininterval=2.0):
    batch = jax.device_put(dataset.train_batch(data_rng, config.batch_size), batch_sharding)
    state, loss = step_fn(state, *batch, jax.random.fold_in(rng, step))
    if (step + 1) % config.log_every == 0:
      losses.append(float(loss))
      logging.info("step %d loss %.4f", step + 1, losses[-1])
  dst = os.path.join(workdir, "teacher")
  teachers.save(dst, model, state.params, extra={
      "pretraining": {"config": json.loads(config.to_json()), "losses": losses,
                      "seconds": round(time.time() - start, 1)}})
  print(f"teacher written to {dst} (final loss {losses[-1]:.4f})")
  return dst


def main(argv):
  del argv
  pretrain(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
