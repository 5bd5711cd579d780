"""Linear UFMs in class coordinates (THEORY.md §0-3, §9.0-9.4, §9.7): the optimum is B = U diag(sig) V^T (K x K)
and a bias; its balanced factorisation gives every layer (THEORY §0 (F)).

Closed forms: MSE with bias none / free (per-direction scalar problems, any depth, imbalanced, narrow), MSE with a
regularised bias (balanced; imbalanced when B0 is PSD), balanced CE with label smoothing. Convex reductions
(certified numerically by `convex`): imbalanced shallow CE and imbalanced shallow MSE with a regularised bias."""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from .._problem import UFM
from . import convex
from .prediction import (
    REF_CONVEX,
    REF_DANG,
    REF_GUO,
    REF_HONG,
    REF_NARROW,
    REF_REGIMB,
    REF_ZHOU,
    REF_ZHU,
    Prediction,
    pad,
    sv_len,
    unknown,
)
from .scalar import phi_min, phi_threshold


class Linear(NamedTuple):
    U: np.ndarray  # K x r
    sig: np.ndarray  # r, > 0
    V: np.ndarray  # K x r
    b: np.ndarray | None
    P: int


class LinearOptimum(NamedTuple):
    """A linear UFM's optimum in class coordinates, before `from_linear` turns it into a `Prediction`."""

    known: bool
    loss: float
    regime: str
    structure: str
    reference: str
    reason: str
    sol: Linear
    target: str | None  # class-mean structure name of every layer (all factors are aligned), see Prediction
    control: str
    cval: float  # control value
    cthr: float  # control threshold
    b_known: bool = True  # False: b is not unique (CE with a free bias)
    gram_unique: bool = True  # False: tied directions cut by a rank cap (only spectra and the loss are determined)
    certificate: convex.ConvexCertificate | None = None
    collapsed: tuple = ()


class Spectra(NamedTuple):
    """Singular values, norms and Gram matrices of every layer of a balanced factorisation (see `Prediction`)."""

    sv_W: tuple
    sv_H: tuple
    sv_out: np.ndarray
    norms_W: np.ndarray
    norms_H: np.ndarray
    gram_H: tuple
    gram_W: np.ndarray


def _linear_numbers(problem: UFM, sol: Linear, lam_H: float, lam_W: np.ndarray, *, b_known=True) -> Spectra:
    """Spectra, norms and Grams of the balanced factorisation of B (THEORY §0 (F), §9.0 inverse maps).

    Factor i (i = 0: H, i = l: W_l) has singular values f_i = (kappa/mu_i)^{1/2} sig^{1/P} (mu_0 = lam_H,
    mu_l = lam_W_l), H_{l} = W_{l-1}...W_1 H has prod_{i<l} f_i, the output sigma(B + b sqrt(n)^T).
    Class means of H_l: M_l = Q_l diag(prod f) V^T D^{-1/2}, so M_l^T M_l = D^{-1/2} V diag(prod f)^2 V^T D^{-1/2};
    W_L W_L^T = U diag(f_L^2) U^T.
    """
    P, L, K = sol.P, problem.L, problem.K
    mus = np.concatenate([[lam_H], lam_W])
    kappa = np.exp(np.mean(np.log(mus)))
    f = [np.sqrt(kappa / mu) * sol.sig ** (1.0 / P) for mu in mus]
    lw, lh = sv_len(problem)
    sv_W = tuple(pad(f[l + 1], lw[l]) for l in range(L))
    prods = [np.prod(f[: l + 1], axis=0) for l in range(L)]  # prods[l] = sigma(H_{l+1})
    sv_H = tuple(pad(prods[l], lh[l]) for l in range(L))
    sqn = np.sqrt(np.asarray(problem.class_sizes, float))
    Bm = (sol.U * sol.sig) @ sol.V.T
    if sol.b is not None and b_known:
        out = np.linalg.svd(Bm + np.outer(sol.b, sqn), compute_uv=False)
    elif sol.b is not None:
        out = np.full(K, np.nan)
    else:
        out = pad(sol.sig, K)
    gram_H = tuple(((sol.V / sqn[:, None]) * prods[l] ** 2) @ (sol.V / sqn[:, None]).T for l in range(L))
    gram_W = (sol.U * f[L] ** 2) @ sol.U.T
    return Spectra(
        sv_W=sv_W,
        sv_H=sv_H,
        sv_out=pad(out, K),
        norms_W=np.array([np.sqrt(np.sum(f[l + 1] ** 2)) for l in range(L)]),
        norms_H=np.array([np.sqrt(np.sum(prods[l] ** 2)) for l in range(L)]),
        gram_H=gram_H,
        gram_W=gram_W,
    )


