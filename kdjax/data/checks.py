"""The data part of ``kdjax.config.validate``: the ``data.*`` values, the categories a config
names, and a look at the dataset root (cheap: directory listings, no file is decoded),
each refused with one line naming the key, what is missing and where to get it.
"""

from __future__ import annotations

import difflib
import os

from kdjax.data import files
from kdjax.data.category import INPUTS
from kdjax.data.types import (DATASET_SPECS, DATASETS, IMAGE_FILTERS, MASK_RESIZES,
                              RESIZE_POLICIES, SOURCES, DatasetSpec, where_to_get)
from kdjax.errors import ConfigError, DataError


def _choice(config, key: str, choices, default: str, why: str = "") -> str:
    v = config.data.get(key, default)
    if v not in choices:
        raise ConfigError(f"data.{key}={v!r}: must be one of {', '.join(map(repr, choices))}"
                          f"{why}.")
    return str(v)


def check_values(config) -> DatasetSpec:
    """data.dataset, data.source, data.resize, data.image_filter, data.mask_resize; the
    dataset's descriptor."""
    ds = config.data.dataset
    spec = DATASET_SPECS.get(ds)
    if spec is None:
        close = difflib.get_close_matches(str(ds), DATASETS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"Unknown dataset {ds!r} (data.dataset).{hint} Choose one of: "
                          f"{', '.join(DATASETS)}.")
    _choice(config, "resize", RESIZE_POLICIES, "stretch",
            " (how a non-square image becomes the square input; docs/DATA.md)")
    _choice(config, "image_filter", IMAGE_FILTERS, "bilinear", " (the image resize filter)")
    _choice(config, "mask_resize", MASK_RESIZES, "bilinear", " (the mask resize)")
    source = _choice(config, "source", SOURCES, "files")
    _choice(config, "input", INPUTS, "auto",
            " (resident: the training images on the devices; stream: decoded while training)")
    if source == "tfds" and not spec.tfds_name:
        have = ", ".join(s.name for s in DATASET_SPECS.values() if s.tfds_name)
        raise ConfigError(f"data.source='tfds': dataset {ds!r} has no TFDS builder (they read "
                          f"{have}); use --config.data.source=files.")
    return spec


