"""Prompts for text-to-image distillation and their CLIP embeddings, cached on disk.

  read_prompt_file(path)               one prompt a line (UTF-8)
  tfds_captions(name, split, field)    the captions of a tensorflow-datasets dataset
  config_prompts(config)               whichever of the two `config.prompts` names
  encode_prompts(...)                  prompts + a negative prompt -> PromptEmbeddings
  cached_prompt_embeddings(path, ...)  the same, kept in an .npz keyed by what produced it

What Meissonic's transformer is conditioned on: `encoder_hidden_states`, the CLIP text encoder's
penultimate hidden state (hidden_states[-2], before the final LayerNorm), and
`pooled_projections`, the projected pooled output (text_embeds). Classifier-free guidance takes
the negative prompt's pair as the unconditional branch.

tensorflow-datasets is imported only by `tfds_captions`, so prompt files need no TensorFlow.
"""

import dataclasses
import functools
import hashlib
import json
import os
import tempfile
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from dimo_jax import clip_tokenizer

# Below this many batches encoding is quick enough that a progress bar is noise.
PROGRESS_MIN_BATCHES = 8
_CACHE_ARRAYS = ("hidden", "pooled", "neg_hidden", "neg_pooled")


def read_prompt_file(path: str) -> List[str]:
  """The prompts of a text file: one a line, surrounding whitespace and blank lines dropped.

  The file is UTF-8 (a leading byte-order mark is ignored); lines may end in \\n or \\r\\n.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such prompt file")
  with open(path, "rb") as f:
    raw = f.read()
  try:
    text = raw.decode("utf-8-sig")
  except UnicodeDecodeError as error:
    line = raw[:error.start].count(b"\n") + 1
    raise ValueError(f"{path}:{line}: not UTF-8 ({error.reason} at byte {error.start})") from None
  prompts = [line.strip() for line in text.splitlines()]
  prompts = [prompt for prompt in prompts if prompt]
  if not prompts:
    raise ValueError(f"{path}: holds no prompt (every line is blank)")
  return prompts


def _leaf_paths(example: Any, prefix: str = "") -> List[str]:
  """Every '/'-joined key path to a non-dict value of a (nested) example dict."""
  if not isinstance(example, dict):
    return [prefix]
  paths = []
  for key, value in example.items():
    paths.extend(_leaf_paths(value, f"{prefix}/{key}" if prefix else key))
  return paths


def _lookup(example: Any, parts: Sequence[str]) -> Any:
  """The value at `parts` in a nested dict, or KeyError.

  tfds feature names may hold '/' themselves (coco_captions' top-level 'image/id'), so at each
  level the longest run of parts that is a key is taken first.
  """
  if not parts:
    return example
  if isinstance(example, dict):
    for end in range(len(parts), 0, -1):
      key = "/".join(parts[:end])
      if key in example:
        try:
          return _lookup(example[key], parts[end:])
        except KeyError:
          continue
  raise KeyError("/".join(parts))


def _texts(value: Any) -> Iterator[Union[str, bytes, None]]:
  """The strings of a text feature, in order: one for a scalar, all for a (nested) sequence;
  None for anything that is not text."""
  if isinstance(value, (str, bytes)):
    yield value
  elif isinstance(value, np.ndarray) and value.dtype.kind in "OSU":
    for item in value.reshape(-1):
      yield item if isinstance(item, (str, bytes)) else None
  elif isinstance(value, (list, tuple)):
    for item in value:
      yield from _texts(item)
  else:
    yield None


def example_texts(example: Any, field: str) -> List[str]:
  """The texts at the '/'-separated `field` of one tfds example (UTF-8 decoded, stripped,
  blanks dropped); KeyError when the example has no such field."""
  texts = []
  for text in _texts(_lookup(example, field.split("/"))):
    if isinstance(text, bytes):
      text = text.decode("utf-8", errors="replace")
    if text is not None and text.strip():
      texts.append(text.strip())
  return texts


def tfds_captions(name: str, split: str, field: str, limit: Optional[int] = None,
                  data_dir: Optional[str] = None) -> List[str]:
  """The captions of a tensorflow-datasets dataset, in dataset order (files not shuffled).

  Args:
    name: a tfds name, e.g. 'coco_captions' (optionally with a version, 'coco_captions:1.1.0').
    split: e.g. 'train', 'validation', 'train[:1000]'.
    field: a '/'-separated path into an example, e.g. 'captions/text' for coco_captions. A
      sequence field gives every element (every caption of every example); bytes are UTF-8.
    limit: at most this many captions (the first ones); None for all.
    data_dir: where tfds keeps its data; None for its default.

  Returns:
    The captions, surrounding whitespace and blank captions dropped.
  """
  try:
    import tensorflow_datasets as tfds
  except ImportError as error:
    raise ImportError(f"tfds_captions({name!r}) needs the tensorflow-datasets package "
                      f"(pip install tensorflow-datasets): {error}") from None
  dataset = tfds.load(name, split=split, data_dir=data_dir, shuffle_files=False)
  parts = field.split("/")
  captions: List[str] = []
  for index, example in enumerate(tfds.as_numpy(dataset)):
    if limit is not None and len(captions) >= limit:
      break
    try:
      value = _lookup(example, parts)
    except KeyError:
      raise KeyError(f"tfds {name!r} ({split}): no field {field!r}; its fields are "
                     f"{sorted(_leaf_paths(example))}") from None
    for text in _texts(value):
      if text is None:
        kind = getattr(value, "dtype", type(value).__name__)
        raise ValueError(f"tfds {name!r} ({split}): field {field!r} of example {index} holds "
                         f"{kind}, expected text")
      caption = (text.decode("utf-8") if isinstance(text, bytes) else text).strip()
      if caption:
        captions.append(caption)
  if not captions:
    raise ValueError(f"tfds {name!r} ({split}): no caption in field {field!r}")
  return captions if limit is None else captions[:limit]


def config_prompts(config: ml_collections.ConfigDict) -> List[str]:
  """The prompts `config.prompts` names, the first `limit` of them (all when None).

  config.prompts fields: `file` (a prompt file) or `tfds` (a dataset name, with `tfds_split`,
  default 'train', `tfds_field` and `tfds_data_dir`), exactly one of the two; `limit`.
  """
  spec = config.prompts
  file, name, limit = spec.get("file"), spec.get("tfds"), spec.get("limit")
  if (file is None) == (name is None):
    raise ValueError("config.prompts: set exactly one of `file` and `tfds`, found "
                     f"file={file!r} and tfds={name!r}")
  if limit is not None and limit < 1:
    raise ValueError(f"config.prompts.limit: expected a positive count or None, found {limit}")
  if file is not None:
    prompts = read_prompt_file(file)
    return prompts if limit is None else prompts[:limit]
  if not spec.get("tfds_field"):
    raise ValueError(f"config.prompts: tfds={name!r} needs `tfds_field`, the caption's path in "
                     "an example (e.g. 'captions/text')")
  return tfds_captions(name, spec.get("tfds_split", "train"), spec.tfds_field, limit=limit,
                       data_dir=spec.get("tfds_data_dir"))


@flax.struct.dataclass
class PromptEmbeddings:
  """What the transformer is conditioned on, for N prompts and the negative prompt.

  Attributes:
    hidden: float32[N, T, D], the text encoder's penultimate hidden states
      (`encoder_hidden_states`).
    pooled: float32[N, P], the projected pooled outputs (`pooled_projections`).
    neg_hidden: float32[T, D], neg_pooled: float32[P], the same for the negative prompt.
    prompts: the N prompts (host side, not a pytree leaf).
    negative_prompt: the negative prompt (host side).
  """
  hidden: Any
  pooled: Any
  neg_hidden: Any
  neg_pooled: Any
  prompts: Tuple[str, ...] = flax.struct.field(pytree_node=False)
  negative_prompt: str = flax.struct.field(pytree_node=False)


TextEncoder = Union[str, Tuple[nn.Module, Any]]
Tokenizer = Union[str, clip_tokenizer.CLIPTokenizer]


def _text_encoder(text_encoder: TextEncoder) -> Tuple[nn.Module, Any]:
  if isinstance(text_encoder, str):
    from dimo_jax.convert import clip as convert_clip
    return convert_clip.text_encoder_from_folder(text_encoder)
  return text_encoder


def _tokenizer(tokenizer: Tokenizer) -> clip_tokenizer.CLIPTokenizer:
  return clip_tokenizer.load(tokenizer) if isinstance(tokenizer, str) else tokenizer


@functools.partial(jax.jit, static_argnums=0)
def _encode_batch(module: nn.Module, variables: Any, ids: jax.Array):
  """int32[B, T] -> (float32[B, T, D] penultimate hidden states, float32[B, P] text_embeds)."""
  out = module.apply(variables, ids)
  return out["hidden_states"][-2], out["text_embeds"]


def encode_prompts(text_encoder: TextEncoder, tokenizer: Tokenizer, prompts: Sequence[str],
                   negative_prompt: str = "", batch_size: int = 64) -> PromptEmbeddings:
  """Encodes `prompts` and `negative_prompt` with a CLIP text encoder, `batch_size` at a time.

  Args:
    text_encoder: a `text_encoder/` folder (or a release root holding one), or the
      (CLIPTextEncoder, variables) pair `convert.clip.text_encoder_from_folder` returns.
    tokenizer: a `tokenizer/` folder (or a release root) or a loaded CLIPTokenizer.
    prompts: N >= 1 prompts.
    negative_prompt: the unconditional branch's prompt ("" for none, as Meissonic's default).
    batch_size: prompts per compiled call; the last batch is padded to the same shape.

  Returns:
    PromptEmbeddings holding host (numpy) float32 arrays.
  """
  if isinstance(prompts, str) or not len(prompts):
    raise ValueError(f"expected a non-empty list of prompts, got {prompts!r:.80}")
  if batch_size < 1:
    raise ValueError(f"batch_size: expected a positive count, got {batch_size}")
  module, variables = _text_encoder(text_encoder)
  # The negative prompt rides along as the last row, so one pass encodes everything.
  ids = _tokenizer(tokenizer)(list(prompts) + [negative_prompt])
  total = len(ids)
  batch_size = min(batch_size, total)
  starts = range(0, total, batch_size)
  hidden, pooled = [], []
  for start in tqdm(starts, desc="prompt embeddings", unit="batch", mininterval=2.0,
                    disable=len(starts) < PROGRESS_MIN_BATCHES):
    chunk = ids[start:start + batch_size]
    # Repeating the last real row keeps the padding rows well-formed token sequences.
    padded = np.pad(chunk, ((0, batch_size - len(chunk)), (0, 0)), mode="edge")
    h, p = _encode_batch(module, variables, jnp.asarray(padded))
    hidden.append(np.asarray(h, np.float32)[:len(chunk)])
    pooled.append(np.asarray(p, np.float32)[:len(chunk)])
  hidden, pooled = np.concatenate(hidden), np.concatenate(pooled)
  return PromptEmbeddings(hidden=hidden[:-1], pooled=pooled[:-1], neg_hidden=hidden[-1],
                          neg_pooled=pooled[-1], prompts=tuple(prompts),
                          negative_prompt=negative_prompt)


def encoder_fingerprint(module: nn.Module, variables: Any) -> str:
  """sha256 over the module's class and fields (dtype included) and every parameter's path,
  shape, dtype and bytes: two encoders with the same fingerprint encode alike."""
  digest = hashlib.sha256()
  fields = {f.name: repr(getattr(module, f.name)) for f in dataclasses.fields(module)
            if f.name not in ("parent", "name")}
  digest.update(json.dumps([type(module).__name__, fields], sort_keys=True).encode())
  for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]:
    leaf = np.asarray(leaf)
    digest.update(f"{jax.tree_util.keystr(path)}:{leaf.shape}:{leaf.dtype}".encode())
    digest.update(np.ascontiguousarray(leaf).tobytes())
  return digest.hexdigest()


def tokenizer_fingerprint(tokenizer: clip_tokenizer.CLIPTokenizer) -> str:
  """sha256 over what decides a tokenizer's ids: vocabulary, merges, special tokens, length."""
  merges = sorted(tokenizer.ranks.items(), key=lambda item: item[1])
  state = [sorted(tokenizer.vocab.items()), [pair for pair, _ in merges],
           [tokenizer.bos_token, tokenizer.eos_token, tokenizer.unk_token, tokenizer.pad_token],
           tokenizer.max_length]
  return hashlib.sha256(json.dumps(state).encode()).hexdigest()


