"""Benchmark 5: `ufm.explore` — time to the best known point for each strategy mix, and the atlas.

    python -m benchmarks.bench_explore mixes --budget 150          # K=6 and K=10 targets, every mix
    python -m benchmarks.bench_explore mixes --budget 20 --smoke   # K=3, seconds
    python -m benchmarks.bench_explore atlas --max-starts 16       # best found / DNC over (K, L), lambda = 0.004

Settings (Súkeník, Mondelli, Lampert 2024; THEORY.md §4.3): deep ReLU UFM, MSE, no bias, n = 1,
lambda_H = lambda_W = 0.004, L = 4, widths 11 (K = 6; best known 0.907 of the DNC loss, target <= 0.911) and widths 16
(K = 10; best known 0.816, the SRG point, target <= 0.820).

``mixes``: per setting, one warm-up call compiles the solver (its time is reported as ``compile_s``), then each mix
of strategies runs ``explore(time_budget=budget)`` from the same key; we record the trace (seconds, starts, best)
and the first time the best reached the target ratio ("time to target"), the final ratio, and the CPU time of the
process during the run (the machine is shared: CPU seconds / wall seconds says how much of a core the run got).

``atlas``: for each (K, L) of the grid, widths d = max(K + 5, round(1.6 K)) (11 at K = 6, 16 at K = 10), one
``explore(max_starts=...)`` call; the table gives the best found / DNC, the SRG point / DNC where defined, the
structure of the best point and whether it beats the published construction (the SRG point, else DNC). Every
entry is a numerical upper bound on the global optimum, not a proof of optimality.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import jax

from . import _common as C

jax.config.update("jax_enable_x64", True)

import ufm  # noqa: E402
from ufm._explore import DEFAULT_STRATEGIES, STRATEGIES  # noqa: E402
from ufm._json import to_jsonable  # noqa: E402

LAM = 0.004
TARGETS = {6: (11, 0.911, 0.907), 10: (16, 0.820, 0.816)}  # K: (width, target ratio, best known ratio)
MIXES = {
    "default": DEFAULT_STRATEGIES,
    "all": STRATEGIES,
    "random+rank-hop": ("explicit", "random", "rank-hop"),
    "gd+hop": ("explicit", "gd", "hop"),
    "random": ("explicit", "random"),
    "random+hop": ("explicit", "random", "hop"),
    "low-rank+hop": ("explicit", "low-rank", "hop"),
    "perturbed+hop": ("explicit", "perturbed", "hop"),
    "continuation+hop": ("explicit", "continuation", "hop"),
}


def problem(K: int, L: int, d: int) -> ufm.UFM:
    return ufm.UFM(
        num_classes=K, n_per_class=1, widths=(d,) * L, activation="relu", loss="mse", bias="none", lam_H=LAM, lam_W=LAM
    )


def atlas_width(K: int) -> int:
    return max(K + 5, round(1.6 * K))


def _dump(name: str, obj: dict) -> None:
    C.RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (C.RESULTS_DIR / f"{name}.json").write_text(json.dumps(to_jsonable(obj), indent=2, allow_nan=False))


def mix_row(p, K, d, mix, seed, budget, max_starts, batch_size, steps, max_polish, compile_s, polish_top=8):
    """One explore run of a strategy mix: final ratio, time and starts to the target, CPU share."""
    _, target, known = TARGETS.get(K, (d, math.nan, math.nan))
    c0, t0, load0 = time.process_time(), time.perf_counter(), C.load_average()
    ex = ufm.explore(
        p,
        time_budget=None if max_starts else budget,
        max_starts=max_starts,
        key=seed,
        strategies=MIXES[mix],
        batch_size=batch_size,
        steps=steps,
        max_polish=max_polish,
        polish_top=polish_top,
        check_hessian=False,
    )
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    hit = next(((tt, n) for tt, n, v in ex.trace if v / ex.dnc_loss <= target), (None, None))
    return {
        "K": K,
        "L": 4,
        "width": d,
        "mix": mix,
        "seed": seed,
        "ratio": ex.ratio_to_dnc,
        "target": target,
        "best_known": known,
        "time_to_target_s": hit[0],
        "starts_to_target": hit[1],
        "wall_s": wall,
        "cpu_s": cpu,
        "compile_s": compile_s,
        "starts": ex.num_starts,
        "rounds": ex.num_rounds,
        "minima": len(ex.minima),
        "polish_top": polish_top,
        "rounds_end_s": ex.trace[-1][0] if ex.trace else None,
        "structure": ex.minima[0].description if ex.minima else "",
        "first_strategy": ex.minima[0].strategy if ex.minima else "",
        "strategies": ex.strategies,
        "trace": ex.trace,
        "load_before": load0,
        "load_after": C.load_average(),
    }


def cold_row(K, mix, seed, budget, max_starts, batch_size, steps, max_polish, polish_top) -> dict:
    """`mix_row` in a fresh Python process without the persistent compile cache: the times then include every
    compile, as a user's first call sees them (``compile_s`` is 0: nothing was compiled beforehand)."""
    import os
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "benchmarks.bench_explore", "row", "--settings", str(K), "--mixes", mix]
    cmd += ["--seed", str(seed), "--budget", str(budget), "--batch-size", str(batch_size), "--steps", str(steps)]
    cmd += ["--max-polish", str(max_polish), "--polish-top", str(polish_top)]
    cmd += [] if max_starts is None else ["--max-starts", str(max_starts)]
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def one_row(K, mix, seed, budget, max_starts, batch_size, steps, max_polish, polish_top) -> dict:
    """One `mix_row` in this process, nothing compiled beforehand (the ``row`` command of `cold_row`)."""
    d = TARGETS.get(K, (atlas_width(K),))[0]
    return mix_row(
        problem(K, 4, d), K, d, mix, seed, budget, max_starts, batch_size, steps, max_polish, 0.0, polish_top
    )


