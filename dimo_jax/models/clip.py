"""CLIP (Radford et al. 2021) text and vision encoders with their projections, in Flax, NHWC.

The computation is that of `transformers`' CLIPTextModelWithProjection and
CLIPVisionModelWithProjection: pre-LN transformer layers (LayerNorm, multi-head attention,
residual; LayerNorm, fc1, activation, fc2, residual) shared by both towers; the text tower adds
learned position embeddings, attends causally, applies `final_layer_norm` and pools the state
at the end-of-text token; the vision tower embeds non-overlapping patches with a bias-free conv,
prepends `class_embedding`, adds position embeddings, applies `pre_layrnorm` (sic, the
upstream name), and pools the class position through `post_layernorm`. Both project the pooled
vector with a bias-free linear layer.

The parameter tree is a one-to-one image of the transformers state dict, so converting a
`model.safetensors` is a key mapping (torch name -> flax path):

  text_model.embeddings.{token,position}_embedding.weight
                                    -> text_model/embeddings/{token,position}_embedding/embedding
  {text,vision}_model.encoder.layers.N.self_attn.{q,k,v,out}_proj.{weight,bias}
                                    -> .../encoder/layers_N/self_attn/{q,k,v,out}_proj/{kernel,bias}
  {text,vision}_model.encoder.layers.N.mlp.{fc1,fc2}.{weight,bias}
                                    -> .../encoder/layers_N/mlp/{fc1,fc2}/{kernel,bias}
  {text,vision}_model.encoder.layers.N.layer_norm{1,2}.{weight,bias}
                                    -> .../encoder/layers_N/layer_norm{1,2}/{scale,bias}
  text_model.final_layer_norm.*     -> text_model/final_layer_norm/*
  text_projection.weight            -> text_projection/kernel
  vision_model.embeddings.patch_embedding.weight
                                    -> vision_model/embeddings/patch_embedding/kernel
  vision_model.embeddings.class_embedding
                                    -> vision_model/embeddings/class_embedding
  vision_model.embeddings.position_embedding.weight
                                    -> vision_model/embeddings/position_embedding/embedding
  vision_model.{pre_layrnorm,post_layernorm}.*
                                    -> vision_model/{pre_layrnorm,post_layernorm}/*
  visual_projection.weight          -> visual_projection/kernel

Leaves: a linear `weight` [out, in] is the `kernel` [in, out]; the patch conv `weight`
[D, 3, p, p] is the `kernel` [p, p, 3, D]; a LayerNorm `weight` is the `scale`; an embedding
`weight` is the `embedding`. `position_ids` buffers hold no parameters.
"""

from typing import Any, Callable, Dict

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any

# transformers' ACT2FN names that CLIP releases use: OpenAI's models quick_gelu, OpenCLIP's
# (LAION, the CLIP-H of Meissonic) exact gelu.
ACTIVATIONS: Dict[str, Callable[[jax.Array], jax.Array]] = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}

# The pixel statistics every OpenAI and OpenCLIP release normalizes with (CLIPImageProcessor).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# transformers.CLIPTextModel before its PR #24773 wrote eos_token_id 2 into configs; models
# carrying it pool at the largest id (the end-of-text token has the largest id in CLIP's vocab).
LEGACY_EOS_TOKEN_ID = 2


def _layer_norm(eps: float, dtype: Dtype, name: str) -> nn.LayerNorm:
  # torch.nn.LayerNorm computes the variance as E[(x - mean)^2], not E[x^2] - mean^2.
  return nn.LayerNorm(epsilon=eps, dtype=dtype, use_fast_variance=False, name=name)


