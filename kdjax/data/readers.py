"""Dataset readers: the listing of every dataset's splits as ``Record`` lists, and the
checks of its layout with messages that say what to do.

Everything here is host-side numpy + PIL; nothing imports TensorFlow or JAX. The
datasets are the descriptors of kdjax.data.types (``dataset_spec``); their layouts are
those of docs/DATA.md:

MVTec AD (and "folder", the same layout with any category name and optional masks;
"mpdd"; "btad" with ok/ko instead of good/<defect_type>)::

    <root>/<category>/train/good/000.png
    <root>/<category>/test/{good,<defect_type>}/000.png
    <root>/<category>/ground_truth/<defect_type>/000_mask.png

MVTec LOCO AD (and "synthetic", written by kdjax.data.synthetic)::

    <root>/<category>/{train,validation}/good/000.png
    <root>/<category>/test/{good,logical_anomalies,structural_anomalies}/000.png
    <root>/<category>/ground_truth/{logical_anomalies,structural_anomalies}/000/000.png ...
    <root>/<category>/defects_config.json

VisA (kdjax.data.visa) and MVTec AD 2 (kdjax.data.mvtec_ad2) have their own layouts.

Images are decoded and resized in kdjax.data.images, masks and LOCO regions are read
in kdjax.data.masks; this module re-exports their public names (and the helpers other
modules used to import from here).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import os
from typing import List, Sequence, Tuple

import numpy as np

from kdjax.data import mvtec_ad2, visa
from kdjax.data.files import (IMAGE_EXTENSIONS, DatasetError, ImageError, list_images,
                              num_workers, subdirs)
from kdjax.data.images import (corrupt, header_size, load_images, open_rgb, original_sizes,
                               read_image)
from kdjax.data.masks import (_gt_value, has_masks, load_masks, load_regions,
                              read_defects_config)
from kdjax.data.types import (DATASET_SPECS, DATASETS, MVTEC_AD2_CATEGORIES,
                              MVTEC_AD_CATEGORIES, MVTEC_LOCO_CATEGORIES, VISA_CATEGORIES,
                              DatasetSpec, Record, RegionSpec, where_to_get)

log = logging.getLogger("kdjax.data")

DATASET_URL = "https://www.mvtec.com/company/research/datasets"
SPLITS = ("train", "validation", "test")
LOCO_TEST_TYPES = ("good", "logical_anomalies", "structural_anomalies")
_LOCO_KIND = {"logical_anomalies": "logical", "structural_anomalies": "structural"}

# Names other modules and older code import from here.
_corrupt, _open_rgb, _header_size, _list_images, _subdirs = (corrupt, open_rgb, header_size,
                                                             list_images, subdirs)
_num_workers = num_workers


# ---------------------------------------------------------------------------
# Layout descriptions used in error messages.

_AD_LAYOUT = ("<root>/<category>/train/{good}/000.png\n"
              "  <root>/<category>/test/{{{good},{bad}}}/000.png\n"
              "  <root>/<category>/ground_truth/{bad}/000{suffix}.png")
_LOCO_LAYOUT = (
    "<root>/<category>/train/good/000.png\n"
    "  <root>/<category>/validation/good/000.png\n"
    "  <root>/<category>/test/{good,logical_anomalies,structural_anomalies}/000.png\n"
    "  <root>/<category>/ground_truth/{logical_anomalies,structural_anomalies}/000/000.png\n"
    "  <root>/<category>/defects_config.json")


def layout_text(spec: DatasetSpec) -> str:
    """The expected folder layout of a dataset, for error messages."""
    if spec.layout == "mvtec_loco":
        return _LOCO_LAYOUT
    if spec.layout == "visa":
        return visa.LAYOUT
    if spec.layout == "mvtec_ad2":
        return mvtec_ad2.LAYOUT
    if spec.name == "folder":
        return ("<root>/<category>/train/good/<name>.png\n"
                "  <root>/<category>/test/{good,<defect_type>}/<name>.png\n"
                "  <root>/<category>/ground_truth/<defect_type>/<name>_mask.png (optional)")
    return _AD_LAYOUT.format(good=spec.good_folder, bad=spec.anomalous_folder or "<defect_type>",
                             suffix="" if spec.name == "btad" else "_mask")


def _spec(dataset: str) -> DatasetSpec:
    spec = DATASET_SPECS.get(dataset)
    if spec is None:
        raise DatasetError(f"Unknown dataset {dataset!r}. Choose one of: {', '.join(DATASETS)}.")
    return spec


def missing_root_error(dataset: str, root: str) -> DatasetError:
    spec = _spec(dataset)
    what = "is not set" if not root else f"{root!r} does not exist"
    return DatasetError(
        f"The dataset root {what}. Expected {spec.title}: {where_to_get(spec)}, then pass its "
        f"directory with --config.data.root=/path/to/it. Expected layout:\n  "
        f"{layout_text(spec)}")


_missing_root_error = missing_root_error


# ---------------------------------------------------------------------------
# Category folders.

def looks_like_category(d: str, spec: DatasetSpec = DATASET_SPECS["mvtec_ad"]) -> bool:
    """Whether folder ``d`` holds one category of the dataset's layout."""
    if spec.layout == "visa":
        return os.path.isdir(os.path.join(d, "Data", "Images"))
    tests = ("test_public",) if spec.layout == "mvtec_ad2" else ("test",)
    return any(os.path.isdir(os.path.join(d, s)) for s in ("train",) + tests)


