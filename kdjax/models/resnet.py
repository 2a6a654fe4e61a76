"""torchvision-equivalent ResNets in Flax (teacher networks).

Computes the same function as ``torchvision.models.resnet`` (BasicBlock and
Bottleneck with the stride on the 3x3 conv, "ResNet v1.5") so that the
ImageNet weights of torchvision can be ported (see ``kdjax.weights``).
Porting pitfalls handled here, as listed in docs/METHODS.md "Shared parts":

* explicit symmetric padding everywhere (Flax 'SAME' pads stride-2 convs
  asymmetrically, torch pads symmetrically);
* max-pool 3x3 stride 2 padding 1 pads with -inf;
* BatchNorm eps 1e-5, torch momentum 0.1 == Flax momentum 0.9; the teacher
  uses running statistics (``train=False``).

Submodule names mirror torchvision's state-dict keys with "." before an
index replaced by "_" (``layer1.0.downsample.0`` -> ``layer1_0/downsample_0``)
so the weight mapping is mechanical.

The default module returns only the taps the methods use
({"layer1","layer2","layer3"}, NHWC); layer4 and the classifier are built
only with ``with_head=True`` (golden tests).

The modules are plain Flax; ``kernels`` (:mod:`kdjax.backends`, default the
portable ``nn.Conv`` and residual adds) says how convolutions and residual
outputs are computed, e.g. with kdjax's CPU kernels.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from kdjax.backends import PORTABLE, Kernels

Dtype = Any

BN_EPS = 1e-5
BN_MOMENTUM = 0.9  # Flax convention; torch momentum 0.1


def conv(features: int, kernel: int, stride: int = 1, padding: int | None = None,
         dtype: Dtype = jnp.float32, name: str | None = None, use_bias: bool = False,
         kernels: Kernels = PORTABLE) -> nn.Conv:
    """A torch-style Conv2d: explicit symmetric padding (default kernel // 2), no bias;
    computed by ``kernels.conv``."""
    p = kernel // 2 if padding is None else padding
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                   padding=((p, p), (p, p)), use_bias=use_bias, dtype=dtype,
                   param_dtype=jnp.float32, name=name, conv_general_dilated=kernels.conv)


def batch_norm(train: bool, dtype: Dtype = jnp.float32, name: str | None = None) -> nn.BatchNorm:
    """torch BatchNorm2d equivalent (eps 1e-5, momentum 0.1); running stats when not training."""
    return nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM, epsilon=BN_EPS,
                        dtype=dtype, param_dtype=jnp.float32, name=name)


class BasicBlock(nn.Module):
    """torchvision BasicBlock: 3x3(stride) -> BN -> ReLU -> 3x3 -> BN, + identity/downsample, ReLU."""

    planes: int
    stride: int = 1
    downsample: bool = False
    dtype: Dtype = jnp.float32
    kernels: Kernels = PORTABLE

    expansion = 1

    @nn.compact
    def __call__(self, x, train: bool = False):
        k = self.kernels
        identity = x
        y = conv(self.planes, 3, self.stride, dtype=self.dtype, name="conv1", kernels=k)(x)
        y = nn.relu(batch_norm(train, self.dtype, "bn1")(y))
        y = conv(self.planes, 3, 1, dtype=self.dtype, name="conv2", kernels=k)(y)
        y = batch_norm(train, self.dtype, "bn2")(y)
        if self.downsample:
            identity = conv(self.planes, 1, self.stride, dtype=self.dtype, name="downsample_0",
                            kernels=k)(x)
            identity = batch_norm(train, self.dtype, "downsample_1")(identity)
        return k.block_output(nn.relu(y + identity))


class Bottleneck(nn.Module):
    """torchvision Bottleneck (stride on the 3x3 conv).

    1x1 (width) -> BN -> ReLU -> 3x3 stride (width) -> BN -> ReLU -> 1x1
    (planes * 4) -> BN, plus identity or ``downsample`` (1x1 stride + BN),
    ReLU. ``width`` = planes * width_per_group / 64 (x2 for the wide nets).
    Reused by the RD4AD OCBE bottleneck (``kdjax.models.rd``).
    """

    planes: int
    width: int
    stride: int = 1
    downsample: bool = False
    dtype: Dtype = jnp.float32
    kernels: Kernels = PORTABLE

    expansion = 4

    @nn.compact
    def __call__(self, x, train: bool = False):
        k = self.kernels
        identity = x
        y = conv(self.width, 1, dtype=self.dtype, name="conv1", kernels=k)(x)
        y = nn.relu(batch_norm(train, self.dtype, "bn1")(y))
        y = conv(self.width, 3, self.stride, dtype=self.dtype, name="conv2", kernels=k)(y)
        y = nn.relu(batch_norm(train, self.dtype, "bn2")(y))
        y = conv(self.planes * 4, 1, dtype=self.dtype, name="conv3", kernels=k)(y)
        y = batch_norm(train, self.dtype, "bn3")(y)
        if self.downsample:
            identity = conv(self.planes * 4, 1, self.stride, dtype=self.dtype,
                            name="downsample_0", kernels=k)(x)
            identity = batch_norm(train, self.dtype, "downsample_1")(identity)
        return k.block_output(nn.relu(y + identity))


def max_pool_torch(x, window: int = 3, stride: int = 2, padding: int = 1):
    """torch MaxPool2d(3, 2, 1): padding with -inf (lax.reduce_window's init for max)."""
    return nn.max_pool(x, (window, window), strides=(stride, stride),
                       padding=((padding, padding), (padding, padding)))


class ResNet(nn.Module):
    """torchvision ResNet trunk returning the feature taps.

    Attributes:
      block: "basic" or "bottleneck".
      stage_sizes: blocks per stage (4 entries; only the first 3 are built
        unless ``with_head``).
      width_per_group: torchvision's ``width_per_group`` (64, or 128 for wide).
      width_divisor: divides every channel width (stem, planes, widths) for
        small random-weight nets in tests and demos.
      with_head: also compute layer4 and the ImageNet logits.
      dtype: compute dtype (params stay float32).
      kernels: how convolutions and residual outputs are computed (kdjax.backends).
    """

    block: str = "bottleneck"
    stage_sizes: Sequence[int] = (3, 4, 6, 3)
    width_per_group: int = 64
    width_divisor: int = 1
    num_classes: int = 1000
    with_head: bool = False
    dtype: Dtype = jnp.float32
    kernels: Kernels = PORTABLE

    def _stage(self, x, index: int, planes: int, blocks: int, stride: int, inplanes: int, train: bool):
        d = self.width_divisor
        p = planes // d
        if self.block == "basic":
            out = p
            for b in range(blocks):
                s = stride if b == 0 else 1
                ds = b == 0 and (s != 1 or inplanes != out)
                x = BasicBlock(p, s, ds, self.dtype, self.kernels,
                               name=f"layer{index}_{b}")(x, train)
                inplanes = out
        else:
            width = int(planes * (self.width_per_group / 64.0)) // d
            out = p * 4
            for b in range(blocks):
                s = stride if b == 0 else 1
                ds = b == 0 and (s != 1 or inplanes != out)
                x = Bottleneck(p, width, s, ds, self.dtype, self.kernels,
                               name=f"layer{index}_{b}")(x, train)
                inplanes = out
        return x, out

    @nn.compact
    def __call__(self, x, train: bool = False):
        """x: (N, H, W, 3) float, ImageNet-normalized -> dict of NHWC taps."""
        if self.block not in ("basic", "bottleneck"):
            raise ValueError(f"ResNet.block must be 'basic' or 'bottleneck', got {self.block!r}")
        d = self.width_divisor
        x = jnp.asarray(x, self.dtype)
        x = conv(64 // d, 7, 2, 3, dtype=self.dtype, name="conv1", kernels=self.kernels)(x)
        x = nn.relu(batch_norm(train, self.dtype, "bn1")(x))
        x = max_pool_torch(x)
        feats = {}
        inplanes = 64 // d
        n_stages = 4 if self.with_head else 3
        for i, planes in enumerate((64, 128, 256, 512)[:n_stages]):
            x, inplanes = self._stage(x, i + 1, planes, self.stage_sizes[i], 1 if i == 0 else 2,
                                      inplanes, train)
            feats[f"layer{i + 1}"] = x
        if self.with_head:
            pooled = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
            feats["logits"] = nn.Dense(self.num_classes, dtype=jnp.float32, param_dtype=jnp.float32,
                                       name="fc")(pooled)
        return feats


ARCHS = {
    "resnet18": dict(block="basic", stage_sizes=(2, 2, 2, 2), width_per_group=64),
    "resnet34": dict(block="basic", stage_sizes=(3, 4, 6, 3), width_per_group=64),
    "resnet50": dict(block="bottleneck", stage_sizes=(3, 4, 6, 3), width_per_group=64),
    "wide_resnet50_2": dict(block="bottleneck", stage_sizes=(3, 4, 6, 3), width_per_group=128),
    "wide_resnet101_2": dict(block="bottleneck", stage_sizes=(3, 4, 23, 3), width_per_group=128),
}


def make_resnet(arch: str, width_divisor: int = 1, dtype: Dtype = jnp.float32, **kw) -> ResNet:
    """Builds the Flax ResNet for a torchvision architecture name.

    ``kw`` overrides any ResNet attribute (e.g. ``stage_sizes`` for tiny
    golden nets, ``with_head=True``).
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown ResNet architecture {arch!r}; choose one of {sorted(ARCHS)}")
    if width_divisor < 1 or 64 % width_divisor:
        raise ValueError(f"width_divisor must be a positive divisor of 64, got {width_divisor}")
    cfg = dict(ARCHS[arch])
    cfg.update(kw)
    cfg["stage_sizes"] = tuple(cfg["stage_sizes"])
    return ResNet(width_divisor=width_divisor, dtype=dtype, **cfg)


def tap_channels(arch: str, width_divisor: int = 1) -> dict:
    """Channels of layer1..layer3 for an architecture (e.g. WRN50: 256/512/1024)."""
    e = 1 if ARCHS[arch]["block"] == "basic" else 4
    return {f"layer{i + 1}": p * e // width_divisor for i, p in enumerate((64, 128, 256))}


__all__ = ["BasicBlock", "Bottleneck", "ResNet", "ARCHS", "make_resnet", "tap_channels", "conv",
           "batch_norm", "max_pool_torch"]