def run_moves(K: int, seed: int, steps: int, B: int = 32, name: str = "explore_moves") -> dict:
    """Moves from found minima, side by side: B random starts are solved (``steps`` L-BFGS steps, one batch), then
    each move (truncation of every Z_l to rank r, a hop with noise 0.1, a rank-hop) is applied once to each of the
    B endpoints and re-solved the same way. Reports per move the best ratio, how many of the B improved their
    endpoint, and how many reached <= 0.92 / <= the target; the same compiled program serves every batch."""
    import numpy as np

    from ufm._explore.rounds import lbfgs_round
    from ufm._explore.starts import Job, perturb, random_start, rank_reduce, truncate

    d, target, _ = TARGETS.get(K, (atlas_width(K), math.nan, math.nan))
    p = problem(K, 4, d)
    dnc = float(ufm.predict(p, "dnc").loss)
    rng = np.random.default_rng(seed)
    ends = lbfgs_round(p, [Job(random_start(p, rng, 1.0), "random") for _ in range(B)], B, steps, np.float64)
    v0 = np.array([e.value for e in ends]) / dnc
    moves = {f"truncate r={r}": (lambda e, r=r: truncate(p, e.params, r, rng)) for r in range(2, min(K, 5))}
    moves["hop 0.1"] = lambda e: perturb(e.params, rng, 0.1)
    moves["rank-hop"] = lambda e: rank_reduce(p, e.params, rng)
    out = {"machine": C.machine_info(), "K": K, "width": d, "seed": seed, "steps": steps, "B": B, "rows": []}
    out["rows"].append({"move": "random start", "best": float(v0.min()), "le_092": int((v0 <= 0.92).sum())})
    for mv, f in moves.items():
        res = lbfgs_round(p, [Job(f(e), mv) for e in ends], B, steps, np.float64)
        v = np.array([e.value for e in res]) / dnc
        row = {
            "move": mv,
            "best": float(v.min()),
            "improved": int((v < v0 - 1e-4).sum()),
            "le_092": int((v <= 0.92).sum()),
            "le_target": int((v <= target).sum()),
            "median": float(np.median(v)),
        }
        out["rows"].append(row)
        print(f"K={K} seed {seed} {mv:<14s} {row} load {C.load_average()}", flush=True)
    _dump(f"{name}_K{K}_s{seed}", out)
    return out


