"""EfficientAD's networks: the patch description network (PDN) and the autoencoder.

Layers exactly as the reference reproduction (nelson1425/EfficientAD,
``common.py``) defines them; see docs/METHODS.md, "EfficientAD".
Torch semantics are kept explicit:

* every convolution pads symmetrically with the torch ``padding`` value
  (``((p, p), (p, p))``), never Flax's 'SAME';
* ``AvgPool2d(2, 2, padding=p)`` counts padded zeros in the average
  (torch's default ``count_include_pad=True``);
* ``nn.Upsample(size, mode='bilinear')`` is bilinear with
  ``align_corners=False`` and no antialiasing (the interpolation matrices of
  :func:`kdjax.ops.interp_matrix`);
* parameters are initialised as torch initialises ``nn.Conv2d``
  (kernel and bias ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in))).

Submodules are named ``conv{i}`` with ``i`` the index of that convolution in
the reference ``nn.Sequential``, so torch state-dict keys ``"{i}.weight"`` /
``"{i}.bias"`` map onto them one to one (kdjax/weights/ does that for the
published teachers; the same holds for the autoencoder of the reference
version with Dropout).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from kdjax import ops
from kdjax.backends import PORTABLE

# Sequential indices of the convolutions in the reference nn.Sequential.
PDN_CONV_INDICES = {"S": (0, 3, 6, 8), "M": (0, 3, 6, 8, 10, 12)}
AE_CONV_INDICES = (0, 2, 4, 6, 8, 10, 12, 16, 20, 24, 28, 32, 36, 38)
AE_DECODER_SIZES = (3, 8, 15, 32, 63, 127)


def _torch_kernel_init(key, shape, dtype=jnp.float32):
    """torch.nn.Conv2d's default weight init: U(-1/sqrt(fan_in), +1/sqrt(fan_in)).

    (kaiming_uniform with a = sqrt(5)); ``shape`` is HWIO so fan_in = H*W*I.
    """
    fan_in = int(math.prod(shape[:-1]))
    bound = 1.0 / math.sqrt(fan_in)
    return jax.random.uniform(key, shape, dtype, -bound, bound)


def _torch_bias_init(fan_in: int):
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def avg_pool_torch(x, padding: int):
    """``AvgPool2d(kernel_size=2, stride=2, padding=padding)`` (padded zeros counted)."""
    p = padding
    return nn.avg_pool(x, (2, 2), strides=(2, 2), padding=((p, p), (p, p)),
                       count_include_pad=True)


def upsample_bilinear(x, size: Tuple[int, int]):
    """``F.interpolate(x, size, mode='bilinear', align_corners=False)`` on NHWC maps."""
    h, w = x.shape[1:3]
    oh, ow = size
    if (h, w) == (oh, ow):
        return x
    mh = jnp.asarray(ops.interp_matrix(h, oh, False), x.dtype)
    mw = jnp.asarray(ops.interp_matrix(w, ow, False), x.dtype)
    return jnp.einsum("oh,nhwc,pw->nopc", mh, x, mw)


class Conv2d(nn.Module):
    """``nn.Conv2d(in, features, kernel, stride, padding)`` with torch semantics, NHWC.

    Parameters are Flax's ``kernel`` (HWIO) and ``bias``, float32, initialised
    like torch; compute in ``dtype``. ``conv(x, w, stride, padding)`` computes
    the convolution (default ``lax.conv_general_dilated``; kdjax.backends'
    ``pdn_conv`` / ``pdn_conv_train``).
    """

    features: int
    kernel: int
    stride: int = 1
    padding: int = 0
    dtype: Any = jnp.float32
    conv: Callable = PORTABLE.pdn_conv

    @nn.compact
    def __call__(self, x, out_slice: Optional[Tuple[int, int]] = None):
        """``out_slice=(start, stop)`` computes only those output channels."""
        cin = x.shape[-1]
        k, p = self.kernel, self.padding
        fan_in = k * k * cin
        w = self.param("kernel", _torch_kernel_init, (k, k, cin, self.features), jnp.float32)
        b = self.param("bias", _torch_bias_init(fan_in), (self.features,), jnp.float32)
        if out_slice is not None:
            w, b = w[..., out_slice[0]:out_slice[1]], b[out_slice[0]:out_slice[1]]
        y = self.conv(x.astype(self.dtype), w.astype(self.dtype), self.stride, p)
        return y + b.astype(self.dtype)


def _conv(name_index: int, features: int, kernel: int, dtype, stride: int = 1,
          padding: int = 0, conv: Callable = PORTABLE.pdn_conv):
    """The torch-semantics convolution named ``conv{name_index}``."""
    return Conv2d(features, kernel, stride, padding, dtype, conv, name=f"conv{name_index}")


class PDN(nn.Module):
    """Patch description network, EfficientAD-S (``size="S"``) or -M (``size="M"``).

    Input: NHWC, ImageNet-normalized. With ``padding=False`` a 256x256 input
    gives a 56x56x``out_channels`` output; the receptive field is 33x33 pixels
    for both sizes. ``width_divisor`` divides the hidden widths (128/256 for
    S, 256/512 for M); it is 1 for the published networks and exists only for
    fast tests. ``conv``: how the convolutions are computed (see Conv2d).
    """

    size: str = "S"
    out_channels: int = 384
    padding: bool = False
    dtype: Any = jnp.float32
    width_divisor: int = 1
    conv: Callable = PORTABLE.pdn_conv

    @nn.compact
    def __call__(self, x, groups: Optional[Sequence[Tuple[int, int, int]]] = None):
        """NHWC images -> NHWC features (all ``out_channels``).

        ``groups``: optional ``((count, start, stop), ...)``: the batch is split
        into consecutive chunks of ``count`` images and the LAST convolution
        computes only output channels ``[start, stop)`` for its chunk; returns
        the list of chunk outputs. Identical values, less work when a caller
        uses different channel halves of different images (EfficientAD's
        student: local half of the image, global half of the augmented one).
        """
        if self.size not in PDN_CONV_INDICES:
            raise ValueError(f"PDN size {self.size!r}: use 'S' (EfficientAD-S) or 'M' (EfficientAD-M).")
        p = 1 if self.padding else 0
        d = int(self.width_divisor)
        conv = self.conv
        x = x.astype(self.dtype)
        if self.size == "S":
            c1, c2 = 128 // d, 256 // d
            x = nn.relu(_conv(0, c1, 4, self.dtype, padding=3 * p, conv=conv)(x))
            x = avg_pool_torch(x, p)
            x = nn.relu(_conv(3, c2, 4, self.dtype, padding=3 * p, conv=conv)(x))
            x = avg_pool_torch(x, p)
            x = nn.relu(_conv(6, c2, 3, self.dtype, padding=p, conv=conv)(x))
            head = _conv(8, self.out_channels, 4, self.dtype, conv=conv)
        else:
            c1, c2 = 256 // d, 512 // d
            x = nn.relu(_conv(0, c1, 4, self.dtype, padding=3 * p, conv=conv)(x))
            x = avg_pool_torch(x, p)
            x = nn.relu(_conv(3, c2, 4, self.dtype, padding=3 * p, conv=conv)(x))
            x = avg_pool_torch(x, p)
            x = nn.relu(_conv(6, c2, 1, self.dtype, conv=conv)(x))
            x = nn.relu(_conv(8, c2, 3, self.dtype, padding=p, conv=conv)(x))
            x = nn.relu(_conv(10, self.out_channels, 4, self.dtype, conv=conv)(x))
            head = _conv(12, self.out_channels, 1, self.dtype, conv=conv)
        if groups is None:
            return head(x)
        if sum(g[0] for g in groups) != x.shape[0]:
            raise ValueError(f"PDN groups {groups} do not add up to the batch {x.shape[0]}.")
        outs, i = [], 0
        for count, start, stop in groups:
            outs.append(head(x[i:i + count], out_slice=(start, stop)))
            i += count
        return outs


def pdn_output_size(image_size: int, size: str = "S", padding: bool = False) -> int:
    """Spatial side of a PDN's output for a square input (56 for 256, no padding)."""
    p = 1 if padding else 0
    s = image_size + 6 * p - 3          # conv 4x4, pad 3p
    s = (s + 2 * p - 2) // 2 + 1        # avg pool 2x2 s2, pad p
    s = s + 6 * p - 3                   # conv 4x4, pad 3p
    s = (s + 2 * p - 2) // 2 + 1        # avg pool
    s = s + 2 * p - 2                   # conv 3x3, pad p
    s = s - 3                           # conv 4x4 (M: conv 1x1 layers keep the size)
    return s


