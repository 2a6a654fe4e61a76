"""Which implementation of convolutions and residual-block outputs the models trace.

kdjax's models call two functions whose implementation depends on where they
run: the convolution (:func:`kdjax.models.fastconv.conv_general_dilated`,
PDN's ``Conv2d``) and the residual block output
(:func:`kdjax.models.resnet.block_output`).

* ``"cpu"``: kdjax's CPU kernels: kernel and strided input gradients as
  matmuls, im2col forwards, materialized block outputs (XLA:CPU computes the
  plain versions several times slower; docs/BENCHMARKS.md).
* ``"portable"``: plain ``lax`` convolutions and plain residual adds, the
  code XLA runs on GPUs and TPUs. Exported models (``--mode=export``) are
  traced this way so the artifact runs on any backend and converts to ONNX.

By default the choice follows ``jax.default_backend()``; ``use("portable")``
overrides it for everything traced inside the ``with`` block (a jitted
function already traced keeps what it was traced with: trace a fresh one).
"""

from __future__ import annotations

import contextlib
import contextvars

import jax

IMPLEMENTATIONS = ("cpu", "portable")
_override: contextvars.ContextVar = contextvars.ContextVar("kdjax_backend", default=None)


def current() -> str:
    """The implementation traced now: the override of :func:`use`, else by backend."""
    o = _override.get()
    if o is not None:
        return o
    return "cpu" if jax.default_backend() == "cpu" else "portable"


def cpu_kernels() -> bool:
    """Whether the models trace kdjax's CPU kernels."""
    return current() == "cpu"


@contextlib.contextmanager
def use(name: str):
    """Trace with the implementation ``name`` ("cpu" or "portable") inside the block."""
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"Unknown implementation {name!r}: use one of {IMPLEMENTATIONS}.")
    token = _override.set(name)
    try:
        yield
    finally:
        _override.reset(token)
