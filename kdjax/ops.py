"""Small array ops shared by methods, with torch / scipy semantics made explicit.

Resizing is done with interpolation matrices (one small matmul per axis), which
is exact, differentiable, runs on any device and matches torch's
``F.interpolate(mode="bilinear", align_corners=...)`` without antialiasing.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np

from kdjax.data.types import IMAGENET_MEAN, IMAGENET_STD


@functools.lru_cache(maxsize=128)
def interp_matrix(in_size: int, out_size: int, align_corners: bool) -> np.ndarray:
    """(out_size, in_size) matrix of 1-D linear interpolation weights (torch semantics)."""
    w = np.zeros((out_size, in_size), np.float32)
    for i in range(out_size):
        if align_corners:
            src = 0.0 if out_size == 1 else i * (in_size - 1) / (out_size - 1)
        else:
            src = (i + 0.5) * in_size / out_size - 0.5
            src = max(src, 0.0)
        i0 = min(int(np.floor(src)), in_size - 1)
        i1 = min(i0 + 1, in_size - 1)
        frac = src - i0
        w[i, i0] += 1.0 - frac
        w[i, i1] += frac
    return w


def resize_bilinear(x, size, align_corners: bool):
    """Resize maps (..., H, W) to ``size`` = (H', W') with bilinear interpolation."""
    h, w = x.shape[-2:]
    oh, ow = size
    if (h, w) == (oh, ow):
        return x
    mh = jnp.asarray(interp_matrix(h, oh, align_corners), dtype=x.dtype)
    mw = jnp.asarray(interp_matrix(w, ow, align_corners), dtype=x.dtype)
    return jnp.einsum("oh,...hw,pw->...op", mh, x, mw)


@functools.lru_cache(maxsize=32)
def gaussian_matrix(size: int, sigma: float) -> np.ndarray:
    """(size, size) matrix G with G @ v == scipy.ndimage.gaussian_filter1d(v, sigma).

    Built from scipy itself, so the boundary ('reflect', truncate 4.0) is exactly
    scipy's for any size.
    """
    from scipy.ndimage import gaussian_filter1d

    eye = np.eye(size, dtype=np.float64)
    return gaussian_filter1d(eye, float(sigma), axis=0, mode="reflect").astype(np.float32)


def gaussian_blur(maps, sigma: float = 4.0):
    """scipy.ndimage.gaussian_filter(m, sigma) on each (H, W) map of (..., H, W)."""
    if sigma <= 0:
        return maps
    h, w = maps.shape[-2:]
    gh = jnp.asarray(gaussian_matrix(h, float(sigma)), maps.dtype)
    gw = jnp.asarray(gaussian_matrix(w, float(sigma)), maps.dtype)
    return jnp.einsum("oh,...hw,pw->...op", gh, maps, gw)


def normalize_images(images_uint8, dtype=jnp.float32):
    """uint8 NHWC in [0, 255] -> float, scaled to [0, 1], ImageNet normalized."""
    mean = jnp.asarray(IMAGENET_MEAN, dtype)
    std = jnp.asarray(IMAGENET_STD, dtype)
    return (images_uint8.astype(dtype) / 255.0 - mean) / std


def denormalize_images(images):
    """Inverse of normalize_images, to floats in [0, 1]."""
    mean = jnp.asarray(IMAGENET_MEAN, images.dtype)
    std = jnp.asarray(IMAGENET_STD, images.dtype)
    return images * std + mean


def pad_and_upsample(maps, size, padding: int):
    """(N, h, w) maps -> zero-padded by ``padding`` on each side -> bilinear
    (align_corners=False) to ``size``, as the reference's
    ``F.pad(m, (4, 4, 4, 4))`` + ``F.interpolate(m, size, mode='bilinear')``."""
    p = int(padding)
    if p:
        maps = jnp.pad(maps, ((0, 0), (p, p), (p, p)))
    return resize_bilinear(maps, tuple(size), align_corners=False)
