"""CAD (contextual affinity distillation): GCCB, global student, method, config, engine run.

Tiny shapes throughout; full-size shapes only through jax.eval_shape (no compute).
"""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from kdjax import losses
from kdjax.config import load_config
from kdjax.methods.cad import CAD, default_config, resolve_config
from kdjax.teacher import init_method
from kdjax.models.cad import GCCB, GlobalBranch

FULL = {"layer1": (2, 64, 64, 256), "layer2": (2, 32, 32, 512), "layer3": (2, 16, 16, 1024)}


def tiny_config(**overrides):
    c = load_config("loco_cad")
    c.data.dataset = "synthetic"
    c.data.category = "tray"  # the synthetic generator's one category
    c.data.root = ""
    c.data.image_size = 32
    c.data.synthetic_size = 32
    c.data.synthetic_counts = (8, 4, 4, 4, 4)
    c.teacher.weights = "random"
    c.teacher.allow_random = True
    c.teacher.width_divisor = 16
    c.train.batch_size = 4
    c.train.steps = 4
    c.train.steps_per_call = 2
    c.train.checkpoint_every = 4
    c.train.log_every = 2
    c.eval.batch_size = 8
    c.eval.num_figures = 1
    c.eval.resolution = "input"
    c.eval.gaussian_sigma = 1.0
    c.cad.affinity_block = 8  # exercise the chunked path (layer2 has 16 positions at 32 px)
    for k, v in overrides.items():
        c.update_from_flattened_dict({k: v})
    return c


# --- config -----------------------------------------------------------------