def cache_key(prompts: Sequence[str], negative_prompt: str, encoder: str, tokenizer: str) -> str:
  """sha256 over the prompts, the negative prompt and the two fingerprints."""
  record = {"prompts": list(prompts), "negative_prompt": negative_prompt, "encoder": encoder,
            "tokenizer": tokenizer}
  return hashlib.sha256(json.dumps(record, ensure_ascii=False).encode()).hexdigest()


def _load_cache(path: str, key: str, count: int) -> Optional[dict]:
  """The arrays of a cache file written under `key` for `count` prompts, else None."""
  try:
    with np.load(path, allow_pickle=False) as data:
      if str(data["key"]) != key:
        return None
      arrays = {name: np.asarray(data[name], np.float32) for name in _CACHE_ARRAYS}
  except (OSError, KeyError, ValueError, EOFError) as error:
    print(f"{path}: unreadable prompt embedding cache ({error}), recomputing")
    return None
  if len(arrays["hidden"]) != count or len(arrays["pooled"]) != count:
    return None
  return arrays


def _write_cache(path: str, key: str, embeddings: PromptEmbeddings) -> None:
  """Writes the cache through a temporary sibling, so the file on disk is always whole."""
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  handle, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp.npz",
                                 dir=folder)
  try:
    with os.fdopen(handle, "wb") as f:
      np.savez(f, key=np.asarray(key),
               **{name: getattr(embeddings, name) for name in _CACHE_ARRAYS})
    os.replace(tmp, path)
  except BaseException:
    os.unlink(tmp)
    raise


