"""Benchmark 1: full-batch gradient-descent step throughput of the deep ReLU UFM (MSE, weight decay).

    python -m benchmarks.bench_steps            # full run (~3 min on 2 quiet cores)
    python -m benchmarks.bench_steps --smoke    # tiny sizes, seconds

Compares, in one process, interleaved round by round:

* ``ufm``: ``ufm.solve(p, init=x0, method="gd", lr=0.1, max_steps=S, tol=0)``, the compiled while_loop.
  Steady-state steps/s = S / (t(2S) - t(S)) per round, which removes compile, dispatch, argument checks and
  the initial gradient (both programs are compiled before timing).
* ``torch eager``: the research-code loop (zero_grad / backward / SGD step), PyTorch's default threads
  and 1 thread.
* ``torch compiled``: the whole GD step compiled with ``torch.compile(fullgraph=True)`` on
  ``torch.func.grad_and_value`` (2 and 1 threads).
* ``numpy``: hand-written forward/backward (OpenBLAS, default threads; 1 thread too when threadpoolctl is
  installed).

Before timing, every implementation runs 3 steps from the same start and must land on ufm's point
(relative parameter difference <= 1e-4 in float32, <= 1e-10 in float64): all of them do the same work.
FLOPs per step are the forward + backward matmuls (``_common.gd_step_flops``); the machine's peak is the
best large-matmul GFLOP/s of NumPy / JAX / torch measured in the same run (at start and at end).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from . import _common as C

SIZES = {  # name: (K, n, d, L)
    "small": (2, 50, 64, 3),
    "medium": (10, 100, 128, 3),
    "large": (10, 500, 256, 5),
}
TINY_SIZES = {"tiny": (2, 5, 8, 3)}
LAM = 5e-4  # lam_H = lam_W = 5e-4 (Dang et al. 2023's weight decay)
LR = 0.1

# peers at their default threads (2 here): left out of the --one-core table, where their idle OpenBLAS/OpenMP
# threads spin on the one core and slow the measures after them (bench_steps --kernels: NumPy 1 thread W^T G
# fell from 37 to 13 GFLOP/s in float64 when NumPy at default threads ran in the same rounds)
THREADED_PEERS = ("numpy", "torch eager 2thr", "torch compiled 2thr")
FLAGS_ROW = "ufm XLA_FLAGS"  # ufm in a subprocess started with --xla-flags' XLA_FLAGS (FlagsWorker)
IMPLS = (
    "ufm",
    FLAGS_ROW,
    "torch eager 2thr",
    "torch eager 1thr",
    "torch compiled 2thr",
    "torch compiled 1thr",
    "numpy",
    "numpy 1thr",
)


def _problem(K, n, d, L):
    import ufm

    return ufm.UFM(
        num_classes=K, n_per_class=n, widths=(d,) * L, activation="relu", loss="mse", bias="none", lam_H=LAM, lam_W=LAM
    )


def case(K, n, d, L, dtype):
    """The benchmark's problem at size (K, n, d, L) (`_problem`), its start x0 (``ufm.init_params``, key 0) in
    ``dtype``, and the FLOPs of one GD step on it: ``(p, x0, flops)``."""
    import jax

    import ufm

    p = _problem(K, n, d, L)
    return p, ufm.init_params(p, jax.random.key(0), dtype=dtype), C.gd_step_flops(K, p.N, p.widths)


def _calibrate(run_steps, target_s: float, max_steps: int = 100_000) -> int:
    """Number of steps of ``run_steps(k)`` that takes about target_s (also serves as warm-up)."""
    k = 1
    while True:
        t = time.perf_counter()
        run_steps(k)
        dt = time.perf_counter() - t
        if dt >= 0.25 * target_s or k >= max_steps:
            return max(1, min(max_steps, math.ceil(k * target_s / max(dt, 1e-9))))
        k *= 4


def _numpy_threads_ctx(n):
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return None
    return lambda: threadpool_limits(limits=n, user_api="blas")


def _peer_impls(p, x0, dtype, with_torch: bool, torch_compile: bool) -> dict:
    """The peers of one configuration, by name, each starting at x0 (NumPy; torch eager and compiled if present)."""
    from .peers import NumpyGD, TorchFunctional, TorchLoop

    impls = {"numpy": NumpyGD(p, x0, dtype, LR)}
    if with_torch:
        impls["torch eager 2thr"] = TorchLoop(p, x0, dtype, LR)
        impls["torch eager 1thr"] = TorchLoop(p, x0, dtype, LR, threads=1)
        if torch_compile:
            impls["torch compiled 2thr"] = TorchFunctional(p, x0, dtype, LR)
            impls["torch compiled 1thr"] = TorchFunctional(
                p, x0, dtype, LR, threads=1, share_step_with=impls["torch compiled 2thr"]
            )
    return impls


def _peer_measures(impls: dict, target_s: float, clock, threaded_peers: bool) -> tuple[dict, dict]:
    """``({name: () -> steps/s}, {name: steps per measure})`` for the peers, NumPy 1 thread included (threadpoolctl);
    the steps per measure are calibrated to about ``target_s`` each (which also warms them up)."""
    np1 = _numpy_threads_ctx(1)
    measures, per_impl_steps = {}, {}

    def rate(impl, s, ctx=None):
        with ctx() if ctx is not None else contextlib.nullcontext():
            t0 = clock()
            impl.run(s)
            return s / (clock() - t0)

    for k, impl in impls.items():
        per_impl_steps[k] = _calibrate(impl.run, target_s)
        if threaded_peers or k not in THREADED_PEERS:
            measures[k] = functools.partial(rate, impl, per_impl_steps[k])
    if np1 is not None:
        measures["numpy 1thr"] = functools.partial(rate, impls["numpy"], per_impl_steps["numpy"], np1)
    return measures, per_impl_steps


def _summarise(res: dict, rates: dict, rounds: int, flops: int) -> None:
    """Medians, per-round ratios to every peer and to the strongest peer of each round, GFLOP/s (into ``res``)."""
    res["rates_per_round"] = rates
    res["median_steps_per_s"] = {k: C.median(v) for k, v in rates.items()}
    res["ratio_ufm_over"] = {k: C.median(C.per_round_ratios(rates["ufm"], v)) for k, v in rates.items() if k != "ufm"}
    peers = {k: v for k, v in res["median_steps_per_s"].items() if not k.startswith("ufm")}
    if peers:
        best = max(peers, key=lambda k: peers[k])
        # strongest peer per round, then the ratio per round
        best_per_round = [max(rates[k][r] for k in peers if np.isfinite(rates[k][r])) for r in range(rounds)]
        res["strongest_peer"] = best
        res["ratio_ufm_over_strongest"] = C.median(C.per_round_ratios(rates["ufm"], best_per_round))
        if FLAGS_ROW in rates:  # the --xla-flags row against the same rounds' strongest peer
            res["ratio_flags_over_strongest"] = C.median(C.per_round_ratios(rates[FLAGS_ROW], best_per_round))
    res["gflops"] = {k: v * flops / 1e9 for k, v in res["median_steps_per_s"].items()}


def _check_same_trajectory(res: dict, impls: dict, ref, n_check: int, log) -> None:
    """Run every peer ``n_check`` GD steps from x0 and record (into ``res``) its distance to ufm's point ``ref``
    (relative, <= 1e-4 in float32, <= 1e-10 in float64), and torch.compile's compile time."""
    from .peers import max_rel_diff, params_to_numpy

    dtype = res["dtype"]
    ref_P = params_to_numpy(ref.params, dtype)
    tol = 1e-4 if dtype == "float32" else 1e-10
    check = {}
    for k, impl in impls.items():
        t = time.perf_counter()
        impl.run(n_check)
        check[k] = max_rel_diff(impl.params(), ref_P)
        if "compiled" in k and "2thr" in k:
            res["torch_compile_s"] = time.perf_counter() - t
    res["same_trajectory_rel_diff"] = check
    res["same_trajectory_tol"] = tol
    res["same_trajectory_ok"] = all(v <= tol for v in check.values())
    if not res["same_trajectory_ok"]:
        log(f"  WARNING {res['size']} {dtype}: implementations disagree after {n_check} steps: {check}")


