"""EfficientAD and the DFSC margin (docs/METHODS.md), at tiny shapes on the CPU.

Networks are checked at full size with jax.eval_shape only (no compute); the
training tests use 64x64 inputs and widths divided by 8 or 16.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from PIL import Image

from kdjax import augment, backends, losses, optim
from kdjax.config import base_config
from kdjax.data import penalty
from kdjax.methods import efficientad as ead
from kdjax.models.pdn import PDN, Autoencoder, pdn_output_size
from kdjax.teacher import init_method

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
GRAY = np.array([0.2989, 0.587, 0.114], np.float32)


def tiny_config(**eff):
    c = base_config()
    c.method = "efficientad"
    c.teacher.arch = "pdn_small"
    c.teacher.weights = "random"
    c.teacher.allow_random = True
    c.data.image_size = 64
    c.train.batch_size = 1
    c.train.learning_rate = 1e-4
    c.train.weight_decay = 1e-5
    c.train.b1, c.train.b2 = 0.9, 0.999
    c.efficientad = ead.default_efficientad_config()
    c.efficientad.channels_divisor = 16
    for k, v in eff.items():
        c.efficientad[k] = v
    return c


# --- pure functions against numpy ------------------------------------------

def test_hard_feature_loss_matches_numpy():
    d = np.random.default_rng(0).random((1, 7, 9, 24)).astype(np.float32) ** 2
    q = np.quantile(d.astype(np.float64), 0.999)
    want = d[d >= q].mean()
    np.testing.assert_allclose(float(losses.hard_feature_loss(jnp.asarray(d), 0.999)), want,
                               rtol=1e-6)


def _quantile_hard_loss(distance, quantile):
    """The hard loss written with jnp.quantile (linear interpolation, as torch.quantile)."""
    d = distance.reshape(-1).astype(jnp.float32)
    q = jnp.quantile(d, quantile)
    keep = d >= q
    return jnp.sum(jnp.where(keep, d, 0.0)) / jnp.maximum(jnp.sum(keep), 1)


def test_fast_hard_loss_equals_quantile_version():
    """kth_largest is exact; the hard loss equals the one written with jnp.quantile,
    ties and negative values included."""
    rng = np.random.default_rng(7)
    x = rng.normal(size=(5003,)).astype(np.float32)
    x[:40] = x[40]  # ties
    want = np.sort(x)[::-1]
    ks = [1, 2, 41, 5003]
    np.testing.assert_array_equal(np.asarray(losses.kth_largest(jnp.asarray(x), ks)),
                                  want[np.array(ks) - 1])
    for shape, q in (((1, 7, 9, 24), 0.999), ((2, 11, 13, 31), 0.9), ((3001,), 0.5)):
        d = jnp.asarray(rng.random(shape).astype(np.float32) ** 2)
        assert float(losses.hard_feature_loss(d, q)) == float(_quantile_hard_loss(d, q))
    assert np.isnan(float(losses.hard_feature_loss(jnp.asarray([1.0, np.nan, 2.0]), 0.5)))


def test_dfsc_margin_loss_matches_numpy():
    rng = np.random.default_rng(1)
    t, a, s = (rng.normal(size=(2, 5, 6, 8)).astype(np.float32) for _ in range(3))
    s = t + 0.3 * s  # some hinges active, some not
    m, q = 0.2, 0.7
    d_ta = ((t - a) ** 2).mean(-1)
    sel = d_ta > np.quantile(d_ta.astype(np.float64), q)
    hinge = np.maximum(m - ((s - t) ** 2).mean(-1), 0)
    want = hinge[sel].mean()
    assert 0 < sel.sum() < sel.size and (hinge[sel] > 0).any()
    got = losses.dfsc_margin_loss(jnp.asarray(t), jnp.asarray(a), jnp.asarray(s), m, q)
    np.testing.assert_allclose(float(got), want, rtol=1e-5)
    # gradient only to the student branch
    g = jax.grad(lambda t_, a_, s_: losses.dfsc_margin_loss(t_, a_, s_, m, q), argnums=(0, 1, 2))(
        jnp.asarray(t), jnp.asarray(a), jnp.asarray(s))
    assert float(jnp.abs(g[0]).max()) == 0 and float(jnp.abs(g[1]).max()) == 0
    assert float(jnp.abs(g[2]).max()) > 0
    # relative gap: m * d_ta at each distinctive position; and the active fraction
    m_rel = 0.03  # some hinges active, some not (d_st ~0.1, d_ta ~3 here)
    hinge_rel = np.maximum(m_rel * d_ta - ((s - t) ** 2).mean(-1), 0)
    assert 0 < (hinge_rel[sel] > 0).sum() < sel.sum()
    got, active = losses.dfsc_margin_loss(jnp.asarray(t), jnp.asarray(a), jnp.asarray(s), m_rel, q,
                                       "relative", with_active=True)
    np.testing.assert_allclose(float(got), hinge_rel[sel].mean(), rtol=1e-5)
    np.testing.assert_allclose(float(active), (hinge_rel[sel] > 0).mean(), rtol=1e-6)
    g = jax.grad(lambda t_, a_, s_: losses.dfsc_margin_loss(t_, a_, s_, m_rel, q, "relative"),
                 argnums=(0, 1, 2))(jnp.asarray(t), jnp.asarray(a), jnp.asarray(s))
    assert float(jnp.abs(g[0]).max()) == 0 and float(jnp.abs(g[1]).max()) == 0
    with pytest.raises(ValueError, match="relative"):
        losses.dfsc_margin_loss(jnp.asarray(t), jnp.asarray(a), jnp.asarray(s), m, q, "percent")


def _np_blend(x, f, other):
    return np.clip(f * x + (1 - f) * other, 0, 1)


def test_colour_jitter_ops_match_torchvision_formulas():
    rng = np.random.default_rng(2)
    x = rng.random((3, 8, 10, 3)).astype(np.float32)
    f = np.array([0.8, 1.0, 1.2], np.float32)
    gray = (x * GRAY).sum(-1, keepdims=True)
    fb = f[:, None, None, None]
    np.testing.assert_allclose(augment.adjust_brightness(jnp.asarray(x), f), _np_blend(x, fb, 0),
                               atol=1e-6)
    np.testing.assert_allclose(augment.adjust_contrast(jnp.asarray(x), f),
                               _np_blend(x, fb, gray.mean(axis=(1, 2, 3), keepdims=True)),
                               atol=1e-6)
    np.testing.assert_allclose(augment.adjust_saturation(jnp.asarray(x), f),
                               _np_blend(x, fb, gray), atol=1e-6)

    # color_jitter_ae: each image gets one of the three, factor in [0.8, 1.2],
    # drawn from the key as documented (split -> choice, factor).
    n = 16
    x = rng.random((n, 6, 6, 3)).astype(np.float32)
    key = jax.random.PRNGKey(3)
    out = np.asarray(augment.color_jitter_ae(jnp.asarray((x - IMAGENET_MEAN) / IMAGENET_STD), key))
    out = out * IMAGENET_STD + IMAGENET_MEAN
    k_c, k_f = jax.random.split(key)
    choice = np.asarray(jax.random.randint(k_c, (n,), 0, 3))
    factor = np.asarray(jax.random.uniform(k_f, (n,), jnp.float32, 0.8, 1.2))
    assert set(choice.tolist()) == {0, 1, 2}
    for i in range(n):
        g = (x[i] * GRAY).sum(-1, keepdims=True)
        other = [0.0, g.mean(), g][choice[i]]
        np.testing.assert_allclose(out[i], _np_blend(x[i], factor[i], other), atol=2e-5)


def test_optimizer_is_torch_adam_with_l2_and_steplr():
    rng = np.random.default_rng(4)
    p0 = rng.normal(size=(5,)).astype(np.float64)
    grads = rng.normal(size=(4, 5))
    lr, wd, b1, b2, eps = 1e-2, 1e-1, 0.9, 0.999, 1e-8
    tx = optim.stepped_adam(lr, 4, weight_decay=wd)  # StepLR step_size int(0.95*4) = 3
    p = jnp.asarray(p0, jnp.float32)
    state = tx.init(p)
    want, m, v = p0.copy(), 0 * p0, 0 * p0
    for i, g in enumerate(grads):
        u, state = tx.update(jnp.asarray(g, jnp.float32), state, p)
        p = optax.apply_updates(p, u)
        gg = g + wd * want
        m, v = b1 * m + (1 - b1) * gg, b2 * v + (1 - b2) * gg ** 2
        lr_i = lr * (0.1 if i >= 3 else 1.0)
        want = want - lr_i * (m / (1 - b1 ** (i + 1))) / (np.sqrt(v / (1 - b2 ** (i + 1))) + eps)
    np.testing.assert_allclose(np.asarray(p), want, rtol=1e-5, atol=1e-7)


def test_map_combination_equals_reference():
    """Engine: sum_k w_k * 0.1 (m_k - qa_k) / (qb_k - qa_k) with w = 0.5, 0.5
    is the reference's 0.5 * map_st + 0.5 * map_ae of normalized maps."""
    from kdjax.inference import combine as combine_maps, map_normalization

    rng = np.random.default_rng(5)
    val = {"local": rng.random((3, 8, 8)), "global": rng.random((3, 8, 8)) * 3}
    test = {"local": rng.random((2, 8, 8)), "global": rng.random((2, 8, 8)) * 3}
    norm = map_normalization(val, (0.9, 0.995))
    got = combine_maps(test, {"local": 0.5, "global": 0.5}, norm)
    qs = {k: np.quantile(v, [0.9, 0.995]) for k, v in val.items()}
    st = 0.1 * (test["local"] - qs["local"][0]) / (qs["local"][1] - qs["local"][0])
    ae = 0.1 * (test["global"] - qs["global"][0]) / (qs["global"][1] - qs["global"][0])
    np.testing.assert_allclose(got, 0.5 * st + 0.5 * ae, rtol=1e-5, atol=1e-6)


