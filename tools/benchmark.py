"""Training and inference throughput of a config's method, measured on this machine.

    python tools/benchmark.py --config=configs/mvtec_rd4ad.py [--config.train.batch_size=8] \
        [--json out.json] [--steps 5] [--peak]

Uses the engine's own jitted training step (``train.steps_per_call`` steps per
call) and inference function on random images at ``data.image_size``, with a
random teacher of the configured architecture (speed does not depend on the
weights' values). Prints images/s, XLA's FLOP count per image and the FLOP/s
reached; with --peak also this device's measured dense matmul FLOP/s in the
compute dtype, so the fraction of peak is a measurement, not a datasheet figure.
"""

from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=False)
flags.DEFINE_string("json", None, "Write the figures to this JSON file.")
flags.DEFINE_integer("steps", 3, "Timed host calls (each runs train.steps_per_call steps).")
flags.DEFINE_integer("infer_batches", 5, "Timed inference batches.")
flags.DEFINE_bool("peak", True, "Also measure the device's dense matmul FLOP/s.")
flags.DEFINE_enum("kernels", None, ["cpu", "portable"], "The models' kernels "
                  "(kdjax.backends; default: this backend's, as training uses).")
flags.DEFINE_string("profile_dir", None, "Also write a jax.profiler trace of one training call "
                    "and one inference batch (after the timed ones) to this directory; view "
                    "it with TensorBoard's profile plugin or xprof.")
flags.mark_flags_as_required(["config"])


def _flops(compiled) -> float:
    try:
        ca = compiled.cost_analysis()
        if isinstance(ca, (list, tuple)):
            ca = ca[0]
        return float(ca.get("flops", 0.0))
    except Exception:  # not every backend reports it
        return 0.0


