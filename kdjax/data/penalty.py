"""Natural images for EfficientAD's penalty (ImageNet train in the paper), read from a
folder as its reference prepares them."""

from __future__ import annotations

import os

import numpy as np

from kdjax.errors import ConfigError, DataError

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm")


def load_penalty_images(folder: str, size: int, max_images: int, seed: int) -> np.ndarray:
    """Natural images for the penalty, as the reference prepares them: resize
    to 2*size x 2*size (PIL bilinear, antialiased as torchvision's Resize on
    PIL images), centre crop size x size. RandomGrayscale is applied on the
    device at each step. Returns uint8 (N, size, size, 3); a seeded choice of
    at most ``max_images`` of the files found (recursively) under ``folder``.
    """
    from PIL import Image

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
    if len(files) > max_images:
        pick = np.random.default_rng(seed).choice(len(files), max_images, replace=False)
        files = [files[i] for i in sorted(pick)]
    out = np.empty((len(files), size, size, 3), np.uint8)
    off = size // 2
    for i, f in enumerate(files):
        with Image.open(f) as im:
            im = im.convert("RGB").resize((2 * size, 2 * size), Image.BILINEAR)
        a = np.asarray(im)
        out[i] = a[off:off + size, off:off + size]
    return out
