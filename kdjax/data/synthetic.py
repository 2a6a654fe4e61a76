"""kdjax's synthetic logical-anomaly dataset ("tray"), written in the MVTec LOCO AD layout.

docs/DATA.md, "Synthetic logical-anomaly dataset". Every image shows a tray with two
compartments, divided by a bar:

* left compartment: three slots, exactly TWO of them hold a round item; both
  round items have the same colour c (red, green or blue);
* right compartment: four slots, exactly THREE of them hold an elongated item
  (a capsule) whose colour is paired with c: red -> yellow, green -> purple,
  blue -> cyan.

Which slots are filled, item positions (jitter), capsule rotations, lighting
(brightness, gradient, light direction), item shades, tray position and the
background texture (blotches, wood grain or fabric) vary from image to image.

Logical anomalies break a rule while every pixel stays locally normal (each
item, colour and empty slot also appears in normal images); a method must
count items or relate the two compartments to see them:

=======================  ==============================  ===========================
defect_name              what                            region (mask)
=======================  ==============================  ===========================
missing_round_item       one round item removed          where it was (absolute sat.)
missing_elongated_item   one capsule removed             where it was (absolute sat.)
extra_item               a third round item              all round items (rel. 0.3)
wrong_compartment        an item moved to the other side the moved item (rel. 1.0)
wrong_colour_pairing     capsules of another pairing     all capsules (rel. 0.35)
wrong_count              a fourth capsule                all capsules (rel. 0.25)
=======================  ==============================  ===========================

When the violating item cannot be singled out (which of three round items is
the extra one?) the region covers all candidates and the relative saturation
threshold is about one item's share, as MVTec LOCO AD does for such defects.
Missing items use an absolute threshold equal to the item's area in pixels.

Structural anomalies: scratch (a thin line), stain (a translucent blob),
dent (a dimple with inverted shading in a round item) and broken_item (a
capsule snapped in two, the gap is the region); 20 % of structural images
carry two defects (two region PNGs).

Everything is drawn with numpy signed-distance fields (antialiased by
coverage), deterministically from (seed, split, index), in
kdjax/data/synthetic_draw.py; this module writes the layout and the figure. CLI::

    python -m kdjax.data.synthetic --out DIR [--seed 0 --size 256 \
        --counts 200,40,40,40,40] [--figure docs/synthetic_examples.png] [--baselines]

``--baselines`` runs ``baseline_check``: a purely local detector (8x8 patch
nearest neighbour) against a global one (per-compartment colour histograms),
to show that the logical anomalies need global context.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import shutil
import sys
from typing import Dict, Optional, Sequence

import numpy as np
from PIL import Image

# The drawing (kdjax/data/synthetic_draw.py); its names stay importable from here.
from kdjax.data.synthetic_draw import (  # noqa: F401
    CAP_HALF_LEN, CAP_W, CAPSULE_COLOURS, DISK_R, GENERATOR_VERSION, LOGICAL_KINDS,
    MISSING_MARGIN, PAIRING, ROUND_COLOURS, SPLITS, STRUCTURAL_KINDS, defects_config,
    render_image)

CATEGORY = "tray"
MARKER = "kdjax_synthetic.json"


def _save_png(arr, path):
    Image.fromarray(arr).save(path, format="PNG", compress_level=3)


def generate(out_dir: str, seed: int = 0, image_size: int = 256,
             counts: Sequence[int] = (200, 40, 40, 40, 40), category: str = CATEGORY,
             workers: Optional[int] = None) -> str:
    """Write the dataset to <out_dir>/<category> (which must not exist); return its path.

    counts = (train, validation, test good, test logical, test structural).
    """
    counts = tuple(int(c) for c in counts)
    if len(counts) != 5 or min(counts) < 0 or counts[0] < 1:
        raise ValueError(f"counts must be 5 non-negative ints (train>=1), got {counts}.")
    if image_size < 16:
        raise ValueError(f"image_size must be >= 16, got {image_size}.")
    cat = os.path.join(out_dir, category)
    table = {e["defect_name"]: e for e in defects_config(image_size)}
    jobs = []
    for (split, folder), n in zip(SPLITS, counts):
        os.makedirs(os.path.join(cat, split, folder), exist_ok=True)
        width = max(3, len(str(max(n - 1, 0))))
        for i in range(n):
            jobs.append((split, folder, i, f"{i:0{width}d}"))
    if counts[3] or counts[4]:
        for f in ("logical_anomalies", "structural_anomalies"):
            os.makedirs(os.path.join(cat, "ground_truth", f), exist_ok=True)

    def work(job):
        split, folder, i, stem = job
        img, regions = render_image(seed, split, folder, i, image_size)
        _save_png(img, os.path.join(cat, split, folder, stem + ".png"))
        if folder != "good":
            if not regions:
                raise RuntimeError(f"synthetic generator produced no region for {job}")
            gdir = os.path.join(cat, "ground_truth", folder, stem)
            os.makedirs(gdir, exist_ok=True)
            for k, (name, mask) in enumerate(regions):
                _save_png(mask.astype(np.uint8) * np.uint8(table[name]["pixel_value"]),
                          os.path.join(gdir, f"{k:03d}.png"))

    workers = workers or max(1, min(8, os.cpu_count() or 1))
    with concurrent.futures.ThreadPoolExecutor(workers) as ex:
        list(ex.map(work, jobs))
    with open(os.path.join(cat, "defects_config.json"), "w") as f:
        json.dump(defects_config(image_size), f, indent=2)
    return cat


def _params(seed, image_size, counts, category):
    return dict(generator_version=GENERATOR_VERSION, seed=int(seed), image_size=int(image_size),
                counts=[int(c) for c in counts], category=category)


def ensure_synthetic(root: str, seed: int = 0, image_size: int = 256,
                     counts: Sequence[int] = (200, 40, 40, 40, 40)) -> str:
    """Generate the synthetic dataset into ``root`` unless it is already there with
    the same parameters (marker file <root>/tray/kdjax_synthetic.json); regenerate
    when they differ. Returns the category name ("tray")."""
    from kdjax.data.readers import DatasetError

    params = _params(seed, image_size, counts, CATEGORY)
    cat = os.path.join(root, CATEGORY)
    marker = os.path.join(cat, MARKER)
    if os.path.isfile(marker):
        try:
            with open(marker) as f:
                if json.load(f) == params:
                    return CATEGORY
        except (OSError, json.JSONDecodeError):
            pass
    elif os.path.exists(cat):
        raise DatasetError(
            f"{cat} exists but was not written by kdjax's synthetic generator (no {MARKER}); "
            f"refusing to overwrite it. Use another --config.data.root or delete that folder.")
    os.makedirs(root, exist_ok=True)
    tmp = os.path.join(root, f".{CATEGORY}.tmp-{os.getpid()}")
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    generate(tmp, seed, image_size, counts, category=CATEGORY)
    with open(os.path.join(tmp, CATEGORY, MARKER), "w") as f:
        json.dump(params, f, indent=2)
    if os.path.exists(cat):
        shutil.rmtree(cat)
    os.replace(os.path.join(tmp, CATEGORY), cat)
    shutil.rmtree(tmp, ignore_errors=True)
    return CATEGORY


def make_figure(root: str, out_png: str, category: str = CATEGORY, per_row: int = 6) -> str:
    """Save a figure of good images (row 1) and logical / structural anomalies with
    their ground-truth regions outlined (rows 2, 3), read back through
    kdjax.data's LOCO reader."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from kdjax.data.readers import list_records, load_regions, read_image

    train = list_records("synthetic", root, category, "train")[:per_row]
    test = list_records("synthetic", root, category, "test")
    rows = [train]
    for kind in ("logical", "structural"):
        seen, pick = set(), []
        for r in test:
            names = tuple(sorted({s.defect_name for s in r.regions}))
            if r.anomaly_kind == kind and names not in seen:
                seen.add(names)
                pick.append(r)
        rows.append(pick[:per_row])
    fig, axes = plt.subplots(3, per_row, figsize=(2.2 * per_row, 7.2))
    colours = ["#ff00ff", "#00ffff", "#ffff00"]
    for ax_row, recs, title in zip(axes, rows, ("good", "logical", "structural")):
        for j, ax in enumerate(ax_row):
            ax.axis("off")
            if j >= len(recs):
                continue
            r = recs[j]
            ax.imshow(read_image(r.image_path))
            label = "good (train)" if not r.label else ""
            for k, (spec, g) in enumerate(zip(r.regions, load_regions(r))):
                ax.contour(g.mask.astype(float), levels=[0.5], colors=colours[k % 3],
                           linewidths=1.2)
                label += ("\n" if label else "") + spec.defect_name
            ax.set_title(label, fontsize=8)
    fig.suptitle("kdjax synthetic 'tray' dataset: rule = left: 2 round items of one colour; "
                 "right: 3 capsules of the paired colour", fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
    fig.savefig(out_png, dpi=80)
    plt.close(fig)
    return out_png


def baseline_check(root: str, category: str = CATEGORY, size: int = 64) -> Dict[str, float]:
    """Sanity check that the logical anomalies need global context.

    Two training-free detectors, fitted on the train split at ``size`` px:
    * local: each 8x8 patch (stride 4) scored by its distance to the nearest
      training patch, image score = max (sees no more than 8x8 pixels);
    * global: hue histograms of the saturated pixels of the left and right
      compartments (pooled over each compartment), scored by the mean distance
      to the 3 nearest training images (knows the tray's layout, nothing local).
    Returns image AUROC per detector for the logical and structural subsets
    (each with the good test images). Expected: local does well on structural
    and poorly on logical anomalies; global the other way round.
    """
    from sklearn.metrics import roc_auc_score

    from kdjax.data.readers import list_records, load_images

    train = list_records("synthetic", root, category, "train")
    test = list_records("synthetic", root, category, "test")
    xtr = load_images(train, size)[0].astype(np.float32) / 255.0
    xte = load_images(test, size)[0].astype(np.float32) / 255.0

    def patches(x, p=8, st=4):
        return np.stack([x[:, i:i + p, j:j + p].reshape(len(x), -1)
                         for i in range(0, size - p + 1, st)
                         for j in range(0, size - p + 1, st)], 1)

    bank = patches(xtr).reshape(-1, 8 * 8 * 3)
    bank_sq = (bank ** 2).sum(1)[None]
    local = []
    for q in patches(xte):
        d = (q ** 2).sum(1)[:, None] - 2.0 * q @ bank.T + bank_sq
        local.append(np.sqrt(np.maximum(d.min(1), 0.0)).max())

    def desc(x):
        out = []
        for im in x:
            hsv = np.asarray(Image.fromarray((im * 255).astype(np.uint8)).convert("HSV"))
            hsv = hsv.astype(np.int64)[int(0.11 * size):int(0.89 * size)]
            f = []
            for lo, hi in ((0.1, 0.39), (0.45, 0.9)):
                h = hsv[:, int(lo * size):int(hi * size)]
                m = h[..., 1] > 110
                f.append(np.bincount(h[..., 0][m] // 16, minlength=16) / (size * size / 100.0))
            out.append(np.concatenate(f))
        return np.asarray(out)

    dtr, dte = desc(xtr), desc(xte)
    glob = [np.sort(np.linalg.norm(dtr - q, axis=1))[:3].mean() for q in dte]
    res = {}
    for kind in ("logical", "structural"):
        sel = [i for i, r in enumerate(test) if r.anomaly_kind in (None, kind)]
        y = [test[i].label for i in sel]
        res[f"{kind}_auroc_local_patch_knn"] = float(roc_auc_score(y, np.asarray(local)[sel]))
        res[f"{kind}_auroc_global_histogram"] = float(roc_auc_score(y, np.asarray(glob)[sel]))
    return res


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="dataset root to write (the category goes in "
                   "<out>/tray)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--counts", default="200,40,40,40,40",
                   help="train,validation,test good,test logical,test structural")
    p.add_argument("--figure", default=None, help="also save an example figure to this PNG")
    p.add_argument("--baselines", action="store_true",
                   help="print the AUROC of a local and a global training-free detector "
                        "(see baseline_check)")
    a = p.parse_args(argv)
    counts = tuple(int(c) for c in a.counts.split(","))
    import time
    t0 = time.time()
    cat = ensure_synthetic(a.out, seed=a.seed, image_size=a.size, counts=counts)
    print(f"{os.path.join(a.out, cat)}: {sum(counts)} images at {a.size}x{a.size} "
          f"(ready in {time.time() - t0:.1f} s)")
    if a.figure:
        print("figure:", make_figure(a.out, a.figure, cat))
    if a.baselines:
        for k, v in baseline_check(a.out, cat).items():
            print(f"{k}: {v:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
