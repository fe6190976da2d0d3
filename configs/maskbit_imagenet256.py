"""Di[M]O on ImageNet 256x256 with the 14-bit MaskBit teacher (markweberdev/maskbit).

  python -m dimo_jax.convert maskbit --src maskbit_generator_14bit.bin \
      --config maskbit_generator_14bit.yaml --dst checkpoints/maskbit
  python -m dimo_jax.convert maskbit-tokenizer --src maskbit_tokenizer_14bit.bin \
      --config maskbit_tokenizer_14bit.yaml --dst checkpoints/maskbit_tokenizer
  python -m dimo_jax.main --config configs/maskbit_imagenet256.py --workdir runs/maskbit256

The reference Di[M]O recipe (configs/maskgit_imagenet256.py: its optimizers, x_init ratio,
embedding noise, divergence, batch) on the MaskBit teacher: 16x16 positions x 2 splits = 512
sub-tokens of 128 codes (7 bits each), mask id 128. The reference has no MaskBit run; what
changes is ours and marked so:
- the embedding noise sigma 0.1 acts on the projected bit vectors, scaled by their RMS over
  random bits (`emb_noise_scale`, recorded by the converter);
- `true_cfg` 2.0 is the reference's MaskGIT value in our (uncond + w (cond - uncond)) form,
  that is the release's guidance scale 1.0; the release samples at 7.1 with cosine annealing
  (its 64-step sampler), which this config's 8-step comparison keeps (cfg_w, r_temp,
  guidance_annealing, scale_pow below are the 14-bit YAML's).
"""

from configs import maskgit_imagenet256


def get_config():
  c = maskgit_imagenet256.get_config()
  c.teacher_path = "checkpoints/maskbit"
  c.tokenizer_path = "checkpoints/maskbit_tokenizer"
  c.mask_value = 128  # 2^(14 / 2): each sub-token's mask id
  # The teacher's decode rule (sampling.maskbit_sample) with the 14-bit release's values.
  c.sampling_step = 64
  c.cfg_w = 7.1
  c.r_temp = 7.8
  c.guidance_annealing = "cosine"
  c.scale_pow = 3.0
  return c
