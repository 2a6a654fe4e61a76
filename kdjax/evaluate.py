"""Evaluation report: metrics per category, results.json / results.md, figures, TIFF export.

This module is host side only (numpy) and holds no model code: the engine
(kdjax/train.py) runs inference and hands the anomaly maps here.

* ``category_metrics``: the metric bundle of docs/METRICS.md for one category.
* ``write_results``: results.json (docs/INTERFACE.md schema, NaN -> null) and
  results.md (percent tables, the paper's numbers beside ours with the difference).
* ``paper_comparison`` / ``paper_comparison_markdown``: ours, the paper's and the
  difference per category and for the mean (tools/reproduce.py, docs/REPRODUCING.md).
* ``save_figures``: ROC curve(s) and an image / ground truth / map grid.
* ``export_tiff``: maps in the layout the official MVTec evaluators read.
* ``resize_maps`` / ``to_original_resolution``: bilinear resizing of maps.
"""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np

from kdjax import metrics as M
from kdjax.data.types import DATASET_SPECS
from kdjax.jsonio import json_safe

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
# results.json / results.md
# ---------------------------------------------------------------------------

def _to_float(v) -> float:
    if v is None:
        return float("nan")
    return float(v)


def mean_over_categories(categories: Mapping[str, Mapping[str, float]]) -> Dict[str, float]:
    """Mean of each metric over the categories that have it, ignoring NaN (NaN if none)."""
    names: List[str] = []
    for m in categories.values():
        for k in m:
            if k not in names:
                names.append(k)
    out = {}
    for k in names:
        vals = [_to_float(m[k]) for m in categories.values() if k in m]
        vals = [v for v in vals if v == v]
        out[k] = float(np.mean(vals)) if vals else float("nan")
    return out


def _block(categories: Mapping[str, Mapping[str, float]]) -> Dict[str, Any]:
    cats = {c: {k: _to_float(v) for k, v in m.items()} for c, m in categories.items()}
    return {"categories": cats, "mean": mean_over_categories(cats)}


# Metric groups of results.md, in order; anything else goes to "other".
_GROUPS = (
    ("Image level", ("image_auroc", "logical_auroc", "structural_auroc", "image_auroc_all",
                     "f1_max")),
    ("Pixel level", ("pixel_auroc", "au_pro", "au_pro_per_image")),
    ("AU-sPRO at FPR 0.05", ("au_spro_0.05", "au_spro_0.05_logical",
                             "au_spro_0.05_structural")),
    ("AU-sPRO at other FPR limits", tuple(
        f"au_spro_{f}{s}" for f in ("0.01", "0.1", "0.3", "1.0")
        for s in ("", "_logical", "_structural"))),
)


def _fmt(v) -> str:
    v = _to_float(v)
    return "n/a" if v != v else f"{100.0 * v:.1f}"


def _fmt_target(v) -> str:
    try:
        v = float(v)
    except (TypeError, ValueError):
        return "" if v is None else str(v)
    return "n/a" if v != v else f"{v:.1f}"


def _target(targets, cat: str, metric: str):
    if not targets:
        return None
    row = targets.get(cat)
    if not row:
        return None
    return row.get(metric)


def paper_mean(targets, categories: Sequence[str], metric: str):
    """(value, n_paper): the paper's number to set beside OUR mean over ``categories``.

    The published mean row (``targets["mean"]``, n_paper None), except when the run
    covers only some of the categories the paper lists for this metric: then the mean
    of the paper's numbers over those same categories (n_paper = how many categories
    the paper lists), so that the two means are over the same categories. None when
    there is no number to compare with."""
    if not targets:
        return None, None
    listed = [c for c, row in targets.items() if c != "mean" and row
              and _finite(row.get(metric))]
    run = [c for c in categories if c != "mean"]
    if listed and run and set(run) < set(listed):
        return float(np.mean([float(targets[c][metric]) for c in run])), len(listed)
    value = _target(targets, "mean", metric)
    return (float(value), None) if _finite(value) else (None, None)


