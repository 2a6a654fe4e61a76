"""A run's workdir: whether it can be created and written (checked before any work), the
lock that refuses a second live run, and logging to log.txt.

Nothing here imports JAX at module level: the command line checks the workdir (and
``--output``) before JAX is imported.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import time

from kdjax.errors import UserError, WorkdirError

log = logging.getLogger("kdjax")


def _why(e: OSError) -> str:
    return e.strerror or errno.errorcode.get(e.errno or 0, "") or type(e).__name__


def check_dir(path: str, flag: str = "--workdir") -> None:
    """Refuse a directory that cannot be created or written, without creating anything:
    WorkdirError, one line naming ``flag``, the path, why, and the fix. ``path`` may
    exist (then it must be a writable directory) or not (then its nearest existing
    ancestor must be a writable directory)."""
    if not path:
        raise WorkdirError(f"{flag} is empty: give a directory, e.g. {flag}=runs/demo.")
    what = f"{flag} {path!r}"
    fix = f"pass another {flag}"
    p = os.path.abspath(path)
    if os.path.lexists(p) and not os.path.exists(p):
        raise WorkdirError(f"{what} cannot be created: it is a broken symbolic link (to "
                           f"{os.readlink(p)!r}); remove the link or {fix}.")
    if os.path.exists(p):
        if not os.path.isdir(p):
            raise WorkdirError(f"{what} cannot be used: it is an existing file, not a "
                               f"directory; {fix} (a new or existing directory).")
        if not os.access(p, os.W_OK | os.X_OK):
            raise WorkdirError(f"{what} cannot be written: permission denied (or a read-only "
                               f"file system); {fix} you can write, or fix its permissions.")
        return
    parent = os.path.dirname(p)
    while parent != os.path.dirname(parent) and not os.path.lexists(parent):
        parent = os.path.dirname(parent)
    if os.path.lexists(parent) and not os.path.isdir(parent):
        raise WorkdirError(f"{what} cannot be created: {parent} is a file, not a directory; "
                           f"{fix}.")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise WorkdirError(f"{what} cannot be created: {parent} is not writable (permission "
                           f"denied or a read-only file system); {fix} you can write.")


def ensure_dir(path: str, flag: str = "--workdir") -> None:
    """Create directory ``path`` (and its parents); WorkdirError, one line, when it cannot
    be created or written (see :func:`check_dir`)."""
    check_dir(path, flag)
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise WorkdirError(f"{flag} {path!r} cannot be created: {_why(e)}; pass another "
                           f"{flag}.") from None


class WorkdirLockedError(UserError, RuntimeError):
    """Another live run uses the same workdir."""


@contextlib.contextmanager
def workdir_lock(workdir: str):
    """Refuse a second live run on the same workdir; take over stale locks."""
    import jax

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
