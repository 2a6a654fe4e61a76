"""Where the engine's records and pixels come from (``data.source``) and how they are
preprocessed (``data.resize``, ``data.image_filter``, ``data.mask_resize``).

* ``files`` (default): the readers of kdjax.data.readers on ``data.root``.
* ``tfds``: the TFDS builders of kdjax.data.tfds_builders (``mvtec_ad``, ``mvtec_loco``,
  ``visa``, ``mvtec_ad2``), prepared once into ``data.tfds_dir`` from the manual download
  in ``data.root``. The records are those the files reader lists (same paths, labels,
  masks and regions); the pixels come from the prepared TFDS examples, served to the
  same decoding and resizing code (kdjax.data.files.register_blobs), so both sources
  give the same arrays.

The engine (kdjax.data.category, kdjax.experiment) reads through ``open_source(config,
root)``; its methods return exactly what the kdjax.data functions of the same data return.
"""

from __future__ import annotations

import dataclasses
from typing import List, Optional, Sequence

import numpy as np

from kdjax.data import files, images, masks, readers
from kdjax.data.types import Record, dataset_spec


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """The image and mask preprocessing settings (docs/DATA.md; kdjax.data.images)."""

    resize: str = "stretch"  # stretch | pad | center_crop
    image_filter: str = "bilinear"  # bilinear | lanczos | bicubic | nearest
    mask_resize: str = "bilinear"  # bilinear (then > 0.5) | nearest

    @classmethod
    def from_config(cls, config) -> "Preprocess":
        d = config.data
        return cls(str(d.get("resize", "stretch")), str(d.get("image_filter", "bilinear")),
                   str(d.get("mask_resize", "bilinear")))

    @property
    def image_kw(self) -> dict:
        return {"resize": self.resize, "image_filter": self.image_filter}

    @property
    def mask_kw(self) -> dict:
        return {"resize": self.resize, "mask_resize": self.mask_resize}


class FileSource:
    """Records and pixels of one dataset root, read from its files."""

    kind = "files"

    def __init__(self, dataset: str, root: str, preprocess: Preprocess = Preprocess()):
        self.dataset, self.root, self.preprocess = dataset, root, preprocess
        self.spec = dataset_spec(dataset)

    def records(self, category: str, split: str) -> List[Record]:
        return readers.list_records(self.dataset, self.root, category, split)

    def images(self, records: Sequence[Record], size: int, on_corrupt: str = "raise"):
        return images.load_images(records, size, on_corrupt, **self.preprocess.image_kw)

    def masks(self, records: Sequence[Record], size: Optional[int] = None) -> np.ndarray:
        return masks.load_masks(records, size, **self.preprocess.mask_kw)

    def regions(self, record: Record, size: Optional[int] = None):
        return masks.load_regions(record, size, resize=self.preprocess.resize)

    def original_sizes(self, records: Sequence[Record]):
        return images.original_sizes(records)

    def has_masks(self, records: Sequence[Record]) -> bool:
        return masks.has_masks(records)

    def maps_to_original(self, model, comps, sizes, weights=None):
        """(maps at each image's original size, scores) of a model's components: the
        maps are resized to ``request_size`` and restored (kdjax.data.images)."""
        resize = self.preprocess.resize
        req = [images.request_size(s, resize) for s in sizes]
        maps, scores = model.finish_components(comps, req, weights)
        return images.restore_maps(maps, sizes, resize), scores


class TfdsSource(FileSource):
    """Records and pixels of a prepared TFDS dataset (kdjax.data.tfds_builders)."""

    kind = "tfds"

    def __init__(self, dataset: str, root: str, data_dir: Optional[str] = None,
                 preprocess: Preprocess = Preprocess()):
        super().__init__(dataset, root, preprocess)
        if not self.spec.tfds_name:
            raise files.DatasetError(
                f"data.source=tfds: dataset {dataset!r} has no TFDS builder (those of "
                f"kdjax.data.tfds_builders read mvtec_ad, mvtec_loco, visa, mvtec_ad2); use "
                f"--config.data.source=files.")
        self.data_dir = data_dir or None
        self._category = None

    def records(self, category: str, split: str) -> List[Record]:
        from kdjax.data import tfds_builders

        recs, blobs = tfds_builders.load_split(self.dataset, category, split, root=self.root,
                                               data_dir=self.data_dir)
        files.register_blobs(blobs, replace=category != self._category)
        self._category = category
        return recs


def open_source(config, root: str) -> FileSource:
    """The source ``data.source`` names, for ``data.dataset`` at ``root``."""
    kind = str(config.data.get("source", "files"))
    prep = Preprocess.from_config(config)
    if kind == "tfds":
        return TfdsSource(config.data.dataset, root, str(config.data.get("tfds_dir", "")), prep)
    return FileSource(config.data.dataset, root, prep)
