"""Every method on this machine's devices: speed, and maps in fp32 and bf16 against a reference.

    python tools/accelerator_check.py [--methods rd4ad,mrkd,cad,efficientad] \
        [--image_size N] [--width_divisor D] [--steps 3] [--images 16] [--batch N] \
        [--json check.json]

For each method, built from its config in configs/ (``mvtec_<method>.py``, else
``loco_<method>.py``, else the first by name whose ``method`` it is) at the config's sizes unless ``--image_size`` / ``--width_divisor``
shrink it, with a RANDOM teacher (nothing is downloaded), on every device JAX finds
(one data-parallel mesh, as the engine uses; kernels: ``kdjax.backends.select()``):

* training: ``--steps`` optimizer steps per call of the engine's jitted function
  (kdjax.train.make_train_fn, teacher cache and training-set statistics as the
  engine computes them) on synthetic "tray" images (kdjax.data.synthetic), in
  ``train.compute_dtype`` float32 and then bfloat16 from the same initial weights;
  one warm-up call, then two timed calls;
* inference (kdjax.inference.Model.predict, maps at the input size) of the weights
  trained in float32, computed in ``eval.compute_dtype`` float32 and bfloat16, on
  ``--images`` synthetic test images (half good, half with logical or structural
  anomalies);
* the reference: the same float32 weights run on the CPU with the portable kernels
  (``kdjax.backends.PORTABLE``) in float32. Map components that the method normalizes
  use quantiles of the reference's maps of held-out good images, for every variant.

Per (method, dtype) it prints: training and inference images/s; the fraction of this
device's measured dense matmul rate in that dtype (tools/benchmark.py ``matmul_peak``;
FLOPs from XLA's cost analysis, the training step's counted once per step); the
largest absolute map difference to the reference divided by the reference map's
largest absolute value, median and worst over the images; the image AUROC of the
variant's scores and its difference to the reference's. With ``--json`` the rows are
also written to a file. The random teacher and the few steps make the AUROCs
themselves meaningless; their differences measure the arithmetic.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tools"))

DTYPES = ("float32", "bfloat16")


def method_config(name: str, image_size=None, width_divisor: int = 1, batch=None):
    """(config, its name): the config of configs/ whose method is ``name`` (configs/mvtec_<name>.py,
    else loco_<name>.py, else the first by name, the demo last), with a random teacher,
    ``image_size`` (default: the config's) and every width divisor (``teacher.width_divisor``
    and the method's ``*divisor`` settings) set to ``width_divisor``."""
    from kdjax import config as config_lib
    from kdjax.methods import method_class

    stems = config_lib.shipped_configs()
    preferred = [s for s in (f"mvtec_{name}", f"loco_{name}") if s in stems]
    for stem in preferred + [s for s in stems if s not in preferred and s != "demo"] + ["demo"]:
        c = config_lib.load_config(stem) if stem in stems else None
        if c is not None and c.method == name:
            break
    else:
        raise SystemExit(f"accelerator_check: no config in configs/ runs method {name!r}.")
    with c.unlocked():
        if image_size:
            c.data.image_size = int(image_size)
        c.teacher.weights = "random"
        c.teacher.allow_random = True
        c.init_from = ""
        if width_divisor != 1:
            c.teacher.width_divisor = int(width_divisor)
            for key in method_class(name).default_settings().keys():
                if key.endswith("divisor"):
                    c[name][key] = int(width_divisor)
        if batch:
            c.train.batch_size = int(batch)
            c.eval.batch_size = int(batch)
    return c, stem


def with_dtypes(config, train_dtype: str, eval_dtype: str):
    import copy

    c = copy.deepcopy(config)
    with c.unlocked():
        c.train.compute_dtype = train_dtype
        c.eval.compute_dtype = eval_dtype
    return c


def synthetic_images(size: int, n_train: int, n_val: int, n_test: int, seed: int = 0):
    """uint8 train and held-out good images, and test images with labels (half good,
    half anomalous, logical and structural alternating) of kdjax's synthetic dataset."""
    from kdjax.data.synthetic import render_image

    def render(split, folder, n):
        return np.stack([render_image(seed, split, folder, i, size)[0] for i in range(n)])

    n_good = n_test // 2
    n_bad = n_test - n_good
    bad = [render_image(seed, "test", ("logical_anomalies", "structural_anomalies")[i % 2],
                        i // 2, size)[0] for i in range(n_bad)]
    test = np.concatenate([render("test", "good", n_good), np.stack(bad)]) if n_bad else (
        render("test", "good", n_good))
    labels = np.array([0] * n_good + [1] * n_bad)
    return render("train", "good", n_train), render("validation", "good", n_val), test, labels


def _flops(lowered_or_compiled) -> float:
    try:
        ca = lowered_or_compiled.cost_analysis()
        if isinstance(ca, (list, tuple)):
            ca = ca[0]
        return float(ca.get("flops", 0.0))
    except Exception:  # not every backend reports it
        return 0.0


def init_variables(config, kernels, teacher_variables):
    """The method's initial params and state (float32 parameters whatever the compute
    dtype: both trainings start from these)."""
    import jax

    from kdjax.methods import get_method

    method = get_method(config, kernels)
    batch, size = int(config.train.batch_size), int(config.data.image_size)
    v = method.init(jax.random.PRNGKey(int(config.seed)), (batch, size, size, 3),
                    teacher_variables)
    return jax.device_get({"params": v["params"], "state": v["state"]})


def train(config, kernels, init, teacher_variables, images, steps: int, mesh):
    """(host params and state after 2 + 1 calls of ``steps`` steps from ``init``, train
    images/s, FLOPs per step, compile seconds, last loss)."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    from kdjax import devices
    from kdjax import train as train_lib
    from kdjax.methods import get_method

    method = get_method(config, kernels)
    batch = int(config.train.batch_size)
    repl = NamedSharding(mesh, P())
    data = devices.put_global(images, repl)
    frozen = jax.device_put(method.frozen_variables(teacher_variables), repl)
    state = train_lib.prepare_state(method, frozen, jax.device_put(init["state"], repl), data,
                                    int(config.eval.batch_size), mesh)
    cache = train_lib.build_teacher_cache(config, method, frozen, data, mesh)
    tx = method.optimizer(3 * steps)
    ts = jax.device_put({"step": jnp.zeros((), jnp.int32), "params": init["params"],
                         "state": state, "opt_state": tx.init(init["params"])}, repl)
    key = jax.random.PRNGKey(1)
    inputs = {"data": data, "cache": cache, "extra": {}}
    lowered = train_lib.make_train_fn(method, tx, mesh, batch, steps).lower(
        ts, inputs, frozen, key)
    flops = _flops(lowered)  # XLA counts the scanned step once
    t0 = time.perf_counter()
    fn = lowered.compile()
    compile_s = time.perf_counter() - t0
    ts, m = fn(ts, inputs, frozen, key)  # warm-up
    jax.block_until_ready(m)
    t0 = time.perf_counter()
    for _ in range(2):
        ts, m = fn(ts, inputs, frozen, key)
    jax.block_until_ready(m)
    ips = 2 * steps * batch / (time.perf_counter() - t0)
    host = jax.device_get({"params": ts["params"], "state": ts["state"]})
    return host, ips, flops, compile_s, float(np.asarray(m["loss"])[-1])


def inference_model(config, kernels, host, teacher_variables, mesh, norm=None):
    from kdjax import inference
    from kdjax.methods import get_method

    method = get_method(inference.inference_config(config), kernels)
    return inference.Model(config, method, host["params"], host["state"],
                           method.frozen_variables(teacher_variables), norm=norm, mesh=mesh)


def infer(model, images):
    """(maps, scores, inference images/s, FLOPs per image): the second of two passes."""
    import jax
    from jax.sharding import NamedSharding

    from kdjax import devices

    model.predict(images)  # compile and warm-up
    t0 = time.perf_counter()
    maps, scores = model.predict(images)
    ips = len(images) / (time.perf_counter() - t0)
    b = model.batch
    x = jax.ShapeDtypeStruct((b,) + images.shape[1:], np.uint8,
                             sharding=NamedSharding(model.mesh, devices.batch_spec(model.mesh, b)))
    flops = _flops(model.jitted().lower(model.params, model.state, model.frozen, x)) / b
    return maps, scores, ips, flops


def map_differences(maps, ref):
    """Per image: max |maps - ref| / max |ref|."""
    d = np.abs(np.asarray(maps, np.float64) - ref).reshape(len(ref), -1).max(1)
    return d / np.maximum(np.abs(ref).reshape(len(ref), -1).max(1), 1e-30)


def check_method(name, args, mesh, cpu_mesh, peaks):
    import jax

    from kdjax import backends, inference
    from kdjax import teacher as teacher_lib
    from kdjax.methods import get_method
    from kdjax.metrics import image_auroc

    base, config_name = method_config(name, args.image_size, args.width_divisor, args.batch)
    size = int(base.data.image_size)
    batch = int(base.train.batch_size)
    kernels = backends.select()
    n_train = max(args.images, batch)
    n_val = max(2, args.images // 2)
    train_x, val_x, test_x, labels = synthetic_images(size, n_train, n_val, args.images)
    teacher = teacher_lib.load(base, get_method(base, backends.PORTABLE))
    log(f"{name}: config {config_name}, {size} px, batch {batch}, "
        f"{jax.device_count()} x {jax.devices()[0].device_kind}, kernels {kernels.name}")

    # the reference: float32 weights trained here, run on the CPU with the portable kernels
    trained = {}
    init = init_variables(with_dtypes(base, "float32", "float32"), kernels, teacher.variables)
    for dtype in DTYPES:
        c = with_dtypes(base, dtype, dtype)
        trained[dtype] = train(c, kernels, init, teacher.variables, train_x, args.steps, mesh)
        log(f"  trained in {dtype}: {trained[dtype][1]:.3g} img/s, compile "
            f"{trained[dtype][3]:.1f} s, loss {trained[dtype][4]:.4g}")
    host32 = trained["float32"][0]
    c32 = with_dtypes(base, "float32", "float32")
    ref = inference_model(c32, backends.PORTABLE, host32, teacher.variables, cpu_mesh)
    norm = None
    if inference.needs_normalization(ref.method):
        norm = inference.map_normalization(ref.components(val_x), tuple(base.eval.quantiles))
        ref.norm = norm
    ref_maps, ref_scores = ref.predict(test_x)
    ref_auroc = image_auroc(labels, ref_scores)
    log(f"  reference (cpu, portable, float32): image AUROC {ref_auroc:.4f}")

    rows = []
    for dtype in DTYPES:
        log(f"  inference in {dtype}")
        _, train_ips, train_flops, compile_s, loss = trained[dtype]
        model = inference_model(with_dtypes(base, "float32", dtype), kernels, host32,
                                teacher.variables, mesh, norm=norm)
        maps, scores, infer_ips, infer_flops = infer(model, test_x)
        d = map_differences(maps, ref_maps)
        auroc = image_auroc(labels, scores)
        row = {
            "method": name, "config": config_name, "dtype": dtype,
            "device": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
            "backend": jax.default_backend(), "kernels": kernels.name, "image_size": size,
            "batch_size": batch, "eval_batch_size": int(base.eval.batch_size),
            "width_divisor": int(args.width_divisor), "steps_per_call": args.steps,
            "train_compile_s": compile_s, "train_loss": loss,
            "train_images_per_s": train_ips, "infer_images_per_s": infer_ips,
            "train_flops_per_image": train_flops / batch if train_flops else None,
            "infer_flops_per_image": infer_flops or None,
            "matmul_peak_flop_per_s": peaks.get(dtype),
            "map_diff_median": float(np.median(d)), "map_diff_worst": float(d.max()),
            "image_auroc": auroc, "image_auroc_reference": ref_auroc,
            "image_auroc_diff": auroc - ref_auroc,
        }
        for k in ("train", "infer"):
            fl = row[f"{k}_flops_per_image"]
            row[f"{k}_fraction_of_peak"] = (fl * row[f"{k}_images_per_s"] / peaks[dtype]
                                            if fl and peaks.get(dtype) else None)
        rows.append(row)
    return rows


def _fmt(v, spec):
    return "n/a" if v is None or v != v else format(v, spec)


def _pct(v):
    return "n/a" if v is None or v != v else f"{100 * v:.3g}%"


def markdown(rows) -> str:
    head = ("| method | dtype | train img/s | train peak | infer img/s | infer peak | "
            "map diff median | map diff worst | image AUROC | ΔAUROC |")
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['dtype']} | {_fmt(r['train_images_per_s'], '.3g')} | "
            f"{_fmt(r['train_fraction_of_peak'], '.1%')} | "
            f"{_fmt(r['infer_images_per_s'], '.3g')} | {_fmt(r['infer_fraction_of_peak'], '.1%')} | "
            f"{_pct(r['map_diff_median'])} | {_pct(r['map_diff_worst'])} | "
            f"{_fmt(r['image_auroc'], '.4f')} | {_fmt(r['image_auroc_diff'], '+.4f')} |")
    return "\n".join(lines)


_T0 = time.perf_counter()


def log(msg):
    print(f"[{time.perf_counter() - _T0:7.1f} s] {msg}", file=sys.stderr, flush=True)


def parse_args(argv=None):
    from kdjax.methods import METHODS

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", default=",".join(METHODS),
                   help="comma-separated registered methods (default: all)")
    p.add_argument("--image_size", type=int, default=None,
                   help="input size (default: each config's data.image_size)")
    p.add_argument("--width_divisor", type=int, default=1,
                   help="divide every network width (1: the published networks)")
    p.add_argument("--steps", type=int, default=3, help="training steps per timed call")
    p.add_argument("--images", type=int, default=16,
                   help="test images (half good, half anomalous); as many training images")
    p.add_argument("--batch", type=int, default=None,
                   help="training and inference batch (default: each config's)")
    p.add_argument("--peak_n", type=int, default=2048,
                   help="side of the matmuls that measure the device's peak (tools/benchmark.py)")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    a = p.parse_args(argv)
    a.methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    unknown = [m for m in a.methods if m not in METHODS]
    if unknown:
        p.error(f"unknown method(s) {', '.join(unknown)}; registered: {', '.join(METHODS)}")
    if a.images < 2 or a.steps < 1 or a.width_divisor < 1:
        p.error("--images must be >= 2, --steps and --width_divisor >= 1")
    return a


def main(argv=None) -> int:
    args = parse_args(argv)
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh

    from benchmark import matmul_peak
    from kdjax import devices

    mesh = devices.make_mesh()
    try:
        cpu = jax.devices("cpu")[:1]
    except RuntimeError:  # no CPU backend in this process: the reference runs here
        log("accelerator_check: no CPU device; the reference runs on the default device.")
        cpu = jax.devices()[:1]
    cpu_mesh = Mesh(np.asarray(cpu), ("data",))
    peaks = {d: matmul_peak(jnp.dtype(d), n=args.peak_n) for d in DTYPES}
    log("matmul peak: " + ", ".join(f"{d} {v / 1e12:.3g} TFLOP/s" for d, v in peaks.items()))
    rows = []
    for name in args.methods:
        rows += check_method(name, args, mesh, cpu_mesh, peaks)
    dev = jax.devices()[0]
    print(f"{jax.device_count()} x {dev.device_kind} ({jax.default_backend()}), jax "
          f"{jax.__version__}; matmul peak " + ", ".join(
              f"{d} {v / 1e12:.3g} TFLOP/s" for d, v in peaks.items())
          + f"; reference: float32, portable kernels, on {cpu[0].platform}\n")
    print(markdown(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "matmul_peak_flop_per_s": peaks}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
