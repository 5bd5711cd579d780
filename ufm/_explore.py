"""Global search for the optimum of a UFM where theory is open: `explore`.

Where `ufm.predict` is not a theorem (deep ReLU with K >= 3, deep cross-entropy, imbalanced deep ReLU), the
global optimum is unknown and gradient methods are strongly biased towards deep neural collapse (THEORY.md §4.3).
`explore` spends a start or time budget on a portfolio of strategies, all run through ONE compiled
`ufm.solve_batch` program (fixed batch size, L-BFGS, explicit initial parameters), deduplicates the local minima it
reaches by loss and rotation-invariant structure, and reports the best point with `ufm.check` verdicts.

Strategies (each start remembers which one produced it):

* ``explicit``: the explicit candidates of `ufm.construct` (DNC and, where defined, the SRG point of Súkeník,
  Mondelli & Lampert 2024), evaluated as they are and polished; so the result is never above them.
* ``random``: Gaussian starts (`ufm.init_params` convention) at scales 0.5, 1, 2 (never near the zero saddle).
* ``low-rank``: class means of H and the map before the last ReLU of rank r < K (r drawn in 1..K-1).
* ``perturbed``: DNC / SRG plus relative Gaussian noise of size 0.1-0.5.
* ``continuation``: solve at 2-4 x the weight decays (where low rank is favoured), then move the λ's back.
* ``hop``: basin hopping: perturb one of the best minima found so far (relative noise 0.03-0.5) and re-solve.

Runs that end at the step limit within 5% of the best value are continued (polished) in later rounds; all other
endpoints are recorded as they are, with their solver status.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from . import metrics as _metrics
from ._checks import Report, check
from ._json import to_jsonable
from ._model import Params, forward, objective
from ._problem import UFM
from ._solver import solve_batch
from ._theory import Prediction, construct, predict

STRATEGIES = ("explicit", "random", "low-rank", "perturbed", "continuation", "hop")
"""The strategies `explore` knows, in the order the first round uses them."""

PRIOR_WEIGHTS = {"explicit": 0.0, "random": 4.0, "low-rank": 1.0, "perturbed": 1.0, "continuation": 1.0, "hop": 1.0}
"""Relative frequency of each strategy among new starts before any of them has improved the best value (each
improvement adds 3; hops are at least a quarter). Measured (benchmarks/README.md, K = 6, L = 4, 48 starts):
random starts alone reached 0.918 of the DNC loss, low-rank + hops 0.935, an even mix 0.933, so random leads."""

RANK_RTOL = 1e-3
"""Relative singular-value threshold of the numerical ranks reported per layer (solutions polished by a few
thousand L-BFGS steps at ReLU kinks are accurate to ~1e-6 relative, so 1e-3 separates true zeros robustly)."""


class Minimum(NamedTuple):
    """One distinct local minimum (an endpoint of the local solver) found by `explore`.

    Attributes:
      value: the objective (re-evaluated with `ufm.objective`).
      count: how many starts ended here (same loss to ``loss_rtol`` and same per-layer class-mean Gram spectra).
      strategy: the strategy that reached it first.
      found_at: seconds after the start of `explore` when it was first reached.
      status: the solver status of the first endpoint (0 converged, 1 step limit, 4 stalled at a ReLU kink).
      grad_norm: its gradient norm.
      ranks: numerical ranks (rtol `RANK_RTOL`) of the class-mean matrices M_1..M_L of H_1..H_L.
      ranks_Z: numerical ranks of the class means of the pre-activations Z_2..Z_L.
      gram_spectra: eigenvalues (descending, K each) of the class-mean Grams M_lᵀ M_l, l = 1..L.
      description: the structure in words.
      params: the point.
    """

    value: float
    count: int  # type: ignore[assignment]  # public field name; shadows tuple.count on purpose
    strategy: str
    found_at: float
    status: int
    grad_norm: float
    ranks: tuple
    ranks_Z: tuple
    gram_spectra: tuple
    description: str
    params: Params

    def to_dict(self) -> dict:
        """JSON-ready, without the parameters."""
        d = self._asdict()
        d.pop("params")
        return to_jsonable(d)


class Exploration(NamedTuple):
    """What `explore` found.

    Attributes:
      params, value: the best point found and its objective (`ufm.objective`).
      ratio_to_dnc: value / (the DNC loss), nan where DNC is not defined (deep ReLU, MSE, no bias, K >= 3 or K = 2).
      dnc_loss: the DNC loss, nan where not defined.
      explicit: {configuration name: loss} of the explicit candidates used as starts.
      known: True when `ufm.predict` gives the global optimum by a theorem: then ``params`` is `ufm.construct`'s
        point, no search is run, and ``message`` says so.
      prediction: ``ufm.predict(problem)`` (the best explicit candidate).
      minima: the distinct minima, lowest first.
      check_dnc: `ufm.check` of the best point against DNC (None where DNC is not defined).
      check_best: `ufm.check` of the best point against ``ufm.predict(problem)``.
      strategies: per strategy: starts, distinct minima first found, best value reached, time of that value.
      trace: (seconds, starts, best value) after each round.
      time: seconds spent in total (including the compile of the solver and the checks).
      num_starts, num_rounds: starts used and solver rounds run.
      message: one line for a human.
    """

    params: Params
    value: float
    ratio_to_dnc: float
    dnc_loss: float
    explicit: dict
    known: bool
    prediction: Prediction
    minima: tuple
    check_dnc: Report | None
    check_best: Report | None
    strategies: dict
    trace: tuple
    time: float
    num_starts: int
    num_rounds: int
    message: str

    def to_dict(self) -> dict:
        """A JSON-ready summary (no parameters; `ufm._json.to_jsonable` conventions)."""
        d = {k: v for k, v in self._asdict().items() if k not in ("params", "minima", "check_dnc", "check_best")}
        d["minima"] = [m.to_dict() for m in self.minima]
        for name in ("check_dnc", "check_best"):
            r = getattr(self, name)
            d[name] = (
                None
                if r is None
                else {
                    "verdict": r.verdict,
                    "explanation": r.explanation,
                    "gap": r.gap,
                    "predicted_loss": r.predicted_loss,
                }
            )
        return to_jsonable(d)


# ----------------------------------------------------------------------------------------------------------------
# structure of a point


def structure(problem: UFM, params: Params, rank_rtol: float = RANK_RTOL) -> dict:
    """Rotation-invariant structure of a point: per-layer class-mean ranks and Gram spectra, and a description.

    With M_l the d_l x K class means of H_l (H_1 = H, H_{l+1} = s(W_l H_l)), the Gram M_lᵀ M_l is invariant under
    H_l -> R H_l for orthogonal R, so its spectrum identifies a point up to the symmetries of the objective and
    permutations of the classes.

    Returns:
      {"ranks": (rank M_1..M_L), "ranks_Z": (rank of the class means of Z_2..Z_L), "gram_spectra": (K eigenvalues
      per layer), "description": str}.
    """
    fw = forward(problem, params)
    y = problem.labels()
    K = problem.K
    Ms = [_metrics.class_means(np.asarray(h, np.float64), y, K)[0] for h in fw.H]
    MZ = [_metrics.class_means(np.asarray(z, np.float64), y, K)[0] for z in fw.Z]
    ranks = tuple(_metrics.numerical_rank(M, rank_rtol) for M in Ms)
    ranks_Z = tuple(_metrics.numerical_rank(M, rank_rtol) for M in MZ)
    spectra = tuple(np.sort(np.linalg.eigvalsh(M.T @ M))[::-1] for M in Ms)
    return {
        "ranks": ranks,
        "ranks_Z": ranks_Z,
        "gram_spectra": spectra,
        "description": _describe(problem, Ms, ranks, ranks_Z),
    }


def _describe(problem: UFM, Ms, ranks, ranks_Z) -> str:
    K, L = problem.K, problem.L
    parts = []
    ML = Ms[-1]
    if np.linalg.norm(ML) == 0:
        return "zero solution (H_L = 0)"
    if problem.activation == "relu" and L >= 2:
        parts.append(f"rank {ranks_Z[-1]} before the last ReLU (Z_{L})")
    parts.append("class-mean ranks of H_1..H_L: " + ",".join(map(str, ranks)))
    G = ML.T @ ML
    G = G / np.mean(np.diag(G)) if np.mean(np.diag(G)) > 0 else G
    if _metrics.orthogonal_frame_distance(ML) < 1e-3:
        parts.append(f"H_{L} means an orthogonal frame (DNC)")
    elif _metrics.etf_distance(ML) < 1e-3:
        parts.append(f"H_{L} means a simplex ETF")
    else:
        off = np.sort(G[~np.eye(K, dtype=bool)])
        groups = _cluster(off, 2e-2)
        diag_cv = float(np.std(np.diag(G)) / max(float(np.mean(np.diag(G))), 1e-300))
        if len(groups) <= 3 and diag_cv < 2e-2:
            vals = ", ".join(f"{v:.3g}" for v in groups)
            desc = f"Gram of H_{L} means ∝ I + off-diagonal values {{{vals}}}"
            if len(groups) == 2:
                hi = (G > 0.5 * (groups[0] + groups[1])) & ~np.eye(K, dtype=bool)
                deg = hi.sum(axis=1)
                if np.all(deg == deg[0]):
                    desc += f" (a {int(deg[0])}-regular graph's adjacency on the larger value)"
            parts.append(desc)
        else:
            parts.append(f"H_{L} means asymmetric ({len(groups)} distinct Gram entries)")
    return "; ".join(parts)


def _cluster(x: np.ndarray, tol: float) -> list[float]:
    """Group sorted values that differ by less than tol (absolute, on a Gram normalised to unit diagonal)."""
    if x.size == 0:
        return []
    groups, start = [], 0
    for i in range(1, x.size + 1):
        if i == x.size or x[i] - x[i - 1] > tol:
            groups.append(float(np.mean(x[start:i])))
            start = i
    return groups


def _same(a: Minimum, value: float, spectra, loss_rtol: float, spec_rtol: float) -> bool:
    if abs(a.value - value) > loss_rtol * max(abs(value), 1e-300):
        return False
    # deep models: H_1 is not unique at a given loss (any factorisation of Z_2 = W_1 H_1 with the same
    # nuclear norm, THEORY §4.1), so only the layers 2..L identify the minimum
    skip = 1 if len(spectra) > 1 else 0
    for s1, s2 in zip(a.gram_spectra[skip:], spectra[skip:]):
        scale = max(float(s1[0]), float(s2[0]), 1e-300)
        if np.max(np.abs(s1 - s2)) > spec_rtol * scale:
            return False
    return True


# ----------------------------------------------------------------------------------------------------------------
# starts


def _np64(x) -> Any:
    """A float64 NumPy copy; `Params` annotates its fields as jax.Array, the starts here hold NumPy arrays."""
    return np.asarray(x, np.float64)


def _tree_np(params: Params) -> Params:
    return Params(_np64(params.H), tuple(_np64(W) for W in params.Ws), None if params.b is None else _np64(params.b))


def _b(params: Params) -> jax.Array:
    assert params.b is not None  # the starts of one problem all have a bias or none
    return params.b


def _random_start(problem: UFM, rng: np.random.Generator, scale: float) -> Params:
    hs, ws, bs = problem.param_shapes()
    H: Any = scale * rng.standard_normal(hs)  # NumPy arrays in Params (see _np64)
    Ws: tuple[Any, ...] = tuple(scale * rng.standard_normal(s) / np.sqrt(s[1]) for s in ws)
    b: Any = None if bs is None else np.zeros(bs)
    return Params(H, Ws, b)


def _low_rank_start(problem: UFM, rng: np.random.Generator) -> tuple[Params, int]:
    """Class means of H of rank r, and the map W_{L-1} before the last ReLU of rank r, r in 1..K-1."""
    K, L = problem.K, problem.L
    r = int(rng.integers(1, K)) if K > 2 else 1
    p = _random_start(problem, rng, 1.0)
    d1 = p.H.shape[0]
    C = rng.standard_normal((d1, r)) @ rng.standard_normal((r, K)) / np.sqrt(r)
    H = C[:, problem.labels()] + 0.01 * rng.standard_normal(p.H.shape)
    Ws = list(p.Ws)
    if L >= 2:
        W = Ws[L - 2]
        U = rng.standard_normal((W.shape[0], r))
        V = rng.standard_normal((r, W.shape[1]))
        Ws[L - 2] = U @ V / np.sqrt(r * W.shape[1])
    return Params(H, tuple(Ws), p.b), r


def _perturb(params: Params, rng: np.random.Generator, sigma: float) -> Params:
    """Relative Gaussian noise: each leaf X -> X + sigma * ||X||_F / sqrt(size) * N(0, 1)."""

    def one(X):
        X = np.asarray(X, np.float64)
        nrm = np.linalg.norm(X) / np.sqrt(max(X.size, 1))
        nrm = nrm if nrm > 0 else 1.0
        return X + sigma * nrm * rng.standard_normal(X.shape)

    return Params(one(params.H), tuple(one(W) for W in params.Ws), None if params.b is None else one(params.b))


class _Job(NamedTuple):
    init: Params  # NumPy float64
    strategy: str
    lam_factor: float  # weight decays multiplied by this (continuation stage 1), else 1
    polish: int  # how many times this run has been continued
    new_start: bool


# ----------------------------------------------------------------------------------------------------------------
# the search


def _progress_fn(progress) -> Callable[[dict], None] | None:
    if progress is None or progress is False:
        return None
    if progress is True:

        def show(info):
            print(
                f"explore: round {info['round']:3d}  {info['elapsed']:7.1f}s  starts {info['starts']:5d}  "
                f"best {info['best']:.10g}"
                + (f"  ratio to DNC {info['ratio_to_dnc']:.4f}" if math.isfinite(info["ratio_to_dnc"]) else "")
                + f"  minima {info['minima']}",
                file=sys.stderr,
                flush=True,
            )

        return show
    if callable(progress):
        return progress
    raise TypeError(f"progress must be None, a bool or a callable taking a dict; got {type(progress).__name__}")


def _explicit_candidates(problem: UFM, dtype) -> dict[str, Params]:
    """The explicit points of `ufm.construct`: DNC and SRG (deep ReLU), or the predicted candidate."""
    out = {}
    configs: Sequence[str | None] = ("dnc", "srg") if (problem.activation == "relu" and problem.L >= 2) else (None,)
    for c in configs:
        try:
            pr = predict(problem, c)
            if c is not None and pr.configuration != c:
                continue
            if np.isfinite(pr.loss):
                out[c or "predicted"] = construct(problem, c, dtype=dtype)
        except ValueError:
            continue
    return out


def explore(
    problem: UFM,
    *,
    time_budget: float | None = None,
    max_starts: int | None = None,
    key: jax.Array | int | None = None,
    progress: bool | Callable[[dict], None] | None = None,
    strategies: Sequence[str] = STRATEGIES,
    batch_size: int = 16,
    steps: int = 2000,
    max_polish: int = 2,
    loss_rtol: float = 1e-6,
    spec_rtol: float = 1e-3,
    check_hessian: bool = True,
    dtype=None,
) -> Exploration:
    """Search for the global minimum of a UFM with a portfolio of batched local solves.

    Every round is one call of `ufm.solve_batch` (L-BFGS, ``steps`` steps, ``batch_size`` explicit starts), so
    the whole search compiles one program. The first round holds the explicit candidates (DNC, SRG, polished and
    as they are), so ``value <= min(explicit losses)``. Later rounds continue promising unfinished runs, finish
    continuation runs at the true λ's, hop around the best minima and draw new starts from the strategies in
    proportion to `PRIOR_WEIGHTS` (random 4, others 1) + 3 x (how often each one improved the best value), hops at
    least a quarter.

    Where ``ufm.predict(problem).known`` is True the optimum is a theorem: it is returned at once (``known=True``,
    no search).

    Args:
      problem: a concrete `ufm.UFM` (any model).
      time_budget: seconds (loosely: no new round starts once the elapsed time plus one round would exceed it;
        the first round, which includes the compile, always runs).
      max_starts: the number of starts (deterministic: with a fixed ``key`` the result is reproducible). Polishing
        continuations are not counted as starts. Default 4 x batch_size when neither budget is given.
      key: a `jax.random.key` or an int seed (default 0).
      progress: True (one line per round on stderr), a callable taking a dict (round, elapsed, starts, best,
        ratio_to_dnc, minima), or None.
      strategies: a subset of `STRATEGIES` ("explicit" is always used).
      batch_size: starts per compiled round B (the solver compiles once per B, steps and shapes).
      steps: L-BFGS steps per round.
      max_polish: how many extra rounds an unfinished run within 5% of the best value may get.
      loss_rtol, spec_rtol: two endpoints are the same minimum when their losses agree to ``loss_rtol`` and every
        layer's class-mean Gram spectrum to ``spec_rtol`` (relative to its largest eigenvalue).
      check_hessian: compute the Hessian certificate in the final `ufm.check` calls.
      dtype: float32 or float64 (default JAX's default float).

    Returns:
      An `Exploration`.

    Raises:
      TypeError / ValueError: for a bad argument, before any compute.

    References:
      Súkeník, Mondelli, Lampert (2024), "Neural collapse versus low-rank bias: is deep neural collapse really
      optimal?" (DNC is not optimal for K >= 3, L >= 3; the SRG construction); THEORY.md §4.3.
    """
    t0 = time.perf_counter()
    if not isinstance(problem, UFM):
        raise TypeError(f"problem must be a ufm.UFM; got {type(problem).__name__}")
    if time_budget is not None and not (isinstance(time_budget, (int, float)) and time_budget > 0):
        raise ValueError(f"time_budget must be a positive number of seconds or None; got {time_budget!r}")
    if max_starts is not None and not (isinstance(max_starts, (int, np.integer)) and max_starts >= 1):
        raise ValueError(f"max_starts must be a positive integer or None; got {max_starts!r}")
    if not (isinstance(batch_size, (int, np.integer)) and batch_size >= 1):
        raise ValueError(f"batch_size must be a positive integer (starts per round B); got {batch_size!r}")
    if not (isinstance(steps, (int, np.integer)) and steps >= 1):
        raise ValueError(f"steps must be a positive integer; got {steps!r}")
    strategies = tuple(strategies)
    bad = [s for s in strategies if s not in STRATEGIES]
    if bad:
        raise ValueError(f"strategies must be a subset of {STRATEGIES}; got unknown {bad}")
    if "explicit" not in strategies:
        strategies = ("explicit",) + strategies
    if key is None:
        key = jax.random.key(0)
    elif isinstance(key, (int, np.integer)):
        key = jax.random.key(int(key))
    if max_starts is None and time_budget is None:
        max_starts = 4 * int(batch_size)
    pfn = _progress_fn(progress)
    dt = jnp.dtype(dtype) if dtype is not None else jnp.result_type(float)

    pred = predict(problem)
    pred_dnc = predict(problem, "dnc") if (problem.activation == "relu" and problem.L >= 2) else None
    dnc_loss = float(pred_dnc.loss) if pred_dnc is not None and pred_dnc.configuration == "dnc" else math.nan
    if problem.activation == "relu" and problem.L >= 2 and math.isnan(dnc_loss):
        dnc_loss = float(pred.dnc_loss)

    def finish(best_params, best_value, minima, stats, trace, starts, rounds, message):
        ratio = best_value / dnc_loss if math.isfinite(dnc_loss) and dnc_loss > 0 else math.nan
        chk_dnc = chk_best = None
        if math.isfinite(dnc_loss):
            chk_dnc = check(problem, best_params, configuration="dnc", hessian=check_hessian, metrics=False)
        if np.isfinite(pred.loss):
            chk_best = check(problem, best_params, pred, hessian=check_hessian, metrics=False)
        return Exploration(
            best_params,
            best_value,
            ratio,
            dnc_loss,
            explicit_losses,
            bool(pred.known),
            pred,
            tuple(minima),
            chk_dnc,
            chk_best,
            stats,
            tuple(trace),
            time.perf_counter() - t0,
            starts,
            rounds,
            message,
        )

    explicit = _explicit_candidates(problem, dt)
    explicit_losses = {k: float(objective(problem, v)) for k, v in explicit.items()}

    if pred.known and explicit:
        params = next(iter(explicit.values()))
        value = float(objective(problem, params))
        st = structure(problem, params)
        m = Minimum(
            value,
            1,
            "theory",
            time.perf_counter() - t0,
            0,
            math.nan,
            st["ranks"],
            st["ranks_Z"],
            st["gram_spectra"],
            st["description"],
            params,
        )
        return finish(
            params,
            value,
            [m],
            {"theory": {"starts": 0, "minima": 1, "best": value, "best_time": 0.0}},
            [(time.perf_counter() - t0, 0, value)],
            0,
            0,
            f"known optimum ({pred.reference or 'ufm.predict'}): returned ufm.construct's point, no search",
        )

    seed = int(jax.random.randint(key, (), 0, np.iinfo(np.int32).max))
    rng = np.random.default_rng(seed)
    B = int(batch_size)
    lam_H0 = float(np.asarray(problem.lam_H))
    lam_W0 = np.broadcast_to(np.asarray(problem.lam_W, np.float64), (problem.L,)).copy()
    lam_b0 = float(np.asarray(problem.lam_b))

    stats = {s: {"starts": 0, "minima": 0, "best": math.inf, "best_time": math.nan, "wins": 0} for s in strategies}
    minima: list[Minimum] = []
    best_value, best_params = math.inf, None
    for name, prm in explicit.items():
        v = explicit_losses[name]
        if v < best_value:
            best_value, best_params = v, prm
    trace: list[tuple] = []
    pending: list[_Job] = []
    starts = 0
    rounds = 0
    last_round = 0.0

    def new_job(s: str) -> _Job:
        if s == "random":
            return _Job(_random_start(problem, rng, float(rng.choice([0.5, 1.0, 2.0]))), s, 1.0, 0, True)
        if s == "low-rank":
            return _Job(_low_rank_start(problem, rng)[0], s, 1.0, 0, True)
        if s == "perturbed" and explicit:
            base = list(explicit.values())[int(rng.integers(len(explicit)))]
            return _Job(_perturb(_tree_np(base), rng, float(rng.choice([0.1, 0.3, 0.5]))), s, 1.0, 0, True)
        if s == "continuation":
            return _Job(_random_start(problem, rng, 1.0), s, float(rng.choice([2.0, 4.0])), 0, True)
        if s == "hop" and minima:
            top = sorted(minima, key=lambda m: m.value)[:3]
            best = top[int(rng.integers(len(top)))]
            return _Job(_perturb(_tree_np(best.params), rng, float(rng.choice([0.03, 0.1, 0.2, 0.5]))), s, 1.0, 0, True)
        return _Job(_random_start(problem, rng, 1.0), "random" if "random" in stats else s, 1.0, 0, True)

    def record(job: _Job, params: Params, value: float, status: int, gnorm: float, now: float):
        nonlocal best_value, best_params
        if not math.isfinite(value):
            return
        st = structure(problem, params)
        for i, m in enumerate(minima):
            if _same(m, value, st["gram_spectra"], loss_rtol, spec_rtol):
                minima[i] = m._replace(count=m.count + 1)
                break
        else:
            minima.append(
                Minimum(
                    value,
                    1,
                    job.strategy,
                    now,
                    status,
                    gnorm,
                    st["ranks"],
                    st["ranks_Z"],
                    st["gram_spectra"],
                    st["description"],
                    params,
                )
            )
            stats[job.strategy]["minima"] += 1
        s = stats[job.strategy]
        if value < s["best"]:
            s["best"], s["best_time"] = value, now
        if value < best_value - 1e-12 * abs(best_value):
            if best_params is not None:
                stats[job.strategy]["wins"] += 1
            best_value, best_params = value, params

    while True:
        elapsed = time.perf_counter() - t0
        if rounds > 0:
            if max_starts is not None and starts >= max_starts and not pending:
                break
            if time_budget is not None and elapsed + last_round > time_budget:
                break
        jobs: list[_Job] = []
        if rounds == 0:
            jobs += [_Job(_tree_np(prm), "explicit", 1.0, 0, True) for prm in explicit.values()]
        take = min(len(pending), B - len(jobs))
        jobs += pending[:take]
        pending = pending[take:]
        others = [
            s for s in strategies if s != "explicit" and (s != "hop" or minima) and (s != "perturbed" or explicit)
        ]
        n_new = B - len(jobs)
        if max_starts is not None:
            n_new = min(n_new, max(0, max_starts - starts - sum(j.new_start for j in jobs)))
        if others and n_new > 0:
            w = np.array([PRIOR_WEIGHTS[s] + 3.0 * stats[s]["wins"] for s in others])
            if "hop" in others:
                w[others.index("hop")] = max(w[others.index("hop")], 0.25 * w.sum())
            first = others[:n_new] if rounds == 0 else []  # every strategy once in the first round
            picks = first + list(rng.choice(others, size=n_new - len(first), p=w / w.sum()))
            jobs += [new_job(str(s)) for s in picks]
        if not jobs:
            break
        starts += sum(j.new_start for j in jobs)
        for j in jobs:
            if j.new_start:
                stats[j.strategy]["starts"] += 1
        # pad to B (one compiled program); the padding copies are discarded
        padded = jobs + [jobs[0]] * (B - len(jobs))
        init = Params(
            jnp.asarray(np.stack([j.init.H for j in padded]), dt),
            tuple(jnp.asarray(np.stack([j.init.Ws[i] for j in padded]), dt) for i in range(problem.L)),
            None if padded[0].init.b is None else jnp.asarray(np.stack([_b(j.init) for j in padded]), dt),
        )
        fac = np.array([j.lam_factor for j in padded])
        tr0 = time.perf_counter()
        sols = solve_batch(
            problem,
            init=init,
            lam_H=lam_H0 * fac,
            lam_W=fac[:, None] * lam_W0[None, :],
            lam_b=lam_b0 * fac,
            max_steps=int(steps),
            history=False,
        )
        values = np.asarray(sols.value, np.float64)
        status = np.asarray(sols.status)
        gnorm = np.asarray(sols.grad_norm, np.float64)
        rounds += 1
        now = time.perf_counter() - t0
        for i, j in enumerate(jobs):
            prm = sols.params
            p_i = Params(prm.H[i], tuple(W[i] for W in prm.Ws), None if prm.b is None else prm.b[i])
            if j.lam_factor != 1.0:
                pending.append(_Job(_tree_np(p_i), j.strategy, 1.0, 0, False))
                continue
            v = float(values[i])
            if int(status[i]) == 1 and j.polish < max_polish and math.isfinite(v) and v <= best_value * 1.05:
                pending.append(_Job(_tree_np(p_i), j.strategy, 1.0, j.polish + 1, False))
                if v < best_value:
                    best_value, best_params = v, p_i
                continue
            record(j, p_i, v, int(status[i]), float(gnorm[i]), now)
        pending.sort(key=lambda j: 0 if j.lam_factor == 1.0 else 1)
        last_round = time.perf_counter() - tr0
        trace.append((now, starts, best_value))
        if pfn is not None:
            pfn(
                {
                    "round": rounds,
                    "elapsed": now,
                    "starts": starts,
                    "best": best_value,
                    "ratio_to_dnc": best_value / dnc_loss if math.isfinite(dnc_loss) else math.nan,
                    "minima": len(minima),
                }
            )

    # leftovers (budget hit with unfinished continuations): record where they stand
    for j in pending:
        v = float(objective(problem, j.init))
        if j.lam_factor == 1.0 and math.isfinite(v):
            p_i = Params(
                jnp.asarray(j.init.H, dt),
                tuple(jnp.asarray(W, dt) for W in j.init.Ws),
                None if j.init.b is None else jnp.asarray(j.init.b, dt),
            )
            record(j, p_i, v, 1, math.nan, time.perf_counter() - t0)
    for name, prm in explicit.items():  # never above an explicit candidate
        if explicit_losses[name] < best_value:
            best_value, best_params = explicit_losses[name], prm
    if best_params is None:  # every run failed (non-finite): report the failure as a status, not an exception
        best_params = _random_start(problem, np.random.default_rng(seed), 1.0)
        best_params = Params(
            jnp.asarray(best_params.H, dt),
            tuple(jnp.asarray(W, dt) for W in best_params.Ws),
            None if best_params.b is None else jnp.asarray(best_params.b, dt),
        )
        msg = (
            "no finite local minimum was reached: every run failed (see the solver statuses); params is a random start"
        )
        return finish(best_params, math.nan, minima, stats, trace, starts, rounds, msg)
    minima.sort(key=lambda m: m.value)
    for s in stats.values():
        s.pop("wins", None)
    ratio = best_value / dnc_loss if math.isfinite(dnc_loss) else math.nan
    msg = (
        f"best {best_value:.10g}"
        + (f" = {ratio:.4f} x DNC" if math.isfinite(ratio) else "")
        + f" after {starts} starts in {rounds} rounds; {len(minima)} distinct minima; an upper bound on the "
        "global optimum (numerical search, no certificate of global optimality)"
    )
    best_value = float(objective(problem, best_params))
    return finish(best_params, best_value, minima, stats, trace, starts, rounds, msg)
