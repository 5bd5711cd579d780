"""Grid expansion: a table of field -> value(s) into validated, canonical run configs (no compute, no JAX call).

A *grid* names values for problem fields (K, n, widths or width x L, activation, loss, bias, lambdas, label
smoothing) and solver fields (method, lr, max_steps, tol, init_scale, patience, dtype, seed). It expands to a list
of runs (the Cartesian product of every listed field; a list of grids is the union). Every run is a plain JSON
dict with every field resolved, so a stored record is self-describing; `run_id` is its identity.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from .._options import auto_init_scale_for
from .._problem import ACTIVATIONS, BIASES, LOSSES, UFM
from .._solver import DEFAULT_LR, DEFAULT_MAX_STEPS, METHODS, default_tol

PROBLEM_FIELDS: tuple[str, ...] = tuple(UFM.__slots__)  # the problem columns of a record: the fields of UFM
SOLVER_FIELDS = ("method", "lr", "max_steps", "tol", "init_scale", "patience", "dtype", "seed")
CONFIG_FIELDS = PROBLEM_FIELDS + SOLVER_FIELDS
ALIASES = {"K": "num_classes", "n": "n_per_class"}
SHORTHANDS = ("width", "L", "lam", "seeds")
GRID_FIELDS = CONFIG_FIELDS + tuple(ALIASES) + SHORTHANDS
PROBLEM_DEFAULTS = dict(
    activation="linear", loss="mse", bias="none", lam_H=1e-3, lam_W=1e-3, lam_b=0.0, label_smoothing=0.0
)
SEED_MAX = 2**31 - 1
"""The largest seed (seeds are stored as int32 on the device)."""


def _bad(field: str, value: Any, why: str) -> ValueError:
    return ValueError(f"grid field {field!r} has an invalid value {value!r}: {why}")


def is_int(v) -> bool:
    """True for a Python/NumPy integer that is not a bool."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def is_num(v) -> bool:
    """True for a real number (Python or NumPy) that is not a bool."""
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _is_seq(v) -> bool:
    return isinstance(v, (list, tuple)) or (isinstance(v, np.ndarray) and v.ndim >= 1)


def _spaced(field: str, v: Mapping) -> list:
    """``{"logspace": [a, b, num]}`` -> 10**linspace(a, b, num); ``{"linspace": [a, b, num]}``;
    ``{"range": [start, stop(, step)]}`` (integers)."""
    if len(v) != 1:
        raise _bad(field, dict(v), "a value table must have exactly one key: logspace, linspace or range")
    ((kind, args),) = v.items()
    if kind in ("logspace", "linspace"):
        if not (
            _is_seq(args)
            and len(args) == 3
            and is_num(args[0])
            and is_num(args[1])
            and is_int(args[2])
            and args[2] >= 1
        ):
            raise _bad(field, dict(v), f"{kind} needs [start, stop, num] with an integer num >= 1")
        xs = np.linspace(float(args[0]), float(args[1]), int(args[2]))
        return [float(x) for x in (10.0**xs if kind == "logspace" else xs)]
    if kind == "range":
        if not (_is_seq(args) and 1 <= len(args) <= 3 and all(is_int(a) for a in args)):
            raise _bad(field, dict(v), "range needs [stop], [start, stop] or [start, stop, step] integers")
        return list(range(*[int(a) for a in args]))
    raise _bad(field, dict(v), "a value table must be {'logspace': [a, b, num]}, {'linspace': ...} or {'range': ...}")


