"""The command line ``ufm sweep CONFIG``: a TOML/JSON config in, a resumable store out, in this process or on a
Dask cluster (``--workers N`` for a local one, ``--scheduler ADDRESS`` for a running one)."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Sequence

import jax

from .._solver import ENGINES
from .driver import prepare_sweep
from .store import read_store


class UsageError(Exception):
    """A user's mistake on the command line or in the config: one line on stderr, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


def _load_config(path: str) -> dict:
    if not os.path.isfile(path):
        raise UsageError(f"config file {path!r} not found")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        if path.endswith(".toml"):
            import tomllib

            cfg = tomllib.loads(raw.decode())
        else:
            cfg = json.loads(raw)
    except Exception as e:
        kind = "TOML" if path.endswith(".toml") else "JSON"
        raise UsageError(f"config file {path!r} is not valid {kind}: {e}") from None
    if not isinstance(cfg, dict) or "grid" not in cfg:
        raise UsageError(f"config file {path!r} must be a table with a 'grid' entry (a table or a list of tables)")
    allowed = {
        "grid",
        "store",
        "chunk_size",
        "second_order",
        "check_options",
        "metrics",
        "rank_rtol",
        "rank_atol",
        "x64",
        "devices",
        "engine",
    }
    unknown = sorted(set(cfg) - allowed)
    if unknown:
        raise UsageError(f"config file {path!r} has unknown entries {unknown}; allowed: {sorted(allowed)}")
    return cfg


_EPILOG = """config file (TOML or JSON):
  store = "phase.jsonl"          # default: CONFIG with .jsonl, next to CONFIG
  chunk_size = 64                # runs per ufm.solve_batch call (per Dask task)
  engine = "auto"                # ufm.solve_batch's engine: auto, map, slots or vmap
  [grid]                         # a list = a swept field; the runs are the product
  K = 2
  n = 5
  width = 8                      # widths = (width,) * L
  L = [2, 3]
  activation = "relu"
  lam = {logspace = [-3, -1.5, 4]}   # lam_H = lam_W = 10**linspace(-3, -1.5, 4)
  seeds = 4                      # seeds 0..3
  max_steps = 2000
other entries: second_order, check_options (a table for ufm.check), metrics, rank_rtol, rank_atol, devices,
x64 (default true)

on a cluster: --workers N starts a local Dask cluster of N worker processes; --scheduler ADDRESS uses a running
one (e.g. started by dask-jobqueue on SLURM). Needs pip install 'ufm[distributed]'."""


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="ufm sweep",
        description="Run a grid of UFM solves into a resumable JSON-lines store. Run the same command again to "
        "resume after an interruption (finished runs are skipped).",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("config", help="JSON or TOML file with a 'grid' table")
    parser.add_argument("--store", help="store path (overrides the config's 'store')")
    parser.add_argument("--chunk-size", type=int, help="runs per ufm.solve_batch call")
    parser.add_argument(
        "--engine",
        choices=ENGINES,
        help="ufm.solve_batch's engine (default auto: map on a CPU, lockstep for L-BFGS on an accelerator)",
    )
    parser.add_argument("--devices", type=int, help="use the first N of jax.devices()")
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--workers", type=int, metavar="N", help="run the chunks on a local Dask cluster of N worker processes"
    )
    where.add_argument(
        "--scheduler", metavar="ADDRESS", help="run the chunks on a running Dask cluster (e.g. tcp://host:8786)"
    )
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar on stderr (tqdm; default: when stderr is a terminal)",
    )
    parser.add_argument(
        "--second-order",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="ufm.check's second-order (Hessian) certificate in every record (default: on; --no-second-order: off)",
    )
    parser.add_argument("--compile-cache", help="persistent JAX compilation cache folder (faster restarts)")
    return parser


def _store_path(args, cfg: dict) -> str:
    store = args.store or cfg.get("store") or os.path.splitext(os.path.basename(args.config))[0] + ".jsonl"
    if not isinstance(store, str):
        raise UsageError(f"config entry 'store' must be a path string; got {store!r}")
    if not args.store:
        store = os.path.join(os.path.dirname(os.path.abspath(args.config)), store)
    return store


