"""tf.data input pipeline: decode, antialiased resize, shuffle, shard, batch, prefetch.

The images it yields equal ``kdjax.data.load_images`` within one grey level:
both use antialiased bilinear interpolation (here
``tf.image.resize(method="bilinear", antialias=True)`` rounded to uint8, there
PIL's BILINEAR filter, which is the same triangle filter widened by the
downscaling factor; PIL rounds once more between its two 1-D passes, hence
the tolerance). PNG and JPEG files in ordinary modes are decoded by
TensorFlow; anything else (16-bit, TIFF, BMP, CMYK, ...) goes through
``kdjax.data.read_image`` inside ``tf.numpy_function``.

TensorFlow is imported only inside these functions, and it is kept off the
GPUs (``tf.config.set_visible_devices([], "GPU")``) so that JAX owns them.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
from PIL import Image

from kdjax.data.readers import DatasetError, ImageError, _corrupt, read_image
from kdjax.data.types import Record

_NATIVE_FORMATS = {"PNG", "JPEG"}
_NATIVE_MODES = {"RGB", "L", "RGBA", "LA", "P", "1"}


def import_tf():
    """Import TensorFlow with its GPUs hidden (JAX keeps them)."""
    import tensorflow as tf

    try:
        tf.config.set_visible_devices([], "GPU")
    except (RuntimeError, ValueError):  # already initialized: nothing to do
        pass
    return tf


def _native_ok(path: str) -> bool:
    """Whether TensorFlow's decoder gives the same pixels as read_image for this
    file (PNG/JPEG, 8-bit modes); also checks that the header is readable."""
    try:
        with Image.open(path) as im:
            return im.format in _NATIVE_FORMATS and im.mode in _NATIVE_MODES
    except (OSError, SyntaxError, ValueError) as e:
        raise _corrupt(path, e) from None


def _read_py(path) -> np.ndarray:
    return read_image(path.decode() if isinstance(path, bytes) else str(path))


def decode_and_resize(tf, path, native, image_size: int):
    """(S, S, 3) uint8 tensor of one image file (antialiased bilinear resize)."""

    def nat():
        raw = tf.io.read_file(path)
        return tf.io.decode_image(raw, channels=3, dtype=tf.uint8, expand_animations=False)

    def py():
        img = tf.numpy_function(_read_py, [path], tf.uint8, stateful=False)
        return tf.reshape(img, tf.stack([tf.shape(img)[0], tf.shape(img)[1], 3]))

    img = tf.cond(native, nat, py)
    img.set_shape([None, None, 3])
    s = int(image_size)
    shape = tf.shape(img)

    def resize():
        out = tf.image.resize(img, (s, s), method="bilinear", antialias=True)
        return tf.cast(tf.clip_by_value(tf.round(out), 0.0, 255.0), tf.uint8)

    same = tf.logical_and(tf.equal(shape[0], s), tf.equal(shape[1], s))
    img = tf.cond(same, lambda: img, resize)
    img.set_shape([s, s, 3])
    return img


def make_dataset(records: Sequence[Record], image_size: int, batch_size: int, *, seed: int,
                 shuffle: bool = True, repeat: bool = True,
                 process_index: Optional[int] = None, process_count: Optional[int] = None,
                 drop_remainder: bool = True, cache: bool = True):
    """A tf.data.Dataset of uint8 (batch_size, S, S, 3) image batches.

    records: the images (e.g. from list_records / split_train_val).
    batch_size: the batch of THIS process (global batch / process_count).
    seed: fixes the shuffling order (the same seed gives the same batches).
    process_index / process_count: this host's shard (default
    jax.process_index() / jax.process_count()): host i takes records
    i, i + count, ...; with drop_remainder, the records are first cut to a
    multiple of process_count so every host yields the same number of batches.
    cache: keep decoded, resized images in memory after the first epoch.
    Without shuffling, one process and no repeat, the order is that of ``records``.
    """
    records = list(records)
    if not records:
        raise DatasetError("make_dataset: no records (the split is empty).")
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must be in [0, {process_count}).")
    n = len(records)
    if drop_remainder and process_count > 1:
        n -= n % process_count
    paths = [r.image_path for r in records[:n]][process_index::process_count]
    if not paths:
        raise DatasetError(f"make_dataset: process {process_index} of {process_count} gets no "
                           f"images ({len(records)} records).")
    if drop_remainder and len(paths) < batch_size and not repeat:
        raise DatasetError(f"make_dataset: {len(paths)} images per process cannot fill one batch "
                           f"of {batch_size} with drop_remainder=True; lower the batch size.")
    native = [_native_ok(p) for p in paths]

    tf = import_tf()
    ds = tf.data.Dataset.from_tensor_slices((tf.constant(paths), tf.constant(native)))
    ds = ds.map(lambda p, k: decode_and_resize(tf, p, k, image_size),
                num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if cache:
        ds = ds.cache()
    if shuffle:
        ds = ds.shuffle(len(paths), seed=int(seed), reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()
    ds = ds.batch(int(batch_size), drop_remainder=drop_remainder)
    ds = ds.prefetch(tf.data.AUTOTUNE)
    opts = tf.data.Options()
    opts.deterministic = True
    return ds.with_options(opts)


__all__ = ["make_dataset", "decode_and_resize", "import_tf", "ImageError"]
