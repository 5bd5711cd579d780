"""Tests of `ufm.sweep`, the sweep store, `ufm sweep` (sweep_main) and the phase-diagram tables.

Budget: one compiled sweep group shared by most tests (REF: 48 runs of a tiny deep ReLU UFM, plain gradient
descent with tol=0 so every run takes exactly max_steps steps), one extra group for the two-shape test, one
single-solve compile for the loop comparison, and three subprocesses (SIGINT, SIGKILL, 2 forced host devices)
that share a persistent compilation cache.

Resume claims are exact (bit-for-bit): every run uses the key jax.random.key(seed) and the chunk layout is fixed
by the grid, so a resumed chunk runs the same compiled program on the same inputs. Only ``wall_s`` (timing) is
excluded from those comparisons. A batched run and its single solve agree to round-off (1e-12 relative).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

import ufm
from ufm import _sweep as S
from ufm import sweep_plots as SP
from ufm._json import to_jsonable

# 3 lambdas x 2 learning rates x 8 seeds = 48 runs; chunk_size 4 -> 12 chunks of one compiled group.
REF = {
    "K": 3,
    "n": 2,
    "widths": [4, 4],
    "activation": "relu",
    "lam": [1e-3, 3e-3, 1e-2],
    "method": "gd",
    "lr": [0.05, 0.1],
    "max_steps": 20000,
    "tol": 0.0,
    "seeds": 8,
}
CHUNK = 4
RUNNER = [sys.executable, "-c", "import sys; from ufm._sweep import sweep_main; sys.exit(sweep_main(sys.argv[1:]))"]


def _strip(recs):
    """Records without the timing field (the only non-deterministic one) and the checksum (salted by the store's
    random id), keyed by run id."""
    return {r["run"]: {k: v for k, v in r.items() if k not in ("wall_s", "sha256")} for r in recs}


def _assert_close(a, b, path="metrics"):
    """Nested equality, numbers to |a - b| <= 1e-12 + 1e-9 |b|: the parameters agree to round-off (see the loss
    test), and quantities that are 0 in exact arithmetic (e.g. sigma_min / sigma_max of a rank-deficient matrix)
    are pure round-off of order 1e-17, so they need the absolute part."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), path
        for k in a:
            _assert_close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_close(x, y, f"{path}[{i}]")
    elif isinstance(a, float) or isinstance(b, float):
        assert abs(a - b) <= 1e-12 + 1e-9 * abs(b), (path, a, b)
    else:
        assert a == b, (path, a, b)


def _raw_lines(path):
    with open(path, "rb") as f:
        return f.read().split(b"\n")


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    d = tmp_path_factory.mktemp("sweep_ref")
    store = str(d / "ref.jsonl")
    res = ufm.sweep(REF, store, chunk_size=CHUNK)
    cfg = d / "ref.json"
    cfg.write_text(json.dumps({"grid": REF, "chunk_size": CHUNK}))
    return {"dir": d, "store": store, "config": str(cfg), "res": res, "cache": str(d / "jax_cache")}


# ---------------------------------------------------------------------------------------------------------------
# grids: expansion and bad input (no compile)


def test_expand_grid_product_order_aliases_and_defaults():
    runs = S.expand_grid({"K": [2, 3], "n": 2, "width": 5, "L": [1, 2], "lam": {"logspace": [-3, -1, 3]}, "seeds": 2})
    assert len(runs) == 2 * 2 * 3 * 2
    # the last-listed field varies fastest; aliases and shorthands are resolved into the canonical fields
    assert [r["seed"] for r in runs[:4]] == [0, 1, 0, 1]
    assert runs[0]["num_classes"] == 2 and runs[-1]["num_classes"] == 3
    assert runs[0]["widths"] == [5] and runs[6]["widths"] == [5, 5]
    np.testing.assert_allclose(sorted({r["lam_H"] for r in runs}), [1e-3, 1e-2, 1e-1], rtol=1e-15)
    assert all(r["lam_H"] == r["lam_W"] for r in runs)
    # unset fields take the UFM / solve defaults (resolved, so the record is self-describing)
    r = runs[0]
    assert (r["activation"], r["loss"], r["bias"], r["method"]) == ("linear", "mse", "none", "lbfgs")
    assert r["dtype"] == "float64" and r["tol"] == 0.0 and r["max_steps"] == 10_000 and r["lr"] == 1.0
    # widths: a flat list is ONE tuple, a list of lists sweeps; lam_W list of lists = per-layer values
    assert [r["widths"] for r in S.expand_grid({"K": 2, "n": 1, "widths": [3, 4]})] == [[3, 4]]
    assert len(S.expand_grid({"K": 2, "n": 1, "widths": [[3], [3, 4]]})) == 2
    per_layer = S.expand_grid({"K": 2, "n": 1, "widths": [3, 3], "lam_W": [[1e-3, 2e-3], [1e-2, 2e-2]]})
    assert [r["lam_W"] for r in per_layer] == [[1e-3, 2e-3], [1e-2, 2e-2]]
    # a list of grids is a union; duplicate configs run once; run ids are stable and distinct
    u = S.expand_grid([{"K": 2, "n": 1, "widths": 3, "seed": [0, 1]}, {"K": 2, "n": 1, "widths": 3, "seed": [1, 2]}])
    assert [r["seed"] for r in u] == [0, 1, 2]
    assert len({S.run_id(r) for r in u}) == 3


