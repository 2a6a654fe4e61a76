"""Orchestration of a run: every category (and variant) of a config is trained
(kdjax/train.py), calibrated into a model artifact (map normalization and
decision threshold, kdjax/inference.py and kdjax/thresholds.py), evaluated on
its test set (kdjax/evaluate.py: metrics and figures), and reported
(kdjax/results.py: results.json/md; kdjax/report.py: report.html). A kdjax.monitor.Monitor shows progress and writes TensorBoard
summaries throughout.

``train_and_evaluate(config, workdir, mode)`` is the entry point of
``python -m kdjax.main``, the notebooks and the tests.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
from typing import Any, Dict, Optional

import jax
import ml_collections
import numpy as np

from kdjax import backends, inference
from kdjax import config as config_lib
from kdjax import teacher as teacher_lib
from kdjax.data.category import CategoryData, dataset_root, load_category
from kdjax.data.types import dataset_spec
from kdjax.devices import make_mesh
from kdjax.jsonio import json_safe
from kdjax.methods import get_method
from kdjax.train import train_category
from kdjax.workdir import ensure_dir, setup_logging, workdir_lock

log = logging.getLogger("kdjax")

MODES = ("train", "eval", "train_and_eval")


# ---------------------------------------------------------------------------
# Calibration: the model artifact
# ---------------------------------------------------------------------------

def build_model(config, method, teacher: teacher_lib.Teacher, ts, frozen, cat: CategoryData,
                mesh) -> inference.Model:
    """The trained variables, normalized on the held-out images and with a
    decision threshold (``eval.threshold``): the model a user takes away."""
    from kdjax import weights

    mconfig = copy.deepcopy(config)
    with mconfig.unlocked():
        if not config.get("init_from", ""):  # else the method names init_from's teacher
            mconfig.teacher.weights = teacher.source
        mconfig.data.category = cat.category
    eval_dtype = str(config.eval.get("compute_dtype", "float32"))
    if eval_dtype == str(config.train.compute_dtype):
        imethod, ifrozen = method, frozen
    else:  # e.g. trained in bf16, evaluated in fp32: the modules in the eval dtype
        imethod = get_method(inference.inference_config(mconfig), method.kernels)
        ifrozen = imethod.frozen_variables(teacher.variables)
    prov = weights.teacher_provenance(method.teacher_arch, teacher.source,
                                      int(method.teacher_width_divisor))
    host_ts = jax.device_get({"params": ts["params"], "state": ts["state"]})
    model = inference.Model(mconfig, imethod, host_ts["params"], host_ts["state"], ifrozen,
                            mesh=mesh, provenance=prov, step=int(jax.device_get(ts["step"])))
    from kdjax.progress import Progress

    def bar(images):
        return Progress(len(images), f"[{cat.category}] calibration", "img", summary=False)

    val_scores = val_labels = train_scores = None
    if inference.needs_normalization(imethod):
        with bar(cat.val) as b:
            comps = model.components(cat.val, progress=b)
        model.norm = inference.map_normalization(comps, tuple(config.eval.quantiles))
        val_scores = model.finish_components(comps)[1]
    rule = config.eval.get("threshold", "auto")
    fixed = not isinstance(rule, str) or inference._is_number(rule)
    if not fixed:
        if val_scores is None and cat.val is not None and len(cat.val):
            with bar(cat.val) as b:
                val_scores = model.predict(cat.val, progress=b)[1]
        if val_scores is not None:
            val_labels = np.array([int(r.label) for r in cat.val_records])
        else:
            chunk = max(int(config.eval.batch_size), 64)
            with Progress(cat.n_train, f"[{cat.category}] calibration", "img",
                          summary=False) as b:
                train_scores = np.concatenate([model.predict(x, progress=b)[1]
                                               for x in cat.train_chunks(chunk)])
    where = ("validation split" if dataset_spec(config.data.dataset).has_validation_split
             else "held-out training images, data.validation_fraction")
    model.threshold = inference.choose_threshold(config, val_scores, val_labels, train_scores,
                                                 val_source=where)
    return model


def save_model(model: inference.Model, workdir: str) -> Optional[str]:
    if jax.process_index() != 0:
        return None
    path = model.save(inference.model_dir(workdir, model.category))
    log.info("[%s] model written to %s (threshold %.5g: %s)", model.category, path,
             model.threshold_value, model.threshold["note"])
    return path


# ---------------------------------------------------------------------------
# Evaluation of one category
# ---------------------------------------------------------------------------

def evaluate_category(config, model: inference.Model, cat: CategoryData, workdir: str,
                      weight_variants: Dict[str, Dict[str, float]], monitor=None,
                      primary: bool = True):
    """Maps of the test set -> metrics for each map-weight variant (host side);
    returns ({variant: metrics}, threshold report of the first variant). ``primary``:
    this model is the run's headline one (the first training variant), whose test
    images the report's gallery shows."""
    from kdjax import data, evaluate, report as report_lib
    from kdjax.progress import Progress

    ds = config.data.dataset
    size = int(config.data.image_size)
    source = data.open_source(config, cat.root)
    records = source.records(cat.category, "test")
    images, records = source.images(records, size, config.data.on_corrupt)
    with Progress(len(images), f"[{cat.category}] inference on the test set", "img") as bar:
        comps = model.components(images, progress=bar)
    original = config.eval.resolution == "original"
    sizes = source.original_sizes(records) if original else None
    if source.spec.ground_truth == "loco_regions":
        regions = [source.regions(r, None if original else size) for r in records]
        masks = None
    else:
        # A folder dataset may come without masks: then image-level metrics only.
        masks = source.masks(records, None if original else size) if source.has_masks(
            records) else None
        regions = None
    labels = np.array([r.label for r in records])
    results, report = {}, None
    roc_png = overlays = None
    rcfg = config.get("report", None) or {}
    html = bool(rcfg.get("html", True)) and primary
    bar = Progress(len(weight_variants) + (len(images) if html else 0),
                   f"[{cat.category}] metrics and report", "step", summary=False)
    for vname, weights in weight_variants.items():
        if original:
            eval_maps, scores = source.maps_to_original(model, comps, sizes, weights)
        else:
            eval_maps, scores = model.finish_components(comps, None, weights)
        curves: Dict[str, Any] = {}
        results[vname] = evaluate.category_metrics(
            ds, eval_maps, records, masks=masks, regions=regions,
            per_image_pro=bool(config.eval.pro_per_image), curves=curves)
        bar.update(1)
        if vname != next(iter(weight_variants)):
            continue
        report = dict(model.threshold or {})
        if model.threshold_value is not None:
            report["test"] = inference.confusion_at(labels, scores, model.threshold_value)
        if jax.process_index() == 0:
            maps = model.finish_components(comps, None, weights)[0] if original else eval_maps
            fig_masks = source.masks(records, size) if source.has_masks(records) else None
            evaluate.save_figures(
                os.path.join(workdir, "figures"), cat.category, images, maps, labels, scores,
                masks=fig_masks, names=[os.path.relpath(r.image_path, cat.root) for r in records],
                num=int(config.eval.num_figures), seed=int(config.seed),
                kinds=[r.anomaly_kind or ("good" if r.label == 0 else "anomalous")
                       for r in records])
            if config.eval.export_tiff:
                evaluate.export_tiff(os.path.join(workdir, "anomaly_maps"), cat.category,
                                     records, eval_maps)
            roc_png = os.path.join(workdir, "figures", f"{cat.category}_roc.png")
            if html:
                overlays = report_lib.write_category(
                    workdir, cat.category, ds, images, maps, records, scores, report,
                    masks=fig_masks, curves=curves, root=cat.root,
                    thumbnail_size=int(rcfg.get("thumbnail_size", 160)), progress=bar)
    bar.close(summary=False)
    if monitor is not None and jax.process_index() == 0:
        monitor.eval_category(cat.category, model.step, results, roc_png, overlays)
    if source.spec.unlabelled_splits:
        from kdjax import submission

        submission.export_unlabelled(config, model, source, cat.category, workdir)
    return results, report


