"""Every value of a Di[M]O (or teacher pretraining) config checked before anything is written, compiled or trained.

`check(config)` raises one `ConfigError` that lists each key whose value is outside what the
method accepts (an unknown enum name, a ratio outside [0, 1], a step count of 0, ...), so a
typo fails in a second instead of at the trace of the step or after the whole training.
`closest_keys` finds the real keys a mistyped `--config.<key>` probably meant.
"""

import difflib
import math
from typing import Any, Callable, Dict, List, Optional, Sequence

import ml_collections

from dimo_jax import divergence, dtypes, gan, masking, sampling
from dimo_jax.errors import UserError
from dimo_jax.models import attention


class ConfigError(UserError):
  """A config value outside what the method accepts (each offending key is named)."""


# key -> allowed values.
ENUMS = {
    "mixed_precision": tuple(dtypes.COMPUTE_DTYPES),
    "teacher_dtype": tuple(dtypes.DTYPES),
    "lr_scheduler_type": ("constant", "constant_with_warmup"),
    "loss_reduction": ("sum", "mean"),
    "optimizer_type": ("adam", "adamw"),
    "ratio_mode": masking.RATIO_MODES,
    "ratio_mode_fake": masking.RATIO_MODES,
    "sched_mode": sampling.SCHED_MODES,
    "guidance_annealing": sampling.GUIDANCE_ANNEALING,
    "eval_params": ("ema", "generator"),
    "attention_impl": attention.IMPLEMENTATIONS,
    "init_codes": masking.INIT_CODES,
}
# Integers that count steps, rounds or samples: at least 1 (0 would divide by zero or train
# nothing).
POSITIVE_INTS = ("max_train_steps", "fake_rounds", "log_every", "validation_steps",
                 "checkpointing_steps", "checkpoints_total_limit", "sampling_step",
                 "eval_samples", "eval_batch_size", "eval_seeds", "ema_freq",
                 "num_steps", "batch_size")  # the last two: teacher pretraining
NON_NEGATIVE_INTS = ("lr_warmup_steps", "top_k", "max_consecutive_skips", "warmup_steps",
                     "profile_steps", "global_seed", "seed")
# Rates, temperatures and eps: finite and > 0.
POSITIVE_FLOATS = ("generator_lr", "fake_lr", "adam_epsilon", "gen_temp", "true_temp",
                   "fake_temp", "temperature_fake", "sm_temp", "lr")
NON_NEGATIVE_FLOATS = ("max_grad_norm", "fake_max_grad_norm", "adam_weight_decay",
                       "dm_loss_weight", "r_temp", "cfg_w", "true_cfg", "fake_cfg_eval",
                       "fake_cfg_train", "weight_decay", "scale_pow")
# key -> (low, high, high included)
UNIT_INTERVAL = {"ema_decay": (0.0, 1.0, True), "adam_beta1": (0.0, 1.0, False),
                 "adam_beta2": (0.0, 1.0, False), "label_smoothing": (0.0, 1.0, False),
                 "alpha_fake": (0.0, 1.0, True), "fake_cfg_drop_ratio": (0.0, 1.0, True),
                 "top_p": (0.0, 1.0, True), "final_lr_ratio": (0.0, 1.0, True),
                 "drop_label": (0.0, 1.0, True)}
BOOLS = ("adaptive_cfg", "fix_emb_layer", "distill_dropout", "teacher_dropout", "final_eval",
         "validation_metrics", "gradient_checkpointing", "masked_only")


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def _fixed_ratio(value) -> Optional[str]:
  try:
    low, high = masking.parse_fixed_ratio(value)
  except ValueError:
    return "must look like 'fix_0.6', 'random_0.1_0.9' or 0.6"
  if not 0.0 <= low <= high <= 1.0:
    return "needs 0 <= low <= high <= 1 (the share of x_init that is masked)"
  return None


def _noise(value) -> Optional[str]:
  try:
    kind, number = masking.parse_noise_schedule(value)
  except ValueError:
    return "must look like 'fix_0.1', 'warmup_linear_N', 'warmup_exp_N' or 'warmup_cos_N'"
  if kind == "fix" and not 0.0 <= number <= 1.0:
    return "needs sigma in [0, 1] (e <- sigma * eps + sqrt(1 - sigma^2) * e)"
  if kind != "fix" and not number > 0:
    return "needs a warm-up of N > 0 iterations"
  return None


