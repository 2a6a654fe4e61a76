"""What each training call reads: the batch schedule (epochs as the reference code's
DataLoaders), the random streams, and the streamed inputs (``data.input=stream``).

Everything here is a function of (config.seed, step) and the set sizes, so a resumed
run reads what an uninterrupted one does, resident or streamed alike (kdjax/train.py
gathers resident batches on the device with the same :func:`batch_indices`).
"""

from __future__ import annotations

import logging
from typing import Any, Dict

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from kdjax.devices import batch_spec

log = logging.getLogger("kdjax")


def steps_per_epoch(n: int, batch: int) -> int:
    """Optimizer steps of one epoch: ceil(n / batch), as the reference code's DataLoader
    (drop_last=False): every image exactly once, the last batch holding the rest."""
    return max(1, -(-int(n) // int(batch)))


def step_batch_size(step: int, n: int, batch: int) -> int:
    """The batch size of ``step``: ``batch``, or ``n % batch`` at the last step of an
    epoch (``n`` when the set is smaller than one batch)."""
    full, rest = divmod(int(n), int(batch))
    return rest if rest and int(step) % steps_per_epoch(n, batch) == full else int(batch)


def uniform_run(step: int, n: int, batch: int, limit: int) -> int:
    """How many consecutive steps from ``step`` (at most ``limit``) share its batch size:
    one compiled function runs them (the smaller last batch of an epoch is a call of
    its own)."""
    full, rest = divmod(int(n), int(batch))
    if not rest:
        return int(limit)
    pos = int(step) % steps_per_epoch(n, batch)
    return 1 if pos == full else min(int(limit), full - pos)


# The keys of a run's random streams, functions of (config.seed, step) alone, so a
# resumed run draws what an uninterrupted one does: the epoch permutations, the loss's
# randomness (augmentations, masks), the extra images of a step (EfficientAD's penalty).
def data_key(key):
    return jax.random.fold_in(key, 0)


def loss_key(key, step):
    return jax.random.fold_in(jax.random.fold_in(key, 1), step)


def extra_indices(key, step, count: int, n: int):
    """Indices of the ``count`` extra images (of ``n``) of ``step``."""
    return jax.random.randint(jax.random.fold_in(jax.random.fold_in(key, 2), step), (count,),
                              0, n)


def batch_indices(key, step, n: int, size: int, batch: int):
    """Indices of the global batch at ``step`` (``size`` =
    :func:`step_batch_size`): every epoch a fresh permutation of the ``n`` images from
    ``fold_in(data_key, epoch)``, cut into batches of ``batch`` and a last smaller one;
    derived from the step alone so a resumed run sees the same data. Jittable (``size``,
    ``n`` and ``batch`` static)."""
    spe = steps_per_epoch(n, batch)
    epoch, pos = step // spe, step % spe
    perm = jax.random.permutation(jax.random.fold_in(data_key(key), epoch), n)
    return jax.lax.dynamic_slice(perm, (pos * batch,), (size,))


def calls(start: int, steps: int, n: int, batch: int, per_call: int):
    """(first step, number of steps, batch size) of each host call from ``start`` to
    ``steps``: at most ``per_call`` steps of one batch size each."""
    step = int(start)
    while step < steps:
        size = step_batch_size(step, n, batch)
        k = uniform_run(step, n, batch, min(int(per_call), int(steps) - step))
        yield step, k, size
        step += k


def training_image_sets(config, method, category: str) -> Dict[str, Any]:
    """The method's extra training image sets (:meth:`Method.training_images`, e.g.
    EfficientAD's penalty images): each a host uint8 array when it stays resident
    (``data.input``, ``train.resident_max_gb``), else a streamed ImageSet."""
    from kdjax.data import penalty
    from kdjax.data.category import input_mode
    from kdjax.data.pipeline import ImageSet, build_cache

    out = {}
    for name, spec in method.training_images().items():
        size = int(spec["size"])
        files = penalty.penalty_files(spec["folder"], int(spec["max_images"]), int(spec["seed"]))
        images = ImageSet(files, size, lambda p, s=size: penalty.load_penalty_image(p, s),
                          name=name, describe="penalty: resize 2x, centre crop")
        if config.data.get("cache", ""):
            build_cache(images, str(config.data.cache))
        if input_mode(config, len(images)) == "resident":
            out[name] = np.concatenate(list(images.chunks(256)), 0)
            log.info("[%s] %s: %d images from %s (resident)", category, name, len(files),
                     spec["folder"])
        else:
            out[name] = images
            log.info("[%s] %s: %d images from %s (streamed)", category, name, len(files),
                     spec["folder"])
    return out


def _local_rows(mesh: Mesh, size: int):
    """(sharding spec, the rows of a global batch of ``size`` this process holds)."""
    spec = batch_spec(mesh, size)
    if spec == P() or jax.process_count() == 1:
        return spec, np.arange(size)
    sh = NamedSharding(mesh, spec)
    rows = sorted({i for idx in sh.addressable_devices_indices_map((size,)).values()
                   for i in range(*idx[0].indices(size))})
    return spec, np.asarray(rows)


def stream_inputs(main, sets, key, mesh: Mesh, start: int, steps: int, batch: int,
                   per_call: int):
    """(first step, steps, batch size, inputs) of each call, the images gathered on the
    host by the tf.data pipeline (kdjax/data/pipeline.py) in the order the resident
    path gathers them on the device (:func:`batch_indices`, :func:`extra_indices`)."""
    from kdjax.data.pipeline import batch_stream

    n = len(main)
    plan = list(calls(start, steps, n, batch, per_call))
    cpu = jax.devices("cpu")[0]
    perms: Dict[int, np.ndarray] = {}

    def indices(step, size):
        spe = steps_per_epoch(n, batch)
        epoch, pos = divmod(step, spe)
        if epoch not in perms:
            perms.clear()
            with jax.default_device(cpu):
                perms[epoch] = np.asarray(jax.random.permutation(
                    jax.random.fold_in(data_key(key), epoch), n))
        idx = perms[epoch][pos * batch:pos * batch + size]
        with jax.default_device(cpu):
            ex = {k: np.asarray(extra_indices(key, step, size, len(v))) for k, v in sets.items()}
        _, rows = _local_rows(mesh, size)
        return idx[rows], {k: v[rows] for k, v in ex.items()}

    def steps_gen():
        for s0, k, size in plan:
            for st in range(s0, s0 + k):
                yield indices(st, size)

    it = batch_stream(steps_gen(), main, sets)
    for s0, k, size in plan:
        items = [next(it) for _ in range(k)]
        spec, _ = _local_rows(mesh, size)
        sh = NamedSharding(mesh, P(None, *spec))
        shape = (k, size, main.size, main.size, 3)

        def glob(a):
            return jax.make_array_from_process_local_data(sh, a, shape)
        yield s0, k, size, {"batches": glob(np.stack([b for b, _ in items])),
                            "extra": {name: glob(np.stack([e[name] for _, e in items]))
                                      for name in sets}}