def _field_values(field: str, v: Any) -> list:
    """The list of values a grid entry sweeps over (a single value gives a one-element list).

    ``widths`` is a tuple already, so a flat list of integers is ONE widths tuple and a list of lists sweeps.
    ``n_per_class`` and ``lam_W``: a flat list sweeps scalars; a list of lists sweeps per-class sizes
    (n_1..n_K) or per-layer lambdas. ``seeds``: an integer S means seeds 0..S-1.
    """
    if isinstance(v, Mapping):
        return _spaced(field, v)
    if isinstance(v, np.ndarray):
        v = v.tolist()
    if field == "widths":
        if is_int(v):
            return [(int(v),)]
        if _is_seq(v) and len(v) > 0 and all(is_int(x) for x in v):
            return [tuple(int(x) for x in v)]
        if _is_seq(v) and len(v) > 0 and all(_is_seq(x) or is_int(x) for x in v):
            return [(int(x),) if is_int(x) else tuple(x) for x in v]
        raise _bad(field, v, "expected widths (d_1, ..., d_L), or a list of such tuples to sweep")
    if field == "seeds":
        if is_int(v):
            if v < 1:
                raise _bad(field, v, "seeds = S means seeds 0..S-1 and needs S >= 1")
            return list(range(int(v)))
    if _is_seq(v):
        if len(v) == 0:
            raise _bad(field, v, "an empty list sweeps over nothing")
        return [tuple(x) if _is_seq(x) else x for x in v]
    return [v]


def _check_value(field: str, v: Any, x64: bool) -> Any:
    """Validate one value of one field; return its canonical JSON form (raises naming field and value)."""
    if field == "num_classes":
        if not is_int(v) or v < 2:
            raise _bad(field, v, "K, the number of classes, must be an integer >= 2")
        return int(v)
    if field == "n_per_class":
        if is_int(v):
            if v < 1:
                raise _bad(field, v, "n, the samples per class, must be an integer >= 1")
            return int(v)
        if isinstance(v, tuple) and len(v) >= 2 and all(is_int(x) and x >= 1 for x in v):
            return int(v[0]) if len(set(v)) == 1 else [int(x) for x in v]
        raise _bad(field, v, "expected n >= 1 or class sizes (n_1, ..., n_K), each >= 1")
    if field == "widths":
        if not (isinstance(v, tuple) and len(v) >= 1 and all(is_int(x) and x >= 1 for x in v)):
            raise _bad(field, v, "expected widths (d_1, ..., d_L) of positive integers")
        return [int(x) for x in v]
    if field == "width":
        if not is_int(v) or v < 1:
            raise _bad(field, v, "width d (all layers d_1 = ... = d_L = d) must be an integer >= 1")
        return int(v)
    if field == "L":
        if not is_int(v) or v < 1:
            raise _bad(field, v, "L, the number of weight matrices, must be an integer >= 1")
        return int(v)
    if field in ("activation", "loss", "bias", "method"):
        allowed = {"activation": ACTIVATIONS, "loss": LOSSES, "bias": BIASES, "method": METHODS}[field]
        if v not in allowed:
            extra = " (optax transformations cannot be stored; sweep over these names)" if field == "method" else ""
            raise _bad(field, v, f"must be one of {allowed}{extra}")
        return str(v)
    if field in ("lam_H", "lam_b", "lam", "lam_W", "label_smoothing", "tol"):
        vals = v if (field == "lam_W" and isinstance(v, tuple)) else (v,)
        for x in vals:
            if not is_num(x) or not math.isfinite(x) or x < 0:
                raise _bad(field, v, "must be a finite number >= 0")
        if field == "label_smoothing" and v >= 1:
            raise _bad(field, v, "label smoothing alpha must be in [0, 1)")
        return [float(x) for x in v] if isinstance(v, tuple) else float(v)
    if field in ("lr", "init_scale"):
        if not is_num(v) or not math.isfinite(v) or v <= 0:
            raise _bad(field, v, "must be a finite number > 0")
        return float(v)
    if field in ("max_steps", "patience"):
        if not is_int(v) or v < 1:
            raise _bad(field, v, "must be an integer >= 1")
        return int(v)
    if field in ("seed", "seeds"):
        if not is_int(v) or not 0 <= v <= SEED_MAX:
            raise _bad(field, v, f"a seed must be an integer in [0, {SEED_MAX}]")
        return int(v)
    if field == "dtype":
        if v not in ("float32", "float64"):
            raise _bad(field, v, "must be 'float32' or 'float64'")
        if v == "float64" and not x64:
            raise _bad(field, v, "float64 needs jax.config.update('jax_enable_x64', True) before any JAX call")
        return str(v)
    raise ValueError(f"unknown grid field {field!r}")  # pragma: no cover - filtered before


