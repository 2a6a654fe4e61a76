"""Score new images with a trained workdir: anomaly maps, scores and decisions.

    from kdjax.predict import Predictor
    p = Predictor.from_workdir("runs/demo")            # category=... when there are several
    maps, scores = p.predict(["img1.png", "img2.png"])  # one path, a list, or uint8 (N, S, S, 3)
    p.is_anomalous(scores)                             # score > p.threshold

The model is ``<workdir>/model/<category>/`` (kdjax.inference.Model): the map
is the one the evaluation used, the score its maximum at the input size.

From the command line (the config comes from the workdir)::

    python -m kdjax.main --mode=predict --workdir=runs/demo --input=new_images/ \
        [--output=DIR] [--category=C] [--maps] [--max_overlays=100]

writes ``DIR/predictions.csv`` (path,category,score,is_anomalous,threshold),
``DIR/overlays/*.png`` and, with ``--maps``, ``DIR/maps/*.tiff``.
"""

from __future__ import annotations

import csv
import glob
import logging
import os
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np

from kdjax import inference
from kdjax.errors import ConfigError, DataError

log = logging.getLogger("kdjax")


class Predictor:
    """Maps, scores and decisions of a trained model for image files or arrays."""

    def __init__(self, model: inference.Model):
        self.model = model
        self.category = model.category
        self.config = model.config

    @classmethod
    def from_workdir(cls, workdir: str, category: Optional[str] = None) -> "Predictor":
        return cls(inference.load_model(workdir, category))

    @property
    def threshold(self) -> Optional[float]:
        return self.model.threshold_value

    @property
    def image_size(self) -> int:
        return self.model.size

    def load(self, paths: Sequence[str], on_corrupt: str = "raise"):
        """(uint8 (N, S, S, 3), kept paths, skipped paths, original sizes) of image files,
        converted as in training (any size, grayscale, RGBA, 16-bit)."""
        from kdjax import data
        from kdjax.data.types import Record

        recs = [Record(str(p), self.category, "test", "unknown", 0) for p in paths]
        prep = data.Preprocess.from_config(self.config)  # data.resize, data.image_filter
        images, kept = data.load_images(recs, self.model.size, on_corrupt=on_corrupt,
                                        why="", **prep.image_kw)
        kept_paths = [r.image_path for r in kept]
        skipped = [str(p) for p in paths if str(p) not in set(kept_paths)]
        sizes = data.original_sizes(kept) if kept else []
        return images, kept_paths, skipped, sizes

    def predict(self, images: Union[str, os.PathLike, np.ndarray, Sequence[str]],
                resolution: str = "input") -> Tuple[Union[np.ndarray, list], np.ndarray]:
        """(maps, scores) for one path, a list of paths, or uint8 images (N, S, S, 3).

        ``resolution``: "input" (maps (N, S, S) at data.image_size) or "original"
        (each file's own size; paths only). The score is the map's maximum at the
        input size in both cases; ``is_anomalous(scores)`` applies the threshold."""
        if isinstance(images, (str, os.PathLike)):
            images = [os.fspath(images)]
        if isinstance(images, np.ndarray):
            if resolution != "input":
                raise ValueError("resolution='original' needs file paths (arrays have no "
                                 "original size).")
            return self.model.predict(images)
        paths = list(images)
        if not paths:
            raise ValueError("predict got an empty list of images.")
        arr, _, _, sizes = self.load(paths)
        if resolution not in ("input", "original"):
            raise ValueError(f"resolution={resolution!r}: use 'input' or 'original'.")
        if resolution == "original":
            return self.original_maps(arr, sizes)
        return self.model.predict(arr)

    def original_maps(self, images: np.ndarray, sizes) -> Tuple[Union[np.ndarray, list],
                                                                 np.ndarray]:
        """(maps at each image's original (H, W), scores) of uint8 input images: the
        inverse of the config's ``data.resize`` (kdjax.data.images.restore_map)."""
        from kdjax import data

        resize = data.Preprocess.from_config(self.config).resize
        maps, scores = self.model.predict(images, [data.request_size(s, resize) for s in sizes])
        return data.restore_maps(maps, sizes, resize), scores

    def is_anomalous(self, scores) -> np.ndarray:
        return self.model.is_anomalous(scores)


# ---------------------------------------------------------------------------
# --mode=predict
# ---------------------------------------------------------------------------

