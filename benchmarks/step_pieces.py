"""Where one GD step's time goes, piece by piece: XLA's compiled ``ufm.solve`` loop against NumPy, line by line.

    python -m benchmarks.bench_steps --pieces --one-core          # medium and large, float32 and float64

* **XLA**: ``ufm.solve(method="gd", tol=0, history=False)`` runs S steps under ``jax.profiler.trace``; every
  executed HLO op of the solve's loop is an event with its duration (XLA:CPU's thunk executor records one per op).
  Per op, the **median** duration over the rounds' traced steps (robust to a preemption by another job), scaled
  to CPU time by the traced run's CPU time / wall time; the ops are sorted into pieces with the optimised HLO that
  XLA dumps (``--xla_dump_to``, set before JAX starts):
  *ravel/unravel* (ops whose op_name ends in ``concatenate``/``split``/``slice``: the solver carries x as one flat
  vector, so every step concatenates x's and g's leaves and slices x back into H and the W_l), *update and solver
  loop* (every other op outside ``value_and_grad(objective)``, i.e. without ``jvp(`` in its op_name: the update,
  the driver's norms, stopping rule and best-so-far); then, inside the objective, *products* (a fusion or op
  containing a ``dot``; forward ``W_l H_l``, backward ``dW_l = G H_l^T`` (output d_{l+1} x d_l) and
  ``dH_l = W_l^T G`` (output d_l x N)), *reductions* (the loss value, the regulariser), *copies/transposes*
  (``copy``/``transpose`` ops and fusions named so: W^T behind `ufm._model.layer_matmul`'s barrier), *elementwise*
  (the rest: ReLU, its mask, the residual, the regulariser's gradient). The *bare GD loop* (``value_and_grad`` and
  the update in a ``fori_loop`` over the parameter tree) is traced the same way: a step without the solver.
* **NumPy** (`benchmarks.peers.NumpyGD`, OpenBLAS with one thread): the same step written line by line
  (`numpy_step_lines`, the same statements as ``NumpyGD._grads`` and ``run``), each line timed with
  ``time.process_time``; per line, the median over repeats. NumPy computes no loss value and no stopping rule.

Both are run after ``ufm.solve`` has run once in the process (as in ``bench_steps``' rounds): glibc's malloc then
keeps NumPy's d x N temporaries on its heap instead of mapping fresh pages each step (measured here: 1,770 minor
page faults per step and 13-15 ms instead of 7.8 ms at the medium size in float64 before it); the table gives
NumPy's page faults per step.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import glob
import os
import re
import resource
import statistics
import tempfile
import time

import numpy as np

PIECES = (
    "forward products",
    "dW products",
    "dH products",
    "elementwise",
    "reductions",
    "copies/transposes",
    "ravel/unravel of x and g",
    "update and solver loop",
)


def dump_flags(dump_dir: str) -> str:
    """The XLA_FLAGS that make XLA write every optimised module as text into ``dump_dir`` (set before JAX starts)."""
    return f"--xla_dump_to={dump_dir} --xla_dump_hlo_as_text --xla_dump_hlo_pass_re=^$"


_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\S+?)(?:\{[^}]*\})?\s+([\w\-]+)\(")
_CALLS = re.compile(r"calls=%?([\w.\-]+)")
_OPNAME = re.compile(r'op_name="([^"]*)"')
_COMP = re.compile(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")


def hlo_instructions(text: str) -> dict:
    """``{op name: (shape, opcode, called computation or None, op_name metadata)}`` and ``{computation: body}``
    from an optimised HLO module's text."""
    instrs, comps, cur = {}, collections.defaultdict(list), None
    for line in text.splitlines():
        m = _COMP.match(line)
        if m and "=" not in line.split("{")[0]:
            cur = m.group(1)
            continue
        m = _INSTR.match(line)
        if m and cur is not None:
            name, shape, opcode = m.groups()
            calls = _CALLS.search(line)
            opn = _OPNAME.search(line)
            instrs[name] = (shape, opcode, calls.group(1) if calls else None, opn.group(1) if opn else "")
            comps[cur].append(opcode)
    return {"instrs": instrs, "comps": dict(comps)}


def _contains(hlo: dict, comp: str | None, opcode: str) -> bool:
    return comp is not None and opcode in hlo["comps"].get(comp, ())


