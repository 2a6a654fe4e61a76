"""Devices and global arrays: one ``Mesh(devices, ("data",))`` over every device
of every host; batches sharded ``P("data")``, parameters replicated ``P()``."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


def make_mesh() -> Mesh:
    return Mesh(np.asarray(jax.devices()), ("data",))


def put_global(x: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """Place a host array (identical on every host) as a global array."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def batch_spec(mesh: Mesh, batch: int) -> P:
    """Shard the batch over devices when it divides evenly, else replicate."""
    return P("data") if batch % mesh.size == 0 else P()


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def map_batches(fn, images: np.ndarray, batch: int, mesh: Mesh, progress=None):
    """``fn`` (a jitted function of one device batch, returning a pytree of
    arrays with the batch axis first, replicated) over a uint8 host array in batches of
    ``batch`` (the last one padded with copies of its final image, so one
    compiled shape serves); the host outputs, concatenated, ``len(images)`` rows.
    ``progress``: a kdjax.progress.Progress, advanced by each batch's image count."""
    in_sh = NamedSharding(mesh, batch_spec(mesh, batch))
    parts = []
    for i in range(0, len(images), batch):
        chunk = images[i:i + batch]
        n = len(chunk)
        if n < batch:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch - n, 0)], 0)
        out = jax.device_get(fn(put_global(chunk, in_sh)))
        parts.append(jax.tree_util.tree_map(lambda a, n=n: np.asarray(a)[:n], out))
        if progress is not None:
            progress.update(n)
    return jax.tree_util.tree_map(lambda *a: np.concatenate(a, 0), *parts)
