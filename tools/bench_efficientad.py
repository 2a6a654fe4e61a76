"""Measure EfficientAD training steps/s and inference images/s on this machine.

Training runs the engine's recipe (kdjax.train.make_train_fn when available:
``steps_per_call`` jitted steps in one ``lax.scan``, batches drawn on the
device from a resident uint8 set); inference runs the jitted ``maps`` on
batches of ``--infer_batch`` images. Random teacher weights (speed does not
depend on them), 256x256, fp32 unless --dtype=bfloat16.

    python tools/bench_efficientad.py --sizes S,M --steps 20 --calls 2 --json out.json

Prints one JSON line per size, with the machine's load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax


def _config(size: str, image_size: int, batch: int, dtype: str):
    from kdjax.config import base_config
    from kdjax.methods.efficientad import default_efficientad_config

    c = base_config()
    c.method = "efficientad"
    c.teacher.arch = "pdn_small" if size == "S" else "pdn_medium"
    c.teacher.weights = "random"
    c.teacher.allow_random = True
    c.data.image_size = image_size
    c.train.batch_size = batch
    c.train.learning_rate = 1e-4
    c.train.weight_decay = 1e-5
    c.train.b1 = 0.9
    c.train.compute_dtype = dtype
    c.efficientad = default_efficientad_config()
    c.efficientad.model_size = size
    return c


def _train_fn(method, tx, batch: int, n_steps: int):
    try:
        from kdjax.train import make_mesh, make_train_fn
        return make_train_fn(method, tx, make_mesh(), batch, n_steps), "kdjax.train.make_train_fn"
    except ImportError:  # engine not present: the same loop, locally
        from kdjax import ops

        def one(carry, _):
            ts, data, frozen, key = carry
            k_d, k_l = jax.random.split(jax.random.fold_in(key, ts["step"]))
            idx = jax.random.randint(k_d, (batch,), 0, data.shape[0])
            x = ops.normalize_images(data[idx])
            (loss, (st, met)), g = jax.value_and_grad(method.loss, has_aux=True)(
                ts["params"], ts["state"], frozen, x, k_l)
            u, o = tx.update(g, ts["opt_state"], ts["params"])
            ts = {"step": ts["step"] + 1, "params": optax.apply_updates(ts["params"], u),
                  "state": st, "opt_state": o}
            return (ts, data, frozen, key), met

        def run(ts, data, frozen, key):
            (ts, _, _, _), m = jax.lax.scan(one, (ts, data, frozen, key), None, length=n_steps)
            return ts, m

        return jax.jit(run, donate_argnums=(0,)), "local lax.scan loop"


def bench(size: str, args) -> dict:
    from kdjax.methods.efficientad import EfficientAD

    cfg = _config(size, args.image_size, 1, args.dtype)
    method = EfficientAD(cfg)
    variables = method.init(jax.random.PRNGKey(0), (1, args.image_size, args.image_size, 3))
    rng = np.random.default_rng(0)
    data_u8 = rng.integers(0, 256, (8, args.image_size, args.image_size, 3), dtype=np.uint8)
    data = jnp.asarray(data_u8)
    state = variables["state"]
    frozen = variables["frozen"]
    tx = method.optimizer(70000)
    ts = {"step": jnp.zeros((), jnp.int32), "params": variables["params"], "state": state,
          "opt_state": tx.init(variables["params"])}
    fn, how = _train_fn(method, tx, 1, args.steps)
    key = jax.random.PRNGKey(1)
    t0 = time.time()
    ts, m = fn(ts, data, frozen, key)
    jax.block_until_ready(m)
    compile_and_first = time.time() - t0
    t0, c0 = time.time(), time.process_time()
    for _ in range(args.calls):
        ts, m = fn(ts, data, frozen, key)
    jax.block_until_ready(m)
    train_sps = args.steps * args.calls / (time.time() - t0)
    train_cpu_per_step = (time.process_time() - c0) / (args.steps * args.calls)

    maps = jax.jit(method.maps)
    from kdjax import ops
    xb = ops.normalize_images(data[: args.infer_batch])
    jax.block_until_ready(maps(ts["params"], ts["state"], frozen, xb))
    t0, c0 = time.time(), time.process_time()
    for _ in range(args.infer_calls):
        out = maps(ts["params"], ts["state"], frozen, xb)
    jax.block_until_ready(out)
    infer_ips = args.infer_batch * args.infer_calls / (time.time() - t0)
    infer_cpu_per_image = (time.process_time() - c0) / (args.infer_batch * args.infer_calls)
    return {"model": f"EfficientAD-{size}", "train_steps_per_s": train_sps,
            "train_batch_size": 1, "train_steps_per_call": args.steps,
            "first_call_s": compile_and_first, "infer_images_per_s": infer_ips,
            # CPU seconds (all threads) per step / image: on a loaded, shared machine
            # n_cores / cpu_s estimates the rate with the cores to oneself.
            "train_cpu_s_per_step": train_cpu_per_step,
            "infer_cpu_s_per_image": infer_cpu_per_image,
            "infer_batch_size": args.infer_batch, "image_size": args.image_size,
            "dtype": args.dtype, "train_loop": how}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="S,M")
    p.add_argument("--steps", type=int, default=20, help="training steps per jitted call")
    p.add_argument("--calls", type=int, default=2, help="timed training calls")
    p.add_argument("--infer_batch", type=int, default=8)
    p.add_argument("--infer_calls", type=int, default=3)
    p.add_argument("--image_size", type=int, default=256)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--json", default="")
    args = p.parse_args()
    results = []
    for size in args.sizes.split(","):
        load_before = os.getloadavg()
        r = bench(size.strip().upper(), args)
        r.update(device=str(jax.devices()[0].device_kind), backend=jax.default_backend(),
                 cpu_count=os.cpu_count(), host=platform.node(),
                 loadavg_before=load_before, loadavg_after=os.getloadavg())
        print(json.dumps(r), flush=True)
        results.append(r)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
