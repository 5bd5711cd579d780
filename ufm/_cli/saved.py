"""The commands on a saved results folder: ``ufm check`` (re-check it against `ufm.predict`, print the report; the
folder is not changed) and ``ufm plot`` (redraw its figures)."""

from __future__ import annotations

import sys
from pathlib import Path

from .. import _io
from .._report_text import emit, header, is_real
from .._terminal import PROG, UsageError
from .analysis import HESSIAN_AUTO_MAX, analyse, finite, layer_metrics
from .args import parse_int
from .figures import draw_figures
from .folders import load_folder, writable, write_error

MAX_DPI = 1200


def add_check_parser(sub) -> None:
    """The ``check`` subcommand: a results folder, ``--json`` and ``--hessian``."""
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
        help=f"second-order certificate (auto: on up to {HESSIAN_AUTO_MAX} parameters)",
    )


def add_plot_parser(sub) -> None:
    """The ``plot`` subcommand: a results folder, ``--out``, ``--format`` and ``--dpi``."""
    pp = sub.add_parser(
        "plot", help="redraw the figures of a saved solution", description="Redraw the figures of a results folder."
    )
    pp.add_argument("results", type=Path, help="a results folder written by 'ufm solve'")
    pp.add_argument("--out", type=Path, default=None, help="folder for the figures (default: the results folder)")
    pp.add_argument("--format", choices=("png", "pdf", "svg"), default="png", help="image format (default png)")
    pp.add_argument("--dpi", type=parse_int, default=150, help="resolution of png figures (default 150)")


def cmd_check(args) -> int:
    """``ufm check RESULTS``: the report of a saved solution, computed anew; exit code 0."""
    res = load_folder(args.results, args.hessian, extras=False)
    prediction, check, metrics, notes = analyse(res.problem, res.solution, args.hessian)
    report = _io.build_report(res.problem, res.solution, prediction, check, metrics, notes)
    report["solver"] = res.config.get("solver") if isinstance(res.config.get("solver"), dict) else {}
    report["results"] = str(res.folder)
    emit(report, f"{header(res.problem)}\n(re-checked from {res.folder})", args.json)
    return 0


def _nc1_trace(res, notes: list[str]):
    """``(steps, NC1 per layer, layer names)`` from the folder's ``trace_nc1_step``/``trace_nc1`` extras, or None
    (with a note when they are there but malformed)."""
    t_step, t_nc1 = res.extras.get("trace_nc1_step"), res.extras.get("trace_nc1")
    L = res.problem.L
    if t_step is not None and t_nc1 is not None and t_step.ndim == 1 and t_nc1.shape == (t_step.size, L):
        return (t_step, t_nc1, [f"H_{l + 1}" for l in range(L)])
    if t_step is not None or t_nc1 is not None:
        notes.append(f"NC1 trace not drawn: trace_nc1 must have shape (len(trace_nc1_step), L={L})")
    return None


def cmd_plot(args) -> int:
    """``ufm plot RESULTS``: redraw the figures (into ``--out`` or the folder); prints the files written and, on
    stderr, a note for each figure not drawn; exit code 0."""
    from .._theory import predict

    if not 1 <= args.dpi <= MAX_DPI:
        raise UsageError(f"--dpi must be an integer in [1, {MAX_DPI}]; got {args.dpi}")
    res = load_folder(args.results, "off", extras=("trace_nc1_step", "trace_nc1"))
    out = args.out or res.folder
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--out {out} cannot be created: {e.strerror or e}") from None
    writable(out, "--out" if args.out else "results folder")
    prediction = predict(res.problem)
    notes: list[str] = []
    metrics = layer_metrics(res.problem, res.solution.params, notes) if finite(res.solution) else None
    trace = _nc1_trace(res, notes)
    solver = res.config.get("solver", {}) if isinstance(res.config.get("solver"), dict) else {}
    tol = solver.get("tol") if is_real(solver.get("tol")) else None
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
        raise write_error(e) from None
    for p in files:
        sys.stdout.write(f"{p}\n")
    for why in notes:
        sys.stderr.write(f"{PROG} plot: note: {why}\n")
    return 0
