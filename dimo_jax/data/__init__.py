"""The token datasets a run can name in its config (`config.dataset`).

Each gives what pretraining, the sample grids and the final evaluation need:
  conditioning: teachers.CLASS or teachers.TEXT, what its teacher must be conditioned on
  sizes:        num_classes, seq_len, codebook_size
  condition:    labels int[N] -> what the teacher is conditioned on: the labels themselves
                (int32[N]), or the cond dict of models/meissonic.TextConditioned
  train_batch:  (np.random.Generator, batch) -> (tokens int32[B, L], labels int32[B])
  train_condition: train_batch's labels -> the teacher's condition (pretraining)
  images:       tokens int[N, L] -> float32[N, h, w] (grey) or [N, H, W, 3] (RGB) in [0, 1]
  real_tokens:  () -> (tokens int32[N, L], labels int32[N]), what Soft-Di[M]O's discriminator
                sees as real (digits, synthetic, and imagenet256 with `gan.real_tokens`)
  scorer:       the `metrics.scorer` of its codes: "digits" (fd and accuracy in a trained
                classifier's features; "digits_bits" the same of the merged sub-tokens),
                "synthetic" (true_nll, mode_coverage and in_mode), or
                None (imagenet256, prompts: images are scored by dimo_jax/evaluate.py).
Text-to-image datasets ('prompts', 'digits_text') add the prompts the step is fed:
  conditions:        data.prompts.PromptConditions (the prompts' encodings)
  train_conditions:  (step, batch, rounds, micro) -> the prompt indices the step is fed
"""

import dataclasses
import functools
import math
from typing import Any, Dict, Optional, Tuple

import ml_collections
import numpy as np

from dimo_jax.teachers import CLASS, TEXT, Teacher

def class_condition(labels) -> np.ndarray:
  """A class-conditional dataset's condition of labels int[N]: the labels, int32[N]."""
  return np.asarray(labels, np.int32)


@dataclasses.dataclass(frozen=True)
class Digits:
  """scikit-learn's 1797 8x8 handwritten digits, 17 grey levels as 17 tokens."""
  num_classes: int = 10
  seq_len: int = 64
  codebook_size: int = 17
  conditioning = CLASS
  condition = train_condition = staticmethod(class_condition)
  scorer = "digits"

  def train_batch(self, rng: np.random.Generator, batch: int):
    from dimo_jax.data import digits
    tokens, labels = digits.load_digit_tokens()
    index = rng.integers(0, len(tokens), batch)
    return tokens[index], labels[index]

  def real_tokens(self) -> Tuple[np.ndarray, np.ndarray]:
    """Every digit: tokens int32[1797, 64], labels int32[1797]."""
    from dimo_jax.data import digits
    tokens, labels = digits.load_digit_tokens()
    return np.asarray(tokens, np.int32), np.asarray(labels, np.int32)

  def images(self, tokens) -> np.ndarray:
    from dimo_jax.data import digits
    return digits.tokens_to_images(tokens)



@dataclasses.dataclass(frozen=True)
class DigitBits:
  """The digits as MaskBit sees an image: each pixel's grey level (0..16) an index of 6 bits in
  2 sub-tokens of 3 bits (least significant first), the 64 pixels x 2 splits as L = 128
  sub-tokens of V = 8 codes (`models.maskbit.split_codes`). Indices past 16 (which the data
  never holds) read as 16 when scored and drawn."""
  num_classes: int = 10
  seq_len: int = 128
  codebook_size: int = 8
  splits: int = 2
  conditioning = CLASS
  condition = train_condition = staticmethod(class_condition)
  scorer = "digits_bits"

  @property
  def bits_per_split(self) -> int:
    return self.codebook_size.bit_length() - 1  # V = 2^(bits/m)

  def split(self, tokens) -> np.ndarray:
    from dimo_jax.models import maskbit
    return maskbit.split_codes(np.asarray(tokens), self.splits, self.bits_per_split)

  def full_codes(self, tokens) -> np.ndarray:
    """Sub-tokens int[N, 128] -> grey levels int32[N, 64] (clipped to 16)."""
    from dimo_jax.models import maskbit
    merged = maskbit.merge_splits(np.asarray(tokens), self.splits, self.bits_per_split)
    return np.minimum(merged, 16)

  def train_batch(self, rng: np.random.Generator, batch: int):
    tokens, labels = Digits().train_batch(rng, batch)
    return self.split(tokens), labels

  def real_tokens(self) -> Tuple[np.ndarray, np.ndarray]:
    tokens, labels = Digits().real_tokens()
    return self.split(tokens), labels

  def images(self, tokens) -> np.ndarray:
    return Digits().images(self.full_codes(tokens))


