"""NSA-style synthetic anomalies ("swap" mode) drawn on the device with jax.random.

MRKD's image-level masking (ILM) feeds the student path an image in which
patches of the same image were hard-pasted elsewhere (no Poisson blending, no
resizing), following the natural-synthetic-anomalies (NSA) recipe with the
per-category settings of the published MRKD training (METHODS.md):

- patch half-size = clip(0.03 + Gamma(shape 2, scale 0.05), lo, hi) x side,
  drawn separately for height and width with the category's bounds;
- the first patch always, each further one with probability 0.5 while the
  previous one was drawn, up to the category's maximum;
- with an object constraint: a pixel is object where
  |mean(RGB) * 255 - level| > tolerance, majority-filtered 7x7 (the median of
  a binary mask); the source patch must be at least ``min_object`` object and
  the destination at least ``min_overlap``. Up to 200 candidate position
  pairs are drawn at once and the first valid one is used, else the patch is
  skipped.

Everything is static-shaped and vectorized: candidate checks use an integral
image, the paste is one gather, so a batch of NSA images costs little next to
the networks.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import jax
import jax.numpy as jnp

from kdjax import ops


@dataclasses.dataclass(frozen=True)
class NSAParams:
    height_bounds: Tuple[float, float] = (0.03, 0.4)
    width_bounds: Tuple[float, float] = (0.03, 0.4)
    max_patches: int = 3
    min_object: Optional[float] = None  # None: no object constraint
    min_overlap: Optional[float] = None
    background: Optional[Tuple[float, float]] = None  # (grey level, tolerance)
    tries: int = 200


def _p(h, w, n, obj=None, ovl=None, bg=None):
    return NSAParams(h, w, n, obj, ovl, bg)


# Per-category settings of the published MRKD training (METHODS.md table).
CATEGORY_PARAMS = {
    "bottle": _p((0.03, 0.4), (0.03, 0.4), 3, 0.7, 0.25, (200, 60)),
    "cable": _p((0.01, 0.05), (0.01, 0.1), 3),
    "capsule": _p((0.01, 0.05), (0.01, 0.05), 1, 0.7, 0.25, (200, 60)),
    "hazelnut": _p((0.03, 0.35), (0.03, 0.35), 3, 0.7, 0.25, (20, 20)),
    "metal_nut": _p((0.01, 0.05), (0.01, 0.01), 1, 0.5, 0.25, (20, 20)),
    "pill": _p((0.01, 0.05), (0.01, 0.05), 1, 0.7, 0.25, (20, 20)),
    "screw": _p((0.01, 0.05), (0.01, 0.05), 1, 0.5, 0.25, (200, 60)),
    "toothbrush": _p((0.01, 0.01), (0.01, 0.01), 1, 0.25, 0.25, (20, 20)),
    "transistor": _p((0.03, 0.4), (0.03, 0.4), 3),
    "zipper": _p((0.01, 0.05), (0.01, 0.01), 1, 0.7, 0.25, (200, 60)),
    "carpet": _p((0.03, 0.4), (0.03, 0.4), 4),
    "leather": _p((0.03, 0.4), (0.03, 0.4), 4),
    "grid": _p((0.01, 0.05), (0.01, 0.1), 4),
    "tile": _p((0.01, 0.05), (0.01, 0.1), 4),
    "wood": _p((0.01, 0.05), (0.01, 0.01), 4),
}
DEFAULT_PARAMS = _p((0.03, 0.4), (0.03, 0.4), 3)  # other datasets: no object constraint


def params_for(category: str) -> NSAParams:
    return CATEGORY_PARAMS.get(category, DEFAULT_PARAMS)


def _integral(mask):
    """Summed-area table with a zero first row/column: (H+1, W+1)."""
    s = jnp.cumsum(jnp.cumsum(mask.astype(jnp.float32), 0), 1)
    return jnp.pad(s, ((1, 0), (1, 0)))


def _box_sum(ii, y0, x0, h, w):
    return ii[y0 + h, x0 + w] - ii[y0, x0 + w] - ii[y0 + h, x0] + ii[y0, x0]


def object_mask(image01, level: float, tolerance: float):
    """|mean(RGB) * 255 - level| > tolerance, then a 7x7 majority (binary median) filter."""
    h, w = image01.shape[:2]
    raw = jnp.abs(jnp.mean(image01, -1) * 255.0 - level) > tolerance
    ii = _integral(jnp.pad(raw, 3, mode="edge"))
    ys = jnp.arange(h)[:, None]
    xs = jnp.arange(w)[None, :]
    count = _box_sum(ii, ys, xs, 7, 7)
    return count > 24.5


def nsa_swap(key, image, params: NSAParams):
    """One NSA 'swap' image from ``image`` (H, W, C, any normalization)."""
    h, w = image.shape[:2]
    if params.background is not None:
        level, tol = params.background
        obj = object_mask(ops.denormalize_images(image), level, tol)
    else:
        obj = jnp.ones((h, w), bool)
    ii = _integral(obj)
    ys = jnp.arange(h)
    xs = jnp.arange(w)
    out = image
    active = jnp.array(True)
    for p in range(params.max_patches):
        key, k_coin, k_h, k_w, k_src, k_dst = jax.random.split(key, 6)
        if p > 0:
            active = active & jax.random.bernoulli(k_coin, 0.5)
        fh = jnp.clip(0.03 + 0.05 * jax.random.gamma(k_h, 2.0), *params.height_bounds)
        fw = jnp.clip(0.03 + 0.05 * jax.random.gamma(k_w, 2.0), *params.width_bounds)
        ph = jnp.clip(jnp.round(2 * fh * h).astype(jnp.int32), 1, h - 1)  # full patch height
        pw = jnp.clip(jnp.round(2 * fw * w).astype(jnp.int32), 1, w - 1)
        n = params.tries
        src = jax.random.uniform(k_src, (n, 2))
        dst = jax.random.uniform(k_dst, (n, 2))
        sy = jnp.floor(src[:, 0] * (h - ph + 1)).astype(jnp.int32)
        sx = jnp.floor(src[:, 1] * (w - pw + 1)).astype(jnp.int32)
        dy = jnp.floor(dst[:, 0] * (h - ph + 1)).astype(jnp.int32)
        dx = jnp.floor(dst[:, 1] * (w - pw + 1)).astype(jnp.int32)
        ok = (sy != dy) | (sx != dx)
        area = (ph * pw).astype(jnp.float32)
        if params.min_object is not None:
            ok = ok & (_box_sum(ii, sy, sx, ph, pw) / area >= params.min_object)
        if params.min_overlap is not None:
            ok = ok & (_box_sum(ii, dy, dx, ph, pw) / area >= params.min_overlap)
        i = jnp.argmax(ok)
        found = ok[i]
        in_y = (ys >= dy[i]) & (ys < dy[i] + ph)
        in_x = (xs >= dx[i]) & (xs < dx[i] + pw)
        src_y = jnp.clip(ys - dy[i] + sy[i], 0, h - 1)
        src_x = jnp.clip(xs - dx[i] + sx[i], 0, w - 1)
        moved = out[src_y[:, None], src_x[None, :]]
        paste = (in_y[:, None] & in_x[None, :] & active & found)[..., None]
        out = jnp.where(paste, moved, out)
    return out


def nsa_batch(key, images, params: NSAParams):
    """NSA swap for every image of a batch (N, H, W, C), independent keys."""
    keys = jax.random.split(key, images.shape[0])
    return jax.vmap(lambda k, x: nsa_swap(k, x, params))(keys, images)
