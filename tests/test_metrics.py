"""kdjax.metrics against slow, obviously correct references (loops over thresholds).

Small maps (32x32, few images) with several regions per image, overlapping
and touching regions, an all-good subset, ties (quantized maps) and constant
maps. The exact metrics must equal the references within 1e-4.
"""

import logging

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import auc as sk_auc
from sklearn.metrics import roc_auc_score

from kdjax import metrics as M
from kdjax.data.types import GTRegion

TOL = 1e-4
MAX_DIFF = {"value": 0.0}  # largest difference seen, printed at the end of the module


def _close(a, b):
    MAX_DIFF["value"] = max(MAX_DIFF["value"], abs(a - b))
    assert abs(a - b) <= TOL, (a, b)


# ---------------------------------------------------------------------------
# Slow references
# ---------------------------------------------------------------------------

def ref_trapezoid(x, y, x_max):
    """The official MVTec trapezoid rule, written as a plain loop."""
    area = 0.0
    for i in range(1, len(x)):
        if x[i] <= x_max:
            area += 0.5 * (y[i] + y[i - 1]) * (x[i] - x[i - 1])
        else:
            if x[i - 1] < x_max:
                y_at = y[i - 1] + (y[i] - y[i - 1]) * (x_max - x[i - 1]) / (x[i] - x[i - 1])
                area += 0.5 * (y_at + y[i - 1]) * (x_max - x[i - 1])
            break
    return area


def ref_au_pro(masks, maps, limit=0.3):
    """Dataset-level PRO: every distinct score as threshold (map >= t), per-component loop."""
    comps = []
    for i, m in enumerate(masks):
        lab, n = ndimage.label(m > 0, structure=np.ones((3, 3)))
        for c in range(1, n + 1):
            comps.append((i, lab == c))
    good = masks == 0
    xs, ys = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        pred = maps >= t
        xs.append((pred & good).sum() / good.sum())
        ys.append(np.mean([pred[i][c].sum() / c.sum() for i, c in comps]))
    xs.append(1.0)
    ys.append(1.0)
    return ref_trapezoid(xs, ys, limit) / limit


def ref_au_spro(maps, regions, limits):
    """sPRO with map > t for t in every distinct score and -inf, per-region loop."""
    maps = np.asarray(maps, dtype=np.float64)
    ok = np.ones(maps.shape, bool)
    regs = []
    for i, rs in enumerate(regions):
        for r in rs:
            ok[i] &= ~r.mask
            n = r.mask.sum()
            s = int(r.saturation_threshold * n) if r.relative_saturation else min(
                r.saturation_threshold, n)
            regs.append((i, r.mask, max(s, 1)))
    thresholds = list(np.unique(maps)[::-1]) + [-np.inf]
    xs, ys = [], []
    for t in thresholds:
        pred = maps > t
        xs.append((pred & ok).sum() / ok.sum())
        ys.append(np.mean([min(pred[i][m].sum() / s, 1.0) for i, m, s in regs]))
    return {f: ref_trapezoid(xs, ys, f) / f for f in limits}


def ref_rd4ad_pro(mask, amap, num_th=200):
    """A literal transcription of hq-deng/RD4AD test.py compute_pro (one image)."""
    masks, amaps = mask[None].astype(int), amap[None]
    min_th, max_th = amaps.min(), amaps.max()
    delta = (max_th - min_th) / num_th
    pros_all, fprs = [], []
    for th in np.arange(min_th, max_th, delta):
        binary = amaps > th
        pros = []
        for b, m in zip(binary, masks):
            lab, n = ndimage.label(m, structure=np.ones((3, 3)))
            for c in range(1, n + 1):
                pros.append(b[lab == c].sum() / (lab == c).sum())
        inv = 1 - masks
        fprs.append(np.logical_and(inv, binary).sum() / inv.sum())
        pros_all.append(np.mean(pros))
    fprs, pros_all = np.array(fprs), np.array(pros_all)
    keep = fprs < 0.3
    f = fprs[keep] / fprs[keep].max()
    return sk_auc(f, pros_all[keep])