def _loss_type(value) -> Optional[str]:
  try:
    divergence.jeffreys_beta(value)
  except ValueError:
    return "must be 'FKL', 'RKL' or 'Jeffreys_<beta>' with beta in [0, 1]"
  return None


def _temps(value) -> Optional[str]:
  if not isinstance(value, (tuple, list)) or not all(
      _is_number(t) and math.isfinite(t) and t > 0 for t in value):
    return "must be a tuple of temperatures > 0 (or ())"
  return None


PARSED: Dict[str, Callable[[Any], Optional[str]]] = {
    "fixed_ratio": _fixed_ratio, "noise_emb_perturb": _noise, "distil_loss_type": _loss_type,
    "eval_gen_temps": _temps}


def problems(config: ml_collections.ConfigDict) -> List[str]:
  """'key: what was expected, found value' for each bad value of the keys `config` has."""
  found = []

  def bad(key, expected):
    found.append(f"{key} {expected}, found {config[key]!r}")

  has = lambda key: key in config
  for key, allowed in ENUMS.items():
    if has(key) and config[key] not in allowed:
      bad(key, "must be one of " + ", ".join(map(repr, allowed)))
  for key, check in PARSED.items():
    if has(key):
      message = check(config[key])
      if message:
        bad(key, message)
  for key in POSITIVE_INTS:
    if has(key) and not (_is_int(config[key]) and config[key] >= 1):
      bad(key, "must be an integer >= 1")
  for key in NON_NEGATIVE_INTS:
    if has(key) and not (_is_int(config[key]) and config[key] >= 0):
      bad(key, "must be an integer >= 0")
  for key in POSITIVE_FLOATS:
    if has(key) and not (_is_number(config[key]) and math.isfinite(config[key])
                         and config[key] > 0):
      bad(key, "must be a finite number > 0")
  for key in NON_NEGATIVE_FLOATS:
    if has(key) and not (_is_number(config[key]) and math.isfinite(config[key])
                         and config[key] >= 0):
      bad(key, "must be a finite number >= 0")
  for key, (low, high, closed) in UNIT_INTERVAL.items():
    if not has(key):
      continue
    value = config[key]
    inside = _is_number(value) and low <= value and (value <= high if closed else value < high)
    if not inside:
      bad(key, f"must lie in [{low:g}, {high:g}{']' if closed else ')'}")
  for key in BOOLS:
    if has(key) and not isinstance(config[key], bool):
      bad(key, "must be True or False")
  if has("gan"):
    found += gan_problems(config)
  if has("reward"):
    found += reward_problems(config)
  if has("diversity"):
    for key, low_open in (("weight", False), ("temp", True)):
      value = config.diversity.get(key)
      if not (_is_number(value) and math.isfinite(value) and (value > 0 if low_open
                                                              else value >= 0)):
        found.append(f"diversity.{key} must be a finite number {'>' if low_open else '>='} 0, "
                     f"found {value!r}")
    if config.diversity.get("space") not in ("tokens", "features"):
      found.append(f"diversity.space must be 'tokens' or 'features', found "
                   f"{config.diversity.get('space')!r}")
  if has("anchor"):
    value, decay = config.anchor.get("weight"), config.anchor.get("decay_steps", 0)
    if not (_is_int(decay) and decay >= 0):
      found.append(f"anchor.decay_steps must be an integer >= 0, found {decay!r}")
    if not (_is_number(value) and math.isfinite(value) and value >= 0):
      found.append(f"anchor.weight must be a finite number >= 0, found {value!r}")
    elif value > 0:
      found += real_data_problems(config, "anchor.weight > 0", "anchor.weight=0 is off")
  if has("evals"):
    from dimo_jax import evaluators
    found += evaluators.problems(config)
  if has("tteo"):
    t = config.tteo
    if not (_is_int(t.get("steps")) and t.steps >= 0):
      found.append(f"tteo.steps must be an integer >= 0, found {t.get('steps')!r}")
    if not (_is_number(t.get("lr")) and math.isfinite(t.lr) and t.lr > 0):
      found.append(f"tteo.lr must be a finite number > 0, found {t.get('lr')!r}")
  if (has("num_steps") and has("warmup_steps") and _is_int(config.num_steps)
      and _is_int(config.warmup_steps) and config.warmup_steps >= config.num_steps):
    found.append(f"warmup_steps ({config.warmup_steps}) must be less than num_steps "
                 f"({config.num_steps}): the learning rate would never leave its warm-up")
  if has("teacher_path") and not (isinstance(config.teacher_path, str)
                                  and config.teacher_path.strip()):
    bad("teacher_path", "must name a teacher directory (python -m dimo_jax.convert or "
        "pretrain writes one)")
  if config.get("dataset") == "imagenet256" and not config.get("tokenizer_path"):
    found.append("dataset 'imagenet256' needs tokenizer_path, the tokenizer directory of "
                 "python -m dimo_jax.convert (its codes are decoded to score and draw them)")
  if has("writers"):
    from dimo_jax import writers
    value = config.writers
    if (isinstance(value, str) or not isinstance(value, (tuple, list))
        or any(w not in writers.WRITERS for w in value)):
      bad("writers", f"must be a list of {', '.join(map(repr, writers.WRITERS))}")
  if has("gradient_accumulation_steps"):
    k = config.gradient_accumulation_steps
    if not (_is_int(k) and k >= 1):
      bad("gradient_accumulation_steps", "must be an integer >= 1")
  if has("train_batch_size"):
    per_device = config.get("per_device_batch", -1) or -1
    batch = config.train_batch_size
    if not (_is_int(batch) and (batch >= 1 or (batch == -1 and per_device > 0))):
      bad("train_batch_size", "must be an integer >= 1 (or -1 with per_device_batch set)")
  return found