def test_expand_grid_init_scale_is_solves_auto_rule():
    # an unset init_scale is what ufm.solve's init_scale="auto" gives the same problem: the depth rule and the
    # zero-basin rule with this run's class sizes and lambdas (ufm._options.auto_init_scale, derived and measured
    # there); checked on the three regimes of that rule: the basin edge (imbalanced, large lambda), the depth rule
    # (deep linear, Dang et al.'s setting) and a ReLU model (1.0)
    from ufm._options import auto_init_scale

    grids = [
        {"K": 3, "n": [[3, 2, 1]], "widths": [4, 4], "lam": 0.1},
        {"K": 4, "n": 100, "width": 64, "L": 6, "lam": 5e-4},
        {"K": 2, "n": 50, "width": 64, "L": 3, "activation": "relu", "lam": 5e-3},
        {"K": 3, "n": 4, "widths": [5, 5], "loss": "ce", "label_smoothing": 0.1, "lam_H": 0.3, "lam_W": [[0.2, 0.1]]},
    ]
    scales = []
    for g in grids:
        (r,) = S.expand_grid(g)
        p = S.problem_of(r)  # the run's ufm.UFM, as the sweep builds it
        assert r["init_scale"] == pytest.approx(float(auto_init_scale(p)), rel=1e-12)
        scales.append(r["init_scale"])
    assert scales[0] > 0.2 and scales[2] == 1.0  # not the depth rule's 0.2 (every start at the zero saddle there)


@pytest.mark.parametrize(
    "grid, needle",
    [
        ({"K": 2, "n": 2, "widths": 3, "lam_H": [1e-3, -1.0]}, "'lam_H' has an invalid value -1.0"),
        ({"K": 1, "n": 2, "widths": 3}, "'num_classes' has an invalid value 1"),
        ({"K": 2, "n": 2, "widths": 3, "method": "sgd"}, "'method' has an invalid value 'sgd'"),
        ({"K": 2, "n": 2, "widths": [3, 0]}, "'widths' has an invalid value (3, 0)"),
        ({"K": 2, "n": 2, "widths": 3, "seeds": -2}, "'seeds' has an invalid value -2"),
        ({"K": 2, "n": 2, "widths": 3, "lr": [0.1, float("nan")]}, "'lr' has an invalid value nan"),
        ({"K": 2, "n": 2, "widths": 3, "lamda": 1.0}, "unknown grid field(s) ['lamda']"),
        ({"K": 2, "n": 2, "widths": [3, 3], "lam_W": [[1e-3, 1e-3, 1e-3]]}, "per-layer lam_W needs L=2"),
        ({"K": 2, "n": 2, "widths": 3, "bias": "reg", "lam_b": 0.0}, "bias='reg' needs lam_b > 0"),
        ({"K": 2, "n": 2, "widths": 3, "num_classes": 3}, "sets both 'K' and 'num_classes'"),
        ({"K": 2, "n": 2, "width": 3}, "'width' needs 'L'"),
    ],
)
def test_bad_grid_names_field_and_value_before_running(grid, needle, tmp_path):
    store = tmp_path / "s.jsonl"
    with pytest.raises(ValueError) as e:
        ufm.sweep(grid, store)
    assert needle in str(e.value)
    assert not store.exists()  # nothing ran, nothing written


def test_bad_sweep_options_raise_before_running(tmp_path):
    g = {"K": 2, "n": 2, "widths": 3}
    store = tmp_path / "s.jsonl"
    with pytest.raises(ValueError, match="chunk_size must be an integer >= 1; got 0"):
        ufm.sweep(g, store, chunk_size=0)
    with pytest.raises(ValueError, match="rank_rtol must be a finite number >= 0"):
        ufm.sweep(g, store, rank_rtol=-1.0)
    with pytest.raises(TypeError, match="second_order must be True or False"):
        ufm.sweep(g, store, second_order="yes")
    with pytest.raises(ValueError, match=r"check_options has unknown option\(s\) \['gap_tolerance'\]"):
        ufm.sweep(g, store, check_options={"gap_tolerance": 1e-3})
    with pytest.raises(ValueError, match=r"check_options\['gap_tol'\] must be None or a finite number >= 0; got -1"):
        ufm.sweep(g, store, check_options={"gap_tol": -1})
    with pytest.raises(TypeError, match="devices must be None, a number of devices or a list"):
        ufm.sweep(g, store, devices="cpu")
    with pytest.raises(TypeError, match="client must be a dask.distributed.Client"):
        ufm.sweep(g, store, client="tcp://localhost:8786")
    with pytest.raises(ValueError, match="devices must be between 1 and"):
        ufm.sweep(g, store, devices=10_000)
    with pytest.raises(ValueError, match=r"engine must be one of \('auto', 'lockstep', 'map', 'slots', 'vmap'\)"):
        ufm.sweep(g, store, engine="fast")
    assert not store.exists()


def test_plan_groups_shapes_and_pads_to_fixed_chunks():
    runs = S.expand_grid([{"K": 2, "n": 1, "widths": 3, "seeds": 10}, {"K": 3, "n": 1, "widths": 3, "seeds": 3}])
    chunks = S.plan(runs, chunk_size=4, ndev=1)
    # group K=2 (10 runs): 4 + 4 + 2 (padded to 4); group K=3 (3 runs < chunk): next power of two, 4
    assert [(len(i), b) for _, i, b in chunks] == [(4, 4), (4, 4), (2, 4), (3, 4)]
    assert [i for _, i, _ in chunks][3] == [10, 11, 12]
    # with 8 devices every batch is a multiple of 8
    assert {b for *_, b in S.plan(runs, chunk_size=4, ndev=8)} == {8}
    # numbers never split a group; shapes and static solver options do
    mixed = S.expand_grid({"K": 2, "n": 1, "widths": 3, "lam_H": [1e-3, 1e-2], "lr": [0.5, 1.0], "seeds": 2})
    assert len({k for k, _, _ in S.plan(mixed, 64)}) == 1
    steps = S.expand_grid({"K": 2, "n": 1, "widths": 3, "max_steps": [10, 20]})
    assert len({k for k, _, _ in S.plan(steps, 64)}) == 2


