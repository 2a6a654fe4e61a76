"""Progress of a long loop: a live bar on a terminal, periodic plain lines elsewhere.

``Progress(total, label, unit)``; ``update(n, **fields)`` after each chunk (or
``set(done, **fields)``); ``close()`` at the end (also a context manager).
``fields`` (e.g. ``loss=0.123``) are shown after the bar.

* Live (stderr and stdout are terminals): one line per open loop is redrawn in
  place by `rich <https://rich.readthedocs.io>`_ with the count, the rate, the
  fields and the ETA. Log lines (and prints) written meanwhile appear above the
  bars; lines logged with ``extra=PROGRESS`` (the periodic training line) go to
  the log file only, since the bar already shows them.
* Plain (CI, notebooks, a pipe or a file): a log line at most every
  ``every_s`` seconds (``every_s=None``: none; the caller logs its own periodic
  line, as the training loop does).

Either way ``close()`` logs one summary line unless ``summary=False``.
``KDJAX_PROGRESS=live|plain`` overrides the detection.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any, Dict, List, Optional

log = logging.getLogger("kdjax")

# ``log.info(..., extra=PROGRESS)``: a progress line the live bar already shows.
PROGRESS = {"kdjax_progress": True}

_live: Dict[str, Any] = {"progress": None, "open": 0, "swapped": []}


def live_enabled() -> bool:
    """Whether bars are drawn live: KDJAX_PROGRESS=live|plain, else both stdout and
    stderr are terminals (not in CI, a notebook, a pipe or a file)."""
    mode = os.environ.get("KDJAX_PROGRESS", "").strip().lower()
    if mode in ("live", "plain"):
        return mode == "live"
    try:
        return bool(sys.stderr.isatty() and sys.stdout.isatty())
    except (AttributeError, ValueError):
        return False


def live_active() -> bool:
    """Whether a live bar is on screen now."""
    return _live["progress"] is not None


def fmt_time(s: float) -> str:
    if s != s or s in (float("inf"), float("-inf")):
        return "?"
    s = int(round(max(s, 0.0)))
    return f"{s // 3600:d}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _fmt_field(k: str, v) -> str:
    if k.endswith("/s"):  # a rate: "12.3 img/s"
        return f"{float(v):.1f} {k}"
    if isinstance(v, float):
        return f"{k} {v:.5g}"
    return f"{k} {v}"


def _console_stream_handlers() -> List[logging.StreamHandler]:
    """The stream handlers that write to the terminal (root's, absl's, kdjax's)."""
    out = []
    for logger in (logging.getLogger(), log):
        for h in logger.handlers:
            h = getattr(h, "python_handler", h)  # absl's ABSLHandler wraps a StreamHandler
            if (isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
                    and getattr(h, "stream", None) in (sys.__stderr__, sys.__stdout__,
                                                       sys.stderr, sys.stdout)):
                out.append(h)
    return out


def _start_live():
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress as RichProgress,
                               TextColumn, TimeElapsedColumn, TimeRemainingColumn)

    handlers = _console_stream_handlers()
    forced = os.environ.get("KDJAX_PROGRESS", "").strip().lower() == "live"
    console = Console(file=sys.stderr, force_terminal=True if forced else None)
    bar = RichProgress(TextColumn("{task.description}", markup=False), BarColumn(bar_width=30),
                       MofNCompleteColumn(), TextColumn("{task.fields[unit]}", markup=False),
                       TextColumn("{task.fields[info]}", markup=False), TimeElapsedColumn(),
                       TextColumn("ETA"), TimeRemainingColumn(),
                       console=console, transient=True, redirect_stdout=True,
                       redirect_stderr=True)
    bar.start()
    # Log handlers keep the stream they were created with: point them at rich's proxy
    # (now sys.stderr), so log lines print above the bars instead of through them.
    swapped = []
    for h in handlers:
        swapped.append((h, h.stream))
        h.stream = sys.stderr
    _live.update(progress=bar, swapped=swapped)
    return bar


def _stop_live():
    bar = _live["progress"]
    if bar is None:
        return
    for h, stream in _live["swapped"]:
        h.stream = stream
    _live.update(progress=None, swapped=[])
    bar.stop()


class Progress:
    """A progress bar (see the module docstring)."""

    def __init__(self, total: int, label: str, unit: str = "it",
                 every_s: Optional[float] = 30.0, summary: bool = True, start: int = 0,
                 live: Optional[bool] = None, show_rate: bool = True):
        self.total, self.label, self.unit = max(int(total), 0), label, unit
        self.start = self.done = min(int(start), self.total)
        self.t0 = self.t_last = time.time()
        self.every_s = every_s
        self.summary = summary
        self.show_rate = show_rate
        self.fields: Dict[str, Any] = {}
        self.closed = False
        self.live = live_enabled() if live is None else bool(live)
        self._task = None
        if self.live:
            bar = _live["progress"] or _start_live()
            _live["open"] += 1
            self._task = bar.add_task(label, total=self.total or None, completed=self.done,
                                      unit=unit, info="")

    # --- numbers --------------------------------------------------------------
    @property
    def elapsed(self) -> float:
        return max(time.time() - self.t0, 1e-9)

    @property
    def rate(self) -> float:
        return (self.done - self.start) / self.elapsed

    @property
    def eta(self) -> float:
        r = self.rate
        return (self.total - self.done) / r if r > 0 else float("nan")

    def _info(self) -> str:
        parts = ([f"{self.rate:.1f} {self.unit}/s"] if self.show_rate and self.done > self.start
                 else [])
        return "  ".join(parts + [_fmt_field(k, v) for k, v in self.fields.items()])

    def line(self) -> str:
        """The plain progress line: label, count, rate, fields, ETA."""
        frac = self.done / self.total if self.total else 1.0
        return (f"{self.label} {self.done}/{self.total} {self.unit} ({100 * frac:.0f}%)  "
                f"{self._info()}  ETA {fmt_time(self.eta)}")

    # --- updates --------------------------------------------------------------
    def set(self, done: int, **fields) -> None:
        """Set the count to ``done`` (and the shown ``fields``)."""
        self.done = min(self.total, max(int(done), 0))
        self.fields.update(fields)
        if self.live:
            bar = _live["progress"]
            if bar is not None and self._task is not None:
                bar.update(self._task, completed=self.done, info=self._info(), refresh=True)
        elif self.every_s is not None and self.done < self.total:
            now = time.time()
            if now - self.t_last >= self.every_s:
                log.info("%s", self.line())
                self.t_last = now

    def update(self, n: int = 1, **fields) -> None:
        """Count ``n`` more."""
        self.set(self.done + int(n), **fields)

    def close(self, summary: Optional[str] = None) -> None:
        """End the bar; log ``summary`` or the default summary line (unless summary=False)."""
        if self.closed:
            return
        self.closed = True
        if self.live:
            bar = _live["progress"]
            if bar is not None and self._task is not None:
                bar.remove_task(self._task)
            _live["open"] = max(0, _live["open"] - 1)
            if _live["open"] == 0:
                _stop_live()
        if summary is None and self.summary:
            n = self.done - self.start
            summary = (f"{self.label}: {n} {self.unit} in {fmt_time(self.elapsed)} "
                       f"({n / self.elapsed:.1f} {self.unit}/s)")
        if summary:
            log.info("%s", summary)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close(summary=None if exc[0] is None else False)