_looks_like_category = looks_like_category


def _is_loco_category(d: str) -> bool:
    return (os.path.isfile(os.path.join(d, "defects_config.json"))
            or (os.path.isdir(os.path.join(d, "validation"))
                and not os.path.isdir(os.path.join(d, "test_public")))
            or any(os.path.isdir(os.path.join(d, "test", t)) for t in _LOCO_KIND))


def _is_ad_category(d: str) -> bool:
    gt = os.path.join(d, "ground_truth")
    for t in subdirs(gt):
        for name in os.listdir(os.path.join(gt, t)):
            if "_mask." in name:
                return True
    return False


def _other_layout(spec: DatasetSpec, cat_dir: str):
    """The dataset that ``cat_dir`` holds when it is not ``spec``'s layout, else None."""
    if os.path.isdir(os.path.join(cat_dir, "test_public")) and spec.layout != "mvtec_ad2":
        return "mvtec_ad2", "test_public/ found"
    if spec.layout == "mvtec_ad" and _is_loco_category(cat_dir):
        return "mvtec_loco", "validation/, defects_config.json or logical_/structural_anomalies found"
    if spec.layout == "mvtec_loco" and not _is_loco_category(cat_dir) and _is_ad_category(cat_dir):
        return "mvtec_ad", "ground_truth/<type>/NNN_mask.png, no validation/ or defects_config.json"
    return None