# ---------------------------------------------------------------------------
# Orchestration
# ---------------------------------------------------------------------------

def _weight_variants(config, method) -> Dict[str, Dict[str, float]]:
    out = {"default": inference.map_weights(config, method)}
    for name, w in (config.eval.get("weight_variants", None) or {}).items():
        out[name] = {k: float(w.get(k, 0.0)) for k in method.map_names}
    return out


def _variant_configs(config) -> Dict[str, ml_collections.ConfigDict]:
    """One config per entry of config.variants ({name: {"dotted.key": value}})."""
    variants = config.get("variants", None)
    if not variants:
        return {}
    out = {}
    for name, overrides in variants.items():
        c = copy.deepcopy(config)
        with c.unlocked():
            c.variants = ml_collections.ConfigDict()
            for key, value in overrides.items():
                if not key.startswith("eval.map_weights."):  # the one open section
                    node = c
                    for part in key.split("."):
                        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                            raise ValueError(
                                f"Variant {name!r} overrides {key!r}, which is not a config key.")
                        node = node[part]
                c.update_from_flattened_dict({key: value})
        out[name] = c
    return out


def _training_signature(config) -> str:
    """Hash of everything that changes training (not eval.*), to share checkpoints."""
    d = config.to_dict()
    d.pop("eval", None)
    d.pop("report", None)
    d.pop("variants", None)
    d.pop("targets", None)
    d.pop("targets_by", None)
    d.get("train", {}).pop("restart", None)
    return hashlib.sha1(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:10]


