"""Images: decoding to 8-bit RGB, resizing to the model's square input, and the geometry
that maps a square map back onto a non-square image.

Host-side numpy + PIL. The choices are config values (docs/DATA.md, "How images are
decoded and resized"):

* ``resize`` (``data.resize``): how a non-square image becomes a square one.
  "stretch" (default, the papers' code): resize to (S, S), the aspect ratio is not kept.
  "pad": pad the short side with black, centred, to a square, then resize.
  "center_crop": cut the centred square of side min(H, W), then resize.
* ``image_filter`` (``data.image_filter``): the PIL filter of the image resize,
  "bilinear" (default, RD4AD's ``transforms.Resize``), "lanczos" (MRKD's
  ``Image.ANTIALIAS``), "bicubic" or "nearest". PIL widens every filter but "nearest" by
  the downscaling factor (antialiasing).
* ``mask_resize`` (``data.mask_resize``, in kdjax.data.masks): "bilinear" (default:
  bilinear on 0/255, then > 127, RD4AD's ``Resize`` + ``gt > 0.5``) or "nearest" (MRKD's
  ``Image.NEAREST``).

Maps at the original resolution (``restore_map``): "stretch" resizes the square map to
(H, W); "pad" resizes it to the padded square and cuts the padding off; "center_crop"
resizes it to the cropped square and fills the border, which the model never saw, with
the map's minimum.
"""

from __future__ import annotations

import concurrent.futures
import logging
from typing import List, Sequence, Tuple

import numpy as np
from PIL import Image

from kdjax.data.files import ImageError, num_workers, open_file
from kdjax.data.types import IMAGE_FILTERS, RESIZE_POLICIES, Record

log = logging.getLogger("kdjax.data")

