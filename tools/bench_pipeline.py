"""Streaming input speed (data.input=stream): the tf.data pipeline's images/s per CPU
core from PNG files and from the data.cache ArrayRecord file, and training steps/s
streamed vs resident, measured on this machine.

    python tools/bench_pipeline.py [--count 2000] [--file-size 512] [--size 256] \
        [--batch 16] [--train rd4ad,efficientad] [--json out.json]

Generates --count PNG files of --file-size px (kdjax's synthetic tray set) into --root
(default: a temporary folder, kept with --keep), then times:
  * the pipeline (kdjax.data.pipeline.batch_stream: the reader's decode + resize to
    --size, parallel map, prefetch) over every file in batches of --batch, with one
    thread and with one thread per core;
  * the same from the data.cache file (written once, timed too);
  * with --train: the engine's training calls of each named config
    (configs/mvtec_rd4ad.py, configs/loco_efficientad.py; random teacher, full width,
    --size px) fed resident and streamed, steady state after one warm-up call.
Prints one line per measurement and, with --json, writes them to a file. Nothing here
is typed in: every figure is a timing of this run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CONFIGS = {"rd4ad": "mvtec_rd4ad", "efficientad": "loco_efficientad", "mrkd": "mvtec_mrkd",
           "cad": "loco_cad"}


def stream_rate(images, batch: int, threads=None) -> float:
    """Images/s of the pipeline over every image of ``images`` in order."""
    import numpy as np

    from kdjax.data.pipeline import batch_stream

    n = len(images)
    steps = [(np.arange(i, min(i + batch, n)), {}) for i in range(0, n, batch)]
    it = batch_stream(iter(steps), images, threads=threads)
    next(it)  # start-up (TensorFlow's first call) is not timed
    t0 = time.perf_counter()
    m = sum(int(b.shape[0]) for b, _ in it)
    return m / (time.perf_counter() - t0)


def train_rate(name: str, files, size: int, calls: int = 3) -> dict:
    """Steps/s and img/s of ``name``'s training calls fed resident and streamed."""
    import jax
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P

    from kdjax import config as config_lib
    from kdjax import devices, feed, teacher, train
    from kdjax.data import images as images_lib
    from kdjax.data.category import CategoryData
    from kdjax.data.pipeline import ImageSet
    from kdjax.methods import get_method

    c = config_lib.load_config(CONFIGS[name])
    with c.unlocked():
        c.teacher.weights, c.teacher.allow_random = "random", True
        c.data.image_size, c.train.steps = size, 10_000
        c.data.category = "bench"
    m = get_method(c)
    mesh = devices.make_mesh()
    n_img = min(len(files), 64)
    load = lambda p: images_lib.load_one(p, size)  # noqa: E731
    arr = np.stack([load(p) for p in files[:n_img]])
    cat = CategoryData("bench", "", arr, None, [], [])
    ts, frozen, tx, _ = train.init_train_state(c, m, teacher.load(c, m).variables, cat, mesh)
    batch, per_call = int(c.train.batch_size), int(c.train.steps_per_call)
    per_call = min(per_call, max(1, n_img // batch))
    key = jax.random.PRNGKey(0)
    out = {"config": CONFIGS[name], "batch": batch, "steps_per_call": per_call}
    data = devices.put_global(arr, NamedSharding(mesh, P()))
    resident = {"data": data, "cache": None, "extra": {}}
    fn = train.make_train_fn(m, tx, mesh, batch, per_call)
    copy = lambda t: jax.tree_util.tree_map(lambda a: a.copy(), t)  # noqa: E731 (donated)
    ts1, mm = fn(copy(ts), resident, frozen, key)
    jax.block_until_ready(mm)
    t0 = time.perf_counter()
    for _ in range(calls):
        ts1, mm = fn(ts1, resident, frozen, key)
    jax.block_until_ready(mm)
    out["resident_steps_per_s"] = calls * per_call / (time.perf_counter() - t0)
    sfn = train.make_train_fn(m, tx, mesh, batch, per_call, stream=True)
    stream = feed.stream_inputs(ImageSet(files[:n_img], size, load, "train"), {}, key, mesh,
                                0, (calls + 1) * per_call, batch, per_call)
    ts2 = copy(ts)
    _, _, _, inputs = next(stream)
    ts2, mm = sfn(ts2, inputs, frozen, key)
    jax.block_until_ready(mm)
    t0 = time.perf_counter()
    for _, _, _, inputs in stream:  # gathering the next call's batch is part of the time
        ts2, mm = sfn(ts2, inputs, frozen, key)
    jax.block_until_ready(mm)
    out["stream_steps_per_s"] = calls * per_call / (time.perf_counter() - t0)
    out["stream_over_resident"] = out["stream_steps_per_s"] / out["resident_steps_per_s"]
    out["images_per_s_resident"] = out["resident_steps_per_s"] * batch
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--root", default=None, help="where to generate (default: a temp folder)")
    p.add_argument("--keep", action="store_true", help="keep a generated temp folder")
    p.add_argument("--count", type=int, default=2000, help="number of PNG files")
    p.add_argument("--file-size", type=int, default=512, help="their resolution")
    p.add_argument("--size", type=int, default=256, help="the model's input size")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--train", default="", help="comma list of rd4ad, efficientad, mrkd, cad")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)

    import kdjax.data as D
    from kdjax.data import images as images_lib
    from kdjax.data.pipeline import ImageSet, build_cache, import_tf

    root = a.root or tempfile.mkdtemp(prefix="kdjax-bench-pipeline-")
    cores = os.cpu_count()
    res = {"cpu_count": cores, "machine": platform.processor() or platform.machine(),
           "files": a.count, "file_size": a.file_size, "image_size": a.size,
           "tensorflow": import_tf().__version__}
    t0 = time.perf_counter()
    cat = D.ensure_synthetic(root, seed=0, image_size=a.file_size,
                             counts=(a.count, 0, 0, 0, 0))
    gen_s = time.perf_counter() - t0
    files = [r.image_path for r in D.list_records("synthetic", root, cat, "train")]
    print(f"{len(files)} PNG files of {a.file_size} px in {root} ({gen_s:.0f} s to make them "
          "or find them)")

    def fresh():
        return ImageSet(files, a.size, lambda p: images_lib.load_one(p, a.size), "train",
                        describe=f"bench {a.size}")

    for threads, label in ((1, "1 thread"), (None, f"{cores} threads")):
        r = stream_rate(fresh(), a.batch, threads)
        res[f"png_images_per_s_{'1' if threads else 'all'}"] = r
        print(f"stream from PNG, {label}: {r:.1f} img/s"
              + (f" ({r / cores:.1f} per core)" if not threads else ""))
    cached = fresh()
    t0 = time.perf_counter()
    build_cache(cached, os.path.join(root, "cache"))
    res["cache_build_s"] = time.perf_counter() - t0
    print(f"data.cache written in {res['cache_build_s']:.1f} s "
          f"({os.path.getsize(cached.cache_path) / 2**20:.0f} MiB)")
    for threads, label in ((1, "1 thread"), (None, f"{cores} threads")):
        r = stream_rate(cached, a.batch, threads)
        res[f"cache_images_per_s_{'1' if threads else 'all'}"] = r
        print(f"stream from data.cache, {label}: {r:.1f} img/s")
    for name in [t for t in a.train.split(",") if t]:
        r = train_rate(name, files, a.size)
        res[f"train_{name}"] = r
        print(f"{name} ({r['config']}, batch {r['batch']}): resident "
              f"{r['resident_steps_per_s']:.3f} steps/s, streamed "
              f"{r['stream_steps_per_s']:.3f} steps/s ({r['stream_over_resident']:.2f}x)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)
    if a.root is None and not a.keep:
        import shutil

        shutil.rmtree(root, ignore_errors=True)
    return res


if __name__ == "__main__":
    main()
