"""Base configuration and validation with messages that say what to do.

Every config file in configs/ starts from ``base_config()`` and overrides
what its experiment needs; ``validate(config)`` runs before anything else.
"""

from __future__ import annotations

import os

import ml_collections

from kdjax.data.types import DATASETS, MVTEC_AD_CATEGORIES, MVTEC_LOCO_CATEGORIES


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.method = "rd4ad"
    c.seed = 111
    c.multihost = False  # call jax.distributed.initialize() first
    c.distributed = ml_collections.ConfigDict()
    c.distributed.coordinator_address = ""  # empty: let JAX detect the cluster
    c.distributed.num_processes = 0
    c.distributed.process_id = -1
    c.distributed.cpu_collectives = False  # gloo collectives for CPU-only multi-process runs
    c.init_from = ""  # a checkpoint trained with the reference PyTorch code

    c.data = ml_collections.ConfigDict()
    c.data.dataset = "mvtec_ad"  # mvtec_ad | mvtec_loco | folder | synthetic
    c.data.root = ""
    c.data.category = "bottle"  # one name, a comma-separated list, or "all"
    c.data.image_size = 256
    c.data.on_corrupt = "raise"  # raise | skip (a corrupt image file)
    c.data.val_fraction = 0.1  # MVTec AD/folder: held-out train images when a method needs validation
    c.data.synthetic_seed = 0
    c.data.synthetic_size = 256  # resolution of the generated synthetic images
    c.data.synthetic_counts = (200, 40, 40, 40, 40)  # train, val, test good/logical/structural

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
    c.train.optimizer = "adam"  # adam (the papers') | sgd (numerical checks)
    c.train.learning_rate = 0.005
    c.train.b1 = 0.5
    c.train.b2 = 0.999
    c.train.weight_decay = 0.0
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
    c.train.interrupt_after = 0  # tests: simulate an interruption after this step

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

    # Training variants side by side: {name: {"dotted.key": value}}; each is trained in
    # its own checkpoint directory (shared by variants whose training is identical).
    c.variants = ml_collections.ConfigDict()

    # Paper numbers shown beside ours in results.md: {category or "mean": {metric: value}}.
    c.targets = ml_collections.ConfigDict()
    c.targets_source = ""
    return c


def categories_of(config) -> list:
    """The list of categories a config names (expands "all" and comma lists)."""
    cat = str(config.data.category).strip()
    ds = config.data.dataset
    known = {"mvtec_ad": MVTEC_AD_CATEGORIES, "mvtec_loco": MVTEC_LOCO_CATEGORIES}.get(ds)
    if ds == "synthetic" and cat in ("all", ""):
        from kdjax.data.synthetic import CATEGORY

        return [CATEGORY]
    if cat == "all":
        if known is None:
            if not config.data.root or not os.path.isdir(config.data.root):
                raise ValueError(f"data.category=all needs an existing data.root for dataset {ds!r}.")
            return sorted(d for d in os.listdir(config.data.root)
                          if os.path.isdir(os.path.join(config.data.root, d, "train")))
        return list(known)
    cats = [c.strip() for c in cat.split(",") if c.strip()]
    if not cats:
        raise ValueError("data.category is empty: name a category, a comma-separated list, or 'all'.")
    if known is not None:
        bad = [c for c in cats if c not in known]
        if bad:
            raise ValueError(
                f"Unknown {ds} category {bad[0]!r}. Known categories: {', '.join(known)} (or 'all').")
    return cats


def validate(config) -> None:
    """Raise ValueError with a clear message for a config that cannot run."""
    from kdjax.methods import METHODS

    if config.method not in METHODS:
        raise ValueError(f"Unknown method {config.method!r}. Choose one of: {', '.join(METHODS)}.")
    ds = config.data.dataset
    if ds not in DATASETS:
        raise ValueError(f"Unknown dataset {ds!r}. Choose one of: {', '.join(DATASETS)}.")
    if ds != "synthetic":
        root = config.data.root
        if not root:
            raise ValueError(
                f"data.root is not set. Download the {ds} dataset (see README, 'Datasets') and "
                f"pass --config.data.root=/path/to/it.")
        if not os.path.isdir(root):
            raise ValueError(
                f"data.root {root!r} does not exist. Download the {ds} dataset from "
                "https://www.mvtec.com/company/research/datasets (a person must accept the "
                "licence) and pass its directory with --config.data.root=...")
    categories_of(config)
    size = int(config.data.image_size)
    if size < 32 or size % 32:
        raise ValueError(f"data.image_size={size}: must be a multiple of 32 and >= 32.")
    if config.data.on_corrupt not in ("raise", "skip"):
        raise ValueError("data.on_corrupt must be 'raise' or 'skip'.")
    w = str(config.teacher.weights)
    if w == "random" and not config.teacher.allow_random:
        raise ValueError(
            "teacher.weights='random' is only allowed where the config sets "
            "teacher.allow_random=True (demos and tests): a random teacher gives meaningless "
            "results. Use 'auto' or a path to the torchvision .pth file.")
    if int(config.teacher.width_divisor) != 1 and w != "random":
        raise ValueError("teacher.width_divisor != 1 only works with teacher.weights='random'.")
    if config.train.batch_size < 1:
        raise ValueError("train.batch_size must be >= 1.")
    if config.train.compute_dtype not in ("float32", "bfloat16"):
        raise ValueError("train.compute_dtype must be 'float32' or 'bfloat16'.")
    if config.eval.resolution not in ("input", "original"):
        raise ValueError("eval.resolution must be 'input' or 'original'.")


def load_config(name_or_path: str, overrides: dict | None = None) -> ml_collections.ConfigDict:
    """Load configs/<name>.py (or any config file path) and apply {"dotted.key": value}.

    For notebooks and tests; the command line uses --config=... instead.
    """
    import importlib.util

    path = name_or_path
    if not path.endswith(".py"):
        here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        path = os.path.join(here, "configs", name_or_path + ".py")
    if not os.path.exists(path):
        raise FileNotFoundError(f"No config file {path!r}.")
    spec = importlib.util.spec_from_file_location(
        "kdjax_config_" + os.path.basename(path)[:-3], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    if overrides:
        config.update_from_flattened_dict(dict(overrides))
    return config
