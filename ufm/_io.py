"""Results folders: what a run made, saved so it can be re-checked, re-plotted and opened in a notebook.

A results folder (written by ``ufm solve`` or by `save_results` from Python, read by `load_results` and by
``ufm check`` / ``ufm plot``) holds:

* ``config.json``: the inputs, ``{"problem": UFM.to_dict(), "solver": {...}, "made_by": {...}}``. It is a valid
  ``ufm solve --config`` file, so the run can be repeated exactly.
* ``report.json``: what came out (``problem``, ``solution`` summary, ``comparison`` with the prediction,
  ``prediction``, ``check``, per-layer ``metrics``, ``notes``) and what made it (``made_by``; the CLI adds
  ``run``: command, device, seed, wall time). Optional for `load_results`.
* ``solution.npz``: the final parameters (``H``, ``W1`` .. ``WL``, ``b`` when the problem has a bias), the scalar
  outcome (``value``, ``grad_norm``, ``num_steps``, ``status``), the history (``history_loss``,
  ``history_grad_norm``, ``history_every``; trimmed to the steps taken), ``made_by`` (JSON text) and any extra
  arrays the caller passes (the CLI stores the NC1-per-layer trace as ``trace_nc1_step``, ``trace_nc1``).

``made_by`` is ``{"format": "ufm-results", "format_version": 1, "ufm": ..., "jax": ..., ...}``: the versions of the
libraries that wrote the file. No file holds a pickle.

Guarantees. Each file is written to a temporary file in the folder (``mkstemp``: a fresh name, never a planted
symlink), flushed to disk and renamed over its name, so a file is either complete or absent, after a crash, a full
disk or Ctrl-C alike. Reading treats the folder as untrusted: JSON is parsed with the standard library, the
``.npz`` is opened without pickle, and each array's header (shape, dtype, size) is checked against the problem
before anything is decompressed; arrays that the problem does not bound (history, extras) are loaded only if
their declared sizes fit ``max_bytes`` together. Every reading function raises `ResultsError` (a ValueError) with
one line naming the file and the bad field, never a KeyError or a NumPy error.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import math
import os
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

import numpy as np

from ._json import to_jsonable as to_jsonable

CONFIG_FILE = "config.json"
REPORT_FILE = "report.json"
SOLUTION_FILE = "solution.npz"
FORMAT = "ufm-results"
FORMAT_VERSION = 1
MAX_BYTES = 4 * 2**30  # default cap on what `load_results` / `load_solution` decompress
_SCALARS = ("value", "grad_norm", "num_steps", "status")
_HISTORY = ("history_loss", "history_grad_norm")


class ResultsError(ValueError):
    """A results folder (or one of its files) is missing, incomplete, malformed, or larger than allowed."""


class Results(NamedTuple):
    """A loaded results folder.

    Attributes:
      folder: the folder.
      config: ``config.json`` as a dict (``problem``, ``solver``, ``made_by``).
      report: ``report.json`` as a dict, or None when the folder has none.
      problem: the rebuilt `ufm.UFM`.
      solution: the `ufm.Solution` (history included, no snapshots).
      extras: the other arrays saved with it (name -> NumPy array), e.g. ``trace_nc1``.
      history_every: the spacing of the history entries (entry j is step ``j * history_every``).
    """

    folder: Path
    config: dict
    report: dict | None
    problem: Any
    solution: Any
    extras: dict[str, np.ndarray]
    history_every: int = 1


def made_by() -> dict:
    """The provenance stamped into every file: format name and version, Python, platform, library versions."""
    from ._terminal import versions

    return {"format": FORMAT, "format_version": FORMAT_VERSION, **versions()}


# ---------------------------------------------------------------------------------------------------------------
# writing: one temporary file per target, fsync, rename


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], Any]) -> Path:
    """Write a file all or nothing: ``write(fh)`` fills a fresh temporary file next to ``path`` (created with
    ``tempfile.mkstemp``: ``O_CREAT | O_EXCL``, so a planted symlink is never followed), which is flushed,
    fsync'ed and renamed to ``path``. On any error (a full disk, Ctrl-C) the temporary file is removed, ``path``
    keeps its previous content (or stays absent), and an `OSError` names ``path``."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise OSError(e.errno, e.strerror or str(e), str(path)) from e
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise OSError(e.errno, e.strerror or str(e), str(path)) from e
        raise
    return path


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` (after `to_jsonable`: non-finite floats become null) as indented strict JSON, atomically."""
    data = (json.dumps(to_jsonable(obj), indent=2, allow_nan=False) + "\n").encode()
    return atomic_write(path, lambda fh: fh.write(data))


def check_writable(folder: str | os.PathLike) -> None:
    """Raise `OSError` (naming ``folder``) unless a file can be created in ``folder``: a probe file made with
    ``mkstemp`` and removed at once (``os.access`` is not enough: it says yes to root on a read-only mount)."""
    folder = Path(folder)
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".ufm-write-test.", suffix=".tmp")
    except OSError as e:
        raise OSError(e.errno, e.strerror or str(e), str(folder)) from e
    os.close(fd)
    os.unlink(tmp)


def read_json(path: str | os.PathLike, what: str = "file", max_bytes: int = 256 * 2**20) -> dict:
    """Read a JSON object; `ResultsError` naming the file if it is missing, too large or not a JSON object."""
    path = Path(path)
    if not path.is_file():
        raise ResultsError(f"{what} {path} is missing")
    size = path.stat().st_size
    if size > max_bytes:
        raise ResultsError(f"{what} {path} is {size:,} bytes, more than the {max_bytes:,} allowed for JSON")
    try:
        obj = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise ResultsError(f"{what} {path} is not valid JSON: {e}") from None
    except OSError as e:
        raise ResultsError(f"{what} {path} could not be read: {e.strerror or e}") from None
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
    if getattr(solution, "polish_steps", None) is not None:  # the kink polish ran (`ufm.Solution.polish_steps`)
        out["polish_steps"] = np.asarray(solution.polish_steps)
    if solution.history is not None:
        last = int(solution.num_steps) // history_every + 1
        out["history_loss"] = np.asarray(solution.history.loss)[:last]
        out["history_grad_norm"] = np.asarray(solution.history.grad_norm)[:last]
    return out


def _as_path(value: Any, name: str) -> Path:
    if isinstance(value, bool) or not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"{name} must be a path (str or os.PathLike); got {type(value).__name__}")
    return Path(value)


def _check_limits(extras: Any, max_bytes: Any) -> None:
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int):
        raise TypeError(f"max_bytes must be a positive integer (bytes); got {max_bytes!r}")
    if max_bytes <= 0:
        raise ValueError(f"max_bytes must be a positive integer (bytes); got {max_bytes!r}")
    if not (
        isinstance(extras, bool) or (isinstance(extras, (list, tuple)) and all(isinstance(k, str) for k in extras))
    ):
        raise TypeError(f"extras must be True, False or a sequence of array names; got {extras!r}")


def _check_one(solution, name: str = "solution") -> None:
    if not (hasattr(solution, "params") and hasattr(solution, "status")):
        raise TypeError(f"{name} must be a ufm.Solution; got {type(solution).__name__}")
    if np.ndim(solution.status) != 0:
        raise ValueError(
            f"{name} must be one solution; got a batch of {np.shape(solution.status)[0]} (use sols.take(i) for run i)"
        )


def save_solution(
    path: str | os.PathLike, solution, *, history_every: int = 1, extras: dict[str, Any] | None = None
) -> Path:
    """Save an unbatched `ufm.Solution` (params, outcome, trimmed history), ``made_by`` and ``extras`` to ``path``
    (.npz, uncompressed, no pickle), atomically.

    Snapshots are not saved (they can be large); store what you computed from them in ``extras`` (numeric
    arrays)."""
    path = _as_path(path, "path")
    _check_one(solution)
    if isinstance(history_every, bool) or not isinstance(history_every, int) or history_every < 1:
        raise ValueError(f"history_every must be a positive integer; got {history_every!r}")
    arrays = solution_arrays(solution, history_every)
    arrays["history_every"] = np.asarray(history_every)
    arrays["made_by"] = np.asarray(json.dumps(to_jsonable(made_by())))
    for k, v in (extras or {}).items():
        if k in arrays:
            raise ValueError(f"extras: name {k!r} clashes with a solution field")
        a = np.asarray(v)
        if not (np.issubdtype(a.dtype, np.number) or a.dtype == bool):
            raise TypeError(f"extras[{k!r}] must be a numeric array; got dtype {a.dtype}")
        arrays[k] = a
    return atomic_write(path, lambda fh: np.savez(fh, **arrays))  # type: ignore[arg-type]


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


# ---------------------------------------------------------------------------------------------------------------
# reading solution.npz: headers first


class _Member(NamedTuple):
    shape: tuple
    dtype: np.dtype
    nbytes: int


def _headers(zf: zipfile.ZipFile, path: Path) -> dict[str, _Member]:
    """Shape, dtype and size of every ``.npy`` member, read from its header alone (nothing is decompressed but
    the first bytes of each member)."""
    out = {}
    for info in zf.infolist():
        if not info.filename.endswith(".npy"):
            continue
        name = info.filename[:-4]
        try:
            with zf.open(info) as fh:
                major, _ = np.lib.format.read_magic(fh)
                if major == 1:
                    shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
                else:
                    shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
        except Exception as e:  # a malformed header is a malformed file, whatever NumPy raises
            raise ResultsError(f"solution file {path}: array {name!r} has no valid .npy header ({e})") from None
        if dtype.hasobject:
            raise ResultsError(
                f"solution file {path}: array {name!r} holds Python objects (dtype {dtype}); "
                "results files hold numbers only and are never unpickled"
            )
        out[name] = _Member(tuple(shape), dtype, int(math.prod(shape)) * dtype.itemsize)
    return out


def _read(zf: zipfile.ZipFile, name: str, path: Path) -> np.ndarray:
    try:
        with zf.open(name + ".npy") as fh:
            return np.lib.format.read_array(fh, allow_pickle=False)
    except Exception as e:  # truncated data, CRC errors, ...
        raise ResultsError(
            f"solution file {path}: array {name!r} could not be read ({type(e).__name__}: {e})"
        ) from None


def _expect(members: dict[str, _Member], name: str, shape: tuple | None, kinds: str, what: str, path: Path):
    m = members.get(name)
    if m is None:
        raise ResultsError(f"solution file {path} has no array {name!r} ({what})")
    if m.dtype.kind not in kinds:
        raise ResultsError(
            f"solution file {path}: {name} ({what}) must be "
            f"{'floating' if kinds == 'f' else 'integer'}; got dtype {m.dtype}"
        )
    if shape is not None and m.shape != shape:
        raise ResultsError(f"solution file {path}: {name} must have shape {what} = {shape}; got {m.shape}")
    return m


def load_solution(path: str | os.PathLike, problem, *, extras: bool | Sequence[str] = True, max_bytes: int = MAX_BYTES):
    """Load ``solution.npz`` for ``problem``: returns ``(Solution, extras, history_every)``.

    The file is untrusted: before any array is read, its header must match what the problem needs (H is
    d_1 x N, W_l is d_{l+1} x d_l, b is (K,), all one floating dtype; ``value``, ``grad_norm`` floating scalars;
    ``num_steps``, ``status`` integer scalars; the history 1-D of at most ``num_steps + 1`` entries), and the
    declared sizes of everything to be read must total at most ``max_bytes`` (default 4 GiB).

    Args:
      path: the ``.npz`` file.
      problem: the `ufm.UFM` it was solved for (``config.json``'s problem).
      extras: which other arrays to load: True (all), False (none) or a sequence of names (missing ones are
        skipped).
      max_bytes: the most bytes the arrays to be read may declare together.

    Raises:
      ResultsError: naming the file and the first missing, mis-shaped, mis-typed or oversized array.
    """
    path = _as_path(path, "path")
    _check_limits(extras, max_bytes)
    if not path.is_file():
        raise ResultsError(f"solution file {path} is missing")
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise ResultsError(f"solution file {path} could not be read as .npz: {e}") from None
    with zf:
        members = _headers(zf, path)
        needed = _parameter_members(members, problem, path)
        for name, kinds, what in (
            ("value", "f", "the objective f"),
            ("grad_norm", "f", "||grad f||"),
            ("num_steps", "iu", "the steps taken"),
            ("status", "iu", "the status code"),
        ):
            needed[name] = _expect(members, name, (), kinds, f"{what}, a scalar ()", path)
        for name in ("history_every", "polish_steps"):  # optional scalars
            if name in members:
                needed[name] = _expect(members, name, (), "iu", "a scalar ()", path)
        scal = {k: _read(zf, k, path) for k in (*_SCALARS, "history_every", "polish_steps") if k in needed}
        num_steps, history_every = _check_scalars(scal, path)
        history = _history_members(members, num_steps, path)
        needed.update(history)
        extra_names = _extra_members(members, needed, extras, path)
        needed.update((k, members[k]) for k in extra_names)
        _check_total(needed, max_bytes, path)
        arrays = {k: _read(zf, k, path) for k in needed if k not in scal}
    sol = _solution_of(problem, arrays, scal, bool(history))
    return sol, {k: arrays[k] for k in extra_names}, history_every


def _parameter_members(members: dict, problem, path: Path) -> dict:
    """The headers of H, W_1..W_L (and b), checked against ``problem``'s shapes and for one float dtype."""
    (hs, ws, bs) = problem.param_shapes()
    dims = problem.widths + (problem.num_classes,)
    needed = {"H": _expect(members, "H", hs, "f", "d_1 x N", path)}
    for i, s in enumerate(ws):
        needed[f"W{i + 1}"] = _expect(members, f"W{i + 1}", s, "f", f"d_{i + 2} x d_{i + 1} (widths {dims})", path)
    if bs is not None:
        needed["b"] = _expect(members, "b", bs, "f", "(K,)", path)
    elif "b" in members:
        raise ResultsError(f"solution file {path} has an array 'b' but the problem has bias='none'")
    dtypes = {m.dtype for m in needed.values()}
    if len(dtypes) != 1:
        raise ResultsError(
            f"solution file {path}: H, W_l (and b) must share one floating dtype; got {sorted(map(str, dtypes))}"
        )
    if next(iter(dtypes)) not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise ResultsError(
            f"solution file {path}: the parameters must be float32 or float64 (the dtypes ufm "
            f"solves in); got {next(iter(dtypes))}"
        )
    return needed


def _check_scalars(scal: dict, path: Path) -> tuple[int, int]:
    """``(num_steps, history_every)`` after checking them and the status code."""
    from ._solution import STATUS_NAMES

    num_steps = int(scal["num_steps"])
    history_every = int(scal.get("history_every", 1))
    if num_steps < 0 or history_every < 1:
        raise ResultsError(
            f"solution file {path}: num_steps must be >= 0 and history_every >= 1; got {num_steps} and {history_every}"
        )
    if int(scal["status"]) not in STATUS_NAMES:
        raise ResultsError(
            f"solution file {path}: status {int(scal['status'])} is not a status code of this "
            f"ufm ({', '.join(f'{c} {n}' for c, n in sorted(STATUS_NAMES.items()))})"
        )
    return num_steps, history_every


def _history_members(members: dict, num_steps: int, path: Path) -> dict:
    """The headers of the loss and gradient-norm history (1-D, at most ``num_steps + 1`` entries), or {} when the
    file has no (complete) history."""
    if not all(k in members for k in _HISTORY):
        return {}
    out = {}
    for k in _HISTORY:
        m = _expect(members, k, None, "f", "a 1-D history", path)
        if len(m.shape) != 1 or m.shape[0] > num_steps + 1:
            raise ResultsError(
                f"solution file {path}: {k} must be 1-D with at most num_steps + 1 = "
                f"{num_steps + 1} entries; got shape {m.shape}"
            )
        out[k] = m
    return out


def _extra_members(members: dict, needed: dict, extras: bool | Sequence[str], path: Path) -> list[str]:
    """The names of the extra arrays to read (all, none, or those named that are present), each numeric."""
    if extras is True:
        names = [k for k in members if k not in needed and k not in (*_HISTORY, "made_by")]
    elif extras is False:
        names = []
    else:
        names = [k for k in extras if k in members and k not in needed]
    for k in names:
        if members[k].dtype.kind not in "biuf":
            raise ResultsError(f"solution file {path}: extra array {k!r} must be numeric; got dtype {members[k].dtype}")
    return names


def _check_total(needed: dict, max_bytes: int, path: Path) -> None:
    """Refuse a file whose arrays to be read declare more than ``max_bytes`` together, naming the largest."""
    total = sum(m.nbytes for m in needed.values())
    if total > max_bytes:
        big = max(needed, key=lambda k: needed[k].nbytes)
        m = needed[big]
        raise ResultsError(
            f"solution file {path} declares {total:,} bytes of arrays (the largest, {big!r}, "
            f"shape {m.shape} {m.dtype}: {m.nbytes:,} bytes), more than max_bytes = "
            f"{max_bytes:,}; raise max_bytes if the file is trusted"
        )


def _solution_of(problem, arrays: dict, scal: dict, has_history: bool):
    """The `ufm.Solution` of the arrays read (no snapshots)."""
    import jax.numpy as jnp

    from ._model import Params
    from ._solution import History, Solution

    params = Params(
        jnp.asarray(arrays["H"]),
        tuple(jnp.asarray(arrays[f"W{i + 1}"]) for i in range(problem.L)),
        jnp.asarray(arrays["b"]) if "b" in arrays else None,
    )
    hist = None
    if has_history:
        hist = History(jnp.asarray(arrays["history_loss"]), jnp.asarray(arrays["history_grad_norm"]))
    return Solution(
        params,
        jnp.asarray(scal["value"]),
        jnp.asarray(scal["grad_norm"]),
        jnp.asarray(scal["num_steps"]),
        jnp.asarray(scal["status"]),
        hist,
        None,
        polish_steps=jnp.asarray(scal["polish_steps"]) if "polish_steps" in scal else None,
    )


# ---------------------------------------------------------------------------------------------------------------
# the folder


def solution_summary(solution) -> dict:
    """The ``solution`` table of a report: value, gradient norm, steps, status (code, name, message), dtype."""
    from ._solution import MESSAGES, STATUS_NAMES

    status = int(solution.status)
    return {
        "value": float(solution.value),
        "grad_norm": float(solution.grad_norm),
        "num_steps": int(solution.num_steps),
        "status": status,
        "status_name": STATUS_NAMES.get(status, str(status)),
        "success": status == 0,
        "message": MESSAGES.get(status, ""),
        "dtype": str(solution.params.H.dtype),
    }


def _field(obj, name, default=None):
    if obj is None:
        return default
    if isinstance(obj, dict):
        return obj.get(name, default)
    return getattr(obj, name, default)


def predicted_loss(prediction) -> tuple[float | None, bool]:
    """(the predicted loss, whether it is the proven/derived optimum) of a `ufm.Prediction` or its dict. For
    ``known=False`` the loss, when finite, is the best known upper bound; None when there is no number."""
    if prediction is None:
        return None, False
    v = _field(prediction, "loss")
    try:
        v = float(v)
    except (TypeError, ValueError):
        return None, False
    if not math.isfinite(v):
        return None, False
    return v, bool(_field(prediction, "known", False))


def build_report(problem, solution, prediction=None, check=None, metrics=None, notes: Sequence[str] = ()) -> dict:
    """The report of a results folder: ``problem``, ``solution`` (`solution_summary`), ``comparison`` (loss,
    predicted loss, gap f - f* and relative gap (f - f*)/|f*|), ``prediction``, ``check`` (a `ufm.Report` without
    the metrics, prediction and problem it repeats), ``metrics`` (`ufm.metrics.layer_metrics`), ``notes``
    (what was not computed, and why) and ``made_by``."""
    value = float(solution.value)
    f_pred, known = predicted_loss(prediction)
    comparison = {
        "loss": value,
        "predicted_loss": f_pred,
        "predicted_is_optimum": known,
        "gap": None,
        "relative_gap": None,
    }
    if f_pred is not None and math.isfinite(value):
        comparison["gap"] = value - f_pred
        comparison["relative_gap"] = (value - f_pred) / max(abs(f_pred), 1e-300)
    check_d = None
    if check is not None:
        check_d = to_jsonable(check)
        for k in ("metrics", "prediction", "problem"):
            check_d.pop(k, None)
    return {
        "problem": problem.to_dict(),
        "solution": solution_summary(solution),
        "comparison": comparison,
        "prediction": to_jsonable(prediction) if prediction is not None else None,
        "check": check_d,
        "metrics": metrics,
        "notes": list(notes),
        "made_by": made_by(),
    }


def save_results(
    folder: str | os.PathLike,
    problem,
    solution,
    report=None,
    *,
    solver: dict | None = None,
    history_every: int | None = None,
    extras: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Save a solve from Python as a results folder, the layout ``ufm solve`` writes (see the module docs), so
    ``ufm check FOLDER``, ``ufm plot FOLDER`` and `load_results` read it.

    Args:
      folder: the folder (created, with its parents).
      problem: the `ufm.UFM`.
      solution: one `ufm.Solution` (``sols.take(i)`` for run i of a batch); snapshots are not saved.
      report: a `ufm.Report` (from `ufm.check`; its prediction and metrics go in too), a report dict (written as
        given, ``made_by`` added), or None (the solution summary only).
      solver: the solver options to record in ``config.json`` (e.g. ``{"method": "lbfgs", "seed": 0}``).
      history_every: the ``history_every`` the solve used (default ``solver["history_every"]`` or 1).
      extras: more numeric arrays for ``solution.npz``.
      overwrite: replace the files of an existing results folder (default: refuse).

    Returns:
      The folder.

    Raises:
      ValueError: a batched solution, a solution that does not fit ``problem``, or a folder that already holds
        results without ``overwrite``. OSError: the folder cannot be written (naming the file).
    """
    from ._model import check_params
    from ._problem import UFM

    folder = _as_path(folder, "folder")
    if not isinstance(problem, UFM):
        raise TypeError(f"problem must be a ufm.UFM; got {type(problem).__name__}")
    _check_one(solution)
    check_params(problem, solution.params, "solution.params")
    taken = [f for f in (CONFIG_FILE, REPORT_FILE, SOLUTION_FILE) if (folder / f).exists()]
    if taken and not overwrite:
        raise ValueError(f"folder {folder} already holds results ({', '.join(taken)}); pass overwrite=True")
    if solver is not None and not isinstance(solver, dict):
        raise TypeError(f"solver must be a dict of solver options; got {type(solver).__name__}")
    if history_every is None:
        history_every = int((solver or {}).get("history_every", 1) or 1)
    folder.mkdir(parents=True, exist_ok=True)
    if report is None:
        report_d = build_report(problem, solution)
    elif isinstance(report, dict):
        report_d = {**report, "made_by": report.get("made_by", made_by())}
    elif hasattr(report, "verdict") and hasattr(report, "certificate"):
        report_d = build_report(problem, solution, report.prediction, report, report.metrics)
    else:
        raise TypeError(f"report must be a ufm.Report, a dict or None; got {type(report).__name__}")
    config = {
        "problem": problem.to_dict(),
        "solver": dict(solver or {}, history_every=history_every),
        "made_by": made_by(),
    }
    write_json(folder / CONFIG_FILE, config)
    save_solution(folder / SOLUTION_FILE, solution, history_every=history_every, extras=extras)
    write_json(folder / REPORT_FILE, report_d)
    return folder


def read_config(folder: str | os.PathLike):
    """``(config dict, UFM)`` of a results folder, reading ``config.json`` only (cheap: nothing is allocated for
    the parameters, so a caller can size the problem before `load_results`)."""
    folder = _as_path(folder, "folder")
    if not folder.exists():
        raise ResultsError(f"results folder {folder} does not exist")
    if not folder.is_dir():
        raise ResultsError(f"results folder {folder} is not a folder")
    config = read_json(folder / CONFIG_FILE, "config file")
    if "problem" not in config:
        raise ResultsError(f"config file {folder / CONFIG_FILE} has no 'problem' table")
    fmt = config.get("made_by", {}) if isinstance(config.get("made_by"), dict) else {}
    version = fmt.get("format_version", FORMAT_VERSION)
    if isinstance(version, int) and version > FORMAT_VERSION:
        raise ResultsError(
            f"config file {folder / CONFIG_FILE} is format_version {version}, newer than this ufm "
            f"reads ({FORMAT_VERSION}): made by ufm {fmt.get('ufm')}; upgrade ufm"
        )
    problem = problem_from_dict(config["problem"], f"{folder / CONFIG_FILE} [problem]")
    return config, problem


def load_results(
    folder: str | os.PathLike, *, extras: bool | Sequence[str] = True, max_bytes: int = MAX_BYTES
) -> Results:
    """Load a results folder written by ``ufm solve`` or `save_results`: the problem, the solution, the report.

    Needs ``config.json`` (with a ``problem`` table) and ``solution.npz``; ``report.json`` is optional. The
    folder is untrusted: see `load_solution` for the checks made before any array is read.

    Args:
      folder: the results folder.
      extras: which extra arrays of ``solution.npz`` to load (True: all; False: none; or names).
      max_bytes: the most bytes the arrays read may declare together (default 4 GiB).

    Returns:
      `Results` (folder, config, report, problem, solution, extras, history_every).

    Raises:
      ResultsError: naming what is missing or malformed.

    Examples:
      >>> res = ufm.load_results("ufm-results-20261123-161500")  # doctest: +SKIP
      >>> res.problem, res.solution.value, res.report["check"]["verdict"]  # doctest: +SKIP
    """
    folder = _as_path(folder, "folder")
    _check_limits(extras, max_bytes)
    config, problem = read_config(folder)
    report = read_json(folder / REPORT_FILE, "report file") if (folder / REPORT_FILE).exists() else None
    sol, ex, history_every = load_solution(folder / SOLUTION_FILE, problem, extras=extras, max_bytes=max_bytes)
    return Results(folder, config, report, problem, sol, ex, history_every)