def _centred_basis(K: int) -> np.ndarray:
    """An orthonormal basis (K x (K-1)) of the complement of the all-ones vector (Helmert-type, exact)."""
    Q = np.zeros((K, K - 1))
    for j in range(1, K):
        Q[:j, j - 1] = 1.0
        Q[j, j - 1] = -float(j)
        Q[:, j - 1] /= np.sqrt(j * (j + 1.0))
    return Q


def _directions(problem: UFM):
    """Singular triples (y, p, q) of the MSE target T in class coordinates, sorted by y descending.

    bias none: T = D^{1/2} (p = q = e_k, y = sqrt(n_k), exact); free bias: T = D^{1/2}(I - u u^T) (its K-1 nonzero
    singular values solve the secular equation of THEORY §9.2; computed by an SVD)."""
    ns = np.asarray(problem.class_sizes, float)
    K = problem.K
    if problem.bias == "none":
        order = np.argsort(-ns, kind="stable")
        I = np.eye(K)
        return np.sqrt(ns[order]), I[:, order], I[:, order]
    N = ns.sum()
    u = np.sqrt(ns / N)
    if problem.balanced:  # exact: T = sqrt(n) (I - J/K) = sqrt(n) Q Q^T
        Q = _centred_basis(K)
        return np.full(K - 1, np.sqrt(ns[0])), Q, Q
    T = np.diag(np.sqrt(ns)) @ (np.eye(K) - np.outer(u, u))
    Uu, y, Vt = np.linalg.svd(T)
    return y[: K - 1], Uu[:, : K - 1], Vt[: K - 1].T


class _MseControl(NamedTuple):
    control: str
    cval: float
    cthr: float
    C_bal: float  # C = (n lam_H prod lam_W)^{1/P} for balanced classes, else nan


def _mse_control(problem: UFM, lam_H, lam_W) -> _MseControl:
    """The regime parameter of the linear MSE UFM: rho = K C (P = 2) or C (P >= 3), and its zero threshold."""
    K, P = problem.K, problem.L + 1
    ns = np.asarray(problem.class_sizes, float)
    C_bal = (ns[0] * lam_H * np.prod(lam_W)) ** (1.0 / P) if problem.balanced else math.nan
    if P == 2:
        control = "rho = K sqrt(n lam_W lam_H) (zero regime iff rho >= 1)"
        cval, cthr = (K * C_bal, 1.0) if problem.balanced else (math.nan, math.nan)
    else:
        control = "C = (n lam_H prod lam_W)^{1/P}, P = L+1 (zero regime iff C >= C* = A*(P)/(K P/2))"
        cval, cthr = (C_bal, phi_threshold(P) / (K * P / 2.0)) if problem.balanced else (math.nan, math.nan)
    return _MseControl(control, cval, cthr, C_bal)


