"""Config files: configs/<name>.py (``get_config()``), found and loaded with one-line
messages for a missing file or an unknown override."""

from __future__ import annotations

import difflib
import os

import ml_collections

from kdjax.config_keys import flat_keys, unknown_key_message
from kdjax.errors import ConfigError, ConfigFileNotFoundError


def config_dir() -> str:
    """The configs/ folder of this checkout."""
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def shipped_configs() -> list:
    d = config_dir()
    if not os.path.isdir(d):
        return []
    return sorted(n[:-3] for n in os.listdir(d) if n.endswith(".py") and not n.startswith("_"))


def missing_config_message(path: str, how: str = "") -> str:
    """One line: no config file ``path``; the shipped configs (and the closest name)."""
    names = shipped_configs()
    stem = os.path.basename(path)
    stem = stem[:-3] if stem.endswith(".py") else stem
    close = difflib.get_close_matches(stem, names, n=1)
    hint = f" Did you mean configs/{close[0]}.py?" if close else ""
    avail = (f" The configs in configs/ are: {', '.join(n + '.py' for n in names)}."
             if names else "")
    return f"No config file {path!r}{how}.{hint}{avail}"


def load_config(name_or_path: str, overrides: dict | None = None) -> ml_collections.ConfigDict:
    """Load configs/<name>.py (or any config file path; "path:arg" calls get_config(arg))
    and apply {"dotted.key": value}.

    For notebooks and tests; the command line uses --config=... instead. The result is not
    validated (call validate); an override of a key the config does not have is refused
    with the closest known keys, except inside eval.map_weights / eval.weight_variants.
    """
    import importlib.util

    from kdjax.config import OPEN_SUBSECTIONS, _under_open

    path, args = name_or_path, ()
    if not os.path.exists(path) and ":" in path:
        path, arg = path.split(":", 1)
        args = (arg,)
    if not path.endswith(".py"):
        path = os.path.join(config_dir(), path + ".py")
    if not os.path.exists(path):
        raise ConfigFileNotFoundError(missing_config_message(path))
    spec = importlib.util.spec_from_file_location(
        "kdjax_config_" + os.path.basename(path)[:-3], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(*args)
    if overrides:
        known = flat_keys(config, OPEN_SUBSECTIONS, sections=True)
        for key in overrides:
            if key not in known and not _under_open(key):
                raise ConfigError(unknown_key_message(key, known, " in the overrides") + ".")
        config.update_from_flattened_dict(dict(overrides))
    return config
