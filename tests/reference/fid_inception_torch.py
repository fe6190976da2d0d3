"""Test-only PyTorch reference of pytorch-fid's Inception (the 2015-12-05 TensorFlow graph).

Written from the public description of torchvision's Inception3 building blocks and of
pytorch-fid's `fid_inception_v3` patches: 1008-class `fc`, no auxiliary head, pool branches of
Mixed_5b-5d / 6b-6e / 7b averaging without the padded zeros, Mixed_7c's pool branch a 3x3 max
pool. NCHW, plain torch.nn modules, attribute names chosen so that `state_dict()` has the
release's keys (Conv2d_1a_3x3.conv.weight, Mixed_5b.branch1x1.bn.running_mean, fc.weight, ...).
The forward pass is pytorch-fid's `InceptionV3(resize_input=True, normalize_input=True)` up to
the final average pool, followed by `fc` on those pool features.
"""

from typing import Sequence, Tuple, Union

import torch
from torch import nn
from torch.nn import functional as F

Size = Union[int, Tuple[int, int]]


class Conv(nn.Module):
  """Conv2d without bias, BatchNorm2d(eps=1e-3), ReLU."""

  def __init__(self, cin: int, cout: int, kernel: Size, stride: int = 1, padding: Size = 0):
    super().__init__()
    self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
    self.bn = nn.BatchNorm2d(cout, eps=0.001)

  def forward(self, x):
    return F.relu(self.bn(self.conv(x)))


def tf_avg_pool(x):
  return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class MixedA(nn.Module):

  def __init__(self, cin: int, pool_features: int):
    super().__init__()
    self.branch1x1 = Conv(cin, 64, 1)
    self.branch5x5_1 = Conv(cin, 48, 1)
    self.branch5x5_2 = Conv(48, 64, 5, padding=2)
    self.branch3x3dbl_1 = Conv(cin, 64, 1)
    self.branch3x3dbl_2 = Conv(64, 96, 3, padding=1)
    self.branch3x3dbl_3 = Conv(96, 96, 3, padding=1)
    self.branch_pool = Conv(cin, pool_features, 1)

  def forward(self, x):
    return torch.cat([
        self.branch1x1(x),
        self.branch5x5_2(self.branch5x5_1(x)),
        self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
        self.branch_pool(tf_avg_pool(x)),
    ], 1)


class MixedB(nn.Module):

  def __init__(self, cin: int):
    super().__init__()
    self.branch3x3 = Conv(cin, 384, 3, stride=2)
    self.branch3x3dbl_1 = Conv(cin, 64, 1)
    self.branch3x3dbl_2 = Conv(64, 96, 3, padding=1)
    self.branch3x3dbl_3 = Conv(96, 96, 3, stride=2)

  def forward(self, x):
    return torch.cat([
        self.branch3x3(x),
        self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
        F.max_pool2d(x, 3, stride=2),
    ], 1)


class MixedC(nn.Module):

  def __init__(self, cin: int, c7: int):
    super().__init__()
    self.branch1x1 = Conv(cin, 192, 1)
    self.branch7x7_1 = Conv(cin, c7, 1)
    self.branch7x7_2 = Conv(c7, c7, (1, 7), padding=(0, 3))
    self.branch7x7_3 = Conv(c7, 192, (7, 1), padding=(3, 0))
    self.branch7x7dbl_1 = Conv(cin, c7, 1)
    self.branch7x7dbl_2 = Conv(c7, c7, (7, 1), padding=(3, 0))
    self.branch7x7dbl_3 = Conv(c7, c7, (1, 7), padding=(0, 3))
    self.branch7x7dbl_4 = Conv(c7, c7, (7, 1), padding=(3, 0))
    self.branch7x7dbl_5 = Conv(c7, 192, (1, 7), padding=(0, 3))
    self.branch_pool = Conv(cin, 192, 1)

  def forward(self, x):
    b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
    bd = x
    for i in range(1, 6):
      bd = getattr(self, f"branch7x7dbl_{i}")(bd)
    return torch.cat([self.branch1x1(x), b7, bd, self.branch_pool(tf_avg_pool(x))], 1)


class MixedD(nn.Module):

  def __init__(self, cin: int):
    super().__init__()
    self.branch3x3_1 = Conv(cin, 192, 1)
    self.branch3x3_2 = Conv(192, 320, 3, stride=2)
    self.branch7x7x3_1 = Conv(cin, 192, 1)
    self.branch7x7x3_2 = Conv(192, 192, (1, 7), padding=(0, 3))
    self.branch7x7x3_3 = Conv(192, 192, (7, 1), padding=(3, 0))
    self.branch7x7x3_4 = Conv(192, 192, 3, stride=2)

  def forward(self, x):
    b7 = x
    for i in range(1, 5):
      b7 = getattr(self, f"branch7x7x3_{i}")(b7)
    return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, stride=2)], 1)


