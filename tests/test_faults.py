"""Faults that must not cost a good model: a changed rerun, a diverged run and its retry, a
damaged checkpoint, Ctrl-C, SIGKILL, and the metrics log of a resumed run.

The command-line faults run ``python -m kdjax.main`` in a subprocess as a user would, on
the conftest's tiny synthetic set (rd4ad, 32 px, width divisor 16, --mode=train); the
others call ``experiment.train_and_evaluate`` in this process.
"""

import glob
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import TINY_SYNTHETIC, TINY_SYNTHETIC_ARGS  # noqa: E402
from test_engine import interrupt_after, tiny_config  # noqa: E402

from kdjax import experiment  # noqa: E402
from kdjax.errors import UserError  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SYNTHETIC = {"data.synthetic_size": TINY_SYNTHETIC["size"],
             "data.synthetic_counts": TINY_SYNTHETIC["counts"]}


@pytest.fixture
def root(tiny_synthetic_root):
    return tiny_synthetic_root


def _config(root, **overrides):
    return tiny_config("rd4ad", **{"data.root": root, **SYNTHETIC, **overrides})


def _ckpt_dir(wd):
    return os.path.join(wd, "checkpoints", "tray")


def _steps(ckpt_dir):
    """The checkpoint steps in ``ckpt_dir`` (finished saves only)."""
    if not os.path.isdir(ckpt_dir):
        return []
    return sorted(int(d) for d in os.listdir(ckpt_dir) if d.isdigit())


def _cli_args(root, wd, *extra):
    """A tiny rd4ad training through the command line (one step per host call)."""
    return [sys.executable, "-m", "kdjax.main", "--config=configs/demo.py", f"--workdir={wd}",
            "--mode=train", "--config.method=rd4ad", f"--config.data.root={root}",
            *TINY_SYNTHETIC_ARGS, "--config.data.image_size=32",
            "--config.teacher.weights=random", "--config.teacher.width_divisor=16",
            "--config.train.batch_size=4", "--config.train.steps_per_call=1",
            "--config.train.log_every=1", *extra]


def _run(cmd, expect):
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert p.returncode == expect, f"exit {p.returncode}\n{p.stderr[-4000:]}"
    assert "Traceback" not in p.stderr, p.stderr[-4000:]
    return p


def _line(p):
    """The one ``kdjax: ...`` line of a failed run."""
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("kdjax: ")]
    assert len(lines) == 1, p.stderr[-4000:]
    return lines[0]


def test_a_rerun_with_other_training_settings_is_refused_until_restart(root, tmp_path, caplog):
    wd = str(tmp_path)
    c = _config(root, **{"train.steps": 2})
    experiment.train_and_evaluate(c, wd, "train")
    changed = _config(root, **{"train.steps": 2, "train.learning_rate": 0.001})
    with pytest.raises(UserError, match=r"train\.learning_rate: 0\.005 -> 0\.001.*restart=True"):
        experiment.train_and_evaluate(changed, wd, "train")
    with changed.unlocked():
        changed.train.restart = True
    experiment.train_and_evaluate(changed, wd, "train")  # starts over
    rows = [json.loads(l) for l in open(os.path.join(wd, "train_metrics.jsonl"))]
    assert [r["step"] for r in rows] == [2], rows  # the old run's rows are gone
    # The same restart command again: its checkpoints have these settings, so they are kept.
    with caplog.at_level("INFO", logger="kdjax"):
        experiment.train_and_evaluate(changed, wd, "train")
    assert any("same settings" in r.getMessage() for r in caplog.records)
    assert any("resumed from checkpoint at step 2" in r.getMessage() for r in caplog.records)
    assert _steps(_ckpt_dir(wd)) == [2]


def test_damaged_latest_checkpoint_falls_back_to_the_previous(root, tmp_path, caplog,
                                                              monkeypatch):
    wd = str(tmp_path)
    c = _config(root, **{"train.steps": 4, "train.checkpoint_every": 1,
                         "train.steps_per_call": 1})
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
        c2 = _config(root, **{"train.steps": 4, "train.checkpoint_every": 1,
                              "train.steps_per_call": 1})
        experiment.train_and_evaluate(c2, wd, "train")
    assert any("unreadable" in r.getMessage() and os.path.join("tray", "2") in r.getMessage()
               for r in caplog.records)
    rows = [json.loads(l)["step"] for l in open(os.path.join(wd, "train_metrics.jsonl"))]
    assert rows == sorted(set(rows)) and rows[-1] == 4  # redone steps are not repeated


def test_diverged_retry_killed_resumes_and_unreadable_checkpoints(root, tmp_path):
    """The NaN story through the command line, as the messages tell a user to go on:
    diverge (the message names the real last checkpoint) -> rerun with a lower learning
    rate: refused, naming it -> add --config.train.restart=True: trains over; SIGKILL ->
    the same command (restart included) resumes and trains to the end -> every
    checkpoint damaged: one line."""
    wd = str(tmp_path / "w")
    ckpt = _ckpt_dir(wd)
    steps = 100
    base = _cli_args(root, wd, f"--config.train.steps={steps}")

    p = _run(base + ["--config.train.learning_rate=1e30", "--config.train.checkpoint_every=1"],
             expect=2)
    line = _line(p)
    m = re.search(r"the loss became (nan|inf|-inf) at step (\d+)\. Training stopped; the last "
                  r"good checkpoint \(step (\d+)\) is kept in (\S+)\.", line)
    assert m, line
    assert int(m.group(3)) == int(m.group(2)) - 1 == _steps(ckpt)[-1], (line, _steps(ckpt))
    assert m.group(4) == ckpt and "compute_dtype" not in line  # already float32
    assert "--config.train.restart=True" in line

    p = _run(base, expect=2)  # the advice without restart: the settings differ
    line = _line(p)
    assert "train.learning_rate: 1e+30 -> 0.005" in line and "restart=True" in line, line
    assert _steps(ckpt) == [int(m.group(3))]  # nothing deleted

    retry = base + ["--config.train.restart=True", "--config.train.checkpoint_every=25"]
    proc = subprocess.Popen(retry, cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    t0 = time.time()
    while time.time() - t0 < 300 and proc.poll() is None and not any(
            s >= 25 for s in _steps(ckpt)):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL, "the retry ended before it was killed"
    killed_at = _steps(ckpt)[-1]
    assert 25 <= killed_at < steps

    p = _run(retry, expect=0)  # the same command again: resumes, not deleted again
    assert f"resumed from checkpoint at step {killed_at}" in p.stderr, p.stderr[-3000:]
    assert "deleting its checkpoints" not in p.stderr
    assert _steps(ckpt) == [steps]
    rows = [json.loads(l)["step"] for l in open(os.path.join(wd, "train_metrics.jsonl"))]
    assert rows == list(range(1, steps + 1)), rows  # the diverged run's rows are gone

    for f in glob.glob(os.path.join(ckpt, str(steps), "**", "*"), recursive=True):
        if os.path.isfile(f) and os.path.getsize(f) > 64:
            with open(f, "r+b") as fh:
                fh.truncate(16)
    line = _line(_run(retry, expect=2))
    assert f"No checkpoint in {ckpt} can be read (steps {steps})" in line, line
    assert f"Delete {ckpt}" in line


def test_ctrl_c_prints_one_line_and_exits_130(root, tmp_path):
    wd = str(tmp_path / "w")
    cmd = _cli_args(root, wd, "--config.train.steps=100000", "--config.train.checkpoint_every=1")
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
