"""Dataset readers: MVTec AD, MVTec LOCO AD (and kdjax's synthetic set), folders.

Everything here is host-side numpy + PIL; nothing imports TensorFlow or JAX.
The layouts are those of docs/DATA.md:

MVTec AD (and "folder", the same layout with any category name and optional masks)::

    <root>/<category>/train/good/000.png
    <root>/<category>/test/{good,<defect_type>}/000.png
    <root>/<category>/ground_truth/<defect_type>/000_mask.png

MVTec LOCO AD (and "synthetic", written by kdjax.data.synthetic)::

    <root>/<category>/{train,validation}/good/000.png
    <root>/<category>/test/{good,logical_anomalies,structural_anomalies}/000.png
    <root>/<category>/ground_truth/{logical_anomalies,structural_anomalies}/000/000.png ...
    <root>/<category>/defects_config.json

Resizing convention (used by ``load_images`` and, identically up to one grey
level, by the tf.data pipeline in kdjax.data.pipeline): antialiased bilinear
interpolation, i.e. PIL ``Image.resize((S, S), Image.BILINEAR)`` on the RGB
image (PIL widens the triangle filter by the downscaling factor, which is the
same filter as ``tf.image.resize(method="bilinear", antialias=True)``).
"""

from __future__ import annotations

from kdjax.errors import DataError

import concurrent.futures
import dataclasses
import json
import logging
import os
import threading
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from kdjax.data.types import (DATASETS, MVTEC_AD_CATEGORIES, MVTEC_LOCO_CATEGORIES,
                              GTRegion, Record, RegionSpec)

log = logging.getLogger("kdjax.data")

DATASET_URL = "https://www.mvtec.com/company/research/datasets"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif")
# Files that operating systems and archivers leave behind: ignored without a word.
_SYSTEM_FILES = {"thumbs.db", "desktop.ini", "__macosx", "icon\r", ".ds_store"}
SPLITS = ("train", "validation", "test")
LOCO_TEST_TYPES = ("good", "logical_anomalies", "structural_anomalies")
_LOCO_KIND = {"logical_anomalies": "logical", "structural_anomalies": "structural"}


class DatasetError(DataError):
    """A dataset directory is missing or malformed; the message says what to do."""


class ImageError(DataError):
    """An image file cannot be decoded (corrupt, truncated or not an image)."""


def _num_workers() -> int:
    return max(1, min(16, (os.cpu_count() or 1) * 2))


# ---------------------------------------------------------------------------
# Layout descriptions used in error messages.

_LAYOUT = {
    "mvtec_ad": (
        "MVTec AD",
        "<root>/<category>/train/good/000.png\n"
        "  <root>/<category>/test/{good,<defect_type>}/000.png\n"
        "  <root>/<category>/ground_truth/<defect_type>/000_mask.png"),
    "mvtec_loco": (
        "MVTec LOCO AD",
        "<root>/<category>/train/good/000.png\n"
        "  <root>/<category>/validation/good/000.png\n"
        "  <root>/<category>/test/{good,logical_anomalies,structural_anomalies}/000.png\n"
        "  <root>/<category>/ground_truth/{logical_anomalies,structural_anomalies}/000/000.png\n"
        "  <root>/<category>/defects_config.json"),
    "folder": (
        "an image folder in the MVTec AD layout",
        "<root>/<category>/train/good/<name>.png\n"
        "  <root>/<category>/test/{good,<defect_type>}/<name>.png\n"
        "  <root>/<category>/ground_truth/<defect_type>/<name>_mask.png (optional)"),
}
_LAYOUT["synthetic"] = ("kdjax's synthetic LOCO-layout dataset", _LAYOUT["mvtec_loco"][1])


def _where_to_get(dataset: str) -> str:
    if dataset == "synthetic":
        return ("kdjax generates it: call kdjax.data.ensure_synthetic(root) or run "
                "`python -m kdjax.data.synthetic --out <root>` (configs/demo.py does this for you)")
    if dataset == "folder":
        return "arrange your own images in that layout"
    return (f"download it from {DATASET_URL} (a person must accept the licence; it cannot be "
            f"downloaded by a program) and extract it")


