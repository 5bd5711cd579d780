"""`explore`: the search loop (budgets, rounds, continuation of promising runs) and its arguments."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .._model import objective
from .._options import default_rtol
from .._problem import UFM
from .._theory import predict
from .minima import Ledger, Minimum
from .result import Exploration, Setting, as_dtype, assemble, final_point, ratio
from .rounds import Endpoint, gd_round, lbfgs_round
from .starts import DEFAULT_STRATEGIES, STRATEGIES, Job, Strategist, as_numpy, explicit_candidates, random_start
from .structure import structure

POLISH_SHARE = 0.2
"""With a ``time_budget``, the rounds stop at (1 - this) x the budget when the lowest minima are to be polished at
their kinks afterwards (``polish_top`` > 0, deep ReLU): the polish (its compile included) gets the rest."""

POLISH_WITHIN = 0.05
"""A run that ends at the step limit within this fraction of the best value is continued in a later round."""


def progress_printer(progress) -> Callable[[dict], None] | None:
    """The progress callback: None, one line per round on stderr (True), or the caller's callable."""
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


def _positive_int(name: str, v, what: str) -> None:
    if not (isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 1):
        raise ValueError(f"{name} must be a positive integer ({what}); got {v!r}")


def validate(
    problem, time_budget, max_starts, batch_size, steps, gd_steps, max_polish, polish_top, strategies
) -> tuple:
    """Check the arguments before any compute; return the strategies with "explicit" first."""
    if not isinstance(problem, UFM):
        raise TypeError(f"problem must be a ufm.UFM; got {type(problem).__name__}")
    if time_budget is not None and not (
        isinstance(time_budget, (int, float)) and not isinstance(time_budget, bool) and time_budget > 0
    ):
        raise ValueError(f"time_budget must be a positive number of seconds or None; got {time_budget!r}")
    if max_starts is not None:
        _positive_int("max_starts", max_starts, "starts, or None")
    _positive_int("batch_size", batch_size, "starts per round B")
    _positive_int("steps", steps, "L-BFGS steps per round")
    _positive_int("gd_steps", gd_steps, "gradient-descent steps of a gd phase")
    for name, v in (("max_polish", max_polish), ("polish_top", polish_top)):
        if not (isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 0):
            raise ValueError(f"{name} must be an integer >= 0; got {v!r}")
    if isinstance(strategies, str):
        raise TypeError(f"strategies must be a sequence of names from {STRATEGIES}, not a string; got {strategies!r}")
    strategies = tuple(strategies)
    bad = [s for s in strategies if s not in STRATEGIES]
    if bad:
        raise ValueError(f"strategies must be a subset of {STRATEGIES}; got unknown {bad}")
    return strategies if "explicit" in strategies else ("explicit",) + strategies


def make_setting(problem: UFM, dtype, check_hessian: bool, t0: float) -> Setting:
    """The prediction, the DNC loss and the explicit candidates of ``problem``."""
    dt = jnp.dtype(dtype) if dtype is not None else jnp.result_type(float)
    pred = predict(problem)
    deep_relu = problem.activation == "relu" and problem.L >= 2
    pred_dnc = predict(problem, "dnc") if deep_relu else None
    dnc_loss = float(pred_dnc.loss) if pred_dnc is not None and pred_dnc.configuration == "dnc" else math.nan
    if deep_relu and math.isnan(dnc_loss):
        dnc_loss = float(pred.dnc_loss)
    explicit = explicit_candidates(problem, dt)
    losses = {k: float(objective(problem, v)) for k, v in explicit.items()}
    return Setting(problem, pred, dnc_loss, explicit, losses, dt, bool(check_hessian), t0)


def known_optimum(s: Setting) -> Exploration:
    """The result where `ufm.predict` is a theorem: `ufm.construct`'s point, no search."""
    params = next(iter(s.explicit.values()))
    value = float(objective(s.problem, params))
    st = structure(s.problem, params)
    ledger = Ledger(s.problem, (), 0.0, 0.0)
    now = time.perf_counter() - s.t0
    ledger.minima.append(
        Minimum(
            value,
            1,
            "theory",
            now,
            0,
            math.nan,
            st["ranks"],
            st["ranks_Z"],
            st["gram_spectra"],
            st["description"],
            params,
        )
    )
    ledger.stats["theory"] = {"starts": 0, "minima": 1, "best": value, "best_time": 0.0}
    msg = f"known optimum ({s.prediction.reference or 'ufm.predict'}): returned ufm.construct's point, no search"
    return assemble(s, params, value, ledger, [(now, 0, value)], 0, 0, msg)


