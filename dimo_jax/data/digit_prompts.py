"""The offline text-conditional toy: scikit-learn's 8x8 digits, each drawn with a prompt naming it.

A Meissonic-style teacher is pretrained on (digit tokens, prompt) pairs (`python -m
dimo_jax.pretrain --config configs/digits_text_teacher.py`) and distilled by Di[M]O like the real
text-to-image teacher; the digit classifier of dimo_jax/evaluation.py then says how often a
sample shows the digit its prompt names.

  TEMPLATES, HELD_OUT_TEMPLATE     five training templates (50 prompts), and one that no
                                   training step sees (a probe of generalization only: the toy
                                   teacher does not carry over to it)
  digit_prompts(templates)         -> (prompts, labels int32[N]), digit-major
  prompt_words()                   every word of every prompt, training and held-out
  word_vocabulary(words)           -> (vocab, merges) of a CLIP BPE that keeps each word whole
  write_word_vocabulary(folder, words, max_length)   that tokenizer as a `tokenizer/` folder
  toy_text_encoder(...)            a tiny random-weight CLIPTextEncoder
  DigitPrompts                     the dataset `config.dataset = 'digits_text'` names

The text side is a tiny CLIP (random weights, fixed seed; a random encoder still separates the
prompts, which is all the teacher needs) over a vocabulary of the prompts' words, prompts of
PROMPT_LENGTH = 16 ids. Pretraining builds it fresh and saves it into the teacher directory
(`text_encoder/`, `tokenizer/`); distillation reads it back from there (`from_teacher`).
"""

import dataclasses
import functools
import json
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dimo_jax import clip_tokenizer, modeldir
from dimo_jax.data import digits
from dimo_jax.models.clip import CLIPTextEncoder
from dimo_jax.teachers import TEXT, Teacher
from dimo_jax.teachers.meissonic import TextStack

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# {word} is the digit's name, {n} its numeral.
TEMPLATES = (
    "a handwritten {word}",
    "the digit {n}",
    "the number {word}",
    "a drawing of the digit {word}",
    "a picture of the number {n}",
)
# Built from training words only, so that it tests the template, not unseen tokens. The
# 3000-step teacher of configs/digits_text_teacher.py draws the named digit for 91% of training
# prompts (8 steps, no guidance) but for 28% of these: with a random text encoder a new sentence
# is a new condition, so evaluation prompts with EVAL_TEMPLATE.
HELD_OUT_TEMPLATE = "a handwritten number {word}"
EVAL_TEMPLATE = 0  # `condition(labels)` conditions digit d on TEMPLATES[0]'s prompt of d

PROMPT_LENGTH = 16  # ids a prompt, bos and eos included
BOS_TOKEN = clip_tokenizer.DEFAULT_SPECIAL_TOKENS["bos_token"]
EOS_TOKEN = clip_tokenizer.DEFAULT_SPECIAL_TOKENS["eos_token"]
MERGES_HEADER = "#version: 0.2"
# The tiny tower; projection_dim must be the teacher's width (its pooled_projection_dim), so the
# teacher config sets it.
TOY_ENCODER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=4, projection_dim=32, hidden_act="quick_gelu")
ENCODER_SEED = 0
# Meissonic's micro-conds at this "resolution" (one token a pixel): (8, 8, crop 0, 0, score 6).
MICRO_CONDS = (float(digits.SIDE), float(digits.SIDE), 0.0, 0.0, 6.0)
TEXT_ENCODER_DIR, TOKENIZER_DIR = "text_encoder", clip_tokenizer.RELEASE_SUBFOLDER
TEXT_ENCODER_KIND = "clip-text"


def digit_prompts(templates: Sequence[str] = TEMPLATES) -> Tuple[Tuple[str, ...], np.ndarray]:
  """(prompts, labels int32[10 * len(templates)]): digit d's prompts are rows
  d * len(templates) ... (d + 1) * len(templates) - 1, in template order."""
  prompts, labels = [], []
  for digit, word in enumerate(WORDS):
    for template in templates:
      prompts.append(template.format(word=word, n=digit))
      labels.append(digit)
  return tuple(prompts), np.asarray(labels, np.int32)


