"""File access shared by the readers: errors, directory listing, and the in-memory files
of the TFDS source.

Every reader opens image and mask files through :func:`open_file`, which reads from
the file system, or from bytes registered with :func:`register_blobs` under the same
path (``data.source=tfds``: the examples of a prepared TFDS dataset, so that the same
records and the same decoding and resizing code serve both sources).
"""

from __future__ import annotations

import io
import logging
import os
import threading
from typing import Dict, List, Mapping, Tuple

from kdjax.errors import DataError

log = logging.getLogger("kdjax.data")

ARCHIVE_EXTENSIONS = (".tar", ".tar.gz", ".tgz", ".tar.xz", ".zip")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif")
# Files that operating systems and archivers leave behind: ignored without a word.
_SYSTEM_FILES = {"thumbs.db", "desktop.ini", "__macosx", "icon\r", ".ds_store"}


class DatasetError(DataError):
    """A dataset directory is missing or malformed; the message says what to do."""


class ImageError(DataError):
    """An image file cannot be decoded (corrupt, truncated or not an image)."""


def num_workers() -> int:
    return max(1, min(16, (os.cpu_count() or 1) * 2))


# ---------------------------------------------------------------------------
# In-memory files (the TFDS source).

_BLOBS: Dict[str, bytes] = {}
_BLOB_LOCK = threading.Lock()


def register_blobs(blobs: Mapping[str, bytes], replace: bool = True) -> None:
    """Serve ``{path: encoded bytes}`` to every reader in place of the files at those
    paths. ``replace``: forget the previously registered ones first."""
    with _BLOB_LOCK:
        if replace:
            _BLOBS.clear()
        _BLOBS.update({str(k): bytes(v) for k, v in blobs.items()})


def clear_blobs() -> None:
    with _BLOB_LOCK:
        _BLOBS.clear()


def is_blob(path: str) -> bool:
    return str(path) in _BLOBS


def open_file(path: str):
    """What ``PIL.Image.open`` takes for ``path``: the path, or its registered bytes."""
    data = _BLOBS.get(str(path))
    return io.BytesIO(data) if data is not None else path


def file_key(path: str) -> Tuple:
    """A key that changes when the content at ``path`` may have changed."""
    data = _BLOBS.get(str(path))
    if data is not None:
        return (str(path), "blob", len(data), hash(data))
    st = os.stat(path)
    return (str(path), st.st_mtime_ns, st.st_size)


# ---------------------------------------------------------------------------
# Directory listing.

def is_hidden(name: str) -> bool:
    return name.startswith(".") or name.startswith("._") or name.lower() in _SYSTEM_FILES


def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def list_images(folder: str) -> List[str]:
    """Sorted image paths in ``folder``; hidden/system files skipped silently,
    other non-image files and sub-folders skipped with a warning."""
    out = []
    for name in sorted(os.listdir(folder)):
        if is_hidden(name):
            continue
        path = os.path.join(folder, name)
        if os.path.isdir(path) or not is_image_name(name):
            log.warning("Ignoring %s: not an image file (expected one of %s).",
                        path, ", ".join(IMAGE_EXTENSIONS))
            continue
        out.append(path)
    return out


def subdirs(folder: str) -> List[str]:
    if not os.path.isdir(folder):
        return []
    return sorted(d for d in os.listdir(folder)
                  if not is_hidden(d) and os.path.isdir(os.path.join(folder, d)))


def has_image_file(folder: str) -> bool:
    """Whether ``folder`` (or a folder below it) holds an image file (hidden files skipped)."""
    for _, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d != "__MACOSX"]
        for name in filenames:
            if not name.startswith(".") and is_image_name(name):
                return True
    return False


def archives(folder: str) -> List[str]:
    """The archive files (``ARCHIVE_EXTENSIONS``) directly in ``folder``, sorted."""
    if not os.path.isdir(folder):
        return []
    return sorted(os.path.join(folder, n) for n in os.listdir(folder)
                  if n.lower().endswith(ARCHIVE_EXTENSIONS) and not is_hidden(n))


def folders_below(path: str, depth: int = 2) -> List[str]:
    """``path`` and its (non-hidden) sub-folders down to ``depth`` levels."""
    out, level = [path], [path]
    for _ in range(depth):
        level = [os.path.join(p, d) for p in level for d in subdirs(p)]
        out += level
    return out
