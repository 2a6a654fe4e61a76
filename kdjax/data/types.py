"""Plain records shared by the dataset readers, the engine and the metrics."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional, Tuple

import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

DATASETS = ("mvtec_ad", "mvtec_loco", "folder", "synthetic")

MVTEC_AD_CATEGORIES = (
    "bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather",
    "metal_nut", "pill", "screw", "tile", "toothbrush", "transistor", "wood",
    "zipper",
)
MVTEC_LOCO_CATEGORIES = (
    "breakfast_box", "juice_bottle", "pushpins", "screw_bag",
    "splicing_connectors",
)


@dataclasses.dataclass(frozen=True)
class RegionSpec:
    """One LOCO ground-truth region file (one PNG) and its defects_config entry."""

    mask_path: str
    pixel_value: int
    defect_name: str
    saturation_threshold: float  # int pixel count, or fraction when relative
    relative_saturation: bool


@dataclasses.dataclass(frozen=True)
class Record:
    """One image of a dataset split."""

    image_path: str
    category: str
    split: str  # "train" | "validation" | "test"
    defect_type: str  # "good" or the defect folder name
    label: int  # 0 good, 1 anomalous
    # MVTec AD / folder: one mask file (or none). LOCO: one file per region.
    mask_paths: Tuple[str, ...] = ()
    regions: Tuple[RegionSpec, ...] = ()  # LOCO only
    anomaly_kind: Optional[str] = None  # LOCO: "logical" | "structural"; None if good/AD


class GTRegion(NamedTuple):
    """A loaded LOCO region for sPRO: boolean mask at the map's resolution."""

    mask: np.ndarray  # bool (H, W)
    saturation_threshold: float
    relative_saturation: bool
