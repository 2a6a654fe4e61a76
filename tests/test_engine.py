"""The training engine and reverse distillation (RD4AD / MRKD), at tiny shapes."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from kdjax import experiment, inference, losses, ops, train
from kdjax.workdir import WorkdirLockedError
from kdjax.methods import nsa
from kdjax.methods.rd4ad import rd_anomaly_map

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(method="rd4ad", **overrides):
    from kdjax.config import load_config

    c = load_config("demo")
    c.method = method
    c.data.image_size = 32
    c.data.synthetic_size = 32
    c.data.synthetic_counts = (8, 4, 4, 4, 4)
    c.teacher.weights = "random"
    c.teacher.width_divisor = 16
    c.train.batch_size = 4
    c.train.steps = 4
    c.train.steps_per_call = 2
    c.train.checkpoint_every = 2
    c.train.log_every = 2
    c.eval.batch_size = 8
    c.eval.num_figures = 2
    for k, v in overrides.items():
        c.update_from_flattened_dict({k: v})
    return c


def interrupt_after(monkeypatch, step: int) -> None:
    """Make training raise KeyboardInterrupt (as Ctrl-C does) right after it saved the
    checkpoint of ``step``."""
    from kdjax import checkpoints

    save = checkpoints.save

    def save_then_interrupt(mngr, ts):
        save(mngr, ts)
        if int(jax.device_get(ts["step"])) >= step:
            raise KeyboardInterrupt(f"test: interrupted after the checkpoint of step {step}")

    monkeypatch.setattr(checkpoints, "save", save_then_interrupt)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("synthetic"))
    c = tiny_config()
    from kdjax import data
    data.ensure_synthetic(root, seed=0, image_size=32, counts=tuple(c.data.synthetic_counts))
    return root


# --- pure functions against numpy ------------------------------------------

def _np_cos_map(t, s):
    dot = (t * s).sum(-1)
    return 1 - dot / np.maximum(np.linalg.norm(t, axis=-1) * np.linalg.norm(s, axis=-1), 1e-8)


def _np_bilinear_align(x, size):
    h, w = x.shape[-2:]
    oh, ow = size
    ys = np.arange(oh) * (h - 1) / (oh - 1)
    xs = np.arange(ow) * (w - 1) / (ow - 1)
    out = np.zeros(x.shape[:-2] + (oh, ow))
    for i, y in enumerate(ys):
        y0 = min(int(np.floor(y)), h - 1); y1 = min(y0 + 1, h - 1); fy = y - y0
        for j, xx in enumerate(xs):
            x0 = min(int(np.floor(xx)), w - 1); x1 = min(x0 + 1, w - 1); fx = xx - x0
            out[..., i, j] = ((1 - fy) * (1 - fx) * x[..., y0, x0] + (1 - fy) * fx * x[..., y0, x1]
                              + fy * (1 - fx) * x[..., y1, x0] + fy * fx * x[..., y1, x1])
    return out


def test_flat_cosine_loss_matches_numpy():
    rng = np.random.default_rng(0)
    ts = [rng.normal(size=(3, 4, 4, 5)).astype(np.float32) for _ in range(2)]
    ss = [rng.normal(size=(3, 4, 4, 5)).astype(np.float32) for _ in range(2)]
    want = 0.0
    for t, s in zip(ts, ss):
        a, b = t.reshape(3, -1), s.reshape(3, -1)
        want += np.mean(1 - (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)))
    got = losses.flat_cosine_loss([jnp.asarray(t) for t in ts], [jnp.asarray(s) for s in ss])
    np.testing.assert_allclose(float(got), want, rtol=1e-5)


def test_rd_anomaly_map_matches_numpy():
    rng = np.random.default_rng(1)
    t = {"layer1": rng.normal(size=(2, 8, 8, 3)), "layer2": rng.normal(size=(2, 4, 4, 5)),
         "layer3": rng.normal(size=(2, 2, 2, 7))}
    s = {k: v + rng.normal(size=v.shape) * 0.5 for k, v in t.items()}
    want = sum(_np_bilinear_align(_np_cos_map(t[k], s[k]), (16, 16)) for k in t)
    want = np.stack([gaussian_filter(m, 2.0) for m in want])
    got = rd_anomaly_map({k: jnp.asarray(v, jnp.float32) for k, v in t.items()},
                         {k: jnp.asarray(v, jnp.float32) for k, v in s.items()}, (16, 16), 2.0)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)


def test_resize_align_corners_false_matches_formula():
    x = np.random.default_rng(2).normal(size=(1, 5, 7)).astype(np.float32)
    got = np.asarray(ops.resize_bilinear(jnp.asarray(x), (9, 4), align_corners=False))
    # torch F.interpolate(bilinear, align_corners=False): src = (dst + 0.5) * in/out - 0.5, clamped at 0
    def axis(n_in, n_out):
        src = np.maximum((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0)
        i0 = np.minimum(np.floor(src).astype(int), n_in - 1)
        return i0, np.minimum(i0 + 1, n_in - 1), src - i0
    y0, y1, fy = axis(5, 9)
    x0, x1, fx = axis(7, 4)
    a = x[0]
    want = ((1 - fy)[:, None] * ((1 - fx) * a[y0][:, x0] + fx * a[y0][:, x1])
            + fy[:, None] * ((1 - fx) * a[y1][:, x0] + fx * a[y1][:, x1]))
    np.testing.assert_allclose(got[0], want, atol=1e-6)


def test_combine_maps_quantile_normalization():
    rng = np.random.default_rng(3)
    val = {"local": rng.random((4, 8, 8)), "global": rng.random((4, 8, 8)) * 5}
    norm = inference.map_normalization(val, (0.9, 0.995))
    qa, qb = np.quantile(val["global"], [0.9, 0.995])
    np.testing.assert_allclose(norm["global"], (qa, qb))
    test = {"local": rng.random((2, 8, 8)), "global": rng.random((2, 8, 8))}
    got = inference.combine(test, {"local": 0.5, "global": 0.5}, norm)
    ql = norm["local"]
    want = (0.5 * 0.1 * (test["local"] - ql[0]) / (ql[1] - ql[0])
            + 0.5 * 0.1 * (test["global"] - qa) / (qb - qa))
    np.testing.assert_allclose(got, want, rtol=1e-5)
    with pytest.raises(ValueError, match="weight 0"):
        inference.combine(test, {"local": 0.0, "global": 0.0}, norm)


def test_epochs_are_the_reference_dataloaders():
    """ceil(N/B) steps per epoch (DataLoader, drop_last=False): every image exactly once,
    the last batch the rest; a fresh permutation per epoch, a function of the step."""
    key = jax.random.PRNGKey(0)
    n, b = 10, 3
    assert train.steps_per_epoch(n, b) == 4 and train.steps_per_epoch(2, 3) == 1
    sizes = [train.step_batch_size(s, n, b) for s in range(8)]
    assert sizes == [3, 3, 3, 1, 3, 3, 3, 1]
    for epoch in range(2):
        seen = np.concatenate([np.asarray(train.batch_indices(key, s, n, sizes[s], b))
                               for s in range(4 * epoch, 4 * epoch + 4)])
        assert sorted(seen.tolist()) == list(range(n))
    e0 = [int(i) for s in range(4) for i in train.batch_indices(key, s, n, sizes[s], b)]
    e1 = [int(i) for s in range(4, 8) for i in train.batch_indices(key, s, n, sizes[s], b)]
    assert e0 != e1  # reshuffled each epoch
    np.testing.assert_array_equal(train.batch_indices(key, 5, n, 3, b),
                                  train.batch_indices(key, 5, n, 3, b))
    # one compiled function per run of equal batch sizes; the rest is a call of its own
    assert list(train.calls(0, 9, n, b, 10)) == [(0, 3, 3), (3, 1, 1), (4, 3, 3), (7, 1, 1),
                                                 (8, 1, 3)]
    assert list(train.calls(0, 5, 9, 3, 2)) == [(0, 2, 3), (2, 2, 3), (4, 1, 3)]
    c = tiny_config("rd4ad", **{"train.steps": 0, "train.epochs": 200, "train.batch_size": 16})
    assert train.total_steps(c, 60) == 800  # toothbrush: 60 images, 4 steps an epoch


def test_streamed_training_equals_resident_and_resumes(data_root, tmp_path, monkeypatch):
    """data.input=stream: the tf.data pipeline feeds the same batches (same losses as the
    resident run, a smaller last batch included), and a streamed run interrupted and
    resumed ends with the parameters of an uninterrupted one; data.cache is reused."""
    over = {"data.root": data_root, "train.steps": 5, "train.batch_size": 3,
            "train.steps_per_call": 2, "train.checkpoint_every": 1, "train.log_every": 1}
    _run(tiny_config("rd4ad", **over, **{"data.input": "resident"}), tmp_path / "r", "train")
    cache = str(tmp_path / "cache")
    s = tiny_config("rd4ad", **over, **{"data.input": "stream", "data.cache": cache})
    _run(s, tmp_path / "s", "train")

    def rows(w):
        return [json.loads(l) for l in open(w / "train_metrics.jsonl")]
    # calls of 2 steps; step 3 is the smaller last batch of an epoch (8 images, batch 3)
    assert [r["step"] for r in rows(tmp_path / "s")] == [2, 3, 5]
    for a, b in zip(rows(tmp_path / "r"), rows(tmp_path / "s")):
        np.testing.assert_allclose(b["loss"], a["loss"], rtol=1e-5)
    assert len(os.listdir(cache)) == 2  # the ArrayRecord file and its description
    with monkeypatch.context() as m:
        interrupt_after(m, 2)
        with pytest.raises(KeyboardInterrupt):
            _run(s, tmp_path / "s2", "train")
    _run(s, tmp_path / "s2", "train")
    a, sa = _final_params(tmp_path / "s")
    b, sb = _final_params(tmp_path / "s2")
    assert sa == sb == 5
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_nsa_swap_pastes_patches_of_the_same_image():
    img = jax.random.normal(jax.random.PRNGKey(0), (2, 32, 32, 3))
    out = np.asarray(nsa.nsa_batch(jax.random.PRNGKey(1), img, nsa.params_for("carpet")))
    changed = np.any(out != np.asarray(img), -1)
    assert changed.any() and changed.mean() < 0.9
    # every changed pixel's value exists somewhere in the original image
    vals = {tuple(v) for v in np.asarray(img)[0].reshape(-1, 3).round(5).tolist()}
    assert all(tuple(v) in vals for v in out[0][changed[0]].round(5).tolist())


def test_nsa_object_constraint_keeps_patches_on_the_object():
    # grey background (200) with a dark square object: patches must overlap the object
    x = np.full((1, 64, 64, 3), 200 / 255.0, np.float32)
    x[0, 16:48, 16:48] = np.linspace(0, 0.3, 32)[None, :, None]
    xn = ops.normalize_images(jnp.asarray((x * 255).astype(np.uint8)))
    params = nsa.NSAParams((0.03, 0.1), (0.03, 0.1), 1, 0.7, 0.25, (200, 60))
    for seed in range(5):
        out = np.asarray(nsa.nsa_batch(jax.random.PRNGKey(seed), xn, params))
        changed = np.any(np.abs(out - np.asarray(xn)) > 1e-6, -1)[0]
        if changed.any():
            ys, xs = np.nonzero(changed)
            assert 8 <= ys.mean() <= 56 and 8 <= xs.mean() <= 56


# --- the engine --------------------------------------------------------------

def _run(config, workdir, mode="train_and_eval"):
    return experiment.train_and_evaluate(config, str(workdir), mode)


def _final_params(workdir):
    import orbax.checkpoint as ocp
    ckpt_root = os.path.join(str(workdir), "checkpoints")
    cat = sorted(os.listdir(ckpt_root))[0]
    mngr = ocp.CheckpointManager(os.path.join(ckpt_root, cat),
                                 item_handlers=ocp.StandardCheckpointHandler())
    step = mngr.latest_step()
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])  # saved on any topology
    abstract = jax.tree_util.tree_map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=dev), mngr.item_metadata(step))
    restored = mngr.restore(step, args=ocp.args.StandardRestore(abstract))
    mngr.close()
    return restored["params"], step


def test_rd4ad_end_to_end_writes_report(data_root, tmp_path):
    c = tiny_config("rd4ad", **{"data.root": data_root, "train.steps": 6})
    res = _run(c, tmp_path)
    assert res["method"] == "rd4ad"
    cat = next(iter(res["categories"]))
    for k in ("image_auroc", "logical_auroc", "structural_auroc", "au_spro_0.05"):
        assert k in res["categories"][cat]
    on_disk = json.load(open(tmp_path / "results.json"))
    assert on_disk["teacher"] and "RANDOM" in on_disk.get("warning", "")
    assert os.path.exists(tmp_path / "results.md")
    assert any(f.endswith(".png") for f in os.listdir(tmp_path / "figures"))
    assert [json.loads(l)["step"] for l in open(tmp_path / "train_metrics.jsonl")][-1] == 6
    # a rerun on the finished workdir resumes (no training) and evaluates again
    res2 = _run(c, tmp_path, "eval")
    assert res2["categories"][cat]["image_auroc"] == pytest.approx(res["categories"][cat]["image_auroc"])


def test_training_lowers_the_loss(data_root, tmp_path):
    c = tiny_config("rd4ad", **{"data.root": data_root, "train.steps": 20,
                               "train.steps_per_call": 10, "train.log_every": 10})
    _run(c, tmp_path, "train")
    recs = [json.loads(l) for l in open(tmp_path / "train_metrics.jsonl")]
    assert recs[-1]["loss"] < recs[0]["loss"]


def test_mrkd_trains_and_evaluates(data_root, tmp_path):
    c = tiny_config("mrkd", **{"data.root": data_root, "train.steps": 2})
    res = _run(c, tmp_path)
    assert res["method"] == "mrkd"


def test_interrupt_and_resume_equals_uninterrupted(data_root, tmp_path, monkeypatch):
    c = tiny_config("rd4ad", **{"data.root": data_root, "train.steps": 6})
    _run(c, tmp_path / "full", "train")
    with monkeypatch.context() as m:
        interrupt_after(m, 2)
        with pytest.raises(KeyboardInterrupt):
            _run(c, tmp_path / "resumed", "train")
    _run(c, tmp_path / "resumed", "train")
    a, sa = _final_params(tmp_path / "full")
    b, sb = _final_params(tmp_path / "resumed")
    assert sa == sb == 6
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("method_name", ["rd4ad", "mrkd"])  # CAD's loss reads it as RD4AD's
def test_teacher_cache_feeds_the_loss_what_the_teacher_computes(method_name):
    """train.cache_teacher: the teacher's taps of the clean training images are
    computed once, and each step's loss receives its batch's rows.

    (1) the cache holds the teacher's taps; (2) given the same taps, the loss
    and its gradients are those of the uncached loss; (3) over several steps
    the cached and uncached runs see the same rows (learning rate 0, so the
    per-step losses isolate the data: at these tiny shapes, train-mode
    BatchNorm over a few values turns 1e-6 input differences into gradient
    differences of several percent, so training trajectories are not compared)."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    from kdjax import devices, teacher
    from kdjax.data.category import CategoryData
    from kdjax.methods import get_method

    c = tiny_config(method_name, **{"train.learning_rate": 0.0})
    method = get_method(c)
    mesh = devices.make_mesh()
    images = np.random.default_rng(0).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    cat = CategoryData("x", "", images, images[:2], [], [])
    ts, frozen, tx, _ = train.init_train_state(c, method, teacher.load(c, method).variables, cat,
                                               mesh)
    data = devices.put_global(images, NamedSharding(mesh, P()))
    cache = train.build_teacher_cache(c, method, frozen, data, mesh)
    x = ops.normalize_images(jnp.asarray(images))
    want = jax.tree_util.tree_map(np.asarray, method.teacher_features(frozen, x))
    got = jax.tree_util.tree_map(np.asarray, cache)
    assert sorted(got) == ["layer1", "layer2", "layer3"]
    for k in got:  # computed in batches of 8 here, of 6 there
        np.testing.assert_allclose(got[k], want[k], rtol=1e-4, atol=1e-4)

    @jax.jit
    def both(params, state, x, key):
        vg = jax.value_and_grad(method.loss, has_aux=True)
        plain = vg(params, state, frozen, x, key)
        return plain, vg(params, state, frozen, x, key, method.teacher_cache(frozen, x))

    ((l0, _), g0), ((l1, _), g1) = both(ts["params"], ts["state"], x[:4], jax.random.PRNGKey(1))
    np.testing.assert_allclose(float(l1), float(l0), rtol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g0)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)

    if method_name != "rd4ad":  # the engine's part is the same for every method
        return
    fn = train.make_train_fn(method, tx, mesh, 4, 3)
    key = jax.random.PRNGKey(3)
    copy = lambda t: jax.tree_util.tree_map(jnp.copy, t)  # noqa: E731 (fn donates ts)
    _, m_cached = fn(copy(ts), {"data": data, "cache": cache, "extra": {}}, frozen, key)
    _, m_plain = fn(copy(ts), {"data": data, "cache": None, "extra": {}}, frozen, key)
    np.testing.assert_allclose(np.asarray(m_cached["loss"]), np.asarray(m_plain["loss"]),
                               rtol=2e-5)
    # off by config, or over the memory bound: no cache, the teacher runs in every step
    for k, v in (("train.cache_teacher", False), ("train.cache_teacher_max_gb", 1e-6)):
        c2 = tiny_config(method_name, **{k: v})
        assert train.build_teacher_cache(c2, method, frozen, data, mesh) is None