def run_config(
    name,
    K,
    n,
    d,
    L,
    dtype,
    rounds,
    target_s,
    torch_compile,
    clock=time.perf_counter,
    threaded_peers=True,
    log=print,
    flags_worker=None,
) -> dict:
    import jax

    import ufm

    p, x0, flops = case(K, n, d, L, dtype)
    torch, why_no_torch = C.torch_or_none()
    res = dict(size=name, K=K, n=n, d=d, L=L, N=p.N, dtype=dtype, flops_per_step=flops, lr=LR, lam=LAM)

    def ufm_solve(S):
        return ufm.solve(p, init=x0, method="gd", lr=LR, max_steps=S, tol=0.0, history=False, patience=10 * S + 10)

    # --- same-trajectory check (n_check steps from x0; the tiny run reuses its timed program) ---
    # ~target_s at 30 GFLOP/s; at least 4 steps (the large size: S = 2 gave +-30% per round, one round 2.7x the others)
    S = 300 if name == "tiny" else max(4, min(20_000, int(target_s * 30e9 / flops)))
    impls = _peer_impls(p, x0, dtype, torch is not None, torch_compile)
    _check_same_trajectory(res, impls, ufm_solve(S if name == "tiny" else 3), S if name == "tiny" else 3, log)

    # --- ufm: compile S and 2S, steady-state rate from the difference ---
    t = time.perf_counter()
    jax.block_until_ready(ufm_solve(S))
    res["ufm_compile_and_first_run_s"] = time.perf_counter() - t
    jax.block_until_ready(ufm_solve(2 * S))
    res["ufm_steps"] = S
    steps_done = []

    def m_ufm():
        t0 = clock()
        a = ufm_solve(S)
        a.value.block_until_ready()
        t1 = clock()
        b = ufm_solve(2 * S)
        b.value.block_until_ready()
        t2 = clock()
        steps_done.append((int(a.num_steps), int(b.num_steps)))
        d_ = (t2 - t1) - (t1 - t0)
        return S / d_ if d_ > 0 else float("nan")

    peer_measures, res["peer_steps_per_measure"] = _peer_measures(impls, target_s, clock, threaded_peers)
    measures = {"ufm": m_ufm, **peer_measures}
    if flags_worker is not None:  # ufm again, in a process started with other XLA_FLAGS (--xla-flags)
        res["flags_worker_setup"] = flags_worker.setup(
            name, dtype, S, "process_time" if clock is time.process_time else "wall"
        )
        measures[FLAGS_ROW] = flags_worker.measure
    log(f"  {name} {dtype}: timing {list(measures)} x {rounds} rounds (ufm S={S})")
    rates = C.interleaved(measures, rounds)
    res["ufm_num_steps_ok"] = all(a == S and b == 2 * S for a, b in steps_done)
    if flags_worker is not None:
        res["flags_cpu_over_wall"] = C.median(flags_worker.cpu_over_wall)
        flags_worker.cpu_over_wall.clear()
    _summarise(res, rates, rounds, flops)
    if torch is None:
        res["torch_skipped"] = why_no_torch
    return res


class FlagsWorker:
    """``ufm``'s row in a second process started with other ``XLA_FLAGS`` (``--xla-flags``), driven round by round.

    XLA reads ``XLA_FLAGS`` once, when JAX starts its CPU client, so a different thread setting (e.g.
    ``--xla_cpu_multi_thread_eigen=false``: XLA's dots and fusions on the calling thread only) needs its own process.
    The worker (``python -m benchmarks.bench_steps --flags-worker``) compiles ``ufm.solve`` at S and 2S steps for a
    configuration (`setup`) and answers each `measure` with S / (t(2S) - t(S)) on the same clock as the main
    process, so it joins the interleaved rounds like any peer. It also reports its CPU time over wall time per
    measure (`cpu_over_wall`: ~1 with one XLA thread, up to the core count with XLA's thread pool busy), which shows
    whether the flag took effect. The process inherits the CPU affinity of ``--one-core``."""

    def __init__(self, flags: str):
        env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " " + flags).strip())
        cmd = [sys.executable, "-m", "benchmarks.bench_steps", "--flags-worker"]
        root = str(Path(__file__).resolve().parent.parent)
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=root)
        self.flags = env["XLA_FLAGS"]
        self.cpu_over_wall: list[float] = []

    def _ask(self, msg: dict) -> dict:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the --xla-flags worker ({self.flags}) exited (code {self.proc.poll()})")
        return json.loads(line)

    def setup(self, name: str, dtype: str, S: int, clock: str) -> dict:
        return self._ask(dict(size=name, dtype=dtype, S=S, clock=clock))

    def measure(self) -> float:
        r = self._ask(dict(measure=True))
        self.cpu_over_wall.append(r["cpu_over_wall"])
        return r["rate"]

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(timeout=60)


