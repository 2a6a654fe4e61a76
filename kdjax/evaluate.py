"""Evaluation report: metrics per category, results.json / results.md, figures, TIFF export.

This module is host side only (numpy) and holds no model code: the engine
(kdjax/train.py) runs inference and hands the anomaly maps here.

* ``category_metrics``: the metric bundle of docs/METRICS.md for one category.
* ``write_results``: results.json (docs/INTERFACE.md schema, NaN -> null) and
  results.md (percent tables, the paper's numbers beside ours with the difference).
* ``paper_comparison`` / ``paper_comparison_markdown``: ours, the paper's and the
  difference per category and for the mean (tools/reproduce.py, docs/REPRODUCING.md).
  These two and ``write_results`` live in kdjax/results.py, re-exported here.
* ``save_figures``: ROC curve(s) and an image / ground truth / map grid.
* ``export_tiff``: maps in the layout the official MVTec evaluators read.
* ``resize_maps`` / ``to_original_resolution``: bilinear resizing of maps.
"""

from __future__ import annotations

import logging
import os
from typing import Dict, List, Optional, Sequence

import numpy as np

from kdjax import metrics as M
from kdjax.data.types import DATASET_SPECS
# results.json / results.md (kdjax/results.py); their names stay importable from here.
from kdjax.results import (  # noqa: F401
    difference, fmt_difference, mean_over_categories, paper_comparison,
    paper_comparison_markdown, paper_mean, write_results)

log = logging.getLogger("kdjax.evaluate")


# ---------------------------------------------------------------------------
# Metrics of one category
# ---------------------------------------------------------------------------

def category_metrics(dataset: str, maps, records, masks=None, regions=None,
                     per_image_pro: bool = True, curves: Optional[dict] = None
                     ) -> Dict[str, float]:
    """Metrics of one category's test set (docs/METRICS.md), as {name: float}.

    A dataset whose ground truth is masks (kdjax.data.types.DatasetSpec.ground_truth:
    MVTec AD, folder, VisA, MVTec AD 2, BTAD, MPDD): ``masks`` (N, H, W) in {0, 1} at the
    maps' resolution -> image_auroc, f1_max, pixel_auroc, au_pro, au_pro_per_image (a
    folder dataset without masks, masks=None, gets the image metrics only). LOCO regions
    (mvtec_loco, synthetic): ``regions`` (one list of GTRegion per image) ->
    kdjax.metrics.loco_metrics. ``records`` (kdjax.data.types.Record) give labels, anomaly
    kinds and the names used in error messages. ``curves``: a dict that receives the
    (s)PRO curves (kdjax.metrics.mvtec_ad_metrics / loco_metrics).
    """
    records = list(records)
    maps_l = M.as_map_list(maps, "maps")
    if len(records) != len(maps_l):
        raise ValueError(f"Got {len(maps_l)} anomaly maps for {len(records)} records; "
                         "there must be one map per test record, in the same order.")
    names = [r.image_path for r in records]
    labels = np.array([int(r.label) for r in records], dtype=int)
    spec = DATASET_SPECS.get(dataset)
    if spec is None:
        raise ValueError(f"Unknown dataset {dataset!r}; expected one of "
                         f"{', '.join(DATASET_SPECS)}.")
    if spec.ground_truth == "masks":
        if masks is None:
            M.check_finite(maps_l, names)
            scores = M.image_scores(maps_l)
            log.warning("No ground-truth masks: only image-level metrics are computed.")
            return {"image_auroc": M.image_auroc(labels, scores),
                    "f1_max": M.f1_max(labels, scores)}
        return M.mvtec_ad_metrics(maps_l, labels, masks, per_image_pro=per_image_pro,
                                  names=names, curves=curves)
    if regions is None:
        raise ValueError(f"Dataset {dataset!r} needs the ground-truth regions "
                         "(regions=[kdjax.data.load_regions(r, size) for r in records]).")
    kinds = [r.anomaly_kind if r.label else None for r in records]
    return M.loco_metrics(maps_l, labels, kinds, regions, names=names, curves=curves)


# ---------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------

