"""Benchmark 3: sweep throughput. 1,000 small problems (100 lambdas x 10 seeds), solved batched vs in loops.

    python -m benchmarks.bench_sweep            # full run (~3 min on 2 quiet cores)
    python -m benchmarks.bench_sweep --smoke    # tiny grid, seconds

Problem: deep ReLU UFM, K=3, n=5, widths (12, 12), MSE, no bias; lam_H = lam_W = lam on a log grid
(1e-4 .. 10^-1.5), seeds 0..9 (key ``jax.random.key(seed)``, ufm's default init), float64.

Part A, the same work everywhere (heavy ball: momentum 0.9, lr 0.1, a fixed budget of S steps, tol 0):

* ``ufm.solve_batch`` over all runs, in chunks of B runs per compiled call (several B are timed: on a
  2-core CPU a vmap of many problems is not automatically faster, so we measure where batching pays);
* ``ufm.sweep`` (the user-facing tool: batched solve + ``ufm.predict`` + ``ufm.check`` per run; metrics off);
* a Python loop of ``ufm.solve`` (one compiled call per run; timed on a subset and extrapolated x 1000/m);
* a Python loop of PyTorch runs (the research-code loop of ``peers.TorchLoop``, from the same init; timed on
  a subset and extrapolated), with 1 thread (faster than PyTorch's default 2 threads for problems this
  small; ``--torch-default-threads`` adds the default, which stalls badly on a loaded machine).

Part B, to an answer: ufm's default L-BFGS (default tolerance) in one ``ufm.solve_batch`` call over all runs
(its default engine: "map" on a CPU, the runs in sequence in one compiled program; "slots" on an accelerator)
vs a loop of single solves (subset, extrapolated).

Checks before timing: the PyTorch runs and the single ufm solves end at the same loss (float64, <= 1e-8
relative) and the batched solves agree with the single ones (<= 1e-10 relative in part A).
Compile time is excluded everywhere (every compiled call is made once before it is timed) and reported.
"""

from __future__ import annotations

import argparse
import functools
import time

import numpy as np

from . import _common as C

BASE = dict(num_classes=3, n_per_class=5, widths=(12, 12), activation="relu", loss="mse", bias="none")
LR = 0.1
MOMENTUM = 0.9


def _grid(size):
    if size == "tiny":
        lams, seeds, steps = np.logspace(-4, -1.5, 4), np.arange(2), 100
    else:
        lams, seeds, steps = np.logspace(-4, -1.5, 100), np.arange(10), 300
    L, S = np.meshgrid(lams, seeds, indexing="ij")
    return L.ravel(), S.ravel().astype(int), steps