def _check_category_dir(dataset: str, root: str, category: str) -> str:
    """Return <root>/<category> after checking the layout; raise DatasetError
    naming what was found when the root is missing, holds another dataset, or
    holds the category folders one level deeper or shallower."""
    spec = _spec(dataset)
    if not root or not os.path.isdir(root):
        raise missing_root_error(dataset, root)
    name, layout = spec.title, layout_text(spec)
    if spec.layout == "visa":
        visa.check_root(root)
    cat_dir = os.path.join(root, category)
    if os.path.isdir(cat_dir) and looks_like_category(cat_dir, spec):
        other = _other_layout(spec, cat_dir)
        if other:
            ospec = DATASET_SPECS[other[0]]
            raise DatasetError(
                f"{cat_dir} holds the {ospec.title} layout ({other[1]}), but the dataset is "
                f"{dataset!r}. Pass --config.data.dataset={ospec.name}, or point "
                f"--config.data.root at {name}.")
        return cat_dir
    # The category folder is missing: find out what the root holds instead.
    if os.path.isdir(cat_dir):
        # <root>/<category>/<something>/train: one level too deep.
        for sub in subdirs(cat_dir):
            if looks_like_category(os.path.join(cat_dir, sub), spec):
                raise DatasetError(
                    f"{cat_dir} is not a {name} category folder, but "
                    f"{os.path.join(cat_dir, sub)} is: the category folders are one level "
                    f"deeper than expected. Pass --config.data.root={cat_dir} (and "
                    f"--config.data.category={sub}), or move the folders up one level.")
    if looks_like_category(root, spec):
        parent = os.path.dirname(os.path.abspath(root))
        raise DatasetError(
            f"The dataset root {root!r} is itself a category folder (it holds train/ or test/); "
            f"the root must be the folder that CONTAINS the category folders (one level up). "
            f"Pass --config.data.root={parent} --config.data.category="
            f"{os.path.basename(os.path.abspath(root))}.")
    deeper = [os.path.join(root, d) for d in subdirs(root)
              if os.path.isdir(os.path.join(root, d, category))
              and looks_like_category(os.path.join(root, d, category), spec)]
    if deeper:
        raise DatasetError(
            f"Category {category!r} is not in {root!r} but was found one level deeper, in "
            f"{deeper[0]}: pass --config.data.root={deeper[0]}.")
    found = subdirs(root)
    known = {"mvtec_ad": MVTEC_AD_CATEGORIES, "mvtec_loco": MVTEC_LOCO_CATEGORIES,
             "visa": VISA_CATEGORIES, "mvtec_ad2": MVTEC_AD2_CATEGORIES}
    mine = set(spec.categories or ())
    for other, cats in (known.items() if spec.categories is not None else ()):
        theirs = [d for d in found if d in cats and d not in mine]
        if theirs and not any(d in mine for d in found) and other != dataset and not (
                spec.layout == "mvtec_loco" and other == "mvtec_loco"):
            title = DATASET_SPECS[other].title
            raise DatasetError(
                f"{root!r} holds {title} categories ({', '.join(theirs)}), not {name}. Pass "
                f"--config.data.dataset={other}, or point --config.data.root at {name}.")
    raise DatasetError(
        f"Category {category!r} not found in {root!r} (found: "
        f"{', '.join(found) if found else 'no folders'}). Expected {name}, layout:\n  {layout}\n"
        f"Check --config.data.root and --config.data.category.")


# ---------------------------------------------------------------------------
# Listing.

def list_records(dataset: str, root: str, category: str, split: str) -> List[Record]:
    """All images of one split of one category, sorted by defect type then file name.

    dataset: a name of kdjax.data.types.DATASETS ("synthetic" is read like mvtec_loco;
    "folder", "btad", "mpdd" like mvtec_ad). split: "train", "validation" (LOCO, MVTec
    AD 2), "test" (the labelled test split: MVTec AD 2's test_public), or one of the
    dataset's unlabelled splits (MVTec AD 2: test_private, test_private_mixed; label -1).
    Datasets without a validation split: use ``split_train_val(list_records(...,
    "train"), fraction, seed)``. LOCO region PNGs are opened to find their pixel_value
    (validated against defects_config.json; values are cached per file).
    """
    spec = _spec(dataset)
    if split == spec.test_split:
        split = "test"
    if split not in spec.splits:
        if split == "validation" and split in SPLITS:
            raise DatasetError(
                f"{dataset} has no validation split. Hold out part of the training images with "
                f"kdjax.data.split_train_val(list_records({dataset!r}, root, category, 'train'), "
                f"fraction, seed) (EfficientAD uses fraction=0.1; config key "
                f"data.validation_fraction).")
        raise DatasetError(f"Unknown split {split!r} of {dataset}. Choose one of: "
                           f"{', '.join(spec.splits)}.")
    cat_dir = _check_category_dir(dataset, root, category)
    if spec.layout == "visa":
        return visa.list_visa(root, category, split)
    if spec.layout == "mvtec_ad2":
        return mvtec_ad2.list_mvtec_ad2(cat_dir, category, split)
    good = spec.good_folder
    if split in ("train", "validation"):
        folder = os.path.join(cat_dir, split, good)
        if not os.path.isdir(folder):
            raise DatasetError(f"{folder} is missing. Expected layout:\n  {layout_text(spec)}")
        paths = list_images(folder)
        if not paths:
            raise DatasetError(f"{folder} holds no images: category {category!r} is empty or "
                               f"incomplete. Re-extract it from the original download.")
        return [Record(p, category, split, good, 0) for p in paths]

    test_dir = os.path.join(cat_dir, "test")
    if not os.path.isdir(test_dir):
        raise DatasetError(f"{test_dir} is missing. Expected layout:\n  {layout_text(spec)}")
    types = subdirs(test_dir)
    if not types:
        raise DatasetError(f"{test_dir} holds no defect-type folders (expected {good}/ and the "
                           f"defect folders).")
    if spec.layout == "mvtec_loco":
        return _list_loco_test(cat_dir, category, types)
    return _list_ad_test(spec, cat_dir, category, types)


