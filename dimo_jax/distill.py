"""Di[M]O's train state and its one jitted train step.

One call of the step is one generator update followed by `fake_rounds` auxiliary updates,
which is what one generator step of the reference's loop does:

  generator:  x_init -> z_theta = G_theta(x_init, c) -> x_theta ~ Cat(z_theta / gen_temp)
              x~_t = forward_mask(x_theta)   (ratio_mode)
              g = logit_gradient(teacher(x~_t, guided), fake(x~_t))  on masked positions
              loss = surrogate(z_theta, g)                            -> Adam step on theta
  auxiliary:  fresh x_theta (no gradient), its own forward mask (ratio_mode_fake), psi fits
              x_theta by label-smoothed cross-entropy (mixed by alpha_fake with a soft KL to the
              generator's probabilities)                              -> Adam step on psi
  EMA:        ema <- rate * ema + (1 - rate) * theta, rate = min(ema_decay, (1 + s) / (10 + s))

Soft-Di[M]O (`config.gan.weight` > 0) adds a term to the generator's loss and `disc_rounds`
discriminator updates after the auxiliary ones (dimo_jax/gan.py):

  generator:  loss += gan.weight * L_GAN(D(remask(softmax(z_theta / tau))))
  discriminator: real = one_hot(x_0) of the run's data tokens, fake = the same soft tokens of a
              fresh generator step (cut from theta), both re-masked      -> Adam step on the heads

and with `config.reward.weight` > 0 the reward term (dimo_jax/rewards.py):

  generator:  loss += reward.weight * -E[R(softmax(z_theta / reward.tau), c)]

and with `config.diversity.weight` > 0 our mode-covering term (dimo_jax/diversity.py), a second
generator step on independent x_init for the same conditions:

  generator:  loss += diversity.weight * E[sum_v p(v | x_init) p(v | x_init')]

and with `config.anchor.weight` > 0 our data anchor (diversity.data_nll), the generator fed an
x_init made from real data tokens x_0 (one more batch of the real feed):

  generator:  loss += anchor.weight * -E[log p_theta(x_0 | x_init(x_0))]

A class-conditional step takes no data: labels are drawn from the state's key, so a run is a
pure function of (config, teacher, seed) and a resumed run repeats an uninterrupted one exactly.
A text-to-image step is fed its conditions (prompt encodings, see
models/meissonic.TextConditioned) by the host: `train_step(state, teacher, conditions)`.
"""

from typing import Any, Callable, Dict, NamedTuple, Optional, Tuple

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from dimo_jax import divergence, diversity, gan, masking, rewards, sampling, teachers
from dimo_jax.models import soft

Params = Any
# What the reference freezes with `fix_emb_layer` in MaskTransformer: the tied embedding/output
# table, the positional embedding and the output bias (every kind declares its own:
# `teachers.Kind.frozen_with_emb`).
FROZEN_WITH_EMB = teachers.KINDS["maskgit"].frozen_with_emb


@flax.struct.dataclass
class DistillState:
  """Everything a run needs to continue exactly: parameters, optimizers, counters and key."""
  step: jax.Array  # int32[]: generator updates done
  rng: jax.Array  # uint32[2]: the root key, split once per step
  gen_params: Params
  fake_params: Params
  ema_params: Params
  gen_opt_state: optax.OptState
  fake_opt_state: optax.OptState
  skipped: jax.Array  # int32[2]: generator / auxiliary updates skipped for non-finite gradients
  # Soft-Di[M]O's discriminator heads and their optimizer (None for Di[M]O alone).
  disc_params: Params = None
  disc_opt_state: optax.OptState = None


def trainable_labels(params: Params, fix_emb_layer: bool,
                     frozen: Tuple[str, ...] = FROZEN_WITH_EMB) -> Params:
  """'frozen' / 'train' for every leaf: the labels of `optax.multi_transform`.

  A leaf is frozen (with `fix_emb_layer`) when its path, '/'-joined and without a leading
  "params", equals a prefix in `frozen` or starts with one followed by '/'.
  """
  def label(path, _):
    keys = [str(getattr(entry, "key", entry)) for entry in path]
    # Either the bare parameter tree or Flax variables, {"params": {...}}, as train.py passes.
    if keys and keys[0] == "params":
      keys = keys[1:]
    name = "/".join(keys)
    hit = any(name == p or name.startswith(p + "/") for p in frozen)
    return "frozen" if fix_emb_layer and hit else "train"
  return jax.tree_util.tree_map_with_path(label, params)


