"""NSA-style synthetic anomalies ("swap" mode) drawn on the device with jax.random.

MRKD's image-level masking (ILM) feeds the student path an image in which
patches of the same image were hard-pasted elsewhere (no Poisson blending, no
resizing), following the natural-synthetic-anomalies (NSA) code that the
published MRKD training calls (yuxin-jiang/MRKD ``self_sup_tasks.patch_ex``
with ``same=True, mode='swap', resize=False, shift=True, gamma_params=(2,
0.05, 0.03)``) and its per-category settings (docs/METHODS.md). Per image,
as that code does it:

- patches: the first is always attempted, each further one (up to the
  category's maximum) on an INDEPENDENT fair coin, so ``1 + (max - 1) / 2``
  attempts on average (2.5 for a maximum of 4); an attempt that finds no
  valid position is skipped and the next one is still tried;
- half-sizes in pixels, for height and width separately:
  ``floor(clip((0.03 + Gamma(shape 2, scale 0.05)) * side, lo, hi))`` with
  ``lo, hi = round(bound * side)`` the category's bounds (at least 1 here);
- source: a centre uniform in ``[lo, side - lo)``, the box ``centre +- half``
  CLIPPED to the image, so a patch that reaches over the border is cut there
  (smaller); the destination box has the (cut) source box's size, its centre
  uniform in ``[size // 2 + 1, side - size // 2 - 1)``, so it lies inside the
  image (never on the outermost row / column);
- with an object constraint (categories with a ``background``): a pixel is
  object where ``|mean(RGB) * 255 - level| > tolerance``, majority-filtered
  7x7 (the median of a binary mask, edges replicated), computed once on the
  original image. The source box must be MORE than ``min_object`` object; the
  destination must satisfy ``|O_src & O_dst| / |O_src| > min_overlap``, with
  O_src the source box's object mask and O_dst the object mask under the
  destination box (the overlap of the two object masks over the source
  object). Each position is retried: up to ``tries`` attempts, the reference
  counting its 200th as a failure even when valid, so the first valid one of
  ``tries - 1`` candidates is used, else that patch is skipped. Only the pixels
  of ``O_src | O_dst`` inside the destination box are pasted (without a
  constraint: the whole box);
- pasted pixels are always taken from the ORIGINAL image (the reference's
  ``ima_src`` copy), also where an earlier patch already changed the image.

Static shapes throughout, so it runs inside a jitted loss: candidate source
boxes are checked at once with an integral image; destination candidates in
chunks of ``chunk`` inside a ``lax.while_loop`` that stops at the first chunk
holding a valid one, each overlap a masked window of the static maximal
patch size; the paste is one gather.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from kdjax import ops

# gamma_params of the published MRKD training: (shape, scale, left offset)
GAMMA_SHAPE, GAMMA_SCALE, GAMMA_OFFSET = 2.0, 0.05, 0.03
# patch_ex's defaults, used when a background is given without the fractions
DEFAULT_MIN_FRACTION = 0.25


@dataclasses.dataclass(frozen=True)
class NSAParams:
    height_bounds: Tuple[float, float] = (0.03, 0.4)  # half-size bounds, fraction of the height
    width_bounds: Tuple[float, float] = (0.03, 0.4)
    max_patches: int = 3
    min_object: Optional[float] = None  # None with a background: 0.25 (patch_ex's default)
    min_overlap: Optional[float] = None
    background: Optional[Tuple[float, float]] = None  # (grey level, tolerance); None: no constraint
    tries: int = 200  # the reference's attempt limit (its last attempt counts as a failure)
    chunk: int = 16  # destination candidates checked per while-loop step (speed only)


def _p(h, w, n, obj=None, ovl=None, bg=None):
    return NSAParams(h, w, n, obj, ovl, bg)


# Per-category settings of the published MRKD training (docs/METHODS.md table).
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


def pixel_bounds(bounds: Tuple[float, float], side: int) -> Tuple[int, int]:
    """The reference's ``(bound * side).round()`` (half to even) for (lo, hi), hi >= lo."""
    lo = int(np.round(float(bounds[0]) * side))
    hi = int(np.round(float(bounds[1]) * side))
    return lo, max(hi, lo)


