"""The Inception network of the community's FID and IS, in Flax, NHWC, with its loader.

This is the 2015-12-05 TensorFlow Inception graph as pytorch-fid re-released it for PyTorch
(`pt_inception-2015-12-05-6726825d.pth`, built by `pytorch_fid.inception.fid_inception_v3`):
torchvision's Inception3 with 1008 classes, no auxiliary head, and four blocks patched to match
the TensorFlow graph. Where it departs from torchvision's Inception3:
  Mixed_5b/5c/5d (A), Mixed_6b-6e (C), Mixed_7b (E): the 3x3 average pool of the pool branch
      ignores the zero padding (`count_include_pad=False`, as TensorFlow's pool does);
  Mixed_7c (E): that pool is a 3x3 *max* pool (stride 1, padding 1) instead.
Every convolution is a BasicConv2d: conv without bias, BatchNorm (eps 1e-3, running statistics
only), ReLU.

Input handling is pytorch-fid's with `resize_input=True, normalize_input=True`: images in
[0, 1] are resized to 299x299 bilinearly as torch's `F.interpolate(mode="bilinear",
align_corners=False)` does (half-pixel centres, no antialiasing when shrinking), then mapped
to [-1, 1]. Outputs are the 2048 pool features after Mixed_7c (what FID compares) and the
1008 logits of `fc` on them (what IS uses).

Variables map one-to-one to the release's keys (torch name -> flax path):
  NAME.conv.weight [O, I, kh, kw]   -> params/NAME/conv/kernel [kh, kw, I, O]
  NAME.bn.weight, NAME.bn.bias      -> params/NAME/bn/scale, params/NAME/bn/bias
  NAME.bn.running_mean, running_var -> batch_stats/NAME/bn/mean, batch_stats/NAME/bn/var
  fc.weight [1008, 2048], fc.bias   -> params/fc/kernel [2048, 1008], params/fc/bias
where NAME is a stem conv (Conv2d_1a_3x3, ..., Conv2d_4a_3x3) or BLOCK.BRANCH inside a mixed
block (Mixed_5b.branch1x1, Mixed_7c.branch3x3dbl_3b, ... -> Mixed_5b/branch1x1, ...).
`num_batches_tracked` counters carry nothing for inference and have no counterpart.
"""

import dataclasses
from typing import Any, Dict, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dimo_jax import modeldir

Dtype = Any

KIND = "fid-inception"
INPUT_SIZE = 299
POOL_DIM = 2048
NUM_CLASSES = 1008
_BN_EPSILON = 1e-3


def _bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
  """float32[out_size, in_size]: torch's bilinear align_corners=False weights along one axis.

  Output pixel i samples the source at (i + 0.5) * in_size / out_size - 0.5, clamped at 0,
  between its floor and the next pixel (the last pixel alone at the far border). The weights
  are computed in float64, so long axes do not lose the fractional position to rounding.
  """
  src = np.maximum((np.arange(out_size) + 0.5) * (in_size / out_size) - 0.5, 0.0)
  low = np.floor(src).astype(np.int64)
  high = np.minimum(low + 1, in_size - 1)
  frac = src - low
  matrix = np.zeros((out_size, in_size))
  np.add.at(matrix, (np.arange(out_size), low), 1 - frac)
  np.add.at(matrix, (np.arange(out_size), high), frac)
  return matrix.astype(np.float32)


def resize_input(images: jax.Array) -> jax.Array:
  """float32[B, H, W, C] -> float32[B, 299, 299, C], as torch's bilinear align_corners=False.

  No antialiasing when shrinking, as torch without `antialias=True` (jax.image.resize would
  low-pass first).
  """
  _, height, width, _ = images.shape
  rows = _bilinear_matrix(height, INPUT_SIZE)
  cols = _bilinear_matrix(width, INPUT_SIZE)
  highest = jax.lax.Precision.HIGHEST
  x = jnp.einsum("oh,bhwc->bowc", rows, images.astype(jnp.float32), precision=highest)
  return jnp.einsum("pw,bowc->bopc", cols, x, precision=highest)


class BasicConv2d(nn.Module):
  """Conv (no bias) -> BatchNorm from running statistics (eps 1e-3) -> ReLU.

  `padding` is torch's symmetric (rows, columns) padding.
  """
  features: int
  kernel: Tuple[int, int]
  strides: int = 1
  padding: Tuple[int, int] = (0, 0)
  dtype: Dtype = jnp.float32
  precision: Any = "highest"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    rows, cols = self.padding
    x = nn.Conv(self.features, self.kernel, strides=(self.strides, self.strides),
                padding=((rows, rows), (cols, cols)), use_bias=False, dtype=self.dtype,
                precision=self.precision, name="conv")(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=_BN_EPSILON, dtype=self.dtype,
                     name="bn")(x)
    return nn.relu(x)


