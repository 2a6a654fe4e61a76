"""Base configuration and validation with messages that say what to do.

Every config file in configs/ starts from ``base_config()`` and overrides
what its experiment needs; ``validate(config)`` runs before anything else
(before any data is read or any model is built) and raises
:class:`kdjax.errors.ConfigError` / :class:`kdjax.errors.DataError` (both
ValueErrors) with one line naming the key, the bad value and the fix.

Keys: the sections ``data``, ``train``, ``eval``, ``teacher``, ``distributed``
and ``report`` hold exactly the keys of ``base_config()``: a key that it does
not know (a typo such as ``train.stepz``) is refused with the closest known
keys. Open sections, checked by their own code: the method sections
(``config.cad``, ``config.efficientad``, ``config.mrkd``), ``config.targets``,
``config.variants``, ``eval.map_weights`` and ``eval.weight_variants``. A config
file may add top-level keys holding plain values (``configs/loco_cad.py``'s
``ablation``).
"""

from __future__ import annotations

import math
import os

import ml_collections

from kdjax.data import checks as data_checks
from kdjax.config_keys import (DEPRECATED_KEYS, closest_keys, flat_keys,  # noqa: F401
                               unknown_key_message)
from kdjax.targets import paper_categories, paper_targets  # noqa: F401
from kdjax.errors import ConfigError, ConfigFileNotFoundError

OPTIMIZERS = ("adam",)
COMPUTE_DTYPES = ("float32", "bfloat16")
THRESHOLD_RULES = ("auto", "f1_val", "quantile")
DEFAULT_VALIDATION_FRACTION = 0.1
# Sections whose keys must be those of base_config(); subsections left open.
CHECKED_SECTIONS = ("data", "train", "eval", "teacher", "distributed", "report")
OPEN_SUBSECTIONS = ("eval.map_weights", "eval.weight_variants")
OPEN_TOP_LEVEL = ("targets", "variants")  # and the method sections (kdjax.methods.METHODS)