class Attention(nn.Module):
  """Multi-head self-attention with separate q/k/v/out projections, optionally causal."""
  num_heads: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, causal: bool) -> jax.Array:
    batch, length, width = x.shape
    head_dim = width // self.num_heads
    q, k, v = (nn.Dense(width, dtype=self.dtype, name=name)(x).reshape(
        batch, length, self.num_heads, head_dim) for name in ("q_proj", "k_proj", "v_proj"))
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) * head_dim ** -0.5
    if causal:
      allowed = jnp.tril(jnp.ones((length, length), bool))
      logits = jnp.where(allowed, logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(batch, length, width)
    return nn.Dense(width, dtype=self.dtype, name="out_proj")(out)


class MLP(nn.Module):
  intermediate_size: int
  hidden_act: str
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = nn.Dense(self.intermediate_size, dtype=self.dtype, name="fc1")(x)
    h = ACTIVATIONS[self.hidden_act](h)
    return nn.Dense(x.shape[-1], dtype=self.dtype, name="fc2")(h)


class EncoderLayer(nn.Module):
  """One pre-LN transformer layer, the same in the text and the vision tower."""
  num_heads: int
  intermediate_size: int
  hidden_act: str
  layer_norm_eps: float
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, causal: bool) -> jax.Array:
    h = _layer_norm(self.layer_norm_eps, self.dtype, "layer_norm1")(x)
    x = x + Attention(self.num_heads, self.dtype, name="self_attn")(h, causal)
    h = _layer_norm(self.layer_norm_eps, self.dtype, "layer_norm2")(x)
    return x + MLP(self.intermediate_size, self.hidden_act, self.dtype, name="mlp")(h)


class Encoder(nn.Module):
  """`num_layers` EncoderLayers; returns every hidden state: the input, then each layer's output."""
  num_layers: int
  num_heads: int
  intermediate_size: int
  hidden_act: str
  layer_norm_eps: float
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, causal: bool):
    states = [x]
    for i in range(self.num_layers):
      x = EncoderLayer(self.num_heads, self.intermediate_size, self.hidden_act,
                       self.layer_norm_eps, self.dtype, name=f"layers_{i}")(x, causal)
      states.append(x)
    return tuple(states)


def _check_tower(what: str, hidden_size: int, num_heads: int, hidden_act: str) -> None:
  if hidden_size % num_heads:
    raise ValueError(f"{what}: hidden_size {hidden_size} is not divisible by "
                     f"num_attention_heads {num_heads}")
  if hidden_act not in ACTIVATIONS:
    raise ValueError(f"{what}: hidden_act {hidden_act!r} is not one of {sorted(ACTIVATIONS)}")


class _TextEmbeddings(nn.Module):
  vocab_size: int
  hidden_size: int
  max_position_embeddings: int
  dtype: Dtype

  @nn.compact
  def __call__(self, input_ids: jax.Array) -> jax.Array:
    tokens = nn.Embed(self.vocab_size, self.hidden_size, dtype=self.dtype,
                      name="token_embedding")(input_ids)
    positions = nn.Embed(self.max_position_embeddings, self.hidden_size, dtype=self.dtype,
                         name="position_embedding")(jnp.arange(input_ids.shape[1]))
    return tokens + positions[None]