class Autoencoder(nn.Module):
    """EfficientAD's autoencoder (reference version with Dropout 0.2).

    Encoder: five Conv4x4 stride 2 pad 1 (3->32->32->64->64->64, ReLU after
    each), then a convolution to a 1x1 code: 8x8 at a 256 input as in the
    reference; the kernel is ``input_size / 32`` so the code is 1x1 for any
    multiple of 32 (only 256 is the reference network). Decoder: bilinear
    upsampling (align_corners=False) to 3, 8, 15, 32, 63, 127, each followed
    by Conv4x4(pad 2), ReLU, Dropout(0.2); upsampling to ``output_size`` (56
    at a 256 input: the PDN's output side), Conv3x3 pad 1, ReLU, Conv3x3 pad 1
    to ``out_channels``.

    Dropout is active when ``train=True`` and then needs a "dropout" rng.
    """

    out_channels: int = 384
    output_size: int = 56
    dtype: Any = jnp.float32
    width_divisor: int = 1
    dropout_rate: float = 0.2
    decoder_sizes: Sequence[int] = AE_DECODER_SIZES
    conv: Callable = PORTABLE.pdn_conv  # how the convolutions are computed (see Conv2d)

    @nn.compact
    def __call__(self, x, train: bool = False):
        d = int(self.width_divisor)
        c32, c64 = 32 // d, 64 // d
        x = x.astype(self.dtype)
        idx = iter(AE_CONV_INDICES)
        for ch in (c32, c32, c64, c64, c64):
            x = nn.relu(_conv(next(idx), ch, 4, self.dtype, stride=2, padding=1,
                              conv=self.conv)(x))
        code_kernel = x.shape[1]
        if x.shape[1] != x.shape[2] or code_kernel < 1:
            raise ValueError(f"Autoencoder needs square inputs that are multiples of 32; got {x.shape}.")
        x = _conv(next(idx), c64, code_kernel, self.dtype, conv=self.conv)(x)
        for s in self.decoder_sizes:
            x = upsample_bilinear(x, (s, s))
            x = nn.relu(_conv(next(idx), c64, 4, self.dtype, padding=2, conv=self.conv)(x))
            x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        x = upsample_bilinear(x, (self.output_size, self.output_size))
        x = nn.relu(_conv(next(idx), c64, 3, self.dtype, padding=1, conv=self.conv)(x))
        x = _conv(next(idx), self.out_channels, 3, self.dtype, padding=1,
                  conv=self.conv)(x)
        return x