def test_nan_loss_stops_and_keeps_last_good_checkpoint(data_root, tmp_path, monkeypatch):
    from kdjax.methods.rd4ad import RD4AD

    class Exploding(RD4AD):
        """RD4AD whose loss becomes NaN from its 4th step on (a counter in the state)."""

        def init(self, rng, image_shape, teacher_variables):
            v = super().init(rng, image_shape, teacher_variables)
            v["state"] = {**v["state"], "count": jnp.zeros((), jnp.int32)}
            return v

        def loss(self, params, state, frozen, images, rng, cached=None):
            loss, (new_state, m) = super().loss(params, state, frozen, images, rng, cached)
            loss = jnp.where(state["count"] >= 3, jnp.nan, loss)
            return loss, ({**new_state, "count": state["count"] + 1}, m)

    monkeypatch.setattr(experiment, "get_method", lambda c, kernels=None: Exploding(c, kernels))
    c = tiny_config("rd4ad", **{"data.root": data_root, "train.steps": 6})
    with pytest.raises(train.TrainingDivergedError, match=r"step 4.*last good checkpoint \(step 2\)"):
        _run(c, tmp_path, "train")


def test_locked_workdir_is_refused(tmp_path, data_root):
    lock = tmp_path / ".kdjax.lock"
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        import socket
        lock.write_text(json.dumps({"pid": p.pid, "host": socket.gethostname()}))
        c = tiny_config("rd4ad", **{"data.root": data_root})
        with pytest.raises(WorkdirLockedError, match="in use by another kdjax run"):
            _run(c, tmp_path, "train")
    finally:
        p.kill()
        p.wait()
    # a stale lock (dead pid) is taken over
    c = tiny_config("rd4ad", **{"data.root": data_root, "train.steps": 2})
    _run(c, tmp_path, "train")
    assert not lock.exists()