def classify(hlo: dict, op: str, N: int) -> str | None:
    """The piece of `PIECES` an executed op belongs to (None: not an op of the module, e.g. the executor)."""
    if op not in hlo["instrs"]:
        return None
    shape, opcode, calls, opname = hlo["instrs"][op]
    dims = tuple(int(x) for x in re.findall(r"\d+", shape.split("[", 1)[1])) if "[" in shape else ()
    if opcode in ("while", "conditional", "call", "tuple", "parameter", "get-tuple-element", "constant"):
        return None
    if opname.rsplit("/", 1)[-1] in ("concatenate", "split", "slice"):  # the driver's flat x: ravel_pytree, unravel
        return "ravel/unravel of x and g"
    if "jvp(" not in opname:  # not from value_and_grad(objective): the update, the driver's norms and stopping rule
        return "update and solver loop"
    if opcode == "dot" or _contains(hlo, calls, "dot"):
        if "transpose(" not in opname:
            return "forward products"
        return "dH products" if N in dims else "dW products"
    if (
        opcode in ("reduce", "reduce-window")
        or _contains(hlo, calls, "reduce")
        or _contains(hlo, calls, "reduce-window")
    ):
        return "reductions"
    if opcode in ("copy", "transpose") or op.startswith(("transpose", "copy")):
        return "copies/transposes"
    return "elementwise"


def _module_text(dump_dir: str, module: str) -> str:
    paths = sorted(glob.glob(os.path.join(dump_dir, f"*{module}.*after_optimizations.txt")))
    if not paths:
        raise FileNotFoundError(f"no optimised HLO dump for module {module!r} in {dump_dir} (XLA_FLAGS unset?)")
    return open(paths[-1]).read()


def _solve(p, x0, S: int, lr: float) -> None:
    import jax

    import ufm

    r = ufm.solve(p, init=x0, method="gd", lr=lr, max_steps=S, tol=0.0, history=False, patience=10 * S + 10)
    jax.block_until_ready(r.value)


def xla_trace(run) -> dict:
    """``{(module, op): [CPU ns per run]}`` of every HLO op of one traced ``run()`` (S GD steps, blocking).

    The profiler gives each op's wall-clock duration; on a core shared with other jobs that counts their time too.
    Each duration is scaled by the traced solve's CPU time over its wall time (the share of the core this process
    got, assumed even over the run), so the pieces are CPU time like NumPy's lines."""
    import jax

    with tempfile.TemporaryDirectory() as tdir:
        with jax.profiler.trace(tdir):
            w0, c0 = time.perf_counter(), time.process_time()
            run()
            share = min(1.0, (time.process_time() - c0) / (time.perf_counter() - w0))
        pb = glob.glob(os.path.join(tdir, "**", "*.xplane.pb"), recursive=True)[0]
        data = jax.profiler.ProfileData.from_file(pb)
    durations: dict = collections.defaultdict(list)
    for plane in data.planes:
        for line in plane.lines:
            for e in line.events:
                stats = dict(e.stats)
                if "hlo_op" in stats and "hlo_module" in stats:
                    # the dump's file name: module_<program id>.<module name> (two jit(lambda)s share a name)
                    pid = stats.get("program_id")
                    module = stats["hlo_module"] if pid is None else f"module_{int(pid):04d}.{stats['hlo_module']}"
                    durations[(module, stats["hlo_op"])].append(e.duration_ns * share)
    durations[("", "core share")] = [share]
    return durations


def xla_summary(durations: dict, hlo_text_of, S: int, N: int) -> dict:
    """Per-step ms of each piece from `xla_trace`'s durations (S steps in all): per op of the solve's loop body,
    its median duration x its runs per step. Ops run fewer than S/2 times (the gradient at the start, the result
    after the loop) are the solve's fixed cost, left out."""
    module = max({m for m, _ in durations}, key=lambda m: sum(sum(v) for (mm, _), v in durations.items() if mm == m))
    hlo = hlo_instructions(hlo_text_of(module))
    pieces = dict.fromkeys(PIECES, 0.0)
    ops = {}
    for (m, op), ds in durations.items():
        kind = classify(hlo, op, N) if m == module else None
        if kind is None or len(ds) < S / 2:
            continue
        per_step = statistics.median(ds) * len(ds) / S / 1e6
        pieces[kind] += per_step
        ops[op] = dict(piece=kind, ms=per_step, runs_per_step=len(ds) / S, shape=hlo["instrs"][op][0])
    return dict(module=module, pieces=pieces, ops=ops, total=sum(pieces.values()))