def cached_prompt_embeddings(cache_path: str, text_encoder: TextEncoder, tokenizer: Tokenizer,
                             prompts: Sequence[str], negative_prompt: str = "",
                             batch_size: int = 64) -> PromptEmbeddings:
  """`encode_prompts`, read from `cache_path` (.npz) when that file was written for the same
  prompts, negative prompt, encoder (parameters and config) and tokenizer.

  Otherwise (no file, another key, an unreadable file) the embeddings are computed and the file
  is written or replaced atomically, by process 0 only in a multi-process run. The file holds
  `key` and the four arrays of PromptEmbeddings; its size is about N * T * D * 4 bytes.
  """
  module, variables = _text_encoder(text_encoder)
  tokenizer = _tokenizer(tokenizer)
  key = cache_key(prompts, negative_prompt, encoder_fingerprint(module, variables),
                  tokenizer_fingerprint(tokenizer))
  if os.path.isfile(cache_path):
    arrays = _load_cache(cache_path, key, len(prompts))
    if arrays is not None:
      return PromptEmbeddings(**arrays, prompts=tuple(prompts), negative_prompt=negative_prompt)
  embeddings = encode_prompts((module, variables), tokenizer, prompts, negative_prompt,
                              batch_size)
  if jax.process_index() == 0:
    _write_cache(cache_path, key, embeddings)
  return embeddings