def _sample(labels: np.ndarray, num: int, seed: int) -> List[int]:
    """Up to ``num`` indices, half good and half anomalous where possible, in order."""
    rng = np.random.default_rng(seed)
    good = np.flatnonzero(labels == 0)
    bad = np.flatnonzero(labels != 0)
    n_bad = min(len(bad), max(num - min(len(good), num // 2), 0))
    n_good = min(len(good), num - n_bad)
    pick = list(rng.choice(good, n_good, replace=False)) if n_good else []
    pick += list(rng.choice(bad, n_bad, replace=False)) if n_bad else []
    return sorted(int(i) for i in pick)


def save_figures(fig_dir: str, category: str, images, maps, labels, scores, masks=None,
                 names: Optional[Sequence[str]] = None, num: int = 8, seed: int = 0,
                 kinds: Optional[Sequence[str]] = None) -> List[str]:
    """Write ``<category>_roc.png`` and ``<category>_maps.png`` in ``fig_dir``.

    ROC: image level; with ``kinds`` (e.g. "good"/"logical"/"structural" per
    image) one curve per anomaly kind against the good images. Overlay grid:
    ``num`` images (about half good, half anomalous, drawn with ``seed``), each
    as image | ground truth | anomaly map with its score. Returns the paths.
    """
    from kdjax import viz

    labels = np.asarray(labels).astype(int)
    scores = np.asarray(scores, dtype=np.float64)
    n = len(labels)
    if not (len(images) == len(maps) == len(scores) == n):
        raise ValueError(f"save_figures got {len(images)} images, {len(maps)} maps, "
                         f"{len(scores)} scores and {n} labels; they must match.")
    os.makedirs(fig_dir, exist_ok=True)
    paths = [viz.roc_figure(os.path.join(fig_dir, f"{category}_roc.png"), labels, scores,
                            kinds=kinds, title=f"{category}: image-level ROC")]
    idx = _sample(labels, int(num), int(seed))
    if idx:
        paths.append(viz.overlay_figure(os.path.join(fig_dir, f"{category}_maps.png"), images,
                                        maps, labels, scores, idx, masks=masks, names=names,
                                        title=f"{category}: anomaly maps", kinds=kinds))
    return paths


# ---------------------------------------------------------------------------
# TIFF export
# ---------------------------------------------------------------------------

def export_tiff(out_dir: str, category: str, records, maps) -> List[str]:
    """Write each map as float32 TIFF ``out_dir/<category>/<split>/<defect_type>/<stem>.tiff``.

    ``out_dir`` is the anomaly-maps root (the engine passes
    ``<workdir>/anomaly_maps``), which is what the official MVTec AD / LOCO
    evaluators take as their maps directory (e.g. ``--anomaly_maps_dir``);
    <stem> is the image file's stem (e.g. 000). Returns the written paths.
    """
    import tifffile

    records = list(records)
    maps_l = M.as_map_list(maps, "maps")
    if len(records) != len(maps_l):
        raise ValueError(f"Got {len(maps_l)} maps for {len(records)} records.")
    paths = []
    for r, m in zip(records, maps_l):
        stem = os.path.splitext(os.path.basename(r.image_path))[0]
        d = os.path.join(out_dir, category, r.split or "test", r.defect_type)
        os.makedirs(d, exist_ok=True)
        p = os.path.join(d, f"{stem}.tiff")
        tifffile.imwrite(p, np.asarray(m, dtype=np.float32))
        paths.append(p)
    return paths


# ---------------------------------------------------------------------------
# Resizing
# ---------------------------------------------------------------------------

def _interp_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out, in) bilinear weights, torch ``align_corners=False`` (half-pixel centres,
    source index clamped at 0, no antialiasing) - kdjax.ops.interp_matrix."""
    from kdjax.ops import interp_matrix

    return interp_matrix(int(in_size), int(out_size), False)


def _resize_one(m: np.ndarray, size) -> np.ndarray:
    oh, ow = int(size[0]), int(size[1])
    h, w = m.shape
    if (h, w) == (oh, ow):
        return m.astype(np.float32, copy=False)
    mh = _interp_matrix(h, oh)
    mw = _interp_matrix(w, ow)
    return (mh @ m.astype(np.float32) @ mw.T).astype(np.float32)


def resize_maps(maps, size) -> np.ndarray:
    """Bilinear resize of (N, h, w) maps to (N, H, W), ``size`` = (H, W) or an int.

    Same as torch ``F.interpolate(maps[:, None], size, mode="bilinear",
    align_corners=False)`` (EfficientAD's final upsample): one matrix product per
    axis with kdjax.ops.interp_matrix weights, float32.
    """
    if np.isscalar(size):
        size = (int(size), int(size))
    maps = np.asarray(maps)
    if maps.ndim != 3:
        raise ValueError(f"maps has shape {maps.shape}: expected (N, h, w).")
    if maps.shape[1:] == tuple(size):
        return maps.astype(np.float32, copy=False)
    mh = _interp_matrix(maps.shape[1], size[0])
    mw = _interp_matrix(maps.shape[2], size[1])
    return np.einsum("oh,nhw,pw->nop", mh, maps.astype(np.float32), mw,
                     optimize=True).astype(np.float32)


def to_original_resolution(maps, sizes):
    """Resize map i to ``sizes[i]`` = (H_i, W_i) (bilinear, align_corners=False).

    Returns an (N, H, W) array when every size is the same, else a list of
    2-D arrays (the metrics accept both).
    """
    maps_l = M.as_map_list(maps, "maps")
    sizes = [tuple(int(v) for v in s) for s in sizes]
    if len(sizes) != len(maps_l):
        raise ValueError(f"Got {len(sizes)} sizes for {len(maps_l)} maps.")
    if len(set(sizes)) == 1 and isinstance(maps, np.ndarray):
        return resize_maps(maps, sizes[0])
    out = [_resize_one(m, s) for m, s in zip(maps_l, sizes)]
    if len(set(sizes)) == 1:
        return np.stack(out, 0)
    return out
