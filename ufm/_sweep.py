"""Sweeps: thousands of UFM solves in a few compiled, device-sharded calls, saved run by run and resumable.

A *grid* names values for problem fields (K, n, widths or width x L, activation, loss, bias, lambdas,
label smoothing) and solver fields (method, lr, max_steps, tol, init_scale, patience, dtype, seed). It expands
to a list of runs (the Cartesian product of every listed field; a list of grids is the union). Runs that share
every *static* field (shapes, modes, method, step budget, dtype) and the two shared scalars (tol,
label_smoothing) form a group; a group runs through `ufm.solve_batch` in chunks of a fixed size, with batched
lam_H / lam_W / lam_b / lr / init_scale / PRNG keys, so new numbers never recompile. Each chunk is split across
all `jax.devices()` with `jax.shard_map` over a one-axis `Mesh` (NamedSharding inputs): one CPU, eight GPUs or
a TPU slice run the same code.

Every finished run becomes one JSON line in an append-only store (see `load_sweep`). The chunk layout is a
function of the grid and ``chunk_size`` alone, and every run uses the PRNG key ``jax.random.key(seed)``, so an
interrupted sweep that is resumed with the same grid recomputes unfinished chunks exactly as the uninterrupted
sweep would and skips the finished runs.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import itertools
import json
import math
import numbers
import os
import signal
import sys
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

from ._problem import ACTIVATIONS, BIASES, LOSSES, UFM
from ._solution import STATUS_NAMES, Solution
from ._solver import DEFAULT_LR, DEFAULT_MAX_STEPS, METHODS, default_tol, solve_batch

SCHEMA = 1
"""Version of the store layout; a store with another schema is refused."""

PROBLEM_FIELDS = ("num_classes", "n_per_class", "widths", "activation", "loss", "bias", "lam_H", "lam_W", "lam_b",
                  "label_smoothing")
SOLVER_FIELDS = ("method", "lr", "max_steps", "tol", "init_scale", "patience", "dtype", "seed")
CONFIG_FIELDS = PROBLEM_FIELDS + SOLVER_FIELDS
ALIASES = {"K": "num_classes", "n": "n_per_class"}
SHORTHANDS = ("width", "L", "lam", "seeds")
GRID_FIELDS = CONFIG_FIELDS + tuple(ALIASES) + SHORTHANDS
PROBLEM_DEFAULTS = dict(activation="linear", loss="mse", bias="none", lam_H=1e-3, lam_W=1e-3, lam_b=0.0,
                        label_smoothing=0.0)
_STATIC_FIELDS = ("num_classes", "n_per_class", "widths", "activation", "loss", "bias", "method", "max_steps",
                  "patience", "dtype")
_SHARED_FIELDS = ("tol", "label_smoothing")
_SEED_MAX = 2**31 - 1


# --------------------------------------------------------------------------------------------------------------
# grid expansion and validation
# --------------------------------------------------------------------------------------------------------------


def _bad(field: str, value: Any, why: str) -> ValueError:
    return ValueError(f"grid field {field!r} has an invalid value {value!r}: {why}")


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _is_seq(v) -> bool:
    return isinstance(v, (list, tuple)) or (isinstance(v, np.ndarray) and v.ndim >= 1)


def _spaced(field: str, v: Mapping) -> list:
    """``{"logspace": [a, b, num]}`` -> 10**linspace(a, b, num); ``{"linspace": [a, b, num]}``;
    ``{"range": [start, stop(, step)]}`` (integers)."""
    if len(v) != 1:
        raise _bad(field, dict(v), "a value table must have exactly one key: logspace, linspace or range")
    (kind, args), = v.items()
    if kind in ("logspace", "linspace"):
        if not (_is_seq(args) and len(args) == 3 and _is_num(args[0]) and _is_num(args[1]) and _is_int(args[2])
                and args[2] >= 1):
            raise _bad(field, dict(v), f"{kind} needs [start, stop, num] with an integer num >= 1")
        xs = np.linspace(float(args[0]), float(args[1]), int(args[2]))
        return [float(x) for x in (10.0**xs if kind == "logspace" else xs)]
    if kind == "range":
        if not (_is_seq(args) and 1 <= len(args) <= 3 and all(_is_int(a) for a in args)):
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
        if _is_int(v):
            return [(int(v),)]
        if _is_seq(v) and len(v) > 0 and all(_is_int(x) for x in v):
            return [tuple(int(x) for x in v)]
        if _is_seq(v) and len(v) > 0 and all(_is_seq(x) or _is_int(x) for x in v):
            return [(int(x),) if _is_int(x) else tuple(x) for x in v]
        raise _bad(field, v, "expected widths (d_1, ..., d_L), or a list of such tuples to sweep")
    if field == "seeds":
        if _is_int(v):
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
        if not _is_int(v) or v < 2:
            raise _bad(field, v, "K, the number of classes, must be an integer >= 2")
        return int(v)
    if field == "n_per_class":
        if _is_int(v):
            if v < 1:
                raise _bad(field, v, "n, the samples per class, must be an integer >= 1")
            return int(v)
        if isinstance(v, tuple) and len(v) >= 2 and all(_is_int(x) and x >= 1 for x in v):
            return int(v[0]) if len(set(v)) == 1 else [int(x) for x in v]
        raise _bad(field, v, "expected n >= 1 or class sizes (n_1, ..., n_K), each >= 1")
    if field == "widths":
        if not (isinstance(v, tuple) and len(v) >= 1 and all(_is_int(x) and x >= 1 for x in v)):
            raise _bad(field, v, "expected widths (d_1, ..., d_L) of positive integers")
        return [int(x) for x in v]
    if field == "width":
        if not _is_int(v) or v < 1:
            raise _bad(field, v, "width d (all layers d_1 = ... = d_L = d) must be an integer >= 1")
        return int(v)
    if field == "L":
        if not _is_int(v) or v < 1:
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
            if not _is_num(x) or not math.isfinite(x) or x < 0:
                raise _bad(field, v, "must be a finite number >= 0")
        if field == "label_smoothing" and v >= 1:
            raise _bad(field, v, "label smoothing alpha must be in [0, 1)")
        return [float(x) for x in v] if isinstance(v, tuple) else float(v)
    if field in ("lr", "init_scale"):
        if not _is_num(v) or not math.isfinite(v) or v <= 0:
            raise _bad(field, v, "must be a finite number > 0")
        return float(v)
    if field in ("max_steps", "patience"):
        if not _is_int(v) or v < 1:
            raise _bad(field, v, "must be an integer >= 1")
        return int(v)
    if field in ("seed", "seeds"):
        if not _is_int(v) or not 0 <= v <= _SEED_MAX:
            raise _bad(field, v, f"a seed must be an integer in [0, {_SEED_MAX}]")
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
        c.setdefault("init_scale", 1.0)
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
        runs.append({k: c[k] for k in CONFIG_FIELDS})
    return runs


def _problem(config: Mapping) -> UFM:
    n = config["n_per_class"]
    return UFM(
        num_classes=config["num_classes"], n_per_class=tuple(n) if isinstance(n, list) else n,
        widths=tuple(config["widths"]), activation=config["activation"], loss=config["loss"], bias=config["bias"],
        lam_H=config["lam_H"], lam_W=config["lam_W"], lam_b=config["lam_b"], label_smoothing=config["label_smoothing"],
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
        x64 = bool(jax.config.jax_enable_x64)
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
                    _problem(c)
                except (ValueError, TypeError) as e:
                    raise ValueError(f"grid run {shown} is not a valid UFM: {e}") from None
                valid.add(pkey)
            out.append(c)
    return out


# --------------------------------------------------------------------------------------------------------------
# grouping, chunking and the compiled, sharded runner
# --------------------------------------------------------------------------------------------------------------


def _group_key(c: Mapping) -> tuple:
    return tuple(json.dumps(c[k]) for k in _STATIC_FIELDS + _SHARED_FIELDS)


def _chunk_len(group_size: int, chunk_size: int, ndev: int) -> int:
    """Batch size for a group: min(chunk_size, next power of two >= group size), rounded up to a multiple of
    the device count. Small groups thus compile at most log2(chunk_size) sizes; large groups use one size."""
    b = min(chunk_size, 1 << max(0, math.ceil(math.log2(group_size))))
    return -(-max(b, ndev) // ndev) * ndev


def plan(configs: Sequence[Mapping], chunk_size: int, ndev: int = 1) -> list[tuple[tuple, list[int], int]]:
    """The chunk layout: a list of (group key, run indices, batch size), groups in order of first appearance.

    It depends only on the configs, ``chunk_size`` and the device count, never on which runs are finished,
    so a resumed sweep recomputes a chunk with exactly the inputs of the uninterrupted sweep."""
    groups: dict[tuple, list[int]] = {}
    for i, c in enumerate(configs):
        groups.setdefault(_group_key(c), []).append(i)
    chunks = []
    for key, idx in groups.items():
        b = _chunk_len(len(idx), chunk_size, ndev)
        for s in range(0, len(idx), b):
            chunks.append((key, idx[s:s + b], b))
    return chunks


_RUNNERS: dict[tuple, Any] = {}


def _runner(c0: Mapping, mesh: jax.sharding.Mesh):
    """One jitted, shard_mapped `solve_batch` per static configuration (cached; jax caches per batch size)."""
    key = (_group_key(c0)[: len(_STATIC_FIELDS)], tuple(d.id for d in mesh.devices.flat), mesh.axis_names)
    fn = _RUNNERS.get(key)
    if fn is not None:
        return fn
    P = jax.sharding.PartitionSpec
    method, max_steps, patience, dtype = c0["method"], c0["max_steps"], c0["patience"], c0["dtype"]

    def local(problem, seeds, lam_H, lam_W, lam_b, lr, init_scale, tol):
        keys = jax.vmap(jax.random.key)(seeds)
        sol = solve_batch(problem, keys=keys, lam_H=lam_H, lam_W=lam_W, lam_b=lam_b, lr=lr, init_scale=init_scale,
                          method=method, max_steps=max_steps, tol=tol, dtype=dtype, patience=patience,
                          history=False, history_every=max_steps)
        return sol._replace(history=None, snapshots=None)

    b = P("runs")
    fn = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P(), b, b, b, b, b, b, P()), out_specs=b,
                               check_vma=False))
    _RUNNERS[key] = fn
    return fn


def _global(x: np.ndarray, mesh, spec) -> jax.Array:
    """A global array from a host array every process holds in full (works single- and multi-host)."""
    sharding = jax.sharding.NamedSharding(mesh, spec)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def _to_host(tree):
    if jax.process_count() == 1:
        return jax.tree_util.tree_map(np.asarray, jax.device_get(tree))
    from jax.experimental import multihost_utils

    return jax.tree_util.tree_map(lambda a: np.asarray(multihost_utils.process_allgather(a, tiled=True)), tree)


def _dispatch(configs: Sequence[Mapping], idx: list[int], size: int, mesh):
    """Launch one chunk asynchronously; padded slots repeat the chunk's last run (same step count)."""
    P = jax.sharding.PartitionSpec
    rows = [configs[i] for i in idx] + [configs[idx[-1]]] * (size - len(idx))
    c0 = rows[0]
    fdt = np.float64 if c0["dtype"] == "float64" else np.float32
    L = len(c0["widths"])
    problem = _problem(c0)
    problem = jax.tree_util.tree_map(lambda x: _global(np.asarray(x, fdt), mesh, P()), problem)
    col = lambda k: _global(np.asarray([r[k] for r in rows], fdt), mesh, P("runs"))
    lam_W = np.asarray([np.broadcast_to(np.asarray(r["lam_W"], fdt), (L,)) for r in rows], fdt)
    args = (
        problem,
        _global(np.asarray([r["seed"] for r in rows], np.int32), mesh, P("runs")),
        col("lam_H"),
        _global(lam_W, mesh, P("runs")),
        col("lam_b"),
        col("lr"),
        col("init_scale"),
        _global(np.asarray(c0["tol"], fdt), mesh, P()),
    )
    return _runner(c0, mesh)(*args)


