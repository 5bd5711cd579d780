"""Argument checks shared by the ``ufm.networks`` modules (a private module: its names are public to the package)."""

from __future__ import annotations

import math
import numbers
from typing import Any

import jax
import numpy as np


def positive_int(name: str, v: Any, what: str, minimum: int = 1) -> int:
    """``v`` as an int, or a ValueError naming ``name``, ``what`` it is and the bound."""
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum} ({what}); got {v!r}")
    return int(v)


def positive(name: str, v: Any, allow_zero: bool = False) -> float:
    """``v`` as a finite float > 0 (>= 0 with ``allow_zero``), or a ValueError naming ``name``."""
    bad = isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(float(v))
    if bad or v < 0 or (v == 0 and not allow_zero):
        raise ValueError(f"{name} must be a finite number {'>= 0' if allow_zero else '> 0'}; got {v!r}")
    return float(v)


def as_key(key: Any) -> jax.Array:
    """A `jax.random.key` from None (seed 0), an int seed, or a key (returned as is)."""
    if key is None:
        return jax.random.key(0)
    if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
        return jax.random.key(int(key))
    return key
