"""`ufm.sweep(..., client=...)` and ``ufm sweep --workers/--scheduler`` on a Dask cluster.

Budget: one LocalCluster of 2 worker processes (1 thread each) shared by the module; one tiny grid (GD with tol=0,
so every run takes exactly max_steps steps and a chunk lasts long enough to be interrupted); workers load the
compiled programs from the test session's persistent compilation cache (tests/conftest.py) when they can.

The claims are exact up to round-off: a Dask task solves the same chunk (same rows, padding and batch size, so the
same compiled program on the same inputs) as the in-process sweep, with the key jax.random.key(seed) per run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

import ufm

distributed = pytest.importorskip("distributed")

pytestmark = pytest.mark.filterwarnings(
    "ignore::DeprecationWarning", "ignore::ResourceWarning", "ignore::UserWarning:distributed"
)

# The shape, solver and chunk size of tests/test_sweep.py's REF grid (so the in-process reference and the workers
# reuse its compiled programs, from memory or the persistent cache); 3 lambdas x 2 lr x 2 seeds = 12 runs in
# 3 chunks of 4.
GRID = {
    "K": 3,
    "n": 2,
    "widths": [4, 4],
    "activation": "relu",
    "lam": [1e-3, 3e-3, 1e-2],
    "method": "gd",
    "lr": [0.05, 0.1],
    "max_steps": 20000,
    "tol": 0.0,
    "seeds": 2,
}
CHUNK = 4
RUNNER = [sys.executable, "-c", "import sys; from ufm._sweep import sweep_main; sys.exit(sweep_main(sys.argv[1:]))"]


def _strip(recs):
    return {r["run"]: {k: v for k, v in r.items() if k not in ("wall_s", "sha256")} for r in recs}


def _assert_close(a, b, path="record"):
    """Nested equality; floats to 1e-10 relative plus 1e-14 absolute (for quantities that are round-off around
    zero, such as sigma_min of a rank-deficient matrix). The programs and inputs are the same, so the measured
    difference is 0; the tolerance only allows another XLA thread split of a reduction."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), path
        for k in a:
            _assert_close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_close(x, y, f"{path}[{i}]")
    elif isinstance(a, float) or isinstance(b, float):
        assert abs(a - b) <= 1e-14 + 1e-10 * abs(b), (path, a, b)
    else:
        assert a == b, (path, a, b)


@pytest.fixture(scope="module")
def cluster():
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as lc:
        with distributed.Client(lc) as client:
            yield lc, client


@pytest.fixture(scope="module")
def ref():
    return ufm.sweep(GRID, chunk_size=CHUNK)  # in process


def _lines(path):
    try:
        with open(path, "rb") as f:
            return f.read().count(b"\n")
    except FileNotFoundError:
        return 0


def test_local_cluster_gives_the_in_process_records(cluster, ref, tmp_path, monkeypatch):
    _, client = cluster
    store = tmp_path / "d.jsonl"
    with distributed.get_task_stream(client) as ts:
        res = ufm.sweep(GRID, store, chunk_size=CHUNK, client=client)
    assert (res.num_runs, res.num_new, res.num_chunks) == (12, 12, 3)
    # the chunks ran as tasks on the cluster's worker processes, not in this process
    ran_on = {t["worker"] for t in ts.data}
    assert len(ts.data) >= 3 and ran_on and ran_on <= set(client.scheduler_info()["workers"])
    a, b = _strip(ufm.load_sweep(store)), _strip(ref.records)
    assert a.keys() == b.keys()
    for rid in b:
        assert a[rid]["loss"] == pytest.approx(b[rid]["loss"], rel=1e-10, abs=0)
        _assert_close(a[rid], b[rid], rid)
    # a store written through Dask resumes in process (and vice versa): same fingerprint, nothing to do
    again = ufm.sweep(GRID, store, chunk_size=CHUNK)
    assert (again.num_new, again.num_skipped) == (0, 12)
    # every run is in the store: the client is given no task
    with distributed.get_task_stream(client) as ts2:
        done = ufm.sweep(GRID, store, chunk_size=CHUNK, client=client)
    assert (done.num_new, done.num_skipped, done.num_chunks) == (0, 12, 0) and ts2.data == []
    # and `ufm sweep --workers 2` starts no cluster (one that tried would fail here)
    from ufm._sweep import sweep_main

    def no_cluster(*a, **kw):
        raise AssertionError("a LocalCluster was started although every run is in the store")

    monkeypatch.setattr(distributed, "LocalCluster", no_cluster)
    cfg = tmp_path / "d.json"
    cfg.write_text(json.dumps({"grid": GRID, "chunk_size": CHUNK}))
    assert sweep_main([str(cfg), "--workers", "2", "--no-progress"]) == 0