@dataclasses.dataclass(frozen=True)
class Synthetic:
  """Prototype mixtures with per-token corruption: exact likelihood and mode coverage."""
  spec: ml_collections.ConfigDict
  conditioning = CLASS
  condition = train_condition = staticmethod(class_condition)
  scorer = "synthetic"

  @property
  def distribution(self):
    from dimo_jax.data import synthetic
    return synthetic.make_synthetic(**self.spec.to_dict())

  @property
  def num_classes(self) -> int:
    return self.spec.num_classes

  @property
  def seq_len(self) -> int:
    return self.spec.seq_len

  @property
  def codebook_size(self) -> int:
    return self.spec.codebook_size

  def train_batch(self, rng: np.random.Generator, batch: int):
    labels = rng.integers(0, self.num_classes, batch).astype(np.int32)
    return self.distribution.sample(rng, labels)[0], labels

  def real_tokens(self, count: int = 8192) -> Tuple[np.ndarray, np.ndarray]:
    """`count` samples of the mixture, as many of each class (a fixed draw: a data set, as
    the teacher's own training data would be): tokens int32[N, L], labels int32[N]."""
    labels = (np.arange(count) % self.num_classes).astype(np.int32)
    rng = np.random.default_rng(self.spec.get("seed", 0) + 7919)
    return np.asarray(self.distribution.sample(rng, labels)[0], np.int32), labels

  def images(self, tokens) -> np.ndarray:
    """Each sequence as a near-square grey image, one pixel per token."""
    tokens = np.asarray(tokens, np.float32)
    width = math.ceil(math.sqrt(self.seq_len))
    height = math.ceil(self.seq_len / width)
    padded = np.pad(tokens, ((0, 0), (0, height * width - self.seq_len)))
    return padded.reshape(-1, height, width) / (self.codebook_size - 1)



# The range a tokenizer kind decodes to when its model.json gives no `value_range`: taming's
# VQGAN works in [-1, 1], Google's MaskGIT VQGAN in [0, 1].
_KIND_VALUE_RANGE = {"taming-vqgan": (-1.0, 1.0), "google-vqgan": (0.0, 1.0),
                     "diffusers-vq": (0.0, 1.0), "maskbit-vqgan": (0.0, 1.0)}


def value_range(description: Dict[str, Any]) -> Tuple[float, float]:
  """(low, high) of a tokenizer's images: model.json's `value_range`, else by kind, else [-1, 1]."""
  low, high = description.get("value_range",
                              _KIND_VALUE_RANGE.get(description.get("kind"), (-1.0, 1.0)))
  return float(low), float(high)