def lr_schedule(config: ml_collections.ConfigDict, lr: float) -> optax.Schedule:
  """`constant` or `constant_with_warmup` (linear from 0 over `lr_warmup_steps`, as diffusers)."""
  if config.lr_scheduler_type == "constant":
    return optax.constant_schedule(lr)
  if config.lr_scheduler_type == "constant_with_warmup":
    if config.lr_warmup_steps <= 0:  # diffusers: no warm-up is the full rate from step 0
      return optax.constant_schedule(lr)
    return optax.warmup_constant_schedule(0.0, lr, config.lr_warmup_steps)
  raise ValueError("lr_scheduler_type must be 'constant' or 'constant_with_warmup', "
                   f"got {config.lr_scheduler_type!r}")


def make_optimizer(config: ml_collections.ConfigDict, lr: float,
                   iterations_per_update: int = 1,
                   frozen: Tuple[str, ...] = FROZEN_WITH_EMB,
                   max_grad_norm: float = 0.0) -> optax.GradientTransformation:
  """Clip by global norm (when `max_grad_norm` > 0), then Adam(W); frozen leaves get zero
  updates.

  `iterations_per_update` stretches the schedule: the reference advances the generator's LR
  scheduler once per loop iteration, of which there are `fake_rounds` per generator update.
  """
  base = lr_schedule(config, lr)
  schedule = lambda count: base(count * iterations_per_update)
  if config.optimizer_type == "adam":
    adam = optax.adam(schedule, config.adam_beta1, config.adam_beta2, eps=config.adam_epsilon)
  elif config.optimizer_type == "adamw":
    adam = optax.adamw(schedule, config.adam_beta1, config.adam_beta2, eps=config.adam_epsilon,
                       weight_decay=config.adam_weight_decay)
  else:
    raise ValueError(f"optimizer_type must be 'adam' or 'adamw', got {config.optimizer_type!r}")
  chain = [adam]
  if max_grad_norm > 0:
    chain.insert(0, optax.clip_by_global_norm(max_grad_norm))
  return optax.multi_transform(
      {"train": optax.chain(*chain), "frozen": optax.set_to_zero()},
      lambda params: trainable_labels(params, config.fix_emb_layer, frozen))


def gan_enabled(config: ml_collections.ConfigDict) -> bool:
  """Whether the run is Soft-Di[M]O (a GAN term of positive weight) rather than Di[M]O alone."""
  return "gan" in config and config.gan.weight > 0


def anchor_enabled(config: ml_collections.ConfigDict) -> bool:
  """Whether the generator's loss has our data anchor (`anchor.weight` > 0)."""
  return "anchor" in config and config.anchor.weight > 0


def anchor_weight(config: ml_collections.ConfigDict, step: jax.Array) -> jax.Array:
  """The data anchor's weight at generator update `step`: `anchor.weight`, lowered linearly to
  0 at update `anchor.decay_steps` when that is > 0."""
  weight = jnp.float32(config.anchor.weight)
  if config.anchor.get("decay_steps", 0) > 0:
    weight *= jnp.clip(1.0 - jnp.asarray(step, jnp.float32) / config.anchor.decay_steps, 0, 1)
  return weight


def real_rounds(config: ml_collections.ConfigDict) -> int:
  """How many batches of real data tokens a step is fed (`train.RealFeed`): one per
  discriminator update, then one for the data anchor; 0 when no term uses real data."""
  return (config.gan.disc_rounds if gan_enabled(config) else 0) + int(anchor_enabled(config))


def reward_enabled(config: ml_collections.ConfigDict) -> bool:
  """Whether the generator's loss has a reward term (`reward.weight` > 0)."""
  return "reward" in config and config.reward.weight > 0


