"""The one inference path: a trained model, its anomaly maps, scores and decisions.

A :class:`Model` holds a method, its trained ``params`` and ``state``, the
frozen teacher variables, the map normalization and the decision threshold.
Evaluation (kdjax/experiment.py), :class:`kdjax.predict.Predictor`,
``--mode=predict`` and ``--mode=export`` all call it; nothing else combines
or resizes maps.

The map of an image is computed in three steps, all inside one jitted function:

1. ``method.maps`` gives the map components at the method's working
   resolution (RD4AD / MRKD / CAD: Gaussian-filtered at the input size;
   EfficientAD: the local and global maps at the PDN's 56x56);
2. each component is normalized with its validation quantiles
   (``0.1 * (m - q_a) / (q_b - q_a)``, when the method needs it) and the
   components are summed with ``eval.map_weights``;
3. ``method.finish_maps`` brings the combined map to the requested size in
   ONE resize (EfficientAD pads its map by 4 pixels first, as its reference).

The image score is the maximum of the map at the model's input size
(``data.image_size``), whatever size the maps are returned at, so one
threshold serves every output size; an image is anomalous when its score is
above the threshold (the threshold's choice: kdjax/thresholds.py).

On disk (``<workdir>/model/<category>/``, written after training):
``variables.msgpack`` (params and state, no optimizer) and ``model.json``
(method, input size, normalization, map weights, threshold and how it was
chosen, teacher architecture, source and sha256, the full config). The
teacher's weights are not copied: they are reloaded from the recorded source,
and a file whose sha256 differs is refused.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding

from kdjax import backends, devices, ops
from kdjax.errors import WorkdirError
from kdjax.jsonio import write_json
# The decision threshold (kdjax/thresholds.py); its names stay importable from here.
from kdjax.thresholds import (THRESHOLD_RULES, _is_number, choose_threshold,  # noqa: F401
                              confusion_at, f1_max_threshold)

log = logging.getLogger("kdjax")

MODEL_FORMAT = 1
MODEL_JSON = "model.json"
VARIABLES_FILE = "variables.msgpack"


# ---------------------------------------------------------------------------
# Pure pieces: weights, normalization, combination
# ---------------------------------------------------------------------------

def map_weights(config, method) -> Dict[str, float]:
    """{component: weight} from ``eval.map_weights`` (default 1 each)."""
    given = config.eval.get("map_weights", None) or {}
    return {k: float(given.get(k, 1.0)) for k in method.map_names}


def needs_normalization(method) -> bool:
    """Whether the method's maps are normalized with validation quantiles."""
    return len(method.map_names) > 1 or bool(method.normalize_with_validation)


def map_normalization(val_components: Dict[str, np.ndarray], quantiles) -> Dict[str, tuple]:
    """(q_a, q_b) of each component over all pixels of all validation maps."""
    qa, qb = quantiles
    return {k: tuple(float(x) for x in np.quantile(np.asarray(v, np.float64), [qa, qb]))
            for k, v in val_components.items()}


def combine(components: Dict[str, Any], weights: Dict[str, float],
            norm: Optional[Dict[str, Sequence[float]]] = None):
    """sum_k w_k * m_k, each m_k first normalized as 0.1 * (m - q_a) / (q_b - q_a)
    when validation quantiles are given (EfficientAD's map normalization).
    Works on jax arrays (traced) and numpy arrays alike; float32."""
    total = None
    for k, m in components.items():
        w = float(weights.get(k, 1.0))
        if w == 0.0:
            continue
        m = m.astype(jnp.float32)
        if norm is not None:
            qa, qb = (float(v) for v in norm[k])
            m = 0.1 * (m - qa) / max(qb - qa, 1e-12)
        total = w * m if total is None else total + w * m
    if total is None:
        raise ValueError("eval.map_weights gives every map component weight 0: give at least "
                         "one component a non-zero weight.")
    return total


def _hashable(d: Optional[Dict[str, Sequence[float]]]):
    if d is None:
        return None
    return tuple(sorted((k, tuple(float(x) for x in (v if isinstance(v, (tuple, list))
                                                        else (v,)))) for k, v in d.items()))


