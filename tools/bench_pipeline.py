"""Measure images/s of kdjax's two image loaders on a generated synthetic set.

    python tools/bench_pipeline.py [--gen-size 768] [--count 120] [--size 256] [--batch 32]

Generates kdjax's synthetic "tray" set (train split only) at --gen-size px
into --root (default: a temporary folder), then times, resizing to --size:
  * kdjax.data.load_images (PIL decode + antialiased resize, thread pool);
  * kdjax.data.make_dataset (tf.data) for one epoch without cache, and for
    repeated epochs from its in-memory cache.
Prints one line per measurement and, with --json, writes them to a file.
The figures depend on the machine (cores, disk cache); nothing is typed in.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--root", default=None, help="where to generate (default: a temp folder)")
    p.add_argument("--gen-size", type=int, default=768, help="resolution of the generated files")
    p.add_argument("--count", type=int, default=120, help="number of training images")
    p.add_argument("--size", type=int, default=256, help="resize target")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)

    import kdjax.data as D

    tmp = None
    root = a.root
    if root is None:
        tmp = tempfile.TemporaryDirectory()
        root = tmp.name
    t0 = time.perf_counter()
    cat = D.ensure_synthetic(root, seed=0, image_size=a.gen_size, counts=(a.count, 0, 0, 0, 0))
    gen_s = time.perf_counter() - t0
    recs = D.list_records("synthetic", root, cat, "train")
    n = len(recs)
    results = {"cpu_count": os.cpu_count(), "machine": platform.processor() or platform.machine(),
               "images": n, "file_size": a.gen_size, "image_size": a.size}
    if gen_s > 1.0:  # otherwise the set was already there
        results["generate_images_per_s"] = n / gen_s
        print(f"generated {n} synthetic images at {a.gen_size}px in {gen_s:.1f} s "
              f"({n / gen_s:.1f} images/s)")
    else:
        print(f"reusing {n} synthetic images at {a.gen_size}px in {root}")

    t0 = time.perf_counter()
    x, _ = D.load_images(recs, a.size)
    dt = time.perf_counter() - t0
    results["load_images_per_s"] = n / dt
    print(f"load_images: {n} images -> {x.shape} in {dt:.2f} s = {n / dt:.1f} images/s")

    from kdjax.data.pipeline import import_tf
    tf = import_tf()
    ds = D.make_dataset(recs, a.size, a.batch, seed=0, shuffle=True, repeat=False,
                        process_index=0, process_count=1, drop_remainder=False, cache=False)
    t0 = time.perf_counter()
    m = sum(int(b.shape[0]) for b in ds)
    dt = time.perf_counter() - t0
    results["tf_data_epoch_images_per_s"] = m / dt
    print(f"make_dataset (decode + resize, one epoch, no cache): {m} images in {dt:.2f} s = "
          f"{m / dt:.1f} images/s")

    ds = D.make_dataset(recs, a.size, a.batch, seed=0, shuffle=True, repeat=True,
                        process_index=0, process_count=1, cache=True)
    it = iter(ds)
    for _ in range((n + a.batch - 1) // a.batch):  # first epoch fills the cache
        next(it)
    steps = max(200, 20 * n // a.batch)
    t0 = time.perf_counter()
    for _ in range(steps):
        next(it)
    dt = time.perf_counter() - t0
    results["tf_data_cached_images_per_s"] = steps * a.batch / dt
    print(f"make_dataset (cached epochs, shuffle + batch {a.batch}): {steps * a.batch} images "
          f"in {dt:.2f} s = {steps * a.batch / dt:.1f} images/s")
    print(f"tensorflow {tf.__version__}, {os.cpu_count()} CPUs visible")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=2)
    if tmp is not None:
        tmp.cleanup()
    return results


if __name__ == "__main__":
    main()