def _missing_root_error(dataset: str, root: str) -> DatasetError:
    name, layout = _LAYOUT[dataset]
    what = "is not set" if not root else f"{root!r} does not exist"
    return DatasetError(
        f"The dataset root {what}. Expected {name}: {_where_to_get(dataset)}, then pass its "
        f"directory with --config.data.root=/path/to/it. Expected layout:\n  {layout}")


# ---------------------------------------------------------------------------
# Directory listing.

def _is_hidden(name: str) -> bool:
    return name.startswith(".") or name.startswith("._") or name.lower() in _SYSTEM_FILES


def _is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _list_images(folder: str) -> List[str]:
    """Sorted image paths in ``folder``; hidden/system files skipped silently,
    other non-image files and sub-folders skipped with a warning."""
    out = []
    for name in sorted(os.listdir(folder)):
        if _is_hidden(name):
            continue
        path = os.path.join(folder, name)
        if os.path.isdir(path) or not _is_image_name(name):
            log.warning("Ignoring %s: not an image file (expected one of %s).",
                        path, ", ".join(IMAGE_EXTENSIONS))
            continue
        out.append(path)
    return out


def _subdirs(folder: str) -> List[str]:
    if not os.path.isdir(folder):
        return []
    return sorted(d for d in os.listdir(folder)
                  if not _is_hidden(d) and os.path.isdir(os.path.join(folder, d)))


def _looks_like_category(d: str) -> bool:
    return os.path.isdir(os.path.join(d, "train")) or os.path.isdir(os.path.join(d, "test"))


def _is_loco_category(d: str) -> bool:
    return (os.path.isfile(os.path.join(d, "defects_config.json"))
            or os.path.isdir(os.path.join(d, "validation"))
            or any(os.path.isdir(os.path.join(d, "test", t)) for t in _LOCO_KIND))


def _is_ad_category(d: str) -> bool:
    gt = os.path.join(d, "ground_truth")
    for t in _subdirs(gt):
        for name in os.listdir(os.path.join(gt, t)):
            if "_mask." in name:
                return True
    return False


def _check_category_dir(dataset: str, root: str, category: str) -> str:
    """Return <root>/<category> after checking the layout; raise DatasetError
    naming what was found when the root is missing, holds another dataset, or
    holds the category folders one level deeper or shallower."""
    if dataset not in DATASETS:
        raise DatasetError(f"Unknown dataset {dataset!r}. Choose one of: {', '.join(DATASETS)}.")
    if not root or not os.path.isdir(root):
        raise _missing_root_error(dataset, root)
    name, layout = _LAYOUT[dataset]
    cat_dir = os.path.join(root, category)
    loco_like = dataset in ("mvtec_loco", "synthetic")
    if os.path.isdir(cat_dir) and _looks_like_category(cat_dir):
        if dataset == "mvtec_ad" and _is_loco_category(cat_dir):
            raise DatasetError(
                f"{cat_dir} holds the MVTec LOCO AD layout (validation/, defects_config.json or "
                f"logical_/structural_anomalies found), but the dataset is 'mvtec_ad'. Pass "
                f"--config.data.dataset=mvtec_loco, or point --config.data.root at MVTec AD.")
        if loco_like and not _is_loco_category(cat_dir) and _is_ad_category(cat_dir):
            raise DatasetError(
                f"{cat_dir} holds the MVTec AD layout (ground_truth/<type>/NNN_mask.png, no "
                f"validation/ or defects_config.json), but the dataset is {dataset!r}. Pass "
                f"--config.data.dataset=mvtec_ad, or point --config.data.root at {name}.")
        return cat_dir
    # The category folder is missing: find out what the root holds instead.
    if os.path.isdir(cat_dir):
        # <root>/<category>/<something>/train: one level too deep.
        for sub in _subdirs(cat_dir):
            if _looks_like_category(os.path.join(cat_dir, sub)):
                raise DatasetError(
                    f"{cat_dir} has no train/ or test/ folder, but "
                    f"{os.path.join(cat_dir, sub)} has: the category folders are one level "
                    f"deeper than expected. Pass --config.data.root={cat_dir} (and "
                    f"--config.data.category={sub}), or move the folders up one level.")
    if _looks_like_category(root):
        parent = os.path.dirname(os.path.abspath(root))
        raise DatasetError(
            f"The dataset root {root!r} is itself a category folder (it holds train/ or test/); "
            f"the root must be the folder that CONTAINS the category folders (one level up). "
            f"Pass --config.data.root={parent} --config.data.category="
            f"{os.path.basename(os.path.abspath(root))}.")
    deeper = [os.path.join(root, d) for d in _subdirs(root)
              if os.path.isdir(os.path.join(root, d, category))
              and _looks_like_category(os.path.join(root, d, category))]
    if deeper:
        raise DatasetError(
            f"Category {category!r} is not in {root!r} but was found one level deeper, in "
            f"{deeper[0]}: pass --config.data.root={deeper[0]}.")
    found = _subdirs(root)
    other_loco = [d for d in found if d in MVTEC_LOCO_CATEGORIES]
    other_ad = [d for d in found if d in MVTEC_AD_CATEGORIES]
    if dataset == "mvtec_ad" and other_loco and not other_ad:
        raise DatasetError(
            f"{root!r} holds MVTec LOCO AD categories ({', '.join(other_loco)}), not MVTec AD. "
            f"Pass --config.data.dataset=mvtec_loco, or point --config.data.root at MVTec AD.")
    if loco_like and other_ad and not other_loco:
        raise DatasetError(
            f"{root!r} holds MVTec AD categories ({', '.join(other_ad)}), not {name}. Pass "
            f"--config.data.dataset=mvtec_ad, or point --config.data.root at {name}.")
    raise DatasetError(
        f"Category {category!r} not found in {root!r} (found: "
        f"{', '.join(found) if found else 'no folders'}). Expected {name}, layout:\n  {layout}\n"
        f"Check --config.data.root and --config.data.category.")


