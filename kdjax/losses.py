"""Loss functions shared by the methods (pure functions of arrays)."""

from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

_EPS = 1e-8  # torch.nn.functional.cosine_similarity's eps
MARGIN_MODES = ("absolute", "relative")  # DFSC margin: the gap (see dfsc_margin_loss)
MARGIN_TARGETS = ("student", "autoencoder")  # DFSC margin: what the hinge keeps away


_TINY = 1e-30  # below any norm that matters (the norms are clamped at _EPS)


def _norm(x: jax.Array, axis: int, keepdims: bool = False) -> jax.Array:
    """The L2 norm along ``axis`` with a finite gradient at a zero vector (sqrt's is
    infinite there, and 0 * inf gave NaN gradients for an all-zero feature vector, e.g.
    a position a ReLU zeroed entirely); the same value wherever the callers' clamp at
    _EPS does not already apply."""
    return jnp.sqrt(jnp.maximum(jnp.sum(x * x, axis=axis, keepdims=keepdims), _TINY))


def cosine_distance_map(t: jax.Array, s: jax.Array) -> jax.Array:
    """Per-pixel 1 - cos(T[n,h,w,:], S[n,h,w,:]) of NHWC maps -> (N, H, W)."""
    t = t.astype(jnp.float32)
    s = s.astype(jnp.float32)
    dot = jnp.sum(t * s, axis=-1)
    nt = _norm(t, -1)
    ns = _norm(s, -1)
    return 1.0 - dot / jnp.maximum(nt * ns, _EPS)


def flat_cosine_loss(teacher: Sequence[jax.Array], student: Sequence[jax.Array]) -> jax.Array:
    """RD4AD's training loss: per sample 1 - cos(vec T, vec S) over the whole
    HxWxC map, averaged over the batch, summed over the scales."""
    total = 0.0
    for t, s in zip(teacher, student):
        t = t.reshape(t.shape[0], -1).astype(jnp.float32)
        s = s.reshape(s.shape[0], -1).astype(jnp.float32)
        dot = jnp.sum(t * s, axis=-1)
        norm = _norm(t, -1) * _norm(s, -1)
        total = total + jnp.mean(1.0 - dot / jnp.maximum(norm, _EPS))
    return total


def kth_largest(x: jax.Array, ks) -> jax.Array:
    """Exact k-th largest values (k 1-based, one per entry of ``ks``) of the
    float32 array ``x`` (flattened), without sorting: 32 bisection steps on
    the order-preserving uint32 image of the floats, each one counting pass.
    On the CPU this is faster than the sort behind jnp.quantile
    (docs/BENCHMARKS.md, "CPU kernels")."""
    u = jax.lax.bitcast_convert_type(x.reshape(-1).astype(jnp.float32), jnp.uint32)
    s = jnp.where((u >> 31) == 1, ~u, u | jnp.uint32(0x80000000))
    ks = jnp.asarray(ks, jnp.int32)
    lo = jnp.zeros(ks.shape, jnp.uint32)
    hi = jnp.full(ks.shape, 0xFFFFFFFF, jnp.uint32)

    def body(_, carry):  # invariant: count(s >= lo) >= k > count(s > hi)
        lo, hi = carry
        d = hi - lo
        mid = lo + (d >> 1) + (d & 1)
        ok = jnp.sum((s[None, :] >= mid[:, None]).astype(jnp.int32), axis=1) >= ks
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid - 1)

    lo, _ = jax.lax.fori_loop(0, 32, body, (lo, hi))
    bits = jnp.where((lo >> 31) == 1, lo & jnp.uint32(0x7FFFFFFF), ~lo)
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


def hard_feature_loss(distance: jax.Array, quantile: float = 0.999) -> jax.Array:
    """EfficientAD's hard loss: the mean of the distances >= their ``quantile``
    (linear interpolation computed in float32 as torch.quantile / jnp.quantile do),
    with the two order statistics found by :func:`kth_largest` instead of a full
    sort. NaN in, NaN out (so divergence is still caught)."""
    d = distance.reshape(-1).astype(jnp.float32)
    n = d.shape[0]
    pos = np.float32(np.float32(quantile) * np.float32(n - 1))
    lo = int(min(max(np.floor(pos), 0), n - 1))
    hi = int(min(max(np.ceil(pos), 0), n - 1))
    w_hi = np.float32(pos - np.float32(lo))
    w_lo = np.float32(1.0) - w_hi
    v = kth_largest(jax.lax.stop_gradient(d), [n - lo, n - hi])  # ascending a[lo], a[hi]
    q = v[0] * w_lo + v[1] * w_hi
    keep = d >= q
    out = jnp.sum(jnp.where(keep, d, 0.0)) / jnp.maximum(jnp.sum(keep), 1)
    return jnp.where(jnp.any(jnp.isnan(d)), jnp.nan, out)



