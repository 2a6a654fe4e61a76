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
            return sorted(d for d in os.listdir(config.data.root)
                          if os.path.isdir(os.path.join(config.data.root, d, "train")))
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
