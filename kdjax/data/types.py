"""Plain records shared by the dataset readers, the engine and the metrics."""

from __future__ import annotations

import dataclasses
from typing import Dict, NamedTuple, Optional, Tuple

import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

MVTEC_AD_CATEGORIES = (
    "bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather",
    "metal_nut", "pill", "screw", "tile", "toothbrush", "transistor", "wood",
    "zipper",
)
MVTEC_LOCO_CATEGORIES = (
    "breakfast_box", "juice_bottle", "pushpins", "screw_bag",
    "splicing_connectors",
)
VISA_CATEGORIES = (
    "candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1", "macaroni2",
    "pcb1", "pcb2", "pcb3", "pcb4", "pipe_fryum",
)
MVTEC_AD2_CATEGORIES = (
    "can", "fabric", "fruit_jelly", "rice", "sheet_metal", "vial", "wallplugs", "walnuts",
)
BTAD_CATEGORIES = ("01", "02", "03")
MPDD_CATEGORIES = (
    "bracket_black", "bracket_brown", "bracket_white", "connector", "metal_plate", "tubes",
)
SYNTHETIC_CATEGORY = "tray"  # kdjax.data.synthetic.CATEGORY

# Image preprocessing choices (docs/DATA.md, "How images are decoded and resized").
RESIZE_POLICIES = ("stretch", "pad", "center_crop")
IMAGE_FILTERS = ("bilinear", "lanczos", "bicubic", "nearest")
MASK_RESIZES = ("bilinear", "nearest")
SOURCES = ("files", "tfds")
GROUND_TRUTH_KINDS = ("masks", "loco_regions")


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """What the engine, the readers, the metrics and the config checks need to know about
    one dataset (``data.dataset``); looked up by name with :func:`dataset_spec`."""

    name: str
    title: str
    # The category names, or None where any sub-folder of the root is one ("folder").
    categories: Optional[Tuple[str, ...]]
    # The reader: "mvtec_ad" (train/good, test/<type>, ground_truth/<type>/<stem>_mask.png),
    # "mvtec_loco", "visa" (Data/Images + split_csv/1cls.csv) or "mvtec_ad2".
    layout: str
    # A validation split of good images of its own (else data.validation_fraction of train).
    has_validation_split: bool
    ground_truth: str  # "masks" (one binary mask per anomalous image) | "loco_regions"
    masks_required: bool  # every anomalous test image must have its mask
    url: str  # where a person downloads it ("" where there is nothing to download)
    good_folder: str = "good"  # BTAD: "ok"
    anomalous_folder: str = ""  # BTAD: "ko" (else any folder but good_folder)
    test_split: str = "test"  # the labelled test split's folder (MVTec AD 2: test_public)
    unlabelled_splits: Tuple[str, ...] = ()  # test images without labels (MVTec AD 2)
    mask_threshold: int = 127  # a mask pixel is a defect where its value is above this
    generated: bool = False  # written by kdjax (synthetic): no download, no root needed
    tfds_name: Optional[str] = None  # the TFDS builder reading it (kdjax.data.tfds_builders)
    note: str = ""  # one line for error messages: how to get it

    @property
    def splits(self) -> Tuple[str, ...]:
        """Every split ``list_records`` reads, "test" meaning the labelled test split."""
        val = ("validation",) if self.has_validation_split else ()
        return ("train",) + val + ("test",) + self.unlabelled_splits

    @property
    def folder_splits(self) -> Tuple[str, ...]:
        """The splits under their folder names (the TFDS builders' split names)."""
        return tuple(self.test_split if s == "test" else s for s in self.splits)


_MVTEC_NOTE = ("download it from {url} (a person must accept the licence; it cannot be "
               "downloaded by a program) and extract it")

