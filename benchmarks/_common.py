"""Shared helpers of the benchmarks: machine facts, interleaved timing, FLOP counts, peers, output files.

Conventions used by every benchmark (see benchmarks/README.md):

* Implementations are measured **interleaved**: each round measures every implementation once, in a
  rotating order, so that a burst of load from other processes hits all of them alike. We report the
  median over rounds of each rate and the median over rounds of the per-round ratios ufm / peer.
* Compile time is never inside a steady-state figure; it is reported separately (bench_latency).
* Torch is optional: ``torch_or_none()`` returns None (with the reason) when it is not installed, and the
  benchmarks then skip their torch columns and say so in the table.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

RESULTS_DIR = Path(__file__).resolve().parent / "results"


# --------------------------------------------------------------------------------------------- machine


def load_average() -> tuple[float, float, float] | None:
    try:
        return os.getloadavg()
    except OSError:
        return None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict:
    """CPU, cores, load, and the versions of everything that is timed."""
    import jax
    import jaxlib

    info = dict(
        cpu=cpu_model(),
        cores=os.cpu_count(),
        platform=platform.platform(),
        python=platform.python_version(),
        numpy=np.__version__,
        jax=jax.__version__,
        jaxlib=jaxlib.__version__,
        jax_backend=jax.default_backend(),
        load_average_start=load_average(),
        date=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    )
    try:
        import ufm

        info["ufm"] = ufm.__version__
        info["ufm_commit"] = _git_commit()
    except Exception:  # pragma: no cover - benchmark run outside the repo
        info["ufm"] = "?"
    torch, why = torch_or_none()
    info["torch"] = torch.__version__ if torch is not None else f"absent ({why})"
    if torch is not None:
        info["torch_threads_default"] = torch.get_num_threads()
    return info


def _git_commit() -> str:
    try:
        root = Path(__file__).resolve().parents[1]
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--", "ufm"], capture_output=True, text=True
        ).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "")
    except OSError:
        return "?"


def torch_or_none():
    """(torch module, None) or (None, reason). Torch is an optional dependency (the ``bench`` extra)."""
    try:
        import torch
    except ImportError as e:
        return None, f"torch not installed: {e}"
    return torch, None


def machine_line(info: dict) -> str:
    la = info.get("load_average_start")
    la_end = info.get("load_average_end")
    load = "" if la is None else f"load avg at start {la[0]:.1f}"
    if la_end is not None:
        load += f", at end {la_end[0]:.1f}"
    return (
        f"{info['cpu']}, {info['cores']} cores ({load}); Python {info['python']}, jax {info['jax']}, "
        f"numpy {info['numpy']}, torch {info['torch']}, ufm {info.get('ufm', '?')} ({info.get('ufm_commit', '?')}); "
        f"{info['date']}"
    )


# --------------------------------------------------------------------------------------------- timing


def median(xs):
    xs = [x for x in xs if x is not None and np.isfinite(x)]
    return statistics.median(xs) if xs else float("nan")


def interleaved(measures: dict, rounds: int) -> dict[str, list[float]]:
    """Run ``measures[name]() -> float`` once per round for every name, rotating the order each round.

    Returns ``{name: [value per round]}``. Rotation spreads any drift in machine load evenly.
    """
    names = list(measures)
    out: dict[str, list[float]] = {k: [] for k in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            out[name].append(measures[name]())
    return out


def per_round_ratios(num: list[float], den: list[float]) -> list[float]:
    return [a / b for a, b in zip(num, den, strict=True) if b and np.isfinite(a) and np.isfinite(b)]


def timeit(fn, repeat: int = 1) -> float:
    """Best-of-``repeat`` wall time of ``fn()`` (fn must block until its result is ready)."""
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


# --------------------------------------------------------------------------------------------- FLOPs, peak


def gd_step_flops(K: int, N: int, widths: tuple[int, ...]) -> int:
    """Matmul FLOPs of one full-batch gradient step of the (deep) UFM, forward + backward.

    Forward: one product per layer, W_l (d_{l+1} x d_l) times H_l (d_l x N): 2 d_{l+1} d_l N FLOPs.
    Backward: two products per layer of the same size, dW_l = G_{l+1} H_l^T and dH_l = W_l^T G_{l+1}
    (dH_1 is needed too: H is a parameter). Total = 3 x forward. Element-wise work (ReLU, masks, the
    update, the loss) is O(d N) and not counted.
    """
    dims = tuple(widths) + (K,)
    fwd = sum(2 * dims[i + 1] * dims[i] * N for i in range(len(widths)))
    return 3 * fwd


def matmul_peak(sizes=(1024, 2048), repeat: int = 5, torch_too: bool = True) -> dict:
    """Best sustained square-matmul GFLOP/s, float32 and float64, with NumPy, JAX (and torch if present).

    Each entry is the best over ``repeat`` timed products (2 m^3 FLOPs each) after one warm-up, so it is
    the least-disturbed figure on a shared machine. The machine's peak is the max over libraries.
    """
    import jax
    import jax.numpy as jnp

    torch, _ = torch_or_none() if torch_too else (None, None)
    res: dict = {}
    mm = jax.jit(lambda a, b: a @ b)
    rng = np.random.default_rng(0)
    for dt in ("float32", "float64"):
        row = {}
        for m in sizes:
            a = rng.standard_normal((m, m)).astype(dt)
            b = rng.standard_normal((m, m)).astype(dt)
            fl = 2 * m**3
            a @ b
            row[f"numpy_{m}"] = fl / timeit(lambda a=a, b=b: a @ b, repeat) / 1e9
            if dt == "float64" and not jax.config.jax_enable_x64:
                continue
            aj, bj = jnp.asarray(a), jnp.asarray(b)
            mm(aj, bj).block_until_ready()
            row[f"jax_{m}"] = fl / timeit(lambda x=aj, y=bj: mm(x, y).block_until_ready(), repeat) / 1e9
            if torch is not None:
                at, bt = torch.from_numpy(a), torch.from_numpy(b)
                at @ bt
                row[f"torch_{m}"] = fl / timeit(lambda x=at, y=bt: x @ y, repeat) / 1e9
        row["peak"] = max(row.values())
        row["peak_by"] = max((k for k in row if k != "peak"), key=lambda k: row[k])
        res[dt] = row
    return res


# --------------------------------------------------------------------------------------------- output


def fmt_rate(x: float) -> str:
    if x is None or not np.isfinite(x):
        return "—"
    if x >= 100:
        return f"{x:,.0f}"
    if x >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}"


def fmt_ratio(x: float) -> str:
    if x is None or not np.isfinite(x):
        return "—"
    return f"{x:.1f}x" if x >= 10 else f"{x:.2f}x"


def fmt_time(t: float | None) -> str:
    if t is None or not np.isfinite(t):
        return "not reached"
    if t < 1e-3:
        return f"{t * 1e6:.0f} µs"
    if t < 1:
        return f"{t * 1e3:.1f} ms"
    return f"{t:.2f} s"


def md_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, float)):
        x = float(x)
        return x if np.isfinite(x) else None
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, np.bool_):
        return bool(x)
    return x


def write_outputs(name: str, result: dict, out_dir: Path | str | None, markdown: str) -> dict:
    """Write ``{name}.json`` and ``{name}.md`` into out_dir (default benchmarks/results/); return paths."""
    out = Path(out_dir) if out_dir is not None else RESULTS_DIR
    out.mkdir(parents=True, exist_ok=True)
    result["machine"]["load_average_end"] = load_average()
    (out / f"{name}.json").write_text(json.dumps(_jsonable(result), indent=1) + "\n")
    (out / f"{name}.md").write_text(markdown + "\n")
    return {"json": str(out / f"{name}.json"), "md": str(out / f"{name}.md"), "png": str(out / f"{name}.png")}


def new_figure(*args, **kwargs):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(*args, **kwargs)


def save_figure(fig, path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def enable_x64() -> None:
    import jax

    jax.config.update("jax_enable_x64", True)


def add_repo_to_path() -> None:
    root = str(Path(__file__).resolve().parents[1])
    if root not in sys.path:
        sys.path.insert(0, root)