def mse_linear(problem: UFM, lam_H, lam_W, lam_b) -> Prediction | LinearOptimum:
    """The linear MSE UFM (THEORY §1, §3, §9.1-9.3, §9.7): by bias and class balance."""
    ctl = _mse_control(problem, lam_H, lam_W)
    if problem.bias == "reg" and not problem.balanced:
        return _mse_regbias_imbalanced(problem, lam_H, lam_W, lam_b, ctl)
    if problem.bias == "reg" and min(problem.widths) >= problem.K:
        return _mse_regbias_balanced(problem, lam_b, ctl)
    return _mse_by_direction(problem, lam_H, lam_W, lam_b, ctl)


def _mse_regbias_imbalanced(problem: UFM, lam_H, lam_W, lam_b, ctl: _MseControl) -> Prediction | LinearOptimum:
    """Shallow MSE, regularised bias, unequal classes (THEORY §9.3): closed form when B0 is PSD, else convex."""
    K, P = problem.K, problem.L + 1
    ns = np.asarray(problem.class_sizes, float)
    N = ns.sum()
    dmin = min(problem.widths)
    ref = REF_ZHOU if P == 2 else REF_DANG
    control, cval, cthr = ctl.control, ctl.cval, ctl.cthr
    reasons: list = []
    if P != 2:
        why = "deep linear UFM with a regularised bias and unequal class sizes is not treated in THEORY.md (§9.9)"
        return unknown(problem, why, ref, control=control)
    # THEORY §9.3: B0 = D^{1/2} - N c (I + u u^T / lam_b); if B0 is PSD the fit gradient at B0 is -c I, and
    # I is in the subdifferential of ||.||_* at every PSD matrix, so B0 is optimal (convex problem).
    # Otherwise (or with narrow features) the convex program is solved and certified (ufm/_theory/convex.py).
    c = np.sqrt(lam_W[0] * lam_H)
    u = np.sqrt(ns / N)
    B0 = np.diag(np.sqrt(ns)) - N * c * (np.eye(K) + np.outer(u, u) / lam_b)
    w, Vv = np.linalg.eigh(B0)
    if w.min() < -1e-12 * np.abs(w).max() or dmin < K:
        return _convex_linear(problem, lam_H, lam_W, lam_b, 0.0)
    w = np.clip(w, 0.0, None)
    loss = c * np.sum(np.sqrt(ns)) - N * c * c / 2.0 * (K + 1.0 / lam_b)
    b = -(B0 - np.diag(np.sqrt(ns))) @ np.sqrt(ns) / (N * (1.0 + lam_b))
    sol = Linear(Vv, w, Vv, b, 2)
    return LinearOptimum(
        known=True,
        loss=float(loss),
        regime="collapse",
        structure="all classes active; class means coupled (not orthogonal, not an ETF): M^T M = "
        "sqrt(lam_W/lam_H) D^{-1/2} B0 D^{-1/2}, W W^T = sqrt(lam_H/lam_W) B0 (THEORY §9.3)",
        reference=ref + "; " + REF_REGIMB,
        reason="; ".join(reasons),
        sol=sol,
        target=None,
        control=control,
        cval=cval,
        cthr=cthr,
    )


