"""Figures of an evaluation: ROC curves and anomaly-map overlays (matplotlib, Agg).

Pure host-side plotting; every function writes one PNG and returns its path.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np


def _figure(figsize, dpi):
    """A Figure on its own Agg canvas: no pyplot, no global backend switch (safe in notebooks)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def _to_display_image(img: np.ndarray) -> np.ndarray:
    """uint8 or float (in [0, 1], or ImageNet-normalized) HxW[xC] -> float RGB in [0, 1]."""
    img = np.asarray(img)
    if img.ndim == 3 and img.shape[-1] == 1:
        img = img[..., 0]
    if img.dtype == np.uint8:
        out = img.astype(np.float32) / 255.0
    else:
        out = img.astype(np.float32)
        lo, hi = float(out.min()), float(out.max())
        if lo < 0.0 or hi > 1.0:  # normalized input: stretch for display
            out = (out - lo) / max(hi - lo, 1e-12)
    if out.ndim == 2:
        out = np.stack([out] * 3, -1)
    return np.clip(out, 0.0, 1.0)


def roc_figure(path: str, labels, scores, kinds: Optional[Sequence[str]] = None,
               title: str = "") -> str:
    """Image-level ROC curve(s); with ``kinds`` one curve per anomaly kind vs the good images."""
    from sklearn.metrics import roc_auc_score, roc_curve

    labels = np.asarray(labels).astype(int)
    scores = np.asarray(scores, dtype=np.float64)
    curves = []
    if kinds is not None:
        kinds = np.asarray([str(k) if k is not None else "good" for k in kinds])
        bad_kinds = sorted({k for k, lab in zip(kinds, labels) if lab == 1})
        for k in bad_kinds:
            sel = (labels == 0) | (kinds == k)
            curves.append((k, labels[sel], scores[sel]))
        if len(bad_kinds) > 1:
            curves.append(("all", labels, scores))
    else:
        curves.append(("all", labels, scores))
    fig = _figure((4.5, 4.5), 100)
    ax = fig.subplots()
    for name, lab, sc in curves:
        if lab.min() == lab.max():
            continue  # undefined: one class only
        fpr, tpr, _ = roc_curve(lab, sc)
        ax.plot(fpr, tpr, label=f"{name} (AUROC {100 * roc_auc_score(lab, sc):.1f}%)")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_title(title or "image-level ROC")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    return path


def overlay_figure(path: str, images, maps, labels, scores, indices: Sequence[int],
                   masks=None, names: Optional[Sequence[str]] = None, title: str = "",
                   kinds: Optional[Sequence[str]] = None) -> str:
    """Grid, one row per chosen image: image | ground truth | anomaly map over the image.

    All maps share one colour scale (the 1st-99.9th percentile of the shown
    maps), so good and anomalous rows are comparable. The image score is in
    the title of the map panel.
    """
    indices = list(indices)
    shown = [np.asarray(maps[i], dtype=np.float32) for i in indices]
    if shown:
        allv = np.concatenate([m.ravel() for m in shown])
        vmin, vmax = np.percentile(allv, [1.0, 99.9])
        if vmax <= vmin:
            vmax = vmin + 1e-6
    else:
        vmin, vmax = 0.0, 1.0
    ncol = 3
    nrow = max(len(indices), 1)
    fig = _figure((3 * ncol, 2.8 * nrow), 80)
    axes = fig.subplots(nrow, ncol, squeeze=False)
    for r, i in enumerate(indices):
        img = _to_display_image(images[i])
        h, w = img.shape[:2]
        m = shown[r]
        label = "anomalous" if int(labels[i]) else "good"
        if kinds is not None and kinds[i]:
            label = str(kinds[i])
        name = names[i] if names is not None else f"#{i}"
        axes[r, 0].imshow(img)
        axes[r, 0].set_title(f"{name}\n({label})", fontsize=7)
        if masks is not None:
            axes[r, 1].imshow(np.asarray(masks[i]).astype(np.float32), cmap="gray", vmin=0,
                              vmax=1, extent=(0, w, h, 0))
            axes[r, 1].set_title("ground truth", fontsize=7)
        else:
            axes[r, 1].set_title("no ground truth", fontsize=7)
            axes[r, 1].set_frame_on(False)
        axes[r, 2].imshow(img)
        axes[r, 2].imshow(m, cmap="jet", alpha=0.5, vmin=vmin, vmax=vmax, extent=(0, w, h, 0))
        axes[r, 2].set_title(f"anomaly map, score {float(scores[i]):.4g}", fontsize=7)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    if not indices:
        for ax in axes[0]:
            ax.axis("off")
    height = 2.8 * nrow
    if title:
        fig.suptitle(title, fontsize=9)
        fig.tight_layout(rect=(0, 0, 1, 1 - 0.3 / height))
    else:
        fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    return path


