"""A drop-in ``lax.conv_general_dilated`` whose gradients are matmuls (the CPU kernels'
convolution, :mod:`kdjax.backends.cpu`).

XLA:CPU computes a convolution's kernel gradient (the "f01b_i01o->01bf"
convolution autodiff emits) far below the machine's matmul rate, even for 1x1
kernels, and slower still for strided ones, while its forward and
input-gradient convolutions and its matmuls run near peak (docs/BENCHMARKS.md,
"CPU kernels").

:func:`conv_general_dilated` computes the same convolution as:
- 1x1 without padding: a (strided) slice and one matmul, gradients by autodiff;
- strided, or stride 1 with at most ``IM2COL_MAX_PIXELS`` output pixels, and at
  least ``IM2COL_MIN_CHANNELS`` input channels: one im2col matmul forward;
- otherwise ``lax.conv_general_dilated`` forward;
and, for the last two, these gradients:
- kernel gradient: matmuls; tap (a, b) of the kernel meets a strided slice of
  the padded input, contracted with the output gradient over batch and space
  (:func:`kernel_grad`);
- input gradient of a stride-1 convolution on the XLA path: the forward
  convolution of the output gradient with the flipped kernel (XLA:CPU's fast
  forward path);
- other input gradients: one matmul spread back by interior padding
  (:func:`input_grad_matmul`).
:func:`im2col_conv` is the PDN's stride-1 im2col convolution (large maps, where
the im2col forward beats XLA's convolution): kernel gradient from the saved
patches, input gradient as the flipped-kernel forward convolution.
NHWC / HWIO convolutions without dilation or groups take these paths;
everything else goes to ``lax.conv_general_dilated`` unchanged. Flax's
``nn.Conv`` takes the function as ``conv_general_dilated=``, so parameters and
their names do not change.
"""

from __future__ import annotations

import functools
from typing import Sequence, Tuple

import jax
import jax.numpy as jnp
from jax import lax

_DN = ("NHWC", "HWIO", "NHWC")


def _is_nhwc_hwio(dimension_numbers) -> bool:
    if dimension_numbers is None:
        return False
    if isinstance(dimension_numbers, lax.ConvDimensionNumbers):
        return tuple(dimension_numbers) == ((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))
    return tuple(dimension_numbers) == _DN


def _plain(lhs, rhs, strides, padding, precision):
    return lax.conv_general_dilated(lhs, rhs, strides, padding, dimension_numbers=_DN,
                                    precision=precision)


# Stride-1 convolutions whose output has at most this many pixels per image are
# computed as one im2col matmul: XLA:CPU's convolution is slow on small maps
# with many channels (docs/BENCHMARKS.md, "CPU kernels").
IM2COL_MAX_PIXELS = 64
# Below this many input channels an im2col matrix is mostly gathering (the
# 7x7 stem on RGB); the convolution stays XLA's.
IM2COL_MIN_CHANNELS = 16


def _out_hw(lhs_shape, kernel_hw, strides, padding):
    return tuple((lhs_shape[1 + i] + sum(padding[i]) - kernel_hw[i]) // strides[i] + 1
                 for i in range(2))


def _patch_matrix(lhs, kernel_hw, strides, padding):
    """The (M, kh*kw*I) im2col matrix (M = N * Ho * Wo) and (N, Ho, Wo)."""
    cols = patches(lhs, kernel_hw, strides, padding)
    n, ho, wo, k = cols.shape
    return cols.reshape(n * ho * wo, k), (n, ho, wo)


def _back_pad(kernel_hw, padding):
    """Padding of a stride-1 convolution's input gradient written as a forward
    convolution: k - 1 - p on each side."""
    return tuple((k - 1 - lo, k - 1 - hi) for k, (lo, hi) in zip(kernel_hw, padding))


def _back_pad_fits(kernel_hw, padding) -> bool:
    """Whether every side's padding is at most k - 1, i.e. the back padding is
    not negative (the flipped-kernel input gradient applies)."""
    return min(min(p) for p in _back_pad(kernel_hw, padding)) >= 0


def _input_grad_flipped(g, rhs, padding, precision):
    """d(sum(g * conv(x, w)))/dx of a stride-1 convolution as the forward
    convolution it is (flipped kernel, in/out swapped, back padding k - 1 - p):
    XLA:CPU's fast forward path, not its transpose form."""
    w_t = jnp.flip(rhs, (0, 1)).transpose(0, 1, 3, 2).astype(g.dtype)
    return _plain(g, w_t, (1, 1), _back_pad(rhs.shape[:2], padding), precision)


def _im2col(lhs, rhs, strides, padding, precision):
    """The convolution as one matmul: (M, kh*kw*I) patches times the (kh*kw*I, O) kernel."""
    kh, kw, ci, co = rhs.shape
    cols, (n, ho, wo) = _patch_matrix(lhs, (kh, kw), strides, padding)
    y = lax.dot_general(cols, rhs.reshape(kh * kw * ci, co),
                        (((1,), (0,)), ((), ())), precision=precision)
    return y.reshape(n, ho, wo, co)