def _mse_regbias_balanced(problem: UFM, lam_b, ctl: _MseControl) -> LinearOptimum:
    """MSE, regularised bias, balanced, full width (THEORY §1): the class-symmetric point (a proof for P = 2)."""
    K, P = problem.K, problem.L + 1
    ns = np.asarray(problem.class_sizes, float)
    ref = REF_ZHOU if P == 2 else REF_DANG
    control, cval, cthr, C_bal = ctl
    mu = lam_b / (1.0 + lam_b)
    reasons: list = []
    # balanced, full width: candidate B = sqrt(n) [a P_c + g u u^T] (THEORY §1; class-symmetric). The fit is
    # [(K-1)(a-1)^2 + mu (g-1)^2]/(2K), the penalty (P/2) C [(K-1) a^{2/P} + g^{2/P}], so per direction
    # phi(a; A) and mu phi(g; A/mu) with A = (P/2) K C.  P = 2: convex + symmetric => global (THEORY §1).
    A = P / 2.0 * K * C_bal
    a, fa, ra = phi_min(A, P)
    g, fg, rg = phi_min(A / mu, P)
    loss = ((K - 1) * fa + mu * fg) / K
    Q = _centred_basis(K)
    uu = np.full((K, 1), 1 / np.sqrt(K))
    Uq = np.concatenate([Q, uu], axis=1)
    sig = np.sqrt(ns[0]) * np.concatenate([np.full(K - 1, a), [g]])
    keep = sig > 0
    b = np.full(K, (1.0 - g) / (K * (1.0 + lam_b)))
    sol = Linear(Uq[:, keep], sig[keep], Uq[:, keep], b, P)
    regs = {ra, rg}
    regime = "zero" if a == 0 and g == 0 else ("threshold" if "threshold" in regs else "collapse")
    if regime == "zero":
        structure = f"all-zero features and weights; b = 1/(K(1+lam_b)) 1 = {b[0]:.6g} 1"
    elif g > 0:
        structure = (
            "centred class means form a simplex ETF; uncentred means = a ETF + g (mean direction), "
            f"a = {a:.6g}, g = {g:.6g} (between the ETF and the orthogonal frame)"
        )
    else:
        structure = "simplex ETF (mean direction switched off: g = 0)"
    known = P == 2
    rs = list(reasons)
    if not known:
        rs.append(
            "deep linear UFM with a regularised bias is not treated in THEORY.md: this is the class-symmetric "
            "candidate (per-direction optimum, loss = [(K-1) min phi(A) + mu min phi(A/mu)]/K), an upper bound; "
            "for P >= 3 no proof excludes couplings of the mean and centred directions, but 12 random starts of "
            "the reduced problem reach exactly this value in all 24 settings of tests/test_theory_slow.py"
        )
    tg = "zero" if regime == "zero" else ("etf" if g == 0 else None)
    return LinearOptimum(
        known=known,
        loss=float(loss),
        regime=regime,
        structure=structure,
        reference=ref,
        reason="; ".join(rs),
        sol=sol,
        target=tg,
        control=control,
        cval=cval,
        cthr=cthr,
    )


