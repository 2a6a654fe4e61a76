"""kdjax.evaluate: category metrics, results.json / results.md, figures, TIFF export, resizing."""

import json
import math
import os

import numpy as np
import pytest
from PIL import Image

from kdjax import evaluate as E
from kdjax import metrics as M
from kdjax.data.types import GTRegion, Record


def _records(kinds, category="cat"):
    out = []
    counters = {}
    for k in kinds:
        defect = {"good": "good", "logical": "logical_anomalies",
                  "structural": "structural_anomalies"}.get(k, k)
        n = counters.get(defect, 0)
        counters[defect] = n + 1
        out.append(Record(image_path=f"/data/{category}/test/{defect}/{n:03d}.png",
                          category=category, split="test", defect_type=defect,
                          label=int(k != "good"),
                          anomaly_kind=k if k in ("logical", "structural") else None))
    return out


@pytest.fixture(scope="module")
def loco_case():
    rng = np.random.default_rng(0)
    kinds = ["good"] * 3 + ["logical"] * 3 + ["structural"] * 3
    records = _records(kinds)
    regions, maps = [], rng.normal(size=(9, 24, 24)).astype(np.float32)
    for i, k in enumerate(kinds):
        rs = []
        if k != "good":
            m = np.zeros((24, 24), bool)
            m[4 + i:10 + i, 3:12] = True
            rs.append(GTRegion(m, 0.5, True) if k == "logical" else GTRegion(m, 20, False))
            maps[i][m] += 1.0
        regions.append(rs)
    return records, maps, regions


def test_category_metrics_loco_and_ad(loco_case):
    records, maps, regions = loco_case
    out = E.category_metrics("synthetic", maps, records, regions=regions)
    kinds = [r.anomaly_kind for r in records]
    assert out == M.loco_metrics(maps, [r.label for r in records], kinds, regions)
    assert "au_spro_0.05_logical" in out and "structural_auroc" in out
    masks = np.zeros(maps.shape, np.uint8)
    for i, rs in enumerate(regions):
        for r in rs:
            masks[i] |= r.mask
    ad = E.category_metrics("mvtec_ad", maps, _records(["good"] * 3 + ["crack"] * 6),
                            masks=masks)
    assert set(ad) == {"image_auroc", "pixel_auroc", "au_pro", "au_pro_per_image", "f1_max"}
    only_img = E.category_metrics("folder", maps, _records(["good"] * 3 + ["x"] * 6))
    assert set(only_img) == {"image_auroc", "f1_max"}
    with pytest.raises(ValueError, match="one map per test record"):
        E.category_metrics("mvtec_ad", maps[:4], records, masks=masks)
    with pytest.raises(ValueError, match="Unknown dataset"):
        E.category_metrics("imagenet", maps, records)


def test_write_results_schema_nan_and_targets(tmp_path):
    cats = {"bottle": {"image_auroc": 0.99, "pixel_auroc": 0.97, "au_pro": float("nan")},
            "cable": {"image_auroc": 0.95, "pixel_auroc": 0.93, "au_pro": 0.91}}
    targets = {"bottle": {"image_auroc": 100.0, "au_pro": 96.6}, "mean": {"image_auroc": 98.5}}
    res = E.write_results(str(tmp_path), "rd4ad", "mvtec_ad", "wide_resnet50_2 (ImageNet)",
                          cats, targets=targets, extra={"targets_source": "RD4AD Table 1"})
    with open(tmp_path / "results.json") as f:
        text = f.read()
    assert "NaN" not in text
    data = json.loads(text)
    assert set(data) == {"method", "dataset", "teacher", "categories", "mean", "targets_source"}
    assert data["method"] == "rd4ad" and data["dataset"] == "mvtec_ad"
    assert data["categories"]["bottle"]["au_pro"] is None
    assert data["mean"]["au_pro"] == pytest.approx(0.91)  # NaN ignored
    assert data["mean"]["image_auroc"] == pytest.approx(0.97)
    assert math.isnan(res["categories"]["bottle"]["au_pro"])
    md = (tmp_path / "results.md").read_text()
    assert "percent" in md.lower()
    # ours beside the paper's: bottle image AUROC 99.0 then 100.0, mean 97.0 then 98.5
    assert "| bottle | 99.0 | 100.0 |" in md
    assert "| **mean** | 97.0 | 98.5 |" in md
    assert "96.6" in md and "n/a" in md
    with pytest.raises(ValueError, match="overwrite"):
        E.write_results(str(tmp_path), "m", "d", "t", cats, extra={"mean": 1})