def _flags_worker_main() -> None:
    """The `FlagsWorker` process: one JSON request per stdin line, one JSON answer per stdout line."""
    import jax

    import ufm

    C.enable_x64()
    state: dict = {}
    for line in sys.stdin:
        msg = json.loads(line)
        if "size" in msg:
            p = _problem(*(SIZES | TINY_SIZES)[msg["size"]])
            x0 = ufm.init_params(p, jax.random.key(0), dtype=msg["dtype"])
            S = msg["S"]

            def solve(k, p=p, x0=x0, S=S):
                r = ufm.solve(p, init=x0, method="gd", lr=LR, max_steps=k, tol=0.0, history=False, patience=10 * S + 10)
                r.value.block_until_ready()

            solve(S)
            solve(2 * S)
            clock = time.process_time if msg["clock"] == "process_time" else time.perf_counter
            state = dict(solve=solve, S=S, clock=clock)
            out = dict(ok=True, xla_flags=os.environ.get("XLA_FLAGS", ""))
        else:
            solve, S, clock = state["solve"], state["S"], state["clock"]
            w0, c0 = time.perf_counter(), time.process_time()
            t0 = clock()
            solve(S)
            t1 = clock()
            solve(2 * S)
            t2 = clock()
            d_ = (t2 - t1) - (t1 - t0)
            cpu_over_wall = (time.process_time() - c0) / (time.perf_counter() - w0)
            out = dict(rate=S / d_ if d_ > 0 else float("nan"), cpu_over_wall=cpu_over_wall)
        sys.stdout.write(json.dumps(out) + "\n")
        sys.stdout.flush()


def _cpu_matmul_peak(sizes=(1024, 2048), repeat: int = 5) -> dict:
    """`_common.matmul_peak` in CPU time (``time.process_time``, best of ``repeat``): JAX and NumPy with one BLAS
    thread, the peak of the ``--one-core --cpu-time`` table (the wall-clock peak on a loaded machine is the
    scheduler's share, not the core's)."""
    import jax
    import jax.numpy as jnp

    np1 = _numpy_threads_ctx(1) or contextlib.nullcontext
    mm = jax.jit(lambda a, b: a @ b)
    rng = np.random.default_rng(0)

    def best(f):
        out = []
        for _ in range(repeat):
            t0 = time.process_time()
            f()
            out.append(time.process_time() - t0)
        return min(out)

    res: dict = {}
    for dt in ("float32", "float64"):
        row = {}
        for m in sizes:
            a, b = (rng.standard_normal((m, m)).astype(dt) for _ in range(2))
            aj, bj = jnp.asarray(a), jnp.asarray(b)
            jax.block_until_ready(mm(aj, bj))
            with np1():
                row[f"numpy_1thr_{m}"] = 2 * m**3 / best(lambda a=a, b=b: a @ b) / 1e9
            row[f"jax_{m}"] = 2 * m**3 / best(lambda a=aj, b=bj: jax.block_until_ready(mm(a, b))) / 1e9
        row["peak"] = max(row.values())
        row["peak_by"] = max((k for k in row if k != "peak"), key=lambda k: row[k])
        res[dt] = row
    return res


def run(
    size: str = "full",
    rounds: int | None = None,
    out_dir=None,
    torch_compile: bool | None = None,
    target_s: float | None = None,
    one_core: bool = False,
    cpu_time: bool = False,
    log=print,
    xla_flags: str | None = None,
) -> dict:
    """Run the benchmark; ``size="tiny"`` is the smoke test. Returns the result dict (also written as JSON).

    ``one_core`` labels the outputs (``steps_one_core``) and leaves out `THREADED_PEERS`; the pinning itself is
    ``--one-core``'s, done before JAX starts its thread pool. ``cpu_time`` times every implementation with
    ``time.process_time`` (the CPU seconds of this process, all its threads) instead of the wall clock: with
    ``one_core`` on a machine shared with other jobs, it measures each implementation's work on the one core rather
    than its share of the scheduler. ``xla_flags`` adds the row `FLAGS_ROW`: ``ufm`` in a `FlagsWorker` process
    started with these XLA_FLAGS, in the same interleaved rounds."""
    C.enable_x64()
    if torch_compile is None:  # torch.compile costs 10-30 s per shape: not in the smoke test
        torch_compile = size != "tiny"
    sizes = TINY_SIZES if size == "tiny" else SIZES
    clock = time.process_time if cpu_time else time.perf_counter
    rounds = rounds or (2 if size == "tiny" else 5)
    target_s = target_s or (0.02 if size == "tiny" else 0.25)
    info = C.machine_info()
    log(f"machine: {C.machine_line(info)}")
    peak_sizes = (256,) if size == "tiny" else (1024, 2048)
    matmul_peak = _cpu_matmul_peak if cpu_time else C.matmul_peak
    peak0 = matmul_peak(peak_sizes, repeat=2 if size == "tiny" else 5)
    configs = []
    worker = FlagsWorker(xla_flags) if xla_flags else None
    for name, (K, n, d, L) in sizes.items():
        for dtype in ("float64",) if size == "tiny" else ("float32", "float64"):
            configs.append(
                run_config(name, K, n, d, L, dtype, rounds, target_s, torch_compile, clock, not one_core, log, worker)
            )
    if worker is not None:
        worker.close()
    peak1 = matmul_peak(peak_sizes, repeat=2 if size == "tiny" else 5)
    peak = {
        dt: {"start": peak0[dt], "end": peak1[dt], "peak": max(peak0[dt]["peak"], peak1[dt]["peak"])} for dt in peak0
    }
    for c in configs:
        c["fraction_of_peak"] = {k: v / peak[c["dtype"]]["peak"] for k, v in c["gflops"].items()}
    result = dict(benchmark="steps", size=size, rounds=rounds, machine=info, peak_gflops=peak, configs=configs)
    result["one_core"] = one_core
    result["xla_flags_row"] = worker.flags if worker is not None else None
    result["clock"] = "process_time" if cpu_time else "wall"
    result["targets"] = _targets(configs)
    md = markdown(result)
    name = (
        "steps" + ("_one_core" if one_core else "") + ("_cpu" if cpu_time else "") + ("_tiny" if size == "tiny" else "")
    )
    paths = C.write_outputs(name, result, out_dir, md)
    plot(result, paths["png"])
    result["paths"] = paths
    log(md)
    return result


