"""Per-category paper numbers in the configs, and tools/reproduce.py as a user runs it.

* Every config whose ``targets`` list categories: its mean row equals the mean of its
  categories to the published rounding, for every metric (and every ``targets_by``
  table); the EfficientAD table follows ``efficientad.model_size``.
* ``python tools/reproduce.py --config=configs/mvtec_rd4ad.py ...`` on two tiny fake
  MVTec AD categories (random teacher, width divisor 16, 2 steps): interrupted in the
  first category, rerun (that category resumes from its checkpoint, the second one
  trains), rerun again (nothing is trained); the table of ours, the paper's and the
  difference in reproduce.md / .json; bad input gets one line.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest

from kdjax import config as config_lib
from kdjax.data.types import MVTEC_AD_CATEGORIES
from kdjax.errors import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(f[:-3] for f in os.listdir(os.path.join(REPO, "configs")) if f.endswith(".py"))


def _tables(name):
    """[(label, {category or "mean": {metric: value}})] of a shipped config."""
    c = config_lib.load_config(name)
    raw = c.targets.to_dict() if c.targets else {}
    if c.get("targets_by", ""):
        return [(f"{name}[{k}]", v) for k, v in raw.items()]
    return [(name, raw)] if raw else []


PER_CATEGORY = [(label, t) for n in CONFIGS for label, t in _tables(n)
                if config_lib.paper_categories(t)]


def test_the_paper_configs_carry_per_category_numbers():
    labels = {label for label, _ in PER_CATEGORY}
    assert {"mvtec_rd4ad", "mvtec_mrkd", "mvtec_efficientad[S]",
            "mvtec_efficientad[M]"} <= labels


@pytest.mark.parametrize("label,table", PER_CATEGORY, ids=[p[0] for p in PER_CATEGORY])
def test_published_mean_is_the_mean_of_the_categories(label, table):
    cats = config_lib.paper_categories(table)
    assert sorted(cats) == sorted(MVTEC_AD_CATEGORIES)
    metrics = set(table["mean"])
    for c in cats:
        assert set(table[c]) == metrics, (label, c)
    for m in metrics:
        mean = sum(float(table[c][m]) for c in cats) / len(cats)
        # Rounded to the published one decimal (half up, as the papers round).
        assert math.floor(mean * 10 + 0.5) / 10 == pytest.approx(table["mean"][m]), (label, m)
        for c in cats:
            assert 0 < table[c][m] <= 100


def test_paper_numbers_spot_checks():
    rd = config_lib.paper_targets(config_lib.load_config("mvtec_rd4ad"))[0]
    mr = config_lib.paper_targets(config_lib.load_config("mvtec_mrkd"))[0]
    assert rd["transistor"] == {"image_auroc": 96.7, "pixel_auroc": 92.5,
                                "au_pro_per_image": 78.0}
    assert mr["transistor"] == {"image_auroc": 100.0, "pixel_auroc": 98.1,
                                "au_pro_per_image": 91.4}
    assert mr["mean"] == {"image_auroc": 98.9, "pixel_auroc": 98.4, "au_pro_per_image": 95.3}


def test_efficientad_targets_follow_model_size():
    s = config_lib.load_config("mvtec_efficientad")
    m = config_lib.load_config(os.path.join(REPO, "configs", "mvtec_efficientad.py") + ":M")
    assert (s.efficientad.model_size, s.teacher.arch) == ("S", "pdn_small")
    assert (m.efficientad.model_size, m.teacher.arch) == ("M", "pdn_medium")
    ts, src_s = config_lib.paper_targets(s)
    tm, src_m = config_lib.paper_targets(m)
    assert ts["mean"] == {"image_auroc": 99.0, "au_pro": 93.3}
    assert tm["mean"] == {"image_auroc": 99.1, "au_pro": 93.7}
    assert ts["screw"] == {"image_auroc": 97.9, "au_pro": 95.6}
    assert tm["screw"] == {"image_auroc": 97.4, "au_pro": 97.3}
    assert src_s.endswith("[efficientad.model_size=S]") and src_m.endswith("=M]")
    # The override alone (with its teacher) picks the M table too.
    o = config_lib.load_config("mvtec_efficientad", {"efficientad.model_size": "M",
                                                     "teacher.arch": "pdn_medium"})
    assert config_lib.paper_targets(o)[0] == tm
    # The reference's MVTec AD protocol.
    assert s.data.dataset == "mvtec_ad" and s.data.validation_fraction == 0.1
    assert s.eval.resolution == "original" and s.train.steps == 70000
    assert s.data.image_size == 256 and s.seed == 42


def test_targets_by_and_model_size_mistakes_are_config_errors(mini_mvtec_ad_root):
    c = config_lib.load_config("mvtec_efficientad", {"data.root": mini_mvtec_ad_root,
                                                     "data.category": "bottle"})
    with c.unlocked():
        c.efficientad.model_size = "M"
    with pytest.raises(ConfigError, match="needs teacher.arch='pdn_medium'"):
        config_lib.validate(c)
    with c.unlocked():
        c.teacher.arch = "pdn_medium"
        c.targets_by = "efficientad.size"
    with pytest.raises(ConfigError, match="targets_by='efficientad.size' is not a config key"):
        config_lib.validate(c)


# ---------------------------------------------------------------------------
# tools/reproduce.py
# ---------------------------------------------------------------------------

def reproduce(*args, expect=0):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    p = subprocess.run([sys.executable, os.path.join("tools", "reproduce.py"), *args], cwd=REPO,
                       env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == expect, f"exit {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}"
    return p


TINY = ["--config.teacher.weights=random", "--config.teacher.allow_random=True",
        "--config.teacher.width_divisor=16", "--config.data.image_size=32",
        "--config.train.steps=2", "--config.train.batch_size=2",
        "--config.train.steps_per_call=1", "--config.train.checkpoint_every=1",
        "--config.eval.batch_size=4", "--config.eval.num_figures=1"]


def test_reproduce_runs_every_category_and_resumes(tmp_path, make_mvtec_ad):
    root = str(tmp_path / "data")
    make_mvtec_ad(root, "bottle")
    make_mvtec_ad(root, "cable", seed=1)
    wd = str(tmp_path / "run")
    args = ["--config=configs/mvtec_rd4ad.py", f"--config.data.root={root}",
            "--config.data.category=bottle,cable", f"--workdir={wd}", *TINY]

    # 1. Ctrl-C (SIGINT to the process group, as a terminal sends it) once the first
    # category saved a checkpoint: exit 130, the second category not started.
    args.append("--config.train.steps=40")
    p = subprocess.Popen([sys.executable, os.path.join("tools", "reproduce.py"), *args],
                         cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    first = os.path.join(wd, "bottle", "checkpoints", "bottle", "1")
    t0 = time.time()
    while time.time() - t0 < 300 and not os.path.isdir(first) and p.poll() is None:
        time.sleep(0.05)
    os.killpg(p.pid, signal.SIGINT)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 130, err[-3000:]
    assert "interrupted in category bottle" in err and "rerun" in err
    assert not os.path.exists(os.path.join(wd, "cable"))
    assert not os.path.exists(os.path.join(wd, "bottle", "results.json"))

    # 2. Rerun: bottle resumes from its last checkpoint, cable trains.
    p = reproduce(*args)
    log = open(os.path.join(wd, "bottle", "log.txt")).read()
    assert "[bottle] resumed from checkpoint at step" in log
    for c in ("bottle", "cable"):
        res = json.load(open(os.path.join(wd, c, "results.json")))
        assert list(res["categories"]) == [c]
    rep = json.load(open(os.path.join(wd, "reproduce.json")))
    assert rep["categories"] == rep["finished"] == ["bottle", "cable"]
    comp = rep["comparison"]
    assert comp["metrics"] == ["image_auroc", "pixel_auroc", "au_pro_per_image"]
    ours = json.load(open(os.path.join(wd, "cable", "results.json")))["categories"]["cable"]
    cell = comp["categories"]["cable"]["pixel_auroc"]
    assert cell["paper"] == 97.4
    assert cell["ours"] == pytest.approx(100 * ours["pixel_auroc"])
    assert cell["difference"] == pytest.approx(round(round(cell["ours"], 1) - 97.4, 1))
    # Two of the paper's 15 categories: its mean over the same two (100.0 + 95.0) / 2.
    mean = comp["mean"]["image_auroc"]
    assert mean["paper"] == pytest.approx(97.5) and mean["paper_mean_of"] == 2
    md = open(os.path.join(wd, "reproduce.md")).read()
    assert "| image_auroc ours | image_auroc *paper* | image_auroc Δ |" in md
    assert f"| cable | {100 * ours['image_auroc']:.1f} | 95.0 |" in md
    assert "RANDOM" in md and "RD4AD column" in md
    assert "| **mean** |" in md and md in p.stdout

    # 3. Rerun: nothing is trained again; the same table.
    stamp = os.path.getmtime(os.path.join(wd, "bottle", "results.json"))
    p = reproduce(*args)
    assert "[bottle] finished earlier" in p.stdout and "[cable] finished earlier" in p.stdout
    assert "kdjax.main" not in p.stdout
    assert os.path.getmtime(os.path.join(wd, "bottle", "results.json")) == stamp
    assert open(os.path.join(wd, "reproduce.md")).read() == md


@pytest.mark.parametrize("name", ["mvtec_mrkd", "mvtec_efficientad"])
def test_reproduce_on_the_other_paper_configs(name, mini_mvtec_ad_root, ad_roots,
                                              tmp_path):
    """The other configs with per-category numbers, one tiny category each (the
    settings of tests/test_model.py, whose compiled programs the XLA cache holds)."""
    from test_model import tiny_args

    args, c = tiny_args(name, ad_roots)
    wd = str(tmp_path / "run")
    p = reproduce(f"--config=configs/{name}.py", f"--workdir={wd}", *args)
    rep = json.load(open(os.path.join(wd, "reproduce.json")))
    assert rep["finished"] == ["bottle"]
    targets = config_lib.paper_targets(c)[0]
    for m, paper in targets["bottle"].items():
        cell = rep["comparison"]["categories"]["bottle"][m]
        assert cell["paper"] == paper and cell["ours"] is not None, m
    notes = " ".join(rep["notes"])
    assert ("efficientad.penalty_dir" in notes) == (c.method == "efficientad")
    assert ("efficientad.penalty_dir" in p.stdout) == (c.method == "efficientad")


@pytest.fixture
def ad_roots(mini_mvtec_ad_root):
    return {"mvtec_ad": mini_mvtec_ad_root}


@pytest.mark.parametrize("args,message", [
    (["--config=configs/demo.py"], "names no paper numbers"),
    (["--config=configs/loco_efficientad.py"], "only the paper's mean"),
    (["--config=configs/mvtec_rd4ad.py"], "data.root is not set"),
    (["--config=configs/mvtec_rd4ad.py", "--config.data.root=/no/such/dir"], "does not exist"),
    (["--config=configs/mvtec_rd4ad.py", "--config.data.root={root}"], "13 of 15 categories"),
    (["--config=configs/mvtec_rd4ad.py", "--config.data.root={root}",
      "--config.data.category=bottle,tray"], "the paper lists no numbers for tray"),
    (["--config=configs/mvtec_rd4ad.py", "--mode=eval"], "unexpected argument '--mode=eval'"),
    (["--config.data.root=x"], "--config=configs/<name>.py is required"),
    (["--config=configs/mvtec_rd4ad.py", "--config.train.stepz=1"], "train.stepz"),
])
def test_reproduce_bad_input_is_one_line(args, message, mini_mvtec_ad_root):
    args = [a.replace("{root}", mini_mvtec_ad_root) for a in args]
    p = reproduce(*args, expect=2)
    assert message in p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(("reproduce: ", "kdjax: ")), p.stderr
