"""One category's training and validation images, loaded once for a run."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Optional

import numpy as np

from kdjax.data.types import dataset_spec
from kdjax.errors import DataError


INPUTS = ("auto", "resident", "stream")


@dataclasses.dataclass
class CategoryData:
    """``train``: uint8 (N, S, S, 3) when the training images are resident
    (``data.input``); None when they are streamed, then ``train_set`` decodes them on
    demand (kdjax/data/pipeline.py)."""

    category: str
    root: str
    train: Optional[np.ndarray]
    val: Optional[np.ndarray]
    train_records: list
    val_records: list
    train_set: Optional[object] = None  # kdjax.data.pipeline.ImageSet when streamed

    @property
    def n_train(self) -> int:
        return len(self.train) if self.train is not None else len(self.train_set)

    @property
    def streamed(self) -> bool:
        return self.train is None

    def train_chunks(self, chunk: int):
        """The training images in order, ``chunk`` at a time (host uint8 arrays)."""
        if self.train is not None:
            for i in range(0, len(self.train), chunk):
                yield self.train[i:i + chunk]
        else:
            yield from self.train_set.chunks(chunk)


def resident_gb(n: int, size: int) -> float:
    """GiB of ``n`` uint8 images of size x size x 3 (per device: they are replicated)."""
    return n * size * size * 3 / 2**30


def input_mode(config, n: int) -> str:
    """``data.input`` resolved: "resident" or "stream" ("auto": resident when the resized
    training set fits ``train.resident_max_gb`` per device)."""
    mode = str(config.data.get("input", "auto"))
    if mode != "auto":
        return mode
    limit = float(config.train.get("resident_max_gb", 4.0))
    return "resident" if resident_gb(n, int(config.data.image_size)) <= limit else "stream"


def training_image_set(config, source, records, size: int, name: str = "train"):
    """The pipeline's ImageSet of ``records``, decoded as ``source`` decodes them, read
    from (and first written to) ``data.cache`` when that is set."""
    from kdjax.data import images as images_lib
    from kdjax.data.pipeline import ImageSet, build_cache

    kw = source.preprocess.image_kw
    paths = [r.image_path for r in records]
    out = ImageSet(paths, size, lambda p: images_lib.load_one(p, size, **kw), name=name,
                   describe=json.dumps(kw, sort_keys=True))
    cache = str(config.data.get("cache", "") or "")
    if cache:
        build_cache(out, cache)
    return out


def readable_records(records, on_corrupt: str):
    """``records`` whose image headers read (a streamed set is decoded only while
    training: the headers are checked before); ``on_corrupt="skip"`` drops the others
    with a warning naming each, "raise" raises the first one's ImageError."""
    from kdjax.data import images as images_lib

    kept = []
    for r in records:
        try:
            images_lib.header_size(r.image_path)
        except DataError as e:
            if on_corrupt != "skip":
                raise
            import logging

            logging.getLogger("kdjax").warning(
                "Skipping corrupt image (data.on_corrupt=skip): %s", e)
            continue
        kept.append(r)
    return kept


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
    train = train_set = None
    if input_mode(config, len(train_records)) == "stream":
        train_records = readable_records(train_records, config.data.on_corrupt)
        train_set = training_image_set(config, source, train_records, size)
        n = len(train_records)
    else:
        train, train_records = source.images(train_records, size, config.data.on_corrupt)
        n = len(train)
    val = None
    if val_records:
        val, val_records = source.images(val_records, size, config.data.on_corrupt)
    if n == 0:
        raise DataError(f"No usable training images for category {category!r} under {root}.")
    return CategoryData(category, root, train, val, train_records, val_records, train_set)
