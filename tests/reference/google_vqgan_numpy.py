"""A NumPy forward pass of google-research/maskgit's VQGAN tokenizer, for parity tests only.

Written from the architecture in `maskgit/nets/vqgan_tokenizer.py` and `maskgit/nets/layers.py`
(google-research/maskgit): NHWC, "SAME" convolutions, 32-group GroupNorm with epsilon 1e-6,
swish, 2x2 average pooling down, nearest-neighbour 2x up, and residual blocks whose 1x1
shortcut (when the width changes) is applied to the block's output. Runs in float64 over the
raw nested dict `params` as the release stores it under "params".
"""

import numpy as np

GROUPS = 32
EPS = 1e-6


def conv(x, p, stride=1):
  """x: [B, H, W, Cin]; p["kernel"]: [kh, kw, Cin, Cout]; TensorFlow "SAME" padding."""
  kernel = np.asarray(p["kernel"], np.float64)
  kh, kw = kernel.shape[:2]
  pads = []
  for size, k in zip(x.shape[1:3], (kh, kw)):
    out = -(-size // stride)
    total = max((out - 1) * stride + k - size, 0)
    pads.append((total // 2, total - total // 2))
  xp = np.pad(x, [(0, 0), pads[0], pads[1], (0, 0)])
  oh, ow = -(-x.shape[1] // stride), -(-x.shape[2] // stride)
  y = np.zeros(x.shape[:1] + (oh, ow, kernel.shape[-1]))
  for i in range(kh):
    for j in range(kw):
      patch = xp[:, i:i + stride * (oh - 1) + 1:stride, j:j + stride * (ow - 1) + 1:stride]
      y += patch @ kernel[i, j]
  if "bias" in p:
    y = y + np.asarray(p["bias"], np.float64)
  return y


def group_norm(x, p):
  b, h, w, c = x.shape
  g = x.reshape(b, h, w, GROUPS, c // GROUPS)
  mean = g.mean(axis=(1, 2, 4), keepdims=True)
  var = ((g - mean) ** 2).mean(axis=(1, 2, 4), keepdims=True)
  g = (g - mean) / np.sqrt(var + EPS)
  return g.reshape(x.shape) * np.asarray(p["scale"], np.float64) + np.asarray(p["bias"], np.float64)


def swish(x):
  return x / (1.0 + np.exp(-x))


def res_block(x, p):
  y = conv(swish(group_norm(x, p["GroupNorm_0"])), p["Conv_0"])
  y = conv(swish(group_norm(y, p["GroupNorm_1"])), p["Conv_1"])
  shortcut = conv(y, p["Conv_2"]) if "Conv_2" in p else x
  return y + shortcut


def encoder(x, p, num_res_blocks, levels, conv_downsample):
  x = conv(x, p["Conv_0"])
  block, extra_conv = 0, 1
  for level in range(levels):
    for _ in range(num_res_blocks):
      x = res_block(x, p[f"ResBlock_{block}"])
      block += 1
    if level < levels - 1:
      if conv_downsample:
        x = conv(x, p[f"Conv_{extra_conv}"], stride=2)
        extra_conv += 1
      else:
        b, h, w, c = x.shape
        x = x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))
  for _ in range(num_res_blocks):
    x = res_block(x, p[f"ResBlock_{block}"])
    block += 1
  return conv(swish(group_norm(x, p["GroupNorm_0"])), p[f"Conv_{extra_conv}"])


def decoder(z, p, num_res_blocks, levels):
  x = conv(z, p["Conv_0"])
  blocks = iter(range(num_res_blocks * (levels + 1)))
  for _ in range(num_res_blocks):
    x = res_block(x, p[f"ResBlock_{next(blocks)}"])
  for step in range(levels):  # coarsest level first
    for _ in range(num_res_blocks):
      x = res_block(x, p[f"ResBlock_{next(blocks)}"])
    if step < levels - 1:
      x = conv(x.repeat(2, axis=1).repeat(2, axis=2), p[f"Conv_{step + 1}"])
  return conv(swish(group_norm(x, p["GroupNorm_0"])), p[f"Conv_{levels}"])


def latents(params, images, num_res_blocks, levels, conv_downsample=False):
  """images: [B, H, W, 3] -> pre-quantization latents float64[B, h, w, D]."""
  return encoder(np.asarray(images, np.float64), params["encoder"], num_res_blocks, levels,
                 conv_downsample)


def quantize(params, z):
  """z: [B, h, w, D] -> int64[B, h, w] ids of the nearest codebook rows."""
  codebook = np.asarray(params["quantizer"]["codebook"], np.float64)
  distances = ((z[..., None, :] - codebook) ** 2).sum(-1)
  return distances.argmin(-1)


def decode(params, codes, num_res_blocks, levels):
  """codes: int[B, h, w] -> images float64[B, h*f, w*f, 3]."""
  codebook = np.asarray(params["quantizer"]["codebook"], np.float64)
  return decoder(codebook[np.asarray(codes)], params["decoder"], num_res_blocks, levels)