def numpy_step_lines(g, tick) -> None:
    """One GD step of `benchmarks.peers.NumpyGD` (the same statements), calling ``tick(piece)`` after each line."""
    P = g.P
    H, Ws = P[0], P[1:]
    hs, zs = [H], []
    h = H
    for W in Ws[:-1]:
        z = W @ h
        tick("forward products")
        zs.append(z)
        h = np.maximum(z, 0) if g.a["relu"] else z
        tick("elementwise")
        hs.append(h)
    out = Ws[-1] @ h  # NumpyGD writes this line and the next as one: G = (W_L H_L - Y) / N
    tick("forward products")
    G = (out - g.Y) * g.invN
    tick("elementwise")
    gW = [None] * len(Ws)
    for l in range(len(Ws) - 1, -1, -1):
        gW[l] = G @ hs[l].T
        tick("dW products")
        G = Ws[l].T @ G
        tick("dH products")
        if l > 0 and g.a["relu"]:
            G *= zs[l - 1] > 0
            tick("elementwise")
    grads = [G] + gW
    grads = [gg + lam * pp for gg, pp, lam in zip(grads, P, g.lams, strict=True)]
    tick("elementwise")
    for pp, gg in zip(P, grads, strict=True):
        pp -= g.lr * gg
    tick("update and solver loop")


def numpy_lines(g, reps: int, samples: dict) -> None:
    """Time ``reps`` steps of `numpy_step_lines` (one BLAS thread): appends each line's CPU seconds to
    ``samples[(line index, piece)]``."""
    from .bench_steps import _numpy_threads_ctx

    one = _numpy_threads_ctx(1)
    clock = time.process_time
    with one() if one is not None else contextlib.nullcontext():
        for _ in range(reps):
            per_line: list = []
            t = [clock()]

            def tick(k, per_line=per_line, t=t):
                u = clock()
                per_line.append((k, u - t[0]))
                t[0] = u

            numpy_step_lines(g, tick)
            for i, (k, dt) in enumerate(per_line):
                samples[(i, k)].append(dt)


def numpy_summary(samples: dict) -> dict:
    """Per-step ms of each piece of NumPy's step: per line, the median over its samples."""
    pieces = dict.fromkeys(PIECES, 0.0)
    for (_, k), v in samples.items():
        pieces[k] += 1e3 * statistics.median(v)
    return dict(pieces=pieces, total=sum(pieces.values()))


def _round_measures(p, x0, g, S: int, traces: dict, np_samples: dict, faults: list) -> dict:
    """``{name: () -> float}`` for one configuration's interleaved rounds: the traced solve and the traced bare GD
    loop (durations into ``traces["xla"]``, ``traces["bare"]``), NumPy's timed lines (into ``np_samples``, minor
    page faults into ``faults``), and the untraced
    whole steps in CPU ms (ufm.solve as (t(2S) - t(S)) / S, NumPy's ``run``)."""
    from .bench_steps import LR, _numpy_threads_ctx

    one = _numpy_threads_ctx(1) or contextlib.nullcontext
    clock = time.process_time

    import jax

    from .bench_steps import _loop_programs

    bare = _loop_programs(p, LR)["bare GD"]
    zero = np.zeros((), x0.H.dtype)
    jax.block_until_ready(bare(x0, S, zero))  # compile

    def traced():
        traces["xla"].append(xla_trace(functools.partial(_solve, p, x0, S, LR)))
        return 0.0

    def traced_bare():
        traces["bare"].append(xla_trace(lambda: jax.block_until_ready(bare(x0, S, zero))))
        return 0.0

    def lines():
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        numpy_lines(g, S, np_samples)
        faults.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / S)
        return 0.0

    def ufm_step():
        t0 = clock()
        _solve(p, x0, S, LR)
        t1 = clock()
        _solve(p, x0, 2 * S, LR)
        return 1e3 * ((clock() - t1) - (t1 - t0)) / S

    def numpy_step():
        with one():
            t0 = clock()
            g.run(S)
            return 1e3 * (clock() - t0) / S

    measures = {"xla traced": traced, "bare traced": traced_bare, "numpy lines": lines, "ufm step": ufm_step}
    return measures | {"numpy step": numpy_step}


