"""Results folders: what a run made, saved so it can be re-checked and re-plotted.

A results folder holds three files:

* ``config.json``: the inputs, ``{"problem": UFM.to_dict(), "solver": {...}}``. It is a valid
  ``ufm solve --config`` file, so the run can be repeated exactly.
* ``report.json``: what came out and what made it (versions, device, seed, wall time), plus the prediction
  and the check when they are available. Free-form JSON; only ``config.json`` and ``solution.npz`` are
  read back by `load_results`.
* ``solution.npz``: the final parameters (``H``, ``W1`` .. ``WL``, ``b`` when the problem has a bias), the scalar
  outcome (``value``, ``grad_norm``, ``num_steps``, ``status``), the history (``history_loss``,
  ``history_grad_norm``, ``history_every``; trimmed to the steps taken) and any extra arrays the caller
  passes (the CLI stores the NC1-per-layer trace as ``trace_nc1_step``, ``trace_nc1``).

Every reading function raises `ResultsError` (a ValueError) with one line naming the missing file or the bad
field, never a KeyError or a NumPy error.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from ._json import to_jsonable as to_jsonable

CONFIG_FILE = "config.json"
REPORT_FILE = "report.json"
SOLUTION_FILE = "solution.npz"
_SCALARS = ("value", "grad_norm", "num_steps", "status")


class ResultsError(ValueError):
    """A results folder (or one of its files) is missing, incomplete or malformed."""


class Results(NamedTuple):
    """A loaded results folder: the config dict, the report dict (None when absent), the rebuilt `ufm.UFM`,
    the `ufm.Solution` (history included, no snapshots) and the extra arrays saved with it."""

    folder: Path
    config: dict
    report: dict | None
    problem: Any
    solution: Any
    extras: dict[str, np.ndarray]


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` (after `to_jsonable`) as indented JSON; returns the path."""
    path = Path(path)
    path.write_text(json.dumps(to_jsonable(obj), indent=2, allow_nan=False) + "\n")
    return path