def run(
    size: str = "full", out_dir=None, log=print, rounds: int | None = None, torch_default_threads: bool = False
) -> dict:
    C.enable_x64()
    import jax
    import jax.numpy as jnp

    import ufm

    from .peers import TorchLoop

    info = C.machine_info()
    log(f"machine: {C.machine_line(info)}")
    tiny = size == "tiny"
    rounds = rounds or (1 if tiny else 2)
    lam, seed, S = _grid(size)
    R = len(lam)
    p0 = ufm.UFM(**BASE, lam_H=1e-3, lam_W=1e-3)
    keys = jax.vmap(jax.random.key)(jnp.asarray(seed))
    chunks = (R,) if tiny else (R, 100)
    m_single = 4 if tiny else 40
    m_torch = 2 if tiny else 5
    sub = np.linspace(0, R - 1, m_single).astype(int)  # spread over the lambda range
    sub_t = np.linspace(0, R - 1, m_torch).astype(int)
    torch, why = C.torch_or_none()
    res = dict(
        benchmark="sweep",
        size=size,
        machine=info,
        runs=R,
        steps=S,
        problem=p0.to_dict(),
        lr=LR,
        momentum=MOMENTUM,
        chunk_sizes=list(chunks),
        single_subset=int(m_single),
        torch_subset=int(m_torch),
    )

    mom = dict(method="momentum", lr=LR, momentum=MOMENTUM, max_steps=S, tol=0.0, history=False, patience=S + 1)

    def batched(B, **kw):
        vals = []
        for i in range(0, R, B):
            j = min(R, i + B)
            if j - i < B:  # pad the last chunk to B (same compiled size)
                idx = np.r_[np.arange(i, j), np.full(B - (j - i), j - 1)]
            else:
                idx = np.arange(i, j)
            sol = ufm.solve_batch(p0, keys=keys[idx], lam_H=lam[idx], lam_W=lam[idx], **kw)
            vals.append((sol.value[: j - i], sol.num_steps[: j - i], sol.status[: j - i]))
        jax.block_until_ready(vals)
        return tuple(np.concatenate([np.asarray(v[k]) for v in vals]) for k in range(3))

    def single(i, **kw):
        p = ufm.UFM(**BASE, lam_H=float(lam[i]), lam_W=float(lam[i]))
        return jax.block_until_ready(ufm.solve(p, key=int(seed[i]), **kw))

    # ---------------- compile everything once (timed: this is the compile cost a sweep pays)
    compile_s = {}
    for B in chunks:
        t = time.perf_counter()
        ufm.solve_batch(p0, keys=keys[:B], lam_H=lam[:B], lam_W=lam[:B], **mom).value.block_until_ready()
        compile_s[f"solve_batch B={B} momentum"] = time.perf_counter() - t
    t = time.perf_counter()
    single(0, **mom)
    compile_s["solve momentum"] = time.perf_counter() - t
    res["compile_and_first_call_s"] = compile_s

    # ---------------- checks: torch == single ufm; batched == single
    checks = {}
    ref_vals = {}
    for i in sub_t[:2]:
        s = single(i, **mom)
        ref_vals[int(i)] = float(s.value)
        if torch is not None:
            x0 = ufm.init_params(
                ufm.UFM(**BASE, lam_H=float(lam[i]), lam_W=float(lam[i])), jax.random.key(int(seed[i])), dtype="float64"
            )
            tl = TorchLoop(
                ufm.UFM(**BASE, lam_H=float(lam[i]), lam_W=float(lam[i])), x0, "float64", LR, momentum=MOMENTUM
            )
            tl.run(S)
            checks[f"torch vs ufm run {i}"] = abs(tl.loss() - float(s.value)) / abs(float(s.value))
    vb, nb, _ = batched(chunks[0], **mom)
    for i in sub[:3]:
        v = float(single(i, **mom).value)
        checks[f"batched vs single run {i}"] = abs(float(vb[i]) - v) / abs(v)
    res["checks"] = checks
    res["checks_ok"] = all(v <= (1e-8 if k.startswith("torch") else 1e-10) for k, v in checks.items())
    res["steps_ok"] = bool(np.all(nb == S))
    if not res["checks_ok"]:
        log(f"  WARNING: checks failed: {checks}")

    # ---------------- part A: interleaved rounds (extrapolated loops)
    def m_batch(B):
        def f():
            t = time.perf_counter()
            batched(B, **mom)
            return time.perf_counter() - t

        return f

    def m_single():
        t = time.perf_counter()
        for i in sub:
            single(i, **mom)
        return (time.perf_counter() - t) * R / len(sub)

    measures = {f"ufm.solve_batch (B={B})": m_batch(B) for B in chunks}
    measures["loop of ufm.solve"] = m_single
    if torch is not None:

        def m_torch(threads):
            def f():
                t_tot = 0.0
                for i in sub_t:
                    p = ufm.UFM(**BASE, lam_H=float(lam[i]), lam_W=float(lam[i]))
                    x0 = ufm.init_params(p, jax.random.key(int(seed[i])), dtype="float64")
                    t = time.perf_counter()  # the peer's own setup + loop (init drawn outside)
                    tl = TorchLoop(p, x0, "float64", LR, momentum=MOMENTUM, threads=threads)
                    tl.run(S)
                    tl.loss()
                    t_tot += time.perf_counter() - t
                return t_tot * R / len(sub_t)

            return f

        if torch_default_threads:
            measures["loop of torch (default threads)"] = m_torch(None)
        measures["loop of torch (1 thread)"] = m_torch(1)
    else:
        res["torch_skipped"] = why
    log(f"  part A: timing {list(measures)} x {rounds} rounds ({R} runs x {S} steps)")
    t0 = time.perf_counter()
    times = C.interleaved(measures, rounds)
    log(f"  part A done in {time.perf_counter() - t0:.1f} s")
    res["A_seconds_per_round"] = times
    res["A_median_s"] = {k: C.median(v) for k, v in times.items()}
    best_b = min((k for k in times if k.startswith("ufm.solve_batch")), key=lambda k: res["A_median_s"][k])
    res["A_best_batch"] = best_b

    def ratio(a, b):
        return C.median(C.per_round_ratios(times[b], times[a]))  # time_b / time_a per round = speedup of a

    res["A_speedup_best_batch_over"] = {k: ratio(best_b, k) for k in times if k != best_b}

    # ufm.sweep end to end (compile excluded: a first call compiles the sweep's own runner)
    sweep = getattr(ufm, "sweep", None)
    if sweep is not None and not tiny:  # (its own compiled runner: not in the smoke run)
        # ufm.sweep post-processes every run (predict, check): timed on a tenth of the grid, extrapolated
        ul = np.unique(lam)
        sub_l = ul if tiny else ul[:: max(1, len(ul) // 10)][:10]
        grid = dict(
            K=BASE["num_classes"],
            n=BASE["n_per_class"],
            widths=list(BASE["widths"]),
            activation="relu",
            loss="mse",
            lam=[float(x) for x in sub_l],
            seeds=int(len(np.unique(seed))),
            method="momentum",
            lr=LR,
            max_steps=S,
            tol=0.0,
            patience=S + 1,
            dtype="float64",
        )
        ck = chunks[-1]
        t0 = time.perf_counter()
        t = time.perf_counter()
        sweep(grid, chunk_size=ck, metrics=False, progress=False)
        first = time.perf_counter() - t
        t = time.perf_counter()
        sr = sweep(grid, chunk_size=ck, metrics=False, progress=False)
        second = time.perf_counter() - t
        res["A_sweep"] = dict(
            chunk_size=ck,
            first_call_s=first,
            second_call_s=second * R / sr.num_runs,
            runs_timed=sr.num_runs,
            extrapolated_to=R,
        )
        log(f"  ufm.sweep done in {time.perf_counter() - t0:.1f} s ({sr.num_runs} runs)")
        # the sweep's own solve, same seeds and lambdas: losses must match the batched solve
        recs = {(round(r["config"]["lam_H"], 15), r["config"]["seed"]): r["loss"] for r in sr.records}
        dif = [
            abs(recs[(round(float(lam[i]), 15), int(seed[i]))] - float(vb[i])) / abs(float(vb[i]))
            for i in sub[:5]
            if (round(float(lam[i]), 15), int(seed[i])) in recs
        ]
        res["A_sweep"]["max_rel_diff_vs_solve_batch"] = max(dif) if dif else None

    # ---------------- part B: to an answer (default L-BFGS); not in the tiny run (two more compiles)
    if tiny:
        res["targets"] = _targets(res)
        return _finish(res, out_dir, log)
    Bb = R  # one solve_batch call over every run: its engine (map on CPU, slots on accelerators) retires runs
    t = time.perf_counter()
    ufm.solve_batch(p0, keys=keys[:Bb], lam_H=lam[:Bb], lam_W=lam[:Bb], history=False).value.block_until_ready()
    compile_s[f"solve_batch B={Bb} lbfgs"] = time.perf_counter() - t
    t = time.perf_counter()
    single(0, history=False)
    compile_s["solve lbfgs"] = time.perf_counter() - t

    lb_out = {}

    def mb_batch():
        t = time.perf_counter()
        lb_out["batch"] = batched(Bb, history=False)
        return time.perf_counter() - t

    def mb_single():
        t = time.perf_counter()
        lb_out["single"] = [single(i, history=False) for i in sub]
        return (time.perf_counter() - t) * R / len(sub)

    t0 = time.perf_counter()
    tb = C.interleaved({f"ufm.solve_batch L-BFGS (B={Bb})": mb_batch, "loop of ufm.solve L-BFGS": mb_single}, 1)
    log(f"  part B done in {time.perf_counter() - t0:.1f} s")
    res["B_seconds_per_round"] = tb
    res["B_median_s"] = {k: C.median(v) for k, v in tb.items()}
    vals, steps, status = lb_out["batch"]
    res["B_batch_converged_fraction"] = float(np.mean(status == 0))
    res["B_batch_steps"] = dict(median=float(np.median(steps)), max=int(np.max(steps)))
    res["B_single_steps"] = dict(median=float(np.median([int(s.num_steps) for s in lb_out["single"]])))
    res["B_batch_vs_single_max_rel_diff"] = max(
        abs(float(vals[i]) - float(s.value)) / abs(float(s.value)) for i, s in zip(sub, lb_out["single"], strict=True)
    )
    k1, k2 = list(tb)
    res["B_speedup_batch_over_loop"] = C.median(C.per_round_ratios(tb[k2], tb[k1]))
    res["targets"] = _targets(res)
    return _finish(res, out_dir, log)


def _finish(res, out_dir, log):
    md = markdown(res)
    paths = C.write_outputs("sweep" if res["size"] != "tiny" else "sweep_tiny", res, out_dir, md)
    plot(res, paths["png"])
    res["paths"] = paths
    log(md)
    return res


def _targets(res):
    out = []
    sp = res["A_speedup_best_batch_over"]
    for k in ("loop of torch (default threads)", "loop of torch (1 thread)"):
        if k in sp:
            out.append(dict(target=f"batched sweep >= 10x a {k}", value=sp[k], met=sp[k] >= 10))
    out.append(
        dict(
            target="batched sweep never slower than the loop of single ufm solves (fixed work)",
            value=sp["loop of ufm.solve"],
            met=sp["loop of ufm.solve"] >= 1,
        )
    )
    if "B_speedup_batch_over_loop" in res:
        out.append(
            dict(
                target="batched sweep never slower than the loop of single ufm solves (L-BFGS to tol)",
                value=res["B_speedup_batch_over_loop"],
                met=res["B_speedup_batch_over_loop"] >= 1,
            )
        )
    return out


def markdown(res) -> str:
    R, S = res["runs"], res["steps"]
    rows = []
    best = res["A_best_batch"]
    for k, v in res["A_median_s"].items():
        extra = (
            ""
            if k.startswith("ufm.solve_batch")
            else (f" (subset of {res['single_subset'] if 'ufm' in k else res['torch_subset']}, extrapolated)")
        )
        sp = "1 (best)" if k == best else C.fmt_ratio(res["A_speedup_best_batch_over"][k])
        rows.append([k + extra, C.fmt_time(v), C.fmt_rate(R / v), sp])
    if "A_sweep" in res:
        sw = res["A_sweep"]
        ext = "" if sw["runs_timed"] == R else f", {sw['runs_timed']} runs timed, extrapolated"
        rows.append(
            [
                f"ufm.sweep (chunk {sw['chunk_size']}, + predict/check per run{ext})",
                C.fmt_time(sw["second_call_s"]),
                C.fmt_rate(R / sw["second_call_s"]),
                "—",
            ]
        )
    rows_b = []
    for k, v in res.get("B_median_s", {}).items():
        extra = "" if "batch" in k else f" (subset of {res['single_subset']}, extrapolated)"
        rows_b.append([k + extra, C.fmt_time(v), C.fmt_rate(R / v)])
    p = res["problem"]
    comp = ", ".join(f"{k} {C.fmt_time(v)}" for k, v in res["compile_and_first_call_s"].items())
    lines = [
        f"### Sweep throughput: {R} problems (lambda x seed grid), compile excluded",
        "",
        f"Machine: {C.machine_line(res['machine'])}.",
        f"Problem: K={p['num_classes']}, n={p['n_per_class']}, widths={tuple(p['widths'])}, {p['activation']}, "
        f"{p['loss']}, float64. Medians over interleaved rounds; speed-ups are medians of per-round ratios.",
        "",
        f"A. Same work: heavy ball (momentum {res['momentum']}, lr {res['lr']}), {S} steps per problem.",
        "",
        C.md_table(["implementation", f"time for {R} problems", "problems/s", f"speed-up of {best}"], rows),
        "",
    ]
    if rows_b:
        lines += [
            "B. To an answer: ufm's default L-BFGS to its default tolerance "
            f"(batched: {100 * res['B_batch_converged_fraction']:.0f}% converged, steps median "
            f"{res['B_batch_steps']['median']:.0f} / max {res['B_batch_steps']['max']}; single solves: steps "
            f"median {res['B_single_steps']['median']:.0f}; batched vs single max rel. diff of the loss "
            f"{res['B_batch_vs_single_max_rel_diff']:.1e}).",
            "",
            C.md_table(["implementation", f"time for {R} problems", "problems/s"], rows_b),
            f"Speed-up batched / loop: {C.fmt_ratio(res['B_speedup_batch_over_loop'])}.",
            "",
        ]
    lines += [
        f"Compile + first call: {comp}.",
        f"Checks (torch vs ufm, batched vs single): {'all within tolerance' if res['checks_ok'] else 'FAILED'} "
        f"(max {max(res['checks'].values()):.1e}).",
        "",
        "Targets:",
    ]
    for t in res["targets"]:
        lines.append(f"- {t['target']}: {C.fmt_ratio(t['value'])} — {'met' if t['met'] else 'MISSED'}")
    if "torch_skipped" in res:
        lines.append(f"- torch columns skipped: {res['torch_skipped']}")
    return "\n".join(lines)


def plot(res, path) -> None:
    R = res["runs"]
    items = [(k, R / v) for k, v in res["A_median_s"].items()]
    if "A_sweep" in res:
        items.append(("ufm.sweep (+predict/check)", R / res["A_sweep"]["second_call_s"]))
    items += [(k, R / v) for k, v in res.get("B_median_s", {}).items()]
    fig, ax = C.new_figure(figsize=(8, 4))
    ax.barh(range(len(items))[::-1], [v for _, v in items], color=["C0" if "ufm" in k else "C3" for k, _ in items])
    ax.set_yticks(range(len(items))[::-1], [k for k, _ in items], fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("problems solved per second (median)")
    ax.set_title(f"{R} small UFM problems: batched vs loops", fontsize=9)
    C.save_figure(fig, path)


# ----------------------------------------------------------------------------------------------------------------
# Part B, engines: ufm.solve_batch's engines ("lockstep", "map", "slots") against a loop of single solves, to the
# default tolerance (default L-BFGS), side by side in one process, at 64 runs and at the full 1,000.
#
#     python -c "from benchmarks.bench_sweep import main_engines; main_engines()"              # 64 and 1000 runs
#     python -c "from benchmarks.bench_sweep import main_engines; main_engines(['--sizes', '16'])"


def parse_variant(spec: str) -> dict:
    """An engine variant of part B: ``ENGINE[-LANES][-tTHREADS]``, e.g. ``lockstep-32-t2`` (32 lanes per thread, 2
    host threads), ``map-t1``, ``slots``; an absent field is solve_batch's default."""
    parts = spec.split("-")
    kw: dict = dict(engine=parts[0])
    for p in parts[1:]:
        if p.startswith("t"):
            kw["threads"] = int(p[1:])
        else:
            kw["slots"] = int(p)
    return kw


COMPILE_EVENTS = (
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
)
_compile_seconds = [0.0]  # the process's trace + lowering + XLA compile time so far (`compile_clock`)


def compile_clock() -> float:
    """Seconds this process has spent tracing, lowering and compiling with jax so far (`jax.monitoring`'s compile
    duration events, summed; the listener is registered on the first call). The difference around a first call is
    its compile time alone, unlike first call minus warm call, which moves with the solve's own time under load."""
    if not _compile_seconds[1:]:
        from jax import monitoring

        def listen(event: str, duration_secs: float, **kwargs: str | int) -> None:
            if event in COMPILE_EVENTS:
                _compile_seconds[0] += duration_secs

        monitoring.register_event_duration_secs_listener(listen)
        _compile_seconds.append(1.0)  # registered
    return _compile_seconds[0]


def first_call(fn) -> tuple[float, float]:
    """(wall seconds, compile seconds by `compile_clock`) of ``fn()``."""
    c0, t = compile_clock(), time.perf_counter()
    fn()
    return time.perf_counter() - t, compile_clock() - c0


def score_variants(r: dict, engines, sub, compile_single_s: float) -> None:
    """Part B's per-variant figures of one size into ``r``: the share of the loop's runs ``sub`` whose batched loss
    equals the single solve's (1e-6 relative), converged share, steps, speed-up over the loop (best times) and
    compile (first call minus the best warm call, and its ratio to the single solve's); takes the solutions out of
    ``r["out"]`` (from `time_size`), so that ``r`` holds numbers only, and records the load after."""
    out = r.pop("out")
    ref = np.array([float(s.value) for s in out["loop"]])
    r["loop_steps_median"] = float(np.median([int(s.num_steps) for s in out["loop"]]))
    for e in engines:
        s = out[e]
        v = np.asarray(s.value)[sub]
        r[f"{e}_same_minimum"] = float(np.mean(np.abs(v - ref) <= 1e-6 * np.abs(ref)))
        r[f"{e}_converged"] = float(np.mean(np.asarray(s.status) == 0))
        st = np.asarray(s.num_steps)
        r[f"{e}_steps"] = dict(median=float(np.median(st)), max=int(st.max()), total=int(st.sum()))
        r[f"speedup_{e}_over_loop"] = r["seconds"]["loop"] / r["seconds"][e]
        r[f"compile_{e}_s"] = r[f"first_{e}_s"] - r["seconds"][e]
        r[f"compile_ratio_{e}"] = r[f"compile_{e}_s"] / compile_single_s
    r["load_after"] = C.load_average()


def time_size(B: int, loop_runs: list[int], engines, single, batch, rounds: int, log) -> dict:
    """Part B at one size B: warm-up (``single`` of the loop's runs ``loop_runs``, every variant at
    ``max_steps=2``), each variant's first call (`first_call`), then ``rounds`` interleaved rounds of every variant
    (``batch(e)``) and of the loop (times scaled to B runs); results kept in ``r["out"]`` for `score_variants`."""
    r: dict = dict(B=int(B), loop_subset=len(loop_runs), load_before=C.load_average())
    out: dict = {}
    for i in loop_runs:  # warm-up: the single solve's programs (polish and predict included)
        single(i)
    for e in engines:
        batch(e, max_steps=2)
    for e in engines:
        r[f"first_{e}_s"], r[f"compile_events_{e}_s"] = first_call(functools.partial(batch, e))
        log(f"  B={B}: first call of {e} {r[f'first_{e}_s']:.1f} s")

    def m_batch(e):
        def f():
            t = time.perf_counter()
            out[e] = batch(e)
            return time.perf_counter() - t

        return f

    def m_loop():
        t = time.perf_counter()
        out["loop"] = [single(i) for i in loop_runs]
        return (time.perf_counter() - t) * B / len(loop_runs)

    times = C.interleaved({**{e: m_batch(e) for e in engines}, "loop": m_loop}, rounds)
    r["seconds"] = {k: min(v) for k, v in times.items()}
    r["seconds_all"] = times
    log(f"  B={B}: {r['seconds']}")
    r["out"] = out
    return r


def run_engines(
    sizes=(64, 1000),
    out_dir=None,
    log=print,
    loop_subset: int = 0,
    engines=("lockstep", "map", "slots"),
    name: str = "sweep_engines",
    rounds: int = 1,
) -> dict:
    """Times ``solve_batch`` for each engine variant (`parse_variant`: engine, lanes, threads) and a loop of
    ``ufm.solve`` (every run by default; with ``loop_subset`` > 0 an evenly spread subset of that many runs,
    extrapolated: biased when the runs' step counts vary, measured 0.72 s extrapolated from 40 of 64 runs against
    1.15 s for all 64) on B runs of part B's grid (spread over the
    lambdas), one interleaved round per size; compile (first call) times; steps; the fraction of the subset's runs
    whose batched loss equals the single solve's (1e-6 relative, the issue's criterion).

    Warm-up, so that no variant pays a compile it shares with another: the loop's subset is solved once (the single
    solve, its polish and `ufm.predict` compile there), and every variant is called once at the same B with
    ``max_steps=2`` (the eager input conversions at size B, the threads' result merge; only the solver programs,
    which depend on ``max_steps``, are left). A variant's first call then compiles its own programs only: its
    compile is reported as that first call minus the warm call of the same inputs (``compile_*_s``). With
    ``rounds`` > 1 the times are the best of the interleaved rounds (the machine is shared: other jobs only ever
    add time), all rounds in ``seconds_all``."""
    C.enable_x64()
    import jax

    import ufm

    info = C.machine_info()
    log(f"machine: {C.machine_line(info)}")
    lam_all, seed_all, _ = _grid("full")
    p0 = ufm.UFM(**BASE, lam_H=1e-3, lam_W=1e-3)
    kw = dict(history=False)
    variants = {e: parse_variant(e) for e in engines}
    res: dict = dict(
        benchmark="sweep_engines", machine=info, problem=p0.to_dict(), sizes=list(sizes), engines=list(engines)
    )
    res["default_threads"] = ufm._batch.default_threads()
    res["rounds"] = rounds

    def single(i):
        p = ufm.UFM(**BASE, lam_H=float(lam_all[i]), lam_W=float(lam_all[i]))
        return jax.block_until_ready(ufm.solve(p, key=int(seed_all[i]), **kw))

    res["first_single_s"], res["compile_events_single_s"] = first_call(functools.partial(single, 0))
    t = time.perf_counter()
    single(0)
    res["compile_single_s"] = res["first_single_s"] - (time.perf_counter() - t)
    for B in sizes:
        idx = np.linspace(0, len(lam_all) - 1, B).astype(int)
        lam, seed = lam_all[idx], seed_all[idx]
        sub = np.linspace(0, B - 1, min(B, loop_subset) if loop_subset > 0 else B).astype(int)

        def batch(e, lam=lam, seed=seed, **extra):
            s = ufm.solve_batch(p0, seeds=seed, lam_H=lam, lam_W=lam, **variants[e], **kw, **extra)
            return jax.block_until_ready(s)

        res[f"B{B}"] = time_size(B, [int(i) for i in idx[sub]], engines, single, batch, rounds, log)
        score_variants(res[f"B{B}"], engines, sub, res["compile_single_s"])
    md = markdown_engines(res)
    paths = C.write_outputs(name, res, out_dir, md)
    res["paths"] = paths
    log(md)
    return res


def _load1(la) -> str:
    return "?" if la is None else f"{la[0]:.1f}"


def compile_events(res: dict, r: dict, e: str) -> str:
    """Variant ``e``'s first-call compile by `compile_clock` and its ratio to the single solve's ("" if absent)."""
    got, one = r.get(f"compile_events_{e}_s"), res.get("compile_events_single_s")
    if got is None or not one:
        return ""
    return f"{C.fmt_time(got)} ({got / one:.2f}x single)"


def round_ratios(r: dict, e: str) -> str:
    """The loop's time over variant ``e``'s in each interleaved round (both timed in the same round, so a load
    that lasts the round slows both): min / median / max, less sensitive to the load than the best times'
    ratio."""
    loop, mine = r.get("seconds_all", {}).get("loop"), r.get("seconds_all", {}).get(e)
    if not loop or not mine:
        return ""
    q = np.asarray(C.per_round_ratios(loop, mine))
    return f"{q.min():.2f}x / {np.median(q):.2f}x / {q.max():.2f}x"


def engine_rows(res: dict) -> list[list[str]]:
    """The rows of part B's table: per size, the loop, then each variant."""
    rows: list[list[str]] = []
    for B in res["sizes"]:
        r = res[f"B{B}"]
        rows.append([f"B={B}", "loop of ufm.solve", C.fmt_time(r["seconds"]["loop"]), "1"] + [""] * 7)
        for e in res["engines"]:
            st = r[f"{e}_steps"]
            rows.append(
                [
                    f"B={B}",
                    f"solve_batch {e}",
                    C.fmt_time(r["seconds"][e]),
                    C.fmt_ratio(r[f"speedup_{e}_over_loop"]),
                    round_ratios(r, e),
                    C.fmt_time(r.get(f"first_{e}_s", r[f"compile_{e}_s"])),
                    f"{C.fmt_time(r[f'compile_{e}_s'])} ({r[f'compile_ratio_{e}']:.2f}x single)",
                    compile_events(res, r, e),
                    f"{st['median']:.0f} / {st['max']} / {st['total']}",
                    f"{100 * r[f'{e}_converged']:.0f}%",
                    f"{100 * r[f'{e}_same_minimum']:.0f}% of {r['loop_subset']}",
                ]
            )
    return rows


def markdown_engines(res) -> str:
    p = res["problem"]
    lines = [
        "### Batched engine: solve_batch engines vs a loop of single solves, to the default tolerance (L-BFGS)",
        "",
        f"Machine: {C.machine_line(res['machine'])}.",
        f"Problem: K={p['num_classes']}, n={p['n_per_class']}, widths={tuple(p['widths'])}, {p['activation']}, "
        f"{p['loss']}, float64, lambda on part B's grid, seeds 0..9; {res.get('rounds', 1)} interleaved round(s) per "
        "size (times: the best round), compile excluded from the times. Compile = first call minus warm call (the "
        "first call includes a solve); the compile by jax's events is the trace, lowering and XLA compile time "
        "jax.monitoring reports during the first call (compiles shared with the loop, done before, are not "
        "counted on either side). Single "
        f"solve: first call {C.fmt_time(res.get('first_single_s', res['compile_single_s']))}, compile "
        f"{C.fmt_time(res['compile_single_s'])}. Variants ENGINE-LANES-tTHREADS (lanes per thread; absent: the "
        f"default; default threads here: {res.get('default_threads', '?')}). Load (uptime, 1 min) before / after "
        "each size: "
        + ", ".join(
            f"B={B}: {_load1(res[f'B{B}'].get('load_before'))} / {_load1(res[f'B{B}'].get('load_after'))}"
            for B in res["sizes"]
        )
        + ".",
        "",
    ]
    rows = engine_rows(res)
    lines.append(
        C.md_table(
            [
                "runs",
                "implementation",
                "time",
                "speed-up over the loop",
                "same-round speed-up min / median / max",
                "first call (compile + solve)",
                "compile",
                "compile by jax's events (trace + lower + XLA)",
                "steps median / max / total",
                "converged",
                "same loss as ufm.solve (1e-6)",
            ],
            rows,
        )
    )
    lines += ["", "Targets:"]
    for B in res["sizes"]:
        r = res[f"B{B}"]
        best = max(res["engines"], key=lambda e: r[f"speedup_{e}_over_loop"])
        sp, cr = r[f"speedup_{best}_over_loop"], r[f"compile_ratio_{best}"]
        lines.append(
            f"- B={B}: best engine {best} >= 3x the loop: {C.fmt_ratio(sp)} — {'met' if sp >= 3 else 'MISSED'}"
        )
        lines.append(f"- B={B}: its compile <= 2x the single solve's: {cr:.2f}x — {'met' if cr <= 2 else 'MISSED'}")
        if f"compile_events_{best}_s" in r and res.get("compile_events_single_s"):
            ce = r[f"compile_events_{best}_s"] / res["compile_events_single_s"]
            lines.append(
                f"- B={B}: the same by jax's compile events (the compile alone, without the solve): {ce:.2f}x — "
                + ("met" if ce <= 2 else "MISSED")
            )
        same = r[f"{best}_same_minimum"]
        lines.append(
            f"- B={B}: same minimum as ufm.solve in >= 90% of runs: {100 * same:.0f}% — "
            + ("met" if same >= 0.9 else "MISSED")
        )
    return "\n".join(lines)


def main_engines(argv=None):
    ap = argparse.ArgumentParser(description="solve_batch engines vs a loop of single solves (part B)")
    ap.add_argument("--sizes", default="64,1000", help="comma-separated batch sizes")
    ap.add_argument(
        "--engines",
        default="lockstep,map,slots",
        help="comma-separated variants ENGINE[-LANES][-tTHREADS], e.g. lockstep-32-t2,map-t1 (parse_variant)",
    )
    ap.add_argument(
        "--loop-subset", type=int, default=0, help="single solves timed per size (extrapolated); 0: every run"
    )
    ap.add_argument("--name", default="sweep_engines", help="results file name")
    ap.add_argument("--rounds", type=int, default=1, help="interleaved rounds (times: the best)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    run_engines(
        tuple(int(s) for s in a.sizes.split(",")),
        out_dir=a.out,
        engines=tuple(a.engines.split(",")),
        loop_subset=a.loop_subset,
        name=a.name,
        rounds=a.rounds,
    )


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny grid (seconds)")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--out", default=None, help="output folder (default benchmarks/results)")
    ap.add_argument("--torch-default-threads", action="store_true", help="also time torch with its default threads")
    a = ap.parse_args(argv)
    run("tiny" if a.smoke else "full", out_dir=a.out, rounds=a.rounds, torch_default_threads=a.torch_default_threads)


if __name__ == "__main__":
    main()


# ----------------------------------------------------------------------------------------------------------------
# Part D: ufm.sweep on a Dask LocalCluster vs in process (same grid, same chunks).
#
#     python -c "from benchmarks.bench_sweep import main_dask; main_dask()"            # 2 workers, 64 runs
#     python -c "from benchmarks.bench_sweep import main_dask; main_dask(['--smoke'])"  # 16 runs
#
# The part-A problem and solver (heavy ball, fixed S steps, tol 0: equal work per run) through ufm.sweep with
# metrics off, chunk_size 16: once in this process, once on a LocalCluster of N worker processes (1 thread
# each). Each is called twice on fresh stores: the first call includes compiles (on every worker), the second is
# warm. Cluster start-up is reported apart. Checked first: the two stores hold the same runs, losses <= 1e-10.


def run_dask(
    size: str = "full", workers: int = 2, log=print, to_answer: bool = False, chunk_size: int = 16, runs: int = 64
) -> dict:
    """Part D. ``to_answer``: the part-C problem instead (ufm's default L-BFGS to its default tolerance, lam x seed
    grid of ``runs`` runs), in chunks of ``chunk_size``; in process, `solve_batch` uses its default host threads
    (every core), each Dask worker one thread."""
    import os
    import tempfile

    C.enable_x64()
    import ufm

    try:
        from distributed import Client, LocalCluster
    except ImportError:
        log("part D skipped: pip install 'ufm[distributed]'")
        return {"skipped": "distributed not installed"}
    info = C.machine_info()
    n_lam, n_seed = (4, 4) if size == "tiny" else (8, 8)
    if to_answer:
        n_lam, n_seed = runs // 10, 10
    grid = dict(
        K=BASE["num_classes"],
        n=BASE["n_per_class"],
        widths=list(BASE["widths"]),
        activation=BASE["activation"],
        lam=np.logspace(-4, -1.5, n_lam).tolist(),
        seeds=n_seed,
        method="momentum",
        lr=LR,
        max_steps=300,
        tol=0.0,
    )
    if to_answer:
        for k in ("method", "lr", "max_steps", "tol"):
            grid.pop(k)
    res: dict = {
        "machine": info,
        "runs": n_lam * n_seed,
        "workers": workers,
        "chunk_size": chunk_size,
        "to_answer": to_answer,
        "threads_in_process": ufm._batch.default_threads(),
        "load_before": C.load_average(),
    }
    with tempfile.TemporaryDirectory() as d:
        t = {}
        for k in (1, 2):
            t0 = time.perf_counter()
            here = ufm.sweep(grid, os.path.join(d, f"here{k}.jsonl"), chunk_size=chunk_size, metrics=False)
            t[f"in_process_call{k}_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None) as lc:
            with Client(lc) as client:
                t["cluster_start_s"] = time.perf_counter() - t0
                for k in (1, 2):
                    t0 = time.perf_counter()
                    dask = ufm.sweep(
                        grid, os.path.join(d, f"dask{k}.jsonl"), chunk_size=chunk_size, metrics=False, client=client
                    )
                    t[f"dask_call{k}_s"] = time.perf_counter() - t0
        a = {r["run"]: r["loss"] for r in here.records}
        b = {r["run"]: r["loss"] for r in dask.records}
        res["same_runs"] = a.keys() == b.keys()
        res["max_rel_loss_diff"] = max(abs(a[k] - b[k]) / abs(a[k]) for k in a)
        res.update(t)
    res["warm_speedup"] = res["in_process_call2_s"] / res["dask_call2_s"]
    res["load_after"] = C.load_average()
    log(
        f"part D ({res['runs']} runs, {workers} Dask workers, {info.get('cores', '?')} cores, load "
        f"{os.getloadavg()[0]:.1f}): in process {res['in_process_call1_s']:.1f} s first / "
        f"{res['in_process_call2_s']:.1f} s warm; Dask {res['dask_call1_s']:.1f} s first / {res['dask_call2_s']:.1f} s "
        f"warm (cluster start {res['cluster_start_s']:.1f} s); warm ratio {res['warm_speedup']:.2f}x; same runs "
        f"{res['same_runs']}, max rel loss diff {res['max_rel_loss_diff']:.1e}"
    )
    return res


def main_dask(argv=None):
    ap = argparse.ArgumentParser(description="ufm.sweep on a Dask LocalCluster vs in process")
    ap.add_argument("--smoke", action="store_true", help="16 runs")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--to-answer", action="store_true", help="part C's problem: L-BFGS to the default tolerance")
    ap.add_argument("--runs", type=int, default=64, help="with --to-answer: runs (lambdas x 10 seeds)")
    ap.add_argument("--chunk-size", type=int, default=16)
    a = ap.parse_args(argv)
    return run_dask(
        "tiny" if a.smoke else "full", workers=a.workers, to_answer=a.to_answer, chunk_size=a.chunk_size, runs=a.runs
    )


# ----------------------------------------------------------------------------------------------------------------
# Part C: sweep throughput, to an answer. ufm.sweep vs a loop of single ufm.solve calls, side by side in one process.
#
#     python -c "from benchmarks.bench_sweep import main_sweep; main_sweep()"                  # 64 runs
#     python -c "from benchmarks.bench_sweep import main_sweep; main_sweep(['--runs', '1000'])"  # 1,000 runs
#     python -c "from benchmarks.bench_sweep import main_sweep; main_sweep(['--smoke'])"         # 8 runs
#
# The part-B problem (K=3, n=5, widths (12, 12), ReLU, MSE, no bias, float64) on a lam x seed grid (lam_H = lam_W
# on 10^linspace(-4, -1.5)), ufm's default L-BFGS to its default tolerance. Timed, in this order:
#   cold: the first ufm.sweep call (compiles solve_batch's program, predict, check), then the first loop (compiles
#         the single solve; check is compiled already, so the loop's cold figure is the lower bound);
#   warm: interleaved rounds of ufm.sweep (metrics off: the record is predict + check + ranks per run), of
#         ufm.solve_batch alone on the sweep's chunks (the sweep's solve without its records), of a loop of
#         ufm.solve, and of a loop of ufm.solve + ufm.predict + ufm.check (the sweep's record work, without ranks);
#         loops over more than `loop_subset` runs are timed on an evenly spread subset and extrapolated.
# Optionally (`--with-vmap`) ufm.sweep(engine="vmap"), the old path (one vmapped loop per chunk), warm.
# Checked: the fraction of the timed single solves whose loss the sweep's record matches to 1e-6 relative.


def _sweep_c_grid(runs: int) -> dict:
    n_seed = 8 if runs <= 64 else 10
    n_lam = max(1, runs // n_seed)
    return dict(
        K=BASE["num_classes"],
        n=BASE["n_per_class"],
        widths=list(BASE["widths"]),
        activation=BASE["activation"],
        loss=BASE["loss"],
        lam=np.logspace(-4, -1.5, n_lam).tolist(),
        seeds=n_seed,
    )


def _sweep_c_loop(ufm, recs, idx, post: bool):
    """Single solves (`ufm.rerun`: `ufm.solve` with the run's config) of the runs ``idx`` (with predict + check when
    ``post``); their losses."""
    import jax

    out = []
    for i in idx:
        p, sol = ufm.rerun(recs[i])  # ufm.solve with every solver option of the run's config
        if post:
            ufm.check(p, sol, ufm.predict(p), hessian=False, metrics=False)
        out.append(float(jax.block_until_ready(sol.value)))
    return out


def _sweep_c_solve_batch(ufm, recs):
    """A function that solves the runs of ``recs`` as the sweep does, with `ufm.solve_batch` alone: the same
    padded chunks (chunk_size 64; the next power of two for smaller grids), default engine, no records."""
    import jax

    R = len(recs)
    p0 = ufm.UFM(**BASE)
    c0 = recs[0]["config"]
    cols = {k: np.asarray([r["config"][k] for r in recs]) for k in ("lam_H", "lam_W", "seed")}
    B = min(64, 1 << int(np.ceil(np.log2(R))))  # the sweep's batch size (chunk_size 64; pow2 for small grids)

    def solve_batch_only():  # the sweep's solve alone: solve_batch of the same padded chunks (default engine)
        for s in range(0, R, B):
            ix = np.arange(s, min(s + B, R))
            ix = np.r_[ix, np.full(B - len(ix), ix[-1])]
            sol = ufm.solve_batch(
                p0,
                seeds=cols["seed"][ix],
                lam_H=cols["lam_H"][ix],
                lam_W=cols["lam_W"][ix],
                max_steps=c0["max_steps"],
                tol=c0["tol"],
                patience=c0["patience"],
                history=False,
            )
            jax.block_until_ready(sol.value)

    return solve_batch_only


def run_sweep_c(runs: int = 64, rounds: int = 2, loop_subset: int = 100, with_vmap: bool = False, log=print) -> dict:
    """Part C (see the comment above): cold and warm seconds, medians of interleaved rounds, and the ratios."""
    C.enable_x64()
    import jax

    import ufm

    grid = _sweep_c_grid(runs)
    info = C.machine_info()
    kw = dict(chunk_size=64, metrics=False, progress=False)
    t0 = time.perf_counter()
    first = ufm.sweep(grid, **kw)
    cold = {"ufm.sweep": time.perf_counter() - t0}
    recs, R = first.records, first.num_runs
    idx = np.unique(np.linspace(0, R - 1, min(R, loop_subset)).astype(int))
    scale = R / len(idx)
    t0 = time.perf_counter()
    single = _sweep_c_loop(ufm, recs, idx, post=False)
    cold_subset = time.perf_counter() - t0  # the single solve's compile + the subset's runs

    def timed(fn, factor=1.0):
        def f():
            t = time.perf_counter()
            fn()
            return (time.perf_counter() - t) * factor

        return f

    solve_batch_only = _sweep_c_solve_batch(ufm, recs)
    t0 = time.perf_counter()
    solve_batch_only()
    cold["ufm.solve_batch alone (the sweep's chunks)"] = time.perf_counter() - t0

    measures = {
        "ufm.sweep": timed(lambda: ufm.sweep(grid, **kw)),
        "ufm.solve_batch alone (the sweep's chunks)": timed(solve_batch_only),
        "loop of ufm.solve": timed(lambda: _sweep_c_loop(ufm, recs, idx, False), scale),
        "loop of ufm.solve + predict + check": timed(lambda: _sweep_c_loop(ufm, recs, idx, True), scale),
    }
    if with_vmap:
        t0 = time.perf_counter()
        ufm.sweep(grid, engine="vmap", **kw)
        cold['ufm.sweep(engine="vmap")'] = time.perf_counter() - t0
        measures['ufm.sweep(engine="vmap")'] = timed(lambda: ufm.sweep(grid, engine="vmap", **kw))
    times = C.interleaved(measures, rounds)
    warm = {k: C.median(v) for k, v in times.items()}
    # cold loop over every run: its compile once + the warm time of the runs the subset does not cover
    cold["loop of ufm.solve"] = cold_subset + warm["loop of ufm.solve"] * (1 - 1 / scale)
    ratio = lambda k: C.median(C.per_round_ratios(times[k], times["ufm.sweep"]))  # time_k / time_sweep per round
    steps = np.asarray([r["num_steps"] for r in recs])
    match = [abs(recs[i]["loss"] - v) <= 1e-6 * abs(v) for i, v in zip(idx, single, strict=True)]
    res = dict(
        part="C",
        runs=R,
        grid=grid,
        machine=info,
        backend=jax.default_backend(),
        loop_timed_runs=int(len(idx)),
        cold_s=cold,
        warm_s=warm,
        warm_seconds_per_round=times,
        warm_speedup_of_sweep_over={k: ratio(k) for k in times if k != "ufm.sweep"},
        cold_speedup_of_sweep_over_loop=cold["loop of ufm.solve"] / cold["ufm.sweep"],
        converged_fraction=float(np.mean([r["status"] == "converged" for r in recs])),
        steps=dict(median=float(np.median(steps)), max=int(steps.max())),
        match_single_1e6_fraction=float(np.mean(match)),
        load_average_end=C.load_average(),
    )
    log(markdown_sweep_c(res))
    return res


def markdown_sweep_c(res) -> str:
    R = res["runs"]
    rows = [[k, C.fmt_time(res["cold_s"].get(k, float("nan"))), C.fmt_time(v)] for k, v in res["warm_s"].items()]
    sp = ", ".join(f"{k} {C.fmt_ratio(v)}" for k, v in res["warm_speedup_of_sweep_over"].items())
    loop = f"loops timed on {res['loop_timed_runs']} runs, extrapolated" if res["loop_timed_runs"] < R else "loops: all"
    return "\n".join(
        [
            f"### Part C: ufm.sweep vs a loop of ufm.solve, {R} deep ReLU settings, L-BFGS to the default tolerance",
            "",
            f"Machine: {C.machine_line(res['machine'])} ({res['backend']}). {loop}. Converged "
            f"{100 * res['converged_fraction']:.0f}%, steps median {res['steps']['median']:.0f} / max "
            f"{res['steps']['max']}; sweep = single solve (loss to 1e-6) in "
            f"{100 * res['match_single_1e6_fraction']:.0f}% of the timed runs.",
            "",
            C.md_table(["", f"cold (first call, {R} runs)", f"warm (median, {R} runs)"], rows),
            "",
            f"Warm speed-up of ufm.sweep over: {sp}. Cold: {C.fmt_ratio(res['cold_speedup_of_sweep_over_loop'])} "
            "over the loop of ufm.solve.",
        ]
    )


def main_sweep(argv=None):
    ap = argparse.ArgumentParser(description="ufm.sweep vs a loop of ufm.solve (part C)")
    ap.add_argument("--runs", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--loop-subset", type=int, default=100, help="loops over more runs are timed on this many")
    ap.add_argument("--with-vmap", action="store_true", help='also time ufm.sweep(engine="vmap") (the old path)')
    ap.add_argument("--smoke", action="store_true", help="8 runs, 1 round")
    a = ap.parse_args(argv)
    if a.smoke:
        return run_sweep_c(8, rounds=1, loop_subset=8, with_vmap=a.with_vmap)
    return run_sweep_c(a.runs, rounds=a.rounds, loop_subset=a.loop_subset, with_vmap=a.with_vmap)
