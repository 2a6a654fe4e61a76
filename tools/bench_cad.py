"""Measure CAD's training and inference throughput and compiled memory.

    python tools/bench_cad.py [--batch 8] [--size 256] [--steps 3] [--memory_batch 16] [--json out.json]

Builds configs/loco_cad.py's method at full width (teacher weights random by
default: the timing does not depend on their values), jits one optimizer step
(jax.value_and_grad(method.loss) + Adam, as the engine does) and the map
function, reports images/s over ``--steps`` timed calls after one warm-up
(compile) call, and XLA's compiled memory analysis (arguments, outputs,
temporaries) of the training step at ``--batch`` and, compile-only, at
``--memory_batch``. Also reports the affinity loss alone (chunked vs direct)
at the largest affinity scale, to show what the chunking saves. Prints the
machine load (``uptime``), since shared machines distort timings.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from kdjax import backends, losses  # noqa: E402
from kdjax.teacher import init_method  # noqa: E402
from kdjax.config import load_config  # noqa: E402
from kdjax.methods.cad import CAD  # noqa: E402


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "unknown"


def mem_stats(compiled) -> dict:
    """Bytes from XLA's compiled memory analysis (None where the backend gives none)."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - not every backend implements it
        return {}
    if m is None:
        return {}
    out = {k: int(getattr(m, k + "_size_in_bytes", 0)) for k in
           ("argument", "output", "temp", "alias", "generated_code")}
    out["peak_estimate"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
    return out


def flops_of(compiled) -> float:
    """FLOPs of one call from XLA's cost analysis (0.0 where the backend gives none)."""
    try:
        ca = compiled.cost_analysis()
    except Exception:  # noqa: BLE001
        return 0.0
    if isinstance(ca, (list, tuple)):
        ca = ca[0] if ca else {}
    return float((ca or {}).get("flops", 0.0))


def gib(x) -> str:
    return f"{x / 2 ** 30:.2f} GiB"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3, help="timed calls after the warm-up")
    ap.add_argument("--memory_batch", type=int, default=16,
                    help="also compile (not run) the training step at this batch for its memory; 0: skip")
    ap.add_argument("--weights", default="random")
    ap.add_argument("--width_divisor", type=int, default=1)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--set", action="append", default=[],
                    help="config override key=python_literal, e.g. cad.affinity_block=512")
    ap.add_argument("--compare_rd4ad", action="store_true",
                    help="also compile (not run) RD4AD's step for its FLOPs and memory")
    ap.add_argument("--json", default="")
    args = ap.parse_args()

    c = load_config("loco_cad")
    c.data.image_size = args.size
    c.teacher.weights = args.weights
    c.teacher.allow_random = True
    c.teacher.width_divisor = args.width_divisor
    c.train.compute_dtype = args.dtype
    import ast
    for kv in args.set:
        k, v = kv.split("=", 1)
        c.update_from_flattened_dict({k: ast.literal_eval(v)})

    report = {"device": str(jax.devices()[0].device_kind), "platform": jax.default_backend(),
              "batch_size": args.batch, "image_size": args.size, "dtype": args.dtype,
              "uptime_before": uptime(), "cpu_count": os.cpu_count()}
    print("load:", report["uptime_before"], flush=True)

    method = CAD(c)
    t0 = time.time()
    variables = init_method(c, method, jax.random.key(0), (args.batch, args.size, args.size, 3))
    report["init_s"] = time.time() - t0
    params, state, frozen = variables["params"], variables["state"], variables["frozen"]
    n_params = {k: sum(x.size for x in jax.tree.leaves(params[k])) for k in params}
    report["params"] = n_params
    print(f"init {report['init_s']:.1f} s; params local {n_params['local']:,} global "
          f"{n_params['global']:,}", flush=True)
    tx = method.optimizer(1000)
    opt = tx.init(params)

    def step(params, state, opt, images, key):
        (loss, (state, _)), grads = jax.value_and_grad(method.loss, has_aux=True)(
            params, state, frozen, images, key)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), state, opt, loss

    jstep = backends.jit(step, donate_argnums=(0, 1, 2))
    images = jax.random.normal(jax.random.key(1), (args.batch, args.size, args.size, 3))
    t0 = time.time()
    compiled = jstep.lower(params, state, opt, images, jax.random.key(2)).compile()
    report["train_compile_s"] = time.time() - t0
    report["train_memory"] = mem_stats(compiled)
    report["train_flops_per_step"] = flops_of(compiled)
    print(f"train step: {report['train_flops_per_step'] / 1e9:.1f} GFLOP per step "
          f"(XLA cost analysis)", flush=True)
    print(f"train step compiled in {report['train_compile_s']:.1f} s; memory "
          f"{ {k: gib(v) for k, v in report['train_memory'].items()} }", flush=True)
    spec = lambda tree: jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)
    pspec, sspec, ospec = spec(params), spec(state), spec(opt)
    if args.steps > 0:
        params, state, opt, loss = compiled(params, state, opt, images, jax.random.key(2))
        jax.block_until_ready(loss)
        t0 = time.time()
        for i in range(args.steps):
            params, state, opt, loss = compiled(params, state, opt, images, jax.random.key(3 + i))
        jax.block_until_ready(loss)
        dt = time.time() - t0
        report["train_images_per_s"] = args.batch * args.steps / dt
        report["train_step_s"] = dt / args.steps
        report["train_gflops_per_s"] = report["train_flops_per_step"] / report["train_step_s"] / 1e9
        print(f"train: {report['train_images_per_s']:.3f} images/s ({report['train_step_s']:.2f} "
              f"s/step, {report['train_gflops_per_s']:.1f} GFLOP/s)", flush=True)

    jmaps = backends.jit(method.maps)
    cm = jmaps.lower(params, state, frozen, images).compile()
    report["infer_memory"] = mem_stats(cm)
    report["infer_flops_per_batch"] = flops_of(cm)
    if args.steps > 0:
        out = cm(params, state, frozen, images)
        jax.block_until_ready(out)
        t0 = time.time()
        for _ in range(args.steps):
            out = cm(params, state, frozen, images)
        jax.block_until_ready(out)
        report["infer_images_per_s"] = args.batch * args.steps / (time.time() - t0)
        print(f"inference: {report['infer_images_per_s']:.3f} images/s", flush=True)

    if args.compare_rd4ad:
        from kdjax.methods.rd4ad import RD4AD

        rd = RD4AD(c)
        rv = init_method(c, rd, jax.random.key(0), (args.batch, args.size, args.size, 3))
        rtx = rd.optimizer(1000)

        def rstep(p, s, o, x, k):
            (l, (s, _)), g = jax.value_and_grad(rd.loss, has_aux=True)(p, s, rv["frozen"], x, k)
            u, o = rtx.update(g, o, p)
            return optax.apply_updates(p, u), s, o, l

        rc = backends.jit(rstep).lower(spec(rv["params"]), spec(rv["state"]),
                                  jax.eval_shape(rtx.init, rv["params"]), images,
                                  jax.random.key(0)).compile()
        report["rd4ad_train_flops_per_step"] = flops_of(rc)
        report["rd4ad_train_memory"] = mem_stats(rc)
        print(f"RD4AD step alone: {report['rd4ad_train_flops_per_step'] / 1e9:.1f} GFLOP; memory "
              f"{ {k: gib(v) for k, v in report['rd4ad_train_memory'].items()} }", flush=True)

    # Affinity loss alone at the finest configured affinity scale: chunked vs direct.
    taps = tuple(method.cad.affinity_layers)
    if taps:
        shapes = jax.eval_shape(method.teacher.apply, frozen["teacher"],
                                jax.ShapeDtypeStruct((args.batch, args.size, args.size, 3), jnp.float32))
        tap = max(taps, key=lambda k: shapes[k].shape[1] * shapes[k].shape[2])
        f = jax.ShapeDtypeStruct(shapes[tap].shape, jnp.float32)
        kw = method.affinity_kwargs()
        aff = {}
        for name, fn in (("chunked", lambda t, s: losses.affinity_loss(t, s, **kw)),
                         ("direct", lambda t, s: losses.affinity_loss_direct(
                             t, s, kw["distance"], kw["precision"]))):
            g = backends.jit(jax.grad(fn, argnums=1)).lower(f, f).compile()
            aff[name] = mem_stats(g)
        report["affinity_grad_memory"] = {"tap": tap, "shape": list(f.shape), **aff}
        print(f"affinity grad at {tap} {tuple(f.shape)}: chunked temp "
              f"{gib(aff['chunked'].get('temp', 0))}, direct temp {gib(aff['direct'].get('temp', 0))}",
              flush=True)

    if args.memory_batch and args.memory_batch != args.batch:
        # Variables do not depend on the batch: lower the same step for a bigger batch.
        mb = args.memory_batch
        img_b = jax.ShapeDtypeStruct((mb, args.size, args.size, 3), jnp.float32)
        t0 = time.time()
        cb = jstep.lower(pspec, sspec, ospec, img_b, jax.random.key(0)).compile()
        report[f"train_memory_batch{mb}"] = mem_stats(cb)
        print(f"train step at batch {mb} (compiled only, {time.time() - t0:.1f} s): memory "
              f"{ {k: gib(v) for k, v in report[f'train_memory_batch{mb}'].items()} }", flush=True)

    report["uptime_after"] = uptime()
    print("load:", report["uptime_after"])
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=2)


if __name__ == "__main__":
    main()
