"""Losses against direct numpy computations (tiny shapes)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import losses


def _np_affinity(f):
    f = f.reshape(f.shape[0], -1, f.shape[-1]).astype(np.float64)
    fn = f / np.maximum(np.linalg.norm(f, axis=-1, keepdims=True), 1e-8)
    return np.einsum("npc,nqc->npq", fn, fn)


def _np_dist(d, distance):
    return np.abs(d) if distance == "l1" else d * d


def _feats(seed, shape):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


# --- existing losses --------------------------------------------------------

def test_cosine_distance_map_and_flat_loss_match_numpy():
    t, s = _feats(0, (2, 3, 4, 5)), _feats(1, (2, 3, 4, 5))
    cos = np.sum(t * s, -1) / (np.linalg.norm(t, axis=-1) * np.linalg.norm(s, axis=-1))
    np.testing.assert_allclose(losses.cosine_distance_map(t, s), 1 - cos, rtol=1e-5, atol=1e-6)
    tf, sf = t.reshape(2, -1), s.reshape(2, -1)
    flat = 1 - np.sum(tf * sf, -1) / (np.linalg.norm(tf, axis=-1) * np.linalg.norm(sf, axis=-1))
    got = losses.flat_cosine_loss([t, t], [s, t])
    np.testing.assert_allclose(got, flat.mean(), rtol=1e-5, atol=1e-6)


def test_hard_feature_loss_matches_numpy():
    d = _feats(2, (4, 6, 6)) ** 2
    q = np.quantile(d, 0.9)
    np.testing.assert_allclose(losses.hard_feature_loss(d, 0.9), d[d >= q].mean(), rtol=1e-5)


# --- contextual affinity ----------------------------------------------------

def test_affinity_matrix_matches_numpy():
    f = _feats(3, (2, 3, 5, 7))
    a = losses.affinity_matrix(f, precision="highest")
    np.testing.assert_allclose(a, _np_affinity(f), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.diagonal(a, axis1=1, axis2=2), 1.0, atol=1e-6)


@pytest.mark.parametrize("distance", ["l1", "l2"])
@pytest.mark.parametrize("block", [4, 7, 64])  # divides P=28, does not, covers all rows
def test_affinity_loss_and_map_chunked_equal_direct_and_numpy(distance, block):
    # Teacher and student with different channel counts: only positions must agree.
    t, s = _feats(4, (2, 4, 7, 6)), _feats(5, (2, 4, 7, 3))
    e = _np_dist(_np_affinity(t) - _np_affinity(s), distance)
    want_loss = e.mean()
    p = e.shape[-1]
    want_map = ((e.sum(-1) - np.diagonal(e, axis1=1, axis2=2)) / (p - 1)).reshape(2, 4, 7)
    kw = dict(distance=distance, precision="highest")
    np.testing.assert_allclose(losses.affinity_loss_direct(t, s, **kw), want_loss, rtol=1e-5)
    np.testing.assert_allclose(losses.affinity_loss(t, s, block=block, **kw), want_loss, rtol=1e-5)
    np.testing.assert_allclose(losses.affinity_discrepancy_map_direct(t, s, **kw), want_map,
                               rtol=1e-5, atol=1e-6)
    got_map = losses.affinity_discrepancy_map(t, s, block=block, **kw)
    assert got_map.shape == (2, 4, 7)
    np.testing.assert_allclose(got_map, want_map, rtol=1e-5, atol=1e-6)
    # (N, P, C) input gives (N, P) maps.
    flat = losses.affinity_discrepancy_map(t.reshape(2, 28, 6), s.reshape(2, 28, 3), block=block, **kw)
    np.testing.assert_allclose(flat, want_map.reshape(2, 28), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("distance", ["l1", "l2"])
def test_affinity_loss_chunked_gradient_equals_direct(distance):
    t, s = jnp.asarray(_feats(6, (2, 5, 6, 4))), jnp.asarray(_feats(7, (2, 5, 6, 8)))
    kw = dict(distance=distance, precision="highest")
    g_direct = jax.grad(lambda x: losses.affinity_loss_direct(t, x, **kw))(s)
    g_chunk = jax.jit(jax.grad(lambda x: losses.affinity_loss(t, x, block=8, **kw)))(s)
    assert float(jnp.max(jnp.abs(g_direct))) > 0
    np.testing.assert_allclose(g_chunk, g_direct, rtol=1e-4, atol=1e-7)
    # Finite differences on one coordinate against numpy's loss.
    eps = 1e-3
    s_np = np.asarray(s, np.float64)
    idx = (1, 2, 3, 5)
    sp, sm = s_np.copy(), s_np.copy()
    sp[idx] += eps
    sm[idx] -= eps
    tn = np.asarray(t, np.float64)
    num = (_np_dist(_np_affinity(tn) - _np_affinity(sp), distance).mean()
           - _np_dist(_np_affinity(tn) - _np_affinity(sm), distance).mean()) / (2 * eps)
    np.testing.assert_allclose(g_chunk[idx], num, rtol=2e-2, atol=1e-6)


def test_contextual_affinity_loss_sums_scales_and_checks_shapes():
    a, b = _feats(8, (1, 4, 4, 3)), _feats(9, (1, 4, 4, 5))
    c, d = _feats(10, (1, 2, 2, 3)), _feats(11, (1, 2, 2, 2))
    total = losses.contextual_affinity_loss([a, c], [b, d], block=3)
    np.testing.assert_allclose(
        total, losses.affinity_loss_direct(a, b) + losses.affinity_loss_direct(c, d), rtol=1e-5)
    with pytest.raises(ValueError, match="same positions"):
        losses.affinity_loss(a, d)
    with pytest.raises(ValueError, match="'l1' or 'l2'"):
        losses.affinity_loss(a, b, distance="l3")


def test_gradients_are_finite_at_an_all_zero_feature_vector():
    """A position whose features are all zero (a ReLU can zero a whole vector) gives
    finite gradients in every cosine and affinity loss (sqrt's gradient at 0 is inf)."""
    rng = np.random.default_rng(0)
    t = jnp.asarray(rng.normal(size=(2, 4, 4, 8)), jnp.float32)
    s = jnp.asarray(rng.normal(size=(2, 4, 4, 8)), jnp.float32).at[0, 1, 2].set(0.0)
    for fn in (lambda s: losses.flat_cosine_loss([t], [s]),
               lambda s: jnp.mean(losses.cosine_distance_map(t, s)),
               lambda s: losses.contextual_affinity_loss([t], [s], block=4)):
        g = jax.grad(fn)(s)
        assert bool(jnp.all(jnp.isfinite(g))) and float(fn(s)) == float(fn(s))
