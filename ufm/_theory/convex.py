"""Certified optima of the shallow UFMs whose reduction is a convex nuclear-norm program (THEORY.md §9.3, §9.4).

Two programs over a K x K matrix B (class coordinates, THEORY §9.0: class-mean logits M = B D^{-1/2}, D = diag(n)),
with c = sqrt(lam_W lam_H), N = sum n_k, w_k = n_k / N, u = sqrt(n)/sqrt(N):

* cross-entropy (Hong & Ling 2023, nuclear-norm convexification; THEORY §9.4), bias none / free / regularised:

      F(B, b) = sum_k w_k CE(B_k / sqrt(n_k) + b, t_k) + c ||B||_*  (+ lam_b/2 ||b||^2)

  with t_k the (label-smoothed) target of class k and CE(z, t) = -<t, z> + logsumexp(z);
* MSE with a regularised bias, the bias eliminated (THEORY §9.3), S = I - (1 - sqrt(mu)) u u^T, mu = lam_b/(1+lam_b):

      F(B) = 1/(2N) ||(B - D^{1/2}) S||_F^2 + c ||B||_*.

**Solver** (pure NumPy, float64): FISTA with the singular-value-thresholding prox and gradient-based adaptive
restart (O'Donoghue & Candès 2015), in the metric diag(a I_B, beta I_b) that bounds the Hessian of the smooth part
(CE: the softmax Hessian is <= I/2 per column, so sum_k w_k/2 ||dB_k/sqrt(n_k) + db||^2 <= ||dB||^2/N + ||db||^2,
a = 1/N, beta = 1 (+ lam_b); MSE: ||S|| = 1, a = 1/N), then a Newton polish of the Burer-Monteiro form
f(X, Y, b) = g(X Y^T, b) + c/2 (||X||^2 + ||Y||^2) at the rank r found by FISTA (its minimum equals F's at rank r,
THEORY §0 (F)), with the exact Hessian built from Hessian-vector products and a minimum-norm (pseudo-inverse) step
(the O(r) rotations and, for CE with a free bias, the shift b -> b + s 1 are flat directions).

**Certificate** (weak duality; the number that makes the optimum *known*): for every ||Lam||_2 <= c,
c ||B||_* >= <Lam, B>, so F >= inf_{B, b} [g(B, b) + <Lam, B>] =: G(Lam). In closed form:

* CE: G(Lam) = sum_k w_k Ent(q_k) - ||Lam sqrt(n)||^2 / (2 lam_b) [reg bias], with q_k = t_k - N Lam_k / sqrt(n_k)
  which must lie in the probability simplex (else G = -inf), Ent(q) = -sum q log q, and Lam sqrt(n) = 0 required
  with a free bias (no term without a bias). Derivation: per column, inf_z w_k [CE(z, t_k) + <N Lam_k/sqrt(n_k), z>]
  = -w_k lse^*(t_k - N Lam_k/sqrt(n_k)) = w_k Ent(q_k); the bias enters as -<Lam sqrt(n), b> (+ lam_b/2||b||^2).
* MSE: G(Lam) = <Lam, D^{1/2}> - (N/2) ||Lam S^{-1}||^2 (minimise 1/(2N)||(B - T)S||^2 + <Lam, B> over B:
  B = T - N Lam S^{-2}, T = D^{1/2}), S^{-1} = I + (1/sqrt(mu) - 1) u u^T.

The dual point is the better (larger G) of two feasible candidates built from Lam0 = -grad_B g at the primal point:
tau Lam0, and tau lift(Lam0) (`lift_to_c`: the singular values within 1e-4 of c set to c, those above clipped; it
makes the gap second order in the primal error, where scaling alone leaves a first-order gap ~ eps c ||B||_*). Both
are projected onto the feasible subspace (column sums 0, so every q_k sums to one; Lam u = 0 with a free bias:
orthogonal projections, which do not increase ||Lam||_2), and tau <= 1 is the largest scale keeping ||Lam||_2 <= c
and q_k >= 0. The relative duality gap (F(B, b) - G(Lam)) / |F(B, b)| bounds the relative
error of the reported optimum. It is evaluated twice, as F - G and as a sum of non-negative terms (Fenchel-Young:
KL divergences and c ||B||_* - <Lam, B>, see `_ce_smooth.gap`), and the larger value is reported.

**Accuracy at small c** (imbalanced classes, the regime of minority collapse as c grows): the optimum F ~ c log(1/c)
vanishes with c while the logits grow like log(1/c), so every term must keep its *relative* precision. The
log-probability of the confident class is (z_k - max z) - log1p(sum of the others), never (max z + log1p(...))
subtracted from z_k (that rounds to the ulp of max z ~ 20: an absolute error 4e-15 per column, the relative gaps
1e-10 .. 1e-8 at c = 1e-6 .. 1e-8 of round 4, and a gradient too noisy for the Newton polish's line search); with a
free bias the smooth part reads B (I - u u^T) (`_ce_smooth.in_subspace`). Measured on 120 random instances per c
(K = 2..6, n_k = 1..24, bias none/free/regularised with lam_b = 0.3, label smoothing 0/0.1): every one certified,
relative gap <= 6.2e-12, for c = 1e-1 .. 1e-11; at c = 1e-12 the 20 with a regularised bias and no smoothing fail
(gap 3e-3 .. 3e-2: the Newton polish does not converge from FISTA's point), the other 100 certify.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

try:  # BLAS threads only slow down the small dense algebra here (56x for a 190 x 190 eigh on a loaded 2-core box)
    from threadpoolctl import threadpool_limits
except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn; without it BLAS keeps its threads
    threadpool_limits = None

__all__ = ["ConvexCertificate", "ConvexSolution", "ce_targets", "solve_ce", "solve_mse_regbias"]

GAP_RTOL = 1e-10  # the certificate's requirement: relative duality gap <= this


class ConvexCertificate(NamedTuple):
    """A primal/dual pair of the convex reduction and its duality gap (weak duality: dual <= optimum <= primal).

    Attributes:
      primal: F(B, b), the objective at the primal point (= the full UFM objective of `construct`'s parameters).
      dual: G(Lam), the dual objective at the dual point: a rigorous lower bound on the optimum.
      gap: primal - dual: the larger of F - G and its evaluation as a sum of non-negative terms (module docstring);
        >= 0 up to round-off.
      rel_gap: gap / |primal|.
      method: how the points were found (solver, iterations).
      B: the primal point (K x K, class coordinates: the class-mean outputs are B D^{-1/2} + b 1^T).
      b: the primal bias (K,) for cross-entropy with a bias, else None (MSE: eliminated in closed form).
      Lam: the dual point (K x K), ||Lam||_2 <= c.
    """

    primal: float
    dual: float
    gap: float
    rel_gap: float
    method: str
    B: np.ndarray
    b: np.ndarray | None
    Lam: np.ndarray


class ConvexSolution(NamedTuple):
    """The solution of a convex reduction: the certificate and whether its gap meets ``GAP_RTOL``."""

    certificate: ConvexCertificate
    certified: bool
    rank: int


# ----------------------------------------------------------------------------------------------------------------
# Smooth parts: value, gradient, Hessian-vector product, dual
# ----------------------------------------------------------------------------------------------------------------


def _logsoftmax(Z):
    """Column-wise log softmax, accurate for confident columns: (Z - m) - log1p(sum of the other terms), m the
    column max, so the log-probability of the largest logit keeps its relative precision when it is close to 0
    (Z - (m + log1p(...)) rounds it to the ulp of m: see the module docstring, "Accuracy at small c")."""
    m = Z.max(axis=0)
    E = np.exp(Z - m)
    E[Z.argmax(axis=0), np.arange(Z.shape[1])] = 0.0
    return (Z - m) - np.log1p(E.sum(axis=0))


def _p_minus_t(logp, T):
    """softmax - target, with p - 1 = expm1(log p) where the target is 1 (no cancellation for confident columns:
    the gradient keeps its relative precision, and with it the dual point)."""
    D = np.exp(logp) - T
    one = T == 1.0
    D[one] = np.expm1(logp[one])
    return D


def _q_logq(T, Y):
    """q = T + Y (clipped at 0: round-off only) and log q, with log q = log1p(Y) where the target is 1. Forming
    1 + Y first loses Y's relative precision: an absolute error eps in log q per confident column, against an
    optimum F ~ c log(1/c) that vanishes with c = sqrt(lam_W lam_H): a relative-gap floor ~ eps / (c log(1/c))
    (balanced classes at c = 1e-7 .. 1e-8 gave negative gaps, -4e-12 .. -2e-11, before)."""
    q = np.clip(T + Y, 0.0, None)
    one = T == 1.0
    with np.errstate(divide="ignore", invalid="ignore"):
        logq = np.where(q > 0, np.log(np.where(q > 0, q, 1.0)), -np.inf)
        logq[one] = np.log1p(np.maximum(Y[one], -1.0))
    return q, logq


def _entropy(q, logq):
    """-sum q log q per column (0 log 0 = 0)."""
    return -np.where(q > 0, q * np.where(q > 0, logq, 0.0), 0.0).sum(axis=0)


def lift_to_c(Lam, c, rtol=1e-4):
    """Lam with its singular values within ``rtol`` of c set to c and those above c clipped to c.

    At the optimum the dual point has singular value exactly c on the primal's active directions (c ||B||_* =
    <Lam, B>); the gradient of a nearly stationary primal point has them at c (1 +- eps), and scaling it into the
    ball by tau = c / sigma_max leaves a gap of first order, ~ eps c ||B||_*. Lifting them to c makes the gap second
    order in the primal error. Weak duality does not care how Lam was found: it is one more feasible candidate.
    """
    U, s, Vt = np.linalg.svd(Lam)
    s = np.where(np.abs(s / c - 1.0) <= rtol, c, np.minimum(s, c))
    return (U * s) @ Vt


class _Smooth(NamedTuple):
    value: Callable[..., Any]  # (B, b) -> float
    grad: Callable[..., Any]  # (B, b) -> (G_B, G_b)
    hvp: Callable[..., Any]  # (B, b, dB, db) -> (dG_B, dG_b)
    dual: Callable[..., Any]  # (B, b) -> (G(Lam), Lam)
    gap: Callable[..., Any]  # (B, b, Lam) -> F - G as a sum of non-negative terms (no cancellation between F and G)
    canonical: Callable[..., Any]  # (B, b) -> the same logits with B in the subspace the smooth part reads
    a: float  # curvature bound on B
    beta: float  # curvature bound on b
    has_b: bool


def _ce_smooth(ns, T, c, bias, lam_b) -> _Smooth:
    ns = np.asarray(ns, float)
    N = ns.sum()
    w = ns / N
    sq = np.sqrt(ns)
    lb = lam_b if bias == "reg" else 0.0

    def logits(B, b):
        Z = in_subspace(B) / sq
        return Z + b[:, None] if b is not None else Z

    def value(B, b):
        f = -np.sum(w * np.sum(T * _logsoftmax(logits(B, b)), axis=0))
        return f + (lb / 2 * float(b @ b) if b is not None else 0.0)

    u = sq / np.sqrt(N)

    def in_subspace(M):
        # free bias: (B, b) and (B + v sqrt(n)^T, b - v) give the same logits, and B -> B (I - u u^T) (the shift
        # absorbed into b) never increases ||B||_*, so the optimum lies on {B u = 0}. With a free bias the smooth part
        # reads B (I - u u^T) (value, gradient and Hessian consistently), the direction B u is flat for it, and
        # `canonical` maps a point onto the subspace before it is certified. Without this the direction is flat
        # but for c ||B||_*, a condition number ~ c that stalls FISTA and the Newton polish at c ~ 1e-9 with
        # label smoothing (relative gaps 1e-10 .. 2e-9 there before).
        return M - np.outer(M @ u, u) if bias == "free" else M

    def grad(B, b):
        Gl = _p_minus_t(_logsoftmax(logits(B, b)), T) * w
        Gb = Gl.sum(axis=1) + lb * b if b is not None else None
        return in_subspace(Gl / sq), Gb

    def hvp(B, b, dB, db):
        Z = logits(B, b)
        P = np.exp(_logsoftmax(Z))
        dZ = in_subspace(dB) / sq + (db[:, None] if db is not None else 0.0)
        # softmax Hessian: p o (dz - <p, dz>), with dz measured from its value at the largest logit, so that
        # the entry of a confident class, p_k sum_{j != k} p_j (dz_k - dz_j), has no cancellation
        cols = np.arange(Z.shape[1])
        rel = dZ - dZ[Z.argmax(axis=0), cols]
        dGl = P * (rel - np.sum(P * rel, axis=0)) * w
        return in_subspace(dGl / sq), (dGl.sum(axis=1) + lb * db if db is not None else None)

    def scaled(Lam):
        """(G(tau Lam), tau Lam), tau <= 1 the largest scale keeping ||tau Lam||_2 <= c and q = T + tau D >= 0."""
        tau = min(1.0, c / max(np.linalg.norm(Lam, 2), 1e-300))
        D = -N * Lam / sq
        neg = D < 0
        if np.any(neg):
            tau = min(tau, float(np.min(T[neg] / -D[neg])))
        G = float(np.sum(w * _entropy(*_q_logq(T, tau * D))))
        if bias == "reg":
            v = tau * (Lam @ sq)
            G -= float(v @ v) / (2 * lam_b)
        return G, tau * Lam

    def feasible(Lam):
        # column sums 0 (q_k sums to 1) and, with a free bias, Lam sqrt(n) = 0: orthogonal projections on both
        # sides, which do not increase ||Lam||_2
        Lam = Lam - Lam.mean(axis=0)
        return in_subspace(Lam)

    def dual(B, b):
        Lam = feasible(-grad(B, b)[0])
        return max(scaled(Lam), scaled(feasible(lift_to_c(Lam, c))), key=lambda g: g[0])

    def gap(B, b, Lam):
        # Fenchel-Young per column: CE(z, t) - Ent(q) = KL(q || softmax z) - <t - q, z>, and
        # sum_k w_k <t_k - q_k, z_k> = <Lam, B> + <Lam sqrt(n), b>, so
        # F - G = sum_k w_k KL(q_k || p_k) + (c ||B||_* - <Lam, B>) [+ ||lam_b b - Lam sqrt(n)||^2 / (2 lam_b)]
        q, logq = _q_logq(T, -N * Lam / sq)
        logp = _logsoftmax(logits(B, b))
        kl = np.where(q > 0, q * (np.where(q > 0, logq, 0.0) - logp), 0.0).sum(axis=0)
        out = float(np.sum(w * kl)) + (c * float(np.sum(np.linalg.svd(B, compute_uv=False))) - float(np.sum(Lam * B)))
        if bias == "reg":
            v = lam_b * b - Lam @ sq
            out += float(v @ v) / (2 * lam_b)
        return out

    return _Smooth(value, grad, hvp, dual, gap, lambda B, b: (in_subspace(B), b), 1.0 / N, 1.0 + lb, bias != "none")


def _mse_smooth(ns, c, lam_b) -> _Smooth:
    ns = np.asarray(ns, float)
    N = ns.sum()
    K = ns.size
    u = np.sqrt(ns / N)
    mu = lam_b / (1.0 + lam_b)
    S2 = np.eye(K) - (1.0 - mu) * np.outer(u, u)  # S^2 (S = I - (1 - sqrt(mu)) u u^T)
    Sinv = np.eye(K) + (1.0 / np.sqrt(mu) - 1.0) * np.outer(u, u)
    T = np.diag(np.sqrt(ns))

    def value(B, b):
        R = (B - T) @ (np.eye(K) - (1.0 - np.sqrt(mu)) * np.outer(u, u))
        return float(np.sum(R * R)) / (2 * N)

    def grad(B, b):
        return (B - T) @ S2 / N, None

    def hvp(B, b, dB, db):
        return dB @ S2 / N, None

    def value_at(Lam):
        LS = Lam @ Sinv
        return float(np.sum(Lam * T) - N / 2 * np.sum(LS * LS)), Lam

    def dual(B, b):
        Lam = -grad(B, b)[0]
        scaled = Lam * min(1.0, c / max(np.linalg.norm(Lam, 2), 1e-300))
        return max(value_at(scaled), value_at(lift_to_c(Lam, c)), key=lambda g: g[0])

    def gap(B, b, Lam):
        # with R = (B - T) S: F - G = 1/(2N) ||R + N Lam S^{-1}||^2 + (c ||B||_* - <Lam, B>), because
        # <R, Lam S^{-1}> = <B - T, Lam> (S symmetric)
        E = (B - T) @ (np.eye(K) - (1.0 - np.sqrt(mu)) * np.outer(u, u)) + N * Lam @ Sinv
        return float(np.sum(E * E)) / (2 * N) + (
            c * float(np.sum(np.linalg.svd(B, compute_uv=False))) - float(np.sum(Lam * B))
        )

    return _Smooth(value, grad, hvp, dual, gap, lambda B, b: (B, b), 1.0 / N, 1.0, False)


def _objective(sm: _Smooth, c, B, b):
    return sm.value(B, b) + c * float(np.sum(np.linalg.svd(B, compute_uv=False)))


def _certificate(sm: _Smooth, c, B, b, method) -> ConvexCertificate:
    B, b = sm.canonical(B, b)
    F = _objective(sm, c, B, b)
    G, Lam = sm.dual(B, b)
    gap = max(sm.gap(B, b, Lam), F - G) if np.isfinite(G) else math.inf  # the larger of two evaluations of F - G
    return ConvexCertificate(F, G, gap, gap / max(abs(F), 1e-300), method, B, b, Lam)


# ----------------------------------------------------------------------------------------------------------------
# FISTA with SVT prox and adaptive restart
# ----------------------------------------------------------------------------------------------------------------


def _svt(X, t):
    U, s, Vt = np.linalg.svd(X)
    s = np.maximum(s - t, 0.0)
    return (U * s) @ Vt


def _fista(sm: _Smooth, c, K, max_iter, B=None, b=None, check_every=25, rtol=1e-13):
    """FISTA from (B, b) (default 0) until the certificate's relative gap is <= rtol or max_iter iterations."""
    B = np.zeros((K, K)) if B is None else B
    b = (np.zeros(K) if b is None else b) if sm.has_b else None
    YB, Yb = B, b
    t = 1.0
    best = None
    for it in range(1, max_iter + 1):
        GB, Gb = sm.grad(YB, Yb)
        Bn = _svt(YB - GB / sm.a, c / sm.a)
        bn = Yb - Gb / sm.beta if sm.has_b else None
        # gradient restart: the step and the momentum point away from each other
        gen = np.sum((YB - Bn) * (Bn - B)) + (float((Yb - bn) @ (bn - b)) if sm.has_b else 0.0)
        if gen > 0:
            t = 1.0
        tn = (1.0 + np.sqrt(1.0 + 4.0 * t * t)) / 2.0
        mom = (t - 1.0) / tn
        YB = Bn + mom * (Bn - B)
        Yb = bn + mom * (bn - b) if sm.has_b else None
        B, b, t = Bn, bn, tn
        if it % check_every == 0:
            cert = _certificate(sm, c, B, b, "")
            if best is None or cert.rel_gap < best.rel_gap:
                best = cert
            if cert.rel_gap <= rtol:
                break
    return B, b, it


