"""A drop-in ``lax.conv_general_dilated`` whose kernel gradient is a few matmuls.

XLA:CPU computes a convolution's kernel gradient (the "f01b_i01o->01bf"
convolution autodiff emits) at 1-2 GFLOP/s, even for 1x1 kernels, and far
slower for strided ones, while its forward and input-gradient convolutions
and its matmuls run near the machine's peak. Measured on RD4AD's student at
64 px, batch 8 (2-core CPU): the kernel gradients took ~80% of a 10 s step;
one 3x3 stride-2 kernel gradient alone took 1.4 s for 0.6 GFLOP.

:func:`conv_general_dilated` computes the same convolution with
``lax.conv_general_dilated`` and its gradients as:
- kernel gradient: matmuls; tap (a, b) of the kernel meets a strided slice of
  the padded input, contracted with the output gradient over batch and space
  (:func:`kernel_grad`);
- input gradient, stride 1: the forward convolution of the output gradient
  with the flipped kernel (XLA:CPU's fast forward path);
- input gradient, strided: one matmul spread back by interior padding
  (:func:`input_grad_strided`).
It is used for NHWC / HWIO convolutions without dilation or groups on the CPU
backend; everything else goes to ``lax.conv_general_dilated`` unchanged (GPU
and TPU convolution gradients are fast). Flax's ``nn.Conv`` takes it
as ``conv_general_dilated=``, so parameters and their names do not change.
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


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv(lhs, rhs, strides, padding, precision):
    return _plain(lhs, rhs, strides, padding, precision)


def _conv_fwd(lhs, rhs, strides, padding, precision):
    return _plain(lhs, rhs, strides, padding, precision), (lhs, rhs)


def kernel_grad(lhs, g, kernel_hw: Tuple[int, int], strides, padding, precision=None):
    """d(sum(g * conv(lhs, w)))/dw for NHWC / HWIO, as matmuls over batch x space.

    The output gradient is transposed once to (O, M) (M = N * Ho * Wo); each
    kernel tap's strided input slice, reshaped to (M, I), is the matmul's
    right operand in its natural layout, so XLA:CPU adds no transposes of the
    (large) activations. Strided kernels gather the taps into one (M, k*k*I)
    matrix first: one matmul is faster there than k*k small ones (measured)."""
    kh, kw = kernel_hw
    sh, sw = strides
    (pt, pb), (pl, pr) = padding
    n, ho, wo, o = g.shape
    ci = lhs.shape[-1]
    # Negative padding crops; lax.pad does both.
    xp = lax.pad(lhs, jnp.zeros((), lhs.dtype),
                 ((0, 0, 0), (pt, pb, 0), (pl, pr, 0), (0, 0, 0)))

    def tap(a, b):
        return lax.slice(xp, (0, a, b, 0),
                         (n, a + sh * (ho - 1) + 1, b + sw * (wo - 1) + 1, ci),
                         (1, sh, sw, 1)).reshape(n * ho * wo, ci)

    g_t = g.reshape(n * ho * wo, o).T
    dot = functools.partial(jnp.dot, precision=precision, preferred_element_type=jnp.float32)
    taps = [tap(a, b) for a in range(kh) for b in range(kw)]
    if (sh, sw) != (1, 1) and kh * kw > 1:
        d = dot(g_t, jnp.concatenate(taps, -1))
    else:
        d = jnp.stack([dot(g_t, t) for t in taps], 1)
    return d.reshape(o, kh, kw, ci).transpose(1, 2, 3, 0)


def input_grad_strided(g, rhs, lhs_shape, strides, padding, precision=None):
    """d(sum(g * conv(x, w)))/dx for a strided NHWC / HWIO convolution: one
    matmul g @ w^T for all taps, then each tap's (N, Ho, Wo, I) slab is spread
    back onto its strided positions of the padded input (lax.pad with interior
    padding) and summed; XLA:CPU's lhs-dilated convolution is slower."""
    kh, kw, ci, o = rhs.shape
    sh, sw = strides
    (pt, pb), (pl, pr) = padding
    n, ho, wo, _ = g.shape
    _, h, w, _ = lhs_shape
    hp, wp = h + pt + pb, w + pl + pr
    z = jnp.dot(g.reshape(n * ho * wo, o),
                rhs.astype(g.dtype).transpose(3, 0, 1, 2).reshape(o, kh * kw * ci),
                precision=precision, preferred_element_type=jnp.float32)
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


def _conv_bwd(strides, padding, precision, res, g):
    lhs, rhs = res
    kh, kw = rhs.shape[:2]
    (pt, pb), (pl, pr) = padding
    back_pad = ((kh - 1 - pt, kh - 1 - pb), (kw - 1 - pl, kw - 1 - pr))
    if tuple(strides) == (1, 1) and min(min(p) for p in back_pad) >= 0:
        # The input gradient as the forward convolution it is (flipped kernel,
        # in/out swapped): XLA:CPU's fast forward path, not its transpose form.
        w_t = jnp.flip(rhs, (0, 1)).transpose(0, 1, 3, 2).astype(g.dtype)
        d_lhs = _plain(g, w_t, (1, 1), back_pad, precision).astype(lhs.dtype)
    else:
        d_lhs = input_grad_strided(g, rhs, lhs.shape, strides, padding, precision)
    d_rhs = kernel_grad(lhs, g.astype(lhs.dtype), rhs.shape[:2], strides, padding, precision)
    return d_lhs, d_rhs.astype(rhs.dtype)


_conv.defvjp(_conv_fwd, _conv_bwd)


def conv_general_dilated(lhs, rhs, window_strides: Sequence[int], padding,
                         lhs_dilation=None, rhs_dilation=None, dimension_numbers=None,
                         feature_group_count: int = 1, batch_group_count: int = 1,
                         precision=None, preferred_element_type=None):
    """``lax.conv_general_dilated`` (same signature); see the module docstring."""
    fast = (jax.default_backend() == "cpu"
            and _is_nhwc_hwio(dimension_numbers)
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
    return _conv(lhs, rhs, tuple(int(s) for s in window_strides), pad, precision)
