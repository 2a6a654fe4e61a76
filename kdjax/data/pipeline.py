"""The engine's streaming input (``data.input=stream``): image sets decoded on demand,
a tf.data pipeline of training batches, and the on-disk cache (``data.cache``).

* :class:`ImageSet`: a list of image files and the function that decodes and
  resizes one of them (the reader's own: ``kdjax.data.images.load_one`` with
  ``data.resize`` / ``data.image_filter``, or EfficientAD's penalty preparation),
  optionally read from a cache of the decoded, resized uint8 images.
* :func:`build_cache`: writes every image of a set once into an ArrayRecord file
  under ``data.cache`` (named by a hash of the files, their sizes and modification
  times, and the preprocessing), so later epochs and runs skip the decoding.
* :func:`batch_stream`: a tf.data pipeline yielding, step by step, the images of the
  steps the engine asks for (their indices come from the engine's own
  permutations, :mod:`kdjax.train`, so a streamed run trains on the same batches as a
  resident one and a resumed run on the same as an uninterrupted one), decoded in
  parallel and prefetched; each process reads only its slice of a sharded batch.

TensorFlow is imported only here (and kept off the GPUs, which JAX owns).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging
import os
import threading
from typing import Callable, Iterator, Optional, Sequence, Tuple

import numpy as np

from kdjax.data.files import num_workers

log = logging.getLogger("kdjax")

CACHE_FORMAT = 1


def import_tf():
    """Import TensorFlow with its GPUs hidden (JAX keeps them)."""
    import tensorflow as tf

    try:
        tf.config.set_visible_devices([], "GPU")
    except (RuntimeError, ValueError):  # already initialized: nothing to do
        pass
    return tf


class ImageSet:
    """``len(paths)`` images of ``size`` x ``size``, decoded on demand by
    ``load(path) -> uint8 (size, size, 3)``; ``name`` for messages (e.g. "train")."""

    def __init__(self, paths: Sequence[str], size: int, load: Callable[[str], np.ndarray],
                 name: str = "images", describe: str = ""):
        self.paths = list(paths)
        self.size = int(size)
        self._load = load
        self.name = name
        self.describe = describe  # the preprocessing, part of the cache key
        self.cache_path: Optional[str] = None
        self._local = threading.local()

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def nbytes(self) -> int:
        return len(self.paths) * self.size * self.size * 3

    def _reader(self):
        r = getattr(self._local, "reader", None)
        if r is None:
            from array_record.python import array_record_module as ar

            r = self._local.reader = ar.ArrayRecordReader(self.cache_path)
        return r

    def load(self, i: int) -> np.ndarray:
        if self.cache_path:
            (raw,) = self._reader().read([int(i)])
            return np.frombuffer(raw, np.uint8).reshape(self.size, self.size, 3)
        return self._load(self.paths[int(i)])

    def load_many(self, indices) -> np.ndarray:
        """uint8 (len(indices), S, S, 3), in that order."""
        indices = [int(i) for i in np.asarray(indices).reshape(-1)]
        out = np.empty((len(indices), self.size, self.size, 3), np.uint8)
        if self.cache_path:
            for j, raw in enumerate(self._reader().read(indices)):
                out[j] = np.frombuffer(raw, np.uint8).reshape(self.size, self.size, 3)
            return out
        for j, i in enumerate(indices):
            out[j] = self._load(self.paths[i])
        return out

    def chunks(self, chunk: int) -> Iterator[np.ndarray]:
        """Every image in order, ``chunk`` at a time (decoded by a thread pool)."""
        with concurrent.futures.ThreadPoolExecutor(num_workers()) as ex:
            for start in range(0, len(self), chunk):
                idx = range(start, min(start + chunk, len(self)))
                yield np.stack(list(ex.map(self.load, idx)), 0)


class ArraySet:
    """An :class:`ImageSet` over images already in host memory (uint8 (N, S, S, 3))."""

    def __init__(self, array: np.ndarray, name: str = "images"):
        self.array, self.name = array, name
        self.size = int(array.shape[1])

    def __len__(self) -> int:
        return len(self.array)

    def load_many(self, indices) -> np.ndarray:
        return self.array[np.asarray(indices, np.int64).reshape(-1)]

    def chunks(self, chunk: int) -> Iterator[np.ndarray]:
        for i in range(0, len(self.array), chunk):
            yield self.array[i:i + chunk]


def cache_key(images: ImageSet) -> str:
    """A hash of the files (paths, sizes, modification times), the output size and the
    preprocessing: a changed file or setting gives another cache file."""
    h = hashlib.sha256()
    h.update(f"{CACHE_FORMAT}|{images.size}|{images.describe}|".encode())
    for p in images.paths:
        try:
            st = os.stat(p)
            stamp = f"{st.st_size}:{st.st_mtime_ns}"
        except OSError:  # an in-memory file (a TFDS blob)
            stamp = "blob"
        h.update(f"{p}|{stamp}\n".encode())
    return h.hexdigest()[:20]


def build_cache(images: ImageSet, folder: str) -> str:
    """The ArrayRecord cache of ``images`` in ``folder`` (written once, then reused);
    sets ``images.cache_path``. The file holds each image's uint8 bytes in order."""
    from array_record.python import array_record_module as ar

    os.makedirs(folder, exist_ok=True)
    key = cache_key(images)
    path = os.path.join(folder, f"{images.name}-{key}.array_record")
    meta_path = path[:-len(".array_record")] + ".json"
    if os.path.isfile(path) and os.path.isfile(meta_path):
        images.cache_path = path
        log.info("data.cache: %d %s images read from %s", len(images), images.name, path)
        return path
    tmp = f"{path}.tmp-{os.getpid()}"
    writer = ar.ArrayRecordWriter(tmp, "group_size:1")
    try:
        for chunk in images.chunks(64):
            for img in chunk:
                writer.write(np.ascontiguousarray(img, np.uint8).tobytes())
    finally:
        writer.close()
    os.replace(tmp, path)
    with open(meta_path, "w") as f:
        json.dump({"format": CACHE_FORMAT, "count": len(images), "size": images.size,
                   "preprocessing": images.describe, "files": images.paths[:5] + (
                       ["..."] if len(images) > 5 else [])}, f, indent=1)
    images.cache_path = path
    log.info("data.cache: %d %s images decoded once into %s", len(images), images.name, path)
    return path