def prompt_words() -> List[str]:
  """The distinct CLIP words of every training and held-out prompt, sorted."""
  prompts = digit_prompts(TEMPLATES + (HELD_OUT_TEMPLATE,))[0]
  return sorted({word for prompt in prompts
                 for word in clip_tokenizer.split_words(clip_tokenizer.normalize(prompt))})


def _pieces(vocab: Dict[str, int], merges: List[Tuple[str, str]], word: str) -> List[str]:
  """The BPE symbols CLIP's tokenizer cuts `word` into under `merges`."""
  specials = {BOS_TOKEN: len(vocab), EOS_TOKEN: len(vocab) + 1}
  tokenizer = clip_tokenizer.CLIPTokenizer({**vocab, **specials}, merges, {})
  names = {index: symbol for symbol, index in tokenizer.vocab.items()}
  return [names[index] for index in tokenizer.encode(word)]


def word_vocabulary(words: Sequence[str]) -> Tuple[Dict[str, int], List[Tuple[str, str]]]:
  """A CLIP BPE vocabulary in which each of `words` is one token.

  Laid out as CLIP's: the 256 byte symbols, the same with the end-of-word mark `</w>`, one
  symbol a merge, then bos and eos. Each word's merges join the first two of its symbols at a
  time; a new merge has the lowest priority so far, so it applies only after every earlier one
  and leaves the words already whole untouched.

  Args:
    words: lowercase words as CLIP's pattern cuts them (letters, one digit, or a run of
      punctuation).

  Returns:
    (vocab: symbol -> id, merges: (left, right) pairs, highest priority first).
  """
  byte_symbols = [clip_tokenizer.bytes_to_unicode()[b] for b in range(256)]
  symbols = byte_symbols + [s + clip_tokenizer.END_OF_WORD for s in byte_symbols]
  vocab = {symbol: index for index, symbol in enumerate(symbols)}
  merges: List[Tuple[str, str]] = []
  for word in sorted(set(words)):
    if clip_tokenizer.split_words(clip_tokenizer.normalize(word)) != [word]:
      raise ValueError(f"{word!r} is not one lowercase CLIP word (it splits into "
                       f"{clip_tokenizer.split_words(clip_tokenizer.normalize(word))})")
    pieces = _pieces(vocab, merges, word)
    while len(pieces) > 1:
      merges.append((pieces[0], pieces[1]))
      vocab.setdefault(pieces[0] + pieces[1], len(vocab))
      pieces = _pieces(vocab, merges, word)
  for special in (BOS_TOKEN, EOS_TOKEN):
    vocab[special] = len(vocab)
  return vocab, merges


def write_tokenizer(folder: str, vocab: Dict[str, int], merges: Sequence[Tuple[str, str]],
                    max_length: int) -> None:
  """vocab.json, merges.txt and tokenizer_config.json (model_max_length, special tokens) of a
  CLIP tokenizer folder, as transformers.CLIPTokenizer writes them."""
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, clip_tokenizer.VOCAB_FILE), "w", encoding="utf-8") as f:
    json.dump(vocab, f, ensure_ascii=False)
  with open(os.path.join(folder, clip_tokenizer.MERGES_FILE), "w", encoding="utf-8") as f:
    f.write("".join(f"{line}\n" for line in [MERGES_HEADER] + [f"{a} {b}" for a, b in merges]))
  with open(os.path.join(folder, clip_tokenizer.CONFIG_FILE), "w", encoding="utf-8") as f:
    json.dump({"tokenizer_class": "CLIPTokenizer", "model_max_length": max_length,
               "bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN,
               "pad_token": EOS_TOKEN}, f, indent=2)


def write_word_vocabulary(folder: str, words: Sequence[str],
                          max_length: int = PROMPT_LENGTH) -> clip_tokenizer.CLIPTokenizer:
  """Writes a CLIP tokenizer folder in which each of `words` is one token (`word_vocabulary`)
  and returns it as `clip_tokenizer.load(folder, max_length)` reads it."""
  write_tokenizer(folder, *word_vocabulary(words), max_length)
  return clip_tokenizer.load(folder, max_length=max_length)