_PIL_FILTERS = {"bilinear": Image.BILINEAR, "lanczos": Image.LANCZOS,
                "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}
assert set(_PIL_FILTERS) == set(IMAGE_FILTERS)


def check_options(resize: str = "stretch", image_filter: str = "bilinear") -> None:
    if resize not in RESIZE_POLICIES:
        raise ValueError(f"resize={resize!r}: use one of {', '.join(RESIZE_POLICIES)}.")
    if image_filter not in _PIL_FILTERS:
        raise ValueError(f"image_filter={image_filter!r}: use one of {', '.join(IMAGE_FILTERS)}.")


def corrupt(path: str, err: Exception) -> ImageError:
    return ImageError(
        f"Cannot decode image {path}: {type(err).__name__}: {err}. The file is corrupt, "
        f"truncated or not an image: replace it from the original download, delete it, or "
        f"pass --config.data.on_corrupt=skip to skip such files.")


def to_rgb_pil(im: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB. 16/32-bit integer images keep their
    top 8 bits (v >> 8, as tf.image.convert_image_dtype does); float images are
    taken as [0, 1] when their max is <= 1, else clipped to [0, 255]."""
    if im.mode == "RGB":
        return im
    if im.mode.startswith("I;16") or im.mode in ("I", "F"):
        arr = np.asarray(im)
        if im.mode == "F":
            arr = arr * 255.0 if arr.max() <= 1.0 else arr
            arr = np.clip(np.round(arr), 0, 255).astype(np.uint8)
        else:
            arr = (np.clip(arr.astype(np.int64), 0, 65535) >> 8).astype(np.uint8)
        return Image.fromarray(np.repeat(arr[..., None], 3, axis=-1), "RGB")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    return im.convert("RGB")


def open_rgb(path: str) -> Image.Image:
    try:
        with Image.open(open_file(path)) as im:
            im.load()
            return to_rgb_pil(im)
    except ImageError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, EOFError) as e:
        raise corrupt(path, e) from None


def read_image(path: str) -> np.ndarray:
    """Decode ``path`` to uint8 RGB (H, W, 3) at its original resolution.

    Grayscale, palette, RGBA (alpha dropped) and 16-bit images become 3-channel
    8-bit RGB. Raises ImageError naming the file if it cannot be decoded.
    """
    return np.asarray(open_rgb(path))


# ---------------------------------------------------------------------------
# Geometry: non-square -> square.

def square_box(h: int, w: int, resize: str) -> Tuple[int, int, int]:
    """(side, top, left) of the square the ``resize`` policy makes of an (h, w) image:
    the padded square (offsets of the image inside it) for "pad", the cropped square
    (its offsets inside the image) for "center_crop", (0, 0, 0) for "stretch"."""
    if resize == "pad":
        side = max(h, w)
        return side, (side - h) // 2, (side - w) // 2
    if resize == "center_crop":
        side = min(h, w)
        return side, (h - side) // 2, (w - side) // 2
    return 0, 0, 0


def make_square(im: Image.Image, resize: str) -> Image.Image:
    """The square PIL image the ``resize`` policy makes of ``im`` ("stretch": ``im``)."""
    w, h = im.size
    if resize == "stretch" or w == h:
        return im
    side, top, left = square_box(h, w, resize)
    if resize == "pad":
        canvas = Image.new(im.mode, (side, side), 0)
        canvas.paste(im, (left, top))
        return canvas
    return im.crop((left, top, left + side, top + side))


def square_array(a: np.ndarray, resize: str) -> np.ndarray:
    """``make_square`` on an (H, W[, C]) array (padding with zeros)."""
    h, w = a.shape[:2]
    if resize == "stretch" or h == w:
        return a
    side, top, left = square_box(h, w, resize)
    if resize == "pad":
        out = np.zeros((side, side) + a.shape[2:], a.dtype)
        out[top:top + h, left:left + w] = a
        return out
    return a[top:top + side, left:left + side]


def resize_rgb(im: Image.Image, size: int, resize: str = "stretch",
               image_filter: str = "bilinear") -> np.ndarray:
    """uint8 (S, S, 3) of an RGB PIL image: ``make_square`` then the ``image_filter``
    resize (none when the square already has side S)."""
    im = make_square(im, resize)
    if im.size != (size, size):
        im = im.resize((size, size), _PIL_FILTERS[image_filter])
    return np.asarray(im)


def request_size(hw: Tuple[int, int], resize: str) -> Tuple[int, int]:
    """The size to resize a square map to before ``restore_map`` gives (h, w)."""
    h, w = int(hw[0]), int(hw[1])
    if resize == "stretch" or h == w:
        return h, w
    side = square_box(h, w, resize)[0]
    return side, side


def restore_map(m: np.ndarray, hw: Tuple[int, int], resize: str) -> np.ndarray:
    """A map resized to ``request_size(hw, resize)`` -> the map of the (h, w) image (see
    the module doc); identity for "stretch" and square images."""
    h, w = int(hw[0]), int(hw[1])
    if resize == "stretch" or h == w:
        return m
    side, top, left = square_box(h, w, resize)
    if m.shape != (side, side):
        raise ValueError(f"restore_map: map of shape {m.shape}, expected {(side, side)} "
                         f"(request_size of {(h, w)}).")
    if resize == "pad":
        return m[top:top + h, left:left + w]
    out = np.full((h, w), m.min(), m.dtype)
    out[top:top + side, left:left + side] = m
    return out


def restore_maps(maps, sizes, resize: str):
    """``restore_map`` of each map (a list, or an (N, h, w) array), one size each; an
    array when all the results share one shape, else a list."""
    if resize == "stretch":
        return maps
    out = [restore_map(np.asarray(m), s, resize) for m, s in zip(maps, sizes)]
    if len({o.shape for o in out}) == 1:
        return np.stack(out, 0)
    return out


# ---------------------------------------------------------------------------
# Loading.

def load_one(path: str, size: int, resize: str = "stretch",
             image_filter: str = "bilinear") -> np.ndarray:
    """One image file as uint8 (S, S, 3), decoded and resized as ``load_images`` does."""
    return resize_rgb(open_rgb(path), size, resize, image_filter)


def load_images(records: Sequence[Record], image_size: int, on_corrupt: str = "raise", *,
                resize: str = "stretch", image_filter: str = "bilinear",
                why: str = " (data.on_corrupt=skip)") -> Tuple[np.ndarray, List[Record]]:
    """Decode and resize images to (N, S, S, 3) uint8 (module doc: ``resize``,
    ``image_filter``; the defaults are antialiased bilinear interpolation of the whole
    image, PIL ``Image.resize((S, S), Image.BILINEAR)``), using a thread pool.

    on_corrupt="raise": an undecodable file raises ImageError naming it.
    on_corrupt="skip": such files are skipped with a warning naming each (``why`` says
    what asked for the skipping); the returned records are those kept, in order.
    """
    if on_corrupt not in ("raise", "skip"):
        raise ValueError(f"on_corrupt must be 'raise' or 'skip', got {on_corrupt!r}.")
    check_options(resize, image_filter)
    records = list(records)
    size = int(image_size)

    def work(r):
        try:
            return load_one(r.image_path, size, resize, image_filter)
        except ImageError as e:
            if on_corrupt == "raise":
                raise
            return e

    out = np.zeros((len(records), size, size, 3), np.uint8)
    kept = []
    with concurrent.futures.ThreadPoolExecutor(num_workers()) as ex:
        for r, res in zip(records, ex.map(work, records)):
            if isinstance(res, ImageError):
                log.warning("Skipping an unreadable image%s: %s", why, res)
                continue
            out[len(kept)] = res
            kept.append(r)
    return out[:len(kept)], kept


def header_size(path: str) -> Tuple[int, int]:
    try:
        with Image.open(open_file(path)) as im:
            w, h = im.size
    except (OSError, SyntaxError, ValueError) as e:
        raise corrupt(path, e) from None
    return h, w


def original_sizes(records: Sequence[Record]) -> List[Tuple[int, int]]:
    """(H, W) of each record's image, read from the file headers only."""
    with concurrent.futures.ThreadPoolExecutor(num_workers()) as ex:
        return list(ex.map(lambda r: header_size(r.image_path), records))
