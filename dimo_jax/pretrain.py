"""MaskGIT teacher pretraining: masked-token cross-entropy on a token dataset.

The recipe of the MaskGIT teachers Di[M]O distills: a mask ratio from the schedule
(`ratio_mode`, arccos by default), exactly round(L * r) tokens masked, label-smoothed
cross-entropy on the masked tokens, and the class replaced by the "no class" token with
probability `drop_label` so the teacher also learns the unconditional model that
classifier-free guidance needs.

On 'digits_text' (dimo_jax/data/digit_prompts.py) the teacher is a small Meissonic transformer
behind `TextConditioned`, trained by the same loss: each digit is conditioned on the encoding of
one of its prompts, a dropped condition is the empty prompt's, and the timestep is 0 (what
Di[M]O passes). It is written as a `meissonic` model directory (layout in
dimo_jax/convert/meissonic.py, without vqvae/: the tokens are the pixels) holding the toy text
encoder and tokenizer it was trained with.

  python -m dimo_jax.pretrain --config configs/digits_teacher.py --workdir runs/teacher
  python -m dimo_jax.pretrain --config configs/digits_text_teacher.py --workdir runs/text_teacher
"""

import json
import os
import time
from typing import Any, Dict

from absl import flags, logging
import flax
import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_flags
import numpy as np
import optax
from tqdm.auto import tqdm

from dimo_jax import cli, config_check, data, masking, modeldir, parallel, teachers
from dimo_jax.divergence import label_smoothed_ce
from dimo_jax.models import maskbit
from dimo_jax.models.maskgit import MaskTransformer
from dimo_jax.models.meissonic import MeissonicTransformer, TextConditioned
from dimo_jax.teachers import meissonic

@flax.struct.dataclass
class PretrainState:
  step: jax.Array
  params: dict
  opt_state: optax.OptState


def build_teacher(config: ml_collections.ConfigDict) -> teachers.Teacher:
  """The untrained teacher: a MaskTransformer; on 'digits_bits' MaskBit's LFQBert; on
  'digits_text' a MeissonicTransformer behind TextConditioned (`config.token_grid` (h, w),
  timestep 0)."""
  if config.get("dataset") == "digits_text":
    fields = config.model.to_dict()
    # JSON and ml_collections may hold the tuple as a list; the module is a jit static argument.
    transformer = MeissonicTransformer(**dict(fields,
                                              axes_dims_rope=tuple(fields["axes_dims_rope"])))
    return teachers.of_module(TextConditioned(transformer, *config.token_grid))
  if config.get("dataset") == "digits_bits":
    return teachers.of_module(maskbit.LFQBert(**config.model.to_dict()))
  return teachers.of_module(MaskTransformer(**config.model.to_dict()))


def _check_sizes(config, teacher: teachers.Teacher, dataset) -> None:
  """The model must fit the dataset (and on 'digits_text' the text encoder's widths)."""
  model = teacher.model
  if teacher.text_conditioned:
    encoder = dataset.text.encoder
    sizes = (model.seq_len, model.codebook_size, model.transformer.joint_attention_dim,
             model.transformer.pooled_projection_dim)
    expected = (dataset.seq_len, dataset.codebook_size, encoder.hidden_size,
                encoder.projection_dim)
    what = "(tokens, codes, joint_attention_dim, pooled_projection_dim)"
    source = f"the {config.dataset} dataset's and its text encoder's (hidden_size, projection_dim)"
  else:
    sizes = (model.num_classes, model.seq_len, model.codebook_size)
    expected = (dataset.num_classes, dataset.seq_len, dataset.codebook_size)
    what, source = "(classes, tokens, codes)", f"the {config.dataset} dataset's"
  if sizes != expected:
    raise ValueError(f"config.model {what} = {sizes} does not fit {source} {expected}")


def train_batch(dataset, rng: np.random.Generator, batch: int):
  """(tokens int32[B, L], condition): the labels int32[B], or on a text dataset the
  `TextConditioned` cond dict of each example's prompt."""
  tokens, labels = dataset.train_batch(rng, batch)
  return tokens, dataset.train_condition(labels)


