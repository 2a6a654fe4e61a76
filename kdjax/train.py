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
    per_epoch = max(1, n_train // int(config.train.batch_size))
    return per_epoch * int(config.train.epochs)


def batch_indices(key, step, n: int, batch: int):
    """Indices of the global batch at ``step``: a fresh permutation every epoch
    (drop-last), derived from the step alone so a resumed run sees the same data."""
    if n >= batch:
        per_epoch = n // batch
        epoch, pos = step // per_epoch, step % per_epoch
        perm = jax.random.permutation(jax.random.fold_in(key, epoch), n)
        return jax.lax.dynamic_slice(perm, (pos * batch,), (batch,))
    return jax.random.choice(jax.random.fold_in(key, step), n, (batch,), replace=True)


def make_train_fn(method, tx, mesh: Mesh, batch: int, n_steps: int):
    """A jitted function ``run(ts, data, frozen, key, cache=None) -> (ts, metrics)``
    running ``n_steps`` optimizer steps on the device. ``cache``: the method's
    :meth:`teacher_cache` of every resident training image (see
    :func:`build_teacher_cache`); each step passes its batch's rows to the loss."""
    data_sharding = NamedSharding(mesh, batch_spec(mesh, batch))

    def one_step(carry, _):
        ts, data, frozen, key, cache = carry
        step = ts["step"]
        k_data, k_loss = jax.random.split(jax.random.fold_in(key, step))
        idx = batch_indices(k_data, step, data.shape[0], batch)
        images = jax.lax.with_sharding_constraint(ops.normalize_images(data[idx]), data_sharding)
        kwargs = {}
        if cache is not None:
            kwargs["cached"] = jax.tree_util.tree_map(
                lambda a: jax.lax.with_sharding_constraint(a[idx], data_sharding), cache)
        (loss, (new_state, metrics)), grads = jax.value_and_grad(method.loss, has_aux=True)(
            ts["params"], ts["state"], frozen, images, k_loss, **kwargs)
        updates, opt_state = tx.update(grads, ts["opt_state"], ts["params"])
        params = optax.apply_updates(ts["params"], updates)
        new_ts = {"step": step + 1, "params": params, "state": new_state, "opt_state": opt_state}
        return (new_ts, data, frozen, key, cache), {**metrics, "loss": loss}

    def run(ts, data, frozen, key, cache=None):
        (ts, _, _, _, _), metrics = jax.lax.scan(one_step, (ts, data, frozen, key, cache), None,
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


def prepare_state(method, frozen, state, data: jax.Array, batch: int, mesh: Mesh):
    """The state after the method's ``prepare_passes`` over the resident training
    images: each pass averages :meth:`~kdjax.methods.base.Method.prepare_statistic`
    over every image (float64 on the host) and hands the means to ``prepare_update``."""
    if not method.prepare_passes:
        return state
    fn = lambda a, x: method.prepare_statistic(a[0], a[1], ops.normalize_images(x))  # noqa: E731
    for index in range(int(method.prepare_passes)):
        stats = map_resident(fn, (frozen, state), data, batch, mesh)
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
    steps = total_steps(config, len(cat.train))
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
                   monitor=None):
    """Train (or resume, or just restore) one category; returns (ts, frozen).

    The training images are put on the devices once; the method's statistics of
    the training set (:func:`prepare_state`, skipped when a checkpoint is restored)
    and the teacher cache are computed from that resident copy. ``monitor``: a
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
    data = None
    if training or (restored is None and method.prepare_passes):
        data = put_global(cat.train, repl)  # the one upload of the training images
    if restored is None:
        ts = {**ts, "state": prepare_state(method, frozen, ts["state"], data,
                                           int(config.eval.batch_size), mesh)}
    if not training:
        mngr.close()
        return ts, frozen

    batch = int(config.train.batch_size)
    per_call = max(1, min(int(config.train.steps_per_call), steps))
    ckpt_every = max(1, int(config.train.checkpoint_every))
    train_frozen = dict(frozen)  # + image sets only the loss reads (EfficientAD's penalty)
    for name, spec in method.training_images().items():
        from kdjax.data.penalty import load_penalty_images

        images = load_penalty_images(**spec)
        log.info("[%s] %s: %d images from %s", cat.category, name, len(images), spec["folder"])
        train_frozen[name] = put_global(images, repl)
    cache = build_teacher_cache(config, method, frozen, data, mesh)
    key = jax.random.fold_in(jax.random.PRNGKey(int(config.seed)), 1)
    fns: Dict[int, Any] = {}
    log.info("[%s] training %s: %d steps, batch %d, %d images, %d device(s), %s",
             cat.category, method.name, steps, batch, len(cat.train), mesh.size,
             config.train.compute_dtype)
    step, last_log, t_log, t0 = start, start, time.time(), time.time()
    next_ckpt = (start // ckpt_every + 1) * ckpt_every
    if metrics_path and jax.process_index() == 0:
        _drop_metrics_after(metrics_path, cat.category, start)  # steps redone after a resume
    from kdjax.monitor import Monitor, learning_rates

    mon = monitor or Monitor()
    mon.train_begin(cat.category, start, steps, batch)
    stop = _StopOnSigint()
    try:
        while step < steps:
            stop.check()
            n = min(per_call, steps - step)
            if n not in fns:
                fns[n] = make_train_fn(method, tx, mesh, batch, n)
            ts, metrics = fns[n](ts, data, train_frozen, key, cache)
            losses = np.asarray(jax.device_get(metrics["loss"]))
            if not np.all(np.isfinite(losses)):
                bad = step + int(np.argmax(~np.isfinite(losses))) + 1
                raise TrainingDivergedError(_diverged_message(config, cat.category, losses,
                                                              bad, mngr.latest_step(), ckpt_dir))
            step += n
            mon.train_step(step, float(losses[-1]))
            if step - last_log >= int(config.train.log_every) or step == steps:
                now = time.time()
                ips = (step - last_log) * batch / max(now - t_log, 1e-9)
                means = {k: float(np.mean(np.asarray(v)))
                         for k, v in jax.device_get(metrics).items()}
                mon.train_log(step, means, ips, learning_rates(method, step, steps))
                if metrics_path and jax.process_index() == 0:
                    with open(metrics_path, "a") as f:
                        f.write(json.dumps({"category": cat.category, "step": step,
                                            "images_per_s": ips, **means}) + "\n")
                last_log, t_log = step, now
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


def _drop_metrics_after(path: str, category: str, step: int) -> None:
    """Remove ``category``'s rows past ``step`` from train_metrics.jsonl: a resumed run
    redoes those steps and writes them again."""
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
        if row.get("category") == category and int(row.get("step", 0)) > step:
            continue
        keep.append(line)
    if len(keep) != len(lines):
        with open(path, "w") as f:
            f.writelines(keep)


def _fmt_time(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600:d}:{s % 3600 // 60:02d}:{s % 60:02d}"
