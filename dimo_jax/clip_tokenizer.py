"""CLIP's byte-level BPE tokenizer, read from a `tokenizer/` folder (vocab.json + merges.txt).

Produces the ids `transformers.CLIPTokenizer(prompts, padding="max_length", truncation=True,
max_length=77)` produces, which is what the Meissonic pipeline feeds its text encoder:

  1. The folder's special tokens (bos, eos, unk, pad) written literally in a prompt are cut out
     first and map straight to their ids, as transformers does (this matters for a pad token such
     as Meissonic's `!`: "wow!" gives `wow</w>` and the pad id, not `!</w>`).
  2. Every other piece is NFC-normalized, each run of whitespace becomes one space, and it is
     lowercased.
  3. Words are cut with CLIP's pattern: `<|startoftext|>`, `<|endoftext|>`, the contractions
     's 't 're 've 'm 'll 'd, a run of letters, one digit, or a run of other non-space
     characters; whitespace separates words and is dropped. (A lowercased `<|ENDOFTEXT|>` is
     not the special token: as in transformers it becomes the words `<|`, `endoftext`, `|>`.)
  4. Each word's UTF-8 bytes become printable characters (GPT-2's byte-to-unicode table), the
     last one marked with the end-of-word suffix `</w>`, and the merges of merges.txt are applied,
     lowest rank first.
  5. bos + ids + eos, truncated to `max_length` (eos kept) and padded with the pad token.

No ftfy: the original OpenAI tokenizer repairs mojibake with ftfy first; transformers does not,
and neither does this. The pattern's character classes are read from `unicodedata`, so no
third-party regex module is needed.
"""

import functools
import json
import os
import unicodedata
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

VOCAB_FILE = "vocab.json"
MERGES_FILE = "merges.txt"
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_FILE = "special_tokens_map.json"
RELEASE_SUBFOLDER = "tokenizer"
END_OF_WORD = "</w>"
# transformers.CLIPTokenizer's defaults, used where the folder's files do not name a token.
DEFAULT_SPECIAL_TOKENS = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
                          "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
DEFAULT_MAX_LENGTH = 77

_CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")
_PATTERN_SPECIALS = ("<|startoftext|>", "<|endoftext|>")
# Unicode's White_Space property, which `\s` of the pattern means (str.isspace() also counts the
# ASCII separators 0x1c-0x1f, which are not white space there).
_WHITESPACE = frozenset("\t\n\v\f\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006"
                        "\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000")


def _is_letter(char: str) -> bool:
  return unicodedata.category(char).startswith("L")


def _is_number(char: str) -> bool:
  return unicodedata.category(char).startswith("N")


@functools.lru_cache(maxsize=1)
def bytes_to_unicode() -> Dict[int, str]:
  """Byte -> a printable character: printable Latin-1 bytes stand for themselves, the other 68
  bytes (controls, space, soft hyphen ...) take the characters from U+0100 upwards, in order."""
  printable = set(range(ord("!"), ord("~") + 1)) | set(range(ord("¡"), ord("¬") + 1)) | set(
      range(ord("®"), ord("ÿ") + 1))
  table, shifted = {}, 0
  for byte in range(256):
    if byte in printable:
      table[byte] = chr(byte)
    else:
      table[byte] = chr(256 + shifted)
      shifted += 1
  return table


def normalize(text: str) -> str:
  """NFC, every whitespace run -> one space, lowercase."""
  text = unicodedata.normalize("NFC", text)
  out, in_space = [], False
  for char in text:
    if char in _WHITESPACE:
      if not in_space:
        out.append(" ")
      in_space = True
    else:
      out.append(char)
      in_space = False
  return "".join(out).lower()