# ---------------------------------------------------------------------------------------------------------------
# the compiled sweep


def test_sweep_equals_loop_of_single_solves(ref):
    recs = ref["res"].records
    assert len(recs) == 48 and ref["res"].num_new == 48 and ref["res"].num_chunks == 12
    # the first chunk through the public ufm.solve_batch (default engine, as the sweep's): the same compiled
    # program on the same inputs, so the same numbers, and every run keeps its own status and step count
    cs = [r["config"] for r in recs[:CHUNK]]
    p0 = ufm.UFM(num_classes=3, n_per_class=2, widths=(4, 4), activation="relu")
    sols = ufm.solve_batch(
        p0,
        seeds=[c["seed"] for c in cs],
        lam_H=np.asarray([c["lam_H"] for c in cs]),
        lam_W=np.asarray([c["lam_W"] for c in cs]),
        lr=np.asarray([c["lr"] for c in cs]),
        method="gd",
        max_steps=20000,
        tol=0.0,
        history=False,
    )
    for j, rec in enumerate(recs[:CHUNK]):
        assert rec["loss"] == pytest.approx(float(sols.value[j]), rel=1e-12, abs=0)
        assert (rec["num_steps"], rec["status"]) == (int(sols.num_steps[j]), sols.status_name[j])
    # rerun() re-solves a stored run from its record alone
    _, again = ufm.rerun(recs[1])
    assert recs[1]["loss"] == pytest.approx(float(again.value), rel=1e-12, abs=0)
    # 8 of the 48 runs, covering every lambda and lr, several seeds (a single solve is ~0.1 s per run here)
    for rec in recs[::6]:
        c = rec["config"]
        p = ufm.UFM(num_classes=3, n_per_class=2, widths=(4, 4), activation="relu", lam_H=c["lam_H"], lam_W=c["lam_W"])
        sol = ufm.solve(
            p, key=jax.random.key(c["seed"]), method="gd", lr=c["lr"], max_steps=20000, tol=0.0, history=False
        )
        # equal to round-off: the batched and the single solve run the same iteration, but XLA's batched and
        # unbatched matrix products may sum in another order (measured: 1 of these 8 runs differs, by 1 ulp of
        # the loss). GD contracts near the minimum it approaches, so such differences do not grow: 1e-12.
        assert rec["loss"] == pytest.approx(float(sol.value), rel=1e-12, abs=0)
        assert rec["grad_norm"] == pytest.approx(float(sol.grad_norm), rel=1e-9, abs=1e-15)
        # both polish a max_steps run that ends near a ReLU kink (solve_batch as solve), so the statuses agree too
        assert rec["num_steps"] == int(sol.num_steps) == 20000 and rec["status"] == sol.status_name
        # per-layer metrics of the same parameters
        m = ufm.metrics.layer_metrics(p, sol.params, rank_rtol=1e-4)
        _assert_close(json.loads(json.dumps(to_jsonable(m))), rec["metrics"])
        pred = ufm.predict(p)
        assert rec["prediction"]["loss"] == pred.loss
        # gap = (f - f*)/|f*|, here from the single solve's f
        assert rec["gap"] == pytest.approx((float(sol.value) - pred.loss) / abs(pred.loss), rel=1e-9)
        # the check with its Hessian certificate, as the sweep's default (second_order=True)
        report = ufm.check(p, sol, pred, hessian=True, metrics=False)
        assert rec["verdict"] == report.verdict
        assert rec["check"]["gap"] == pytest.approx(report.gap, rel=1e-9)
        assert rec["check"]["second_order"] == report.second_order
        assert not {"prediction", "metrics", "problem"} & set(rec["check"])


def _backend_compiles(fn):
    """(fn(), number of XLA backend compiles during the call), counted by jax.monitoring's compile events."""
    import jax.monitoring

    events: list[str] = []
    listener = lambda name, duration, **kw: events.append(name)
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        out = fn()
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    return out, sum(name == "/jax/core/compile/backend_compile_duration" for name in events)


def test_two_shape_groups_and_no_recompile_when_numbers_change(ref):
    # same shapes and static options, other numbers (lambdas, lr, init_scale, seeds, tol) and another count of
    # runs (6 = a chunk of 4 and a partial chunk padded to 4): nothing compiles (solve_batch's program for
    # batches of 4, predict, check and the metrics are all reused from the REF sweep)
    other = dict(REF, lam=[2e-3], lr=[0.07], init_scale=[0.5, 1.5], seeds=[11, 12, 13], tol=1e-30)
    res, compiles = _backend_compiles(lambda: ufm.sweep(other, chunk_size=CHUNK, metrics=False))
    assert res.num_new == 6 and res.num_chunks == 2
    assert compiles == 0
    # a second shape group (shallow linear, K=2) runs in the same sweep; each run matches its single solve
    two = [
        dict(REF, lam=[2e-3], lr=[0.07], seeds=[5, 6, 7]),
        {"K": 2, "n": 3, "widths": 3, "method": "gd", "max_steps": 300, "seed": [0, 1]},
    ]
    res2 = ufm.sweep(two, chunk_size=CHUNK, metrics=False)
    assert res2.num_chunks == 2 and [r["config"]["num_classes"] for r in res2.records] == [3, 3, 3, 2, 2]
    p2 = ufm.UFM(num_classes=2, n_per_class=3, widths=(3,))
    for rec in res2.records[3:]:
        sol = ufm.solve(p2, key=rec["config"]["seed"], method="gd", max_steps=300, history=False)
        assert rec["loss"] == pytest.approx(float(sol.value), rel=1e-12, abs=0)
        assert rec["num_steps"] == int(sol.num_steps)
        assert rec["status"] == sol.status_name


