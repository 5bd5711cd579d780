"""The runner: runs grouped by static shape and options, cut into fixed-size chunks, each chunk solved by
`ufm.solve_batch` (its batched engines: ``engine="auto"|"map"|"slots"|"vmap"``), split over the given devices.

Runs that share every *static* field (shapes, modes, method, step budget, dtype) and the two shared scalars (tol,
label_smoothing) form a group; a group runs in chunks of a fixed size with batched lam_H / lam_W / lam_b / lr /
init_scale / seeds, so new numbers never recompile. `ufm.solve_batch` is called outside any trace, so its engine
choice applies: on a CPU ("auto" = "map") each run costs its own steps, not the slowest run's. With several devices
a chunk is cut into one equal, contiguous part per device, each part one `solve_batch` call on its device
(``jax.default_device``) in its own thread, so the devices run at the same time; each call uses `chunk_threads`
host threads (`ufm.solve_batch`'s ``threads``: the CPU cores shared among the devices, or a Dask worker's own
thread count). The chunk layout (`plan`) depends
only on the grid, ``chunk_size`` and the device count, never on which runs are finished, so a resumed or
redistributed chunk runs with exactly the inputs of the uninterrupted sweep.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import jax
import numpy as np

from .._batch import default_threads
from .._solver import ENGINES, solve_batch
from .grid import is_int, problem_of

STATIC_FIELDS = (
    "num_classes",
    "n_per_class",
    "widths",
    "activation",
    "loss",
    "bias",
    "method",
    "max_steps",
    "patience",
    "dtype",
)
"""Fields that change the compiled program: runs that differ in one of them never share a chunk."""
SHARED_FIELDS = ("tol", "label_smoothing")
"""Scalars passed once per chunk (not batched): runs that differ in one of them never share a chunk."""


def group_key(config: Mapping) -> tuple:
    """The group of a run: its static and shared fields (as JSON strings)."""
    return tuple(json.dumps(config[k]) for k in STATIC_FIELDS + SHARED_FIELDS)


def chunk_len(group_size: int, chunk_size: int, ndev: int) -> int:
    """Batch size for a group: min(chunk_size, next power of two >= group size), rounded up to a multiple of
    the device count. Small groups thus compile at most log2(chunk_size) sizes; large groups use one size."""
    b = min(chunk_size, 1 << max(0, math.ceil(math.log2(group_size))))
    return -(-max(b, ndev) // ndev) * ndev


def plan(configs: Sequence[Mapping], chunk_size: int, ndev: int = 1) -> list[tuple[tuple, list[int], int]]:
    """The chunk layout: a list of (group key, run indices, batch size), groups in order of first appearance.

    It depends only on the configs, ``chunk_size`` and the device count, never on which runs are finished,
    so a resumed sweep recomputes a chunk with exactly the inputs of the uninterrupted sweep."""
    groups: dict[tuple, list[int]] = {}
    for i, c in enumerate(configs):
        groups.setdefault(group_key(c), []).append(i)
    chunks = []
    for key, idx in groups.items():
        b = chunk_len(len(idx), chunk_size, ndev)
        for s in range(0, len(idx), b):
            chunks.append((key, idx[s : s + b], b))
    return chunks


def device_list(devices=None) -> list:
    """The devices a chunk is split over: a list of devices, a count N (the first N of `jax.devices()`) or None
    (all of them). Raises TypeError/ValueError naming ``devices``."""
    if devices is None:
        return list(jax.devices())
    if is_int(devices):
        all_d = jax.devices()
        if not 1 <= devices <= len(all_d):
            raise ValueError(f"devices must be between 1 and {len(all_d)} (jax.devices()); got {devices}")
        return list(all_d[:devices])
    if isinstance(devices, (str, bytes)) or not isinstance(devices, Sequence):
        raise TypeError(f"devices must be None, a number of devices or a list of jax devices; got {devices!r}")
    devices = list(devices)
    if not devices:
        raise ValueError("devices must name at least one device")
    if not all(isinstance(d, jax.Device) for d in devices):
        raise TypeError(f"devices must be None, a number of devices or a list of jax devices; got {devices!r}")
    return devices


def check_engine(engine) -> str:
    """``engine`` if it is one of `ufm.solve_batch`'s engines, else ValueError naming them."""
    if not isinstance(engine, str) or engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES} (ufm.solve_batch's engines); got {engine!r}")
    return engine


def chunk_threads(ndev: int) -> int:
    """Host threads of each `solve_batch` call of a chunk cut over ``ndev`` devices: `ufm.solve_batch`'s default
    (the usable CPU cores on a CPU) shared among the devices' parts; on a Dask worker, the worker's own thread
    count (a ``LocalCluster(n_workers=N, threads_per_worker=1)`` already uses one core per worker process)."""
    try:
        from distributed import get_worker

        return max(1, int(get_worker().state.nthreads))
    except (ImportError, ValueError, AttributeError):
        pass
    return max(1, default_threads() // ndev)


def solve_rows(rows: Sequence[Mapping], device, engine: str, threads: int | None = None):
    """`ufm.solve_batch` of one part of a chunk on ``device``: per-run lam_H, lam_W (B, L), lam_b, lr, init_scale
    and seed (key ``jax.random.key(seed)``), the static options of ``rows[0]``; no history; ``threads`` host
    threads (None: `ufm.solve_batch`'s default). Returns the device `Solution` (asynchronous where the engine
    is)."""
    c0 = rows[0]
    fdt = np.float64 if c0["dtype"] == "float64" else np.float32
    L = len(c0["widths"])
    col = lambda k: np.asarray([r[k] for r in rows], fdt)
    # JAX's default device is part of jit's cache key: on the default device no context, so a sweep shares its
    # compiled programs with the caller's own solve_batch calls
    on_default = device == jax.devices()[0]
    with contextlib.nullcontext() if on_default else jax.default_device(device):
        return solve_batch(
            problem_of(c0),
            seeds=np.asarray([r["seed"] for r in rows], np.int32),
            lam_H=col("lam_H"),
            lam_W=np.asarray([np.broadcast_to(np.asarray(r["lam_W"], fdt), (L,)) for r in rows], fdt),
            lam_b=col("lam_b"),
            lr=col("lr"),
            init_scale=col("init_scale"),
            method=c0["method"],
            max_steps=c0["max_steps"],
            tol=c0["tol"],
            dtype=c0["dtype"],
            patience=c0["patience"],
            history=False,
            engine=engine,
            threads=threads,
        )


def dispatch(rows: Sequence[Mapping], size: int, devices: Sequence, engine: str = "auto") -> list:
    """Launch one chunk: padded to ``size``, cut into one equal part per device, each part one `solve_batch` call
    on `chunk_threads` host threads. One device: the part is solved here (asynchronously where the engine is);
    several: each part in its own thread on its device. Returns the parts (a `Solution` or a `Future` of one),
    for `to_host`. Solving a chunk in a background thread while the caller builds the previous chunk's records was
    measured 2.5x slower on the 2-core CPU (benchmarks/README.md, "Batched engine", round 6), so it is not done.

    A padded slot repeats the chunk's last run with ``init_scale=0``: it starts at x = 0 (b = 0), where the gradient
    of every weight and feature vanishes (each is a product with a zero factor), so it ends at once (step 0, or a
    few steps of b alone with a free MSE bias) instead of costing a full solve; its result is dropped."""
    pad = dict(rows[-1], init_scale=0.0)
    rows = list(rows) + [pad] * (size - len(rows))
    m = size // len(devices)
    parts = [rows[d * m : (d + 1) * m] for d in range(len(devices))]
    threads = chunk_threads(len(devices))
    if len(devices) == 1:
        return [solve_rows(parts[0], devices[0], engine, threads)]
    pool = ThreadPoolExecutor(max_workers=len(devices), thread_name_prefix="ufm-sweep")
    try:
        return [pool.submit(solve_rows, part, dev, engine, threads) for part, dev in zip(parts, devices, strict=True)]
    finally:
        pool.shutdown(wait=False)  # the threads end with their part


def to_host(parts: Sequence, n: int):
    """(params, value, grad_norm, num_steps, status) of a dispatched chunk as NumPy arrays in run order, padding
    dropped (waits for the parts)."""
    trees = []
    for part in parts:
        sol = part.result() if isinstance(part, Future) else part
        trees.append(jax.device_get((sol.params, sol.value, sol.grad_norm, sol.num_steps, sol.status)))
    return jax.tree_util.tree_map(lambda *a: np.concatenate([np.atleast_1d(x) for x in a])[:n], *trees)