def base_config(method: str = "rd4ad") -> ml_collections.ConfigDict:
    """Every key of a kdjax config with its default, for ``method``; the method's own
    settings (``config.<method>``, e.g. ``config.cad``) come with their defaults, so that
    each can be set on the command line (``--config.cad.d=64``)."""
    c = ml_collections.ConfigDict()
    c.method = method
    c.seed = 111
    c.multihost = False  # call jax.distributed.initialize() first
    c.distributed = ml_collections.ConfigDict()
    c.distributed.coordinator_address = ""  # empty: let JAX detect the cluster
    c.distributed.num_processes = 0
    c.distributed.process_id = -1
    c.distributed.cpu_collectives = False  # gloo collectives for CPU-only multi-process runs
    c.init_from = ""  # a checkpoint trained with the reference PyTorch code

    c.data = ml_collections.ConfigDict()
    # mvtec_ad | mvtec_loco | visa | mvtec_ad2 | btad | mpdd | folder | synthetic
    c.data.dataset = "mvtec_ad"
    c.data.root = ""
    c.data.category = "bottle"  # one name, a comma-separated list, or "all"
    c.data.image_size = 256
    c.data.on_corrupt = "raise"  # raise | skip (a corrupt image file)
    # The training images on the devices ("resident": decoded once, batches gathered on
    # the device) or streamed from a tf.data pipeline ("stream": decoded while training,
    # for sets larger than a device holds); "auto": resident when the resized set fits
    # train.resident_max_gb per device. EfficientAD's penalty images follow the same rule.
    c.data.input = "auto"
    # A folder for the decoded, resized uint8 images (ArrayRecord, written once per set
    # and preprocessing), so that streamed epochs and later runs skip the decoding.
    c.data.cache = ""
    # MVTec AD / folder datasets: the seeded fraction of train/good held out as a validation
    # set (map normalization, decision threshold); 0: none. LOCO has its own validation/.
    c.data.validation_fraction = DEFAULT_VALIDATION_FRACTION
    # DEPRECATED old name of data.validation_fraction, still read: validate() copies whichever
    # of the two was changed from the default into the other (setting both differently is
    # refused). It will be removed once no code or notebook reads it.
    c.data.val_fraction = DEFAULT_VALIDATION_FRACTION
    c.data.synthetic_seed = 0
    c.data.synthetic_size = 256  # resolution of the generated synthetic images
    c.data.synthetic_counts = (200, 40, 40, 40, 40)  # train, val, test good/logical/structural
    # A non-square image becomes the square input by: stretch (resize to S x S, the papers'
    # code) | pad (black, centred, to a square) | center_crop (the centred square).
    c.data.resize = "stretch"
    c.data.image_filter = "bilinear"  # bilinear (RD4AD) | lanczos (MRKD) | bicubic | nearest
    c.data.mask_resize = "bilinear"  # bilinear, then > 0.5 (RD4AD) | nearest (MRKD)
    # files: read data.root | tfds: the TFDS builders (kdjax.data.tfds_builders), prepared
    # once into data.tfds_dir (default ~/tensorflow_datasets) from the download in data.root.
    c.data.source = "files"
    c.data.tfds_dir = ""

    c.teacher = ml_collections.ConfigDict()
    c.teacher.arch = "wide_resnet50_2"
    c.teacher.weights = "auto"  # path | auto | random
    c.teacher.allow_random = False
    # With weights="auto": fall back to a random teacher (announced) when the ImageNet
    # weights are neither cached nor downloadable. Demos only.
    c.teacher.fallback_random = False
    c.teacher.width_divisor = 1  # >1 only with random weights (tests, tiny demos)

    c.train = ml_collections.ConfigDict()
    c.train.batch_size = 16
    c.train.steps = 0  # 0: derive from epochs
    c.train.epochs = 200
    c.train.optimizer = "adam"  # the papers' (each method sets its betas / schedule)
    c.train.learning_rate = 0.005
    c.train.b1 = 0.5
    c.train.b2 = 0.999
    c.train.weight_decay = 0.0  # only method efficientad applies it (torch Adam's L2 term)
    c.train.steps_per_call = 10  # steps run on the device per host call (lax.scan)
    c.train.checkpoint_every = 500
    c.train.keep_checkpoints = 2
    c.train.log_every = 50
    c.train.compute_dtype = "float32"  # float32 | bfloat16
    # Compute the frozen teacher's outputs on the clean training images once and keep
    # them on the device beside the images (Method.teacher_cache): every step then skips
    # that forward pass. Off above this many GiB per device (the teacher runs each step).
    c.train.cache_teacher = True
    c.train.cache_teacher_max_gb = 4.0
    c.train.resident_max_gb = 4.0  # data.input=auto: the largest resident image set per device
    # Train over: discard this workdir's checkpoints when they were trained with other
    # settings (instead of refusing the run). Checkpoints of exactly these settings are
    # resumed, so rerunning the same command after an interruption continues
    # (kdjax.checkpoints.check_training_config); delete them to retrain unchanged settings.
    c.train.restart = False

    c.eval = ml_collections.ConfigDict()
    c.eval.batch_size = 16
    c.eval.resolution = "input"  # input (papers' MVTec AD) | original (LOCO's official)
    c.eval.export_tiff = False
    c.eval.map_weights = ml_collections.ConfigDict()  # component -> weight (default 1)
    c.eval.quantiles = (0.9, 0.995)
    c.eval.num_figures = 8
    c.eval.pro_per_image = True
    c.eval.gaussian_sigma = 4.0
    # Extra map-weight variants evaluated from the same model: {name: {component: weight}}.
    c.eval.weight_variants = ml_collections.ConfigDict()
    # The decision threshold on image scores (good / anomalous): "auto" (F1-max on a labelled
    # validation set when there is one, else "quantile"), "f1_val", "quantile" (the
    # eval.threshold_quantile quantile of held-out good images' scores) or a number (a fixed
    # score threshold; on the command line --config.eval.threshold=0.5).
    c.eval.threshold = ml_collections.FieldReference("auto", field_type=object)
    c.eval.threshold_quantile = 0.99
    # Precision of inference, evaluation and export (float32 | bfloat16); training's is
    # train.compute_dtype.
    c.eval.compute_dtype = "float32"

    # What a run shows besides results.json/md (docs/INTERFACE.md): <workdir>/report.html
    # (results, curves, threshold, a gallery of every test image; thumbnails of
    # thumbnail_size px per panel) and TensorBoard summaries in <workdir>/tensorboard/
    # (tensorboard_images overlays per category).
    c.report = ml_collections.ConfigDict()
    c.report.html = True
    c.report.thumbnail_size = 160
    c.report.tensorboard = True
    c.report.tensorboard_images = 4

    # Training variants side by side: {name: {"dotted.key": value}}; each is trained in
    # its own checkpoint directory (shared by variants whose training is identical).
    c.variants = ml_collections.ConfigDict()

    # Paper numbers shown beside ours in results.md (and by tools/reproduce.py):
    # {category or "mean": {metric: value in percent}}. With ``targets_by`` (a dotted config
    # key, e.g. "efficientad.model_size") one such table per value of that key:
    # {value: {category or "mean": {metric: value}}} (see paper_targets).
    c.targets = ml_collections.ConfigDict()
    c.targets_by = ""
    c.targets_source = ""
    from kdjax.methods import method_class

    defaults = method_class(method).default_settings()
    if len(defaults):
        c[method] = defaults
    return c