_SUBPROCESS = textwrap.dedent("""
    import json, os, sys
    sys.path.insert(0, {tests!r})
    import jax, numpy as np, optax
    from test_engine import tiny_config
    from kdjax import experiment
    from kdjax.methods.base import Method
    # SGD: Adam's per-parameter normalization would turn the 1- vs 4-device summation
    # differences into visible parameter differences.
    Method.optimizer = lambda self, total_steps: optax.sgd(0.02)
    # 64 px: at 32 px the OCBE output is 1x1 and train-mode BatchNorm over 4 values is
    # ill-conditioned (rounding differences of any kind grow by orders of magnitude).
    c = tiny_config("rd4ad", **{{"data.root": {root!r}, "train.steps": 4, "train.log_every": 1,
                                 "data.image_size": 64, "train.steps_per_call": 1}})
    {extra}
    experiment.train_and_evaluate(c, {workdir!r}, "train")
""")


def _subprocess(code, env_extra, timeout=240):
    env = dict(os.environ, JAX_PLATFORMS="cpu", **env_extra)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


@pytest.fixture(scope="module")
def one_device_run(data_root, tmp_path_factory):
    """The reference both multi-device tests compare with: the same training on one
    device, in its own process."""
    tests = os.path.dirname(os.path.abspath(__file__))
    wd = tmp_path_factory.mktemp("one_device")
    one = _subprocess(_SUBPROCESS.format(tests=tests, root=data_root, extra="",
                                         workdir=str(wd)), {})
    assert one.returncode == 0, one.stderr[-3000:]
    return wd


