"""The ``config.cad`` settings: every key with its default, and the checks that refuse
values that cannot run (the method: kdjax/methods/cad.py; every key explained:
docs/METHODS.md, "Every config.cad key")."""

from __future__ import annotations

import ml_collections

from kdjax import losses
from kdjax.errors import ConfigError
from kdjax.methods.rd4ad import TAPS
from kdjax.models.cad import MIXINGS

GLOBAL_MAPS = ("affinity", "cosine", "affinity+cosine")


def default_config() -> ml_collections.ConfigDict:
    """Defaults of ``config.cad`` (each explained in docs/METHODS.md)."""
    c = ml_collections.ConfigDict()
    c.gccb_input = "layer3"  # layer3 | ocbe
    c.gccb_stop_gradient = True
    c.d = 128
    c.mixing = "attention"  # attention | pool | none
    c.heads = 4
    c.attention_blocks = 1
    c.mlp_ratio = 2
    c.pos_embed = True
    c.pool_grid = 8  # 0: no spatial pooling
    c.decoder_widths = (256, 128, 64)
    c.decoder_blocks = 2
    c.global_layers = ("layer2", "layer3")
    c.global_weight = 1.0
    c.global_feature_loss = "flat"  # flat | pixel
    c.affinity_layers = ("layer2", "layer3")
    c.affinity_weight = 1.0
    c.affinity_distance = "l1"  # l1 | l2
    c.affinity_block = 256  # query rows per block of the chunked affinity computation
    c.affinity_precision = "default"  # default | high | highest
    c.global_map = "affinity"  # affinity | cosine | affinity+cosine
    c.global_sigma = -1.0  # < 0: the local map's sigma (eval.gaussian_sigma, default 4)
    # Learning rate of the global branch (GCCB + global student). < 0: the same
    # optimizer as the local student (train.learning_rate, train.b1/b2), one Adam over
    # all parameters; >= 0: the same optimizer kind with this rate for the global
    # group only (optax.multi_transform over {"local", "global"}).
    c.global_learning_rate = -1.0
    return c


def check_settings(cad, config=None) -> None:
    """Refuse ``config.cad`` values that cannot run (ConfigError, one line)."""
    def bad(key, why):
        raise ConfigError(f"cad.{key}={cad[key]!r}: {why}")

    if cad.gccb_input not in ("layer3", "ocbe"):
        bad("gccb_input", "use 'layer3' or 'ocbe'.")
    if cad.mixing not in MIXINGS:
        bad("mixing", f"use one of {', '.join(MIXINGS)}.")
    for key in ("global_layers", "affinity_layers"):
        taps = tuple(cad[key])
        if any(t not in TAPS for t in taps) or (key == "global_layers" and not taps):
            bad(key, f"use a non-empty subset of {TAPS}.")
    missing = [t for t in cad.affinity_layers if t not in tuple(cad.global_layers)]
    if missing:
        bad("affinity_layers", f"{missing} are not in cad.global_layers "
            f"{tuple(cad.global_layers)}: the global student must predict every tap its "
            "affinity is compared on.")
    if cad.global_map not in GLOBAL_MAPS:
        bad("global_map", f"use one of {', '.join(GLOBAL_MAPS)}.")
    if cad.global_map != "cosine" and not tuple(cad.affinity_layers):
        bad("affinity_layers", "the affinity map (cad.global_map) needs at least one tap; or "
            "set cad.global_map='cosine'.")
    if cad.global_feature_loss not in ("flat", "pixel"):
        bad("global_feature_loss", "use 'flat' or 'pixel'.")
    if cad.affinity_distance not in ("l1", "l2"):
        bad("affinity_distance", "use 'l1' or 'l2'.")
    if cad.affinity_precision not in losses.PRECISIONS:
        bad("affinity_precision", f"use one of {', '.join(losses.PRECISIONS)}.")
    for key in ("affinity_block", "heads", "attention_blocks", "mlp_ratio", "d"):
        if int(cad[key]) < 1:
            bad(key, "must be >= 1.")
    for key in ("pool_grid", "decoder_blocks"):
        if int(cad[key]) < 0:
            bad(key, "must be >= 0.")
    if len(tuple(cad.decoder_widths)) != 3 or min(int(w) for w in cad.decoder_widths) < 1:
        bad("decoder_widths", "needs 3 positive widths (layer3, layer2, layer1 stages).")
    for key in ("global_weight", "affinity_weight"):
        if not float(cad[key]) >= 0:
            bad(key, "must be a number >= 0.")
