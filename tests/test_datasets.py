"""The datasets beyond MVTec AD / LOCO (VisA, MVTec AD 2, BTAD, MPDD), their descriptors, the
resize settings against direct PIL formulas, and the TFDS builders against the files reader.

Tiny fake trees from tests/conftest.py (make_visa, make_mvtec_ad2, make_btad, ...).
"""

from __future__ import annotations

import os
import shutil
import tarfile

import numpy as np
import pytest
from PIL import Image

import kdjax.data as D
from conftest import make_btad, make_loco, make_mvtec_ad, make_mvtec_ad2, make_visa


# ---------------------------------------------------------------------------
# Descriptors

def test_every_dataset_has_one_descriptor_and_the_engine_reads_it():
    from kdjax import evaluate
    from kdjax.errors import ConfigError

    assert set(D.DATASETS) == {"mvtec_ad", "mvtec_loco", "folder", "synthetic", "visa",
                               "mvtec_ad2", "btad", "mpdd"}
    for name in D.DATASETS:
        s = D.dataset_spec(name)
        assert s.name == name and s.ground_truth in ("masks", "loco_regions")
        assert s.splits[0] == "train" and "test" in s.splits
        assert s.url or s.name in ("folder", "synthetic")
    loco = [n for n in D.DATASETS if D.dataset_spec(n).has_validation_split]
    assert sorted(loco) == ["mvtec_ad2", "mvtec_loco", "synthetic"]
    assert D.dataset_spec("mvtec_ad2").folder_splits == (
        "train", "validation", "test_public", "test_private", "test_private_mixed")
    with pytest.raises(ConfigError, match="Unknown dataset 'nope'"):
        D.dataset_spec("nope")
    with pytest.raises(ValueError, match="Unknown dataset"):
        evaluate.category_metrics("nope", np.zeros((1, 4, 4)),
                                  [D.Record("x.png", "c", "test", "good", 0)])


# ---------------------------------------------------------------------------
# Readers

def test_visa_reader(mini_visa_root):
    train = D.list_records("visa", mini_visa_root, "candle", "train")
    test = D.list_records("visa", mini_visa_root, "candle", "test")
    assert len(train) == 6 and {(r.label, r.defect_type) for r in train} == {(0, "good")}
    assert [r.defect_type for r in test] == ["bent", "bent", "good", "good", "melt_scratch"]
    assert all(r.image_path.endswith(".JPG") for r in test)
    bad = [r for r in test if r.label]
    assert all(r.mask_paths[0].endswith(".png") and r.mask_threshold == 0 for r in bad)
    # class-id masks (values 1 and 2): a defect where non-zero
    raw = np.asarray(Image.open(bad[-1].mask_paths[0]))
    assert raw.max() == 2
    np.testing.assert_array_equal(D.load_masks(bad[-1:])[0], (raw > 0).astype(np.uint8))
    # no image_anno.csv: "bad"; another category's size
    pcb = D.list_records("visa", mini_visa_root, "pcb1", "test")
    assert {r.defect_type for r in pcb} == {"good", "bad"}
    with pytest.raises(D.DatasetError, match="no validation split"):
        D.list_records("visa", mini_visa_root, "candle", "validation")


def test_visa_reader_refusals(tmp_path):
    root = make_visa(tmp_path / "v")
    os.remove(os.path.join(root, "candle", "Data", "Images", "Anomaly", "001.JPG"))
    with pytest.raises(D.DatasetError, match="001.JPG is listed in .*1cls.csv but missing"):
        D.list_records("visa", root, "candle", "test")
    with pytest.raises(D.DatasetError, match="Category 'pcb1' not found .*found: candle"):
        D.list_records("visa", root, "pcb1", "train")
    os.makedirs(os.path.join(root, "pcb1", "Data", "Images"))
    with pytest.raises(D.DatasetError, match="lists no images of category 'pcb1'"):
        D.list_records("visa", root, "pcb1", "train")
    shutil.rmtree(os.path.join(root, "split_csv"))
    with pytest.raises(D.DatasetError, match="has no split_csv/1cls.csv.*spot-diff"):
        D.list_records("visa", root, "candle", "train")


