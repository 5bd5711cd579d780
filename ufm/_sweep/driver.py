"""`sweep`: expand a grid, skip what the store holds, solve the remaining chunks in this process or on a Dask
cluster, and append each chunk's records to the store as it returns; `load_sweep`, `rerun`, `iter_fields`."""

from __future__ import annotations

import datetime
import hashlib
import inspect
import math
import os
import secrets
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

from .._checks import check
from .._json import to_jsonable
from .._problem import UFM
from .._solution import Solution
from .._solver import solve
from .._terminal import version
from .columns import frame_records, to_columns, to_frame
from .grid import expand_grid, is_int, is_num, problem_of, run_id
from .progress import Progress, tqdm_class
from .records import solve_chunk, summarise
from .runner import check_engine, device_list, dispatch, plan, to_host
from .store import SCHEMA, Store, new_header, read_store, report_bad

_CHECK_RESERVED = ("problem", "solution", "prediction", "hessian", "metrics")


class SweepResult(NamedTuple):
    """Result of `sweep`.

    Each run becomes one record (a JSON-friendly dict):

    * ``run`` (sha256-based id of the config), ``index`` (position in the grid), ``config`` (every field);
    * ``loss`` (the final objective f), ``grad_norm``, ``num_steps``, ``status`` (as `Solution.status_name`),
      ``success``: the run's own outcome in `ufm.solve_batch` (each run keeps its status and step count);
    * ``prediction`` (``ufm.predict(problem).to_dict()``; its ``loss`` is f*, an upper bound where ``known`` is
      False), ``gap`` = (f - f*)/|f*| (the definition of `ufm.check`'s ``Report.gap``) and ``gap_abs`` = f - f*;
    * ``verdict`` ("matches", "local-min", "saddle", "below-prediction", "not-converged", "no-prediction") and
      ``check``: ``ufm.check(problem, solution, prediction).to_dict()`` without the fields the record already
      holds (prediction, metrics, problem). The Hessian certificate is on by default (``second_order=True``; at
      stationary points only); with ``second_order=False`` "matches"/"local-min" mean first-order stationary;
    * ``metrics``: ``ufm.metrics.layer_metrics(problem, params)`` (NC1-NC4 and DNC per layer, spectra);
    * ``ranks``: numerical ranks of the class means of H_1..H_L (``H``), of Z_2..Z_L (``Z``), of W_1..W_L
      (``W``) and of the output (``out``): rank(A) = #{i : sigma_i(A) > max(rank_rtol sigma_1(A), rank_atol)};
    * ``errors`` (a dict of tool -> message when predict/check/metrics raised for this run, else null),
      ``wall_s`` (approximate wall time per run of its chunk; the only field that is not deterministic);
    * ``sha256``: the record's checksum in the store (see `load_sweep`).

    Attributes:
      records: one dict per run of the grid, in grid order (those already in the store included).
      path: the store path, or None for an in-memory sweep.
      num_runs: runs in the grid (after removing duplicate configs).
      num_new: runs computed by this call.
      num_skipped: runs found finished in the store and not recomputed.
      num_chunks: compiled batched calls (or Dask tasks) made by this call.
      header: the store header (grid, settings, versions).
      num_devices: devices each chunk was split over (1 per task on a Dask cluster).
    """

    records: list
    path: str | None
    num_runs: int
    num_new: int
    num_skipped: int
    num_chunks: int
    header: dict
    num_devices: int = 1

    def columns(self) -> dict[str, np.ndarray]:
        """The records as a dict of NumPy columns (see `load_sweep`)."""
        return to_columns(self.records)

    def frame(self):
        """The records as a pandas DataFrame, one row per run (see `load_sweep`; needs pandas)."""
        return to_frame(self.records)


def versions() -> dict:
    """The library versions a store records (a store written by other versions is not resumed)."""
    return {"ufm": version(), "jax": jax.__version__, "numpy": np.__version__}