def _mse_by_direction(problem: UFM, lam_H, lam_W, lam_b, ctl: _MseControl) -> LinearOptimum:
    """MSE with no bias / a free bias (any class sizes, any depth), or a regularised bias with narrow features
    (balanced, THEORY §9.7): one scalar problem per singular direction of the target (THEORY §0, §9.1, §9.2)."""
    K, P = problem.K, problem.L + 1
    ns = np.asarray(problem.class_sizes, float)
    N = ns.sum()
    kappa = float(np.exp(np.mean(np.log(np.concatenate([[lam_H], lam_W])))))
    dmin = min(problem.widths)
    bias = problem.bias
    mu = lam_b / (1.0 + lam_b) if bias == "reg" else (1.0 if bias == "none" else 0.0)
    ref = REF_ZHOU if P == 2 else REF_DANG
    control, cval, cthr = ctl.control, ctl.cval, ctl.cthr
    reasons = []
    # no bias / free bias (any class sizes), or regularised bias with narrow features (balanced, THEORY §9.7).
    # Per direction y_j of the target: A_j = (P/2) N kappa y_j^{2/P-2}, sigma_j(B) = y_j s_j, loss y_j^2/N phi_j*;
    # with a rank cap (min width) only the largest y_j are kept, the others contribute y_j^2/(2N) (THEORY §9.7:
    # the per-direction gain y^2 (1/2 - phi*)/N increases in y).
    y, Pm, Qm = _directions(problem if bias != "reg" else problem.replace(bias="free", lam_b=0.0))
    rank_cap = min(dmin, y.size)
    truncated = rank_cap < y.size
    tied = truncated and abs(y[rank_cap - 1] - y[rank_cap]) <= 1e-12 * y[0]
    s = np.zeros(y.size)
    vals = np.full(y.size, 0.5)
    regs = []
    for j in range(rank_cap):
        A = P / 2.0 * N * kappa * y[j] ** (2.0 / P - 2.0)
        s[j], vals[j], rj = phi_min(A, P)
        regs.append(rj)
    loss = float(np.sum(y**2 / N * vals))
    if bias == "reg":  # balanced, d <= K-1: the mean direction is not kept (THEORY §9.7): + mu/(2K)
        loss += mu / (2.0 * K)
        reasons.append(f"regularised bias with d_min = {dmin} <= K-1: the mean direction is off (THEORY §9.7)")
    if truncated:
        reasons.append(
            f"narrow: min width {dmin} < {y.size} target directions: rank cap; the largest directions are kept "
            "(THEORY §9.7)"
            + ("; tied directions are cut, so only spectra, norms and the loss are determined" if tied else "")
        )
        ref = ref + "; " + REF_NARROW
    sig = y * s
    keep = sig > 0
    sol_B = (Pm[:, keep] * sig[keep]) @ Qm[:, keep].T
    if bias == "none":
        b = None
    else:
        b = -(sol_B - np.diag(np.sqrt(ns))) @ np.sqrt(ns) / (N * (1.0 + (lam_b if bias == "reg" else 0.0)))
    sol = Linear(Pm[:, keep], sig[keep], Qm[:, keep], b, P)
    regime = "zero" if not keep.any() else ("threshold" if "threshold" in regs else "collapse")
    structure, target = _direction_structure(problem, regime, truncated, tied, keep, s, b)
    return LinearOptimum(
        known=True,
        loss=loss,
        regime=regime,
        structure=structure,
        reference=ref,
        reason="; ".join(reasons),
        sol=sol,
        target=target,
        gram_unique=not tied,
        control=control,
        cval=cval,
        cthr=cthr,
    )


def _direction_structure(problem: UFM, regime, truncated, tied, keep, s, b) -> tuple[str, str | None]:
    """The structure text and the per-layer class-mean target of a per-direction MSE optimum (the same in every
    layer: all factors are aligned). ``keep``: directions with sigma > 0; ``s``: their scales (class order by size
    for bias none)."""
    K, bias = problem.K, problem.bias
    ns = np.asarray(problem.class_sizes, float)
    if regime == "zero":
        structure = "all-zero features and weights" + ("" if b is None else f"; b = {np.array2string(b, precision=6)}")
        target = "zero"
    elif truncated:
        structure = (
            f"rank-{int(keep.sum())} truncation of the "
            + ("orthogonal frame" if bias == "none" else "simplex ETF" if problem.balanced else "full-width optimum")
            + (": any rank-d projection within the tied directions (not unique)" if tied else "")
        )
        target = None
    elif bias == "none":
        if problem.balanced:
            structure = (
                "orthogonal frame in every layer (class means mutually orthogonal with equal norms), W_L rows "
                "aligned with the last class means" + ("" if problem.L == 1 else ", consecutive layers aligned")
            )
            target = "orthogonal"
        else:
            order = list(np.argsort(-ns, kind="stable"))
            zeroed = [k for k in range(K) if s[order.index(k)] == 0]
            structure = "general orthogonal frame: orthogonal class means with class-dependent norms (Dang et al. 2023)"
            if zeroed:
                structure += f"; minority collapse: classes {zeroed} get zero features and output (THEORY §9.1)"
            target = "orthogonal-unequal"
    elif problem.balanced:
        structure = (
            "simplex ETF in every layer (centred class means = class means), b = 1/K 1"
            if bias == "free"
            else "simplex ETF in every layer (mean direction off), b = 1/(K(1+lam_b)) 1"
        )
        target = "etf"
    else:
        structure = (
            "rank-(K-1) structure of the secular equation (THEORY §9.2): not an ETF, angles depend on the "
            "class sizes; b = n/N (the class priors)"
        )
        if keep.sum() < K - 1:
            structure += f"; {K - 1 - int(keep.sum())} direction(s) thresholded (equal-size classes merge)"
        target = None
    return structure, target


