"""Benchmark: the default cost of ``ufm.check`` (with its second-order certificate) against the ``ufm.solve`` it
checks, in the same process, warm.

    python -m benchmarks.bench_check            # README quickstart and a K=10, L=4 deep ReLU problem
    python -m benchmarks.bench_check --smoke    # a tiny problem, one round
    python -m benchmarks.bench_check --sweep    # what second_order=True adds to a sweep record, per run

For each problem: one cold ``solve`` and ``check`` (compiles, reported separately), then ``rounds`` interleaved
rounds of a warm ``solve`` (same key: the same run), a warm default ``check`` (scale-aware stationarity, compiled
Lanczos on Hessian-vector products with the symmetries projected out, the kink test, metrics, distances), and a
warm ``check(hessian=False)``, and a warm default ``check`` at ``ufm.construct(problem)`` (a stationary point: the
full second-order path even where the solve stops unconverged). Reported: medians and the median per-round ratio
check / solve, with the verdict, ``second_order``, the Lanczos steps and seconds, and the machine's load average.
"""

from __future__ import annotations

import argparse
import time

import jax

from . import _common as C

PROBLEMS = {
    "quickstart": dict(
        num_classes=2,
        n_per_class=50,
        widths=(64, 64, 64),
        activation="relu",
        loss="mse",
        bias="none",
        lam_H=5e-3,
        lam_W=5e-3,
    ),
    "K10-L4": dict(
        num_classes=10,
        n_per_class=5,
        widths=(32, 32, 32, 32),
        activation="relu",
        loss="mse",
        bias="none",
        lam_H=4e-3,
        lam_W=4e-3,
    ),
    "tiny": dict(
        num_classes=2,
        n_per_class=3,
        widths=(4, 4, 4),
        activation="relu",
        loss="mse",
        bias="none",
        lam_H=5e-3,
        lam_W=5e-3,
    ),
}


def _measure(name: str, rounds: int, log) -> dict:
    import ufm

    p = ufm.UFM(**PROBLEMS[name])
    key = jax.random.key(0)
    box = {}

    def solve():
        t = time.perf_counter()
        s = ufm.solve(p, key=key)
        s.value.block_until_ready()
        box["sol"] = s
        return time.perf_counter() - t

    def check():
        t = time.perf_counter()
        box["report"] = ufm.check(p, box["sol"])
        return time.perf_counter() - t

    exact = ufm.construct(p)

    def check_construct():
        t = time.perf_counter()
        box["report_construct"] = ufm.check(p, exact)
        return time.perf_counter() - t

    def check_first_order():
        t = time.perf_counter()
        ufm.check(p, box["sol"], hessian=False)
        return time.perf_counter() - t

    cold = {"solve": solve(), "check": check(), "check_construct": check_construct()}
    runs = C.interleaved(
        {"solve": solve, "check": check, "check_first_order": check_first_order, "check_construct": check_construct},
        rounds,
    )
    r = box["report"]
    hs = r.certificate.hessian
    out = {
        "problem": PROBLEMS[name],
        "num_params": int(sum(x.size for x in jax.tree_util.tree_leaves(box["sol"].params))),
        "cold_s": cold,
        "solve_s": C.median(runs["solve"]),
        "check_s": C.median(runs["check"]),
        "check_first_order_s": C.median(runs["check_first_order"]),
        "check_construct_s": C.median(runs["check_construct"]),
        "construct_verdict": box["report_construct"].verdict,
        "construct_second_order": box["report_construct"].second_order,
        "ratio_check_over_solve": C.median(C.per_round_ratios(runs["check"], runs["solve"])),
        "rounds": runs,
        "solver_status": int(box["sol"].status),
        "num_steps": int(box["sol"].num_steps),
        "verdict": r.verdict,
        "second_order": r.second_order,
        "hessian": None
        if hs is None
        else {
            "method": hs.method,
            "iterations": hs.iterations,
            "seconds": hs.seconds,
            "smallest": hs.smallest[:1],
            "status": hs.status,
            "symmetry_dim": hs.symmetry_dim,
        },
        "load": C.load_average(),
    }
    log(
        f"{name}: n={out['num_params']} solve {out['solve_s']:.2f}s check {out['check_s']:.2f}s "
        f"(first-order {out['check_first_order_s']:.2f}s) ratio {out['ratio_check_over_solve']:.2f} "
        f"verdict {r.verdict} / {r.second_order}; at construct() {out['check_construct_s']:.2f}s "
        f"{out['construct_verdict']} / {out['construct_second_order']}; load {out['load']}"
    )
    return out


SWEEP_GRIDS = {
    # the README quickstart's problem, two seeds (14,720 parameters)
    "quickstart": {
        "K": 2,
        "n": 50,
        "width": 64,
        "L": 3,
        "activation": "relu",
        "lam": 5e-3,
        "seeds": 2,
        "max_steps": 10000,
    },
    # issue 13's deep ReLU case: K=3, L=4, widths 6, n=1, two lambdas x four seeds (183 parameters)
    "K3-L4": {"K": 3, "n": 1, "width": 6, "L": 4, "activation": "relu", "lam": [0.004, 0.0041], "seeds": 4},
    "tiny": {"K": 2, "n": 3, "width": 4, "L": 3, "activation": "relu", "lam": 5e-3, "seeds": 2},
}