def _targets(configs) -> list[dict]:
    out = []
    small = [c for c in configs if c["size"] in ("small", "tiny")]
    for c in small:
        r = c["ratio_ufm_over"].get("torch eager 2thr")
        out.append(
            dict(
                target=f"{c['size']} {c['dtype']}: >= 20x torch eager (default threads)",
                value=r,
                met=None if r is None else r >= 20,
            )
        )
    for c in configs:
        r = c.get("ratio_ufm_over_strongest")
        out.append(
            dict(
                target=f"{c['size']} {c['dtype']}: ahead of the strongest peer ({c.get('strongest_peer')})",
                value=r,
                met=None if r is None else r > 1,
            )
        )
    for c in configs:
        if c["size"] in ("medium", "large"):
            f = c["fraction_of_peak"]["ufm"]
            out.append(dict(target=f"{c['size']} {c['dtype']}: >= 75% of matmul peak", value=f, met=f >= 0.75))
    return out


def markdown(result) -> str:
    cols = [k for k in IMPLS if any(k in c["median_steps_per_s"] for c in result["configs"])]
    head = ["size (K, n, d, L)", "dtype"] + [f"{k} steps/s" for k in cols]
    head += ["ufm / torch eager", "ufm / strongest peer", "ufm GFLOP/s", "ufm % of peak"]
    rows = []
    for c in result["configs"]:
        r = [f"{c['size']} ({c['K']}, {c['n']}, {c['d']}, {c['L']})", c["dtype"]]
        r += [C.fmt_rate(c["median_steps_per_s"].get(k)) for k in cols]
        r += [
            C.fmt_ratio(c["ratio_ufm_over"].get("torch eager 2thr")),
            f"{C.fmt_ratio(c.get('ratio_ufm_over_strongest'))} ({c.get('strongest_peer', '—')})",
            f"{c['gflops']['ufm']:.1f}",
            f"{100 * c['fraction_of_peak']['ufm']:.0f}%",
        ]
        rows.append(r)
    pk = result["peak_gflops"]
    lines = [
        "### Step throughput: deep ReLU UFM, MSE, full-batch GD (steps/s, median over rounds)",
        "",
        f"Machine: {C.machine_line(result['machine'])}. {result['rounds']} interleaved rounds; ratios are medians "
        "of per-round ratios."
        + (
            " **One core**: the process pinned to one CPU (`--one-core`), so every implementation runs on it."
            if result.get("one_core")
            else ""
        )
        + (
            " **CPU time** (`--cpu-time`): steps per CPU second of this process, not per wall second."
            if result.get("clock") == "process_time"
            else ""
        ),
        "",
        C.md_table(head, rows),
        "",
        f"Matmul peak (best of NumPy/JAX/torch, square matmuls, start and end of the run): float32 "
        f"{pk['float32']['peak']:.1f} GFLOP/s ({pk['float32']['start']['peak_by']}), float64 "
        f"{pk['float64']['peak']:.1f} GFLOP/s ({pk['float64']['start']['peak_by']}).",
        "Same-trajectory check (3 GD steps from the same start): "
        + (
            "all implementations agree."
            if all(c["same_trajectory_ok"] for c in result["configs"])
            else "**FAILED** for "
            + ", ".join(f"{c['size']} {c['dtype']}" for c in result["configs"] if not c["same_trajectory_ok"])
        ),
        "",
        "Targets:",
    ]
    for t in result["targets"]:
        v = t["value"]
        vs = "—" if v is None else (f"{100 * v:.0f}%" if "peak" in t["target"] else C.fmt_ratio(v))
        lines.append(f"- {t['target']}: {vs} — {'met' if t['met'] else 'MISSED' if t['met'] is not None else 'n/a'}")
    if result.get("xla_flags_row"):
        lines += ["", f"`{FLAGS_ROW}`: ufm in a second process started with `XLA_FLAGS={result['xla_flags_row']}`:"]
        for c in result["configs"]:
            lines.append(
                f"- {c['size']} {c['dtype']}: {C.fmt_ratio(1 / c['ratio_ufm_over'][FLAGS_ROW])} ufm's default rate, "
                f"{C.fmt_ratio(c.get('ratio_flags_over_strongest'))} the strongest peer; its CPU time / wall time "
                f"{c['flags_cpu_over_wall']:.2f}"
            )
    if any("torch_skipped" in c for c in result["configs"]):
        lines.append(f"- torch columns skipped: {result['configs'][0]['torch_skipped']}")
    return "\n".join(lines)


def plot(result, path) -> None:
    configs = result["configs"]
    cols = [k for k in IMPLS if any(k in c["median_steps_per_s"] for c in configs)]
    fig, (ax, ax2) = C.new_figure(1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [3, 1]})
    x = np.arange(len(configs))
    w = 0.8 / len(cols)
    for i, k in enumerate(cols):
        ys = [c["median_steps_per_s"].get(k, np.nan) for c in configs]
        ax.bar(x + (i - (len(cols) - 1) / 2) * w, ys, w, label=k)
    ax.set_yscale("log")
    ax.set_xticks(x, [f"{c['size']}\n{c['dtype']}" for c in configs])
    ax.set_ylabel("GD steps / s (median)")
    ax.set_title("Deep ReLU UFM, full-batch GD step throughput")
    ax.legend(fontsize=7, ncol=2)
    ax2.bar(x, [100 * c["fraction_of_peak"]["ufm"] for c in configs], color="C0")
    ax2.axhline(75, color="k", ls="--", lw=0.8)
    ax2.set_xticks(x, [f"{c['size'][:3]}\n{c['dtype'][-2:]}" for c in configs], fontsize=7)
    ax2.set_ylabel("ufm, % of matmul peak")
    C.save_figure(fig, path)