def _fingerprint(ids: Sequence[str], settings: Mapping) -> dict:
    return {
        "schema": SCHEMA,
        "n_runs": len(ids),
        "runs_sha256": hashlib.sha256("\n".join(ids).encode()).hexdigest(),
        "settings": dict(settings),
        "versions": versions(),
    }


def validate_check_options(check_options: Mapping[str, Any] | None) -> dict:
    """Check ``check_options`` against `ufm.check`'s keywords before anything runs: known names only, each
    tolerance (``*_tol``/``*_rtol``) None or a finite number >= 0, ``configuration`` None or a string,
    ``hessian_options`` None or a dict. Raises ValueError/TypeError naming the option."""
    if check_options is None:
        return {}
    if not isinstance(check_options, Mapping):
        raise TypeError(f"check_options must be a dict of ufm.check options; got {check_options!r}")
    accepted = set(inspect.signature(check).parameters) - set(_CHECK_RESERVED)
    unknown = sorted(set(check_options) - accepted)
    if unknown:
        raise ValueError(f"check_options has unknown option(s) {unknown}; ufm.check accepts {sorted(accepted)}")
    for k, v in check_options.items():
        if k.endswith("tol") and v is not None and (not is_num(v) or not math.isfinite(v) or v < 0):
            raise ValueError(f"check_options[{k!r}] must be None or a finite number >= 0; got {v!r}")
        if k == "configuration" and v is not None and not isinstance(v, str):
            raise TypeError(f"check_options['configuration'] must be None or a string; got {v!r}")
        if k == "hessian_options" and v is not None and not isinstance(v, Mapping):
            raise TypeError(f"check_options['hessian_options'] must be None or a dict; got {v!r}")
    return dict(check_options)


def _is_client(client) -> bool:
    try:
        from distributed import Client
    except ImportError:
        return False
    return isinstance(client, Client)


def sweep_settings(
    *,
    chunk_size: int,
    engine: str,
    second_order: bool,
    metrics: bool,
    rank_rtol: float,
    rank_atol: float,
    check_options: Mapping[str, Any] | None,
) -> dict:
    """The settings a store records (its fingerprint: a resume with other settings is refused), validated:
    ValueError/TypeError naming the option."""
    if not is_int(chunk_size) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an integer >= 1; got {chunk_size!r}")
    check_engine(engine)
    for name, v in (("second_order", second_order), ("metrics", metrics)):
        if not isinstance(v, bool):
            raise TypeError(f"{name} must be True or False; got {v!r}")
    for name, tol in (("rank_rtol", rank_rtol), ("rank_atol", rank_atol)):
        if not is_num(tol) or not math.isfinite(tol) or tol < 0:
            raise ValueError(f"{name} must be a finite number >= 0; got {tol!r}")
    return {
        "chunk_size": int(chunk_size),
        "engine": engine,
        "second_order": bool(second_order),
        "rank_rtol": float(rank_rtol),
        "rank_atol": float(rank_atol),
        "x64": bool(jax.config.read("jax_enable_x64")),
        "metrics": bool(metrics),
        "check_options": to_jsonable(validate_check_options(check_options)),
    }