# ---------------------------------------------------------------------------
# LOCO ground truth.

def read_defects_config(cat_dir: str) -> Dict[int, dict]:
    """Parse <category>/defects_config.json into {pixel_value: entry}, checking the
    types the official evaluator asserts (int saturation when absolute, float in
    (0, 1] when relative)."""
    path = os.path.join(cat_dir, "defects_config.json")
    if not os.path.isfile(path):
        raise DatasetError(
            f"{cat_dir} has a ground_truth/ folder but no defects_config.json. MVTec LOCO AD "
            f"ships one per category (it maps each region's pixel_value to its saturation "
            f"threshold); copy it from the original download into {cat_dir}.")
    try:
        with open(path) as f:
            entries = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise DatasetError(f"Cannot parse {path}: {e}. Restore it from the original download.")
    if isinstance(entries, dict):
        entries = entries.get("defects", list(entries.values()))
    table = {}
    for e in entries:
        try:
            value = int(e["pixel_value"])
            sat = e["saturation_threshold"]
            rel = bool(e["relative_saturation"])
            name = str(e["defect_name"])
        except (KeyError, TypeError, ValueError) as err:
            raise DatasetError(f"{path}: malformed entry {e!r} ({err}); each entry needs "
                               f"defect_name, pixel_value, saturation_threshold, "
                               f"relative_saturation.")
        if rel and not (isinstance(sat, float) and 0.0 < sat <= 1.0):
            raise DatasetError(f"{path}: entry {name!r} has relative_saturation=true, so its "
                               f"saturation_threshold must be a float in (0, 1], not {sat!r}.")
        if not rel and not (isinstance(sat, int) and not isinstance(sat, bool) and sat > 0):
            raise DatasetError(f"{path}: entry {name!r} has relative_saturation=false, so its "
                               f"saturation_threshold must be a positive int pixel count, not "
                               f"{sat!r}.")
        table[value] = dict(defect_name=name, saturation_threshold=sat, relative_saturation=rel)
    return table


_GT_VALUE_CACHE: Dict[tuple, int] = {}
_GT_CACHE_LOCK = threading.Lock()