def split_words(text: str) -> List[str]:
  """The words of normalized text under CLIP's pattern (alternatives tried in order)."""
  words, i, n = [], 0, len(text)
  while i < n:
    char = text[i]
    special = next((s for s in _PATTERN_SPECIALS if text.startswith(s, i)), None)
    if special is None:
      special = next((c for c in _CONTRACTIONS if text.startswith(c, i)), None)
    if special is not None:
      # transformers then re-splits every word with GPT-2's pattern (its ByteLevel step), which
      # leaves the other words whole but cuts these two into `<|`, the name and `|>`.
      words.extend(["<|", special[2:-2], "|>"] if special in _PATTERN_SPECIALS else [special])
      i += len(special)
    elif char in _WHITESPACE:
      i += 1
    elif _is_letter(char):
      j = i + 1
      while j < n and _is_letter(text[j]):
        j += 1
      words.append(text[i:j])
      i = j
    elif _is_number(char):
      words.append(char)
      i += 1
    else:
      j = i + 1
      while j < n and not (text[j] in _WHITESPACE or _is_letter(text[j]) or _is_number(text[j])):
        j += 1
      words.append(text[i:j])
      i = j
  return words


def _token_content(value, path: str, key: str) -> str:
  """A special token as tokenizer files write it: a string or an AddedToken dict."""
  if isinstance(value, str):
    return value
  if isinstance(value, dict) and isinstance(value.get("content"), str):
    return value["content"]
  raise ValueError(f"{path}: {key!r} is {value!r}, expected a string or a dict with 'content'")


class CLIPTokenizer:
  """Prompts -> int32[B, max_length] token ids (see the module docstring for the steps).

  Attributes:
    vocab: token string -> id (vocab.json).
    ranks: (left, right) -> merge priority, 0 first (merges.txt order).
    bos_token, eos_token, unk_token, pad_token: the special token strings.
    max_length: ids per prompt, bos and eos included (77 for every released CLIP).
  """

  def __init__(self, vocab: Dict[str, int], merges: Sequence[Tuple[str, str]],
               special_tokens: Dict[str, str], max_length: int = DEFAULT_MAX_LENGTH,
               source: str = "<memory>"):
    self.vocab = dict(vocab)
    self.ranks = {tuple(pair): rank for rank, pair in enumerate(merges)}
    tokens = {**DEFAULT_SPECIAL_TOKENS, **special_tokens}
    self.bos_token, self.eos_token = tokens["bos_token"], tokens["eos_token"]
    self.unk_token, self.pad_token = tokens["unk_token"], tokens["pad_token"]
    for key in DEFAULT_SPECIAL_TOKENS:
      if tokens[key] not in self.vocab:
        raise ValueError(f"{source}: {key} {tokens[key]!r} is not in the vocabulary")
    if max_length < 2:
      raise ValueError(f"{source}: max_length {max_length} leaves no room for bos and eos")
    self.max_length = max_length
    self.bos_id, self.eos_id = self.vocab[self.bos_token], self.vocab[self.eos_token]
    self.unk_id, self.pad_id = self.vocab[self.unk_token], self.vocab[self.pad_token]
    # Longest first, so that a special token containing another is cut out whole.
    self._specials = sorted({self.bos_token, self.eos_token, self.unk_token, self.pad_token},
                            key=len, reverse=True)
    self._byte_chars = bytes_to_unicode()
    self._bpe = functools.lru_cache(maxsize=65536)(self._bpe_uncached)

  def _bpe_uncached(self, word: str) -> Tuple[str, ...]:
    """The BPE symbols of one word (already byte-mapped)."""
    symbols = list(word[:-1]) + [word[-1] + END_OF_WORD]
    while len(symbols) > 1:
      pairs = {(a, b) for a, b in zip(symbols, symbols[1:])}
      best = min(pairs, key=lambda pair: self.ranks.get(pair, float("inf")))
      if best not in self.ranks:
        break
      merged, i = [], 0
      while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
          merged.append(symbols[i] + symbols[i + 1])
          i += 2
        else:
          merged.append(symbols[i])
          i += 1
      symbols = merged
    return tuple(symbols)

  def _split_specials(self, text: str) -> List[Tuple[str, bool]]:
    """[(piece, is_special)] with every literal special token cut out of `text`."""
    pieces, start, i = [], 0, 0
    while i < len(text):
      special = next((s for s in self._specials if text.startswith(s, i)), None)
      if special is None:
        i += 1
        continue
      if i > start:
        pieces.append((text[start:i], False))
      pieces.append((special, True))
      i = start = i + len(special)
    if start < len(text):
      pieces.append((text[start:], False))
    return pieces

  def encode(self, text: str) -> List[int]:
    """The ids of one prompt without bos, eos, truncation or padding."""
    ids = []
    for piece, is_special in self._split_specials(text):
      if is_special:
        ids.append(self.vocab[piece])
        continue
      for word in split_words(normalize(piece)):
        mapped = "".join(self._byte_chars[b] for b in word.encode("utf-8"))
        ids.extend(self.vocab.get(symbol, self.unk_id) for symbol in self._bpe(mapped))
    return ids

  def __call__(self, prompts: Sequence[str]) -> np.ndarray:
    """int32[B, max_length]: bos, the prompt's ids (truncated), eos, then pad ids."""
    if isinstance(prompts, str):
      raise TypeError("expected a list of prompts, got one string")
    out = np.full((len(prompts), self.max_length), self.pad_id, np.int32)
    for row, prompt in enumerate(prompts):
      ids = [self.bos_id] + self.encode(prompt)[: self.max_length - 2] + [self.eos_id]
      out[row, : len(ids)] = ids
    return out