def _steady_per_step(run_steps, S: int, clock=time.perf_counter) -> float:
    """Seconds per step of ``run_steps(k)`` (which must block): (t(2S) - t(S)) / S, free of dispatch and setup."""
    t0 = clock()
    run_steps(S)
    t1 = clock()
    run_steps(2 * S)
    t2 = clock()
    return ((t2 - t1) - (t1 - t0)) / S


def _loop_programs(p, lr):
    """The pieces of a GD step as compiled loops ``(params, S, c) -> params`` (S traced, so one program each).

    * ``forward``: f(x) only; the value feeds back into H as ``H + c f`` (c = 0 at run time, traced so XLA
      cannot fold it), which keeps the loop from being hoisted at the cost of one pass over H;
    * ``bare GD``: ``value_and_grad`` and the update x - lr g: the step without the solver's bookkeeping;
    * ``update``: the update alone, x - lr g with g fixed (one fused pass over the parameters);
    * ``matmuls``: the L forward layer products W_l H_l alone (no activation), one third of the step's FLOPs.
    """
    import jax

    import ufm

    f = functools.partial(ufm.objective, p)
    vg = jax.value_and_grad(f)

    def loop(body):
        return jax.jit(lambda x, S, c: jax.lax.fori_loop(0, S, lambda i, x: body(x, c), x))

    def fwd(x, c):
        return x._replace(H=x.H + c * f(x))

    def gd(x, c):
        _, g = vg(x)
        return jax.tree.map(lambda a, b: a - lr * b, x, g)

    def upd(x, c):  # g := x * c + 1 stands in for a gradient that XLA cannot fold into the loop
        return jax.tree.map(lambda a: a - lr * (c * a + 1), x)

    def mm(x, c):
        h = x.H
        for W in x.Ws:
            h = W @ h
        return x._replace(H=x.H + c * h[:1, :].sum())

    return {"forward": loop(fwd), "bare GD": loop(gd), "update": loop(upd), "matmuls": loop(mm)}


def step_breakdown(
    sizes=None,
    dtypes=("float32", "float64"),
    rounds: int = 7,
    target_s: float = 0.1,
    cpu_time: bool = False,
    log=print,
):
    """Where a GD step's time goes, per size and dtype, timed interleaved in one process.

    Each piece is a compiled loop timed as (t(2S) - t(S)) / S (see `_loop_programs`), and ``solve`` is
    ``ufm.solve(method="gd", tol=0, history=False)`` timed the same way. Derived per step:
    backward = bare GD - forward - update; bookkeeping = solve - bare GD (stopping rule, gradient norms,
    best-so-far, the while loop's own state); "matmuls at the W H rate" = 3 x the forward products' time
    (the step has 3 L products of the same shapes). ``cpu_time`` times with ``time.process_time`` (the work of
    this process; with ``--one-core``, of its one core) instead of the wall clock. Returns one dict per (size,
    dtype) of medians over rounds.
    """
    import jax

    import ufm

    C.enable_x64()
    clock = time.process_time if cpu_time else time.perf_counter
    sizes = sizes or SIZES
    rows = []
    for name, (K, n, d, L) in sizes.items():
        for dtype in dtypes:
            p, x0, flops = case(K, n, d, L, dtype)
            progs = _loop_programs(p, LR)
            zero = np.zeros((), dtype)
            S = max(2, min(5000, int(target_s * 20e9 / flops)))  # ~target_s at 20 GFLOP/s

            def run_prog(k, prog, x0=x0, zero=zero):
                jax.block_until_ready(prog(x0, k, zero))

            def run_solve(k, p=p, x0=x0):
                r = ufm.solve(p, init=x0, method="gd", lr=LR, max_steps=k, tol=0.0, history=False, patience=10 * k)
                jax.block_until_ready(r.value)

            for prog in progs.values():  # compile (S is traced: one program per piece)
                run_prog(1, prog)
            run_solve(S)
            run_solve(2 * S)
            measures = {
                k: functools.partial(_steady_per_step, functools.partial(run_prog, prog=v), S, clock)
                for k, v in progs.items()
            }
            measures["solve"] = functools.partial(_steady_per_step, run_solve, S, clock)
            t = C.interleaved(measures, rounds)
            med = {k: C.median(v) for k, v in t.items()}
            row = dict(size=name, K=K, n=n, d=d, L=L, dtype=dtype, steps=S, flops_per_step=flops, seconds=med)
            row["clock"] = "process_time" if cpu_time else "wall"
            row["backward"] = med["bare GD"] - med["forward"] - med["update"]
            row["bookkeeping"] = med["solve"] - med["bare GD"]
            row["bookkeeping_share"] = C.median(
                C.per_round_ratios([a - b for a, b in zip(t["solve"], t["bare GD"])], t["solve"])
            )
            row["matmuls_at_WH_rate"] = 3 * med["matmuls"]
            row["solve_gflops"] = flops / med["solve"] / 1e9
            row["load"] = C.load_average()
            log(f"  {name} {dtype}: " + ", ".join(f"{k} {1e3 * v:.3f} ms" for k, v in med.items()))
            rows.append(row)
    return rows


def _plain_objective(p, x, mm=None):
    """The benchmark's objective (deep ReLU MSE, bias-free, THEORY.md §4) with plain ``W @ H`` products: what
    autodiff gives without `ufm._model.layer_matmul`; ``mm`` replaces the product (`blas_ffi.matmul` for the BLAS
    variant)."""
    import jax
    import jax.numpy as jnp

    mm = mm or jnp.matmul
    h = x.H
    for W in x.Ws[:-1]:
        h = jax.nn.relu(mm(W, h))
    out = mm(x.Ws[-1], h)
    Y = jax.nn.one_hot(jnp.asarray(p.labels()), p.num_classes, dtype=out.dtype, axis=0)
    reg = LAM / 2 * (sum(jnp.sum(W**2) for W in x.Ws) + jnp.sum(x.H**2))
    return jnp.sum((out - Y) ** 2) / (2 * p.N) + reg


