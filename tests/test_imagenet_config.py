"""configs/maskgit_imagenet256.py and the imagenet256 dataset entry it names."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import maskgit_imagenet256
from dimo_jax import data, defaults, metrics, tokenizers, train, visualize
from dimo_jax.models.taming_vqgan import VQModel

# Keys the config adds to the reference's (dimo_jax/defaults.py): where the models are, the
# per-device batch, and how this codebase logs, draws grids and evaluates (see configs/digits.py).
EXTRA_KEYS = {
    "dataset", "teacher_path", "tokenizer_path", "num_devices", "per_device_batch",
    "log_every", "validation_metrics", "grid_classes", "final_eval", "eval_samples",
    "eval_batch_size", "eval_params",
}

# The recipe: DIMO_MaskGit.yaml of yuanzhi-zhu/DiMO, 64 per GPU from its launch script, and the
# paper's 8-step teacher.
RECIPE = {
    "generator_lr": 1e-5, "fake_lr": 1e-5,
    "optimizer_type": "adam", "adam_beta1": 0.9, "adam_beta2": 0.999, "adam_weight_decay": 0.0,
    "lr_scheduler_type": "constant_with_warmup", "lr_warmup_steps": 100,
    "max_grad_norm": 1.0, "ema_decay": 0.9999,
    # Adam eps 1e-6 under bf16, the auxiliary model unclipped, dropout on in all three networks.
    "adam_epsilon": 1e-6, "fake_max_grad_norm": 0.0, "distill_dropout": True,
    "teacher_dropout": True,
    "fixed_ratio": "fix_0.6", "noise_emb_perturb": "fix_0.1", "distil_loss_type": "Jeffreys_0.",
    "ratio_mode": "arccos", "ratio_mode_fake": "arccos", "true_cfg": 2.0,
    "label_smoothing": 0.1, "fix_emb_layer": True, "loss_reduction": "sum",
    "sampling_step": 8, "sched_mode": "arccos", "cfg_w": 3.0, "r_temp": 4.5,
    "per_device_batch": 64, "dataset": "imagenet256", "mixed_precision": "bf16",
    "mask_value": 1024,
    "teacher_path": "checkpoints/halton_maskgit", "tokenizer_path": "checkpoints/vqgan",
}


@pytest.fixture
def config():
  return maskgit_imagenet256.get_config()


def test_every_key_is_a_reference_key_or_a_known_extra(config):
  reference = set(defaults.reference_config().keys())
  assert set(config.keys()) - reference - EXTRA_KEYS == set()
  assert EXTRA_KEYS.isdisjoint(reference)  # an extra that became a reference key moves over


def test_values_are_the_recipe(config):
  assert {key: config[key] for key in RECIPE} == RECIPE


def test_global_batch_is_64_per_device(config):
  assert train.global_batch_size(config, 1) == 64
  assert train.global_batch_size(config, 8) == 512
  config.train_batch_size = 100
  with pytest.raises(ValueError, match="per_device_batch 64 on 8 devices and train_batch_size "
                                       "100 disagree"):
    train.global_batch_size(config, 8)
  config.per_device_batch = -1
  assert train.global_batch_size(config, 4) == 100
  with pytest.raises(ValueError, match="train_batch_size 100 does not split over the 8 devices"):
    train.global_batch_size(config, 8)


def test_the_dataset_has_imagenet_sizes_and_no_metrics_yet(config):
  dataset = data.get(config)
  assert (dataset.num_classes, dataset.seq_len, dataset.codebook_size) == (1000, 256, 1024)
  assert metrics.scorer(dataset)(np.zeros((2, 256), np.int32), np.zeros((2,), np.int32)) == {}
  assert list(train.grid_classes(config, 1000)) == [1, 7, 282, 604, 724, 179, 751, 404, 850]


class _ConstantTokenizer:
  """Decodes every code to one value: enough to check the mapping to [0, 1]."""

  def __init__(self, description, value):
    self.description, self.value = description, value

  def decode(self, codes):
    return np.full(codes.shape + (3,), self.value, np.float32)


@pytest.mark.parametrize("description, value, expected", [
    ({"kind": "taming-vqgan"}, 0.0, 0.5),  # [-1, 1]
    ({"kind": "google-vqgan"}, 0.25, 0.25),  # [0, 1]
    ({"kind": "taming-vqgan", "value_range": [0, 255]}, 51.0, 0.2),
    ({"kind": "taming-vqgan"}, 3.0, 1.0),  # clipped
])
def test_decoded_images_are_mapped_to_unit_range(description, value, expected):
  images = data.decode_images(_ConstantTokenizer(description, value),
                              np.zeros((3, 4), np.int32), batch_size=2)
  assert images.shape == (3, 2, 2, 3)
  np.testing.assert_allclose(images, expected, rtol=1e-6)


def test_images_decode_with_the_tokenizer_at_tokenizer_path(config, tmp_path):
  model = VQModel(ch=32, out_ch=3, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(),
                  in_channels=3, resolution=32, z_channels=4, n_embed=1024, embed_dim=4)
  tokenizers.save(str(tmp_path / "vqgan"), model,
                  model.init(jax.random.PRNGKey(0), jnp.zeros((1, 2, 2, 3), jnp.float32)))
  config.tokenizer_path = str(tmp_path / "vqgan")
  codes = np.random.default_rng(0).integers(0, 1024, (3, 256))
  images = data.get(config).images(codes)
  assert images.shape == (3, 32, 32, 3) and images.dtype == np.float32
  assert 0.0 <= images.min() and images.max() <= 1.0 and images.std() > 0
  # RGB pictures go into grids unscaled; token-sized grey images are still enlarged 4x.
  assert visualize.image_grid(np.zeros((4, 64, 64, 3)), rows=2).shape == (131, 131, 3)
  assert visualize.image_grid(np.zeros((4, 8, 8)), rows=2).shape == (67, 67, 3)


class _FlatImages:
  """A dataset stand-in whose images are 4x4 RGB squares of the token's value."""

  def images(self, tokens):
    values = np.asarray(tokens, np.float32)[:, :1, None, None]
    return np.broadcast_to(values, (len(tokens), 4, 4, 3))