DATASET_SPECS: Dict[str, DatasetSpec] = {s.name: s for s in (
    DatasetSpec("mvtec_ad", "MVTec AD", MVTEC_AD_CATEGORIES, "mvtec_ad", False, "masks", True,
                "https://www.mvtec.com/company/research/datasets/mvtec-ad",
                tfds_name="mvtec_ad", note=_MVTEC_NOTE),
    DatasetSpec("mvtec_loco", "MVTec LOCO AD", MVTEC_LOCO_CATEGORIES, "mvtec_loco", True,
                "loco_regions", True, "https://www.mvtec.com/company/research/datasets/mvtec-loco",
                tfds_name="mvtec_loco", note=_MVTEC_NOTE),
    DatasetSpec("folder", "an image folder in the MVTec AD layout", None, "mvtec_ad", False,
                "masks", False, "", note="arrange your own images in that layout"),
    DatasetSpec("synthetic", "kdjax's synthetic LOCO-layout dataset", (SYNTHETIC_CATEGORY,),
                "mvtec_loco", True, "loco_regions", True, "", generated=True,
                note="kdjax generates it: call kdjax.data.ensure_synthetic(root) or run "
                     "`python -m kdjax.data.synthetic --out <root>` (configs/demo.py does this "
                     "for you)"),
    DatasetSpec("visa", "VisA", VISA_CATEGORIES, "visa", False, "masks", True,
                "https://github.com/amazon-science/spot-diff", mask_threshold=0,
                tfds_name="visa",
                note="download VisA_20220922.tar as {url} describes (CC BY 4.0) and extract it; "
                     "the root is the folder holding split_csv/ and the category folders"),
    DatasetSpec("mvtec_ad2", "MVTec AD 2", MVTEC_AD2_CATEGORIES, "mvtec_ad2", True, "masks",
                True, "https://www.mvtec.com/company/research/datasets/mvtec-ad-2",
                test_split="test_public", unlabelled_splits=("test_private", "test_private_mixed"),
                tfds_name="mvtec_ad2", note=_MVTEC_NOTE),
    DatasetSpec("btad", "BTAD (beanTech Anomaly Detection)", BTAD_CATEGORIES, "mvtec_ad", False,
                "masks", True, "https://avires.dimi.uniud.it/papers/btad/btad.zip",
                good_folder="ok", anomalous_folder="ko",
                note="download btad.zip from {url} (CC BY-NC-SA 4.0) and extract it; the root "
                     "is the folder holding 01/, 02/ and 03/"),
    DatasetSpec("mpdd", "MPDD (Metal Parts Defect Detection)", MPDD_CATEGORIES, "mvtec_ad",
                False, "masks", True, "https://github.com/stepanje/MPDD",
                note="download it as {url} describes and extract it; the root is the folder "
                     "holding the category folders"),
)}
DATASETS = tuple(DATASET_SPECS)


def dataset_spec(name: str) -> DatasetSpec:
    """The descriptor of dataset ``name``; an unknown name raises kdjax's ConfigError (a
    ValueError) listing the known ones."""
    spec = DATASET_SPECS.get(str(name))
    if spec is None:
        from kdjax.errors import ConfigError

        raise ConfigError(f"Unknown dataset {name!r}: data.dataset must be one of "
                          f"{', '.join(DATASETS)}.")
    return spec


def where_to_get(spec: DatasetSpec) -> str:
    """How a person gets the dataset, one clause (for error messages)."""
    return spec.note.format(url=spec.url) if spec.note else f"download it from {spec.url}"


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
    split: str  # "train" | "validation" | "test" (MVTec AD 2: its split folder's name)
    defect_type: str  # "good" or the defect folder name ("unknown": unlabelled)
    label: int  # 0 good, 1 anomalous, -1 unknown (MVTec AD 2's private test splits)
    # MVTec AD / folder: one mask file (or none). LOCO: one file per region.
    mask_paths: Tuple[str, ...] = ()
    regions: Tuple[RegionSpec, ...] = ()  # LOCO only
    anomaly_kind: Optional[str] = None  # LOCO: "logical" | "structural"; None if good/AD
    # A mask pixel is a defect where its value is above this (VisA's masks hold class ids: 0).
    mask_threshold: int = 127


class GTRegion(NamedTuple):
    """A loaded LOCO region for sPRO: boolean mask at the map's resolution."""

    mask: np.ndarray  # bool (H, W)
    saturation_threshold: float
    relative_saturation: bool