# ---------------------------------------------------------------------------
# Config round trip (config.json / model.json)
# ---------------------------------------------------------------------------

def _to_config(d):
    """A JSON dict -> ConfigDict; dicts whose keys are not identifiers (e.g. the
    targets' "au_spro_0.05", the variants' dotted keys) stay plain dicts."""
    if not isinstance(d, dict):
        return d
    if all(isinstance(k, str) and k.isidentifier() for k in d):
        out = ml_collections.ConfigDict(convert_dict=False)  # children converted here
        for k, v in d.items():
            out[k] = _to_config(v)
        return out
    return dict(d)


def config_from_json(d: Dict[str, Any]) -> ml_collections.ConfigDict:
    """A config written with ``to_json_best_effort`` (config.json, model.json), restored."""
    return _to_config(d)


def config_to_dict(config) -> Dict[str, Any]:
    return json.loads(config.to_json_best_effort())


# ---------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------

class Model:
    """A trained model: uint8 NHWC images -> anomaly maps, scores and decisions.

    Build one with :meth:`load` (a ``<workdir>/model/<category>`` directory) or,
    in the engine, from the trained variables. ``config`` is the run's config
    with ``data.category`` set to this model's category.
    """

    def __init__(self, config, method, params, state, frozen,
                 norm: Optional[Dict[str, Sequence[float]]] = None,
                 threshold: Optional[Dict[str, Any]] = None, mesh=None,
                 provenance: Optional[Dict[str, Any]] = None, step: int = 0):
        self.config = config
        self.method = method
        self.category = str(config.data.category)
        self.size = int(config.data.image_size)
        self.weights = map_weights(config, method)
        self.batch = max(1, int(config.eval.batch_size))
        self.mesh = mesh or devices.make_mesh()
        repl = devices.replicated(self.mesh)
        self.params = jax.device_put(params, repl)
        self.state = jax.device_put(state, repl)
        self.frozen = jax.device_put(frozen, repl)
        self.norm = None if norm is None else {k: tuple(float(x) for x in v)
                                               for k, v in norm.items()}
        self.threshold = threshold
        self.provenance = provenance or {}
        self.step = int(step)
        self._fns: Dict[Any, Any] = {}

    # --- properties ---------------------------------------------------------
    @property
    def threshold_value(self) -> Optional[float]:
        return None if not self.threshold else float(self.threshold["value"])

    @property
    def resolution(self) -> str:
        return str(self.config.eval.get("resolution", "input"))

    # --- device functions ---------------------------------------------------
    def _in_sharding(self):
        return NamedSharding(self.mesh, devices.batch_spec(self.mesh, self.batch))

    def _normalized_input(self, images_u8):
        x = ops.normalize_images(images_u8)
        return jax.lax.with_sharding_constraint(x, self._in_sharding())

    def forward(self, params, state, frozen, images_u8, size: Tuple[int, int],
                weights=None, norm=None, sharded: bool = False):
        """The traced function: uint8 (N, S, S, 3) -> (maps (N, *size) float32,
        scores (N,) = max of the map at the input size). ``sharded``: constrain
        the batch to the mesh (the engine's jit; export traces without)."""
        x = self._normalized_input(images_u8) if sharded else ops.normalize_images(images_u8)
        return self.finish(self.method.maps(params, state, frozen, x), size, weights, norm)

    def finish(self, comps, size, weights=None, norm=None):
        """Components at the working resolution -> (maps at ``size``, scores)."""
        weights = self.weights if weights is None else weights
        norm = self.norm if norm is None else norm
        combined = combine(comps, weights, norm)
        size = (int(size[0]), int(size[1]))
        maps = self.method.finish_maps(combined, size).astype(jnp.float32)
        at_input = maps if size == (self.size, self.size) else (
            self.method.finish_maps(combined, (self.size, self.size)))
        return maps, jnp.max(at_input.astype(jnp.float32), axis=(1, 2))

    def _components_fn(self):
        key = ("components",)
        if key not in self._fns:
            out_sh = devices.replicated(self.mesh)

            def run(params, state, frozen, images_u8):
                return self.method.maps(params, state, frozen, self._normalized_input(images_u8))

            self._fns[key] = backends.jit(run, out_shardings=out_sh)
        return self._fns[key]

    def _forward_fn(self, size, weights, norm):
        key = ("forward", size, tuple(sorted(weights.items())), _hashable(norm))
        if key not in self._fns:
            out_sh = devices.replicated(self.mesh)

            def run(params, state, frozen, images_u8):
                return self.forward(params, state, frozen, images_u8, size, weights, norm,
                                    sharded=True)

            self._fns[key] = backends.jit(run, out_shardings=out_sh)
        return self._fns[key]

    def jitted(self, size=None):
        """The jitted ``(params, state, frozen, images_u8) -> (maps, scores)`` that
        :meth:`predict` runs, for maps at ``size`` (default: the input size); e.g.
        to time it (tools/benchmark.py). Its batch is ``eval.batch_size``."""
        size = (self.size, self.size) if size is None else (int(size[0]), int(size[1]))
        return self._forward_fn(size, self.weights, self.norm)

    def _finish_fn(self, size, weights, norm):
        key = ("finish", size, tuple(sorted(weights.items())), _hashable(norm))
        if key not in self._fns:
            self._fns[key] = backends.jit(lambda comps: self.finish(comps, size, weights, norm))
        return self._fns[key]

    # --- host API -------------------------------------------------------------
    def _check_images(self, images) -> np.ndarray:
        images = np.asarray(images)
        s = self.size
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (s, s, 3):
            raise ValueError(f"The model takes uint8 images of shape (N, {s}, {s}, 3) (or file "
                             f"paths, through kdjax.predict.Predictor); got {images.dtype} "
                             f"{images.shape}.")
        if len(images) == 0:
            raise ValueError("No images to score: the input is empty.")
        return images

    def components(self, images, progress=None) -> Dict[str, np.ndarray]:
        """Map components {name: (N, h, w)} at the working resolution (host float32).
        ``progress``: a kdjax.progress.Progress advanced per batch."""
        images = self._check_images(images)
        fn = self._components_fn()
        out = devices.map_batches(lambda x: fn(self.params, self.state, self.frozen, x),
                                  images, self.batch, self.mesh, progress=progress)
        return {k: np.asarray(v, np.float32) for k, v in out.items()}

    def finish_components(self, comps: Dict[str, np.ndarray], sizes=None, weights=None):
        """(maps, scores) from host components (for several map-weight variants of
        one inference). ``sizes``: as in :meth:`predict`."""
        weights = self.weights if weights is None else weights
        n = len(next(iter(comps.values())))
        return self._grouped(n, sizes, lambda idx, size: self._finish_fn(size, weights, self.norm)(
            {k: jnp.asarray(v[idx]) for k, v in comps.items()}))

    def predict(self, images, sizes=None, progress=None):
        """uint8 images (N, S, S, 3) -> (maps, scores).

        ``sizes``: None (maps at the input size S, an (N, S, S) array), one
        (H, W) for all, or one (H, W) per image (e.g. each image's original
        size; then a list of 2-D maps unless all sizes are equal). Scores are
        always the maximum of the map at the input size. ``progress``: a
        kdjax.progress.Progress advanced per batch."""
        images = self._check_images(images)
        weights, norm = self.weights, self.norm

        def run(idx, size):
            fn = self._forward_fn(size, weights, norm)
            return devices.map_batches(lambda x: fn(self.params, self.state, self.frozen, x),
                                       images[idx], self.batch, self.mesh, progress=progress)
        return self._grouped(len(images), sizes, run)

    def _grouped(self, n: int, sizes, run):
        """Call ``run(indices, size)`` per distinct output size; reassemble in order."""
        if sizes is None:
            sizes = [(self.size, self.size)] * n
        elif len(sizes) == 2 and all(np.isscalar(v) for v in sizes):
            sizes = [tuple(int(v) for v in sizes)] * n
        sizes = [(int(h), int(w)) for h, w in sizes]
        if len(sizes) != n:
            raise ValueError(f"Got {len(sizes)} output sizes for {n} images.")
        maps: List[Any] = [None] * n
        scores = np.zeros((n,), np.float32)
        for size in sorted(set(sizes)):
            idx = np.array([i for i, s in enumerate(sizes) if s == size])
            m, s = run(idx, size)
            m, s = np.asarray(m, np.float32), np.asarray(s, np.float32)
            for j, i in enumerate(idx):
                maps[i] = m[j]
            scores[idx] = s
        if len(set(sizes)) == 1:
            return np.stack(maps, 0), scores
        return maps, scores

    def is_anomalous(self, scores) -> np.ndarray:
        """score > threshold, per image (needs a threshold)."""
        if self.threshold_value is None:
            raise ValueError("This model has no decision threshold.")
        return np.asarray(scores, np.float64) > self.threshold_value

    # --- artifact ---------------------------------------------------------------
    def describe(self) -> Dict[str, Any]:
        """model.json's content."""
        cfg = config_to_dict(self.config)
        return {
            "format": MODEL_FORMAT,
            "method": self.method.name,
            "category": self.category,
            "dataset": str(self.config.data.dataset),
            "input_size": self.size,
            "input": "uint8 RGB (N, S, S, 3), resized as in training (PIL bilinear, antialiased)",
            "mean": list(ops.IMAGENET_MEAN), "std": list(ops.IMAGENET_STD),
            "map_names": list(self.method.map_names),
            "map_weights": self.weights,
            "normalization": None if self.norm is None else {k: list(v)
                                                             for k, v in self.norm.items()},
            "resolution": self.resolution,
            "score": "max of the anomaly map at input_size; anomalous when score > threshold",
            "threshold": self.threshold,
            "teacher": self.provenance,
            "trained_steps": self.step,
            "init_from": str(self.config.get("init_from", "") or ""),
            "compute_dtype": str(self.config.eval.get("compute_dtype", "float32")),
            "config": cfg,
        }

    def save(self, path: str) -> str:
        """Write ``variables.msgpack`` and ``model.json`` into ``path``; returns it."""
        from flax import serialization

        os.makedirs(path, exist_ok=True)
        host = jax.device_get({"params": self.params, "state": self.state})
        tmp = os.path.join(path, VARIABLES_FILE + ".tmp")
        with open(tmp, "wb") as f:
            f.write(serialization.msgpack_serialize(_plain_tree(host)))
        os.replace(tmp, os.path.join(path, VARIABLES_FILE))
        write_json(os.path.join(path, MODEL_JSON), self.describe())
        return path

    @classmethod
    def load(cls, path: str, mesh=None, compute_dtype: Optional[str] = None,
             kernels: Optional[backends.Kernels] = None) -> "Model":
        """A model from ``<workdir>/model/<category>`` (no optimizer, no dataset); its
        modules compute with ``kernels`` (default: this backend's, kdjax.backends)."""
        from flax import serialization

        from kdjax import teacher as teacher_lib
        from kdjax import weights as weights_lib
        from kdjax.methods import get_method

        mj = os.path.join(path, MODEL_JSON)
        vf = os.path.join(path, VARIABLES_FILE)
        for f in (mj, vf):
            if not os.path.isfile(f):
                raise WorkdirError(
                    f"{f} is missing: {path} is not a kdjax model directory. A finished "
                    "training writes <workdir>/model/<category>/; for a workdir trained "
                    "before, run --mode=eval once on it.")
        with open(mj) as f:
            desc = json.load(f)
        if int(desc.get("format", 0)) != MODEL_FORMAT:
            raise WorkdirError(f"{mj} has model format {desc.get('format')}, this kdjax reads "
                             f"format {MODEL_FORMAT}.")
        config = config_from_json(desc["config"])
        if compute_dtype is not None:
            with config.unlocked():
                config.eval.compute_dtype = compute_dtype
        prov = desc.get("teacher") or {}
        if prov:
            try:
                weights_lib.check_provenance(prov)
            except (ValueError, OSError) as e:
                raise WorkdirError(f"{mj}: {e}") from None
        method = get_method(inference_config(config), kernels)
        frozen = method.frozen_variables(teacher_lib.load(config, method, fallback=False).variables)
        with open(vf, "rb") as f:
            variables = serialization.msgpack_restore(f.read())
        norm = desc.get("normalization")
        return cls(config, method, variables["params"], variables["state"], frozen,
                   norm=norm, threshold=desc.get("threshold"), mesh=mesh, provenance=prov,
                   step=int(desc.get("trained_steps", 0)))

    def with_kernels(self, kernels: backends.Kernels) -> "Model":
        """The same model with its modules computing with ``kernels`` (e.g.
        ``kdjax.backends.PORTABLE`` for export): same variables, normalization and
        threshold."""
        if self.method.kernels == kernels:
            return self
        from kdjax.methods import get_method

        method = get_method(inference_config(self.config), kernels)
        return Model(self.config, method, self.params, self.state, self.frozen, norm=self.norm,
                     threshold=self.threshold, mesh=self.mesh, provenance=self.provenance,
                     step=self.step)

    # --- export -----------------------------------------------------------------
    def export(self, out_dir: str, onnx: Optional[bool] = None) -> Dict[str, str]:
        """Write ``model.jax`` (jax.export, serialized; batch-size polymorphic;
        uint8 (N, S, S, 3) -> maps (N, S, S) float32, scores (N,) float32 with the
        normalization baked in), ``model.json`` and, when jax2onnx and onnx are
        installed (``pip install -e ".[export]"``; ``onnx=True`` requires them),
        ``model.onnx``. Traced on the portable code path (plain convolutions,
        no CPU-only kernels or compiler options), so it runs on any backend."""
        from kdjax import export as export_lib

        return export_lib.export_model(self, out_dir, onnx=onnx)


