"""What reaches the console, and what only the run's log file gets.

At the default verbosity the console shows kdjax's own lines and every
library's warnings and errors; other libraries' INFO lines (orbax logs about
50 per checkpoint save; absl, JAX, TensorFlow) go to ``<workdir>/log.txt``
only. absl's ``--verbosity`` flag (e.g. ``--verbosity=0`` for INFO), given on
the command line, brings them back. While a live progress bar is on screen
the periodic training line (``extra=kdjax.progress.PROGRESS``) is left out of
the console: the bar shows the same numbers.

``install()`` attaches the filter to the console handlers (absl's, pytest's
live-logging one is left alone); ``attach_log_file(path)`` sends every
logger's INFO lines to ``path``; ``quiet_stderr()`` keeps what C++ code (e.g.
TensorFlow's import) writes to file descriptor 2 out of the console.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
from typing import Optional

from kdjax import progress

log = logging.getLogger("kdjax")

_OWN = "kdjax"


class ConsoleFilter(logging.Filter):
    """kdjax's records, and everyone's warnings and errors (see the module docstring)."""

    def __init__(self, verbose: bool = False):
        super().__init__()
        self.verbose = verbose

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "kdjax_progress", False) and progress.live_active():
            return False
        if self.verbose or record.levelno >= logging.WARNING:
            return True
        return record.name == _OWN or record.name.startswith(_OWN + ".")


def _verbosity_given() -> bool:
    """Whether absl's --verbosity (or -v) was given on the command line."""
    try:
        from absl import flags

        return bool(flags.FLAGS.is_parsed() and flags.FLAGS["verbosity"].present)
    except Exception:
        return False


def _is_console(h: logging.Handler) -> bool:
    inner = getattr(h, "python_handler", None)  # absl's ABSLHandler
    if inner is not None:
        return True
    if isinstance(h, logging.FileHandler) or not isinstance(h, logging.StreamHandler):
        return False
    return getattr(h, "stream", None) in (sys.stderr, sys.stdout, sys.__stderr__,
                                          sys.__stdout__)


def install(verbose: Optional[bool] = None) -> None:
    """Attach (or update) the console filter on every console handler of the root
    and kdjax loggers. ``verbose``: None = whether --verbosity was given."""
    verbose = _verbosity_given() if verbose is None else bool(verbose)
    for logger in (logging.getLogger(), log):
        for h in logger.handlers:
            if not _is_console(h):
                continue
            mine = [f for f in h.filters if isinstance(f, ConsoleFilter)]
            if mine:
                mine[0].verbose = verbose
            else:
                h.addFilter(ConsoleFilter(verbose))


class _LogFile(logging.FileHandler):
    """The run's log.txt (one at a time)."""


def attach_log_file(path: str) -> None:
    """Send every logger's INFO (and higher) lines to ``path`` (replacing the log file
    of a previous run in this process). The root logger is lowered to INFO when it was
    above, so other libraries' INFO lines reach the file."""
    root = logging.getLogger()
    for logger in (root, log):
        for h in list(logger.handlers):
            if isinstance(h, _LogFile) or (logger is log and isinstance(h, logging.FileHandler)):
                logger.removeHandler(h)
                h.close()
    fh = _LogFile(os.path.abspath(path))
    fh.setLevel(logging.INFO)
    fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(fh)
    if root.getEffectiveLevel() > logging.INFO:
        root.setLevel(logging.INFO)


@contextlib.contextmanager
def quiet_stderr(logger_name: str = "stderr"):
    """Capture what is written to file descriptor 2 (C++ libraries' early log lines)
    and log it at INFO under ``logger_name`` (the log file; the console shows it with
    --verbosity). A no-op where fd 2 cannot be duplicated."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, AttributeError, ValueError):
        yield
        return
    with tempfile.TemporaryFile() as tmp:
        try:
            os.dup2(tmp.fileno(), 2)
            yield
        finally:
            try:
                sys.stderr.flush()
            except (OSError, ValueError):
                pass
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            text = tmp.read().decode("utf-8", "replace").strip()
            if text:
                logging.getLogger(logger_name).info("%s", text)
