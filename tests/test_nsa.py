"""kdjax.methods.nsa against the NSA code of the published MRKD training.

``ref_patch_ex_swap`` below is a line-by-line numpy port of
``self_sup_tasks.patch_ex`` / ``_patch_ex`` of yuxin-jiang/MRKD on the code
path that MRKD's main.py uses (same=True, mode='swap', resize=False,
shift=True, gamma_params=(2, 0.05, 0.03)), with cv2.medianBlur(., 7) of a
binary mask written out (majority of the 7x7 window, replicated border).
The device version draws different random numbers, so the two are compared
in distribution; the device version's own draws are checked exactly
against the reference's rules (patch counts, box geometry, the object and
overlap criteria, which pixels are pasted and from where).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view

from kdjax import ops
from kdjax.methods import nsa


# ---------------------------------------------------------------------------
# The reference, ported
# ---------------------------------------------------------------------------

def _median7(mask_u8):
    """cv2.medianBlur(binary uint8, 7): 1 where >= 25 of the 49 pixels are 1 (BORDER_REPLICATE)."""
    win = sliding_window_view(np.pad(mask_u8, 3, mode="edge"), (7, 7))
    return (win.sum((-1, -2)) >= 25).astype(np.uint8)


def ref_object_mask(ima_u8, background):
    level, thr = background
    m = np.uint8(np.abs(ima_u8.mean(axis=-1, keepdims=True) - level) > thr)
    m[..., 0] = _median7(m[..., 0])
    return m


def _ref_one(rng, ima_dest, ima_src, dest_obj, src_obj, wb, min_object_pct, min_overlap_pct):
    """_patch_ex (swap, no resize, shift): (image, written mask (H, W) or None)."""
    skip_background = src_obj is not None and dest_obj is not None
    dims = np.array(ima_dest.shape)
    min1 = (wb[0][0] * dims[0]).round().astype(int)
    max1 = (wb[0][1] * dims[0]).round().astype(int)
    min2 = (wb[1][0] * dims[1]).round().astype(int)
    max2 = (wb[1][1] * dims[1]).round().astype(int)
    pw1 = int(np.clip((0.03 + rng.gamma(2, 0.05)) * dims[0], min1, max1))
    pw2 = int(np.clip((0.03 + rng.gamma(2, 0.05)) * dims[1], min2, max2))
    found, attempts = False, 0
    while not found:
        c1 = rng.integers(min1, dims[0] - min1)
        c2 = rng.integers(min2, dims[1] - min2)
        a1, b1 = np.clip(c1 - pw1, 0, dims[0]), np.clip(c1 + pw1, 0, dims[0])
        a2, b2 = np.clip(c2 - pw2, 0, dims[1]), np.clip(c2 + pw2, 0, dims[1])
        patch_mask = np.ones((b1 - a1, b2 - a2, 1), dtype=np.uint8)
        if skip_background:
            obj_area = np.sum(patch_mask & src_obj[a1:b1, a2:b2])
            found = obj_area / (patch_mask.shape[0] * patch_mask.shape[1]) > min_object_pct
        else:
            found = True
        attempts += 1
        if attempts == 200:
            return ima_dest.copy(), None
    src = ima_src[a1:b1, a2:b2]
    height, width, _ = src.shape
    if skip_background:
        so = src_obj[a1:b1, a2:b2]
    found, attempts = False, 0
    while not found:
        c1 = rng.integers(height // 2 + 1, ima_dest.shape[0] - height // 2 - 1)
        c2 = rng.integers(width // 2 + 1, ima_dest.shape[1] - width // 2 - 1)
        a1, b1 = c1 - height // 2, c1 + (height + 1) // 2
        a2, b2 = c2 - width // 2, c2 + (width + 1) // 2
        if skip_background:
            src_and_dest = dest_obj[a1:b1, a2:b2] & so & patch_mask
            found = (np.sum(so) / (patch_mask.shape[0] * patch_mask.shape[1]) > min_object_pct
                     and np.sum(src_and_dest) / np.sum(so) > min_overlap_pct)
        else:
            found = True
        attempts += 1
        if attempts == 200:
            return ima_dest.copy(), None
    if skip_background:
        patch_mask &= so | dest_obj[a1:b1, a2:b2]
    patchex = ima_dest.copy()
    before = patchex[a1:b1, a2:b2]
    patchex[a1:b1, a2:b2] -= patch_mask * before
    patchex[a1:b1, a2:b2] += patch_mask * src
    written = np.zeros(ima_dest.shape[:2], bool)
    written[a1:b1, a2:b2] = patch_mask[..., 0] > 0
    return patchex, written


def ref_patch_ex_swap(rng, ima, p: nsa.NSAParams):
    """patch_ex(ima, same=True, mode='swap', ...): (image, #patches applied, written mask)."""
    ima_src = ima.copy()
    obj = ref_object_mask(ima_src, p.background) if p.background is not None else None
    patchex = ima.copy()
    written = np.zeros(ima.shape[:2], bool)
    n = 0
    wb = (p.height_bounds, p.width_bounds)
    for i in range(p.max_patches):
        if i == 0 or rng.integers(2) > 0:
            patchex, w = _ref_one(rng, patchex, ima_src, obj, obj, wb, p.min_object, p.min_overlap)
            if w is not None:
                n += 1
                written |= w
    return patchex, n, written


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------

def _run(images_u8, params, seed, n=None):
    """nsa_swap_with_info on each image (or ``n`` draws of one image), as numpy."""
    x = ops.normalize_images(jnp.asarray(images_u8))
    if n is not None:
        keys = jax.random.split(jax.random.PRNGKey(seed), n)
        fn = jax.jit(jax.vmap(lambda k: nsa.nsa_swap_with_info(k, x, params)))
    else:
        keys = jax.random.split(jax.random.PRNGKey(seed), x.shape[0])
        fn = jax.jit(jax.vmap(lambda k, im: nsa.nsa_swap_with_info(k, im, params)))
        fn = (lambda f: (lambda k: f(k, x)))(fn)
    out, info = fn(keys)
    return np.asarray(x), np.asarray(out), jax.tree_util.tree_map(np.asarray, info)


def _coded_image(size, obj=None, seed=0):
    """uint8 image: grey 200 background / dark object, plus a small per-pixel code."""
    rng = np.random.default_rng(seed)
    img = np.full((size, size, 3), 200, np.int32)
    if obj is not None:
        img[obj] = 40
    img += rng.integers(-15, 16, img.shape)  # stays far from the |mean - 200| > 60 threshold
    return img.astype(np.uint8)


def _box_obj(obj, b):
    return obj[b[0]:b[1], b[2]:b[3]]


# ---------------------------------------------------------------------------
# Patch counts
# ---------------------------------------------------------------------------

def test_patch_count_is_one_plus_independent_coins():
    """The first patch always, each further one on its own coin: mean 1 + (max-1)/2
    (2.5 for 4) and a binomial histogram; a chained coin would give 1.875."""
    p = nsa.params_for("carpet")
    assert p.max_patches == 4 and p.background is None
    img = np.random.default_rng(0).integers(0, 256, (32, 32, 3)).astype(np.uint8)
    _, _, info = _run(img, p, seed=1, n=4000)
    counts = info["attempted"].sum(1)
    np.testing.assert_array_equal(info["applied"], info["attempted"])  # no constraint
    assert abs(counts.mean() - 2.5) < 0.06, counts.mean()  # SE 0.014
    hist = np.bincount(counts, minlength=5)[1:] / counts.size
    np.testing.assert_allclose(hist, [1 / 8, 3 / 8, 3 / 8, 1 / 8], atol=0.03)
    # independent coins: patch 3 is attempted half of the time whether or not patch 2 was
    a = info["attempted"]
    assert abs(a[a[:, 1], 2].mean() - 0.5) < 0.05 and abs(a[~a[:, 1], 2].mean() - 0.5) < 0.05
    # and the reference port agrees
    rng = np.random.default_rng(2)
    ref = np.array([ref_patch_ex_swap(rng, img, p)[1] for _ in range(2000)])
    assert abs(ref.mean() - counts.mean()) < 0.1


# ---------------------------------------------------------------------------
# Geometry: cut at the border, destination inside
# ---------------------------------------------------------------------------

def test_patches_are_cut_at_the_border_and_pasted_inside():
    p = nsa.params_for("carpet")
    size = 32
    img = np.random.default_rng(3).integers(0, 256, (size, size, 3)).astype(np.uint8)
    x, out, info = _run(img, p, seed=4, n=500)
    src, dst, half = info["src_box"], info["dst_box"], info["half"]
    lo, hi = nsa.pixel_bounds(p.height_bounds, size)
    assert (half >= lo).all() and (half <= hi).all()
    ph, pw = src[..., 1] - src[..., 0], src[..., 3] - src[..., 2]
    touches_y = (src[..., 0] == 0) | (src[..., 1] == size)
    touches_x = (src[..., 2] == 0) | (src[..., 3] == size)
    # a box is the full 2 * half unless it was cut at the border
    assert ((ph == 2 * half[..., 0]) | touches_y).all() and ((pw == 2 * half[..., 1]) | touches_x).all()
    assert (ph[touches_y] < 2 * half[..., 0][touches_y]).mean() > 0.5  # cut, not just touching
    assert touches_y.mean() > 0.05 and touches_x.mean() > 0.05
    # destination: the source's (cut) size, inside the image, off the outermost rows / columns
    np.testing.assert_array_equal(dst[..., 1] - dst[..., 0], ph)
    np.testing.assert_array_equal(dst[..., 3] - dst[..., 2], pw)
    assert (dst[..., 0] >= 1).all() and (dst[..., 1] <= size - 1).all()
    assert (dst[..., 2] >= 1).all() and (dst[..., 3] <= size - 1).all()
    # pixels read at the border were pasted: rebuild every output from the boxes
    for i in range(40):
        want = x.copy()
        for k in np.flatnonzero(info["applied"][i]):
            (a1, b1, a2, b2), (c1, d1, c2, d2) = src[i, k], dst[i, k]
            want[c1:d1, c2:d2] = x[a1:b1, a2:b2]  # no constraint: the whole box
            assert info["paste"][i, k, c1:d1, c2:d2].all() and info["paste"][i, k].sum() == \
                (d1 - c1) * (d2 - c2)
        np.testing.assert_array_equal(out[i], want)


# ---------------------------------------------------------------------------
# Object constraint: criteria and what is pasted
# ---------------------------------------------------------------------------

def _rect_object(size=64):
    obj = np.zeros((size, size), bool)
    obj[14:46, 10:40] = True
    return obj


def test_object_constraint_pastes_only_the_object_union():
    size = 64
    img = _coded_image(size, _rect_object(size))
    p = nsa.NSAParams((0.03, 0.2), (0.03, 0.2), 3, 0.7, 0.25, (200, 60))
    x, out, info = _run(img, p, seed=5, n=300)
    obj = ref_object_mask(img, p.background)[..., 0] > 0
    np.testing.assert_array_equal(info["object"][0], obj)
    assert info["applied"].any(1).all()
    partial = 0
    for i in range(out.shape[0]):
        want = x.copy()
        for k in np.flatnonzero(info["applied"][i]):
            s, d = info["src_box"][i, k], info["dst_box"][i, k]
            so, do = _box_obj(obj, s), _box_obj(obj, d)
            # the reference's criteria, on the drawn boxes
            assert so.sum() / so.size > p.min_object
            assert (so & do).sum() / so.sum() > p.min_overlap
            union = np.zeros((size, size), bool)
            union[d[0]:d[1], d[2]:d[3]] = so | do
            np.testing.assert_array_equal(info["paste"][i, k], union)
            partial += union.sum() < so.size
            sel = union[d[0]:d[1], d[2]:d[3]]
            want[d[0]:d[1], d[2]:d[3]][sel] = x[s[0]:s[1], s[2]:s[3]][sel]  # from the original
        for k in np.flatnonzero(~info["applied"][i]):
            assert not info["paste"][i, k].any()
        np.testing.assert_array_equal(out[i], want)
    assert partial > 20  # boxes over the object's edge: only part of the rectangle is pasted


def _stripes(size=64, width=6):
    obj = np.zeros((size, size), bool)
    obj[:, (np.arange(size) // width) % 2 == 0] = True
    return obj


def test_overlap_criterion_is_object_overlap_over_the_source_object():
    """Vertical stripes: a destination box can be half object yet have its object
    stripes exactly between the source's, so 'object fraction of the destination
    box' and 'overlap of the two object masks over the source object' disagree."""
    size = 64
    img = _coded_image(size, _stripes(size), seed=1)
    p = nsa.NSAParams((0.06, 0.1), (0.06, 0.1), 3, 0.25, 0.25, (200, 60))
    _, _, info = _run(img, p, seed=6, n=300)
    obj = ref_object_mask(img, p.background)[..., 0] > 0
    np.testing.assert_array_equal(info["object"][0], obj)
    ratios = []
    for i, k in zip(*np.nonzero(info["applied"])):
        so = _box_obj(obj, info["src_box"][i, k])
        do = _box_obj(obj, info["dst_box"][i, k])
        ratios.append((so & do).sum() / so.sum())
    assert len(ratios) > 200 and min(ratios) > p.min_overlap
    # the test can tell the two criteria apart: many random pairs pass the old one only
    rng = np.random.default_rng(0)
    old_only = 0
    for _ in range(2000):
        h, w = rng.integers(8, 13, 2)
        a1, a2 = rng.integers(0, size - h), rng.integers(0, size - w)
        c1, c2 = rng.integers(1, size - h), rng.integers(1, size - w)
        so, do = obj[a1:a1 + h, a2:a2 + w], obj[c1:c1 + h, c2:c2 + w]
        if so.mean() > p.min_object:
            old_only += do.mean() >= p.min_overlap and (so & do).sum() / so.sum() <= p.min_overlap
    assert old_only > 200


def test_no_valid_position_skips_the_patch():
    size = 32
    img = _coded_image(size, None)  # no object anywhere: every source fails
    p = nsa.NSAParams((0.03, 0.2), (0.03, 0.2), 3, 0.7, 0.25, (200, 60))
    x, out, info = _run(img, p, seed=7, n=8)
    assert not info["applied"].any() and not info["paste"].any()
    np.testing.assert_array_equal(out, np.broadcast_to(x, out.shape))


# ---------------------------------------------------------------------------
# In distribution, against the reference port
# ---------------------------------------------------------------------------

def _compare(a, b, what, z=4.5):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    se = np.sqrt(a.var() / a.size + b.var() / b.size)
    assert abs(a.mean() - b.mean()) <= z * se + 1e-9, (what, a.mean(), b.mean(), se)


@pytest.mark.parametrize("case", ["free", "object", "stripes"])
def test_distribution_matches_the_reference_port(case):
    size = 48 if case == "free" else 64
    if case == "free":
        img = np.random.default_rng(8).integers(0, 256, (size, size, 3)).astype(np.uint8)
        p = nsa.NSAParams((0.03, 0.4), (0.03, 0.4), 4)
    elif case == "object":
        img = _coded_image(size, _rect_object(size))
        p = nsa.NSAParams((0.03, 0.3), (0.03, 0.2), 3, 0.7, 0.25, (200, 60))
    else:
        img = _coded_image(size, _stripes(size), seed=1)
        p = nsa.NSAParams((0.06, 0.1), (0.06, 0.1), 3, 0.25, 0.25, (200, 60))
    n = 1500
    _, _, info = _run(img, p, seed=9, n=n)
    ours_n = info["applied"].sum(1)
    ours_area = info["paste"].any(1).sum((1, 2))
    rng = np.random.default_rng(10)
    ref = [ref_patch_ex_swap(rng, img, p) for _ in range(n)]
    ref_n = np.array([r[1] for r in ref])
    ref_area = np.array([r[2].sum() for r in ref])
    _compare(ours_n, ref_n, "patches applied")
    _compare(ours_area, ref_area, "pixels written")
    if p.background is not None:
        obj = ref_object_mask(img, p.background)[..., 0] > 0
        ours_on = (info["paste"].any(1) & obj).sum((1, 2))
        ref_on = np.array([(r[2] & obj).sum() for r in ref])
        _compare(ours_on, ref_on, "pixels written on the object")
