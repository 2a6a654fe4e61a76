"""Evaluation metrics on the host (numpy / scipy / scikit-learn).

Definitions follow docs/METRICS.md:

* ``image_auroc``, ``f1_max``: image level, image score = max of the map.
* ``pixel_auroc``: over all pixels of all images (exact Mann-Whitney statistic,
  ties counted one half; equal to ``sklearn.metrics.roc_auc_score``).
* ``au_pro``: the official MVTec AD dataset-level AU-PRO (8-connected
  components, FPR over every defect-free pixel of every image, PRO = mean over
  every component, trapezoid over FPR in [0, limit] interpolated at the
  limit, divided by the limit), computed EXACTLY over every distinct score.
* ``au_pro_per_image``: the RD4AD / MRKD code's variant (200 thresholds per
  image, FPR < 0.3 rescaled to [0, 1], averaged over anomalous images).
* ``au_spro``: MVTec LOCO AD's AU-sPRO (saturated per-region overlap), exact
  over every distinct score; the official tool's adaptive threshold sampling
  converges to this curve.

Exact curves: the scores are sorted once, and cumulative sums give the FPR
and (s)PRO after every distinct score, so there is no loop over thresholds.
All pixels with the same score cross a threshold together (ties). For the
exact curve it does not matter whether a pixel counts when ``map > t``
(LOCO's rule) or ``map >= t`` (MVTec AD's): both give the same family of
predicted sets {map >= v : v a distinct score} plus the empty set, hence the
same curve, from (0, 0) to (1, 1).

Undefined values (an evaluation set without an anomalous or without a good
image, no ground-truth region, ...) are returned as ``float('nan')`` with a
logged warning that says why; the report writes them as null.
"""

from __future__ import annotations

import logging
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage

log = logging.getLogger("kdjax.metrics")

SPRO_FPR_LIMITS = (0.01, 0.05, 0.1, 0.3, 1.0)
# 8-connectivity, as the official MVTec AD evaluation (scipy.ndimage.label with
# a 3x3 structure of ones) and skimage.measure.label's default for 2-D images.
_EIGHT = np.ones((3, 3), dtype=int)

NAN = float("nan")


# ---------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------

def _name(i: int, names: Optional[Sequence[str]]) -> str:
    if names is not None and i < len(names):
        return f"image {i} ({names[i]})"
    return f"image {i}"


def as_map_list(maps, what: str = "maps") -> List[np.ndarray]:
    """(N, H, W) array or a sequence of (H_i, W_i) arrays -> list of 2-D arrays."""
    if isinstance(maps, np.ndarray):
        if maps.ndim == 2:
            raise ValueError(f"{what} has shape {maps.shape}: expected (N, H, W) for N images; "
                             f"for one image use {what}[None].")
        if maps.ndim == 4 and maps.shape[1] == 1:
            maps = maps[:, 0]
        if maps.ndim != 3:
            raise ValueError(f"{what} has shape {maps.shape}: expected (N, H, W).")
        return list(maps)
    out = [np.asarray(m) for m in maps]
    for i, m in enumerate(out):
        if m.ndim == 3 and m.shape[0] == 1:
            out[i] = m = m[0]
        if m.ndim != 2:
            raise ValueError(f"{what}[{i}] has shape {m.shape}: expected a 2-D (H, W) map.")
    return out


def check_finite(maps: List[np.ndarray], names: Optional[Sequence[str]] = None) -> None:
    """Raise a clear error naming the first map with a NaN or an infinity."""
    for i, m in enumerate(maps):
        if not np.isfinite(m).all():
            bad = "NaN" if np.isnan(m).any() else "inf"
            raise ValueError(
                f"The anomaly map of {_name(i, names)} contains {bad} values; metrics need "
                "finite maps. Check the model (a diverged student or a division by zero in "
                "the map normalization) before evaluating.")


def check_same_shapes(masks: List[np.ndarray], maps: List[np.ndarray],
                      names: Optional[Sequence[str]] = None) -> None:
    if len(masks) != len(maps):
        raise ValueError(f"Got {len(maps)} anomaly maps but {len(masks)} ground-truth masks; "
                         "there must be one mask per map, in the same order.")
    for i, (a, m) in enumerate(zip(masks, maps)):
        if a.shape != m.shape:
            raise ValueError(
                f"Ground-truth mask shape {a.shape} differs from anomaly map shape {m.shape} "
                f"for {_name(i, names)}; resize the maps (kdjax.evaluate.resize_maps) or "
                "load the masks at the maps' resolution.")