# --- networks ----------------------------------------------------------------

@pytest.mark.parametrize("size", ["S", "M"])
def test_pdn_shapes_at_256(size):
    x = jax.ShapeDtypeStruct((2, 256, 256, 3), jnp.float32)
    for out_ch in (384, 768):
        m = PDN(size, out_ch)
        v = jax.eval_shape(m.init, jax.random.PRNGKey(0), x)
        assert jax.eval_shape(m.apply, v, x).shape == (2, 56, 56, out_ch)
    names = sorted(v["params"], key=lambda n: int(n[4:]))
    assert names == [f"conv{i}" for i in ((0, 3, 6, 8) if size == "S" else (0, 3, 6, 8, 10, 12))]
    assert pdn_output_size(256, size) == 56
    # published widths: S conv0 3->128, M conv0 3->256
    assert v["params"]["conv0"]["kernel"].shape == (4, 4, 3, 128 if size == "S" else 256)


def test_conv_impls_and_student_groups_agree():
    """The CPU kernels' im2col training convolution and lax.conv give the same PDN / AE;
    ``groups`` gives the same channels."""
    im2col = backends.cpu_kernels().pdn_conv_train
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 64, 64, 3))
    a, b = PDN("S", 16, width_divisor=16), PDN("S", 16, width_divisor=16, conv=im2col)

    @jax.jit
    def run(x):
        v = a.init(jax.random.PRNGKey(1), x)
        full = a.apply(v, x)
        parts = b.apply(v, x, groups=((2, 0, 8), (1, 8, 16)))
        ae = Autoencoder(8, 8, width_divisor=8)
        va = ae.init(jax.random.PRNGKey(2), x)
        ae2 = Autoencoder(8, 8, width_divisor=8, conv=im2col)
        return full, b.apply(v, x), parts, ae.apply(va, x), ae2.apply(va, x)

    full, full_b, parts, ae_x, ae_i = run(x)
    np.testing.assert_allclose(full, full_b, atol=1e-5)
    np.testing.assert_allclose(parts[0], full[:2, ..., :8], atol=1e-5)
    np.testing.assert_allclose(parts[1], full[2:, ..., 8:], atol=1e-5)
    np.testing.assert_allclose(ae_x, ae_i, atol=1e-5)