def test_grids_show_the_chosen_classes_as_many_times_as_the_rarest():
  labels = np.array([7, 3, 7, 5, 3, 7, 5], np.int32)
  codes = (labels[:, None] / 10.0).astype(np.float32)
  grid = train.class_rows(_FlatImages(), codes, labels, 8, np.array([7, 5], np.int32))
  # 2 rows (classes 7 and 5), 2 columns (class 5 has two samples), scaled 4x with 1 pixel pads.
  assert grid.shape == (2 * 17 + 1, 2 * 17 + 1, 3)
  assert grid[1 + 8, 1 + 8, 0] == round(0.7 * 255) and grid[18 + 8, 18 + 8, 0] == round(0.5 * 255)


def test_the_soft_dimo_recipe_is_the_dimo_recipe_plus_the_gan(config):
  from configs import soft_dimo_maskgit_imagenet256
  from dimo_jax import config_check
  soft = soft_dimo_maskgit_imagenet256.get_config()
  config_check.check(soft)
  assert {key: soft[key] for key in RECIPE} == RECIPE
  assert soft.gan.weight > 0 and soft.gan.r_max == 0.95 and soft.gan.real_tokens
  soft.gan.real_tokens = ""
  with pytest.raises(config_check.ConfigError, match="needs gan.real_tokens"):
    config_check.check(soft)


def test_the_maskbit_recipes_keep_the_reference_recipe_and_the_papers_long_run():
  from configs import maskbit_imagenet256, soft_dimo_maskbit_imagenet256
  from dimo_jax import config_check
  dimo = maskbit_imagenet256.get_config()
  config_check.check(dimo)
  # The reference's Di[M]O values, on MaskBit's sub-tokens and with its release's decode rule.
  own = ("sampling_step", "cfg_w", "r_temp", "mask_value", "teacher_path", "tokenizer_path")
  assert {key: dimo[key] for key in RECIPE if key not in own} == {
      key: value for key, value in RECIPE.items() if key not in own}
  assert (dimo.mask_value, dimo.cfg_w, dimo.r_temp, dimo.guidance_annealing) == (
      128, 7.1, 7.8, "cosine")
  soft = soft_dimo_maskbit_imagenet256.get_config()
  config_check.check(soft)
  assert (soft.generator_lr, soft.gan.weight, soft.optimizer_type, soft.adam_weight_decay,
          soft.gan.r_max) == (5e-7, 200.0, "adamw", 0.01, 0.95)
  soft.guidance_annealing = "exponential"
  with pytest.raises(config_check.ConfigError, match="guidance_annealing"):
    config_check.check(soft)

