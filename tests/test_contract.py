"""The method contract (docs/METHODS.md, "The method contract"), for every registered
method: built from a config of configs/ at tiny width, initialized with its teacher
(kdjax.teacher.init_method), its training-set statistics and teacher cache computed by
the engine, the loss's shapes, one jitted training step with the method's optimizer
(kdjax.train.make_train_fn), the maps, the inference model (kdjax.inference.Model) on
uint8 images and the exported function (kdjax.export.export_jax), whose deserialized
call gives Model.predict's maps and scores.

A new method is checked here once it is registered in kdjax.methods and has a config in
configs/. The configs are shrunk generically: 64 px, a random teacher, every width
divisor (``teacher.width_divisor`` and any ``*divisor`` setting of the method) 16.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from kdjax import config as config_lib
from kdjax import devices, export, inference, train
from kdjax.methods import METHODS, get_method, method_class
from kdjax.teacher import init_method

SIZE = 64
BATCH = 2
N_IMAGES = 4
DIVISOR = 16


def tiny_config(name):
    """The first config of configs/ that runs method ``name``, at tiny width."""
    for stem in config_lib.shipped_configs():
        c = config_lib.load_config(stem)
        if c.method == name:
            break
    else:
        pytest.fail(f"No config in configs/ runs method {name!r}: every registered method "
                    "ships one (docs/METHODS.md, 'The method contract').")
    with c.unlocked():
        c.data.image_size = SIZE
        c.teacher.weights = "random"
        c.teacher.allow_random = True
        c.teacher.width_divisor = DIVISOR
        c.init_from = ""
        for key in method_class(name).default_settings().keys():
            if key.endswith("divisor"):
                c[name][key] = DIVISOR
        c.train.batch_size = BATCH
        c.train.steps = 2
        c.train.steps_per_call = 1
        c.train.compute_dtype = "float32"
        c.eval.batch_size = BATCH
        c.eval.compute_dtype = "float32"
    return c


def _finite(tree):
    return all(bool(np.isfinite(np.asarray(a)).all()) for a in jax.tree_util.tree_leaves(tree))


@pytest.mark.parametrize("name", METHODS)
def test_method_contract(name):
    c = tiny_config(name)
    method = get_method(c)
    assert method.name == name
    mesh = devices.make_mesh()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (N_IMAGES, SIZE, SIZE, 3), dtype=np.uint8)

    # init: params, state, frozen (the teacher), on the host arrays only
    v = init_method(c, method, jax.random.PRNGKey(0), (BATCH, SIZE, SIZE, 3))
    assert set(v) == {"params", "state", "frozen"}
    assert jax.tree_util.tree_leaves(v["params"]) and _finite(v)

    # the engine's statistics of the training set and teacher cache (jittable pieces)
    repl = NamedSharding(mesh, P())
    data = devices.put_global(images, repl)
    frozen = jax.device_put(v["frozen"], repl)
    state = train.prepare_state(method, frozen, jax.device_put(v["state"], repl), data,
                                BATCH, mesh)
    assert jax.tree_util.tree_structure(state) == jax.tree_util.tree_structure(v["state"])
    assert _finite(state)
    cache = train.build_teacher_cache(c, method, frozen, data, mesh)

    # loss: a scalar, (new state of the same structure, scalar metrics); traced only
    x = jax.ShapeDtypeStruct((BATCH, SIZE, SIZE, 3), jnp.float32)
    loss, (new_state, metrics) = jax.eval_shape(
        lambda p, s, f, x: method.loss(p, s, f, x, jax.random.PRNGKey(1)),
        v["params"], state, frozen, x)
    assert loss.shape == () and all(m.shape == () for m in metrics.values())
    assert jax.tree_util.tree_structure(new_state) == jax.tree_util.tree_structure(state)

    # one jitted training step with the method's optimizer
    tx = method.optimizer(int(c.train.steps))
    ts = jax.device_put({"step": jnp.zeros((), jnp.int32), "params": v["params"],
                         "state": state, "opt_state": tx.init(v["params"])}, repl)
    params_before = jax.device_get(v["params"])
    fn = train.make_train_fn(method, tx, mesh, BATCH, 1)
    ts, m = fn(ts, {"data": data, "cache": cache, "extra": {}}, frozen, jax.random.PRNGKey(2))
    ts = jax.device_get(ts)
    assert int(ts["step"]) == 1
    assert set(metrics) | {"loss"} == set(m) and _finite(m), m
    assert any(not np.array_equal(a, b) for a, b in zip(
        jax.tree_util.tree_leaves(params_before), jax.tree_util.tree_leaves(ts["params"]))), \
        "the training step changed no parameter"

    # maps: the named components, (N, h, w) float32; traced only (the model runs them)
    imethod = get_method(inference.inference_config(c), method.kernels)
    comps = jax.eval_shape(imethod.maps, ts["params"], ts["state"], v["frozen"], x)
    assert set(comps) == set(method.map_names)
    for k, a in comps.items():
        assert len(a.shape) == 3 and a.shape[0] == BATCH and a.dtype == jnp.float32, (k, a)

    # the inference model (built, as the engine does, in eval.compute_dtype)
    model = inference.Model(c, imethod, ts["params"], ts["state"], v["frozen"], mesh=mesh)
    if inference.needs_normalization(imethod):
        model.norm = {k: (0.0, 1.0) for k in method.map_names}
    maps, scores = model.predict(images)
    assert maps.shape == (N_IMAGES, SIZE, SIZE) and scores.shape == (N_IMAGES,)
    assert np.isfinite(maps).all() and np.isfinite(scores).all()
    np.testing.assert_allclose(scores, maps.max(axis=(1, 2)), rtol=1e-6)
    model.threshold = inference.choose_threshold(c, val_scores=scores,
                                                 val_labels=np.zeros(N_IMAGES, int))

    # export: lowered for every platform, the deserialized call gives the same maps
    exp = export.export_jax(model)
    assert tuple(exp.platforms) == export.PLATFORMS
    call = jax.export.deserialize(exp.serialize()).call
    e_maps, e_scores, e_anom = (np.asarray(a) for a in call(images))
    scale = max(float(np.abs(maps).max()), 1.0)
    np.testing.assert_allclose(e_maps, maps, rtol=1e-5, atol=1e-5 * scale)
    np.testing.assert_allclose(e_scores, scores, rtol=1e-5, atol=1e-5 * scale)
    np.testing.assert_array_equal(e_anom, model.is_anomalous(e_scores))
