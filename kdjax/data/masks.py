"""Ground truth: binary masks (MVTec AD, folder, VisA, MVTec AD 2, BTAD, MPDD) and LOCO
regions with their defects_config.json.

Host-side numpy + PIL. Masks follow the image's geometry (``resize``, kdjax.data.images)
and are resized with ``mask_resize``: "bilinear" (default: bilinear, antialiased, on the
0/255 mask, then > 127; the reference code's ``Resize`` + ``gt > 0.5``) or "nearest"
(PIL ``NEAREST`` on the binary mask; MRKD's data code). LOCO regions are always
resized nearest-neighbour.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import threading
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from kdjax.data.files import DatasetError, ImageError, file_key, num_workers, open_file
from kdjax.data.images import header_size, square_array
from kdjax.data.types import MASK_RESIZES, RESIZE_POLICIES, GTRegion, Record


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
    key = file_key(path)
    with _GT_CACHE_LOCK:
        if key in _GT_VALUE_CACHE:
            return _GT_VALUE_CACHE[key]
    try:
        with Image.open(open_file(path)) as im:
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
        with Image.open(open_file(path)) as im:
            im.load()
            arr = np.asarray(im)  # palette images: the indices, as the official evaluator
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"Cannot read mask {path}: {e}. The file is corrupt or not an image; "
                         f"restore it from the original download.") from None
    if arr.ndim == 3:
        arr = arr[..., 0]
    return arr


# ---------------------------------------------------------------------------
# Masks and regions.

def check_mask_options(resize: str = "stretch", mask_resize: str = "bilinear") -> None:
    if resize not in RESIZE_POLICIES:
        raise ValueError(f"resize={resize!r}: use one of {', '.join(RESIZE_POLICIES)}.")
    if mask_resize not in MASK_RESIZES:
        raise ValueError(f"mask_resize={mask_resize!r}: use one of {', '.join(MASK_RESIZES)}.")


def _check_same_size(image_path: str, mask_path: str, mask_hw) -> Tuple[int, int]:
    hw = header_size(image_path)
    if tuple(mask_hw) != tuple(hw):
        raise DatasetError(
            f"Mask {mask_path} is {mask_hw[1]}x{mask_hw[0]} (WxH) but its image {image_path} is "
            f"{hw[1]}x{hw[0]}: a mask must have its image's size. Restore the mask from the "
            f"original download.")
    return hw


def resize_mask(mask01: np.ndarray, size: Optional[int], resize: str = "stretch",
                mask_resize: str = "bilinear") -> np.ndarray:
    """A {0,1} mask of the original image -> uint8 (S, S) in {0, 1} (module doc); size=None:
    unchanged. "bilinear": PIL BILINEAR (antialiased) on 0/255, then > 127, i.e. the
    reference code's Resize + ToTensor + gt > 0.5 (docs/METRICS.md); "nearest": PIL NEAREST."""
    if size is None:
        return mask01.astype(np.uint8)
    m = square_array(np.asarray(mask01).astype(np.uint8), resize)
    im = Image.fromarray(m * 255, "L")
    if im.size != (size, size):
        im = im.resize((size, size), Image.BILINEAR if mask_resize == "bilinear"
                       else Image.NEAREST)
    return (np.asarray(im) > 127).astype(np.uint8)


def _nearest_resize(mask: np.ndarray, size: Optional[int], resize: str = "stretch"):
    if size is None:
        return mask
    mask = square_array(mask, resize)
    if mask.shape == (size, size):
        return mask
    im = Image.fromarray(mask.astype(np.uint8) * 255, "L").resize((size, size), Image.NEAREST)
    return np.asarray(im) > 0


def load_regions(record: Record, size: Optional[int] = None, *,
                 resize: str = "stretch") -> List[GTRegion]:
    """LOCO ground-truth regions of one record as GTRegion(bool mask, saturation
    threshold, relative flag): original resolution, or (S, S) nearest-neighbour (after
    the ``resize`` policy's pad or crop) when ``size`` is given. Good images (and
    non-LOCO records) give []."""
    check_mask_options(resize)
    out = []
    for spec in record.regions:
        arr = _read_mask_array(spec.mask_path)
        _check_same_size(record.image_path, spec.mask_path, arr.shape)
        mask = _nearest_resize(arr == spec.pixel_value, size, resize)
        out.append(GTRegion(mask, spec.saturation_threshold, spec.relative_saturation))
    return out


def binary_mask(record: Record) -> np.ndarray:
    """The {0,1} uint8 mask of a record with one mask file, at its original size."""
    path = record.mask_paths[0]
    arr = _read_mask_array(path)
    _check_same_size(record.image_path, path, arr.shape)
    return (arr > record.mask_threshold).astype(np.uint8)


def _load_mask(record: Record, size: Optional[int], resize: str, mask_resize: str):
    if record.regions:  # LOCO: union of the regions (nearest-resized like load_regions)
        regions = load_regions(record, size, resize=resize)
        m = np.zeros_like(regions[0].mask, dtype=bool)
        for g in regions:
            m |= g.mask
        return m.astype(np.uint8)
    if record.mask_paths:
        return resize_mask(binary_mask(record), size, resize, mask_resize)
    if record.label > 0:
        raise DatasetError(
            f"{record.image_path} is anomalous but has no ground-truth mask, so pixel-level "
            f"metrics cannot be computed for this dataset. Add "
            f"ground_truth/{record.defect_type}/<name>_mask.png files, or evaluate image-level "
            f"metrics only.")
    if size is not None:
        return np.zeros((size, size), np.uint8)
    return np.zeros(header_size(record.image_path), np.uint8)


def load_masks(records: Sequence[Record], size: Optional[int] = None, *,
               resize: str = "stretch", mask_resize: str = "bilinear") -> np.ndarray:
    """Ground-truth masks (N, H, W) uint8 in {0, 1}.

    Good images give zeros. size=S: a mask file is made square like its image
    (``resize``) and resized with ``mask_resize`` (module doc; default bilinear, then
    binarized at 0.5, docs/METRICS.md); LOCO records give the union of their regions,
    each resized nearest-neighbour. size=None: original resolution (all images must then
    share one size). A mask pixel is a defect where its value is above the record's
    ``mask_threshold`` (127; VisA's class-id masks: 0).
    """
    check_mask_options(resize, mask_resize)
    records = list(records)
    with concurrent.futures.ThreadPoolExecutor(num_workers()) as ex:
        masks = list(ex.map(lambda r: _load_mask(r, size, resize, mask_resize), records))
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
    return all(r.mask_paths or r.label <= 0 for r in records)
