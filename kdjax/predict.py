"""Score new images with a trained workdir: anomaly maps and image scores.

    from kdjax.predict import Predictor
    p = Predictor.from_workdir("runs/demo", category="tray")
    maps, scores = p.predict(["img1.png", "img2.png"])   # or a uint8 array (N, H, W, 3)

The map is the one the evaluation used (components combined with the
validation-quantile normalization saved at evaluation time); the score is its max.
"""

from __future__ import annotations

import json
import os
from typing import Optional, Sequence, Union

import jax
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from kdjax import train
from kdjax.methods import get_method


class Predictor:
    def __init__(self, config, workdir: str, category: str):
        self.config = config
        self.category = category
        self.mesh = train.make_mesh()
        self.method = get_method(config)
        size = int(config.data.image_size)
        dummy = np.zeros((1, size, size, 3), np.uint8)
        cat = train.CategoryData(category, "", dummy, None, [], [])
        ts, frozen, _, _ = train.init_train_state(config, self.method, cat, self.mesh)
        ckpt_dir = _find_checkpoint_dir(workdir, category)
        mngr = train._checkpoint_manager(ckpt_dir, 1)
        restored = train._restore(mngr, ts)
        mngr.close()
        if restored is None:
            raise FileNotFoundError(f"No checkpoint for {category!r} in {ckpt_dir}: train first.")
        self.ts = jax.device_put(restored, NamedSharding(self.mesh, P()))
        self.frozen = frozen
        self.norm = None
        npath = os.path.join(workdir, "normalization", f"{category}.json")
        if train.needs_validation(self.method):
            if not os.path.exists(npath):
                raise FileNotFoundError(
                    f"{npath} is missing: run the evaluation (--mode=eval) once, it saves the "
                    "map normalization this method needs.")
            with open(npath) as f:
                self.norm = {k: tuple(v) for k, v in json.load(f).items()}
        self.weights = {k: float(config.eval.map_weights.get(k, 1.0))
                        for k in self.method.map_names}
        self.batch = int(config.eval.batch_size)
        self._fn = train.make_maps_fn(self.method, self.mesh, self.batch)

    @classmethod
    def from_workdir(cls, workdir: str, category: Optional[str] = None) -> "Predictor":
        with open(os.path.join(workdir, "config.json")) as f:
            config = ml_collections.ConfigDict(json.load(f))
        if category is None:
            root = os.path.join(workdir, "checkpoints")
            cats = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
            if len(cats) != 1:
                raise ValueError(f"The workdir holds several categories {cats}: name one.")
            category = cats[0]
        with config.unlocked():
            config.data.category = category
        return cls(config, workdir, category)

    def predict(self, images: Union[np.ndarray, Sequence[str]]):
        """(maps (N, S, S) at data.image_size, scores (N,)) for uint8 images or file paths."""
        size = int(self.config.data.image_size)
        if not isinstance(images, np.ndarray):
            from kdjax import data
            from kdjax.data.types import Record

            recs = [Record(str(p), self.category, "test", "unknown", 0) for p in images]
            images, _ = data.load_images(recs, size)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (size, size, 3):
            raise ValueError(f"predict expects uint8 images of shape (N, {size}, {size}, 3) or "
                             f"file paths; got {images.dtype} {images.shape}.")
        comps = train.predict_components(self.method, self.ts, self.frozen, images, self.mesh,
                                         self.batch, self._fn)
        maps = train.final_maps(self.method, comps, self.weights, self.norm, size)
        return maps, maps.reshape(len(maps), -1).max(1)


def _find_checkpoint_dir(workdir: str, category: str) -> str:
    root = os.path.join(workdir, "checkpoints")
    direct = os.path.join(root, category)
    if os.path.isdir(direct):
        return direct
    for sub in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        cand = os.path.join(root, sub, category)
        if os.path.isdir(cand):
            return cand
    raise FileNotFoundError(f"No checkpoint directory for {category!r} under {root}.")