def _gt_value(path: str) -> int:
    """The single nonzero value of a LOCO region PNG (cached per file and mtime)."""
    st = os.stat(path)
    key = (path, st.st_mtime_ns, st.st_size)
    with _GT_CACHE_LOCK:
        if key in _GT_VALUE_CACHE:
            return _GT_VALUE_CACHE[key]
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("L", "P"):  # fast path: the 256-bin histogram
                hist = im.histogram()[:256]
                vals = [v for v in range(1, 256) if hist[v]]
                nz = np.asarray(vals if vals else [], np.int64)
            else:
                nz = None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"Cannot read mask {path}: {e}. The file is corrupt or not an image; "
                         f"restore it from the original download.") from None
    if nz is None:
        arr = _read_mask_array(path)
        nz = arr[arr != 0]
    if nz.size == 0:
        raise DatasetError(f"Ground-truth region {path} is empty (all pixels 0); each region "
                           f"PNG must hold its defect's pixel_value. Restore the file.")
    lo, hi = int(nz.min()), int(nz.max())
    if lo != hi:
        raise DatasetError(f"Ground-truth region {path} holds several nonzero values "
                           f"({lo}..{hi}); a LOCO region PNG holds exactly one pixel_value.")
    with _GT_CACHE_LOCK:
        _GT_VALUE_CACHE[key] = lo
    return lo


def _read_mask_array(path: str) -> np.ndarray:
    """A mask/region PNG as a 2-D integer array (first channel if it has several)."""
    try:
        with Image.open(path) as im:
            im.load()
            arr = np.asarray(im)  # palette images: the indices, as the official evaluator
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"Cannot read mask {path}: {e}. The file is corrupt or not an image; "
                         f"restore it from the original download.") from None
    if arr.ndim == 3:
        arr = arr[..., 0]
    return arr


# ---------------------------------------------------------------------------
# Listing.

def list_records(dataset: str, root: str, category: str, split: str) -> List[Record]:
    """All images of one split of one category, sorted by defect type then file name.

    dataset: "mvtec_ad" | "mvtec_loco" | "folder" | "synthetic" (read like mvtec_loco).
    split: "train" | "validation" | "test". MVTec AD and folder have no validation
    split: use ``split_train_val(list_records(..., "train"), fraction, seed)``.
    LOCO region PNGs are opened to find their pixel_value (validated against
    defects_config.json; values are cached per file).
    """
    if split not in SPLITS:
        raise DatasetError(f"Unknown split {split!r}. Choose one of: {', '.join(SPLITS)}.")
    if dataset in ("mvtec_ad", "folder") and split == "validation":
        raise DatasetError(
            f"{dataset} has no validation split. Hold out part of the training images with "
            f"kdjax.data.split_train_val(list_records({dataset!r}, root, category, 'train'), "
            f"fraction, seed) (EfficientAD uses fraction=0.1; config key data.validation_fraction).")
    cat_dir = _check_category_dir(dataset, root, category)
    loco = dataset in ("mvtec_loco", "synthetic")
    if split in ("train", "validation"):
        folder = os.path.join(cat_dir, split, "good")
        if not os.path.isdir(folder):
            raise DatasetError(f"{folder} is missing. Expected layout:\n  {_LAYOUT[dataset][1]}")
        paths = _list_images(folder)
        if not paths:
            raise DatasetError(f"{folder} holds no images: category {category!r} is empty or "
                               f"incomplete. Re-extract it from the original download.")
        return [Record(p, category, split, "good", 0) for p in paths]

    test_dir = os.path.join(cat_dir, "test")
    if not os.path.isdir(test_dir):
        raise DatasetError(f"{test_dir} is missing. Expected layout:\n  {_LAYOUT[dataset][1]}")
    types = _subdirs(test_dir)
    if not types:
        raise DatasetError(f"{test_dir} holds no defect-type folders (expected good/ and the "
                           f"defect folders).")
    if loco:
        return _list_loco_test(dataset, cat_dir, category, types)
    return _list_ad_test(dataset, cat_dir, category, types)


