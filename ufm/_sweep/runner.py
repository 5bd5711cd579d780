"""The runner: runs grouped by static shape and options, cut into fixed-size chunks, each chunk one compiled,
device-sharded `ufm.solve_batch` call.

Runs that share every *static* field (shapes, modes, method, step budget, dtype) and the two shared scalars (tol,
label_smoothing) form a group; a group runs in chunks of a fixed size with batched lam_H / lam_W / lam_b / lr /
init_scale / PRNG keys, so new numbers never recompile. A chunk is split across the devices of a one-axis `Mesh`
with `jax.shard_map` (NamedSharding inputs): one CPU, eight GPUs or a TPU slice run the same code. The chunk
layout (`plan`) depends only on the grid, ``chunk_size`` and the device count, never on which runs are finished,
so a resumed or redistributed chunk runs with exactly the inputs of the uninterrupted sweep.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from .._solver import solve_batch
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


def make_mesh(devices=None) -> jax.sharding.Mesh:
    """A one-axis ("runs") mesh over ``devices``: a list of devices, a count N (the first N of `jax.devices()`)
    or None (all of them)."""
    if devices is None:
        devices = jax.devices()
    elif is_int(devices):
        all_d = jax.devices()
        if not 1 <= devices <= len(all_d):
            raise ValueError(f"devices must be between 1 and {len(all_d)} (jax.devices()); got {devices}")
        devices = all_d[:devices]
    elif isinstance(devices, (str, bytes)) or not isinstance(devices, Sequence):
        raise TypeError(f"devices must be None, a number of devices or a list of jax devices; got {devices!r}")
    devices = list(devices)
    if not devices:
        raise ValueError("devices must name at least one device")
    if not all(isinstance(d, jax.Device) for d in devices):
        raise TypeError(f"devices must be None, a number of devices or a list of jax devices; got {devices!r}")
    return jax.sharding.Mesh(np.asarray(devices, dtype=object), ("runs",))


_RUNNERS: dict[tuple, Any] = {}


def compiled_runner(c0: Mapping, mesh: jax.sharding.Mesh):
    """One jitted, shard_mapped `solve_batch` per static configuration (cached; jax caches per batch size)."""
    key = (group_key(c0)[: len(STATIC_FIELDS)], tuple(d.id for d in mesh.devices.flat), mesh.axis_names)
    fn = _RUNNERS.get(key)
    if fn is not None:
        return fn
    P = jax.sharding.PartitionSpec
    method, max_steps, patience, dtype = c0["method"], c0["max_steps"], c0["patience"], c0["dtype"]

    def local(problem, seeds, lam_H, lam_W, lam_b, lr, init_scale, tol):
        keys = jax.vmap(jax.random.key)(seeds)
        sol = solve_batch(
            problem,
            keys=keys,
            lam_H=lam_H,
            lam_W=lam_W,
            lam_b=lam_b,
            lr=lr,
            init_scale=init_scale,
            method=method,
            max_steps=max_steps,
            tol=tol,
            dtype=dtype,
            patience=patience,
            history=False,
            history_every=max_steps,
        )
        return sol._replace(history=None, snapshots=None)

    b = P("runs")
    fn = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P(), b, b, b, b, b, b, P()), out_specs=b, check_vma=False))
    _RUNNERS[key] = fn
    return fn


def dispatch(rows: Sequence[Mapping], size: int, mesh: jax.sharding.Mesh):
    """Launch one chunk asynchronously (returns the device `Solution`); padded slots repeat the chunk's last run
    (same step count, so padding never lengthens the chunk)."""
    P = jax.sharding.PartitionSpec
    rows = list(rows) + [rows[-1]] * (size - len(rows))
    c0 = rows[0]
    fdt = np.float64 if c0["dtype"] == "float64" else np.float32
    L = len(c0["widths"])
    put = lambda x, spec: jax.device_put(x, jax.sharding.NamedSharding(mesh, spec))
    problem = jax.tree_util.tree_map(lambda x: put(np.asarray(x, fdt), P()), problem_of(c0))
    col = lambda k: put(np.asarray([r[k] for r in rows], fdt), P("runs"))
    lam_W = np.asarray([np.broadcast_to(np.asarray(r["lam_W"], fdt), (L,)) for r in rows], fdt)
    args = (
        problem,
        put(np.asarray([r["seed"] for r in rows], np.int32), P("runs")),
        col("lam_H"),
        put(lam_W, P("runs")),
        col("lam_b"),
        col("lr"),
        col("init_scale"),
        put(np.asarray(c0["tol"], fdt), P()),
    )
    return compiled_runner(c0, mesh)(*args)


def to_host(sol, n: int):
    """(params, value, grad_norm, num_steps, status) of a dispatched chunk as NumPy arrays, padding dropped."""
    tree = (sol.params, sol.value, sol.grad_norm, sol.num_steps, sol.status)
    return jax.tree_util.tree_map(lambda a: np.asarray(a)[:n], jax.device_get(tree))