def _variant_programs(p, x0) -> dict:
    """Compiled GD-step loops ``(params, k) -> params`` of the three objectives of `product_variants`."""
    import jax

    import ufm

    from . import blas_ffi

    progs = {}
    for key, f in (
        ("ufm", functools.partial(ufm.objective, p)),
        ("plain", functools.partial(_plain_objective, p)),
        ("blas", functools.partial(_plain_objective, p, mm=blas_ffi.matmul)),
    ):
        vg = jax.value_and_grad(f)

        def gd(i, x, vg=vg):
            return jax.tree.map(lambda u, g: u - LR * g, x, vg(x)[1])

        progs[key] = jax.jit(lambda x, k, gd=gd: jax.lax.fori_loop(0, k, gd, x))
        jax.block_until_ready(progs[key](x0, 1))
    return progs


def _max_rel_diff(x, ref) -> float:
    import jax

    return max(
        float(np.max(np.abs(u - w)) / np.max(np.abs(w))) for u, w in zip(jax.tree.leaves(x), jax.tree.leaves(ref))
    )


def product_variants(sizes=None, dtypes=("float32", "float64"), rounds: int = 9, cpu_time: bool = True, log=print):
    """GD-step loops of ``ufm.objective`` (layer products of `ufm._model.layer_product`) against the same objective
    with plain ``W @ H`` autodiff (`_plain_objective`) and with every product (forward and backward) through
    SciPy's BLAS as an XLA FFI custom call (``blas``, `benchmarks.blas_ffi`; one BLAS thread, threadpoolctl),
    interleaved in one process.

    ``cpu_time=True`` times with ``time.process_time`` (the CPU seconds of this process, all its threads): on a
    machine shared with other jobs it measures the work of each variant rather than the scheduler; run with
    ``XLA_FLAGS=--xla_cpu_multi_thread_eigen=false`` so that no thread spins at a barrier. Before timing, 3 steps of
    each variant must land on ufm's point (relative difference <= 1e-10 in float64, 1e-4 in float32). Returns per
    size and dtype the median ms per step and the medians of the per-round time ratios plain / ufm and blas / ufm
    (> 1: ufm's products win)."""
    import jax

    C.enable_x64()
    one_blas_thread = _numpy_threads_ctx(1) or contextlib.nullcontext
    clock = time.process_time if cpu_time else time.perf_counter
    rows = []
    for name, (K, n, d, L) in (sizes or SIZES).items():
        for dtype in dtypes:
            p, x0, flops = case(K, n, d, L, dtype)
            S = max(2, min(2000, int(0.1 * 20e9 / flops)))
            progs = _variant_programs(p, x0)

            def per_step(prog, x0=x0, S=S):
                with one_blas_thread():
                    t0 = clock()
                    jax.block_until_ready(prog(x0, S))
                    t1 = clock()
                    jax.block_until_ready(prog(x0, 2 * S))
                    return ((clock() - t1) - (t1 - t0)) / S

            row = dict(size=name, K=K, n=n, d=d, L=L, dtype=dtype, clock="process_time" if cpu_time else "wall")
            ref = progs["ufm"](x0, 3)
            row["max_rel_diff_3_steps"] = {k: _max_rel_diff(v(x0, 3), ref) for k, v in progs.items() if k != "ufm"}
            if max(row["max_rel_diff_3_steps"].values()) > (1e-10 if dtype == "float64" else 1e-4):
                raise AssertionError(f"{name} {dtype}: the variants do not follow ufm's steps: {row}")
            t = C.interleaved({k: functools.partial(per_step, v) for k, v in progs.items()}, rounds)
            row.update({f"{k}_ms": 1e3 * C.median(v) for k, v in t.items()})
            row["plain_over_ufm"] = C.median(C.per_round_ratios(t["plain"], t["ufm"]))
            row["blas_over_ufm"] = C.median(C.per_round_ratios(t["blas"], t["ufm"]))
            row["load"] = C.load_average()
            log(row)
            rows.append(row)
    return rows


def _load1(row) -> str:
    return "?" if row.get("load") is None else f"{row['load'][0]:.1f}"


def variants_markdown(rows, machine: dict) -> str:
    head = ["size (K, n, d, L)", "dtype", "ufm ms/step", "plain ms/step", "blas ms/step", "plain / ufm", "blas / ufm"]
    body = [
        [f"{r['size']} ({r['K']}, {r['n']}, {r['d']}, {r['L']})", r["dtype"]]
        + [f"{r[k]:.3f}" for k in ("ufm_ms", "plain_ms", "blas_ms")]
        + [f"{r['plain_over_ufm']:.2f}", f"{r['blas_over_ufm']:.2f}"]
        for r in rows
    ]
    return "\n".join(
        [
            "### GD-step loops: ufm's layer products, plain `W @ H`, and BLAS through an FFI custom call",
            "",
            f"Machine: {C.machine_line(machine)}. Clock: {rows[0]['clock']}; medians over interleaved rounds; "
            f"load {_load1(rows[0])} at the first size, {_load1(rows[-1])} at the last. Ratios: time over ufm's "
            "(> 1: ufm faster).",
            "",
            C.md_table(head, body),
        ]
    )


