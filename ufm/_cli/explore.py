"""``ufm explore``: the global search of `ufm.explore` (`ufm._explore`), into a results folder.

Moved verbatim from ``ufm/cli.py`` (round 3, issue 18); only the relative imports gained a dot and the shared
helpers are imported below under their old names.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from .. import _io
from .._report_text import header as _header
from .._terminal import PROG, UsageError
from .._terminal import device as _device
from .._terminal import versions as _versions
from .analysis import HESSIAN_AUTO_MAX as _HESSIAN_AUTO_MAX
from .analysis import use_hessian as _use_hessian
from .args import PROBLEM_OPTIONS as _PROBLEM_OPTIONS
from .args import parse_float as _float
from .args import parse_int as _int
from .config import DEFAULT_PROBLEM, read_config_data, use_compilation_cache
from .config import normalise_key as _normalise_key

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
    "polish_top": 8,
    "strategies": None,
}
_EXPLORE_FIGURES = ("minima", "gram", "gram_spectra")


def _strategy_list(text: str):
    return [s.strip() for s in text.split(",") if s.strip()]


def add_explore_parser(sub) -> None:
    pe = sub.add_parser(
        "explore",
        help="search for the global optimum where theory is open (ufm.explore)",
        description="Run ufm.explore: a budgeted portfolio of batched L-BFGS starts (explicit DNC/SRG "
        "candidates, random, low-rank, perturbed, continuation in lambda, low-rank truncation of found minima, basin "
        "hopping), then polishes the lowest minima at their ReLU kinks. Default "
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
        "--polish-top",
        dest="polish_top",
        type=_int,
        default=None,
        help="after the budget, finish the N lowest minima at their ReLU kinks and merge copies (default 8; 0: off)",
    )
    g.add_argument(
        "--strategies",
        dest="strategies",
        type=_strategy_list,
        default=None,
        help="comma list, a subset of explicit,random,low-rank,perturbed,continuation,truncate,hop,rank-hop,gd "
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
    from .._explore import STRATEGIES

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
    for name in ("max_starts", "batch_size", "steps", "seed", "polish_top"):
        v = search[name]
        if v is None and name == "max_starts":
            continue
        low = 0 if name in ("seed", "polish_top") else 1
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise UsageError(f"{name} must be a {'non-negative' if low == 0 else 'positive'} integer; got {v!r}")
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

    from .. import _explore

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
    use_compilation_cache()  # the compile dominates short searches: as ufm solve
    ex = _explore.explore(
        problem,
        time_budget=search["time_budget"],
        max_starts=search["max_starts"],
        key=jax.random.key(search["seed"]),
        progress=True if show else None,
        strategies=search["strategies"] or _explore.DEFAULT_STRATEGIES,
        batch_size=search["batch_size"],
        steps=search["steps"],
        polish_top=search["polish_top"],
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
    from .. import plotting  # figures without pyplot: no backend to choose

    ref = None
    try:
        from .._theory import construct

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
