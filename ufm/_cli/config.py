"""``ufm solve``'s configuration: built-in defaults <- a ``--config`` file <- the command line.

`read_config_data` reads a TOML/JSON file (shared with ``ufm explore``), `load_config_file` sorts its fields into
problem and solver, `check_solver` validates the solver's, and `resolve_config` merges the three sources into a
`ufm.UFM` and a solver dict with every default resolved, before any compute.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path
from typing import Any

from .. import _io
from .._terminal import UsageError
from .args import DEFAULT, PROBLEM_OPTIONS, SOLVER_OPTIONS

# THEORY.md §4: the binary deep ReLU UFM of Súkeník, Mondelli, Lampert (2023), L = 3 (the README quickstart).
DEFAULT_PROBLEM: dict[str, Any] = {
    "num_classes": 2,
    "n_per_class": 50,
    "widths": [64, 64, 64],
    "activation": "relu",
    "loss": "mse",
    "bias": "none",
    "lam_H": 5e-3,
    "lam_W": 5e-3,
    "lam_b": 0.0,
    "label_smoothing": 0.0,
}

# None = the solver's own default (resolved and recorded in config.json); snapshot_every None = automatic.
DEFAULT_SOLVER: dict[str, Any] = {
    "method": "lbfgs",
    "lr": None,
    "steps": None,
    "tol": None,
    "seed": 0,
    "init_scale": None,  # None/"auto": `ufm._options.auto_init_scale` (recorded as "auto"; the run may restart)
    "init_scale_auto": None,  # recorded: the number "auto" stood for (read back and ignored: the rule recomputes it)
    "dtype": "float64",
    "patience": None,
    "history_every": 1,
    "snapshot_every": None,
    "momentum": 0.9,
    "memory_size": 10,
}
SOLVER_ALIASES = {"max_steps": "steps"}
SNAPSHOT_BUDGET_BYTES = 32 * 2**20  # auto snapshot_every keeps the snapshot buffer below this
MAX_SNAPSHOTS = 200
MAX_CONFIG_BYTES = 16 * 2**20


def normalise_key(k: str) -> str:
    """A config key as a field name: ``-`` -> ``_``, ``lam_h``/``lam_w`` in any case -> ``lam_H``/``lam_W``, and
    the solver aliases (``max_steps`` -> ``steps``)."""
    k = k.replace("-", "_")
    for exact in ("lam_H", "lam_W"):
        if k.lower() == exact.lower():
            return exact
    return SOLVER_ALIASES.get(k, k)


def read_config_data(path: str | os.PathLike) -> dict:
    """The top-level table of a ``--config`` file (TOML ``.toml`` or JSON ``.json``, at most
    ``MAX_CONFIG_BYTES``); `UsageError` for a missing, oversized, unparsable or non-table file. Shared by
    ``ufm solve`` and ``ufm explore``."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--config: file {path} does not exist")
    suffix = path.suffix.lower()
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise UsageError(f"--config: {path} is {size:,} bytes; a config file is at most {MAX_CONFIG_BYTES:,}")
    try:
        if suffix == ".toml":
            import tomllib

            with path.open("rb") as fh:
                data = tomllib.load(fh)
        elif suffix == ".json":
            data = json.loads(path.read_text())
        else:
            raise UsageError(f"--config: {path} must end in .toml or .json")
    except UsageError:
        raise
    except Exception as e:  # TOMLDecodeError, JSONDecodeError, UnicodeDecodeError
        raise UsageError(f"--config: {path} could not be parsed: {e}") from None
    if not isinstance(data, dict):
        raise UsageError(f"--config: {path} must hold a table/object at the top level")
    return data


def load_config_file(path: str | os.PathLike) -> tuple[dict, dict]:
    """Read a TOML (``.toml``) or JSON (``.json``) config: tables ``problem`` and ``solver``, or flat keys (each
    assigned by name). Keys may use ``-`` or ``_``. Returns ``(problem, solver)`` dicts; `UsageError` names an
    unknown or misplaced field."""
    path = Path(path)
    data = read_config_data(path)
    problem: dict = {}
    solver: dict = {}
    known_p, known_s = set(DEFAULT_PROBLEM), set(DEFAULT_SOLVER)
    for key, value in data.items():
        if key == "made_by":  # provenance written by save_results: not an input
            continue
        if key in ("problem", "solver"):
            if not isinstance(value, dict):
                raise UsageError(f"--config: {path}: [{key}] must be a table of fields; got {value!r}")
            known = known_p if key == "problem" else known_s
            for k, v in value.items():
                nk = normalise_key(k)
                if nk not in known:
                    raise UsageError(
                        f"--config: {path}: unknown field {k!r} in [{key}] (fields: {', '.join(sorted(known))})"
                    )
                (problem if key == "problem" else solver)[nk] = v
        else:
            nk = normalise_key(key)
            if nk in known_p:
                problem[nk] = value
            elif nk in known_s:
                solver[nk] = value
            else:
                raise UsageError(
                    f"--config: {path}: unknown field {key!r} (problem fields: "
                    f"{', '.join(sorted(known_p))}; solver fields: {', '.join(sorted(known_s))})"
                )
    return problem, solver