# --------------------------------------------------------------------------------------------------------------
# per-run summaries: ranks (NumPy, batched) and the optional theory / check / metrics tools
# --------------------------------------------------------------------------------------------------------------


def _ranks(config: Mapping, H, Ws, b, rtol: float, atol: float) -> dict:
    """Numerical ranks for a batch of solutions (leading axis B).

    rank(A) = #{ i : sigma_i(A) > max(rtol * sigma_1(A), atol) }, for
    ``H``: the class-mean matrices M_l (d_l x K, uncentred) of H_1..H_L; ``Z``: those of the pre-activations
    Z_2..Z_L (equal to ``H`` for linear models); ``W``: W_1..W_L; ``out``: the output class means (K x K).
    """
    K = config["num_classes"]
    n = config["n_per_class"]
    sizes = np.asarray(n if isinstance(n, list) else [n] * K)
    labels = np.repeat(np.arange(K), sizes)
    E = np.eye(K)[labels] / sizes  # N x K: A @ E = class means
    relu = config["activation"] == "relu"

    def rank(A):
        s = np.linalg.svd(np.asarray(A, np.float64), compute_uv=False)
        thr = np.maximum(rtol * s[..., :1], atol)
        return (s > thr).sum(-1)

    h = np.asarray(H, np.float64)
    Hr, Zr = [rank(h @ E)], []
    for W in Ws[:-1]:
        z = np.asarray(W, np.float64) @ h
        Zr.append(rank(z @ E))
        h = np.maximum(z, 0) if relu else z
        Hr.append(rank(h @ E))
    out = np.asarray(Ws[-1], np.float64) @ h
    if b is not None:
        out = out + np.asarray(b, np.float64)[:, :, None]
    B = h.shape[0]
    Wr = [rank(W) for W in Ws]
    return [
        {"H": [int(r[i]) for r in Hr], "Z": [int(r[i]) for r in Zr], "W": [int(r[i]) for r in Wr],
         "out": int(rank(out @ E)[i])}
        for i in range(B)
    ]