def read_json(path: str | os.PathLike, what: str = "file") -> dict:
    """Read a JSON object; `ResultsError` naming the file if it is missing or not a JSON object."""
    path = Path(path)
    if not path.is_file():
        raise ResultsError(f"{what} {path} is missing")
    try:
        obj = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ResultsError(f"{what} {path} is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise ResultsError(f"{what} {path} must hold a JSON object; got {type(obj).__name__}")
    return obj


def new_results_dir(parent: str | os.PathLike = ".", prefix: str = "ufm-results") -> Path:
    """Create and return a fresh folder ``parent/prefix-YYYYmmdd-HHMMSS`` (``-2``, ``-3``, ... if taken)."""
    parent = Path(parent)
    stem = f"{prefix}-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    for i in range(1, 1000):
        path = parent / (stem if i == 1 else f"{stem}-{i}")
        try:
            path.mkdir(parents=True)
            return path
        except FileExistsError:
            continue
    raise ResultsError(f"could not create a new results folder under {parent}")


def solution_arrays(solution, history_every: int = 1) -> dict[str, np.ndarray]:
    """The arrays of an (unbatched) `ufm.Solution` under the ``solution.npz`` names, the history trimmed to
    the ``num_steps // history_every + 1`` entries the solver wrote (the rest is NaN padding)."""
    p = solution.params
    out = {"H": np.asarray(p.H)}
    for i, W in enumerate(p.Ws):
        out[f"W{i + 1}"] = np.asarray(W)
    if p.b is not None:
        out["b"] = np.asarray(p.b)
    for name in _SCALARS:
        out[name] = np.asarray(getattr(solution, name))
    if solution.history is not None:
        last = int(solution.num_steps) // history_every + 1
        out["history_loss"] = np.asarray(solution.history.loss)[:last]
        out["history_grad_norm"] = np.asarray(solution.history.grad_norm)[:last]
    return out


def save_solution(path: str | os.PathLike, solution, *, history_every: int = 1,
                  extras: dict[str, Any] | None = None) -> Path:
    """Save an unbatched `ufm.Solution` (params, outcome, trimmed history) and ``extras`` to ``path`` (.npz).

    Snapshots are not saved (they can be large); store what you computed from them in ``extras``."""
    if np.ndim(solution.status) != 0:
        raise ValueError("save_solution takes one solution; use sols.take(i) for run i of a batch")
    arrays = solution_arrays(solution, history_every)
    arrays["history_every"] = np.asarray(history_every)
    for k, v in (extras or {}).items():
        if k in arrays:
            raise ValueError(f"extra array name {k!r} clashes with a solution field")
        arrays[k] = np.asarray(v)
    path = Path(path)
    np.savez(path, **arrays)
    return path


def problem_from_dict(d: dict, where: str = "problem"):
    """Rebuild a `ufm.UFM` from ``UFM.to_dict()`` output; `ResultsError` naming the field on bad input."""
    from ._problem import UFM

    if not isinstance(d, dict):
        raise ResultsError(f"{where} must be a table/object of UFM fields; got {type(d).__name__}")
    known = UFM.__slots__
    unknown = sorted(set(d) - set(known))
    if unknown:
        raise ResultsError(f"{where}: unknown field {unknown[0]!r} (fields: {', '.join(known)})")
    kw = dict(d)
    for k in ("n_per_class", "widths", "lam_W"):
        if isinstance(kw.get(k), list):
            kw[k] = tuple(kw[k])
    try:
        return UFM(**kw)
    except (TypeError, ValueError) as e:
        raise ResultsError(f"{where}: {e}") from None


def load_solution(path: str | os.PathLike, problem):
    """Load ``solution.npz`` for ``problem``: returns ``(Solution, extras, history_every)``.

    Checks that every parameter is present with the shape the problem needs (d_1 x N for H, d_{l+1} x d_l
    for W_l, (K,) for b); `ResultsError` names the first missing or mis-shaped array."""
    import jax.numpy as jnp

    from ._model import Params, check_params
    from ._solution import History, Solution

    path = Path(path)
    if not path.is_file():
        raise ResultsError(f"solution file {path} is missing")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as e:  # zipfile/pickle/format errors all mean "not a solution file"
        raise ResultsError(f"solution file {path} could not be read as .npz: {e}") from None
    names = ["H"] + [f"W{i + 1}" for i in range(problem.L)] + (["b"] if problem.has_bias else []) + list(_SCALARS)
    for name in names:
        if name not in arrays:
            raise ResultsError(f"solution file {path} has no array {name!r} (needs {', '.join(names)})")
    params = Params(arrays["H"], tuple(arrays[f"W{i + 1}"] for i in range(problem.L)),
                    arrays["b"] if problem.has_bias else None)
    try:
        check_params(problem, params, f"{path.name}")
    except (TypeError, ValueError) as e:
        raise ResultsError(f"solution file {path} does not fit the config's problem: {e}") from None
    params = Params(jnp.asarray(params.H), tuple(jnp.asarray(W) for W in params.Ws),
                    None if params.b is None else jnp.asarray(params.b))
    hist = None
    if "history_loss" in arrays and "history_grad_norm" in arrays:
        hist = History(jnp.asarray(arrays["history_loss"]), jnp.asarray(arrays["history_grad_norm"]))
    sol = Solution(params, jnp.asarray(arrays["value"]), jnp.asarray(arrays["grad_norm"]),
                   jnp.asarray(arrays["num_steps"]), jnp.asarray(arrays["status"]), hist, None)
    history_every = int(arrays["history_every"]) if "history_every" in arrays else 1
    skip = set(names) | {"history_loss", "history_grad_norm", "history_every"}
    extras = {k: v for k, v in arrays.items() if k not in skip}
    return sol, extras, history_every


def save_results(folder: str | os.PathLike, *, config: dict, solution, report: dict | None = None,
                 history_every: int = 1, extras: dict[str, Any] | None = None) -> Path:
    """Write ``config.json``, ``report.json`` (if given) and ``solution.npz`` into ``folder`` (created)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / CONFIG_FILE, config)
    if report is not None:
        write_json(folder / REPORT_FILE, report)
    save_solution(folder / SOLUTION_FILE, solution, history_every=history_every, extras=extras)
    return folder


def load_results(folder: str | os.PathLike) -> Results:
    """Read a results folder written by `save_results` (``ufm solve``).

    Needs ``config.json`` (with a ``problem`` table) and ``solution.npz``; ``report.json`` is optional.
    Raises `ResultsError` naming what is missing or malformed."""
    folder = Path(folder)
    if not folder.exists():
        raise ResultsError(f"results folder {folder} does not exist")
    if not folder.is_dir():
        raise ResultsError(f"results folder {folder} is not a folder")
    config = read_json(folder / CONFIG_FILE, "config file")
    if "problem" not in config:
        raise ResultsError(f"config file {folder / CONFIG_FILE} has no 'problem' table")
    problem = problem_from_dict(config["problem"], f"{folder / CONFIG_FILE} [problem]")
    report = read_json(folder / REPORT_FILE, "report file") if (folder / REPORT_FILE).exists() else None
    sol, extras, _ = load_solution(folder / SOLUTION_FILE, problem)
    return Results(folder, config, report, problem, sol, extras)