def _product_variants(blocks):
    """JAX ways to compute the three products of a layer (W d' x d, H and G d x N / d' x N), by name.

    ``W H`` is the forward product, ``W^T G`` the backward's dH (``barrier``: W^T materialised first, what
    `ufm._model.layer_matmul` does in float64), ``G H^T`` the backward's dW. ``N/B`` variants split the N columns
    into blocks of B (concatenated for W H; for G H^T the per-block products summed, as one batched dot). ``blas``
    variants call SciPy's dgemm/sgemm through `benchmarks.blas_ffi` (an XLA FFI custom call), timed with one BLAS
    thread.
    """
    import jax
    from jax import lax

    def dg(a, b, ca, cb):
        return lax.dot_general(a, b, (((ca,), (cb,)), ((), ())))

    v = {
        "W H": lambda W, H, G: W @ H,
        "W H, (N x d) out": lambda W, H, G: dg(H, W, 0, 1),
        "W^T G": lambda W, H, G: W.T @ G,
        "W^T G barrier": lambda W, H, G: lax.optimization_barrier(W.T) @ G,
        "G H^T": lambda W, H, G: G @ H.T,
        "(H G^T)^T": lambda W, H, G: (H @ G.T).T,
    }
    from . import blas_ffi

    if blas_ffi.available():  # SciPy's BLAS through the XLA FFI custom call (one BLAS thread: see `kernel_rates`)
        v["W H blas"] = lambda W, H, G: blas_ffi.gemm(W, H)
        v["W^T G blas"] = lambda W, H, G: blas_ffi.gemm(W, G, trans_a=True)
        v["G H^T blas"] = lambda W, H, G: blas_ffi.gemm(G, H, trans_b=True)
    for B in blocks:
        v[f"W H, N/{B}"] = lambda W, H, G, B=B: jax.numpy.concatenate(
            [W @ H[:, i : i + B] for i in range(0, H.shape[1], B)], axis=1
        )
        v[f"G H^T, N/{B}"] = lambda W, H, G, B=B: jax.numpy.einsum(
            "dbn,ebn->de", G.reshape(G.shape[0], -1, B), H.reshape(H.shape[0], -1, B)
        )
    return v


def _kernel_measures(d: int, N: int, dtype: str, blocks, clock, numpy_threads: bool = True) -> dict:
    """``{name: () -> GFLOP/s}`` for the products of one (d, N, dtype) case (see `kernel_rates`)."""
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    Wn, Hn, Gn = (rng.standard_normal(s).astype(dtype) for s in ((d, d), (d, N), (d, N)))
    args = tuple(jnp.asarray(a) for a in (Wn, Hn, Gn))
    flops = 2 * d * d * N
    reps = max(1, int(2e8 / flops))
    np1 = _numpy_threads_ctx(1) or contextlib.nullcontext

    def rate(f, one_blas_thread=False):
        with np1() if one_blas_thread else contextlib.nullcontext():
            t0 = clock()
            for _ in range(reps):
                f()
            return flops * reps / (clock() - t0) / 1e9

    numpy_products = {"W H": lambda: Wn @ Hn, "W^T G": lambda: Wn.T @ Gn, "G H^T": lambda: Gn @ Hn.T}
    expected = {"W H": Wn @ Hn, "W^T G": Wn.T @ Gn, "G H^T": Gn @ Hn.T, "(H G^T)^T": Gn @ Hn.T}
    measures = {}
    for name, f in _product_variants(tuple(b for b in blocks if N % b == 0 and b < N)).items():
        jf = jax.jit(f)
        run = functools.partial(lambda jf: jax.block_until_ready(jf(*args)), jf)
        ref = expected[name.split(",")[0].removesuffix(" barrier").removesuffix(" blas")]
        got = np.asarray(jf(*args))
        got = got.T if name.endswith("(N x d) out") else got  # that variant returns (W H)^T
        # same work: every variant is the same product (sums of d or N terms of O(1) entries; rounding ~ eps sqrt(N))
        if not np.allclose(got, ref, rtol=0, atol=100 * np.finfo(dtype).eps * np.sqrt(max(d, N)) * np.abs(ref).max()):
            raise AssertionError(f"{name} ({d} x {N} {dtype}) does not compute {name.split(',')[0]}")
        measures[f"jax {name}"] = functools.partial(rate, run, name.endswith(" blas"))
    for name, f in numpy_products.items():
        measures[f"numpy 1thr {name}"] = functools.partial(rate, f, True)
        if numpy_threads:
            measures[f"numpy {name}"] = functools.partial(rate, f)
    return measures


def kernel_rates(
    shapes=((128, 1000), (256, 5000)),
    dtypes=("float32", "float64"),
    blocks=(250, 1000),
    rounds: int = 7,
    cpu_time: bool = False,
    numpy_threads: bool = True,
    log=print,
) -> list[dict]:
    """GFLOP/s of a layer's three products (d x d times d x N), JAX (XLA:CPU) against NumPy (OpenBLAS, 1 thread and
    its default threads), interleaved round by round in one process; each figure is the median over rounds.

    The products are those of a step of the benchmark's UFM at the medium (d, N) = (128, 1000) and large
    (256, 5000) sizes: ``W H`` (forward), ``W^T G`` (dH), ``G H^T`` (dW), each 2 d^2 N FLOPs. JAX variants are
    `_product_variants` (layouts through ``dot_general``, a materialised W^T, column blocks of N). ``cpu_time``
    times with ``time.process_time`` (the work of this process, all threads); run with ``--one-core`` (the process
    pinned to one CPU before JAX starts) and ``cpu_time`` to compare one XLA thread with one OpenBLAS thread;
    without either, the wall-clock rates at the default threads. ``numpy_threads=False`` leaves out NumPy at its
    default threads (on one core its idle OpenBLAS threads spin and slowed the measures after them: NumPy 1 thread
    W^T G fell from 37 to 13 GFLOP/s in float64). Each JAX variant is checked against NumPy's product.
    """
    C.enable_x64()
    clock = time.process_time if cpu_time else time.perf_counter
    rows = []
    for d, N in shapes:
        for dtype in dtypes:
            t = C.interleaved(_kernel_measures(d, N, dtype, blocks, clock, numpy_threads), rounds)
            row = dict(d=d, N=N, dtype=dtype, clock="process_time" if cpu_time else "wall", load=C.load_average())
            row["gflops"] = {k: C.median(v) for k, v in t.items()}
            log(f"  {d} x {N} {dtype}: " + ", ".join(f"{k} {v:.0f}" for k, v in row["gflops"].items()))
            rows.append(row)
    return rows


