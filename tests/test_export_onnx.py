"""kdjax.export.export_onnx (the ``export`` extra: jax2onnx, onnx, onnxruntime):
``model.onnx`` run by ONNX Runtime gives the jax Model's maps, scores and
decisions, for every method, at batch sizes 3 and 1 (the batch is symbolic).

Tiny untrained models (random teachers, 32 px; EfficientAD 64 px, widths / 16),
CAD and EfficientAD with a non-trivial map normalization, each with a threshold
between two images' scores. Skipped without the extra.
"""

import os
import sys

import jax
import numpy as np
import pytest

pytest.importorskip("jax2onnx")
pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:jax2onnx")

METHODS = ["rd4ad", "mrkd", "cad", "efficientad"]


def _model(name):
    from kdjax.inference import Model
    from kdjax.methods import get_method
    from kdjax.teacher import init_method

    if name == "efficientad":
        from test_efficientad import tiny_config

        c = tiny_config()
        size = 64
    else:
        from test_engine import tiny_config

        c = tiny_config(name)
        size = 32
    with c.unlocked():
        c.data.category = "tray"
    m = get_method(c)
    v = init_method(c, m, jax.random.PRNGKey(0), (1, size, size, 3))
    state = v["state"]
    if name == "efficientad":  # teacher feature statistics other than 0 / 1
        rng = np.random.default_rng(1)
        ch = state["teacher_mean"].shape[0]
        state = {"teacher_mean": rng.normal(0, 0.1, ch).astype(np.float32),
                 "teacher_std": rng.uniform(0.2, 0.5, ch).astype(np.float32)}
    norm = {"cad": {"local": (-0.05, 1.5), "global": (-0.1, 2.0)},
            "efficientad": {"local": (0.0, 0.1), "global": (0.01, 0.2)}}.get(name)
    return Model(c, m, v["params"], state, v["frozen"], norm=norm)


def test_conversion_leaves_jax_and_flax_unpatched():
    """jax2onnx's rewrites are switched off for the conversion only: its plugins,
    jax.numpy and flax.linen are as they were afterwards, every time, including
    jax.numpy.cumsum, which importing jax2onnx 0.13's plugins replaces for good."""
    import flax.linen as nn
    import jax.numpy as jnp
    from jax2onnx.plugins import plugin_system

    from kdjax.export import _jax2onnx_workarounds

    funcs = (jnp.cumsum, jnp.shape, jnp.einsum, nn.max_pool, nn.avg_pool, nn.Conv.__call__)
    with _jax2onnx_workarounds():  # the first time imports the plugins
        pass
    plugins = list(plugin_system.PLUGIN_REGISTRY.values())
    assert plugins
    owners = [type(p) for p in plugins] + [p for p in plugins if hasattr(p, "__dict__")]

    def snapshot():
        return [tuple(vars(o).get(k) for k in ("binding_specs", "patch_info", "lower"))
                for o in owners]

    before = snapshot()
    for _ in range(2):
        with _jax2onnx_workarounds():
            assert snapshot() != before
        after = snapshot()
        assert all(a is b for x, y in zip(after, before) for a, b in zip(x, y))
    assert (jnp.cumsum, jnp.shape, jnp.einsum, nn.max_pool, nn.avg_pool,
            nn.Conv.__call__) == funcs
    assert not hasattr(jnp, "cumsum_p")
    assert jnp.shape(jnp.zeros((2, 3))) == (2, 3)
    np.testing.assert_array_equal(jnp.cumsum(jnp.ones((2, 3)), 1), [[1, 2, 3], [1, 2, 3]])


@pytest.mark.parametrize("name", METHODS)
def test_onnx_runtime_equals_model(name, tmp_path):
    import onnx

    from kdjax.export import export_onnx, onnx_available

    assert onnx_available()
    model = _model(name)
    s = model.size
    images = np.random.default_rng(0).integers(0, 256, (3, s, s, 3), dtype=np.uint8)
    want_maps, want_scores = model.predict(images)
    ranked = np.sort(want_scores)  # the threshold: in the widest gap between two scores
    gap = int(np.argmax(np.diff(ranked)))
    assert ranked[gap + 1] - ranked[gap] > 1e-3
    model.threshold = {"value": float(ranked[gap] + ranked[gap + 1]) / 2}
    path = export_onnx(model, str(tmp_path / "model.onnx"))
    proto = onnx.load(path)
    onnx.checker.check_model(proto, full_check=True)
    # uint8 NHWC input, symbolic batch; named outputs with the same batch.
    (inp,) = proto.graph.input
    assert inp.name == "images"
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    assert dims == ["N", s, s, 3]
    assert [o.name for o in proto.graph.output] == ["maps", "scores", "is_anomalous"]
    for o in proto.graph.output:
        assert o.type.tensor_type.shape.dim[0].dim_param == "N"

    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    maps, scores, anomalous = sess.run(None, {"images": images})
    assert maps.dtype == np.float32 and maps.shape == (3, s, s)
    assert scores.dtype == np.float32 and scores.shape == (3,)
    assert anomalous.dtype == np.bool_ and anomalous.shape == (3,)
    assert np.all(np.isfinite(maps))
    np.testing.assert_allclose(maps, want_maps, rtol=0, atol=1e-4)
    np.testing.assert_allclose(scores, want_scores, rtol=0, atol=1e-4)
    np.testing.assert_array_equal(anomalous, model.is_anomalous(want_scores))
    assert anomalous.tolist().count(True) == 2 - gap
    # The map is not constant: a wrong layout or resize would show.
    assert float(np.ptp(want_maps)) > 1e-3
    # Batch 1 runs too (nothing fixed the batch at 3).
    m1, s1, _ = sess.run(None, {"images": images[1:2]})
    np.testing.assert_allclose(m1[0], want_maps[1], rtol=0, atol=1e-4)
    np.testing.assert_allclose(s1, want_scores[1:2], rtol=0, atol=1e-4)
