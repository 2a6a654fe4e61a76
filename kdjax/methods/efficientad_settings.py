"""The ``config.efficientad`` settings: every key with its default and meaning, and the
checks that refuse values that cannot run (the method: kdjax/methods/efficientad.py; the
recipe and every key: docs/METHODS.md, "EfficientAD" and "DFSC margin")."""

from __future__ import annotations

import logging
import os

import ml_collections

from kdjax.errors import ConfigError
from kdjax.losses import MARGIN_MODES, MARGIN_TARGETS

log = logging.getLogger("kdjax")

_ARCH_OF_SIZE = {"S": "pdn_small", "M": "pdn_medium"}
_SIZE_ALIASES = {"s": "S", "small": "S", "m": "M", "medium": "M"}


def default_efficientad_config() -> ml_collections.ConfigDict:
    """Every ``config.efficientad`` key, with EfficientAD's published values."""
    c = ml_collections.ConfigDict()
    c.model_size = "S"  # S | M (EfficientAD-S / -M); teacher.arch must be pdn_small / pdn_medium
    c.out_channels = 384  # teacher channels; the student has twice as many
    c.channels_divisor = 1  # >1 divides every width (tests only; needs a random teacher)
    c.hard_quantile = 0.999  # hard loss: mean of the distances >= this quantile
    c.jitter = 0.2  # ColorJitter strength of the AE branch (brightness, contrast, saturation)
    c.penalty_dir = ""  # folder of natural images (ImageNet train in the paper); "" = no penalty
    # At most this many of the folder's images (a seeded choice); 0: all of them. The set
    # stays on the device when it fits train.resident_max_gb (data.input=auto), else it is
    # streamed (kdjax/data/pipeline.py), like the training images.
    c.penalty_max_images = 0
    c.penalty_grayscale = 0.3  # RandomGrayscale probability of the penalty images
    c.map_padding = 4  # zero padding (feature pixels) of each map before upsampling
    # DFSC margin (Lee & Kim 2024; reconstruction, see kdjax/methods/efficientad.py's docstring).
    c.margin_weight = 0.0  # w; 0 = EfficientAD exactly
    # What the hinge keeps at least the gap away from the teacher, on the distinctive
    # positions: "student" = the student's global branch, relu(gap - ||S_ae - T||^2)
    # (gradient into the student only); "autoencoder" = the autoencoder,
    # relu(gap - ||T - A||^2) (gradient into the autoencoder only; the published form).
    c.margin_target = "student"
    # The hinge's gap: "absolute" = margin, on channel-mean squared distances of
    # normalized teacher features; "relative" = margin * ||T - A||^2 at that position
    # (degenerate with margin_target="autoencoder": check_settings warns).
    c.margin_mode = "absolute"
    c.margin = 0.5  # m
    c.margin_quantile = 0.9  # q: positions with ||T - A||^2 above it are "distinctive"
    return c


def check_settings(out, config) -> None:
    """Refuse ``config.efficientad`` values that cannot run (ConfigError, one line);
    normalizes ``model_size`` ("s", "small" -> "S")."""
    size = _SIZE_ALIASES.get(str(out.model_size).lower(), str(out.model_size))
    if size not in _ARCH_OF_SIZE:
        raise ConfigError(f"efficientad.model_size={out.model_size!r}: use 'S' or 'M'.")
    out.model_size = size
    arch = str(config.teacher.get("arch", _ARCH_OF_SIZE[size]))
    if arch not in (_ARCH_OF_SIZE[size], "pdn"):
        need = _ARCH_OF_SIZE[size]
        raise ConfigError(
            f"efficientad.model_size={size!r} needs teacher.arch={need!r}, not {arch!r}: add "
            f"--config.teacher.arch={need} (and that teacher's weights), or use a config "
            "argument that sets both (e.g. --config=configs/mvtec_efficientad.py:M).")
    if not 0.0 < float(out.hard_quantile) < 1.0:
        raise ConfigError(f"efficientad.hard_quantile={out.hard_quantile}: must be in (0, 1) "
                          "(paper: 0.999).")
    if not 0.0 <= float(out.margin_quantile) < 1.0:
        raise ConfigError(f"efficientad.margin_quantile={out.margin_quantile}: must be in "
                          "[0, 1) (e.g. 0.9).")
    if out.margin_mode not in MARGIN_MODES:
        raise ConfigError(f"efficientad.margin_mode={out.margin_mode!r}: use one of "
                          f"{', '.join(MARGIN_MODES)}.")
    if out.margin_target not in MARGIN_TARGETS:
        raise ConfigError(f"efficientad.margin_target={out.margin_target!r}: use one of "
                          f"{', '.join(MARGIN_TARGETS)}.")
    if not float(out.margin_weight) >= 0:
        raise ConfigError(f"efficientad.margin_weight={out.margin_weight}: must be >= 0 "
                          "(0 = plain EfficientAD).")
    if (float(out.margin_weight) > 0 and out.margin_target == "autoencoder"
            and out.margin_mode == "relative"):
        log.warning(
            "config.efficientad: margin_target='autoencoder' with margin_mode='relative' makes "
            "the hinge relu((margin - 1) * ||T - A||^2): %s. Use margin_mode='absolute'.",
            "never active (margin <= 1)" if float(out.margin) <= 1 else
            "never satisfied (margin > 1), a plain push of the autoencoder away from the teacher")
    if int(out.channels_divisor) < 1 or int(out.out_channels) % int(out.channels_divisor):
        raise ConfigError(f"efficientad.channels_divisor={out.channels_divisor}: must be >= 1 "
                          f"and divide efficientad.out_channels={out.out_channels}.")
    if int(out.channels_divisor) != 1 and str(config.teacher.weights) != "random":
        raise ConfigError(f"efficientad.channels_divisor={out.channels_divisor} only works "
                          "with teacher.weights='random' (tests and demos); set it to 1.")
    if not 0.0 <= float(out.penalty_grayscale) <= 1.0:
        raise ConfigError(f"efficientad.penalty_grayscale={out.penalty_grayscale}: must be a "
                          "probability in [0, 1].")
    if int(out.penalty_max_images) < 0:
        raise ConfigError(f"efficientad.penalty_max_images={out.penalty_max_images}: must be "
                          ">= 0 (0: every image of efficientad.penalty_dir).")
    if out.penalty_dir and not os.path.isdir(str(out.penalty_dir)):
        raise ConfigError(
            f"efficientad.penalty_dir={out.penalty_dir!r} is not a directory: point it at a "
            "folder of natural images (the paper uses the ImageNet training set) or leave it "
            "empty to train without the penalty.")