class Search:
    """The state of a running search: the ledger, the queues, the budget counters."""

    def __init__(self, s: Setting, strategist: Strategist, ledger: Ledger, B: int, max_starts, max_polish: int):
        self.s, self.strategist, self.ledger = s, strategist, ledger
        self.B, self.max_starts, self.max_polish = B, max_starts, max_polish
        self.pending: list[Job] = []  # continuations, run before new starts
        self.gd_queue: list[Job] = []  # new starts waiting for a gradient-descent phase
        self.starts = 0
        self.rounds = 0
        self.trace: list[tuple] = []
        for name, prm in s.explicit.items():
            ledger.offer(s.explicit_losses[name], prm)

    def done(self) -> bool:
        """True when the start budget is spent and nothing is left to finish."""
        return self.max_starts is not None and self.starts >= self.max_starts and not self.pending and not self.gd_queue

    def new_jobs(self, n: int) -> list[Job]:
        """Up to n new starts (fewer when the start budget ends); gd starts go to the gd queue instead."""
        if self.max_starts is not None:
            n = min(n, max(0, self.max_starts - self.starts))
        names = self.strategist.pick(n, self.ledger, first=self.rounds == 0)
        jobs = [self.strategist.job(name, self.ledger) for name in names]
        self.starts += len(jobs)
        for j in jobs:
            self.ledger.stats[j.strategy]["starts"] += 1
        self.gd_queue += [j for j in jobs if j.gd]
        return [j for j in jobs if not j.gd]

    def batch(self, gd_steps: int) -> list[Job]:
        """The next L-BFGS batch: explicit points (first round), continuations, finished gd phases, new starts."""
        B = self.B
        jobs: list[Job] = []
        if self.rounds == 0 and not self.starts:  # the explicit points are the first starts (always run)
            jobs += [Job(as_numpy(prm), "explicit") for prm in self.s.explicit.values()]
            self.starts += len(jobs)
            self.ledger.stats["explicit"]["starts"] += len(jobs)
        take = min(len(self.pending), B - len(jobs))
        jobs += self.pending[:take]
        self.pending = self.pending[take:]
        jobs += self.new_jobs(B - len(jobs))
        Bg = max(1, B // 4)
        if len(self.gd_queue) >= Bg or (self.gd_queue and len(jobs) == 0):
            queue, self.gd_queue = self.gd_queue[:Bg], self.gd_queue[Bg:]
            for j, e in zip(queue, gd_round(self.s.problem, queue, Bg, gd_steps, self.s.dtype)):
                if math.isfinite(e.value):  # diverged phases (status 3) are dropped
                    self.pending.insert(0, Job(e.params, j.strategy, new_start=False))
        return jobs

    def absorb(self, jobs: list[Job], ends: list[Endpoint], now: float) -> None:
        """Record finished runs; queue continuation second stages and promising unfinished runs."""
        ledger = self.ledger
        for j, e in zip(jobs, ends):
            if j.lam_factor != 1.0:
                self.pending.append(Job(e.params, j.strategy, new_start=False))
                continue
            v = e.value
            if (
                e.status == 1
                and j.polish < self.max_polish
                and math.isfinite(v)
                and v <= ledger.best_value * (1 + POLISH_WITHIN)
            ):
                self.pending.append(Job(e.params, j.strategy, polish=j.polish + 1, new_start=False))
                ledger.offer(v, e.params)
                continue
            ledger.record(j.strategy, e.params, v, e.status, e.grad_norm, now)
        self.pending.sort(key=lambda j: 0 if j.lam_factor == 1.0 else 1)

    def finish_pending(self) -> None:
        """Budget hit with unfinished runs: record where they stand."""
        for j in self.pending:
            v = float(objective(self.s.problem, as_dtype(j.init, self.s.dtype)))
            if j.lam_factor == 1.0 and math.isfinite(v):
                self.ledger.record(j.strategy, j.init, v, 1, math.nan, time.perf_counter() - self.s.t0)
        self.pending = []


def run_search(search: Search, time_budget, steps: int, gd_steps: int, pfn) -> None:
    """Rounds until the start budget is spent or the next round would end past ``time_budget``."""
    s, last_round = search.s, 0.0
    while True:
        if search.rounds > 0:
            if search.done():
                break
            # the first round holds the compile: its length says nothing about the next one, which then only has
            # to start inside the budget; later rounds must be expected to end inside it
            expect = last_round if search.rounds > 1 else 0.0
            if time_budget is not None and time.perf_counter() - s.t0 + expect > time_budget:
                break
        tr0 = time.perf_counter()
        jobs = search.batch(gd_steps)
        if not jobs:
            if search.done() or not search.gd_queue:
                break
            continue
        ends = lbfgs_round(s.problem, jobs, search.B, steps, s.dtype)
        search.rounds += 1
        now = time.perf_counter() - s.t0
        search.absorb(jobs, ends, now)
        last_round = time.perf_counter() - tr0
        best = search.ledger.best_value
        search.trace.append((now, search.starts, best))
        if pfn is not None:
            pfn(
                {
                    "round": search.rounds,
                    "elapsed": now,
                    "starts": search.starts,
                    "best": best,
                    "ratio_to_dnc": ratio(best, s.dnc_loss),
                    "minima": len(search.ledger.minima),
                }
            )


def seed_of(key) -> int:
    """The NumPy seed of a search: drawn from a `jax.random.key`, an int seed, or key 0 (None)."""
    if key is None:
        key = jax.random.key(0)
    elif isinstance(key, (int, np.integer)):
        key = jax.random.key(int(key))
    return int(jax.random.randint(key, (), 0, np.iinfo(np.int32).max))


def every_run_failed(s: Setting, ledger: Ledger, search: Search, seed: int) -> Exploration:
    """No finite endpoint and no explicit point: the failure as a status (value nan, a random start as params)."""
    params = as_dtype(random_start(s.problem, np.random.default_rng(seed), 1.0), s.dtype)
    msg = "no finite local minimum was reached: every run failed (see the solver statuses); params is a random start"
    return assemble(s, params, math.nan, ledger, search.trace, search.starts, search.rounds, msg)


def minima_count(minima) -> str:
    """``"N distinct minima (c converged, s stalled at a ReLU kink, u at the step limit)"``, zero parts left out."""
    parts = [
        f"{n} {what}"
        for n, what in (
            (sum(m.status == 0 for m in minima), "converged"),
            (sum(m.status == 4 for m in minima), "stalled at a ReLU kink"),
            (sum(m.status == 1 for m in minima), "at the step limit"),
            (sum(m.status not in (0, 1, 4) for m in minima), "other"),
        )
        if n
    ]
    return f"{len(minima)} distinct minima" + (f" ({', '.join(parts)})" if parts else "")


def summary(search: Search, value: float, polished: int) -> str:
    """The one-line message of a finished search."""
    r = ratio(value, search.s.dnc_loss)
    return (
        f"best {value:.10g}"
        + (f" = {r:.4f} x DNC" if math.isfinite(r) else "")
        + f" after {search.starts} starts in {search.rounds} rounds; {minima_count(search.ledger.minima)}"
        + (f" (the {polished} lowest polished at their ReLU kinks, then merged)" if polished else "")
        + "; an "
        "upper bound on the global optimum (numerical search, no certificate of global optimality)"
    )


def explore(
    problem: UFM,
    *,
    time_budget: float | None = None,
    max_starts: int | None = None,
    key: jax.Array | int | None = None,
    progress: bool | Callable[[dict], None] | None = None,
    strategies: Sequence[str] = DEFAULT_STRATEGIES,
    batch_size: int = 16,
    steps: int = 400,
    max_polish: int = 4,
    polish_top: int = 8,
    gd_steps: int = 2000,
    loss_rtol: float = 1e-6,
    spec_rtol: float = 1e-3,
    check_hessian: bool = True,
    dtype=None,
) -> Exploration:
    """Search for the global minimum of a UFM with a portfolio of batched local solves.

    Every round is one call of `ufm.solve_batch` (L-BFGS, ``steps`` steps, ``batch_size`` explicit starts), so
    the whole search compiles one program (two with the ``gd`` strategy). The first round holds the explicit
    candidates (DNC, SRG, polished and as they are), so ``value <= min(explicit losses)``. Later rounds continue
    unfinished runs within 5 % of the best value (up to ``max_polish`` times: short rounds screen many starts and
    spend steps only on the promising ones), finish continuation runs at the true λ's, hop around the best minima
    and draw new starts from the strategies in proportion to `PRIOR_WEIGHTS` + 3 x (how often each one improved the
    best value), moves from found minima (truncate, hop, rank-hop) at least half. After the rounds the
    ``polish_top`` lowest minima are finished at their ReLU kinks and merged where they then agree.

    Where ``ufm.predict(problem).known`` is True the optimum is a theorem: it is returned at once (``known=True``,
    no search).

    Args:
      problem: a concrete `ufm.UFM` (any model).
      time_budget: seconds (loosely: the first round, which includes the compile, always runs; the second starts
        if the budget is not spent; later ones only if the elapsed time plus the last round's length fits; with
        the kink polish on, the rounds get 80 % of it and the polish the rest, see ``polish_top``; the final
        `ufm.check` calls come on top).
      max_starts: the number of starts (deterministic: with a fixed ``key`` the result is reproducible).
        Continuations are not counted as starts. Default 4 x batch_size when neither budget is given.
      key: a `jax.random.key` or an int seed (default 0).
      progress: True (one line per round on stderr), a callable taking a dict (round, elapsed, starts, best,
        ratio_to_dnc, minima), or None.
      strategies: a subset of `STRATEGIES` ("explicit" is always used); default `DEFAULT_STRATEGIES`.
      batch_size: starts per compiled round B (the solver compiles once per B, steps and shapes).
      steps: L-BFGS steps per round.
      max_polish: how many extra rounds an unfinished run within 5 % of the best value may get.
      polish_top: after the rounds, the ``polish_top`` lowest minima are finished at their ReLU kinks
        (`ufm._kinks.polish`, deep ReLU models) and merged where they then agree (`Ledger.consolidate`): copies of
        one minimum stalled at a kink otherwise pass for distinct. With a ``time_budget`` the rounds stop at 80 %
        of it (`POLISH_SHARE`) and no polish starts after it (the first always runs: a compile of ~10-40 s on a
        2-core CPU, then ~1-5 s per minimum at K = 6, L = 4); 0 turns it off.
      gd_steps: gradient-descent steps (lr 0.5) of a ``gd`` start before its L-BFGS rounds.
      loss_rtol, spec_rtol: two endpoints are the same minimum when their losses agree to ``loss_rtol`` and every
        layer's class-mean Gram spectrum to ``spec_rtol`` (relative to its largest eigenvalue); when either of
        the two did not converge (the step limit, a stall at a ReLU kink), to at least
        `ufm._explore.minima.UNCONVERGED_LOSS_RTOL` (1e-5) and ``UNCONVERGED_SPEC_RTOL`` (~1.6e-2): such an
        endpoint sits O(g^2) above its minimum and O(g) away in its spectra (g its gradient norm). The message
        counts the minima by status.
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
    strategies = validate(
        problem, time_budget, max_starts, batch_size, steps, gd_steps, max_polish, polish_top, strategies
    )
    pfn = progress_printer(progress)
    if max_starts is None and time_budget is None:
        max_starts = 4 * int(batch_size)
    s = make_setting(problem, dtype, check_hessian, t0)
    if s.prediction.known and s.explicit:
        return known_optimum(s)
    seed = seed_of(key)
    ledger = Ledger(problem, strategies, loss_rtol, spec_rtol)
    strategist = Strategist(problem, strategies, s.explicit, np.random.default_rng(seed))
    search = Search(s, strategist, ledger, int(batch_size), max_starts, max_polish)
    polishing = polish_top > 0 and problem.activation == "relu" and problem.L >= 2
    round_budget = None if time_budget is None else time_budget * (1 - POLISH_SHARE if polishing else 1.0)
    run_search(search, round_budget, int(steps), int(gd_steps), pfn)
    search.finish_pending()
    if ledger.best_params is None:
        return every_run_failed(s, ledger, search, seed)
    deadline = None if time_budget is None else t0 + time_budget
    polished = ledger.consolidate(int(polish_top), default_rtol(s.dtype), deadline)
    params, value = final_point(s, ledger)
    msg = summary(search, value, polished)
    return assemble(s, params, value, ledger, search.trace, search.starts, search.rounds, msg)
