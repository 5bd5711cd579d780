"""What `explore` returns: the `Exploration`, and its assembly from a finished search (the final checks)."""

from __future__ import annotations

import math
import time
from typing import NamedTuple

import jax.numpy as jnp

from .._checks import Report, check
from .._json import to_jsonable
from .._model import Params, objective
from .._problem import UFM
from .._theory import Prediction
from .minima import Ledger


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
      minima: the distinct minima (`Minimum`), lowest first.
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


class Setting(NamedTuple):
    """The fixed facts of one search: the problem, its prediction, the DNC loss, the explicit candidates."""

    problem: UFM
    prediction: Prediction
    dnc_loss: float
    explicit: dict  # name -> Params
    explicit_losses: dict  # name -> float
    dtype: object
    check_hessian: bool
    t0: float


def as_dtype(params: Params, dtype) -> Params:
    """The point as JAX arrays of ``dtype``."""
    f = lambda x: jnp.asarray(x, dtype)  # noqa: E731
    return Params(f(params.H), tuple(f(W) for W in params.Ws), None if params.b is None else f(params.b))


def ratio(value: float, dnc_loss: float) -> float:
    """value / the DNC loss, nan where the DNC loss is not defined."""
    return value / dnc_loss if math.isfinite(dnc_loss) and dnc_loss > 0 else math.nan


def assemble(s: Setting, params: Params, value: float, ledger: Ledger, trace, starts: int, rounds: int, message: str):
    """The `Exploration` of a finished search, with `ufm.check` of the best point against DNC and the prediction."""
    problem, pred = s.problem, s.prediction
    chk_dnc = chk_best = None
    if math.isfinite(s.dnc_loss):
        chk_dnc = check(problem, params, configuration="dnc", hessian=s.check_hessian, metrics=False)
    if math.isfinite(float(pred.loss)):
        chk_best = check(problem, params, pred, hessian=s.check_hessian, metrics=False)
    stats = {k: {kk: vv for kk, vv in v.items() if kk != "wins"} for k, v in ledger.stats.items()}
    return Exploration(
        params,
        value,
        ratio(value, s.dnc_loss),
        s.dnc_loss,
        s.explicit_losses,
        bool(pred.known),
        pred,
        tuple(sorted(ledger.minima, key=lambda m: m.value)),
        chk_dnc,
        chk_best,
        stats,
        tuple(trace),
        time.perf_counter() - s.t0,
        starts,
        rounds,
        message,
    )


def final_point(s: Setting, ledger: Ledger) -> tuple[Params, float]:
    """The best point (never above an explicit candidate), in the solve dtype, re-evaluated with `ufm.objective`."""
    for name, prm in s.explicit.items():
        ledger.offer(s.explicit_losses[name], prm)
    assert ledger.best_params is not None
    params = as_dtype(ledger.best_params, s.dtype)
    return params, float(objective(s.problem, params))