def kernels_markdown(rows, machine: dict) -> str:
    names = list(dict.fromkeys(n for r in rows for n in r["gflops"]))  # the block variants differ per shape
    head = ["product (GFLOP/s)"] + [f"{r['d']} x {r['N']} {r['dtype']}" for r in rows]
    body = [[n] + [f"{r['gflops'][n]:.0f}" if n in r["gflops"] else "—" for r in rows] for n in names]
    return "\n".join(
        [
            "### A layer's products: JAX (XLA:CPU) against NumPy (OpenBLAS), GFLOP/s",
            "",
            f"Machine: {C.machine_line(machine)}. Clock: {rows[0]['clock']}; medians over interleaved rounds.",
            "",
            C.md_table(head, body),
        ]
    )


def breakdown_markdown(rows, machine: dict, peak: dict | None = None) -> str:
    head = ["size (K, n, d, L)", "dtype", "forward", "backward", "update", "bare GD step", "bookkeeping", "solve step"]
    head += ["matmuls at the W H rate", "solve GFLOP/s"] + (["% of peak"] if peak else [])
    out = []
    for r in rows:
        s = r["seconds"]
        ms = lambda x: f"{1e3 * x:.3f}"  # noqa: E731
        line = [
            f"{r['size']} ({r['K']}, {r['n']}, {r['d']}, {r['L']})",
            r["dtype"],
            ms(s["forward"]),
            ms(r["backward"]),
        ]
        line += [ms(s["update"]), ms(s["bare GD"]), f"{ms(r['bookkeeping'])} ({100 * r['bookkeeping_share']:.0f}%)"]
        line += [ms(s["solve"]), ms(r["matmuls_at_WH_rate"]), f"{r['solve_gflops']:.1f}"]
        if peak:
            line.append(f"{100 * r['solve_gflops'] / peak[r['dtype']]['peak']:.0f}%")
        out.append(line)
    return "\n".join(
        [
            "### Where a GD step's time goes (ms per step, medians over interleaved rounds)",
            "",
            f"Machine: {C.machine_line(machine)}. Clock: {rows[0].get('clock', 'wall')}.",
            "",
            C.md_table(head, out),
        ]
    )


def _pieces_main(a) -> None:
    """``--pieces``: XLA must dump its optimised modules (the pieces' HLO), so XLA_FLAGS is set before JAX starts."""
    import tempfile

    from . import step_pieces

    with tempfile.TemporaryDirectory() as dump:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + step_pieces.dump_flags(dump)).strip()
        C.enable_x64()
        info = C.machine_info()
        sizes = TINY_SIZES if a.smoke else {k: SIZES[k] for k in ("medium", "large")}
        dtypes = ("float64",) if a.smoke else ("float32", "float64")
        rows = step_pieces.step_pieces(sizes, dtypes, dump_dir=dump, rounds=a.rounds or (2 if a.smoke else 3))
    md = step_pieces.pieces_markdown(rows, info)
    name = "steps_pieces" + ("_one_core" if a.one_core else "") + ("_tiny" if a.smoke else "")
    C.write_outputs(name, dict(machine=info, one_core=a.one_core, rows=rows), a.out, md)
    print(md)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--variants",
        action="store_true",
        help="only ufm's layer products against plain W @ H autodiff (GD-step loops, CPU time)",
    )
    ap.add_argument(
        "--kernels", action="store_true", help="only the GFLOP/s of a layer's products, JAX against NumPy 1 thread"
    )
    ap.add_argument(
        "--one-core", action="store_true", help="pin the process to one CPU before JAX starts (one XLA thread)"
    )
    ap.add_argument("--cpu-time", action="store_true", help="time with process_time, not the wall clock")
    ap.add_argument("--breakdown", action="store_true", help="only the per-step breakdown (forward, backward, ...)")
    ap.add_argument(
        "--pieces", action="store_true", help="only the per-piece account of a step, XLA (profiler) against NumPy"
    )
    ap.add_argument(
        "--xla-flags",
        default=None,
        help="add a row: ufm in a second process started with these XLA_FLAGS (e.g. "
        "'--xla_cpu_multi_thread_eigen=false': XLA on one thread), in the same interleaved rounds",
    )
    ap.add_argument("--flags-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes (seconds)")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--out", default=None, help="output folder (default benchmarks/results)")
    ap.add_argument("--no-torch-compile", action="store_true", help="skip torch.compile peers (saves compile time)")
    a = ap.parse_args(argv)
    if a.flags_worker:
        _flags_worker_main()
        return
    if a.one_core:
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    if a.pieces:
        _pieces_main(a)
        return
    if a.kernels or a.variants or a.breakdown:
        C.enable_x64()
        info = C.machine_info()
        sizes = TINY_SIZES if a.smoke else SIZES
        if a.kernels:
            name = "steps_kernels"
            rows = kernel_rates(
                ((8, 100),) if a.smoke else ((128, 1000), (256, 5000)),
                blocks=(50,) if a.smoke else (250, 1000),
                rounds=a.rounds or (2 if a.smoke else 7),
                cpu_time=a.cpu_time,
                numpy_threads=not a.one_core,
            )
            md = kernels_markdown(rows, info)
        elif a.variants:
            name = "steps_variants"
            rows = product_variants(sizes, rounds=a.rounds or (2 if a.smoke else 9), cpu_time=a.cpu_time)
            md = variants_markdown(rows, info)
        else:
            name = "steps_breakdown"
            rows = step_breakdown(sizes, rounds=a.rounds or (2 if a.smoke else 7), cpu_time=a.cpu_time)
            md = breakdown_markdown(rows, info)
        name += ("_one_core" if a.one_core else "") + ("_cpu" if a.cpu_time else "") + ("_tiny" if a.smoke else "")
        C.write_outputs(name, dict(machine=info, one_core=a.one_core, rows=rows), a.out, md)
        print(md)
        return
    tc = False if a.no_torch_compile else None
    run(
        "tiny" if a.smoke else "full",
        rounds=a.rounds,
        out_dir=a.out,
        torch_compile=tc,
        one_core=a.one_core,
        cpu_time=a.cpu_time,
        xla_flags=a.xla_flags,
    )


if __name__ == "__main__":
    main()
