"""The ``ufm`` command: solve a UFM, check the optimum against the theory, save it and draw it.

::

    ufm solve [OPTIONS]      solve (default: the binary deep ReLU UFM of Súkeník et al. 2023, L = 3), check it
                             against ufm.predict, print a short report and write a results folder
    ufm check RESULTS        re-check a saved solution (prints the report; the folder is not changed)
    ufm plot RESULTS         redraw the figures of a saved solution
    ufm sweep CONFIG         run a grid of solves (`ufm._sweep.sweep_main`; see ``ufm sweep --help``)

``python -m ufm ...`` is the same command. Every field of the problem (`ufm.UFM`) and of the solver
(`ufm.solve`) is an option, or comes from a TOML/JSON file given with ``--config`` (tables ``[problem]`` and
``[solver]``, or flat keys); options on the command line override the file, which overrides the built-in
default problem. A results folder's ``config.json`` is itself a valid ``--config`` file.

The command computes in float64 by default: it turns on ``jax_enable_x64`` before any JAX computation (a
global JAX setting, also when `main` is called from Python). ``--dtype float32`` solves in float32.

Progress. The solver loop is one compiled ``lax.while_loop`` that reports through a host callback. When progress is
on (``--progress auto``, the default, means: when stderr is a terminal) a line with the step, the loss and the
gradient norm is rewritten on stderr from inside the compiled loop (`ufm.solve`'s ``progress`` callback, at most
every 0.1 s). The run is a single `ufm.solve` call either way, bit-identical to the Python API with the same
problem, seed and options. Ctrl-C during the solve ends it within about a second with status "interrupted"; the
results folder is written with the point reached.

Exit codes: 0 when the command ran (whatever the verdict); 2 for bad input (an unknown option or value, an
invalid config field, a missing or incomplete results folder), with one line on stderr naming the field and
no traceback; 130 when interrupted.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from . import _io

PROG = "ufm"

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
    "init_scale": 1.0,
    "dtype": "float64",
    "patience": None,
    "history_every": 1,
    "snapshot_every": None,
    "momentum": 0.9,
    "memory_size": 10,
}
_SOLVER_ALIASES = {"max_steps": "steps"}
_FIGURES = ("training", "collapse", "gram", "singular_values", "class_means")
_SNAPSHOT_BUDGET_BYTES = 32 * 2**20  # auto snapshot_every keeps the snapshot buffer below this
_MAX_SNAPSHOTS = 200
_HESSIAN_AUTO_MAX = 500


class UsageError(Exception):
    """Bad input: printed as one line, exit code 2 (``prog`` names the (sub)command when known)."""

    def __init__(self, message: str, prog: str | None = None):
        super().__init__(message)
        self.prog = prog


# ---------------------------------------------------------------------------------------------------------------
# argument parsing


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        raise UsageError(f"{message} (see '{self.prog} --help')", self.prog)


def _int_or_list(text: str):
    try:
        vals = tuple(int(t) for t in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or a comma list of integers; got {text!r}") from None
    return vals[0] if len(vals) == 1 else vals


def _int_list(text: str):
    try:
        return tuple(int(t) for t in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of integers such as 64,64,64; got {text!r}") from None


def _float(text: str):
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number; got {text!r}") from None


def _float_or_list(text: str):
    try:
        vals = tuple(float(t) for t in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or a comma list of numbers; got {text!r}") from None
    return vals[0] if len(vals) == 1 else vals


def _int(text: str):
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer; got {text!r}") from None


_DEFAULT = "default"  # an option given as "default"/"auto": use the solver's default even over a config file


def _float_or_default(text: str):
    return _DEFAULT if text.lower() in ("default", "auto") else _float(text)


def _int_or_default(text: str):
    return _DEFAULT if text.lower() in ("default", "auto") else _int(text)


# (flags, field, type, help); fields are UFM / solve argument names
_PROBLEM_OPTIONS = [
    (("-K", "--num-classes"), "num_classes", _int, "K, the number of classes (default 2)"),
    (("-n", "--n-per-class"), "n_per_class", _int_or_list,
     "n, samples per class, or a comma list n_1,...,n_K for unequal classes (default 50)"),
    (("--widths",), "widths", _int_list, "d_1,...,d_L: the feature dimension and the input widths of W_1..W_L; "
     "L = their number (default 64,64,64)"),
    (("--activation",), "activation", str, "linear | relu, applied after W_1..W_{L-1} (default relu)"),
    (("--loss",), "loss", str, "mse | ce (default mse)"),
    (("--bias",), "bias", str, "none | free | reg: the output bias b (default none)"),
    (("--lam-H", "--lam-h"), "lam_H", _float, "lambda_H, weight decay on H (default 5e-3)"),
    (("--lam-W", "--lam-w"), "lam_W", _float_or_list,
     "lambda_W, one value or a comma list with one per layer (default 5e-3)"),
    (("--lam-b",), "lam_b", _float, "lambda_b > 0, only with --bias reg (default 0)"),
    (("--label-smoothing",), "label_smoothing", _float, "alpha in [0, 1), only with --loss ce (default 0)"),
]
_SOLVER_OPTIONS = [
    (("--method",), "method", str, "lbfgs | gd | momentum | adam (default lbfgs)"),
    (("--lr",), "lr", _float_or_default, "learning rate (default: the solver's, 1.0 for lbfgs, 0.1 gd/momentum, "
     "1e-3 adam)"),
    (("--steps",), "steps", _int_or_default, "step budget max_steps (default: 10000 lbfgs, 100000 others)"),
    (("--tol",), "tol", _float_or_default, "stop when ||grad f||_2 <= tol (default 1e-9 float64, 1e-5 float32)"),
    (("--seed",), "seed", _int, "seed of the random init, jax.random.key(seed) (default 0)"),
    (("--init-scale",), "init_scale", _float, "scale of the random init (default 1)"),
    (("--dtype",), "dtype", str, "float64 | float32 (default float64)"),
    (("--patience",), "patience", _int_or_default,
     "steps without improvement before status 'stalled' (default 50 lbfgs, 1000 others)"),
    (("--history-every",), "history_every", _int, "record loss and gradient norm every k steps (default 1)"),
    (("--snapshot-every",), "snapshot_every", _int_or_default,
     "save parameters every k steps for the NC1 curves; 0 = none (default auto: at most 200 snapshots)"),
    (("--momentum",), "momentum", _float, "momentum of --method momentum (default 0.9)"),
    (("--memory-size",), "memory_size", _int, "L-BFGS memory (default 10)"),
]


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Unconstrained features models of neural collapse: solve, check, plot.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="{solve,check,plot,sweep}", parser_class=_Parser)
    sub.required = True

    ps = sub.add_parser("solve", help="solve a UFM, check it against the theory, save and plot it",
                        description="Solve a UFM (default: binary deep ReLU UFM, Súkeník et al. 2023, L = 3), check "
                        "it against ufm.predict, print a report and write a results folder.")
    g = ps.add_argument_group("problem (ufm.UFM fields)")
    for flags, dest, typ, help_ in _PROBLEM_OPTIONS:
        g.add_argument(*flags, dest=dest, type=typ, default=None, help=help_)
    g = ps.add_argument_group("solver (ufm.solve options)")
    for flags, dest, typ, help_ in _SOLVER_OPTIONS:
        g.add_argument(*flags, dest=dest, type=typ, default=None, help=help_)
    g = ps.add_argument_group("run")
    g.add_argument("--config", type=Path, default=None,
                   help="TOML or JSON file with [problem] and [solver] tables (options given here override it)")
    g.add_argument("--out", type=Path, default=None,
                   help="results folder (default: a new ufm-results-DATE-TIME folder in the current directory)")
    g.add_argument("--overwrite", action="store_true", help="allow --out to be a folder that already holds results")
    g.add_argument("--json", action="store_true", help="print the report as JSON on stdout (for scripts)")
    g.add_argument("--no-plots", dest="plots", action="store_false", help="do not draw the figures")
    g.add_argument("--progress", choices=("auto", "always", "never"), default="auto",
                   help="progress on stderr (auto: when stderr is a terminal); see 'Progress' in ufm.cli's docs")
    g.add_argument("--hessian", choices=("auto", "on", "off"), default="auto",
                   help=f"second-order certificate in the check (auto: on up to {_HESSIAN_AUTO_MAX} parameters)")

    pc = sub.add_parser("check", help="re-check a saved solution", description="Re-check a saved solution against "
                        "ufm.predict and print the report (the folder is not changed).")
    pc.add_argument("results", type=Path, help="a results folder written by 'ufm solve'")
    pc.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    pc.add_argument("--hessian", choices=("auto", "on", "off"), default="auto",
                    help=f"second-order certificate (auto: on up to {_HESSIAN_AUTO_MAX} parameters)")

    pp = sub.add_parser("plot", help="redraw the figures of a saved solution",
                        description="Redraw the figures of a results folder.")
    pp.add_argument("results", type=Path, help="a results folder written by 'ufm solve'")
    pp.add_argument("--out", type=Path, default=None, help="folder for the figures (default: the results folder)")
    pp.add_argument("--format", choices=("png", "pdf", "svg"), default="png", help="image format (default png)")
    pp.add_argument("--dpi", type=_int, default=150, help="resolution of png figures (default 150)")
    # 'ufm sweep' is parsed by ufm._sweep.sweep_main (main() hands it the rest of the command line)
    sub.add_parser("sweep", help="run a grid of solves into a resumable store (see 'ufm sweep --help')",
                   add_help=False)
    return parser


# ---------------------------------------------------------------------------------------------------------------
# config: built-in defaults <- config file <- command line


def _normalise_key(k: str) -> str:
    k = k.replace("-", "_")
    for exact in ("lam_H", "lam_W"):
        if k.lower() == exact.lower():
            return exact
    return _SOLVER_ALIASES.get(k, k)


def load_config_file(path: str | os.PathLike) -> tuple[dict, dict]:
    """Read a TOML (``.toml``) or JSON (``.json``) config: tables ``problem`` and ``solver``, or flat keys (each
    assigned by name). Keys may use ``-`` or ``_``. Returns ``(problem, solver)`` dicts; `UsageError` names an
    unknown or misplaced field."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--config: file {path} does not exist")
    suffix = path.suffix.lower()
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
    problem: dict = {}
    solver: dict = {}
    known_p, known_s = set(DEFAULT_PROBLEM), set(DEFAULT_SOLVER)
    for key, value in data.items():
        if key in ("problem", "solver"):
            if not isinstance(value, dict):
                raise UsageError(f"--config: {path}: [{key}] must be a table of fields; got {value!r}")
            known = known_p if key == "problem" else known_s
            for k, v in value.items():
                nk = _normalise_key(k)
                if nk not in known:
                    raise UsageError(
                        f"--config: {path}: unknown field {k!r} in [{key}] (fields: {', '.join(sorted(known))})"
                    )
                (problem if key == "problem" else solver)[nk] = v
        else:
            nk = _normalise_key(key)
            if nk in known_p:
                problem[nk] = value
            elif nk in known_s:
                solver[nk] = value
            else:
                raise UsageError(f"--config: {path}: unknown field {key!r} (problem fields: "
                                 f"{', '.join(sorted(known_p))}; solver fields: {', '.join(sorted(known_s))})")
    return problem, solver


