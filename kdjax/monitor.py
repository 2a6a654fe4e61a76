"""What a run shows while it runs: progress bars, the training line, TensorBoard.

``Monitor(workdir, tensorboard=True)`` is created by kdjax/experiment.py and
handed to ``kdjax.train.train_category``, whose loop calls

* ``train_begin(category, start, total, batch)`` before the first step,
* ``train_step(step, loss)`` after every host call (the loop already has the
  loss on the host for its NaN check),
* ``train_log(step, metrics, images_per_s, learning_rates)`` every
  ``train.log_every`` steps, with the host means of the method's metrics,
* ``train_end()``;

the evaluation calls ``eval_category`` and ``eval_mean``. Everything here is
host side: no JAX array is read, so no device synchronization is added.

TensorBoard (``<workdir>/tensorboard/<run>/``, ``config.report.tensorboard``):
``train/<metric>`` (every loss term the method reports), ``train/images_per_s``,
``train/learning_rate`` at training steps; ``eval/<metric>`` (headline map
weights; other variants ``eval_<variant>/<metric>``) at the model's step, the
ROC figure and a few overlays as images; ``<workdir>/tensorboard/mean/`` the
mean over categories. With training variants the runs are
``tensorboard/<variant>/<category>``.
"""

from __future__ import annotations

import logging
import os
from typing import Dict, Mapping, Optional

import numpy as np

from kdjax import progress

log = logging.getLogger("kdjax")


class Monitor:
    """Console progress and TensorBoard summaries of one run (see the module docstring)."""

    def __init__(self, workdir: Optional[str] = None, tensorboard: bool = False,
                 max_images: int = 4):
        self.workdir = workdir
        self.max_images = int(max_images)
        self.prefix = ""  # "<variant>/" with training variants
        self.writers = None
        if tensorboard and workdir:
            from kdjax.tensorboard import Writers

            self.writers = Writers(os.path.join(workdir, "tensorboard"))
        self._bar: Optional[progress.Progress] = None
        self._cat = ""
        self._total = self._batch = 0
        self._eval_step = 0

    def run(self, name: str) -> str:
        return f"{self.prefix}{name}"

    # --- training -------------------------------------------------------------
    def train_begin(self, category: str, start: int, total: int, batch: int) -> None:
        self._cat, self._total, self._batch = category, int(total), int(batch)
        # The rate shown is the training line's images/s (since the previous line), not
        # an average over the first step's compilation.
        self._bar = progress.Progress(total, f"[{category}] train", unit="step", start=start,
                                      every_s=None, summary=False, show_rate=False)

    def train_step(self, step: int, loss: Optional[float] = None) -> None:
        if self._bar is not None:
            fields = {} if loss is None else {"loss": float(loss)}
            self._bar.set(step, **fields)

    def train_log(self, step: int, metrics: Mapping[str, float], images_per_s: float,
                  learning_rates: Optional[Mapping[str, float]] = None) -> None:
        """The periodic training line (log.txt always; the console unless a live bar
        shows it) and the training scalars."""
        eta = (self._total - step) * self._batch / max(images_per_s, 1e-9)
        log.info("[%s] step %d/%d loss %.5f  %.1f img/s  ETA %s", self._cat, step,
                 self._total, float(metrics["loss"]), images_per_s, progress.fmt_time(eta),
                 extra=progress.PROGRESS)
        if self._bar is not None:
            self._bar.set(step, loss=float(metrics["loss"]), **{"img/s": images_per_s})
        if self.writers is not None:
            values = {f"train/{k}": v for k, v in metrics.items()}
            values["train/images_per_s"] = images_per_s
            for k, v in (learning_rates or {}).items():
                values[f"train/{k}"] = v
            self.writers.scalars(self.run(self._cat), step, values)
            self.writers.flush()

    def train_end(self) -> None:
        if self._bar is not None:
            self._bar.close(summary=False)
            self._bar = None

    # --- evaluation -----------------------------------------------------------
    def eval_category(self, category: str, step: int,
                      per_variant: Mapping[str, Mapping[str, float]],
                      roc_png: Optional[str] = None,
                      overlays: Optional[np.ndarray] = None) -> None:
        """Metrics of every map-weight variant, the ROC figure and overlay images."""
        self._eval_step = max(self._eval_step, int(step))
        if self.writers is None:
            return
        run = self.run(category)
        for i, (vname, metrics) in enumerate(per_variant.items()):
            tag = "eval" if i == 0 else f"eval_{vname}"
            self.writers.scalars(run, step, {f"{tag}/{k}": v for k, v in metrics.items()})
        if roc_png and os.path.exists(roc_png):
            from PIL import Image

            with Image.open(roc_png) as im:
                self.writers.images(run, step, "eval/roc", np.asarray(im.convert("RGB")))
        if overlays is not None and len(overlays) and self.max_images > 0:
            self.writers.images(run, step, "eval/overlays", overlays[:self.max_images],
                                max_outputs=self.max_images)
        self.writers.flush()

    def eval_mean(self, mean: Mapping[str, float]) -> None:
        """The mean over categories (at the largest step evaluated)."""
        if self.writers is not None:
            self.writers.scalars(self.run("mean"), self._eval_step,
                                 {f"eval/{k}": v for k, v in mean.items()})
            self.writers.flush()

    def close(self) -> None:
        self.train_end()
        if self.writers is not None:
            self.writers.close()


def learning_rates(method, step: int, total_steps: int) -> Dict[str, float]:
    """The method's learning rate(s) at ``step`` as host floats (Method.learning_rates
    where the method defines it, else train.learning_rate)."""
    fn = getattr(method, "learning_rates", None)
    if fn is not None:
        return {k: float(v) for k, v in fn(step, total_steps).items()}
    return {"learning_rate": float(method.config.train.learning_rate)}