@dataclasses.dataclass(frozen=True)
class PromptConditions:
  """The conditions a text-to-image Di[M]O run feeds its step and samplers, from encodings.

  Built from the encodings of N prompts plus the empty prompt as their LAST row (what a dropped
  condition becomes) and the negative prompt (`embeddings.neg_*`, what the guided teacher's
  unconditional branch sees when `distil_neg_prompt`; else the empty prompt's).

  Attributes:
    embeddings: PromptEmbeddings of prompts + [""] (host numpy arrays).
    micro_conds: float32[5], the release's (resolution, resolution, 0, 0, 6).
    distil_neg_prompt: guide the teacher against the negative prompt (else against "").
    seed: the stream of prompt draws; step s always draws the same prompts.
  """
  embeddings: PromptEmbeddings
  micro_conds: Tuple[float, ...]
  distil_neg_prompt: bool = True
  seed: int = 0

  def __post_init__(self):
    if self.embeddings.prompts[-1:] != ("",):
      raise ValueError("PromptConditions needs the empty prompt as the last encoded prompt")

  @property
  def num_prompts(self) -> int:
    """N, the prompts that can be drawn (the empty prompt is not one of them)."""
    return len(self.embeddings.prompts) - 1

  def condition(self, indices) -> Dict[str, np.ndarray]:
    """The `TextConditioned` cond dict of the prompts `indices` int[...]: arrays [..., ...].
    Its `prompt` entry (the indices themselves, which the model does not read) lets a reward
    or the GAN's real data look a prompt up (rewards.py, `real_conditions`)."""
    indices = np.asarray(indices)
    if indices.size and (indices.min() < 0 or indices.max() >= self.num_prompts):
      raise ValueError(f"prompt indices must be in [0, {self.num_prompts}), got "
                       f"[{indices.min()}, {indices.max()}]")
    e = self.embeddings
    like = lambda row: np.broadcast_to(row, indices.shape + row.shape)
    neg_hidden, neg_pooled = ((e.neg_hidden, e.neg_pooled) if self.distil_neg_prompt
                              else (e.hidden[-1], e.pooled[-1]))
    return {"prompt": indices.astype(np.int32),
            "hidden": e.hidden[indices], "pooled": e.pooled[indices],
            "uncond_hidden": like(e.hidden[-1]), "uncond_pooled": like(e.pooled[-1]),
            "neg_hidden": like(neg_hidden), "neg_pooled": like(neg_pooled),
            "micro_conds": like(np.asarray(self.micro_conds, np.float32))}

  def draw(self, step: int, batch: int, rounds: int, micro: int = 1) -> Dict[str, np.ndarray]:
    """Prompt indices of step `step`: {"generator": int[B], "auxiliary": int[rounds, B]}; with
    `micro` > 1 micro-batches (gradient accumulation) int[micro, B] and int[rounds, micro, B]."""
    rng = np.random.default_rng((self.seed, step))
    shape = (batch,) if micro == 1 else (micro, batch)
    return {"generator": rng.integers(0, self.num_prompts, shape),
            "auxiliary": rng.integers(0, self.num_prompts, (rounds,) + shape)}
