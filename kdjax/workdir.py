"""A run's workdir: the lock that refuses a second live run, and logging to log.txt."""

from __future__ import annotations

from kdjax.errors import UserError

import contextlib
import json
import logging
import os
import socket
import time

import jax

log = logging.getLogger("kdjax")


class WorkdirLockedError(UserError, RuntimeError):
    """Another live run uses the same workdir."""


@contextlib.contextmanager
def workdir_lock(workdir: str):
    """Refuse a second live run on the same workdir; take over stale locks."""
    if jax.process_index() != 0:
        yield
        return
    path = os.path.join(workdir, ".kdjax.lock")
    host = socket.gethostname()
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            with os.fdopen(fd, "w") as f:
                json.dump({"pid": os.getpid(), "host": host, "time": time.time()}, f)
            break
        except FileExistsError:
            try:
                with open(path) as f:
                    info = json.load(f)
            except (OSError, ValueError):
                info = {}
            alive = info.get("host") == host and _pid_alive(int(info.get("pid", -1)))
            if alive or (info.get("host") not in (None, host)):
                raise WorkdirLockedError(
                    f"The workdir {workdir!r} is in use by another kdjax run "
                    f"(pid {info.get('pid')} on {info.get('host')}). Wait for it to finish, use "
                    f"another --workdir, or delete {path} if that run is gone.")
            log.warning("Removing a stale lock left by pid %s.", info.get("pid"))
            os.remove(path)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.remove(path)


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def setup_logging(workdir: str) -> None:
    """kdjax's lines on the console (kdjax/console.py decides what else shows there);
    every logger's INFO lines in ``<workdir>/log.txt``."""
    from kdjax import console

    os.makedirs(workdir, exist_ok=True)
    log.setLevel(logging.INFO)
    # Console output: through the root logger when the application configured one
    # (absl does), else a handler of our own. The logger always propagates, so the
    # application's (and pytest's) handlers see every message.
    if not logging.getLogger().handlers and not any(
            isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
            for h in log.handlers):
        h = logging.StreamHandler()
        h.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        log.addHandler(h)
    console.install()
    console.attach_log_file(os.path.join(workdir, "log.txt"))