def test_mvtec_ad2_reader(mini_mvtec_ad2_root):
    r = mini_mvtec_ad2_root
    assert len(D.list_records("mvtec_ad2", r, "can", "validation")) == 3
    test = D.list_records("mvtec_ad2", r, "can", "test")
    assert test == D.list_records("mvtec_ad2", r, "can", "test_public")
    assert {x.split for x in test} == {"test_public"}
    bad = [x for x in test if x.label == 1]
    assert [os.path.basename(x.mask_paths[0]) for x in bad] == [
        "000_regular_mask.png", "001_overexposed_mask.png", "002_regular_mask.png"]
    private = D.list_records("mvtec_ad2", r, "can", "test_private_mixed")
    assert [(x.label, x.defect_type, os.path.basename(x.image_path)) for x in private] == [
        (-1, "unknown", "000_mixed.png"), (-1, "unknown", "001_mixed.png")]
    assert D.has_masks(test + private)
    assert D.load_masks(private, 16).sum() == 0


def test_btad_and_mpdd_readers(tmp_path):
    root = make_btad(tmp_path / "btad")
    test = D.list_records("btad", root, "01", "test")
    assert [(x.defect_type, x.label) for x in test] == [("ko", 1)] * 3 + [("ok", 0)] * 2
    assert all(x.image_path.endswith(".bmp") and x.mask_paths[0].endswith(".png")
               for x in test if x.label)
    assert D.list_records("btad", root, "01", "train")[0].defect_type == "ok"
    os.remove(os.path.join(root, "01", "ground_truth", "ko", "0001.png"))
    with pytest.raises(D.DatasetError, match=r"No ground-truth mask .*0001.png"):
        D.list_records("btad", root, "01", "test")
    mpdd = make_mvtec_ad(tmp_path / "mpdd", "tubes")
    assert len(D.list_records("mpdd", mpdd, "tubes", "test")) == 4
    with pytest.raises(D.DatasetError, match="holds MVTec AD categories"):
        D.list_records("mpdd", make_mvtec_ad(tmp_path / "ad", "bottle"), "tubes", "test")


def test_a_dataset_of_another_layout_is_named(tmp_path, mini_mvtec_ad2_root, mini_visa_root):
    with pytest.raises(D.DatasetError, match="MVTec AD 2 layout.*dataset=mvtec_ad2"):
        D.list_records("mvtec_ad", mini_mvtec_ad2_root, "can", "train")
    with pytest.raises(D.DatasetError, match="holds MVTec AD 2 categories"):
        D.list_records("mvtec_ad", mini_mvtec_ad2_root, "bottle", "train")
    with pytest.raises(D.DatasetError, match="holds VisA categories"):
        D.list_records("mvtec_ad", mini_visa_root, "bottle", "train")


# ---------------------------------------------------------------------------
# Resizing: each setting against a direct PIL formula

def _nonsquare(tmp_path, h=30, w=50):
    rng = np.random.default_rng(3)
    img = (rng.random((h, w, 3)) * 255).astype(np.uint8)
    mask = np.zeros((h, w), np.uint8)
    mask[5:17, 9:40] = 255
    mask[20:, :] = (rng.random((h - 20, w)) > 0.6) * 255  # speckles: the filters differ
    ip, mp = str(tmp_path / "img.png"), str(tmp_path / "mask.png")
    Image.fromarray(img).save(ip)
    Image.fromarray(mask).save(mp)
    return ip, mp, D.Record(ip, "c", "test", "bad", 1, mask_paths=(mp,))


@pytest.mark.parametrize("image_filter,pil", [("bilinear", Image.BILINEAR),
                                              ("lanczos", Image.LANCZOS),
                                              ("bicubic", Image.BICUBIC),
                                              ("nearest", Image.NEAREST)])