def test_results_md_difference_per_category_and_mean(tmp_path):
    """Ours | paper | Δ (ours - paper in points, between the shown values) per metric,
    category and mean; the paper's mean over the same categories when only some ran."""
    cats = {"bottle": {"image_auroc": 0.9912, "au_pro": 0.9},
            "cable": {"image_auroc": 0.95, "au_pro": float("nan")}}
    targets = {"bottle": {"image_auroc": 100.0, "au_pro": 95.2},
               "cable": {"image_auroc": 93.5, "au_pro": 88.2},
               "grid": {"image_auroc": 99.7, "au_pro": 89.3},
               "mean": {"image_auroc": 97.7, "au_pro": 90.9}}
    res = E.write_results(str(tmp_path), "efficientad", "mvtec_ad", "pdn_small", cats,
                          targets=targets, extra={"notes": ["No ImageNet penalty."]})
    md = (tmp_path / "results.md").read_text()
    assert "| category | image_auroc | image_auroc *paper* | image_auroc Δ | f1_max" not in md
    assert "| category | image_auroc | image_auroc *paper* | image_auroc Δ |" in md
    assert "| bottle | 99.1 | 100.0 | -0.9 |" in md
    assert "| cable | 95.0 | 93.5 | +1.5 |" in md
    # Mean over bottle and cable: ours 97.1, the paper's over the same two (96.75 -> 96.8).
    assert "| **mean** | 97.1 | 96.8† | +0.3 |" in md
    assert "published mean is 97.7" in md
    # au_pro: cable undefined, so the mean is bottle's alone, beside the paper's bottle.
    assert "| bottle | 90.0 | 95.2 | -5.2 |" in md and "| cable | n/a | 88.2 |  |" in md
    assert "| **mean** | 90.0 | 95.2† | -5.2 |" in md
    assert "**Note:** No ImageNet penalty." in md
    assert json.loads((tmp_path / "results.json").read_text())["notes"] == [
        "No ImageNet penalty."]
    assert res["notes"] == ["No ImageNet penalty."]
    # Every category of the paper run: its published mean row, no footnote.
    cats["grid"] = {"image_auroc": 0.997, "au_pro": 0.893}
    cats["cable"]["au_pro"] = 0.88
    E.write_results(str(tmp_path), "efficientad", "mvtec_ad", "pdn_small", cats,
                    targets=targets)
    md = (tmp_path / "results.md").read_text()
    assert "| **mean** | 97.9 | 97.7 | +0.2 |" in md and "†" not in md
    assert E.fmt_difference(E.difference(0.9855, 98.5)) == "+0.1"  # 98.6 - 98.5 as shown
    assert E.fmt_difference(E.difference(0.98449, 98.4)) == "0.0"
    assert E.difference(float("nan"), 98.0) is None and E.fmt_difference(None) == ""


def test_paper_comparison_table():
    targets = {"bottle": {"image_auroc": 99.9, "au_pro": 95.2},
               "cable": {"image_auroc": 93.5, "au_pro": 88.2},
               "mean": {"image_auroc": 96.7, "au_pro": 91.7}}
    comp = E.paper_comparison({"bottle": {"image_auroc": 1.0, "au_pro": 0.95}}, targets)
    assert comp["metrics"] == ["image_auroc", "au_pro"] and comp["finished"] == ["bottle"]
    assert comp["categories"]["bottle"]["image_auroc"] == {"ours": 100.0, "paper": 99.9,
                                                           "difference": 0.1}
    assert comp["categories"]["cable"]["au_pro"]["ours"] is None
    assert comp["mean"]["au_pro"]["paper"] == pytest.approx(95.2)
    assert comp["mean"]["au_pro"]["paper_mean_of"] == 1
    md = "\n".join(E.paper_comparison_markdown(comp))
    assert "| bottle | 100.0 | 99.9 | +0.1 | 95.0 | 95.2 | -0.2 |" in md
    assert "| cable | not run | 93.5 |  | not run | 88.2 |  |" in md
    assert "| **mean** | 100.0 | 99.9† | +0.1 |" in md
    comp = E.paper_comparison({"bottle": {"image_auroc": 1.0, "au_pro": 0.95},
                               "cable": {"image_auroc": 0.9, "au_pro": 0.9}}, targets)
    assert comp["mean"]["image_auroc"] == {"ours": pytest.approx(95.0), "paper": 96.7,
                                           "paper_mean_of": None, "difference": -1.7}


def test_write_results_variants(tmp_path):
    a = {"c1": {"image_auroc": 0.8}, "c2": {"image_auroc": 0.6}}
    b = {"c1": {"image_auroc": 0.9}, "c2": {"image_auroc": float("nan")}}
    res = E.write_results(str(tmp_path), "efficientad", "mvtec_loco", "pdn", a,
                          variants={"default": a, "student_only": b})
    data = json.loads((tmp_path / "results.json").read_text())
    assert set(data["variants"]) == {"default", "student_only"}
    assert data["variants"]["student_only"]["mean"]["image_auroc"] == pytest.approx(0.9)
    assert data["variants"]["student_only"]["categories"]["c2"]["image_auroc"] is None
    assert data["mean"]["image_auroc"] == pytest.approx(0.7)
    md = (tmp_path / "results.md").read_text()
    assert "image_auroc [default]" in md and "image_auroc [student_only]" in md
    assert "| c1 | 80.0 | 90.0 |" in md
    assert res["variants"]["default"]["mean"]["image_auroc"] == pytest.approx(0.7)