def _jsonable(x: Any) -> Any:
    """Plain JSON: dicts, lists, finite floats (non-finite -> None), ints, bools, strings."""
    if x is None or isinstance(x, (bool, str)):
        return x
    if hasattr(x, "to_dict") and callable(x.to_dict):
        return _jsonable(x.to_dict())
    if isinstance(x, tuple) and hasattr(x, "_asdict"):
        return _jsonable(x._asdict())
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (jax.Array, np.ndarray, np.generic)):
        a = np.asarray(x)
        if a.dtype == bool:
            return a.tolist()
        if np.issubdtype(a.dtype, np.integer):
            return a.tolist()
        if np.issubdtype(a.dtype, np.floating):
            return _jsonable(a.tolist())
        return str(a.tolist())
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if _is_int(x):
        return int(x)
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    return str(x)


class _Tools(NamedTuple):
    predict: Any
    check: Any
    layer_metrics: Any


def _tools() -> _Tools:
    """The optional modules (theory, checks, metrics); a module that does not exist yet is recorded as
    unavailable (its record fields are null). Errors inside an existing module are not hidden."""

    def get(mod, name):
        try:
            m = __import__(f"ufm.{mod}", fromlist=[name])
        except ModuleNotFoundError as e:
            if e.name == f"ufm.{mod}":
                return None
            raise
        return getattr(m, name, None)

    return _Tools(get("_theory", "predict"), get("_checks", "check"), get("metrics", "layer_metrics"))


_CHECK_DUPLICATES = ("prediction", "metrics", "problem")


def _call_check(check, problem, sol, prediction, settings: Mapping):
    """``ufm.check`` without its second-order certificate unless asked (``hessian``), without its own copy of
    the layer metrics (the record has them), with the sweep's ``check_options``."""
    kw = _call_kw_names(check, hessian=settings["second_order"], metrics=False)
    report = check(problem, sol, prediction, **kw, **settings["check_options"])
    d = _jsonable(report)
    if isinstance(d, dict):
        d = {k: v for k, v in d.items() if k not in _CHECK_DUPLICATES}
    return getattr(report, "verdict", None), d


def _call_kw_names(fn, **kw) -> dict:
    import inspect

    params = inspect.signature(fn).parameters
    return {k: v for k, v in kw.items() if k in params}


def _call_kw(fn, *args, **kw):
    """Call ``fn`` with those keyword options it accepts."""
    return fn(*args, **_call_kw_names(fn, **kw))


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


