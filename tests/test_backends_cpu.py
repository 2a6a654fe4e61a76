"""kdjax.backends.jit: jax.jit with the CPU kernels' compiler options
(kdjax.backends.cpu), and its fallbacks; the CPU kernels' block output."""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import backends
from kdjax.backends import cpu


def _conv_block(x, w):
    y = jax.lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jnp.sum(jax.nn.relu(y.reshape(-1, y.shape[-1]) @ w[1, 1].T), axis=0)


def test_options_given_on_cpu_and_values_unchanged():
    assert jax.default_backend() == "cpu"
    assert backends.compiler_options() == cpu.CPU_OPTIONS  # this jaxlib accepts them
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 9, 9, 8)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((3, 3, 8, 8)), jnp.float32)
    ours = backends.jit(_conv_block)(x, w)
    np.testing.assert_allclose(ours, jax.jit(_conv_block)(x, w), rtol=1e-5, atol=1e-5)
    # The ahead-of-time path (benchmarks) compiles with the same options.
    np.testing.assert_allclose(backends.jit(_conv_block).lower(x, w).compile()(x, w), ours,
                               rtol=0, atol=0)


def test_decorator_and_jit_arguments():
    @backends.jit(static_argnums=1)
    def scaled(a, k):
        return a * k

    assert float(scaled(jnp.ones(()), 3)) == 3.0
    donated = backends.jit(lambda a: a + 1, donate_argnums=0)
    assert float(donated(jnp.zeros(()))) == 1.0


def test_env_switch_keeps_xla_defaults(monkeypatch):
    monkeypatch.setenv(cpu.ENV, "default")
    assert backends.compiler_options() == {}
    assert float(backends.jit(lambda a: a * 2)(jnp.ones(()))) == 2.0


def test_unknown_options_fall_back_to_defaults(monkeypatch, caplog):
    monkeypatch.setattr(cpu, "CPU_OPTIONS", {"xla_cpu_no_such_option_for_kdjax": "1"})
    cpu._accepted.cache_clear()
    try:
        with caplog.at_level(logging.INFO, logger="kdjax.backends.cpu"):
            assert backends.compiler_options() == {}
        assert "not accepted by this jaxlib" in caplog.text
        assert float(backends.jit(lambda a: a - 1)(jnp.ones(()))) == 0.0
    finally:
        cpu._accepted.cache_clear()


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_no_options_off_the_cpu(backend):
    assert cpu._accepted(backend, False) == ()


def test_block_output_is_the_identity_with_its_gradient():
    """The CPU kernels' block output only decides where XLA materializes a residual
    block's output: values and gradients pass through unchanged (jitted and not)."""
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 5, 5, 3)), jnp.float32)
    np.testing.assert_array_equal(cpu.block_output(x), x)
    np.testing.assert_array_equal(jax.jit(cpu.block_output)(x), x)
    g = jax.jit(jax.grad(lambda v: jnp.sum(jnp.sin(cpu.block_output(v)))))(x)
    np.testing.assert_allclose(g, jnp.cos(x), rtol=1e-6)
