"""Export a trained model for serving: ``model.jax`` (jax.export) and ``model.onnx``.

``python -m kdjax.main --mode=export --workdir=W [--output=DIR] [--category=C]``
writes ``DIR/<category>/``:

* ``model.jax``: the serialized ``jax.export.Exported`` of
  uint8 (N, S, S, 3) -> (maps (N, S, S) float32, scores (N,) float32,
  is_anomalous (N,) bool), batch size N symbolic, with the trained weights,
  the map normalization and the decision threshold baked in. Run it with jax
  alone (no kdjax import)::

      from jax import export
      exp = export.deserialize(open("model.jax", "rb").read())
      maps, scores, is_anomalous = exp.call(images_uint8)

* ``model.json``: the model's description (kdjax.inference.Model.describe)
  plus the export's input and outputs;
* ``model.onnx`` when ``jax2onnx`` is installed (``pip install -e ".[export]"``),
  the same function for ONNX Runtime / OpenVINO.

The function is traced with the portable kernels (``kdjax.backends.PORTABLE``:
plain convolutions, no CPU-only custom gradients, barriers or compiler
options), so the artifact runs on every backend it was lowered for and
converts to ONNX.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np

from kdjax import backends
from kdjax.jsonio import write_json

log = logging.getLogger("kdjax")

PLATFORMS = ("cpu", "cuda", "tpu")


def portable_function(model):
    """uint8 (N, S, S, 3) -> (maps, scores, is_anomalous) with every weight a constant,
    computed with the portable kernels."""
    model = model.with_kernels(backends.PORTABLE)
    host = jax.device_get({"params": model.params, "state": model.state, "frozen": model.frozen})
    s = model.size
    threshold = model.threshold_value

    def fn(images_u8):
        maps, scores = model.forward(host["params"], host["state"], host["frozen"], images_u8,
                                     (s, s))
        thr = jnp.inf if threshold is None else jnp.float32(threshold)
        return maps, scores, scores > thr

    return fn


def export_jax(model, platforms=PLATFORMS):
    """The ``jax.export.Exported`` of :func:`portable_function` (batch symbolic).
    Lowered for ``platforms``; falls back to the current backend alone when a
    platform cannot be lowered here."""
    from jax import export

    s = model.size
    fn = portable_function(model)
    (b,) = export.symbolic_shape("b")
    spec = jax.ShapeDtypeStruct((b, s, s, 3), jnp.uint8)
    try:
        return export.export(jax.jit(fn), platforms=tuple(platforms))(spec)
    except Exception as e:  # a platform this jaxlib cannot lower for
        here = jax.default_backend()
        log.warning("Export for %s failed (%s); exporting for %s only.",
                    ",".join(platforms), str(e).splitlines()[0][:200], here)
        return export.export(jax.jit(fn), platforms=(here,))(spec)


def export_onnx(model, path: str, opset: int = 18) -> str:
    """``model.onnx`` through jax2onnx (the optional ``export`` extra): the
    :func:`portable_function` as an ONNX graph, input ``images`` uint8
    (N, S, S, 3) with the batch N symbolic, outputs ``maps`` float32 (N, S, S),
    ``scores`` float32 (N,), ``is_anomalous`` bool (N,); weights, normalization
    and threshold baked in. Opset 18 (ONNX Runtime >= 1.14, OpenVINO; every op
    used is older). Note OpenVINO's CPU plugin runs in bfloat16 by default on
    CPUs that have it: compile with ``{"INFERENCE_PRECISION_HINT": "f32"}`` for
    the float32 results."""
    from jax2onnx import to_onnx

    s = model.size
    fn = portable_function(model)
    with _jax2onnx_workarounds():
        proto = to_onnx(fn, [jax.ShapeDtypeStruct(("N", s, s, 3), jnp.uint8)],
                        model_name=f"kdjax_{model.method.name}_{model.category}",
                        opset=int(opset), input_names=["images"],
                        output_names=["maps", "scores", "is_anomalous"])
    with open(path, "wb") as f:
        f.write(proto.SerializeToString())
    return path


@contextlib.contextmanager
def _jax2onnx_workarounds():
    """jax2onnx set up to convert the jaxpr that jax itself runs, for the conversion only.

    * jax2onnx monkeypatches ``jax.numpy``, ``jax.nn``, ``jax.image`` and
      ``flax.linen`` functions and modules while tracing, to emit fused ONNX
      ops. Several rewrites do not take kdjax's calls (``flax.linen.max_pool`` /
      ``avg_pool``: no positional window shape nor explicit padding pairs), give
      a wrong graph (linen rewrites in MRKD: "Add: Incompatible dimensions" in
      ONNX Runtime), wrong shape metadata (linen Conv: NCHW shapes stamped on
      NHWC values; the ``jnp.einsum`` rewrite of the bilinear resize: batch 1 on
      the outputs) or change Python semantics (``jnp.shape`` returning a traced
      array breaks ``flax.linen.Dense``). All rewrites but those of
      ``jax2onnx.plugins.jax.lax`` are switched off: the lax primitives of the
      traced function are converted one by one, which is exact.
    * Importing the plugins replaces ``jax.numpy.cumsum`` for the whole
      process (jax2onnx 0.13: a version that refuses ``jnp.cumsum(x, 0)``);
      :func:`_namespaces_kept` puts jax's and flax's own functions back.
    * onnx_ir takes jax's symbolic dimensions (the batch ``N``) as symbolic
      ONNX dimensions (the lax.pad lowering builds an ``ir.Shape`` of them).
    * ``lax.reduce_window_max`` / ``reduce_window_sum`` are lowered as an N-d
      MaxPool / Conv over all four NHWC axes, which ONNX Runtime does not run
      (MaxPool: "Unsupported pooling size"): a 2-d pooling of an NHWC tensor
      becomes Transpose -> 2-d MaxPool / AveragePool -> Transpose
      (:func:`_nhwc_pool_lower`).
    """
    import onnx_ir
    from jax import export as jax_export
    from jax import lax
    from jax2onnx.plugins import plugin_system

    with _quiet_jax2onnx(), _namespaces_kept():
        plugin_system.import_all_plugins()
    registry = plugin_system.PLUGIN_REGISTRY
    saved = []

    def patch(owner, name, value):  # owner's own attribute (a classmethod as such)
        saved.append((owner, name, vars(owner)[name]))
        setattr(owner, name, value)

    to_dim = onnx_ir._core._maybe_convert_to_symbolic_dim

    def symbolic_to_dim(dim):
        if jax_export.is_symbolic_dim(dim):
            return onnx_ir.SymbolicDim(str(dim))
        return to_dim(dim)

    try:
        rewriters = [p for p in registry.values()
                     if isinstance(p, plugin_system.PrimitiveLeafPlugin)
                     and not type(p).__module__.startswith("jax2onnx.plugins.jax.lax.")]
        for c in {type(p) for p in rewriters}:
            if "binding_specs" in vars(c):  # monkeypatches while tracing
                patch(c, "binding_specs", classmethod(lambda cls: []))
        for p in rewriters:  # the older kind (flax.linen.Conv), set on the instance
            if callable(vars(p).get("patch_info")):
                patch(p, "patch_info", None)
        patch(onnx_ir._core, "_maybe_convert_to_symbolic_dim", symbolic_to_dim)
        for prim, op in ((lax.reduce_window_max_p, "MaxPool"),
                         (lax.reduce_window_sum_p, "AveragePool")):
            c = type(registry[prim.name])
            patch(c, "lower", _nhwc_pool_lower(c.__dict__["lower"], op))
        with _quiet_jax2onnx():
            yield
    finally:
        for owner, name, value in reversed(saved):
            setattr(owner, name, value)


_KEPT_NAMESPACES = ("jax", "jax.numpy", "jax.nn", "jax.image", "jax.lax", "flax.linen")


@contextlib.contextmanager
def _namespaces_kept():
    """Undo what the block sets or adds in the public namespaces of jax and flax
    (submodules imported meanwhile stay)."""
    import importlib
    import types

    modules = [importlib.import_module(m) for m in _KEPT_NAMESPACES]
    before = [dict(vars(m)) for m in modules]
    try:
        yield
    finally:
        for m, attrs in zip(modules, before):
            for name in [n for n, v in vars(m).items()
                         if n not in attrs and not isinstance(v, types.ModuleType)]:
                delattr(m, name)
            for name, value in attrs.items():
                if vars(m).get(name) is not value:
                    setattr(m, name, value)


class _DropMessages(logging.Filter):
    def __init__(self, *starts):
        super().__init__()
        self.starts = starts

    def filter(self, record):
        return not str(record.msg).startswith(self.starts)


@contextlib.contextmanager
def _quiet_jax2onnx():
    """Drop jax2onnx's warnings about its optional example / equinox / dm_pix
    plugins (not installed, not used) and onnx_ir's about untyped shape values
    it does not serialize."""
    filters = [(logging.getLogger("jax2onnx.plugins.plugin_system"),
                _DropMessages("Skipping import of", "Skipping pkgutil import of")),
               (logging.getLogger("onnx_ir.serde"),
                _DropMessages("The value type for shape"))]
    for logger, f in filters:
        logger.addFilter(f)
    try:
        yield
    finally:
        for logger, f in filters:
            logger.removeFilter(f)


def _nhwc_pool_lower(fallback, op: str):
    """A jax2onnx ``lower`` for reduce_window_{max,sum} over the H, W axes of an
    NHWC tensor as a 2-d ONNX pooling in NCHW; other windows go to ``fallback``."""
    import onnx_ir as ir
    from jax2onnx.plugins._ir_shapes import (_ensure_value_metadata, _stamp_type_and_shape,
                                             _to_ir_dim_for_shape)

    def stamp(ctx, v, dtype, dims):
        v.type = ir.TensorType(dtype)
        _stamp_type_and_shape(v, tuple(_to_ir_dim_for_shape(d) for d in dims))
        _ensure_value_metadata(ctx, v)

    def lower(self, ctx, eqn):
        p = eqn.params
        win = tuple(int(v) for v in p["window_dimensions"])
        strides = tuple(int(v) for v in p["window_strides"])
        pads = tuple(tuple(int(v) for v in pair) for pair in p["padding"])
        dilated = any(int(v) != 1 for v in tuple(p["base_dilation"]) + tuple(p["window_dilation"]))
        x_var, y_var = eqn.invars[0], eqn.outvars[0]
        dt = np.dtype(x_var.aval.dtype)
        if (len(win) != 4 or dilated or win[0] != 1 or win[3] != 1 or strides[0] != 1
                or strides[3] != 1 or pads[0] != (0, 0) or pads[3] != (0, 0)
                or not np.issubdtype(dt, np.floating)):
            return fallback(self, ctx, eqn)
        x = ctx.get_value_for_var(x_var, name_hint=ctx.fresh_name("pool_in"))
        out_spec = ctx.get_value_for_var(y_var, name_hint=ctx.fresh_name("pool_out"))
        dtype = x.dtype
        if dtype is None:
            dtype = out_spec.dtype
        xs, ys = tuple(x_var.aval.shape), tuple(y_var.aval.shape)
        b = ctx.builder
        nchw = b.Transpose(x, perm=[0, 3, 1, 2], _outputs=[ctx.fresh_name("pool_nchw")])
        stamp(ctx, nchw, dtype, (xs[0], xs[3], xs[1], xs[2]))
        kw = dict(kernel_shape=list(win[1:3]), strides=list(strides[1:3]),
                  pads=[pads[1][0], pads[2][0], pads[1][1], pads[2][1]])
        if op == "AveragePool":
            kw["count_include_pad"] = 1
        pooled = getattr(b, op)(nchw, _outputs=[ctx.fresh_name("pool")], **kw)
        stamp(ctx, pooled, dtype, (ys[0], ys[3], ys[1], ys[2]))
        if op == "AveragePool":  # the window's mean -> its sum
            k = b.add_initializer_from_array(name=ctx.fresh_name("pool_window_size"),
                                             array=np.asarray(win[1] * win[2], dt))
            pooled = b.Mul(pooled, k, _outputs=[ctx.fresh_name("pool_sum")])
            stamp(ctx, pooled, dtype, (ys[0], ys[3], ys[1], ys[2]))
        name = getattr(out_spec, "name", None) or ctx.fresh_name("pool_nhwc")
        producer = getattr(out_spec, "producer", lambda: None)
        if callable(producer) and producer() is not None:
            name = ctx.fresh_name("pool_nhwc")
        y = b.Transpose(pooled, perm=[0, 2, 3, 1], _outputs=[name])
        stamp(ctx, y, dtype, ys)
        ctx.bind_value_for_var(y_var, y)

    return lower


def onnx_available() -> bool:
    try:
        import jax2onnx  # noqa: F401
        import onnx  # noqa: F401
    except ImportError:
        return False
    return True


def export_model(model, out_dir: str, onnx: Optional[bool] = None) -> Dict[str, str]:
    """Write model.jax, model.json (and model.onnx) into ``out_dir``; the paths."""
    os.makedirs(out_dir, exist_ok=True)
    exp = export_jax(model)
    paths = {"model.jax": os.path.join(out_dir, "model.jax")}
    with open(paths["model.jax"], "wb") as f:
        f.write(exp.serialize())
    want_onnx = onnx_available() if onnx is None else bool(onnx)
    if want_onnx:
        if not onnx_available():
            raise ImportError("ONNX export needs jax2onnx and onnx: pip install -e \".[export]\"")
        paths["model.onnx"] = export_onnx(model, os.path.join(out_dir, "model.onnx"))
    elif onnx is None:
        log.info("model.onnx not written: install the export extra (pip install -e "
                 "\".[export]\") for ONNX.")
    desc = model.describe()
    s = model.size
    desc["export"] = {
        "model.jax": {"platforms": list(exp.platforms),
                      "input": f"uint8 (N, {s}, {s}, 3) RGB, N any",
                      "outputs": [f"maps float32 (N, {s}, {s})", "scores float32 (N,)",
                                  "is_anomalous bool (N,): score > threshold"]},
        "model.onnx": "written" if "model.onnx" in paths else "not written",
    }
    paths["model.json"] = write_json(os.path.join(out_dir, "model.json"), desc)
    return paths


def load_exported(path: str):
    """The deserialized ``jax.export.Exported`` of a ``model.jax`` file."""
    from jax import export

    with open(path, "rb") as f:
        return export.deserialize(bytearray(f.read()))


def run_exported(path: str, images: np.ndarray):
    """(maps, scores, is_anomalous) of a ``model.jax`` on uint8 images."""
    exp = load_exported(path)
    return tuple(np.asarray(a) for a in exp.call(jnp.asarray(images, jnp.uint8)))
