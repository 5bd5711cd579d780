"""Smoke tests: every benchmark runs at a tiny size, writes its JSON/markdown/PNG, and its built-in
cross-checks hold (so the benchmarks never rot). Timings are not asserted: they are the benchmarks' output.

The torch parts are skipped when torch is not installed (it is an optional dependency, the ``bench``
extra); everything else runs.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import _common as C  # noqa: E402

HAS_TORCH = C.torch_or_none()[0] is not None
NO_TORCH = "torch is not installed (optional 'bench' extra): torch columns of the benchmarks are skipped"


def _quiet(*_a, **_k):
    pass


def _outputs_ok(res):
    for kind in ("json", "md", "png"):
        path = Path(res["paths"][kind])
        assert path.exists() and path.stat().st_size > 0, path
    data = json.loads(Path(res["paths"]["json"]).read_text())
    assert data["machine"]["cores"] >= 1
    assert "jax" in data["machine"]
    return data


# ------------------------------------------------------------------ the pieces benchmarks rely on


def test_gd_step_flops_counts_forward_and_backward_matmuls():
    # K=2, N=4, widths (3, 5): forward products W_1 (5x3) @ H (3x4) and W_2 (2x5) @ H_2 (5x4):
    # 2*5*3*4 + 2*2*5*4 = 120 + 80 = 200 FLOPs; backward is two products per layer: total 3 x 200.
    assert C.gd_step_flops(2, 4, (3, 5)) == 600


def test_reference_closed_forms_against_brute_force_scalar_minimisation():
    """The closed forms in benchmarks/reference.py against a dense grid / direct 1-D minimisation of the
    reduced problems of THEORY.md (independent of the formulas' algebra)."""
    from benchmarks import reference as R

    K, n, lam = 4, 100, 5e-4
    # §1: per-direction objective (1-a)^2/(2K)*K + sqrt(n lam lam) K a, minimised over a on a grid
    a = np.linspace(0, 1, 2_000_001)
    c = math.sqrt(n * lam * lam)
    brute = np.min((1 - a) ** 2 / 2 + K * c * a)
    assert abs(R.shallow_mse_nobias(K, n, lam, lam) - brute) <= 1e-12
    # §2: f(alpha) = log(1 + (K-1) e^{-alpha}) + c (K-1) alpha on a grid
    al = np.linspace(0, 20, 2_000_001)
    brute = np.min(np.log1p((K - 1) * np.exp(-al)) + c * (K - 1) * al)
    assert abs(R.shallow_ce_nobias(K, n, lam, lam) - brute) <= 1e-10
    # §0/§3 with P = 4: phi(s) = (1-s)^2/2 + K (P/2) C s^{2/P} on a grid
    P = 4
    C_ = (n * lam * lam**3) ** (1 / P)
    s = np.linspace(0, 1, 2_000_001)
    brute = np.min((1 - s) ** 2 / 2 + K * (P / 2) * C_ * s ** (2 / P))
    assert abs(R.deep_scalar(K, n, lam, [lam] * 3, P) - brute) <= 1e-10
    # zero regime: C above C* = ((P-2)/(P-1))^{(P-2)/P} / (K (P-1)) gives 1/2
    assert R.deep_scalar(2, 1, 0.5, [0.5] * 3, 4) == 0.5


def test_peers_agree_with_ufm_gradient_descent():
    """NumPy hand-written gradients take the same GD steps as ufm.solve(method='gd') (float64)."""
    import jax

    import ufm
    from benchmarks.peers import NumpyGD, max_rel_diff, params_to_numpy

    p = ufm.UFM(num_classes=2, n_per_class=3, widths=(4, 5, 3), activation="relu", loss="mse", lam_H=1e-2, lam_W=2e-2)
    x0 = ufm.init_params(p, jax.random.key(3), dtype="float64")
    ref = ufm.solve(p, init=x0, method="gd", lr=0.1, max_steps=4, tol=0.0, history=False)
    npx = NumpyGD(p, x0, "float64", 0.1)
    npx.run(4)
    assert max_rel_diff(npx.params(), params_to_numpy(ref.params, "float64")) <= 1e-12
    assert abs(npx.loss() - float(ref.value)) <= 1e-12 * abs(float(ref.value))


# ------------------------------------------------------------------ the four benchmarks, tiny


def test_bench_steps_tiny(tmp_path):
    from benchmarks import bench_steps

    res = bench_steps.run("tiny", out_dir=tmp_path, log=_quiet)
    data = _outputs_ok(res)
    (cfg,) = data["configs"]
    assert cfg["same_trajectory_ok"], cfg["same_trajectory_rel_diff"]
    assert cfg["ufm_num_steps_ok"]
    assert cfg["median_steps_per_s"]["ufm"] > 0
    assert data["peak_gflops"]["float64"]["peak"] > 0
    if HAS_TORCH:
        assert "torch eager 2thr" in cfg["median_steps_per_s"]
    else:
        assert "torch_skipped" in cfg


def test_bench_time_to_optimum_tiny(tmp_path):
    from benchmarks import bench_time_to_optimum as B

    res = B.run("tiny", out_dir=tmp_path, log=_quiet)
    data = _outputs_ok(res)
    for r in data["problems"]:
        # the benchmark's closed forms agree with ufm.predict where it exists (THEORY.md closed forms, 1e-12)
        if r["optimum"]["rel_diff"] is not None:
            assert r["optimum"]["rel_diff"] <= 1e-12, r["optimum"]
    (solved,) = [r for r in data["problems"] if "skipped" not in r]
    u = solved["ufm_float64"]
    assert u["hits"]["0.0001"]["step"] is not None  # L-BFGS in float64 reaches the tiny optimum
    if HAS_TORCH:
        # the peer recipe in torch and the same recipe compiled by ufm start alike and end alike (float32)
        rec, peer = solved["ufm_recipe_float32"], solved["peer_float32"]
        assert abs(rec["final_gap"] - peer["final_gap"]) <= 1e-3 * max(1.0, abs(peer["final_gap"]))


@pytest.mark.skipif(not HAS_TORCH, reason=NO_TORCH)
def test_bench_time_to_optimum_peer_records_a_trace(tmp_path):
    import jax

    jax.config.update("jax_enable_x64", True)
    from benchmarks import bench_time_to_optimum as B
    from benchmarks.reference import reference_problems

    name, p, fstar = reference_problems("tiny")[0]
    out = B.run_peer(p, fstar, 50)
    assert len(out["trace_gap"]) == 50 and out["per_iter_us"] > 0


def test_bench_sweep_tiny(tmp_path):
    from benchmarks import bench_sweep

    res = bench_sweep.run("tiny", out_dir=tmp_path, log=_quiet)
    data = _outputs_ok(res)
    assert data["checks_ok"], data["checks"]
    assert data["steps_ok"]
    if "A_sweep" in data:
        assert data["A_sweep"]["max_rel_diff_vs_solve_batch"] <= 1e-10
    if not HAS_TORCH:
        assert "torch_skipped" in data


def test_bench_latency_tiny(tmp_path):
    from benchmarks import bench_latency

    res = bench_latency.run("tiny", out_dir=tmp_path, log=_quiet)
    data = _outputs_ok(res)
    m = data["median"]
    assert m["first_solve"]["solver_compiles"] >= 1  # the compile counter sees the first compile
    assert m["new_lambdas"]["solver_compiles"] == 0  # new numbers never recompile the solver loop
    assert m["numpy_lambdas"]["solver_compiles"] == 0  # ... however they are written (NumPy scalars,
    assert m["per_layer_lam_W"]["solver_compiles"] == 0  # a per-layer list): see _solver._canonical
    assert m["batch_new_lambdas"]["solver_compiles"] == 0