def _check_solver(s: dict) -> dict:
    """Validate solver fields (types and ranges) before compute; `UsageError` names the field."""
    from ._options import METHODS

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
    if not is_num(out["init_scale"]) or out["init_scale"] <= 0:
        raise UsageError(f"init_scale must be a finite number > 0; got {out['init_scale']!r}")
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
    from ._options import solver_options

    problem = dict(DEFAULT_PROBLEM)
    solver = dict(DEFAULT_SOLVER)
    if args.config is not None:
        fp, fs = load_config_file(args.config)
        problem.update(fp)
        solver.update(fs)
    for _, dest, _, _ in _PROBLEM_OPTIONS:
        v = getattr(args, dest)
        if v is not None:
            problem[dest] = v
    for _, dest, _, _ in _SOLVER_OPTIONS:
        v = getattr(args, dest)
        if v is not None:
            solver[dest] = None if v is _DEFAULT else v
    try:
        ufm_problem = _io.problem_from_dict(problem, "problem")
    except _io.ResultsError as e:
        raise UsageError(str(e)) from None
    solver = _check_solver(solver)
    o = solver_options(solver["method"], solver["lr"], solver["steps"], solver["tol"], solver["patience"],
                       solver["history_every"], None, solver["dtype"])
    solver.update(lr=float(o.lr), steps=o.max_steps, tol=float(o.tol), patience=o.patience)
    if solver["snapshot_every"] is None:
        solver["snapshot_every"] = _auto_snapshot_every(ufm_problem, solver)
    return ufm_problem, solver