def check_solver(s: dict) -> dict:
    """Validate solver fields (types and ranges) before compute; `UsageError` names the field."""
    from .._options import METHODS

    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool)

    def is_num(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    out = dict(s)
    if out["method"] not in METHODS:
        raise UsageError(f"method must be one of {', '.join(METHODS)}; got {out['method']!r}")
    if out["dtype"] not in ("float32", "float64"):
        raise UsageError(f"dtype must be float32 or float64; got {out['dtype']!r}")
    for name in ("lr", "tol"):
        v = out[name]
        if v is not None and (not is_num(v) or v < 0 or (name == "lr" and v == 0)):
            raise UsageError(f"{name} must be a finite number {'> 0' if name == 'lr' else '>= 0'}; got {v!r}")
    if out["init_scale"] is None:
        out["init_scale"] = "auto"
    if out["init_scale"] != "auto" and (not is_num(out["init_scale"]) or out["init_scale"] <= 0):
        raise UsageError(f"init_scale must be a finite number > 0 or auto; got {out['init_scale']!r}")
    if not is_num(out["momentum"]) or not 0 <= out["momentum"] < 1:
        raise UsageError(f"momentum must be in [0, 1); got {out['momentum']!r}")
    if not is_int(out["seed"]) or not 0 <= out["seed"] < 2**63:
        raise UsageError(f"seed must be an integer >= 0; got {out['seed']!r}")
    for name, optional in (("steps", True), ("patience", True), ("history_every", False), ("memory_size", False)):
        v = out[name]
        if (v is None and not optional) or (v is not None and (not is_int(v) or v < 1)):
            raise UsageError(f"{name} must be a positive integer; got {v!r}")
    v = out["snapshot_every"]
    if v is not None and (not is_int(v) or v < 0):
        raise UsageError(f"snapshot_every must be a positive integer, 0 (no snapshots) or auto; got {v!r}")
    return out


def resolve_config(args: argparse.Namespace) -> tuple[Any, dict]:
    """Merge defaults, the --config file and the options into ``(UFM, solver dict)`` with every solver default
    resolved (lr, steps, tol, patience, snapshot_every), all validated before any compute."""
    from .._options import resolve_init_scale, solver_options

    problem = dict(DEFAULT_PROBLEM)
    solver = dict(DEFAULT_SOLVER)
    if args.config is not None:
        fp, fs = load_config_file(args.config)
        problem.update(fp)
        solver.update(fs)
    for _, dest, _, _ in PROBLEM_OPTIONS:
        v = getattr(args, dest)
        if v is not None:
            problem[dest] = v
    for _, dest, _, _ in SOLVER_OPTIONS:
        v = getattr(args, dest)
        if v is not None:
            solver[dest] = None if v is DEFAULT else v
    try:
        ufm_problem = _io.problem_from_dict(problem, "problem")
    except _io.ResultsError as e:
        raise UsageError(str(e)) from None
    solver = check_solver(solver)
    o = solver_options(
        solver["method"],
        solver["lr"],
        solver["steps"],
        solver["tol"],
        solver["patience"],
        solver["history_every"],
        None,
        solver["dtype"],
    )
    solver.update(lr=float(o.lr), steps=o.max_steps, tol=float(o.tol), patience=o.patience)
    # "auto" stays "auto" (so the run restarts at the zero saddle as `ufm.solve` does); config.json also records
    # the number the rule gives for this problem
    auto = solver["init_scale"] == "auto"
    solver["init_scale_auto"] = float(resolve_init_scale(ufm_problem, "auto")) if auto else None
    if solver["snapshot_every"] is None:
        solver["snapshot_every"] = auto_snapshot_every(ufm_problem, solver)
    return ufm_problem, solver


def auto_snapshot_every(problem, solver) -> int:
    """Snapshots for the NC1 curves: at most 200, and at most 32 MiB of parameters."""
    size = problem.num_params
    itemsize = 8 if solver["dtype"] == "float64" else 4
    count = max(2, min(MAX_SNAPSHOTS, SNAPSHOT_BUDGET_BYTES // (size * itemsize)))
    return max(1, math.ceil(solver["steps"] / count))


def use_compilation_cache() -> None:
    """JAX's persistent compilation cache on for a command (`ufm.enable_compilation_cache`: the folder is
    ``JAX_COMPILATION_CACHE_DIR`` or ~/.cache/ufm/jax); ``UFM_NO_COMPILATION_CACHE=1`` turns it off. An unwritable
    cache folder only costs compile time, so it is not an error."""
    import os

    from .._cache import enable_compilation_cache

    if os.environ.get("UFM_NO_COMPILATION_CACHE") is None:
        try:
            enable_compilation_cache()
        except OSError:
            pass