def decode_images(tokenizer, tokens, batch_size: int = 16) -> np.ndarray:
  """Codes as pictures: int[N, L] (L a square) -> float32[N, H, W, 3] in [0, 1].

  `tokenizer` is a `dimo_jax.tokenizers.Tokenizer`; decoding goes `batch_size` images at a time
  (padded to one compiled shape) so a large grid does not hold every activation at once.
  """
  tokens = np.asarray(tokens, np.int32)
  side = math.isqrt(tokens.shape[-1])
  if tokens.ndim != 2 or side * side != tokens.shape[1]:
    raise ValueError(f"expected codes of shape [N, h*w] with h == w, got {tokens.shape}")
  low, high = value_range(tokenizer.description)
  out = []
  for start in range(0, len(tokens), batch_size):
    chunk = tokens[start:start + batch_size]
    padded = np.pad(chunk, ((0, batch_size - len(chunk)), (0, 0)))
    images = np.asarray(tokenizer.decode(padded.reshape(batch_size, side, side)))[: len(chunk)]
    out.append(np.clip((images - low) / (high - low), 0.0, 1.0))
  return np.concatenate(out).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class ImageNet256:
  """ImageNet at 256x256 as 16x16 codes of a 1024-code VQGAN; pictures via that tokenizer.

  Di[M]O draws its labels itself, so no image data is read; pretraining a teacher on it is not
  offered (convert the released one).
  """
  tokenizer_path: str
  num_classes: int = 1000
  seq_len: int = 256
  codebook_size: int = 1024
  real_tokens_path: Optional[str] = None  # `python -m dimo_jax.tokenize` output (gan.real_tokens)
  # The teacher whose tokens these are: MaskBit's sub-tokens merge into the tokenizer's full
  # indices to be drawn, and real data is split into them (`Teacher.image_codes`).
  teacher: Optional[Teacher] = None
  conditioning = CLASS
  condition = train_condition = staticmethod(class_condition)
  scorer = None

  @functools.cached_property
  def tokenizer(self):
    from dimo_jax import tokenizers
    return tokenizers.load(self.tokenizer_path)

  def train_batch(self, rng: np.random.Generator, batch: int):
    raise NotImplementedError("imagenet256 holds no training tokens: Di[M]O needs none, and "
                              "its teacher comes from `python -m dimo_jax.convert`")

  def images(self, tokens) -> np.ndarray:
    """int[N, L] -> float32[N, 256, 256, 3] in [0, 1], decoded by the tokenizer."""
    codes = tokens if self.teacher is None else self.teacher.image_codes(np.asarray(tokens))
    return decode_images(self.tokenizer, codes)

  def real_tokens(self, process_index: int = 0,
                  process_count: int = 1) -> Tuple[np.ndarray, np.ndarray]:
    """The token dataset of `gan.real_tokens`, only the shards of process `process_index` of
    `process_count` (shard i goes to process i mod count; `RealFeed` draws each process's
    part of the discriminator's batch from its own)."""
    from dimo_jax import tokenize
    shards = tokenize.TokenShards(self.real_tokens_path)
    positions, codes = self.seq_len, self.codebook_size
    if self.teacher is not None:
      positions, codes = self.teacher.image_seq_len, self.teacher.image_codebook_size
    mine = shards.shards_for(positions, codes, process_index, process_count)
    tokens, labels = shards.load(mine)
    if self.teacher is not None:
      tokens = self.teacher.tokens_of_image_codes(tokens)
    return tokens, labels



@dataclasses.dataclass(frozen=True)
class TextPrompts:
  """The prompts a text-to-image teacher is distilled on (`config.prompts`, see
  data/prompts.config_prompts), encoded once by the teacher's own text encoder.

  A "label" is a prompt's index: `condition(indices)` is what the step and the samplers are
  conditioned on, `train_conditions(step, ...)` the prompts step `step` draws. Pictures are the
  teacher's VQ-VAE decodes (read once); there is no image metric in the run (see
  dimo_jax/evaluate.py).
  """
  config: ml_collections.ConfigDict
  teacher: Teacher
  conditioning = TEXT
  scorer = None

  @functools.cached_property
  def conditions(self):
    from dimo_jax.data import prompts
    c, text = self.config, self.teacher.text
    texts = prompts.config_prompts(c) + [""]
    encoder = (text.encoder, text.variables)
    negative = c.negative_prompt if c.distil_neg_prompt else ""
    if c.get("prompt_cache"):
      embeddings = prompts.cached_prompt_embeddings(c.prompt_cache, encoder, text.tokenizer,
                                                    texts, negative)
    else:
      embeddings = prompts.encode_prompts(encoder, text.tokenizer, texts, negative)
    return prompts.PromptConditions(embeddings, tuple(c.micro_conds), c.distil_neg_prompt,
                                    c.global_seed)

  @functools.cached_property
  def tokenizer(self):
    from dimo_jax import tokenizers
    return tokenizers.load(self.config.teacher_path)

  @property
  def num_classes(self) -> int:
    return self.conditions.num_prompts

  @property
  def seq_len(self) -> int:
    return self.teacher.seq_len

  @property
  def codebook_size(self) -> int:
    return self.teacher.codebook_size

  def condition(self, indices) -> Dict[str, np.ndarray]:
    return self.conditions.condition(indices)

  def train_conditions(self, step: int, batch: int, rounds: int,
                       micro: int = 1) -> Dict[str, np.ndarray]:
    return self.conditions.draw(step, batch, rounds, micro)

  def images(self, tokens) -> np.ndarray:
    return decode_images(self.tokenizer, tokens)

  def real_data(self, process_index: int = 0, process_count: int = 1):
    """Soft-Di[M]O's real data (`gan.real_tokens`, a `python -m dimo_jax.tokenize` set made
    with captions by this teacher's VQ-VAE), this process's shards: (tokens int32[n, L],
    caption indices int32[n], condition) where `condition(indices)` encodes those captions
    with the teacher's text encoder into the step's cond dict (guided against the run's
    negative prompt, dropped to "" as the run's own prompts are)."""
    from dimo_jax import tokenize
    from dimo_jax.data import prompts
    shards = tokenize.TokenShards(self.config.gan.real_tokens)
    mine = shards.shards_for(self.seq_len, self.codebook_size, process_index, process_count)
    tokens, _ = shards.load(mine)
    captions = shards.captions(mine)
    c, text = self.config, self.teacher.text
    negative = c.negative_prompt if c.distil_neg_prompt else ""

    def condition(indices):
      indices = np.asarray(indices)
      texts = [captions[i] for i in indices.reshape(-1)]
      embeddings = prompts.encode_prompts((text.encoder, text.variables), text.tokenizer,
                                          texts + [""], negative)
      rows = prompts.PromptConditions(embeddings, tuple(c.micro_conds), c.distil_neg_prompt)
      cond = rows.condition(np.arange(len(texts)))
      return {k: v.reshape(indices.shape + v.shape[1:]) for k, v in cond.items()}
    return tokens, np.arange(len(tokens), dtype=np.int32), condition