class CLIPTextEncoder(nn.Module):
  """transformers' CLIPTextModelWithProjection.

  Attributes mirror CLIPTextConfig (config.json of a `text_encoder/` folder); `projection_dim`
  is the width of `text_embeds`, `eos_token_id` picks the pooled position (see `__call__`).
  dtype is the compute dtype; parameters stay float32 and outputs are float32.
  """
  vocab_size: int = 49408
  hidden_size: int = 512
  intermediate_size: int = 2048
  projection_dim: int = 512
  num_hidden_layers: int = 12
  num_attention_heads: int = 8
  max_position_embeddings: int = 77
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  eos_token_id: int = 49407
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, input_ids: jax.Array) -> Dict[str, Any]:
    """Encodes token ids (bos ... eos, then padding) as transformers does.

    Args:
      input_ids: int32[B, T], T <= max_position_embeddings.

    Returns:
      last_hidden_state: float32[B, T, D], after final_layer_norm.
      hidden_states: num_hidden_layers + 1 arrays float32[B, T, D] (the embeddings, then each
        layer's output, without final_layer_norm); Meissonic's `encoder_hidden_states` is
        hidden_states[-2].
      pooled: float32[B, D], last_hidden_state at the end-of-text position: with the legacy
        eos_token_id 2, the position of the largest id (its first occurrence); otherwise the
        first position holding eos_token_id.
      text_embeds: float32[B, projection_dim], `pooled` projected (Meissonic's
        `pooled_projections`).
    """
    _check_tower("CLIPTextEncoder", self.hidden_size, self.num_attention_heads, self.hidden_act)
    if input_ids.ndim != 2 or input_ids.shape[1] > self.max_position_embeddings:
      raise ValueError(f"expected input_ids int[B, T<={self.max_position_embeddings}], "
                       f"got shape {input_ids.shape}")
    input_ids = input_ids.astype(jnp.int32)
    states, last = _TextTransformer(
        self.vocab_size, self.hidden_size, self.max_position_embeddings, self.num_hidden_layers,
        self.num_attention_heads, self.intermediate_size, self.hidden_act, self.layer_norm_eps,
        self.dtype, name="text_model")(input_ids)
    if self.eos_token_id == LEGACY_EOS_TOKEN_ID:
      eos_position = jnp.argmax(input_ids, axis=-1)
    else:
      eos_position = jnp.argmax(input_ids == self.eos_token_id, axis=-1)
    pooled = jnp.take_along_axis(last, eos_position[:, None, None], axis=1)[:, 0]
    text_embeds = nn.Dense(self.projection_dim, use_bias=False, dtype=self.dtype,
                           name="text_projection")(pooled)
    f32 = lambda x: x.astype(jnp.float32)
    return {"last_hidden_state": f32(last), "hidden_states": tuple(map(f32, states)),
            "pooled": f32(pooled), "text_embeds": f32(text_embeds)}


class _TextTransformer(nn.Module):
  """transformers' CLIPTextModel (`text_model`): embeddings, causal encoder, final LayerNorm."""
  vocab_size: int
  hidden_size: int
  max_position_embeddings: int
  num_layers: int
  num_heads: int
  intermediate_size: int
  hidden_act: str
  layer_norm_eps: float
  dtype: Dtype

  @nn.compact
  def __call__(self, input_ids: jax.Array):
    x = _TextEmbeddings(self.vocab_size, self.hidden_size, self.max_position_embeddings,
                        self.dtype, name="embeddings")(input_ids)
    states = Encoder(self.num_layers, self.num_heads, self.intermediate_size, self.hidden_act,
                     self.layer_norm_eps, self.dtype, name="encoder")(x, causal=True)
    return states, _layer_norm(self.layer_norm_eps, self.dtype, "final_layer_norm")(states[-1])


class _VisionEmbeddings(nn.Module):
  hidden_size: int
  patch_size: int
  num_positions: int
  dtype: Dtype

  @nn.compact
  def __call__(self, pixel_values: jax.Array) -> jax.Array:
    p = self.patch_size
    patches = nn.Conv(self.hidden_size, (p, p), strides=(p, p), padding="VALID", use_bias=False,
                      dtype=self.dtype, name="patch_embedding")(pixel_values)
    batch = patches.shape[0]
    # Row-major over the patch grid, as torch's flatten(2) of NCHW.
    patches = patches.reshape(batch, -1, self.hidden_size)
    class_embedding = self.param("class_embedding", nn.initializers.normal(1.0),
                                 (self.hidden_size,))
    cls = jnp.broadcast_to(class_embedding.astype(patches.dtype), (batch, 1, self.hidden_size))
    positions = nn.Embed(self.num_positions, self.hidden_size, dtype=self.dtype,
                         name="position_embedding")(jnp.arange(self.num_positions))
    return jnp.concatenate([cls, patches], axis=1) + positions[None]