def test_a_killed_worker_chunk_is_recomputed(cluster, ref, tmp_path):
    _, client = cluster
    store = tmp_path / "k.jsonl"
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("res", ufm.sweep(GRID, store, chunk_size=CHUNK, client=client)))
    t.start()
    killed = None
    t0 = time.monotonic()
    while killed is None and time.monotonic() - t0 < 120 and t.is_alive():
        busy = [w for w, tasks in client.processing().items() if tasks]
        if busy and _lines(store) >= 2:  # a record is in: the workers are warm and busy with later chunks
            pid = client.run(os.getpid, workers=[busy[0]])[busy[0]]
            os.kill(pid, signal.SIGKILL)  # the worker dies inside a chunk; its nanny starts a new one
            killed = pid
        time.sleep(0.005)
    t.join(timeout=300)
    assert killed is not None and not t.is_alive()
    assert killed not in client.run(os.getpid).values()  # that process is gone
    res = out["res"]
    assert res.num_new == 12
    recs = ufm.load_sweep(store)
    assert len(recs) == len({r["run"] for r in recs}) == 12  # none lost, none duplicated
    assert _strip(recs).keys() == _strip(ref.records).keys()
    for rid, r in _strip(ref.records).items():
        _assert_close(_strip(recs)[rid], r, rid)


@pytest.mark.slow  # ~15 s; the SIGINT resume (test_sweep.py) and the killed-worker test cover the default suite
def test_client_killed_then_resumed(cluster, ref, tmp_path):
    # `ufm sweep --scheduler ADDRESS` (this module's cluster) in a subprocess, SIGKILLed after its first record
    lc, client = cluster
    cfg = tmp_path / "g.json"
    cfg.write_text(json.dumps({"grid": GRID, "chunk_size": CHUNK}))
    store = tmp_path / "c.jsonl"
    proc = subprocess.Popen(
        RUNNER + [str(cfg), "--store", str(store), "--scheduler", lc.scheduler_address],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    t0 = time.monotonic()
    while time.monotonic() - t0 < 180 and proc.poll() is None and _lines(store) < 2:
        time.sleep(0.005)
    proc.kill()
    _, err = proc.communicate(timeout=60)
    n = len(ufm.load_sweep(store))
    assert 0 < n < 12, (n, err.decode()[-2000:])
    # the client's death cancels its tasks; resuming (here through the same cluster) completes the store
    res = ufm.sweep(GRID, store, chunk_size=CHUNK, client=client)
    assert (res.num_skipped, res.num_new) == (n, 12 - n)
    recs = ufm.load_sweep(store)
    assert len(recs) == len({r["run"] for r in recs}) == 12
    for rid, r in _strip(ref.records).items():
        _assert_close(_strip(recs)[rid], r, rid)


def test_cli_workers_and_bad_cluster_options(tmp_path, capsys):
    from ufm._sweep import sweep_main

    cfg = tmp_path / "g.json"
    cfg.write_text(json.dumps({"grid": GRID, "chunk_size": CHUNK}))
    assert sweep_main([str(cfg), "--workers", "0"]) == 2
    assert sweep_main([str(cfg), "--workers", "2", "--scheduler", "tcp://x:1"]) == 2
    assert sweep_main([str(cfg), "--workers", "2", "--devices", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("ufm sweep: error:") for line in err)
    assert "--workers must be >= 1" in err[0] and "not allowed with argument" in err[1]
    assert not (tmp_path / "g.jsonl").exists()


def test_a_worker_solves_on_its_own_thread_count(cluster):
    # in process a chunk uses solve_batch's default host threads (the CPU's cores shared among the devices); on a
    # Dask worker the worker's own thread count, so 2 single-threaded workers on 2 cores do not run 4 threads
    from ufm._batch import default_threads
    from ufm._sweep.runner import chunk_threads

    _, client = cluster
    assert client.submit(chunk_threads, 1, pure=False).result() == 1
    assert chunk_threads(1) == default_threads()
    assert chunk_threads(2 * default_threads()) == 1
