"""Input checks, image-level metrics (AUROC, F1-max) and the exact curves'
areas, on the host (docs/METRICS.md; the overview is ``kdjax.metrics``)."""

from __future__ import annotations

import logging
from typing import List, Optional, Sequence, Tuple

import numpy as np

log = logging.getLogger("kdjax.metrics")

SPRO_FPR_LIMITS = (0.01, 0.05, 0.1, 0.3, 1.0)

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