def gan_problems(config: ml_collections.ConfigDict) -> List[str]:
  """The bad values of the `gan` block (defaults.gan_config), each 'gan.key ...'."""
  g, found = config.gan, []

  def number(key, low, high, low_open=False, high_open=False):
    value = g.get(key)
    ok = (_is_number(value) and math.isfinite(value)
          and (value > low if low_open else value >= low)
          and (high is None or (value < high if high_open else value <= high)))
    if not ok:
      interval = f"{'(' if low_open else '['}{low:g}, {'inf' if high is None else f'{high:g}'}"
      interval += ")" if high_open or high is None else "]"
      found.append(f"gan.{key} must be a number in {interval}, found {value!r}")

  number("weight", 0.0, None)
  number("r_max", 0.0, 1.0, low_open=True)
  number("tau", 0.0, None, low_open=True)
  number("lr", 0.0, None, low_open=True)
  number("adam_beta1", 0.0, 1.0, high_open=True)
  number("adam_beta2", 0.0, 1.0, high_open=True)
  if g.get("loss") not in gan.LOSSES:
    found.append(f"gan.loss must be one of {', '.join(map(repr, gan.LOSSES))}, "
                 f"found {g.get('loss')!r}")
  for key in ("head_width", "disc_rounds"):
    if not (_is_int(g.get(key)) and g.get(key) >= 1):
      found.append(f"gan.{key} must be an integer >= 1, found {g.get(key)!r}")
  layers = g.get("layers")
  if not (isinstance(layers, (tuple, list)) and layers and all(
      _is_number(f) and 0 < f <= 1 for f in layers)):
    found.append(f"gan.layers must be a non-empty tuple of depth fractions in (0, 1], found "
                 f"{layers!r}")
  if _is_number(g.get("weight")) and g.weight > 0:
    found += real_data_problems(config, "gan.weight > 0", "gan.weight=0 is Di[M]O alone")
  return found


def real_data_problems(config: ml_collections.ConfigDict, term: str, off: str) -> List[str]:
  """What keeps `term` (a term of real data: the GAN, the data anchor) from its data: a
  dataset without real tokens, or a token dataset not made yet (`gan.real_tokens`)."""
  from dimo_jax import data  # data imports the teachers; only a config with real data needs it
  dataset = config.get("dataset", "digits")
  if dataset not in data.REAL_DATASETS:
    return [f"{term} needs real data tokens, which dataset {dataset!r} does not hold (one of "
            f"{', '.join(data.REAL_DATASETS)}; {off})"]
  if dataset in ("imagenet256", "prompts") and not config.gan.get("real_tokens"):
    return [f"{term} on {dataset} needs gan.real_tokens, a token dataset made by python -m "
            "dimo_jax.tokenize" + (" with --captions or --caption_field"
                                   if dataset == "prompts" else "")]
  return []


