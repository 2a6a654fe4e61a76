"""Shared pytest fixtures: tiny datasets written into temporary directories.

Builders (plain functions, also handed out by the fixtures of the same name):

* ``make_mvtec_ad(root, category="bottle", n_train=6, n_good=2, defects=(("crack", 2),),
  size=(40, 48), grayscale=False, masks=True, seed=0) -> root``: an MVTec AD
  category (masks ground_truth/<type>/NNN_mask.png, 0/255, a rectangle per image).
* ``make_loco(root, category="breakfast_box", ..., size=(36, 52)) -> root``: an MVTec LOCO AD
  category with defects_config.json (relative and absolute saturation entries)
  and GT folders holding 1 or 2 region PNGs.
* ``make_folder(root, category="widgets", ...) -> root``: the MVTec AD layout, masks
  optional (``masks=False`` writes none).
* ``make_visa(root, category="candle", n_train=6, n_good=2, n_anomaly=3, size=(36, 52))
  -> root``: VisA as distributed: JPEG images under <cat>/Data/Images/{Normal,Anomaly},
  class-id masks (values 1 and 2) under <cat>/Data/Masks/Anomaly, rows appended to
  split_csv/1cls.csv, and <cat>/image_anno.csv (labels "bent" / "melt, scratch").
* ``make_mvtec_ad2(root, category="can", ..., size=(36, 52)) -> root``: MVTec AD 2
  (train, validation, test_public with ground_truth/bad/<stem>_mask.png, test_private,
  test_private_mixed; names 000_regular.png / 000_mixed.png).
* ``make_btad(root, category="01", ..., ext=".bmp") -> root``: BTAD (ok/ko folders,
  ground_truth/ko/<stem>.png).

Session fixtures (built once per test session, read-only for tests):

* ``tiny_synthetic_root``: str root of kdjax's synthetic set at 64 px,
  counts (12, 4, 4, 5, 4); the category is ``kdjax.data.synthetic.CATEGORY`` ("tray").
* ``mini_mvtec_ad_root``: str root holding "bottle" (RGB, 40x48) and "grid"
  (grayscale, 32x32), each with 6 train, 2 good and 2+1 defective test images.
* ``mini_loco_root``: str root holding "breakfast_box" (see make_loco).
* ``mini_visa_root``: str root holding VisA "candle" and "pcb1" (see make_visa).
* ``mini_mvtec_ad2_root``: str root holding MVTec AD 2 "can" (see make_mvtec_ad2).
"""

from __future__ import annotations

import json
import os
import tempfile

# Tests run on the CPU, and compiled XLA programs are cached on disk: tests (and the
# subprocesses some of them start) that build the same model reuse one compilation.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), "kdjax-test-xla-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

LOCO_CONFIG = [
    {"defect_name": "missing_item", "pixel_value": 255, "saturation_threshold": 120,
     "relative_saturation": False},
    {"defect_name": "wrong_item", "pixel_value": 200, "saturation_threshold": 1.0,
     "relative_saturation": True},
    {"defect_name": "scratch", "pixel_value": 150, "saturation_threshold": 0.5,
     "relative_saturation": True},
]


def _rand_image(rng, size, grayscale=False):
    h, w = size
    if grayscale:
        return (rng.random((h, w)) * 255).astype(np.uint8)
    return (rng.random((h, w, 3)) * 255).astype(np.uint8)