def dfsc_margin_loss(teacher: jax.Array, ae: jax.Array, student_ae: Optional[jax.Array],
                     margin: float, quantile: float, mode: str = "absolute",
                     with_active: bool = False, target: str = "student"):
    """DFSC margin (see the module docstring, and docs/METHODS.md "DFSC margin").

    ``teacher`` (normalized T), ``ae`` (A) and ``student_ae`` (S[384:]) are
    (N, H, W, C) maps of the augmented image. Distinctive positions: those
    whose channel-mean ``d_ta = (T - A)^2`` is strictly above its ``quantile``
    over the batch (linear interpolation, as torch.quantile). On them the loss
    is the mean of ``relu(gap - d)``, 0 if there is none, with ``d`` the
    channel-mean squared distance to the teacher of:

    * ``target="student"``: the student's global branch, ``d = (S_ae - T)^2``;
      the gradient reaches only ``student_ae``;
    * ``target="autoencoder"``: the autoencoder itself, ``d = (T - A)^2``
      (``student_ae`` is not used and may be None); the gradient reaches only
      ``ae``.

    ``mode`` sets the gap: "absolute", ``gap = margin`` (the distance scale of
    normalized teacher features); "relative", ``gap = margin * d_ta`` at that
    position. The teacher, the selection and the gap carry no gradient.
    ``with_active`` also returns the fraction of distinctive positions whose
    hinge is active.
    """
    if mode not in MARGIN_MODES:
        raise ValueError(f"DFSC margin mode {mode!r}: use one of {MARGIN_MODES}.")
    if target not in MARGIN_TARGETS:
        raise ValueError(f"DFSC margin target {target!r}: use one of {MARGIN_TARGETS}.")
    t = jax.lax.stop_gradient(teacher.astype(jnp.float32))
    a = ae.astype(jnp.float32)
    d_ta = jnp.mean((t - jax.lax.stop_gradient(a)) ** 2, axis=-1)
    threshold = jnp.quantile(d_ta.reshape(-1), quantile)
    selected = d_ta > threshold
    if target == "student":
        d = jnp.mean((student_ae.astype(jnp.float32) - t) ** 2, axis=-1)
    else:
        d = jnp.mean((t - a) ** 2, axis=-1)  # same value as d_ta, with A's gradient
    gap = margin * d_ta if mode == "relative" else margin
    hinge = jax.nn.relu(gap - d)
    count = jnp.maximum(jnp.sum(selected), 1).astype(jnp.float32)
    loss = jnp.sum(jnp.where(selected, hinge, 0.0)) / count
    if not with_active:
        return loss
    return loss, jnp.sum(selected & (hinge > 0)) / count


# --- Contextual affinity (CAD / DSKD; docs/METHODS.md, "CAD") --------------------
#
# The affinity of a feature map F with P = H*W positions and C channels is the
# P x P matrix A = Fn Fn^T, Fn the per-position L2-normalized features: the
# cosine similarity of every pair of positions of one image. At 64x64 that is
# 16.7M entries per image, so the training path never builds it: it walks over
# blocks of query rows (``lax.map`` of a ``jax.checkpoint``-ed block function,
# so the backward pass recomputes each block instead of storing all of them)
# and keeps only per-row sums. The ``*_direct`` functions build the matrices;
# they are the reference the chunked path is tested against.

_AFFINITY_DISTANCES = ("l1", "l2")
_PRECISIONS = {"default": None, "high": jax.lax.Precision.HIGH,
               "highest": jax.lax.Precision.HIGHEST}
PRECISIONS = tuple(_PRECISIONS)  # the names affinity_precision accepts


def _positions(f: jax.Array) -> jax.Array:
    """NHWC -> (N, HW, C) float32; (N, P, C) passes through."""
    if f.ndim == 4:
        f = f.reshape(f.shape[0], f.shape[1] * f.shape[2], f.shape[3])
    elif f.ndim != 3:
        raise ValueError(f"affinity: expected features (N, H, W, C) or (N, P, C), got shape {f.shape}.")
    return f.astype(jnp.float32)


def _check_pair(t: jax.Array, s: jax.Array) -> None:
    if t.shape[:-1] != s.shape[:-1]:
        raise ValueError(
            f"affinity: teacher and student features must have the same positions, got "
            f"{t.shape} and {s.shape} (channel counts may differ).")


def _distance(d: jax.Array, distance: str) -> jax.Array:
    if distance == "l1":
        return jnp.abs(d)
    if distance == "l2":
        return d * d
    raise ValueError(f"affinity distance {distance!r} is not known: use 'l1' or 'l2'.")


def _precision(precision):
    if precision is None or not isinstance(precision, str):
        return precision
    if precision not in _PRECISIONS:
        raise ValueError(f"affinity precision {precision!r}: use one of {', '.join(_PRECISIONS)}.")
    return _PRECISIONS[precision]


def normalize_positions(f: jax.Array) -> jax.Array:
    """Per-position L2 normalization along channels of (N, P, C) or NHWC
    (a zero vector stays zero; the norm is clamped at 1e-8 as in cosine_distance_map)."""
    f = f.astype(jnp.float32)
    n = _norm(f, -1, keepdims=True)
    return f / jnp.maximum(n, _EPS)


