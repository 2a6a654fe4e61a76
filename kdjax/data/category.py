"""One category's training and validation images, loaded once for a run."""

from __future__ import annotations

import dataclasses
import os
from typing import Optional

import numpy as np

from kdjax.data.types import dataset_spec
from kdjax.errors import DataError


@dataclasses.dataclass
class CategoryData:
    category: str
    root: str
    train: np.ndarray  # uint8 (N, S, S, 3)
    val: Optional[np.ndarray]
    train_records: list
    val_records: list


def dataset_root(config, workdir: str) -> str:
    """The dataset directory; the synthetic set is generated on first use. With
    data.source=tfds and no data.root (the TFDS data is prepared), a name standing for it."""
    spec = dataset_spec(config.data.dataset)
    if not spec.generated and not config.data.root and str(
            config.data.get("source", "files")) == "tfds":
        return f"tfds:{spec.tfds_name}"
    if spec.generated:
        from kdjax import data

        root = config.data.root or os.path.join(workdir, "synthetic_data")
        data.ensure_synthetic(root, seed=int(config.data.synthetic_seed),
                              image_size=int(config.data.synthetic_size),
                              counts=tuple(config.data.synthetic_counts))
        return root
    return config.data.root


def load_category(config, root: str, category: str, needs_val: bool,
                  method_name: str = "") -> CategoryData:
    """Training images and held-out good images (the dataset's validation split, or a
    seeded ``data.validation_fraction`` of train/good elsewhere; none when the
    fraction is 0, then a method that normalizes its maps is refused). Read through
    ``data.source`` and resized as ``data.resize`` / ``data.image_filter`` say."""
    from kdjax import config as config_lib
    from kdjax import data

    size = int(config.data.image_size)
    source = data.open_source(config, root)
    train_records = source.records(category, "train")
    val_records: list = []
    if source.spec.has_validation_split:
        val_records = source.records(category, "validation")
    elif config_lib.validation_fraction(config) > 0:
        train_records, val_records = data.split_train_val(
            train_records, config_lib.validation_fraction(config), int(config.seed))
    if needs_val and not val_records:
        raise DataError(
            f"[{category}] {method_name or config.method} normalizes its maps with held-out good "
            "images and this run has none: set --config.data.validation_fraction=0.1.")
    train, train_records = source.images(train_records, size, config.data.on_corrupt)
    val = None
    if val_records:
        val, val_records = source.images(val_records, size, config.data.on_corrupt)
    if len(train) == 0:
        raise DataError(f"No usable training images for category {category!r} under {root}.")
    return CategoryData(category, root, train, val, train_records, val_records)
