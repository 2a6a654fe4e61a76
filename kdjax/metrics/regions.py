"""Pixel-level metrics of MVTec AD (pixel AUROC, AU-PRO, the RD4AD code's
per-image AU-PRO) and MVTec LOCO AD (AU-sPRO), and the per-dataset bundles
(docs/METRICS.md; the overview is ``kdjax.metrics``)."""

from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Sequence

import numpy as np
from scipy import ndimage

from kdjax.metrics.curves import (NAN, SPRO_FPR_LIMITS, _check_limit, _exact_curve, _name,
                                  area_under_curve, areas_under_curve, as_map_list,
                                  binarize_mask, check_finite, check_same_shapes, f1_max,
                                  image_auroc, image_scores, log)

# 8-connectivity, as the official MVTec AD evaluation (scipy.ndimage.label with
# a 3x3 structure of ones) and skimage.measure.label's default for 2-D images.
_EIGHT = np.ones((3, 3), dtype=int)


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