def affinity_matrix(f: jax.Array, precision=None) -> jax.Array:
    """A = Fn Fn^T of features (N, H, W, C) or (N, P, C) -> (N, P, P). Materializes A."""
    fn = normalize_positions(_positions(f))
    return jnp.einsum("npc,nqc->npq", fn, fn, precision=_precision(precision))


def affinity_loss_direct(t: jax.Array, s: jax.Array, distance: str = "l1",
                         precision=None) -> jax.Array:
    """Mean over all N*P*P entries of |A_t - A_s| ("l1") or (A_t - A_s)^2 ("l2").

    Reference implementation that builds both matrices; use ``affinity_loss``.
    """
    t, s = _positions(t), _positions(s)
    _check_pair(t, s)
    return jnp.mean(_distance(affinity_matrix(t, precision) - affinity_matrix(s, precision),
                              distance))


def affinity_discrepancy_map_direct(t: jax.Array, s: jax.Array, distance: str = "l1",
                                    precision=None) -> jax.Array:
    """D[n, p] = mean over q != p of dist(A_t[p, q] - A_s[p, q]).

    The diagonal q == p is excluded (it is 1 - 1 = 0 for non-zero features, so
    including it would only scale D by (P - 1) / P). Returns (N, H, W) for NHWC
    input, (N, P) for (N, P, C) input. Reference implementation (materializes A).
    """
    shape = t.shape[:-1]
    t, s = _positions(t), _positions(s)
    _check_pair(t, s)
    e = _distance(affinity_matrix(t, precision) - affinity_matrix(s, precision), distance)
    p = e.shape[-1]
    e = e * (1.0 - jnp.eye(p, dtype=e.dtype))
    return (jnp.sum(e, axis=-1) / max(p - 1, 1)).reshape(shape)


def affinity_row_sums(t: jax.Array, s: jax.Array, distance: str = "l1", block: int = 512,
                      precision=None) -> jax.Array:
    """R[n, p] = sum over ALL q (diagonal included) of dist(A_t[p, q] - A_s[p, q]).

    Never builds the P x P matrices: query rows are processed ``block`` at a
    time (the last block is zero-padded; a zero row has zero affinity in both
    maps, so padding adds nothing and is sliced off). Peak memory is about
    2 * N * block * P floats plus the features; under ``jax.grad`` each block
    is recomputed in the backward pass (``jax.checkpoint``), so memory does not
    grow with the number of blocks. Returns (N, P) float32.
    """
    t, s = _positions(t), _positions(s)
    _check_pair(t, s)
    if block < 1:
        raise ValueError(f"affinity block size must be >= 1, got {block}.")
    prec = _precision(precision)
    tn, sn = normalize_positions(t), normalize_positions(s)
    n, p, _ = tn.shape

    def rows(tq, sq):  # query blocks (N, b, C) -> (N, b) row sums
        at = jnp.einsum("nbc,nqc->nbq", tq, tn, precision=prec)
        as_ = jnp.einsum("nbc,nqc->nbq", sq, sn, precision=prec)
        return jnp.sum(_distance(at - as_, distance), axis=-1)

    if block >= p:
        return rows(tn, sn)
    nb = -(-p // block)
    pad = nb * block - p

    def blocks(x):  # (N, P, C) -> (nb, N, block, C)
        x = jnp.pad(x, ((0, 0), (0, pad), (0, 0)))
        return jnp.moveaxis(x.reshape(n, nb, block, x.shape[-1]), 1, 0)

    step = jax.checkpoint(lambda xs: rows(*xs))
    out = jax.lax.map(step, (blocks(tn), blocks(sn)))  # (nb, N, block)
    return jnp.moveaxis(out, 0, 1).reshape(n, nb * block)[:, :p]


def affinity_loss(t: jax.Array, s: jax.Array, distance: str = "l1", block: int = 512,
                  precision=None) -> jax.Array:
    """Contextual affinity loss of one scale, chunked: equals ``affinity_loss_direct``."""
    r = affinity_row_sums(t, s, distance, block, precision)
    return jnp.sum(r) / (r.shape[0] * r.shape[1] * r.shape[1])


def affinity_discrepancy_map(t: jax.Array, s: jax.Array, distance: str = "l1", block: int = 512,
                             precision=None) -> jax.Array:
    """Per-position affinity discrepancy, chunked: equals ``affinity_discrepancy_map_direct``
    (mean over q != p; the diagonal term is computed exactly and subtracted)."""
    shape = t.shape[:-1]
    r = affinity_row_sums(t, s, distance, block, precision)
    tn, sn = normalize_positions(_positions(t)), normalize_positions(_positions(s))
    diag = _distance(jnp.sum(tn * tn, -1) - jnp.sum(sn * sn, -1), distance)
    p = r.shape[-1]
    return ((r - diag) / max(p - 1, 1)).reshape(shape)


def contextual_affinity_loss(teacher: Sequence[jax.Array], student: Sequence[jax.Array],
                             distance: str = "l1", block: int = 512, precision=None) -> jax.Array:
    """CAD's contextual affinity loss: ``affinity_loss`` summed over the scales."""
    total = 0.0
    for t, s in zip(teacher, student):
        total = total + affinity_loss(t, s, distance, block, precision)
    return total
