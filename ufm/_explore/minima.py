"""The distinct local minima of a search: `Minimum`, the deduplication rule, and the `Ledger` that keeps them."""

from __future__ import annotations

import math
import time
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np

from .._json import to_jsonable
from .._kinks import polish
from .._model import Params, objective
from .._problem import UFM
from .structure import structure


class Minimum(NamedTuple):
    """One distinct local minimum (an endpoint of the local solver) found by `explore`.

    Attributes:
      value: the objective (re-evaluated with `ufm.objective`).
      count: how many starts ended here (same loss to ``loss_rtol`` and same per-layer class-mean Gram spectra;
        wider tolerances for unconverged endpoints, see `same_minimum`).
      strategy: the strategy that reached it first.
      found_at: seconds after the start of `explore` when it was first reached.
      status: the solver status of the first endpoint (0 converged, 1 step limit, 4 stalled at a ReLU kink); 0
        also for a minimum finished by the kink polish (`Ledger.consolidate`).
      grad_norm: its gradient norm (for a polished minimum the polish's kink-aware measure, a Clarke gradient's).
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


UNCONVERGED_LOSS_RTOL = 1e-5
"""Loss tolerance (relative) of `same_minimum` when either endpoint is unconverged (status != 0: the step limit or a
stall at a ReLU kink). Measured on the default K = 6, L = 4 problem (`explore(..., time_budget=60)`, 2026-11-26):
copies of the DNC point that stopped with gradient norms 3e-5..9e-5 sit 0.9e-6..6e-6 (relative) above it, so the
converged rule's 1e-6 counted each copy as a new minimum (11 "distinct" minima within 6e-6 of the best)."""

UNCONVERGED_SPEC_RTOL = 5 * math.sqrt(UNCONVERGED_LOSS_RTOL)
"""Gram-spectrum tolerance (relative to the largest eigenvalue) when either endpoint is unconverged, ~1.6e-2. Near a
minimum x* the loss rises quadratically, f(x* + d) - f* ~ d^T H d / 2, while the class-mean Grams move linearly in
d, so a loss gap e goes with a spectral gap ~ C sqrt(e). The same measurement gave C = 3.9..4.5 (spectral gaps
3.7e-3..1.1e-2 at loss gaps 0.9e-6..6e-6); C = 5 covers it. C depends on the problem's curvature: it is a
heuristic, not a bound."""


def same_minimum(a: Minimum, value: float, spectra, loss_rtol: float, spec_rtol: float, converged: bool = True) -> bool:
    """True when an endpoint (``value``, class-mean Gram ``spectra``) is the minimum ``a``: equal losses to
    ``loss_rtol`` and, in every layer 2..L (every layer when L = 1), Gram spectra equal to ``spec_rtol`` x the
    largest eigenvalue.

    When the endpoint (``converged`` False) or ``a`` (status != 0) did not converge, the tolerances are widened to
    at least `UNCONVERGED_LOSS_RTOL` and `UNCONVERGED_SPEC_RTOL`: an endpoint stopped with gradient norm g sits
    O(g^2) above its minimum in loss and O(g) away in its spectra, and copies of one minimum must not pass for
    distinct minima."""
    if not converged or a.status != 0:
        loss_rtol, spec_rtol = max(loss_rtol, UNCONVERGED_LOSS_RTOL), max(spec_rtol, UNCONVERGED_SPEC_RTOL)
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


