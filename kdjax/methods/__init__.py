"""Methods: each a file with a Method subclass, registered by name."""

from __future__ import annotations

import importlib

_REGISTRY = {
    "rd4ad": ("kdjax.methods.rd4ad", "RD4AD"),
    "mrkd": ("kdjax.methods.mrkd", "MRKD"),
    "cad": ("kdjax.methods.cad", "CAD"),
    "efficientad": ("kdjax.methods.efficientad", "EfficientAD"),
}

METHODS = tuple(_REGISTRY)


def get_method(config):
    """Instantiate the method named by ``config.method``."""
    name = config.method
    if name not in _REGISTRY:
        raise ValueError(
            f"Unknown method {name!r}. Choose one of: {', '.join(METHODS)} "
            "(set it with --config.method=<name>).")
    module, cls = _REGISTRY[name]
    return getattr(importlib.import_module(module), cls)(config)
