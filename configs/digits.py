"""Di[M]O on the bundled digits teacher: the default experiment, minutes on a 2-core CPU.

  python -m dimo_jax.main --config configs/digits.py --workdir runs/digits

Starts from the reference configuration (dimo_jax/defaults.py, i.e. DIMO_MaskGit.yaml) and
changes what a 0.2M-parameter teacher over 8x8 digits needs: larger learning rates, a
shorter warm-up and EMA horizon, float32, and the 17-code vocabulary; and adds our recipe for
diversity (docs/soft_dimo.md): x_init showing few codes, drawn from the teacher, and the data
anchor. Di[M]O as the reference runs it is configs/digits_dimo.py.
"""

from dimo_jax import assets, defaults


def get_config():
  c = defaults.reference_config()
  c.dataset = "digits"
  c.teacher_path = assets.teacher("digits")  # installed with the package
  c.num_devices = -1  # every visible device on the data axis
  c.mixed_precision = "no"
  c.adam_epsilon = 1e-8  # the reference's eps without bf16
  c.mask_value = 17  # the teacher's mask id: its codebook size

  c.train_batch_size = 64
  c.max_train_steps = 600
  # Two-timescale: the auxiliary model learns 3x faster and takes two updates per generator
  # update, so it keeps up with the generator. With equal rates (3e-4 both, one round) the raw
  # generator oscillated (validation fd 3.9-5.1) while only its EMA looked good; with these the
  # raw generator tracks its EMA (fd 1.89 / 1.39 / 1.48 at steps 200 / 400 / 600).
  c.generator_lr = 1e-4
  c.fake_lr = 3e-4
  c.fake_rounds = 2
  c.lr_warmup_steps = 20
  c.ema_decay = 0.99
  c.true_cfg = 1.0
  # Ours (docs/experiments.md, "The main job"): x_init 95% masked, its 3 visible codes of 64
  # drawn from the teacher's all-masked prediction of the class, not uniform (25 uniform codes
  # are noise the generator must learn to ignore), and the data anchor: the generator's NLL of
  # real digits fed an x_init made from them, a mode-covering pull beside Di[M]O's. Five
  # evaluation seeds: fd 0.506 +- 0.061 without the three, 0.350 +- 0.025 with them.
  c.fixed_ratio = "fix_0.95"
  c.init_codes = "teacher"
  c.anchor.weight = 0.1

  c.log_every = 20
  c.validation_steps = 200
  c.validation_metrics = True  # the dataset's metrics of the EMA and raw generator
  c.checkpointing_steps = 200
  c.checkpoints_total_limit = 2

  # Evaluation: the teacher at `sampling_step` steps and at 1 step against the generator.
  c.final_eval = True
  c.sampling_step = 8
  c.cfg_w = 0.0
  c.eval_samples = 1000
  # Every metric is the mean over five sampling seeds (with its spread): one 1000-sample
  # evaluation moves fd by about +-0.06, more than most differences between recipes.
  c.eval_seeds = 5
  c.eval_batch_size = 250
  c.eval_params = "ema"  # 'ema' | 'generator'
  return c