def batch_stream(steps: Iterator[Tuple[np.ndarray, dict]], main: ImageSet,
                 extra: Optional[dict] = None, prefetch: Optional[int] = None,
                 threads: Optional[int] = None):
    """An iterator of (uint8 batch, {name: uint8 extra batch}), one per element of
    ``steps`` = (indices into ``main``, {name: indices into ``extra[name]``}), decoded
    in parallel by tf.data (deterministic order) and prefetched; ``threads`` bounds
    tf.data's thread pool (default: one per core)."""
    tf = import_tf()
    extra = dict(extra or {})
    names = sorted(extra)

    def gen():
        for idx, ex in steps:
            yield (np.asarray(idx, np.int64),) + tuple(np.asarray(ex[k], np.int64)
                                                      for k in names)

    sig = tuple(tf.TensorSpec([None], tf.int64) for _ in range(1 + len(names)))
    ds = tf.data.Dataset.from_generator(gen, output_signature=sig)
    s = main.size

    def load(*idx):
        outs = [tf.numpy_function(main.load_many, [idx[0]], tf.uint8, stateful=False)]
        for k, i in zip(names, idx[1:]):
            outs.append(tf.numpy_function(extra[k].load_many, [i], tf.uint8, stateful=False))
        return tuple(tf.reshape(o, [-1, s, s, 3]) for o in outs)

    ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.prefetch(tf.data.AUTOTUNE if prefetch is None else int(prefetch))
    opts = tf.data.Options()
    opts.deterministic = True
    if threads:
        opts.threading.private_threadpool_size = int(threads)
    ds = ds.with_options(opts)
    for item in ds.as_numpy_iterator():
        yield item[0], dict(zip(names, item[1:]))


__all__ = ["ArraySet", "ImageSet", "batch_stream", "build_cache", "cache_key", "import_tf"]