def matmul_peak(dtype, n: int = 2048, reps: int = 10, tries: int = 3) -> float:
    """Measured FLOP/s of an n x n x n matmul chain in ``dtype`` on the default
    device: the best of ``tries`` timings (a shared CPU's speed varies), compiled
    with kdjax's compiler options (:func:`kdjax.backends.jit`), as the models are."""
    import jax

    from kdjax import backends

    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), dtype)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), dtype)

    @backends.jit
    def f(a, b):
        def body(i, x):
            return (x @ b) * 0.5
        return jax.lax.fori_loop(0, reps, body, a)

    f(a, b).block_until_ready()
    best = float("inf")
    for _ in range(tries):
        t = time.perf_counter()
        f(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 * reps / best


def run(config, steps: int, infer_batches: int, peak: bool, profile_dir=None,
        kernels=None) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P

    from kdjax import backends, devices, inference, train
    from kdjax import teacher as teacher_lib
    from kdjax.data.category import CategoryData
    from kdjax.methods import get_method

    with config.unlocked():
        config.teacher.weights = "random"
        config.teacher.allow_random = True
    method = get_method(config, backends.get(kernels) if kernels else None)
    mesh = devices.make_mesh()
    size = int(config.data.image_size)
    batch = int(config.train.batch_size)
    eb = int(config.eval.batch_size)
    n_img = max(batch * 2, 16)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n_img, size, size, 3), dtype=np.uint8)
    cat = CategoryData("bench", "", images, images[:batch], [], [])
    teacher = teacher_lib.load(config, method)
    ts, frozen, tx, _ = train.init_train_state(config, method, teacher.variables, cat, mesh)
    per_call = int(config.train.steps_per_call)
    fn = train.make_train_fn(method, tx, mesh, batch, per_call)
    data = devices.put_global(images, NamedSharding(mesh, P()))
    ts = {**ts, "state": train.prepare_state(method, frozen, ts["state"], data, eb, mesh)}
    # The engine's teacher cache (train.cache_teacher): built once per training run,
    # outside the timed steps, as in training.
    t0 = time.perf_counter()
    cache = train.build_teacher_cache(config, method, frozen, data, mesh)
    cache_s = time.perf_counter() - t0
    key = jax.random.PRNGKey(0)
    inputs = {"data": data, "cache": cache, "extra": {}}
    t0 = time.perf_counter()
    compiled = fn.lower(ts, inputs, frozen, key).compile()
    compile_s = time.perf_counter() - t0
    # XLA's cost analysis counts a loop body once, whatever its trip count: the
    # FLOPs of one step come from the same function compiled for a single step.
    one = compiled if per_call == 1 else train.make_train_fn(method, tx, mesh, batch, 1).lower(
        ts, inputs, frozen, key).compile()
    train_flops_call = _flops(one) * per_call
    ts, m = compiled(ts, inputs, frozen, key)  # warm-up
    jax.block_until_ready(m)
    t0 = time.perf_counter()
    for _ in range(steps):
        ts, m = compiled(ts, inputs, frozen, key)
    jax.block_until_ready(m)
    dt = time.perf_counter() - t0
    train_ips = steps * per_call * batch / dt

    # Inference: the jitted function of kdjax.inference.Model (maps and scores at the
    # input size, normalized and combined), which evaluation and prediction run.
    norm = ({k: (0.0, 1.0) for k in method.map_names}
            if inference.needs_normalization(method) else None)
    host = jax.device_get({"params": ts["params"], "state": ts["state"]})  # ts is donated
    model = inference.Model(config, method, host["params"], host["state"], frozen, norm=norm,
                            mesh=mesh)
    mfn = model.jitted()
    x = devices.put_global(images[:eb] if n_img >= eb else np.resize(images, (eb, size, size, 3)),
                           NamedSharding(mesh, devices.batch_spec(mesh, eb)))
    args = (model.params, model.state, model.frozen)
    mcomp = mfn.lower(*args, x).compile()
    infer_flops_batch = _flops(mcomp)
    jax.block_until_ready(mcomp(*args, x))
    t0 = time.perf_counter()
    for _ in range(infer_batches):
        out = mcomp(*args, x)
    jax.block_until_ready(out)
    infer_ips = infer_batches * eb / (time.perf_counter() - t0)
    if profile_dir:
        with jax.profiler.trace(profile_dir):
            ts, m = compiled(ts, inputs, frozen, key)
            jax.block_until_ready(m)
            jax.block_until_ready(mcomp(*args, x))

    dev = jax.devices()[0]
    res = {
        "method": method.name,
        "kernels": method.kernels.name,
        "device": f"{jax.device_count()} x {dev.device_kind} ({jax.default_backend()})",
        "batch_size": batch,
        "eval_batch_size": eb,
        "image_size": size,
        "compute_dtype": config.train.compute_dtype,
        "steps_per_call": per_call,
        "compile_s": compile_s,
        "teacher_cache": cache is not None,
        "teacher_cache_build_s": cache_s if cache is not None else None,
        "train_images_per_s": train_ips,
        "train_steps_per_s": train_ips / batch,
        "infer_images_per_s": infer_ips,
        "train_flops_per_image": train_flops_call / (per_call * batch) if train_flops_call else None,
        "infer_flops_per_image": infer_flops_batch / eb if infer_flops_batch else None,
    }
    if train_flops_call:
        res["train_flop_per_s"] = train_flops_call * steps / dt
    if infer_flops_batch:
        res["infer_flop_per_s"] = res["infer_flops_per_image"] * infer_ips
    if peak:
        dtype = jnp.bfloat16 if config.train.compute_dtype == "bfloat16" else jnp.float32
        res["matmul_peak_flop_per_s"] = matmul_peak(dtype)
        for k in ("train", "infer"):
            if res.get(f"{k}_flop_per_s"):
                res[f"{k}_fraction_of_peak"] = res[f"{k}_flop_per_s"] / res["matmul_peak_flop_per_s"]
    return res


def main(argv):
    del argv
    res = run(FLAGS.config, FLAGS.steps, FLAGS.infer_batches, FLAGS.peak, FLAGS.profile_dir,
              FLAGS.kernels)
    for k, v in res.items():
        if isinstance(v, float):
            v = f"{v:.4g}"
        print(f"{k:28s} {v}")
    if FLAGS.json:
        with open(FLAGS.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    app.run(main)