def create_state(config: ml_collections.ConfigDict, teacher_params: Params, rng: jax.Array,
                 frozen: Tuple[str, ...], teacher: Optional[teachers.Teacher] = None
                 ) -> DistillState:
  """theta, psi and the EMA all start as copies of the teacher phi; with the GAN on, fresh
  discriminator heads for `teacher`'s features (their key is folded out of `rng`, which the
  state keeps as it is: the Di[M]O draws are those of a run without the GAN).

  `frozen`: what `fix_emb_layer` freezes, the teacher kind's `frozen_with_emb` (the train step
  builds its optimizers with the same, so the optimizer states match).
  """
  copy = lambda p: jax.tree_util.tree_map(jnp.array, p)
  gen_tx, fake_tx = optimizers(config, frozen)
  disc_params = disc_opt_state = None
  if gan_enabled(config):
    disc_params = gan.init_heads(jax.random.fold_in(rng, 1), gan.Heads(config.gan.head_width),
                                 teacher.model, teacher_params, teacher.example_condition(1),
                                 teacher.seq_len, teacher.codebook_size, config.gan.layers)
    disc_opt_state = disc_optimizer(config).init(disc_params)
  return DistillState(
      step=jnp.int32(0), rng=rng,
      gen_params=copy(teacher_params), fake_params=copy(teacher_params),
      ema_params=copy(teacher_params),
      gen_opt_state=gen_tx.init(teacher_params), fake_opt_state=fake_tx.init(teacher_params),
      skipped=jnp.zeros((2,), jnp.int32), disc_params=disc_params,
      disc_opt_state=disc_opt_state)


def optimizers(config, frozen: Tuple[str, ...] = FROZEN_WITH_EMB
               ) -> Tuple[optax.GradientTransformation, optax.GradientTransformation]:
  """(generator, auxiliary) optimizers; each clips by its own norm (`max_grad_norm`,
  `fake_max_grad_norm`)."""
  return (make_optimizer(config, config.generator_lr, config.fake_rounds, frozen,
                         config.max_grad_norm),
          make_optimizer(config, config.fake_lr, frozen=frozen,
                         max_grad_norm=config.fake_max_grad_norm))


def disc_optimizer(config) -> optax.GradientTransformation:
  """Adam on the discriminator heads (`gan.lr`, `gan.adam_beta1`, `gan.adam_beta2`)."""
  g = config.gan
  return optax.adam(g.lr, g.adam_beta1, g.adam_beta2, eps=config.adam_epsilon)


def accumulated_grad(loss_fn: Callable, micro: int, rng_arg: int, fed_arg: int) -> Callable:
  """`jax.value_and_grad(loss_fn, has_aux=True)` over `micro` micro-batches: the loss, its
  metrics and the gradient are the means over micro-batch i = 0..micro-1, each called with
  the key fold_in(rng, i) in place of argument `rng_arg` and, when argument `fed_arg` (fed
  conditions) is not None, with its row i. The reference's `gradient_accumulation_steps`:
  each of its micro-batch losses is divided by their count before backward. `micro` 1 is
  plain value_and_grad, the key and the conditions as given."""
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if micro == 1:
    return grad_fn

  def fn(*args):
    def micro_batch(i):
      call = list(args)
      call[rng_arg] = jax.random.fold_in(args[rng_arg], i)
      if args[fed_arg] is not None:
        call[fed_arg] = jax.tree_util.tree_map(lambda x: x[i], args[fed_arg])
      return call

    def body(total, i):
      out = grad_fn(*micro_batch(i))
      return jax.tree_util.tree_map(lambda t, o: t + o / micro, total, out), None
    zeros = jax.tree_util.tree_map(jnp.zeros_like, jax.eval_shape(grad_fn, *micro_batch(0)))
    total, _ = jax.lax.scan(body, zeros, jnp.arange(micro))
    return total
  return fn


