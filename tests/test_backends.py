"""The code GPUs and TPUs run, exercised on the CPU: every method's loss, gradients
and maps traced through kdjax's CPU kernels (kdjax.backends "cpu") and through the
portable path (plain lax convolutions and residual adds, "portable") agree.

The ResNet methods are compared computing in float64: the gradients of these
tiny untrained networks (BatchNorm over a few values, cosine losses) are so
ill-conditioned that a 1e-6 relative change of the input moves them by several
percent in float32, the size of the float32 summation-order differences between
the two paths; in float64 the paths agree to the test's tolerance, so the test
sees a wrong gradient and not rounding. Each convolution on its own is compared
in float32 in tests/test_fastconv.py.
"""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import backends

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def _method(name, monkeypatch):
    from kdjax.methods import get_method, rd4ad

    if name == "efficientad":
        from test_efficientad import tiny_config

        c = tiny_config()
        size = 64
    else:
        from test_engine import tiny_config

        c = tiny_config(name)
        size = 32
        monkeypatch.setattr(rd4ad, "compute_dtype", lambda config: jnp.float64)
    with c.unlocked():
        c.data.category = "tray" if name != "efficientad" else "bottle"
    m = get_method(c)
    v = m.init(jax.random.PRNGKey(0), (2, size, size, 3))
    x = jax.random.normal(jax.random.PRNGKey(1), (2, size, size, 3), jnp.float32)
    if name != "efficientad":
        x = x.astype(jnp.float64)
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
def test_cpu_kernels_and_portable_path_agree(name, monkeypatch):
    with jax.enable_x64(name != "efficientad"):
        m, v, x = _method(name, monkeypatch)
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