# ----------------------------------------------------------------------------------------------------------------
# Burer-Monteiro Newton polish at a fixed rank
# ----------------------------------------------------------------------------------------------------------------


def _bm_polish(sm: _Smooth, c, B, b, r, iters=30):
    K = B.shape[0]
    U, s, Vt = np.linalg.svd(B)
    X = U[:, :r] * np.sqrt(s[:r])
    Y = Vt[:r].T * np.sqrt(s[:r])
    nb = K if sm.has_b else 0
    n = 2 * K * r + nb

    def split(x):
        X = x[: K * r].reshape(K, r)
        Y = x[K * r : 2 * K * r].reshape(K, r)
        return X, Y, (x[2 * K * r :] if sm.has_b else None)

    def f(x):
        X, Y, bb = split(x)
        return sm.value(X @ Y.T, bb) + c / 2 * (np.sum(X * X) + np.sum(Y * Y))

    def g(x):
        X, Y, bb = split(x)
        GB, Gb = sm.grad(X @ Y.T, bb)
        parts = [(GB @ Y + c * X).ravel(), (GB.T @ X + c * Y).ravel()]
        if sm.has_b:
            parts.append(Gb)
        return np.concatenate(parts)

    def hess(x):
        X, Y, bb = split(x)
        Bx = X @ Y.T
        GB, _ = sm.grad(Bx, bb)
        H = np.empty((n, n))
        E = np.eye(n)
        for i in range(n):
            dX, dY, db = split(E[i])
            dGB, dGb = sm.hvp(Bx, bb, dX @ Y.T + X @ dY.T, db)
            parts = [(dGB @ Y + GB @ dY + c * dX).ravel(), (dGB.T @ X + GB.T @ dX + c * dY).ravel()]
            if sm.has_b:
                parts.append(dGb)
            H[:, i] = np.concatenate(parts)
        return (H + H.T) / 2

    x = np.concatenate([X.ravel(), Y.ravel()] + ([b] if sm.has_b else []))
    fx, gx = f(x), g(x)
    for _ in range(iters):
        gn = np.linalg.norm(gx)
        if gn == 0.0:
            break
        lam, Q = np.linalg.eigh(hess(x))
        keep = np.abs(lam) > 1e-10 * np.abs(lam).max()
        step = -Q[:, keep] @ ((Q[:, keep].T @ gx) / np.abs(lam[keep]))
        for ls in range(30):
            xn = x + 0.5**ls * step
            fn, gnew = f(xn), g(xn)
            # a decrease, or (at the round-off level of f) a clear decrease of the exact gradient
            if fn < fx or (fn <= fx + 1e-12 * abs(fx) and np.linalg.norm(gnew) < 0.9 * gn):
                break
        else:
            break
        x, fx, gx = xn, fn, gnew
        if np.linalg.norm(gx) < 1e-15 * max(1.0, abs(fx)):
            break
    X, Y, bb = split(x)
    return X @ Y.T, bb