def ref_f1_max(labels, scores):
    best = 0.0
    for t in np.unique(scores):
        pred = scores >= t
        tp = (pred & (labels == 1)).sum()
        fp = (pred & (labels == 0)).sum()
        fn = (~pred & (labels == 1)).sum()
        if tp:
            best = max(best, 2 * tp / (2 * tp + fp + fn))
    return best


# ---------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------

def _masks(rng, n_img, size=32):
    """Good images, then images with 1-3 rectangles (some touching diagonally)."""
    masks = np.zeros((n_img, size, size), np.uint8)
    for i in range(n_img // 3, n_img):
        for _ in range(rng.integers(1, 4)):
            y, x = rng.integers(0, size - 6, 2)
            h, w = rng.integers(2, 8, 2)
            masks[i, y:y + h, x:x + w] = 1
    # two components touching only at a corner: one 8-connected component
    masks[-1, 0:3, 0:3] = 1
    masks[-1, 3:5, 3:5] = 1
    return masks


def _maps(rng, masks, quantize=None):
    maps = rng.normal(size=masks.shape) + 1.5 * masks * rng.random(masks.shape)
    maps = ndimage.uniform_filter(maps, size=(1, 3, 3))
    if quantize:
        maps = np.round(maps * quantize) / quantize  # many ties
    return maps.astype(np.float32)


def _regions(rng, n_img, size=32):
    """LOCO-like regions: overlapping and touching, absolute and relative saturation."""
    regions = []
    for i in range(n_img):
        if i < n_img // 3:
            regions.append([])
            continue
        rs = []
        for j in range(rng.integers(1, 4)):
            m = np.zeros((size, size), bool)
            y, x = rng.integers(0, size - 10, 2)
            h, w = rng.integers(3, 10, 2)
            m[y:y + h, x:x + w] = True
            if j == 1:  # a region made of two separate blobs (no components in sPRO)
                m[-3:, -3:] = True
            if rng.random() < 0.5:
                rs.append(GTRegion(m, float(rng.choice([0.3, 0.5, 1.0])), True))
            else:
                rs.append(GTRegion(m, int(rng.integers(5, 60)), False))
        if i == n_img - 1 and rs:  # an overlapping copy of the first region
            m2 = np.roll(rs[0].mask, 2, axis=1)
            rs.append(GTRegion(m2, 1.0, True))
        regions.append(rs)
    return regions


def _region_union(regions, shape):
    out = np.zeros(shape, np.uint8)
    for i, rs in enumerate(regions):
        for r in rs:
            out[i] |= r.mask
    return out


# ---------------------------------------------------------------------------
# Comparisons with the references
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("seed,quantize", [(0, None), (1, 4), (2, 1)])
def test_au_pro_matches_reference(seed, quantize):
    rng = np.random.default_rng(seed)
    masks = _masks(rng, 6)
    maps = _maps(rng, masks, quantize)
    for limit in (0.05, 0.3, 1.0):
        _close(M.au_pro(masks, maps, limit), ref_au_pro(masks, maps, limit))


@pytest.mark.parametrize("seed,quantize", [(0, None), (3, 3)])
def test_pixel_auroc_and_f1_match_sklearn_and_loop(seed, quantize):
    rng = np.random.default_rng(seed)
    masks = _masks(rng, 6)
    maps = _maps(rng, masks, quantize)
    _close(M.pixel_auroc(masks, maps), roc_auc_score(masks.ravel(), maps.ravel()))
    labels = np.array([0, 0, 1, 1, 0, 1, 1, 0])
    scores = np.round(rng.random(8) * 3) if quantize else rng.random(8)
    _close(M.f1_max(labels, scores), ref_f1_max(labels, scores))
    _close(M.image_auroc(labels, scores), roc_auc_score(labels, scores))


@pytest.mark.parametrize("seed,quantize", [(0, None), (1, 2)])
def test_au_spro_matches_reference(seed, quantize):
    rng = np.random.default_rng(seed)
    regions = _regions(rng, 6)
    maps = _maps(rng, _region_union(regions, (6, 32, 32)), quantize)
    ours = M.au_spro(maps, regions)
    ref = ref_au_spro(maps, regions, M.SPRO_FPR_LIMITS)
    assert set(ours) == set(M.SPRO_FPR_LIMITS)
    for f in M.SPRO_FPR_LIMITS:
        _close(ours[f], ref[f])


def test_au_pro_per_image_matches_rd4ad_transcription():
    rng = np.random.default_rng(4)
    masks = _masks(rng, 5)
    maps = _maps(rng, masks)
    labels = (masks.reshape(5, -1).max(1) > 0).astype(int)
    refs = [ref_rd4ad_pro(masks[i], maps[i]) for i in np.flatnonzero(labels)]
    _close(M.au_pro_per_image(masks, maps, labels), float(np.mean(refs)))
    # and on float64 maps with ties
    m64 = np.round(maps.astype(np.float64) * 3) / 3
    _close(M.rd4ad_compute_pro(masks[-1][None], m64[-1][None]), ref_rd4ad_pro(masks[-1], m64[-1]))


def test_constant_maps():
    rng = np.random.default_rng(5)
    masks = _masks(rng, 4)
    maps = np.full(masks.shape, 0.7, np.float32)
    # a constant map predicts everything or nothing: the curve is the diagonal
    _close(M.au_pro(masks, maps, 0.3), ref_au_pro(masks, maps, 0.3))
    _close(M.au_pro(masks, maps, 0.3), 0.15)
    regions = _regions(rng, 4)
    spro = M.au_spro(np.full((4, 32, 32), 2.0), regions, (0.05, 1.0))
    _close(spro[0.05], 0.025)
    _close(spro[1.0], 0.5)
    assert np.isnan(M.au_pro_per_image(masks, maps))
    _close(M.pixel_auroc(masks, maps), 0.5)


# ---------------------------------------------------------------------------
# Hand-computed cases
# ---------------------------------------------------------------------------

def test_perfect_and_inverted_maps():
    rng = np.random.default_rng(6)
    masks = _masks(rng, 6)
    perfect = masks.astype(np.float32) + 0.01 * rng.random(masks.shape).astype(np.float32)
    assert M.au_pro(masks, perfect) == pytest.approx(1.0, abs=1e-9)
    assert M.pixel_auroc(masks, perfect) == pytest.approx(1.0)
    assert M.au_pro(masks, -perfect) == pytest.approx(0.0, abs=1e-9)
    assert M.pixel_auroc(masks, -perfect) == pytest.approx(0.0)
    regions = _regions(rng, 6)
    union = _region_union(regions, masks.shape).astype(np.float32)
    spro = M.au_spro(union, regions)
    for f in M.SPRO_FPR_LIMITS:
        assert spro[f] == pytest.approx(1.0, abs=1e-9)
    inv = M.au_spro(-union, regions, (0.3,))
    assert inv[0.3] == pytest.approx(0.0, abs=1e-9)
    labels = np.array([0, 0, 1, 1])
    assert M.image_auroc(labels, [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert M.image_auroc(labels, [0.9, 0.8, 0.2, 0.1]) == 0.0
    assert M.f1_max(labels, [0.1, 0.2, 0.8, 0.9]) == 1.0


def test_single_region_known_saturation():
    """One good image (FPR axis) and one region of 20 pixels saturating at 10 pixels.

    Map: region pixels 1..20 (distinct), defect-free pixels all 0. For
    t >= 0 no false positive; the region reaches sPRO = 1 once 10 of its
    pixels are above t, i.e. at FPR 0. So AU-sPRO = 1 for every limit. With
    relative saturation 0.5 (int(0.5 * 20) = 10) the same.
    """
    m = np.zeros((8, 8), bool)
    m[2:6, 1:6] = True  # 20 pixels
    amap = np.zeros((8, 8))
    amap[m] = np.arange(1, 21)
    maps = np.stack([np.zeros((8, 8)), amap])
    for reg in (GTRegion(m, 10, False), GTRegion(m, 0.5, True)):
        out = M.au_spro(maps, [[], [reg]], (0.05, 1.0))
        assert out[0.05] == pytest.approx(1.0)
    # Now the region scores BELOW the background: half the region (its 10 best
    # pixels) is needed, which only happens after every defect-free pixel is
    # predicted (FPR = 1). Curve: (0,0) -> (1,0) -> (1,1): area 0.
    out = M.au_spro(maps * 0 - amap[None] * np.array([0, 1])[:, None, None],
                    [[], [GTRegion(m, 10, False)]], (0.3, 1.0))
    assert out[0.3] == pytest.approx(0.0) and out[1.0] == pytest.approx(0.0)
    # Saturation at 40 > |R| = 20: s = min(40, 20) = 20, and relative 1.0 -> 20.
    half = amap.copy()
    half[m] = np.where(amap[m] > 10, 5.0, -5.0)  # 10 region pixels above 0, 10 below
    maps2 = np.stack([np.zeros((8, 8)), half])
    # t in [0, 5): sPRO = 10/20 at FPR 0; t < -5... FPR jumps to 1 at t < 0.
    out = M.au_spro(maps2, [[], [GTRegion(m, 40, False)]], (0.3,))
    assert out[0.3] == pytest.approx(0.5)


def test_all_good_subset_and_missing_classes(caplog):
    rng = np.random.default_rng(7)
    maps = rng.random((3, 16, 16))
    with caplog.at_level(logging.WARNING):
        out = M.au_spro(maps, [[], [], []], (0.05,))
        assert np.isnan(out[0.05])
        assert np.isnan(M.image_auroc([0, 0, 0], [0.1, 0.2, 0.3]))
        assert np.isnan(M.image_auroc([1, 1], [0.1, 0.2]))
        assert np.isnan(M.au_pro(np.zeros((3, 16, 16)), maps))
        assert np.isnan(M.pixel_auroc(np.zeros((3, 16, 16)), maps))
        assert np.isnan(M.f1_max([0, 0], [0.1, 0.2]))
    text = caplog.text
    assert "no anomalous image" in text and "no good image" in text
    assert "no ground-truth region" in text


def test_loco_metrics_bundle_and_names():
    rng = np.random.default_rng(8)
    n = 9
    regions = _regions(rng, n)
    kinds = [None] * 3 + ["logical"] * 3 + ["structural"] * 3
    labels = [0] * 3 + [1] * 6
    maps = _maps(rng, _region_union(regions, (n, 32, 32)))
    out = M.loco_metrics(maps, labels, kinds, regions)
    for f in ("0.01", "0.05", "0.1", "0.3", "1.0"):
        for s in ("", "_logical", "_structural"):
            assert f"au_spro_{f}{s}" in out
        assert out[f"au_spro_{f}"] == pytest.approx(
            0.5 * (out[f"au_spro_{f}_logical"] + out[f"au_spro_{f}_structural"]))
    sel = [0, 1, 2, 3, 4, 5]
    ref = ref_au_spro(maps[sel], [regions[i] for i in sel], (0.05,))
    _close(out["au_spro_0.05_logical"], ref[0.05])
    scores = maps.reshape(n, -1).max(1)
    _close(out["logical_auroc"], roc_auc_score(labels[:6], scores[:6]))
    assert out["image_auroc"] == pytest.approx(0.5 * (out["logical_auroc"]
                                                      + out["structural_auroc"]))
    for k, v in out.items():
        assert 0.0 <= v <= 1.0, k


def test_mvtec_ad_bundle_and_list_input():
    rng = np.random.default_rng(9)
    masks = _masks(rng, 6)
    maps = _maps(rng, masks)
    labels = (masks.reshape(6, -1).max(1) > 0).astype(int)
    a = M.mvtec_ad_metrics(maps, labels, masks)
    b = M.mvtec_ad_metrics(list(maps), labels, list(masks))
    assert set(a) == {"image_auroc", "pixel_auroc", "au_pro", "au_pro_per_image", "f1_max"}
    assert a == b
    _close(a["au_pro"], ref_au_pro(masks, maps))
    assert "au_pro_per_image" not in M.mvtec_ad_metrics(maps, labels, masks, per_image_pro=False)


# ---------------------------------------------------------------------------
# Mask encodings
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.uint8, np.int32, np.int64, np.uint16])
def test_integer_masks_nonzero_is_defect(dtype):
    """0/255 PNG masks (and any other non-zero defect value) give the values of 0/1 masks."""
    rng = np.random.default_rng(11)
    masks = _masks(rng, 6)  # 0/1 uint8
    maps = _maps(rng, masks, 4)
    want = {"pro": M.au_pro(masks, maps), "pix": M.pixel_auroc(masks, maps),
            "ppi": M.au_pro_per_image(masks, maps)}
    _close(want["pro"], ref_au_pro(masks, maps))  # the 0/1 values are the reference's
    _close(want["pix"], roc_auc_score(masks.ravel(), maps.ravel()))
    for scale in (255, 7):
        m = masks.astype(dtype) * dtype(scale)
        assert M.au_pro(m, maps) == want["pro"]
        assert M.pixel_auroc(m, maps) == want["pix"]
        assert M.au_pro_per_image(m, maps) == want["ppi"]
        got = M.mvtec_ad_metrics(maps, (masks.reshape(6, -1).max(1) > 0).astype(int), m)
        assert got["au_pro"] == want["pro"] and got["pixel_auroc"] == want["pix"]
        assert got["au_pro_per_image"] == want["ppi"]
        assert M.rd4ad_compute_pro(m[-1][None], maps[-1][None]) == \
            M.rd4ad_compute_pro(masks[-1][None], maps[-1][None])
    # bool masks, and float masks in [0, 1] binarized at 0.5 (bilinearly resized masks)
    assert M.au_pro(masks.astype(bool), maps) == want["pro"]
    soft = masks * 0.8 + (1 - masks) * 0.3
    assert M.pixel_auroc(soft.astype(np.float32), maps) == want["pix"]
    np.testing.assert_array_equal(M.binarize_mask(np.array([0, 255, 1, 3], np.uint8)),
                                  [False, True, True, True])


# ---------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------

def test_bad_input_messages():
    maps = np.zeros((3, 16, 16), np.float32)
    with pytest.raises(ValueError, match=r"\(16, 8\).*\(16, 16\)"):
        M.au_pro(np.zeros((3, 16, 8)), maps)
    with pytest.raises(ValueError, match="3 anomaly maps but 2"):
        M.pixel_auroc(np.zeros((2, 16, 16)), maps)
    bad = maps.copy()
    bad[1, 3, 3] = np.nan
    with pytest.raises(ValueError, match=r"image 1 \(b.png\).*NaN"):
        M.mvtec_ad_metrics(bad, [0, 1, 0], np.zeros((3, 16, 16)), names=["a.png", "b.png", "c"])
    bad[1, 3, 3] = np.inf
    with pytest.raises(ValueError, match="image 1.*inf"):
        M.loco_metrics(bad, [0, 0, 0], [None] * 3, [[], [], []])
    with pytest.raises(ValueError, match="divide them by 255"):  # float 0/255: ambiguous
        M.au_pro(np.full((3, 16, 16), 255.0), maps)
    with pytest.raises(ValueError, match="mask shape"):
        M.au_spro(maps, [[GTRegion(np.ones((8, 8), bool), 1.0, True)], [], []])
    with pytest.raises(ValueError, match="anomaly kind"):
        M.loco_metrics(maps, [0, 1, 0], [None, "weird", None], [[], [], []])


def test_degenerate_sets_give_nan_not_crash():
    rng = np.random.default_rng(10)
    maps = rng.random((4, 16, 16)).astype(np.float32)
    out = M.mvtec_ad_metrics(maps, [0, 0, 0, 0], np.zeros((4, 16, 16)))
    assert all(np.isnan(v) for v in out.values())
    m = np.zeros((16, 16), bool)
    m[2:6, 2:6] = True
    regions = [[], [], [GTRegion(m, 1.0, True)], [GTRegion(m, 4, False)]]
    out = M.loco_metrics(maps, [0, 0, 1, 1], [None, None, "logical", "logical"], regions)
    assert np.isnan(out["structural_auroc"]) and np.isnan(out["au_spro_0.05_structural"])
    assert np.isnan(out["au_spro_0.05"]) and not np.isnan(out["au_spro_0.05_logical"])
    assert not np.isnan(out["logical_auroc"])


def test_report_largest_difference():
    """Runs last in this module: prints the largest difference seen vs the references."""
    print(f"\nlargest |ours - reference| over this module: {MAX_DIFF['value']:.3g}")
    assert MAX_DIFF["value"] <= TOL
