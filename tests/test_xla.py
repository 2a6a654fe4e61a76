"""kdjax.xla: jax.jit with kdjax's CPU compiler options, and its fallbacks."""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import xla


def _conv_block(x, w):
    y = jax.lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jnp.sum(jax.nn.relu(y.reshape(-1, y.shape[-1]) @ w[1, 1].T), axis=0)


def test_options_given_on_cpu_and_values_unchanged():
    assert jax.default_backend() == "cpu"
    assert xla.compiler_options() == xla.CPU_OPTIONS  # this jaxlib accepts them
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 9, 9, 8)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((3, 3, 8, 8)), jnp.float32)
    ours = xla.jit(_conv_block)(x, w)
    np.testing.assert_allclose(ours, jax.jit(_conv_block)(x, w), rtol=1e-5, atol=1e-5)
    # The ahead-of-time path (benchmarks) compiles with the same options.
    np.testing.assert_allclose(xla.jit(_conv_block).lower(x, w).compile()(x, w), ours,
                               rtol=0, atol=0)


def test_decorator_and_jit_arguments():
    @xla.jit(static_argnums=1)
    def scaled(a, k):
        return a * k

    assert float(scaled(jnp.ones(()), 3)) == 3.0
    donated = xla.jit(lambda a: a + 1, donate_argnums=0)
    assert float(donated(jnp.zeros(()))) == 1.0


def test_env_switch_keeps_xla_defaults(monkeypatch):
    monkeypatch.setenv(xla.ENV, "default")
    assert xla.compiler_options() == {}
    assert float(xla.jit(lambda a: a * 2)(jnp.ones(()))) == 2.0


def test_unknown_options_fall_back_to_defaults(monkeypatch, caplog):
    monkeypatch.setattr(xla, "CPU_OPTIONS", {"xla_cpu_no_such_option_for_kdjax": "1"})
    xla._accepted.cache_clear()
    try:
        with caplog.at_level(logging.INFO, logger="kdjax.xla"):
            assert xla.compiler_options() == {}
        assert "not accepted by this jaxlib" in caplog.text
        assert float(xla.jit(lambda a: a - 1)(jnp.ones(()))) == 0.0
    finally:
        xla._accepted.cache_clear()


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_no_options_off_the_cpu(backend):
    assert xla._accepted(backend, False) == ()
