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

Exit codes (`ufm._terminal`): 0 when the command ran (whatever the verdict or the solver's status: a non-finite
run writes its report, with a note for each metric or figure that is undefined there); 2 for bad input or an
unusable environment (an unknown option or value, an invalid config field, a missing or malformed results
folder, an output folder that cannot be written, a full disk, a problem whose estimated memory exceeds what is
available), with one line on stderr naming the field or file and no traceback; 130 when interrupted (what came
back from the solver is saved; see `cmd_solve`).

Results folders are written and read by `ufm._io` (`ufm.save_results`, `ufm.load_results`): each file atomically,
and read back as untrusted input.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from . import _io, _memory, _report_text
from ._memory import estimate_memory as estimate_memory
from ._terminal import Parser as _Parser
from ._terminal import UsageError as UsageError
from ._terminal import exit_code
from ._terminal import version as _version
from ._terminal import versions as _versions

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


_MAX_DPI = 1200
_MAX_CONFIG_BYTES = 16 * 2**20


# ---------------------------------------------------------------------------------------------------------------
# argument parsing


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
# (flags, dest, type, help) for add_argument
_PROBLEM_OPTIONS: list[tuple[tuple[str, ...], str, Callable[[str], Any], str]] = [
    (("-K", "--num-classes"), "num_classes", _int, "K, the number of classes (default 2)"),
    (
        ("-n", "--n-per-class"),
        "n_per_class",
        _int_or_list,
        "n, samples per class, or a comma list n_1,...,n_K for unequal classes (default 50)",
    ),
    (
        ("--widths",),
        "widths",
        _int_list,
        "d_1,...,d_L: the feature dimension and the input widths of W_1..W_L; L = their number (default 64,64,64)",
    ),
    (("--activation",), "activation", str, "linear | relu, applied after W_1..W_{L-1} (default relu)"),
    (("--loss",), "loss", str, "mse | ce (default mse)"),
    (("--bias",), "bias", str, "none | free | reg: the output bias b (default none)"),
    (("--lam-H", "--lam-h"), "lam_H", _float, "lambda_H, weight decay on H (default 5e-3)"),
    (
        ("--lam-W", "--lam-w"),
        "lam_W",
        _float_or_list,
        "lambda_W, one value or a comma list with one per layer (default 5e-3)",
    ),
    (("--lam-b",), "lam_b", _float, "lambda_b > 0, only with --bias reg (default 0)"),
    (("--label-smoothing",), "label_smoothing", _float, "alpha in [0, 1), only with --loss ce (default 0)"),
]
_SOLVER_OPTIONS: list[tuple[tuple[str, ...], str, Callable[[str], Any], str]] = [
    (("--method",), "method", str, "lbfgs | gd | momentum | adam (default lbfgs)"),
    (
        ("--lr",),
        "lr",
        _float_or_default,
        "learning rate (default: the solver's, 1.0 for lbfgs, 0.1 gd/momentum, 1e-3 adam)",
    ),
    (("--steps",), "steps", _int_or_default, "step budget max_steps (default: 10000 lbfgs, 100000 others)"),
    (("--tol",), "tol", _float_or_default, "stop when ||grad f||_2 <= tol (default 1e-9 float64, 1e-5 float32)"),
    (("--seed",), "seed", _int, "seed of the random init, jax.random.key(seed) (default 0)"),
    (("--init-scale",), "init_scale", _float, "scale of the random init (default 1)"),
    (("--dtype",), "dtype", str, "float64 | float32 (default float64)"),
    (
        ("--patience",),
        "patience",
        _int_or_default,
        "steps without improvement before status 'stalled' (default 50 lbfgs, 1000 others)",
    ),
    (("--history-every",), "history_every", _int, "record loss and gradient norm every k steps (default 1)"),
    (
        ("--snapshot-every",),
        "snapshot_every",
        _int_or_default,
        "save parameters every k steps for the NC1 curves; 0 = none (default auto: at most 200 snapshots)",
    ),
    (("--momentum",), "momentum", _float, "momentum of --method momentum (default 0.9)"),
    (("--memory-size",), "memory_size", _int, "L-BFGS memory (default 10)"),
]


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Unconstrained features models of neural collapse: solve, check, plot.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="{solve,check,plot,explore,sweep}", parser_class=_Parser)
    sub.required = True

    ps = sub.add_parser(
        "solve",
        help="solve a UFM, check it against the theory, save and plot it",
        description="Solve a UFM (default: binary deep ReLU UFM, Súkeník et al. 2023, L = 3), check "
        "it against ufm.predict, print a report and write a results folder.",
    )
    g = ps.add_argument_group("problem (ufm.UFM fields)")
    for flags, dest, typ, help_ in _PROBLEM_OPTIONS:
        g.add_argument(*flags, dest=dest, type=typ, default=None, help=help_)
    g = ps.add_argument_group("solver (ufm.solve options)")
    for flags, dest, typ, help_ in _SOLVER_OPTIONS:
        g.add_argument(*flags, dest=dest, type=typ, default=None, help=help_)
    g = ps.add_argument_group("run")
    g.add_argument(
        "--config",
        type=Path,
        default=None,
        help="TOML or JSON file with [problem] and [solver] tables (options given here override it)",
    )
    g.add_argument(
        "--out",
        type=Path,
        default=None,
        help="results folder (default: a new ufm-results-DATE-TIME folder in the current directory)",
    )
    g.add_argument("--overwrite", action="store_true", help="allow --out to be a folder that already holds results")
    g.add_argument("--json", action="store_true", help="print the report as JSON on stdout (for scripts)")
    g.add_argument("--no-plots", dest="plots", action="store_false", help="do not draw the figures")
    g.add_argument(
        "--progress",
        choices=("auto", "always", "never"),
        default="auto",
        help="progress on stderr (auto: when stderr is a terminal); see 'Progress' in ufm.cli's docs",
    )
    g.add_argument(
        "--hessian",
        choices=("auto", "on", "off"),
        default="auto",
        help=f"second-order certificate in the check (auto: on up to {_HESSIAN_AUTO_MAX} parameters)",
    )

    pc = sub.add_parser(
        "check",
        help="re-check a saved solution",
        description="Re-check a saved solution against ufm.predict and print the report (the folder is not changed).",
    )
    pc.add_argument("results", type=Path, help="a results folder written by 'ufm solve'")
    pc.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    pc.add_argument(
        "--hessian",
        choices=("auto", "on", "off"),
        default="auto",
        help=f"second-order certificate (auto: on up to {_HESSIAN_AUTO_MAX} parameters)",
    )

    pp = sub.add_parser(
        "plot", help="redraw the figures of a saved solution", description="Redraw the figures of a results folder."
    )
    pp.add_argument("results", type=Path, help="a results folder written by 'ufm solve'")
    pp.add_argument("--out", type=Path, default=None, help="folder for the figures (default: the results folder)")
    pp.add_argument("--format", choices=("png", "pdf", "svg"), default="png", help="image format (default png)")
    pp.add_argument("--dpi", type=_int, default=150, help="resolution of png figures (default 150)")
    _add_explore_parser(sub)
    # 'ufm sweep' is parsed by ufm._sweep.sweep_main (main() hands it the rest of the command line)
    sub.add_parser("sweep", help="run a grid of solves into a resumable store (see 'ufm sweep --help')", add_help=False)
    return parser


