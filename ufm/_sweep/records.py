"""Per-run records: the solver's outcome, numerical ranks, the theory's prediction, `ufm.check`'s verdict and the
per-layer metrics of one solved chunk, as self-contained JSON dicts (one store line each)."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from .._checks import check
from .._json import to_jsonable
from .._solution import STATUS_NAMES, Solution
from .._theory import predict
from ..metrics import layer_metrics
from .grid import PROBLEM_FIELDS, problem_of
from .runner import dispatch, to_host

CHECK_DUPLICATES = ("prediction", "metrics", "problem")
"""Fields of ``ufm.check``'s report left out of a record's ``check`` (the record holds them already)."""


def ranks(config: Mapping, H, Ws, b, rtol: float, atol: float) -> list[dict]:
    """Numerical ranks for a batch of solutions (leading axis B).

    rank(A) = #{ i : sigma_i(A) > max(rtol * sigma_1(A), atol) }, for
    ``H``: the class-mean matrices M_l (d_l x K, uncentred) of H_1..H_L; ``Z``: those of the pre-activations
    Z_2..Z_L (equal to ``H`` for linear models); ``W``: W_1..W_L; ``out``: the output class means (K x K).
    """
    K = config["num_classes"]
    n = config["n_per_class"]
    sizes = np.asarray(n if isinstance(n, list) else [n] * K)
    labels = np.repeat(np.arange(K), sizes)
    E = np.eye(K)[labels] / sizes  # N x K: A @ E = class means
    relu = config["activation"] == "relu"

    def rank(A):
        s = np.linalg.svd(np.asarray(A, np.float64), compute_uv=False)
        thr = np.maximum(rtol * s[..., :1], atol)
        return (s > thr).sum(-1)

    h = np.asarray(H, np.float64)
    Hr, Zr = [rank(h @ E)], []
    for W in Ws[:-1]:
        z = np.asarray(W, np.float64) @ h
        Zr.append(rank(z @ E))
        h = np.maximum(z, 0) if relu else z
        Hr.append(rank(h @ E))
    out = np.asarray(Ws[-1], np.float64) @ h
    if b is not None:
        out = out + np.asarray(b, np.float64)[:, :, None]
    B = h.shape[0]
    Wr = [rank(W) for W in Ws]
    return [
        {
            "H": [int(r[i]) for r in Hr],
            "Z": [int(r[i]) for r in Zr],
            "W": [int(r[i]) for r in Wr],
            "out": int(rank(out @ E)[i]),
        }
        for i in range(B)
    ]


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


def _finite(x) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def _prediction(problem, config: Mapping, cache: dict):
    pkey = json.dumps({k: config[k] for k in PROBLEM_FIELDS}, sort_keys=True)
    if pkey not in cache:
        try:
            cache[pkey] = (predict(problem), None)
        except Exception as e:  # recorded per run, never hidden
            cache[pkey] = (None, _error(e))
    return cache[pkey]


def _untimed(d):
    """``d`` without its ``seconds`` entries (the certificates' wall times): a record is a function of its
    configuration alone, so a resumed, distributed or repeated sweep writes the same record; ``wall_s`` times it."""
    if isinstance(d, dict):
        return {k: _untimed(v) for k, v in d.items() if k != "seconds"}
    if isinstance(d, list):
        return [_untimed(v) for v in d]
    return d


def summarise(
    rows: Sequence[Mapping],
    indices: Sequence[int],
    run_ids: Sequence[str],
    host,
    settings: Mapping,
    pred_cache: dict,
    wall: float,
) -> list[dict]:
    """One record per run of a solved chunk (``host`` = `runner.to_host` of it, rows aligned with ``rows``)."""
    params, value, grad_norm, num_steps, status = host
    rk = ranks(rows[0], params.H, params.Ws, params.b, settings["rank_rtol"], settings["rank_atol"])
    out = []
    for j, (c, i, rid) in enumerate(zip(rows, indices, run_ids, strict=True)):
        loss = _finite(value[j])
        rec: dict[str, Any] = {
            "run": rid,
            "index": int(i),
            "config": c,
            "loss": loss,
            "grad_norm": _finite(grad_norm[j]),
            "num_steps": int(num_steps[j]),
            "status": STATUS_NAMES[int(status[j])],
            "success": bool(int(status[j]) == 0),
            "ranks": rk[j],
        }
        errors = {}
        problem = problem_of(c)
        prediction, perr = _prediction(problem, c, pred_cache)
        if perr:
            errors["predict"] = perr
        rec["prediction"] = to_jsonable(prediction) if prediction is not None else None
        ploss = getattr(prediction, "loss", None)
        ploss = _finite(ploss) if ploss is not None else None
        if ploss is not None and loss is not None:  # the definitions of ufm.check's Report.gap
            rec["gap"] = (loss - ploss) / max(abs(ploss), np.finfo(np.float64).tiny)
            rec["gap_abs"] = loss - ploss
        else:
            rec["gap"] = rec["gap_abs"] = None
        sol = Solution(
            jax.tree_util.tree_map(lambda a, j=j: a[j], params), value[j], grad_norm[j], num_steps[j], status[j]
        )
        rec["verdict"] = rec["check"] = None
        try:
            report = check(
                problem, sol, prediction, hessian=settings["second_order"], metrics=False, **settings["check_options"]
            )
            d = to_jsonable(report)
            rec["verdict"] = getattr(report, "verdict", None)
            rec["check"] = (
                {k: v for k, v in _untimed(d).items() if k not in CHECK_DUPLICATES} if isinstance(d, dict) else d
            )
        except Exception as e:
            errors["check"] = _error(e)
        rec["metrics"] = None
        if settings["metrics"]:
            try:
                rec["metrics"] = to_jsonable(layer_metrics(problem, sol.params, rank_rtol=settings["rank_rtol"]))
            except Exception as e:
                errors["metrics"] = _error(e)
        rec["errors"] = errors or None
        rec["wall_s"] = wall
        out.append(rec)
    return out


def solve_chunk(
    rows: Sequence[Mapping],
    indices: Sequence[int],
    run_ids: Sequence[str],
    size: int,
    keep: Sequence[bool],
    settings: Mapping,
) -> list[dict]:
    """Solve one whole chunk (padded to ``size``) on this process's devices and return the records of the runs
    marked in ``keep``, with `ufm.solve_batch`'s engine ``settings["engine"]`` on this process's first device.
    This is the task a Dask worker runs; it sets ``jax_enable_x64`` from the settings first (a worker process
    starts with JAX's default, float32)."""
    if bool(jax.config.read("jax_enable_x64")) != settings["x64"]:
        jax.config.update("jax_enable_x64", settings["x64"])
    t0 = time.perf_counter()
    host = to_host(dispatch(rows, size, jax.devices()[:1], settings["engine"]), len(rows))
    wall = (time.perf_counter() - t0) / len(rows)
    sel = [j for j, k in enumerate(keep) if k]
    host = jax.tree_util.tree_map(lambda a: a[np.asarray(sel, int)], host)
    return summarise(
        [rows[j] for j in sel], [indices[j] for j in sel], [run_ids[j] for j in sel], host, settings, {}, wall
    )