def test_autoencoder_shape_at_256():
    x = jax.ShapeDtypeStruct((2, 256, 256, 3), jnp.float32)
    ae = Autoencoder(384, 56)
    v = jax.eval_shape(ae.init, jax.random.PRNGKey(0), x)
    assert jax.eval_shape(ae.apply, v, x).shape == (2, 56, 56, 384)
    assert v["params"]["conv10"]["kernel"].shape == (8, 8, 64, 64)  # the 1x1 code


@pytest.mark.parametrize("size", ["S", "M"])
def test_pdn_receptive_field_is_33(size):
    """With positive weights and inputs no ReLU is inactive, so an input pixel
    influences exactly the outputs whose receptive field holds it. (XLA's
    convolution: the CPU im2col path is a custom_vjp, which has no jvp.)"""
    m = PDN(size, 8, width_divisor=16)
    x = jnp.ones((1, 64, 64, 3))
    out_hw = pdn_output_size(64, size)
    r, c = 5, 60
    tangent = jnp.zeros_like(x).at[0, r, c, :].set(1.0)

    @jax.jit
    def probe(x):
        v = m.init(jax.random.PRNGKey(0), x)
        v = jax.tree_util.tree_map(lambda a: jnp.abs(a) + 0.01, v)
        # perturb one input pixel: which outputs move (forward-mode derivative)
        _, dy = jax.jvp(lambda z: m.apply(v, z), (x,), (tangent,))
        # the input pixels one output pixel depends on
        g = jax.grad(lambda z: m.apply(v, z)[0, 3, 2].sum())(x)
        return jnp.abs(dy).sum((0, 3)) > 0, jnp.abs(g).sum((0, 3)) > 0

    hit, nz = (np.asarray(a) for a in probe(x))
    rows, cols = np.nonzero(hit.any(1))[0], np.nonzero(hit.any(0))[0]
    assert rows.tolist() == [o for o in range(out_hw) if 4 * o <= r <= 4 * o + 32] == [0, 1]
    assert cols.tolist() == [o for o in range(out_hw) if 4 * o <= c <= 4 * o + 32] == [7]
    ys, xs = np.nonzero(nz)
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (12, 12 + 32, 8, 8 + 32)
    assert nz.sum() == 33 * 33


