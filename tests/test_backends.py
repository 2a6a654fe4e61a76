"""The code GPUs and TPUs run, exercised on the CPU: every method's loss, gradients
and maps traced through kdjax's CPU kernels (kdjax.backends "cpu") and through the
portable path (plain lax convolutions and residual adds, "portable") agree."""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import backends

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def _method(name):
    from kdjax.methods import get_method

    if name == "efficientad":
        from test_efficientad import tiny_config

        c = tiny_config()
        size = 64
    else:
        from test_engine import tiny_config

        c = tiny_config(name)
        size = 32
    with c.unlocked():
        c.data.category = "tray" if name != "efficientad" else "bottle"
    m = get_method(c)
    v = m.init(jax.random.PRNGKey(0), (2, size, size, 3))
    x = jax.random.normal(jax.random.PRNGKey(1), (2, size, size, 3), jnp.float32)
    return m, v, x


def _trace(impl, m, v, x):
    """Loss, gradients and maps, each traced fresh under ``impl``."""
    with backends.use(impl):
        def loss(p):
            return m.loss(p, v["state"], v["frozen"], x, jax.random.PRNGKey(2))[0]

        val, grads = jax.jit(jax.value_and_grad(loss))(v["params"])
        maps = jax.jit(lambda p: m.maps(p, v["state"], v["frozen"], x))(v["params"])
    return val, grads, maps


@pytest.mark.parametrize("name", ["rd4ad", "mrkd", "cad", "efficientad"])
def test_cpu_kernels_and_portable_path_agree(name):
    m, v, x = _method(name)
    a = _trace("cpu", m, v, x)
    b = _trace("portable", m, v, x)
    np.testing.assert_allclose(float(a[0]), float(b[0]), rtol=1e-5, atol=1e-6)
    for ga, gb in zip(jax.tree_util.tree_leaves(a[1]), jax.tree_util.tree_leaves(b[1])):
        scale = max(float(jnp.max(jnp.abs(gb))), 1e-6)
        assert float(jnp.max(jnp.abs(ga - gb))) <= 1e-4 * scale + 1e-6
    for k in a[2]:
        np.testing.assert_allclose(np.asarray(a[2][k]), np.asarray(b[2][k]), rtol=1e-5,
                                   atol=1e-5)


def test_use_overrides_and_restores():
    default = backends.current()
    with backends.use("portable"):
        assert backends.current() == "portable" and not backends.cpu_kernels()
    assert backends.current() == default
    with pytest.raises(ValueError, match="portable"):
        with backends.use("gpu"):
            pass
