"""The HTML report of a run, ``<workdir>/report.html``, and the gallery of ``--mode=predict``.

One self-contained page (inline CSS, JavaScript and SVG; no network): the
results table with the paper's numbers beside ours (config ``targets``), the
ROC and (s)PRO curves, the decision threshold and the confusion at it, and a
gallery of EVERY test image (image | ground truth | anomaly map over the
image, with its score and label), sortable by score and filterable by
category, defect type, anomaly kind (MVTec LOCO and the synthetic set:
logical and structural apart) and "misclassified at the threshold". The
thumbnails are JPEG files beside the page, ``report_files/<category>/NNNN.jpg``
(``report.thumbnail_size`` px per panel), so the page stays small.

The gallery's state is the page's URL hash (``#cat=tray&type=missing_item&
kind=logical&mis=1&sort=score-asc``): the controls write it and every change
of it re-renders, so a link reproduces a view.

* ``write_category(...)``: during the evaluation of one category, writes its
  thumbnails and ``report_files/<category>.json`` (entries, curves, threshold).
* ``write_report(workdir, results, targets)``: assembles ``report.html`` from
  results.json's content and those files.
* ``write_gallery(out_dir, entries, ...)``: the same gallery for new images
  (``--mode=predict``: ``<output>/report.html``).
"""

from __future__ import annotations

import html
import json
import os
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np

FILES = "report_files"
PRO_LIMITS = {"pro": 0.3, "spro": 0.05}
# The metrics of the main table, in order (the others are in "all metrics").
MAIN_METRICS = ("image_auroc", "logical_auroc", "structural_auroc", "f1_max", "pixel_auroc",
                "au_pro", "au_pro_per_image", "au_spro_0.05", "au_spro_0.05_logical",
                "au_spro_0.05_structural")


# ---------------------------------------------------------------------------
# Thumbnails and per-category data
# ---------------------------------------------------------------------------

def colour_range(maps: Sequence[np.ndarray], threshold: Optional[float]):
    """(lo, hi) of the overlays' shared colour scale: from the 1st percentile of the
    maps; with a threshold, the threshold sits at 2/3 of the scale (red = above it)."""
    sample = np.concatenate([np.asarray(m, np.float32).ravel()[::7] for m in maps])
    lo = float(np.percentile(sample, 1.0))
    if threshold is not None and float(threshold) > lo:
        hi = lo + 1.5 * (float(threshold) - lo)
    else:
        hi = float(np.percentile(sample, 99.9))
    return lo, max(hi, lo + 1e-6)


