"""TensorBoard event files, written with ``tf.summary`` from the host loop.

Summaries are written with ``tf.summary.write`` and the metadata of
TensorBoard's scalar, image and text plugins (the same records
``tf.summary.scalar`` / ``image`` / ``text`` write), so that TensorFlow alone
suffices to write them: since TensorFlow 2.21 those three need the
``tensorboard`` package, which is only required to view them.

``Writers(root)`` holds one ``tf.summary`` file writer per run directory
``<root>/<run>`` (kdjax: ``<workdir>/tensorboard/<category>``, ``.../mean``).
TensorFlow is imported on the first write, with its GPUs hidden (JAX owns
them) and its import-time C++ lines kept out of the console (they go to
log.txt). Nothing here touches a JAX array: callers pass host floats and
uint8 numpy images, so no device synchronization is added.

View with ``tensorboard --logdir <workdir>`` (``pip install tensorboard``).
"""

from __future__ import annotations

import logging
import os
from typing import Dict, Mapping, Optional

import numpy as np

log = logging.getLogger("kdjax")

_TF = None


def import_tf():
    """TensorFlow, imported once: GPUs hidden, import noise sent to the log file."""
    global _TF
    if _TF is None:
        from kdjax import console
        from kdjax.data.pipeline import import_tf as _import

        with console.quiet_stderr("tensorflow"):
            _TF = _import()
    return _TF


def _metadata(plugin: str, data_class: str):
    """SummaryMetadata of a TensorBoard plugin (version-0 plugin data is empty)."""
    from tensorflow.core.framework import summary_pb2

    m = summary_pb2.SummaryMetadata()
    m.plugin_data.plugin_name = plugin
    m.data_class = getattr(summary_pb2, data_class)
    return m


def _png(image: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


class Writers:
    """``tf.summary`` file writers under ``root``, one per run (sub-directory)."""

    def __init__(self, root: str):
        self.root = root
        self._writers: Dict[str, object] = {}
        self.failed = False

    def _writer(self, run: str):
        if run not in self._writers:
            tf = import_tf()
            path = os.path.join(self.root, run)
            os.makedirs(path, exist_ok=True)
            self._writers[run] = tf.summary.create_file_writer(path)
        return self._writers[run]

    def _write(self, run: str, fn) -> None:
        if self.failed:
            return
        try:
            w = self._writer(run)
            with w.as_default():
                fn(import_tf())
        except ImportError as e:  # TensorFlow missing or broken: the run goes on
            self.failed = True
            log.warning("TensorBoard summaries are off: TensorFlow cannot be imported (%s).", e)

    def scalars(self, run: str, step: int, values: Mapping[str, float]) -> None:
        """One scalar per ``{tag: value}`` (non-finite values are skipped)."""
        vals = {k: float(v) for k, v in values.items()
                if v is not None and np.isfinite(float(v))}
        if vals:
            def write(tf):
                meta = _metadata("scalars", "DATA_CLASS_SCALAR")
                for k, v in vals.items():
                    tf.summary.write(k, tf.constant(v, tf.float32), step=int(step),
                                     metadata=meta)
            self._write(run, write)

    def images(self, run: str, step: int, tag: str, images: np.ndarray,
               max_outputs: int = 8) -> None:
        """uint8 images (N, H, W, 3) under one tag (PNG, as tf.summary.image)."""
        images = np.asarray(images, np.uint8)
        if images.ndim == 3:
            images = images[None]
        images = images[:max_outputs]
        if len(images):
            h, w = images.shape[1:3]
            blobs = [str(w).encode(), str(h).encode()] + [_png(im) for im in images]
            self._write(run, lambda tf: tf.summary.write(
                tag, tf.constant(blobs, tf.string), step=int(step),
                metadata=_metadata("images", "DATA_CLASS_BLOB_SEQUENCE")))

    def text(self, run: str, step: int, tag: str, text: str) -> None:
        self._write(run, lambda tf: tf.summary.write(
            tag, tf.constant(text, tf.string), step=int(step),
            metadata=_metadata("text", "DATA_CLASS_TENSOR")))

    def flush(self) -> None:
        for w in self._writers.values():
            w.flush()

    def close(self) -> None:
        for w in self._writers.values():
            w.flush()
            w.close()
        self._writers.clear()


def _events(path: str):
    """Every Event in the event files under ``path``."""
    import glob

    from tensorflow.core.util import event_pb2

    tf = import_tf()
    for f in sorted(glob.glob(os.path.join(path, "**", "events.out.tfevents.*"),
                              recursive=True)):
        for raw in tf.data.TFRecordDataset(f):
            yield f, event_pb2.Event.FromString(raw.numpy())


def read_scalars(path: str) -> Dict[str, list]:
    """{tag: [(step, value)]} of the scalar summaries in the event files under ``path``
    (tests and notebooks; TensorFlow alone, no tensorboard needed)."""
    tf = import_tf()
    out: Dict[str, list] = {}
    for _, event in _events(path):
        for v in event.summary.value:
            if v.HasField("simple_value"):
                value: Optional[float] = float(v.simple_value)
            elif v.HasField("tensor") and v.metadata.plugin_data.plugin_name == "scalars":
                value = float(tf.make_ndarray(v.tensor))
            else:
                continue
            out.setdefault(v.tag, []).append((int(event.step), value))
    return out


def read_tags(path: str) -> Dict[str, str]:
    """{tag: plugin name} of every summary under ``path`` (images, text, scalars)."""
    out: Dict[str, str] = {}
    for _, event in _events(path):
        for v in event.summary.value:
            out[v.tag] = v.metadata.plugin_data.plugin_name
    return out