def _expand_one(grid: Mapping, x64: bool) -> list[dict]:
    if not isinstance(grid, Mapping):
        raise TypeError(
            f"a grid must be a dict of field -> value(s) or a list of such dicts; got {type(grid).__name__}"
        )
    unknown = [k for k in grid if k not in GRID_FIELDS]
    if unknown:
        raise ValueError(f"unknown grid field(s) {unknown}; the fields are {list(GRID_FIELDS)}")
    for alias, full in ALIASES.items():
        if alias in grid and full in grid:
            raise ValueError(f"grid sets both {alias!r} and {full!r}: they are the same field; keep one")
    if "seed" in grid and "seeds" in grid:
        raise ValueError("grid sets both 'seed' and 'seeds'; keep one")
    g = {ALIASES.get(k, k): v for k, v in grid.items()}
    if "widths" in g and ("width" in g or "L" in g):
        raise ValueError("grid sets 'widths' and 'width'/'L': give widths (d_1, ..., d_L) or width d with depth L")
    if ("width" in g) != ("L" in g):
        raise ValueError("grid field 'width' needs 'L' (and 'L' needs 'width'): widths = (width,) * L")
    if "lam" in g and ("lam_H" in g or "lam_W" in g):
        raise ValueError("grid sets 'lam' (= lam_H = lam_W) and also 'lam_H'/'lam_W'; keep one")
    for req, hint in (("num_classes", "K"), ("n_per_class", "n")):
        if req not in g:
            raise ValueError(f"grid must set {req!r} (or {hint!r})")
    if "widths" not in g and "width" not in g:
        raise ValueError("grid must set 'widths' (d_1, ..., d_L) or 'width' and 'L'")
    if "seeds" in g:
        g["seed"] = g.pop("seeds")
        seed_field = "seeds"
    else:
        seed_field = "seed"
    fields, lists = [], []
    for k, v in g.items():
        name = seed_field if k == "seed" else k
        vals = _field_values(name, v)
        canon = [_check_value(name, x, x64) for x in vals]
        fields.append(k)
        lists.append(canon)
    default_dtype = "float64" if x64 else "float32"
    runs = []
    for combo in itertools.product(*lists):
        c = dict(zip(fields, combo, strict=True))
        if "width" in c:
            c["widths"] = [c.pop("width")] * c.pop("L")
        if "lam" in c:
            c["lam_H"] = c["lam_W"] = c.pop("lam")
        for k, v in PROBLEM_DEFAULTS.items():
            c.setdefault(k, v)
        c.setdefault("method", "lbfgs")
        c.setdefault("dtype", default_dtype)
        c.setdefault("lr", float(DEFAULT_LR[c["method"]]))
        c.setdefault("max_steps", int(DEFAULT_MAX_STEPS[c["method"]]))
        c.setdefault("tol", float(default_tol(c["dtype"])))
        c.setdefault("patience", 50 if c["method"] == "lbfgs" else 1000)
        c.setdefault("seed", 0)
        if isinstance(c["lam_W"], list) and len(c["lam_W"]) != len(c["widths"]):
            raise ValueError(
                f"grid field 'lam_W' has an invalid value {c['lam_W']!r}: per-layer lam_W needs L={len(c['widths'])} "
                f"entries for widths {c['widths']}"
            )
        if isinstance(c["n_per_class"], list) and len(c["n_per_class"]) != c["num_classes"]:
            raise ValueError(
                f"grid field 'n_per_class' has an invalid value {c['n_per_class']!r}: class sizes need "
                f"K={c['num_classes']} entries"
            )
        if "init_scale" not in c:  # init_scale="auto" of ufm.solve for this problem
            K, n = c["num_classes"], c["n_per_class"]
            c["init_scale"] = float(
                auto_init_scale_for(
                    c["activation"],
                    len(c["widths"]),
                    num_classes=K,
                    class_sizes=n if isinstance(n, list) else [n] * K,
                    lam_H=c["lam_H"],
                    lam_W=c["lam_W"],
                    loss=c["loss"],
                    label_smoothing=c["label_smoothing"],
                )
            )
        runs.append({k: c[k] for k in CONFIG_FIELDS})
    return runs