def ce_linear(problem: UFM, lam_H, lam_W, lam_b, alpha) -> LinearOptimum | Prediction:
    K, L = problem.K, problem.L
    ref = REF_ZHU + ("; " + REF_GUO if alpha > 0 else "")
    control = "alpha + K sqrt(n lam_W lam_H) (zero regime iff >= 1)"
    if L > 1:
        return unknown(
            problem,
            "deep cross-entropy UFM (L >= 2): no closed form in THEORY.md (non-convex in the "
            "product; low-rank optima are possible, cf. Garrod & Keating 2024)",
            ref,
            control=control,
        )
    if not problem.balanced:
        return _convex_linear(problem, lam_H, lam_W, lam_b if problem.bias == "reg" else 0.0, alpha)
    d = problem.widths[0]
    if d < K - 1:
        return unknown(
            problem, f"cross-entropy with d = {d} < K-1 = {K - 1} was not treated (THEORY §9.9)", ref, control=control
        )
    # THEORY §2/§9.6: Z = WH = beta (I - J/K) (x) 1_n^T; with c = sqrt(n lam_W lam_H), eps = alpha (K-1)/K and
    # tau = eps + (K-1) c:  f(beta) = log(1 + (K-1) e^{-beta}) + tau beta  (CE of the margin + nuclear norm
    # sqrt(lam_W lam_H) ||Z||_* = c (K-1) beta); f'(beta) = 0 <=> p_correct = 1 - tau.
    n = problem.class_sizes[0]
    c = np.sqrt(n * lam_W[0] * lam_H)
    tau = alpha * (K - 1) / K + (K - 1) * c
    cval = alpha + K * c
    if cval < 1.0:
        beta = np.log((K - 1) * (1 - tau) / tau)
        loss = -np.log1p(-tau) + tau * beta
        regime = "collapse"
    else:
        beta, loss, regime = 0.0, np.log(K), "zero"
    Q = _centred_basis(K)
    sig = np.full(K - 1, np.sqrt(n) * beta)
    keep = sig > 0
    b = None if problem.bias == "none" else (np.zeros(K) if problem.bias == "reg" else np.full(K, np.nan))
    sol = Linear(Q[:, keep], sig[keep], Q[:, keep], b, 2)
    reason = ""
    if problem.bias == "free":
        reason = (
            "free bias: b* is any constant vector (CE is shift invariant); b and the output spectrum are reported nan"
        )
    structure = (
        "all-zero features and weights (uniform prediction, loss log K)"
        if regime == "zero"
        else f"simplex ETF: W rows and class means, logit margin beta = {beta:.6g}, h = sqrt(lam_W/(n lam_H)) w_k"
        + (", b = 0" if problem.bias == "reg" else "")
    )
    return LinearOptimum(
        known=True,
        loss=float(loss),
        regime=regime,
        structure=structure,
        reference=ref,
        reason=reason,
        sol=sol,
        target="zero" if regime == "zero" else "etf",
        control=control,
        cval=cval,
        cthr=1.0,
        b_known=problem.bias != "free",
    )


