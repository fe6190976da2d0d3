"""Di[M]O on ImageNet 256x256 with the Halton-MaskGIT teacher: the paper's recipe.

  python -m dimo_jax.convert halton-maskgit --src MaskGIT_ImageNet_256.pth \
      --dst checkpoints/halton_maskgit
  python -m dimo_jax.convert taming-vqgan --src pretrained_maskgit/VQGAN --dst checkpoints/vqgan
  python -m dimo_jax.main --config configs/maskgit_imagenet256.py --workdir runs/imagenet256

The values are those of the reference's configs/DIMO_MaskGit.yaml and its launch script
(yuanzhi-zhu/DiMO scripts/launch_DIMO_MaskGit.sh, `--train_batch_size 64` per GPU), written out
even where they equal dimo_jax/defaults.py so the recipe reads from this file alone.

Batch: `per_device_batch` samples on every device of the data axis. `train_batch_size` (the
global batch the step uses) is left at -1 and filled in by `train.global_batch_size` once the
mesh is built, because counting devices here would start the JAX backend before a multi-host
run has called `jax.distributed.initialize`. Setting `--config.per_device_batch=-1
--config.train_batch_size=N` fixes the global batch instead.
"""

from dimo_jax import defaults, evaluators


def get_config():
  c = defaults.reference_config()
  c.dataset = "imagenet256"  # 1000 classes, 16x16 = 256 tokens over 1024 codes
  # Where `python -m dimo_jax.convert halton-maskgit / taming-vqgan` write (see above).
  c.teacher_path = "checkpoints/halton_maskgit"
  c.tokenizer_path = "checkpoints/vqgan"
  c.num_devices = -1  # every visible device on the data axis
  c.mixed_precision = "bf16"
  c.mask_value = 1024  # the teacher's mask id: its codebook size

  c.per_device_batch = 64
  c.train_batch_size = -1  # per_device_batch x data-axis devices, set by train.py
  c.max_train_steps = 50001

  # Optimizers: Adam without weight decay, constant rate after a linear warm-up, clipped.
  c.generator_lr = 1e-5
  c.fake_lr = 1e-5
  c.fake_rounds = 1
  c.optimizer_type = "adam"
  c.adam_beta1 = 0.9
  c.adam_beta2 = 0.999
  c.adam_weight_decay = 0.0
  c.lr_scheduler_type = "constant_with_warmup"
  c.lr_warmup_steps = 100
  c.max_grad_norm = 1.0
  c.ema_decay = 0.9999
  c.loss_reduction = "sum"
  c.fix_emb_layer = True

  # Di[M]O.
  c.fixed_ratio = "fix_0.6"
  c.noise_emb_perturb = "fix_0.1"
  c.distil_loss_type = "Jeffreys_0."  # beta = 0: the forward KL gradient p_psi - p_phi
  c.ratio_mode = "arccos"
  c.ratio_mode_fake = "arccos"
  c.true_cfg = 2.0
  c.label_smoothing = 0.1

  # Teacher sampling for the comparison: the 8-step guided decoding of the paper's table.
  c.sampling_step = 8
  c.sched_mode = "arccos"
  c.cfg_w = 3.0
  c.r_temp = 4.5

  c.log_every = 50
  c.validation_steps = 200
  # The paper's FID, IS and PRDC need 50 000 samples through Inception: run them apart, with
  # `python -m dimo_jax.evaluate` (docs/evaluation.md). In the run, the reference's own FID:
  # 5000 samples of the EMA at gen_temp 7 every 2000 steps and at 2000 and 5000
  # (train_DIMO_MaskGit.py's metric_steps; dimo_jax/evaluators.py). The files are read when
  # the run starts; --config.evals.fid.every=0 --config.evals.fid.at=() turns it off.
  c.validation_metrics = False
  c.evals.fid = evaluators.spec(type="fid", every=2000, at=(2000, 5000), num_samples=5000,
                                gen_temp=7.0, inception_path="checkpoints/fid_inception",
                                ref="VIRTUAL_imagenet256_labeled.npz")
  # The reference's sample-grid classes: goldfish, cock, tiger cat, hourglass, ship, ...
  c.grid_classes = (1, 7, 282, 604, 724, 179, 751, 404, 850)
  c.checkpointing_steps = 1000
  c.checkpoints_total_limit = 5

  # Final evaluation: teacher at `sampling_step` and 1 step vs the generator, one image a class.
  c.final_eval = True
  c.eval_samples = 1000
  c.eval_batch_size = 100
  c.eval_params = "ema"  # 'ema' | 'generator'
  return c
