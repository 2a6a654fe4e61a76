"""The one seam between kdjax's models and the code that runs them fast.

kdjax's models are plain Flax: ``nn.Conv`` convolutions and plain residual
adds. What differs between backends is handed to them as one
:class:`Kernels` value (a module attribute, ``kernels=``), chosen once by the
engine (:func:`select`) when it builds a method:

* :data:`PORTABLE`: ``lax.conv_general_dilated`` and the identity on residual
  outputs: the code XLA runs on GPUs and TPUs, and the one exported models
  (``--mode=export``) are traced with, so the artifact runs on any backend and
  converts to ONNX.
* ``cpu.KERNELS`` (:mod:`kdjax.backends.cpu`): XLA:CPU computes some
  convolution gradients and residual chains several times slower than the
  same arithmetic written as matmuls and materialized values; the CPU kernels
  compute the same functions that way (docs/BENCHMARKS.md has the measured
  speeds; tests/test_backends.py checks both give the same losses, gradients
  and maps).

:func:`jit` is ``jax.jit`` with the XLA compiler options of the process's
backend (on the CPU, :data:`kdjax.backends.cpu.CPU_OPTIONS`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Optional

import jax
from jax import lax

IMPLEMENTATIONS = ("cpu", "portable")


def _identity(x):
    return x


def _lax_conv(x, w, stride: int, padding: int):
    """A torch-style square convolution: NHWC / HWIO, ``stride``, ``padding`` zeros on
    every side."""
    p = int(padding)
    return lax.conv_general_dilated(x, w, (stride, stride), ((p, p), (p, p)),
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"))


@dataclasses.dataclass(frozen=True)
class Kernels:
    """How kdjax's models compute what backends compute at different speeds.

    Attributes:
      name: "portable" or "cpu".
      conv: ``nn.Conv``'s ``conv_general_dilated`` (the ResNet teachers, the RD
        students, CAD's global branch).
      block_output: applied to each residual block's output.
      pdn_conv_train / pdn_conv: ``(x, w, stride, padding) -> y``, EfficientAD's
        PDN / autoencoder convolutions in the training step / at inference (the
        frozen teacher included).
    """

    name: str
    conv: Callable = lax.conv_general_dilated
    block_output: Callable = _identity
    pdn_conv_train: Callable = _lax_conv
    pdn_conv: Callable = _lax_conv


PORTABLE = Kernels("portable")


def cpu_kernels() -> Kernels:
    from kdjax.backends import cpu

    return cpu.KERNELS


def get(name: str) -> Kernels:
    """The kernels named ``name`` ("cpu" or "portable")."""
    if name == "portable":
        return PORTABLE
    if name == "cpu":
        return cpu_kernels()
    raise ValueError(f"Unknown kernels {name!r}: use one of {', '.join(IMPLEMENTATIONS)}.")


def select(platform: Optional[str] = None) -> Kernels:
    """The kernels for ``platform`` (default: ``jax.default_backend()``): the CPU
    kernels on the CPU, the portable ones elsewhere."""
    platform = jax.default_backend() if platform is None else platform
    return cpu_kernels() if platform == "cpu" else PORTABLE


def compiler_options() -> dict:
    """The XLA compiler options kdjax's jitted functions get on this process's
    default backend (:func:`kdjax.backends.cpu.compiler_options` on the CPU)."""
    if jax.default_backend() != "cpu":
        return {}
    from kdjax.backends import cpu

    return cpu.compiler_options()


def jit(fun=None, **kwargs):
    """``jax.jit(fun, **kwargs)`` with :func:`compiler_options`; also a decorator.

    jax accepts compiler options only on a top-level jit: a function made here
    cannot be called inside another jitted function (jax raises a ValueError);
    trace the undecorated function there instead."""
    if fun is None:
        return functools.partial(jit, **kwargs)
    return jax.jit(fun, compiler_options=compiler_options() or None, **kwargs)


__all__ = ["IMPLEMENTATIONS", "Kernels", "PORTABLE", "compiler_options", "cpu_kernels", "get",
           "jit", "select"]
