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


def method_class(name: str):
    """The Method subclass registered as ``name`` (ConfigError for an unknown name)."""
    if name not in _REGISTRY:
        import difflib

        from kdjax.errors import ConfigError

        close = difflib.get_close_matches(str(name), METHODS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"Unknown method {name!r}.{hint} Choose one of: {', '.join(METHODS)} "
                          "(set it with --config.method=<name>).")
    module, cls = _REGISTRY[name]
    return getattr(importlib.import_module(module), cls)


def get_method(config, kernels=None):
    """The method named by ``config.method``, its modules computing with ``kernels``
    (kdjax.backends; default: this backend's)."""
    return method_class(config.method)(config, kernels)
