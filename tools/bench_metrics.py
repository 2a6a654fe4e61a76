"""Time kdjax's metrics on random data the size of one category.

    python tools/bench_metrics.py                 # LOCO + MVTec AD category at 256x256
    python tools/bench_metrics.py --size 512 --json /tmp/bench.json

LOCO: ``--loco`` good / logical / structural maps (default 100 each) with 1-4
regions per anomalous image (absolute and relative saturation, some
overlapping). MVTec AD: ``--ad`` good / anomalous maps (default 40 / 120) with
1-3 blobs each. Maps are Gaussian-smoothed noise (float32), like real
anomaly maps after the sigma-4 filter, so nearly every pixel has a distinct
score (the worst case for the exact curves).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np
from scipy import ndimage

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from kdjax import metrics as M  # noqa: E402
from kdjax.data.types import GTRegion  # noqa: E402


def _blob(rng, size):
    yy, xx = np.mgrid[:size, :size]
    cy, cx = rng.uniform(0.1, 0.9, 2) * size
    ry, rx = rng.uniform(0.02, 0.12, 2) * size
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0


def _maps(rng, n, size, union):
    noise = rng.normal(size=(n, size, size)).astype(np.float32)
    maps = ndimage.gaussian_filter(noise, sigma=(0, 4, 4))
    return (maps + 0.05 * union).astype(np.float32)


def loco_data(rng, counts, size):
    n_good, n_log, n_str = counts
    n = n_good + n_log + n_str
    kinds = [None] * n_good + ["logical"] * n_log + ["structural"] * n_str
    labels = np.array([0] * n_good + [1] * (n_log + n_str))
    regions = []
    union = np.zeros((n, size, size), np.float32)
    for i in range(n):
        rs = []
        if labels[i]:
            for _ in range(rng.integers(1, 5)):
                m = _blob(rng, size)
                if rng.random() < 0.5:
                    rs.append(GTRegion(m, float(rng.choice([0.5, 1.0])), True))
                else:
                    rs.append(GTRegion(m, int(rng.integers(50, 2000)), False))
                union[i] += m
        regions.append(rs)
    return _maps(rng, n, size, union), labels, kinds, regions


def ad_data(rng, counts, size):
    n_good, n_bad = counts
    n = n_good + n_bad
    masks = np.zeros((n, size, size), np.uint8)
    for i in range(n_good, n):
        for _ in range(rng.integers(1, 4)):
            masks[i] |= _blob(rng, size)
    return _maps(rng, n, size, masks.astype(np.float32)), (masks.reshape(n, -1).max(1) > 0
                                                           ).astype(int), masks


def timed(fn, *a, **k):
    t = time.perf_counter()
    out = fn(*a, **k)
    return out, time.perf_counter() - t


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--loco", type=int, nargs=3, default=(100, 100, 100),
                   metavar=("GOOD", "LOGICAL", "STRUCTURAL"))
    p.add_argument("--ad", type=int, nargs=2, default=(40, 120), metavar=("GOOD", "ANOMALOUS"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default="", help="also write the timings to this JSON file")
    args = p.parse_args(argv)
    _, t_import = timed(__import__, "sklearn.metrics")  # one-time import, not per category
    print(f"import sklearn.metrics (once per process) {t_import:.2f} s")
    rng = np.random.default_rng(args.seed)
    res = {"import_sklearn_s": t_import, "size": args.size, "loco_counts": list(args.loco), "ad_counts": list(args.ad),
           "cpu_count": os.cpu_count(), "machine": platform.processor() or platform.machine()}

    maps, labels, kinds, regions = loco_data(rng, args.loco, args.size)
    n_reg = sum(len(r) for r in regions)
    print(f"LOCO category: {len(maps)} maps {args.size}x{args.size}, {n_reg} regions")
    good_log = [i for i, k in enumerate(kinds) if k in (None, "logical")]
    _, t = timed(M.au_spro, maps[good_log], [regions[i] for i in good_log])
    print(f"  au_spro (one subset, 5 limits)  {t:7.2f} s")
    res["loco_au_spro_one_subset_s"] = t
    out, t = timed(M.loco_metrics, maps, labels, kinds, regions)
    print(f"  loco_metrics (everything)       {t:7.2f} s")
    res["loco_metrics_s"] = t
    res["loco_example"] = {k: out[k] for k in ("image_auroc", "au_spro_0.05")}

    maps, labels, masks = ad_data(rng, args.ad, args.size)
    print(f"MVTec AD category: {len(maps)} maps {args.size}x{args.size}")
    for name, fn in (("pixel_auroc", M.pixel_auroc), ("au_pro", M.au_pro)):
        _, t = timed(fn, masks, maps)
        print(f"  {name:<32s}{t:7.2f} s")
        res[f"ad_{name}_s"] = t
    _, t = timed(M.au_pro_per_image, masks, maps, labels)
    print(f"  au_pro_per_image (RD4AD)        {t:7.2f} s")
    res["ad_au_pro_per_image_s"] = t
    _, t = timed(M.mvtec_ad_metrics, maps, labels, masks)
    print(f"  mvtec_ad_metrics (everything)   {t:7.2f} s")
    res["ad_metrics_s"] = t
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return res


if __name__ == "__main__":
    main()
