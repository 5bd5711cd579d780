"""Benchmark 4: latency. Import time, first solve (trace + compile + run), and re-solves with new numbers,
which must not recompile.

    python -m benchmarks.bench_latency            # full run: 3 fresh processes + 2 with a persistent cache
    python -m benchmarks.bench_latency --smoke    # 1 fresh process, tiny problem

Each measurement runs in a **fresh Python process** (``--child``), so the import and the first compile are
really cold. Inside it:

* ``import jax`` and ``import ufm`` are timed separately (ufm imports jax, optax, numpy, scipy).
* Compiles are counted two ways: a logging handler on JAX's compile log (``jax_log_compiles=True``: one
  "Compiling ..." record per XLA compilation, with the tracing / lowering / XLA-compile times JAX logs), and
  ``ufm._driver.compiled_programs()`` (entries in the jit cache of the single-solve program) and
  ``ufm._batch.compiled_programs()`` (the batched engine's programs).
* First ``ufm.solve`` (default L-BFGS, float64) of a deep ReLU UFM; then a **new problem with new lambdas**
  (Python floats), a new seed, lambdas given as NumPy float64 scalars, and a ``solve_batch`` over 8 lambdas
  (first and second call, ``max_steps=200``). Each reports its wall time (re-solves: their run to
  convergence) and the number of compilations it triggered.
* With ``--cache DIR`` the child enables JAX's persistent compilation cache: the full run measures a process
  that fills the cache and one that reuses it (what ``ufm sweep --compile-cache`` offers).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import _common as C

PROBLEM = dict(num_classes=4, n_per_class=10, widths=(32, 32, 32), activation="relu", loss="mse", bias="none")
TINY_PROBLEM = dict(num_classes=2, n_per_class=3, widths=(4, 4), activation="relu", loss="mse", bias="none")


def child(tiny: bool, cache: str | None) -> dict:
    """Runs in a fresh process; prints one JSON line."""
    t0 = time.perf_counter()
    import jax

    t_jax = time.perf_counter() - t0
    t1 = time.perf_counter()
    import ufm

    t_ufm = time.perf_counter() - t1
    import logging

    import numpy as np

    jax.config.update("jax_enable_x64", True)
    if cache:
        jax.config.update("jax_compilation_cache_dir", cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    jax.config.update("jax_log_compiles", True)

    class Counter(logging.Handler):
        def __init__(self):
            super().__init__(logging.DEBUG)
            self.records = []

        def emit(self, record):
            self.records.append(record.getMessage())

    counter = Counter()
    jlog = logging.getLogger("jax")
    jlog.addHandler(counter)
    jlog.setLevel(logging.DEBUG)
    jlog.propagate = False  # keep stderr quiet

    from ufm._batch import compiled_programs as batch_programs
    from ufm._driver import compiled_programs

    def measure(fn):
        n0 = len(counter.records)
        c0 = compiled_programs()
        t = time.perf_counter()
        out = fn()
        jax.block_until_ready(out)
        dt = time.perf_counter() - t
        msgs = counter.records[n0:]
        comp = [m for m in msgs if m.startswith("Compiling ")]
        solver_comp = [m for m in comp if any(n in m for n in ("run_jit", "_cycle", "_fresh", "_retire", "_allocate"))]

        def phase(prefix):
            import re

            tot = 0.0
            for m in msgs:
                if m.startswith(prefix):
                    x = re.search(r"in ([0-9.eE+-]+) sec", m)
                    tot += float(x.group(1)) if x else 0.0
            return tot

        return dict(
            wall_s=dt,
            compiles=len(comp),
            solver_compiles=len(solver_comp),
            solve_jit_cache_growth=compiled_programs() - c0,
            trace_s=phase("Finished tracing"),
            lower_s=phase("Finished jaxpr to MLIR module conversion"),
            xla_compile_s=phase("Finished XLA compilation"),
            cache_hits=sum("Persistent compilation cache hit" in m for m in msgs),
            compiled=[m.split(" with ")[0][len("Compiling ") :] for m in comp][:8],
        ), out

    base = TINY_PROBLEM if tiny else PROBLEM
    # the smoke run uses GD (a 5x smaller program than L-BFGS: the compile counts are what it checks)
    kw = dict(method="gd", max_steps=200) if tiny else {}
    res = dict(import_jax_s=t_jax, import_ufm_s=t_ufm, problem=dict(base), method=kw.get("method", "lbfgs"))
    p1 = ufm.UFM(**base, lam_H=1e-3, lam_W=1e-3)
    res["first_solve"], s1 = measure(lambda: ufm.solve(p1, key=0, **kw))
    res["first_solve"]["num_steps"] = int(s1.num_steps)
    res["first_solve"]["status"] = s1.status_name
    p2 = ufm.UFM(**base, lam_H=2e-3, lam_W=5e-4)
    res["new_lambdas"], s2 = measure(lambda: ufm.solve(p2, key=0, **kw))
    res["new_lambdas"]["num_steps"] = int(s2.num_steps)
    res["new_seed"], _ = measure(lambda: ufm.solve(p2, key=1, **kw))
    p3 = ufm.UFM(**base, lam_H=np.float64(3e-3), lam_W=np.float64(1e-4))
    res["numpy_lambdas"], _ = measure(lambda: ufm.solve(p3, key=0, **kw))
    p4 = ufm.UFM(**base, lam_H=4e-3, lam_W=[1e-3] * len(base["widths"]))
    res["per_layer_lam_W"], _ = measure(lambda: ufm.solve(p4, key=0, **kw))
    lams = np.logspace(-4, -2, 8)
    # a step cap keeps the batched run short: this row measures the compile, and the cap is static, so both
    # calls share the compiled programs
    bkw = dict(seeds=np.arange(8), max_steps=200, method=kw.get("method", "lbfgs"))
    res["batch_first"], _ = measure(lambda: ufm.solve_batch(p1, lam_H=lams, lam_W=lams, **bkw))
    res["batch_new_lambdas"], _ = measure(lambda: ufm.solve_batch(p1, lam_H=lams * 2, lam_W=lams / 2, **bkw))
    res["batch_cache_size"] = batch_programs()
    res["solve_cache_size"] = compiled_programs()
    return res


def _spawn(tiny: bool, cache: str | None) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.bench_latency", "--child"] + (["--smoke"] if tiny else [])
    if cache:
        cmd += ["--cache", cache]
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ)
    env["PYTHONPATH"] = str(root) + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=root, env=env, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"child failed ({out.returncode}): {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


KEYS = (
    "first_solve",
    "new_lambdas",
    "new_seed",
    "numpy_lambdas",
    "per_layer_lam_W",
    "batch_first",
    "batch_new_lambdas",
)


def run(size: str = "full", out_dir=None, log=print, procs: int | None = None) -> dict:
    tiny = size == "tiny"
    info = C.machine_info()
    log(f"machine: {C.machine_line(info)}")
    procs = procs or (1 if tiny else 3)
    cold = [_spawn(tiny, None) for _ in range(procs)]
    cached = []
    if not tiny:
        with tempfile.TemporaryDirectory() as d:
            cached = [_spawn(tiny, d) for _ in range(2)]  # fills the cache, then reuses it
    result = dict(
        benchmark="latency", size=size, machine=info, cold=cold, persistent_cache=cached, problem=cold[0]["problem"]
    )
    med = {k: C.median([c[k] for c in cold]) for k in ("import_jax_s", "import_ufm_s")}
    # the process that reuses the cache: its first solve must not compile the solver program again
    b_hits = cached[1]["first_solve"]["cache_hits"] if cached else 0
    b_recompiled = (
        bool(cached) and cached[1]["first_solve"]["xla_compile_s"] > 0.5 * cached[0]["first_solve"]["xla_compile_s"]
    )
    for k in KEYS:
        med[k] = {f: C.median([c[k][f] for c in cold]) for f in ("wall_s", "trace_s", "lower_s", "xla_compile_s")}
        med[k]["compiles"] = max(c[k]["compiles"] for c in cold)
        med[k]["solver_compiles"] = max(c[k]["solver_compiles"] for c in cold)
    result["median"] = med
    ratio = C.median([c["first_solve"]["wall_s"] / c["import_jax_s"] for c in cold])
    result["first_solve_over_import_jax"] = ratio
    result["targets"] = [
        dict(
            target="first solve (fresh process, empty cache) <= 4x import jax (median of per-process ratios)",
            value=f"{ratio:.1f}x",
            met=ratio <= 4.0,
        ),
        dict(
            target="first solve under 2 s including compile",
            value=med["first_solve"]["wall_s"],
            met=med["first_solve"]["wall_s"] < 2.0,
        ),
        dict(
            target="solve program without progress has no host callback (kept by the persistent cache)",
            value=f"{b_hits} cache hits, solver recompiled: {b_recompiled}" if cached else "not measured",
            met=bool(cached) and not b_recompiled,
        ),
        dict(
            target="no recompile for new lambdas (Python floats)",
            value=med["new_lambdas"]["solver_compiles"],
            met=med["new_lambdas"]["solver_compiles"] == 0,
        ),
        dict(
            target="no recompile for new lambdas (NumPy scalars)",
            value=med["numpy_lambdas"]["solver_compiles"],
            met=med["numpy_lambdas"]["solver_compiles"] == 0,
        ),
        dict(
            target="no recompile for new lambdas in solve_batch",
            value=med["batch_new_lambdas"]["solver_compiles"],
            met=med["batch_new_lambdas"]["solver_compiles"] == 0,
        ),
    ]
    md = markdown(result)
    paths = C.write_outputs("latency" if not tiny else "latency_tiny", result, out_dir, md)
    plot(result, paths["png"])
    result["paths"] = paths
    log(md)
    return result


LABELS = {
    "first_solve": "first ufm.solve (L-BFGS, f64)",
    "new_lambdas": "new problem, new lambdas (Python floats)",
    "new_seed": "same problem, new seed",
    "numpy_lambdas": "new lambdas as NumPy float64 scalars",
    "per_layer_lam_W": "per-layer lam_W list",
    "batch_first": "first solve_batch (8 lambdas, max_steps=200)",
    "batch_new_lambdas": "solve_batch, new lambdas",
}


def markdown(result) -> str:
    m = result["median"]
    rows = [
        ["import jax", C.fmt_time(m["import_jax_s"]), "", "", "", "", ""],
        ["import ufm (after jax)", C.fmt_time(m["import_ufm_s"]), "", "", "", "", ""],
    ]
    for k in KEYS:
        d = m[k]
        rows.append(
            [
                LABELS[k],
                C.fmt_time(d["wall_s"]),
                d["compiles"],
                d["solver_compiles"],
                C.fmt_time(d["trace_s"]) if d["trace_s"] else "",
                C.fmt_time(d["lower_s"]) if d["lower_s"] else "",
                C.fmt_time(d["xla_compile_s"]) if d["xla_compile_s"] else "",
            ]
        )
    p = result["problem"]
    lines = [
        "### Latency: import, first solve (compile), re-solves with new numbers",
        "",
        f"Machine: {C.machine_line(result['machine'])}.",
        f"Problem: K={p['num_classes']}, n={p['n_per_class']}, widths={tuple(p['widths'])}, {p['activation']}, "
        f"{p['loss']}. Medians over {len(result['cold'])} fresh processes; compile counts are the maximum over "
        "processes (all XLA compilations / those of the solver loop); phase times from JAX's compile log.",
        "",
        C.md_table(
            ["step", "wall time", "compilations", "solver-loop compilations", "tracing", "lowering", "XLA compile"],
            rows,
        ),
    ]
    if result["persistent_cache"]:
        a, b = result["persistent_cache"]
        lines += [
            "",
            f"Persistent compilation cache (`jax_compilation_cache_dir`): first solve "
            f"{C.fmt_time(a['first_solve']['wall_s'])} in the process that fills it, "
            f"{C.fmt_time(b['first_solve']['wall_s'])} in the next process "
            f"({b['first_solve']['cache_hits']} cache hits).",
        ]
    lines += ["", "Targets:"]
    for t in result["targets"]:
        v = t["value"]
        vs = C.fmt_time(v) if isinstance(v, float) else str(v)
        lines.append(f"- {t['target']}: {vs} — {'met' if t['met'] else 'MISSED'}")
    return "\n".join(lines)


def plot(result, path) -> None:
    m = result["median"]
    names = ["import jax", "import ufm"] + [LABELS[k] for k in KEYS]
    vals = [m["import_jax_s"], m["import_ufm_s"]] + [m[k]["wall_s"] for k in KEYS]
    fig, ax = C.new_figure(figsize=(8, 4))
    ax.barh(range(len(vals))[::-1], vals, color=["0.6", "0.6"] + ["C0"] * len(KEYS))
    ax.set_yticks(range(len(vals))[::-1], names, fontsize=8)
    ax.set_xscale("log")
    ax.axvline(2.0, color="k", ls="--", lw=0.8)
    ax.set_xlabel("wall time (s), median over fresh processes")
    C.save_figure(fig, path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny problem, one process")
    ap.add_argument("--out", default=None, help="output folder (default benchmarks/results)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--cache", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--procs", type=int, default=None, help="fresh processes without a cache (default 3)")
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(child(a.smoke, a.cache)))
        return
    run("tiny" if a.smoke else "full", out_dir=a.out, procs=a.procs)


if __name__ == "__main__":
    main()
