"""Teachers: one `Teacher` type for every kind, read from a model directory.

A teacher directory is a `dimo_jax.modeldir` (model.json + orbax params/), written by
`python -m dimo_jax.pretrain` or `python -m dimo_jax.convert`; `model.json["kind"]` names its
`Kind`, which declares what the rest of the code may ask of it (how it is conditioned, whether
it can be guided, what `fix_emb_layer` freezes, its own multi-step decode rule). Every kind's
module has the one call the Di[M]O step and the samplers make:

  model.apply(variables, tokens int32[B, L] (mask = V), cond, drop bool[B] | None,
              emb_noise=..., deterministic=..., rngs=...) -> float32[B, L, V]

where `cond` is int32[B] class labels for a class-conditional kind and a dict of batch-leading
prompt encodings for a text-to-image one (`teachers.meissonic`). Teacher, generator and
auxiliary model are that module with three parameter trees.
"""

import dataclasses
from typing import Any, Callable, Dict, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from dimo_jax import modeldir, sampling

CLASS, TEXT = "class", "text"  # the two ways a teacher is conditioned


@dataclasses.dataclass(frozen=True)
class Kind:
  """What a teacher kind declares.

  Attributes:
    name: model.json's `kind`.
    module: "package.module:Class" of its Flax module (imported on use).
    conditioning: CLASS (labels int32[B]) or TEXT (prompt encodings, fed by the host).
    guidance: whether it has an unconditional input (classifier-free guidance).
    frozen_with_emb: '/'-joined parameter-path prefixes `fix_emb_layer` freezes.
    decode: its multi-step sampler, 'maskgit' (`sampling.maskgit_sample`), 'maskbit'
      (`sampling.maskbit_sample`) or 'meissonic' (`sampling.meissonic_sample`, the release's
      scheduler).
  """
  name: str
  module: str
  conditioning: str
  guidance: bool
  frozen_with_emb: Tuple[str, ...]
  decode: str


KINDS = {k.name: k for k in (
    # valeoai/Halton-MaskGIT's MaskTransformer (and the toy teachers we pretrain): the tied
    # embedding/output table, the positional embedding and the output bias are frozen.
    Kind("maskgit", "dimo_jax.models.maskgit:MaskTransformer", CLASS, True,
         ("tok_emb", "pos_emb", "bias"), "maskgit"),
    # google-research/maskgit has no unconditional token.
    Kind("google-maskgit", "dimo_jax.models.google_maskgit:GoogleMaskGIT", CLASS, False,
         ("Embed_0/word_embeddings", "Embed_0/position_embeddings", "MlmLayer_0/mlm_bias"),
         "maskgit"),
    Kind("meissonic", "dimo_jax.models.meissonic:MeissonicTransformer", TEXT, True,
         ("embed", "mlm_layer"), "meissonic"),
    # markweberdev/maskbit's LFQBert: n positions x m splits as L = n * m sub-tokens. Its
    # embeddings are the bit projection, the class table and the positions (the output head
    # is a separate layer, not tied as MaskGIT's).
    Kind("maskbit", "dimo_jax.models.maskbit:LFQBert", CLASS, True,
         ("input_proj", "class_emb", "pos_emb"), "maskbit"),
)}
_MODULES = {k.name: k.module for k in KINDS.values() if k.conditioning == CLASS}


def kind_of(description: Dict[str, Any], src: str = "") -> Kind:
  if description["kind"] not in KINDS:
    raise modeldir.ModelDirError(f"{modeldir.description_path(src)}: kind: expected a teacher kind "
                                 f"among {sorted(KINDS)}, found {description['kind']!r}")
  return KINDS[description["kind"]]


def model_description(model: nn.Module) -> Dict[str, Any]:
  return modeldir.describe(_MODULES, model, "teacher")


def build_model(description: Dict[str, Any], dtype=jnp.float32, src: str = "") -> nn.Module:
  """The module of a class-conditional teacher's model.json (of the directory `src`, named in
  errors); `modeldir.ModelDirError` for an unknown kind or a config that does not fit it."""
  return modeldir.build(_MODULES, src, description, "teacher", dtype=dtype)


def save(dst: str, model: nn.Module, variables: Any,
         extra: Optional[Dict[str, Any]] = None) -> None:
  """Writes a class-conditional teacher at `dst` completely or not at all (`extra` goes into
  model.json); a text-to-image teacher is written by `python -m dimo_jax.convert meissonic` or
  `pretrain.save_text_teacher`."""
  modeldir.write(dst, {**model_description(model), **(extra or {})}, variables)


