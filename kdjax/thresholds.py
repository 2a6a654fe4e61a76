"""The decision threshold of a model (docs/INTERFACE.md, "Decision threshold"):
chosen by ``eval.threshold`` on held-out images, never on the test set, and the
counts of the decision ``score > threshold``. ``kdjax.inference`` re-exports
these functions."""

from __future__ import annotations

from typing import Any, Dict, Tuple

import numpy as np

from kdjax.errors import ConfigError

THRESHOLD_RULES = ("auto", "f1_val", "quantile")


def f1_max_threshold(labels, scores) -> Tuple[float, float]:
    """(threshold, F1) at the F1-max point of the precision-recall curve; an image
    is anomalous when its score is > threshold."""
    from sklearn.metrics import precision_recall_curve

    scores = np.asarray(scores, np.float64)
    precision, recall, thr = precision_recall_curve(np.asarray(labels, int), scores)
    p, r = precision[:-1], recall[:-1]
    denom = p + r
    f1 = np.divide(2 * p * r, denom, out=np.zeros_like(denom), where=denom > 0)
    i = int(np.argmax(f1))
    # sklearn's point is "score >= thr[i]"; kdjax decides "score > threshold": take the
    # midpoint to the next lower score, which gives the same decisions on these scores.
    below = scores[scores < thr[i]]
    value = 0.5 * (float(thr[i]) + float(below.max())) if len(below) else float(
        np.nextafter(thr[i], -np.inf))
    return value, float(f1[i])


def choose_threshold(config, val_scores=None, val_labels=None, train_scores=None,
                     val_source: str = "validation") -> Dict[str, Any]:
    """The decision threshold by ``eval.threshold`` (never from the test set).

    * a number: used as it is;
    * "f1_val": the F1-max point on a labelled validation set (good and anomalous);
    * "quantile": the ``eval.threshold_quantile`` quantile of the scores of the
      held-out good images (``val_scores``), or, when there are none, of the
      training images' own scores (then ``optimistic``: the model has seen them);
    * "auto": "f1_val" when the validation set has both labels, else "quantile".

    Returns {"value", "rule", "source", "quantile", "count", "optimistic", "note"}.
    """
    rule = config.eval.get("threshold", "auto")
    q = float(config.eval.get("threshold_quantile", 0.99))
    if not isinstance(rule, str) or _is_number(rule):
        return {"value": float(rule), "rule": "fixed", "source": "config (eval.threshold)",
                "quantile": None, "count": 0, "optimistic": False,
                "note": "fixed by eval.threshold"}
    if rule not in THRESHOLD_RULES:
        raise ConfigError(f"eval.threshold={rule!r}: use one of {THRESHOLD_RULES} or a number.")
    labels = None if val_labels is None else np.asarray(val_labels, int)
    labelled = (labels is not None and val_scores is not None and len(labels) > 0
                and labels.min() == 0 and labels.max() == 1)
    if rule == "f1_val" and not labelled:
        raise ConfigError("eval.threshold='f1_val' needs a validation set with good and anomalous "
                         "images; this dataset's validation set has none. Use "
                         "eval.threshold='quantile' (or 'auto') or a number.")
    if rule in ("f1_val", "auto") and labelled:
        value, f1 = f1_max_threshold(labels, val_scores)
        return {"value": value, "rule": "f1_val", "source": val_source, "quantile": None,
                "count": int(len(labels)), "optimistic": False,
                "note": f"F1-max point on the labelled {val_source} set (F1 {f1:.4f})"}
    good = None
    if val_scores is not None and len(val_scores):
        good = np.asarray(val_scores, np.float64)
        if labels is not None:
            good = good[labels == 0]
    if good is not None and len(good):
        return {"value": float(np.quantile(good, q)), "rule": "quantile", "source": val_source,
                "quantile": q, "count": int(len(good)), "optimistic": False,
                "note": f"{q} quantile of the scores of {len(good)} held-out good images "
                        f"({val_source})"}
    if train_scores is None or not len(train_scores):
        raise ConfigError("No images to choose a decision threshold on: give held-out good "
                         "images (data.validation_fraction > 0) or a number as eval.threshold.")
    ts = np.asarray(train_scores, np.float64)
    return {"value": float(np.quantile(ts, q)), "rule": "quantile", "source": "train",
            "quantile": q, "count": int(len(ts)), "optimistic": True,
            "note": (f"{q} quantile of the scores of the {len(ts)} TRAINING images (no held-out "
                     "images: data.validation_fraction is 0). Optimistic: the model was "
                     "trained on these images, so new good images score higher; hold out "
                     "images (data.validation_fraction=0.1) or set eval.threshold to a number.")}


def _is_number(v) -> bool:
    try:
        float(v)
    except (TypeError, ValueError):
        return False
    return True


def confusion_at(labels, scores, threshold: float) -> Dict[str, float]:
    """Precision, recall and counts of the decision ``score > threshold``."""
    labels = np.asarray(labels, int)
    pred = np.asarray(scores, np.float64) > float(threshold)
    tp = int(np.sum(pred & (labels == 1)))
    fp = int(np.sum(pred & (labels == 0)))
    fn = int(np.sum(~pred & (labels == 1)))
    tn = int(np.sum(~pred & (labels == 0)))
    precision = tp / (tp + fp) if tp + fp else float("nan")
    recall = tp / (tp + fn) if tp + fn else float("nan")
    return {"threshold": float(threshold), "precision": precision, "recall": recall,
            "tp": tp, "fp": fp, "fn": fn, "tn": tn}