def _options(args, cfg: dict) -> dict:
    devices = args.devices if args.devices is not None else cfg.get("devices")
    if devices is not None and (not isinstance(devices, int) or isinstance(devices, bool) or devices < 1):
        raise UsageError(
            f"config entry 'devices' must be a number of devices >= 1 (the first N of jax.devices()); got {devices!r}"
        )
    kw = dict(
        chunk_size=args.chunk_size if args.chunk_size is not None else cfg.get("chunk_size", 64),
        devices=devices,
        engine=args.engine if args.engine is not None else cfg.get("engine", "auto"),
        progress=args.progress,
        second_order=bool(args.second_order) if args.second_order is not None else cfg.get("second_order", True),
        rank_rtol=cfg.get("rank_rtol", 1e-4),
        metrics=cfg.get("metrics", True),
        check_options=cfg.get("check_options"),
        rank_atol=cfg.get("rank_atol", 1e-8),
    )
    for name in ("second_order", "metrics"):
        if not isinstance(kw[name], bool):
            raise UsageError(f"config entry {name!r} must be true or false; got {kw[name]!r}")
    if args.workers is not None and args.workers < 1:
        raise UsageError(f"--workers must be >= 1; got {args.workers}")
    if (args.workers is not None or args.scheduler) and devices is not None:
        raise UsageError("--devices does not apply with --workers/--scheduler (one device per Dask worker)")
    return kw


@contextlib.contextmanager
def dask_client(workers: int | None, scheduler: str | None):
    """A `dask.distributed.Client`: of a new local cluster of ``workers`` processes (one thread each), of the
    running cluster at ``scheduler``, or None when neither is given."""
    if workers is None and not scheduler:
        yield None
        return
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        raise UsageError("--workers/--scheduler need Dask: pip install 'ufm[distributed]'") from None
    if scheduler:
        try:
            client = Client(scheduler, timeout="20s")
        except OSError as e:
            raise UsageError(f"cannot reach the Dask scheduler at {scheduler!r}: {e}") from None
        with client:
            yield client
        return
    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        with Client(cluster) as client:
            yield client


def sweep_main(argv: Sequence[str] | None = None) -> int:
    """``ufm sweep CONFIG [--store PATH] [--chunk-size N] [--engine E] [--devices N | --workers N | --scheduler A]
    [--progress/--no-progress] [--second-order/--no-second-order] [--compile-cache DIR]``.

    CONFIG is a JSON or TOML file with ``grid`` (a table of field -> value(s), or a list of tables) and optional
    ``store`` (default: CONFIG with the extension ``.jsonl``; relative paths are relative to CONFIG's folder),
    ``chunk_size``, ``engine``, ``second_order``, ``check_options``, ``metrics``, ``rank_rtol``, ``rank_atol``,
    ``devices``, ``x64`` (default true: float64). Run the same command again to resume an interrupted sweep; when
    the store holds every run, ``--workers``/``--scheduler`` start or reach no cluster.

    Returns 0 on success, 2 for bad input or an unusable store (one line on stderr, no traceback), 130 when
    interrupted (finished runs are saved).
    """
    store = None
    try:
        args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
        cfg = _load_config(args.config)
        x64 = cfg.get("x64", True)
        if not isinstance(x64, bool):
            raise UsageError(f"config entry 'x64' must be true or false; got {x64!r}")
        store = _store_path(args, cfg)
        kw = _options(args, cfg)
        jax.config.update("jax_enable_x64", x64)
        if args.compile_cache:
            jax.config.update("jax_compilation_cache_dir", args.compile_cache)
            jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        on_cluster = args.workers is not None or bool(args.scheduler)
        with prepare_sweep(cfg["grid"], store, on_cluster=on_cluster, **kw) as job:
            # a cluster is started (or reached) only when some run is not in the store yet
            with dask_client(args.workers, args.scheduler) if job.chunks else contextlib.nullcontext() as client:
                res = job.run(client)
    except SystemExit as e:  # --help
        return int(e.code or 0) if not isinstance(e.code, str) else 2
    except KeyboardInterrupt:
        n = _count_records(store) if store else 0
        print(
            f"ufm sweep: interrupted; {n} finished runs are saved in {store}; run the same command to resume",
            file=sys.stderr,
        )
        return 130
    except (UsageError, ValueError, TypeError, ImportError, OSError) as e:
        print(f"ufm sweep: error: {e}", file=sys.stderr)
        return 2
    verdicts: dict[str, int] = {}
    for r in res.records:
        v = r.get("verdict") or r.get("status")
        verdicts[str(v)] = verdicts.get(str(v), 0) + 1
    summary = ", ".join(f"{k} {v}" for k, v in sorted(verdicts.items()))
    where = f"{res.num_devices} device(s)" if not (args.workers or args.scheduler) else "a Dask cluster"
    try:
        print(
            f"ufm sweep: {res.num_runs} runs ({res.num_new} new, {res.num_skipped} already saved) on {where} "
            f"in {res.path}: {summary}",
            flush=True,
        )
    except BrokenPipeError:  # `ufm sweep ... | head`: the reader left; the store is complete
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        print(
            "ufm sweep: error: stdout closed (broken pipe); the sweep finished and its store is complete",
            file=sys.stderr,
        )
        return 2
    return 0


def _count_records(store: str) -> int:
    try:
        return len(read_store(store).records)
    except Exception:
        return 0