# What a decode rule reads of a run's config (`Teacher.decode_options`).
_DECODE_KEYS = {"maskgit": ("r_temp", "sm_temp", "sched_mode"), "meissonic": (),
                "maskbit": ("r_temp", "sm_temp", "sched_mode", "guidance_annealing",
                            "scale_pow")}


@dataclasses.dataclass(frozen=True)
class Teacher:
  """A loaded teacher of any kind.

  Attributes:
    model: the module with the shared call (module docstring): a MaskTransformer, a
      GoogleMaskGIT, or a Meissonic transformer behind `models.meissonic.TextConditioned`.
    variables: its {"params": ...} (None when only the module is needed).
    description: model.json.
    text: the prompt encoder of a text-to-image teacher (`teachers.meissonic.TextStack`).
  """
  model: Any
  variables: Any
  description: Dict[str, Any]
  text: Any = None

  @property
  def kind(self) -> Kind:
    return KINDS[self.description["kind"]]

  @property
  def text_conditioned(self) -> bool:
    return self.kind.conditioning == TEXT

  @property
  def supports_guidance(self) -> bool:
    return self.kind.guidance

  @property
  def frozen_with_emb(self) -> Tuple[str, ...]:
    return self.kind.frozen_with_emb

  @property
  def seq_len(self) -> int:
    return self.model.seq_len

  @property
  def codebook_size(self) -> int:
    return self.model.codebook_size

  @property
  def mask_id(self) -> int:
    """V, our mask id everywhere (a release's own is mapped inside the module)."""
    return self.model.mask_id

  @property
  def num_classes(self) -> Optional[int]:
    """C of a class-conditional teacher; None for a text-to-image one."""
    return None if self.text_conditioned else self.model.num_classes

  @property
  def image_codebook_size(self) -> int:
    """The codes of the tokenizer that decodes this teacher's tokens: V, or for MaskBit the
    2^bits full indices its sub-tokens merge into."""
    if self.kind.decode == "maskbit":
      return 2 ** self.model.codebook_bits
    return self.codebook_size

  @property
  def image_seq_len(self) -> int:
    """The positions of the tokenizer's code grid: L, or for MaskBit L / m (one full index per
    position)."""
    if self.kind.decode == "maskbit":
      return self.model.num_positions
    return self.seq_len

  def image_codes(self, tokens):
    """Tokens int[B, L] as the tokenizer's codes int32[B, n]: unchanged, or for MaskBit the m
    sub-tokens of each position merged into its full index (`models.maskbit.merge_splits`)."""
    if self.kind.decode == "maskbit":
      return self.model.merge(tokens)
    return tokens

  def tokens_of_image_codes(self, codes):
    """The tokenizer's codes int[B, n] as this teacher's tokens (`image_codes` inverted)."""
    if self.kind.decode == "maskbit":
      from dimo_jax.models import maskbit
      return maskbit.split_codes(codes, self.model.codebook_splits, self.model.bits_per_split)
    return codes

  @property
  def mask_values(self) -> Tuple[int, ...]:
    """The `mask_value`s a config may give: ours, and a text teacher's release id (8255)."""
    if self.text_conditioned:
      return tuple(sorted({self.mask_id, self.model.transformer.mask_id}))
    return (self.mask_id,)

  def with_model(self, model) -> "Teacher":
    """The same teacher called through `model` (e.g. a remat clone, another dtype)."""
    return dataclasses.replace(self, model=model)

  def guided_condition(self, cond: Any) -> Any:
    """`cond` as the guided teacher sees it: a text teacher's unconditional branch is the
    negative prompt when `cond` carries one (`neg_hidden`, `neg_pooled`: Di[M]O's
    `distil_neg_prompt`); class labels are unchanged."""
    if not self.text_conditioned or "neg_hidden" not in cond:
      return cond
    return {**cond, "uncond_hidden": cond["neg_hidden"], "uncond_pooled": cond["neg_pooled"]}

  def example_condition(self, batch: int = 1) -> Any:
    """A zero condition of `batch` rows (for init and abstract trees)."""
    if self.text_conditioned:
      from dimo_jax.teachers import meissonic
      return meissonic.example_condition(self.model.transformer, batch)
    return jnp.zeros((batch,), jnp.int32)

  def init_variables(self, rng: Optional[jax.Array] = None) -> Any:
    """Fresh variables {"params": ...} of the module (the tree checkpoints hold)."""
    rng = jax.random.PRNGKey(0) if rng is None else rng
    return self.model.init({"params": rng}, jnp.zeros((1, self.seq_len), jnp.int32),
                           self.example_condition())

  def logits(self, tokens: jax.Array, cond: Any, drop: Optional[jax.Array] = None) -> jax.Array:
    """Eval-mode logits of the teacher's variables: tokens int32[B, L] or [B, h, w]
    (mask = V) -> float32[B, L, V]."""
    tokens = jnp.asarray(tokens, jnp.int32).reshape(tokens.shape[0], -1)
    return self.logits_fn(self.variables)(tokens, cond, drop)

  def logits_fn(self, variables: Any) -> sampling.LogitsFn:
    """Eval-mode logits of `variables` as a `sampling.LogitsFn`."""
    return lambda tokens, cond, drop: self.model.apply(variables, tokens, cond, drop,
                                                       deterministic=True)

  def decode_options(self, config) -> Dict[str, Any]:
    """What this teacher's decode rule reads of a run's config (MaskGIT: `r_temp`, `sm_temp`,
    `sched_mode`; Meissonic: nothing, its temperature and schedule are the release's)."""
    return {key: config[key] for key in _DECODE_KEYS[self.kind.decode]}

  def decoder(self, steps: int, cfg: float, **options) -> Callable[[Any, jax.Array, Any],
                                                                     jax.Array]:
    """This kind's multi-step sampler: `fn(variables, rng, cond) -> int32[B, L]` codes.

    Args:
      steps: decoding steps.
      cfg: guidance scale (MaskGIT: the ramp's top, 1 + cfg at the last step; MaskBit: s of
        cond + s (cond - uncond), annealed; Meissonic: the constant scale, against the negative
        prompt when `cond` carries it).
      options: MaskGIT: r_temp, sm_temp, sched_mode; MaskBit: those and guidance_annealing,
        scale_pow; Meissonic: temperature (a pair or a number), masking_schedule (default: the
        scheduler config's).
    """
    if self.kind.decode == "meissonic":
      from dimo_jax.teachers import meissonic
      options.setdefault("masking_schedule", self.description["scheduler"]["masking_schedule"])
      options.setdefault("temperature", meissonic.TEMPERATURE)
      adapter = self.model

      def fn(variables, rng, cond):
        def timed(tokens, cond_, drop, timestep):
          return dataclasses.replace(adapter, timestep=timestep).apply(variables, tokens, cond_,
                                                                       drop)
        return sampling.meissonic_sample(timed, rng, self.guided_condition(cond), self.seq_len,
                                         self.mask_id, steps, cfg, **options)
      return fn

    rule = sampling.maskbit_sample if self.kind.decode == "maskbit" else sampling.maskgit_sample

    def fn(variables, rng, cond):
      return rule(self.logits_fn(variables), rng, cond, self.seq_len, self.mask_id, steps, cfg,
                  **options)
    return fn