def test_image_filter_is_the_pil_filter(tmp_path, image_filter, pil):
    ip, _, rec = _nonsquare(tmp_path)
    got = D.load_images([rec], 16, image_filter=image_filter)[0][0]
    want = np.asarray(Image.open(ip).convert("RGB").resize((16, 16), pil))
    np.testing.assert_array_equal(got, want)


def test_mask_resize_is_the_reference_formula(tmp_path):
    _, mp, rec = _nonsquare(tmp_path)
    m = Image.open(mp)
    # RD4AD: transforms.Resize((S, S)) (bilinear) + ToTensor + gt > 0.5
    want = (np.asarray(m.resize((16, 16), Image.BILINEAR)) / 255.0 > 0.5).astype(np.uint8)
    np.testing.assert_array_equal(D.load_masks([rec], 16)[0], want)
    # MRKD: T.Resize(S, Image.NEAREST) + ToTensor (+ gt > 0.5)
    want = (np.asarray(m.resize((16, 16), Image.NEAREST)) / 255.0 > 0.5).astype(np.uint8)
    np.testing.assert_array_equal(D.load_masks([rec], 16, mask_resize="nearest")[0], want)
    assert not np.array_equal(D.load_masks([rec], 16)[0], want)  # the two differ here


def test_pad_and_center_crop_are_the_pil_formulas(tmp_path):
    ip, mp, rec = _nonsquare(tmp_path, h=30, w=50)
    im = Image.open(ip).convert("RGB")
    padded = Image.new("RGB", (50, 50), 0)
    padded.paste(im, (0, 10))
    np.testing.assert_array_equal(D.load_images([rec], 20, resize="pad")[0][0],
                                  np.asarray(padded.resize((20, 20), Image.BILINEAR)))
    cropped = im.crop((10, 0, 40, 30))
    np.testing.assert_array_equal(D.load_images([rec], 20, resize="center_crop")[0][0],
                                  np.asarray(cropped.resize((20, 20), Image.BILINEAR)))
    m = Image.open(mp)
    pm = Image.new("L", (50, 50), 0)
    pm.paste(m, (0, 10))
    np.testing.assert_array_equal(D.load_masks([rec], 20, resize="pad", mask_resize="nearest")[0],
                                  (np.asarray(pm.resize((20, 20), Image.NEAREST)) > 127))
    np.testing.assert_array_equal(
        D.load_masks([rec], 20, resize="center_crop")[0],
        np.asarray(m.crop((10, 0, 40, 30)).resize((20, 20), Image.BILINEAR)) > 127)
    # square images are unchanged by the policy
    sq = tmp_path / "sq.png"
    Image.open(ip).convert("RGB").crop((0, 0, 30, 30)).save(sq)
    r = D.Record(str(sq), "c", "test", "good", 0)
    for policy in ("pad", "center_crop"):
        np.testing.assert_array_equal(D.load_images([r], 10, resize=policy)[0],
                                      D.load_images([r], 10)[0])


def test_maps_at_original_resolution_invert_the_policy():
    from kdjax.data import images

    m = np.arange(50 * 50, dtype=np.float32).reshape(50, 50)
    assert images.request_size((30, 50), "pad") == (50, 50)
    np.testing.assert_array_equal(images.restore_map(m, (30, 50), "pad"), m[10:40, :])
    assert images.request_size((30, 50), "center_crop") == (30, 30)
    c = m[:30, :30]
    out = images.restore_map(c, (30, 50), "center_crop")
    np.testing.assert_array_equal(out[:, 10:40], c)
    assert np.all(out[:, :10] == c.min()) and np.all(out[:, 40:] == c.min())
    assert images.request_size((30, 50), "stretch") == (30, 50)
    # pad -> resize -> back: the pixels come back where they were (PIL nearest keeps odd ones)
    img = (np.random.default_rng(0).random((30, 50)) * 255).astype(np.uint8)
    sq = images.square_array(img, "pad")
    small = np.asarray(Image.fromarray(sq).resize((25, 25), Image.NEAREST))
    back = np.asarray(Image.fromarray(small).resize((50, 50), Image.NEAREST))
    restored = images.restore_map(back, (30, 50), "pad")
    np.testing.assert_array_equal(restored[1::2, 1::2], img[1::2, 1::2])