def _merged_groups(B: np.ndarray, ns: np.ndarray, rtol: float = 1e-7) -> tuple:
    """Groups (>= 2) of classes whose class-mean logits B_k / sqrt(n_k) coincide to ``rtol`` relative to the
    largest entry: such classes share one feature mean too (M_H^T M_H = sqrt(lam_W/lam_H) D^{-1/2} (B^T B)^{1/2}
    D^{-1/2}, THEORY §9.0, has equal rows and columns for them). The solver's points have the merged columns equal
    to round-off (the SVT prox and the polish keep the symmetry); 1e-7 separates them from distinct ones."""
    M = B / np.sqrt(ns)
    scale = max(float(np.abs(M).max()), 1e-300)
    seen: set = set()
    groups = []
    for i in range(M.shape[1]):
        if i in seen:
            continue
        close = [j for j in range(i + 1, M.shape[1]) if np.abs(M[:, i] - M[:, j]).max() <= rtol * scale]
        g = [i] + [j for j in close if j not in seen]
        seen.update(g)
        if len(g) > 1:
            groups.append(tuple(g))
    return tuple(groups)


def _convex_linear(problem: UFM, lam_H, lam_W, lam_b, alpha) -> LinearOptimum | Prediction:
    """Shallow CE with unequal classes (bias none/free/reg; THEORY §9.4) and shallow MSE with a regularised bias
    and unequal classes (THEORY §9.3): the convex nuclear-norm program, solved and certified by ufm/convex.py.
    ``known`` iff the relative duality gap is <= 1e-10 and the optimum's rank fits the feature width d (then the
    balanced factorisation of B realises it, THEORY §0 (F)); otherwise the certified-or-not point is a candidate."""
    ns = np.asarray(problem.class_sizes, float)
    N = ns.sum()
    c = float(np.sqrt(lam_W[0] * lam_H))
    ce = problem.loss == "ce"
    if ce:
        res = convex.solve_ce(ns, c, bias=problem.bias, lam_b=lam_b, alpha=alpha)
        ref = REF_HONG + "; " + REF_CONVEX
        sizes, counts = np.unique(ns, return_counts=True)
        shared = sizes[counts >= 2]
        control = "c = sqrt(lam_W lam_H) (two classes of equal size n_B merge iff c >= (1 - alpha) sqrt(n_B)/N)"
        cthr = float((1 - alpha) * np.sqrt(shared.min()) / N) if shared.size else math.nan
    else:
        res = convex.solve_mse_regbias(ns, c, lam_b)
        ref = REF_ZHOU + "; " + REF_REGIMB + "; " + REF_CONVEX
        control, cthr = "c = sqrt(lam_W lam_H)", math.nan
    cert = res.certificate
    U, sv, Vt = np.linalg.svd(cert.B)
    r = res.rank
    d = problem.widths[0]
    if ce:
        b = cert.b
    else:  # THEORY §9.0: the eliminated bias
        b = -(cert.B - np.diag(np.sqrt(ns))) @ np.sqrt(ns) / (N * (1.0 + lam_b))
    reasons = []
    if not res.certified:
        reasons.append(
            f"the convex reduction was not certified: relative duality gap {cert.rel_gap:.3g} > "
            f"{convex.GAP_RTOL:g} ({cert.method}); the loss is the primal value, an upper bound"
        )
    if r > d:
        reasons.append(
            f"the convex optimum has rank {r} > d = {d}: with the rank cap the problem is non-convex (THEORY §9.7, "
            "§9.9); the loss is the convex program's value, a lower bound, and no explicit point is returned"
        )
        return unknown(problem, "; ".join(reasons), ref, control=control, certificate=cert)
    if ce and problem.bias == "free":
        reasons.append("free bias: b* is unique only up to a constant (CE is shift invariant); b is reported nan")
    groups = _merged_groups(cert.B, ns)  # at the zero optimum: one group, every class (features 0, logits b)
    if r == 0:
        regime = "zero"
        structure = "all-zero features and weights" + ("" if b is None else f"; b = {np.array2string(b, precision=6)}")
    else:
        regime = "collapse"
        structure = (
            f"convex optimum of rank {r} (certified, relative duality gap {cert.rel_gap:.1e}): within-class collapse; "
            "class means neither an ETF nor orthogonal (angles and norms depend on the class sizes); "
            "M_H^T M_H = sqrt(lam_W/lam_H) D^{-1/2}(B^T B)^{1/2} D^{-1/2}, W W^T = sqrt(lam_H/lam_W)(B B^T)^{1/2} "
            "(THEORY §9.0)"
        )
        if groups:
            structure += "; minority collapse: classes " + ", ".join(str(list(g)) for g in groups) + " share one "
            structure += "feature mean and one logit vector"
    return LinearOptimum(
        known=res.certified,
        loss=float(cert.primal),
        regime=regime,
        structure=structure,
        reference=ref,
        reason="; ".join(reasons),
        sol=Linear(U[:, :r], sv[:r], Vt[:r].T, b, 2),
        target=None,
        control=control,
        cval=c,
        cthr=cthr,
        b_known=not (ce and problem.bias == "free"),
        certificate=cert,
        collapsed=groups,
    )