def inference_config(config):
    """The config a method is built from for inference: ``eval.compute_dtype``
    (default float32) as its compute dtype, whatever training used."""
    c = copy.deepcopy(config)
    with c.unlocked():
        c.train.compute_dtype = str(config.eval.get("compute_dtype", "float32"))
    return c


def _plain_tree(tree):
    if isinstance(tree, dict) or hasattr(tree, "items"):
        return {str(k): _plain_tree(v) for k, v in tree.items()}
    return np.asarray(tree)


def model_dir(workdir: str, category: str) -> str:
    return os.path.join(workdir, "model", category)


def workdir_categories(workdir: str) -> List[str]:
    """The categories that have a model artifact in ``workdir``."""
    root = os.path.join(workdir, "model")
    if not os.path.isdir(root):
        return []
    return sorted(d for d in os.listdir(root)
                  if os.path.isfile(os.path.join(root, d, MODEL_JSON)))


def resolve_category(workdir: str, category: Optional[str]) -> str:
    """``category`` or the workdir's only one; one-line errors otherwise."""
    if not os.path.isdir(workdir):
        raise WorkdirError(f"The workdir {workdir!r} does not exist: train a model there "
                                "first (python -m kdjax.main --config=... --workdir=...).")
    cats = workdir_categories(workdir)
    if not cats:
        hint = (" It has training checkpoints: run --mode=eval once to write the model."
                if os.path.isdir(os.path.join(workdir, "checkpoints")) else "")
        raise WorkdirError(f"No trained model in {workdir!r} (no model/<category>/"
                                f"{MODEL_JSON}).{hint}")
    if category:
        if category not in cats:
            raise WorkdirError(f"No model for category {category!r} in {workdir!r}; it has: "
                             f"{', '.join(cats)}.")
        return category
    if len(cats) > 1:
        raise WorkdirError(f"The workdir {workdir!r} holds models for several categories "
                         f"({', '.join(cats)}): name one with --category (or category=...).")
    return cats[0]


def load_model(workdir: str, category: Optional[str] = None, **kw) -> Model:
    """The model of ``category`` (or the only one) in ``workdir``."""
    return Model.load(model_dir(workdir, resolve_category(workdir, category)), **kw)
