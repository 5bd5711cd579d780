"""Metrics on large features: `ufm.metrics` against Wu & Papyan's neural-collapse library (issue 12).

    python -m benchmarks.bench_metrics            # d=512, K=100, n=500 (N = 50,000) float32, noise 0.03
    python -m benchmarks.bench_metrics --smoke    # d=64, K=10, n=200

The case of issue 12: class means ~ N(0, I_d), samples = mean + 0.03 N(0, I_d), float32, plus a common offset
of 10 (a ReLU-like layer). Timed, interleaved over rounds (median), each from the raw d x N array to the numbers:

* ``ufm one pass``: `ufm.metrics.feature_metrics` (NC1, trace ratio, CDNV, NC2 ETF, equinorm, equiangularity,
  max-angle, hyperspherical uniformity, NC2 orthogonal: 9 metrics from one `class_stats`);
* ``ufm separate``: the six calls `nc1`, `nc1_trace_ratio`, `cdnv`, `nc2_etf`, `nc2_equinorm`, `nc2_uniformity`,
  each computing its own statistics (the issue's measurement pattern: 5.8-9.2 s before the one-pass rewrite);
* ``peer``: rhubarbwu/neural-collapse (torch, float32 as its default, N x d rows): MeanAccumulator, then
  CovarAccumulator + VarNormAccumulator in batches of 8192, then ``covariance_ratio`` (pinv and quotient),
  ``variability_cdnv``, ``simplex_etf_error``, ``kernel_stats`` (log kernel): 6 metrics. Skipped if absent
  (install: ``pip install torch`` (bench extra) and the library from its repository).

Both run with one BLAS/torch thread and with the default threads. The values are printed side by side with a
float64 NumPy reference (explicit covariances on centred data) to show which are right.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np

from . import _common as C

CASES = {"full": dict(d=512, K=100, n=500), "smoke": dict(d=64, K=10, n=200)}


def make_case(d, K, n, noise=0.03, offset=10.0, seed=0):
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(K), n)
    A = (rng.normal(size=(d, K))[:, y] + noise * rng.normal(size=(d, K * n)) + offset).astype(np.float32)
    return A, y


def reference(A, y, K):
    """float64 NC1 (pinv), trace ratio, CDNV, on the float32 values centred first (independent of ufm)."""
    A = A.astype(np.float64)
    A = A - A.mean(axis=1, keepdims=True)
    N = A.shape[1]
    counts = np.bincount(y, minlength=K)
    mus = np.zeros((A.shape[0], K))
    np.add.at(mus.T, y, A.T)
    mus /= counts
    R = A - mus[:, y]
    SW = R @ R.T / N
    Mc = mus - A.mean(axis=1, keepdims=True)
    SB = Mc @ Mc.T / K
    V = np.bincount(y, weights=np.sum(R**2, axis=0), minlength=K) / counts
    D = np.sum((mus[:, :, None] - mus[:, None, :]) ** 2, axis=0)
    iu = np.triu_indices(K, 1)
    return {
        "nc1": float(np.trace(SW @ np.linalg.pinv(SB, rcond=1e-10, hermitian=True)) / K),
        "nc1_trace_ratio": float(np.trace(SW) / np.trace(SB)),
        "cdnv": float(np.mean((V[:, None] + V[None, :])[iu] / (2 * D[iu]))),
    }


def ufm_one_pass(A, y):
    from ufm import metrics as m

    return m.feature_metrics(A, y)


def ufm_separate(A, y):
    from ufm import metrics as m

    return {
        "nc1": m.nc1(A, y),
        "nc1_trace_ratio": m.nc1_trace_ratio(A, y),
        "cdnv": m.cdnv(A, y),
        "nc2_etf": m.nc2_etf(A, y),
        "nc2_equinorm": m.nc2_equinorm(A, y),
        "nc2_uniformity": m.nc2_uniformity(A, y),
    }


def peer_or_none():
    torch, why = C.torch_or_none()
    if torch is None:
        return None, why
    try:
        import neural_collapse  # noqa: F401
    except ImportError as e:
        return None, f"neural_collapse not installed: {e}"
    return torch, None


def peer_metrics(torch, X, Y, K, batch=8192):
    """The peer library's documented pipeline (README "Measurements"), on N x d float32 rows."""
    from neural_collapse.accumulate import CovarAccumulator, MeanAccumulator, VarNormAccumulator
    from neural_collapse.kernels import kernel_stats, log_kernel
    from neural_collapse.measure import covariance_ratio, simplex_etf_error, variability_cdnv

    N, d = X.shape
    mean_acc = MeanAccumulator(K, d, "cpu")
    for i in range(0, N, batch):
        mean_acc.accumulate(X[i : i + batch], Y[i : i + batch])
    means, mG = mean_acc.compute()
    var_acc = VarNormAccumulator(K, d, "cpu", M=means)
    cov_acc = CovarAccumulator(K, d, "cpu", M=means)
    for i in range(0, N, batch):
        var_acc.accumulate(X[i : i + batch], Y[i : i + batch], means)
        cov_acc.accumulate(X[i : i + batch], Y[i : i + batch], means)
    var_norms, _ = var_acc.compute()
    covar_within = cov_acc.compute()
    return {
        "nc1": covariance_ratio(covar_within, means, mG),
        "nc1_trace_ratio": covariance_ratio(covar_within, means, mG, "quotient"),
        "cdnv": variability_cdnv(var_norms, means),
        "nc2_etf": simplex_etf_error(means, mG),
        "nc2_uniformity": kernel_stats(means, mG, kernel=log_kernel)[1],
    }