def _list_ad_test(dataset, cat_dir, category, types) -> List[Record]:
    records = []
    gt_root = os.path.join(cat_dir, "ground_truth")
    for t in types:
        for p in _list_images(os.path.join(cat_dir, "test", t)):
            if t == "good":
                records.append(Record(p, category, "test", "good", 0))
                continue
            stem = os.path.splitext(os.path.basename(p))[0]
            mask = None
            for cand in (f"{stem}_mask.png", f"{stem}.png", f"{stem}_mask.bmp",
                         f"{stem}_mask.tif", f"{stem}_mask.jpg"):
                if os.path.isfile(os.path.join(gt_root, t, cand)):
                    mask = os.path.join(gt_root, t, cand)
                    break
            if mask is None and dataset == "mvtec_ad":
                raise DatasetError(
                    f"No ground-truth mask for {p}: expected "
                    f"{os.path.join(gt_root, t, stem + '_mask.png')}. Restore the ground_truth/ "
                    f"folder from the original download.")
            records.append(Record(p, category, "test", t, 1,
                                  mask_paths=(mask,) if mask else ()))
    return records


def _list_loco_test(dataset, cat_dir, category, types) -> List[Record]:
    gt_root = os.path.join(cat_dir, "ground_truth")
    config = None
    if os.path.isdir(gt_root) or any(t != "good" for t in types):
        config = read_defects_config(cat_dir)
    records, pending = [], []
    for t in types:
        if t not in LOCO_TEST_TYPES:
            log.warning("Ignoring %s: MVTec LOCO AD test folders are %s.",
                        os.path.join(cat_dir, "test", t), ", ".join(LOCO_TEST_TYPES))
            continue
        for p in _list_images(os.path.join(cat_dir, "test", t)):
            if t == "good":
                records.append(Record(p, category, "test", "good", 0))
                continue
            stem = os.path.splitext(os.path.basename(p))[0]
            gt_dir = os.path.join(gt_root, t, stem)
            if not os.path.isdir(gt_dir):
                raise DatasetError(f"No ground-truth folder for {p}: expected {gt_dir}/000.png "
                                   f"... Restore ground_truth/ from the original download.")
            regions = [q for q in _list_images(gt_dir)]
            if not regions:
                raise DatasetError(f"Ground-truth folder {gt_dir} holds no region PNGs.")
            records.append(None)
            pending.append((len(records) - 1, p, t, regions))
    # Read every region PNG's value (in threads) and look it up in defects_config.json.
    all_regions = [q for (_, _, _, regs) in pending for q in regs]
    with concurrent.futures.ThreadPoolExecutor(_num_workers()) as ex:
        values = dict(zip(all_regions, ex.map(_gt_value, all_regions)))
    cfg_path = os.path.join(cat_dir, "defects_config.json")
    for idx, p, t, regs in pending:
        specs = []
        for q in regs:
            v = values[q]
            if v not in config:
                raise DatasetError(
                    f"Ground-truth region {q} holds pixel value {v}, which {cfg_path} does not "
                    f"list (known values: {sorted(config)}). The ground truth and "
                    f"defects_config.json do not belong together; restore both from the "
                    f"original download.")
            e = config[v]
            specs.append(RegionSpec(q, v, e["defect_name"], e["saturation_threshold"],
                                    e["relative_saturation"]))
        records[idx] = Record(p, category, "test", t, 1, mask_paths=tuple(regs),
                              regions=tuple(specs), anomaly_kind=_LOCO_KIND[t])
    return records


def split_train_val(records: Sequence[Record], fraction: float,
                    seed: int) -> Tuple[List[Record], List[Record]]:
    """Seeded random hold-out of ``fraction`` of ``records`` as a validation set.

    Sizes follow EfficientAD (n_train = int((1 - fraction) * n), the rest is
    validation). Both parts keep the input order; validation records get
    split="validation".
    """
    records = list(records)
    n = len(records)
    if not 0.0 < fraction < 1.0:
        raise DatasetError(f"split_train_val: fraction must be in (0, 1), got {fraction}.")
    n_train = int((1.0 - fraction) * n)
    n_train = min(max(n_train, 1), n - 1)
    if n < 2:
        raise DatasetError(f"split_train_val needs at least 2 records, got {n}.")
    perm = np.random.default_rng(seed).permutation(n)
    val_idx = set(perm[n_train:].tolist())
    train = [r for i, r in enumerate(records) if i not in val_idx]
    val = [dataclasses.replace(r, split="validation") for i, r in enumerate(records)
           if i in val_idx]
    return train, val