def run_config(config, workdir: str, mode: str, ckpt_root: str,
               write_model: bool = True, monitor=None, variant: str = "") -> Dict[str, Any]:
    """Train and/or evaluate every category of one config; returns per-variant
    categories and the threshold report per category. ``write_model``: this is the
    run's first (headline) config: write its model artifact and its report files.
    ``variant``: the name of this config in ``config.variants`` ("" when none)."""
    mesh = make_mesh()
    kernels = backends.select()  # how the models compute on this backend, chosen once
    root = dataset_root(config, workdir)
    cats = config_lib.categories_of(config)
    per_variant: Dict[str, Dict[str, Dict[str, float]]] = {}
    thresholds: Dict[str, Any] = {}
    method = teacher = None
    for cat_name in cats:
        cat_config = copy.deepcopy(config)
        with cat_config.unlocked():
            cat_config.data.category = cat_name
        method = get_method(cat_config, kernels)  # per category: e.g. MRKD's NSA settings
        if cat_name == cats[0]:
            for note in method.notes():
                log.warning("Note: %s", note)
        cat = load_category(cat_config, root, cat_name, inference.needs_normalization(method),
                            method.name)
        teacher = teacher_lib.load(cat_config, method)
        ckpt_dir = os.path.join(ckpt_root, cat_name)
        ts, frozen = train_category(cat_config, method, teacher.variables, cat, ckpt_dir, mesh,
                                    train=mode in ("train", "train_and_eval"),
                                    metrics_path=os.path.join(workdir, "train_metrics.jsonl"),
                                    monitor=monitor, variant=variant)
        model = build_model(cat_config, method, teacher, ts, frozen, cat, mesh)
        if write_model:
            save_model(model, workdir)
        if mode in ("eval", "train_and_eval"):
            res, thresholds[cat_name] = evaluate_category(
                cat_config, model, cat, workdir, _weight_variants(config, method),
                monitor=monitor, primary=write_model)
            for v, m in res.items():
                per_variant.setdefault(v, {})[cat_name] = m
            log.info("[%s] %s", cat_name, ", ".join(
                f"{k}={v:.4f}" for k, v in res["default"].items()
                if k in ("image_auroc", "logical_auroc", "structural_auroc", "pixel_auroc",
                         "au_pro", "au_spro_0.05") and v == v))
    return {"method": method, "per_variant": per_variant, "thresholds": thresholds,
            "teacher_source": teacher.source if teacher else "",
            "teacher": teacher.description if teacher else "none"}


