"""The model a user takes away, through the commands as documented, on every config.

For each file in configs/ (tiny widths, 2 training steps, the conftest's tiny
datasets): ``python -m kdjax.main --config=... --workdir=W`` writes the model
artifact; ``Predictor.from_workdir(W)`` loads it without training machinery;
``--mode=predict`` scores a folder; ``--mode=export`` writes model.jax, whose
deserialized function equals the Model on the same images. Plus
``--mode=eval --config.init_from=...`` on reference checkpoints with no
orbax checkpoint, and the threshold rules.
"""

import csv
import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(f[:-3] for f in os.listdir(os.path.join(REPO, "configs")) if f.endswith(".py"))
GOLDEN = os.path.join(REPO, "tests", "golden")


def cli(*args, expect=0):
    """``python -m kdjax.main ARGS`` as a user runs it; returns the completed process."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    p = subprocess.run([sys.executable, "-m", "kdjax.main", *args], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == expect, f"exit {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}"
    return p


def tiny_args(name, roots):
    """--config.* overrides that make configs/<name>.py tiny (a random teacher)."""
    from kdjax.config import load_config

    c = load_config(name)
    args = ["--config.teacher.weights=random", "--config.teacher.allow_random=True",
            "--config.train.steps=2", "--config.train.batch_size=2",
            "--config.train.steps_per_call=2", "--config.train.checkpoint_every=1",
            "--config.train.log_every=2", "--config.eval.batch_size=4",
            "--config.eval.num_figures=2"]
    if c.method == "efficientad":
        args += ["--config.efficientad.channels_divisor=16", "--config.data.image_size=64"]
    else:
        args += ["--config.teacher.width_divisor=16", "--config.data.image_size=32"]
    ds = c.data.dataset
    if ds == "mvtec_ad":
        args += [f"--config.data.root={roots['mvtec_ad']}", "--config.data.category=bottle"]
    elif ds == "mvtec_loco":
        args += [f"--config.data.root={roots['loco']}", "--config.data.category=breakfast_box"]
    elif ds == "synthetic":
        from conftest import TINY_SYNTHETIC_ARGS

        args += [f"--config.data.root={roots['synthetic']}", *TINY_SYNTHETIC_ARGS]
    elif ds == "visa":
        args += [f"--config.data.root={roots['visa']}", "--config.data.category=candle"]
    elif ds == "mvtec_ad2":
        args += [f"--config.data.root={roots['mvtec_ad2']}", "--config.data.category=can"]
    else:
        raise AssertionError(f"tiny_args: no tiny data root for dataset {ds!r} ({name}.py)")
    return args, c


@pytest.fixture(scope="module")
def roots(mini_mvtec_ad_root, mini_loco_root, tiny_synthetic_root, mini_visa_root,
          mini_mvtec_ad2_root):
    return {"mvtec_ad": mini_mvtec_ad_root, "loco": mini_loco_root,
            "synthetic": tiny_synthetic_root, "visa": mini_visa_root,
            "mvtec_ad2": mini_mvtec_ad2_root}


@pytest.mark.parametrize("name", CONFIGS)
def test_trained_model_predicts_and_exports_through_the_cli(name, roots, tmp_path):
    from kdjax import inference
    from kdjax.export import run_exported
    from kdjax.predict import Predictor

    args, c = tiny_args(name, roots)
    wd = str(tmp_path / "w")
    cli(f"--config=configs/{name}.py", f"--workdir={wd}", *args)

    # The artifact: one model per category, no optimizer state; one checkpoint left.
    (cat,) = inference.workdir_categories(wd)
    mdir = os.path.join(wd, "model", cat)
    desc = json.load(open(os.path.join(mdir, "model.json")))
    assert desc["method"] == c.method and desc["input_size"] == (64 if c.method ==
                                                                 "efficientad" else 32)
    assert desc["threshold"]["value"] is not None and desc["teacher"]["source"] == "random"
    assert desc["threshold"]["rule"] in ("quantile", "f1_val")
    ckpt_dirs = glob.glob(os.path.join(wd, "checkpoints", "**", cat), recursive=True)
    assert ckpt_dirs  # one per training variant, each with only its last checkpoint
    for d in ckpt_dirs:
        assert [s for s in os.listdir(d) if s.isdigit()] == ["2"], d
    results = json.load(open(os.path.join(wd, "results.json")))
    t = results["thresholds"][cat]
    assert t["value"] == pytest.approx(desc["threshold"]["value"])
    assert set(t["test"]) >= {"precision", "recall", "tp", "fp"}
    md = open(os.path.join(wd, "results.md")).read()
    assert "Decision threshold" in md
    # train_metrics.jsonl: each trained variant keeps its rows (a later variant's training
    # of the same category does not drop them as a resume would).
    rows = [json.loads(line) for line in open(os.path.join(wd, "train_metrics.jsonl"))]
    variants = set(c.variants) if c.get("variants") else {None}
    assert {(r.get("variant"), r["step"]) for r in rows} == {(v, 2) for v in variants}
    # EfficientAD without a penalty folder says, in the log, results.json and results.md,
    # that the paper's numbers assume the ImageNet penalty, and how to give it.
    fix = "--config.efficientad.penalty_dir=<folder of ImageNet train images>"
    said = [fix in (results.get("notes") or [""])[0], fix in md,
            fix in open(os.path.join(wd, "log.txt")).read()]
    assert said == [c.method == "efficientad"] * 3, said

    if c.data.dataset == "mvtec_ad2":  # the private splits' maps for the evaluation server
        sub = os.path.join(wd, "submission")
        for split, n in (("test_private", 3), ("test_private_mixed", 2)):
            tifs = sorted(os.listdir(os.path.join(sub, "anomaly_images", cat, split)))
            pngs = sorted(os.listdir(os.path.join(sub, "anomaly_images_thresholded", cat, split)))
            assert len(tifs) == n and [t[:-5] for t in tifs] == [p_[:-4] for p_ in pngs]
        import tifffile
        from PIL import Image

        m = tifffile.imread(os.path.join(sub, "anomaly_images", cat, "test_private_mixed",
                                         tifs[0]))
        png = np.asarray(Image.open(os.path.join(sub, "anomaly_images_thresholded", cat,
                                                 "test_private_mixed", pngs[0])))
        assert m.dtype == np.float16 and m.shape == (36, 52)  # the original size
        assert png.shape == (36, 52) and set(np.unique(png)) <= {0, 255}

    # The HTML report (every test image in its gallery, the paper's numbers beside ours)
    # and TensorBoard (tests/test_report_html.py and test_tensorboard.py look closer).
    rep = json.load(open(os.path.join(wd, "report_files", f"{cat}.json")))
    from kdjax import data

    n_test = len(data.list_records(c.data.dataset, c_root(roots, c), cat, "test"))
    assert len(rep["entries"]) == n_test and rep["roc"] and rep["pro"]
    assert all(os.path.exists(os.path.join(wd, e["img"])) for e in rep["entries"])
    page = open(os.path.join(wd, "report.html")).read()
    assert page.count('<div class="card') == n_test and 'class="result-row mean"' in page
    assert ("class=paper" in page) == bool(c.targets)
    assert glob.glob(os.path.join(wd, "tensorboard", "**", cat, "events.out.tfevents.*"),
                     recursive=True)

    # Predictor: without the config file, the dataset or an optimizer.
    test_dir, files = test_files(roots, c, cat)
    p = Predictor.from_workdir(wd)
    maps, scores = p.predict(files)
    s = p.image_size
    assert maps.shape == (len(files), s, s) and np.all(np.isfinite(scores))
    one_map, one_score = p.predict(files[0])  # one path, not its characters
    np.testing.assert_allclose(one_score, scores[:1], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="empty"):
        p.predict([])

    # --mode=predict on the test folder (config from the workdir).
    out = str(tmp_path / "pred")
    cli("--mode=predict", f"--workdir={wd}", f"--input={test_dir}", f"--output={out}",
        "--maps", "--max_overlays=3")
    rows = list(csv.DictReader(open(os.path.join(out, "predictions.csv"))))
    assert [r["path"] for r in rows] == files
    assert list(rows[0]) == ["path", "category", "score", "is_anomalous", "threshold"]
    np.testing.assert_allclose([float(r["score"]) for r in rows], scores, rtol=1e-5, atol=1e-6)
    thr = float(rows[0]["threshold"])
    assert [r["is_anomalous"] == "True" for r in rows] == list(scores > thr)
    assert len(os.listdir(os.path.join(out, "overlays"))) == 3
    assert len(os.listdir(os.path.join(out, "maps"))) == len(files)

    # --mode=export: model.jax equals the Model on the same images.
    exp = str(tmp_path / "export")
    cli("--mode=export", f"--workdir={wd}", f"--output={exp}")
    images = p.load(files[:3])[0]
    em, es, ea = run_exported(os.path.join(exp, cat, "model.jax"), images)
    mm, ms = p.model.predict(images)
    assert em.shape == mm.shape and float(np.abs(em - mm).max()) <= 1e-5
    np.testing.assert_allclose(es, ms, atol=1e-5)
    np.testing.assert_array_equal(ea, ms > p.threshold)
    assert json.load(open(os.path.join(exp, cat, "model.json")))["export"]["model.jax"]
    from kdjax.export import onnx_available

    if onnx_available():  # the export extra: the ONNX model equals it too
        import onnxruntime as ort

        sess = ort.InferenceSession(os.path.join(exp, cat, "model.onnx"),
                                    providers=["CPUExecutionProvider"])
        om, os_, _ = sess.run(None, {sess.get_inputs()[0].name: images})
        assert float(np.abs(om - mm).max()) <= 1e-4
        np.testing.assert_allclose(os_, ms, atol=1e-4)


def c_root(roots, c):
    return {"mvtec_ad": roots["mvtec_ad"], "mvtec_loco": roots["loco"],
            "synthetic": roots["synthetic"], "visa": roots["visa"],
            "mvtec_ad2": roots["mvtec_ad2"]}[c.data.dataset]


def test_files(roots, c, cat):
    """(a folder of test images, its image files in --mode=predict's order)."""
    root = c_root(roots, c)
    if c.data.dataset == "visa":
        d = os.path.join(root, cat, "Data", "Images")
        return d, sorted(glob.glob(os.path.join(d, "*", "*.JPG")))
    if c.data.dataset == "mvtec_ad2":
        d = os.path.join(root, cat, "test_private")
        return d, sorted(glob.glob(os.path.join(d, "*.png")))
    d = os.path.join(root, cat, "test")
    return d, sorted(glob.glob(os.path.join(d, "*", "*.png")))


test_files.__test__ = False  # a helper, not a test


def test_eval_of_a_reference_rd4ad_checkpoint_needs_no_orbax_checkpoint(roots, tmp_path):
    """README: ``--config.init_from=ckpt.pth --mode=eval`` on a fresh workdir."""
    from kdjax import weights
    from kdjax.inference import load_model

    wd = str(tmp_path / "w")
    args, _ = tiny_args("mvtec_rd4ad", roots)
    args = [a for a in args if "width_divisor" not in a]
    ckpt = os.path.join(GOLDEN, "rd4ad_d32.pth")
    cli("--config=configs/mvtec_rd4ad.py", f"--workdir={wd}", "--mode=eval",
        f"--config.init_from={ckpt}", "--config.teacher.width_divisor=32", *args)
    assert json.load(open(os.path.join(wd, "results.json")))["categories"]["bottle"]
    model = load_model(wd)
    want = weights.load_reference_rd_checkpoint(ckpt, width_divisor=32)["params"]
    import jax
    for a, b in zip(jax.tree_util.tree_leaves(want), jax.tree_util.tree_leaves(model.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not os.path.exists(os.path.join(wd, "checkpoints", "bottle")) or not [
        d for d in os.listdir(os.path.join(wd, "checkpoints", "bottle")) if d.isdigit()]


def test_threshold_rules():
    from kdjax.config import load_config
    from kdjax.inference import choose_threshold, f1_max_threshold

    c = load_config("demo")
    val = np.linspace(0.0, 1.0, 101)
    t = choose_threshold(c, val_scores=val, val_labels=np.zeros(101, int))
    assert t["rule"] == "quantile" and t["value"] == pytest.approx(0.99) and not t["optimistic"]
    t = choose_threshold(c, train_scores=val)
    assert t["source"] == "train" and t["optimistic"] and "Optimistic" in t["note"]
    labels = np.array([0, 0, 0, 1, 1])
    scores = np.array([0.1, 0.2, 0.6, 0.5, 0.9])
    t = choose_threshold(c, val_scores=scores, val_labels=labels)
    assert t["rule"] == "f1_val" and t["value"] == pytest.approx(f1_max_threshold(labels,
                                                                                  scores)[0])
    with c.unlocked():
        c.eval.threshold = "0.25"
    assert choose_threshold(c)["value"] == 0.25
    with c.unlocked():
        c.eval.threshold = "f1_val"
    with pytest.raises(ValueError, match="f1_val"):
        choose_threshold(c, val_scores=val, val_labels=np.zeros(101, int))


def test_eval_of_reference_efficientad_state_dicts(roots, tmp_path):
    """``--config.init_from=<dir with teacher.pth, student.pth, autoencoder.pth>``:
    the reference reproduction's weights, evaluated with no kdjax training; the
    teacher statistics and map quantiles come from this category's images."""
    import jax

    from kdjax import weights
    from kdjax.inference import load_model

    wd = str(tmp_path / "w")
    ref = os.path.join(GOLDEN, "efficientad_ref_s_d8")
    cli("--config=configs/loco_efficientad.py", f"--workdir={wd}", "--mode=eval",
        f"--config.init_from={ref}", "--config.teacher.weights=random",
        "--config.teacher.allow_random=True", "--config.efficientad.out_channels=48",
        "--config.efficientad.channels_divisor=8", "--config.data.image_size=256",
        f"--config.data.root={roots['loco']}", "--config.data.category=breakfast_box",
        "--config.eval.batch_size=4", "--config.eval.num_figures=0")
    model = load_model(wd)
    want = weights.load_reference_efficientad(ref, "S", 48, 8)
    got = {"student": model.params["student"], "ae": model.params["ae"],
           "teacher": model.frozen["teacher"]["params"]}
    for role in got:
        for a, b in zip(jax.tree_util.tree_leaves(want[role]["params"]),
                        jax.tree_util.tree_leaves(got[role])):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert model.provenance["file"] == os.path.join(ref, "teacher.pth")
    std = np.asarray(model.state["teacher_std"])
    assert np.all(std > 0) and not np.allclose(std, 1.0)  # computed, not the init value


# The training commands docs/METHODS.md (and configs/loco_margin.py's docstring) record its DFSC and CAD measurements with, as
# written there, then the tiny overrides (later flags win): each runs through kdjax.main.
DOCUMENTED_RUNS = {
    "dfsc_student_form": [
        "--config=configs/loco_margin.py:only", "--config.data.dataset=synthetic",
        "--config.data.root=runs/synth", "--config.data.image_size=128",
        "--config.teacher.weights=random", "--config.teacher.allow_random=True",
        "--config.efficientad.channels_divisor=4", "--config.train.steps=1000",
        "--config.train.steps_per_call=100", "--config.train.log_every=100", "--config.seed=0",
        "--config.efficientad.margin_target=student", "--config.efficientad.margin_mode=relative"],
    "cad_global_learning_rate": [
        "--config=configs/demo.py", "--config.cad.global_learning_rate=1e-4"],
}


@pytest.mark.parametrize("name", sorted(DOCUMENTED_RUNS))
def test_documented_training_commands_run(name, roots, tmp_path):
    # the demo's tiny overrides hold the tiny synthetic set's root and size
    tiny = [a for a in tiny_args("demo", roots)[0] if "width_divisor" not in a
            and "image_size" not in a]
    if name.startswith("dfsc"):
        tiny += ["--config.efficientad.channels_divisor=16", "--config.data.image_size=64"]
    else:
        tiny += ["--config.teacher.width_divisor=16", "--config.data.image_size=32"]
    wd = str(tmp_path / "w")
    cli(*DOCUMENTED_RUNS[name], f"--workdir={wd}", *tiny)
    (cat,) = json.load(open(os.path.join(wd, "results.json")))["categories"]
    cfg = json.load(open(os.path.join(wd, "model", cat, "model.json")))["config"]
    rows = [json.loads(line) for line in open(os.path.join(wd, "train_metrics.jsonl"))]
    assert [r["step"] for r in rows] == [2] and cfg["data"]["root"] == roots["synthetic"]
    if name.startswith("dfsc"):
        e = cfg["efficientad"]
        assert (e["margin_target"], e["margin_mode"], e["margin_weight"]) == (
            "student", "relative", 1.0)
        assert "margin_active" in rows[0] and "variant" not in rows[0]  # ':only': one model
    else:
        assert cfg["cad"]["global_learning_rate"] == 1e-4