def resolve_inputs(spec: str) -> List[str]:
    """Image files named by ``spec``: a file, a folder (searched recursively) or a glob."""
    from kdjax.data.readers import IMAGE_EXTENSIONS

    def is_image(p):
        return os.path.isfile(p) and p.lower().endswith(tuple(IMAGE_EXTENSIONS))

    if os.path.isfile(spec):
        return [spec]
    if os.path.isdir(spec):
        out = []
        for root, dirs, names in os.walk(spec):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            out += [os.path.join(root, n) for n in sorted(names)
                    if not n.startswith(".") and is_image(os.path.join(root, n))]
        if not out:
            raise DataError(f"--input={spec!r}: the folder holds no image files "
                                    f"({', '.join(IMAGE_EXTENSIONS)}).")
        return out
    matches = sorted(p for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
    if not matches:
        raise DataError(f"--input={spec!r}: no such file or folder, and no file matches "
                                "it as a glob pattern.")
    return matches


def _out_name(path: str, common: str) -> str:
    rel = os.path.relpath(path, common) if common else os.path.basename(path)
    stem = os.path.splitext(rel)[0]
    return stem.replace(os.sep, "__").replace("/", "__")


def predict_cli(workdir: str, input_spec: str, output: Optional[str] = None,
                category: Optional[str] = None, write_maps: bool = False,
                max_overlays: int = 100, chunk: int = 64, gallery: bool = True) -> dict:
    """``--mode=predict``: score image files with ``<workdir>``'s model; returns a summary.
    ``gallery``: also write ``<output>/report.html`` (kdjax.report.write_gallery) with a
    thumbnail of every scored image."""
    from kdjax import progress, report, viz

    if not input_spec:
        raise ConfigError("--mode=predict needs --input=<file | folder | glob> of images.")
    paths = resolve_inputs(input_spec)
    p = Predictor.from_workdir(workdir, category)
    out = output or os.path.join(workdir, "predictions")
    os.makedirs(out, exist_ok=True)
    common = os.path.commonpath([os.path.dirname(os.path.abspath(x)) for x in paths])
    resolution = p.model.resolution
    threshold = p.threshold
    rows, skipped, overlays, entries = [], [], 0, []
    thumb = int((p.config.get("report", None) or {}).get("thumbnail_size", 160))
    lo_hi = None  # the gallery's colour scale, fixed by the first chunk
    bar = progress.Progress(len(paths), f"[{p.category}] predict", unit="img", summary=False)
    for i in range(0, len(paths), chunk):
        part = paths[i:i + chunk]
        images, kept, bad, sizes = p.load(part, on_corrupt="skip")
        skipped += bad
        if not kept:
            bar.update(len(part))
            continue
        maps_in, scores = p.model.predict(images)
        maps_out = (p.original_maps(images, sizes)[0] if write_maps and resolution == "original"
                    else maps_in)
        decisions = (scores > threshold) if threshold is not None else [False] * len(scores)
        if gallery and lo_hi is None:  # as the evaluation's report: threshold at 2/3
            lo_hi = report.colour_range(maps_in, threshold)
        for j, path in enumerate(kept):
            name = _out_name(os.path.abspath(path), common)
            rows.append({"path": path, "category": p.category, "score": float(scores[j]),
                         "is_anomalous": bool(decisions[j]),
                         "threshold": "" if threshold is None else float(threshold)})
            if write_maps:
                import tifffile

                os.makedirs(os.path.join(out, "maps"), exist_ok=True)
                tifffile.imwrite(os.path.join(out, "maps", name + ".tiff"),
                                 np.asarray(maps_out[j], np.float32))
            if overlays < int(max_overlays):
                os.makedirs(os.path.join(out, "overlays"), exist_ok=True)
                viz.save_overlay(os.path.join(out, "overlays", name + ".png"), images[j],
                                 maps_in[j], float(scores[j]), threshold)
                overlays += 1
            if gallery:
                rel = f"{report.FILES}/{len(entries):05d}.jpg"
                os.makedirs(os.path.join(out, report.FILES), exist_ok=True)
                report._save_jpeg(report.strip(images[j], maps_in[j], lo_hi[0], lo_hi[1], thumb,
                                               ground_truth=False), os.path.join(out, rel))
                entries.append({"name": os.path.relpath(os.path.abspath(path), common),
                                "type": os.path.dirname(os.path.relpath(os.path.abspath(path),
                                                                        common)) or ".",
                                "kind": "scored", "label": None, "score": float(scores[j]),
                                "pred": None if threshold is None else int(decisions[j]),
                                "img": rel})
        bar.update(len(part))
    bar.close()
    csv_path = os.path.join(out, "predictions.csv")
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["path", "category", "score", "is_anomalous",
                                          "threshold"])
        w.writeheader()
        w.writerows(rows)
    n_anom = sum(r["is_anomalous"] for r in rows)
    html_path = None
    if gallery and entries:
        html_path = report.write_gallery(out, p.category, entries, threshold,
                                         f"kdjax predictions: {p.category} ({input_spec})")
    log.info("[%s] %d images scored, %d anomalous (threshold %s), %d skipped%s; wrote %s",
             p.category, len(rows), n_anom, "none" if threshold is None else f"{threshold:.5g}",
             len(skipped), (" (" + ", ".join(skipped[:5]) + (", ..." if len(skipped) > 5 else "")
                            + ")") if skipped else "", csv_path)
    if html_path:
        log.info("[%s] gallery: %s", p.category, html_path)
    return {"csv": csv_path, "scored": len(rows), "anomalous": n_anom, "skipped": skipped,
            "output": out, "report": html_path}


def export_cli(workdir: str, output: Optional[str] = None, category: Optional[str] = None,
               onnx: Optional[bool] = None) -> dict:
    """``--mode=export``: ``DIR/<category>/model.jax`` (+ model.json, model.onnx) for the
    named category, or for every category of the workdir."""
    cats = ([inference.resolve_category(workdir, category)] if category
            else inference.workdir_categories(workdir) or [inference.resolve_category(workdir,
                                                                                        None)])
    out = output or os.path.join(workdir, "export")
    written = {}
    for c in cats:
        model = inference.load_model(workdir, c)
        written[c] = model.export(os.path.join(out, c), onnx=onnx)
        log.info("[%s] exported: %s", c, ", ".join(sorted(written[c].values())))
    return written
