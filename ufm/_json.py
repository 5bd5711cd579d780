"""JSON conversion shared by the core and the faces: NumPy/JAX numbers, arrays, NamedTuples and paths in,
strict JSON values out (non-finite floats become None, as strict JSON has no NaN)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np


def to_jsonable(obj: Any) -> Any:
    """Recursively turn NumPy/JAX scalars and arrays, tuples, NamedTuples and Paths into JSON-friendly values.
    Non-finite floats become None (strict JSON has no NaN)."""
    if hasattr(obj, "to_dict") and callable(obj.to_dict):
        return to_jsonable(obj.to_dict())
    if hasattr(obj, "_asdict"):
        return to_jsonable(obj._asdict())
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, (str, bool, type(None))):
        return obj
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if hasattr(obj, "__array__") or isinstance(obj, np.ndarray):
        a = np.asarray(obj)
        if a.dtype == bool:
            return a.tolist()
        if np.issubdtype(a.dtype, np.number):
            return to_jsonable(a.tolist()) if a.ndim else to_jsonable(a.item())
        return str(a)
    return str(obj)