def reward_problems(config: ml_collections.ConfigDict) -> List[str]:
  """The bad values of the `reward` block (defaults.reward_config)."""
  from dimo_jax import rewards
  r, found = config.reward, []
  weight = r.get("weight")
  if not (_is_number(weight) and math.isfinite(weight) and weight >= 0):
    found.append(f"reward.weight must be a finite number >= 0, found {weight!r}")
  if not (_is_number(r.get("tau")) and math.isfinite(r.tau) and r.tau > 0):
    found.append(f"reward.tau must be a finite number > 0, found {r.get('tau')!r}")
  if r.get("kind") not in rewards.KINDS:
    found.append(f"reward.kind must be one of {', '.join(map(repr, rewards.KINDS))}, found "
                 f"{r.get('kind')!r}")
  if not _is_int(r.get("classifier_seed")):
    found.append(f"reward.classifier_seed must be an integer, found {r.get('classifier_seed')!r}")
  tteo = config.get("tteo") or {}
  tteo_on = _is_int(tteo.get("steps")) and tteo.get("steps") > 0
  if ((_is_number(weight) and weight > 0) or tteo_on) and r.get("kind") in rewards.KINDS:
    dataset = config.get("dataset", "digits")
    if dataset not in rewards.KIND_DATASETS[r.kind]:
      found.append(f"reward.kind {r.kind!r} reads the datasets "
                   f"{', '.join(map(repr, rewards.KIND_DATASETS[r.kind]))}, not {dataset!r} "
                   f"(reward.weight=0 and tteo.steps=0 turn the reward off)")
    for key in {"inception": ("inception_path", "class_map"),
                "clip": ("clip_path",)}.get(r.kind, ()):
      if not r.get(key):  # (read when the run starts, before any step, as teacher_path is)
        found.append(f"reward.kind {r.kind!r} needs reward.{key}")
  return found


def check(config: ml_collections.ConfigDict, where: str = "config") -> None:
  """Raises `ConfigError` naming every bad value of `config` (see `problems`)."""
  found = problems(config)
  if found:
    raise ConfigError(f"{where}: " + "; ".join(found))


def closest_keys(config: ml_collections.ConfigDict, dotted: str,
                 count: int = 3) -> Optional[Sequence[str]]:
  """None when `dotted` ('a.b.c') names a key of `config`; else the real dotted keys closest to
  it at the first level where it leaves the config (possibly empty)."""
  node, prefix = config, []
  for part in dotted.split("."):
    if isinstance(node, (ml_collections.ConfigDict, dict)) and part in node:
      node = node[part]
      prefix.append(part)
      continue
    if not isinstance(node, (ml_collections.ConfigDict, dict)):
      return []
    names = list(node.keys())
    near = difflib.get_close_matches(part, names, n=count, cutoff=0.5)
    if not near:  # a prefix or a part of a real key: fake_round -> fake_rounds
      near = [n for n in names if part in n or n in part][:count]
    return [".".join(prefix + [n]) for n in near]
  return None


# Config keys that guide the teacher or drop the condition, with their unguided values.
_UNGUIDED = {"true_cfg": 1.0, "fake_cfg_eval": 1.0, "fake_cfg_train": 1.0,
             "fake_cfg_drop_ratio": 0.0, "cfg_w": 0.0}


def check_guidance(config: ml_collections.ConfigDict, teacher,
                   keys=tuple(_UNGUIDED)) -> None:
  """Refuses guidance (the config `keys`) for a teacher without an unconditional input, and
  x_init's codes drawn per class (`init_codes='teacher'`) for a text-to-image teacher."""
  if config.get("init_codes", "uniform") != "uniform" and teacher.text_conditioned:
    raise ConfigError(f"init_codes {config.init_codes!r} draws x_init's codes from the "
                      f"teacher's prediction for each class; {config.teacher_path} is a "
                      "text-to-image teacher (use 'uniform')")
  if teacher.supports_guidance:
    return
  wrong = {k: config[k] for k in keys if config[k] != _UNGUIDED[k]}
  if wrong:
    expected = ", ".join(f"{k}={_UNGUIDED[k]}" for k in keys)
    raise ConfigError(
        f"the {teacher.kind.name} teacher has no unconditional input, so it "
        f"cannot be guided; set {expected} (found {wrong})")
