"""Natural images for EfficientAD's penalty (ImageNet train in the paper), read from a
folder as its reference prepares them. The set stays on the devices or is streamed
like the training images (kdjax/data/pipeline.py), so any number of images can serve."""

from __future__ import annotations

import os
from typing import List

import numpy as np

from kdjax.errors import ConfigError, DataError

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm")


def penalty_files(folder: str, max_images: int = 0, seed: int = 0) -> List[str]:
    """The image files (recursively) under ``folder``, sorted; a seeded choice of at
    most ``max_images`` of them when that is > 0."""
    if not os.path.isdir(folder):
        raise ConfigError(
            f"efficientad.penalty_dir={folder!r} is not a directory. Point it at a folder "
            "of natural images (the paper uses the ImageNet training set) or set it to '' to "
            "train without the penalty.")
    files = []
    for root, _, names in os.walk(folder):
        files += [os.path.join(root, n) for n in names if n.lower().endswith(IMAGE_EXTS)]
    files.sort()
    if not files:
        raise DataError(f"efficientad.penalty_dir={folder!r}: no images "
                        f"({', '.join(IMAGE_EXTS)}) under it.")
    if 0 < int(max_images) < len(files):
        pick = np.random.default_rng(seed).choice(len(files), int(max_images), replace=False)
        files = [files[i] for i in sorted(pick)]
    return files


def load_penalty_image(path: str, size: int) -> np.ndarray:
    """One penalty image as the reference prepares it: resized to 2*size x 2*size (PIL
    bilinear, antialiased as torchvision's Resize on PIL images), centre crop size x
    size; uint8 (size, size, 3). RandomGrayscale is drawn on the device at each step."""
    from kdjax.data.images import open_rgb

    im = open_rgb(path).resize((2 * size, 2 * size), resample=2)  # PIL.Image.BILINEAR
    off = size // 2
    return np.asarray(im)[off:off + size, off:off + size]


def load_penalty_images(folder: str, size: int, max_images: int = 0,
                        seed: int = 0) -> np.ndarray:
    """Every image of :func:`penalty_files` as uint8 (N, size, size, 3)."""
    files = penalty_files(folder, max_images, seed)
    out = np.empty((len(files), size, size, 3), np.uint8)
    for i, f in enumerate(files):
        out[i] = load_penalty_image(f, size)
    return out