def problem_of(config: Mapping) -> UFM:
    """The `ufm.UFM` of a run config (an `expand_grid` entry or a stored record's ``config``)."""
    n = config["n_per_class"]
    return UFM(
        num_classes=config["num_classes"],
        n_per_class=tuple(n) if isinstance(n, list) else n,
        widths=tuple(config["widths"]),
        activation=config["activation"],
        loss=config["loss"],
        bias=config["bias"],
        lam_H=config["lam_H"],
        lam_W=config["lam_W"],
        lam_b=config["lam_b"],
        label_smoothing=config["label_smoothing"],
    )


def run_id(config: Mapping) -> str:
    """The run's identity: the first 16 hex digits of sha256 of its canonical config (sorted-key JSON)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def expand_grid(grid: Mapping | Sequence[Mapping], *, x64: bool | None = None) -> list[dict]:
    """Expand a grid (a dict, or a list of dicts whose union is taken) into validated run configs.

    Each dict maps a field to one value or a list of values; the runs are the Cartesian product of the lists,
    with the last-listed field varying fastest. Fields:

    * problem: ``num_classes`` (alias ``K``), ``n_per_class`` (alias ``n``), ``widths`` (d_1, ..., d_L) or
      ``width`` d with depth ``L`` (widths = (d,) * L), ``activation``, ``loss``, ``bias``, ``lam_H``,
      ``lam_W`` (scalar or per layer), ``lam`` (sets lam_H = lam_W), ``lam_b``, ``label_smoothing``;
    * solver: ``method`` ("lbfgs", "gd", "momentum", "adam"), ``lr``, ``max_steps``, ``tol``, ``init_scale``,
      ``patience``, ``dtype`` ("float32"/"float64"), ``seed`` (a seed or a list) or ``seeds`` (S means 0..S-1).

    ``widths`` is itself a tuple: a flat list is ONE widths tuple and a list of lists sweeps widths.
    ``n_per_class`` and ``lam_W``: a flat list sweeps scalars, a list of lists sweeps per-class / per-layer tuples.
    A value may also be ``{"logspace": [a, b, num]}`` (10**linspace(a, b, num)), ``{"linspace": [a, b, num]}``
    or ``{"range": [start, stop]}``. Unset fields take the `UFM` / `solve` defaults, resolved into the config
    so every stored record is self-describing. Duplicate configs are run once.

    Raises ValueError/TypeError naming the field and the value before anything runs.
    """
    if x64 is None:
        x64 = bool(jax.config.read("jax_enable_x64"))
    grids = [grid] if isinstance(grid, Mapping) else list(grid) if isinstance(grid, (list, tuple)) else None
    if grids is None or not grids:
        raise TypeError(f"grid must be a dict of field -> value(s) or a non-empty list of dicts; got {grid!r}")
    out, seen, valid = [], set(), set()
    for g in grids:
        for c in _expand_one(g, x64):
            rid = run_id(c)
            if rid in seen:
                continue
            seen.add(rid)
            shown = {k: c[k] for k in PROBLEM_FIELDS}
            pkey = json.dumps(shown, sort_keys=True)
            if pkey not in valid:  # each distinct problem once: the remaining checks are the UFM constructor's
                try:
                    problem_of(c)
                except (ValueError, TypeError) as e:
                    raise ValueError(f"grid run {shown} is not a valid UFM: {e}") from None
                valid.add(pkey)
            out.append(c)
    return out