def _sweep_cost(name: str, rounds: int, log) -> dict:
    """What ``second_order=True`` adds to a sweep record: ``ufm.sweep`` of the grid (in memory, no metrics) with
    ``second_order`` False and True, once cold (compiles) then ``rounds`` interleaved warm rounds; per run: the
    first-order sweep's time (solve + predict + first-order check: the reference; the record's ``wall_s`` no longer
    times the solve since the driver overlaps a chunk's solve with the previous chunk's checks) and the extra
    seconds of the second-order check."""
    import ufm

    grid = SWEEP_GRIDS[name]
    box: dict = {}

    def sweep(so: bool):
        def go():
            t = time.perf_counter()
            box[so] = ufm.sweep(grid, None, second_order=so, metrics=False, progress=False).records
            return time.perf_counter() - t

        return go

    cold = {"first_order": sweep(False)(), "second_order": sweep(True)()}
    runs = C.interleaved({"first_order": sweep(False), "second_order": sweep(True)}, rounds)
    recs = box[True]
    nrun = len(recs)
    solve = C.median(runs["first_order"]) / nrun  # the whole first-order record, an upper bound of the solve
    extra = (C.median(runs["second_order"]) - C.median(runs["first_order"])) / nrun
    so = [((r.get("check") or {}).get("certificate") or {}).get("second_order") for r in recs]
    out = {
        "grid": grid,
        "runs": nrun,
        "cold_s": cold,
        "rounds": runs,
        "sweep_first_order_s": C.median(runs["first_order"]),
        "sweep_second_order_s": C.median(runs["second_order"]),
        "solve_per_run_s": solve,
        "second_order_extra_per_run_s": extra,
        "ratio_extra_over_solve": extra / solve if solve > 0 else None,
        "verdicts": [r["verdict"] for r in recs],
        "second_order": so,
        "statuses": [r["status"] for r in recs],
        "load": C.load_average(),
    }
    log(
        f"sweep {name}: {nrun} runs, first-order record {solve:.3f}s/run, second order +{extra:.3f}s/run "
        f"(ratio {out['ratio_extra_over_solve']:.2f}); second_order {so}; load {out['load']}"
    )
    return out


def run_sweep(which: str = "full", rounds: int = 2, out_dir=None, log=print) -> dict:
    """`_sweep_cost` on the quickstart and K3-L4 grids (``which="smoke"``: the tiny grid, one round)."""
    jax.config.update("jax_enable_x64", True)
    names = ["tiny"] if which == "smoke" else ["K3-L4", "quickstart"]
    info = C.machine_info()
    res = {"machine": info, "grids": {n: _sweep_cost(n, 1 if which == "smoke" else rounds, log) for n in names}}
    rows = [
        [
            n,
            m["runs"],
            C.fmt_time(m["solve_per_run_s"]),
            C.fmt_time(m["second_order_extra_per_run_s"]),
            f"{m['ratio_extra_over_solve']:.2f}",
            ", ".join(sorted(set(map(str, m["second_order"])))),
            m["load"] and f"{m['load'][0]:.2f}",
        ]
        for n, m in res["grids"].items()
    ]
    md = (
        "# second_order=True in a sweep record vs the first-order record (warm, same process)\n\n"
        + C.machine_line(info)
        + "\n\n"
        + C.md_table(
            ["grid", "runs", "first-order record / run", "+ second order / run", "ratio", "second_order", "load"], rows
        )
    )
    res["paths"] = C.write_outputs("check_sweep" if which != "smoke" else "check_sweep_smoke", res, out_dir, md)
    return res


def run(which: str = "full", rounds: int = 3, out_dir=None, log=print) -> dict:
    jax.config.update("jax_enable_x64", True)
    names = ["tiny"] if which == "smoke" else ["quickstart", "K10-L4"]
    info = C.machine_info()
    res = {"machine": info, "problems": {n: _measure(n, 1 if which == "smoke" else rounds, log) for n in names}}
    rows = []
    for n, m in res["problems"].items():
        hs = m["hessian"] or {}
        rows.append(
            [
                n,
                m["num_params"],
                C.fmt_time(m["solve_s"]),
                C.fmt_time(m["check_s"]),
                C.fmt_time(m["check_first_order_s"]),
                f"{m['ratio_check_over_solve']:.2f}",
                m["verdict"],
                m["second_order"],
                f"{hs.get('method')} {hs.get('iterations')} steps {hs.get('seconds', 0):.2f}s",
                f"{C.fmt_time(m['check_construct_s'])} {m['construct_verdict']} / {m['construct_second_order']}",
                m["load"] and f"{m['load'][0]:.2f}",
            ]
        )
    md = (
        "# check vs solve (warm, same process)\n\n"
        + C.machine_line(info)
        + "\n\n"
        + C.md_table(
            [
                "problem",
                "params",
                "solve",
                "check (default)",
                "check (hessian=False)",
                "check/solve",
                "verdict",
                "second order",
                "Hessian",
                "check at construct()",
                "load",
            ],
            rows,
        )
    )
    res["paths"] = C.write_outputs("check" if which != "smoke" else "check_smoke", res, out_dir, md)
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=None)
    ap.add_argument("--sweep", action="store_true", help="the cost of second_order=True in a sweep record")
    a = ap.parse_args(argv)
    (run_sweep if a.sweep else run)("smoke" if a.smoke else "full", a.rounds, a.out)


if __name__ == "__main__":
    main()