def _auto_snapshot_every(problem, solver) -> int:
    """Snapshots for the NC1 curves: at most 200, and at most 32 MiB of parameters."""
    size = _num_params(problem)
    itemsize = 8 if solver["dtype"] == "float64" else 4
    count = max(2, min(_MAX_SNAPSHOTS, _SNAPSHOT_BUDGET_BYTES // (size * itemsize)))
    return max(1, math.ceil(solver["steps"] / count))


# ---------------------------------------------------------------------------------------------------------------
# solving (with optional chunked progress)


def run_solver(problem, solver: dict, progress=None):
    """Solve ``problem`` with the (resolved) solver options: one `ufm.solve` call, bit-identical to the Python API
    with the same options. ``progress(step, value, grad_norm)``, when given, is called from inside the compiled
    loop (`ufm.solve`'s ``progress``); Ctrl-C ends the solve at the next report with status "interrupted" and the
    point reached. JAX's persistent compilation cache is on (`ufm.enable_compilation_cache`; set
    ``UFM_NO_COMPILATION_CACHE=1`` to turn it off)."""
    import jax

    from ._cache import enable_compilation_cache
    from ._solver import solve

    if os.environ.get("UFM_NO_COMPILATION_CACHE") is None:
        try:
            enable_compilation_cache()  # JAX_COMPILATION_CACHE_DIR or ~/.cache/ufm/jax
        except OSError:
            pass  # an unwritable cache folder only costs compile time
    kw = dict(method=solver["method"], lr=solver["lr"], tol=solver["tol"], patience=solver["patience"],
              history_every=solver["history_every"], snapshot_every=solver["snapshot_every"] or None,
              momentum=solver["momentum"], memory_size=solver["memory_size"])
    # always a progress handler (a no-op without a terminal), so that Ctrl-C is honoured inside the compiled loop
    return solve(problem, key=jax.random.key(solver["seed"]), max_steps=solver["steps"],
                 init_scale=solver["init_scale"], dtype=solver["dtype"],
                 progress=progress if progress is not None else (lambda *a: None), **kw)


class _Progress:
    """Rewrites one status line on ``stream`` (a terminal)."""

    def __init__(self, stream, steps: int):
        self.stream, self.steps, self.t0 = stream, steps, time.perf_counter()
        self.stream.write("solving (compiling first) ...\r")
        self.stream.flush()

    def __call__(self, step, value, grad_norm):
        width = len(str(self.steps))
        self.stream.write(f"\rstep {step:>{width}}/{self.steps}   f = {value:.12e}   |grad f| = {grad_norm:.2e}   "
                          f"{time.perf_counter() - self.t0:6.1f} s ")
        self.stream.flush()

    def close(self):
        self.stream.write("\n")
        self.stream.flush()


# ---------------------------------------------------------------------------------------------------------------
# prediction, check, metrics (each degrades to a stated reason when its module is not available)


def _optional(module: str, name: str):
    """``ufm.<module>.<name>``, or None when that module is not part of this installation (an error inside an
    existing module is not hidden)."""
    import importlib

    try:
        return getattr(importlib.import_module(f"ufm.{module}"), name)
    except ModuleNotFoundError as e:
        if e.name == f"ufm.{module}":
            return None
        raise


def _predict(problem):
    predict = _optional("_theory", "predict")
    if predict is None:
        return None, "no prediction: ufm.predict is not available in this installation"
    return predict(problem), None


def _check(problem, solution, prediction, hessian: bool):
    check = _optional("_checks", "check")
    if check is None:
        return None, "no verdict: ufm.check is not available in this installation"
    return check(problem, solution, prediction, hessian=hessian), None


def _layer_metrics(problem, params):
    from . import metrics

    return metrics.layer_metrics(problem, params)


def _num_params(problem) -> int:
    hs, ws, bs = problem.param_shapes()
    return math.prod(hs) + sum(math.prod(s) for s in ws) + (bs[0] if bs else 0)


def _use_hessian(mode: str, problem) -> tuple[bool, str | None]:
    """--hessian auto: the second-order certificate (ufm.check's Hessian spectrum) only up to _HESSIAN_AUTO_MAX
    parameters (it costs about 4 s of CPU at 400 parameters and minutes at 10^4)."""
    n = _num_params(problem)
    if mode == "on":
        return True, None
    if mode == "off":
        return False, "second-order certificate skipped (--hessian off): 'matches' means first-order only"
    if n <= _HESSIAN_AUTO_MAX:
        return True, None
    return False, (f"second-order certificate skipped: {n:,} parameters > {_HESSIAN_AUTO_MAX} (--hessian on computes "
                   "it, slowly): 'matches' means first-order only")


def _analyse(problem, solution, hessian_mode: str):
    """prediction, check report, per-layer metrics and notes (what was not available or not done)."""
    notes = []
    prediction, why = _predict(problem)
    if why:
        notes.append(why)
    hessian, why = _use_hessian(hessian_mode, problem)
    check, why_check = _check(problem, solution, prediction, hessian)
    if why_check:
        notes.append(why_check)
    elif why:
        notes.append(why)
    metrics = _field(check, "metrics") or _layer_metrics(problem, solution.params)
    return prediction, check, metrics, notes


def _field(obj, name, default=None):
    if obj is None:
        return default
    if isinstance(obj, dict):
        return obj.get(name, default)
    return getattr(obj, name, default)


def _predicted_loss(prediction) -> tuple[float | None, bool]:
    """(the predicted loss, whether it is the proven/derived optimum). For ``known=False`` the loss, when finite,
    is the best known upper bound (an explicit candidate's objective); None when there is no number."""
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


def _predicted_sv(prediction, name: str, L: int):
    """Per-layer predicted singular values (list of L entries, None where not fixed) or None."""
    sv = _field(prediction, name)
    if sv is None:
        return None
    if isinstance(sv, dict):
        sv = [sv.get(f"{name[-1]}_{l + 1}", sv.get(l + 1)) for l in range(L)]
    sv = list(sv)
    if len(sv) != L:
        return None
    return sv


# ---------------------------------------------------------------------------------------------------------------
# report


def _versions() -> dict:
    out = {"python": platform.python_version(), "platform": platform.platform()}
    for pkg in ("ufm", "jax", "jaxlib", "optax", "numpy", "scipy", "matplotlib"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def _version() -> str:
    try:
        return metadata.version("ufm")
    except metadata.PackageNotFoundError:
        from . import __version__

        return __version__


def _device() -> str:
    import jax

    d = jax.devices()[0]
    return f"{d.platform}:{getattr(d, 'device_kind', str(d))} ({jax.device_count()} device(s))"


def _solution_summary(solution) -> dict:
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


def build_report(problem, solution, prediction, check, metrics, notes: list[str]) -> dict:
    """The JSON report: problem, solution, prediction, loss comparison, check (``ufm.check``'s Report without
    the metrics, prediction and problem it repeats), per-layer metrics (`ufm.metrics.layer_metrics`), notes."""
    value = float(solution.value)
    f_pred, known = _predicted_loss(prediction)
    comparison = {"loss": value, "predicted_loss": f_pred, "predicted_is_optimum": known, "gap": None,
                  "relative_gap": None}
    if f_pred is not None:
        comparison["gap"] = value - f_pred
        comparison["relative_gap"] = (value - f_pred) / max(abs(f_pred), 1e-300)
    return {
        "problem": problem.to_dict(),
        "solution": _solution_summary(solution),
        "comparison": comparison,
        "prediction": _io.to_jsonable(prediction) if prediction is not None else None,
        "check": _check_dict(check),
        "metrics": metrics,
        "notes": notes,
    }


def _check_dict(check) -> dict | None:
    if check is None:
        return None
    d = _io.to_jsonable(check)
    for k in ("metrics", "prediction", "problem"):
        d.pop(k, None)
    return d


def _wrap(label: str, text: str, width: int = 110) -> list[str]:
    import textwrap

    return textwrap.wrap(text, width=width, initial_indent=f"{label:<12}", subsequent_indent=" " * 12) or [label]


def _fmt(v, spec=".2e") -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float) and v == 0:
        return "0"
    return format(v, spec)


def format_report(report: dict, header: str) -> str:
    """The short human report: loss, predicted loss, gap, verdict, per-layer NC metrics."""
    sol, cmp_ = report["solution"], report["comparison"]
    lines = [header]
    run = report.get("run") or {}
    solver = report.get("solver") or {}
    t = f", {run['solve_time_s']:.1f} s" if "solve_time_s" in run else ""
    outcome = (f"stopped at max_steps = {sol['num_steps']}" if sol["status_name"] == "max_steps"
               else f"{sol['status_name']} after {sol['num_steps']} steps")
    lines.append(f"solver      {solver.get('method', '?')}, seed {solver.get('seed', '?')}, {sol['dtype']}: "
                 f"{outcome}, |grad f| = {sol['grad_norm']:.1e}"
                 f"{' (tol ' + format(solver['tol'], '.0e') + ')' if solver.get('tol') is not None else ''}{t}")
    if not sol["success"]:
        lines.extend(_wrap("", sol["message"]))
    lines.append(f"loss        {sol['value']:.15g}")
    pred = report.get("prediction")
    if cmp_["predicted_loss"] is not None:
        if cmp_.get("predicted_is_optimum", True):
            lines.append(f"predicted   {cmp_['predicted_loss']:.15g}  (the global optimum; regime "
                         f"{_field(pred, 'regime', '?')})")
        else:
            lines.append(f"best known  {cmp_['predicted_loss']:.15g}  (an upper bound, not a proven optimum; regime "
                         f"{_field(pred, 'regime', '?')})")
        lines.append(f"gap         {cmp_['gap']:+.2e}  (relative {cmp_['relative_gap']:+.2e})")
    elif pred is not None:
        lines.append("predicted   unknown")
    check = report.get("check")
    if check is not None:
        lines.append(f"verdict     {_field(check, 'verdict')}")
        expl = _field(check, "explanation")
        if expl:
            for para in str(expl).splitlines():
                lines.extend(_wrap("", para))
    for label, key in (("structure", "structure"), ("source", "reference"), ("caveat", "reason")):
        text = _field(pred, key)
        if text and text != "unknown":
            lines.extend(_wrap(label, str(text)))
    for why in report.get("notes", []):
        lines.extend(_wrap("note", why))
    m = report.get("metrics")
    if m:
        lines.append("per layer   NC1          NC2 (to predicted geometry)   rank")
        for f in m["features"]:
            tgt = f.get("nc2_target")
            nc2 = f"{_fmt(f['nc2'])} ({tgt})" if tgt else "n/a (no unique prediction)"
            lines.append(f"  {f['name']:<9} {_fmt(f['nc1']):<12} {nc2:<29} {f['numerical_rank']}")
        c = m.get("classifier", {})
        if c:
            lines.append(f"classifier  NC3 ({c.get('nc3_target')}) {_fmt(c.get('nc3_product'))}, "
                         f"NC4 (NCC mismatch) {_fmt(c.get('ncc_mismatch'))}")
    return "\n".join(lines)


def _header(problem) -> str:
    d = problem.to_dict()
    kind = {("relu", True): "deep ReLU UFM", ("linear", True): "deep linear UFM"}.get(
        (d["activation"], problem.L >= 2), "shallow UFM")
    lam = f"lam_H={d['lam_H']:g}, lam_W={d['lam_W'] if isinstance(d['lam_W'], list) else format(d['lam_W'], 'g')}"
    if d["bias"] == "reg":
        lam += f", lam_b={d['lam_b']:g}"
    if d["loss"] == "ce" and d["label_smoothing"]:
        lam += f", label_smoothing={d['label_smoothing']:g}"
    n = d["n_per_class"]
    return (f"{kind}: K={d['num_classes']}, n={n if isinstance(n, int) else ','.join(map(str, n))}, "
            f"widths {','.join(map(str, d['widths']))}, {d['activation']}, {d['loss']}, bias {d['bias']}, {lam}")


# ---------------------------------------------------------------------------------------------------------------
# figures


def draw_figures(problem, solution, prediction, metrics, *, folder: Path, fmt: str = "png", dpi: int = 150,
                 history_every: int = 1, tol: float | None = None, trace=None) -> list[Path]:
    """Draw the five figures of a results folder; returns the files written."""
    import matplotlib

    if matplotlib.get_backend().lower() not in ("agg", "pdf", "svg", "cairo"):
        matplotlib.use("Agg", force=False)  # a headless command never needs a GUI
    from . import plotting

    L = problem.L
    figs = {}
    if solution.history is not None:
        steps, nc1, names = trace if trace is not None else (None, None, None)
        f_pred, known = _predicted_loss(prediction)
        figs["training"] = plotting.training_curves(
            solution.history, predicted_loss=f_pred, predicted_known=known, history_every=history_every,
            nc1=nc1, nc1_steps=steps, layer_names=names, tol=tol)
    figs["collapse"] = plotting.collapse_bars(metrics)
    figs["gram"] = plotting.gram_heatmaps(problem, solution.params, prediction=prediction)
    figs["singular_values"] = plotting.singular_value_plot(
        problem, solution.params, predicted_W=_predicted_sv(prediction, "sv_W", L),
        predicted_H=_predicted_sv(prediction, "sv_H", L))
    figs["class_means"] = plotting.class_means_plot(problem, solution.params, dim=2 if problem.num_classes <= 3 else 3)
    written = []
    for name, fig in figs.items():
        path = folder / f"{name}.{fmt}"
        fig.savefig(path, dpi=dpi)
        written.append(path)
    return written


# ---------------------------------------------------------------------------------------------------------------
# commands


def _emit(report: dict, header: str, as_json: bool) -> None:
    if as_json:
        sys.stdout.write(json.dumps(_io.to_jsonable(report), indent=2, allow_nan=False) + "\n")
    else:
        sys.stdout.write(format_report(report, header) + "\n")
    sys.stdout.flush()


def _prepare_out(args) -> Path:
    if args.out is None:
        return _io.new_results_dir(".")
    out = args.out
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a folder")
    taken = [f for f in (_io.CONFIG_FILE, _io.REPORT_FILE, _io.SOLUTION_FILE) if (out / f).exists()]
    if taken and not args.overwrite:
        raise UsageError(f"--out {out} already holds results ({', '.join(taken)}); choose another folder or pass "
                         "--overwrite")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--out {out} cannot be created: {e.strerror}") from None
    return out


def cmd_solve(args, argv) -> int:
    import jax

    t_start = time.perf_counter()
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    problem, solver = resolve_config(args)
    if solver["dtype"] == "float64" and not jax.config.jax_enable_x64:
        raise UsageError("dtype float64 needs jax_enable_x64, which could not be turned on (JAX was used first)")
    out = _prepare_out(args)
    config = {"problem": problem.to_dict(), "solver": solver}

    show = args.progress == "always" or (args.progress == "auto" and sys.stderr.isatty())
    bar = _Progress(sys.stderr, solver["steps"]) if show else None
    t0 = time.perf_counter()
    try:
        solution = run_solver(problem, solver, bar)
        jax.block_until_ready(solution.value)
    finally:
        if bar is not None:
            bar.close()
    solve_time = time.perf_counter() - t0

    prediction, check, metrics, notes = _analyse(problem, solution, args.hessian)
    trace = None
    extras = {}
    if solution.snapshots is not None:
        from .plotting import nc1_over_training

        trace = nc1_over_training(problem, solution.snapshots)
        extras = {"trace_nc1_step": trace[0], "trace_nc1": trace[1]}

    report = build_report(problem, solution, prediction, check, metrics, notes)
    report["solver"] = solver
    files = [_io.CONFIG_FILE, _io.REPORT_FILE, _io.SOLUTION_FILE]
    report["run"] = {
        "command": [PROG, *argv],
        "started": started,
        "solve_time_s": solve_time,
        "progress_chunks": show,
        "seed": solver["seed"],
        "device": _device(),
        "x64": bool(jax.config.jax_enable_x64),
        "versions": _versions(),
        "results": str(out),
    }
    _io.save_solution(out / _io.SOLUTION_FILE, solution, history_every=solver["history_every"], extras=extras)
    _io.write_json(out / _io.CONFIG_FILE, config)
    if args.plots:
        figs = draw_figures(problem, solution, prediction, metrics, folder=out, history_every=solver["history_every"],
                            tol=solver["tol"], trace=trace)
        files += [p.name for p in figs]
    report["run"]["files"] = files
    report["run"]["wall_time_s"] = time.perf_counter() - t_start
    _io.write_json(out / _io.REPORT_FILE, report)
    _emit(report, _header(problem), args.json)
    if not args.json:
        sys.stdout.write(f"results     {out}{os.sep} ({', '.join(files)})\n")
    return 0


def _load(folder: Path):
    try:
        return _io.load_results(folder)
    except _io.ResultsError as e:
        raise UsageError(str(e)) from None


def cmd_check(args) -> int:
    res = _load(args.results)
    prediction, check, metrics, notes = _analyse(res.problem, res.solution, args.hessian)
    report = build_report(res.problem, res.solution, prediction, check, metrics, notes)
    report["solver"] = res.config.get("solver", {})
    report["results"] = str(res.folder)
    _emit(report, f"{_header(res.problem)}\n(re-checked from {res.folder})", args.json)
    return 0


def cmd_plot(args) -> int:
    res = _load(args.results)
    out = args.out or res.folder
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--out {out} cannot be created: {e.strerror}") from None
    prediction, _ = _predict(res.problem)
    metrics = _layer_metrics(res.problem, res.solution.params)
    trace = None
    if "trace_nc1_step" in res.extras and "trace_nc1" in res.extras:
        L = res.problem.L
        trace = (res.extras["trace_nc1_step"], res.extras["trace_nc1"], [f"H_{l + 1}" for l in range(L)])
    solver = res.config.get("solver", {}) if isinstance(res.config.get("solver"), dict) else {}
    he = solver.get("history_every", 1)
    files = draw_figures(res.problem, res.solution, prediction, metrics, folder=out, fmt=args.format, dpi=args.dpi,
                         history_every=he if isinstance(he, int) and he > 0 else 1, tol=solver.get("tol"), trace=trace)
    for p in files:
        sys.stdout.write(f"{p}\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``ufm`` command (``ufm = "ufm.cli:main"``); returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    prefix = PROG
    if argv[:1] == ["sweep"]:
        from ._sweep import sweep_main

        return sweep_main(argv[1:])
    try:
        import jax

        jax.config.update("jax_enable_x64", True)  # before any JAX computation of this process
        parser = _build_parser()
        args, extra = parser.parse_known_args(argv)
        prefix = f"{PROG} {args.command}"
        if extra:
            raise UsageError(f"unrecognized arguments: {' '.join(extra)} (see '{prefix} --help')")
        if args.command == "solve":
            return cmd_solve(args, argv)
        if args.command == "check":
            return cmd_check(args)
        return cmd_plot(args)
    except UsageError as e:
        sys.stderr.write(f"{e.prog or prefix}: error: {e}\n")
        return 2
    except SystemExit as e:  # --help / --version
        return e.code if isinstance(e.code, int) else 0
    except KeyboardInterrupt:
        sys.stderr.write(f"\n{prefix}: interrupted\n")
        return 130
    except BrokenPipeError:  # stdout closed early (e.g. piped into head): stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
