"""The reference's configuration keys, with its defaults (yuanzhi-zhu/DiMO DIMO_MaskGit.yaml).

Every knob of the method keeps the reference's name, default and meaning so a run can be
carried across; experiment configs in `configs/` start from here and override.
"""

import ml_collections


def reference_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.global_seed = 3407
  # Global batch (the reference's per-device batch times the number of devices).
  c.train_batch_size = 4
  # Micro-batches of train_batch_size whose mean gradient makes one generator update and one
  # auxiliary update (the reference's gradient_accumulation_steps): k times the batch at the
  # memory of one.
  c.gradient_accumulation_steps = 1
  # Device mesh (dimo_jax/parallel.py): every device carries a slice of the batch; parameters,
  # EMA and optimizer states (and the teacher) are split over `fsdp`. -1: the rest of the
  # devices (those `num_devices` picks, all by default).
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1))
  c.mixed_precision = "bf16"  # 'no' | 'bf16': compute dtype of the three networks
  # Storage of the frozen teacher's parameters: 'bf16' halves its memory (the generator,
  # auxiliary model, EMA and Adam states stay float32 whatever this says).
  c.teacher_dtype = "fp32"  # 'fp32' | 'bf16'
  # Recompute each transformer block in the backward pass instead of storing its activations.
  c.gradient_checkpointing = False
  # The attention kernel of the three networks (dimo_jax/models/attention.py): 'auto' computes
  # what the reference does (attention weights dropped while dropout is on; then cuDNN flash
  # attention on a GPU, XLA's elsewhere); 'xla' / 'cudnn' always fuse, and so train without
  # dropout on the attention weights; 'einsum' always writes the softmax out.
  c.attention_impl = "auto"
  # Clipping of the generator's gradients (the reference clips them under 16-bit mixed
  # precision, which its recipe runs) and of the auxiliary model's (it never clips those);
  # 0 turns clipping off.
  c.max_grad_norm = 1.0
  c.fake_max_grad_norm = 0.0
  c.lr_scheduler_type = "constant_with_warmup"
  c.lr_warmup_steps = 100
  c.max_train_steps = 50001
  c.ema_decay = 0.9999
  c.ema_freq = 1
  c.loss_reduction = "sum"  # 'sum' (divided by the batch size) | 'mean'
  c.optimizer_type = "adam"  # 'adam' | 'adamw'
  c.adam_beta1 = 0.9
  c.adam_beta2 = 0.999
  c.adam_weight_decay = 0.0
  # The reference builds Adam with eps 1e-6 under bf16 mixed precision (1e-8 otherwise).
  c.adam_epsilon = 1e-6
  c.validation_steps = 200
  # Ours: where scalars, grids and the final metrics go ('tensorboard': event files through
  # tensorboardX; 'wandb': Weights & Biases, pip install wandb), and a jax.profiler trace of
  # this many steps after the first (WORKDIR/profile; 0: none).
  c.writers = ("tensorboard",)
  c.profile_steps = 0
  c.checkpointing_steps = 1000
  c.checkpoints_total_limit = 5
  # Ours, not the reference's: stop the run with an error after this many generator (or
  # auxiliary) updates in a row were skipped for a non-finite loss, gradient or update (a NaN
  # teacher, a learning rate that overflows); 0 never stops.
  c.max_consecutive_skips = 20
  # Ours: a resumed run refuses a config whose method keys differ from the one that wrote its
  # checkpoints (checkpoints/config.json); True accepts the change deliberately.
  c.allow_config_change = False

  # Generator and auxiliary ("fake") model.
  c.generator_lr = 1e-5
  c.fake_lr = 1e-5
  c.dm_loss_weight = 1.0
  c.fake_rounds = 1
  c.mask_value = 1024

  # Di[M]O.
  c.fixed_ratio = "fix_0.6"  # r_init: 'fix_<r>' or 'random_<lo>_<hi>'
  # x_init's visible codes: 'uniform' (the reference), or 'teacher' (ours, class-conditional
  # teachers): drawn from the teacher's prediction for an all-masked input of the class.
  c.init_codes = "uniform"
  c.noise_emb_perturb = "fix_0.1"  # sigma: 'fix_<s>' or 'warmup_{linear,exp,cos}_<N>'
  c.distil_loss_type = "Jeffreys_0."  # 'FKL' | 'RKL' | 'Jeffreys_<beta>'
  c.ratio_mode = "arccos"  # forward masking for the generator loss
  c.ratio_mode_fake = "arccos"  # forward masking for the auxiliary loss
  c.top_k = 0
  c.top_p = 0.0
  c.true_cfg = 2.0
  c.adaptive_cfg = False  # w_t = 1 + (true_cfg - 1) * mask ratio
  c.fake_cfg_eval = 1.0
  c.fake_cfg_train = 1.0
  c.fake_cfg_drop_ratio = 0.1
  c.gen_temp = 1.0
  # The final evaluation also samples the one-step generator at these temperatures (the
  # reference's scripts/evaluate.sh sweeps 1 to 10; its in-training FID uses 7); () for none.
  c.eval_gen_temps = ()
  c.true_temp = 1.0
  c.fake_temp = 1.0
  c.temperature_fake = 1.0
  c.alpha_fake = 0.0  # 0: hard (cross-entropy) auxiliary loss, 1: soft (KL) loss
  c.label_smoothing = 0.1
  c.fix_emb_layer = True
  # The reference never switches its networks to eval mode, so their dropout is active
  # while distilling: the generator's and auxiliary model's (`distill_dropout`) and the
  # teacher's (`teacher_dropout`), which can be switched off on its own.
  c.distill_dropout = True
  c.teacher_dropout = True

  # Teacher sampling (multi-step MaskGIT decoding).
  c.sched_mode = "arccos"
  c.sampling_step = 12
  c.cfg_w = 3.0
  c.r_temp = 4.5
  c.sm_temp = 1.0
  # MaskBit's decode rule only (sampling.maskbit_sample): guidance cond + cfg_w * a_i *
  # (cond - uncond) with a_i 'none' (1), 'linear' (i / n) or 'cosine' ((1 - cos((i/n)^p pi)) / 2,
  # p = scale_pow); r_temp is its `randomize_temperature`.
  c.guidance_annealing = "none"
  c.scale_pow = 3.0
  c.gan = gan_config()
  c.reward = reward_config()
  # Ours (dimo_jax/diversity.py): how much two samples of one condition from independent x_init
  # may agree ('tokens': collision probability; 'features': teacher-feature cosine similarity).
  c.diversity = ml_collections.ConfigDict(dict(weight=0.0, temp=1.0, space="tokens"))
  # Ours (dimo_jax/diversity.py, `data_nll`): a mode-covering anchor, the NLL of real data tokens
  # x_0 under the generator fed an x_init made from x_0 (x_0's codes where x_init shows codes,
  # masked as x_init is); real data as the GAN's. `weight` 0 is off; `decay_steps` N > 0 lowers
  # the weight linearly to 0 at generator update N (0: constant).
  c.anchor = ml_collections.ConfigDict(dict(weight=0.0, decay_steps=0))
  # Sample-quality evaluations during the run (dimo_jax/evaluators.py): name -> spec (type
  # 'fid' | 'clip' | 'dataset', every N steps and/or at the steps in `at`, num_samples, ...).
  c.evals = ml_collections.ConfigDict()
  c.tteo = tteo_config()
  return c