# ---------------------------------------------------------------------------
# Categories (kdjax/data/checks.py)
# ---------------------------------------------------------------------------

categories_of = data_checks.categories_of
check_categories_present = data_checks.check_categories_present


# ---------------------------------------------------------------------------
# Keys
# ---------------------------------------------------------------------------

def unknown_keys(config, methods=None) -> list:
    """Keys set in ``config`` that ``base_config()`` does not know, in the checked sections
    (CHECKED_SECTIONS), plus unknown top-level sections (a ConfigDict or dict that is not a
    base section, a method section, targets or variants). Top-level plain values are allowed."""
    if methods is None:
        from kdjax.methods import METHODS as methods
    base = base_config()
    known = set(flat_keys(base, OPEN_SUBSECTIONS))
    bad = []
    for sec in CHECKED_SECTIONS:
        have = config.get(sec, None)
        if not isinstance(have, ml_collections.ConfigDict):
            continue
        opened = tuple(s[len(sec) + 1:] for s in OPEN_SUBSECTIONS if s.startswith(sec + "."))
        for k in flat_keys(have, opened):
            full = f"{sec}.{k}"
            if full not in known and not _under_open(full):
                bad.append(full)
    for k in config.keys():
        if k in base or k in methods or k in OPEN_TOP_LEVEL:
            continue
        if isinstance(config[k], (ml_collections.ConfigDict, dict)):
            bad.append(str(k))
    return bad


def _under_open(key: str) -> bool:
    return any(key == s or key.startswith(s + ".") for s in OPEN_SUBSECTIONS)


# ---------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------

def _is_number(v) -> bool:
    if isinstance(v, bool):
        return False
    try:
        float(v)
    except (TypeError, ValueError):
        return False
    return True


_REQUIRED = object()


def _number(config, key: str, kind=float, default=_REQUIRED):
    """config[key] (dotted) as a number, or ConfigError naming the key; ``default`` when
    the key is absent (configs saved before the key existed) and a default is given."""
    v = config
    for part in key.split("."):
        if default is not _REQUIRED and part not in v:
            return default
        v = v[part]
    if not _is_number(v) or (kind is int and float(v) != int(float(v))):
        raise ConfigError(f"{key}={v!r}: must be {'an integer' if kind is int else 'a number'}.")
    return kind(float(v)) if kind is int else float(v)