# The default solver (L-BFGS, default tolerance) on a small deep ReLU UFM: 2 lambdas x 8 seeds in chunks of 8.
LBFGS = {"K": 3, "n": 2, "widths": [4, 4], "activation": "relu", "lam": [1e-3, 1e-2], "seeds": 8}


@pytest.mark.slow  # two L-BFGS compiles (batch, single solve): 33 s cold at load 5 on 2 cores, 90 s at load 12
def test_lbfgs_sweep_records_are_solve_batch_and_nearly_always_single_solves():
    res = ufm.sweep(LBFGS, chunk_size=8, metrics=False)
    recs = res.records
    assert res.num_chunks == 2 and len(recs) == 16
    p = ufm.UFM(num_classes=3, n_per_class=2, widths=(4, 4), activation="relu")
    close = 0
    for chunk in (recs[:8], recs[8:]):
        cs = [r["config"] for r in chunk]
        # the same chunk through the public ufm.solve_batch (its default engine, as the sweep's default): the
        # same program on the same inputs, so the same numbers; every run keeps its own status and step count
        sols = ufm.solve_batch(
            p,
            seeds=[c["seed"] for c in cs],
            lam_H=np.asarray([c["lam_H"] for c in cs]),
            lam_W=np.asarray([c["lam_W"] for c in cs]),
            history=False,
        )
        for j, rec in enumerate(chunk):
            assert rec["loss"] == pytest.approx(float(sols.value[j]), rel=1e-12, abs=0)
            assert rec["grad_norm"] == pytest.approx(float(sols.grad_norm[j]), rel=1e-9, abs=1e-15)
            assert rec["num_steps"] == int(sols.num_steps[j])
            assert rec["status"] == sols.status_name[j]
            # the single solve from the same key: a batched engine may round differently, which on this
            # non-convex landscape can, rarely, end a run at another point; the bar is 90% to 1e-6
            c = rec["config"]
            one = ufm.UFM(
                num_classes=3, n_per_class=2, widths=(4, 4), activation="relu", lam_H=c["lam_H"], lam_W=c["lam_W"]
            )
            sol = ufm.solve(one, key=c["seed"], history=False)
            close += abs(rec["loss"] - float(sol.value)) <= 1e-6 * abs(float(sol.value))
    assert close >= 0.9 * 16, close
    assert len({r["num_steps"] for r in recs}) > 1  # runs stop at their own step counts


def test_second_order_and_engine_reach_check_and_solve_batch(ref, tmp_path, monkeypatch):
    # spies on the names the sweep modules call: they record the keywords and call the real function (the
    # Hessian certificate is then skipped and the default engine used, to keep this test free of compiles)
    seen_check, seen_engine = [], []
    real_check, real_solve_batch = S.records.check, S.runner.solve_batch

    def check_spy(*a, **kw):
        seen_check.append(dict(kw))
        return real_check(*a, **{**kw, "hessian": False})

    def solve_batch_spy(*a, **kw):
        seen_engine.append(kw["engine"])
        return real_solve_batch(*a, **{**kw, "engine": "auto"})

    monkeypatch.setattr(S.records, "check", check_spy)
    monkeypatch.setattr(S.runner, "solve_batch", solve_batch_spy)
    g = dict(REF, lam=[1e-3], lr=[0.1], seeds=4)  # one chunk of the REF program
    ufm.sweep(g, chunk_size=CHUNK, metrics=False, second_order=True, check_options={"gap_tol": 1e-3})
    assert [(kw["hessian"], kw["gap_tol"]) for kw in seen_check] == [(True, 1e-3)] * 4
    assert seen_engine == ["auto"]
    ufm.sweep(g, chunk_size=CHUNK, metrics=False, engine="slots")
    assert [kw["hessian"] for kw in seen_check[4:]] == [True] * 4  # the default: the Hessian certificate too
    ufm.sweep(g, chunk_size=CHUNK, metrics=False, second_order=False, engine="slots")
    assert [kw["hessian"] for kw in seen_check[8:]] == [False] * 4
    assert seen_engine == ["auto", "slots", "slots"]
    # the command line: --second-order and the config's engine
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"grid": g, "chunk_size": CHUNK, "engine": "vmap", "metrics": False}))
    assert S.sweep_main([str(cfg), "--no-second-order", "--no-progress"]) == 0
    assert [kw["hessian"] for kw in seen_check[12:]] == [False] * 4 and seen_engine[-1] == "vmap"
    header, _ = ufm.load_sweep(tmp_path / "c.jsonl", header=True)
    assert header["fingerprint"]["settings"]["engine"] == "vmap"  # a resume with another engine is refused


def test_prepared_sweep_plans_only_what_is_left_and_runs_once(ref):
    # the complete REF store: nothing left to plan, so nothing needs a device or a cluster
    with S.prepare_sweep(REF, ref["store"], chunk_size=CHUNK, on_cluster=True) as job:
        assert job.chunks == [] and job.finished.all()
        res = job.run(None)  # no client needed
        assert (res.num_new, res.num_skipped, res.num_chunks) == (0, 48, 0)
        with pytest.raises(ValueError, match="a PreparedSweep runs once"):
            job.run(None)
    # work left, prepared for a cluster: a client is required (checked before anything runs)
    with S.prepare_sweep(dict(REF, seeds=[99]), None, chunk_size=CHUNK, on_cluster=True) as job:
        assert [len(idx) for _, idx, _ in job.chunks] == [4, 2] and job.devices is None  # 6 runs, chunks of 4
        with pytest.raises(ValueError, match="prepared for a Dask cluster"):
            job.run(None)