# Those with real data, which the GAN term needs (imagenet256 and prompts with
# `gan.real_tokens`).
REAL_DATASETS = ("digits", "digits_bits", "synthetic", "imagenet256", "digits_text", "prompts")


def real_tokens(dataset, process_index: int = 0,
                process_count: int = 1) -> Tuple[np.ndarray, np.ndarray]:
  """What Soft-Di[M]O's discriminator sees as real, the part process `process_index` of
  `process_count` holds: tokens int32[N, L], labels int32[N] of the run's dataset (one of
  REAL_DATASETS; config_check refuses the GAN for the others). A token dataset on disk is read
  by shard (`ImageNet256.real_tokens`); an in-memory one (the toys) is whole in every process.
  A text dataset's labels are prompt indices into its `conditions`."""
  return real_data(dataset, process_index, process_count)[:2]


def real_data(dataset, process_index: int = 0, process_count: int = 1):
  """`real_tokens` and what conditions them: (tokens, labels, condition), `condition` None
  for class labels, else a text dataset's labels -> cond dict (its prompts' encodings, or
  `TextPrompts.real_data`'s captions encoded when fed)."""
  if isinstance(dataset, TextPrompts):
    return dataset.real_data(process_index, process_count)
  if isinstance(dataset, ImageNet256):
    tokens, labels = dataset.real_tokens(process_index, process_count)
  else:
    # An in-memory dataset is built whole in every process: each draws its devices' rows from
    # all of it, so a run is fed the same rows at any process count.
    tokens, labels = dataset.real_tokens()
  condition = dataset.conditions.condition if dataset.conditioning == TEXT else None
  return tokens, labels, condition


def get(config: ml_collections.ConfigDict, teacher: Optional[Teacher] = None):
  """The dataset a config names: 'digits', 'digits_bits' (MaskBit's layout), 'synthetic' (with
  `config.synthetic`),
  'imagenet256' (with `config.tokenizer_path`), or a text-to-image one, 'prompts' or
  'digits_text', whose prompts `teacher`'s text encoder encodes (read from
  `config.teacher_path` when not given; pretraining on 'digits_text' needs no teacher)."""
  name = config.get("dataset", "digits")
  if name in ("prompts", "digits_text") and teacher is None and config.get("teacher_path"):
    from dimo_jax import teachers
    teacher = teachers.load(config.teacher_path)
  if name == "digits":
    return Digits()
  if name == "digits_bits":
    return DigitBits()
  if name == "synthetic":
    return Synthetic(config.synthetic)
  if name == "imagenet256":
    return ImageNet256(config.tokenizer_path,
                       real_tokens_path=config.get("gan", {}).get("real_tokens") or None,
                       teacher=teacher)
  if name == "prompts":
    return TextPrompts(config, teacher)
  if name == "digits_text":
    from dimo_jax.data import digit_prompts
    return digit_prompts.from_config(config, teacher)
  raise ValueError(f"unknown dataset {name!r}; known: 'digits', 'digits_bits', 'synthetic', "
                   "'imagenet256', 'prompts', 'digits_text'")