def test_loco_cad_config_headline_and_ablation():
    c = load_config("loco_cad")
    assert c.method == "cad" and c.data.dataset == "mvtec_loco" and c.data.category == "all"
    assert c.eval.resolution == "original" and c.train.batch_size == 16
    assert c.targets.to_dict()["mean"]["au_spro_0.05"] == 73.0
    assert not c.variants and not c.eval.weight_variants  # one model by default
    assert resolve_config(c).to_dict() == default_config().to_dict()

    import importlib.util
    spec = importlib.util.spec_from_file_location(
        "loco_cad_cfg", os.path.join(os.path.dirname(__file__), "..", "configs", "loco_cad.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    a = mod.get_config("ablation")
    assert set(a.variants) == {"both", "both_no_affinity"}
    assert a.variants["both_no_affinity"] == {"cad.affinity_weight": 0.0}
    assert dict(a.eval.weight_variants.local_only) == {"local": 1.0, "global": 0.0}
    assert dict(a.eval.weight_variants.global_only) == {"local": 0.0, "global": 1.0}
    with pytest.raises(ValueError, match="ablation"):
        mod.get_config("nonsense")


@pytest.mark.parametrize("key,value,match", [
    ("cad.gccb_input", "layer9", "gccb_input"),
    ("cad.affinity_layers", ("layer1",), "not in cad.global_layers"),
    ("cad.global_map", "both", "global_map"),
    ("cad.affinity_distance", "l3", "affinity_distance"),
])
def test_bad_cad_settings_are_explained(key, value, match):
    c = load_config("loco_cad")
    c.update_from_flattened_dict({key: value})
    with pytest.raises(ValueError, match=match):
        resolve_config(c)
    c = load_config("loco_cad")
    with c.unlocked():
        c.cad.not_a_key = 1
    with pytest.raises(ValueError, match="unknown config key 'cad.not_a_key'"):
        resolve_config(c)


# --- GCCB and global student --------------------------------------------------

@pytest.mark.parametrize("mixing", ["attention", "pool", "none"])
def test_global_branch_full_size_shapes(mixing):
    targets = tuple((k, FULL[k][1], FULL[k][2], FULL[k][3]) for k in ("layer1", "layer2", "layer3"))
    branch = GlobalBranch(targets=targets, mixing=mixing)
    x = jax.ShapeDtypeStruct(FULL["layer3"], jnp.float32)
    variables = jax.eval_shape(lambda x: branch.init({"params": jax.random.key(0)}, x), x)
    out = jax.eval_shape(lambda v, x: branch.apply(v, x, train=False), variables, x)
    assert {k: v.shape for k, v in out.items()} == FULL
    # The GCCB itself: channel condensation to d and spatial pooling to the grid.
    gccb = GCCB(d=128, mixing=mixing, pool_grid=8)
    z = jax.eval_shape(lambda x: gccb.init_with_output({"params": jax.random.key(0)}, x)[0], x)
    assert z.shape == (2, 8, 8, 128)


def test_gccb_pool_grid_must_divide():
    x = jnp.zeros((1, 6, 6, 8))
    with pytest.raises(ValueError, match="pool_grid"):
        GCCB(d=8, pool_grid=4).init({"params": jax.random.key(0)}, x)


def test_method_builds_full_size_global_student_for_configured_layers():
    c = load_config("loco_cad")
    c.update_from_flattened_dict({"cad.global_layers": ("layer1", "layer2", "layer3")})
    branch = CAD(c).build_global(FULL)
    x = jax.ShapeDtypeStruct(FULL["layer3"], jnp.float32)
    variables = jax.eval_shape(lambda x: branch.init({"params": jax.random.key(0)}, x), x)
    out = jax.eval_shape(lambda v, x: branch.apply(v, x, train=False), variables, x)
    assert {k: v.shape for k, v in out.items()} == FULL


def test_global_branch_loss_decreases_on_random_features():
    rng = np.random.default_rng(0)
    t = {"layer2": jnp.asarray(rng.normal(size=(4, 8, 8, 16)), jnp.float32),
         "layer3": jnp.asarray(rng.normal(size=(4, 4, 4, 32)), jnp.float32)}
    t["layer2"] = jax.nn.relu(t["layer2"] + jnp.linspace(-1, 1, 8)[None, :, None, None])
    branch = GlobalBranch(targets=(("layer2", 8, 8, 16), ("layer3", 4, 4, 32)), d=8, heads=2,
                          pool_grid=2, widths=(16, 16, 8), blocks=1)
    variables = branch.init({"params": jax.random.key(0)}, t["layer3"])
    tx = optax.adam(3e-3)

    def loss_fn(params, stats):
        g, upd = branch.apply({"params": params, "batch_stats": stats}, t["layer3"], train=True,
                              mutable=["batch_stats"])
        taps = ("layer2", "layer3")
        aff = losses.contextual_affinity_loss([t[k] for k in taps], [g[k] for k in taps], block=16)
        cos = losses.flat_cosine_loss([t[k] for k in taps], [g[k] for k in taps])
        return cos + aff, (upd["batch_stats"], aff)

    @jax.jit
    def step(params, stats, opt):
        (loss, (stats, aff)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, stats)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), stats, opt, loss, aff

    params, stats = variables["params"], variables["batch_stats"]
    opt = tx.init(params)
    hist = []
    for _ in range(12):
        params, stats, opt, loss, aff = step(params, stats, opt)
        hist.append((float(loss), float(aff)))
    assert hist[-1][0] < 0.8 * hist[0][0], hist
    assert hist[-1][1] < hist[0][1], hist


# --- the method -------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_method():
    m = CAD(tiny_config())
    return m, init_method(m.config, m, jax.random.key(0), (4, 32, 32, 3))  # host-side init


def test_cad_variables_loss_and_maps_structure(tiny_method):
    m, v = tiny_method
    assert set(v["params"]) == {"local", "global"} and set(v["state"]) == {"local", "global"}
    assert set(v["params"]["global"]) == {"gccb", "student"}
    # The host-side init follows the module's own parameter shapes.
    flax_shapes = jax.eval_shape(
        lambda x: m.global_branch.init({"params": jax.random.key(0)}, x, train=False),
        jax.ShapeDtypeStruct((4, 2, 2, 64), jnp.float32))
    assert (jax.tree.map(lambda a: a.shape, flax_shapes["params"])
            == jax.tree.map(lambda a: a.shape, v["params"]["global"]))
    assert all(np.isfinite(np.asarray(a)).all() for a in jax.tree.leaves(v["params"]["global"]))
    images = jax.ShapeDtypeStruct((4, 32, 32, 3), jnp.float32)
    (loss, (state, metrics)), grads = jax.eval_shape(
        jax.value_and_grad(m.loss, has_aux=True), v["params"], v["state"], v["frozen"], images,
        jax.random.key(1))
    assert loss.shape == () and set(metrics) == {"local_loss", "global_loss", "affinity_loss"}
    assert jax.tree.structure(grads) == jax.tree.structure(v["params"])
    assert jax.tree.structure(state) == jax.tree.structure(v["state"])
    maps = jax.eval_shape(m.maps, v["params"], v["state"], v["frozen"], images)
    assert set(maps) == set(m.map_names) == {"local", "global"}
    assert all(x.shape == (4, 32, 32) and x.dtype == jnp.float32 for x in maps.values())


def test_cad_gccb_on_ocbe_output_builds():
    m = CAD(tiny_config(**{"cad.gccb_input": "ocbe", "cad.mixing": "pool"}))
    v = init_method(m.config, m, jax.random.key(0), (2, 32, 32, 3))
    images = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
    maps = jax.eval_shape(m.maps, v["params"], v["state"], v["frozen"], images)
    assert maps["global"].shape == (2, 32, 32)
    grads = jax.eval_shape(jax.grad(lambda p: m.loss(p, v["state"], v["frozen"],
                                                     jnp.zeros(images.shape), jax.random.key(0))[0]),
                           v["params"])
    assert jax.tree.structure(grads) == jax.tree.structure(v["params"])


@pytest.mark.parametrize("overrides", [
    {"cad.affinity_distance": "l2", "cad.global_feature_loss": "pixel",
     "cad.global_map": "affinity+cosine", "cad.affinity_weight": 0.0},
    {"cad.global_layers": ("layer1", "layer2", "layer3"), "cad.affinity_layers": ("layer1",),
     "cad.mixing": "none", "cad.pool_grid": 0, "cad.global_map": "cosine"},
])
def test_cad_config_choices_trace(overrides):
    m = CAD(tiny_config(**overrides))
    v = init_method(m.config, m, jax.random.key(0), (2, 32, 32, 3))
    images = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
    loss, (_, metrics) = jax.eval_shape(m.loss, v["params"], v["state"], v["frozen"], images,
                                        jax.random.key(0))
    assert loss.shape == () and metrics["affinity_loss"].shape == ()
    maps = jax.eval_shape(m.maps, v["params"], v["state"], v["frozen"], images)
    assert maps["global"].shape == (2, 32, 32)


def test_global_map_is_the_upsampled_affinity_discrepancy():
    m = CAD(tiny_config())
    rng = np.random.default_rng(1)
    t = {"layer2": rng.normal(size=(2, 4, 4, 8)).astype(np.float32),
         "layer3": rng.normal(size=(2, 2, 2, 16)).astype(np.float32)}
    g = {k: (v + rng.normal(size=v.shape)).astype(np.float32) for k, v in t.items()}
    got = m.global_map(t, g, (32, 32))
    from kdjax import ops
    want = sum(ops.resize_bilinear(losses.affinity_discrepancy_map_direct(t[k], g[k]), (32, 32),
                                   align_corners=True) for k in ("layer2", "layer3"))
    np.testing.assert_allclose(got, ops.gaussian_blur(want, 1.0), rtol=1e-5, atol=1e-6)


# --- the engine, end to end -------------------------------------------------

def test_cad_end_to_end_on_synthetic_loco(tmp_path):
    from kdjax import experiment

    c = tiny_config()
    with c.unlocked():
        c.eval.weight_variants = ml_collections.ConfigDict({
            "local_only": {"local": 1.0, "global": 0.0},
            "global_only": {"local": 0.0, "global": 1.0}})
    res = experiment.train_and_evaluate(c, str(tmp_path))
    on_disk = json.load(open(tmp_path / "results.json"))
    assert on_disk["method"] == "cad"
    for key in ("logical_auroc", "structural_auroc", "image_auroc", "au_spro_0.05"):
        value = on_disk["mean"][key]
        assert 0.0 <= value <= 1.0, (key, value)
    assert {"local_only", "global_only"} <= set(on_disk.get("variants", {})), on_disk.keys()
    assert res
