"""The training engine: the train state, the jitted multi-step update and the loop.

``train_category(config, method, cat, ckpt_dir, mesh)`` trains (or resumes)
one category: the resized training set stays resident on the devices,
``train.steps_per_call`` optimizer steps run per host call (``lax.scan``,
donated state), orbax checkpoints are saved every ``train.checkpoint_every``
steps and a rerun resumes from the last one. Orchestration over categories,
evaluation and the report are in kdjax/experiment.py; inference in
kdjax/inference.py.

Data parallelism: one ``Mesh(devices, ("data",))`` over every device of every
host (kdjax/devices.py); batches are sharded ``P("data")``, parameters and the
resident dataset replicated ``P()``. The same code runs on one CPU, eight GPUs
or a TPU slice.
"""

from __future__ import annotations

import json
import logging
import math
import time
from typing import Any, Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from kdjax import backends, checkpoints, ops
from kdjax.data.category import CategoryData
from kdjax.devices import batch_spec, put_global
from kdjax.feed import (batch_indices, calls, data_key, stream_inputs,  # noqa: F401
                        extra_indices, loss_key, step_batch_size, steps_per_epoch,
                        training_image_sets, uniform_run)
from kdjax.errors import UserError, WorkdirError

log = logging.getLogger("kdjax")


class TrainingDivergedError(UserError, RuntimeError):
    """The loss became NaN or inf."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training; the message names the step and the last checkpoint."""


# ---------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------

def total_steps(config, n_train: int) -> int:
    if int(config.train.steps) > 0:
        return int(config.train.steps)
    return steps_per_epoch(n_train, int(config.train.batch_size)) * int(config.train.epochs)


def make_train_fn(method, tx, mesh: Mesh, batch: int, n_steps: int, size: Optional[int] = None,
                  stream: bool = False):
    """A jitted function ``run(ts, inputs, frozen, key) -> (ts, metrics)`` running
    ``n_steps`` optimizer steps of ``size`` images each (default ``batch``; the smaller
    last batch of an epoch gets a function of its own) on the device.

    ``inputs``, resident (``stream=False``): {"data": the resident uint8 training
    images, "cache": the method's :meth:`teacher_cache` of each of them or None
    (:func:`build_teacher_cache`), "extra": {name: resident image set} or {}}; each
    step gathers its batch (:func:`batch_indices`) and as many images of each extra
    set (:func:`extra_indices`). Streamed: {"batches": uint8 (n_steps, size, S, S, 3),
    "extra": {name: uint8 (n_steps, size, S, S, 3)}}, the same images gathered on the
    host (kdjax/data/pipeline.py)."""
    size = int(batch if size is None else size)
    data_sharding = NamedSharding(mesh, batch_spec(mesh, size))

    def loss_and_update(ts, frozen, images_u8, key, cached, extra):
        step = ts["step"]
        images = jax.lax.with_sharding_constraint(ops.normalize_images(images_u8), data_sharding)
        kwargs = {}
        if cached is not None:
            kwargs["cached"] = cached
        if extra:
            kwargs["extra"] = extra
        (loss, (new_state, metrics)), grads = jax.value_and_grad(method.loss, has_aux=True)(
            ts["params"], ts["state"], frozen, images, loss_key(key, step), **kwargs)
        updates, opt_state = tx.update(grads, ts["opt_state"], ts["params"])
        params = optax.apply_updates(ts["params"], updates)
        new_ts = {"step": step + 1, "params": params, "state": new_state, "opt_state": opt_state}
        return new_ts, {**metrics, "loss": loss}

    def resident_step(carry, _):
        ts, inputs, frozen, key = carry
        data, cache, extra_sets = inputs["data"], inputs["cache"], inputs["extra"]
        step = ts["step"]
        idx = batch_indices(key, step, data.shape[0], size, batch)
        cached = None
        if cache is not None:
            cached = jax.tree_util.tree_map(
                lambda a: jax.lax.with_sharding_constraint(a[idx], data_sharding), cache)
        extra = {k: v[extra_indices(key, step, size, v.shape[0])]
                 for k, v in extra_sets.items()}
        ts, metrics = loss_and_update(ts, frozen, data[idx], key, cached, extra)
        return (ts, inputs, frozen, key), metrics

    def streamed_step(carry, xs):
        ts, frozen, key = carry
        ts, metrics = loss_and_update(ts, frozen, xs["batches"], key, None, xs["extra"])
        return (ts, frozen, key), metrics

    def run(ts, inputs, frozen, key):
        if stream:
            (ts, _, _), metrics = jax.lax.scan(streamed_step, (ts, frozen, key), inputs,
                                               length=n_steps)
        else:
            (ts, _, _, _), metrics = jax.lax.scan(resident_step, (ts, inputs, frozen, key), None,
                                                  length=n_steps)
        return ts, metrics

    return backends.jit(run, donate_argnums=(0,))