def threshold_setting(config):
    """``eval.threshold`` as ("auto" | "f1_val" | "quantile", None) or ("fixed", value);
    ConfigError for anything else. A number may be given as a string ("0.5")."""
    v = config.eval.get("threshold", "auto")
    if isinstance(v, str) and v in THRESHOLD_RULES:
        return v, None
    if _is_number(v):
        value = float(v)
        if not math.isfinite(value):
            raise ConfigError(f"eval.threshold={v!r}: a fixed threshold must be a finite number.")
        return "fixed", value
    raise ConfigError(
        f"eval.threshold={v!r}: use 'auto', 'f1_val', 'quantile' or a number (a fixed score "
        "threshold, e.g. --config.eval.threshold=0.5).")


def validation_fraction(config) -> float:
    """The effective ``data.validation_fraction`` (read through the deprecated alias
    ``data.val_fraction`` when only that one was changed from the default)."""
    d = config.data
    new = float(d.get("validation_fraction", DEFAULT_VALIDATION_FRACTION))
    old = float(d.get("val_fraction", DEFAULT_VALIDATION_FRACTION))
    if old != new and new == DEFAULT_VALIDATION_FRACTION:
        return old
    return new


def _resolve_validation_fraction(config) -> None:
    """Refuse conflicting values of data.validation_fraction and its deprecated alias
    data.val_fraction; give both keys the effective value (code still reading either name
    sees the same fraction)."""
    d = config.data
    new = _number(config, "data.validation_fraction") if "validation_fraction" in d else None
    old = _number(config, "data.val_fraction") if "val_fraction" in d else None
    if (new is not None and old is not None and new != old
            and DEFAULT_VALIDATION_FRACTION not in (new, old)):
        raise ConfigError(
            f"data.val_fraction={old} and data.validation_fraction={new} disagree: "
            "data.val_fraction is the deprecated old name of data.validation_fraction; set "
            "only --config.data.validation_fraction.")
    value = validation_fraction(config)
    if not 0.0 <= value < 1.0:
        name = "data.validation_fraction" if value == new else "data.val_fraction"
        raise ConfigError(
            f"{name}={value}: must be in [0, 1) (the fraction of train/good held out for "
            "validation; 0: none; default 0.1).")
    for k in ("validation_fraction", "val_fraction"):
        if k in d and float(d[k]) != value:
            try:
                d[k] = value
            except Exception:  # a frozen config: readers use validation_fraction(config)
                pass


def _check_keys(config, methods) -> None:
    bad = unknown_keys(config, methods)
    if not bad:
        return
    known = (flat_keys(base_config(), OPEN_SUBSECTIONS, sections=True) + list(methods)
             + list(OPEN_TOP_LEVEL))
    more = f" (also unknown: {', '.join(bad[1:4])})" if len(bad) > 1 else ""
    raise ConfigError(unknown_key_message(bad[0], known, " in the config") + more +
                      ". Fix its name in the config file (or the --config.<key> flag).")


def _check_train(config, method) -> None:
    """train.* values; ``method``: the config's Method class."""
    from kdjax.methods import METHODS, method_class

    t = config.train
    opt = t.optimizer
    if opt not in OPTIMIZERS:
        raise ConfigError(
            f"train.optimizer={opt!r} is not supported: kdjax trains every method with its "
            "paper's optimizer, Adam (--config.train.optimizer=adam).")
    wd = _number(config, "train.weight_decay")
    if not math.isfinite(wd) or wd < 0:
        raise ConfigError(f"train.weight_decay={wd}: must be a finite number >= 0.")
    if wd != 0 and not method.applies_weight_decay:
        takes = [m for m in METHODS if method_class(m).applies_weight_decay]
        raise ConfigError(
            f"train.weight_decay={wd}: method {config.method!r} does not apply weight decay (its "
            f"optimizer follows its paper); only {', '.join(takes)} does. Set "
            "--config.train.weight_decay=0.")
    lr = _number(config, "train.learning_rate")
    if not math.isfinite(lr) or lr <= 0:
        raise ConfigError(
            f"train.learning_rate={lr}: must be a finite number > 0 (the shipped configs use "
            "0.005 for RD4AD, MRKD and CAD, 1e-4 for EfficientAD).")
    steps = _number(config, "train.steps", int)
    if steps < 0:
        raise ConfigError(
            f"train.steps={steps}: must be >= 0 (0: derive the number of steps from "
            "train.epochs).")
    epochs = _number(config, "train.epochs", int)
    if steps == 0 and epochs <= 0:
        raise ConfigError(
            f"train.steps=0 and train.epochs={epochs}: nothing to train; set "
            "--config.train.steps=<N> or --config.train.epochs=<N> (N > 0).")
    for key, what in (("train.batch_size", "images per step"),
                      ("train.steps_per_call", "steps run per host call"),
                      ("train.checkpoint_every", "steps between checkpoints")):
        v = _number(config, key, int)
        if v < 1:
            raise ConfigError(f"{key}={v}: must be >= 1 ({what}).")
    gb = _number(config, "train.resident_max_gb", default=4.0)
    if not gb >= 0:
        raise ConfigError(f"train.resident_max_gb={gb}: must be >= 0 (GiB per device; 0 streams "
                          "every set with data.input=auto).")
    if t.compute_dtype not in COMPUTE_DTYPES:
        raise ConfigError(
            f"train.compute_dtype={t.compute_dtype!r}: must be 'float32' or 'bfloat16'.")


