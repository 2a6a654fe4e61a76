"""kdjax's synthetic LOCO-layout dataset: layout, ground truth, rules, determinism."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest
from PIL import Image

import kdjax.data as D
from kdjax.data import synthetic as S


def _tree_digest(folder):
    h = {}
    for dirpath, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(dirpath, f)
            h[os.path.relpath(p, folder)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return h


def test_layout_and_counts(tiny_synthetic_root):
    root, cat = tiny_synthetic_root, S.CATEGORY
    base = os.path.join(root, cat)
    for split, folder, n in (("train", "good", 12), ("validation", "good", 4), ("test", "good", 4),
                             ("test", "logical_anomalies", 5),
                             ("test", "structural_anomalies", 4)):
        names = sorted(os.listdir(os.path.join(base, split, folder)))
        assert names == [f"{i:03d}.png" for i in range(n)]
    assert os.path.isfile(os.path.join(base, "defects_config.json"))
    assert len(D.list_records("synthetic", root, cat, "train")) == 12
    assert len(D.list_records("synthetic", root, cat, "validation")) == 4
    test = D.list_records("synthetic", root, cat, "test")
    assert len(test) == 13 and sum(r.label for r in test) == 9
    # read exactly like MVTec LOCO AD
    assert test == D.list_records("mvtec_loco", root, cat, "test")
    img = D.read_image(test[0].image_path)
    assert img.shape == (64, 64, 3) and img.dtype == np.uint8


def test_defects_config_and_regions(tiny_synthetic_root):
    root, cat = tiny_synthetic_root, S.CATEGORY
    cfg = json.load(open(os.path.join(root, cat, "defects_config.json")))
    values = [e["pixel_value"] for e in cfg]
    assert len(set(values)) == len(values) and 0 not in values
    for e in cfg:
        if e["relative_saturation"]:
            assert isinstance(e["saturation_threshold"], float)
            assert 0.0 < e["saturation_threshold"] <= 1.0
        else:
            assert isinstance(e["saturation_threshold"], int) and e["saturation_threshold"] > 0
    assert {e["relative_saturation"] for e in cfg} == {True, False}
    test = D.list_records("synthetic", root, cat, "test")
    by_value = {e["pixel_value"]: e for e in cfg}
    names = {"logical": set(), "structural": set()}
    for r in test:
        if not r.label:
            assert r.regions == () and D.load_regions(r) == []
            continue
        assert r.regions and len(r.regions) == len(r.mask_paths)
        for spec, g in zip(r.regions, D.load_regions(r)):
            raw = np.asarray(Image.open(spec.mask_path))
            assert raw.shape == (64, 64)
            assert set(np.unique(raw)) == {0, spec.pixel_value}
            e = by_value[spec.pixel_value]
            assert spec.defect_name == e["defect_name"]
            assert spec.saturation_threshold == e["saturation_threshold"]
            assert g.mask.sum() > 0 and g.mask.sum() < 0.5 * 64 * 64
            names[r.anomaly_kind].add(spec.defect_name)
    assert names["logical"] >= {"extra_item", "wrong_compartment", "wrong_colour_pairing",
                                "wrong_count"}
    assert names["logical"] & {"missing_round_item", "missing_elongated_item"}
    assert names["structural"] >= {"scratch", "stain", "dent", "broken_item"}


def _count_items(image, region):
    """Connected blobs of saturated (item) colour in a region of the image."""
    from scipy import ndimage

    hsv = np.asarray(Image.fromarray(image).convert("HSV")).astype(int)
    sat = (hsv[..., 1] > 110) & region
    lab, n = ndimage.label(sat)
    sizes = ndimage.sum(sat, lab, range(1, n + 1))
    return int((np.asarray(sizes) > 20).sum())


def test_rules_of_normal_and_logical_images():
    """Normal images: 2 round items left, 3 capsules right; logical anomalies change
    counts where the rule says (checked on 128 px renderings)."""
    size = 128
    for i in range(4):
        img, regions = S.render_image(5, "train", "good", i, size)
        assert regions == []
        c = (np.arange(size) + 0.5) / size
        inside = ((c[:, None] > 0.11) & (c[:, None] < 0.89)) & np.ones((1, size), bool)
        left = inside & (c[None, :] > 0.1) & (c[None, :] < 0.39)
        right = inside & (c[None, :] > 0.45) & (c[None, :] < 0.9)
        assert _count_items(img, left) == 2
        assert _count_items(img, right) == 3
    kinds = {}
    for i in range(10):
        img, regions = S.render_image(5, "test", "logical_anomalies", i, size)
        kinds.setdefault(S.LOGICAL_KINDS[i % 5], []).append((img, regions))
        assert len(regions) == 1 and regions[0][1].any()
    for img, regions in kinds["wrong_count"]:
        assert regions[0][0] == "wrong_count"
        from scipy import ndimage
        assert ndimage.label(regions[0][1])[1] == 4  # the four capsules


def test_determinism(tmp_path):
    a = S.generate(str(tmp_path / "a"), seed=3, image_size=32, counts=(2, 1, 1, 3, 2))
    b = S.generate(str(tmp_path / "b"), seed=3, image_size=32, counts=(2, 1, 1, 3, 2))
    c = S.generate(str(tmp_path / "c"), seed=4, image_size=32, counts=(2, 1, 1, 3, 2))
    da, db, dc = _tree_digest(a), _tree_digest(b), _tree_digest(c)
    assert da == db and len(da) >= 9 + 1
    assert da["train/good/000.png"] != dc["train/good/000.png"]


def test_ensure_synthetic_marker(tmp_path):
    root = str(tmp_path)
    assert D.ensure_synthetic(root, seed=0, image_size=32, counts=(2, 1, 1, 1, 1)) == "tray"
    p = os.path.join(root, "tray", "train", "good", "000.png")
    first = open(p, "rb").read()
    mtime = os.stat(p).st_mtime_ns
    D.ensure_synthetic(root, seed=0, image_size=32, counts=(2, 1, 1, 1, 1))
    assert os.stat(p).st_mtime_ns == mtime  # not regenerated
    D.ensure_synthetic(root, seed=1, image_size=32, counts=(3, 1, 1, 1, 1))
    assert open(p, "rb").read() != first
    assert len(D.list_records("synthetic", root, "tray", "train")) == 3
    marker = json.load(open(os.path.join(root, "tray", S.MARKER)))
    assert marker["seed"] == 1 and marker["counts"] == [3, 1, 1, 1, 1]
    assert not [d for d in os.listdir(root) if d.startswith(".")]  # no temp folders left
    other = tmp_path / "other"
    (other / "tray" / "train").mkdir(parents=True)
    with pytest.raises(D.DatasetError, match="refusing to overwrite"):
        D.ensure_synthetic(str(other), image_size=32, counts=(2, 1, 1, 1, 1))


def test_cli_and_figure(tmp_path):
    fig = tmp_path / "fig.png"
    assert S.main(["--out", str(tmp_path / "d"), "--size", "32", "--counts", "2,1,1,5,4",
                   "--figure", str(fig)]) == 0
    im = Image.open(fig)
    assert im.size[0] > 300 and im.size[1] > 200