# --- the method ----------------------------------------------------------------

def _images(n, seed=0):
    return jax.random.normal(jax.random.PRNGKey(seed), (n, 64, 64, 3)) * 0.5


def _prepare(method, v, images):
    """The engine's statistics passes (kdjax.train.prepare_state) on normalized images."""
    state = v["state"]
    for index in range(method.prepare_passes):
        stats = jax.tree_util.tree_map(
            np.asarray, method.prepare_statistic(v["frozen"], state, images))
        state = method.prepare_update(
            index, state, jax.tree_util.tree_map(lambda a: a.astype(np.float64).mean(0), stats))
    return state


def _train(config, steps=3, start=None):
    """A few optax steps of ``config``'s method; ``start`` = (variables, state)
    of an identical model to skip init / prepare (each compile costs seconds)."""
    method = ead.EfficientAD(config)
    imgs = _images(4)
    if start is None:
        v = init_method(config, method, jax.random.PRNGKey(0), (1, 64, 64, 3))
        state = _prepare(method, v, imgs)
    else:
        v, state = start
    tx = method.optimizer(steps)
    params, opt = v["params"], tx.init(v["params"])

    @jax.jit
    def step(params, opt, x, key):
        (loss, (_, metrics)), g = jax.value_and_grad(method.loss, has_aux=True)(
            params, state, v["frozen"], x, key)
        u, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, u), opt, metrics

    history = []
    for i in range(steps):
        params, opt, metrics = step(params, opt, imgs[i:i + 1], jax.random.PRNGKey(10 + i))
        history.append({k: float(x) for k, x in metrics.items()})
    return method, v, state, params, history


