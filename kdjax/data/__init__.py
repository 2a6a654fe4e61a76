"""Datasets: MVTec AD, MVTec LOCO AD, VisA, MVTec AD 2, BTAD, MPDD, image folders and
kdjax's synthetic LOCO-layout set (one descriptor each: ``dataset_spec(name)``).

The API the engine, the metrics and the notebooks call (docs/DATA.md, docs/INTERFACE.md):

* ``list_records(dataset, root, category, split)`` -> sorted ``Record`` list
* ``split_train_val(records, fraction, seed)`` -> (train, val)
* ``read_image(path)`` -> uint8 (H, W, 3); ``ImageError`` if undecodable
* ``load_images(records, image_size, on_corrupt="raise", resize=, image_filter=)``
  -> (uint8 (N, S, S, 3), kept records)
* ``original_sizes(records)`` -> [(H, W)] from headers
* ``load_masks(records, size=None, resize=, mask_resize=)`` -> uint8 (N, H, W) in {0, 1}
* ``load_regions(record, size=None, resize=)`` -> [GTRegion] (LOCO)
* ``Preprocess.from_config(config)``: the data.resize / image_filter / mask_resize
  settings, with ``image_kw`` and ``mask_kw`` for the functions above
* ``open_source(config, root)`` -> the records of data.source (files or TFDS)
* ``ensure_synthetic(root, seed, image_size, counts)`` -> category name
* ``pipeline``: the engine's streaming input (``data.input=stream``: ``ImageSet``,
  ``batch_stream``, the ``data.cache`` files; TensorFlow is imported only there)

Importing this package is cheap: numpy and PIL only.
"""

from kdjax.data.images import restore_maps, request_size
from kdjax.data.readers import (DATASET_URL, IMAGE_EXTENSIONS, DatasetError, ImageError,
                                has_masks, list_records, load_images, load_masks,
                                load_regions, original_sizes, read_defects_config,
                                read_image, split_train_val)
from kdjax.data.source import FileSource, Preprocess, open_source
from kdjax.data.types import (DATASET_SPECS, DATASETS, IMAGENET_MEAN, IMAGENET_STD,
                              MVTEC_AD2_CATEGORIES, MVTEC_AD_CATEGORIES, MVTEC_LOCO_CATEGORIES,
                              VISA_CATEGORIES, DatasetSpec, GTRegion, Record, RegionSpec,
                              dataset_spec)



def ensure_synthetic(root, seed=0, image_size=256, counts=(200, 40, 40, 40, 40)):
    """Generate kdjax's synthetic LOCO-layout set into ``root`` unless it is there with
    the same parameters; return its category name. See kdjax.data.synthetic."""
    from kdjax.data import synthetic

    return synthetic.ensure_synthetic(root, seed=seed, image_size=image_size, counts=counts)


__all__ = [
    "DATASETS", "DATASET_SPECS", "DATASET_URL", "IMAGE_EXTENSIONS", "IMAGENET_MEAN",
    "IMAGENET_STD", "MVTEC_AD2_CATEGORIES", "MVTEC_AD_CATEGORIES", "MVTEC_LOCO_CATEGORIES",
    "VISA_CATEGORIES", "DatasetError", "DatasetSpec", "FileSource", "GTRegion", "ImageError",
    "Preprocess", "Record", "RegionSpec", "dataset_spec", "ensure_synthetic", "has_masks",
    "list_records", "load_images", "load_masks", "load_regions",
    "open_source", "original_sizes", "read_defects_config", "read_image", "request_size",
    "restore_maps", "split_train_val",
]
