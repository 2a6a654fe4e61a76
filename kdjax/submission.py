"""Anomaly maps of unlabelled test splits (MVTec AD 2's test_private and
test_private_mixed) in the layout of the dataset's evaluation server
(https://benchmark.mvtec.com), written after a category's evaluation::

    <workdir>/submission/anomaly_images/<category>/<split>/<stem>.tiff
    <workdir>/submission/anomaly_images_thresholded/<category>/<split>/<stem>.png

The TIFFs are single-channel float16 maps at the image's original size (inverse of
``data.resize``; kdjax.data.images.restore_map), the PNGs their binarization (0 / 255)
at the model's decision threshold: a pixel is anomalous where the map is above the
threshold an image score is compared with, so an image is anomalous exactly when its
binarized map has an anomalous pixel. No metrics: these splits have no ground truth.
The server wants all eight categories with both splits (its checker,
check_and_prepare_data_for_upload.py from the MVTec AD 2 download, verifies the folder).
"""

from __future__ import annotations

import logging
import os
from typing import Dict, List

import numpy as np

log = logging.getLogger("kdjax")

SUBMISSION_DIR = "submission"


def _write(out_root: str, category: str, split: str, records, maps, threshold) -> List[str]:
    import tifffile
    from PIL import Image

    tif_dir = os.path.join(out_root, "anomaly_images", category, split)
    png_dir = os.path.join(out_root, "anomaly_images_thresholded", category, split)
    os.makedirs(tif_dir, exist_ok=True)
    os.makedirs(png_dir, exist_ok=True)
    paths = []
    for r, m in zip(records, maps):
        stem = os.path.splitext(os.path.basename(r.image_path))[0]
        m = np.asarray(m, np.float32)
        tif = os.path.join(tif_dir, stem + ".tiff")
        tifffile.imwrite(tif, m.astype(np.float16), compression="zlib")
        binary = ((m > threshold) if threshold is not None else np.zeros(m.shape, bool))
        Image.fromarray(binary.astype(np.uint8) * 255, "L").save(
            os.path.join(png_dir, stem + ".png"))
        paths.append(tif)
    return paths


def export_unlabelled(config, model, source, category: str, workdir: str,
                      chunk: int = 32) -> Dict[str, int]:
    """Maps of every unlabelled split of ``source``'s dataset for one category, in chunks
    of ``chunk`` images; returns {split: images written}. A split that is not there is
    named in the log and skipped."""
    import jax

    from kdjax.data.files import DatasetError

    written: Dict[str, int] = {}
    if jax.process_index() != 0:
        return written
    out_root = os.path.join(workdir, SUBMISSION_DIR)
    size = int(config.data.image_size)
    threshold = model.threshold_value
    for split in source.spec.unlabelled_splits:
        try:
            records = source.records(category, split)
        except DatasetError as e:
            log.warning("[%s] no %s maps for the evaluation server: %s", category, split, e)
            continue
        n = 0
        for i in range(0, len(records), chunk):
            images, kept = source.images(records[i:i + chunk], size, config.data.on_corrupt)
            if not kept:
                continue
            comps = model.components(images)
            maps, _ = source.maps_to_original(model, comps, source.original_sizes(kept))
            n += len(_write(out_root, category, split, kept, maps, threshold))
        written[split] = n
        log.info("[%s] %s: %d maps for the evaluation server in %s", category, split, n,
                 os.path.join(out_root, "anomaly_images", category, split))
    return written