@pytest.fixture(scope="module")
def baseline():
    return _train(tiny_config())


def test_prepare_teacher_statistics(baseline):
    method, v, state, _, _ = baseline
    t = np.asarray(method.teacher.apply(v["frozen"]["teacher"], _images(4)), np.float64)
    mean = t.mean(axis=(1, 2)).mean(0)
    std = np.sqrt(((t - mean) ** 2).mean(axis=(1, 2)).mean(0))
    np.testing.assert_allclose(state["teacher_mean"], mean, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(state["teacher_std"], std, rtol=1e-4)


def test_training_metrics_and_maps(baseline):
    method, v, state, params, history = baseline
    assert set(history[0]) == {"loss", "hard", "ae", "stae", "penalty", "margin",
                               "margin_active"}
    for h in history:
        assert np.isfinite(h["loss"])
        np.testing.assert_allclose(h["loss"], h["hard"] + h["ae"] + h["stae"], rtol=1e-5)
        assert h["margin"] == 0.0 and h["penalty"] == 0.0
    maps = jax.jit(method.maps)(params, state, v["frozen"], _images(2, 1))
    assert set(maps) == set(method.map_names) == {"local", "global"}
    for m in maps.values():  # the PDN's resolution: the engine normalizes there
        assert m.shape == (2, 8, 8) and bool(jnp.all(jnp.isfinite(m)))


def test_engine_normalizes_raw_maps_then_pads_and_upsamples(baseline):
    """The reference's order: quantiles of the raw (56x56 at 256 px) validation
    maps, 0.5 / 0.5 combination, THEN zero padding by 4 and bilinear upsampling."""
    from kdjax.inference import Model, map_normalization

    method, v, state, params, _ = baseline
    fn = jax.jit(method.maps)
    val = {k: np.asarray(x) for k, x in fn(params, state, v["frozen"], _images(3, 2)).items()}
    test = {k: np.asarray(x) for k, x in fn(params, state, v["frozen"], _images(2, 1)).items()}
    norm = map_normalization(val, (0.9, 0.995))
    model = Model(method.config, method, params, state, v["frozen"], norm=norm)
    weights = {"local": 0.5, "global": 0.5}
    got, scores = model.finish_components(test, None, weights)
    assert got.shape == (2, 64, 64)
    combined = sum(0.5 * 0.1 * (test[k] - np.quantile(val[k], 0.9))
                   / (np.quantile(val[k], 0.995) - np.quantile(val[k], 0.9)) for k in test)
    padded = np.pad(combined, ((0, 0), (4, 4), (4, 4)))  # zeros after normalization

    def torch_bilinear(x, oh, ow):  # F.interpolate(bilinear, align_corners=False)
        def axis(n_in, n_out):
            src = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, None)
            i0 = np.minimum(np.floor(src).astype(int), n_in - 1)
            return i0, np.minimum(i0 + 1, n_in - 1), src - i0
        r0, r1, fr = axis(x.shape[1], oh)
        c0, c1, fc = axis(x.shape[2], ow)
        rows = x[:, r0] * (1 - fr)[None, :, None] + x[:, r1] * fr[None, :, None]
        return rows[:, :, c0] * (1 - fc) + rows[:, :, c1] * fc

    want = torch_bilinear(padded, 64, 64)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(scores, want.reshape(2, -1).max(1), rtol=1e-5, atol=1e-6)
    # At an original resolution (LOCO's official protocol): ONE resize from the padded
    # map to (H, W), as the reference, not 16 -> 64 -> (H, W); scores stay at the input size.
    orig, orig_scores = model.finish_components(test, [(50, 70), (50, 70)], weights)
    np.testing.assert_allclose(orig, torch_bilinear(padded, 50, 70), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(orig_scores, scores, rtol=1e-6)
    np.testing.assert_allclose(got[:, 0, :], 0.0, atol=1e-7)  # outermost rows: the zero border


def test_teacher_cache_gives_the_same_loss(baseline):
    """train.cache_teacher: the cached raw teacher output of the clean image,
    normalized in the loss, replaces that teacher pass (the rest of the loss is
    the same code, so equal loss terms mean the same training)."""
    method, v, state, params, _ = baseline
    x, key = _images(1, 3), jax.random.PRNGKey(4)
    cached = jax.jit(method.teacher_cache)(v["frozen"], x)
    assert cached.shape == (1, 8, 8, method.channels)
    loss = jax.jit(method.loss)
    (l0, (_, m0)) = loss(params, state, v["frozen"], x, key)
    (l1, (_, m1)) = loss(params, state, v["frozen"], x, key, cached)
    for k in ("loss", "hard", "ae", "stae"):
        np.testing.assert_allclose(float(m1[k]), float(m0[k]), rtol=1e-5)


def test_margin_weight_zero_is_efficientad_exactly(baseline):
    """w = 0 (with any margin / quantile) IS EfficientAD: the same traced program
    and identical parameters after a few steps."""
    method, v, state, p_base, h_base = baseline
    zero_cfg = tiny_config(margin_weight=0.0, margin=50.0, margin_quantile=0.5)
    args = (v["params"], state, v["frozen"], _images(1), jax.random.PRNGKey(0))
    jaxpr = lambda m: str(jax.make_jaxpr(jax.grad(lambda *a: m.loss(*a)[0]))(*args))
    assert jaxpr(ead.EfficientAD(zero_cfg)) == jaxpr(method)
    _, _, _, p_zero, h_zero = _train(zero_cfg, start=(v, state))
    for a, b in zip(jax.tree_util.tree_leaves(p_base), jax.tree_util.tree_leaves(p_zero)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert h_base == h_zero
    # and the term does bite when w > 0 (margin large enough to be active at init)
    m_w = ead.EfficientAD(tiny_config(margin_weight=1.0, margin=50.0, margin_quantile=0.5))
    (loss, (_, met)), g_w = jax.jit(jax.value_and_grad(m_w.loss, has_aux=True))(*args)
    (loss0, _), g_0 = jax.jit(jax.value_and_grad(method.loss, has_aux=True))(*args)
    assert float(met["margin"]) > 0
    np.testing.assert_allclose(float(loss), float(loss0) + float(met["margin"]), rtol=1e-5)
    diff = max(float(jnp.abs(a - b).max()) for a, b in zip(
        jax.tree_util.tree_leaves(g_w["student"]), jax.tree_util.tree_leaves(g_0["student"])))
    assert diff > 0
    for a, b in zip(jax.tree_util.tree_leaves(g_w["ae"]), jax.tree_util.tree_leaves(g_0["ae"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-8)


def test_penalty_images(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(6)
    for i in range(3):
        os.makedirs(tmp_path / f"n{i}", exist_ok=True)
        Image.fromarray((rng.random((40, 50, 3)) * 255).astype(np.uint8)).save(
            tmp_path / f"n{i}" / f"{i}.jpg")
    imgs = penalty.load_penalty_images(str(tmp_path), 16, 2, seed=0)
    assert imgs.shape == (2, 16, 16, 3) and imgs.dtype == np.uint8
    b = augment.penalty_images(jnp.asarray(imgs[[0, 1, 1, 0]]), jax.random.PRNGKey(0), 1.0)
    x = np.asarray(b) * IMAGENET_STD + IMAGENET_MEAN  # all grayscale with p = 1
    np.testing.assert_allclose(x[..., 0], x[..., 1], atol=1e-5)
    with pytest.raises(ValueError, match="penalty_dir"):
        penalty.load_penalty_images(str(tmp_path / "missing"), 16, 2, seed=0)


def test_config_errors_say_what_to_do():
    c = tiny_config()
    c.teacher.arch = "pdn_medium"
    with pytest.raises(ValueError, match="model_size"):
        ead.EfficientAD(c)
    c = tiny_config()
    c.efficientad.bogus = 1
    with pytest.raises(ValueError, match="unknown config key .efficientad.bogus."):
        ead.EfficientAD(c)
    c = tiny_config()
    c.efficientad.model_size = "L"
    with pytest.raises(ValueError, match="'S' or 'M'"):
        ead.EfficientAD(c)
    c = tiny_config()
    c.teacher.weights = "auto"
    with pytest.raises(ValueError, match="channels_divisor"):
        ead.EfficientAD(c)


def test_shipped_configs():
    from kdjax.config import load_config

    for name, w in (("loco_efficientad", 0.0), ("loco_margin", None)):
        c = load_config(name)
        assert c.method == "efficientad" and c.data.dataset == "mvtec_loco"
        assert c.train.steps == 70000 and c.train.batch_size == 1
        assert dict(c.eval.map_weights) == {"local": 0.5, "global": 0.5}
        if w is not None:
            assert c.efficientad.margin_weight == w
        ead.efficientad_settings(c)


def test_end_to_end_on_tiny_synthetic_loco(tmp_path, tiny_synthetic_root):
    from kdjax import experiment

    c = tiny_config()
    c.data.dataset = "synthetic"
    c.data.root = tiny_synthetic_root
    c.data.category = "all"
    c.data.synthetic_size = 64
    c.data.synthetic_counts = (12, 4, 4, 5, 4)  # exactly the session fixture's: no regeneration
    c.train.steps = 4
    c.train.steps_per_call = 2
    c.train.checkpoint_every = 4
    c.train.log_every = 2
    c.eval.batch_size = 8
    c.eval.num_figures = 1
    c.eval.map_weights = {"local": 0.5, "global": 0.5}
    c.efficientad.margin_weight = 1.0
    # The penalty folder: resident here, streamed below (the same draws, so the same
    # losses); the streamed run also streams the training images.
    rng = np.random.default_rng(5)
    pen = tmp_path / "penalty"
    for i in range(5):
        os.makedirs(pen / f"n{i % 2}", exist_ok=True)
        Image.fromarray((rng.random((90, 70, 3)) * 255).astype(np.uint8)).save(
            pen / f"n{i % 2}" / f"{i}.jpg")
    c.efficientad.penalty_dir = str(pen)
    experiment.train_and_evaluate(c, str(tmp_path / "r"))
    with open(tmp_path / "r" / "results.json") as f:
        res = json.load(f)
    assert "RANDOM" in res["teacher"] and "notes" not in res  # the penalty was given
    mean = res["mean"]
    for k in ("logical_auroc", "structural_auroc", "au_spro_0.05"):
        assert 0.0 <= mean[k] <= 1.0
    c.data.input = "stream"
    experiment.train_and_evaluate(c, str(tmp_path / "s"), "train")

    def rows(w):
        return [json.loads(line) for line in open(tmp_path / w / "train_metrics.jsonl")]
    assert [r["step"] for r in rows("s")] == [r["step"] for r in rows("r")] == [2, 4]
    for a, b in zip(rows("r"), rows("s")):
        assert a["penalty"] > 0
        for k in ("loss", "penalty", "hard", "ae"):
            np.testing.assert_allclose(b[k], a[k], rtol=1e-5)
