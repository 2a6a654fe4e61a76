"""Faults that must not cost a good model: a changed rerun, a damaged checkpoint,
Ctrl-C, and the metrics log of a resumed run."""

import glob
import json
import os
import signal
import subprocess
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_engine import interrupt_after, tiny_config  # noqa: E402

from kdjax import experiment  # noqa: E402
from kdjax.errors import UserError  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    from kdjax import data

    r = str(tmp_path_factory.mktemp("synthetic"))
    c = tiny_config()
    data.ensure_synthetic(r, seed=0, image_size=32, counts=tuple(c.data.synthetic_counts))
    return r


def _ckpt_dir(wd):
    return os.path.join(wd, "checkpoints", "tray")


def test_a_rerun_with_other_training_settings_is_refused_until_restart(root, tmp_path):
    wd = str(tmp_path)
    c = tiny_config("rd4ad", **{"data.root": root, "train.steps": 2})
    experiment.train_and_evaluate(c, wd, "train")
    changed = tiny_config("rd4ad", **{"data.root": root, "train.steps": 2,
                                     "train.learning_rate": 0.001})
    with pytest.raises(UserError, match=r"train\.learning_rate: 0\.005 -> 0\.001.*restart=True"):
        experiment.train_and_evaluate(changed, wd, "train")
    with changed.unlocked():
        changed.train.restart = True
    experiment.train_and_evaluate(changed, wd, "train")  # starts over
    rows = [json.loads(l) for l in open(os.path.join(wd, "train_metrics.jsonl"))]
    assert [r["step"] for r in rows] == [2], rows  # the old run's rows are gone


def test_damaged_latest_checkpoint_falls_back_to_the_previous(root, tmp_path, caplog,
                                                              monkeypatch):
    wd = str(tmp_path)
    c = tiny_config("rd4ad", **{"data.root": root, "train.steps": 4,
                               "train.checkpoint_every": 1, "train.steps_per_call": 1})
    with monkeypatch.context() as m:
        interrupt_after(m, 2)
        with pytest.raises(KeyboardInterrupt, match="interrupted at step 2 of 4.*step 2"):
            experiment.train_and_evaluate(c, wd, "train")
    # damage every array file of the latest checkpoint (step 2)
    files = [f for f in glob.glob(os.path.join(_ckpt_dir(wd), "2", "**", "*"), recursive=True)
             if os.path.isfile(f) and os.path.getsize(f) > 64]
    assert files
    for f in files:
        with open(f, "r+b") as fh:
            fh.truncate(16)
    with caplog.at_level("WARNING", logger="kdjax"):
        c2 = tiny_config("rd4ad", **{"data.root": root, "train.steps": 4,
                                    "train.checkpoint_every": 1, "train.steps_per_call": 1})
        experiment.train_and_evaluate(c2, wd, "train")
    assert any("unreadable" in r.getMessage() and os.path.join("tray", "2") in r.getMessage()
               for r in caplog.records)
    rows = [json.loads(l)["step"] for l in open(os.path.join(wd, "train_metrics.jsonl"))]
    assert rows == sorted(set(rows)) and rows[-1] == 4  # redone steps are not repeated


def test_ctrl_c_prints_one_line_and_exits_130(root, tmp_path):
    wd = str(tmp_path / "w")
    cmd = [sys.executable, "-m", "kdjax.main", "--config=configs/demo.py", f"--workdir={wd}",
           "--config.method=rd4ad", f"--config.data.root={root}",
           "--config.data.image_size=32", "--config.data.synthetic_size=32",
           "--config.data.synthetic_counts=(8, 4, 4, 4, 4)", "--config.teacher.weights=random",
           "--config.teacher.width_divisor=16", "--config.train.batch_size=4",
           "--config.train.steps=100000", "--config.train.steps_per_call=1",
           "--config.train.checkpoint_every=1", "--config.train.log_every=1"]
    p = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    metrics = os.path.join(wd, "train_metrics.jsonl")
    t0 = time.time()
    while time.time() - t0 < 300 and not (os.path.exists(metrics) and os.path.getsize(metrics)):
        time.sleep(0.5)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130, err[-3000:]
    assert "Traceback" not in err
    line = [l for l in err.splitlines() if l.startswith("kdjax:")]
    assert line and "interrupted at step" in line[-1] and "rerun the same command" in line[-1]
