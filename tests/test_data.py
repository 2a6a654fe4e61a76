"""Dataset readers, masks, LOCO regions, error messages and the tf.data pipeline."""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import pytest
from PIL import Image

import kdjax.data as D
from conftest import make_folder, make_loco, make_mvtec_ad


# ---------------------------------------------------------------------------
# MVTec AD

def test_mvtec_ad_listing(mini_mvtec_ad_root):
    train = D.list_records("mvtec_ad", mini_mvtec_ad_root, "bottle", "train")
    test = D.list_records("mvtec_ad", mini_mvtec_ad_root, "bottle", "test")
    assert len(train) == 6 and all(r.label == 0 and r.split == "train" for r in train)
    assert [os.path.basename(r.image_path) for r in train] == [f"{i:03d}.png" for i in range(6)]
    assert [r.defect_type for r in test] == ["broken_large"] * 2 + ["contamination"] + ["good"] * 2
    assert [r.label for r in test] == [1, 1, 1, 0, 0]
    for r in test:
        if r.label:
            assert len(r.mask_paths) == 1
            assert os.path.dirname(r.mask_paths[0]).endswith(
                os.path.join("bottle", "ground_truth", r.defect_type))
            assert os.path.basename(r.mask_paths[0]) == \
                os.path.basename(r.image_path).replace(".png", "_mask.png")
        else:
            assert r.mask_paths == () and r.anomaly_kind is None
    # deterministic
    assert test == D.list_records("mvtec_ad", mini_mvtec_ad_root, "bottle", "test")


def test_mvtec_ad_images_and_masks(mini_mvtec_ad_root):
    test = D.list_records("mvtec_ad", mini_mvtec_ad_root, "bottle", "test")
    assert D.original_sizes(test) == [(40, 48)] * 5
    img = D.read_image(test[0].image_path)
    assert img.shape == (40, 48, 3) and img.dtype == np.uint8
    x, kept = D.load_images(test, 32)
    assert x.shape == (5, 32, 32, 3) and x.dtype == np.uint8 and kept == test
    ref = np.asarray(Image.fromarray(img).resize((32, 32), Image.BILINEAR))
    np.testing.assert_array_equal(x[0], ref)
    m = D.load_masks(test)
    assert m.shape == (5, 40, 48) and m.dtype == np.uint8
    assert set(np.unique(m)) <= {0, 1} and m[:3].sum(axis=(1, 2)).min() > 0
    assert m[3:].sum() == 0
    raw = np.asarray(Image.open(test[0].mask_paths[0]))
    np.testing.assert_array_equal(m[0], raw > 127)
    ms = D.load_masks(test, size=32)
    assert ms.shape == (5, 32, 32) and set(np.unique(ms)) <= {0, 1}
    expect = np.asarray(Image.fromarray(raw).resize((32, 32), Image.BILINEAR)) > 127
    np.testing.assert_array_equal(ms[0], expect)
    assert D.has_masks(test)


def test_grayscale_category(mini_mvtec_ad_root):
    recs = D.list_records("mvtec_ad", mini_mvtec_ad_root, "grid", "train")
    img = D.read_image(recs[0].image_path)
    assert img.shape == (32, 32, 3)
    assert (img[..., 0] == img[..., 1]).all() and (img[..., 1] == img[..., 2]).all()
    x, _ = D.load_images(recs, 64)
    assert x.shape == (6, 64, 64, 3)


def test_read_image_modes(tmp_path):
    rng = np.random.default_rng(0)
    rgb = (rng.random((9, 7, 3)) * 255).astype(np.uint8)
    Image.fromarray(rgb).convert("P").save(tmp_path / "p.png")
    rgba = np.concatenate([rgb, np.full((9, 7, 1), 100, np.uint8)], -1)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    g16 = (rng.random((9, 7)) * 65535).astype(np.uint16)
    Image.fromarray(g16).save(tmp_path / "g16.png")
    Image.fromarray(rgb[..., 0] > 128).save(tmp_path / "bw.png")
    Image.fromarray(rgb).save(tmp_path / "x.tif")
    assert D.read_image(str(tmp_path / "p.png")).shape == (9, 7, 3)
    np.testing.assert_array_equal(D.read_image(str(tmp_path / "rgba.png")), rgb)
    np.testing.assert_array_equal(D.read_image(str(tmp_path / "g16.png"))[..., 1],
                                  (g16 >> 8).astype(np.uint8))
    assert set(np.unique(D.read_image(str(tmp_path / "bw.png")))) <= {0, 255}
    np.testing.assert_array_equal(D.read_image(str(tmp_path / "x.tif")), rgb)


