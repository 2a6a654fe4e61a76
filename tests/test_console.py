"""What a run prints (kdjax/console.py, kdjax/progress.py).

On the shared tiny demo run (conftest ``demo_run``): the console gets kdjax's
lines and warnings only, other libraries' INFO lines (orbax: dozens per
checkpoint) go to log.txt; absl's ``--verbosity`` brings them back. Progress
is periodic plain lines when the output is not a terminal, a live bar (rich)
on a terminal.
"""

import io
import logging
import os
import re
import shutil

from conftest import run_cli

KDJAX = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kdjax")
KDJAX_FILES = {f for _, _, fs in os.walk(KDJAX) for f in fs if f.endswith(".py")}
ABSL_LINE = re.compile(r"^([IWEF])\d{4} [\d:.]+ +\d+ ([^:\]]+):\d+\] (.*)$")


def _lines(text):
    """[(level, source file, message)] of the absl-formatted lines."""
    out = []
    for line in text.splitlines():
        m = ABSL_LINE.match(line)
        if m:
            out.append(m.groups())
    return out


def test_console_shows_kdjax_lines_and_the_log_file_everything(demo_run, tmp_path):
    wd, p = demo_run
    lines = _lines(p.stderr)
    info = [(f, msg) for lvl, f, msg in lines if lvl == "I"]
    assert info and all(f in KDJAX_FILES for f, _ in info), [x for x in info
                                                             if x[0] not in KDJAX_FILES]
    messages = [msg for _, msg in info]
    assert any(re.match(r"\[tray\] step 2/2 loss [\d.]+ ", m) for m in messages)  # plain line
    assert any("report is" in m and "report.html" in m for m in messages)
    assert len(p.stderr.splitlines()) < 40, p.stderr
    log_txt = open(os.path.join(wd, "log.txt")).read()
    orbax = [ln for ln in log_txt.splitlines() if " INFO absl: " in ln]
    assert len(orbax) > 10  # orbax's INFO lines: in the log file only
    assert "[tray] step 2/2" in log_txt

    # --verbosity=0 (INFO) brings other libraries' INFO lines back: --mode=train on a copy
    # of the finished run (orbax restores its checkpoint; nothing is trained or evaluated).
    copy = str(tmp_path / "w")
    shutil.copytree(wd, copy)
    q = run_cli("--config=configs/demo.py", f"--workdir={copy}", "--mode=train",
                "--verbosity=0", *_demo_args(wd))
    other = [(f, msg) for lvl, f, msg in _lines(q.stderr) if lvl == "I" and f not in KDJAX_FILES]
    assert other, q.stderr


def _demo_args(wd):
    """The demo run's --config overrides, from its config.json (same training settings)."""
    from conftest import TINY_DEMO_ARGS, TINY_SYNTHETIC_ARGS
    import json

    root = json.load(open(os.path.join(wd, "config.json")))["data"]["root"]
    return [*TINY_DEMO_ARGS, f"--config.data.root={root}", *TINY_SYNTHETIC_ARGS]


def test_progress_live_bar_and_plain_lines(monkeypatch, caplog):
    from kdjax import console, progress

    # Plain (not a terminal): a line per interval, and a summary at the end.
    monkeypatch.setenv("KDJAX_PROGRESS", "plain")
    with caplog.at_level(logging.INFO, logger="kdjax"):
        with progress.Progress(10, "[x] work", "img", every_s=0) as bar:
            for _ in range(10):
                bar.update(1, loss=0.5)
    msgs = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("[x] work 3/10 img") and "loss 0.5" in m for m in msgs)
    assert msgs[-1].startswith("[x] work: 10 img in ")

    # Live (forced, as on a terminal): rich draws the bar on stderr; a log line written
    # meanwhile prints above it, and the periodic line the bar already shows does not.
    err = io.StringIO()
    monkeypatch.setattr("sys.stderr", err)
    monkeypatch.setenv("KDJAX_PROGRESS", "live")
    handler = logging.StreamHandler(err)
    log = logging.getLogger("kdjax")
    log.addHandler(handler)
    console.install(verbose=False)
    try:
        bar = progress.Progress(4, "[x] train", "step", every_s=None, summary=False)
        assert progress.live_active()
        bar.set(2, loss=0.25)
        log.warning("a warning while the bar is live")
        log.info("[x] step 2/4 loss 0.25", extra=progress.PROGRESS)
        bar.set(4)
        bar.close()
    finally:
        log.removeHandler(handler)
    assert not progress.live_active()
    out = err.getvalue()
    assert "a warning while the bar is live" in out
    assert "[x] train" in out and "2/4" in out and "loss 0.25" in out
    assert "[x] step 2/4 loss 0.25" not in out
    assert handler.stream is err  # restored after the bar
