"""``jax.jit`` with kdjax's XLA compiler options (CPU backend).

XLA:CPU hands dots and convolutions to a kernel library chosen by compiler
options. With the defaults of the jaxlib kdjax was measured on (0.10.2) that
is YNNPACK, whose fp32 matmuls run 20-30% below XNNPACK's and XLA's own
(Eigen) on a 2-core x86 machine: e.g. a 4096^3 matmul at 128-133 against
151-174 GFLOP/s, (8192 x 2304) x 256 at 110-124 against 144-169 GFLOP/s.
kdjax therefore compiles its jitted functions on the CPU with
:data:`CPU_OPTIONS`: dots and convolutions go to XNNPACK, reductions stay with
YNNPACK. The values are the same up to float summation order.

``KDJAX_XLA_CPU_OPTIONS=default`` in the environment keeps XLA's defaults. A
jaxlib that does not know these options (they are experimental) gets its
defaults too, with one log line. Other backends are never given options.

jax accepts compiler options only on a top-level jit: a function made by
:func:`jit` cannot be called inside another jitted function (jax raises a
ValueError). Trace the undecorated function there instead.
"""

from __future__ import annotations

import functools
import logging
import os

import jax
import jax.numpy as jnp

log = logging.getLogger(__name__)

_FT = "LIBRARY_FUSION_TYPE_"
CPU_OPTIONS = {
    "xla_cpu_experimental_xnn_fusion_type": f"{_FT}INDIVIDUAL_DOT,{_FT}INDIVIDUAL_CONVOLUTION",
    "xla_cpu_experimental_ynn_fusion_type": f"{_FT}REDUCE",
}
ENV = "KDJAX_XLA_CPU_OPTIONS"


@functools.lru_cache(maxsize=None)
def _accepted(backend: str, disabled: bool) -> tuple:
    if backend != "cpu" or disabled:
        return ()
    try:
        jax.jit(lambda a: a @ a, compiler_options=CPU_OPTIONS).lower(
            jnp.ones((2, 2), jnp.float32)).compile()
    except Exception as e:  # an older or newer jaxlib without these options
        log.info("XLA:CPU compiler options %s not accepted by this jaxlib (%s); using "
                 "XLA's defaults.", sorted(CPU_OPTIONS), str(e).splitlines()[0][:200])
        return ()
    return tuple(sorted(CPU_OPTIONS.items()))


def compiler_options() -> dict:
    """The compiler options kdjax's jitted functions get on this process's
    default backend: :data:`CPU_OPTIONS` on the CPU (unless disabled with
    ``KDJAX_XLA_CPU_OPTIONS=default`` or not known to this jaxlib), else none."""
    disabled = os.environ.get(ENV, "").strip().lower() == "default"
    return dict(_accepted(jax.default_backend(), disabled))


def jit(fun=None, **kwargs):
    """``jax.jit(fun, **kwargs)`` with :func:`compiler_options`; also a decorator."""
    if fun is None:
        return functools.partial(jit, **kwargs)
    return jax.jit(fun, compiler_options=compiler_options() or None, **kwargs)


__all__ = ["CPU_OPTIONS", "ENV", "compiler_options", "jit"]