def embedding_rms(model, variables: Any) -> float:
  """The RMS of the trained visual token embeddings (the codebook rows of `tok_emb`; MaskBit's
  projected random bits, `maskbit.embedding_rms`), which the teacher records as its
  `emb_noise_scale` (see MaskTransformer)."""
  if isinstance(model, maskbit.LFQBert):
    return maskbit.embedding_rms(variables)
  table = np.asarray(jax.device_get(variables["params"]["tok_emb"]["embedding"]))
  return round(float(np.sqrt(np.mean(table[: model.codebook_size].astype(np.float64) ** 2))), 6)


def make_optimizer(config):
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, config.lr, config.warmup_steps, config.num_steps, config.lr * config.final_lr_ratio)
  return optax.chain(optax.clip_by_global_norm(config.max_grad_norm),
                     optax.adamw(schedule, 0.9, 0.98, weight_decay=config.weight_decay))


def make_train_step(config, model, tx):
  def loss_fn(params, tokens, labels, rng):
    """`labels`: int32[B] classes or a text dataset's cond dict (dropped: the empty prompt)."""
    mask_rng, drop_rng, dropout_rng = jax.random.split(rng, 3)
    noisy, mask, _ = masking.forward_mask(mask_rng, tokens, config.ratio_mode, model.mask_id)
    drop = jax.random.uniform(drop_rng, tokens.shape[:1]) < config.drop_label
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


def save_text_teacher(dst: str, model: TextConditioned, variables: Any, dataset,
                      extra: Dict[str, Any]) -> None:
  """Writes a `meissonic` model directory at `dst`, completely or not at all: model.json,
  params/, and the dataset's text_encoder/ and tokenizer/ (`DigitPrompts.save_text`)."""
  # One token a pixel: the micro-conds' "resolution" is the token grid's side.
  description = meissonic.describe(
      model, prompt_length=dataset.text.tokenizer.max_length, text_encoder="text_encoder",
      tokenizer="tokenizer", **extra)
  with modeldir.staged(dst) as inner:
    modeldir.write(inner, description, variables)
    dataset.save_text(inner)


def pretrain(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Trains a teacher on `config.dataset` ('digits' | 'synthetic' | 'digits_text'); returns its
  directory."""
  config_check.check(config)
  dst = os.path.join(workdir, "teacher")
  # Where the teacher will go is checked before the training, not after it.
  from dimo_jax.convert import check_writable
  modeldir.check_destination(dst)
  check_writable(dst)
  dataset = data.get(config)
  teacher = build_teacher(config)
  model = teacher.model
  _check_sizes(config, teacher, dataset)
  tx = make_optimizer(config)
  mesh = parallel.make_mesh()
  rng = jax.random.PRNGKey(config.seed)
  init_rng, rng = jax.random.split(rng)
  variables = teacher.init_variables(init_rng)
  state = parallel.replicate(PretrainState(jnp.int32(0), variables, tx.init(variables)), mesh)
  step_fn = jax.jit(make_train_step(config, model, tx), donate_argnums=0)
  data_rng = np.random.default_rng(config.seed)
  batch_sharding = parallel.batch_sharded(mesh)

  losses = []
  start = time.time()
  for step in tqdm(range(config.num_steps), desc="pretrain teacher", mininterval=2.0):
    batch = jax.device_put(train_batch(dataset, data_rng, config.batch_size), batch_sharding)
    state, loss = step_fn(state, *batch, jax.random.fold_in(rng, step))
    if (step + 1) % config.log_every == 0:
      losses.append(float(loss))
      logging.info("step %d loss %.4f", step + 1, losses[-1])
  record = {"pretraining": {"config": json.loads(config.to_json()), "losses": losses,
                            "seconds": round(time.time() - start, 1)}}
  if teacher.text_conditioned:
    save_text_teacher(dst, model, state.params, dataset, record)
  else:
    model = model.clone(emb_noise_scale=embedding_rms(model, state.params))
    teachers.save(dst, model, state.params, extra=record)
  print(f"teacher written to {dst} (final loss {losses[-1]:.4f})")
  return dst


def main(argv):
  del argv
  pretrain(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == "__main__":
  # Defined here, not on import: tests import this module beside dimo_jax.evaluate, whose
  # --config flag would otherwise be defined twice.
  config_flags.DEFINE_config_file("config", None, "Teacher pretraining config.")
  flags.DEFINE_string("workdir", None, "Where the teacher is written.")
  flags.mark_flags_as_required(["config", "workdir"])
  cli.run(main)