def step_pieces(sizes: dict, dtypes=("float32", "float64"), dump_dir: str = "", rounds: int = 3, log=print) -> list:
    """Per-piece account of one GD step (XLA's ``ufm.solve`` loop and NumPy), per size and dtype, from ``rounds``
    interleaved rounds (see the module). ``dump_dir`` holds XLA's optimised HLO (`dump_flags`)."""

    from . import _common as C
    from .bench_steps import LR, case
    from .peers import NumpyGD

    C.enable_x64()
    rows = []
    for name, (K, n, d, L) in sizes.items():
        for dtype in dtypes:
            p, x0, flops = case(K, n, d, L, dtype)
            S = max(4, min(200, int(0.5 * 30e9 / flops)))
            for k in (S, 2 * S):  # compile; NumPy's temporaries then stay on malloc's heap (see the module)
                _solve(p, x0, k, LR)
            g = NumpyGD(p, x0, dtype, LR)
            traces: dict = {"xla": [], "bare": []}
            samples: dict = collections.defaultdict(list)
            faults: list = []
            t = C.interleaved(_round_measures(p, x0, g, S, traces, samples, faults), rounds)
            x, bare = (_merged_summary(traces[k], dump_dir, S, p.N) for k in ("xla", "bare"))
            x["measured_ms"] = C.median(t["ufm step"])
            nump = numpy_summary(samples)
            nump["measured_ms"] = C.median(t["numpy step"])
            nump["minor_faults_per_step"] = C.median(faults)
            row = dict(size=name, K=K, n=n, d=d, L=L, dtype=dtype, steps=S, rounds=rounds, flops_per_step=flops)
            row.update(load=C.load_average(), xla=x, bare=bare, numpy=nump)
            top = sorted(x["ops"].items(), key=lambda kv: -kv[1]["ms"])[:12]
            log("    " + "; ".join(f"{k} {v['shape']} {v['piece']} {v['ms']:.3f}" for k, v in top))
            log(
                f"  {name} {dtype}: xla {x['total']:.3f} ms (solve step {x['measured_ms']:.3f}), numpy "
                f"{nump['total']:.3f} ms (run {nump['measured_ms']:.3f}); "
                + ", ".join(f"{k} {x['pieces'][k]:.3f}/{nump['pieces'][k]:.3f}" for k in PIECES)
            )
            rows.append(row)
    return rows


def _merged_summary(traces: list, dump_dir: str, S: int, N: int) -> dict:
    """`xla_summary` of the rounds' traces (S steps each) together, with each round's core share."""
    merged: dict = collections.defaultdict(list)
    shares = [tr.pop(("", "core share"))[0] for tr in traces]
    for tr in traces:
        for key, v in tr.items():
            merged[key].extend(v)
    out = xla_summary(merged, functools.partial(_module_text, dump_dir), S * len(traces), N)
    out["core_share"] = shares
    return out


def _piece_flops(row: dict, piece: str) -> float:
    third = row["flops_per_step"] / 3  # forward = dW = dH = one third of the step's product FLOPs
    return third if piece.endswith("products") else float("nan")


def _gflops(flops: float, ms: float) -> str:
    return "—" if not np.isfinite(flops) or ms <= 0 else f"{flops / ms / 1e6:.1f}"


def pieces_markdown(rows: list[dict], machine: dict) -> str:
    from . import _common as C

    head = ["size (K, n, d, L)", "dtype", "piece", "XLA ms/step", "bare GD loop ms/step", "NumPy ms/step"]
    head += ["XLA / NumPy", "bare / NumPy", "XLA GFLOP/s", "NumPy GFLOP/s"]
    body = []
    for r in rows:
        label = f"{r['size']} ({r['K']}, {r['n']}, {r['d']}, {r['L']})"
        for k in (*PIECES, "sum of the pieces", "whole step, measured"):
            a, c, b = (
                r[s]["total"]
                if k == "sum of the pieces"
                else r[s].get("measured_ms", float("nan"))
                if k.startswith("whole")
                else r[s]["pieces"][k]
                for s in ("xla", "bare", "numpy")
            )
            f = r["flops_per_step"] if k in ("sum of the pieces", "whole step, measured") else _piece_flops(r, k)
            ratios = [f"{u / b:.2f}" if b > 0 and np.isfinite(u) else "—" for u in (a, c)]
            cells = [f"{u:.3f}" if np.isfinite(u) else "—" for u in (a, c, b)]
            body.append([label, r["dtype"], k, *cells, *ratios, _gflops(f, a), _gflops(f, b)])
    faults = ", ".join(f"{r['size']} {r['dtype']} {r['numpy']['minor_faults_per_step']:.0f}" for r in rows)
    return "\n".join(
        [
            "### One GD step, piece by piece: XLA (`ufm.solve`'s loop, profiler) against NumPy (line by line)",
            "",
            "*bare GD loop*: the same objective's `value_and_grad` and the update x - lr g in a `fori_loop` over "
            "the parameter tree (`bench_steps._loop_programs`), traced the same way: a step without the solver's "
            "flat x, norms, stopping rule and best-so-far.",
            "",
            f"Machine: {C.machine_line(machine)}. {rows[0]['rounds']} interleaved rounds. XLA: per HLO op of the "
            "solve's loop body, the median duration over the traced steps of all rounds (the profiler's wall "
            "clock of the op times the traced solve's CPU time / wall time: the process on one core, CPU time); "
            "NumPy: per line, the median of `time.process_time` over as many steps (one BLAS thread). "
            "Whole step: CPU time, medians over the rounds (ufm: (t(2S) - t(S)) / S). "
            f"NumPy minor page faults per step: {faults}.",
            "",
            C.md_table(head, body),
        ]
    )