def categories_of(config) -> list:
    """The list of categories a config names (expands "all" and comma lists)."""
    cat = str(config.data.category).strip()
    ds = config.data.dataset
    spec = DATASET_SPECS.get(ds)
    known = spec.categories if spec is not None else None
    if spec is not None and spec.generated and cat in ("all", ""):
        return list(known)
    if cat == "all":
        if known is None:
            if not config.data.root or not os.path.isdir(config.data.root):
                raise DataError(
                    f"data.category=all needs an existing data.root for dataset {ds!r}.")
            root = config.data.root
            cats = sorted(d for d in os.listdir(root)
                          if os.path.isdir(os.path.join(root, d, "train")))
            if not cats:
                found = sorted(d for d in os.listdir(root) if not d.startswith(".")
                               and os.path.isdir(os.path.join(root, d)))
                raise DataError(
                    f"data.category=all: data.root {root!r} holds no category folder with a "
                    f"train/ folder (it holds: {', '.join(found) if found else 'no folders'}); "
                    f"a {ds} dataset is <root>/<category>/train/good/<images> (docs/DATA.md): "
                    f"point --config.data.root at the folder holding the category folders.")
            return cats
        return list(known)
    cats = [c.strip() for c in cat.split(",") if c.strip()]
    if not cats:
        raise ConfigError(
            "data.category is empty: name a category, a comma-separated list, or 'all'.")
    if known is not None:
        bad = [c for c in cats if c not in known]
        if bad:
            close = difflib.get_close_matches(bad[0], known, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(
                f"Unknown {ds} category {bad[0]!r}.{hint} Known categories: {', '.join(known)} "
                "(or 'all').")
    return cats


def _train_folder(spec: DatasetSpec, root: str, category: str) -> str:
    """The folder that holds a category's training images."""
    if spec.layout == "visa":
        return os.path.join(root, category, "Data", "Images")
    return os.path.join(root, category, "train")


def _layout_diagnosis(dataset: str, root: str, category: str):
    """The readers' specific explanation of a missing category folder (the root is one
    level too deep or shallow, or holds another dataset), else None."""
    from kdjax.data import readers

    try:
        readers._check_category_dir(dataset, root, category)
    except readers.DatasetError as e:
        msg = str(e)
        if not msg.startswith(f"Category {category!r} not found"):
            return msg.split("\n")[0]
    except Exception:  # the diagnosis is a courtesy; the caller's message stands
        return None
    return None


def check_categories_present(config, root: str) -> list:
    """Check that every category the config names is a folder of ``root`` with at least
    one training image; return the categories. Raises DataError with one line naming
    every missing or empty category and the root (for ``data.category=all`` or a list on a
    partial download)."""
    spec = DATASET_SPECS[config.data.dataset]
    cats = categories_of(config)
    missing = [c for c in cats if not os.path.isdir(os.path.join(root, c))]
    empty = [c for c in cats if c not in missing
             and not files.has_image_file(_train_folder(spec, root, c))]
    if not missing and not empty:
        return cats
    if missing:
        specific = _layout_diagnosis(config.data.dataset, root, missing[0])
        if specific:
            raise DataError(specific)
    spec_str = str(config.data.category)
    present = [c for c in cats if c not in missing and c not in empty]
    parts, todo = [], []
    if missing:
        parts.append(
            f"data.category={spec_str!r}: {len(missing)} of {len(cats)} categories "
            f"{'is' if len(missing) == 1 else 'are'} not in data.root {root!r}: "
            f"{', '.join(missing)}")
        todo.append(f"download or extract {'it' if len(missing) == 1 else 'them'} into {root}"
                    + (f" ({spec.url})" if spec.url else ""))
    if empty:
        parts.append(
            f"categor{'y' if len(empty) == 1 else 'ies'} {', '.join(empty)} in {root!r} "
            f"{'has' if len(empty) == 1 else 'have'} no training images")
        where = ("<root>/<category>/Data/Images/Normal/" if spec.layout == "visa"
                 else f"<root>/<category>/train/{spec.good_folder}/")
        todo.append(f"put the training images in {where}")
    if present:
        fix = (f"{' and '.join(todo)}, or train on the categories that are there: "
               f"--config.data.category={','.join(present)}")
    else:
        found = sorted(d for d in os.listdir(root)
                       if not d.startswith(".") and os.path.isdir(os.path.join(root, d)))
        fix = (f"{' and '.join(todo)}, or check --config.data.root and "
               f"--config.data.category (the root holds: "
               f"{', '.join(found) if found else 'no folders'})")
    raise DataError("; ".join(parts) + "; " + fix + ".")


def tfds_prepared(config, category: str) -> bool:
    """Whether the TFDS dataset of ``category`` is in ``data.tfds_dir`` (a directory check:
    TFDS writes <data_dir>/<builder>/<category>/<version>/dataset_info.json)."""
    spec = DATASET_SPECS[config.data.dataset]
    data_dir = str(config.data.get("tfds_dir", "")) or os.environ.get(
        "TFDS_DATA_DIR", os.path.join(os.path.expanduser("~"), "tensorflow_datasets"))
    folder = os.path.join(data_dir, spec.tfds_name or "", category)
    if not os.path.isdir(folder):
        return False
    return any(os.path.isfile(os.path.join(folder, v, "dataset_info.json"))
               for v in os.listdir(folder))


def check_root(config) -> None:
    """The dataset root: set, existing, of the dataset's layout, every category there
    (not needed for a generated dataset, or for TFDS data already prepared)."""
    spec = DATASET_SPECS[config.data.dataset]
    if spec.generated:
        return
    tfds = str(config.data.get("source", "files")) == "tfds"
    if tfds and all(tfds_prepared(config, c) for c in categories_of(config)):
        return
    root = config.data.root
    title = f"the {spec.title} dataset" if spec.name != "folder" else "your image folder"
    if not root:
        raise DataError(f"data.root is not set: {where_to_get(spec)}, and pass its directory "
                        f"with --config.data.root=/path/to/it (docs/DATA.md).")
    if not os.path.isdir(root):
        raise DataError(f"data.root {root!r} does not exist: expected {title}; "
                        f"{where_to_get(spec)}, and pass its directory with "
                        f"--config.data.root=/path/to/it.")
    if tfds:
        _check_manual_dir(spec, root, categories_of(config))
        return
    if spec.layout == "visa":
        from kdjax.data import visa

        if not os.path.isfile(os.path.join(root, visa.SPLIT_CSV)):
            raise DataError(
                f"data.root {root!r} has no {visa.SPLIT_CSV}: a VisA root is the extracted "
                f"VisA_20220922 folder holding split_csv/ and the category folders; get "
                f"split_csv/1cls.csv from {spec.url}.")
    check_categories_present(config, root)


def _check_manual_dir(spec: DatasetSpec, root: str, cats) -> None:
    """data.source=tfds, not prepared yet: ``root`` is the TFDS manual directory; it must
    hold an archive, or the categories (up to two folders down)."""
    from kdjax.data import readers

    if files.archives(root):
        return
    below = files.folders_below(root)
    missing = [c for c in cats
               if not any(readers.looks_like_category(os.path.join(d, c), spec) for d in below)]
    if missing:
        raise DataError(
            f"data.source=tfds: the TFDS dataset {spec.tfds_name} is not prepared in "
            f"data.tfds_dir, and data.root {root!r} (its manual download) holds neither an "
            f"archive nor categor{'y' if len(missing) == 1 else 'ies'} {', '.join(missing)}: "
            f"{where_to_get(spec)}, into {root}.")


# ---------------------------------------------------------------------------
# The evaluation splits, before training: found in the file headers only.

# (dataset, root, category, on_corrupt) whose evaluation splits passed the check in this
# process: kdjax.main and experiment.train_and_evaluate both validate; the check runs once.
_CHECKED_SPLITS: set = set()


def _header_hw(path: str, kind: str = "image"):
    """(H, W) of an image file from its header (PIL's lazy open: no pixel is decoded);
    DataError naming the file when the header cannot be read."""
    from PIL import Image

    from kdjax.data.images import corrupt

    try:
        with Image.open(files.open_file(path)) as im:
            w, h = im.size
    except (OSError, SyntaxError, ValueError) as e:
        if kind == "image":
            raise corrupt(path, e) from None
        raise DataError(f"Cannot read {kind} {path}: {type(e).__name__}: {e}. It is corrupt or "
                        "not an image; restore it from the original download.") from None
    return h, w


def _loco_pairs(spec: DatasetSpec, root: str, category: str) -> list:
    """[(test image, its ground-truth region PNG)] of a LOCO-layout category, listed
    without reading the regions' pixel values (kdjax.data.readers reads those at
    evaluation); DataError for a missing defects_config.json, ground-truth folder or
    region."""
    from kdjax.data import masks, readers

    cat_dir = readers._check_category_dir(spec.name, root, category)
    test_dir = os.path.join(cat_dir, "test")
    if not os.path.isdir(test_dir):
        raise DataError(f"{test_dir} is missing: category {category!r} has no test set "
                        f"(expected test/good/, test/logical_anomalies/, "
                        f"test/structural_anomalies/); re-extract it from the original "
                        f"download, or train only with --mode=train.")
    kinds = [t for t in files.subdirs(test_dir) if t in readers._LOCO_KIND]
    good = os.path.join(test_dir, "good")
    pairs = [(image, None) for image in (files.list_images(good) if os.path.isdir(good)
                                         else [])]
    gt_root = os.path.join(cat_dir, "ground_truth")
    if kinds or os.path.isdir(gt_root):
        masks.read_defects_config(cat_dir)  # missing or malformed: one line, the fix
    for t in kinds:
        for image in files.list_images(os.path.join(test_dir, t)):
            stem = os.path.splitext(os.path.basename(image))[0]
            gt_dir = os.path.join(gt_root, t, stem)
            regions = files.list_images(gt_dir) if os.path.isdir(gt_dir) else []
            if not regions:
                raise DataError(
                    f"No ground-truth region for {image}: expected {gt_dir}/000.png; restore "
                    f"{os.path.join(cat_dir, 'ground_truth')} from the original download.")
            pairs.extend((image, q) for q in regions)
    return pairs


def _mask_pairs(spec: DatasetSpec, root: str, category: str) -> list:
    """[(test image, its mask or None)] of the labelled test split (the readers' listing: a
    required mask that is missing is a DataError naming the file it expected)."""
    from kdjax.data import readers

    if spec.has_validation_split:  # listed here so that a missing one stops the run now
        readers.list_records(spec.name, root, category, "validation")
    if spec.ground_truth == "loco_regions":
        return _loco_pairs(spec, root, category)
    records = readers.list_records(spec.name, root, category, "test")
    return [(r.image_path, m) for r in records for m in (r.mask_paths or (None,))]


def check_evaluation_splits(config, root: str = None) -> None:
    """Check, before any training, what evaluation reads of every category of the run:
    the validation split (where the dataset has one), the test split's listing, each
    anomalous image's mask or LOCO regions (present, and of its image's size) and
    ``defects_config.json`` (LOCO). Only directory listings and image headers are read
    (PIL's lazy open), so it stays cheap on full datasets. Raises DataError (one line
    naming the file and the fix). A test image whose header cannot be read is refused
    (``data.on_corrupt='raise'``) or left to the evaluation, which skips it ('skip').
    Not needed for a generated dataset or ``data.source='tfds'``."""
    import concurrent.futures

    spec = DATASET_SPECS[config.data.dataset]
    if spec.generated or str(config.data.get("source", "files")) != "files":
        return
    root = config.data.root if root is None else root
    on_corrupt = str(config.data.get("on_corrupt", "raise"))
    for category in categories_of(config):
        key = (spec.name, os.path.abspath(root), category, on_corrupt)
        if key in _CHECKED_SPLITS:
            continue
        try:
            pairs = _mask_pairs(spec, root, category)
        except DataError as e:  # the readers' messages may show the layout on more lines
            lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
            if len(lines) < 2:
                raise
            raise DataError(" ".join(lines)) from None

        def image_header(path):
            try:
                return _header_hw(path, "image")
            except DataError:
                if on_corrupt == "skip":  # the evaluation skips it too
                    return None
                raise

        images = sorted({i for i, _ in pairs})
        masks = [(i, m) for i, m in pairs if m is not None]
        with concurrent.futures.ThreadPoolExecutor(files.num_workers()) as ex:
            image_hw = dict(zip(images, ex.map(image_header, images)))
            mask_hw = list(ex.map(lambda pair: _header_hw(pair[1], "mask"), masks))
        for (image, mask), mhw in zip(masks, mask_hw):
            ihw = image_hw[image]
            if ihw is not None and tuple(mhw) != tuple(ihw):
                raise DataError(
                    f"Mask {mask} is {mhw[1]}x{mhw[0]} (WxH) but its image {image} is "
                    f"{ihw[1]}x{ihw[0]}: a mask must have its image's size; restore the mask "
                    f"from the original download (or resize it to {ihw[1]}x{ihw[0]}).")
        _CHECKED_SPLITS.add(key)


def check_data(config, evaluating: bool = False) -> None:
    """Every data check ``config.validate`` makes, in one place: the data values, the
    category names, the root (every category present with training images) and, when
    ``evaluating``, what the evaluation will read (:func:`check_evaluation_splits`)."""
    spec = check_values(config)
    if spec.generated or str(config.data.category).strip() != "all":
        categories_of(config)  # names only; "all" of a folder dataset needs the root
    check_root(config)
    if evaluating:
        check_evaluation_splits(config)