def map_resident(fn, args, data: jax.Array, batch: int, mesh: Mesh, progress=None):
    """``fn(args, x)`` (jittable; ``x`` a uint8 batch, the outputs a pytree of arrays
    with the batch axis first) over every image of the device-resident ``data``, in
    batches of ``batch`` sharded over the mesh (the last batch overlaps the one
    before it, so one compiled shape serves and nothing is uploaded again); the host
    outputs, ``len(data)`` rows. ``progress``: a kdjax.progress.Progress, advanced by
    each batch's new images."""
    n = int(data.shape[0])
    b = max(1, min(int(batch), n))
    in_sh = NamedSharding(mesh, batch_spec(mesh, b))

    def run(args, d, start):
        x = jax.lax.with_sharding_constraint(jax.lax.dynamic_slice_in_dim(d, start, b), in_sh)
        return fn(args, x)

    jrun = backends.jit(run, out_shardings=NamedSharding(mesh, P()))
    parts = []
    for i in range(0, n, b):
        start = min(i, n - b)
        out = jax.device_get(jrun(args, data, jnp.int32(start)))
        parts.append(jax.tree_util.tree_map(lambda a, k=i - start: np.asarray(a)[k:], out))
        if progress is not None:
            progress.update(min(b, n - i))
    return jax.tree_util.tree_map(lambda *a: np.concatenate(a, 0), *parts)


def map_stream(fn, args, chunks, batch: int, mesh: Mesh):
    """:func:`map_resident` for streamed images: ``chunks`` an iterator of host uint8
    arrays (kdjax.data.category.CategoryData.train_chunks)."""
    from kdjax.devices import map_batches

    jrun = backends.jit(fn, out_shardings=NamedSharding(mesh, P()))
    parts = [map_batches(lambda x: jrun(args, x), c, batch, mesh) for c in chunks]
    return jax.tree_util.tree_map(lambda *a: np.concatenate(a, 0), *parts)


def prepare_state(method, frozen, state, images, batch: int, mesh: Mesh):
    """The state after the method's ``prepare_passes`` over the training images (the
    resident device array, or a function returning an iterator of host chunks when
    they are streamed): each pass averages
    :meth:`~kdjax.methods.base.Method.prepare_statistic` over every image (float64 on
    the host) and hands the means to ``prepare_update``."""
    if not method.prepare_passes:
        return state
    fn = lambda a, x: method.prepare_statistic(a[0], a[1], ops.normalize_images(x))  # noqa: E731
    for index in range(int(method.prepare_passes)):
        if callable(images):
            stats = map_stream(fn, (frozen, state), images(), batch, mesh)
        else:
            stats = map_resident(fn, (frozen, state), images, batch, mesh)
        means = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64).mean(0), stats)
        state = jax.device_put(method.prepare_update(index, jax.device_get(state), means),
                               NamedSharding(mesh, P()))
    return state


def build_teacher_cache(config, method, frozen, data: jax.Array, mesh: Mesh):
    """The method's :meth:`~kdjax.methods.base.Method.teacher_cache` of every
    resident training image (``data``, uint8 on the devices), replicated on the mesh
    like the images; None when the method has nothing to cache,
    ``train.cache_teacher`` is off, or the cache would exceed
    ``train.cache_teacher_max_gb`` per device.

    Every step of RD4AD / MRKD / CAD / EfficientAD then skips the frozen
    teacher's forward pass on the clean images (for RD4AD and CAD that is the
    whole teacher); the values are the same up to float summation order."""
    if not bool(config.train.get("cache_teacher", True)):
        return None
    n = int(data.shape[0])
    one = jax.eval_shape(method.teacher_cache, frozen,
                         jax.ShapeDtypeStruct((1,) + tuple(data.shape[1:]), jnp.float32))
    leaves = jax.tree_util.tree_leaves(one)
    if not leaves:
        return None
    gb = n * sum(math.prod(a.shape) * np.dtype(a.dtype).itemsize for a in leaves) / 2**30
    limit = float(config.train.get("cache_teacher_max_gb", 4.0))
    if gb > limit:
        log.info("Teacher cache not used: %.2f GiB for %d images exceeds "
                 "train.cache_teacher_max_gb=%.1f; the teacher runs in every step.", gb, n, limit)
        return None
    from kdjax.progress import Progress

    with Progress(n, f"[{config.data.category}] teacher cache", unit="img", summary=False) as bar:
        host = map_resident(lambda f, x: method.teacher_cache(f, ops.normalize_images(x)),
                            frozen, data, int(config.eval.batch_size), mesh, progress=bar)
    log.info("Teacher cache: %.2f GiB for %d training images (train.cache_teacher).", gb, n)
    repl = NamedSharding(mesh, P())  # every process can read it (several hosts included)
    return jax.tree_util.tree_map(lambda a: put_global(a, repl), host)