# ---------------------------------------------------------------------------
# Images.

def _corrupt(path: str, err: Exception) -> ImageError:
    return ImageError(
        f"Cannot decode image {path}: {type(err).__name__}: {err}. The file is corrupt, "
        f"truncated or not an image: replace it from the original download, delete it, or "
        f"pass --config.data.on_corrupt=skip to skip such files.")


def _to_rgb_pil(im: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB. 16/32-bit integer images keep their
    top 8 bits (v >> 8, as tf.image.convert_image_dtype does); float images are
    taken as [0, 1] when their max is <= 1, else clipped to [0, 255]."""
    if im.mode == "RGB":
        return im
    if im.mode.startswith("I;16") or im.mode in ("I", "F"):
        arr = np.asarray(im)
        if im.mode == "F":
            arr = arr * 255.0 if arr.max() <= 1.0 else arr
            arr = np.clip(np.round(arr), 0, 255).astype(np.uint8)
        else:
            arr = (np.clip(arr.astype(np.int64), 0, 65535) >> 8).astype(np.uint8)
        return Image.fromarray(np.repeat(arr[..., None], 3, axis=-1), "RGB")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    return im.convert("RGB")


def _open_rgb(path: str) -> Image.Image:
    try:
        with Image.open(path) as im:
            im.load()
            return _to_rgb_pil(im)
    except ImageError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, EOFError) as e:
        raise _corrupt(path, e) from None


def read_image(path: str) -> np.ndarray:
    """Decode ``path`` to uint8 RGB (H, W, 3) at its original resolution.

    Grayscale, palette, RGBA (alpha dropped) and 16-bit images become 3-channel
    8-bit RGB. Raises ImageError naming the file if it cannot be decoded.
    """
    return np.asarray(_open_rgb(path))


def _resize_rgb(im: Image.Image, size: int) -> np.ndarray:
    if im.size != (size, size):
        im = im.resize((size, size), Image.BILINEAR)  # antialiased when downscaling
    return np.asarray(im)


def _load_one(path: str, size: int) -> np.ndarray:
    return _resize_rgb(_open_rgb(path), size)


def load_images(records: Sequence[Record], image_size: int,
                on_corrupt: str = "raise") -> Tuple[np.ndarray, List[Record]]:
    """Decode and resize images to (N, S, S, 3) uint8 with antialiased bilinear
    interpolation (PIL BILINEAR; see module doc), using a thread pool.

    on_corrupt="raise": an undecodable file raises ImageError naming it.
    on_corrupt="skip": such files are skipped with a warning naming each; the
    returned records are those kept, in order.
    """
    if on_corrupt not in ("raise", "skip"):
        raise ValueError(f"on_corrupt must be 'raise' or 'skip', got {on_corrupt!r}.")
    records = list(records)
    size = int(image_size)

    def work(r):
        try:
            return _load_one(r.image_path, size)
        except ImageError as e:
            if on_corrupt == "raise":
                raise
            return e

    out = np.zeros((len(records), size, size, 3), np.uint8)
    kept = []
    with concurrent.futures.ThreadPoolExecutor(_num_workers()) as ex:
        for r, res in zip(records, ex.map(work, records)):
            if isinstance(res, ImageError):
                log.warning("Skipping corrupt image (data.on_corrupt=skip): %s", res)
                continue
            out[len(kept)] = res
            kept.append(r)
    return out[:len(kept)], kept


def _header_size(path: str) -> Tuple[int, int]:
    try:
        with Image.open(path) as im:
            w, h = im.size
    except (OSError, SyntaxError, ValueError) as e:
        raise _corrupt(path, e) from None
    return h, w


def original_sizes(records: Sequence[Record]) -> List[Tuple[int, int]]:
    """(H, W) of each record's image, read from the file headers only."""
    with concurrent.futures.ThreadPoolExecutor(_num_workers()) as ex:
        return list(ex.map(lambda r: _header_size(r.image_path), records))


# ---------------------------------------------------------------------------
# Masks and regions.

def _check_same_size(image_path: str, mask_path: str, mask_hw) -> Tuple[int, int]:
    hw = _header_size(image_path)
    if tuple(mask_hw) != tuple(hw):
        raise DatasetError(
            f"Mask {mask_path} is {mask_hw[1]}x{mask_hw[0]} (WxH) but its image {image_path} is "
            f"{hw[1]}x{hw[0]}: a mask must have its image's size. Restore the mask from the "
            f"original download.")
    return hw


def _binary_resize(mask01: np.ndarray, size: Optional[int]) -> np.ndarray:
    """Resize a {0,1} mask bilinearly (antialiased) to (S, S) and binarize at 0.5
    (the reference code's Resize + ToTensor + gt > 0.5; docs/METRICS.md)."""
    if size is None:
        return mask01.astype(np.uint8)
    im = Image.fromarray((mask01 * 255).astype(np.uint8), "L")
    if im.size != (size, size):
        im = im.resize((size, size), Image.BILINEAR)
    return (np.asarray(im) > 127).astype(np.uint8)


def _nearest_resize(mask: np.ndarray, size: Optional[int]) -> np.ndarray:
    if size is None or mask.shape == (size, size):
        return mask
    im = Image.fromarray(mask.astype(np.uint8) * 255, "L").resize((size, size), Image.NEAREST)
    return np.asarray(im) > 0


def load_regions(record: Record, size: Optional[int] = None) -> List[GTRegion]:
    """LOCO ground-truth regions of one record as GTRegion(bool mask, saturation
    threshold, relative flag): original resolution, or (S, S) nearest-neighbour
    when ``size`` is given. Good images (and non-LOCO records) give []."""
    out = []
    for spec in record.regions:
        arr = _read_mask_array(spec.mask_path)
        _check_same_size(record.image_path, spec.mask_path, arr.shape)
        mask = _nearest_resize(arr == spec.pixel_value, size)
        out.append(GTRegion(mask, spec.saturation_threshold, spec.relative_saturation))
    return out


def _load_mask(record: Record, size: Optional[int]) -> np.ndarray:
    if record.regions:  # LOCO: union of the regions (nearest-resized like load_regions)
        regions = load_regions(record, size)
        m = np.zeros_like(regions[0].mask, dtype=bool)
        for g in regions:
            m |= g.mask
        return m.astype(np.uint8)
    if record.mask_paths:
        path = record.mask_paths[0]
        arr = _read_mask_array(path)
        _check_same_size(record.image_path, path, arr.shape)
        return _binary_resize((arr > 127).astype(np.uint8), size)
    if record.label:
        raise DatasetError(
            f"{record.image_path} is anomalous but has no ground-truth mask, so pixel-level "
            f"metrics cannot be computed for this dataset. Add "
            f"ground_truth/{record.defect_type}/<name>_mask.png files, or evaluate image-level "
            f"metrics only.")
    if size is not None:
        return np.zeros((size, size), np.uint8)
    return np.zeros(_header_size(record.image_path), np.uint8)


def load_masks(records: Sequence[Record], size: Optional[int] = None) -> np.ndarray:
    """Ground-truth masks (N, H, W) uint8 in {0, 1}.

    Good images give zeros. size=S: MVTec AD/folder masks are resized
    bilinearly to (S, S) and binarized at 0.5 (docs/METRICS.md); LOCO records give
    the union of their regions, each resized nearest-neighbour. size=None:
    original resolution (all images must then share one size).
    """
    records = list(records)
    with concurrent.futures.ThreadPoolExecutor(_num_workers()) as ex:
        masks = list(ex.map(lambda r: _load_mask(r, size), records))
    if not masks:
        s = size or 0
        return np.zeros((0, s, s), np.uint8)
    shapes = {m.shape for m in masks}
    if len(shapes) > 1:
        raise DatasetError(
            f"The images have different sizes ({sorted(shapes)[:4]}...), so their masks cannot "
            f"be stacked at original resolution: pass size=S, or load them one record at a time.")
    return np.stack(masks)


def has_masks(records: Sequence[Record]) -> bool:
    """Whether every anomalous record has pixel ground truth (folder datasets may not)."""
    return all(r.mask_paths or not r.label for r in records)