# ----------------------------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------------------------


MAX_POLISH_VARS = 1500  # the polish builds a dense Hessian of 2 K r (+ K) variables: above this it is skipped


def _ranks(sm: _Smooth, c, B, b) -> list:
    """Candidate ranks of the optimum: the primal rank (SVT gives exact zeros) and the number of directions where
    the dual bound ||grad_B g||_2 <= c is active (they differ only near a rank change)."""
    s = np.linalg.svd(B, compute_uv=False)
    sg = np.linalg.svd(sm.grad(B, b)[0], compute_uv=False)
    primal = int(np.sum(s > 1e-12 * max(s.max(initial=0.0), 1e-300)))
    return list(dict.fromkeys([primal, int(np.sum(sg >= c * (1 - 1e-6)))]))


def _solve(sm: _Smooth, c, K, max_iter, stages=(300, 2000)) -> ConvexSolution:
    with threadpool_limits(1) if threadpool_limits is not None else contextlib.nullcontext():
        return _solve_staged(sm, c, K, max_iter, stages)


def _solve_staged(sm: _Smooth, c, K, max_iter, stages) -> ConvexSolution:
    """FISTA in stages (to 300, 2000, then ``max_iter`` iterations, each stage continuing the last; FISTA stops
    early once the gap is <= 1e-13), after each stage the Newton polish at the candidate ranks; stops as soon as the
    gap is <= GAP_RTOL/2. The best certificate wins."""
    B, b, its = None, None, 0
    cert: ConvexCertificate | None = None
    polished = False  # a FISTA point can certify the value (the gap is quadratic after `lift_to_c`) while its
    # gradient is still ~1e-8: `construct` builds the model's optimum from the certificate's B, so the Newton polish
    # runs at least once and its point is kept whenever it certifies (construct then has gradient <= 1e-10, test_theory)
    for target in [t for t in stages if t < max_iter] + [max_iter]:
        B, b, more = _fista(sm, c, K, target - its, B, b)
        its += more
        cf = _certificate(sm, c, B, b, f"FISTA ({its} iterations)")
        cert = cf if cert is None or cf.rel_gap < cert.rel_gap else cert
        for r in _ranks(sm, c, B, b):
            if (polished and cert.rel_gap <= GAP_RTOL / 2) or 2 * K * r + K > MAX_POLISH_VARS:
                break
            Bp, bp = _bm_polish(sm, c, B, b, r)
            polished = True
            cp = _certificate(sm, c, Bp, bp, f"FISTA ({its} iterations) + Burer-Monteiro Newton polish at rank {r}")
            cert = cp if cp.rel_gap < cert.rel_gap or cp.rel_gap <= GAP_RTOL / 2 else cert
        if cert.rel_gap <= GAP_RTOL / 2 or its < target:  # certified, or FISTA itself converged (gap <= 1e-13)
            break
    assert cert is not None  # at least one stage ran
    s = np.linalg.svd(cert.B, compute_uv=False)
    rank = int(np.sum(s > 1e-12 * max(s.max(initial=0.0), 1e-300)))
    return ConvexSolution(cert, bool(cert.rel_gap <= GAP_RTOL), rank)


def ce_targets(K: int, alpha: float) -> np.ndarray:
    """Target matrix T (K x K), column k = t_k = (1 - alpha) e_k + alpha/K 1 (label smoothing alpha)."""
    return (1.0 - alpha) * np.eye(K) + alpha / K


def solve_ce(ns, c: float, *, bias: str = "none", lam_b: float = 0.0, alpha: float = 0.0, max_iter: int = 20000):
    """Solve and certify the shallow CE reduction (THEORY §9.4, see the module docstring).

    Args:
      ns: class sizes (n_1..n_K).
      c: sqrt(lam_W lam_H).
      bias: "none", "free" or "reg" (then lam_b > 0).
      alpha: label smoothing.
      max_iter: FISTA iteration cap.

    Returns:
      A `ConvexSolution`.
    """
    K = len(ns)
    return _solve(_ce_smooth(ns, ce_targets(K, alpha), c, bias, lam_b), c, K, max_iter)


def solve_mse_regbias(ns, c: float, lam_b: float, *, max_iter: int = 20000) -> ConvexSolution:
    """Solve and certify the shallow MSE reduction with a regularised bias (THEORY §9.3, module docstring)."""
    return _solve(_mse_smooth(ns, c, lam_b), c, len(ns), max_iter)