class Ledger:
    """What a search has found so far: the distinct minima, per-strategy statistics and the best point.

    ``stats[s]`` holds, per strategy s: ``starts`` (new starts drawn), ``minima`` (distinct minima it reached
    first), ``best`` (its lowest value), ``best_time`` (when) and ``wins`` (how often it lowered the best value).
    """

    def __init__(self, problem: UFM, strategies, loss_rtol: float, spec_rtol: float):
        self.problem = problem
        self.loss_rtol, self.spec_rtol = loss_rtol, spec_rtol
        self.minima: list[Minimum] = []
        self.stats = {
            s: {"starts": 0, "minima": 0, "best": math.inf, "best_time": math.nan, "wins": 0} for s in strategies
        }
        self.best_value: float = math.inf
        self.best_params: Params | None = None

    def offer(self, value: float, params: Params) -> bool:
        """Make ``params`` the best point if ``value`` is finite and lower (by more than rounding); True if it was."""
        if not math.isfinite(value):
            return False
        if math.isfinite(self.best_value) and value >= self.best_value - 1e-12 * abs(self.best_value):
            return False
        self.best_value, self.best_params = value, params
        return True

    def record(self, strategy: str, params: Params, value: float, status: int, grad_norm: float, now: float):
        """Add an endpoint: a new `Minimum`, or one more count of the one it equals (`same_minimum`).

        A merged endpoint becomes the minimum's point when it is a better representative: converged where the
        kept one is not, or lower where neither converged (the strategy and time of the first finder are kept)."""
        if not math.isfinite(value):
            return
        st = structure(self.problem, params)
        for i, m in enumerate(self.minima):
            if same_minimum(m, value, st["gram_spectra"], self.loss_rtol, self.spec_rtol, converged=status == 0):
                m = m._replace(count=m.count + 1)
                if m.status != 0 and (status == 0 or value < m.value):
                    m = moved(m, params, value, status, grad_norm, st)
                self.minima[i] = m
                break
        else:
            self.minima.append(
                Minimum(
                    value,
                    1,
                    strategy,
                    now,
                    status,
                    grad_norm,
                    st["ranks"],
                    st["ranks_Z"],
                    st["gram_spectra"],
                    st["description"],
                    params,
                )
            )
            self.stats[strategy]["minima"] += 1
        s = self.stats[strategy]
        if value < s["best"]:
            s["best"], s["best_time"] = value, now
        had_best = self.best_params is not None
        if self.offer(value, params) and had_best:
            s["wins"] += 1

    def top(self, n: int, spread: float = 0.0) -> list[Minimum]:
        """The n lowest minima; with ``spread`` > 0, skipping any whose loss is within ``spread`` (relative) of a
        lower one with the same ranks before the ReLUs (unpolished copies of one minimum at a kink: a pool of
        starting points stays diverse)."""
        out: list[Minimum] = []
        for m in sorted(self.minima, key=lambda m: m.value):
            if len(out) == n:
                break
            if spread > 0 and any(o.ranks_Z == m.ranks_Z and m.value - o.value <= spread * abs(o.value) for o in out):
                continue
            out.append(m)
        return out

    def consolidate(self, n: int, rtol: float, deadline: float | None = None) -> int:
        """Polish the n lowest minima at their ReLU kinks and merge the ones that then agree; returns how many
        were polished (fewer than n when ``deadline``, a `time.perf_counter` time, passes: the first always runs).

        Solver endpoints at a ReLU kink stall short of the minimum (L-BFGS chatters across the kink), so copies of
        one minimum end with losses ~1e-4 apart and pass for distinct. `ufm._kinks.polish` finishes each on the
        smooth piece of its activation pattern (to kink-aware rel_grad <= ``rtol``); a polished point replaces the
        endpoint when its loss is not higher (status 0 when accepted), and minima that then have the same loss
        (``loss_rtol``) and Gram spectra (``spec_rtol``) are merged: counts add up, the first finder and time are
        kept. Deep ReLU models only (elsewhere there are no kinks: nothing is polished).
        """
        p = self.problem
        if n <= 0 or not (p.activation == "relu" and p.L >= 2) or not self.minima:
            return 0
        ordered = sorted(self.minima, key=lambda m: m.value)
        head: list[Minimum] = []
        for m in ordered[:n]:
            if head and deadline is not None and time.perf_counter() > deadline:
                break
            head.append(polish_minimum(p, m, rtol))
        n = len(head)
        merged: list[Minimum] = []
        for m in sorted(head, key=lambda m: m.value) + ordered[n:]:
            for i, o in enumerate(merged):
                if same_minimum(o, m.value, m.gram_spectra, self.loss_rtol, self.spec_rtol, converged=m.status == 0):
                    first = o if o.found_at <= m.found_at else m
                    merged[i] = o._replace(count=o.count + m.count, strategy=first.strategy, found_at=first.found_at)
                    break
            else:
                merged.append(m)
        self.minima = merged
        best = merged[0]
        self.offer(best.value, best.params)
        return len(head)


def polish_minimum(problem: UFM, m: Minimum, rtol: float) -> Minimum:
    """``m`` finished at its ReLU kinks by `ufm._kinks.polish` (unchanged where the polish does not lower it)."""
    prm = Params(
        jnp.asarray(m.params.H),
        tuple(jnp.asarray(W) for W in m.params.Ws),
        None if m.params.b is None else jnp.asarray(m.params.b),
    )
    res = polish(problem, prm, m.value, rtol)
    accepted = bool(res.accepted)
    value = float(objective(problem, res.params))
    if not (math.isfinite(value) and value <= m.value):
        return m
    f: Any = np.asarray  # NumPy arrays in Params, as the search keeps them (starts.as_numpy)
    q = res.params
    params = Params(f(q.H), tuple(f(W) for W in q.Ws), None if q.b is None else f(q.b))
    return moved(m, params, value, 0 if accepted else m.status, float(res.grad_norm), structure(problem, params))


def moved(m: Minimum, params: Params, value: float, status: int, grad_norm: float, st: dict) -> Minimum:
    """``m`` represented by another point ``params`` (its loss, solver status, gradient norm and `structure` ``st``);
    count, first finder and time kept."""
    return m._replace(
        value=value,
        status=status,
        grad_norm=grad_norm,
        ranks=st["ranks"],
        ranks_Z=st["ranks_Z"],
        gram_spectra=st["gram_spectra"],
        description=st["description"],
        params=params,
    )