class MixedE(nn.Module):

  def __init__(self, cin: int, max_pool: bool):
    super().__init__()
    self.max_pool = max_pool
    self.branch1x1 = Conv(cin, 320, 1)
    self.branch3x3_1 = Conv(cin, 384, 1)
    self.branch3x3_2a = Conv(384, 384, (1, 3), padding=(0, 1))
    self.branch3x3_2b = Conv(384, 384, (3, 1), padding=(1, 0))
    self.branch3x3dbl_1 = Conv(cin, 448, 1)
    self.branch3x3dbl_2 = Conv(448, 384, 3, padding=1)
    self.branch3x3dbl_3a = Conv(384, 384, (1, 3), padding=(0, 1))
    self.branch3x3dbl_3b = Conv(384, 384, (3, 1), padding=(1, 0))
    self.branch_pool = Conv(cin, 192, 1)

  def forward(self, x):
    b3 = self.branch3x3_1(x)
    bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
    pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else tf_avg_pool(x)
    return torch.cat([
        self.branch1x1(x),
        self.branch3x3_2a(b3), self.branch3x3_2b(b3),
        self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd),
        self.branch_pool(pooled),
    ], 1)


class FIDInceptionReference(nn.Module):
  """images [B, 3, H, W] in [0, 1] -> (pool [B, 2048], logits [B, 1008])."""

  def __init__(self):
    super().__init__()
    self.Conv2d_1a_3x3 = Conv(3, 32, 3, stride=2)
    self.Conv2d_2a_3x3 = Conv(32, 32, 3)
    self.Conv2d_2b_3x3 = Conv(32, 64, 3, padding=1)
    self.Conv2d_3b_1x1 = Conv(64, 80, 1)
    self.Conv2d_4a_3x3 = Conv(80, 192, 3)
    self.Mixed_5b = MixedA(192, 32)
    self.Mixed_5c = MixedA(256, 64)
    self.Mixed_5d = MixedA(288, 64)
    self.Mixed_6a = MixedB(288)
    self.Mixed_6b = MixedC(768, 128)
    self.Mixed_6c = MixedC(768, 160)
    self.Mixed_6d = MixedC(768, 160)
    self.Mixed_6e = MixedC(768, 192)
    self.Mixed_7a = MixedD(768)
    self.Mixed_7b = MixedE(1280, max_pool=False)
    self.Mixed_7c = MixedE(2048, max_pool=True)
    self.fc = nn.Linear(2048, 1008)

  def forward(self, images) -> Tuple[torch.Tensor, torch.Tensor]:
    x = F.interpolate(images, size=(299, 299), mode="bilinear", align_corners=False)
    x = 2 * x - 1
    x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
    x = F.max_pool2d(x, 3, stride=2)
    x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
    x = F.max_pool2d(x, 3, stride=2)
    for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
      x = getattr(self, f"Mixed_{name}")(x)
    pool = F.adaptive_avg_pool2d(x, 1).flatten(1)
    return pool, self.fc(pool)


def randomize(model: nn.Module, generator: torch.Generator, spread: float = 0.2) -> None:
  """Random weights and BatchNorm statistics that keep activations of order one at every depth.

  Conv and fc weights are He-scaled Gaussians; BatchNorm scale, bias, running mean and running
  variance are drawn around 1, 0, 0 and 1 with relative `spread`, so no tensor keeps its default
  and a swapped or mis-transposed tensor changes the outputs.
  """
  def randn(shape: Sequence[int]) -> torch.Tensor:
    return torch.randn(tuple(shape), generator=generator)

  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, (nn.Conv2d, nn.Linear)):
        fan_in = module.weight[0].numel()
        module.weight.copy_(randn(module.weight.shape) * (2.0 / fan_in) ** 0.5)
        if module.bias is not None:
          module.bias.copy_(spread * randn(module.bias.shape))
      elif isinstance(module, nn.BatchNorm2d):
        n = module.num_features
        module.weight.copy_(1 + spread * randn((n,)))
        module.bias.copy_(spread * randn((n,)))
        module.running_mean.copy_(spread * randn((n,)))
        module.running_var.copy_(torch.exp(spread * randn((n,))))