def train_and_evaluate(config, workdir: str, mode: str = "train_and_eval") -> Dict[str, Any]:
    """Entry point used by kdjax.main, the notebooks and the tests."""
    if mode not in MODES:
        raise ValueError(f"--mode must be one of {', '.join(MODES)} here, not {mode!r}.")
    config_lib.validate(config, mode)
    ensure_dir(workdir)  # WorkdirError (one line) for a file, or an unwritable place
    setup_logging(workdir)
    with workdir_lock(workdir), _monitor(config, workdir) as monitor:
        if jax.process_index() == 0:
            with open(os.path.join(workdir, "config.json"), "w") as f:
                f.write(config.to_json_best_effort(indent=2))
        variants = _variant_configs(config)
        runs = variants or {"default": config}
        collected: Dict[str, Dict[str, Dict[str, float]]] = {}
        method, first = None, None
        for vname, vconfig in runs.items():
            ckpt_root = os.path.join(workdir, "checkpoints")
            if variants:
                ckpt_root = os.path.join(ckpt_root, _training_signature(vconfig))
                log.info("=== variant %s ===", vname)
                monitor.prefix = f"{vname}/"
            # The model artifact (model/<category>) is the first run's.
            out = run_config(vconfig, workdir, mode, ckpt_root, write_model=first is None,
                             monitor=monitor, variant=vname if variants else "")
            first = first or out
            method = out["method"]
            for wname, cats in out["per_variant"].items():
                name = vname if wname == "default" else (
                    wname if not variants else f"{vname}/{wname}")
                collected[name] = cats
        if mode == "train":
            return {}
        monitor.prefix = ""
        return _write_report(config, workdir, method, collected, first, monitor)


@contextlib.contextmanager
def _monitor(config, workdir: str):
    """The run's kdjax.monitor.Monitor (TensorBoard on process 0 with report.tensorboard)."""
    from kdjax.monitor import Monitor

    rcfg = config.get("report", None) or {}
    monitor = Monitor(workdir, tensorboard=bool(rcfg.get("tensorboard", True))
                      and jax.process_index() == 0,
                      max_images=int(rcfg.get("tensorboard_images", 4)))
    try:
        yield monitor
    finally:
        monitor.close()


def _write_report(config, workdir, method, collected, first, monitor=None):
    from kdjax import evaluate, report

    main_name = next(iter(collected))
    teacher = first["teacher"]
    extra: Dict[str, Any] = {"thresholds": first["thresholds"]}
    notes = method.notes()
    if notes:
        extra["notes"] = notes
    if "random" in str(first["teacher_source"]):
        arch = method.teacher_arch
        get = (f"python tools/port_weights.py --arch {arch} --src auto" if not arch.startswith(
            "pdn") else f"the reference's {arch.replace('pdn_', 'teacher_')}.pth "
            f"(nelson1425/EfficientAD, models/), then python tools/port_weights.py --arch {arch} "
            f"--src {arch.replace('pdn_', 'teacher_')}.pth")
        extra["warning"] = ("The teacher has RANDOM weights: these numbers do not measure the "
                            f"method. Get the pretrained weights: {get}")
    targets, source = config_lib.paper_targets(config)
    if source:
        extra["targets_source"] = source
    variants = {k: v for k, v in collected.items()} if len(collected) > 1 else None
    results = {}
    if jax.process_index() == 0:
        results = evaluate.write_results(
            workdir, config.method, config.data.dataset, teacher, collected[main_name],
            targets=targets, variants=variants, extra=extra)
        if monitor is not None:
            monitor.eval_mean(results["mean"])
        rcfg = config.get("report", None) or {}
        if bool(rcfg.get("html", True)):
            path = report.write_report(workdir, json_safe(results), targets)
            log.info("Results written to %s; the report is %s",
                     os.path.join(workdir, "results.json"), path)
        else:
            log.info("Results written to %s", os.path.join(workdir, "results.json"))
    return results