def _finite(v) -> bool:
    try:
        return math.isfinite(float(v))
    except (TypeError, ValueError):
        return False


def difference(ours, paper) -> Optional[float]:
    """ours - paper in points: ``ours`` a fraction (kdjax's results), ``paper`` in percent.
    Taken between the values as shown (percent, one decimal), so that a reader can
    check it; None when either is missing or undefined."""
    if not (_finite(ours) and _finite(paper)):
        return None
    return round(round(100.0 * float(ours), 1) - round(float(paper), 1), 1)


def fmt_difference(d) -> str:
    """+1.2 / -0.3 / 0.0 (points); "" when undefined."""
    if d is None or not _finite(d):
        return ""
    d = round(float(d), 1)
    return "0.0" if d == 0 else f"{d:+.1f}"


def _markdown(results: Dict[str, Any], targets: Optional[Mapping]) -> str:
    method, dataset = results["method"], results["dataset"]
    if results.get("variants"):
        columns = [(name, blk) for name, blk in results["variants"].items()]
    else:
        columns = [(method, {"categories": results["categories"], "mean": results["mean"]})]
    rows = list(results["categories"].keys())
    for _, blk in columns:
        for c in blk["categories"]:
            if c not in rows:
                rows.append(c)
    run_cats = list(rows)
    rows.append("mean")
    present = []
    for _, blk in columns:
        for m in list(blk["mean"].keys()):
            if m not in present:
                present.append(m)
    grouped = [(g, [m for m in ms if m in present]) for g, ms in _GROUPS]
    known = {m for _, ms in _GROUPS for m in ms}
    grouped.append(("Other", [m for m in present if m not in known]))

    lines = [f"# Results: {method} on {dataset}", "",
             f"Teacher: {results.get('teacher', '')}", "",
             "All values are percentages with one decimal (AUROC, F1 and AU-(s)PRO x 100); "
             "n/a = undefined. Columns marked *paper* hold the published number where the "
             "config names one, and the columns marked Δ our number minus the paper's, in "
             "points (between the values as shown).", ""]
    if results.get("warning"):
        lines += [f"**Warning:** {results['warning']}", ""]
    for note in results.get("notes") or ():
        lines += [f"**Note:** {note}", ""]
    if results.get("targets_source"):
        lines += [f"Paper numbers: {results['targets_source']}", ""]
    lines += _threshold_lines(results.get("thresholds"))
    head_name, head_blk = columns[0]
    for group, metrics in grouped:
        if not metrics:
            continue
        header = ["category"]
        cells = []  # (metric, "ours" | "paper" | "diff", column name)
        for m in metrics:
            for name, _ in columns:
                header.append(m if len(columns) == 1 else f"{m} [{name}]")
                cells.append((m, "ours", name))
            if any(_target(targets, r, m) is not None for r in rows):
                header.append(f"{m} *paper*")
                cells.append((m, "paper", None))
                header.append(f"{m} Δ" if len(columns) == 1 else f"{m} Δ [{head_name}]")
                cells.append((m, "diff", head_name))
        lines += [f"## {group} (%)", "", "| " + " | ".join(header) + " |",
                  "|" + "---|" * len(header)]
        blocks = dict(columns)
        footnotes = []
        for r in rows:
            row = [f"**{r}**" if r == "mean" else r]
            for m, kind, name in cells:
                if kind == "ours":
                    blk = blocks[name]
                    src = blk["mean"] if r == "mean" else blk["categories"].get(r, {})
                    row.append(_fmt(src[m]) if m in src else "")
                    continue
                if r == "mean":  # over the categories where our headline number exists
                    cats_m = [c for c in run_cats
                              if _finite(head_blk["categories"].get(c, {}).get(m))]
                    t, n_paper = paper_mean(targets, cats_m, m)
                else:
                    t, n_paper = _target(targets, r, m), None
                if kind == "paper":
                    cell = "" if t is None else _fmt_target(t)
                    if n_paper is not None:
                        cell += "†"
                        published = _target(targets, "mean", m)
                        footnotes.append(
                            f"- † {m}: the paper's mean over the {len(cats_m)} "
                            f"categor{'y' if len(cats_m) == 1 else 'ies'} of our mean (it "
                            f"lists {n_paper})"
                            + (f"; its published mean is {_fmt_target(published)}."
                               if published is not None else "."))
                    row.append(cell)
                else:
                    src = head_blk["mean"] if r == "mean" else head_blk["categories"].get(r, {})
                    row.append(fmt_difference(difference(src.get(m), t)))
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
        if footnotes:
            lines += footnotes + [""]
    return "\n".join(lines)