def test_four_host_devices_give_the_same_parameters_as_one(data_root, one_device_run, tmp_path):
    tests = os.path.dirname(os.path.abspath(__file__))
    four = _subprocess(_SUBPROCESS.format(
        tests=tests, root=data_root, extra="assert jax.device_count() == 4",
        workdir=str(tmp_path / "four")), {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
    assert four.returncode == 0, four.stderr[-3000:]
    _assert_same_training(one_device_run, tmp_path / "four")


def _assert_same_training(dir_a, dir_b):
    """Same training on both sides.

    The first step's loss must agree to float32 rounding: a real data-parallel bug
    (per-device BatchNorm statistics, a wrong batch, a missing all-reduce) moves it by
    far more. Later steps and the parameters are compared at a looser tolerance,
    because a tiny random model is ill-conditioned: on ONE device, merely reversing the
    order of the batch already changes its gradients by ~6% (measured), so any change
    of reduction order grows that much per step. SGD, since Adam turns noise-level
    gradients (e.g. of a bias cancelled by the next BatchNorm) into +-lr updates.
    """
    la = [json.loads(l)["loss"] for l in open(dir_a / "train_metrics.jsonl")]
    lb = [json.loads(l)["loss"] for l in open(dir_b / "train_metrics.jsonl")]
    assert len(la) == len(lb) == 4
    np.testing.assert_allclose(la[0], lb[0], rtol=1e-5)
    np.testing.assert_allclose(la, lb, rtol=2e-2)
    a, _ = _final_params(dir_a)
    b, _ = _final_params(dir_b)
    # Globally (some leaves start at zero and only ever see noise-level gradients).
    va = np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(a)])
    vb = np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(b)])
    assert np.linalg.norm(va - vb) <= 2e-2 * np.linalg.norm(va)  # measured: ~6e-3


def test_two_processes_with_jax_distributed_train_like_one(data_root, one_device_run, tmp_path):
    import socket
    s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
    tests = os.path.dirname(os.path.abspath(__file__))
    procs = []
    for pid in range(2):
        extra = textwrap.dedent(f"""
            c.multihost = True
            c.distributed.coordinator_address = "127.0.0.1:{port}"
            c.distributed.num_processes = 2
            c.distributed.process_id = {pid}
            c.distributed.cpu_collectives = True
            from kdjax.distributed import initialize
            initialize(c)
            assert jax.process_count() == 2
        """)
        code = _SUBPROCESS.format(tests=tests, root=data_root, extra=extra,
                                  workdir=str(tmp_path / "multi"))
        env = dict(os.environ, JAX_PLATFORMS="cpu")
        procs.append(subprocess.Popen([sys.executable, "-c", code], env=env, cwd=REPO,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (o, e) in zip(procs, outs):
        assert p.returncode == 0, e[-3000:]
    _assert_same_training(tmp_path / "multi", one_device_run)