def _integral(mask):
    """Summed-area table with a zero first row/column: (H+1, W+1)."""
    s = jnp.cumsum(jnp.cumsum(mask.astype(jnp.int32), axis=0), axis=1)
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
    return count > 24


def _half_size(key, side, lo, hi):
    g = jax.random.gamma(key, GAMMA_SHAPE)
    frac = GAMMA_OFFSET + GAMMA_SCALE * g
    half = jnp.floor(jnp.clip(frac * side, lo, hi)).astype(jnp.int32)
    return jnp.maximum(half, 1)  # lo = 0 only for tiny images; an empty patch would be a no-op


def _one_patch(key, image, obj, ii, params: NSAParams, constrained: bool):
    """One patch attempt: (pasted image, found, info) with sources from ``image``."""
    h, w = image.shape[:2]
    k_h, k_w, k_sy, k_sx, k_dy, k_dx = jax.random.split(key, 6)
    lo_h, hi_h = pixel_bounds(params.height_bounds, h)
    lo_w, hi_w = pixel_bounds(params.width_bounds, w)
    half_h = _half_size(k_h, h, lo_h, hi_h)
    half_w = _half_size(k_w, w, lo_w, hi_w)
    n = max(int(params.tries) - 1, 1) if constrained else 1
    # source: centre in [lo, side - lo), box clipped to the image
    cy = jax.random.randint(k_sy, (n,), lo_h, max(h - lo_h, lo_h + 1))
    cx = jax.random.randint(k_sx, (n,), lo_w, max(w - lo_w, lo_w + 1))
    y0s, y1s = jnp.clip(cy - half_h, 0, h), jnp.clip(cy + half_h, 0, h)
    x0s, x1s = jnp.clip(cx - half_w, 0, w), jnp.clip(cx + half_w, 0, w)
    if constrained:
        min_object = DEFAULT_MIN_FRACTION if params.min_object is None else params.min_object
        src_obj = _box_sum(ii, y0s, x0s, y1s - y0s, x1s - x0s)
        area = ((y1s - y0s) * (x1s - x0s)).astype(jnp.float32)
        ok = (src_obj.astype(jnp.float32) / jnp.maximum(area, 1.0) > min_object) \
            & (int(params.tries) > 1)
        i = jnp.argmax(ok)
        src_found = ok[i]
    else:
        i = 0
        src_found = jnp.array(True)
    y0, y1, x0, x1 = y0s[i], y1s[i], x0s[i], x1s[i]
    ph, pw = y1 - y0, x1 - x0
    # destination: same size, centre in [size // 2 + 1, side - size // 2 - 1)
    m = n
    dcy = jax.random.randint(k_dy, (m,), ph // 2 + 1, h - ph // 2 - 1)
    dcx = jax.random.randint(k_dx, (m,), pw // 2 + 1, w - pw // 2 - 1)
    dy0s = jnp.clip(dcy - ph // 2, 0, h - ph)
    dx0s = jnp.clip(dcx - pw // 2, 0, w - pw)
    if constrained:
        min_overlap = DEFAULT_MIN_FRACTION if params.min_overlap is None else params.min_overlap
        big_h, big_w = 2 * max(hi_h, 1), 2 * max(hi_w, 1)  # static maximal patch size
        objp = jnp.pad(obj, ((0, big_h), (0, big_w)))
        inside = ((jnp.arange(big_h)[:, None] < ph) & (jnp.arange(big_w)[None, :] < pw))
        s_win = jax.lax.dynamic_slice(objp, (y0, x0), (big_h, big_w)) & inside
        s_count = jnp.maximum(jnp.sum(s_win.astype(jnp.int32)), 1).astype(jnp.float32)
        c = max(1, min(int(params.chunk), m))
        n_chunks = -(-m // c)
        pad = n_chunks * c - m
        dys = jnp.pad(dy0s, (0, pad)).reshape(n_chunks, c)
        dxs = jnp.pad(dx0s, (0, pad)).reshape(n_chunks, c)
        valid = (jnp.arange(n_chunks * c) < m).reshape(n_chunks, c)

        def overlap(dy, dx):
            d_win = jax.lax.dynamic_slice(objp, (dy, dx), (big_h, big_w))
            return jnp.sum((d_win & s_win).astype(jnp.int32))

        def cond(carry):
            j, found, _ = carry
            return (j < n_chunks) & ~found

        def body(carry):
            j, _, _ = carry
            ov = jax.vmap(overlap)(dys[j], dxs[j]).astype(jnp.float32)
            ok = (ov / s_count > min_overlap) & valid[j]
            k = jnp.argmax(ok)
            return j + 1, ok[k], (j * c + k).astype(jnp.int32)

        start = jnp.where(src_found, 0, n_chunks).astype(jnp.int32)
        _, dst_found, d = jax.lax.while_loop(
            cond, body, (start, jnp.array(False), jnp.zeros((), jnp.int32)))
        d = jnp.minimum(d, m - 1)
    else:
        d = 0
        dst_found = jnp.array(True)
    dy0, dx0 = dy0s[d], dx0s[d]
    found = src_found & dst_found
    # paste: destination pixel (y, x) <- original pixel (y - dy0 + y0, x - dx0 + x0)
    ys, xs = jnp.arange(h), jnp.arange(w)
    in_box = (((ys >= dy0) & (ys < dy0 + ph))[:, None]
              & ((xs >= dx0) & (xs < dx0 + pw))[None, :])
    src_y = jnp.clip(ys - dy0 + y0, 0, h - 1)[:, None]
    src_x = jnp.clip(xs - dx0 + x0, 0, w - 1)[None, :]
    paste = in_box & found
    if constrained:
        paste = paste & (obj[src_y, src_x] | obj)
    info = {"found": found, "src_box": jnp.stack([y0, y1, x0, x1]),
            "dst_box": jnp.stack([dy0, dy0 + ph, dx0, dx0 + pw]),
            "half": jnp.stack([half_h, half_w]), "paste": paste}
    return image[src_y, src_x], paste, info


def nsa_swap_with_info(key, image, params: NSAParams):
    """``nsa_swap`` plus what happened, per patch attempt p < max_patches:
    ``attempted`` (p == 0 or its coin), ``applied`` (attempted and a valid
    position found), ``src_box`` / ``dst_box`` (y0, y1, x0, x1; end exclusive),
    ``half`` (the drawn half-sizes before the cut at the border), ``paste``
    (H, W) (the pixels that patch wrote) and ``object`` (H, W), the object mask
    (all True without a constraint)."""
    h, w = image.shape[:2]
    constrained = params.background is not None
    if constrained:
        level, tol = params.background
        obj = object_mask(ops.denormalize_images(image), level, tol)
    else:
        obj = jnp.ones((h, w), bool)
    ii = _integral(obj)
    out = image
    infos = []
    for p in range(params.max_patches):
        key, k_coin, k_patch = jax.random.split(key, 3)
        attempted = jnp.array(True) if p == 0 else jax.random.bernoulli(k_coin, 0.5)
        moved, paste, info = _one_patch(k_patch, image, obj, ii, params, constrained)
        paste = paste & attempted
        out = jnp.where(paste[..., None], moved, out)
        found = info.pop("found")
        infos.append(dict(info, attempted=attempted, applied=found & attempted, paste=paste))
    stacked: Dict[str, jax.Array] = {k: jnp.stack([i[k] for i in infos]) for k in infos[0]}
    stacked["object"] = obj
    return out, stacked


def nsa_swap(key, image, params: NSAParams):
    """One NSA 'swap' image from ``image`` (H, W, C, any normalization)."""
    return nsa_swap_with_info(key, image, params)[0]


def nsa_batch(key, images, params: NSAParams):
    """NSA swap for every image of a batch (N, H, W, C), independent keys."""
    keys = jax.random.split(key, images.shape[0])
    return jax.vmap(lambda k, x: nsa_swap(k, x, params))(keys, images)
