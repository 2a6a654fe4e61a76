"""Fidelity switches against direct formulas, at tiny shapes on the CPU.

* DFSC margin (efficientad.margin_target): the "autoencoder" form
  relu(gap - ||T - A||^2) with gradients into the autoencoder only, the
  "student" form relu(gap - ||S_ae - T||^2) into the student only, and
  margin_weight 0 = EfficientAD exactly for both.
* CAD's optimizer (cad.global_learning_rate): the default is the engine's
  single Adam; a separate rate scales only the global group's updates.
* MRKD's test-time feature masking (mrkd.flm_at_test): off by default; on, a
  reproducible fresh mask per batch, as the official evaluation.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kdjax import losses
from kdjax.config import base_config, load_config
from kdjax.methods import efficientad as ead
from kdjax.teacher import init_method


# ---------------------------------------------------------------------------
# DFSC margin: the loss function against numpy
# ---------------------------------------------------------------------------

def _np_margin(t, a, s, margin, q, mode, target):
    """Value, active fraction and gradients (d/dA, d/dS) of the DFSC hinge, by hand."""
    c = t.shape[-1]
    d_ta = ((t - a) ** 2).mean(-1)
    sel = d_ta > np.quantile(d_ta.astype(np.float64), q)
    d = d_ta if target == "autoencoder" else ((s - t) ** 2).mean(-1)
    gap = margin * d_ta if mode == "relative" else margin
    hinge = np.maximum(gap - d, 0)
    count = max(sel.sum(), 1)
    active = sel & (hinge > 0)
    w = (active / count)[..., None]
    g_a = w * 2.0 / c * (t - a) if target == "autoencoder" else np.zeros_like(a)
    g_s = w * 2.0 / c * (t - s) if target == "student" else np.zeros_like(s)
    return hinge[sel].sum() / count, active.sum() / count, g_a, g_s, sel


@pytest.mark.parametrize("target,mode,margin", [
    ("autoencoder", "absolute", 3.1), ("autoencoder", "relative", 1.3),
    ("student", "absolute", 0.09), ("student", "relative", 0.03)])
def test_dfsc_margin_value_and_gradients_match_numpy(target, mode, margin):
    rng = np.random.default_rng(1)
    t, a, s = (rng.normal(size=(2, 5, 6, 8)).astype(np.float32) for _ in range(3))
    s = t + 0.3 * s  # the student's branch near the teacher: some hinges active, some not
    q = 0.7
    want, want_active, g_a, g_s, sel = _np_margin(t, a, s, margin, q, mode, target)
    assert 0 < sel.sum() < sel.size and 0 < want_active <= 1
    if not (target == "autoencoder" and mode == "relative"):  # that one is active everywhere
        assert want_active < 1
    args = [jnp.asarray(v) for v in (t, a, s)]
    loss, active = losses.dfsc_margin_loss(*args, margin, q, mode, with_active=True, target=target)
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    np.testing.assert_allclose(float(active), want_active, rtol=1e-6)
    g = jax.grad(lambda *x: losses.dfsc_margin_loss(*x, margin, q, mode, target=target),
                 argnums=(0, 1, 2))(*args)
    assert float(jnp.abs(g[0]).max()) == 0  # the teacher is constant
    np.testing.assert_allclose(np.asarray(g[1]), g_a, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(np.asarray(g[2]), g_s, rtol=1e-4, atol=1e-7)
    if target == "autoencoder":
        assert float(jnp.abs(g[1]).max()) > 0 and float(jnp.abs(g[2]).max()) == 0
        # the student's branch is not needed at all
        np.testing.assert_allclose(float(losses.dfsc_margin_loss(args[0], args[1], None, margin, q,
                                                              mode, target=target)), want,
                                   rtol=1e-5)
    else:
        assert float(jnp.abs(g[2]).max()) > 0 and float(jnp.abs(g[1]).max()) == 0


def test_dfsc_margin_default_target_is_the_student_form():
    rng = np.random.default_rng(2)
    t, a, s = (jnp.asarray(rng.normal(size=(1, 4, 4, 6)).astype(np.float32)) for _ in range(3))
    assert float(losses.dfsc_margin_loss(t, a, s, 0.5, 0.5)) == float(
        losses.dfsc_margin_loss(t, a, s, 0.5, 0.5, target="student"))
    with pytest.raises(ValueError, match="autoencoder"):
        losses.dfsc_margin_loss(t, a, s, 0.5, 0.5, target="teacher")


# ---------------------------------------------------------------------------
# DFSC margin: in EfficientAD's loss
# ---------------------------------------------------------------------------

def _tiny_ead_config(**eff):
    c = base_config()
    c.method = "efficientad"
    c.teacher.arch = "pdn_small"
    c.teacher.weights = "random"
    c.teacher.allow_random = True
    c.data.image_size = 64
    c.train.batch_size = 1
    c.efficientad = ead.default_efficientad_config()
    c.efficientad.channels_divisor = 16
    for k, v in eff.items():
        c.efficientad[k] = v
    return c


@pytest.fixture(scope="module")
def ead_setup():
    method = ead.EfficientAD(_tiny_ead_config())
    v = init_method(method.config, method, jax.random.PRNGKey(0), (1, 64, 64, 3))
    x = jax.random.normal(jax.random.PRNGKey(1), (1, 64, 64, 3)) * 0.5
    args = (v["params"], v["state"], v["frozen"], x, jax.random.PRNGKey(2))
    return method, args


def _value_and_grad(method, args):
    (loss, (_, met)), g = jax.jit(jax.value_and_grad(method.loss, has_aux=True))(*args)
    return float(loss), met, g


def _max_diff(a, b):
    return max(float(jnp.abs(x - y).max()) for x, y in zip(jax.tree_util.tree_leaves(a),
                                                          jax.tree_util.tree_leaves(b)))


def test_margin_weight_zero_is_efficientad_for_both_targets(ead_setup):
    base, args = ead_setup
    assert ead.default_efficientad_config().margin_target == "student"
    l0, _, g0 = _value_and_grad(base, args)
    jaxpr = lambda m: str(jax.make_jaxpr(jax.grad(lambda *a: m.loss(*a)[0]))(*args))
    for target in ("student", "autoencoder"):
        m = ead.EfficientAD(_tiny_ead_config(margin_weight=0.0, margin_target=target,
                                             margin=50.0, margin_quantile=0.5))
        assert jaxpr(m) == jaxpr(base)  # the very same traced program
        l, met, g = _value_and_grad(m, args)
        assert l == l0 and float(met["margin"]) == 0.0
        for x, y in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(g0)):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("target", ["autoencoder", "student"])
def test_margin_gradient_reaches_only_its_target(ead_setup, target):
    """The loss is EfficientAD's + w * margin; the margin term's gradient is
    non-zero on one network only: the autoencoder for the autoencoder form, the
    student for the student form."""
    base, args = ead_setup
    l0, _, g0 = _value_and_grad(base, args)
    w = 0.7
    m = ead.EfficientAD(_tiny_ead_config(margin_weight=w, margin_target=target, margin=50.0,
                                         margin_quantile=0.5))
    l, met, g = _value_and_grad(m, args)
    assert float(met["margin"]) > 0 and float(met["margin_active"]) > 0
    np.testing.assert_allclose(l, l0 + w * float(met["margin"]), rtol=1e-5)
    moved, fixed = ("ae", "student") if target == "autoencoder" else ("student", "ae")
    assert _max_diff(g[moved], g0[moved]) > 1e-4
    for x, y in zip(jax.tree_util.tree_leaves(g[fixed]), jax.tree_util.tree_leaves(g0[fixed])):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-8)


def test_loco_margin_config_uses_the_autoencoder_form(caplog):
    c = load_config("loco_margin")
    s = ead.efficientad_settings(c)
    assert (s.margin_target, s.margin_mode, s.margin_weight) == ("autoencoder", "absolute", 1.0)
    assert c.variants.efficientad == {"efficientad.margin_weight": 0.0}
    with pytest.raises(ValueError, match="margin_target"):
        ead.efficientad_settings(_tiny_ead_config(margin_target="teacher"))
    with caplog.at_level("WARNING", logger="kdjax"):
        ead.efficientad_settings(_tiny_ead_config(margin_weight=1.0, margin_target="autoencoder",
                                                  margin_mode="relative", margin=1.0))
    assert "never active" in caplog.text


# ---------------------------------------------------------------------------
# CAD: global_learning_rate
# ---------------------------------------------------------------------------

def _cad(**cad):
    from kdjax.methods.cad import CAD

    c = load_config("loco_cad")
    c.teacher.weights = "random"
    c.teacher.allow_random = True
    c.teacher.width_divisor = 16
    for k, v in cad.items():
        c.update_from_flattened_dict({k: v})
    return CAD(c), c


def _fake_params():
    rng = np.random.default_rng(3)
    leaf = lambda *s: jnp.asarray(rng.normal(size=s).astype(np.float32))
    return {"local": {"bn": {"kernel": leaf(3, 4)}, "decoder": {"bias": leaf(5)}},
            "global": {"gccb": {"kernel": leaf(2, 3)}, "head": {"bias": leaf(4)}}}


def _updates(tx, params, steps=3):
    """Updates of ``steps`` steps with fixed pseudo-random gradients."""
    rng = np.random.default_rng(4)
    state = tx.init(params)
    out = []
    for _ in range(steps):
        g = jax.tree_util.tree_map(
            lambda p: jnp.asarray(rng.normal(size=p.shape).astype(np.float32)), params)
        u, state = tx.update(g, state, params)
        params = optax.apply_updates(params, u)
        out.append(u)
    return out


def test_cad_global_learning_rate():
    params = _fake_params()
    over = {}
    m, c = _cad(**over)
    assert m.cad.global_learning_rate < 0
    lr, b1, b2 = float(c.train.learning_rate), float(c.train.b1), float(c.train.b2)
    current = optax.adam(lr, b1=b1, b2=b2)
    default = _updates(m.optimizer(10), params)
    for u, v in zip(default, _updates(current, params)):  # the default: today's optimizer
        np.testing.assert_array_equal(*(np.concatenate([np.ravel(x) for x in
                                                        jax.tree_util.tree_leaves(t)])
                                        for t in (u, v)))
    # Adam's first update is -lr * g / (|g| + eps) per element: a direct formula
    want = jax.tree_util.tree_map(lambda g: -lr * g / (jnp.abs(g) + 1e-8),
                                  _first_grads(params))
    assert _max_diff(default[0], want) < 1e-7
    # same rate as train.learning_rate through multi_transform: the same updates
    m_same, _ = _cad(**over, **{"cad.global_learning_rate": lr})
    for u, v in zip(_updates(m_same.optimizer(10), params), default):
        assert _max_diff(u, v) <= 1e-9
    # another rate: the local group unchanged, the global group's updates scaled by glr / lr
    glr = lr / 8
    m_g, _ = _cad(**over, **{"cad.global_learning_rate": glr})
    for u, v in zip(_updates(m_g.optimizer(10), params), default):
        assert _max_diff(u["local"], v["local"]) == 0.0
        for x, y in zip(jax.tree_util.tree_leaves(u["global"]),
                        jax.tree_util.tree_leaves(v["global"])):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y) * (glr / lr), rtol=1e-6)


def _first_grads(params):
    rng = np.random.default_rng(4)  # the first gradients _updates draws
    return jax.tree_util.tree_map(
        lambda p: jnp.asarray(rng.normal(size=p.shape).astype(np.float32)), params)


# ---------------------------------------------------------------------------
# MRKD's test-time feature masking (mrkd.flm_at_test)
# ---------------------------------------------------------------------------

def test_mrkd_test_time_masking_is_the_official_protocol_and_reproducible():
    """Off (default): deterministic maps without masks. On: a fresh random mask per
    batch (each batch's maps differ from the unmasked ones, two batches draw different
    masks), drawn from the eval seed so that a rerun gives the same maps; the notes for
    results.json / results.md say which protocol ran."""
    import os
    import sys

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from test_engine import tiny_config

    from kdjax.methods import get_method

    x = jax.random.normal(jax.random.PRNGKey(1), (2, 32, 32, 3), jnp.float32)
    y = x + 0.25  # another batch
    out = {}
    for on in (False, True):
        c = tiny_config("mrkd")
        with c.unlocked():
            c.mrkd = base_config("mrkd").mrkd  # the demo config has no mrkd section
            c.mrkd.flm_at_test = on
        m = get_method(c)
        v = init_method(c, m, jax.random.PRNGKey(0), x.shape)
        f = jax.jit(lambda p, b: m.maps(p, v["state"], v["frozen"], b)["map"])
        out[on] = [np.asarray(f(v["params"], b)) for b in (x, x, y)]
        notes = " ".join(m.notes())
        assert ("flm_at_test=True): a random mask" in notes) == on
        assert ("without test-time feature masking" in notes) == (not on)
    off, on = out[False], out[True]
    np.testing.assert_array_equal(off[0], off[1])
    np.testing.assert_array_equal(on[0], on[1])  # the same batch, the same mask
    assert np.abs(on[0] - off[0]).max() > 1e-4 and np.abs(on[2] - off[2]).max() > 1e-4
    k = [np.asarray(m.test_mask_key(b)) for b in (x, x, y)]
    assert (k[0] == k[1]).all() and not (k[0] == k[2]).all()  # another batch, another mask