def of_module(model, variables: Any = None, description: Optional[Dict[str, Any]] = None,
              text: Any = None) -> Teacher:
  """A `Teacher` of a module built in code (tests, benchmarks, pretraining); model.json's
  description is derived from it unless given."""
  if description is None:
    from dimo_jax.models.meissonic import TextConditioned
    if type(model) is TextConditioned:
      from dimo_jax.teachers import meissonic
      description = meissonic.describe(model)
    else:
      description = model_description(model)
  return Teacher(model, variables, description, text)


def load(src: str, dtype=jnp.float32, with_variables: bool = True) -> Teacher:
  """Reads a teacher directory written by `save` (or by `python -m dimo_jax.convert`);
  `dtype` is the module's compute dtype. Without `with_variables` its parameters are not read
  (a generator's replace them), only checked against model.json when used.

  A `meissonic` directory is read by `teachers.meissonic.load` (transformer, text encoder,
  tokenizer).
  """
  description = modeldir.read_description(src, "teacher")
  if kind_of(description, src).conditioning == TEXT:
    from dimo_jax.teachers import meissonic
    return meissonic.load(src, dtype, with_variables)
  teacher = Teacher(build_model(description, dtype, src), None, description)
  if not with_variables:
    return teacher
  return dataclasses.replace(teacher, variables=modeldir.restore(src, teacher.init_variables))