def binarize_mask(mask: np.ndarray, index: int = 0) -> np.ndarray:
    """Ground-truth mask -> bool (True = defect pixel).

    bool: unchanged. Integer (any width, e.g. 0/255 uint8 PNG masks or 0/1
    labels): non-zero = defect. Float: values in [0, 1] (a bilinearly resized
    mask) binarized at 0.5, RD4AD's ``gt > 0.5``; a float mask with values above
    1 is refused, since it is ambiguous (a 0/255 mask converted to float, or a
    resized one?): pass it as an integer array or divide it by 255.
    """
    mask = np.asarray(mask)
    if mask.dtype == bool:
        return mask
    if np.issubdtype(mask.dtype, np.integer):
        return mask != 0
    if mask.size and np.nanmax(mask) > 1:
        raise ValueError(
            f"Ground-truth mask {index} is a float mask with values up to {np.nanmax(mask)}: "
            "float masks must lie in [0, 1] (binarized at 0.5). Pass 8-bit PNG masks as "
            "integers (non-zero = defect) or divide them by 255.")
    return mask > 0.5


def _check_labels_scores(labels, scores) -> Tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels).astype(int).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if labels.shape != scores.shape:
        raise ValueError(f"Got {labels.size} labels but {scores.size} scores; they must match.")
    if not np.isfinite(scores).all():
        i = int(np.flatnonzero(~np.isfinite(scores))[0])
        raise ValueError(f"Image score {i} is {scores[i]}; scores must be finite.")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError("Labels must be 0 (good) or 1 (anomalous).")
    return labels, scores


def _both_classes(labels: np.ndarray, what: str) -> bool:
    n_pos = int((labels == 1).sum())
    n_neg = int((labels == 0).sum())
    if n_pos == 0 or n_neg == 0:
        missing = "anomalous" if n_pos == 0 else "good"
        log.warning("%s is undefined (NaN): the evaluation set has no %s image "
                    "(%d good, %d anomalous).", what, missing, n_neg, n_pos)
        return False
    return True


# ---------------------------------------------------------------------------
# Image level
# ---------------------------------------------------------------------------

def image_scores(maps) -> np.ndarray:
    """Image score = max of each anomaly map (docs/METRICS.md)."""
    return np.array([float(np.max(m)) for m in as_map_list(maps)], dtype=np.float64)


def image_auroc(labels, scores) -> float:
    """sklearn ``roc_auc_score(labels, scores)``; NaN (with a warning) without both classes."""
    from sklearn.metrics import roc_auc_score

    labels, scores = _check_labels_scores(labels, scores)
    if not _both_classes(labels, "Image AUROC"):
        return NAN
    return float(roc_auc_score(labels, scores))


def f1_max(labels, scores) -> float:
    """Best F1 over all thresholds of the precision-recall curve (NaN without anomalies)."""
    from sklearn.metrics import precision_recall_curve

    labels, scores = _check_labels_scores(labels, scores)
    if int(labels.sum()) == 0:
        log.warning("F1-max is undefined (NaN): the evaluation set has no anomalous image.")
        return NAN
    precision, recall, _ = precision_recall_curve(labels, scores)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(denom), where=denom > 0)
    return float(f1.max())


# ---------------------------------------------------------------------------
# Exact curves
# ---------------------------------------------------------------------------

