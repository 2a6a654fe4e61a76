"""The one training engine: every method trains and is evaluated here.

``train_and_evaluate(config, workdir)`` runs, for each category of the config
(and each variant, when the config lists some): load the data once, keep the
resized training set resident on the devices, run jitted multi-step training
(``lax.scan`` over ``train.steps_per_call`` steps per host call, donated
state), save orbax checkpoints (resuming from the last one), then jitted
inference, host-side metrics and the report.

Data parallelism: one ``Mesh(devices, ("data",))`` over every device of every
host; batches are sharded ``P("data")``, parameters and the resident dataset
replicated ``P()``. The same code runs on one CPU, eight GPUs or a TPU slice.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import logging
import math
import os
import socket
import time
from typing import Any, Dict, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from kdjax import config as config_lib
from kdjax import ops, xla
from kdjax.methods import get_method

log = logging.getLogger("kdjax")


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or inf."""


class WorkdirLockedError(RuntimeError):
    """Another live run uses the same workdir."""


# ---------------------------------------------------------------------------
# Devices and arrays
# ---------------------------------------------------------------------------

def make_mesh() -> Mesh:
    return Mesh(np.asarray(jax.devices()), ("data",))


def put_global(x: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """Place a host array (identical on every host) as a global array."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def batch_spec(mesh: Mesh, batch: int) -> P:
    """Shard the batch over devices when it divides evenly, else replicate."""
    return P("data") if batch % mesh.size == 0 else P()


# ---------------------------------------------------------------------------
# Workdir: lock and logging
# ---------------------------------------------------------------------------

@contextlib.contextmanager
def workdir_lock(workdir: str):
    """Refuse a second live run on the same workdir; take over stale locks."""
    if jax.process_index() != 0:
        yield
        return
    path = os.path.join(workdir, ".kdjax.lock")
    host = socket.gethostname()
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            with os.fdopen(fd, "w") as f:
                json.dump({"pid": os.getpid(), "host": host, "time": time.time()}, f)
            break
        except FileExistsError:
            try:
                with open(path) as f:
                    info = json.load(f)
            except (OSError, ValueError):
                info = {}
            alive = info.get("host") == host and _pid_alive(int(info.get("pid", -1)))
            if alive or (info.get("host") not in (None, host)):
                raise WorkdirLockedError(
                    f"The workdir {workdir!r} is in use by another kdjax run "
                    f"(pid {info.get('pid')} on {info.get('host')}). Wait for it to finish, use "
                    f"another --workdir, or delete {path} if that run is gone.")
            log.warning("Removing a stale lock left by pid %s.", info.get("pid"))
            os.remove(path)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.remove(path)


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def setup_logging(workdir: str) -> None:
    os.makedirs(workdir, exist_ok=True)
    log.setLevel(logging.INFO)
    # Console output: through the root logger when the application configured one
    # (absl does), else a handler of our own. The logger always propagates, so the
    # application's (and pytest's) handlers see every message.
    if not logging.getLogger().handlers and not any(
            isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
            for h in log.handlers):
        h = logging.StreamHandler()
        h.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        log.addHandler(h)
    path = os.path.abspath(os.path.join(workdir, "log.txt"))
    for h in list(log.handlers):
        if isinstance(h, logging.FileHandler):
            log.removeHandler(h)
            h.close()
    fh = logging.FileHandler(path)
    fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(fh)


# ---------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------

@dataclasses.dataclass
class CategoryData:
    category: str
    root: str
    train: np.ndarray  # uint8 (N, S, S, 3)
    val: Optional[np.ndarray]
    train_records: list
    val_records: list


def dataset_root(config, workdir: str) -> str:
    """The dataset directory; the synthetic set is generated on first use."""
    if config.data.dataset == "synthetic":
        from kdjax import data

        root = config.data.root or os.path.join(workdir, "synthetic_data")
        data.ensure_synthetic(root, seed=int(config.data.synthetic_seed),
                              image_size=int(config.data.synthetic_size),
                              counts=tuple(config.data.synthetic_counts))
        return root
    return config.data.root


def needs_validation(method) -> bool:
    return len(method.map_names) > 1 or method.normalize_with_validation


def load_category(config, root: str, category: str, with_val: bool) -> CategoryData:
    from kdjax import data

    ds = config.data.dataset
    size = int(config.data.image_size)
    train_records = data.list_records(ds, root, category, "train")
    val_records: list = []
    if with_val:
        if ds in ("mvtec_loco", "synthetic"):
            val_records = data.list_records(ds, root, category, "validation")
        else:
            train_records, val_records = data.split_train_val(
                train_records, float(config.data.val_fraction), int(config.seed))
    train, train_records = data.load_images(train_records, size, on_corrupt=config.data.on_corrupt)
    val = None
    if val_records:
        val, val_records = data.load_images(val_records, size, on_corrupt=config.data.on_corrupt)
    if len(train) == 0:
        raise ValueError(f"No usable training images for category {category!r} under {root}.")
    return CategoryData(category, root, train, val, train_records, val_records)


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

    return xla.jit(run, donate_argnums=(0,))


def build_teacher_cache(config, method, frozen, images: np.ndarray, mesh: Mesh):
    """The method's :meth:`~kdjax.methods.base.Method.teacher_cache` of every
    training image (uint8 host array), replicated on the mesh like the resident
    images; None when the method has nothing to cache, ``train.cache_teacher``
    is off, or the cache would exceed ``train.cache_teacher_max_gb`` per device.

    Every step of RD4AD / MRKD / CAD / EfficientAD then skips the frozen
    teacher's forward pass on the clean images (for RD4AD and CAD that is the
    whole teacher); the values are the same up to float summation order."""
    if not bool(config.train.get("cache_teacher", True)):
        return None
    n = len(images)
    one = jax.eval_shape(method.teacher_cache, frozen,
                         jax.ShapeDtypeStruct((1,) + images.shape[1:], jnp.float32))
    leaves = jax.tree_util.tree_leaves(one)
    if not leaves:
        return None
    gb = n * sum(math.prod(a.shape) * np.dtype(a.dtype).itemsize for a in leaves) / 2**30
    limit = float(config.train.get("cache_teacher_max_gb", 4.0))
    if gb > limit:
        log.info("Teacher cache not used: %.2f GiB for %d images exceeds "
                 "train.cache_teacher_max_gb=%.1f; the teacher runs in every step.", gb, n, limit)
        return None
    # Replicated output: every process can read it (several hosts included).
    repl = NamedSharding(mesh, P())
    fn = xla.jit(lambda f, x: method.teacher_cache(f, ops.normalize_images(x)),
                 out_shardings=repl)
    host = map_batches(lambda x: fn(frozen, x), images, int(config.eval.batch_size), mesh)
    log.info("Teacher cache: %.2f GiB for %d training images (train.cache_teacher).", gb, n)
    return jax.tree_util.tree_map(lambda a: put_global(a, repl), host)


def _checkpoint_manager(ckpt_dir: str, keep: int):
    import orbax.checkpoint as ocp

    opts = ocp.CheckpointManagerOptions(max_to_keep=max(1, int(keep)), create=True)
    return ocp.CheckpointManager(os.path.abspath(ckpt_dir), options=opts)


def _save(mngr, ts) -> None:
    import orbax.checkpoint as ocp

    step = int(jax.device_get(ts["step"]))
    mngr.save(step, args=ocp.args.StandardSave(ts), force=True)
    mngr.wait_until_finished()


def _restore(mngr, ts_template):
    import orbax.checkpoint as ocp

    step = mngr.latest_step()
    if step is None:
        return None
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, ts_template)
    return mngr.restore(step, args=ocp.args.StandardRestore(abstract))


def _eval_batches(images: np.ndarray, batch: int):
    """Normalized device batches of a host image array (for Method.prepare)."""
    def gen():
        for i in range(0, len(images), batch):
            yield ops.normalize_images(jnp.asarray(images[i:i + batch]))
    return gen


def init_train_state(config, method, cat: CategoryData, mesh: Mesh):
    """Method variables and the initial train state, replicated on the mesh."""
    seed_key = jax.random.PRNGKey(int(config.seed))
    k_init = jax.random.fold_in(seed_key, 0)
    batch = int(config.train.batch_size)
    size = int(config.data.image_size)
    variables = method.init(k_init, (batch, size, size, 3))
    if config.init_from:
        variables = _import_reference(config, variables)
    state = method.prepare(variables, _eval_batches(cat.train, int(config.eval.batch_size)))
    steps = total_steps(config, len(cat.train))
    tx = method.optimizer(steps)
    params = variables["params"]
    ts = {"step": jnp.zeros((), jnp.int32), "params": params, "state": state,
          "opt_state": tx.init(params)}
    repl = NamedSharding(mesh, P())
    ts = jax.device_put(ts, repl)
    frozen = jax.device_put(variables["frozen"], repl)
    return ts, frozen, tx, steps


def _import_reference(config, variables):
    """--config.init_from=ckpt.pth: a checkpoint trained with the reference PyTorch code."""
    from kdjax import weights

    ref = weights.load_reference_rd_checkpoint(
        config.init_from, width_divisor=int(config.teacher.width_divisor),
        generation=config.method == "mrkd")
    variables = dict(variables)
    variables["params"] = ref["params"]
    variables["state"] = {**variables["state"], "batch_stats": ref["batch_stats"]}
    log.info("Imported reference checkpoint %s", config.init_from)
    return variables


def train_category(config, method, cat: CategoryData, ckpt_dir: str, mesh: Mesh,
                   train: bool = True, metrics_path: Optional[str] = None):
    """Train (or resume, or just restore) one category; returns (ts, frozen)."""
    ts, frozen, tx, steps = init_train_state(config, method, cat, mesh)
    mngr = _checkpoint_manager(ckpt_dir, config.train.keep_checkpoints)
    restored = _restore(mngr, ts)
    if restored is not None:
        ts = jax.device_put(restored, NamedSharding(mesh, P()))
        log.info("[%s] resumed from checkpoint at step %d", cat.category, int(ts["step"]))
    elif not train:
        raise FileNotFoundError(
            f"No checkpoint in {ckpt_dir}: run with --mode=train (or train_and_eval) first.")
    start = int(jax.device_get(ts["step"]))
    if not train or start >= steps:
        mngr.close()
        return ts, frozen

    batch = int(config.train.batch_size)
    per_call = max(1, min(int(config.train.steps_per_call), steps))
    ckpt_every = max(1, int(config.train.checkpoint_every))
    interrupt_after = int(config.train.get("interrupt_after", 0))
    data = put_global(cat.train, NamedSharding(mesh, P()))
    cache = build_teacher_cache(config, method, frozen, cat.train, mesh)
    key = jax.random.fold_in(jax.random.PRNGKey(int(config.seed)), 1)
    fns: Dict[int, Any] = {}
    log.info("[%s] training %s: %d steps, batch %d, %d images, %d device(s), %s",
             cat.category, method.name, steps, batch, len(cat.train), mesh.size,
             config.train.compute_dtype)
    step, last_log, t_log, t0 = start, start, time.time(), time.time()
    next_ckpt = (start // ckpt_every + 1) * ckpt_every
    while step < steps:
        n = min(per_call, steps - step)
        if n not in fns:
            fns[n] = make_train_fn(method, tx, mesh, batch, n)
        ts, metrics = fns[n](ts, data, frozen, key, cache)
        losses = np.asarray(jax.device_get(metrics["loss"]))
        if not np.all(np.isfinite(losses)):
            bad = step + int(np.argmax(~np.isfinite(losses))) + 1
            last = mngr.latest_step()
            mngr.close()
            raise TrainingDivergedError(
                f"[{cat.category}] the loss became {losses[~np.isfinite(losses)][0]} at step "
                f"{bad}. Training stopped; the last good checkpoint (step {last}) is kept in "
                f"{ckpt_dir}. Lower train.learning_rate or use train.compute_dtype=float32.")
        step += n
        if step - last_log >= int(config.train.log_every) or step == steps:
            now = time.time()
            ips = (step - last_log) * batch / max(now - t_log, 1e-9)
            eta = (steps - step) * batch / max(ips, 1e-9)
            means = {k: float(np.mean(np.asarray(v))) for k, v in jax.device_get(metrics).items()}
            log.info("[%s] step %d/%d loss %.5f  %.1f img/s  ETA %s", cat.category, step, steps,
                     means["loss"], ips, _fmt_time(eta))
            if metrics_path and jax.process_index() == 0:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps({"category": cat.category, "step": step,
                                        "images_per_s": ips, **means}) + "\n")
            last_log, t_log = step, now
        if step >= next_ckpt or step == steps:
            _save(mngr, ts)
            next_ckpt = (step // ckpt_every + 1) * ckpt_every
        if interrupt_after and step >= interrupt_after and step < steps:
            if mngr.latest_step() != step:
                _save(mngr, ts)
            mngr.close()
            raise KeyboardInterrupt(f"simulated interruption after step {step}")
    mngr.close()
    log.info("[%s] trained in %s", cat.category, _fmt_time(time.time() - t0))
    return ts, frozen


def _fmt_time(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600:d}:{s % 3600 // 60:02d}:{s % 60:02d}"


# ---------------------------------------------------------------------------
# Inference
# ---------------------------------------------------------------------------

def make_maps_fn(method, mesh: Mesh, batch: int):
    in_sh = NamedSharding(mesh, batch_spec(mesh, batch))
    out_sh = NamedSharding(mesh, P())

    def run(params, state, frozen, images_u8):
        images = jax.lax.with_sharding_constraint(ops.normalize_images(images_u8), in_sh)
        return method.maps(params, state, frozen, images)

    return xla.jit(run, out_shardings=out_sh)


def map_batches(fn, images: np.ndarray, batch: int, mesh: Mesh):
    """``fn`` (a jitted function of one device batch, returning a pytree of
    arrays with the batch axis first, replicated) over a uint8 host array in batches of
    ``batch`` (the last one padded with copies of its final image, so one
    compiled shape serves); the host outputs, concatenated, ``len(images)`` rows."""
    in_sh = NamedSharding(mesh, batch_spec(mesh, batch))
    parts = []
    for i in range(0, len(images), batch):
        chunk = images[i:i + batch]
        n = len(chunk)
        if n < batch:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch - n, 0)], 0)
        out = jax.device_get(fn(put_global(chunk, in_sh)))
        parts.append(jax.tree_util.tree_map(lambda a, n=n: np.asarray(a)[:n], out))
    return jax.tree_util.tree_map(lambda *a: np.concatenate(a, 0), *parts)


def predict_components(method, ts, frozen, images: np.ndarray, mesh: Mesh,
                       batch: int, fn=None) -> Dict[str, np.ndarray]:
    """Map components {name: (N, H, W) float32} for uint8 images, in fixed-size batches."""
    fn = fn or make_maps_fn(method, mesh, batch)
    out = map_batches(lambda x: fn(ts["params"], ts["state"], frozen, x), images, batch, mesh)
    return {k: v.astype(np.float32) for k, v in out.items()}


def map_normalization(val_components: Dict[str, np.ndarray], quantiles) -> Dict[str, tuple]:
    """(q_a, q_b) of each component over all pixels of all validation maps."""
    qa, qb = quantiles
    return {k: tuple(float(x) for x in np.quantile(v.astype(np.float64), [qa, qb]))
            for k, v in val_components.items()}


def combine_maps(components: Dict[str, np.ndarray], weights: Dict[str, float],
                 norm: Optional[Dict[str, tuple]] = None) -> np.ndarray:
    """sum_k w_k * m_k, each m_k first normalized as 0.1 * (m - q_a) / (q_b - q_a) when
    validation quantiles are given (EfficientAD's map normalization)."""
    total = None
    for k, m in components.items():
        w = float(weights.get(k, 1.0))
        if w == 0.0:
            continue
        if norm is not None:
            qa, qb = norm[k]
            m = 0.1 * (m - qa) / max(qb - qa, 1e-12)
        total = w * m if total is None else total + w * m
    if total is None:
        raise ValueError("eval.map_weights gives every map component weight 0.")
    return total.astype(np.float32)


def final_maps(method, components: Dict[str, np.ndarray], weights: Dict[str, float],
               norm: Optional[Dict[str, tuple]], size: int) -> np.ndarray:
    """The anomaly maps (N, size, size): components combined (:func:`combine_maps`)
    at the resolution ``method.maps`` returns, then ``method.finish_maps``."""
    from kdjax.methods.base import Method

    maps = combine_maps(components, weights, norm)
    if type(method).finish_maps is Method.finish_maps:
        return maps
    finish = xla.jit(method.finish_maps, static_argnums=1)
    out = [np.asarray(jax.device_get(finish(jnp.asarray(maps[i:i + 64]), (size, size))))
           for i in range(0, len(maps), 64)]
    return np.concatenate(out, 0).astype(np.float32)


def evaluate_category(config, method, ts, frozen, cat: CategoryData, workdir: str,
                      mesh: Mesh, weight_variants: Dict[str, Dict[str, float]]):
    """Maps of the test set -> metrics for each map-weight variant (host side)."""
    from kdjax import data, evaluate

    ds = config.data.dataset
    size = int(config.data.image_size)
    records = data.list_records(ds, cat.root, cat.category, "test")
    images, records = data.load_images(records, size, on_corrupt=config.data.on_corrupt)
    batch = int(config.eval.batch_size)
    fn = make_maps_fn(method, mesh, batch)
    t0 = time.time()
    comps = predict_components(method, ts, frozen, images, mesh, batch, fn)
    log.info("[%s] inference on %d test images: %.1f img/s", cat.category, len(images),
             len(images) / max(time.time() - t0, 1e-9))
    norm = None
    if needs_validation(method):
        if cat.val is None or len(cat.val) == 0:
            raise ValueError(f"[{cat.category}] {method.name} needs validation images to "
                             "normalize its maps, and none were found.")
        val_comps = predict_components(method, ts, frozen, cat.val, mesh, batch, fn)
        norm = map_normalization(val_comps, tuple(config.eval.quantiles))
        if jax.process_index() == 0:  # kdjax.predict.Predictor reads it
            with open(normalization_path(workdir, config, cat.category), "w") as f:
                json.dump(norm, f)

    original = config.eval.resolution == "original"
    if original:
        sizes = data.original_sizes(records)
    loco = ds in ("mvtec_loco", "synthetic")
    if loco:
        regions = [data.load_regions(r, None if original else size) for r in records]
        masks = None
    else:
        # A folder dataset may come without masks: then image-level metrics only.
        masks = data.load_masks(records, None if original else size) if data.has_masks(
            records) else None
        regions = None

    results = {}
    for vname, weights in weight_variants.items():
        maps = final_maps(method, comps, weights, norm, size)
        eval_maps = evaluate.to_original_resolution(maps, sizes) if original else maps
        if isinstance(eval_maps, list):
            eval_maps = _stack_if_same(eval_maps)
        metrics = evaluate.category_metrics(ds, eval_maps, records, masks=masks, regions=regions,
                                            per_image_pro=bool(config.eval.pro_per_image))
        results[vname] = metrics
        if jax.process_index() == 0 and vname == next(iter(weight_variants)):
            scores = maps.reshape(len(maps), -1).max(1)
            fig_masks = data.load_masks(records, size) if data.has_masks(records) else None
            evaluate.save_figures(
                os.path.join(workdir, "figures"), cat.category, images, maps,
                np.array([r.label for r in records]), scores, masks=fig_masks,
                names=[os.path.relpath(r.image_path, cat.root) for r in records],
                num=int(config.eval.num_figures), seed=int(config.seed),
                kinds=[r.anomaly_kind or ("good" if r.label == 0 else "anomalous")
                       for r in records])
            if config.eval.export_tiff:
                evaluate.export_tiff(os.path.join(workdir, "anomaly_maps"), cat.category,
                                     records, eval_maps)
    return results


def normalization_path(workdir: str, config, category: str) -> str:
    d = os.path.join(workdir, "normalization")
    os.makedirs(d, exist_ok=True)
    return os.path.join(d, f"{category}.json")


def _stack_if_same(maps: list):
    shapes = {m.shape for m in maps}
    return np.stack(maps, 0) if len(shapes) == 1 else maps


# ---------------------------------------------------------------------------
# Orchestration
# ---------------------------------------------------------------------------

def _weight_variants(config, method) -> Dict[str, Dict[str, float]]:
    base = {k: float(config.eval.map_weights.get(k, 1.0)) for k in method.map_names}
    out = {"default": base}
    for name, w in (config.eval.get("weight_variants", None) or {}).items():
        out[name] = {k: float(w.get(k, 0.0)) for k in method.map_names}
    return out


def _variant_configs(config) -> Dict[str, ml_collections.ConfigDict]:
    """One config per entry of config.variants ({name: {"dotted.key": value}})."""
    variants = config.get("variants", None)
    if not variants:
        return {}
    out = {}
    for name, overrides in variants.items():
        c = copy.deepcopy(config)
        with c.unlocked():
            c.variants = ml_collections.ConfigDict()
            for key, value in overrides.items():
                if not key.startswith("eval.map_weights."):  # the one open section
                    node = c
                    for part in key.split("."):
                        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                            raise ValueError(
                                f"Variant {name!r} overrides {key!r}, which is not a config key.")
                        node = node[part]
                c.update_from_flattened_dict({key: value})
        out[name] = c
    return out


def _training_signature(config) -> str:
    """Hash of everything that changes training (not eval.*), to share checkpoints."""
    d = config.to_dict()
    d.pop("eval", None)
    d.pop("variants", None)
    d.pop("targets", None)
    return hashlib.sha1(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:10]


def run_config(config, workdir: str, mode: str, ckpt_root: str) -> Dict[str, Any]:
    """Train and/or evaluate every category of one config; returns per-variant categories."""
    mesh = make_mesh()
    root = dataset_root(config, workdir)
    cats = config_lib.categories_of(config)
    per_variant: Dict[str, Dict[str, Dict[str, float]]] = {}
    method = None
    for cat_name in cats:
        cat_config = copy.deepcopy(config)
        with cat_config.unlocked():
            cat_config.data.category = cat_name
        method = get_method(cat_config)  # per category: e.g. MRKD's NSA settings
        cat = load_category(cat_config, root, cat_name, needs_validation(method))
        ckpt_dir = os.path.join(ckpt_root, cat_name)
        ts, frozen = train_category(cat_config, method, cat, ckpt_dir, mesh,
                                    train=mode in ("train", "train_and_eval"),
                                    metrics_path=os.path.join(workdir, "train_metrics.jsonl"))
        if mode in ("eval", "train_and_eval"):
            res = evaluate_category(cat_config, method, ts, frozen, cat, workdir, mesh,
                                    _weight_variants(config, method))
            for v, m in res.items():
                per_variant.setdefault(v, {})[cat_name] = m
            log.info("[%s] %s", cat_name, ", ".join(
                f"{k}={v:.4f}" for k, v in res["default"].items()
                if k in ("image_auroc", "logical_auroc", "structural_auroc", "pixel_auroc",
                         "au_pro", "au_spro_0.05") and v == v))
    return {"method": method, "per_variant": per_variant}


def train_and_evaluate(config, workdir: str, mode: str = "train_and_eval") -> Dict[str, Any]:
    """Entry point used by kdjax.main, the notebooks and the tests."""
    if mode not in ("train", "eval", "train_and_eval"):
        raise ValueError(f"--mode must be train, eval or train_and_eval, not {mode!r}.")
    config_lib.validate(config)
    os.makedirs(workdir, exist_ok=True)
    setup_logging(workdir)
    with workdir_lock(workdir):
        if jax.process_index() == 0:
            with open(os.path.join(workdir, "config.json"), "w") as f:
                f.write(config.to_json_best_effort(indent=2))
        variants = _variant_configs(config)
        runs = variants or {"default": config}
        collected: Dict[str, Dict[str, Dict[str, float]]] = {}
        method = None
        for vname, vconfig in runs.items():
            ckpt_root = os.path.join(workdir, "checkpoints")
            if variants:
                ckpt_root = os.path.join(ckpt_root, _training_signature(vconfig))
                log.info("=== variant %s ===", vname)
            out = run_config(vconfig, workdir, mode, ckpt_root)
            method = out["method"]
            for wname, cats in out["per_variant"].items():
                name = vname if wname == "default" else (
                    wname if not variants else f"{vname}/{wname}")
                collected[name] = cats
        if mode == "train":
            return {}
        return _write_report(config, workdir, method, collected)


def _write_report(config, workdir, method, collected):
    from kdjax import evaluate

    main_name = next(iter(collected))
    teacher = method.teacher_description()
    extra = {}
    if "random" in str(config.teacher.weights):
        extra["warning"] = ("The teacher has RANDOM weights: these numbers do not measure the "
                            "method. Get the ImageNet weights with: python tools/port_weights.py "
                            "--arch " + str(config.teacher.arch) + " --src auto")
    targets = config.targets.to_dict() if config.targets else None
    if config.get("targets_source", ""):
        extra["targets_source"] = config.targets_source
    variants = {k: v for k, v in collected.items()} if len(collected) > 1 else None
    results = {}
    if jax.process_index() == 0:
        results = evaluate.write_results(
            workdir, config.method, config.data.dataset, teacher, collected[main_name],
            targets=targets, variants=variants, extra=extra or None)
        log.info("Results written to %s", os.path.join(workdir, "results.json"))
    return results