def test_mrkd_config_uses_mrkd_resizing_and_defaults_stay():
    from kdjax.config import base_config, load_config

    c = load_config("mvtec_mrkd")
    assert (c.data.image_filter, c.data.mask_resize, c.data.resize) == (
        "lanczos", "nearest", "stretch")
    b = base_config()
    assert (b.data.image_filter, b.data.mask_resize, b.data.resize, b.data.source) == (
        "bilinear", "bilinear", "stretch", "files")
    assert D.Preprocess.from_config(load_config("mvtec_rd4ad")) == D.Preprocess()


# ---------------------------------------------------------------------------
# TFDS builders: examples equal what the files reader gives

FAKES = {
    "mvtec_ad": (lambda r: make_mvtec_ad(r, "bottle", size=(36, 52)), "bottle"),
    "mvtec_loco": (lambda r: make_loco(r), "breakfast_box"),
    "visa": (lambda r: make_visa(r, "candle"), "candle"),
    "mvtec_ad2": (lambda r: make_mvtec_ad2(r, "can"), "can"),
}


@pytest.mark.parametrize("dataset", sorted(FAKES))
def test_tfds_builder_equals_the_files_reader(dataset, tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    from kdjax.data import tfds_builders
    from kdjax.data.masks import _read_mask_array

    make, cat = FAKES[dataset]
    root = make(tmp_path / "raw")
    data_dir = str(tmp_path / "tfds")
    spec = D.dataset_spec(dataset)
    cfg = tfds.download.DownloadConfig(manual_dir=root)
    for split in spec.folder_splits:
        ds = tfds.load(f"{dataset}/{cat}", split=split, data_dir=data_dir,
                       download_and_prepare_kwargs={"download_config": cfg})
        examples = sorted(tfds.as_numpy(ds), key=lambda e: e["index"])
        want = D.list_records(dataset, root, cat, "test" if split == spec.test_split else split)
        assert len(examples) == len(want) > 0
        for ex, r in zip(examples, want):
            assert os.path.join(root, ex["filename"].decode()) == r.image_path
            assert (int(ex["label"]), ex["defect_type"].decode()) == (r.label, r.defect_type)
            np.testing.assert_array_equal(ex["image"], D.read_image(r.image_path))
            if spec.ground_truth == "masks":
                np.testing.assert_array_equal(
                    ex["mask"][..., 0] > 0, D.load_masks([r])[0] > 0 if r.mask_paths else
                    np.zeros(ex["image"].shape[:2], bool))
            else:
                regs = ex["regions"]
                assert [p.decode() for p in regs["filename"]] == [
                    os.path.relpath(g.mask_path, root) for g in r.regions]
                for k, g in enumerate(r.regions):
                    np.testing.assert_array_equal(regs["mask"][k][..., 0],
                                                  _read_mask_array(g.mask_path))
                    assert int(regs["pixel_value"][k]) == g.pixel_value
        # the engine's TFDS source: the same records, the same arrays (a non-default setting)
        src = D.open_source(_config(dataset, root, data_dir, "pad", "lanczos", "nearest"), root)
        files = D.open_source(_config(dataset, root, data_dir, "pad", "lanczos", "nearest",
                                      source="files"), root)
        kd = "test" if split == spec.test_split else split
        got = src.records(cat, kd)
        assert got == files.records(cat, kd)
        np.testing.assert_array_equal(src.images(got, 32)[0], files.images(want, 32)[0])
        if spec.ground_truth == "masks":
            np.testing.assert_array_equal(src.masks(got, 32), files.masks(want, 32))
        else:
            for a, b in zip(got, want):
                for ga, gb in zip(src.regions(a, 32), files.regions(b, 32)):
                    np.testing.assert_array_equal(ga.mask, gb.mask)
                    assert ga.saturation_threshold == gb.saturation_threshold
    if dataset == "mvtec_loco":
        info = tfds.builder(f"{dataset}/{cat}", data_dir=data_dir).info
        assert '"defect_name": "missing_item"' in info.metadata["defects_config"]
    text = tfds_builders.BUILDERS[dataset].MANUAL_DOWNLOAD_INSTRUCTIONS
    assert text.count("http") == 1 and spec.url in text and "manual_dir" in text


def _config(dataset, root, data_dir, resize="stretch", image_filter="bilinear",
            mask_resize="bilinear", source="tfds"):
    from kdjax.config import base_config

    c = base_config()
    c.data.dataset, c.data.root, c.data.tfds_dir, c.data.source = dataset, root, data_dir, source
    c.data.resize, c.data.image_filter, c.data.mask_resize = resize, image_filter, mask_resize
    return c


def test_tfds_builder_reads_an_archive_and_refuses_an_empty_manual_dir(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    from kdjax.data import tfds_builders

    raw = make_mvtec_ad(tmp_path / "raw" / "mvtec_anomaly_detection", "bottle")
    manual = tmp_path / "manual"
    manual.mkdir()
    with tarfile.open(manual / "bottle.tar.xz", "w:xz") as t:
        t.add(raw, arcname="mvtec_anomaly_detection")
    recs, blobs = tfds_builders.load_split("mvtec_ad", "bottle", "test", root=str(manual),
                                           data_dir=str(tmp_path / "tfds"))
    want = D.list_records("mvtec_ad", raw, "bottle", "test")
    assert [os.path.relpath(r.image_path, manual) for r in recs] == [
        os.path.relpath(r.image_path, raw) for r in want]
    assert all(not os.path.exists(r.image_path) for r in recs)  # served from TFDS
    D.files.register_blobs(blobs)
    try:
        np.testing.assert_array_equal(D.load_images(recs, 32)[0], D.load_images(want, 32)[0])
        np.testing.assert_array_equal(D.load_masks(recs, 32), D.load_masks(want, 32))
    finally:
        D.files.clear_blobs()
    # prepared: no manual directory needed any more
    again, _ = tfds_builders.load_split("mvtec_ad", "bottle", "test", root="",
                                        data_dir=str(tmp_path / "tfds"))
    assert [os.path.basename(r.image_path) for r in again] == [
        os.path.basename(r.image_path) for r in recs]
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("nothing here")
    with pytest.raises(D.DatasetError, match="holds no MVTec AD category 'bottle'.*mvtec-ad"):
        tfds_builders.load_split("mvtec_ad", "bottle", "train", root=str(empty),
                                 data_dir=str(tmp_path / "tfds2"))
    assert tfds.builder("mvtec_ad/bottle", data_dir=str(tmp_path / "tfds")).info.splits[
        "test"].num_examples == len(want)


def test_the_engine_reads_through_tfds_as_through_files(tmp_path, mini_mvtec_ad_root):
    """README: ``--config.data.source=tfds`` (manual download: the archive in data.root)
    gives the metrics that the files reader gives."""
    import json
    import subprocess
    import sys

    from kdjax.config import load_config
    from kdjax.experiment import train_and_evaluate

    manual = tmp_path / "manual"
    manual.mkdir()
    with tarfile.open(manual / "mvtec_anomaly_detection.tar.xz", "w:xz") as t:
        t.add(os.path.join(mini_mvtec_ad_root, "bottle"), arcname="mvtec/bottle")
    tiny = {"teacher.weights": "random", "teacher.allow_random": True, "train.steps": 2,
            "train.batch_size": 2, "train.steps_per_call": 2, "train.checkpoint_every": 2,
            "eval.batch_size": 4, "eval.num_figures": 0, "teacher.width_divisor": 16,
            "data.image_size": 32, "data.category": "bottle", "data.resize": "pad"}
    wd = str(tmp_path / "tfds_run")
    args = [f"--config.{k}={v}" for k, v in tiny.items()]
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p = subprocess.run(
        [sys.executable, "-m", "kdjax.main", "--config=configs/mvtec_rd4ad.py", f"--workdir={wd}",
         *args, "--config.data.source=tfds", f"--config.data.root={manual}",
         f"--config.data.tfds_dir={tmp_path / 'tfds'}"],
        cwd=repo, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
        timeout=900)
    assert p.returncode == 0, p.stderr[-4000:]
    got = json.load(open(os.path.join(wd, "results.json")))["categories"]["bottle"]
    c = load_config("mvtec_rd4ad", {**tiny, "data.root": mini_mvtec_ad_root})
    want = train_and_evaluate(c, str(tmp_path / "files_run"))["categories"]["bottle"]
    assert got == pytest.approx(want, abs=1e-6)


def test_btad_through_the_cli_with_center_crop_at_original_resolution(tmp_path):
    """README: a BTAD category with an RD4AD config; the maps of non-square images at their
    original size (eval.resolution=original) invert data.resize=center_crop, in the
    metrics and in --mode=predict --maps."""
    import glob
    import json
    import subprocess
    import sys

    import tifffile

    root = make_btad(tmp_path / "BTAD", "01", size=(36, 52))
    wd = str(tmp_path / "w")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    tiny = ["--config.teacher.weights=random", "--config.teacher.allow_random=True",
            "--config.train.steps=2", "--config.train.batch_size=2",
            "--config.train.steps_per_call=2", "--config.eval.batch_size=4",
            "--config.eval.num_figures=0", "--config.teacher.width_divisor=16",
            "--config.data.image_size=32"]
    cmd = [sys.executable, "-m", "kdjax.main", "--config=configs/mvtec_rd4ad.py",
           f"--workdir={wd}", "--config.data.dataset=btad", f"--config.data.root={root}",
           "--config.data.category=01", "--config.data.resize=center_crop",
           "--config.eval.resolution=original", *tiny]
    p = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-4000:]
    res = json.load(open(os.path.join(wd, "results.json")))
    assert res["dataset"] == "btad" and set(res["categories"]["01"]) >= {"image_auroc",
                                                                        "pixel_auroc"}
    out = str(tmp_path / "pred")
    p = subprocess.run([sys.executable, "-m", "kdjax.main", "--mode=predict", f"--workdir={wd}",
                        f"--input={os.path.join(root, '01', 'test')}", f"--output={out}",
                        "--maps"], cwd=repo, env=env, capture_output=True, text=True,
                       timeout=900)
    assert p.returncode == 0, p.stderr[-4000:]
    maps = sorted(glob.glob(os.path.join(out, "maps", "*.tiff")))
    assert len(maps) == 5
    m = tifffile.imread(maps[0])
    assert m.shape == (36, 52)
    # the 8-pixel borders the crop dropped hold the map's minimum
    assert np.all(m[:, :8] == m.min()) and np.all(m[:, 44:] == m.min())


def test_a_training_recorded_before_the_data_keys_existed_resumes(tmp_path):
    """checkpoints/<category>/training_config.json written before data.resize & co. existed:
    the defaults resume it, another value is refused; the source is not a training key."""
    import json

    from kdjax import checkpoints
    from kdjax.config import load_config
    from kdjax.errors import ConfigError

    c = load_config("mvtec_rd4ad")
    old = {k: v for k, v in checkpoints.training_keys(c).items()
           if k not in ("data.resize", "data.image_filter")}
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / checkpoints.TRAINING_CONFIG).write_text(json.dumps(old))
    with c.unlocked():
        c.data.source = "tfds"
    checkpoints.check_training_config(str(d), c)
    with c.unlocked():
        c.data.resize = "pad"
    with pytest.raises(ConfigError, match="data.resize: None -> 'pad'"):
        checkpoints.check_training_config(str(d), c)