def ema_rate(decay: float, step: jax.Array) -> jax.Array:
  """min(decay, (1 + s) / (10 + s)): a short memory early on, `decay` later."""
  step = jnp.asarray(step, jnp.float32)
  return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def _apply_if_finite(tx, grads, opt_state, params, loss):
  """One optimizer update, or none at all when the loss, a gradient or the update itself is not
  finite (a learning rate that overflows float32 turns finite gradients into an infinite
  update)."""
  grad_norm = optax.tree.norm(grads)
  updates, new_opt_state = tx.update(grads, opt_state, params)
  ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(optax.tree.norm(updates))
  new_params = optax.apply_updates(params, updates)
  keep = lambda new, old: jax.tree_util.tree_map(lambda n, o: jnp.where(ok, n, o), new, old)
  return keep(new_params, params), keep(new_opt_state, opt_state), grad_norm, ok


class Losses(NamedTuple):
  """The step's three losses, each `(loss, metrics)` and differentiated w.r.t. its first
  argument: the generator's (Di[M]O's term, plus the GAN's), the auxiliary model's and the
  discriminator's."""
  generator: Callable[..., Tuple[jax.Array, Dict[str, jax.Array]]]
  fake: Callable[..., Tuple[jax.Array, Dict[str, jax.Array]]]
  disc: Optional[Callable[..., Tuple[jax.Array, Dict[str, jax.Array]]]]