def _records(configs, idx, ids, host, tools: _Tools, settings: Mapping, pred_cache: dict, wall: float) -> list[dict]:
    params, value, grad_norm, num_steps, status = host
    c0 = configs[idx[0]]
    ranks = _ranks(c0, params.H, params.Ws, params.b, settings["rank_rtol"], settings["rank_atol"])
    out = []
    for j, i in enumerate(idx):
        c = configs[i]
        loss = float(value[j])
        rec: dict[str, Any] = {
            "run": ids[i], "index": i, "config": c,
            "loss": loss if math.isfinite(loss) else None,
            "grad_norm": float(grad_norm[j]) if math.isfinite(float(grad_norm[j])) else None,
            "num_steps": int(num_steps[j]), "status": STATUS_NAMES[int(status[j])],
            "success": bool(int(status[j]) == 0),
            "ranks": ranks[j],
        }
        errors = {}
        problem = _problem(c) if any(tools) else None
        prediction = None
        if tools.predict is not None:
            pkey = json.dumps({k: c[k] for k in PROBLEM_FIELDS}, sort_keys=True)
            if pkey not in pred_cache:
                try:
                    pred_cache[pkey] = (tools.predict(problem), None)
                except Exception as e:  # recorded per run, never hidden
                    pred_cache[pkey] = (None, _error(e))
            prediction, perr = pred_cache[pkey]
            if perr:
                errors["predict"] = perr
        rec["prediction"] = _jsonable(prediction) if prediction is not None else None
        ploss = getattr(prediction, "loss", None)
        ploss = float(ploss) if ploss is not None and math.isfinite(float(ploss)) else None
        if ploss is not None and rec["loss"] is not None:  # the definitions of ufm.check's Report.gap
            rec["gap"] = (loss - ploss) / max(abs(ploss), np.finfo(np.float64).tiny)
            rec["gap_abs"] = loss - ploss
        else:
            rec["gap"] = rec["gap_abs"] = None
        sol = None
        if tools.check is not None or tools.layer_metrics is not None:
            p_j = jax.tree_util.tree_map(lambda a, j=j: a[j], params)
            sol = Solution(p_j, value[j], grad_norm[j], num_steps[j], status[j])
        rec["verdict"] = rec["check"] = None
        if tools.check is not None:
            try:
                rec["verdict"], rec["check"] = _call_check(tools.check, problem, sol, prediction, settings)
            except Exception as e:
                errors["check"] = _error(e)
        rec["metrics"] = None
        if tools.layer_metrics is not None:
            try:
                rec["metrics"] = _jsonable(_call_kw(tools.layer_metrics, problem, sol.params,
                                                    rank_rtol=settings["rank_rtol"]))
            except Exception as e:
                errors["metrics"] = _error(e)
        rec["errors"] = errors or None
        rec["wall_s"] = wall
        out.append(rec)
    return out


# --------------------------------------------------------------------------------------------------------------
# the store: one header line, then one JSON line per run, appended atomically per chunk
# --------------------------------------------------------------------------------------------------------------


class IncompatibleStoreError(ValueError):
    """The store was written by a different sweep (grid, settings or versions); it is never mixed."""