def test_records_ranks_match_an_independent_numpy_forward_pass(ref):
    # ranks are recomputed here from a fresh single solve with plain NumPy (class means via boolean masks)
    rec = ref["res"].records[0]
    c = rec["config"]
    p = ufm.UFM(num_classes=3, n_per_class=2, widths=(4, 4), activation="relu", lam_H=c["lam_H"], lam_W=c["lam_W"])
    sol = ufm.solve(p, key=c["seed"], method="gd", lr=c["lr"], max_steps=20000, tol=0.0, history=False)
    H = np.asarray(sol.params.H)
    W1, W2 = (np.asarray(w) for w in sol.params.Ws)
    y = np.repeat(np.arange(3), 2)
    means = lambda A: np.stack([A[:, y == k].mean(axis=1) for k in range(3)], axis=1)

    def rank(A):
        s = np.linalg.svd(A, compute_uv=False)
        return int(np.sum(s > max(1e-4 * s[0], 1e-8)))

    Z2 = W1 @ H
    H2 = np.maximum(Z2, 0)
    assert rec["ranks"] == {
        "H": [rank(means(H)), rank(means(H2))],
        "Z": [rank(means(Z2))],
        "W": [rank(W1), rank(W2)],
        "out": rank(means(W2 @ H2)),
    }


def test_store_roundtrip_columns_and_progress(ref, capsys):
    recs = ufm.load_sweep(ref["store"])
    assert _strip(recs) == _strip(ref["res"].records)
    assert [r["index"] for r in recs] == list(range(48))
    hdr, cols = ufm.load_sweep(ref["store"], columns=True, header=True)
    assert hdr["fingerprint"]["n_runs"] == 48 and hdr["grid"] == json.loads(json.dumps(REF))
    assert cols["loss"].dtype == np.float64 and cols["loss"].shape == (48,)
    np.testing.assert_array_equal(cols["loss"], [r["loss"] for r in recs])
    np.testing.assert_array_equal(cols["config.seed"], [r["config"]["seed"] for r in recs])
    assert cols["ranks.H"].shape == (48, 2) and cols["ranks.H"].dtype == np.int64
    assert cols["status"][0] == "max_steps"
    # a resumed complete sweep skips everything; the bar is drawn only on request
    res = ufm.sweep(REF, ref["store"], chunk_size=CHUNK)
    assert (res.num_new, res.num_skipped, res.num_chunks) == (0, 48, 0)
    assert capsys.readouterr().err == ""  # stderr is not a terminal under pytest: no bar
    res = ufm.sweep(REF, ref["store"], chunk_size=CHUNK, progress=True)
    err = capsys.readouterr().err
    assert "48/48 runs" in err and "runs/s" in err and "left" in err


def test_incompatible_store_is_refused_and_left_untouched(ref, tmp_path):
    before = Path(ref["store"]).read_bytes()
    with pytest.raises(S.IncompatibleStoreError, match="grid differs"):
        ufm.sweep(dict(REF, seeds=9), ref["store"], chunk_size=CHUNK)
    with pytest.raises(S.IncompatibleStoreError, match="setting chunk_size: store 4, this sweep 8"):
        ufm.sweep(REF, ref["store"], chunk_size=8)
    with pytest.raises(S.IncompatibleStoreError, match="setting rank_rtol"):
        ufm.sweep(REF, ref["store"], chunk_size=CHUNK, rank_rtol=1e-3)
    assert Path(ref["store"]).read_bytes() == before
    other = tmp_path / "x.jsonl"
    other.write_text('{"a": 1}\n')
    with pytest.raises(ValueError, match="not a ufm sweep store"):
        ufm.load_sweep(other)
    # the command line refuses with exit code 2 and one line
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"grid": dict(REF, seeds=9), "chunk_size": CHUNK}))
    assert S.sweep_main([str(cfg), "--store", ref["store"]]) == 2
    assert Path(ref["store"]).read_bytes() == before


