"""JSON files kdjax writes (results.json, model.json, ...): strict JSON, NaN / inf as null."""

from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping

import numpy as np


def json_safe(v: Any) -> Any:
    """``v`` with numpy scalars and arrays as Python values, NaN / inf as None,
    mappings and sequences converted recursively (keys as strings)."""
    if isinstance(v, Mapping):
        return {str(k): json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [json_safe(x) for x in v]
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        v = float(v)
        return v if math.isfinite(v) else None
    if isinstance(v, np.ndarray):
        return json_safe(v.tolist())
    return v


def write_json(path: str, obj: Any) -> str:
    """Write ``json_safe(obj)`` to ``path`` (indented, through a temporary file)."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(json_safe(obj), f, indent=2, allow_nan=False)
        f.write("\n")
    os.replace(tmp, path)
    return path