def _fit(panel: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    h, w = panel.shape[:2]
    scale = min(1.0, size / max(h, w))
    if scale >= 1.0:
        return panel
    return np.asarray(Image.fromarray(panel).resize((max(1, round(w * scale)),
                                                     max(1, round(h * scale))), Image.BILINEAR))


def strip(image: np.ndarray, amap: np.ndarray, lo: float, hi: float, size: int,
          mask: Optional[np.ndarray] = None, ground_truth: bool = True) -> np.ndarray:
    """uint8 panels side by side, each at most ``size`` px: image | ground truth (with
    ``ground_truth``) | anomaly map over the image."""
    from kdjax import viz

    img = (np.clip(viz._to_display_image(np.asarray(image)), 0, 1) * 255).astype(np.uint8)
    panels = [img]
    if ground_truth:
        panels.append(viz.mask_overlay(img, mask))
    panels.append(viz.heat_overlay(img, amap, lo, hi))
    panels = [_fit(p, size) for p in panels]
    gap = np.full((panels[0].shape[0], 2, 3), 255, np.uint8)
    out = [panels[0]]
    for p in panels[1:]:
        out += [gap, p]
    return np.concatenate(out, 1)


def _save_jpeg(arr: np.ndarray, path: str) -> None:
    from PIL import Image

    Image.fromarray(arr).save(path, quality=85)


def _downsample(x, y, x_max: float = 1.0, n: int = 200) -> List[List[float]]:
    """[[x, y], ...]: the curve on ``n`` + 1 points of [0, x_max] (step-wise exact curves
    interpolated linearly; enough to draw it)."""
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    grid = np.linspace(0.0, x_max, n + 1)
    return [[round(float(a), 5), round(float(b), 5)] for a, b in zip(grid, np.interp(grid, x, y))]


def _roc_curves(labels: np.ndarray, scores: np.ndarray, kinds: Sequence[str]):
    from sklearn.metrics import roc_auc_score, roc_curve

    out = []
    bad = sorted({k for k, lab in zip(kinds, labels) if lab == 1})
    groups = [(k, (labels == 0) | (np.asarray(kinds) == k)) for k in bad] if len(bad) > 1 else []
    groups.append(("all", np.ones(len(labels), bool)))
    for name, sel in groups:
        lab, sc = labels[sel], scores[sel]
        if lab.min() == lab.max():
            continue
        fpr, tpr, _ = roc_curve(lab, sc)
        out.append({"name": f"{name} (AUROC {100 * roc_auc_score(lab, sc):.1f}%)",
                    "points": [[round(float(a), 5), round(float(b), 5)]
                               for a, b in zip(fpr, tpr)]})
    return out


def write_category(workdir: str, category: str, dataset: str, images: np.ndarray, maps,
                   records, scores, threshold: Optional[Mapping[str, Any]] = None,
                   masks=None, curves: Optional[Mapping[str, Any]] = None,
                   root: Optional[str] = None, thumbnail_size: int = 160,
                   progress=None) -> np.ndarray:
    """Thumbnails and ``report_files/<category>.json`` of one category's test set.

    ``images`` uint8 (N, S, S, 3); ``maps`` (N, h, w) at the input size; ``masks``
    (N, S, S) or None; ``records`` (kdjax.data.types.Record) give names, defect types,
    labels and anomaly kinds; ``threshold``: the results.json threshold record (with
    ``test``); ``curves``: kdjax.metrics' (s)PRO curves. Returns the strips of a few
    images (the highest-scored anomalous and good ones) for TensorBoard."""
    from kdjax.data.types import dataset_spec

    scores = np.asarray(scores, np.float64)
    labels = np.array([int(r.label) for r in records])
    kinds = [r.anomaly_kind or ("good" if r.label == 0 else "anomalous") for r in records]
    t = None if not threshold or threshold.get("value") is None else float(threshold["value"])
    lo, hi = colour_range(maps, t)
    folder = os.path.join(workdir, FILES, category)
    os.makedirs(folder, exist_ok=True)
    entries, strips = [], {}
    for i, r in enumerate(records):
        mask = None if masks is None else masks[i]
        s = strip(images[i], maps[i], lo, hi, int(thumbnail_size), mask)
        rel = f"{FILES}/{category}/{i:04d}.jpg"
        _save_jpeg(s, os.path.join(workdir, rel))
        strips[i] = s
        pred = None if t is None else int(scores[i] > t)
        entries.append({"name": os.path.relpath(r.image_path, root) if root else r.image_path,
                        "type": r.defect_type, "kind": kinds[i], "label": int(labels[i]),
                        "score": float(scores[i]), "pred": pred, "img": rel})
        if progress is not None:
            progress.update(1)
    loco = dataset_spec(dataset).ground_truth == "loco_regions"
    pro = []
    for key, name in (("pro", "PRO"), ("spro_logical", "sPRO logical"),
                      ("spro_structural", "sPRO structural")):
        c = (curves or {}).get(key)
        if c is not None:
            pro.append({"name": name, "points": _downsample(c[0], c[1], 0.3)})
    data = {"category": category, "dataset": dataset, "loco": loco,
            "threshold": dict(threshold or {}), "colour_range": [lo, hi],
            "entries": entries, "roc": _roc_curves(labels, scores, kinds), "pro": pro,
            "pro_limit": PRO_LIMITS["spro" if loco else "pro"],
            "by_kind": _by_kind(entries)}
    from kdjax.jsonio import json_safe

    with open(os.path.join(workdir, FILES, f"{category}.json"), "w") as f:
        json.dump(json_safe(data), f, allow_nan=False)
    order = [i for i in np.argsort(-scores) if labels[i] == 1][:2]
    order += [i for i in np.argsort(-scores) if labels[i] == 0][:2]
    same = [strips[i] for i in order if strips[i].shape == strips[order[0]].shape] if order else []
    return np.stack(same) if same else np.zeros((0, 1, 1, 3), np.uint8)


def _by_kind(entries) -> Dict[str, Dict[str, int]]:
    """{kind: {"n", "flagged"}}: how many images of each kind the threshold flags."""
    out: Dict[str, Dict[str, int]] = {}
    for e in entries:
        if e["pred"] is None:
            continue
        d = out.setdefault(e["kind"], {"n": 0, "flagged": 0})
        d["n"] += 1
        d["flagged"] += int(e["pred"])
    return out


# ---------------------------------------------------------------------------
# SVG curves
# ---------------------------------------------------------------------------

_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b")


def svg_curves(curves: Sequence[Mapping[str, Any]], title: str, xlabel: str, ylabel: str,
               x_max: float = 1.0, vline: Optional[float] = None, diagonal: bool = False,
               width: int = 340, height: int = 300) -> str:
    """An inline SVG line chart of ``[{"name", "points": [[x, y], ...]}]``."""
    left, right, top, bottom = 46, 10, 24, 40
    pw, ph = width - left - right, height - top - bottom

    def px(x, y):
        return (left + pw * min(max(x / x_max, 0.0), 1.0), top + ph * (1.0 - min(max(y, 0), 1)))

    e = html.escape
    out = [f'<svg class="curve" xmlns="http://www.w3.org/2000/svg" width="{width}" '
           f'height="{height}" viewBox="0 0 {width} {height}" role="img">',
           f'<text x="{width / 2:.0f}" y="15" text-anchor="middle" class="t">{e(title)}</text>',
           f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="#fff" stroke="#999"/>']
    for k in range(6):
        f = k / 5
        x, y = px(f * x_max, f)
        out.append(f'<text x="{x:.1f}" y="{top + ph + 13}" text-anchor="middle" class="a">'
                   f'{f * x_max:.2g}</text>')
        out.append(f'<text x="{left - 4}" y="{y + 3:.1f}" text-anchor="end" class="a">'
                   f'{f:.1f}</text>')
    out.append(f'<text x="{left + pw / 2:.0f}" y="{height - 6}" text-anchor="middle" '
               f'class="a">{e(xlabel)}</text>')
    out.append(f'<text transform="translate(11 {top + ph / 2:.0f}) rotate(-90)" '
               f'text-anchor="middle" class="a">{e(ylabel)}</text>')
    if diagonal:
        (x0, y0), (x1, y1) = px(0, 0), px(x_max, x_max)
        out.append(f'<line x1="{x0:.1f}" y1="{y0:.1f}" x2="{x1:.1f}" y2="{y1:.1f}" '
                   'stroke="#aaa" stroke-dasharray="4 3"/>')
    if vline is not None:
        (x0, y0), (_, y1) = px(vline, 0), px(vline, 1)
        out.append(f'<line x1="{x0:.1f}" y1="{y0:.1f}" x2="{x0:.1f}" y2="{y1:.1f}" '
                   'stroke="#666" stroke-dasharray="2 2"/>')
    for i, c in enumerate(curves):
        pts = " ".join(f"{a:.1f},{b:.1f}" for a, b in (px(x, y) for x, y in c["points"]
                                                        if x <= x_max * 1.0001))
        col = _COLOURS[i % len(_COLOURS)]
        out.append(f'<polyline fill="none" stroke="{col}" stroke-width="1.6" points="{pts}"/>')
        ly = top + ph - 8 - 13 * (len(curves) - 1 - i)
        out.append(f'<text x="{left + pw - 4}" y="{ly}" text-anchor="end" class="l" '
                   f'fill="{col}">{e(c["name"])}</text>')
    if not curves:
        out.append(f'<text x="{left + pw / 2:.0f}" y="{top + ph / 2:.0f}" text-anchor="middle" '
                   'class="a">undefined (one class only)</text>')
    out.append("</svg>")
    return "".join(out)


# ---------------------------------------------------------------------------
# The page
# ---------------------------------------------------------------------------

def _pct(v) -> str:
    try:
        v = float(v)
    except (TypeError, ValueError):
        return "n/a"
    return "n/a" if v != v else f"{100 * v:.1f}"


def _target(targets, row: str, metric: str) -> str:
    t = ((targets or {}).get(row) or {}).get(metric)
    if t is None:
        return ""
    try:
        return f"{float(t):.1f}"
    except (TypeError, ValueError):
        return html.escape(str(t))


def _results_table(results: Mapping[str, Any], targets) -> str:
    cats = results.get("categories", {})
    mean = results.get("mean", {})
    present = [m for m in MAIN_METRICS if m in mean]
    others = [m for m in mean if m not in present]
    parts = []
    for metrics, table_id, caption in ((present, "results-table", ""),
                                       (others, "results-all", "all metrics")):
        if not metrics:
            continue
        with_paper = {m: any(_target(targets, r, m) for r in list(cats) + ["mean"])
                      for m in metrics}
        head = "".join(f"<th>{html.escape(m)}</th>" + ("<th class=paper>paper</th>"
                                                       if with_paper[m] else "")
                       for m in metrics)
        rows = []
        for r in list(cats) + ["mean"]:
            src = mean if r == "mean" else cats[r]
            cells = "".join(f"<td>{_pct(src.get(m))}</td>" + (
                f"<td class=paper>{_target(targets, r, m)}</td>" if with_paper[m] else "")
                for m in metrics)
            cls = ("result-row" if not caption else "all-row") + (" mean" if r == "mean" else "")
            rows.append(f'<tr class="{cls}"><th>{html.escape(r)}</th>{cells}</tr>')
        table = (f'<table id="{table_id}"><thead><tr><th>category</th>{head}</tr></thead>'
                 f'<tbody>{"".join(rows)}</tbody></table>')
        parts.append(table if not caption else
                     f"<details><summary>{caption}</summary>{table}</details>")
    if results.get("variants"):
        vm = [m for m in MAIN_METRICS if any(m in b["mean"] for b in results["variants"].values())]
        rows = "".join(f"<tr><th>{html.escape(n)}</th>" + "".join(
            f"<td>{_pct(b['mean'].get(m))}</td>" for m in vm) + "</tr>"
            for n, b in results["variants"].items())
        parts.append("<h3>Variants (mean over categories)</h3><table id=variants><thead><tr>"
                     "<th>variant</th>" + "".join(f"<th>{html.escape(m)}</th>" for m in vm)
                     + f"</tr></thead><tbody>{rows}</tbody></table>")
    return "".join(parts)


def _threshold_table(cat_data: Mapping[str, Mapping[str, Any]]) -> str:
    rows = []
    for cat, d in cat_data.items():
        t = d.get("threshold") or {}
        test = t.get("test") or {}
        value = t.get("value")
        by_kind = d.get("by_kind", {})
        kinds = ", ".join(f"{k}: {v['flagged']}/{v['n']} flagged"
                          for k, v in sorted(by_kind.items()))
        rule = str(t.get("rule", "")) + (f" {t['quantile']}" if t.get("quantile") else "")
        where = str(t.get("source", "")) + (" (optimistic)" if t.get("optimistic") else "")
        rows.append(
            f"<tr><th>{html.escape(cat)}</th>"
            f"<td>{'n/a' if value is None else f'{float(value):.5g}'}</td>"
            f"<td>{html.escape(rule)}</td><td>{html.escape(where)}</td>"
            + "".join(f"<td>{test.get(k, '')}</td>" for k in ("tp", "fp", "fn", "tn"))
            + f"<td>{_pct(test.get('precision'))}</td><td>{_pct(test.get('recall'))}</td>"
            f"<td>{html.escape(kinds)}</td></tr>")
    return ("<table id=threshold-table><thead><tr><th>category</th><th>threshold</th>"
            "<th>rule</th><th>chosen on</th><th>TP</th><th>FP</th><th>FN</th><th>TN</th>"
            "<th>precision %</th><th>recall %</th><th>flagged per kind</th></tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table>")


def _curves_html(cat_data: Mapping[str, Mapping[str, Any]]) -> str:
    out = []
    for cat, d in cat_data.items():
        roc = svg_curves(d.get("roc", []), f"{cat}: image-level ROC", "false positive rate",
                         "true positive rate", diagonal=True)
        loco = d.get("loco")
        pro = svg_curves(d.get("pro", []), f"{cat}: {'sPRO' if loco else 'PRO'} curve",
                         "false positive rate (pixels)", "sPRO" if loco else "PRO",
                         x_max=0.3, vline=d.get("pro_limit"))
        out.append(f'<div class="curves" data-cat="{html.escape(cat)}">{roc}{pro}</div>')
    return "".join(out)


def _card(cat: str, e: Mapping[str, Any]) -> str:
    label = e.get("label")
    pred = e.get("pred")
    mis = label is not None and pred is not None and int(label) != int(pred)
    decision = "" if pred is None else ("anomalous" if pred else "good")
    truth = "" if label is None else (e["kind"] if label else "good")
    a = html.escape
    cls = "card mis" if mis else "card"
    verdict = (f'<span class="dec {"bad" if pred else "ok"}">{decision}</span>'
               if decision else "")
    truth_html = f" &middot; truth: <b>{a(truth)}</b>" if truth else ""
    return (f'<div class="{cls}" data-cat="{a(cat)}" data-type="{a(e["type"])}" '
            f'data-kind="{a(e["kind"])}" data-score="{e["score"]:.6g}" '
            f'data-mis="{int(mis)}" data-dec="{"" if pred is None else int(pred)}" '
            f'data-name="{a(e["name"])}">'
            f'<img loading="lazy" src="{a(e["img"])}" alt="{a(e["name"])}">'
            f'<div class="cap"><span class="name">{a(e["name"])}</span><br>'
            f'score <b>{e["score"]:.4g}</b> {verdict}{truth_html}'
            f'{" &middot; <b class=bad>misclassified</b>" if mis else ""}</div></div>')


def _options(values: Sequence[str], all_label: str) -> str:
    return f'<option value="">{all_label}</option>' + "".join(
        f'<option value="{html.escape(v)}">{html.escape(v)}</option>' for v in values)


def _gallery(cat_data: Mapping[str, Mapping[str, Any]], panels: str) -> str:
    cards, types, kinds = [], [], []
    for cat, d in cat_data.items():
        for e in d.get("entries", []):
            cards.append(_card(cat, e))
            if e["type"] not in types:
                types.append(e["type"])
            if e["kind"] not in kinds:
                kinds.append(e["kind"])
    loco = any(d.get("loco") for d in cat_data.values())
    has_truth = any(e.get("label") is not None and e.get("pred") is not None
                    for d in cat_data.values() for e in d.get("entries", []))
    controls = [f'<label>category <select id="f-cat">{_options(list(cat_data), "all")}'
                "</select></label>",
                f'<label>{"folder" if not has_truth else "defect type"} <select id="f-type">'
                f'{_options(sorted(types), "all")}</select></label>']
    if loco or len(kinds) > 2:
        controls.append(f'<label>kind <select id="f-kind">{_options(kinds, "all")}'
                        "</select></label>")
    if has_truth:
        controls.append('<label><input type="checkbox" id="f-mis"> misclassified at the '
                        "threshold only</label>")
    else:
        controls.append('<label>decision <select id="f-dec"><option value="">all</option>'
                        '<option value="1">anomalous</option><option value="0">good</option>'
                        "</select></label>")
    controls.append('<label>sort <select id="f-sort"><option value="score-desc">score, '
                    'highest first</option><option value="score-asc">score, lowest first'
                    '</option><option value="name">name</option></select></label>')
    controls.append(f'<span id="n-visible">{len(cards)} of {len(cards)} images</span>')
    return (f'<p class="note">Panels: {panels}. One colour scale per category; with a '
            "threshold it sits at two thirds of the scale (red = above it).</p>"
            f'<div class="controls">{"".join(controls)}</div>'
            f'<div id="cards" data-total="{len(cards)}" data-visible="{len(cards)}">'
            f'{"".join(cards)}</div>')


def _page(title: str, body: str) -> str:
    from kdjax.report_assets import CSS as _CSS, JS as _JS

    return ("<!DOCTYPE html><html lang=en><head><meta charset=utf-8>"
            f"<meta name=viewport content='width=device-width,initial-scale=1'>"
            f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>"
            f"{body}<script>{_JS}</script></body></html>\n")


def load_category_data(workdir: str, categories: Sequence[str]) -> Dict[str, Dict[str, Any]]:
    out = {}
    for c in categories:
        p = os.path.join(workdir, FILES, f"{c}.json")
        if os.path.exists(p):
            with open(p) as f:
                out[c] = json.load(f)
    return out


def write_report(workdir: str, results: Mapping[str, Any], targets=None) -> str:
    """``<workdir>/report.html`` from results.json's content and report_files/*.json."""
    cat_data = load_category_data(workdir, list(results.get("categories", {})))
    e = html.escape
    head = (f"<h1>kdjax report: {e(str(results.get('method', '')))} on "
            f"{e(str(results.get('dataset', '')))}</h1>"
            f"<p class=meta>Teacher: {e(str(results.get('teacher', '')))} &middot; written "
            f"{time.strftime('%Y-%m-%d %H:%M')} &middot; {len(cat_data)} "
            f"categor{'y' if len(cat_data) == 1 else 'ies'}</p>")
    if results.get("warning"):
        head += f"<p class=warn><b>Warning:</b> {e(str(results['warning']))}</p>"
    source = results.get("targets_source")
    body = [head, "<h2 id=results>Results (%)</h2>",
            "<p class=note>AUROC, F1 and AU-(s)PRO x 100 on the test set; <i>paper</i>: the "
            "published number where the config names one"
            + (f" ({e(str(source))})" if source else "") + ".</p>",
            _results_table(results, targets)]
    if cat_data:
        body += ["<h2 id=threshold>Decision threshold</h2>",
                 "<p class=note>An image is anomalous when its score (the maximum of its "
                 "anomaly map) is above the threshold, which is chosen without the test set; "
                 "the counts are on the test set.</p>", _threshold_table(cat_data),
                 "<h2 id=curves>Curves</h2>", _curves_html(cat_data),
                 "<h2 id=gallery>Test images</h2>",
                 _gallery(cat_data, "image | ground truth (red) | anomaly map over the image")]
    path = os.path.join(workdir, "report.html")
    with open(path, "w") as f:
        f.write(_page(f"kdjax report: {results.get('method', '')}", "".join(body)))
    return path


def write_gallery(out_dir: str, category: str, entries: List[Dict[str, Any]],
                  threshold: Optional[float], title: str) -> str:
    """``<out_dir>/report.html``: the gallery of predicted images (entries as in
    write_category, label None; thumbnails already written under out_dir)."""
    cat_data = {category: {"entries": entries, "loco": False}}
    n_anom = sum(1 for e in entries if e.get("pred"))
    e = html.escape
    body = (f"<h1>{e(title)}</h1><p class=meta>{len(entries)} images, {n_anom} anomalous at "
            f"threshold {'none' if threshold is None else f'{threshold:.5g}'} &middot; "
            f"written {time.strftime('%Y-%m-%d %H:%M')}</p>"
            + _gallery(cat_data, "image | anomaly map over the image"))
    path = os.path.join(out_dir, "report.html")
    with open(path, "w") as f:
        f.write(_page(title, body))
    return path
