"""The master scalar problem of the linear UFMs (THEORY.md §0, §9.1) and its per-class form.

phi(s) = (1 - s)^2/2 + A s^{2/P}, s >= 0: one per singular value of the target (von Neumann), A = (P/2) N kappa
y^{2/P - 2}. `classwise` solves the bias-free problem class by class (THEORY §9.1), which is also the DNC point of
the deep ReLU UFM (THEORY §4.1, §9.5)."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from scipy.optimize import brentq

__all__ = ["Classwise", "classwise", "phi_min", "phi_threshold"]

_THRESH_RTOL = 1e-12  # |A - A*| <= this * A*: "threshold" (both the zero and the collapsed point are optimal)


def phi_threshold(P: int) -> float:
    """A*(P): the coefficient at which min_s phi(s) = (1-s)^2/2 + A s^{2/P} jumps to s = 0 (P >= 3).

    Derivation (THEORY §0, §9.1): at the transition phi(s) = 1/2 and phi'(s) = 0 with s > 0.
    phi'(s) = 0  <=>  (1 - s) s^{1-2/P} = 2A/P.  phi(s) = 1/2  <=>  (s^2 - 2s)/2 + A s^{2/P} = 0
    <=>  A s^{2/P} = s(2 - s)/2.  Substituting A s^{2/P} = (P/2)(1-s)s from the first into the second:
    (P/2)(1 - s) = (2 - s)/2  =>  s = (P-2)/(P-1), and A* = (P/2)(1-s)s^{1-2/P} = (P/2) s^{(P-2)/P}/(P-1).
    For P = 2 the transition is continuous at A = 1.
    """
    if P == 2:
        return 1.0
    s = (P - 2.0) / (P - 1.0)
    return (P / 2.0) * s ** ((P - 2.0) / P) / (P - 1.0)


def phi_min(A: float, P: int) -> tuple[float, float, str]:
    """Global minimiser and minimum of phi(s) = (1 - s)^2/2 + A s^{2/P} over s >= 0 (THEORY §0).

    * P = 2 (convex): s* = (1 - A)_+, phi* = A - A^2/2 (A < 1), else 1/2.
    * P >= 3: the positive stationary points solve g(s) = (1 - s) s^{1-2/P} = 2A/P; g is unimodal with its
      maximum at s_m = (P-2)/(2P-2), the root s+ in (s_m, 1) is the local minimum (found by bisection/Brent to
      machine precision), and it is global iff A < A*(P) (`phi_threshold`); otherwise s* = 0 (phi* = 1/2).

    Returns:
      (s*, phi*, regime) with regime "collapse" (s* > 0), "zero" (s* = 0) or "threshold" (A = A* to 1e-12
      relative: both s = 0 and s = (P-2)/(P-1) are global minimisers; s* reports the collapsed one).
    """
    A = float(A)
    if A < 0 or not np.isfinite(A):
        raise ValueError(f"phi_min: A must be finite and >= 0; got {A}")
    if A == 0.0:
        return 1.0, 0.0, "collapse"
    if P == 2:
        return (1.0 - A, A - A * A / 2.0, "collapse") if A < 1.0 else (0.0, 0.5, "zero")  # continuous at A = 1
    Astar = phi_threshold(P)
    if A > Astar * (1 + _THRESH_RTOL):
        return 0.0, 0.5, "zero"
    if A >= Astar * (1 - _THRESH_RTOL):
        return (P - 2.0) / (P - 1.0), 0.5, "threshold"
    e = 1.0 - 2.0 / P
    sm = (P - 2.0) / (2.0 * P - 2.0)
    target = 2.0 * A / P
    s = brentq(lambda x: (1.0 - x) * x**e - target, sm, 1.0, xtol=1e-16, rtol=4 * np.finfo(float).eps, maxiter=500)
    val = (1.0 - s) ** 2 / 2.0 + A * s ** (2.0 / P)
    return s, min(val, 0.5), "collapse"


class Classwise(NamedTuple):
    """The bias-free per-class optimum (THEORY §9.1): loss, per-class output scales s_k, the balanced factor
    singular values a[i, k] (i = 0: H, i = l: W_l), and the per-class regimes of `phi_min`."""

    loss: float
    s: np.ndarray
    a: np.ndarray
    regimes: list


def classwise(ns, lam_H: float, lam_W) -> Classwise:
    """Per-class optimum of the bias-free (deep) linear MSE UFM with class sizes ``ns`` (THEORY §9.1) — the DNC
    point of the deep ReLU UFM (THEORY §4.1, §9.5): A_k = (P/2) N kappa n_k^{1/P - 1}, P = len(lam_W) + 1,
    kappa = (lam_H prod lam_W)^{1/P}; sigma_k(factor i) = (kappa/mu_i)^{1/2} (sqrt(n_k) s_k)^{1/P}."""
    lam_W = np.asarray(lam_W, float)
    P = lam_W.size + 1
    ns = np.asarray(ns, float)
    N = ns.sum()
    mus = np.concatenate([[lam_H], lam_W])
    kappa = float(np.exp(np.mean(np.log(mus))))
    s = np.zeros(ns.size)
    vals = np.zeros(ns.size)
    regs = []
    for k in range(ns.size):
        A = P / 2.0 * N * kappa * ns[k] ** (1.0 / P - 1.0)
        s[k], vals[k], rk = phi_min(A, P)
        regs.append(rk)
    loss = float(np.sum(ns / N * vals))
    a = np.array([np.sqrt(kappa / mu) * (np.sqrt(ns) * s) ** (1.0 / P) for mu in mus])  # (P, K)
    return Classwise(loss, s, a, regs)