def init_train_state(config, method, teacher_variables, cat: CategoryData, mesh: Mesh):
    """Method variables and the initial train state (before the method's statistics
    of the training set, :func:`prepare_state`), replicated on the mesh."""
    seed_key = jax.random.PRNGKey(int(config.seed))
    k_init = jax.random.fold_in(seed_key, 0)
    batch = int(config.train.batch_size)
    size = int(config.data.image_size)
    variables = method.init(k_init, (batch, size, size, 3), teacher_variables)
    if config.init_from:
        variables = method.import_reference(variables, str(config.init_from))
        log.info("Imported reference checkpoint %s", config.init_from)
    steps = total_steps(config, cat.n_train)
    tx = method.optimizer(steps)
    params = variables["params"]
    ts = {"step": jnp.zeros((), jnp.int32), "params": params, "state": variables["state"],
          "opt_state": tx.init(params)}
    repl = NamedSharding(mesh, P())
    ts = jax.device_put(ts, repl)
    frozen = jax.device_put(variables["frozen"], repl)
    return ts, frozen, tx, steps


def train_category(config, method, teacher_variables, cat: CategoryData, ckpt_dir: str,
                   mesh: Mesh, train: bool = True, metrics_path: Optional[str] = None,
                   variant: str = "",
                   monitor=None):
    """Train (or resume, or just restore) one category; returns (ts, frozen).

    Resident images (``data.input``) are put on the devices once; the method's
    statistics of the training set (:func:`prepare_state`, skipped when a checkpoint is
    restored) and the teacher cache are computed from that copy. Streamed images come
    from the tf.data pipeline in the same order (no teacher cache). ``monitor``: a
    kdjax.monitor.Monitor (progress bar, training line, TensorBoard)."""
    if train:  # a rerun with other training settings would mix two trainings
        checkpoints.check_training_config(ckpt_dir, config)
    ts, frozen, tx, steps = init_train_state(config, method, teacher_variables, cat, mesh)
    mngr = checkpoints.checkpoint_manager(ckpt_dir, config.train.keep_checkpoints)
    restored = checkpoints.restore(mngr, ts)
    repl = NamedSharding(mesh, P())
    if restored is not None:
        ts = jax.device_put(restored, repl)
        log.info("[%s] resumed from checkpoint at step %d", cat.category, int(ts["step"]))
    elif not train and not config.init_from:
        raise WorkdirError(
            f"No checkpoint in {ckpt_dir}: run with --mode=train (or train_and_eval) first, "
            "or evaluate a reference checkpoint with --config.init_from=<file>.")
    start = int(jax.device_get(ts["step"]))
    training = train and start < steps
    eval_batch = int(config.eval.batch_size)
    data = None
    if not cat.streamed and (training or (restored is None and method.prepare_passes)):
        data = put_global(cat.train, repl)  # the one upload of the training images
    if restored is None:
        images = data if data is not None else (lambda: cat.train_chunks(eval_batch))
        ts = {**ts, "state": prepare_state(method, frozen, ts["state"], images, eval_batch,
                                           mesh)}
    if not training:
        mngr.close()
        return ts, frozen

    batch = int(config.train.batch_size)
    per_call = max(1, min(int(config.train.steps_per_call), steps))
    ckpt_every = max(1, int(config.train.checkpoint_every))
    key = jax.random.PRNGKey(int(config.seed))
    extra = training_image_sets(config, method, cat.category)
    stream = cat.streamed or any(not isinstance(v, np.ndarray) for v in extra.values())
    if stream:
        from kdjax.data.pipeline import ArraySet

        main = cat.train_set if cat.streamed else ArraySet(cat.train, "train")
        sets = {k: (ArraySet(v, k) if isinstance(v, np.ndarray) else v) for k, v in extra.items()}
        feed = stream_inputs(main, sets, key, mesh, start, steps, batch, per_call)
        log.info("[%s] training images streamed (data.input): %s", cat.category,
                 ", ".join(f"{len(v)} {k}" for k, v in {"train": main, **sets}.items()))
    else:
        resident = {"data": data,
                    "cache": build_teacher_cache(config, method, frozen, data, mesh),
                    "extra": {k: put_global(v, repl) for k, v in extra.items()}}
        feed = ((s0, n, size, resident)
                for s0, n, size in calls(start, steps, cat.n_train, batch, per_call))
    fns: Dict[Any, Any] = {}
    log.info("[%s] training %s: %d steps, batch %d, %d images, %d device(s), %s",
             cat.category, method.name, steps, batch, cat.n_train, mesh.size,
             config.train.compute_dtype)
    step, last_log, t_log, t0 = start, start, time.time(), time.time()
    seen = 0  # images since the last log line
    next_ckpt = (start // ckpt_every + 1) * ckpt_every
    if metrics_path and jax.process_index() == 0:
        # steps redone after a resume (this variant's rows only)
        _drop_metrics_after(metrics_path, cat.category, start, variant)
    from kdjax.monitor import Monitor, learning_rates

    mon = monitor or Monitor()
    mon.train_begin(cat.category, start, steps, batch)
    stop = _StopOnSigint()
    try:
        pending = next(feed, None)
        while pending is not None:
            stop.check()
            s0, n, size, inputs = pending
            if (n, size) not in fns:
                fns[(n, size)] = make_train_fn(method, tx, mesh, batch, n, size, stream)
            ts, metrics = fns[(n, size)](ts, inputs, frozen, key)
            pending = next(feed, None)  # the next call's inputs while this one runs
            losses = np.asarray(jax.device_get(metrics["loss"]))
            if not np.all(np.isfinite(losses)):
                bad = step + int(np.argmax(~np.isfinite(losses))) + 1
                raise TrainingDivergedError(_diverged_message(config, cat.category, losses,
                                                              bad, mngr.latest_step(), ckpt_dir))
            step += n
            seen += n * size
            mon.train_step(step, float(losses[-1]))
            if step - last_log >= int(config.train.log_every) or step == steps:
                now = time.time()
                ips = seen / max(now - t_log, 1e-9)
                means = {k: float(np.mean(np.asarray(v)))
                         for k, v in jax.device_get(metrics).items()}
                mon.train_log(step, means, ips, learning_rates(method, step, steps))
                if metrics_path and jax.process_index() == 0:
                    with open(metrics_path, "a") as f:
                        row = {"category": cat.category, "step": step, "images_per_s": ips}
                        if variant:
                            row["variant"] = variant
                        f.write(json.dumps({**row, **means}) + "\n")
                last_log, t_log, seen = step, now, 0
            if step >= next_ckpt or step == steps:
                checkpoints.save(mngr, ts)
                next_ckpt = (step // ckpt_every + 1) * ckpt_every
    except KeyboardInterrupt as e:
        last = mngr.latest_step()
        mngr.close()
        raise TrainingInterrupted(
            f"[{cat.category}] interrupted at step {step} of {steps}; the last checkpoint is "
            + (f"step {last}" if last is not None else "none (the run starts over)")
            + f" in {ckpt_dir}: rerun the same command to resume.") from e
    except BaseException:
        mngr.close()
        raise
    finally:
        stop.restore()
        mon.train_end()
    checkpoints.keep_only_latest(mngr)
    mngr.close()
    log.info("[%s] trained in %s", cat.category, _fmt_time(time.time() - t0))
    return ts, frozen


class _StopOnSigint:
    """The first Ctrl-C stops training between two device calls (never inside a
    checkpoint save); a second one interrupts at once."""

    def __init__(self):
        import signal
        import threading

        self.requested = False
        self.previous = None
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handler)

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("Ctrl-C: stopping after this step (press again to stop at once).")

    def check(self):
        if self.requested:
            raise KeyboardInterrupt

    def restore(self):
        if self.previous is not None:
            import signal

            signal.signal(signal.SIGINT, self.previous)
            self.previous = None


def _diverged_message(config, category, losses, bad_step, last, ckpt_dir) -> str:
    where = (f"the last good checkpoint (step {last}) is kept in {ckpt_dir}" if last is not None
             else "no checkpoint had been saved yet")
    advice = "lower train.learning_rate"
    if str(config.train.compute_dtype) != "float32":
        advice += " or use train.compute_dtype=float32"
    return (f"[{category}] the loss became {losses[~np.isfinite(losses)][0]} at step {bad_step}. "
            f"Training stopped; {where}. To retry, {advice} and rerun with "
            "--config.train.restart=True (a rerun with other training settings is refused "
            "otherwise).")


def _drop_metrics_after(path: str, category: str, step: int, variant: str = "") -> None:
    """Remove ``category``'s rows past ``step`` from train_metrics.jsonl: a resumed run
    redoes those steps and writes them again. Only the rows of the same ``variant``
    (config.variants) go: another variant's training of the category keeps its rows."""
    import os

    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = f.readlines()
    keep = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if (row.get("category") == category and row.get("variant", "") == variant
                and int(row.get("step", 0)) > step):
            continue
        keep.append(line)
    if len(keep) != len(lines):
        with open(path, "w") as f:
            f.writelines(keep)


def _fmt_time(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600:d}:{s % 3600 // 60:02d}:{s % 60:02d}"