def make_losses(config: ml_collections.ConfigDict, teacher: teachers.Teacher,
                batch_constraint: Callable[[jax.Array], jax.Array] = lambda x: x,
                reward: Optional[rewards.Reward] = None) -> Losses:
  """The losses of the step (`make_train_step`, whose arguments these are):

    generator(gen_params, fake_params, disc_params, teacher_params, rng, sigma, fed,
              reward_vars, init_logits, anchor_real, anchor_scale)
    fake(fake_params, gen_params, rng, sigma, fed, init_logits)
    disc(disc_params, gen_params, teacher_params, rng, sigma, fed, real, init_logits)
                                                                         (None without the GAN)

  Args:
    config: the run's config (see configs/digits.py for every field).
    teacher: the teacher whose module is the shared architecture of teacher, generator and
      auxiliary model (its variables are not read: the step is given them).
    batch_constraint: applied to every batch-shaped array; on a mesh, a sharding constraint
      that splits the batch over the data axis.
    reward: the reward term's `rewards.Reward` (`rewards.make_reward`); the generator's loss
      is given its variables (`reward_vars`, None: those it was built with).

  `real` of the discriminator's loss: one update's batch of Soft-Di[M]O's real data,
  {"tokens": int[B, L], "cond": labels int[B] or a text cond dict} (`train.RealFeed` feeds
  the step one for each of its `gan.disc_rounds`). Its fake side is conditioned like the
  generator's term: `fed` prompts, or labels drawn from the key. `anchor_real` of the
  generator's loss: the data anchor's batch, the same structure; `anchor_scale` its weight
  (`anchor_weight`; None: `anchor.weight`).
  """
  # Ours is V (the codebook size); a release with its own mask id may also be named by that.
  if config.mask_value not in teacher.mask_values:
    raise ValueError(f"mask_value {config.mask_value} does not match the model's mask id "
                     f"({' or '.join(map(str, teacher.mask_values))})")
  use_gan = gan_enabled(config)
  if reward_enabled(config) and reward is None:
    raise ValueError("the reward term (reward.weight > 0) needs its reward function")
  model = teacher.model
  batch, seq_len, codebook = config.train_batch_size, teacher.seq_len, teacher.codebook_size
  mask_id = teacher.mask_id
  train = config.distill_dropout
  # Condition dropout of the auxiliary model only matters when it is ever guided.
  fake_drop = (config.fake_cfg_drop_ratio
               if (config.fake_cfg_train != 1 or config.fake_cfg_eval != 1) else 0.0)
  if use_gan:
    discriminator = gan.make_discriminator(model, gan.Heads(config.gan.head_width),
                                           config.gan.layers)

  def logits_fn(params, rng, emb_noise=None, noise_rng=None, dropout=train):
    """The model as a `sampling.LogitsFn` with its dropout (and embedding noise) bound."""
    def fn(tokens, labels, drop):
      rngs = {"dropout": rng}
      if noise_rng is not None:
        rngs["noise"] = noise_rng
      return model.apply(params, tokens, labels, drop, emb_noise=emb_noise,
                         deterministic=not dropout, rngs=rngs)
    return fn

  def generate(params, rng, labels, sigma, init_logits=None):
    """One generator step on fresh x_init: (codes int32[B, L], logits float32[B, L, V]);
    `init_logits`: x_init's code logits under `init_codes='teacher'`."""
    drop_rng, rng = jax.random.split(rng)
    def gen_fn(tokens, labels_, noise_rng):
      return logits_fn(params, drop_rng, sigma, noise_rng)(tokens, labels_, None)
    codes, logits = sampling.generator_sample(
        gen_fn, rng, labels, seq_len, codebook, mask_id, config.fixed_ratio,
        config.gen_temp, config.top_k, config.top_p, init_logits)
    return jax.lax.stop_gradient(codes), logits

  def draw_labels(rng, fed):
    """The condition of a batch: a text teacher's `fed` prompts (placed on the batch axis), a
    class-conditional teacher's labels drawn from the step's key."""
    if teacher.text_conditioned:
      return jax.tree_util.tree_map(batch_constraint, fed)
    return batch_constraint(
        jax.random.randint(rng, (batch,), 0, teacher.num_classes, dtype=jnp.int32))

  # What the teacher's unconditional branch sees may differ from the auxiliary model's (Di[M]O
  # guides Meissonic with a negative prompt but drops the auxiliary condition to "").
  teacher_condition = teacher.guided_condition

  def dimo_term(gen_logits, codes, labels, fake_params, teacher_params, rngs):
    """Di[M]O's token-level distribution matching on the sampled codes: the surrogate whose
    gradient w.r.t. z_theta is `divergence.logit_gradient`, and its log entries."""
    mask_rng, t_rng, f_rng = rngs
    noisy, mask, ratio = masking.forward_mask(mask_rng, batch_constraint(codes),
                                              config.ratio_mode, mask_id)
    true_cfg = 1.0 + (config.true_cfg - 1.0) * ratio if config.adaptive_cfg else config.true_cfg
    teacher_logits = sampling.guided_logits(logits_fn(teacher_params, t_rng,
                                                      dropout=config.teacher_dropout), noisy,
                                            teacher_condition(labels), true_cfg)
    fake_logits = sampling.guided_logits(logits_fn(fake_params, f_rng), noisy, labels,
                                         config.fake_cfg_eval)
    teacher_logits, fake_logits = jax.lax.stop_gradient((teacher_logits, fake_logits))
    grad = divergence.logit_gradient(teacher_logits, fake_logits, config.distil_loss_type,
                                     config.true_temp, config.fake_temp)
    loss = divergence.surrogate_loss(gen_logits, grad, mask, config.loss_reduction)
    p_diff = jax.nn.softmax(fake_logits / config.fake_temp) - jax.nn.softmax(
        teacher_logits / config.true_temp)
    # score_diff is the reference's log entry (the plain mean, ~0 by construction); tv_masked,
    # the mean total variation between the two predictions on masked tokens, shows progress.
    tv = 0.5 * jnp.sum(jnp.abs(p_diff), axis=-1)
    tv_masked = jnp.sum(jnp.where(mask, tv, 0.0)) / jnp.maximum(jnp.sum(mask), 1)
    return loss, {"loss_dm": loss, "score_diff": jnp.mean(p_diff), "tv_masked": tv_masked}

  def gan_term(gen_logits, labels, disc_params, teacher_params, rng):
    """L_GAN of the generator's soft tokens, re-masked (gan.py)."""
    probs, ratio = gan.remask(rng, gan.soft_tokens(gen_logits, config.gan.tau), config.gan.r_max)
    d_fake = discriminator(disc_params, teacher_params, batch_constraint(probs), labels, ratio)
    loss = gan.generator_loss(d_fake, config.gan.loss)
    return loss, {"loss_gan": loss, "d_fake": jnp.mean(d_fake)}

  def anchor_term(gen_params, real, sigma, rng):
    """Ours: the NLL of real tokens x_0 under the generator fed an x_init made from x_0."""
    ratio_rng, init_rng, drop_rng, noise_rng = jax.random.split(rng, 4)
    tokens = batch_constraint(real["tokens"].astype(jnp.int32))
    cond = jax.tree_util.tree_map(batch_constraint, real["cond"])
    x_init = masking.init_from_tokens(
        init_rng, tokens, masking.sample_init_ratio(ratio_rng, config.fixed_ratio), mask_id)
    logits = logits_fn(gen_params, drop_rng, sigma, noise_rng)(x_init, cond, None)
    loss = diversity.data_nll(logits, tokens)
    return loss, {"loss_anchor": loss}

  # Our per-token terms are summed over positions like Di[M]O's surrogate (loss_reduction
  # 'sum'), so that one weight means the same per token at any sequence length.
  per_token = seq_len if config.loss_reduction == "sum" else 1

  def generator_loss(gen_params, fake_params, disc_params, teacher_params, rng, sigma, fed,
                     reward_vars=None, init_logits=None, anchor_real=None, anchor_scale=None):
    label_rng, gen_rng, *dm_rngs = jax.random.split(rng, 5)
    labels = draw_labels(label_rng, fed)
    codes, gen_logits = generate(gen_params, gen_rng, labels, sigma, init_logits)
    loss, metrics = dimo_term(gen_logits, codes, labels, fake_params, teacher_params, dm_rngs)
    total = config.dm_loss_weight * loss
    if use_gan:
      loss_gan, gan_metrics = gan_term(gen_logits, labels, disc_params, teacher_params,
                                       jax.random.fold_in(rng, 1))
      total, metrics = total + config.gan.weight * loss_gan, {**metrics, **gan_metrics}
    if config.get("diversity") and config.diversity.weight > 0:
      _, other_logits = generate(gen_params, jax.random.fold_in(rng, 2), labels, sigma,
                                 init_logits)
      if config.diversity.space == "features":
        features = [gan.backbone_features(model, teacher_params, batch_constraint(
            gan.soft_tokens(z, config.diversity.temp)), labels, (1.0,))[0]
                    for z in (gen_logits, other_logits)]
        loss_div = diversity.feature_similarity(*features)
      else:
        loss_div = diversity.collision(gen_logits, other_logits, config.diversity.temp)
      total = total + config.diversity.weight * per_token * loss_div
      metrics = {**metrics, "loss_diversity": loss_div}
    if anchor_enabled(config):
      loss_anchor, anchor_metrics = anchor_term(gen_params, anchor_real, sigma,
                                                jax.random.fold_in(rng, 3))
      scale = config.anchor.weight if anchor_scale is None else anchor_scale
      total = total + scale * per_token * loss_anchor
      metrics = {**metrics, **anchor_metrics, "anchor_weight": jnp.float32(scale)}
    if reward_enabled(config):
      loss_reward, mean_reward = rewards.reward_loss(reward, gen_logits, labels,
                                                     config.reward.tau, reward_vars)
      total = total + config.reward.weight * loss_reward
      metrics = {**metrics, "loss_reward": loss_reward, "reward": mean_reward}
    return total, metrics

  def fake_loss(fake_params, gen_params, rng, sigma, fed, init_logits=None):
    label_rng, gen_rng, drop_rng, mask_rng, f_rng = jax.random.split(rng, 5)
    labels = draw_labels(label_rng, fed)
    codes, gen_logits = generate(gen_params, gen_rng, labels, sigma, init_logits)
    gen_logits = jax.lax.stop_gradient(gen_logits)
    drop = (jax.random.uniform(drop_rng, (batch,)) < fake_drop
            if config.fake_cfg_train != 1 else jnp.zeros((batch,), bool))
    noisy, mask, _ = masking.forward_mask(mask_rng, batch_constraint(codes),
                                          config.ratio_mode_fake, mask_id)
    logits = sampling.guided_logits(logits_fn(fake_params, f_rng), noisy, labels,
                                    config.fake_cfg_train, drop)
    hard = divergence.label_smoothed_ce(logits, codes, mask, config.label_smoothing)
    loss = hard
    if config.alpha_fake > 0:
      soft_loss = divergence.soft_kl(logits, gen_logits, mask, config.temperature_fake)
      loss = config.alpha_fake * soft_loss + (1.0 - config.alpha_fake) * hard
    return loss, {"loss_fake_hard": hard}

  def disc_loss(disc_params, gen_params, teacher_params, rng, sigma, fed, real, init_logits=None):
    """The discriminator's loss: real data tokens against the generator's soft tokens of a
    fresh step; neither input carries a gradient to theta or phi."""
    label_rng, gen_rng, fake_mask_rng, real_mask_rng = jax.random.split(rng, 4)
    labels = draw_labels(label_rng, fed)
    _, gen_logits = generate(gen_params, gen_rng, labels, sigma, init_logits)
    fake = gan.soft_tokens(jax.lax.stop_gradient(gen_logits), config.gan.tau)
    real_labels = jax.tree_util.tree_map(batch_constraint, real["cond"])
    real_tokens = soft.one_hot(batch_constraint(real["tokens"].astype(jnp.int32)), codebook)

    def score(probs, cond, mask_rng):
      probs, ratio = gan.remask(mask_rng, probs, config.gan.r_max)
      return discriminator(disc_params, teacher_params, batch_constraint(probs), cond, ratio,
                           cut_features=True)

    d_fake = score(fake, labels, fake_mask_rng)
    d_real = score(real_tokens, real_labels, real_mask_rng)
    loss = gan.discriminator_loss(d_real, d_fake, config.gan.loss)
    return loss, {"d_real": jnp.mean(d_real), "d_fake_disc": jnp.mean(d_fake)}

  return Losses(generator_loss, fake_loss, disc_loss if use_gan else None)