def tteo_config() -> ml_collections.ConfigDict:
  """Test-time embedding optimization at sampling (dimo_jax/rewards.py)."""
  return ml_collections.ConfigDict(dict(
      steps=0,  # SGD steps on the generator's input embeddings, 0 off
      lr=0.2,  # their step size (the paper's; no clipping)
  ))


def gan_config() -> ml_collections.ConfigDict:
  """Soft-Di[M]O's GAN term (dimo_jax/gan.py; arXiv 2509.22925, which has no public code).
  `weight` 0 is Di[M]O alone. The paper gives r_max 0.95 (r fixed at 0 overfits) and, for its
  longer MaskBit run, weight 200 at lr 5e-7; every other value here is ours."""
  return ml_collections.ConfigDict(dict(
      weight=0.0,  # w_GAN: L = L_DiMO + w_GAN * L_GAN
      loss="ns",  # 'ns' (non-saturating) | 'hinge': the discriminator's loss (ours)
      r_max=0.95,  # both inputs re-masked at r ~ U[0, r_max)
      tau=1.0,  # soft tokens p = softmax(z_theta / tau) (ours)
      layers=(0.25, 0.5, 0.75, 1.0),  # heads on the layers at these fractions of the depth (ours)
      head_width=128,  # each head: LayerNorm, Dense(head_width) + Dense(r), GELU, Dense(1) (ours)
      disc_rounds=1,  # discriminator updates per generator update (ours)
      lr=1e-4, adam_beta1=0.0, adam_beta2=0.99,  # the heads' Adam (ours)
      real_tokens="",  # imagenet256: the token dataset of `python -m dimo_jax.tokenize`
  ))


def reward_config() -> ml_collections.ConfigDict:
  """Soft-Di[M]O's reward term (dimo_jax/rewards.py); `weight` 0 turns it off. Of the paper's
  text-to-image rewards (CLIP, ImageReward, HPS, aesthetics) CLIP score is built; the
  class-conditional kinds are a classifier's log-probability of the class (ours)."""
  return ml_collections.ConfigDict(dict(
      weight=0.0,  # lambda: L = ... + lambda * -E[R]
      # 'classifier' (digits, digits_text): log p(c | soft image), a CNN trained apart from the
      # scorer; 'inception' (imagenet256): log p(c | decoded soft image) of the FID Inception;
      # 'clip' (prompts): 100 * cos(CLIP image, CLIP prompt)
      kind="classifier",
      tau=1.0,  # the reward sees softmax(z_theta / tau)
      classifier_seed=1,  # the reward classifier's seed (the scorer's MLP uses seed 0)
      inception_path="",  # 'inception': `python -m dimo_jax.convert fid-inception` output
      class_map="",  # 'inception': 1000 integers, the Inception output of each ImageNet class
      clip_path="",  # 'clip': `python -m dimo_jax.convert clip` output
  ))