def load(folder: str, max_length: Optional[int] = None) -> CLIPTokenizer:
  """The tokenizer of a `tokenizer/` folder: vocab.json, merges.txt and, when present,
  tokenizer_config.json and special_tokens_map.json (special tokens, model_max_length).

  `folder` may also be a release root (Meissonic's) whose `tokenizer/` holds those files.
  `max_length` overrides the folder's `model_max_length` (77 when neither is given).
  """
  if (not os.path.isfile(os.path.join(folder, VOCAB_FILE))
      and os.path.isdir(os.path.join(folder, RELEASE_SUBFOLDER))):
    folder = os.path.join(folder, RELEASE_SUBFOLDER)
  vocab_path, merges_path = os.path.join(folder, VOCAB_FILE), os.path.join(folder, MERGES_FILE)
  for path in (vocab_path, merges_path):
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{path}: no such file (expected a CLIP tokenizer folder)")
  with open(vocab_path, encoding="utf-8") as f:
    vocab = json.load(f)
  if not isinstance(vocab, dict):
    raise ValueError(f"{vocab_path}: expected a JSON object token -> id, "
                     f"found {type(vocab).__name__}")
  merges = []
  with open(merges_path, encoding="utf-8") as f:
    for number, line in enumerate(f, 1):
      line = line.rstrip("\n")
      if not line.strip() or (number == 1 and line.startswith("#version")):
        continue
      pair = line.split(" ")
      if len(pair) != 2:
        raise ValueError(f"{merges_path}:{number}: expected two symbols, found {line!r}")
      merges.append(tuple(pair))

  special_tokens, model_max_length = {}, None
  # special_tokens_map.json is read last: where both files name a token, it wins, as in
  # transformers.
  for name in (CONFIG_FILE, SPECIAL_TOKENS_FILE):
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
      continue
    with open(path, encoding="utf-8") as f:
      config = json.load(f)
    for key in DEFAULT_SPECIAL_TOKENS:
      if config.get(key) is not None:
        special_tokens[key] = _token_content(config[key], path, key)
    if name == CONFIG_FILE and isinstance(config.get("model_max_length"), int):
      model_max_length = config["model_max_length"]
  # Some releases write model_max_length as a huge "unbounded" sentinel; CLIP's text encoder
  # has 77 positions.
  if model_max_length is None or model_max_length > 10 ** 6:
    model_max_length = DEFAULT_MAX_LENGTH
  return CLIPTokenizer(vocab, merges, special_tokens, max_length or model_max_length,
                       source=folder)
