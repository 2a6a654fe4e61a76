"""Reverse-distillation student (RD4AD / MRKD) as Flax modules.

Mirrors the reference PyTorch code (hq-deng/RD4AD ``resnet.BN_layer`` and
``de_resnet.de_wide_resnet50_2``; yuxin-jiang/MRKD adds ``generation{1,2,3}``)
as described in docs/METHODS.md (RD4AD, MRKD) so that checkpoints saved by those
scripts import cleanly (``kdjax.weights.load_reference_rd_checkpoint``).
Submodule names follow the reference state-dict keys with "." before an
index written as "_": ``bn.bn_layer.0.conv1`` -> ``bn/bn_layer_0/conv1``,
``decoder.layer1.0.upsample.0`` -> ``decoder/layer1_0/upsample_0``,
``decoder.generation1.0`` -> ``decoder/generation1/conv_0`` (see
``kdjax.weights``).

Shapes at full width for a 256x256 input (NHWC):
teacher layer1 64x64x256, layer2 32x32x512, layer3 16x16x1024 ->
OCBE 8x8x2048 -> decoder 16x16x1024 (matched to layer3), 32x32x512
(layer2), 64x64x256 (layer1). ``width_divisor`` divides every width,
consistently with ``kdjax.models.resnet.make_resnet``.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import flax.linen as nn
import jax.numpy as jnp

from kdjax.backends import PORTABLE, Kernels
from kdjax.models.resnet import Bottleneck, batch_norm, conv

Dtype = Any


class Deconv2x2(nn.ConvTranspose):
    """ConvTranspose(k=2, s=2, 'VALID', transpose_kernel=True) computed as one matmul and
    a depth-to-space: each input pixel writes its own 2x2 output block, so the two are
    equal. Same parameter ("kernel", (2, 2, out, in)) as nn.ConvTranspose; XLA:CPU runs
    the lhs-dilated convolution's gradient far slower than this matmul
    (docs/BENCHMARKS.md, "CPU kernels")."""

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", self.kernel_init, (2, 2, self.features, x.shape[-1]),
                            self.param_dtype)
        k = kernel.astype(self.dtype or x.dtype)
        y = jnp.einsum("nijc,aboc->niajbo", x.astype(k.dtype), k)
        n, h, _, w, _, o = y.shape
        return y.reshape(n, 2 * h, 2 * w, o)


def deconv2x2(features: int, dtype: Dtype, name: str) -> nn.ConvTranspose:
    """torch ConvTranspose2d(k=2, s=2, p=0, bias=False): doubles H and W.

    The Flax kernel is the torch weight (in, out, kH, kW) transposed (2, 3, 1, 0);
    with transpose_kernel=True Flax flips the kernel as torch does.
    """
    return Deconv2x2(features, (2, 2), strides=(2, 2), padding="VALID", use_bias=False,
                     transpose_kernel=True, dtype=dtype, param_dtype=jnp.float32, name=name)


class OCBE(nn.Module):
    """One-class bottleneck embedding ("bn" = BN_layer in the reference code).

    layer1 -> conv3x3 s2 + BN + ReLU -> conv3x3 s2 + BN + ReLU;
    layer2 -> conv3x3 s2 + BN + ReLU; concat [l1, l2, layer3] (3072 ch at
    full width) -> 3 WRN Bottleneck blocks (width 1024, out 2048), the
    first with stride 2 and a 1x1 s2 downsample. The reference's conv4/bn4
    are never used in its forward pass and are not built here.
    """

    width_divisor: int = 1
    dtype: Dtype = jnp.float32
    blocks: int = 3
    kernels: Kernels = PORTABLE

    @nn.compact
    def __call__(self, feats: Mapping[str, Any], train: bool = False):
        d, k, dt = self.width_divisor, self.kernels, self.dtype
        c = 256 // d  # 64 * expansion
        l1 = jnp.asarray(feats["layer1"], dt)
        l2 = jnp.asarray(feats["layer2"], dt)
        l3 = jnp.asarray(feats["layer3"], dt)
        a = nn.relu(batch_norm(train, dt, "bn1")(conv(2 * c, 3, 2, 1, dt, "conv1", kernels=k)(l1)))
        a = nn.relu(batch_norm(train, dt, "bn2")(conv(4 * c, 3, 2, 1, dt, "conv2", kernels=k)(a)))
        b = nn.relu(batch_norm(train, dt, "bn3")(conv(4 * c, 3, 2, 1, dt, "conv3", kernels=k)(l2)))
        x = jnp.concatenate([a, b, l3], axis=-1)
        planes, width = 512 // d, 1024 // d
        for i in range(self.blocks):
            x = Bottleneck(planes, width, stride=2 if i == 0 else 1, downsample=i == 0,
                           dtype=dt, kernels=k, name=f"bn_layer_{i}")(x, train)
        return x


class DeBottleneck(nn.Module):
    """Decoder bottleneck of the reference ``de_resnet``.

    1x1 -> BN -> ReLU -> (ConvTranspose 2x2 s2 if ``upsample_stride`` == 2
    else 3x3) -> BN -> ReLU -> 1x1 (planes * 4) -> BN, plus identity or the
    ``upsample`` branch (ConvTranspose 2x2 s2 + BN), ReLU.
    """

    planes: int
    width: int
    stride: int = 1
    upsample: bool = False
    dtype: Dtype = jnp.float32
    kernels: Kernels = PORTABLE

    @nn.compact
    def __call__(self, x, train: bool = False):
        k = self.kernels
        identity = x
        y = conv(self.width, 1, dtype=self.dtype, name="conv1", kernels=k)(x)
        y = nn.relu(batch_norm(train, self.dtype, "bn1")(y))
        if self.stride == 2:
            y = deconv2x2(self.width, self.dtype, "conv2")(y)
        else:
            y = conv(self.width, 3, 1, dtype=self.dtype, name="conv2", kernels=k)(y)
        y = nn.relu(batch_norm(train, self.dtype, "bn2")(y))
        y = conv(self.planes * 4, 1, dtype=self.dtype, name="conv3", kernels=k)(y)
        y = batch_norm(train, self.dtype, "bn3")(y)
        if self.upsample:
            identity = deconv2x2(self.planes * 4, self.dtype, "upsample_0")(x)
            identity = batch_norm(train, self.dtype, "upsample_1")(identity)
        return k.block_output(nn.relu(y + identity))


class Generation(nn.Module):
    """MRKD feature-level-masking generation module: Conv3x3 -> ReLU -> Conv3x3 (with bias).

    Reference keys ``generation{k}.0`` and ``generation{k}.2`` map to
    ``conv_0`` and ``conv_2``.
    """

    channels: int
    dtype: Dtype = jnp.float32
    kernels: Kernels = PORTABLE

    @nn.compact
    def __call__(self, x):
        k = self.kernels
        x = conv(self.channels, 3, 1, 1, self.dtype, "conv_0", use_bias=True, kernels=k)(x)
        x = nn.relu(x)
        return conv(self.channels, 3, 1, 1, self.dtype, "conv_2", use_bias=True, kernels=k)(x)


class Decoder(nn.Module):
    """``de_wide_resnet50_2``: stages of [3, 4, 6] DeBottlenecks at planes 256, 128, 64
    (width x2), each upsampling x2; optional MRKD generation modules.

    Returns {"layer3": 16x16x1024, "layer2": 32x32x512, "layer1": 64x64x256}
    (full width, 256 input) named after the teacher tap each output is
    matched to. With ``generation``, out_k = Generation_k(dec_k * mask_k)
    (no masking where the mask is None).
    """

    width_divisor: int = 1
    generation: bool = False
    stage_sizes: tuple = (3, 4, 6)
    dtype: Dtype = jnp.float32
    kernels: Kernels = PORTABLE

    @nn.compact
    def __call__(self, x, train: bool = False, flm_masks: Optional[Mapping[str, Any]] = None):
        d = self.width_divisor
        outs = []
        for s, (planes, blocks) in enumerate(zip((256, 128, 64), self.stage_sizes)):
            p, width = planes // d, 2 * planes // d
            for b in range(blocks):
                x = DeBottleneck(p, width, stride=2 if b == 0 else 1, upsample=b == 0,
                                 dtype=self.dtype, kernels=self.kernels,
                                 name=f"layer{s + 1}_{b}")(x, train)
            outs.append(x)
        # decoder stage s+1 is matched to teacher tap layer(3 - s)
        result = {"layer3": outs[0], "layer2": outs[1], "layer1": outs[2]}
        if self.generation:
            # reference: generation1 acts on the 1024-ch (layer3) output, generation3 on 256-ch
            for k, tap in ((1, "layer3"), (2, "layer2"), (3, "layer1")):
                y = result[tap]
                if flm_masks is not None and flm_masks.get(tap) is not None:
                    y = y * jnp.asarray(flm_masks[tap], y.dtype)
                result[tap] = Generation(y.shape[-1], self.dtype, self.kernels,
                                         name=f"generation{k}")(y)
        return result


class RDStudent(nn.Module):
    """RD4AD / MRKD student: OCBE ("bn") + decoder ("decoder").

    ``__call__(teacher_feats, train, flm_masks=None)`` with teacher_feats a
    dict of NHWC layer1..layer3 maps returns {"layer1","layer2","layer3"}
    student maps of the same shapes. ``flm_masks``: optional dict
    tap -> (N, h, w, 1) float 0/1 mask multiplied into the decoder output
    before the generation module (``generation=True`` only).
    """

    width_divisor: int = 1
    generation: bool = False
    dtype: Dtype = jnp.float32
    ocbe_blocks: int = 3  # reference: 3; fewer only for fast tests (no checkpoint import then)
    decoder_stages: tuple = (3, 4, 6)  # reference: (3, 4, 6); likewise
    kernels: Kernels = PORTABLE  # how convolutions and residual outputs are computed

    @nn.compact
    def __call__(self, teacher_feats: Mapping[str, Any], train: bool = False,
                 flm_masks: Optional[Mapping[str, Any]] = None):
        if flm_masks is not None and not self.generation:
            raise ValueError("flm_masks were given but this RDStudent has generation=False; "
                             "build it with generation=True (MRKD) to use feature-level masking")
        z = OCBE(self.width_divisor, self.dtype, self.ocbe_blocks, self.kernels,
                 name="bn")(teacher_feats, train)
        return Decoder(self.width_divisor, self.generation, tuple(self.decoder_stages),
                       dtype=self.dtype, kernels=self.kernels, name="decoder")(z, train, flm_masks)


__all__ = ["OCBE", "DeBottleneck", "Generation", "Decoder", "RDStudent", "deconv2x2"]