def test_save_figures_are_pngs(tmp_path, loco_case):
    records, maps, regions = loco_case
    images = np.random.default_rng(1).integers(0, 255, (9, 48, 48, 3), dtype=np.uint8)
    labels = np.array([r.label for r in records])
    masks = np.zeros(maps.shape, np.uint8)
    for i, rs in enumerate(regions):
        for r in rs:
            masks[i] |= r.mask
    kinds = [r.anomaly_kind or "good" for r in records]
    paths = E.save_figures(str(tmp_path / "figures"), "cat", images, maps, labels,
                           maps.reshape(9, -1).max(1), masks=masks,
                           names=[os.path.basename(r.image_path) for r in records], num=4,
                           seed=0, kinds=kinds)
    assert len(paths) == 2
    for p in paths:
        with Image.open(p) as im:
            im.verify()
        with Image.open(p) as im:
            assert im.format == "PNG" and im.size[0] > 100
    # grayscale float images, no masks, no kinds, a single class
    paths = E.save_figures(str(tmp_path / "f2"), "c2", np.random.rand(3, 16, 16), maps[:3],
                           np.zeros(3), np.zeros(3), num=2)
    for p in paths:
        with Image.open(p) as im:
            im.verify()


def test_export_tiff_layout_and_values(tmp_path, loco_case):
    import tifffile

    records, maps, _ = loco_case
    paths = E.export_tiff(str(tmp_path / "anomaly_maps"), "cat", records, maps)
    expect = os.path.join(str(tmp_path), "anomaly_maps", "cat", "test", "logical_anomalies",
                          "001.tiff")
    assert expect in paths and os.path.isfile(expect)
    assert len(paths) == len(records)
    for p, m in zip(paths, maps):
        back = tifffile.imread(p)
        assert back.dtype == np.float32
        np.testing.assert_array_equal(back, m)
    # maps of different (original) sizes
    big = [np.random.rand(5, 7), np.random.rand(6, 4)]
    ps = E.export_tiff(str(tmp_path / "am2"), "cat", records[:2], big)
    np.testing.assert_allclose(tifffile.imread(ps[1]), big[1].astype(np.float32))


def _direct_bilinear(m, oh, ow):
    """Per-pixel bilinear sampling, torch align_corners=False: src = (i + 0.5) * in / out - 0.5."""
    h, w = m.shape
    out = np.zeros((oh, ow))
    for i in range(oh):
        sy = max((i + 0.5) * h / oh - 0.5, 0.0)
        y0 = min(int(np.floor(sy)), h - 1)
        y1 = min(y0 + 1, h - 1)
        fy = sy - y0
        for j in range(ow):
            sx = max((j + 0.5) * w / ow - 0.5, 0.0)
            x0 = min(int(np.floor(sx)), w - 1)
            x1 = min(x0 + 1, w - 1)
            fx = sx - x0
            out[i, j] = ((1 - fy) * ((1 - fx) * m[y0, x0] + fx * m[y0, x1])
                         + fy * ((1 - fx) * m[y1, x0] + fx * m[y1, x1]))
    return out


def test_resize_maps_against_direct_computation():
    rng = np.random.default_rng(2)
    maps = rng.random((2, 8, 6)).astype(np.float32)
    out = E.resize_maps(maps, (13, 20))
    assert out.shape == (2, 13, 20) and out.dtype == np.float32
    for k in range(2):
        np.testing.assert_allclose(out[k], _direct_bilinear(maps[k], 13, 20), atol=1e-5)
    down = E.resize_maps(maps, 4)
    np.testing.assert_allclose(down[1], _direct_bilinear(maps[1], 4, 4), atol=1e-5)
    assert E.resize_maps(maps, (8, 6)) is not None
    per = E.to_original_resolution(maps, [(11, 9), (5, 7)])
    assert isinstance(per, list) and per[0].shape == (11, 9) and per[1].shape == (5, 7)
    np.testing.assert_allclose(per[1], _direct_bilinear(maps[1], 5, 7), atol=1e-5)
    same = E.to_original_resolution(maps, [(10, 12), (10, 12)])
    assert isinstance(same, np.ndarray) and same.shape == (2, 10, 12)
    np.testing.assert_allclose(same[0], _direct_bilinear(maps[0], 10, 12), atol=1e-5)