def _metric_order(metrics) -> List[str]:
    known = [m for _, ms in _GROUPS for m in ms]
    return [m for m in known if m in metrics] + [m for m in metrics if m not in known]


def paper_comparison(categories: Mapping[str, Mapping[str, float]],
                     targets: Mapping[str, Mapping[str, float]],
                     planned: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Ours beside the paper's, per category and for the mean (tools/reproduce.py).

    ``categories``: our results {category: {metric: fraction}} (the finished ones);
    ``targets``: {category or "mean": {metric: percent}}; ``planned``: the rows, in
    order (default: the targets' categories). Returns {"metrics": [...], "finished":
    [the rows with results], "categories":
    {cat: {metric: {"ours", "paper", "difference"}}}, "mean": {metric: {"ours", "paper",
    "difference", "paper_mean_of"}}}: values in percent (ours unrounded, None where not
    run or undefined), differences in points between the values as shown (one
    decimal). Our mean is over the finished categories; the paper's is its published
    mean when all of its categories are among them, else its mean over the same
    categories ("paper_mean_of": the number of categories it is over, None for the
    published mean)."""
    metrics = _metric_order(sorted({m for c, row in targets.items() for m in (row or {})}))
    rows = list(planned) if planned is not None else [c for c in targets if c != "mean"]
    out: Dict[str, Any] = {"metrics": metrics, "finished": [c for c in rows if c in categories],
                           "categories": {}, "mean": {}}
    for c in rows:
        ours_row = categories.get(c) or {}
        out["categories"][c] = {}
        for m in metrics:
            ours = ours_row.get(m)
            ours = 100.0 * float(ours) if _finite(ours) else None
            paper = _target(targets, c, m)
            paper = float(paper) if _finite(paper) else None
            out["categories"][c][m] = {
                "ours": ours, "paper": paper,
                "difference": difference(None if ours is None else ours / 100.0, paper)}
    for m in metrics:
        done = [c for c in rows if out["categories"][c][m]["ours"] is not None]
        ours = float(np.mean([out["categories"][c][m]["ours"] for c in done])) if done else None
        paper, n_paper = paper_mean(targets, done, m) if done else (None, None)
        out["mean"][m] = {"ours": ours, "paper": paper, "paper_mean_of": n_paper and len(done),
                          "difference": difference(None if ours is None else ours / 100.0,
                                                   paper)}
    return out


def paper_comparison_markdown(comp: Mapping[str, Any]) -> List[str]:
    """The table of :func:`paper_comparison`: per metric ours | paper | Δ (points)."""
    metrics = comp["metrics"]
    header = ["category"]
    for m in metrics:
        header += [f"{m} ours", f"{m} *paper*", f"{m} Δ"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def pct(v):
        return "" if v is None else f"{v:.1f}"

    notes = []
    for c, row in list(comp["categories"].items()) + [("mean", comp["mean"])]:
        cells = [f"**{c}**" if c == "mean" else c]
        for m in metrics:
            x = row[m]
            paper = pct(x["paper"])
            if c == "mean" and x.get("paper_mean_of"):
                paper += "†"
                n = x["paper_mean_of"]
                notes.append(f"- † {m}: the paper's mean over the same {n} "
                             f"categor{'y' if n == 1 else 'ies'} as ours (not its published "
                             "mean over all).")
            ours = pct(x["ours"])
            if not ours and c != "mean":
                ours = "n/a" if c in comp.get("finished", ()) else "not run"
            cells += [ours, paper,
                      fmt_difference(x["difference"])]
        lines.append("| " + " | ".join(cells) + " |")
    return lines + ([""] + notes if notes else [])


def _threshold_lines(thresholds) -> List[str]:
    """results.md's decision-threshold table (the model artifact's threshold)."""
    if not thresholds:
        return []
    lines = ["## Decision threshold", "",
             "An image is anomalous when its score is above the threshold, chosen without "
             "the test set (eval.threshold); precision and recall are on the test set. The "
             "test-set F1-max above is a reported metric, not a threshold.", "",
             "| category | threshold | rule | chosen on | test precision (%) | "
             "test recall (%) |", "|---|---|---|---|---|---|"]
    notes = []
    for cat, t in thresholds.items():
        if not t:
            continue
        test = t.get("test") or {}
        rule = str(t.get("rule", ""))
        if t.get("quantile") is not None:
            rule += f" {t['quantile']}"
        where = str(t.get("source", ""))
        if t.get("optimistic"):
            where += " (optimistic)"
            notes.append(cat)
        value = t.get("value")
        lines.append(f"| {cat} | {'n/a' if value is None else f'{float(value):.5g}'} | {rule} | "
                     f"{where} | {_fmt(test.get('precision'))} | {_fmt(test.get('recall'))} |")
    lines.append("")
    if notes:
        lines += [f"**Optimistic threshold** ({', '.join(notes)}): no held-out good images, so "
                  "it is a quantile of the training images' own scores; new good images score "
                  "higher. Hold out images (data.validation_fraction=0.1) or set "
                  "eval.threshold to a number.", ""]
    return lines


def _plain(d):
    """ConfigDict / FrozenConfigDict / nested mappings -> plain dicts."""
    if d is None:
        return None
    if hasattr(d, "to_dict"):
        d = d.to_dict()
    if isinstance(d, Mapping):
        return {str(k): _plain(v) if isinstance(v, Mapping) or hasattr(v, "to_dict") else v
                for k, v in d.items()}
    return d


def write_results(workdir: str, method: str, dataset: str, teacher: str,
                  categories: Mapping[str, Mapping[str, float]], targets=None,
                  variants: Optional[Mapping[str, Mapping[str, Mapping[str, float]]]] = None,
                  extra: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """Write ``results.json`` and ``results.md`` under ``workdir``; return the results dict.

    results.json = {"method", "dataset", "teacher", "categories": {cat: {metric:
    float}}, "mean": {metric: float}} (docs/INTERFACE.md), plus the ``extra`` keys and,
    when given, "variants": {name: {"categories": ..., "mean": ...}}. Means are
    over categories, ignoring NaN. NaN / inf are written as null. ``targets``:
    {category or "mean": {metric: published value in percent}} (the table that
    kdjax.config.paper_targets chose), shown beside ours in results.md with the
    difference; an ``extra`` "notes" list is printed above the tables.
    """
    results: Dict[str, Any] = {"method": str(method), "dataset": str(dataset),
                               "teacher": str(teacher)}
    results.update(_block(categories))
    if variants:
        results["variants"] = {str(n): _block(c) for n, c in variants.items()}
    for k, v in (extra or {}).items():
        if k in results:
            raise ValueError(f"extra key {k!r} would overwrite a results.json field.")
        results[k] = v
    targets = _plain(targets) or None
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump(json_safe(results), f, indent=2, allow_nan=False)
        f.write("\n")
    with open(os.path.join(workdir, "results.md"), "w") as f:
        f.write(_markdown(results, targets) + "\n")
    return results


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
