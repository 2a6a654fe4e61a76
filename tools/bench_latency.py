"""Batch-1 inference latency of a trained model's serving paths, side by side.

    python tools/bench_latency.py --config=configs/mvtec_rd4ad.py [--reps 50] \
        [--torch_python torch-venv/bin/python] [--json latency.json]

For the config's method at its image size, with random weights (the time does
not depend on their values), fp32, batch 1, the median of ``--reps`` calls
after warm-up, each call timed on its own:

* ``kdjax Model``: the jitted function of kdjax.inference.Model (maps and
  scores, normalized and combined), on this machine's default backend;
* ``model.jax``: the same model exported with ``--mode=export``'s code
  (kdjax.export, the portable path) and deserialized, run with jax alone;
* ``model.onnx`` under ONNX Runtime and OpenVINO, where jax2onnx,
  onnxruntime and openvino are installed (the ``export`` extra);
* ``reference (PyTorch eager)``: tools/bench_torch_reference.py
  ``--latency_reps`` run in a separate torch environment (``--torch_python``).

Prints one table with each path's ratio to the reference and writes the
figures as JSON with ``--json``. Nothing here is a test: it measures.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def median_ms(fn, reps: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * float(np.median(times))


def build_model(config):
    import jax

    from kdjax import inference
    from kdjax.methods import get_method
    from kdjax.teacher import init_method

    with config.unlocked():
        config.teacher.weights = "random"
        config.teacher.allow_random = True
        config.eval.batch_size = 1
        if str(config.data.category) in ("all", ""):
            config.data.category = "bench"
    method = get_method(config)
    s = int(config.data.image_size)
    v = init_method(config, method, jax.random.PRNGKey(0), (1, s, s, 3))
    norm = ({k: (0.0, 1.0) for k in method.map_names}
            if inference.needs_normalization(method) else None)
    return inference.Model(config, method, v["params"], v["state"], v["frozen"], norm=norm,
                           threshold={"value": 1.0, "rule": "fixed"})


def torch_reference(python: str, config, size: int, reps: int):
    """The reference's batch-1 latency: RD4AD's for the RD family (MRKD and CAD add
    modules to it: their reference is RD4AD's, the closest published network),
    EfficientAD-S or -M for EfficientAD."""
    method = config.method
    model = ("rd4ad" if method in ("rd4ad", "mrkd", "cad")
             else str(config.efficientad.model_size).upper())
    cmd = [python, os.path.join(REPO, "tools", "bench_torch_reference.py"), "--models", model,
           "--no_train", "--infer_batch", "1", "--infer_reps", "1", "--latency_reps",
           str(reps), "--image_size", str(size)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--set", action="append", default=[],
                   help="config overrides key=value (e.g. efficientad.model_size=S)")
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--torch_python", default="")
    p.add_argument("--json", default="")
    args = p.parse_args()

    import jax

    from kdjax import export
    from kdjax.config import load_config

    import ast

    overrides = {}
    for kv in args.set:
        k, v = kv.split("=", 1)
        try:
            overrides[k] = ast.literal_eval(v)
        except (ValueError, SyntaxError):
            overrides[k] = v
    config = load_config(args.config, overrides or None)
    model = build_model(config)
    s = model.size
    x = np.random.default_rng(0).integers(0, 256, (1, s, s, 3), dtype=np.uint8)
    rows = []

    fn = model.jitted()
    xd = jax.device_put(x, model._in_sharding())
    call = lambda: jax.block_until_ready(fn(model.params, model.state, model.frozen, xd))  # noqa
    rows.append({"path": "kdjax Model (jit)", "ms": median_ms(call, args.reps)})

    exp = export.export_jax(model)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "model.jax")
        with open(path, "wb") as f:
            f.write(exp.serialize())
        loaded = export.load_exported(path)
        xj = jax.numpy.asarray(x)
        rows.append({"path": "model.jax (deserialized)",
                     "ms": median_ms(lambda: jax.block_until_ready(loaded.call(xj)), args.reps)})
        if export.onnx_available():
            onnx_path = export.export_onnx(model, os.path.join(d, "model.onnx"))
            try:
                import onnxruntime as ort

                sess = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
                name = sess.get_inputs()[0].name
                rows.append({"path": "model.onnx (ONNX Runtime)",
                             "ms": median_ms(lambda: sess.run(None, {name: x}), args.reps)})
            except ImportError:
                rows.append({"path": "model.onnx (ONNX Runtime)", "ms": None,
                             "note": "onnxruntime not installed"})
            try:
                import openvino as ov

                # f32: OpenVINO's CPU plugin would run bf16 where the CPU has it
                compiled = ov.Core().compile_model(onnx_path, "CPU",
                                                   {"INFERENCE_PRECISION_HINT": "f32"})
                rows.append({"path": "model.onnx (OpenVINO)",
                             "ms": median_ms(lambda: compiled([x]), args.reps)})
            except ImportError:
                rows.append({"path": "model.onnx (OpenVINO)", "ms": None,
                             "note": "openvino not installed"})
        else:
            rows.append({"path": "model.onnx", "ms": None,
                         "note": "jax2onnx not installed (pip install -e '.[export]')"})

    ref_ms = None
    if args.torch_python:
        ref = torch_reference(args.torch_python, config, s, args.reps)
        ref_ms = ref["latency_ms_median"]
        rows.insert(0, {"path": f"reference {ref['model']} (eager, {ref['threads']} threads)",
                        "ms": ref_ms})
    print(f"{config.method} at {s}x{s}, batch 1, fp32, median of {args.reps} "
          f"({jax.default_backend()}, {os.cpu_count()} CPUs)")
    print("| path | latency (ms) | reference / this |\n|---|---|---|")
    for r in rows:
        ratio = (f"{ref_ms / r['ms']:.2f}x" if ref_ms and r.get("ms") else "")
        ms = "n/a" if r.get("ms") is None else f"{r['ms']:.1f}"
        print(f"| {r['path']} | {ms} | {ratio} | {r.get('note', '')}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"method": config.method, "image_size": s, "reps": args.reps,
                       "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