class PreparedSweep:
    """A sweep ready to run (made by `prepare_sweep`): the grid expanded, the store opened, locked and read, the
    chunks still to solve planned. `run` solves them (once); `close` releases the store (also on leaving a
    ``with``).

    Attributes:
      configs, ids: the runs of the grid and their ids, in grid order.
      chunks: the chunks (group key, run indices, batch size) with at least one run not in the store; empty when
        the store holds every run (then `run` needs no devices and no cluster).
      devices: the devices a chunk is split over in process (None on a cluster).
    """

    def __init__(self, configs, settings, header, store, path, devices, progress):
        self.configs, self.settings, self.store, self.path = configs, settings, store, path
        self.ids = [run_id(c) for c in configs]
        self.header = store.header if store is not None else header
        self.devices = devices
        self.done = dict(store.done) if store is not None else {}
        self.finished = np.asarray([i in self.done for i in self.ids], bool)
        ndev = 1 if devices is None else len(devices)
        layout = plan(configs, settings["chunk_size"], ndev)
        self.chunks = [ch for ch in layout if not self.finished[ch[1]].all()]
        if progress is None:
            progress = bool(getattr(sys.stderr, "isatty", lambda: False)()) and tqdm_class(False) is not None
        self.progress = bool(progress)
        self.ran = False

    def __enter__(self) -> PreparedSweep:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Release the store (its lock)."""
        if self.store is not None:
            self.store.close()

    def run(self, client=None) -> SweepResult:
        """Solve the chunks still to do, in process or on ``client``, appending each chunk's records to the store
        as it returns; the `SweepResult` of the whole grid. ``client`` is required when the sweep was prepared
        for a cluster and some run is not in the store yet; it is not used otherwise."""
        if self.ran:
            raise ValueError("a PreparedSweep runs once; call prepare_sweep again to resume or repeat it")
        if client is not None and self.devices is not None:
            raise ValueError("this sweep was prepared to run in process (on_cluster=False); pass no client")
        if self.chunks and self.devices is None and client is None:
            raise ValueError("this sweep was prepared for a Dask cluster (on_cluster=True); pass its client")
        self.ran = True
        skipped = int(self.finished.sum())
        bar = Progress(len(self.configs), skipped, self.progress)
        new = 0

        def commit(recs: list[dict]) -> None:
            nonlocal new
            if self.store is not None:
                recs = self.store.append(recs)
            for r in recs:
                self.done[r["run"]] = r
            new += len(recs)
            bar.update(len(recs))

        try:
            if not self.chunks:
                pass  # every run is in the store: no device, no cluster
            elif client is not None:
                _run_on_client(client, self.configs, self.ids, self.chunks, self.finished, self.settings, commit)
            else:
                _run_here(self, commit, bar)
        finally:
            bar.close()
        records = [self.done[i] for i in self.ids if i in self.done]
        ndev = 1 if self.devices is None else len(self.devices)
        return SweepResult(records, self.path, len(self.configs), new, skipped, len(self.chunks), self.header, ndev)


def prepare_sweep(
    grid: Mapping | Sequence[Mapping],
    store: str | os.PathLike | None = None,
    *,
    on_cluster: bool = False,
    chunk_size: int = 64,
    devices=None,
    engine: str = "auto",
    progress: bool | None = None,
    second_order: bool = True,
    check_options: Mapping[str, Any] | None = None,
    metrics: bool = True,
    rank_rtol: float = 1e-4,
    rank_atol: float = 1e-8,
) -> PreparedSweep:
    """Validate a sweep, open (or create) its store and plan the chunks still to solve, without solving anything
    and without touching a device or a cluster: `PreparedSweep.chunks` says whether any work is left (``ufm
    sweep --workers N`` starts its cluster only then). Arguments as in `sweep`; ``on_cluster=True`` plans for a
    Dask client (one device per task). Raises as `sweep` does, before the store is created."""
    configs = expand_grid(grid)
    settings = sweep_settings(
        chunk_size=chunk_size,
        engine=engine,
        second_order=second_order,
        metrics=metrics,
        rank_rtol=rank_rtol,
        rank_atol=rank_atol,
        check_options=check_options,
    )
    if progress is not None and not isinstance(progress, bool):
        raise TypeError(f"progress must be None, True or False; got {progress!r}")
    if on_cluster and devices is not None:
        raise ValueError(
            "devices and client are exclusive: with a Dask client each task uses its worker's first device"
        )
    devs = None if on_cluster else device_list(devices)
    if progress:
        tqdm_class(required=True)
    ids = [run_id(c) for c in configs]
    created = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    header = new_header(_fingerprint(ids, settings), to_jsonable(grid), created)
    path = None if store is None else os.fspath(store)
    st = Store(path, header) if path is not None else None
    try:
        return PreparedSweep(configs, settings, header, st, path, devs, progress)
    except BaseException:
        if st is not None:
            st.close()
        raise


def sweep(
    grid: Mapping | Sequence[Mapping],
    store: str | os.PathLike | None = None,
    *,
    chunk_size: int = 64,
    devices=None,
    client=None,
    engine: str = "auto",
    progress: bool | None = None,
    second_order: bool = True,
    check_options: Mapping[str, Any] | None = None,
    metrics: bool = True,
    rank_rtol: float = 1e-4,
    rank_atol: float = 1e-8,
) -> SweepResult:
    """Solve every run of a grid with `ufm.solve_batch`, chunk by chunk; save each chunk's runs as it finishes.

    Runs that share shapes and static solver options are solved together, a chunk at a time, by
    ``ufm.solve_batch(..., engine=engine)`` with per-run lam_H, lam_W, lam_b, lr, init_scale and PRNG key
    ``jax.random.key(seed)`` (the key `ufm.solve(problem, key=seed)` uses). `solve_batch` is called outside
    any trace, so its engines apply ("auto" is `ufm.solve_batch`'s choice for the backend: see its ``engine``
    argument). Chunks have a fixed size (groups smaller than ``chunk_size`` use the next power of two), the last
    one padded with rows that start at x = 0 (``init_scale=0``: the gradients of the weights and features vanish
    there), which stop at once: only shapes and static options compile, and padding costs next to no solve.

    Where the chunks run:

    * default: in this process, each chunk cut into one equal part per device of ``devices`` (default: all of
      `jax.devices()`), each part one `solve_batch` call on its device, the devices at the same time;
    * ``client=``: a `dask.distributed.Client`. Every chunk is one task on a worker's first JAX device, with the
      inputs it has in process (same records). This process stays the store's single writer, appending records
      as tasks finish; a dead worker's task is recomputed elsewhere; an interrupted client loses at most the
      chunks in flight. When the store already holds every run, the client is not used.

    A resumed sweep recomputes each unfinished chunk with the same inputs: bit for bit the uninterrupted one.
    The fields of a record are listed under `SweepResult`.

    Args:
      grid: a dict of field -> value(s), or a list of such dicts (see `expand_grid` for the fields).
      store: path of a JSON-lines store. Finished runs are appended after every chunk; an existing store of the
        same sweep is resumed (finished runs are skipped); a store of a different sweep (grid, settings or
        library versions) raises `IncompatibleStoreError`. None keeps the records in memory only.
      chunk_size: runs per `solve_batch` call (rounded up to a multiple of the device count).
      devices: a list of devices or a number of them (default: all of `jax.devices()`); not with ``client``.
      client: a `dask.distributed.Client` to run the chunks on (needs ``pip install ufm[distributed]``).
      engine: `ufm.solve_batch`'s engine: "auto" (default) or "lockstep", "map", "slots" or "vmap".
      progress: a progress bar on stderr (tqdm; default: when stderr is a terminal and tqdm is installed).
      second_order: ask `ufm.check` for its second-order certificate (``hessian=True``, default; computed at
        stationary points only). Measured (``python -m benchmarks.bench_check --sweep``, round 5): it adds 0.27x
        a first-order record per run on the quickstart (14,720 parameters) and 0.31x on K=3, L=4, widths 6; a
        fixed ~70 ms per record on tiny problems.
      check_options: more keyword options of `ufm.check` (``gap_tol``, ``grad_tol``, ``hess_rtol``, ...),
        validated before anything runs.
      metrics: store ``ufm.metrics.layer_metrics`` per run (a few kB of JSON per run; off: ``metrics`` is null).
      rank_rtol, rank_atol: the thresholds of the numerical ranks of a record (see `SweepResult`).

    Returns:
      `SweepResult` with ``records`` for every run of the grid.

    Raises:
      ValueError, TypeError: a bad grid or option, naming it, before anything runs or is written.
      IncompatibleStoreError: the store belongs to another sweep or is in use by a running one.
    """
    if client is not None and not _is_client(client):
        raise TypeError(
            f"client must be a dask.distributed.Client; got {type(client).__name__} (pip install 'ufm[distributed]')"
        )
    with prepare_sweep(
        grid,
        store,
        on_cluster=client is not None,
        chunk_size=chunk_size,
        devices=devices,
        engine=engine,
        progress=progress,
        second_order=second_order,
        check_options=check_options,
        metrics=metrics,
        rank_rtol=rank_rtol,
        rank_atol=rank_atol,
    ) as job:
        return job.run(client)


def _run_here(job: PreparedSweep, commit, bar) -> None:
    """In process: the next chunk is dispatched (asynchronously where the engine is: `dispatch`) before the current
    one is summarised and written. The progress bar's "compiling" note stays until the first chunk of a shape
    returns."""
    configs, ids, finished, settings = job.configs, job.ids, job.finished, job.settings
    pred_cache: dict = {}
    compiled: set = set()
    pending = None  # (indices, dispatched parts, t0, first of its shape)
    for k in range(len(job.chunks) + 1):
        nxt = None
        if k < len(job.chunks):
            key, idx, size = job.chunks[k]
            first = (key, size) not in compiled
            if first:  # the first call of a shape compiles
                c = configs[idx[0]]
                bar.note(f"compiling K={c['num_classes']} widths={tuple(c['widths'])} {c['method']} batch {size}")
                compiled.add((key, size))
            parts = dispatch([configs[i] for i in idx], size, job.devices, settings["engine"])
            nxt = (idx, parts, time.perf_counter(), first)
        if pending is not None:
            idx, parts, t0, was_first = pending
            host = to_host(parts, len(idx))
            if was_first:
                bar.note("")
            wall = (time.perf_counter() - t0) / len(idx)
            todo = np.asarray([j for j, i in enumerate(idx) if not finished[i]], int)  # finished runs: not again
            host = jax.tree_util.tree_map(lambda a, todo=todo: a[todo], host)
            sel = [idx[j] for j in todo]
            commit(summarise([configs[i] for i in sel], sel, [ids[i] for i in sel], host, settings, pred_cache, wall))
        pending = nxt


def _run_on_client(client, configs, ids, chunks, finished, settings, commit) -> None:
    """On a Dask cluster: one task per chunk; records are committed here, in completion order. On any exception
    (Ctrl-C included) the tasks still pending are cancelled."""
    from distributed import as_completed

    token = secrets.token_hex(4)  # task keys unique per call: a chunk's `keep` mask differs between calls
    futures = []
    for k, (_, idx, size) in enumerate(chunks):
        futures.append(
            client.submit(
                solve_chunk,
                [configs[i] for i in idx],
                list(idx),
                [ids[i] for i in idx],
                size,
                [not finished[i] for i in idx],
                settings,
                pure=False,
                key=f"ufm-sweep-chunk-{k}-{token}",
            )
        )
    try:
        for fut in as_completed(futures):
            commit(fut.result())
    finally:
        client.cancel(futures)


def load_sweep(
    path: str | os.PathLike,
    *,
    columns: bool = False,
    header: bool = False,
    as_frame: bool = False,
    strict: bool = False,
):
    """Load a sweep store written by `sweep` / ``ufm sweep``.

    Returns the run records (a list of dicts, in grid order); with ``columns=True`` a dict of NumPy columns
    (`to_columns`: ``cols["config.lam_H"]``, ``cols["loss"]``, ``cols["ranks.H"]``); with ``as_frame=True`` a
    pandas DataFrame, one row per run (nested fields flattened as ``config.lam_H``, per-layer metrics as one
    column group per layer, ``metrics.features.H_1.nc1``; see `ufm._sweep.columns`; needs pandas). With
    ``header=True`` the result is ``(header, records_or_columns_or_frame)``; the header holds the grid, settings
    and library versions.

    The store is JSON lines: line 1 the header, then one self-contained record per run, appended in one
    write per chunk, each with a checksum of its content. A final line without its newline is a write cut short
    by a killed process and is not a record (the run is redone on resume). A line in the middle that is not
    JSON, not a record, fails its checksum (an edited record, or one copied from another store) or repeats a run
    is skipped with a `StoreIntegrityWarning` naming its line number (ValueError with ``strict=True``); a
    resumed sweep recomputes those runs.

    Example:
      >>> runs = ufm.load_sweep("sweep.jsonl")                  # doctest: +SKIP
      >>> df = ufm.load_sweep("sweep.jsonl", as_frame=True)     # doctest: +SKIP
      >>> df.groupby("config.lam_H")["gap"].median()            # doctest: +SKIP
    """
    if columns and as_frame:
        raise ValueError("columns=True and as_frame=True are exclusive; choose one")
    path = os.fspath(path)
    contents = read_store(path)
    report_bad(path, contents.bad, strict)
    recs = sorted(contents.records, key=lambda r: r["index"])
    out = to_frame(recs) if as_frame else to_columns(recs) if columns else recs
    return (contents.header, out) if header else out


def rerun(record: Mapping) -> tuple[UFM, Solution]:
    """Re-solve one stored run with `ufm.solve` (same problem, solver options and key ``jax.random.key(seed)``)
    to get its parameters, which the store does not keep.

    Args:
      record: a record of `ufm.load_sweep` / `SweepResult.records`, or its ``config``.

    Returns:
      ``(problem, solution)``; the solution equals the sweep's run to round-off (the batched and the single
      solve may order sums differently).

    Example:
      >>> problem, sol = ufm.rerun(ufm.load_sweep("sweep.jsonl")[17])   # doctest: +SKIP
    """
    if not isinstance(record, Mapping):
        raise TypeError(f"record must be a sweep record (a dict) or its config; got {type(record).__name__}")
    c = record["config"] if "config" in record else record
    problem = problem_of(c)
    sol = solve(
        problem,
        key=int(c["seed"]),
        method=c["method"],
        lr=c["lr"],
        max_steps=c["max_steps"],
        tol=c["tol"],
        init_scale=c["init_scale"],
        dtype=c["dtype"],
        patience=c["patience"],
        history=False,
    )
    return problem, sol


def iter_fields(records: Iterable[Mapping], field: str) -> list:
    """The value of ``field`` in each record: a config field (``lam_H``, ``num_classes``), the derived ``L``
    (depth, len(widths)) and ``width`` (d_1 when all widths are equal, else the widths tuple), or a dotted path
    into the record (``ranks.out``, ``prediction.loss``, ``metrics.nc1``)."""
    out: list[Any] = []
    for r in records:
        c = r.get("config", {})
        if field == "L":
            out.append(len(c["widths"]))
        elif field == "width":
            w = c["widths"]
            out.append(w[0] if len(set(w)) == 1 else tuple(w))
        elif field in c:
            x = c[field]
            out.append(tuple(x) if isinstance(x, list) else x)
        else:
            v: Any = r
            for part in field.split("."):
                v = v.get(part) if isinstance(v, Mapping) else None
            out.append(tuple(v) if isinstance(v, list) else v)
    return out


def as_records(source) -> list:
    """Records from a store path, a `SweepResult`, a pandas DataFrame of `load_sweep(..., as_frame=True)` or a
    list of records."""
    if isinstance(source, (str, os.PathLike)):
        return load_sweep(source)
    if isinstance(source, SweepResult):
        return list(source.records)
    if hasattr(source, "to_dict") and hasattr(source, "columns") and hasattr(source, "iloc"):
        return frame_records(source)
    if isinstance(source, Sequence):
        return list(source)
    raise TypeError(
        "expected a store path, a SweepResult, a DataFrame of load_sweep(..., as_frame=True) or a "
        f"list of run records; got {type(source).__name__}"
    )
