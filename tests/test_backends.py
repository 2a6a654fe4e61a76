"""The code GPUs and TPUs run, exercised on the CPU: every registered method's loss,
gradients and maps computed with kdjax's CPU kernels (kdjax.backends.cpu) and with
the portable kernels (plain lax convolutions and residual adds, the GPU / TPU and
export path) agree.

The ResNet methods are compared computing in float64: the gradients of these tiny
untrained networks (BatchNorm over a few values, cosine losses) are so
ill-conditioned that a 1e-6 relative change of the input moves them by several
percent in float32, the size of the float32 summation-order differences between
the two paths; in float64 the paths agree to the test's tolerance, so the test sees
a wrong gradient and not rounding. Each convolution on its own is compared in
float32 in tests/test_fastconv.py.
"""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import backends
from kdjax.methods import METHODS, get_method
from kdjax.teacher import init_method

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def _config(name):
    if name == "efficientad":
        from test_efficientad import tiny_config

        c, size = tiny_config(), 64
    else:
        from test_engine import tiny_config

        c, size = tiny_config(name), 32
        c.train.compute_dtype = "float64"  # tests only; users get float32 / bfloat16
    with c.unlocked():
        c.data.category = "tray" if name != "efficientad" else "bottle"
    return c, size


def _trace(kernels, c, size):
    """Loss, gradients and maps of the method built with ``kernels``."""
    m = get_method(c, kernels)
    v = init_method(c, m, jax.random.PRNGKey(0), (2, size, size, 3))
    x = jax.random.normal(jax.random.PRNGKey(1), (2, size, size, 3), jnp.float32).astype(m.dtype)

    def loss(p):
        return m.loss(p, v["state"], v["frozen"], x, jax.random.PRNGKey(2))[0]

    val, grads = jax.jit(jax.value_and_grad(loss))(v["params"])
    maps = jax.jit(lambda p: m.maps(p, v["state"], v["frozen"], x))(v["params"])
    return val, grads, maps


@pytest.mark.parametrize("name", METHODS)
def test_cpu_kernels_and_portable_path_agree(name):
    c, size = _config(name)
    with jax.enable_x64(name != "efficientad"):
        a = _trace(backends.cpu_kernels(), c, size)
        b = _trace(backends.PORTABLE, c, size)
    np.testing.assert_allclose(float(a[0]), float(b[0]), rtol=1e-5, atol=1e-6)
    for ga, gb in zip(jax.tree_util.tree_leaves(a[1]), jax.tree_util.tree_leaves(b[1])):
        scale = max(float(jnp.max(jnp.abs(gb))), 1e-6)
        assert float(jnp.max(jnp.abs(ga - gb))) <= 1e-4 * scale + 1e-6
    for k in a[2]:
        np.testing.assert_allclose(np.asarray(a[2][k]), np.asarray(b[2][k]), rtol=1e-5,
                                   atol=1e-5)


def test_kernels_are_chosen_by_backend():
    assert backends.select("cpu") is backends.cpu_kernels()
    assert backends.select("gpu") is backends.PORTABLE is backends.select("tpu")
    assert backends.get("portable") is backends.PORTABLE
    with pytest.raises(ValueError, match="portable"):
        backends.get("gpu")
    c, _ = _config("rd4ad")
    assert get_method(c).kernels is backends.select()  # the engine's default
    assert get_method(c, backends.PORTABLE).teacher.kernels is backends.PORTABLE