def make_train_step(config: ml_collections.ConfigDict, teacher: teachers.Teacher,
                    batch_constraint: Callable[[jax.Array], jax.Array] = lambda x: x,
                    reward: Optional[rewards.Reward] = None):
  """Builds `train_step(state, teacher_params[, conditions[, real[, reward_vars[,
  init_logits]]]]) -> (state, metrics)` (pure; jit it). `real` holds the real batches of the
  `gan.disc_rounds` discriminator updates, then the data anchor's, {"tokens": int[rounds, B,
  L], "cond": [rounds, B, ...]} (`train.RealFeed`, `real_rounds`); with the reward term
  `reward_vars` holds its networks' variables, and under `init_codes='teacher'` `init_logits`
  x_init's code logits float32[C, L, V] (`samplers.init_code_logits`): inputs of the step, not
  constants of it. The arguments are `make_losses`'.
  """
  losses = make_losses(config, teacher, batch_constraint, reward)
  micro = config.get("gradient_accumulation_steps", 1)
  generator_grad = accumulated_grad(losses.generator, micro, rng_arg=4, fed_arg=6)
  fake_grad = accumulated_grad(losses.fake, micro, rng_arg=2, fed_arg=4)
  gen_tx, fake_tx = optimizers(config, teacher.frozen_with_emb)
  disc_tx = disc_optimizer(config) if losses.disc is not None else None

  def train_step(state: DistillState, teacher_params: Params, conditions=None, real=None,
                 reward_vars=None, init_logits=None):
    """One generator update, `fake_rounds` auxiliary updates (and `gan.disc_rounds`
    discriminator updates).

    `conditions`: None (class labels drawn from the state's key), or the fed conditions
    {"generator": cond with leading axis B, "auxiliary": the same with leading axes
    [fake_rounds, B]}, every leaf batch-leading as `model.apply` takes it; with
    `gradient_accumulation_steps` k > 1 a micro-batch axis k comes before B in both.

    With k > 1 the generator and each auxiliary round take the mean gradient of k
    micro-batches of `train_batch_size` (`accumulated_grad`), as the reference's
    `gradient_accumulation_steps` does: the update sees k times the batch at the memory of
    one. The discriminator updates on one micro-batch (the reference has no discriminator).
    """
    rng, gen_rng, fake_rng = jax.random.split(state.rng, 3)
    iteration = state.step * config.fake_rounds
    sigma = masking.noise_level(config.noise_emb_perturb, iteration)
    gen_fed, fake_fed = ((None, None) if conditions is None
                         else (conditions["generator"], conditions["auxiliary"]))

    if real_rounds(config) and real is None:
      raise ValueError("the GAN term (gan.weight > 0) and the data anchor (anchor.weight > 0) "
                       "need real data tokens: a dataset with `real_tokens` (digits, "
                       "digits_text, synthetic, a tokenized imagenet256)")
    anchor_real = anchor_scale = None
    if anchor_enabled(config):  # the last of the fed batches
      anchor_real = jax.tree_util.tree_map(lambda x: x[-1], real)
      real = jax.tree_util.tree_map(lambda x: x[:-1], real)
      anchor_scale = anchor_weight(config, state.step)
    (loss_g, gen_metrics), grads = generator_grad(
        state.gen_params, state.fake_params, state.disc_params, teacher_params, gen_rng, sigma,
        gen_fed, reward_vars, init_logits, anchor_real, anchor_scale)
    gen_params, gen_opt_state, gen_norm, gen_ok = _apply_if_finite(
        gen_tx, grads, state.gen_opt_state, state.gen_params, loss_g)

    def fake_round(carry, inputs):
      round_index, fed = inputs
      fake_params, fake_opt_state, skipped = carry
      round_sigma = masking.noise_level(config.noise_emb_perturb, iteration + round_index)
      (loss_f, _), grads = fake_grad(
          fake_params, gen_params, jax.random.fold_in(fake_rng, round_index), round_sigma, fed,
          init_logits)
      fake_params, fake_opt_state, norm, ok = _apply_if_finite(
          fake_tx, grads, fake_opt_state, fake_params, loss_f)
      return (fake_params, fake_opt_state, skipped + (~ok).astype(jnp.int32)), (loss_f, norm)

    (fake_params, fake_opt_state, fake_skipped), (loss_f, fake_norm) = jax.lax.scan(
        fake_round, (state.fake_params, state.fake_opt_state, state.skipped[1]),
        (jnp.arange(config.fake_rounds), fake_fed))

    disc_params, disc_opt_state, disc_metrics = state.disc_params, state.disc_opt_state, {}
    if losses.disc is not None:
      disc_rng = jax.random.fold_in(fake_rng, config.fake_rounds)
      disc_fed = (gen_fed if gen_fed is None or micro == 1
                  else jax.tree_util.tree_map(lambda x: x[0], gen_fed))

      def disc_round(carry, inputs):
        round_index, batch_real = inputs
        params, opt_state = carry
        (loss_d, metrics), grads = jax.value_and_grad(losses.disc, has_aux=True)(
            params, gen_params, teacher_params, jax.random.fold_in(disc_rng, round_index),
            sigma, disc_fed, batch_real, init_logits)
        params, opt_state, _, _ = _apply_if_finite(disc_tx, grads, opt_state, params, loss_d)
        return (params, opt_state), {"loss_disc": loss_d, **metrics}

      (disc_params, disc_opt_state), disc_metrics = jax.lax.scan(
          disc_round, (disc_params, disc_opt_state),
          (jnp.arange(config.gan.disc_rounds), real))
      disc_metrics = jax.tree_util.tree_map(jnp.mean, disc_metrics)

    rate = ema_rate(config.ema_decay, state.step)
    do_ema = (state.step % config.ema_freq) == 0
    ema_params = jax.tree_util.tree_map(
        lambda e, p: jnp.where(do_ema, rate * e + (1.0 - rate) * p, e),
        state.ema_params, gen_params)

    skipped = jnp.stack([state.skipped[0] + (~gen_ok).astype(jnp.int32), fake_skipped])
    new_state = DistillState(
        step=state.step + 1, rng=rng, gen_params=gen_params, fake_params=fake_params,
        ema_params=ema_params, gen_opt_state=gen_opt_state, fake_opt_state=fake_opt_state,
        skipped=skipped, disc_params=disc_params, disc_opt_state=disc_opt_state)
    metrics = {
        "loss_generator": loss_g, **gen_metrics, **disc_metrics,
        "loss_fake": jnp.mean(loss_f),
        "gen_grad_norm": gen_norm, "fake_grad_norm": jnp.mean(fake_norm),
        "lr_g": lr_schedule(config, config.generator_lr)(iteration),
        "lr_fake": lr_schedule(config, config.fake_lr)(iteration),
        "emb_perturb": sigma, "ema_rate": rate,
        "skipped_generator": skipped[0], "skipped_fake": skipped[1],
    }
    return new_state, metrics

  return train_step