def _rect_mask(rng, size, value=255):
    h, w = size
    m = np.zeros((h, w), np.uint8)
    y0, x0 = int(rng.integers(0, h // 2)), int(rng.integers(0, w // 2))
    m[y0:y0 + max(2, h // 3), x0:x0 + max(2, w // 3)] = value
    return m


def _save(arr, path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(arr).save(path)


def make_mvtec_ad(root, category="bottle", n_train=6, n_good=2, defects=(("crack", 2),),
                  size=(40, 48), grayscale=False, masks=True, seed=0):
    """Write a tiny MVTec AD category into ``root``; return ``root`` (str)."""
    root = str(root)
    rng = np.random.default_rng(seed)
    cat = os.path.join(root, category)
    for i in range(n_train):
        _save(_rand_image(rng, size, grayscale), os.path.join(cat, "train", "good", f"{i:03d}.png"))
    for i in range(n_good):
        _save(_rand_image(rng, size, grayscale), os.path.join(cat, "test", "good", f"{i:03d}.png"))
    for name, n in defects:
        for i in range(n):
            _save(_rand_image(rng, size, grayscale), os.path.join(cat, "test", name, f"{i:03d}.png"))
            if masks:
                _save(_rect_mask(rng, size), os.path.join(cat, "ground_truth", name,
                                                          f"{i:03d}_mask.png"))
    return root


def make_folder(root, category="widgets", masks=False, **kw):
    """A custom folder dataset (MVTec AD layout, masks optional)."""
    return make_mvtec_ad(root, category=category, masks=masks, **kw)


def make_loco(root, category="breakfast_box", n_train=5, n_val=3, n_good=2, n_logical=2,
              n_structural=2, size=(36, 52), seed=0, config=True):
    """Write a tiny MVTec LOCO AD category; image i of each anomalous type has
    (i % 2) + 1 region PNGs: logical ones use values 255 (absolute saturation
    120) and 200 (relative 1.0), structural ones 150 (relative 0.5)."""
    root = str(root)
    rng = np.random.default_rng(seed)
    cat = os.path.join(root, category)
    for split, n in (("train", n_train), ("validation", n_val)):
        for i in range(n):
            _save(_rand_image(rng, size), os.path.join(cat, split, "good", f"{i:03d}.png"))
    for i in range(n_good):
        _save(_rand_image(rng, size), os.path.join(cat, "test", "good", f"{i:03d}.png"))
    for folder, n, values in (("logical_anomalies", n_logical, (255, 200)),
                              ("structural_anomalies", n_structural, (150, 150))):
        for i in range(n):
            _save(_rand_image(rng, size), os.path.join(cat, "test", folder, f"{i:03d}.png"))
            for k in range(i % 2 + 1):
                _save(_rect_mask(rng, size, values[k]),
                      os.path.join(cat, "ground_truth", folder, f"{i:03d}", f"{k:03d}.png"))
    if config:
        with open(os.path.join(cat, "defects_config.json"), "w") as f:
            json.dump(LOCO_CONFIG, f)
    return root


def make_visa(root, category="candle", n_train=6, n_good=2, n_anomaly=3, size=(36, 52),
              seed=0, anno=True):
    """Write a tiny VisA category (JPEG images, class-id masks, 1cls.csv rows)."""
    import csv

    root = str(root)
    rng = np.random.default_rng(seed)
    cat = os.path.join(root, category)
    rows, anno_rows = [], []
    for i in range(n_train + n_good):
        rel = f"{category}/Data/Images/Normal/{i:04d}.JPG"
        _save(_rand_image(rng, size), os.path.join(root, rel))
        rows.append([category, "train" if i < n_train else "test", "normal", rel, ""])
        anno_rows.append([rel, "normal", ""])
    for i in range(n_anomaly):
        rel = f"{category}/Data/Images/Anomaly/{i:03d}.JPG"
        mrel = f"{category}/Data/Masks/Anomaly/{i:03d}.png"
        _save(_rand_image(rng, size), os.path.join(root, rel))
        _save(_rect_mask(rng, size, value=1 + i % 2), os.path.join(root, mrel))
        rows.append([category, "test", "anomaly", rel, mrel])
        anno_rows.append([rel, "bent" if i % 2 == 0 else "melt, scratch", mrel])
    split = os.path.join(root, "split_csv", "1cls.csv")
    os.makedirs(os.path.dirname(split), exist_ok=True)
    new = not os.path.exists(split)
    with open(split, "a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(["object", "split", "label", "image", "mask"])
        w.writerows(rows)
    if anno:
        with open(os.path.join(cat, "image_anno.csv"), "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["image", "label", "mask"])
            w.writerows(anno_rows)
    return root


def make_mvtec_ad2(root, category="can", n_train=6, n_val=3, n_good=2, n_bad=3, n_private=3,
                   n_mixed=2, size=(36, 52), seed=0):
    """Write a tiny MVTec AD 2 category."""
    root = str(root)
    rng = np.random.default_rng(seed)
    cat = os.path.join(root, category)
    for split, n in (("train", n_train), ("validation", n_val)):
        for i in range(n):
            _save(_rand_image(rng, size), os.path.join(cat, split, "good", f"{i:03d}_regular.png"))
    for i in range(n_good):
        _save(_rand_image(rng, size), os.path.join(cat, "test_public", "good",
                                                   f"{i:03d}_regular.png"))
    for i in range(n_bad):
        name = f"{i:03d}_{'regular' if i % 2 == 0 else 'overexposed'}"
        _save(_rand_image(rng, size), os.path.join(cat, "test_public", "bad", name + ".png"))
        _save(_rect_mask(rng, size), os.path.join(cat, "test_public", "ground_truth", "bad",
                                                  name + "_mask.png"))
    for split, n, light in (("test_private", n_private, "regular"),
                            ("test_private_mixed", n_mixed, "mixed")):
        for i in range(n):
            _save(_rand_image(rng, size), os.path.join(cat, split, f"{i:03d}_{light}.png"))
    return root


def make_btad(root, category="01", n_train=6, n_good=2, n_bad=3, size=(40, 40), ext=".bmp",
              seed=0):
    """Write a tiny BTAD category (ok/ko, masks ground_truth/ko/<stem>.png)."""
    root = str(root)
    rng = np.random.default_rng(seed)
    cat = os.path.join(root, category)
    for split, folder, n in (("train", "ok", n_train), ("test", "ok", n_good),
                             ("test", "ko", n_bad)):
        for i in range(n):
            _save(_rand_image(rng, size), os.path.join(cat, split, folder, f"{i:04d}{ext}"))
            if folder == "ko":
                _save(_rect_mask(rng, size), os.path.join(cat, "ground_truth", "ko",
                                                          f"{i:04d}.png"))
    return root


@pytest.fixture(name="make_mvtec_ad")
def _make_mvtec_ad_fixture():
    return make_mvtec_ad


@pytest.fixture(name="make_loco")
def _make_loco_fixture():
    return make_loco


@pytest.fixture(name="make_folder")
def _make_folder_fixture():
    return make_folder


# The generation parameters of ``tiny_synthetic_root``. A run on that root must set
# data.synthetic_size / synthetic_counts to these (TINY_SYNTHETIC_ARGS on the command
# line): other values regenerate the shared set in place.
TINY_SYNTHETIC = {"size": 64, "counts": (12, 4, 4, 5, 4)}
TINY_SYNTHETIC_ARGS = [f"--config.data.synthetic_size={TINY_SYNTHETIC['size']}",
                       "--config.data.synthetic_counts=" + str(TINY_SYNTHETIC["counts"])]


@pytest.fixture(scope="session")
def tiny_synthetic_root(tmp_path_factory):
    from kdjax.data import ensure_synthetic

    root = str(tmp_path_factory.mktemp("synthetic"))
    ensure_synthetic(root, seed=0, image_size=TINY_SYNTHETIC["size"],
                     counts=TINY_SYNTHETIC["counts"])
    return root


@pytest.fixture(scope="session")
def mini_mvtec_ad_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("mvtec_ad")
    make_mvtec_ad(root, "bottle", defects=(("broken_large", 2), ("contamination", 1)))
    make_mvtec_ad(root, "grid", defects=(("bent", 2), ("glue", 1)), size=(32, 32),
                  grayscale=True, seed=1)
    return str(root)


@pytest.fixture(scope="session")
def mini_loco_root(tmp_path_factory):
    return make_loco(tmp_path_factory.mktemp("loco"))


@pytest.fixture(scope="session")
def mini_visa_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("visa")
    make_visa(root, "candle")
    return make_visa(root, "pcb1", size=(40, 32), seed=1, anno=False)


@pytest.fixture(scope="session")
def mini_mvtec_ad2_root(tmp_path_factory):
    return make_mvtec_ad2(tmp_path_factory.mktemp("mvtec_ad2"))

# One tiny demo run through the command line, shared by the report, TensorBoard and
# console tests (tests/test_report_html.py, test_tensorboard.py, test_console.py): the
# same overrides as tests/test_model.py's demo run, so its compiled functions come from
# the shared compilation cache.
TINY_DEMO_ARGS = ["--config.teacher.weights=random", "--config.teacher.allow_random=True",
                  "--config.train.steps=2", "--config.train.batch_size=2",
                  "--config.train.steps_per_call=2", "--config.train.checkpoint_every=1",
                  "--config.train.log_every=2", "--config.eval.batch_size=4",
                  "--config.eval.num_figures=2", "--config.teacher.width_divisor=16",
                  "--config.data.image_size=32"]


def run_cli(*args, expect=0, env=None, timeout=900):
    """``python -m kdjax.main ARGS`` in a subprocess from the repository root, stdout and
    stderr captured (not a terminal: progress is plain lines); asserts the exit status."""
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    full_env = dict(os.environ, JAX_PLATFORMS="cpu", **(env or {}))
    p = subprocess.run([sys.executable, "-m", "kdjax.main", *args], cwd=repo, env=full_env,
                       capture_output=True, text=True, timeout=timeout)
    assert p.returncode == expect, f"exit {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}"
    return p


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory, tiny_synthetic_root):
    """``python -m kdjax.main --config=configs/demo.py --workdir=W`` at tiny size, run
    once: (W, the completed process). Tests must not change W (copy it first)."""
    wd = str(tmp_path_factory.mktemp("demo_run") / "w")
    p = run_cli("--config=configs/demo.py", f"--workdir={wd}", *TINY_DEMO_ARGS,
                f"--config.data.root={tiny_synthetic_root}", *TINY_SYNTHETIC_ARGS)
    return wd, p