def heat_overlay(image: np.ndarray, amap: np.ndarray, lo: float, hi: float,
                 alpha: float = 0.5) -> np.ndarray:
    """uint8 RGB: the anomaly map (jet, ``lo`` .. ``hi``) over the image, ``alpha`` of it;
    the map is resized (bilinear) to the image when their sizes differ."""
    from matplotlib import colormaps
    from PIL import Image

    img = _to_display_image(np.asarray(image))
    img = (np.clip(img, 0, 1) * 255).astype(np.uint8)
    h, w = img.shape[:2]
    m = np.clip((np.asarray(amap, np.float32) - lo) / max(hi - lo, 1e-12), 0.0, 1.0)
    if m.shape != (h, w):
        m = np.asarray(Image.fromarray(m).resize((w, h), Image.BILINEAR))
    heat = (colormaps["jet"](m)[..., :3] * 255).astype(np.float32)
    return ((1 - alpha) * img.astype(np.float32) + alpha * heat).astype(np.uint8)


def mask_overlay(image: np.ndarray, mask: Optional[np.ndarray]) -> np.ndarray:
    """uint8 RGB: the image dimmed, with the ground-truth mask's pixels in red; without a
    mask (None) a plain grey panel."""
    from PIL import Image

    img = (_to_display_image(np.asarray(image)) * 255).astype(np.float32)
    h, w = img.shape[:2]
    if mask is None:
        return np.full((h, w, 3), 200, np.uint8)
    m = np.asarray(mask, np.float32)
    if m.shape != (h, w):
        m = np.asarray(Image.fromarray(m).resize((w, h), Image.NEAREST))
    m = (m > 0.5)[..., None]
    out = np.where(m, 0.35 * img + 0.65 * np.array([255.0, 0.0, 0.0]), 0.45 * img)
    return out.astype(np.uint8)


def save_overlay(path: str, image: np.ndarray, amap: np.ndarray, score: float,
                 threshold: Optional[float] = None) -> str:
    """One PNG: the image | the anomaly map over it (jet, 50%), with the score and the
    decision in a caption. The colour scale is fixed by the threshold (0 .. 1.5 x
    threshold; red means above it) so that images are comparable; without a
    threshold it spans the map's own range."""
    from PIL import Image, ImageDraw

    img = (np.clip(_to_display_image(np.asarray(image)), 0, 1) * 255).astype(np.uint8)
    h, w = img.shape[:2]
    m = np.asarray(amap, np.float32)
    if threshold is not None and threshold > 0:
        lo, hi = 0.0, 1.5 * float(threshold)
    else:
        lo, hi = float(m.min()), float(m.max())
    blend = heat_overlay(img, m, lo, hi)
    bar = 18
    canvas = Image.new("RGB", (2 * w, h + bar), (255, 255, 255))
    canvas.paste(Image.fromarray(img), (0, bar))
    canvas.paste(Image.fromarray(blend), (w, bar))
    text = f"score {score:.4g}"
    if threshold is not None:
        text += f"  {'ANOMALOUS' if score > threshold else 'good'} (threshold {threshold:.4g})"
    ImageDraw.Draw(canvas).text((3, 3), text, fill=(200, 0, 0) if (
        threshold is not None and score > threshold) else (0, 0, 0))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    canvas.save(path)
    return path
