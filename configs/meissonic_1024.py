"""Di[M]O on Meissonic (text-to-image, 1024x1024): the reference's recipe.

  python -m dimo_jax.convert meissonic --src Meissonic/ --dst checkpoints/meissonic
  python -m dimo_jax.main --config configs/meissonic_1024.py --workdir runs/meissonic \
      --config.prompts.file=prompts.txt      # or --config.prompts.file=None
                                             #    --config.prompts.tfds=coco_captions
                                             #    --config.prompts.tfds_field=captions/text

The values are those of yuanzhi-zhu/DiMO configs/DIMO_Meissonic.yaml (and train_DIMO_Meissonic.py
where the yaml is silent: the negative prompt, the micro-conditioning, the empty prompt as the
auxiliary model's unconditional input), written out even where they equal dimo_jax/defaults.py.
Prompts come from a text file (one a line) or a tfds caption field; their CLIP encodings are
computed once by the teacher's own text encoder and cached in `prompt_cache`.
"""

import ml_collections

from dimo_jax import defaults

# train_DIMO_Meissonic.py: the negative prompt the teacher is guided against
# (`distil_neg_prompt: True`), also the release's inference default.
NEGATIVE_PROMPT = ("worst quality, low quality, low res, blurry, distortion, watermark, logo, "
                   "signature, text, jpeg artifacts, signature, sketch, duplicate, ugly, "
                   "identifying mark")


def get_config():
  c = defaults.reference_config()
  c.dataset = "prompts"
  c.teacher_path = "checkpoints/meissonic"  # `python -m dimo_jax.convert meissonic` (above)
  c.prompts = ml_collections.ConfigDict(dict(
      file="prompts.txt", tfds=ml_collections.FieldReference(None, field_type=str),
      tfds_split="train", tfds_field=ml_collections.FieldReference(None, field_type=str),
      tfds_data_dir=ml_collections.FieldReference(None, field_type=str),
      limit=ml_collections.FieldReference(None, field_type=int)))
  c.prompt_cache = "prompt_embeddings.npz"
  c.negative_prompt = NEGATIVE_PROMPT
  c.distil_neg_prompt = True
  # [orig_width, orig_height, crop top, crop left, aesthetic score] of the reference.
  c.micro_conds = (1024.0, 1024.0, 0.0, 0.0, 6.0)
  c.num_devices = -1
  c.global_seed = 42
  c.mixed_precision = "bf16"
  c.gradient_checkpointing = True
  # The reference keeps the teacher in its own dtype (`cast_models_to_dtype: false`); 'bf16'
  # halves its memory (docs/performance.md, "Memory at 1B parameters").
  c.teacher_dtype = "fp32"
  c.teacher_dropout = False  # the reference puts the Meissonic teacher in eval mode
  c.mask_value = 8255  # the release's mask id (vocab_size - 1); our codes use 8192 inside

  c.per_device_batch = 4  # train_batch_size 4 per GPU
  c.train_batch_size = -1
  c.max_train_steps = 20000

  c.generator_lr = 1e-6
  c.fake_lr = 1e-6
  c.fake_rounds = 1
  c.optimizer_type = "adam"
  c.adam_beta1 = 0.9
  c.adam_beta2 = 0.999
  c.adam_weight_decay = 0.0
  c.lr_scheduler_type = "constant_with_warmup"
  c.lr_warmup_steps = 100
  c.max_grad_norm = 1.0
  c.ema_decay = 0.9999
  c.ema_freq = 1
  c.loss_reduction = "sum"
  c.fix_emb_layer = True  # freezes `embed` and `mlm_layer`

  # Di[M]O.
  c.fixed_ratio = "fix_0.5"  # the yaml's `fixed_ratio: 0.5` (a bare 0.5 is read the same)
  c.noise_emb_perturb = "fix_0.3"
  c.distil_loss_type = "Jeffreys_0."  # beta = 0: FKL
  c.ratio_mode = "cosine"
  c.ratio_mode_fake = "cosine"
  c.true_cfg = 4.0
  c.fake_cfg_eval = 1.0
  c.fake_cfg_train = 1.0
  c.fake_cfg_drop_ratio = 0.1
  c.adaptive_cfg = False
  c.gen_temp = 1.0
  c.true_temp = 1.0
  c.fake_temp = 1.0
  c.temperature_fake = 1.0
  c.alpha_fake = 0.0
  c.top_k = 0
  c.top_p = 0.0

  # Teacher sampling (the comparison grid, metrics.json, `evaluate --teacher_steps`): its own
  # rule, the release's scheduler (Gumbel temperature 2 -> 0, the scheduler config's masking
  # schedule) at the release's 64 steps and guidance 9 against the negative prompt.
  c.sampling_step = 64
  c.cfg_w = 9.0

  c.log_every = 50
  c.validation_steps = 200
  c.validation_metrics = False  # CLIP score and FID: python -m dimo_jax.evaluate
  c.grid_classes = (0, 1, 2, 3)  # the first prompts of the file, one row each
  c.checkpointing_steps = 1000
  c.checkpoints_total_limit = 5
  c.final_eval = False
  c.eval_samples = 8
  c.eval_batch_size = 4
  c.eval_params = "ema"
  return c