def toy_text_encoder(vocab_size: int, eos_token_id: int, max_length: int = PROMPT_LENGTH,
                     seed: int = ENCODER_SEED, **fields) -> Tuple[CLIPTextEncoder, Any]:
  """(CLIPTextEncoder, variables {"params": ...}): TOY_ENCODER updated by `fields`, with
  `max_length` positions, weights from Flax's initializers under PRNGKey(seed)."""
  encoder = CLIPTextEncoder(**{**TOY_ENCODER, **fields}, vocab_size=vocab_size,
                            max_position_embeddings=max_length, eos_token_id=eos_token_id)
  variables = encoder.init(jax.random.PRNGKey(seed), jnp.zeros((1, max_length), jnp.int32))
  return encoder, variables


@dataclasses.dataclass(frozen=True)
class DigitPrompts:
  """The digits with prompts ('digits_text'): the `Digits` interface plus prompt conditions.

  A label is a digit. Training pairs each sampled digit with one of its TEMPLATES prompts
  (`train_batch`); distillation draws training prompts (`train_conditions`, indices into
  `conditions`); evaluation conditions digit d on TEMPLATES[EVAL_TEMPLATE]'s prompt of d
  (`condition`; `held_out_condition` for HELD_OUT_TEMPLATE's), and the scorer checks samples
  against that digit.

  Attributes:
    teacher: the loaded teacher whose text encoder and tokenizer encode the prompts; None for a
      fresh toy encoder (pretraining, which saves it with `save_text`).
    encoder_fields: (name, value) pairs updating TOY_ENCODER for the fresh encoder.
    seed: the stream of `train_conditions` draws.
  """
  teacher: Optional[Teacher] = None
  encoder_fields: Tuple[Tuple[str, Any], ...] = ()
  seed: int = 0
  num_classes: int = digits.NUM_CLASSES
  seq_len: int = digits.SEQ_LEN
  codebook_size: int = digits.CODEBOOK_SIZE

  conditioning = TEXT
  scorer = "digits"  # the samples' digits against the prompts' (labels: digits)

  @classmethod
  def from_teacher(cls, teacher: Teacher, seed: int = 0) -> "DigitPrompts":
    return cls(teacher=teacher, seed=seed)

  @classmethod
  def toy(cls, seed: int = 0, **encoder_fields) -> "DigitPrompts":
    return cls(encoder_fields=tuple(sorted(encoder_fields.items())), seed=seed)

  @functools.cached_property
  def text(self) -> TextStack:
    if self.teacher is not None:
      return self.teacher.text
    vocab, merges = word_vocabulary(prompt_words())
    tokenizer = clip_tokenizer.CLIPTokenizer(vocab, merges, {}, PROMPT_LENGTH)
    encoder, variables = toy_text_encoder(len(vocab), tokenizer.eos_id,
                                          **dict(self.encoder_fields))
    return TextStack(encoder, variables, tokenizer)

  @property
  def prompts(self) -> Tuple[str, ...]:
    """The N training prompts (TEMPLATES), digit-major."""
    return digit_prompts(TEMPLATES)[0]

  @property
  def prompt_labels(self) -> np.ndarray:
    """int32[N]: the digit each training prompt names."""
    return digit_prompts(TEMPLATES)[1]

  @property
  def held_out_prompts(self) -> Tuple[str, ...]:
    """HELD_OUT_TEMPLATE's prompt of each digit, 0 to 9."""
    return digit_prompts((HELD_OUT_TEMPLATE,))[0]

  def _conditions(self, texts: Sequence[str]):
    from dimo_jax.data import prompts
    stack = self.text
    embeddings = prompts.encode_prompts((stack.encoder, stack.variables), stack.tokenizer,
                                        list(texts) + [""])
    # No negative prompt: guidance and a dropped condition both use the empty prompt.
    return prompts.PromptConditions(embeddings, MICRO_CONDS, distil_neg_prompt=False,
                                    seed=self.seed)

  @functools.cached_property
  def conditions(self):
    """data.prompts.PromptConditions of the training prompts (+ "" last)."""
    return self._conditions(self.prompts)

  @functools.cached_property
  def held_out_conditions(self):
    """data.prompts.PromptConditions of `held_out_prompts` (+ "" last): index d is digit d."""
    return self._conditions(self.held_out_prompts)

  def train_batch(self, rng: np.random.Generator, batch: int) -> Tuple[np.ndarray, np.ndarray]:
    """(tokens int32[B, 64] of real digits, prompt_indices int32[B] into `prompts`): each digit
    with one of its own prompts, both uniform."""
    tokens, labels = digits.load_digit_tokens()
    index = rng.integers(0, len(tokens), batch)
    per_digit = len(TEMPLATES)
    choice = rng.integers(0, per_digit, batch)
    return tokens[index], (labels[index] * per_digit + choice).astype(np.int32)

  def real_tokens(self) -> Tuple[np.ndarray, np.ndarray]:
    """Soft-Di[M]O's real data: every digit, tokens int32[1797, 64], each with one of its own
    TEMPLATES prompts (a fixed draw), as prompt indices int32[1797] into `conditions`."""
    tokens, labels = digits.load_digit_tokens()
    choice = np.random.default_rng(7919).integers(0, len(TEMPLATES), len(labels))
    return (np.asarray(tokens, np.int32),
            (np.asarray(labels) * len(TEMPLATES) + choice).astype(np.int32))

  def train_condition(self, indices) -> Dict[str, np.ndarray]:
    """The cond dict of `train_batch`'s prompt indices."""
    return self.conditions.condition(indices)

  def condition(self, labels) -> Dict[str, np.ndarray]:
    """The `TextConditioned` cond dict of digits `labels` int[B]: each digit's prompt of
    TEMPLATES[EVAL_TEMPLATE]."""
    return self.conditions.condition(np.asarray(labels) * len(TEMPLATES) + EVAL_TEMPLATE)

  def held_out_condition(self, labels) -> Dict[str, np.ndarray]:
    """The same for HELD_OUT_TEMPLATE's prompts, which no training step sees."""
    return self.held_out_conditions.condition(labels)

  def train_conditions(self, step: int, batch: int, rounds: int,
                       micro: int = 1) -> Dict[str, np.ndarray]:
    """Training prompt indices of Di[M]O step `step` (`PromptConditions.draw`)."""
    return self.conditions.draw(step, batch, rounds, micro)

  def images(self, tokens) -> np.ndarray:
    return digits.tokens_to_images(tokens)

  def save_text(self, folder: str) -> None:
    """Writes the text stack into a teacher directory: `text_encoder/` (a model directory of
    kind 'clip-text') and `tokenizer/` (vocab.json, merges.txt, tokenizer_config.json)."""
    stack = self.text
    modeldir.write(os.path.join(folder, TEXT_ENCODER_DIR),
                   {"kind": TEXT_ENCODER_KIND, "config": modeldir.module_config(stack.encoder),
                    "source": {"format": "dimo_jax digits_text toy (random weights)"}},
                   stack.variables)
    merges = sorted(stack.tokenizer.ranks, key=stack.tokenizer.ranks.get)
    write_tokenizer(os.path.join(folder, TOKENIZER_DIR), stack.tokenizer.vocab, merges,
                    stack.tokenizer.max_length)


def from_config(config: ml_collections.ConfigDict,
                teacher: Optional[Teacher] = None) -> DigitPrompts:
  """`teacher`'s text stack (distillation: the teacher of `config.teacher_path`, as `data.get`
  loads it), else a fresh toy encoder updated by `config.text_encoder` (pretraining)."""
  if teacher is not None:
    return DigitPrompts.from_teacher(teacher, seed=config.get("global_seed", 0))
  fields = config.get("text_encoder") or ml_collections.ConfigDict()
  return DigitPrompts.toy(seed=config.get("seed", 0), **fields.to_dict())
