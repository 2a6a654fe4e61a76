"""Host-side (numpy) initialisation of Flax modules with PyTorch's schemes.

Two reasons: fidelity (the reference RD4AD/MRKD code initialises its student
convs with ``kaiming_normal_(mode="fan_out", nonlinearity="relu")`` and leaves
torch defaults elsewhere; EfficientAD's reference uses torch defaults), and
speed (a jitted Flax ``init`` of a WRN-sized decoder costs a full XLA compile,
tens of seconds on a CPU; shapes from ``jax.eval_shape`` plus numpy take well
under a second).

Schemes per leaf (torch's conventions for fan-in/fan-out):
- Conv kernel (Flax HWIO; torch fan_in = I*kh*kw, fan_out = O*kh*kw):
  ``conv="kaiming_fan_out"``: N(0, 2 / fan_out); ``conv="torch_default"``:
  U(+-1/sqrt(fan_in)) (kaiming_uniform with a=sqrt(5)).
- ConvTranspose kernel (Flax (kh, kw, out, in) with transpose_kernel=True; torch
  weight (in, out, kh, kw), fan_in = out*kh*kw): torch default U(+-1/sqrt(fan_in)).
- Conv / Dense bias: U(+-1/sqrt(fan_in)); BatchNorm scale 1, bias 0, mean 0, var 1.
"""

from __future__ import annotations

from typing import Any, Callable, Dict

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict


def seed_of(rng) -> int:
    """A host integer seed derived from a JAX key (typed or raw), for the host-side
    initializers below."""
    data = jax.random.key_data(rng) if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key) else rng
    return int(np.asarray(data).astype(np.uint64).sum() % (2**32))


def host_init(module: nn.Module, seed: int, leaf_init: Callable, *args,
              **kwargs) -> Dict[str, Any]:
    """Variables of ``module.init(rng, *args, **kwargs)`` drawn with numpy on the host.

    Shapes come from ``jax.eval_shape`` (``args`` may be ``jax.ShapeDtypeStruct``) and
    each leaf from ``leaf_init(rng, module_class, path, shape, flat_collection)``, in
    ``flatten_dict`` order, so a seed gives the same values every time.
    """
    kinds: Dict[tuple, type] = {}

    def record(next_fun, a, k, context):
        kinds[tuple(context.module.path)] = type(context.module)
        return next_fun(*a, **k)

    with nn.intercept_methods(record):
        shapes = jax.eval_shape(lambda *a: module.init(jax.random.PRNGKey(0), *a, **kwargs), *args)
    rng = np.random.default_rng(seed)
    out = {}
    for collection, tree in shapes.items():
        flat = flatten_dict(tree)
        out[collection] = unflatten_dict({
            path: np.asarray(leaf_init(rng, kinds.get(tuple(path[:-1])), path, leaf.shape, flat),
                             dtype=leaf.dtype)
            for path, leaf in flat.items()})
    return out


def torch_style_init(module: nn.Module, seed: int, *args, conv: str = "kaiming_fan_out",
                     **kwargs) -> Dict[str, Any]:
    """Variables of ``module.init(rng, *args, **kwargs)`` with torch's schemes (above)."""

    def leaf(rng, cls, path, shape, flat):
        kernel = flat.get(tuple(path[:-1]) + ("kernel",))
        return _init_leaf(rng, cls, path[-1], shape, conv,
                          kernel.shape if kernel is not None else None)

    return host_init(module, seed, leaf, *args, **kwargs)


def _init_leaf(rng, cls, name: str, shape, conv: str, kernel_shape=None) -> np.ndarray:
    if cls is not None and issubclass(cls, nn.BatchNorm):
        return np.ones(shape) if name in ("scale", "var") else np.zeros(shape)
    if name == "var":
        return np.ones(shape)
    if name == "mean":
        return np.zeros(shape)
    transpose = cls is not None and issubclass(cls, nn.ConvTranspose)
    if name == "kernel":
        rf = int(np.prod(shape[:-2])) if len(shape) > 2 else 1
        if transpose:  # (kh, kw, out, in): torch fan_in = out * kh * kw
            bound = 1.0 / np.sqrt(shape[-2] * rf)
            return rng.uniform(-bound, bound, shape)
        fan_in, fan_out = shape[-2] * rf, shape[-1] * rf
        if conv == "kaiming_fan_out" and len(shape) > 2:
            return rng.normal(0.0, np.sqrt(2.0 / fan_out), shape)
        bound = 1.0 / np.sqrt(fan_in)
        return rng.uniform(-bound, bound, shape)
    if name == "bias":  # torch: U(+-1/sqrt(fan_in)) with the layer's kernel fan_in
        # HWIO conv: I*kh*kw; (kh, kw, out, in) transpose: out*kh*kw -- both shape[-2]*kh*kw
        fan_in = shape[0] if kernel_shape is None else (
            kernel_shape[-2] * int(np.prod(kernel_shape[:-2])))
        bound = 1.0 / np.sqrt(max(fan_in, 1))
        return rng.uniform(-bound, bound, shape)
    if name == "scale":
        return np.ones(shape)
    raise ValueError(f"torch_style_init: no rule for a leaf named {name!r} of {cls}.")