def _conv1x1(lhs, rhs, strides, precision):
    """A 1x1 convolution without padding: a (strided) slice and a matmul; autodiff's
    gradients of both are matmuls and an interior pad."""
    sh, sw = strides
    x = lhs[:, ::sh, ::sw, :] if (sh, sw) != (1, 1) else lhs
    n, h, w, ci = x.shape
    y = lax.dot_general(x.reshape(n * h * w, ci), rhs.reshape(ci, rhs.shape[-1]),
                        (((1,), (0,)), ((), ())), precision=precision)
    return y.reshape(n, h, w, rhs.shape[-1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _conv(lhs, rhs, strides, padding, precision, im2col):
    return (_im2col if im2col else _plain)(lhs, rhs, strides, padding, precision)


def _conv_fwd(lhs, rhs, strides, padding, precision, im2col):
    return _conv(lhs, rhs, strides, padding, precision, im2col), (lhs, rhs)


def taps(lhs, kernel_hw, strides, padding):
    """The kh*kw strided input slices (N, Ho, Wo, I) that meet kernel taps (0, 0) .. (kh-1, kw-1)."""
    kh, kw = kernel_hw
    sh, sw = strides
    (pt, pb), (pl, pr) = padding
    ho, wo = _out_hw(lhs.shape, kernel_hw, strides, padding)
    n, ci = lhs.shape[0], lhs.shape[-1]
    # Negative padding crops; lax.pad does both.
    xp = lax.pad(lhs, jnp.zeros((), lhs.dtype),
                 ((0, 0, 0), (pt, pb, 0), (pl, pr, 0), (0, 0, 0)))
    return [lax.slice(xp, (0, a, b, 0), (n, a + sh * (ho - 1) + 1, b + sw * (wo - 1) + 1, ci),
                      (1, sh, sw, 1)) for a in range(kh) for b in range(kw)]


def patches(lhs, kernel_hw, strides, padding):
    """im2col: (N, Ho, Wo, kh*kw*I) patches ordered (kernel row, kernel column,
    channel), the row order of the HWIO kernel reshaped to (kh*kw*I, O).

    Built as stacks on non-minor axes, kw taps per kernel row and then the kh
    rows, not as one concatenation of the kh*kw taps on the channel axis:
    XLA:CPU fuses neither a channel-axis concatenation nor one of more than 8
    operands, so that form writes every tap to memory before copying it
    into place, while each of these stacks is one loop fusion (docs/BENCHMARKS.md,
    "CPU kernels", has the measurements)."""
    t = taps(lhs, kernel_hw, strides, padding)
    kh, kw = kernel_hw
    n, ho, wo, ci = t[0].shape
    rows = [jnp.stack(t[a * kw:(a + 1) * kw], axis=-2) for a in range(kh)]
    return jnp.stack(rows, axis=-3).reshape(n, ho, wo, kh * kw * ci)


def _dot(a, b, contract, precision):
    """a . b contracting dimension contract[0] of a with contract[1] of b (2-D), f32 accumulation."""
    return lax.dot_general(a, b, (((contract[0],), (contract[1],)), ((), ())),
                           precision=precision, preferred_element_type=jnp.float32)


def kernel_grad(lhs, g, kernel_hw: Tuple[int, int], strides, padding, precision=None):
    """d(sum(g * conv(lhs, w)))/dw for NHWC / HWIO, as matmuls over batch x space.

    Each kernel tap's strided input slice, as an (M, I) matrix (M = N * Ho * Wo),
    meets the output gradient (M, O) in one matmul contracting M; neither operand
    is transposed in memory. Strided kernels gather the taps into one (M, k*k*I)
    matrix first: one matmul is faster there than k*k small ones
    (docs/BENCHMARKS.md, "CPU kernels")."""
    kh, kw = kernel_hw
    n, ho, wo, o = g.shape
    ci = lhs.shape[-1]
    g2 = g.reshape(n * ho * wo, o)
    slabs = [t.reshape(n * ho * wo, ci) for t in taps(lhs, kernel_hw, strides, padding)]
    if tuple(strides) != (1, 1) and kh * kw > 1:
        d = _dot(jnp.concatenate(slabs, -1), g2, (0, 0), precision)
    else:
        d = jnp.stack([_dot(t, g2, (0, 0), precision) for t in slabs])
    return d.reshape(kh, kw, ci, o)


def input_grad_matmul(g, rhs, lhs_shape, strides, padding, precision=None):
    """d(sum(g * conv(x, w)))/dx for an NHWC / HWIO convolution of any stride
    (used for strided ones and for the im2col path): one matmul g @ w^T for
    all taps, then each tap's (N, Ho, Wo, I) slab is spread back onto its
    strided positions of the padded input (lax.pad with interior
    padding) and summed; XLA:CPU's lhs-dilated convolution is slower."""
    kh, kw, ci, o = rhs.shape
    sh, sw = strides
    (pt, pb), (pl, pr) = padding
    n, ho, wo, _ = g.shape
    _, h, w, _ = lhs_shape
    hp, wp = h + pt + pb, w + pl + pr
    z = _dot(g.reshape(n * ho * wo, o), rhs.astype(g.dtype).reshape(kh * kw * ci, o), (1, 1),
             precision)
    z = z.reshape(n, ho, wo, kh, kw, ci)
    zero = jnp.zeros((), z.dtype)
    total = None
    for a in range(kh):
        for b in range(kw):
            # rows a, a + sh, ..., a + sh * (ho - 1) of the padded input
            cfg = ((0, 0, 0), (a, hp - a - sh * (ho - 1) - 1, sh - 1),
                   (b, wp - b - sw * (wo - 1) - 1, sw - 1), (0, 0, 0))
            part = lax.pad(z[:, :, :, a, b, :], zero, cfg)
            total = part if total is None else total + part
    # Crop the padding (negative padding pads instead).
    crop = ((0, 0, 0), (-pt, -pb, 0), (-pl, -pr, 0), (0, 0, 0))
    return lax.pad(total, zero, crop).astype(g.dtype)


def _conv_bwd(strides, padding, precision, im2col, res, g):
    lhs, rhs = res
    if not im2col and tuple(strides) == (1, 1) and _back_pad_fits(rhs.shape[:2], padding):
        d_lhs = _input_grad_flipped(g, rhs, padding, precision).astype(lhs.dtype)
    else:
        d_lhs = input_grad_matmul(g, rhs, lhs.shape, strides, padding, precision)
    d_rhs = kernel_grad(lhs, g.astype(lhs.dtype), rhs.shape[:2], strides, padding, precision)
    return d_lhs, d_rhs.astype(rhs.dtype)


_conv.defvjp(_conv_fwd, _conv_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def im2col_conv(x, w, padding=((0, 0), (0, 0))):
    """A stride-1 NHWC / HWIO convolution as one im2col matmul; ``padding`` is
    ((top, bottom), (left, right)) with each side at most kernel size - 1.

    Kernel gradient: patches^T . g, with the patches kept from the forward;
    input gradient: XLA's forward convolution of g with the flipped kernel
    (back padding k - 1 - p, so only the unpadded input's gradient is
    computed) rather than g . w^T spread back over the patches (a chain of
    k*k padded adds that XLA:CPU runs far below memory speed)."""
    return _im2col_fwd(x, w, padding)[0]


def _im2col_fwd(x, w, padding):
    kh, kw, ci, co = w.shape
    if not _back_pad_fits((kh, kw), padding):
        raise ValueError(f"im2col_conv: padding {padding} exceeds kernel size - 1 ({kh}x{kw})")
    cols, (n, ho, wo) = _patch_matrix(x, (kh, kw), (1, 1), padding)
    y = _dot(cols, w.reshape(kh * kw * ci, co), (1, 0), None).astype(x.dtype)
    return y.reshape(n, ho, wo, co), (cols, w)


def _im2col_bwd(padding, res, g):
    cols, w = res
    d_w = _dot(cols, g.reshape(-1, w.shape[-1]).astype(cols.dtype), (0, 0), None).reshape(w.shape)
    d_x = _input_grad_flipped(g, w, padding, None)
    return d_x.astype(cols.dtype), d_w.astype(w.dtype)


im2col_conv.defvjp(_im2col_fwd, _im2col_bwd)


def conv_general_dilated(lhs, rhs, window_strides: Sequence[int], padding,
                         lhs_dilation=None, rhs_dilation=None, dimension_numbers=None,
                         feature_group_count: int = 1, batch_group_count: int = 1,
                         precision=None, preferred_element_type=None):
    """``lax.conv_general_dilated`` (same signature); see the module docstring."""
    fast = (_is_nhwc_hwio(dimension_numbers)
            and not isinstance(padding, str)
            and all(d == 1 for d in (lhs_dilation or (1, 1)))
            and all(d == 1 for d in (rhs_dilation or (1, 1)))
            and feature_group_count == 1 and batch_group_count == 1
            and preferred_element_type is None)
    if not fast:
        return lax.conv_general_dilated(
            lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
            rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
            feature_group_count=feature_group_count, batch_group_count=batch_group_count,
            precision=precision, preferred_element_type=preferred_element_type)
    pad = tuple((int(lo), int(hi)) for lo, hi in padding)
    strides = tuple(int(s) for s in window_strides)
    kh, kw, ci, _ = rhs.shape
    if (kh, kw) == (1, 1) and pad == ((0, 0), (0, 0)):
        return _conv1x1(lhs, rhs, strides, precision)
    ho, wo = _out_hw(lhs.shape, (kh, kw), strides, pad)
    im2col = ci >= IM2COL_MIN_CHANNELS and (strides != (1, 1) or ho * wo <= IM2COL_MAX_PIXELS)
    return _conv(lhs, rhs, strides, pad, precision, im2col)