def from_linear(problem: UFM, res: LinearOptimum, lam_H, lam_W) -> Prediction:
    """The `Prediction` of a linear optimum: spectra, norms and Grams of its balanced factorisation."""
    sol = res.sol
    nums = _linear_numbers(problem, sol, lam_H, lam_W, b_known=res.b_known)
    t = res.target
    if res.regime == "zero":
        t = "zero"
    target = (t,) * problem.L
    gram_H: tuple = nums.gram_H
    gram_W: np.ndarray | None = nums.gram_W
    b = None if sol.b is None else np.asarray(sol.b, float)
    if b is not None and not res.b_known:
        b = np.full(problem.K, math.nan)
    if not res.gram_unique:
        gram_H, gram_W = (None,) * problem.L, None
    return Prediction(
        known=res.known,
        loss=float(res.loss),
        regime=res.regime,
        structure=res.structure,
        reference=res.reference,
        reason=res.reason,
        b=b,
        gram_H=gram_H,
        gram_W=gram_W,
        target_gram=target,
        control=res.control,
        control_value=float(res.cval),
        control_threshold=float(res.cthr),
        certificate=res.certificate,
        collapsed_classes=res.collapsed,
        sv_W=nums.sv_W,
        sv_H=nums.sv_H,
        sv_out=nums.sv_out,
        norms_W=nums.norms_W,
        norms_H=nums.norms_H,
    )


def linear_params(problem: UFM, sol: Linear, lam_H, lam_W):
    """H = Q_1 diag(f_0) V^T D^{-1/2} E, W_l = Q_{l+1} diag(f_l) Q_l^T, W_L = U diag(f_L) Q_L^T, with Q_l the first r
    columns of I_{d_l}: the product is U diag(sig) V^T D^{-1/2} E = B D^{-1/2} E (THEORY §9.0) and every factor is
    balanced (THEORY §0 (F)), so the objective equals the reduced one."""
    P, L, K = sol.P, problem.L, problem.K
    ns = np.asarray(problem.class_sizes, float)
    mus = np.concatenate([[lam_H], lam_W])
    kappa = np.exp(np.mean(np.log(mus)))
    f = [np.sqrt(kappa / mu) * sol.sig ** (1.0 / P) for mu in mus]
    r = sol.sig.size
    dims = problem.widths + (K,)
    if r > min(problem.widths):
        raise ValueError(f"construct: rank {r} exceeds the smallest width {min(problem.widths)}")
    Eind = np.eye(K)[:, problem.labels()]  # K x N
    G = Eind / np.sqrt(ns)[:, None]  # D^{-1/2} E, orthonormal rows
    H = np.zeros((dims[0], problem.N))
    H[:r] = (f[0][:, None] * sol.V.T) @ G
    Ws = []
    for l in range(L - 1):
        W = np.zeros((dims[l + 1], dims[l]))
        W[np.arange(r), np.arange(r)] = f[l + 1]
        Ws.append(W)
    WL = np.zeros((K, dims[L - 1]))
    WL[:, :r] = sol.U * f[L]
    Ws.append(WL)
    return H, Ws
