"""``ufm solve``: solve a UFM (one `ufm.solve` call, with a progress line and Ctrl-C honoured inside the compiled
loop), check it against `ufm.predict`, draw it, and write a results folder.

`cmd_solve` takes the solver and the analysis as arguments (`run_solver`, `ufm._cli.analysis.analyse` by
default): `ufm.cli.main` passes its own, which tests replace to interrupt a solve or a check.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from .. import _io
from .._report_text import emit, header
from .._terminal import PROG, UsageError, device, versions
from .analysis import HESSIAN_AUTO_MAX, analyse, check_memory, finite
from .args import PROBLEM_OPTIONS, SOLVER_OPTIONS
from .config import resolve_config, use_compilation_cache
from .figures import draw_figures
from .folders import clear_old_results, discard, prepare_out, save_inputs, status_name, write_error


def add_solve_parser(sub) -> None:
    """The ``solve`` subcommand's options: every `ufm.UFM` field, every `ufm.solve` option, and the run's."""
    ps = sub.add_parser(
        "solve",
        help="solve a UFM, check it against the theory, save and plot it",
        description="Solve a UFM (default: binary deep ReLU UFM, Súkeník et al. 2023, L = 3), check "
        "it against ufm.predict, print a report and write a results folder.",
    )
    g = ps.add_argument_group("problem (ufm.UFM fields)")
    for flags, dest, typ, help_ in PROBLEM_OPTIONS:
        g.add_argument(*flags, dest=dest, type=typ, default=None, help=help_)
    g = ps.add_argument_group("solver (ufm.solve options)")
    for flags, dest, typ, help_ in SOLVER_OPTIONS:
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
        help=f"second-order certificate in the check (auto: on up to {HESSIAN_AUTO_MAX} parameters)",
    )


def run_solver(problem, solver: dict, progress=None):
    """Solve ``problem`` with the (resolved) solver options: one `ufm.solve` call, bit-identical to the Python API
    with the same options. ``progress(step, value, grad_norm)``, when given, is called from inside the compiled
    loop (`ufm.solve`'s ``progress``); Ctrl-C ends the solve at the next report with status "interrupted" and the
    point reached. JAX's persistent compilation cache is on (`ufm.enable_compilation_cache`; set
    ``UFM_NO_COMPILATION_CACHE=1`` to turn it off)."""
    import jax

    from .._solver import solve

    use_compilation_cache()
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
        # "auto" (None: the default, "auto") or a number, as ufm.solve takes it (the zero-saddle restart included)
        init_scale="auto" if solver["init_scale"] is None else solver["init_scale"],
        dtype=solver["dtype"],
        progress=progress if progress is not None else (lambda *a: None),
        **kw,
    )


class Progress:
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


def solve_or_none(problem, solver: dict, show: bool, run: Callable = run_solver):
    """``run(problem, solver, progress)`` (`run_solver`) with the progress line; None when Ctrl-C arrived before a
    solution came back."""
    import jax

    bar = Progress(sys.stderr, solver["steps"]) if show else None
    try:
        solution = run(problem, solver, bar)
        jax.block_until_ready(solution.value)
        return solution
    except KeyboardInterrupt:
        return None
    finally:
        if bar is not None:
            bar.close()


def analyse_and_draw(args, problem, solution, solver: dict, out: Path, interrupted: bool, analyse: Callable = analyse):
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
            from .._theory import predict

            prediction = predict(problem)
            return prediction, check, metrics, notes, files, interrupted
        prediction, check, metrics, notes = analyse(problem, solution, args.hessian)
        trace = None
        if solution.snapshots is not None and finite(solution):
            from ..plotting import nc1_over_training

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
        raise write_error(e) from None
    return prediction, check, metrics, notes, files, interrupted


def cmd_solve(args, argv, run_solver: Callable = run_solver, analyse: Callable = analyse) -> int:
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
    check_memory(problem, solver, args.hessian, "this problem")
    out, created = prepare_out(args)
    if not created and any((out / f).exists() for f in (_io.CONFIG_FILE, _io.REPORT_FILE, _io.SOLUTION_FILE)):
        clear_old_results(out)  # --overwrite of a results folder (refused without it by prepare_out)
    config = {"problem": problem.to_dict(), "solver": solver, "made_by": _io.made_by()}

    show = args.progress == "always" or (args.progress == "auto" and sys.stderr.isatty())
    t0 = time.perf_counter()
    solution = solve_or_none(problem, solver, show, run_solver)
    if solution is None:
        gone = discard(out, created)
        sys.stderr.write(
            f"\n{PROG} solve: interrupted before a solution came back; nothing saved"
            f"{f' (removed the empty folder {out})' if gone else ''}\n"
        )
        return 130
    solve_time = time.perf_counter() - t0
    try:
        save_inputs(out, created, config, solution, solver["history_every"])
    except KeyboardInterrupt:  # the atomic writes left whole files or none
        sys.stderr.write(f"\n{PROG} solve: interrupted while saving; {out} is incomplete (no report.json)\n")
        return 130
    prediction, check, metrics, notes, figs, interrupted = analyse_and_draw(
        args, problem, solution, solver, out, status_name(solution) == "interrupted", analyse
    )

    report = _io.build_report(problem, solution, prediction, check, metrics, notes)
    report["solver"] = solver
    files = [_io.CONFIG_FILE, _io.REPORT_FILE, _io.SOLUTION_FILE, *figs]
    report["run"] = {
        "command": [PROG, *argv],
        "started": started,
        "solve_time_s": solve_time,
        "progress_chunks": show,
        "seed": solver["seed"],
        "device": device(),
        "x64": bool(jax.config.read("jax_enable_x64")),
        "versions": versions(),
        "results": str(out),
        "files": files,
        "interrupted": interrupted,
        "wall_time_s": time.perf_counter() - t_start,
    }
    try:
        _io.write_json(out / _io.REPORT_FILE, report)
    except OSError as e:
        raise write_error(e) from None
    emit(report, header(problem), args.json)
    if not args.json:
        sys.stdout.write(f"results     {out}{os.sep} ({', '.join(files)})\n")
    return 130 if interrupted else 0
