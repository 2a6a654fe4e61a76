"""kdjax's CPU kernels: the same functions as the portable ones, computed the way
XLA:CPU runs fast (docs/BENCHMARKS.md, "CPU kernels", has the measurements).

* Convolutions (:func:`kdjax.backends.fastconv.conv_general_dilated`): kernel
  gradients and strided input gradients as matmuls, im2col forwards for strided
  convolutions and small maps, 1x1 convolutions as matmuls.
* Residual block outputs (:func:`block_output`): materialized once. XLA:CPU
  fuses cheap elementwise producers into every consumer, so each block's
  ``relu(bn(y) + identity)`` was otherwise recomputed inside the next blocks'
  fusions along the whole residual chain.
* EfficientAD's PDN and autoencoder train with im2col convolutions
  (:func:`pdn_conv_train`): XLA:CPU's kernel gradient of their padded 4x4
  convolutions is far slower than the forward; at inference they use XLA's
  convolution (faster there).
* XLA compiler options (:data:`CPU_OPTIONS`): dots and convolutions go to
  XNNPACK instead of the jaxlib default (YNNPACK, whose fp32 matmuls were
  slower on the machines kdjax was tuned on); reductions stay with YNNPACK. ``KDJAX_XLA_CPU_OPTIONS=default`` in the environment keeps XLA's
  defaults; a jaxlib that does not know these (experimental) options gets its
  defaults too, with one log line.

Values are the portable path's up to float summation order
(tests/test_backends.py).
"""

from __future__ import annotations

import functools
import logging
import os

import jax
import jax.numpy as jnp

from kdjax.backends import Kernels, fastconv

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
    """:data:`CPU_OPTIONS` when the process's default backend is the CPU (unless
    disabled with ``KDJAX_XLA_CPU_OPTIONS=default`` or not known to this jaxlib),
    else none."""
    disabled = os.environ.get(ENV, "").strip().lower() == "default"
    return dict(_accepted(jax.default_backend(), disabled))


def block_output(x):
    """A residual block's output, computed once: returned through a ``lax.cond``,
    whose result XLA must materialize (it does not fuse across control flow), on
    a predicate that is always true but hidden behind an optimization barrier so
    that XLA cannot fold the conditional away. The other branch is never taken;
    it only has to differ from the first (XLA merges a conditional with
    identical branches)."""
    always = jax.lax.optimization_barrier(jnp.ones((), bool))
    return jax.lax.cond(always, lambda v: v, jnp.zeros_like, x)


def pdn_conv_train(x, w, stride: int, padding: int):
    """A torch-style square convolution (NHWC / HWIO, ``padding`` zeros on every
    side) as im2col matmuls: stride 1 through :func:`fastconv.im2col_conv` (kernel
    gradient from the saved patches, input gradient as XLA's flipped-kernel
    convolution), other strides as one patches-times-kernel matmul."""
    k, _, cin, features = w.shape
    p = int(padding)
    if stride == 1 and k > 1 and p < k:
        return fastconv.im2col_conv(x, w, ((p, p), (p, p)))
    if p:
        x = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
    if not (k == 1 and stride == 1):
        x = fastconv.patches(x, (k, k), (stride, stride), ((0, 0), (0, 0)))
    return jnp.dot(x, w.reshape(k * k * cin, features))


KERNELS = Kernels("cpu", conv=fastconv.conv_general_dilated, block_output=block_output,
                  pdn_conv_train=pdn_conv_train)

__all__ = ["CPU_OPTIONS", "ENV", "KERNELS", "block_output", "compiler_options",
           "pdn_conv_train"]