def find_mask(gt_dir: str, stem: str):
    """The mask of image ``stem`` in ``gt_dir``: <stem>_mask.png, <stem>.png, <stem>.bmp,
    <stem>_mask.bmp / .tif / .jpg (the first that exists), else None."""
    for cand in (f"{stem}_mask.png", f"{stem}.png", f"{stem}.bmp", f"{stem}_mask.bmp",
                 f"{stem}_mask.tif", f"{stem}_mask.jpg"):
        if os.path.isfile(os.path.join(gt_dir, cand)):
            return os.path.join(gt_dir, cand)
    return None


def _list_ad_test(spec: DatasetSpec, cat_dir, category, types) -> List[Record]:
    records = []
    gt_root = os.path.join(cat_dir, "ground_truth")
    for t in types:
        for p in list_images(os.path.join(cat_dir, "test", t)):
            if t == spec.good_folder:
                records.append(Record(p, category, "test", t, 0))
                continue
            stem = os.path.splitext(os.path.basename(p))[0]
            mask = find_mask(os.path.join(gt_root, t), stem)
            if mask is None and spec.masks_required:
                raise DatasetError(
                    f"No ground-truth mask for {p}: expected "
                    f"{os.path.join(gt_root, t, stem + ('' if spec.name == 'btad' else '_mask') + '.png')}. "
                    f"Restore the ground_truth/ folder from the original download.")
            records.append(Record(p, category, "test", t, 1,
                                  mask_paths=(mask,) if mask else ()))
    return records


def _list_loco_test(cat_dir, category, types) -> List[Record]:
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
        for p in list_images(os.path.join(cat_dir, "test", t)):
            if t == "good":
                records.append(Record(p, category, "test", "good", 0))
                continue
            stem = os.path.splitext(os.path.basename(p))[0]
            gt_dir = os.path.join(gt_root, t, stem)
            if not os.path.isdir(gt_dir):
                raise DatasetError(f"No ground-truth folder for {p}: expected {gt_dir}/000.png "
                                   f"... Restore ground_truth/ from the original download.")
            regions = [q for q in list_images(gt_dir)]
            if not regions:
                raise DatasetError(f"Ground-truth folder {gt_dir} holds no region PNGs.")
            records.append(None)
            pending.append((len(records) - 1, p, t, regions))
    # Read every region PNG's value (in threads) and look it up in defects_config.json.
    all_regions = [q for (_, _, _, regs) in pending for q in regs]
    with concurrent.futures.ThreadPoolExecutor(num_workers()) as ex:
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



__all__ = [
    "DATASET_URL", "IMAGE_EXTENSIONS", "DatasetError", "ImageError", "find_mask", "has_masks",
    "layout_text", "list_records", "load_images", "load_masks", "load_regions",
    "looks_like_category", "original_sizes", "read_defects_config", "read_image",
    "split_train_val",
]