def _check_eval(config) -> None:
    e = config.eval
    b = _number(config, "eval.batch_size", int)
    if b < 1:
        raise ConfigError(f"eval.batch_size={b}: must be >= 1 (images per evaluation batch).")
    if e.resolution not in ("input", "original"):
        raise ConfigError(
            f"eval.resolution={e.resolution!r}: must be 'input' or 'original'.")
    threshold_setting(config)
    q = _number(config, "eval.threshold_quantile", default=0.99)
    if not 0.0 < q < 1.0:
        raise ConfigError(
            f"eval.threshold_quantile={q}: must be in (0, 1), e.g. 0.99 (the quantile of the "
            "held-out good images' scores used as the threshold).")
    dtype = e.get("compute_dtype", "float32")
    if dtype not in COMPUTE_DTYPES:
        raise ConfigError(f"eval.compute_dtype={dtype!r}: must be 'float32' or 'bfloat16'.")
    qs = e.quantiles
    ok = (isinstance(qs, (tuple, list)) and len(qs) == 2 and all(_is_number(x) for x in qs)
          and 0.0 < float(qs[0]) < float(qs[1]) < 1.0)
    if not ok:
        raise ConfigError(
            f"eval.quantiles={qs!r}: must be two increasing values in (0, 1), e.g. "
            "(0.9, 0.995) (the map-normalization quantiles); on the command line "
            "--config.eval.quantiles='(0.9, 0.995)'.")


def _check_map_weights(config, method) -> None:
    """eval.map_weights and each eval.weight_variants entry: {component of the method's
    maps: a finite weight >= 0}, not all zero (the map would be 0 everywhere)."""
    names = tuple(method.map_names)
    tables = [("eval.map_weights", config.eval.get("map_weights", None))]
    for name, w in (config.eval.get("weight_variants", None) or {}).items():
        tables.append((f"eval.weight_variants.{name}", w))
    for key, table in tables:
        if table is None:
            continue
        if not hasattr(table, "items"):
            raise ConfigError(f"{key}={table!r}: must be {{component: weight}}, e.g. "
                              f"--config.{key}=\"{{'{names[0]}': 1.0}}\".")
        table = dict(table.items())
        for k, v in table.items():
            if k not in names:
                raise ConfigError(
                    f"{key} names {k!r}, which is not a map component of method "
                    f"{config.method!r}: its components are {', '.join(names)}.")
            if not _is_number(v) or not math.isfinite(float(v)) or float(v) < 0:
                raise ConfigError(f"{key}.{k}={v!r}: must be a finite number >= 0.")
        if all(float(table.get(k, 1.0)) == 0 for k in names):
            raise ConfigError(
                f"{key} sets every map weight to 0 ({', '.join(names)}): the anomaly map would "
                f"be 0 everywhere; give at least one component a weight > 0 (default 1).")


