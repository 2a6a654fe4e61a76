"""results.json and results.md of a run (docs/INTERFACE.md): the metrics per
category and their mean, the paper's numbers beside ours with the difference,
and the comparison tables of tools/reproduce.py (docs/REPRODUCING.md). Host side
only; ``kdjax.evaluate`` re-exports these functions."""

from __future__ import annotations

import json
import math
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np

from kdjax.jsonio import json_safe


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
