"""MVTec AD 2 (Heckler-Kram et al., 2025; https://www.mvtec.com/company/research/datasets/mvtec-ad-2)::

    <root>/<category>/train/good/000_regular.png ...
    <root>/<category>/validation/good/000_regular.png ...
    <root>/<category>/test_public/{good,bad}/000_regular.png ...
    <root>/<category>/test_public/ground_truth/bad/000_regular_mask.png ...
    <root>/<category>/test_private/000_regular.png ...          (no labels, no masks)
    <root>/<category>/test_private_mixed/000_mixed.png ...      (no labels, no masks)

test_public is the labelled test split (kdjax's "test": metrics); the private splits
have no ground truth: their anomaly maps are written for the evaluation server
(kdjax.submission), records with label -1 and defect type "unknown". Image names carry
the lighting condition (000_regular, 000_overexposed, 000_shift_1, ...). Images are
large and non-square (``data.resize``).
"""

from __future__ import annotations

import os
from typing import List

from kdjax.data.files import DatasetError, list_images, subdirs
from kdjax.data.types import Record

LAYOUT = ("<root>/<category>/{train,validation}/good/000_regular.png\n"
          "  <root>/<category>/test_public/{good,bad}/000_regular.png\n"
          "  <root>/<category>/test_public/ground_truth/bad/000_regular_mask.png\n"
          "  <root>/<category>/{test_private,test_private_mixed}/000_regular.png")
TEST_PUBLIC = "test_public"
UNLABELLED = ("test_private", "test_private_mixed")


def list_mvtec_ad2(cat_dir: str, category: str, split: str) -> List[Record]:
    """Records of one split: "train", "validation", "test" (test_public, split name
    "test_public" in the records) or an unlabelled split."""
    if split in ("train", "validation"):
        folder = os.path.join(cat_dir, split, "good")
        if not os.path.isdir(folder) or not list_images(folder):
            raise DatasetError(f"{folder} is missing or holds no images: re-extract category "
                               f"{category!r} from the original download. Expected layout:\n"
                               f"  {LAYOUT}")
        return [Record(p, category, split, "good", 0) for p in list_images(folder)]
    if split in UNLABELLED:
        folder = os.path.join(cat_dir, split)
        if not os.path.isdir(folder):
            raise DatasetError(f"{folder} is missing: MVTec AD 2 ships it with every category; "
                               f"re-extract category {category!r} from the original download.")
        return [Record(p, category, split, "unknown", -1) for p in list_images(folder)]
    test_dir = os.path.join(cat_dir, TEST_PUBLIC)
    types = [t for t in subdirs(test_dir) if t != "ground_truth"]
    if not types:
        raise DatasetError(f"{test_dir} is missing or holds no good/ or bad/ folder. Expected "
                           f"layout:\n  {LAYOUT}")
    gt_root = os.path.join(test_dir, "ground_truth")
    records = []
    for t in types:
        for p in list_images(os.path.join(test_dir, t)):
            if t == "good":
                records.append(Record(p, category, TEST_PUBLIC, "good", 0))
                continue
            stem = os.path.splitext(os.path.basename(p))[0]
            mask = os.path.join(gt_root, t, f"{stem}_mask.png")
            if not os.path.isfile(mask):
                raise DatasetError(f"No ground-truth mask for {p}: expected {mask}. Restore "
                                   f"test_public/ground_truth/ from the original download.")
            records.append(Record(p, category, TEST_PUBLIC, t, 1, mask_paths=(mask,)))
    return records