def test_cli_bad_input_exits_2_with_one_line(tmp_path, capsys):
    cfg = tmp_path / "bad.json"
    cfg.write_text(json.dumps({"grid": {"K": 2, "n": 2, "widths": 3, "lam_H": [-1e-3]}}))
    assert S.sweep_main([str(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'lam_H' has an invalid value -0.001" in err[0]
    assert not (tmp_path / "bad.jsonl").exists()
    toml = tmp_path / "bad.toml"
    toml.write_text('chunk_size = 4\n[grid]\nK = 2\nn = 2\nwidths = 3\nmethod = "newton"\n')
    assert S.sweep_main([str(toml)]) == 2
    assert "'method' has an invalid value 'newton'" in capsys.readouterr().err
    assert S.sweep_main([str(tmp_path / "missing.json")]) == 2
    assert S.sweep_main([str(cfg), "--chunk-size", "x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("ufm sweep: error:") for line in err)


def test_torn_last_line_is_ignored_and_redone(ref, tmp_path):
    # a write cut short (a process killed inside write()) leaves a final line without its newline
    lines = _raw_lines(ref["store"])
    store = tmp_path / "torn.jsonl"
    keep = 1 + 40  # header + 40 complete records (10 chunks); chunk 11's first record is cut in half
    store.write_bytes(b"\n".join(lines[:keep]) + b"\n" + lines[keep][: len(lines[keep]) // 2])
    assert len(ufm.load_sweep(store)) == 40
    res = ufm.sweep(REF, store, chunk_size=CHUNK)
    assert (res.num_new, res.num_skipped) == (8, 40)
    final = ufm.load_sweep(store)
    assert _strip(final) == _strip(ref["res"].records)
    assert all(json.loads(x) for x in _raw_lines(store)[:-1]) and _raw_lines(store)[-1] == b""


# ---------------------------------------------------------------------------------------------------------------
# interruption and devices (subprocesses)


def _env(ref, **extra):
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    env.update(extra)
    return env


def _interrupt(ref, tmp_path, sig, attempts: int = 3):
    """Start the sweep in a subprocess and signal it once its first record is on disk. On a busy machine the
    polling loop can be starved long enough for the whole sweep (12 quick chunks) to finish first: then the
    attempt proves nothing about interruption and is repeated with a fresh store (at most `attempts` times)."""
    for attempt in range(attempts):
        store = tmp_path / f"s{attempt}.jsonl"
        # the subprocess inherits the test session's persistent compilation cache (tests/conftest.py), so it
        # loads the executable the in-process REF sweep compiled
        cmd = RUNNER + [ref["config"], "--store", str(store)]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(ref))
        t0 = time.monotonic()
        while time.monotonic() - t0 < 300:
            if store.exists() and len(_raw_lines(store)) >= 3:  # header + >= 1 record
                break
            if proc.poll() is not None:
                break
            time.sleep(0.005)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=120)
        n = len(ufm.load_sweep(store))
        if n < 48:
            break
    assert 0 < n < 48, (n, err.decode()[-2000:])  # stopped part-way
    return store, proc.returncode, err.decode(), n


def _check_resumed(store, ref, n_before):
    recs = ufm.load_sweep(store)
    ids = [r["run"] for r in recs]
    assert len(ids) == len(set(ids)) == 48  # none lost, none duplicated (load_sweep also refuses duplicates)
    assert _strip(recs) == _strip(ref["res"].records)  # none corrupt: equal, bit for bit, to the uninterrupted run
    raw = _raw_lines(store)
    assert raw[-1] == b"" and len(raw) == 1 + 48 + 1


def test_sigint_then_resume_with_the_same_command(ref, tmp_path, capsys):
    store, rc, err, n = _interrupt(ref, tmp_path, signal.SIGINT)
    assert rc == 130 and "interrupted" in err and "run the same command to resume" in err
    assert S.sweep_main([ref["config"], "--store", str(store)]) == 0
    out = capsys.readouterr().out
    assert f"48 runs ({48 - n} new, {n} already saved)" in out
    _check_resumed(store, ref, n)


@pytest.mark.slow  # ~15 s; test_sigint_then_resume_with_the_same_command covers resume in the default suite
def test_sigkill_then_resume(ref, tmp_path):
    store, rc, _, n = _interrupt(ref, tmp_path, signal.SIGKILL)
    assert rc == -signal.SIGKILL
    res = ufm.sweep(REF, store, chunk_size=CHUNK)
    assert res.num_skipped == n and res.num_new == 48 - n
    _check_resumed(store, ref, n)


def test_split_over_2_host_devices_equals_one_device(ref, tmp_path):
    # 12 of the REF runs (seeds 0, 1) in chunks of 8 on 2 forced host devices: each device solves 4 runs per
    # chunk with its own solve_batch call (compiled for that device), in its own thread
    store = tmp_path / "two.jsonl"
    cfg = tmp_path / "two.json"
    cfg.write_text(json.dumps({"grid": dict(REF, seeds=2), "chunk_size": 8}))
    env = _env(ref, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    out = subprocess.run(
        RUNNER + [str(cfg), "--store", str(store), "--compile-cache", ref["cache"]],
        capture_output=True,
        env=env,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr.decode()[-2000:]
    assert "12 runs (12 new, 0 already saved) on 2 device(s)" in out.stdout.decode()
    assert os.listdir(ref["cache"])  # --compile-cache wrote the executables there
    if jax.default_backend() != "cpu":
        pytest.skip("the one-device reference ran on an accelerator; compared only on CPU")
    # solve_batch's default engine on a CPU ("map") runs each run alone, so a run's numbers do not depend on
    # its chunk-mates or on the device; 1e-12 allows XLA another summation order in another program
    two, one = _strip(ufm.load_sweep(store)), _strip(ref["res"].records)
    assert len(two) == 12 and two.keys() <= one.keys()
    index = {S.run_id(c): i for i, c in enumerate(S.expand_grid(dict(REF, seeds=2)))}
    for rid in two:
        assert two[rid]["loss"] == pytest.approx(one[rid]["loss"], rel=1e-12, abs=0)
        assert two[rid].pop("index") == index[rid]  # the position in its own grid
        _assert_close(two[rid], {k: v for k, v in one[rid].items() if k != "index"}, rid)


def test_dispatch_splits_a_chunk_into_one_thread_per_device(ref):
    # the per-device split in process: a chunk of 8 REF runs cut into 2 parts of 4 (the REF program), each
    # solved in its own thread (here both on this process's first device), then put back in run order
    rows = S.expand_grid(REF)[:7]  # 7 runs padded to 8 (a padding row starts at x = 0 and ends at step 0)
    dev = jax.devices()[0]
    parts = S.runner.dispatch(rows, 8, [dev, dev])
    assert len(parts) == 2 and all(hasattr(p, "result") for p in parts)  # futures of the two threads
    params, value, grad_norm, num_steps, status = S.runner.to_host(parts, 7)
    assert value.shape == (7,) and params.H.shape == (7, 4, 6)
    by_id = {r["run"]: r for r in ref["res"].records}
    for j, c in enumerate(rows):
        rec = by_id[S.run_id(c)]
        assert float(value[j]) == pytest.approx(rec["loss"], rel=1e-12, abs=0)
        assert (int(num_steps[j]), int(status[j])) == (rec["num_steps"], 1)  # max_steps (tol 0)


# ---------------------------------------------------------------------------------------------------------------
# phase diagrams


def _fake(lam, L, seed, gap, verdict, rank):
    """A hand-made record (only the fields phase_table reads)."""
    return {
        "run": f"{lam}-{L}-{seed}",
        "index": 0,
        "config": {"lam_H": lam, "lam_W": lam, "widths": [4] * L, "seed": seed},
        "gap": gap,
        "verdict": verdict,
        "ranks": {"H": [3] * (L - 1) + [rank], "out": rank},
    }


def test_phase_table_aggregates_cells_as_defined():
    recs = [
        _fake(1e-3, 2, 0, 1e-9, "optimal", 3),
        _fake(1e-3, 2, 1, -2e-8, "optimal", 3),
        _fake(1e-3, 2, 2, 0.3, "suboptimal", 2),
        _fake(1e-2, 2, 0, 0.5, "suboptimal", 1),
        _fake(1e-2, 2, 1, None, "unknown", 1),
        _fake(1e-3, 3, 0, 1e-12, "optimal", 2),
    ]
    t = SP.phase_table(recs, "lam", "L", "reach", tol=1e-6)
    assert t.x == [1e-3, 1e-2] and t.y == [2, 3]
    # cell (L=2, lam=1e-3): 2 of 3 seeds within 1e-6; (L=2, lam=1e-2): 0 of the 1 run with a prediction
    np.testing.assert_array_equal(t.values, [[2 / 3, 0.0], [1.0, np.nan]])
    np.testing.assert_array_equal(t.counts, [[3, 2], [1, 0]])
    v = SP.phase_table(recs, "lam", "L", "verdict")
    assert v.categories == ["optimal", "suboptimal", "unknown"]
    assert v.values[0, 0] == 0 and v.values[0, 1] == 1  # tie suboptimal/unknown -> first in sorted order
    g = SP.phase_table(recs, "lam", "L", "gap")
    assert g.values[0, 0] == pytest.approx(2e-8) and g.values[0, 1] == 0.5  # median of |1e-9|, |-2e-8|, 0.3
    r = SP.phase_table(recs, "lam", "L", "rank", layer=-1)
    assert r.values[0, 0] == 3 and r.values[0, 1] == 1 and r.values[1, 0] == 2
    w = SP.phase_table(recs, "lam", "seed", "reach", where={"L": 2})
    assert w.y == [0, 1, 2] and np.isnan(w.values[1, 1])
    with pytest.raises(ValueError, match="no records"):
        SP.phase_table(recs, "lam", "L", where={"L": 9})


def test_phase_diagram_draws_from_a_real_store(ref):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ax = SP.phase_diagram(ref["store"], x="lam", y="lr", value="rank", layer=-1)
    assert ax.get_xlabel() == "lam" and [t.get_text() for t in ax.get_yticklabels()] == ["0.05", "0.1"]
    t = SP.phase_table(ref["store"], "lam", "lr", "status")
    # fixed work (tol 0) except where the scale-aware rule (rel_grad <= rtol) stops a run first
    assert set(t.categories) <= {"converged", "max_steps"} and t.counts.sum() == 48
    ax2 = SP.phase_diagram(ref["res"], x="lam", y="lr", value="status")
    assert ax2.get_legend() is not None
    plt.close("all")


@pytest.mark.slow
def test_lbfgs_sweep_equals_loop_and_reaches_the_closed_form():
    # The default method. Shallow and 3-layer linear MSE (THEORY §1, §3): every run converges (tol 1e-9), so
    # batched and single solves agree to the solver tolerance; the landscape has a unique minimum value, so
    # differences of round-off in the line search cannot send a run to another minimum. 1e-10 relative.
    grid = [{"K": 3, "n": 2, "widths": [[4], [4, 4]], "bias": ["none", "free"], "lam": [1e-3, 1e-2], "seeds": 3}]
    res = ufm.sweep(grid, chunk_size=8, metrics=False, second_order=True)
    assert res.num_runs == 24
    for rec in res.records:
        c = rec["config"]
        p = ufm.UFM(
            num_classes=3, n_per_class=2, widths=tuple(c["widths"]), bias=c["bias"], lam_H=c["lam_H"], lam_W=c["lam_W"]
        )
        sol = ufm.solve(p, key=c["seed"], history=False)
        assert rec["status"] == sol.status_name == "converged"
        assert rec["loss"] == pytest.approx(float(sol.value), rel=1e-10)
        if rec["prediction"] is not None and rec["prediction"]["known"]:
            # the record's gap is loss - f* of the closed form (ufm.predict); a converged run is at f*
            assert abs(rec["gap"]) < 1e-8
            if rec["check"] is not None:  # with the Hessian certificate: stationary, no negative curvature
                assert rec["verdict"] == "matches" and rec["check"]["certificate"]["hessian"] is not None


# ---------------------------------------------------------------------------------------------------------------
# store integrity, temporary files, command-line errors


def test_corrupt_and_tampered_lines_are_named_skipped_and_resumed_around(ref, tmp_path):
    lines = _raw_lines(ref["store"])[:-1]  # header + 48 records
    rec5 = json.loads(lines[5])  # line 6 of the file
    rec5["loss"] *= 1.001  # an edited loss: the checksum no longer matches
    foreign = dict(json.loads(lines[9]), index=3)  # a record moved in from elsewhere, relabelled
    from ufm._sweep.store import seal

    foreign = seal({k: v for k, v in foreign.items() if k != "sha256"}, "another-store")  # valid elsewhere
    body = list(lines)
    body[3] = b'{"run": "oops'  # a corrupt line in the middle (line 4)
    body[5] = json.dumps(rec5).encode()
    body.append(json.dumps(foreign).encode())
    store = tmp_path / "tampered.jsonl"
    store.write_bytes(b"\n".join(body) + b"\n")
    with pytest.warns(S.StoreIntegrityWarning) as w:
        recs = ufm.load_sweep(store)
    msg = str(w[0].message)
    assert (
        "3 bad line(s)" in msg
        and "line 4: not JSON" in msg
        and f"line 6: checksum mismatch (run {rec5['run']}" in msg
        and "line 50: checksum mismatch" in msg
    )
    assert len(recs) == 46  # the two damaged runs are missing, the foreign one is not taken
    with pytest.raises(ValueError, match="line 4: not JSON"):
        ufm.load_sweep(store, strict=True)
    # a resume recomputes exactly the two damaged runs and appends them; the store then holds all 48, as the
    # uninterrupted sweep (the bad lines stay in the file and are reported on every load)
    with pytest.warns(S.StoreIntegrityWarning):
        res = ufm.sweep(REF, store, chunk_size=CHUNK)
    assert (res.num_new, res.num_skipped) == (2, 46)
    with pytest.warns(S.StoreIntegrityWarning, match="3 bad line"):
        final = ufm.load_sweep(store)
    assert _strip(final) == _strip(ref["res"].records)


def test_store_creation_never_follows_a_planted_symlink(tmp_path):
    from ufm._sweep.store import Store, new_header

    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    store = tmp_path / "s.jsonl"
    # the old predictable temporary name, and a few pids around ours, point at the victim
    for pid in range(os.getpid() - 2, os.getpid() + 3):
        os.symlink(victim, f"{store}.tmp{pid}")
    fp = {"n_runs": 1, "runs_sha256": "x", "settings": {}, "versions": {}}
    st = Store(str(store), new_header(fp, {}, "now"))
    st.append([{"run": "r", "index": 0}])
    st.close()
    assert victim.read_text() == "precious"
    assert json.loads(store.read_text().splitlines()[0])["ufm_sweep"] == S.SCHEMA
    assert sorted(p.name for p in tmp_path.iterdir() if ".tmp" in p.name and not p.is_symlink()) == []
    # a store path that is a symlink to a file that is not a store is refused, the file untouched
    link = tmp_path / "link.jsonl"
    os.symlink(victim, link)
    with pytest.raises(ValueError, match="is not a ufm sweep store"):
        Store(str(link), new_header(fp, {}, "now"))
    assert victim.read_text() == "precious"


def test_cli_store_folder_read_only_devices_and_broken_pipe(ref, tmp_path, capsys):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"grid": REF, "chunk_size": CHUNK}))
    folder = tmp_path / "folder"
    folder.mkdir()
    assert S.sweep_main([str(cfg), "--store", str(folder)]) == 2
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        rc_ro = S.sweep_main([str(cfg), "--store", str(ro / "s.jsonl")])
    finally:
        ro.chmod(0o700)
    cpu = tmp_path / "cpu.json"
    cpu.write_text(json.dumps({"grid": REF, "devices": "cpu"}))
    assert S.sweep_main([str(cpu)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "is a folder" in err[0] and "'devices' must be a number of devices" in err[-1]
    if os.geteuid() != 0:  # root writes anywhere
        assert rc_ro == 2 and "permission denied" in err[1]
        assert len(err) == 3
    assert all(line.startswith("ufm sweep: error:") for line in err)
    # `ufm sweep ... | true`: the reader is gone before the summary line; one line on stderr, exit 2
    proc = subprocess.Popen(
        RUNNER + [ref["config"], "--store", ref["store"]], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(ref)
    )
    proc.stdout.close()
    _, err = proc.communicate(timeout=300)
    lines = err.decode().strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "broken pipe" in lines[0], err.decode()[-2000:]


# ---------------------------------------------------------------------------------------------------------------
# DataFrames


def test_load_sweep_as_frame_layout_and_phase_table_from_a_frame(ref, monkeypatch):
    pd = pytest.importorskip("pandas")
    recs = ufm.load_sweep(ref["store"])
    hdr, df = ufm.load_sweep(ref["store"], as_frame=True, header=True)
    assert isinstance(df, pd.DataFrame) and len(df) == 48 and list(df.index) == list(range(48))
    assert hdr["fingerprint"]["n_runs"] == 48
    # nested config flattened with dots; lists of numbers are tuples (hashable for groupby)
    assert df["config.lam_H"].tolist() == [r["config"]["lam_H"] for r in recs]
    assert df["config.widths"].iloc[0] == (4, 4) and df["ranks.H"].iloc[0] == tuple(recs[0]["ranks"]["H"])
    assert df["loss"].dtype == np.float64 and df["loss"].tolist() == [r["loss"] for r in recs]
    # per-layer metrics: one column group per layer, named as ufm.metrics.layer_metrics names the layer
    names = [f["name"] for f in recs[0]["metrics"]["features"]]
    assert names == ["H_1", "Z_2", "H_2", "out"]
    for j, name in enumerate(names):
        assert df[f"metrics.features.{name}.nc1"].tolist() == [r["metrics"]["features"][j]["nc1"] for r in recs]
    assert df["metrics.dnc.2.dnc1"].tolist() == [r["metrics"]["dnc"][1]["dnc1"] for r in recs]
    # a theorist's pandas: the median gap per lambda equals the same median over the records
    med = df.groupby("config.lam_H")["gap"].median()
    for lam, v in med.items():
        assert v == np.median([r["gap"] for r in recs if r["config"]["lam_H"] == lam])
    # a phase diagram from a (filtered) DataFrame equals the one from the records
    for value in ("gap", "rank", "status"):
        t_df = SP.phase_table(df, "lam", "lr", value)
        t_rec = SP.phase_table(recs, "lam", "lr", value)
        np.testing.assert_array_equal(t_df.values, t_rec.values)
        assert (t_df.x, t_df.y, t_df.categories) == (t_rec.x, t_rec.y, t_rec.categories)
    sub = SP.phase_table(df[df["config.seed"] < 2], "lam", "lr", "gap")
    assert (sub.counts == 2).all()
    with pytest.raises(ValueError, match="exclusive"):
        ufm.load_sweep(ref["store"], as_frame=True, columns=True)
    # without pandas: a clear ImportError naming the extra
    monkeypatch.setitem(sys.modules, "pandas", None)
    with pytest.raises(ImportError, match=r"as_frame=True needs pandas: pip install pandas \(or 'ufm\[frames\]'\)"):
        ufm.load_sweep(ref["store"], as_frame=True)
