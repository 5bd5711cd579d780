"""Memory: how much a solve or a check of a UFM needs (an estimate from the array sizes) and how much there is.

Used by the command line to refuse, before any compute, a problem that cannot fit (a face module: it reads the
problem's shapes and asks JAX which device computes, nothing else).
"""

from __future__ import annotations

import os


def available_memory() -> int | None:
    """Bytes the computation may use: the accelerator's memory limit when JAX computes on one, else the host's
    available memory (MemAvailable on Linux, physical memory elsewhere); None when unknown."""
    import jax

    dev = jax.devices()[0]
    if dev.platform != "cpu":
        try:
            stats = dev.memory_stats() or {}
        except Exception:  # backends without memory_stats
            stats = {}
        if stats.get("bytes_limit"):
            return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
        return None
    host = None
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    host = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    if host is None:
        try:
            host = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    limit = _cgroup_room()
    return host if limit is None else min(host, limit)


def _cgroup_room() -> int | None:
    """A container's memory limit minus its usage (cgroup v2, then v1); None without a limit."""
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        try:
            with open(limit_file) as fh:
                text = fh.read().strip()
            if text == "max" or int(text) >= 2**60:  # no limit
                return None
            with open(usage_file) as fh:
                return max(0, int(text) - int(fh.read().strip()))
        except (OSError, ValueError):
            continue
    return None


def estimate_memory(problem, solver: dict | None = None, hessian: bool = False) -> dict:
    """A lower-bound estimate of the memory a command needs, in bytes, by part (and ``"total"``).

    With P = ``problem.num_params`` parameters, itemsize s (8 float64, 4 float32), widths d_l and N samples:
    solve = s P (2 m + 8) for L-BFGS with memory m (s, y pairs, parameters, gradient, direction, line search),
    s P 8 for the first-order methods; history = 2 s (steps / history_every + 1); snapshots =
    s P (steps / snapshot_every + 1); activations = 4 s N sum_l d_l (forward and backward); metrics (float64
    SVDs of one layer's d x N features and d x d covariances) = 8 (4 N max d + 3 max d^2); Hessian certificate =
    8 P 40 (Lanczos vectors). Without ``solver`` (re-checking a saved solution) the parameters (two copies)
    replace the solver's parts. Each part is what the arrays alone take, so the total is a lower bound."""
    d = max(problem.widths + (problem.num_classes,))
    N = problem.N
    P = problem.num_params
    parts = {}
    s = 8
    if solver is not None:
        s = 8 if solver.get("dtype", "float64") == "float64" else 4
        m = solver.get("memory_size", 10) if solver.get("method", "lbfgs") == "lbfgs" else 0
        parts["solve"] = s * P * (2 * m + 8)
        steps = int(solver.get("steps") or 0)
        parts["history"] = 2 * s * (steps // max(1, int(solver.get("history_every") or 1)) + 1)
        se = solver.get("snapshot_every") or 0
        parts["snapshots"] = s * P * (steps // se + 1) if se else 0
    else:
        parts["parameters"] = 2 * s * P
    parts["activations"] = 4 * s * N * sum(problem.widths)
    parts["metrics"] = 8 * (4 * N * d + 3 * d * d)
    parts["hessian"] = 8 * P * 40 if hessian else 0
    parts["total"] = sum(parts.values())
    return parts


def human_bytes(n: float) -> str:
    """``1.5 GB``-style size (powers of 1000)."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"  # pragma: no cover


def memory_refusal(problem, solver: dict | None = None, hessian: bool = False, what: str = "this problem"):
    """None when the estimate (`estimate_memory`) fits the available memory (or either is unknown), else one line
    saying what is needed, its largest part and what is available."""
    est = estimate_memory(problem, solver, hessian)
    avail = available_memory()
    if avail is None or est["total"] <= avail:
        return None
    big = max((k for k in est if k != "total"), key=lambda k: est[k])
    hint = ", fewer --steps or a larger --history-every/--snapshot-every" if big in ("history", "snapshots") else ""
    return (
        f"{what} needs at least about {human_bytes(est['total'])} of memory ({problem.num_params:,} parameters; "
        f"the largest part, {big}, {human_bytes(est[big])}), more than the {human_bytes(avail)} available; "
        f"use smaller widths or fewer samples{hint}"
    )
