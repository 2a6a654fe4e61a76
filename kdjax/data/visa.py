"""VisA (Zou et al., ECCV 2022; https://github.com/amazon-science/spot-diff): its own layout,
read as distributed (VisA_20220922.tar), with the official one-class split::

    <root>/split_csv/1cls.csv                      object,split,label,image,mask
    <root>/<category>/Data/Images/{Normal,Anomaly}/0000.JPG ...
    <root>/<category>/Data/Masks/Anomaly/000.png ...
    <root>/<category>/image_anno.csv               image,label,mask (optional here)

1cls.csv names every image of every category once: ``split`` is train or test,
``label`` normal or anomaly, ``image`` and ``mask`` are paths relative to the root
(``mask`` empty for normal images). Masks hold a class id per pixel (0 background, as
the dataset's utils/id2class.py lists): a pixel is a defect where its value is non-zero,
as the dataset's own prepare_data.py binarizes them. Images are JPEG, non-square
(``data.resize``). An anomalous image's defect type is its ``image_anno.csv`` label
(lower case, non-alphanumeric runs -> "_", e.g. "melt, scratch" -> "melt_scratch") when
that file is there, else "bad"; normal images are "good".
"""

from __future__ import annotations

import csv
import os
import re
import threading
from typing import Dict, List, Tuple

from kdjax.data.files import DatasetError
from kdjax.data.types import Record

SPLIT_CSV = os.path.join("split_csv", "1cls.csv")
COLUMNS = ("object", "split", "label", "image", "mask")
LAYOUT = ("<root>/split_csv/1cls.csv (object,split,label,image,mask)\n"
          "  <root>/<category>/Data/Images/{Normal,Anomaly}/0000.JPG\n"
          "  <root>/<category>/Data/Masks/Anomaly/000.png")
URL = "https://github.com/amazon-science/spot-diff"

_CACHE: Dict[Tuple, List[dict]] = {}
_LOCK = threading.Lock()


def check_root(root: str) -> str:
    """The path of <root>/split_csv/1cls.csv; DatasetError naming it when it is missing."""
    path = os.path.join(root, SPLIT_CSV)
    if not os.path.isfile(path):
        raise DatasetError(
            f"VisA root {root!r} has no {SPLIT_CSV}: the root must be the extracted "
            f"VisA_20220922 folder (it holds split_csv/ and the category folders); get the "
            f"archive and split_csv/ from {URL}.")
    return path


def read_split_csv(root: str) -> List[dict]:
    """The rows of <root>/split_csv/1cls.csv as dicts (cached per file and mtime)."""
    path = check_root(root)
    st = os.stat(path)
    key = (path, st.st_mtime_ns, st.st_size)
    with _LOCK:
        if key in _CACHE:
            return _CACHE[key]
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = [h.strip() for h in next(reader, [])]
        if tuple(header) != COLUMNS:
            raise DatasetError(f"{path}: the header is {','.join(header)!r}, expected "
                               f"{','.join(COLUMNS)!r} (the official split file from {URL}).")
        rows = []
        for n, row in enumerate(reader, start=2):
            if not row:
                continue
            if len(row) != len(COLUMNS):
                raise DatasetError(f"{path}, line {n}: {len(row)} columns, expected "
                                   f"{len(COLUMNS)} ({','.join(COLUMNS)}).")
            rows.append(dict(zip(COLUMNS, (c.strip() for c in row))))
    with _LOCK:
        _CACHE[key] = rows
    return rows


def categories(root: str) -> List[str]:
    """The categories 1cls.csv names, sorted."""
    return sorted({r["object"] for r in read_split_csv(root)})


def _defect_names(root: str, category: str) -> Dict[str, str]:
    """{image path relative to the root: sanitized label} from <category>/image_anno.csv."""
    path = os.path.join(root, category, "image_anno.csv")
    if not os.path.isfile(path):
        return {}
    out = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            image, label = (row.get("image") or "").strip(), (row.get("label") or "").strip()
            name = re.sub(r"[^0-9a-z]+", "_", label.lower()).strip("_")
            if image and name and name != "normal":
                out[image] = name
    return out


def _path(root: str, rel: str) -> str:
    return os.path.join(root, *rel.split("/"))


def list_visa(root: str, category: str, split: str) -> List[Record]:
    """The records of one category and split ("train" or "test") of 1cls.csv, sorted by
    defect type then file name; DatasetError naming a file the csv lists but that is
    missing, or an anomalous image without a mask."""
    rows = [r for r in read_split_csv(root) if r["object"] == category]
    if not rows:
        raise DatasetError(
            f"{os.path.join(root, SPLIT_CSV)} lists no images of category {category!r} (it "
            f"lists: {', '.join(categories(root))}).")
    names = _defect_names(root, category)
    records = []
    for r in rows:
        if r["split"] != split:
            continue
        if r["label"] not in ("normal", "anomaly"):
            raise DatasetError(f"{os.path.join(root, SPLIT_CSV)}: label {r['label']!r} of "
                               f"{r['image']}; expected 'normal' or 'anomaly'.")
        image = _path(root, r["image"])
        if not os.path.isfile(image):
            raise DatasetError(f"{image} is listed in {SPLIT_CSV} but missing: re-extract "
                               f"category {category!r} from the original archive ({URL}).")
        if r["label"] == "normal":
            records.append(Record(image, category, split, "good", 0, mask_threshold=0))
            continue
        mask = _path(root, r["mask"]) if r["mask"] else ""
        if not mask or not os.path.isfile(mask):
            raise DatasetError(f"No ground-truth mask for {image}: {SPLIT_CSV} names "
                               f"{mask or 'none'}. Re-extract Data/Masks from the original "
                               f"archive ({URL}).")
        records.append(Record(image, category, split, names.get(r["image"], "bad"), 1,
                              mask_paths=(mask,), mask_threshold=0))
    if not records and split == "train":
        raise DatasetError(f"{os.path.join(root, SPLIT_CSV)} lists no training images of "
                           f"category {category!r}.")
    return sorted(records, key=lambda r: (r.defect_type, os.path.basename(r.image_path)))