def run_mixes(
    settings, mixes, budget, batch_size, steps, seeds, name, max_starts=None, max_polish=4, cold=False, polish_top=8
):
    out = {
        "machine": C.machine_info(),
        "budget_s": budget,
        "max_starts": max_starts,
        "batch_size": batch_size,
        "steps": steps,
        "max_polish": max_polish,
        "seeds": seeds,
        "cold": cold,
        "polish_top": polish_top,
        "runs": [],
    }
    for K in settings:
        d = TARGETS.get(K, (atlas_width(K),))[0]
        p = problem(K, 4, d)
        compile_s = 0.0
        if not cold:
            t = time.perf_counter()
            ufm.explore(p, max_starts=1, key=0, batch_size=batch_size, steps=steps, check_hessian=False)
            compile_s = time.perf_counter() - t
        for mix in mixes:
            for seed in seeds:
                args = (mix, seed, budget, max_starts, batch_size, steps, max_polish)
                if cold:
                    row = cold_row(K, *args, polish_top)
                else:
                    row = mix_row(p, K, d, *args, compile_s, polish_top)
                out["runs"].append(row)
                print(
                    f"K={K} {mix:<17s} seed {seed} ratio {row['ratio']:.4f} (target {row['target']}) hit "
                    f"{row['time_to_target_s']} s / {row['starts_to_target']} starts, wall {row['wall_s']:.0f}s "
                    f"cpu {row['cpu_s']:.0f}s starts {row['starts']} rounds {row['rounds']} compile {compile_s:.0f}s "
                    f"load {C.load_average()}",
                    flush=True,
                )
                _dump(name, out)
    md = [
        f"{'cold: each run in a fresh process, every compile inside its times' if cold else 'warm: compiled first'}; "
        f"budget {budget} s, B = {batch_size}, {steps} L-BFGS steps per round, polish_top {polish_top}; "
        f"{out['machine'].get('cores', '?')} cores; load = 1-min load average before / after the run",
        "",
        "| K | L | width | mix | seed | best / DNC | target | time to target (s) | starts to target | starts | rounds "
        "| rounds end s | wall s | CPU s | compile s | distinct minima | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in out["runs"]:
        tt = "—" if r["time_to_target_s"] is None else f"{r['time_to_target_s']:.0f}"
        st = "—" if r["starts_to_target"] is None else str(r["starts_to_target"])
        re_ = "—" if r.get("rounds_end_s") is None else f"{r['rounds_end_s']:.0f}"
        ld = f"{r['load_before'][0]:.1f} / {r['load_after'][0]:.1f}"
        md.append(
            f"| {r['K']} | 4 | {r['width']} | {r['mix']} | {r['seed']} | {r['ratio']:.4f} | {r['target']} | {tt} | "
            f"{st} | {r['starts']} | {r['rounds']} | {re_} | {r['wall_s']:.0f} | {r['cpu_s']:.0f} | "
            f"{r['compile_s']:.0f} | {r['minima']} | {ld} |"
        )
    (C.RESULTS_DIR / f"{name}.md").write_text("\n".join(md) + "\n")
    return out


def atlas_cells(Ks, Ls, cells: str | None):
    """The (K, L) cells in run order: ``cells`` ("5x4,15x3,...") first, then the K x L grid."""
    out = [tuple(int(v) for v in c.split("x")) for c in cells.split(",")] if cells else []
    return out + [(K, L) for L in Ls for K in Ks if (K, L) not in out]


def atlas_row(K, L, max_starts, budget, batch_size, steps, seed):
    """One atlas cell: explore with a start cap (and a time cap), the best point's structure, the published point."""
    d = atlas_width(K)
    p = problem(K, L, d)
    t0, c0 = time.perf_counter(), time.process_time()
    ex = ufm.explore(
        p,
        max_starts=max_starts,
        time_budget=budget,
        key=seed,
        batch_size=batch_size,
        steps=steps,
        check_hessian=False,
    )
    srg = ex.explicit.get("srg", math.nan)
    published = min(ex.explicit.values())
    best = ex.minima[0] if ex.minima else None
    return {
        "K": K,
        "L": L,
        "width": d,
        "ratio": ex.ratio_to_dnc,
        "value": ex.value,
        "dnc_loss": ex.dnc_loss,
        "srg_ratio": srg / ex.dnc_loss,
        "published_ratio": published / ex.dnc_loss,
        "beats_published": ex.value < published * (1 - 1e-6),
        "structure": best.description if best else "",
        "ranks": best.ranks if best else (),
        "ranks_Z": best.ranks_Z if best else (),
        "first_strategy": best.strategy if best else "",
        "minima": len(ex.minima),
        "starts": ex.num_starts,
        "rounds": ex.num_rounds,
        "max_starts": max_starts,
        "budget_s": budget,
        "steps": steps,
        "batch_size": batch_size,
        "seed": seed,
        "wall_s": time.perf_counter() - t0,
        "cpu_s": time.process_time() - c0,
        "load": C.load_average(),
    }


def run_atlas(Ks, Ls, max_starts, batch_size, steps, seed, name="atlas", budget=None, cells=None, resume=False):
    """The atlas, one cell at a time, checkpointed to results/<name>.json after each (``resume`` skips done cells)."""
    path = C.RESULTS_DIR / f"{name}.json"
    out = {
        "machine": C.machine_info(),
        "max_starts": max_starts,
        "budget_s": budget,
        "batch_size": batch_size,
        "steps": steps,
        "seed": seed,
        "lam": LAM,
        "rows": [],
    }
    if resume and path.exists():
        out["rows"] = json.loads(path.read_text())["rows"]
    done = {(r["K"], r["L"]) for r in out["rows"]}
    for K, L in atlas_cells(Ks, Ls, cells):
        if (K, L) in done:
            continue
        row = atlas_row(K, L, max_starts, budget, batch_size, steps, seed)
        out["rows"].append(row)
        print(
            f"atlas K={K} L={L} d={row['width']}: {row['ratio']:.4f} (published {row['published_ratio']:.4f}) "
            f"{row['structure']}  [{row['starts']} starts, {row['wall_s']:.0f}s wall, {row['cpu_s']:.0f}s cpu, "
            f"load {row['load']}]",
            flush=True,
        )
        _dump(name, out)
        write_atlas_md(out, name)
    return out


def write_atlas_md(out, name="atlas"):
    md = [
        f"Best found / DNC loss (numerical upper bounds), deep ReLU UFM, MSE, no bias, n = 1, lambda = {LAM}; "
        f"at most {out['max_starts']} starts per setting"
        + (f" and {out['budget_s']:.0f} s" if out.get("budget_s") else "")
        + f" (B = {out['batch_size']}, {out['steps']} L-BFGS steps per round), seed {out['seed']}.",
        "",
        "| K | L | width | best found / DNC | published (SRG or DNC) / DNC | beats published | starts | "
        "first found by | structure of the best point |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(out["rows"], key=lambda r: (r["L"], r["K"])):
        md.append(
            f"| {r['K']} | {r['L']} | {r['width']} | {r['ratio']:.4f} | {r['published_ratio']:.4f} | "
            f"{'yes' if r['beats_published'] else 'no'} | {r.get('starts', '')} | {r['first_strategy']} | "
            f"{r['structure']} |"
        )
    (C.RESULTS_DIR / f"{name}.md").write_text("\n".join(md) + "\n")


def run_explicit(cells, name="atlas_explicit"):
    """Cells not searched (their compile alone is minutes here): the explicit SRG / DNC points only, from
    `ufm.predict` (each one a feasible point, so an upper bound too); ``starts`` is 0."""
    out = {"machine": C.machine_info(), "max_starts": 0, "lam": LAM, "batch_size": 0, "steps": 0, "seed": 0, "rows": []}
    for K, L in cells:
        p = problem(K, L, atlas_width(K))
        dnc = float(ufm.predict(p, "dnc").loss)
        srg = ufm.predict(p, "srg")
        srg_loss = float(srg.loss) if srg.configuration == "srg" else math.nan
        published = min(dnc, srg_loss) if math.isfinite(srg_loss) else dnc
        out["rows"].append(
            {
                "K": K,
                "L": L,
                "width": atlas_width(K),
                "ratio": published / dnc,
                "value": published,
                "dnc_loss": dnc,
                "srg_ratio": srg_loss / dnc,
                "published_ratio": published / dnc,
                "beats_published": False,
                "structure": "explicit point only (not searched): "
                + ("the SRG construction" if published < dnc else "DNC"),
                "first_strategy": "explicit",
                "starts": 0,
            }
        )
        print(f"explicit K={K} L={L}: SRG / DNC {srg_loss / dnc:.4f}", flush=True)
    _dump(name, out)
    return out


def merged_atlas(results_dir=None) -> dict:
    """(K, L) -> the lowest row over every stored ``atlas*.json`` (each row is a feasible point: an upper bound)."""
    best: dict = {}
    for f in sorted((results_dir or C.RESULTS_DIR).glob("atlas*.json")):
        run = json.loads(f.read_text())
        for r in run["rows"]:
            r = dict(r, file=f.name, starts=r.get("starts", run.get("max_starts")))
            if (r["K"], r["L"]) not in best or r["ratio"] < best[r["K"], r["L"]]["ratio"]:
                best[r["K"], r["L"]] = r
    return best


def atlas_grid_md(best: dict) -> str:
    """The README's atlas: L down, K across; bold where the best found is below the published construction, † where
    only the explicit points were evaluated (no search)."""
    Ks = sorted({k for k, _ in best})
    Ls = sorted({l for _, l in best})
    md = ["| L \\ K | " + " | ".join(map(str, Ks)) + " |", "|---|" + "---|" * len(Ks)]
    for L in Ls:
        cells = []
        for K in Ks:
            r = best.get((K, L))
            if r is None:
                cells.append("—")
            elif r["beats_published"]:
                cells.append(f"**{r['ratio']:.4f}** (published {r['published_ratio']:.4f})")
            else:
                cells.append(f"{r['ratio']:.4f}" + (" †" if r.get("starts") == 0 else ""))
        md.append(f"| {L} | " + " | ".join(cells) + " |")
    return "\n".join(md)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "what",
        choices=("mixes", "atlas", "table", "explicit", "row", "moves"),
        help="table: print the merged atlas (README); explicit: the SRG/DNC points of --cells, no search; row: one "
        "mix and seed in this process, as JSON (what --cold runs)",
    )
    ap.add_argument("--budget", type=float, default=150.0, help="seconds per mix and setting (mixes)")
    ap.add_argument("--settings", default="6,10", help="K values (mixes), comma list")
    ap.add_argument("--mixes", default="default", help="comma list of " + ", ".join(MIXES))
    ap.add_argument("--Ks", default="3,4,5,6,10,15")
    ap.add_argument("--Ls", default="3,4,5,6")
    ap.add_argument(
        "--max-starts",
        type=int,
        default=None,
        help="starts per setting (atlas; default 16) or per mix (mixes: instead of --budget)",
    )
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seeds", default=None, help="mixes: comma list of seeds (default: --seed)")
    ap.add_argument("--max-polish", type=int, default=4, help="continuations of a run within 5%% of the best")
    ap.add_argument("--polish-top", type=int, default=8, help="minima polished at their kinks after the rounds")
    ap.add_argument("--cold", action="store_true", help="mixes: each run in a fresh process, compiles included")
    ap.add_argument("--name", default=None, help="results file stem (default explore / atlas)")
    ap.add_argument("--smoke", action="store_true", help="K = 3, L = 4 widths 6, tiny budget")
    ap.add_argument("--cells", default=None, help="atlas: cells to run first, e.g. 5x4,15x3 (K x L)")
    ap.add_argument("--resume", action="store_true", help="atlas: keep the cells already in the results file")
    ap.add_argument("--cell-budget", type=float, default=None, help="atlas: seconds per cell (besides --max-starts)")
    a = ap.parse_args(argv)
    if a.what == "explicit":
        run_explicit(atlas_cells([], [], a.cells))
    elif a.what == "moves":
        for K in [int(k) for k in a.settings.split(",")]:
            run_moves(K, a.seed, a.steps)
    elif a.what == "row":
        K = int(a.settings.split(",")[0])
        row = one_row(K, a.mixes, a.seed, a.budget, a.max_starts, a.batch_size, a.steps, a.max_polish, a.polish_top)
        print(json.dumps(to_jsonable(row), allow_nan=False))
    elif a.what == "table":
        print(atlas_grid_md(merged_atlas()))
    elif a.what == "mixes":
        settings = [3] if a.smoke else [int(k) for k in a.settings.split(",")]
        run_mixes(
            settings,
            a.mixes.split(","),
            a.budget,
            a.batch_size,
            a.steps,
            [int(v) for v in a.seeds.split(",")] if a.seeds else [a.seed],
            a.name or ("explore_smoke" if a.smoke else "explore"),
            max_starts=a.max_starts,
            max_polish=a.max_polish,
            cold=a.cold,
            polish_top=a.polish_top,
        )
    else:
        run_atlas(
            [int(k) for k in a.Ks.split(",")],
            [int(v) for v in a.Ls.split(",")],
            a.max_starts or 16,
            a.batch_size,
            a.steps,
            a.seed,
            a.name or "atlas",
            budget=a.cell_budget,
            cells=a.cells,
            resume=a.resume,
        )


if __name__ == "__main__":
    main()