def _exact_curve(ok_sorted: np.ndarray, entry_values: np.ndarray,
                 entry_weights: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Exact (FPR, overlap) curve over every distinct score, ascending in FPR.

    ok_sorted: scores of all defect-free pixels, sorted ascending.
    entry_values / entry_weights: one entry per (region, pixel) pair; the
    weight is what the overlap measure gains when that pixel becomes predicted
    (1/|C|/n_components for PRO, the saturated increment for sPRO), so the
    overlap after predicting every pixel with score >= v is the sum of the
    weights of the entries >= v.

    The overlap only changes at entry scores. With e_1 > ... > e_L the distinct
    entry scores, the curve is (0, 0), then for each l the two points
    (FPR(> e_l), G(> e_l)) and (FPR(>= e_l), G(>= e_l)) (the segment between
    them is the tie group at e_l crossing together), then (1, G(all)).
    Between e_{l+1} and e_l only defect-free pixels cross, on a horizontal
    line, so the defect-free scores in between add collinear points only and
    are left out: no area changes, and memory stays O(#region pixels).
    """
    n_ok = ok_sorted.size
    ev = np.asarray(entry_values)
    ew = np.asarray(entry_weights, dtype=np.float64)
    order = np.argsort(ev, kind="stable")[::-1]  # descending scores
    ev = ev[order]
    cw = np.cumsum(ew[order])
    # tie groups of equal entry scores
    start = np.empty(ev.size, dtype=bool)
    start[0] = True
    np.not_equal(ev[1:], ev[:-1], out=start[1:])
    first = np.flatnonzero(start)
    last = np.append(first[1:], ev.size) - 1
    e = ev[first]
    g_ge = cw[last]
    g_gt = np.where(first > 0, cw[first - 1], 0.0)
    fp_gt = n_ok - np.searchsorted(ok_sorted, e, side="right")
    fp_ge = n_ok - np.searchsorted(ok_sorted, e, side="left")
    n = e.size
    x = np.empty(2 * n + 2)
    y = np.empty(2 * n + 2)
    x[0], y[0] = 0.0, 0.0
    x[1:-1:2], y[1:-1:2] = fp_gt / n_ok, g_gt
    x[2:-1:2], y[2:-1:2] = fp_ge / n_ok, g_ge
    x[-1], y[-1] = 1.0, cw[-1]
    np.clip(y, 0.0, 1.0, out=y)
    return x, y


def area_under_curve(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoid area of the curve (x ascending) over [0, x_max], interpolated at x_max.

    Same rule as the official MVTec AD / LOCO ``trapezoid``/``trapz``: points with
    x <= x_max, plus a linear interpolation between the two points around x_max.
    """
    return areas_under_curve(x, y, (x_max,))[0]


def areas_under_curve(x: np.ndarray, y: np.ndarray, x_maxs: Sequence[float]) -> List[float]:
    """``area_under_curve`` for several limits, summing the trapezoids only once."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    cum = np.concatenate([[0.0], np.cumsum(0.5 * (y[1:] + y[:-1]) * (x[1:] - x[:-1]))])
    out = []
    for x_max in x_maxs:
        n = int(np.searchsorted(x, x_max, side="right"))  # points with x <= x_max
        area = float(cum[n - 1])
        if n < x.size and x[n - 1] != x_max:
            x0, y0, x1, y1 = x[n - 1], y[n - 1], x[n], y[n]
            y_at = y0 + (y1 - y0) * (x_max - x0) / (x1 - x0)
            area += 0.5 * (y_at + y0) * (x_max - x0)
        out.append(area)
    return out


def _check_limit(limit: float) -> float:
    limit = float(limit)
    if not 0.0 < limit <= 1.0:
        raise ValueError(f"FPR limit {limit} must lie in (0, 1].")
    return limit


# ---------------------------------------------------------------------------
# MVTec AD pixel level
# ---------------------------------------------------------------------------

def _components(masks: List[np.ndarray], maps: List[np.ndarray]):
    """Defect-free scores, (component pixel scores, PRO weights), number of components."""
    ok, vals, wts = [], [], []
    n_comp = 0
    for m, a in zip(masks, maps):
        if not m.any():
            ok.append(a.ravel())
            continue
        lab, n = ndimage.label(m, structure=_EIGHT)
        ok.append(a[lab == 0])
        sel = lab > 0
        ids = lab[sel]
        sizes = np.bincount(ids, minlength=n + 1)
        vals.append(a[sel])
        wts.append(1.0 / sizes[ids])
        n_comp += n
    ok_values = np.concatenate(ok) if ok else np.zeros(0)
    if n_comp:
        return ok_values, np.concatenate(vals), np.concatenate(wts) / n_comp, n_comp
    return ok_values, np.zeros(0), np.zeros(0), 0


def _prepare_pixel(masks, maps, names):
    maps = as_map_list(maps, "maps")
    masks = [binarize_mask(m, i) for i, m in enumerate(as_map_list(masks, "masks"))]
    check_same_shapes(masks, maps, names)
    check_finite(maps, names)
    return masks, maps


def _auroc_from_values(neg_sorted: np.ndarray, pos: np.ndarray) -> float:
    """P(pos > neg) + 0.5 P(pos == neg), the ROC AUC, from sorted negatives."""
    pos = np.sort(pos)
    less = np.searchsorted(neg_sorted, pos, side="left").astype(np.float64)
    le = np.searchsorted(neg_sorted, pos, side="right").astype(np.float64)
    return float((less.sum() + 0.5 * (le - less).sum()) / (pos.size * float(neg_sorted.size)))


def pixel_auroc(masks, maps, names: Optional[Sequence[str]] = None) -> float:
    """Pixel AUROC over all pixels of all images (masks: 0 = good pixel; any
    bool or integer mask, non-zero = defect, or float in [0, 1]: ``binarize_mask``)."""
    masks, maps = _prepare_pixel(masks, maps, names)
    pos = np.concatenate([a[m] for m, a in zip(masks, maps)])
    neg = np.concatenate([a[~m] for m, a in zip(masks, maps)])
    if pos.size == 0 or neg.size == 0:
        log.warning("Pixel AUROC is undefined (NaN): no %s pixel in the ground truth.",
                    "anomalous" if pos.size == 0 else "defect-free")
        return NAN
    return _auroc_from_values(np.sort(neg), pos)


def pro_curve(masks, maps, names: Optional[Sequence[str]] = None):
    """Exact dataset-level PRO curve (fpr, pro), ascending; None when undefined."""
    masks, maps = _prepare_pixel(masks, maps, names)
    ok, vals, wts, n_comp = _components(masks, maps)
    if n_comp == 0 or ok.size == 0:
        log.warning("AU-PRO is undefined (NaN): %s.", "no anomalous region in the ground truth"
                    if n_comp == 0 else "no defect-free pixel")
        return None
    ok.sort()
    return _exact_curve(ok, vals, wts)


def au_pro(masks, maps, fpr_limit: float = 0.3,
           names: Optional[Sequence[str]] = None) -> float:
    """Official MVTec AD AU-PRO (dataset level), exact over every distinct score.

    masks (N, H, W) with 0 = good pixel (bool; integer, non-zero = defect, e.g.
    0/255 PNG masks; float in [0, 1] binarized at 0.5: ``binarize_mask``);
    maps (N, H, W) float. Components: 8-connected (scipy.ndimage.label with a
    3x3 structure). FPR over all defect-free pixels of all images; PRO = mean
    over all components of the fraction with map >= t. Trapezoid over FPR in
    [0, fpr_limit] interpolated at the limit, divided by the limit.
    """
    limit = _check_limit(fpr_limit)
    curve = pro_curve(masks, maps, names)
    if curve is None:
        return NAN
    return area_under_curve(*curve, limit) / limit


def rd4ad_compute_pro(masks: np.ndarray, amaps: np.ndarray, num_th: int = 200) -> float:
    """The RD4AD code's ``compute_pro`` (hq-deng/RD4AD test.py), vectorized over thresholds.

    For th in ``np.arange(min, max, (max - min) / num_th)`` of the given maps:
    binary = map > th; PRO = mean over the regions of every mask (skimage
    ``measure.label`` default = 8-connectivity for 2-D, here scipy) of
    TP / region area; FPR = FP / #(mask == 0) over ALL the images passed.
    Keep the points with FPR < 0.3, divide FPR by its max, and return
    ``sklearn.metrics.auc(fpr, pro)``. Returns NaN (with a warning) where the
    reference code would fail (constant map, fewer than 2 points kept, no region).
    """
    from sklearn.metrics import auc

    amaps = np.asarray(amaps)
    masks = binarize_mask(masks)
    min_th, max_th = amaps.min(), amaps.max()
    if not max_th > min_th:
        log.warning("Per-image AU-PRO undefined (NaN) for a constant anomaly map.")
        return NAN
    delta = (max_th - min_th) / num_th
    ths = np.arange(min_th, max_th, delta)
    t = ths.size
    # Pixel p is predicted at threshold index i (map > ths[i]) iff i < kpix[p].
    kpix = np.searchsorted(ths, amaps, side="left")
    region_tp, areas = [], []
    for m, kp in zip(masks, kpix):
        lab, n = ndimage.label(m, structure=_EIGHT)
        if n == 0:
            continue
        sel = lab > 0
        cnt = np.bincount((lab[sel] - 1) * (t + 1) + kp[sel], minlength=n * (t + 1))
        cnt = cnt.reshape(n, t + 1)
        region_tp.append(np.cumsum(cnt[:, ::-1], axis=1)[:, ::-1][:, 1:])
        areas.append(np.bincount(lab[sel] - 1, minlength=n))
    neg = ~masks
    n_neg = int(neg.sum())
    if not region_tp or n_neg == 0:
        log.warning("Per-image AU-PRO undefined (NaN): the mask has %s.",
                    "no region" if not region_tp else "no defect-free pixel")
        return NAN
    tp = np.concatenate(region_tp, 0).astype(np.float64)
    area = np.concatenate(areas).astype(np.float64)
    pro = (tp / area[:, None]).mean(0)
    fcnt = np.bincount(kpix[neg], minlength=t + 1)
    fp = np.cumsum(fcnt[::-1])[::-1][1:]
    fpr = fp / n_neg
    keep = fpr < 0.3
    if keep.sum() < 2 or fpr[keep].max() == 0:
        log.warning("Per-image AU-PRO undefined (NaN): fewer than 2 thresholds with "
                    "0 < FPR < 0.3.")
        return NAN
    fpr_k = fpr[keep] / fpr[keep].max()
    return float(auc(fpr_k, pro[keep]))


def au_pro_per_image(masks, maps, labels=None, num_thresholds: int = 200,
                     names: Optional[Sequence[str]] = None) -> float:
    """AU-PRO as the RD4AD / MRKD evaluation code computes it (not the official one).

    Their ``evaluation`` calls ``compute_pro`` once per ANOMALOUS test image
    (label != 0) with that image alone, i.e. 200 thresholds between that map's
    min and max, FPR over that image's defect-free pixels, points with
    FPR < 0.3 kept and FPR rescaled to [0, 1], sklearn ``auc``; the result is
    the mean over those images. See ``rd4ad_compute_pro``. Anomalous images
    whose mask is empty at this resolution (the reference would crash) and
    images where the value is undefined are left out of the mean, with a warning.
    """
    masks, maps = _prepare_pixel(masks, maps, names)
    if labels is None:
        labels = [int(m.any()) for m in masks]
    labels = np.asarray(labels).astype(int).ravel()
    if labels.size != len(maps):
        raise ValueError(f"Got {labels.size} labels for {len(maps)} maps.")
    vals = []
    for i in np.flatnonzero(labels != 0):
        if not masks[i].any():
            log.warning("Per-image AU-PRO: %s is anomalous but its mask is empty at this "
                        "resolution; left out.", _name(int(i), names))
            continue
        v = rd4ad_compute_pro(masks[i][None], maps[i][None], num_thresholds)
        if v == v:
            vals.append(v)
    if not vals:
        log.warning("Per-image AU-PRO is undefined (NaN): no anomalous image with a region.")
        return NAN
    return float(np.mean(vals))


# ---------------------------------------------------------------------------
# MVTec LOCO AD: sPRO
# ---------------------------------------------------------------------------

def saturation_area(threshold: float, relative: bool, region_size: int) -> float:
    """s = int(thr * |R|) when relative, else min(thr, |R|) (docs/METRICS.md), at least 1 pixel."""
    s = float(int(threshold * region_size)) if relative else min(float(threshold), float(region_size))
    return max(s, 1.0)  # a region smaller than 1/thr pixels would otherwise divide by 0


def _spro_entries(maps: List[np.ndarray], regions: Sequence[Sequence], names):
    ok, vals, wts = [], [], []
    for i, (a, regs) in enumerate(zip(maps, regions)):
        if not regs:
            ok.append(a.ravel())
            continue
        union = np.zeros(a.shape, dtype=bool)
        for j, r in enumerate(regs):
            mask = np.asarray(r.mask).astype(bool)
            if mask.shape != a.shape:
                raise ValueError(
                    f"Region {j} of {_name(i, names)} has mask shape {mask.shape} but the "
                    f"anomaly map has shape {a.shape}; load the regions at the maps' resolution.")
            n = int(mask.sum())
            if n == 0:
                log.warning("sPRO: region %d of %s is empty at this resolution; left out.",
                            j, _name(i, names))
                continue
            union |= mask
            s = saturation_area(r.saturation_threshold, r.relative_saturation, n)
            v = np.sort(a[mask])[::-1]  # descending: the j-th pixel to cross a threshold
            rank = np.arange(1, n + 1, dtype=np.float64)
            inc = np.minimum(rank / s, 1.0) - np.minimum((rank - 1) / s, 1.0)
            keep = inc > 0  # past saturation nothing changes
            vals.append(v[keep])
            wts.append(inc[keep])
        ok.append(a[~union])
    ok_values = np.concatenate(ok) if ok else np.zeros(0)
    n_regions = len(vals)
    if n_regions:
        return ok_values, np.concatenate(vals), np.concatenate(wts) / n_regions, n_regions
    return ok_values, np.zeros(0), np.zeros(0), 0


def spro_curve(maps, regions, names: Optional[Sequence[str]] = None):
    """Exact sPRO curve (fpr, spro), ascending in FPR; None when undefined."""
    maps = as_map_list(maps, "maps")
    if len(regions) != len(maps):
        raise ValueError(f"Got {len(maps)} anomaly maps but {len(regions)} region lists; "
                         "there must be one list (possibly empty) per map.")
    check_finite(maps, names)
    ok, vals, wts, n_reg = _spro_entries(maps, regions, names)
    if n_reg == 0 or ok.size == 0:
        log.warning("AU-sPRO is undefined (NaN): %s.", "no ground-truth region in this set"
                    if n_reg == 0 else "no defect-free pixel")
        return None
    ok.sort()
    return _exact_curve(ok, vals, wts)


def au_spro(maps, regions, fpr_limits: Iterable[float] = SPRO_FPR_LIMITS,
            names: Optional[Sequence[str]] = None) -> Dict[float, float]:
    """MVTec LOCO AD AU-sPRO for each FPR limit, exact over every distinct score.

    maps: (N, H, W) or N 2-D maps. regions: one list per image of
    ``GTRegion(mask, saturation_threshold, relative_saturation)`` ([] for a
    good image). A pixel is predicted when map > t. sPRO of region R:
    min(TP / s, 1), s = min(thr, |R|) (absolute) or int(thr * |R|) (relative);
    sPRO(t) = mean over all regions; FPR over every defect-free pixel of all
    images (outside every region of its image). Returns {limit: trapezoid area
    over FPR in [0, limit] interpolated at the limit, divided by the limit}.
    """
    limits = [_check_limit(f) for f in fpr_limits]
    curve = spro_curve(maps, regions, names)
    if curve is None:
        return {f: NAN for f in limits}
    areas = areas_under_curve(*curve, limits)
    return {f: a / f for f, a in zip(limits, areas)}


# ---------------------------------------------------------------------------
# Per-dataset bundles
# ---------------------------------------------------------------------------

def mvtec_ad_metrics(maps, labels, masks, per_image_pro: bool = True,
                     names: Optional[Sequence[str]] = None,
                     curves: Optional[dict] = None) -> Dict[str, float]:
    """image_auroc, f1_max, pixel_auroc, au_pro (official) and au_pro_per_image (RD4AD).
    ``curves``: a dict that receives ``"pro"``: the exact PRO curve (fpr, pro)."""
    masks_l, maps_l = _prepare_pixel(masks, maps, names)
    labels = np.asarray(labels).astype(int).ravel()
    if labels.size != len(maps_l):
        raise ValueError(f"Got {labels.size} labels for {len(maps_l)} maps.")
    scores = image_scores(maps_l)
    out = {"image_auroc": image_auroc(labels, scores), "f1_max": f1_max(labels, scores)}
    ok, vals, wts, n_comp = _components(masks_l, maps_l)
    if n_comp == 0 or ok.size == 0:
        log.warning("Pixel AUROC and AU-PRO are undefined (NaN): %s.",
                    "no anomalous pixel in the ground truth" if n_comp == 0
                    else "no defect-free pixel")
        out["pixel_auroc"] = NAN
        out["au_pro"] = NAN
    else:
        ok.sort()
        out["pixel_auroc"] = _auroc_from_values(ok, vals)
        curve = _exact_curve(ok, vals, wts)
        out["au_pro"] = area_under_curve(*curve, 0.3) / 0.3
        if curves is not None:
            curves["pro"] = curve
    if per_image_pro:
        out["au_pro_per_image"] = au_pro_per_image(masks_l, maps_l, labels, names=names)
    return out


def spro_key(limit: float, subset: Optional[str] = None) -> str:
    """Metric name of docs/INTERFACE.md, e.g. ``au_spro_0.05_logical`` / ``au_spro_0.05``."""
    base = f"au_spro_{limit:g}" if limit != 1.0 else "au_spro_1.0"
    return f"{base}_{subset}" if subset else base


def loco_metrics(maps, labels, anomaly_kinds, regions,
                 names: Optional[Sequence[str]] = None,
                 fpr_limits: Iterable[float] = SPRO_FPR_LIMITS,
                 curves: Optional[dict] = None) -> Dict[str, float]:
    """MVTec LOCO AD metrics, per docs/METRICS.md.

    logical_auroc (good + logical images), structural_auroc (good + structural),
    image_auroc = their mean (as LOCO papers report it), image_auroc_all (all
    anomalous vs good), f1_max (all images), and au_spro_{f}_logical,
    au_spro_{f}_structural, au_spro_{f} (their mean) for every FPR limit f.
    anomaly_kinds: per image "logical" / "structural" / None (good). ``curves``: a
    dict that receives ``"spro_logical"`` / ``"spro_structural"``: the exact sPRO
    curves (fpr, spro) of au_spro.
    """
    maps_l = as_map_list(maps, "maps")
    n = len(maps_l)
    labels = np.asarray(labels).astype(int).ravel()
    kinds = list(anomaly_kinds)
    if labels.size != n or len(kinds) != n or len(regions) != n:
        raise ValueError(f"Got {n} maps, {labels.size} labels, {len(kinds)} anomaly kinds and "
                         f"{len(regions)} region lists; they must all match.")
    check_finite(maps_l, names)
    for i, (lab, k) in enumerate(zip(labels, kinds)):
        if lab == 0 and k not in (None, "", "good"):
            raise ValueError(f"{_name(i, names)} has label 0 (good) but anomaly kind {k!r}.")
        if lab == 1 and k not in ("logical", "structural"):
            raise ValueError(f"{_name(i, names)} is anomalous but its anomaly kind is {k!r}; "
                             "expected 'logical' or 'structural'.")
    limits = [_check_limit(f) for f in fpr_limits]
    scores = image_scores(maps_l)
    good = labels == 0
    out: Dict[str, float] = {}
    per_subset = {}
    for subset in ("logical", "structural"):
        sel = good | np.array([k == subset for k in kinds])
        idx = np.flatnonzero(sel)
        out[f"{subset}_auroc"] = image_auroc(labels[idx], scores[idx])
        sub_names = [names[i] for i in idx] if names is not None else None
        curve = spro_curve([maps_l[i] for i in idx], [regions[i] for i in idx], sub_names)
        if curve is None:  # = au_spro(...), keeping the curve
            per_subset[subset] = {f: NAN for f in limits}
        else:
            per_subset[subset] = {f: a / f for f, a in
                                  zip(limits, areas_under_curve(*curve, limits))}
            if curves is not None:
                curves[f"spro_{subset}"] = curve
    out["image_auroc"] = 0.5 * (out["logical_auroc"] + out["structural_auroc"])
    out["image_auroc_all"] = image_auroc(labels, scores)
    out["f1_max"] = f1_max(labels, scores)
    for f in limits:
        lo, st = per_subset["logical"][f], per_subset["structural"][f]
        out[spro_key(f, "logical")] = lo
        out[spro_key(f, "structural")] = st
        out[spro_key(f)] = 0.5 * (lo + st)
    return out