@contextlib.contextmanager
def _defer_sigint():
    """Hold Ctrl-C while a chunk's records are written, so a write is never cut by KeyboardInterrupt."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got = []
    old = signal.signal(signal.SIGINT, lambda s, f: got.append(s))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)
        if got:
            raise KeyboardInterrupt


def _read_lines(path: str) -> tuple[list[dict], int, int]:
    """Parse a store: (objects, byte length of the complete lines, number of torn trailing bytes).

    A final line without its newline is a write cut short (a killed process): it is not a record. Any other
    unreadable line is corruption and raises."""
    with open(path, "rb") as f:
        data = f.read()
    end = data.rfind(b"\n") + 1
    objs = []
    for lineno, line in enumerate(data[:end].splitlines(), 1):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(
                f"sweep store {path!r} line {lineno} is corrupt ({e}); it was not written by ufm.sweep"
            ) from None
        if not isinstance(obj, dict):
            raise ValueError(f"sweep store {path!r} line {lineno} is not a JSON object")
        objs.append(obj)
    return objs, end, len(data) - end


def _read_store(path: str) -> tuple[dict, list[dict], int, int]:
    objs, end, torn = _read_lines(path)
    if not objs or objs[0].get("ufm_sweep") is None:
        raise ValueError(f"{path!r} is not a ufm sweep store (its first line is not a ufm_sweep header)")
    header, recs = objs[0], objs[1:]
    seen = set()
    for r in recs:
        if "run" not in r or "index" not in r:
            raise ValueError(f"sweep store {path!r} holds a line that is not a run record: {str(r)[:120]}")
        if r["run"] in seen:
            raise ValueError(f"sweep store {path!r} holds run {r['run']} twice; it was written by two sweeps at once")
        seen.add(r["run"])
    return header, recs, end, torn


def _fingerprint(ids: Sequence[str], settings: Mapping) -> dict:
    return {
        "schema": SCHEMA,
        "n_runs": len(ids),
        "runs_sha256": hashlib.sha256("\n".join(ids).encode()).hexdigest(),
        "settings": dict(settings),
        "versions": _versions(),
    }


def _versions() -> dict:
    from . import __version__

    return {"ufm": __version__, "jax": jax.__version__, "numpy": np.__version__}


def _compare(path: str, old: Mapping, new: Mapping) -> None:
    diffs = []
    if old.get("ufm_sweep") != SCHEMA:
        diffs.append(f"store schema {old.get('ufm_sweep')} != {SCHEMA}")
    fp = old.get("fingerprint", {})
    if fp.get("n_runs") != new["n_runs"] or fp.get("runs_sha256") != new["runs_sha256"]:
        diffs.append(f"the grid differs (store: {fp.get('n_runs')} runs, this sweep: {new['n_runs']} runs, "
                     "or the same count with other configs)")
    for k in sorted(set(fp.get("settings", {})) | set(new["settings"])):
        a, b = fp.get("settings", {}).get(k), new["settings"].get(k)
        if a != b:
            diffs.append(f"setting {k}: store {a!r}, this sweep {b!r}")
    for k in sorted(set(fp.get("versions", {})) | set(new["versions"])):
        a, b = fp.get("versions", {}).get(k), new["versions"].get(k)
        if a != b:
            diffs.append(f"{k} version: store {a}, now {b}")
    if diffs:
        raise IncompatibleStoreError(
            f"sweep store {path!r} was written by an incompatible sweep and will not be mixed: " + "; ".join(diffs)
            + ". Use a new store path (or delete this one to start over)."
        )


class _Store:
    """Append-only JSON-lines store with an exclusive lock; each chunk is one write() + fsync."""

    def __init__(self, path: str, header: dict):
        self.path = os.fspath(path)
        self.fd = None
        if not os.path.exists(self.path):
            self._create(header)
        self.fd = os.open(self.path, os.O_RDWR | os.O_APPEND)
        try:
            try:
                import fcntl

                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except ImportError:  # pragma: no cover - non-POSIX: no lock
                pass
            except OSError:
                raise IncompatibleStoreError(f"sweep store {self.path!r} is locked by another running sweep") from None
            old, recs, end, torn = _read_store(self.path)  # read under the lock
            _compare(self.path, old, header["fingerprint"])
        except BaseException:
            self.close()
            raise
        self.header = old
        self.done = {r["run"]: r for r in recs}
        if torn:
            os.ftruncate(self.fd, end)  # drop a line cut short by a killed process; its run is redone

    def _create(self, header: dict) -> None:
        """Write the header to a temporary file and link it into place: the store exists complete or not at all."""
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        tmp = f"{self.path}.tmp{os.getpid()}"
        try:
            with open(tmp, "wb") as f:
                f.write((json.dumps(header, separators=(",", ":")) + "\n").encode())
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, self.path)  # fails if another sweep created the store meanwhile
            except FileExistsError:
                pass
            except OSError:  # pragma: no cover - file systems without hard links
                if not os.path.exists(self.path):
                    os.replace(tmp, self.path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def append(self, records: list[dict]) -> None:
        data = "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records).encode()
        with _defer_sigint():
            view = memoryview(data)
            while view:
                n = os.write(self.fd, view)
                view = view[n:]
            os.fsync(self.fd)

    def close(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


# --------------------------------------------------------------------------------------------------------------
# progress
# --------------------------------------------------------------------------------------------------------------


def _fmt_time(s: float) -> str:
    if not math.isfinite(s):
        return "--:--"
    s = int(round(s))
    h, m = divmod(s, 3600)
    m, s = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class _Progress:
    """``sweep [#####-----] 120/1000 runs  3.2 runs/s  04:35 left`` on stderr (runs/s counts this session)."""

    def __init__(self, total: int, done: int, stream, enabled: bool):
        self.total, self.done, self.stream, self.enabled = total, done, stream, enabled
        self.t0 = time.perf_counter()
        self.new = 0
        self.status = ""
        self.width = 0
        self.draw()

    def note(self, status: str):
        """A short status after the counters (e.g. "compiling K=3 widths=(4, 4)"); "" clears it."""
        self.status = status
        self.draw()

    def update(self, n: int):
        self.done += n
        self.new += n
        self.draw()

    def line(self) -> str:
        dt = time.perf_counter() - self.t0
        rate = self.new / dt if dt > 0 and self.new else float("nan")
        left = (self.total - self.done) / rate if rate == rate and rate > 0 else float("nan")
        width = 24
        fill = int(width * self.done / max(self.total, 1))
        rate_s = f"{rate:.3g} runs/s" if rate == rate else "- runs/s"
        line = (f"sweep [{'#' * fill}{'-' * (width - fill)}] {self.done}/{self.total} runs  {rate_s}  "
                f"{_fmt_time(left)} left")
        return f"{line}  {self.status}" if self.status else line

    def draw(self):
        if self.enabled:
            line = self.line()
            self.stream.write("\r" + line + " " * max(0, self.width - len(line)))  # erase a longer old line
            self.width = len(line)
            self.stream.flush()

    def close(self):
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()


# --------------------------------------------------------------------------------------------------------------
# the public API
# --------------------------------------------------------------------------------------------------------------


class SweepResult(NamedTuple):
    """Result of `sweep`.

    Attributes:
      records: one dict per run of the grid, in grid order (those already in the store included).
      path: the store path, or None for an in-memory sweep.
      num_runs: runs in the grid (after removing duplicate configs).
      num_new: runs computed by this call.
      num_skipped: runs found finished in the store and not recomputed.
      num_chunks: compiled batched calls made by this call.
      header: the store header (grid, settings, versions).
      num_devices: devices the chunks were split over.
    """

    records: list
    path: str | None
    num_runs: int
    num_new: int
    num_skipped: int
    num_chunks: int
    header: dict
    num_devices: int = 1

    def columns(self) -> dict[str, np.ndarray]:
        """The records as a dict of NumPy columns (see `load_sweep`)."""
        return to_columns(self.records)


def _mesh(devices) -> jax.sharding.Mesh:
    if devices is None:
        devices = jax.devices()
    elif _is_int(devices):
        all_d = jax.devices()
        if not 1 <= devices <= len(all_d):
            raise ValueError(f"devices must be between 1 and {len(all_d)} (jax.devices()); got {devices}")
        devices = all_d[:devices]
    devices = list(devices)
    if not devices:
        raise ValueError("devices must name at least one device")
    return jax.sharding.Mesh(np.asarray(devices, dtype=object), ("runs",))


def sweep(
    grid: Mapping | Sequence[Mapping],
    store: str | os.PathLike | None = None,
    *,
    chunk_size: int = 64,
    devices=None,
    progress: bool | None = None,
    second_order: bool = False,
    check_options: Mapping[str, Any] | None = None,
    metrics: bool = True,
    rank_rtol: float = 1e-4,
    rank_atol: float = 1e-8,
) -> SweepResult:
    """Solve every run of a grid in batched, compiled, device-sharded calls; save each run as it finishes.

    Runs that share shapes and static solver options are solved together by `ufm.solve_batch` (one ``vmap``ped
    compiled call per chunk), with per-run lam_H, lam_W, lam_b, lr, init_scale and PRNG key
    ``jax.random.key(seed)`` (the key `ufm.solve(problem, key=seed)` uses). Chunks have a fixed size (groups
    smaller than ``chunk_size`` use the next power of two), the last one padded, so only shapes and static
    options compile. Each chunk is split over ``devices`` (default: all of `jax.devices()`) with `jax.shard_map`
    on a one-axis mesh. Results do not depend on the device count beyond round-off (XLA may order the sums
    of a batch-of-1 product differently; measured: equal to 1e-12 relative on 1 vs 4 CPU devices). A resumed
    sweep recomputes each unfinished chunk with the same inputs, so it equals the uninterrupted one bit for bit
    on the same devices.

    Each run becomes one record (a JSON-friendly dict):

    * ``run`` (sha256-based id of the config), ``index`` (position in the grid), ``config`` (every field);
    * ``loss`` (the final objective f), ``grad_norm``, ``num_steps``, ``status`` (as `Solution.status_name`),
      ``success``;
    * ``prediction`` (``ufm.predict(problem).to_dict()``; its ``loss`` is f*, an upper bound where ``known`` is
      False), ``gap`` = (f - f*)/|f*| (the definition of `ufm.check`'s ``Report.gap``) and ``gap_abs`` = f - f*;
    * ``verdict`` ("matches", "local-min", "saddle", "below-prediction", "not-converged", "no-prediction") and
      ``check``: ``ufm.check(problem, solution, prediction).to_dict()`` without the fields the record already
      holds (prediction, metrics, problem). The Hessian certificate is off unless ``second_order=True``, so
      "matches"/"local-min" then mean first-order stationary;
    * ``metrics``: ``ufm.metrics.layer_metrics(problem, params)`` (NC1-NC4 and DNC per layer, spectra);
    * ``ranks``: numerical ranks of the class means of H_1..H_L (``H``), of Z_2..Z_L (``Z``), of W_1..W_L
      (``W``) and of the output (``out``): rank(A) = #{i : sigma_i(A) > max(rank_rtol sigma_1(A), rank_atol)};
    * ``errors`` (a dict of tool -> message when predict/check/metrics raised for this run, else null),
      ``wall_s`` (approximate wall time per run of its chunk; the only field that is not deterministic).

    Fields whose tool is not installed are null (the store header lists the tools under ``settings.tools``).

    Args:
      grid: a dict of field -> value(s), or a list of such dicts (see `expand_grid` for the fields).
      store: path of a JSON-lines store. Finished runs are appended after every chunk; an existing store of the
        same sweep is resumed (finished runs are skipped); a store of a different sweep (grid, settings or
        library versions) raises `IncompatibleStoreError`. None keeps the records in memory only.
      chunk_size: runs per compiled call (rounded up to a multiple of the device count).
      devices: a list of devices or a number of them (default: all of `jax.devices()`).
      progress: draw a progress bar on stderr (default: only when stderr is a terminal).
      second_order: ask `ufm.check` for its second-order (Hessian) certificate (about 10x the cost of the
        first-order check per run, plus a compile per shape).
      check_options: more keyword options of `ufm.check` (``gap_tol``, ``grad_tol``, ``hess_rtol``, ...).
      metrics: store ``ufm.metrics.layer_metrics`` per run (a few kB of JSON per run; off: ``metrics`` is null).
      rank_rtol, rank_atol: rank thresholds (above).

    Returns:
      `SweepResult` with ``records`` for every run of the grid.

    Multi-host (not tested here: no multi-host machine): call ``jax.distributed.initialize()`` on every host
    first and run the same script everywhere; `jax.devices()` then spans all hosts and every chunk is split over
    all of them. Process 0 alone reads and writes the store and broadcasts which runs are finished; the other
    processes return only the records they computed in this call (load the store for all of them).
    """
    configs = expand_grid(grid)
    if not _is_int(chunk_size) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an integer >= 1; got {chunk_size!r}")
    for name, v in (("second_order", second_order), ("metrics", metrics)):
        if not isinstance(v, bool):
            raise TypeError(f"{name} must be True or False; got {v!r}")
    if progress is not None and not isinstance(progress, bool):
        raise TypeError(f"progress must be None, True or False; got {progress!r}")
    for name, v in (("rank_rtol", rank_rtol), ("rank_atol", rank_atol)):
        if not _is_num(v) or not math.isfinite(v) or v < 0:
            raise ValueError(f"{name} must be a finite number >= 0; got {v!r}")
    mesh = _mesh(devices)
    ndev = mesh.devices.size
    tools = _tools()
    if not metrics:
        tools = tools._replace(layer_metrics=None)
    check_options = dict(check_options or {})
    if check_options:
        if tools.check is None:
            raise ValueError("check_options given, but ufm.check is not available in this installation")
        import inspect

        accepted = set(inspect.signature(tools.check).parameters) - {"problem", "solution", "prediction", "hessian",
                                                                     "metrics"}
        unknown = sorted(set(check_options) - accepted)
        if unknown:
            raise ValueError(f"check_options has unknown option(s) {unknown}; ufm.check accepts {sorted(accepted)}")
    settings = {
        "chunk_size": int(chunk_size), "second_order": bool(second_order), "rank_rtol": float(rank_rtol),
        "rank_atol": float(rank_atol), "x64": bool(jax.config.jax_enable_x64),
        "check_options": _jsonable(check_options),
        "tools": {name: fn is not None for name, fn in tools._asdict().items()},
    }
    ids = [run_id(c) for c in configs]
    header = {
        "ufm_sweep": SCHEMA,
        "fingerprint": _fingerprint(ids, settings),
        "grid": _jsonable(grid),
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    writer = jax.process_index() == 0
    st = _Store(store, header) if store is not None and writer else None
    try:
        done = dict(st.done) if st is not None else {}
        finished = np.asarray([i in done for i in ids], bool)
        if jax.process_count() > 1:  # every process must run the same chunks (they are collective)
            from jax.experimental import multihost_utils

            finished = np.asarray(multihost_utils.broadcast_one_to_all(finished), bool)
        chunks = [ch for ch in plan(configs, chunk_size, ndev) if not finished[ch[1]].all()]
        skipped = int(finished.sum())
        if progress is None:
            progress = bool(getattr(sys.stderr, "isatty", lambda: False)())
        bar = _Progress(len(configs), skipped, sys.stderr, bool(progress) and writer)
        pred_cache: dict = {}
        compiled: set = set()
        new = 0
        pending = None  # (chunk, future, t0): the next chunk is dispatched before this one is written
        try:
            for k in range(len(chunks) + 1):
                nxt = None
                if k < len(chunks):
                    key, idx, size = chunks[k]
                    if (key, size) not in compiled:  # jit traces and compiles inside this first call
                        c = configs[idx[0]]
                        bar.note(f"compiling K={c['num_classes']} widths={tuple(c['widths'])} {c['method']} "
                                 f"batch {size}")
                    nxt = (chunks[k], _dispatch(configs, idx, size, mesh), time.perf_counter())
                    if (key, size) not in compiled:
                        compiled.add((key, size))
                        bar.note("")
                if pending is not None:
                    (_, idx, _), fut, t0 = pending
                    sol = _to_host((fut.params, fut.value, fut.grad_norm, fut.num_steps, fut.status))
                    wall = (time.perf_counter() - t0) / len(idx)
                    todo = np.asarray([j for j, i in enumerate(idx) if not finished[i]])  # drops padding too
                    sol = jax.tree_util.tree_map(lambda a, todo=todo: a[todo], sol)
                    recs = _records(configs, [idx[j] for j in todo], ids, sol, tools, settings, pred_cache, wall)
                    if st is not None:
                        st.append(recs)
                    for r in recs:
                        done[r["run"]] = r
                    new += len(recs)
                    bar.update(len(recs))
                pending = nxt
        finally:
            bar.close()
        records = [done[i] for i in ids if i in done]
        return SweepResult(records, None if store is None else os.fspath(store), len(configs), new, skipped,
                           len(chunks), st.header if st is not None else header, ndev)
    finally:
        if st is not None:
            st.close()


def to_columns(records: Sequence[Mapping]) -> dict[str, np.ndarray]:
    """Records as NumPy columns: nested dicts are flattened with dots (``config.lam_H``, ``ranks.H``,
    ``prediction.loss``). Numbers become float64 (null -> NaN) or int64 columns, booleans bool, strings str,
    equal-length lists of numbers 2-D int64 / float64 arrays (``ranks.H``: runs x layers); anything else (lists
    of dicts, ragged lists, mixed types) an object array. A field that is null in every record is a NaN column."""
    flat = []

    def walk(f, prefix, v):
        if isinstance(v, Mapping):
            for k, x in v.items():
                walk(f, f"{prefix}.{k}" if prefix else str(k), x)
        else:
            f[prefix] = v

    for r in records:
        f: dict[str, Any] = {}
        walk(f, "", r)
        flat.append(f)
    keys: list[str] = []
    for f in flat:
        keys.extend(k for k in f if k not in keys)
    cols = {}
    for k in keys:
        vals = [f.get(k) for f in flat]
        present = [v for v in vals if v is not None]
        if not present:
            cols[k] = np.full(len(vals), np.nan)
        elif all(isinstance(v, bool) for v in present) and len(present) == len(vals):
            cols[k] = np.asarray(vals, bool)
        elif present and all(_is_int(v) for v in present) and len(present) == len(vals):
            cols[k] = np.asarray(vals, np.int64)
        elif present and all(_is_num(v) for v in present):
            cols[k] = np.asarray([np.nan if v is None else v for v in vals], np.float64)
        elif present and all(isinstance(v, str) for v in present) and len(present) == len(vals):
            cols[k] = np.asarray(vals, str)
        else:
            arr = None
            if len(present) == len(vals) and all(isinstance(v, list) for v in vals):
                items = [x for v in vals for x in v]
                dt = np.int64 if all(_is_int(x) for x in items) else np.float64
                try:
                    arr = np.asarray(vals, dt) if all(_is_num(x) for x in items) else None
                except (ValueError, TypeError):
                    arr = None
                if arr is not None and arr.ndim != 2:
                    arr = None
            if arr is None:
                arr = np.empty(len(vals), object)
                arr[:] = vals
            cols[k] = arr
    return cols


def load_sweep(path: str | os.PathLike, *, columns: bool = False, header: bool = False):
    """Load a sweep store written by `sweep` / ``ufm sweep``.

    Returns the run records (a list of dicts, in grid order), or with ``columns=True`` a dict of NumPy columns
    (`to_columns`: ``cols["config.lam_H"]``, ``cols["loss"]``, ``cols["ranks.H"]``). With ``header=True`` the
    result is ``(header, records_or_columns)``; the header holds the grid, settings and library versions.

    The store is JSON lines: line 1 the header, then one self-contained record per run, appended in one
    write per chunk. A final line without its newline is a write cut short by a killed process and is not a
    record (the run is redone on resume); any other unreadable line raises ValueError.

    Example:
      >>> runs = ufm.load_sweep("sweep.jsonl")                  # doctest: +SKIP
      >>> cols = ufm.load_sweep("sweep.jsonl", columns=True)    # doctest: +SKIP
    """
    hdr, recs, _, _ = _read_store(os.fspath(path))
    recs = sorted(recs, key=lambda r: r["index"])
    out = to_columns(recs) if columns else recs
    return (hdr, out) if header else out


# --------------------------------------------------------------------------------------------------------------
# command line: ufm sweep CONFIG
# --------------------------------------------------------------------------------------------------------------


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise _UsageError(message)


def _load_config(path: str) -> dict:
    if not os.path.isfile(path):
        raise _UsageError(f"config file {path!r} not found")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        if path.endswith(".toml"):
            import tomllib

            cfg = tomllib.loads(raw.decode())
        else:
            cfg = json.loads(raw)
    except Exception as e:
        kind = "TOML" if path.endswith(".toml") else "JSON"
        raise _UsageError(f"config file {path!r} is not valid {kind}: {e}") from None
    if not isinstance(cfg, dict) or "grid" not in cfg:
        raise _UsageError(f"config file {path!r} must be a table with a 'grid' entry (a table or a list of tables)")
    allowed = {"grid", "store", "chunk_size", "second_order", "check_options", "metrics", "rank_rtol", "rank_atol",
               "x64", "devices"}
    unknown = sorted(set(cfg) - allowed)
    if unknown:
        raise _UsageError(f"config file {path!r} has unknown entries {unknown}; allowed: {sorted(allowed)}")
    return cfg


_EPILOG = """config file (TOML or JSON):
  store = "phase.jsonl"          # default: CONFIG with .jsonl, next to CONFIG
  chunk_size = 64                # runs per compiled call
  [grid]                         # a list = a swept field; the runs are the product
  K = 2
  n = 5
  width = 8                      # widths = (width,) * L
  L = [2, 3]
  activation = "relu"
  lam = {logspace = [-3, -1.5, 4]}   # lam_H = lam_W = 10**linspace(-3, -1.5, 4)
  seeds = 4                      # seeds 0..3
  max_steps = 2000
other entries: second_order, check_options (a table for ufm.check), metrics, rank_rtol, rank_atol, devices,
x64 (default true)"""


def sweep_main(argv: Sequence[str] | None = None) -> int:
    """``ufm sweep CONFIG [--store PATH] [--chunk-size N] [--devices N] [--progress/--no-progress]
    [--second-order] [--compile-cache DIR]``.

    CONFIG is a JSON or TOML file with ``grid`` (a table of field -> value(s), or a list of tables) and optional
    ``store`` (default: CONFIG with the extension ``.jsonl``; relative paths are relative to CONFIG's folder),
    ``chunk_size``, ``second_order``, ``rank_rtol``, ``rank_atol``, ``devices``, ``x64`` (default true: float64).
    Run the same command again to resume an interrupted sweep.

    Returns 0 on success, 2 for bad input (one line on stderr), 130 when interrupted (finished runs are saved).
    """
    parser = _Parser(
        prog="ufm sweep",
        description="Run a grid of UFM solves into a resumable JSON-lines store. Run the same command again to "
        "resume after an interruption (finished runs are skipped).",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("config", help="JSON or TOML file with a 'grid' table")
    parser.add_argument("--store", help="store path (overrides the config's 'store')")
    parser.add_argument("--chunk-size", type=int, help="runs per compiled call")
    parser.add_argument("--devices", type=int, help="use the first N of jax.devices()")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="progress bar on stderr (default: when stderr is a terminal)")
    parser.add_argument("--second-order", action="store_true", default=None,
                        help="ask ufm.check for its second-order (Hessian) certificate")
    parser.add_argument("--compile-cache", help="persistent JAX compilation cache folder (faster restarts)")
    try:
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
        cfg = _load_config(args.config)
        x64 = cfg.get("x64", True)
        if not isinstance(x64, bool):
            raise _UsageError(f"config entry 'x64' must be true or false; got {x64!r}")
        jax.config.update("jax_enable_x64", x64)
        if args.compile_cache:
            jax.config.update("jax_compilation_cache_dir", args.compile_cache)
            jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        base = os.path.dirname(os.path.abspath(args.config))
        store = args.store or cfg.get("store") or os.path.splitext(os.path.basename(args.config))[0] + ".jsonl"
        if not isinstance(store, str):
            raise _UsageError(f"config entry 'store' must be a path string; got {store!r}")
        if not args.store:
            store = os.path.join(base, store)
        kw = dict(
            chunk_size=args.chunk_size if args.chunk_size is not None else cfg.get("chunk_size", 64),
            devices=args.devices if args.devices is not None else cfg.get("devices"),
            progress=args.progress,
            second_order=bool(args.second_order) if args.second_order is not None else cfg.get("second_order", False),
            rank_rtol=cfg.get("rank_rtol", 1e-4),
            metrics=cfg.get("metrics", True),
            check_options=cfg.get("check_options"),
            rank_atol=cfg.get("rank_atol", 1e-8),
        )
        for name in ("second_order", "metrics"):
            if not isinstance(kw[name], bool):
                raise _UsageError(f"config entry {name!r} must be true or false; got {kw[name]!r}")
        res = sweep(cfg["grid"], store, **kw)
    except _UsageError as e:
        print(f"ufm sweep: error: {e}", file=sys.stderr)
        return 2
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"ufm sweep: error: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:  # --help
        return int(e.code or 0) if not isinstance(e.code, str) else 2
    except KeyboardInterrupt:
        n = _count_records(store)
        print(f"ufm sweep: interrupted; {n} finished runs are saved in {store}; run the same command to resume",
              file=sys.stderr)
        return 130
    verdicts: dict[str, int] = {}
    for r in res.records:
        v = r.get("verdict") or r.get("status")
        verdicts[str(v)] = verdicts.get(str(v), 0) + 1
    summary = ", ".join(f"{k} {v}" for k, v in sorted(verdicts.items()))
    print(f"ufm sweep: {res.num_runs} runs ({res.num_new} new, {res.num_skipped} already saved) on "
          f"{res.num_devices} device(s) in {res.path}: {summary}")
    return 0


def _count_records(store: str) -> int:
    try:
        return len(_read_store(store)[1])
    except Exception:
        return 0


def rerun(record: Mapping) -> tuple[UFM, Solution]:
    """Re-solve one stored run with `ufm.solve` (same problem, solver options and key ``jax.random.key(seed)``)
    to get its parameters, which the store does not keep. Returns ``(problem, solution)``; the solution equals
    the sweep's run to round-off (the batched and the single solve may order sums differently).

    Example:
      >>> problem, sol = rerun(ufm.load_sweep("sweep.jsonl")[17])   # doctest: +SKIP
    """
    from ._solver import solve

    c = record["config"] if "config" in record else record
    problem = _problem(c)
    sol = solve(problem, key=int(c["seed"]), method=c["method"], lr=c["lr"], max_steps=c["max_steps"], tol=c["tol"],
                init_scale=c["init_scale"], dtype=c["dtype"], patience=c["patience"], history=False)
    return problem, sol


def iter_fields(records: Iterable[Mapping], field: str) -> list:
    """The value of ``field`` in each record: a config field (``lam_H``, ``num_classes``), the derived ``L``
    (depth, len(widths)) and ``width`` (d_1 when all widths are equal, else the widths tuple), or a dotted path
    into the record (``ranks.out``, ``prediction.loss``, ``metrics.nc1``)."""
    out = []
    for r in records:
        c = r.get("config", {})
        if field == "L":
            out.append(len(c["widths"]))
        elif field == "width":
            w = c["widths"]
            out.append(w[0] if len(set(w)) == 1 else tuple(w))
        elif field in c:
            v = c[field]
            out.append(tuple(v) if isinstance(v, list) else v)
        else:
            v: Any = r
            for part in field.split("."):
                v = v.get(part) if isinstance(v, Mapping) else None
            out.append(tuple(v) if isinstance(v, list) else v)
    return out

