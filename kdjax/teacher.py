"""The frozen teacher's weights, loaded by the engine for a method.

A method builds its teacher module and says where its weights come from
(``method.teacher_arch``, ``teacher_width_divisor``, ``teacher_source()``:
``teacher.weights`` or a reference checkpoint's file); :func:`load` reads
them with kdjax.weights (a torchvision / PDN ``.pth``, a ported ``.npz``,
"auto" = the cached port or a download, "random"), once per category, and
the engine hands the variables to ``method.init`` / the inference model.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

log = logging.getLogger("kdjax")


@dataclasses.dataclass
class Teacher:
    variables: Any  # the teacher module's variables (host arrays)
    source: str  # what was loaded: a file, "auto" or "random" (also after a fallback)
    description: str  # one line for the log and results.json


def load(config, method, fallback: bool = True) -> Teacher:
    """The teacher weights of ``method`` (its module ``method.teacher``).

    With ``teacher.weights='auto'`` and ``teacher.fallback_random=True`` (demos)
    and ``fallback``, weights that are neither cached nor downloadable give a
    random teacher, announced in the log (and results.json says so)."""
    from kdjax import weights

    arch, divisor = method.teacher_arch, int(method.teacher_width_divisor)
    source = str(method.teacher_source())
    try:
        variables, desc = weights.teacher_variables(arch, source, method.teacher, divisor)
    except weights.WeightsUnavailableError as e:  # offline without a cached port
        if not (fallback and source == "auto" and config.teacher.get("fallback_random", False)):
            raise
        log.warning("*** ImageNet weights for %s are not available (%s). Using a RANDOM teacher: "
                    "results will not mean much. Get the real weights with:  python "
                    "tools/port_weights.py --arch %s --src auto ***", arch, e, arch)
        variables, desc = weights.teacher_variables(arch, "random", method.teacher, divisor)
        source = "random"
    if source == "random":
        log.info("The teacher %s has RANDOM weights: the results do not measure the method.",
                 arch)
    return Teacher(variables, source, desc)


def init_method(config, method, rng, image_shape):
    """``method.init(rng, image_shape, <the teacher's variables>)``: a method's
    variables with its teacher loaded by :func:`load` (tools, notebooks, tests)."""
    return method.init(rng, image_shape, load(config, method).variables)


__all__ = ["Teacher", "init_method", "load"]