def _check_report(config) -> None:
    if "report" not in config:
        return
    t = _number(config, "report.thumbnail_size", int, default=160)
    if not 16 <= t <= 1024:
        raise ConfigError(f"report.thumbnail_size={t}: must be between 16 and 1024 (pixels per "
                          "panel of the report's gallery; 128-256 keeps the report light).")
    n = _number(config, "report.tensorboard_images", int, default=4)
    if n < 0:
        raise ConfigError(f"report.tensorboard_images={n}: must be >= 0.")
    for key in ("html", "tensorboard"):
        if not isinstance(config.report.get(key, True), bool):
            raise ConfigError(f"report.{key}={config.report[key]!r}: must be True or False.")


def _check_teacher(config) -> None:
    w = str(config.teacher.weights)
    if w == "random" and not config.teacher.allow_random:
        raise ConfigError(
            "teacher.weights='random' is only allowed where the config sets "
            "teacher.allow_random=True (demos and tests): a random teacher gives meaningless "
            "results. Use 'auto' or a path to the torchvision .pth file.")
    if int(config.teacher.width_divisor) != 1 and w != "random":
        raise ConfigError("teacher.width_divisor != 1 only works with teacher.weights='random'.")


def _check_files(config, method) -> None:
    """Checks that look at the file system (cheap: no file is read)."""
    w = str(config.teacher.weights)
    if w not in ("auto", "random"):
        if os.path.isdir(w):
            raise ConfigError(
                f"teacher.weights={w!r} is a directory: it must be a .pth or .npz FILE (a "
                "torchvision checkpoint, or a port written by tools/port_weights.py), or "
                "'auto' or 'random'.")
        if not os.path.isfile(w):
            raise ConfigError(
                f"teacher.weights={w!r}: no such file; give a torchvision .pth or a ported .npz "
                "file, 'auto' (the ImageNet weights, cached or downloaded) or 'random'.")
    init_from = str(config.get("init_from", "") or "")
    if init_from:
        if not os.path.exists(init_from):
            raise ConfigError(
                f"init_from={init_from!r}: no such file or directory (a checkpoint of the "
                "reference PyTorch code); leave init_from empty to train from scratch.")
        method.check_init_from(init_from)


EVALUATING_MODES = ("train_and_eval", "eval")


def validate(config, mode: str | None = None) -> None:
    """Refuse a config that cannot run, before any data is read or any model built.

    Raises ConfigError / DataError (ValueErrors) with one line naming the key, the bad
    value and the fix. Also resolves the deprecated alias data.val_fraction (see
    base_config). The dataset is looked at cheaply (directory listings): every category
    is there with training images; with ``mode`` "train_and_eval" or "eval" (what
    ``kdjax.main`` and ``experiment.train_and_evaluate`` pass) also what the evaluation
    will read of each category: its validation and test splits, every anomalous test
    image's mask or LOCO regions and ``defects_config.json``, masks of their images'
    size (image headers only; kdjax.data.checks.check_evaluation_splits)."""
    from kdjax.methods import METHODS, method_class

    # The config alone: keys, values, training and evaluation settings.
    _check_keys(config, METHODS)
    method = method_class(config.method)  # an unknown name: ConfigError
    size = _number(config, "data.image_size", int)
    if size < 32 or size % 32:
        raise ConfigError(f"data.image_size={size}: must be a multiple of 32 and >= 32.")
    if config.data.on_corrupt not in ("raise", "skip"):
        raise ConfigError(
            f"data.on_corrupt={config.data.on_corrupt!r}: must be 'raise' or 'skip'.")
    _resolve_validation_fraction(config)
    _check_teacher(config)
    _check_train(config, method)
    _check_eval(config)
    _check_report(config)
    # The method's section, its map weights and an imported checkpoint.
    method.resolve_settings(config)
    _check_map_weights(config, method)
    _check_files(config, method)
    paper_targets(config)  # a targets_by that names no key
    # The dataset, in one place (directory listings and image headers only).
    data_checks.check_data(config, evaluating=mode in EVALUATING_MODES)


from kdjax.config_files import (config_dir, load_config, missing_config_message,  # noqa: E402,F401
                                shipped_configs)