def _avg_pool_3x3(x: jax.Array) -> jax.Array:
  # TensorFlow's average pool divides by the number of real (unpadded) pixels in the window.
  return nn.avg_pool(x, (3, 3), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3_stride2(x: jax.Array) -> jax.Array:
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class _Block(nn.Module):
  """Base of the mixed blocks: `conv(name, features, kernel, ...)` builds a named BasicConv2d."""
  dtype: Dtype = jnp.float32
  precision: Any = "highest"

  def conv(self, name: str, features: int, kernel: Sequence[int], strides: int = 1,
           padding: Sequence[int] = (0, 0)) -> BasicConv2d:
    return BasicConv2d(features, tuple(kernel), strides, tuple(padding), self.dtype,
                       self.precision, name=name)


class InceptionA(_Block):
  """35x35 block: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1; 224 + pool_features channels."""
  pool_features: int = 32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b1 = self.conv("branch1x1", 64, (1, 1))(x)
    b5 = self.conv("branch5x5_1", 48, (1, 1))(x)
    b5 = self.conv("branch5x5_2", 64, (5, 5), padding=(2, 2))(b5)
    b3 = self.conv("branch3x3dbl_1", 64, (1, 1))(x)
    b3 = self.conv("branch3x3dbl_2", 96, (3, 3), padding=(1, 1))(b3)
    b3 = self.conv("branch3x3dbl_3", 96, (3, 3), padding=(1, 1))(b3)
    bp = self.conv("branch_pool", self.pool_features, (1, 1))(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(_Block):
  """35 -> 17 reduction: 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2; 480 + C_in channels."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b3 = self.conv("branch3x3", 384, (3, 3), strides=2)(x)
    bd = self.conv("branch3x3dbl_1", 64, (1, 1))(x)
    bd = self.conv("branch3x3dbl_2", 96, (3, 3), padding=(1, 1))(bd)
    bd = self.conv("branch3x3dbl_3", 96, (3, 3), strides=2)(bd)
    return jnp.concatenate([b3, bd, _max_pool_3x3_stride2(x)], axis=-1)


class InceptionC(_Block):
  """17x17 block with factorized 7x7 convs (width channels_7x7 inside); 768 channels."""
  channels_7x7: int = 128

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c7 = self.channels_7x7
    b1 = self.conv("branch1x1", 192, (1, 1))(x)
    b7 = self.conv("branch7x7_1", c7, (1, 1))(x)
    b7 = self.conv("branch7x7_2", c7, (1, 7), padding=(0, 3))(b7)
    b7 = self.conv("branch7x7_3", 192, (7, 1), padding=(3, 0))(b7)
    bd = self.conv("branch7x7dbl_1", c7, (1, 1))(x)
    bd = self.conv("branch7x7dbl_2", c7, (7, 1), padding=(3, 0))(bd)
    bd = self.conv("branch7x7dbl_3", c7, (1, 7), padding=(0, 3))(bd)
    bd = self.conv("branch7x7dbl_4", c7, (7, 1), padding=(3, 0))(bd)
    bd = self.conv("branch7x7dbl_5", 192, (1, 7), padding=(0, 3))(bd)
    bp = self.conv("branch_pool", 192, (1, 1))(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(_Block):
  """17 -> 8 reduction: 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2; 512 + C_in channels."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b3 = self.conv("branch3x3_1", 192, (1, 1))(x)
    b3 = self.conv("branch3x3_2", 320, (3, 3), strides=2)(b3)
    b7 = self.conv("branch7x7x3_1", 192, (1, 1))(x)
    b7 = self.conv("branch7x7x3_2", 192, (1, 7), padding=(0, 3))(b7)
    b7 = self.conv("branch7x7x3_3", 192, (7, 1), padding=(3, 0))(b7)
    b7 = self.conv("branch7x7x3_4", 192, (3, 3), strides=2)(b7)
    return jnp.concatenate([b3, b7, _max_pool_3x3_stride2(x)], axis=-1)


class InceptionE(_Block):
  """8x8 block with split 1x3/3x1 convs; 2048 channels.

  `max_pool` picks the pool branch's 3x3 pool: the FID graph's last block (Mixed_7c) takes the
  maximum where the paper and Mixed_7b average.
  """
  max_pool: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b1 = self.conv("branch1x1", 320, (1, 1))(x)
    b3 = self.conv("branch3x3_1", 384, (1, 1))(x)
    b3 = jnp.concatenate([self.conv("branch3x3_2a", 384, (1, 3), padding=(0, 1))(b3),
                          self.conv("branch3x3_2b", 384, (3, 1), padding=(1, 0))(b3)], axis=-1)
    bd = self.conv("branch3x3dbl_1", 448, (1, 1))(x)
    bd = self.conv("branch3x3dbl_2", 384, (3, 3), padding=(1, 1))(bd)
    bd = jnp.concatenate([self.conv("branch3x3dbl_3a", 384, (1, 3), padding=(0, 1))(bd),
                          self.conv("branch3x3dbl_3b", 384, (3, 1), padding=(1, 0))(bd)], axis=-1)
    if self.max_pool:
      pooled = nn.max_pool(x, (3, 3), padding=((1, 1), (1, 1)))
    else:
      pooled = _avg_pool_3x3(x)
    bp = self.conv("branch_pool", 192, (1, 1))(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class FIDInception(nn.Module):
  """images float32[B, H, W, 3] in [0, 1] -> (pool float32[B, 2048], logits float32[B, 1008]).

  Any H, W: the input is resized to 299x299 first. `dtype` is the compute dtype of the convs
  and `fc`; `precision` their matmul precision. The default ("highest") keeps float32 exact on
  TPU and GPU, whose default precision rounds operands to bfloat16 / TF32 and moves FID.
  """
  dtype: Dtype = jnp.float32
  precision: Any = "highest"

  @nn.compact
  def __call__(self, images: jax.Array) -> Tuple[jax.Array, jax.Array]:
    x = (resize_input(images) * 2 - 1).astype(self.dtype)
    kw = {"dtype": self.dtype, "precision": self.precision}

    def stem(name, features, kernel, strides=1, padding=(0, 0)):
      return BasicConv2d(features, kernel, strides, padding, name=name, **kw)

    x = stem("Conv2d_1a_3x3", 32, (3, 3), strides=2)(x)             # 149x149x32
    x = stem("Conv2d_2a_3x3", 32, (3, 3))(x)                        # 147x147x32
    x = stem("Conv2d_2b_3x3", 64, (3, 3), padding=(1, 1))(x)        # 147x147x64
    x = _max_pool_3x3_stride2(x)                                    # 73x73x64
    x = stem("Conv2d_3b_1x1", 80, (1, 1))(x)                        # 73x73x80
    x = stem("Conv2d_4a_3x3", 192, (3, 3))(x)                       # 71x71x192
    x = _max_pool_3x3_stride2(x)                                    # 35x35x192
    x = InceptionA(pool_features=32, name="Mixed_5b", **kw)(x)      # 35x35x256
    x = InceptionA(pool_features=64, name="Mixed_5c", **kw)(x)      # 35x35x288
    x = InceptionA(pool_features=64, name="Mixed_5d", **kw)(x)      # 35x35x288
    x = InceptionB(name="Mixed_6a", **kw)(x)                        # 17x17x768
    for name, channels_7x7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160),
                               ("Mixed_6e", 192)):
      x = InceptionC(channels_7x7=channels_7x7, name=name, **kw)(x)  # 17x17x768
    x = InceptionD(name="Mixed_7a", **kw)(x)                        # 8x8x1280
    x = InceptionE(max_pool=False, name="Mixed_7b", **kw)(x)        # 8x8x2048
    x = InceptionE(max_pool=True, name="Mixed_7c", **kw)(x)         # 8x8x2048
    pool = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    logits = nn.Dense(NUM_CLASSES, name="fc", **kw)(pool)
    return pool, logits.astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class FeatureExtractor:
  """A loaded FID Inception: module, variables, description and a jitted forward pass.

  `extractor(images)` runs under its own `jax.jit` (inputs may be sharded; the outputs follow
  the batch sharding XLA picks). Inside a caller's jit, call it the same way or use
  `extractor.model.apply(extractor.variables, images)`.
  """
  model: FIDInception
  variables: Any
  description: Dict[str, Any]

  def __post_init__(self):
    object.__setattr__(self, "_apply", jax.jit(self.model.apply))

  def __call__(self, images: jax.Array) -> Tuple[jax.Array, jax.Array]:
    """images float32[B, H, W, 3] in [0, 1] -> (pool float32[B, 2048], logits float32[B, 1008])."""
    return self._apply(self.variables, images)


def init_variables(model: FIDInception) -> Any:
  """{"params", "batch_stats"} of `model` (random; the input size is irrelevant after resizing)."""
  return model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3), jnp.float32))


def load(src: str, dtype: Dtype = jnp.float32, precision: Any = "highest") -> FeatureExtractor:
  """Reads a directory written by `python -m dimo_jax.convert fid-inception`."""
  description = modeldir.read_description(src, "FID Inception")
  if description["kind"] != KIND:
    raise ValueError(f"{src}: model.json has kind {description['kind']!r}, expected {KIND!r}")
  model = FIDInception(**description["config"], dtype=dtype, precision=precision)
  variables = modeldir.restore(src, lambda: init_variables(model))
  return FeatureExtractor(model, variables, description)