class _VisionTransformer(nn.Module):
  """transformers' CLIPVisionModel (`vision_model`); returns the pooled, post-LN class state."""
  hidden_size: int
  image_size: int
  patch_size: int
  num_layers: int
  num_heads: int
  intermediate_size: int
  hidden_act: str
  layer_norm_eps: float
  dtype: Dtype

  @nn.compact
  def __call__(self, pixel_values: jax.Array) -> jax.Array:
    num_positions = (self.image_size // self.patch_size) ** 2 + 1
    x = _VisionEmbeddings(self.hidden_size, self.patch_size, num_positions, self.dtype,
                          name="embeddings")(pixel_values)
    x = _layer_norm(self.layer_norm_eps, self.dtype, "pre_layrnorm")(x)
    states = Encoder(self.num_layers, self.num_heads, self.intermediate_size, self.hidden_act,
                     self.layer_norm_eps, self.dtype, name="encoder")(x, causal=False)
    return _layer_norm(self.layer_norm_eps, self.dtype, "post_layernorm")(states[-1][:, 0])


class CLIPVisionEncoder(nn.Module):
  """transformers' CLIPVisionModelWithProjection: normalized pixels -> image embeddings.

  Attributes mirror CLIPVisionConfig (3 channels); dtype is the compute dtype, parameters stay
  float32 and the output is float32.
  """
  hidden_size: int = 768
  intermediate_size: int = 3072
  projection_dim: int = 512
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  image_size: int = 224
  patch_size: int = 32
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, pixel_values: jax.Array) -> jax.Array:
    """float32[B, S, S, 3] (S = image_size, `preprocess`ed) -> float32[B, projection_dim]."""
    _check_tower("CLIPVisionEncoder", self.hidden_size, self.num_attention_heads,
                 self.hidden_act)
    if pixel_values.shape[1:] != (self.image_size, self.image_size, 3):
      raise ValueError(f"expected pixel_values [B, {self.image_size}, {self.image_size}, 3], "
                       f"got shape {pixel_values.shape}")
    pooled = _VisionTransformer(
        self.hidden_size, self.image_size, self.patch_size, self.num_hidden_layers,
        self.num_attention_heads, self.intermediate_size, self.hidden_act, self.layer_norm_eps,
        self.dtype, name="vision_model")(pixel_values.astype(self.dtype))
    image_embeds = nn.Dense(self.projection_dim, use_bias=False, dtype=self.dtype,
                            name="visual_projection")(pooled)
    return image_embeds.astype(jnp.float32)


def preprocess(images: jax.Array, image_size: int) -> jax.Array:
  """CLIPImageProcessor on images in [0, 1]: float32[B, H, W, 3] -> float32[B, S, S, 3].

  The shorter side is resized to S = image_size (bicubic, antialiased when shrinking; the longer
  side to int(S * long / short)), the centre S x S is cropped (offset (size - S) // 2, as
  transformers' center_crop), values are clipped to [0, 1] (the processor works on uint8
  pixels, so bicubic overshoot cannot survive there either) and normalized with CLIP's mean
  and std. The processor also rounds to 8-bit levels after resizing; float inputs skip that.
  """
  batch, height, width, channels = images.shape
  if channels != 3:
    raise ValueError(f"expected RGB images [B, H, W, 3], got shape {images.shape}")
  short, long = min(height, width), max(height, width)
  resized_long = int(image_size * long / short)
  new_h, new_w = (image_size, resized_long) if height <= width else (resized_long, image_size)
  x = images.astype(jnp.float32)
  if (new_h, new_w) != (height, width):
    x = jax.image.resize(x, (batch, new_h, new_w, 3), method="bicubic", antialias=True)
  top, left = (new_h - image_size) // 2, (new_w - image_size) // 2
  x = jnp.clip(x[:, top:top + image_size, left:left + image_size], 0.0, 1.0)
  return (x - np.asarray(CLIP_MEAN, np.float32)) / np.asarray(CLIP_STD, np.float32)


def clip_score(image_embeds: jax.Array, text_embeds: jax.Array) -> jax.Array:
  """100 * max(cos(image, text), 0) per pair (torchmetrics' CLIPScore before its batch mean).

  image_embeds: float[B, P]; text_embeds: float[B, P]. Returns float32[B].
  """
  image = image_embeds.astype(jnp.float32)
  text = text_embeds.astype(jnp.float32)
  image = image / jnp.linalg.norm(image, axis=-1, keepdims=True)
  text = text / jnp.linalg.norm(text, axis=-1, keepdims=True)
  return 100.0 * jnp.maximum(jnp.sum(image * text, axis=-1), 0.0)
