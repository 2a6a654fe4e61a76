"""Progress of a long loop: a live bar on a terminal, periodic plain lines elsewhere."""

from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger("kdjax")


class Progress:
    """``Progress(total, label)``; ``update(n)`` after each chunk; ``close()`` at the end.

    On a terminal (stderr is a TTY) one line is redrawn in place with the count,
    the rate and the ETA; otherwise (CI, notebooks' logs, files) a log line is
    written at most every ``every_s`` seconds and at the end."""

    def __init__(self, total: int, label: str, unit: str = "it", every_s: float = 10.0,
                 stream=None):
        self.total, self.label, self.unit = int(total), label, unit
        self.done = 0
        self.t0 = self.t_last = time.time()
        self.every_s = float(every_s)
        self.stream = stream or sys.stderr
        self.live = bool(getattr(self.stream, "isatty", lambda: False)())

    def _line(self) -> str:
        dt = max(time.time() - self.t0, 1e-9)
        rate = self.done / dt
        eta = (self.total - self.done) / rate if rate > 0 else float("nan")
        frac = self.done / self.total if self.total else 1.0
        bar = "#" * int(24 * frac)
        eta_s = "?" if eta != eta else f"{int(eta) // 60}:{int(eta) % 60:02d}"
        return (f"{self.label} [{bar:<24}] {self.done}/{self.total} {self.unit} "
                f"{rate:.1f} {self.unit}/s ETA {eta_s}")

    def update(self, n: int = 1) -> None:
        self.done = min(self.total, self.done + int(n))
        now = time.time()
        if self.live:
            self.stream.write("\r" + self._line())
            self.stream.flush()
        elif now - self.t_last >= self.every_s and self.done < self.total:
            log.info("%s", self._line())
            self.t_last = now

    def close(self) -> None:
        if self.live:
            self.stream.write("\r" + self._line() + "\n")
            self.stream.flush()
        else:
            log.info("%s", self._line())