# ---------------------------------------------------------------------------------------------------------------
# config: built-in defaults <- config file <- command line


def _normalise_key(k: str) -> str:
    k = k.replace("-", "_")
    for exact in ("lam_H", "lam_W"):
        if k.lower() == exact.lower():
            return exact
    return _SOLVER_ALIASES.get(k, k)


def read_config_data(path: str | os.PathLike) -> dict:
    """The top-level table of a ``--config`` file (TOML ``.toml`` or JSON ``.json``, at most
    ``_MAX_CONFIG_BYTES``); `UsageError` for a missing, oversized, unparsable or non-table file. Shared by
    ``ufm solve`` and ``ufm explore``."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--config: file {path} does not exist")
    suffix = path.suffix.lower()
    size = path.stat().st_size
    if size > _MAX_CONFIG_BYTES:
        raise UsageError(f"--config: {path} is {size:,} bytes; a config file is at most {_MAX_CONFIG_BYTES:,}")
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
                raise UsageError(
                    f"--config: {path}: unknown field {key!r} (problem fields: "
                    f"{', '.join(sorted(known_p))}; solver fields: {', '.join(sorted(known_s))})"
                )
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
    kw = dict(
        method=solver["method"],
        lr=solver["lr"],
        tol=solver["tol"],
        patience=solver["patience"],
        history_every=solver["history_every"],
        snapshot_every=solver["snapshot_every"] or None,
        momentum=solver["momentum"],
        memory_size=solver["memory_size"],
    )
    # always a progress handler (a no-op without a terminal), so that Ctrl-C is honoured inside the compiled loop
    return solve(
        problem,
        key=jax.random.key(solver["seed"]),
        max_steps=solver["steps"],
        init_scale=solver["init_scale"],
        dtype=solver["dtype"],
        progress=progress if progress is not None else (lambda *a: None),
        **kw,
    )


class _Progress:
    """Rewrites one status line on ``stream`` (a terminal)."""

    def __init__(self, stream, steps: int):
        self.stream, self.steps, self.t0 = stream, steps, time.perf_counter()
        self.stream.write("solving (compiling first) ...\r")
        self.stream.flush()

    def __call__(self, step, value, grad_norm):
        width = len(str(self.steps))
        self.stream.write(
            f"\rstep {step:>{width}}/{self.steps}   f = {value:.12e}   |grad f| = {grad_norm:.2e}   "
            f"{time.perf_counter() - self.t0:6.1f} s "
        )
        self.stream.flush()

    def close(self):
        self.stream.write("\n")
        self.stream.flush()


# ---------------------------------------------------------------------------------------------------------------
# prediction, check, metrics (each degrades to a stated reason when its module is not available)


def _predict(problem):
    from ._theory import predict

    return predict(problem), None


def _check(problem, solution, prediction, hessian: bool):
    from ._checks import check

    return check(problem, solution, prediction, hessian=hessian), None


def _layer_metrics(problem, params):
    from . import metrics

    return metrics.layer_metrics(problem, params)


def _num_params(problem) -> int:
    return problem.num_params


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
    return False, (
        f"second-order certificate skipped: {n:,} parameters > {_HESSIAN_AUTO_MAX} (--hessian on computes "
        "it, slowly): 'matches' means first-order only"
    )


def _finite(solution) -> bool:
    """The objective and every parameter finite: only then are metrics and figures of the parameters defined."""
    import jax
    import numpy as np

    leaves = jax.tree_util.tree_leaves(solution.params)
    return math.isfinite(float(solution.value)) and all(bool(np.all(np.isfinite(np.asarray(x)))) for x in leaves)


@contextlib.contextmanager
def _quiet_numerics():
    """Overflow/invalid warnings off: used only where the objective is already known not to be finite."""
    import numpy as np

    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def _analyse(problem, solution, hessian_mode: str):
    """prediction, check report, per-layer metrics and notes (what was not computed, and why).

    At a non-finite objective (status nonfinite_init or diverged, or a hand-edited file with NaN/inf parameters)
    the check still runs (its verdict is 'not-converged'), but the per-layer metrics are skipped with a note:
    metrics of non-finite features are undefined, and SVDs of them fail. A numerical failure inside the metrics
    of finite parameters (overflow at ~1e150) is also a note, never a traceback."""
    import numpy as np

    notes = []
    prediction, why = _predict(problem)
    if why:
        notes.append(why)
    finite = _finite(solution)
    hessian, why = _use_hessian(hessian_mode, problem)
    if finite:
        check, why_check = _check(problem, solution, prediction, hessian and finite)
    else:
        with _quiet_numerics():
            check, why_check = _check(problem, solution, prediction, False)
        why = None
    if why_check:
        notes.append(why_check)
    elif why:
        notes.append(why)
    metrics = _field(check, "metrics")
    if metrics is None and finite:
        try:
            metrics = _layer_metrics(problem, solution.params)
        except (np.linalg.LinAlgError, ArithmeticError) as e:
            notes.append(f"per-layer metrics not computed: {type(e).__name__}: {e}")
    elif metrics is None:
        notes.append(_nonfinite_note(solution, "per-layer metrics"))
    return prediction, check, metrics, notes


def _nonfinite_note(solution, what: str) -> str:
    summary = _io.solution_summary(solution)
    return (
        f"{what} skipped: the objective or the parameters are not finite (status {summary['status_name']}, "
        f"f = {summary['value']:g})"
    )


def _field(obj, name, default=None):
    if obj is None:
        return default
    if isinstance(obj, dict):
        return obj.get(name, default)
    return getattr(obj, name, default)


_predicted_loss = _io.predicted_loss


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


def _device() -> str:
    import jax

    d = jax.devices()[0]
    return f"{d.platform}:{getattr(d, 'device_kind', str(d))} ({jax.device_count()} device(s))"


build_report = _io.build_report


_is_real = _report_text.is_real
format_report = _report_text.format_report
_header = _report_text.header


# ---------------------------------------------------------------------------------------------------------------
# figures


def _savefig(fig, fh, *, dpi: int, fmt: str) -> None:
    fig.savefig(fh, dpi=dpi, format=fmt)


def draw_figures(
    problem,
    solution,
    prediction,
    metrics,
    *,
    folder: Path,
    fmt: str = "png",
    dpi: int = 150,
    history_every: int = 1,
    tol: float | None = None,
    trace=None,
    notes: list[str] | None = None,
) -> list[Path]:
    """Draw the five figures of a results folder (figures from `ufm.plotting`, built without pyplot, so no
    backend is chosen here); returns the files written, each written atomically.

    A figure that cannot be drawn (the parameter figures at a non-finite objective, or a numerical failure) is
    skipped and the reason appended to ``notes``; a file that cannot be written raises `OSError`."""
    import numpy as np

    from . import plotting

    notes = [] if notes is None else notes
    L = problem.L
    finite = _finite(solution)
    makers = {}
    if solution.history is not None:
        steps, nc1, names = trace if trace is not None else (None, None, None)
        f_pred, known = _predicted_loss(prediction)
        makers["training"] = lambda: plotting.training_curves(
            solution.history,
            predicted_loss=f_pred,
            predicted_known=known,
            history_every=history_every,
            nc1=nc1,
            nc1_steps=steps,
            layer_names=names,
            tol=tol,
        )
    if finite and metrics is not None:
        makers["collapse"] = lambda: plotting.collapse_bars(metrics)
    if finite:
        makers["gram"] = lambda: plotting.gram_heatmaps(problem, solution.params, prediction=prediction)
        makers["singular_values"] = lambda: plotting.singular_value_plot(
            problem,
            solution.params,
            predicted_W=_predicted_sv(prediction, "sv_W", L),
            predicted_H=_predicted_sv(prediction, "sv_H", L),
        )
        makers["class_means"] = lambda: plotting.class_means_plot(
            problem, solution.params, dim=2 if problem.num_classes <= 3 else 3
        )
    else:
        notes.append(_nonfinite_note(solution, "figures " + ", ".join(n for n in _FIGURES if n != "training")))
    written = []
    for name, make in makers.items():
        path = folder / f"{name}.{fmt}"
        try:
            with _quiet_numerics() if not finite else contextlib.nullcontext():
                fig = make()
                _io.atomic_write(path, partial(_savefig, fig, dpi=dpi, fmt=fmt))
        except (np.linalg.LinAlgError, ArithmeticError) as e:
            notes.append(f"figure {name} not drawn: {type(e).__name__}: {e}")
            continue
        written.append(path)
    return written


# ---------------------------------------------------------------------------------------------------------------
# resources


def _check_memory(problem, solver: dict | None, hessian_mode: str, what: str) -> None:
    """Refuse, before any compute, a problem whose estimated memory exceeds what is available (`ufm._memory`)."""
    hessian, _ = _use_hessian(hessian_mode, problem)
    why = _memory.memory_refusal(problem, solver, hessian, what)
    if why:
        raise UsageError(why)


# ---------------------------------------------------------------------------------------------------------------
# commands


def _emit(report: dict, header: str, as_json: bool) -> None:
    if as_json:
        sys.stdout.write(json.dumps(_io.to_jsonable(report), indent=2, allow_nan=False) + "\n")
    else:
        sys.stdout.write(format_report(report, header) + "\n")
    sys.stdout.flush()


def _writable(folder: Path, flag: str) -> None:
    try:
        _io.check_writable(folder)
    except OSError as e:
        raise UsageError(f"{flag} {folder} is not writable: {e.strerror or e}") from None


def _prepare_out(args) -> tuple[Path, bool]:
    """The results folder, created if needed and checked writable; ``(folder, created)``."""
    if args.out is None:
        try:
            out = _io.new_results_dir(".")
        except OSError as e:
            raise UsageError(f"cannot create a results folder in {Path.cwd()}: {e.strerror or e}") from None
        created = True
    else:
        out = args.out
        if out.exists() and not out.is_dir():
            raise UsageError(f"--out {out} exists and is not a folder")
        taken = [f for f in (_io.CONFIG_FILE, _io.REPORT_FILE, _io.SOLUTION_FILE) if (out / f).exists()]
        if taken and not args.overwrite:
            raise UsageError(
                f"--out {out} already holds results ({', '.join(taken)}); choose another folder or pass --overwrite"
            )
        created = not out.exists()
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UsageError(f"--out {out} cannot be created: {e.strerror or e}") from None
    try:
        _writable(out, "--out")
    except UsageError:
        _discard(out, created)
        raise
    return out, created


def _discard(folder: Path, created: bool) -> bool:
    """Remove ``folder`` if this command created it and it is still empty; True if removed."""
    if created:
        with contextlib.suppress(OSError):
            folder.rmdir()
            return True
    return False


def _write_error(e: OSError) -> UsageError:
    return UsageError(f"cannot write {e.filename or 'the results'}: {e.strerror or e}")


def _status_name(solution) -> str:
    return _io.solution_summary(solution)["status_name"]


def _clear_old_results(out: Path) -> None:
    """Before overwriting: remove the old report.json first (a folder without it is incomplete) and the old
    figures (a figure this run does not draw must not survive from the last one)."""
    for name in (_io.REPORT_FILE, *(f"{f}.{ext}" for f in _FIGURES for ext in ("png", "pdf", "svg"))):
        try:
            (out / name).unlink()
        except FileNotFoundError:
            pass
        except OSError as e:
            raise UsageError(f"--overwrite: cannot remove {out / name}: {e.strerror or e}") from None


def _solve_or_none(problem, solver: dict, show: bool):
    """`run_solver` with the progress line; None when Ctrl-C arrived before a solution came back."""
    import jax

    bar = _Progress(sys.stderr, solver["steps"]) if show else None
    try:
        solution = run_solver(problem, solver, bar)
        jax.block_until_ready(solution.value)
        return solution
    except KeyboardInterrupt:
        return None
    finally:
        if bar is not None:
            bar.close()


def _save_inputs(out: Path, created: bool, config: dict, solution, history_every: int) -> None:
    """config.json, then solution.npz (atomically each). On a write error: a folder this command created loses
    what it got and is removed; an overwritten folder keeps whole files and no report.json (incomplete)."""
    try:
        _io.write_json(out / _io.CONFIG_FILE, config)
        _io.save_solution(out / _io.SOLUTION_FILE, solution, history_every=history_every)
    except OSError as e:
        if created:
            with contextlib.suppress(OSError):
                (out / _io.CONFIG_FILE).unlink()
            _discard(out, created)
        raise _write_error(e) from None


def _analyse_and_draw(args, problem, solution, solver: dict, out: Path, interrupted: bool):
    """prediction, check, metrics, notes and figure files; the NC1 trace (from snapshots) is added to
    solution.npz. An interrupted solve is not checked (a note says how to); Ctrl-C here keeps what was done."""
    prediction, check, metrics = None, None, None
    notes: list[str] = []
    files: list[str] = []
    try:
        if interrupted:
            notes.append(
                f"the solve was interrupted after {int(solution.num_steps)} steps: the check and the "
                f"figures were skipped; run 'ufm check {out}' to check what was reached"
            )
            prediction, _ = _predict(problem)
            return prediction, check, metrics, notes, files, interrupted
        prediction, check, metrics, notes = _analyse(problem, solution, args.hessian)
        trace = None
        if solution.snapshots is not None and _finite(solution):
            from .plotting import nc1_over_training

            trace = nc1_over_training(problem, solution.snapshots)
            _io.save_solution(
                out / _io.SOLUTION_FILE,
                solution,
                history_every=solver["history_every"],
                extras={"trace_nc1_step": trace[0], "trace_nc1": trace[1]},
            )
        if args.plots:
            figs = draw_figures(
                problem,
                solution,
                prediction,
                metrics,
                folder=out,
                history_every=solver["history_every"],
                tol=solver["tol"],
                trace=trace,
                notes=notes,
            )
            files = [p.name for p in figs]
    except KeyboardInterrupt:
        interrupted = True
        notes.append(
            "interrupted during the check or the figures: what is missing was skipped; run "
            f"'ufm check {out}' / 'ufm plot {out}' to complete it"
        )
    except OSError as e:
        raise _write_error(e) from None
    return prediction, check, metrics, notes, files, interrupted


def cmd_solve(args, argv) -> int:
    """``ufm solve``. Files are written in the order config.json, solution.npz, figures, report.json, each
    atomically; report.json (which lists the files) marks a complete folder. Ctrl-C: during the solve with
    nothing reached, the folder is removed (when this command created it); once a solution came back (also one
    with status 'interrupted'), config, solution and a report with a note are saved and the exit code is 130."""
    import jax

    t_start = time.perf_counter()
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    problem, solver = resolve_config(args)
    if solver["dtype"] == "float64" and not jax.config.read("jax_enable_x64"):
        raise UsageError("dtype float64 needs jax_enable_x64, which could not be turned on (JAX was used first)")
    _check_memory(problem, solver, args.hessian, "this problem")
    out, created = _prepare_out(args)
    if not created and any((out / f).exists() for f in (_io.CONFIG_FILE, _io.REPORT_FILE, _io.SOLUTION_FILE)):
        _clear_old_results(out)  # --overwrite of a results folder (refused without it by _prepare_out)
    config = {"problem": problem.to_dict(), "solver": solver, "made_by": _io.made_by()}

    show = args.progress == "always" or (args.progress == "auto" and sys.stderr.isatty())
    t0 = time.perf_counter()
    solution = _solve_or_none(problem, solver, show)
    if solution is None:
        gone = _discard(out, created)
        sys.stderr.write(
            f"\n{PROG} solve: interrupted before a solution came back; nothing saved"
            f"{f' (removed the empty folder {out})' if gone else ''}\n"
        )
        return 130
    solve_time = time.perf_counter() - t0
    try:
        _save_inputs(out, created, config, solution, solver["history_every"])
    except KeyboardInterrupt:  # the atomic writes left whole files or none
        sys.stderr.write(f"\n{PROG} solve: interrupted while saving; {out} is incomplete (no report.json)\n")
        return 130
    prediction, check, metrics, notes, figs, interrupted = _analyse_and_draw(
        args, problem, solution, solver, out, _status_name(solution) == "interrupted"
    )

    report = build_report(problem, solution, prediction, check, metrics, notes)
    report["solver"] = solver
    files = [_io.CONFIG_FILE, _io.REPORT_FILE, _io.SOLUTION_FILE, *figs]
    report["run"] = {
        "command": [PROG, *argv],
        "started": started,
        "solve_time_s": solve_time,
        "progress_chunks": show,
        "seed": solver["seed"],
        "device": _device(),
        "x64": bool(jax.config.read("jax_enable_x64")),
        "versions": _versions(),
        "results": str(out),
        "files": files,
        "interrupted": interrupted,
        "wall_time_s": time.perf_counter() - t_start,
    }
    try:
        _io.write_json(out / _io.REPORT_FILE, report)
    except OSError as e:
        raise _write_error(e) from None
    _emit(report, _header(problem), args.json)
    if not args.json:
        sys.stdout.write(f"results     {out}{os.sep} ({', '.join(files)})\n")
    return 130 if interrupted else 0


def _load(folder: Path, hessian_mode: str, extras):
    """Read config.json, size the problem (refusing it before reading the arrays if it cannot fit in memory),
    then read solution.npz; `UsageError` naming the file and field on any problem."""
    try:
        _, problem = _io.read_config(folder)
        _check_memory(problem, None, hessian_mode, f"the problem of {folder}")
        return _io.load_results(folder, extras=extras)
    except _io.ResultsError as e:
        raise UsageError(str(e)) from None


def cmd_check(args) -> int:
    res = _load(args.results, args.hessian, extras=False)
    prediction, check, metrics, notes = _analyse(res.problem, res.solution, args.hessian)
    report = build_report(res.problem, res.solution, prediction, check, metrics, notes)
    report["solver"] = res.config.get("solver") if isinstance(res.config.get("solver"), dict) else {}
    report["results"] = str(res.folder)
    _emit(report, f"{_header(res.problem)}\n(re-checked from {res.folder})", args.json)
    return 0


def cmd_plot(args) -> int:
    if not 1 <= args.dpi <= _MAX_DPI:
        raise UsageError(f"--dpi must be an integer in [1, {_MAX_DPI}]; got {args.dpi}")
    res = _load(args.results, "off", extras=("trace_nc1_step", "trace_nc1"))
    out = args.out or res.folder
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--out {out} cannot be created: {e.strerror or e}") from None
    _writable(out, "--out" if args.out else "results folder")
    prediction, _ = _predict(res.problem)
    notes: list[str] = []
    metrics = None
    if _finite(res.solution):
        import numpy as np

        try:
            metrics = _layer_metrics(res.problem, res.solution.params)
        except (np.linalg.LinAlgError, ArithmeticError) as e:
            notes.append(f"per-layer metrics not computed: {type(e).__name__}: {e}")
    trace = None
    t_step, t_nc1 = res.extras.get("trace_nc1_step"), res.extras.get("trace_nc1")
    L = res.problem.L
    if t_step is not None and t_nc1 is not None and t_step.ndim == 1 and t_nc1.shape == (t_step.size, L):
        trace = (t_step, t_nc1, [f"H_{l + 1}" for l in range(L)])
    elif t_step is not None or t_nc1 is not None:
        notes.append(f"NC1 trace not drawn: trace_nc1 must have shape (len(trace_nc1_step), L={L})")
    solver = res.config.get("solver", {}) if isinstance(res.config.get("solver"), dict) else {}
    tol = solver.get("tol") if _is_real(solver.get("tol")) else None
    try:
        files = draw_figures(
            res.problem,
            res.solution,
            prediction,
            metrics,
            folder=out,
            fmt=args.format,
            dpi=args.dpi,
            history_every=res.history_every,
            tol=tol,
            trace=trace,
            notes=notes,
        )
    except OSError as e:
        raise _write_error(e) from None
    for p in files:
        sys.stdout.write(f"{p}\n")
    for why in notes:
        sys.stderr.write(f"{PROG} plot: note: {why}\n")
    return 0


# ---------------------------------------------------------------------------------------------------------------
# ufm explore: the global search of ufm.explore, into a results folder

# The K = 6, L = 4 setting of Súkeník, Mondelli, Lampert (2024) where DNC is not optimal (THEORY.md §4.3).
EXPLORE_DEFAULT_PROBLEM: dict[str, Any] = {
    "num_classes": 6,
    "n_per_class": 1,
    "widths": [11, 11, 11, 11],
    "activation": "relu",
    "loss": "mse",
    "bias": "none",
    "lam_H": 4e-3,
    "lam_W": 4e-3,
    "lam_b": 0.0,
    "label_smoothing": 0.0,
}
EXPLORE_DEFAULTS: dict[str, Any] = {
    "time_budget": 150.0,
    "max_starts": None,
    "seed": 0,
    "batch_size": 16,
    "steps": 400,
    "strategies": None,
}
_EXPLORE_FIGURES = ("minima", "gram", "gram_spectra")


def _strategy_list(text: str):
    return [s.strip() for s in text.split(",") if s.strip()]


def _add_explore_parser(sub) -> None:
    pe = sub.add_parser(
        "explore",
        help="search for the global optimum where theory is open (ufm.explore)",
        description="Run ufm.explore: a budgeted portfolio of batched L-BFGS starts (explicit DNC/SRG "
        "candidates, random, low-rank, perturbed, continuation in lambda, basin hopping). Default "
        "problem: K=6, n=1, widths 11,11,11,11, deep ReLU, MSE, no bias, lambda=0.004. Writes "
        "config.json, report.json, best.npz, best.json and figures.",
    )
    g = pe.add_argument_group("problem (ufm.UFM fields)")
    for flags, dest, typ, help_ in _PROBLEM_OPTIONS:
        d = EXPLORE_DEFAULT_PROBLEM[dest]
        d = ",".join(map(str, d)) if isinstance(d, list) else d
        g.add_argument(*flags, dest=dest, type=typ, default=None, help=f"{help_.split(' (default')[0]} (default {d})")
    g = pe.add_argument_group("search (ufm.explore options)")
    g.add_argument(
        "--time-budget",
        dest="time_budget",
        type=_float,
        default=None,
        help="seconds (default 150; loosely: no round starts that would end past it)",
    )
    g.add_argument(
        "--max-starts",
        dest="max_starts",
        type=_int,
        default=None,
        help="number of starts (deterministic for a fixed --seed; default: no limit)",
    )
    g.add_argument("--seed", dest="seed", type=_int, default=None, help="seed of the search (default 0)")
    g.add_argument("--batch-size", dest="batch_size", type=_int, default=None, help="starts per round (default 16)")
    g.add_argument("--steps", dest="steps", type=_int, default=None, help="L-BFGS steps per round (default 400)")
    g.add_argument(
        "--strategies",
        dest="strategies",
        type=_strategy_list,
        default=None,
        help="comma list, a subset of explicit,random,low-rank,perturbed,continuation,hop,rank-hop,gd "
        "(default all but gd)",
    )
    g = pe.add_argument_group("run")
    g.add_argument(
        "--config",
        type=Path,
        default=None,
        help="TOML or JSON file with a [problem] table and an optional [explore] table",
    )
    g.add_argument("--out", type=Path, default=None, help="results folder (default: a new ufm-explore-DATE-TIME)")
    g.add_argument("--overwrite", action="store_true", help="allow --out to be a folder that already holds results")
    g.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    g.add_argument("--no-plots", dest="plots", action="store_false", help="do not draw the figures")
    g.add_argument(
        "--progress",
        choices=("auto", "always", "never"),
        default="auto",
        help="one line per round on stderr (auto: when stderr is a terminal)",
    )
    g.add_argument(
        "--hessian",
        choices=("auto", "on", "off"),
        default="auto",
        help=f"second-order certificate in the checks (auto: on up to {_HESSIAN_AUTO_MAX} parameters)",
    )


def resolve_explore_config(args) -> tuple[Any, dict]:
    """Defaults <- --config ([problem], [explore]) <- options; validated before any compute."""
    from ._explore import STRATEGIES

    problem = dict(EXPLORE_DEFAULT_PROBLEM)
    search = dict(EXPLORE_DEFAULTS)
    if args.config is not None:
        path = Path(args.config)
        data = read_config_data(path)
        for k, v in (data.get("problem") or {}).items():
            nk = _normalise_key(k)
            if nk not in DEFAULT_PROBLEM:
                raise UsageError(f"--config: {path}: unknown field {k!r} in [problem]")
            problem[nk] = v
        for k, v in (data.get("explore") or {}).items():
            nk = k.replace("-", "_")
            if nk not in EXPLORE_DEFAULTS:
                raise UsageError(
                    f"--config: {path}: unknown field {k!r} in [explore] (fields: {', '.join(EXPLORE_DEFAULTS)})"
                )
            search[nk] = v
    for _, dest, _, _ in _PROBLEM_OPTIONS:
        v = getattr(args, dest)
        if v is not None:
            problem[dest] = v
    for name in EXPLORE_DEFAULTS:
        v = getattr(args, name)
        if v is not None:
            search[name] = v
    try:
        ufm_problem = _io.problem_from_dict(problem, "problem")
    except _io.ResultsError as e:
        raise UsageError(str(e)) from None
    tb = search["time_budget"]
    if tb is not None and (isinstance(tb, bool) or not isinstance(tb, (int, float)) or not tb > 0):
        raise UsageError(f"time_budget must be a number of seconds > 0; got {tb!r}")
    for name in ("max_starts", "batch_size", "steps", "seed"):
        v = search[name]
        if v is None and name == "max_starts":
            continue
        if isinstance(v, bool) or not isinstance(v, int) or v < (0 if name == "seed" else 1):
            raise UsageError(f"{name} must be a {'non-negative' if name == 'seed' else 'positive'} integer; got {v!r}")
    st = search["strategies"]
    if st is not None:
        if not isinstance(st, list) or any(s not in STRATEGIES for s in st):
            raise UsageError(f"strategies must be a comma list of {', '.join(STRATEGIES)}; got {st!r}")
    return ufm_problem, search


def format_exploration(ex, header: str) -> str:
    """The human-readable summary of an exploration."""
    lines = [header, ex.message]
    for name, v in ex.explicit.items():
        r = f"  ({v / ex.dnc_loss:.4f} x DNC)" if math.isfinite(ex.dnc_loss) else ""
        lines.append(f"  explicit {name:<9s} {v:.10g}{r}")
    lines.append(
        f"  best found         {ex.value:.10g}"
        + (f"  ({ex.ratio_to_dnc:.4f} x DNC)" if math.isfinite(ex.ratio_to_dnc) else "")
    )
    if ex.minima:
        lines.append(f"  structure          {ex.minima[0].description}")
    for label, rep in (("check vs DNC", ex.check_dnc), ("check vs predict", ex.check_best)):
        if rep is not None:
            lines.append(f"  {label:<18s} {rep.verdict}: {rep.explanation}")
    lines.append("  minima (loss, count, first strategy):")
    for m in ex.minima[:10]:
        r = f" = {m.value / ex.dnc_loss:.4f} x DNC" if math.isfinite(ex.dnc_loss) else ""
        lines.append(f"    {m.value:.10g}{r}  x{m.count:<3d} {m.strategy}")
    lines.append(
        "  strategies: "
        + "; ".join(f"{k} {v['starts']} starts, {v['minima']} minima" for k, v in ex.strategies.items())
    )
    lines.append(f"  time {ex.time:.1f} s, {ex.num_starts} starts, {ex.num_rounds} rounds")
    return "\n".join(lines)


def cmd_explore(args, argv) -> int:
    import jax
    import numpy as np

    from . import _explore

    t_start = time.perf_counter()
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    problem, search = resolve_explore_config(args)
    if args.out is None:
        out = _io.new_results_dir(".", prefix="ufm-explore")
    else:
        out = args.out
        if out.exists() and not out.is_dir():
            raise UsageError(f"--out {out} exists and is not a folder")
        if (out / _io.REPORT_FILE).exists() and not args.overwrite:
            raise UsageError(f"--out {out} already holds results; choose another folder or pass --overwrite")
        out.mkdir(parents=True, exist_ok=True)
    show = args.progress == "always" or (args.progress == "auto" and sys.stderr.isatty())
    hessian, note = _use_hessian(args.hessian, problem)
    if os.environ.get("UFM_NO_COMPILATION_CACHE") is None:  # the compile dominates short searches: as ufm solve
        from ._cache import enable_compilation_cache

        try:
            enable_compilation_cache()  # JAX_COMPILATION_CACHE_DIR or ~/.cache/ufm/jax
        except OSError:
            pass  # an unwritable cache folder only costs compile time
    ex = _explore.explore(
        problem,
        time_budget=search["time_budget"],
        max_starts=search["max_starts"],
        key=jax.random.key(search["seed"]),
        progress=True if show else None,
        strategies=search["strategies"] or _explore.DEFAULT_STRATEGIES,
        batch_size=search["batch_size"],
        steps=search["steps"],
        check_hessian=hessian,
    )
    best = _explore.structure(problem, ex.params)
    best_info = {"value": ex.value, "ratio_to_dnc": ex.ratio_to_dnc, **best}
    report: dict[str, Any] = {
        "exploration": ex.to_dict(),
        "best": best_info,
        "check_dnc": None if ex.check_dnc is None else ex.check_dnc.to_dict(),
        "check_best": None if ex.check_best is None else ex.check_best.to_dict(),
        "notes": [note] if note else [],
    }
    files = [_io.CONFIG_FILE, _io.REPORT_FILE, "best.npz", "best.json"]
    report["run"] = {
        "command": [PROG, *argv],
        "started": started,
        "seed": search["seed"],
        "device": _device(),
        "x64": bool(jax.config.jax_enable_x64),  # type: ignore[attr-defined]  # runtime option; the stub omits it
        "versions": _versions(),
        "results": str(out),
    }
    arrays: dict[str, Any] = {"H": np.asarray(ex.params.H), "value": np.asarray(ex.value)}
    for i, W in enumerate(ex.params.Ws):
        arrays[f"W{i + 1}"] = np.asarray(W)
    if ex.params.b is not None:
        arrays["b"] = np.asarray(ex.params.b)
    np.savez(out / "best.npz", **arrays)
    _io.write_json(out / "best.json", best_info)
    _io.write_json(out / _io.CONFIG_FILE, {"problem": problem.to_dict(), "explore": search})
    if args.plots:
        files += [p.name for p in draw_explore_figures(problem, ex, folder=out)]
    report["run"]["files"] = files
    report["run"]["wall_time_s"] = time.perf_counter() - t_start
    _io.write_json(out / _io.REPORT_FILE, report)
    if args.json:
        sys.stdout.write(json.dumps(_io.to_jsonable(report), indent=2, allow_nan=False) + "\n")
    else:
        sys.stdout.write(format_exploration(ex, _header(problem)) + "\n")
        sys.stdout.write(f"results     {out}{os.sep} ({', '.join(files)})\n")
    return 0


def draw_explore_figures(problem, ex, *, folder: Path, fmt: str = "png", dpi: int = 150) -> list[Path]:
    """The figures of an explore results folder: minima per strategy, the best point's Grams and spectra."""
    from . import plotting  # figures without pyplot: no backend to choose

    ref = None
    try:
        from ._theory import construct

        ref = construct(problem, "dnc") if math.isfinite(ex.dnc_loss) else None
    except ValueError:
        ref = None
    figs = {
        "minima": plotting.exploration_minima(ex),
        "gram": plotting.gram_heatmaps(problem, ex.params, title="best point found: class-mean Grams"),
        "gram_spectra": plotting.gram_spectra_plot(
            problem, ex.params, reference=ref, title="best point found: class-mean Gram spectra"
        ),
    }
    written = []
    for name, fig in figs.items():
        path = Path(folder) / f"{name}.{fmt}"
        fig.savefig(path, dpi=dpi)
        written.append(path)
    return written


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
        if args.command == "explore":
            return cmd_explore(args, argv)
        return cmd_plot(args)
    except UsageError as e:
        return exit_code(e, prefix)
    except (SystemExit, KeyboardInterrupt, BrokenPipeError) as e:  # --help, Ctrl-C, a closed stdout
        return exit_code(e, prefix)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