def test_corrupt_images(tmp_path, caplog):
    root = make_mvtec_ad(tmp_path, "bottle", n_train=4)
    folder = os.path.join(root, "bottle", "train", "good")
    good = open(os.path.join(folder, "001.png"), "rb").read()
    with open(os.path.join(folder, "001.png"), "wb") as f:
        f.write(good[: len(good) // 2])  # truncated
    with open(os.path.join(folder, "002.png"), "w") as f:
        f.write("not an image")
    recs = D.list_records("mvtec_ad", root, "bottle", "train")
    with pytest.raises(D.ImageError, match="001.png") as e:
        D.read_image(recs[1].image_path)
    assert isinstance(e.value, ValueError) and "on_corrupt=skip" in str(e.value)
    with pytest.raises(D.ImageError, match="002.png"):
        D.read_image(recs[2].image_path)
    with pytest.raises(D.ImageError, match="00[12].png"):
        D.load_images(recs, 16)
    with caplog.at_level(logging.WARNING, logger="kdjax.data"):
        x, kept = D.load_images(recs, 16, on_corrupt="skip")
    assert x.shape == (2, 16, 16, 3) and kept == [recs[0], recs[3]]
    assert "001.png" in caplog.text and "002.png" in caplog.text


def test_mask_size_mismatch(tmp_path):
    root = make_mvtec_ad(tmp_path, "bottle")
    rec = [r for r in D.list_records("mvtec_ad", root, "bottle", "test") if r.label][0]
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(rec.mask_paths[0])
    with pytest.raises(D.DatasetError) as e:
        D.load_masks([rec])
    msg = str(e.value)
    assert rec.mask_paths[0] in msg and rec.image_path in msg and "10x10" in msg and "48x40" in msg


def test_validation_split(mini_mvtec_ad_root):
    with pytest.raises(D.DatasetError, match="split_train_val"):
        D.list_records("mvtec_ad", mini_mvtec_ad_root, "bottle", "validation")
    recs = [D.Record(f"/x/{i:03d}.png", "c", "train", "good", 0) for i in range(50)]
    tr, va = D.split_train_val(recs, 0.1, seed=0)
    assert len(tr) == 45 and len(va) == 5 and all(r.split == "validation" for r in va)
    assert sorted(r.image_path for r in tr + va) == [r.image_path for r in recs]
    assert D.split_train_val(recs, 0.1, seed=0) == (tr, va)
    assert D.split_train_val(recs, 0.1, seed=1)[1] != va
    assert tr == sorted(tr, key=lambda r: r.image_path)


# ---------------------------------------------------------------------------
# MVTec LOCO AD

def test_loco_listing_and_regions(mini_loco_root):
    root, cat = mini_loco_root, "breakfast_box"
    assert len(D.list_records("mvtec_loco", root, cat, "train")) == 5
    val = D.list_records("mvtec_loco", root, cat, "validation")
    assert len(val) == 3 and all(r.split == "validation" for r in val)
    test = D.list_records("mvtec_loco", root, cat, "test")
    assert [r.defect_type for r in test] == (["good"] * 2 + ["logical_anomalies"] * 2
                                             + ["structural_anomalies"] * 2)
    assert [r.anomaly_kind for r in test] == [None] * 2 + ["logical"] * 2 + ["structural"] * 2
    assert [len(r.regions) for r in test] == [0, 0, 1, 2, 1, 2]
    log1 = test[3]
    assert [s.pixel_value for s in log1.regions] == [255, 200]
    abs_spec, rel_spec = log1.regions
    assert abs_spec.defect_name == "missing_item" and abs_spec.relative_saturation is False
    assert isinstance(abs_spec.saturation_threshold, int) and abs_spec.saturation_threshold == 120
    assert rel_spec.relative_saturation is True and rel_spec.saturation_threshold == 1.0
    assert test[5].regions[1].saturation_threshold == 0.5
    regions = D.load_regions(log1)
    assert len(regions) == 2 and all(g.mask.dtype == bool and g.mask.shape == (36, 52)
                                     for g in regions)
    raw = np.asarray(Image.open(log1.regions[0].mask_path))
    np.testing.assert_array_equal(regions[0].mask, raw == 255)
    assert regions[0].saturation_threshold == 120 and not regions[0].relative_saturation
    small = D.load_regions(log1, size=16)
    ref = np.asarray(Image.fromarray(raw).resize((16, 16), Image.NEAREST)) > 0
    np.testing.assert_array_equal(small[0].mask, ref)
    assert D.load_regions(test[0]) == []
    union = D.load_masks(test)
    assert union.shape == (6, 36, 52)
    np.testing.assert_array_equal(union[3], regions[0].mask | regions[1].mask)
    assert union[:2].sum() == 0
    u16 = D.load_masks(test, size=16)
    np.testing.assert_array_equal(u16[3], small[0].mask | small[1].mask)


def test_loco_missing_defects_config(tmp_path):
    root = make_loco(tmp_path, config=False)
    assert len(D.list_records("mvtec_loco", root, "breakfast_box", "train")) == 5
    with pytest.raises(D.DatasetError, match="defects_config.json"):
        D.list_records("mvtec_loco", root, "breakfast_box", "test")


def test_loco_unknown_pixel_value(tmp_path):
    root = make_loco(tmp_path)
    bad = os.path.join(root, "breakfast_box", "ground_truth", "logical_anomalies", "001",
                       "001.png")
    m = np.asarray(Image.open(bad)).copy()
    m[m > 0] = 77
    Image.fromarray(m).save(bad)
    with pytest.raises(D.DatasetError) as e:
        D.list_records("mvtec_loco", root, "breakfast_box", "test")
    assert bad in str(e.value) and "77" in str(e.value)


def test_loco_bad_saturation_type(tmp_path):
    root = make_loco(tmp_path)
    path = os.path.join(root, "breakfast_box", "defects_config.json")
    cfg = json.load(open(path))
    cfg[0]["saturation_threshold"] = 0.5  # absolute threshold must be an int
    json.dump(cfg, open(path, "w"))
    with pytest.raises(D.DatasetError, match="missing_item.*int"):
        D.list_records("mvtec_loco", root, "breakfast_box", "test")


# ---------------------------------------------------------------------------
# Errors about roots and layouts

def test_missing_root(tmp_path):
    missing = str(tmp_path / "nope")
    with pytest.raises(D.DatasetError) as e:
        D.list_records("mvtec_ad", missing, "bottle", "train")
    msg = str(e.value)
    assert missing in msg and "MVTec AD" in msg and D.DATASET_URL in msg
    assert "--config.data.root=" in msg and "ground_truth/<defect_type>/000_mask.png" in msg
    with pytest.raises(D.DatasetError, match="(?s)MVTec LOCO AD.*defects_config.json"):
        D.list_records("mvtec_loco", "", "breakfast_box", "train")
    with pytest.raises(D.DatasetError, match="ensure_synthetic"):
        D.list_records("synthetic", missing, "tray", "train")


def test_wrong_dataset_layout(mini_loco_root, mini_mvtec_ad_root, tmp_path):
    with pytest.raises(D.DatasetError, match="LOCO.*dataset=mvtec_loco"):
        D.list_records("mvtec_ad", mini_loco_root, "breakfast_box", "train")
    with pytest.raises(D.DatasetError, match="MVTec AD layout.*dataset=mvtec_ad"):
        D.list_records("mvtec_loco", mini_mvtec_ad_root, "bottle", "train")
    # asking for an AD category in a LOCO root
    with pytest.raises(D.DatasetError, match="holds MVTec LOCO AD categories"):
        D.list_records("mvtec_ad", mini_loco_root, "bottle", "train")
    with pytest.raises(D.DatasetError, match="holds MVTec AD categories"):
        D.list_records("mvtec_loco", mini_mvtec_ad_root, "pushpins", "train")


def test_root_one_level_off(tmp_path):
    deep = tmp_path / "download"
    make_mvtec_ad(deep / "mvtec_anomaly_detection", "bottle")
    with pytest.raises(D.DatasetError) as e:
        D.list_records("mvtec_ad", str(deep), "bottle", "train")
    assert "one level deeper" in str(e.value)
    assert f"--config.data.root={deep / 'mvtec_anomaly_detection'}" in str(e.value)
    shallow = str(deep / "mvtec_anomaly_detection" / "bottle")
    with pytest.raises(D.DatasetError) as e:
        D.list_records("mvtec_ad", shallow, "bottle", "train")
    assert "itself a category folder" in str(e.value)
    assert f"--config.data.root={deep / 'mvtec_anomaly_detection'}" in str(e.value)
    # doubled folder from extraction: <root>/bottle/bottle/train
    dbl = tmp_path / "dbl"
    make_mvtec_ad(dbl / "bottle", "bottle")
    with pytest.raises(D.DatasetError, match="one level\\s+deeper"):
        D.list_records("mvtec_ad", str(dbl), "bottle", "train")


def test_unknown_and_empty_category(tmp_path):
    root = make_mvtec_ad(tmp_path, "bottle")
    with pytest.raises(D.DatasetError, match="'cable' not found.*found: bottle"):
        D.list_records("mvtec_ad", root, "cable", "train")
    os.makedirs(os.path.join(root, "cable", "train", "good"))
    with pytest.raises(D.DatasetError, match="holds no images.*'cable'"):
        D.list_records("mvtec_ad", root, "cable", "train")
    with pytest.raises(D.DatasetError, match="Unknown split"):
        D.list_records("mvtec_ad", root, "bottle", "val")


def test_non_image_files(tmp_path, caplog):
    root = make_mvtec_ad(tmp_path, "bottle", n_train=3)
    folder = os.path.join(root, "bottle", "train", "good")
    for name in (".DS_Store", "Thumbs.db", "._000.png"):
        open(os.path.join(folder, name), "w").write("x")
    with caplog.at_level(logging.WARNING, logger="kdjax.data"):
        recs = D.list_records("mvtec_ad", root, "bottle", "train")
    assert len(recs) == 3 and caplog.text == ""
    open(os.path.join(folder, "notes.txt"), "w").write("x")
    with caplog.at_level(logging.WARNING, logger="kdjax.data"):
        recs = D.list_records("mvtec_ad", root, "bottle", "train")
    assert len(recs) == 3 and "notes.txt" in caplog.text


def test_missing_ad_mask(tmp_path):
    root = make_mvtec_ad(tmp_path, "bottle")
    os.remove(os.path.join(root, "bottle", "ground_truth", "crack", "001_mask.png"))
    with pytest.raises(D.DatasetError, match="001_mask.png"):
        D.list_records("mvtec_ad", root, "bottle", "test")


def test_folder_dataset(tmp_path):
    root = make_folder(tmp_path, "widgets", masks=False)
    test = D.list_records("folder", root, "widgets", "test")
    assert [r.label for r in test] == [1, 1, 0, 0] and all(not r.mask_paths for r in test)
    assert not D.has_masks(test)
    assert D.load_masks(test[2:]).sum() == 0
    with pytest.raises(D.DatasetError, match="no ground-truth mask"):
        D.load_masks(test)
    with pytest.raises(D.DatasetError, match="split_train_val"):
        D.list_records("folder", root, "widgets", "validation")
    root2 = make_folder(tmp_path / "m", "widgets", masks=True)
    assert D.has_masks(D.list_records("folder", root2, "widgets", "test"))


# ---------------------------------------------------------------------------
# tf.data pipeline

@pytest.fixture(scope="module")
def pipeline_records(mini_mvtec_ad_root, tmp_path_factory):
    recs = (D.list_records("mvtec_ad", mini_mvtec_ad_root, "bottle", "test")
            + D.list_records("mvtec_ad", mini_mvtec_ad_root, "grid", "train")[:3])
    extra = tmp_path_factory.mktemp("odd")
    rng = np.random.default_rng(3)
    g16 = (rng.random((20, 30)) * 65535).astype(np.uint16)
    Image.fromarray(g16).save(extra / "g16.png")
    Image.fromarray((rng.random((20, 30, 3)) * 255).astype(np.uint8)).convert("P").save(
        extra / "pal.png")
    recs += [D.Record(str(extra / n), "odd", "test", "good", 0) for n in ("g16.png", "pal.png")]
    return recs


def test_stream_gives_the_readers_images_in_the_asked_order(pipeline_records, tmp_path):
    """The streaming pipeline decodes with the reader's own code: the images equal
    load_images exactly, in the order and batch sizes asked (16-bit and palette files
    included), from the files and from the data.cache ArrayRecord file alike."""
    from kdjax.data import images as images_lib
    from kdjax.data.pipeline import ImageSet, batch_stream, build_cache

    recs = pipeline_records
    ref, _ = D.load_images(recs, 24)
    steps = [np.array([3, 0, 5]), np.array([1]), np.array([len(recs) - 1, 2])]
    for cached in (False, True):
        s = ImageSet([r.image_path for r in recs], 24, lambda p: images_lib.load_one(p, 24),
                     name="train", describe="stretch bilinear")
        if cached:
            path = build_cache(s, str(tmp_path))
            again = ImageSet(s.paths, 24, None, name="train", describe="stretch bilinear")
            assert build_cache(again, str(tmp_path)) == path  # found, not rewritten
        extra = ImageSet(s.paths[:2], 24, lambda p: images_lib.load_one(p, 24), name="x")
        got = list(batch_stream(iter([(i, {"x": np.array([1, 0])}) for i in steps]), s,
                                {"x": extra}))
        assert [g[0].shape[0] for g in got] == [3, 1, 2]
        for (batch, ex), idx in zip(got, steps):
            np.testing.assert_array_equal(batch, ref[idx])
            np.testing.assert_array_equal(ex["x"], ref[[1, 0]])
    # another preprocessing is another cache file
    other = ImageSet(s.paths, 24, lambda p: images_lib.load_one(p, 24, "pad"), name="train",
                     describe="pad bilinear")
    assert build_cache(other, str(tmp_path)) != path


def test_import_is_light():
    import subprocess
    import sys

    code = ("import sys, kdjax.data; "
            "bad = [m for m in ('tensorflow', 'jax', 'torch') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