def _threads(n, torch):
    """Context: n BLAS threads for NumPy (threadpoolctl) and torch; n=None leaves the defaults."""
    import contextlib

    if n is None:
        return contextlib.nullcontext()
    from threadpoolctl import threadpool_limits

    stack = contextlib.ExitStack()
    stack.enter_context(threadpool_limits(limits=n, user_api="blas"))
    if torch is not None:
        old = torch.get_num_threads()
        torch.set_num_threads(n)
        stack.callback(torch.set_num_threads, old)
    return stack


def run(size="full", rounds=3, out_dir=None):
    info = C.machine_info()
    cfg = CASES[size]
    K = cfg["K"]
    A, y = make_case(**cfg)
    torch, why = peer_or_none()
    values = {"reference (float64, centred)": reference(A, y, K)}
    fns = {"ufm one pass": lambda: ufm_one_pass(A, y), "ufm separate (6 calls)": lambda: ufm_separate(A, y)}
    if torch is not None:
        X, Y = torch.from_numpy(np.ascontiguousarray(A.T)), torch.from_numpy(y)
        fns["peer (neural_collapse, torch float32)"] = lambda: peer_metrics(torch, X, Y, K)
    timings = {}
    for threads in (1, None):
        with _threads(threads, torch):
            for name, fn in fns.items():
                if threads == 1:
                    values[name] = fn()  # warm-up, and the values

            def timed(fn):
                return lambda: C.timeit(fn)

            # the six separate calls only at one thread (at the default threads they take minutes on a loaded box)
            chosen = {k: f for k, f in fns.items() if threads == 1 or not k.startswith("ufm separate")}
            t = C.interleaved({k: timed(f) for k, f in chosen.items()}, rounds)
        timings["1 thread" if threads == 1 else "default threads"] = {k: C.median(v) for k, v in t.items()}
    result = dict(machine=info, case=cfg, rounds=rounds, peer_absent=why, timings=timings, values=values)
    md = markdown(result)
    paths = C.write_outputs("metrics" if size == "full" else "metrics_smoke", result, out_dir, md)
    print(md)
    return result, paths


def _fmt(v):
    if v is None:
        return "—"
    return f"{v:.4g}" if isinstance(v, float) and math.isfinite(v) else str(v)


def markdown(r):
    cfg = r["case"]
    lines = [
        f"### Metrics: d={cfg['d']}, K={cfg['K']}, n={cfg['n']} (N={cfg['K'] * cfg['n']}), float32, "
        f"noise 0.03, offset 10 (median of {r['rounds']} interleaved rounds)",
        "",
        C.machine_line(r["machine"]),
        "",
    ]
    if r["peer_absent"]:
        lines += [f"Peer skipped: {r['peer_absent']}.", ""]
    names = list(next(iter(r["timings"].values())))
    rows = [[n] + [C.fmt_time(r["timings"][t].get(n)) for t in r["timings"]] for n in names]
    lines += [C.md_table(["implementation"] + list(r["timings"]), rows), ""]
    keys = ["nc1", "nc1_trace_ratio", "cdnv", "nc2_etf", "nc2_uniformity"]
    rows = [[n] + [_fmt(v.get(k)) for k in keys] for n, v in r["values"].items()]
    lines += [C.md_table(["values"] + keys, rows)]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="small case, one round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=None, help="output folder (default benchmarks/results)")
    a = ap.parse_args(argv)
    t = time.perf_counter()
    run("smoke" if a.smoke else "full", rounds=1 if a.smoke else a.rounds, out_dir=a.out)
    print(f"({time.perf_counter() - t:.1f} s)")


if __name__ == "__main__":
    main()
