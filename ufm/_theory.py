"""Theory: the predicted global optimum of a UFM, as numbers (`predict`) and as parameters (`construct`).

Everything here is NumPy float64, whatever the problem's dtype, and follows `THEORY.md` (the project spec;
section numbers below refer to it). Statements marked *recalled* are theorem/figure numbers from the
papers that could not be re-read; the formulas themselves were re-derived (comments) and are tested
numerically against independent reduced problems and against the solver (tests/test_theory.py).

Conventions (THEORY §0): MSE fit 1/(2N)||Out - Y||_F^2, CE fit 1/N sum_i CE, penalties lam/2 ||.||_F^2 with H
penalised as a whole, so n enters only through n lam_H. P is the number of factors (H and L weight
matrices: P = L + 1); kappa = (lam_H prod_l lam_W_l)^{1/P}; C = (n lam_H prod lam_W)^{1/P} (balanced).

Two lemmas do all the work (THEORY §0):

* (F) factorisation: inf { sum_i mu_i/2 ||A_i||_F^2 : A_P...A_1 = Z } = (P/2)(prod mu_i)^{1/P} sum_j sigma_j(Z)^{2/P},
  attained by the balanced factorisation sigma_j(A_i) = ((prod mu)^{1/P}/mu_i)^{1/2} sigma_j(Z)^{1/P}
  (inner widths >= rank Z).
* (vN) von Neumann: ||Z - T||_F^2 >= sum_i (sigma_i(Z) - sigma_i(T))^2, so for a penalty of the singular values
  the optimal Z shares singular vectors with the target T and the problem splits into scalar problems

      phi(s) = (1 - s)^2/2 + A s^{2/P},  s >= 0         (one per singular value y of T; sigma(Z) = y s)

  with A = (P/2) N kappa y^{2/P - 2} (= (P/2) K C for a balanced class direction y = sqrt(n)).

Class coordinates (THEORY §9.0): with D = diag(n_1..n_K), E the K x N class indicator, u = sqrt(n)/sqrt(N), every
linear optimum collapses within classes and its end-to-end product is Z = B D^{-1/2} E with a K x K matrix B,
sigma(Z) = sigma(B). The bias is eliminated in closed form: MSE target T = D^{1/2} (no bias),
D^{1/2}(I - u u^T) (free bias), and a weighted fit with S = I - (1 - sqrt(mu)) u u^T, mu = lam_b/(1+lam_b),
for a regularised bias; b = -(B - D^{1/2}) sqrt(n) / (N (1 + lam_b)).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from scipy.optimize import brentq

from . import _convex
from ._json import to_jsonable
from ._model import Params
from ._problem import UFM
from ._srg import SRGMember, idempotents, incidence, srg_ratio, srg_search

__all__ = ["Prediction", "predict", "construct", "srg_ratio", "phi_min"]

REF_ZHOU = (
    "Zhou, Li, Ding, You, Qu, Zhu 2022 (ICML), 'On the optimization landscape of neural collapse under MSE "
    "loss', main theorem [recalled]; Tirer & Bruna 2022 (ICML), 'Extended unconstrained features model' "
    "[recalled]; derivation THEORY.md §1"
)
REF_ZHU = (
    "Zhu, Ding, Zhou, Li, You, Sulam, Qu 2021 (NeurIPS), 'A geometric analysis of neural collapse with "
    "unconstrained features', Thm 3.1 [recalled]; derivation THEORY.md §2"
)
REF_GUO = (
    "label smoothing: Guo et al. 2024 [abstract only]; closed form derived in THEORY.md §9.6 (convex in WH, "
    "class-symmetric)"
)
REF_DANG = (
    "Dang, Tran, Osher, Tran-The, Ho, Nguyen 2023 (ICML), 'Neural collapse in deep linear networks: from "
    "balanced to imbalanced data' [recalled]; derivation THEORY.md §0, §3, §9.1, §9.2"
)
REF_NARROW = "narrow features (rank cap = min width): THEORY.md §9.7 (derived)"
REF_REGIMB = "regularised bias, imbalanced classes: THEORY.md §9.3 (derived, KKT certificate)"
REF_HONG = (
    "Hong & Ling 2023, 'Neural collapse for unconstrained feature model under cross-entropy loss with imbalanced "
    "data' [abstract only]: the nuclear-norm convex program; in this scaling THEORY.md §9.4"
)
REF_CONVEX = "convex reduction solved and certified by a duality gap (ufm/_convex.py; THEORY.md §9.3-9.4)"
REF_SMI23 = (
    "Súkeník, Mondelli, Lampert 2023 (NeurIPS), 'Deep neural collapse is provably optimal for the deep "
    "unconstrained features model', main theorem (K = 2) [recalled]; DNC loss derived in THEORY.md §4.1"
)
REF_SLM24 = (
    "Súkeník, Lampert, Mondelli 2024 (NeurIPS), 'Neural collapse versus low-rank bias: is deep neural "
    "collapse really optimal?' (SRG construction: Fig. 1, L = 4, K = 10, r = 5; Fig. 2, Fig. 3 left, Fig. 5 - figure "
    "captions checked against a summary of the paper; the theorem's statement and number are recalled); SRG family "
    "and its loss: THEORY.md §4.3"
)

_THRESH_RTOL = 1e-12  # |A - A*| <= this * A*: "threshold" (both the zero and the collapsed point are optimal)


# ----------------------------------------------------------------------------------------------------------------
# The master scalar problem
# ----------------------------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------------------------
# The result
# ----------------------------------------------------------------------------------------------------------------


class Prediction(NamedTuple):
    """The predicted global optimum of a UFM (all numbers NumPy float64 / Python floats).

    Attributes:
      known: True iff ``loss`` is the global optimum by a theorem or a derivation in THEORY.md.
      loss: the predicted optimal objective; for ``known=False`` the best known upper bound (the objective of
        an explicit candidate that `construct` returns), or nan if there is none.
      regime: "collapse" (nonzero optimum with the predicted structure), "zero" (W = H = 0 is optimal),
        "threshold" (exactly at a first-order transition: both are optimal), "low-rank" (deep ReLU: an SRG
        point beats DNC), or "unknown".
      structure: the predicted geometry, in words.
      reference: paper, theorem/section, and THEORY.md section.
      reason: caveats; why ``known`` is False; unmet requirements of the theorem.
      sv_W: singular values of W_1..W_L (descending; min(d_{l+1}, d_l) each; nan where not determined, e.g. W_1
        of the deep ReLU optimum, THEORY §4.1).
      sv_H: singular values of the features H_1..H_L (all N columns; min(d_l, N) each; H_1 = H, H_{l+1} =
        s(W_l H_l)); nan where not determined.
      sv_out: singular values of the output W_L H_L + b 1^T (K of them).
      norms_W, norms_H: Frobenius norms ||W_l||_F, ||H_l||_F (determined even where the spectra are not).
      b: the predicted bias (K,), None without bias; nan where not unique (CE with a free bias: any constant).
      gram_H: predicted class-mean Gram matrices M_l^T M_l (K x K) of H_1..H_L, or None where not unique.
      gram_W: predicted W_L W_L^T (K x K) or None.
      target_gram: per layer l = 1..L, the class-mean structure of H_l: "etf" (centred means form a simplex
        ETF), "orthogonal" (uncentred means orthogonal, equal norms), "orthogonal-unequal" (orthogonal,
        class-dependent norms), "zero", or None (no simple name / not unique).
      configuration: deep ReLU only: "dnc" or "srg" (the configuration this prediction describes); else None.
      dnc_loss, srg_loss, srg_family_loss: deep ReLU with K >= 3: the DNC loss (THEORY §4.1), the loss of the
        SRG configuration (best non-DNC member found, THEORY §4.3) and of the best member of the whole family
        (<= dnc_loss); nan where not applicable.
      control, control_value, control_threshold: the regime parameter (a formula), its value, and the value at
        which the zero solution becomes optimal (nan where not a single number). For the convex reductions
        (imbalanced CE): c = sqrt(lam_W lam_H) and the smallest merge threshold (1 - alpha) sqrt(n_B)/N of a group
        of equal-size classes (THEORY §9.4).
      certificate: for optima computed from a convex reduction (THEORY §9.3-9.4), a `ConvexCertificate`: primal
        point (B, b), dual point Lam, primal and dual values, relative duality gap (<= 1e-10 when ``known``) and
        method; None for closed forms.
      collapsed_classes: groups of classes that share one feature mean and one logit vector at the optimum
        (minority collapse, THEORY §9.4), as tuples of class indices (at a zero optimum: one group of all K);
        () when none, and for the closed forms (not computed there).
    """

    known: bool
    loss: float
    regime: str
    structure: str
    reference: str
    reason: str
    sv_W: tuple
    sv_H: tuple
    sv_out: np.ndarray
    norms_W: np.ndarray
    norms_H: np.ndarray
    b: np.ndarray | None
    gram_H: tuple
    gram_W: np.ndarray | None
    target_gram: tuple
    configuration: str | None = None
    dnc_loss: float = math.nan
    srg_loss: float = math.nan
    srg_family_loss: float = math.nan
    control: str = ""
    control_value: float = math.nan
    control_threshold: float = math.nan
    certificate: _convex.ConvexCertificate | None = None
    collapsed_classes: tuple = ()

    def to_dict(self) -> dict:
        """A JSON-serialisable dict (arrays as nested lists, nan as None; the certificate as a dict)."""
        return to_jsonable(self._asdict())


# ----------------------------------------------------------------------------------------------------------------
# Input handling
# ----------------------------------------------------------------------------------------------------------------


def _concrete_lams(problem: UFM) -> tuple[float, np.ndarray, float, float]:
    if not isinstance(problem, UFM):
        raise TypeError(f"problem must be a ufm.UFM; got {type(problem).__name__}")
    out = []
    for name in ("lam_H", "lam_W", "lam_b", "label_smoothing"):
        v = getattr(problem, name)
        if isinstance(v, jax.core.Tracer):
            raise ValueError(
                f"predict/construct need a concrete problem; {name} is traced (call them outside jit/vmap)"
            )
        a = np.asarray(v, dtype=np.float64)
        want = (problem.L,) if name == "lam_W" else ()
        if a.shape != want:
            raise ValueError(
                f"predict/construct take one problem, not a batch: {name} must have shape {want} "
                f"({'one lambda_W per layer, L=' + str(problem.L) if name == 'lam_W' else 'a scalar'}); got {a.shape}"
            )
        out.append(a)
    return float(out[0]), out[1].astype(np.float64), float(out[2]), float(out[3])


def _check_dtype(dtype):
    """The dtype of `construct`'s arrays: None (JAX's default float) or float32/float64."""
    if dtype is None:
        return jnp.result_type(float)
    try:
        dt = jnp.dtype(dtype)
    except TypeError as e:
        raise TypeError(f"construct: dtype must be 'float32' or 'float64' (or None); got {dtype!r}") from e
    if dt not in (jnp.dtype("float32"), jnp.dtype("float64")):
        raise TypeError(f"construct: dtype must be 'float32' or 'float64' (or None); got {dt.name!r}")
    return dt


def _check_configuration(problem: UFM, configuration):
    if configuration not in (None, "dnc", "srg"):
        raise ValueError(f"configuration must be None, 'dnc' or 'srg'; got {configuration!r}")
    if configuration is not None and not (problem.activation == "relu" and problem.L >= 2):
        raise ValueError(
            f"configuration={configuration!r} applies to the deep ReLU UFM (activation='relu', L >= 2) only; "
            f"got activation={problem.activation!r}, L={problem.L}"
        )


def _sv_len(problem: UFM):
    dims = problem.widths + (problem.K,)
    return [min(dims[l + 1], dims[l]) for l in range(problem.L)], [min(d, problem.N) for d in problem.widths]


def _pad(v, n):
    v = np.sort(np.asarray(v, float))[::-1][:n]
    return np.concatenate([v, np.zeros(n - v.size)])


def _unknown(problem: UFM, reason: str, reference: str = "", regime: str = "unknown", **kw) -> Prediction:
    lw, lh = _sv_len(problem)
    nanv = lambda n: np.full(n, np.nan)  # noqa: E731
    b = None if problem.bias == "none" else nanv(problem.K)
    base = dict(
        known=False,
        loss=math.nan,
        regime=regime,
        structure="unknown",
        reference=reference,
        reason=reason,
        sv_W=tuple(nanv(n) for n in lw),
        sv_H=tuple(nanv(n) for n in lh),
        sv_out=nanv(problem.K),
        norms_W=nanv(problem.L),
        norms_H=nanv(problem.L),
        b=b,
        gram_H=(None,) * problem.L,
        gram_W=None,
        target_gram=(None,) * problem.L,
    )
    base.update(kw)
    return Prediction(**base)


# ----------------------------------------------------------------------------------------------------------------
# Linear models in class coordinates: a solution is B = U diag(sig) V^T (K x K) and a bias
# ----------------------------------------------------------------------------------------------------------------


class _Linear(NamedTuple):
    U: np.ndarray  # K x r
    sig: np.ndarray  # r, > 0
    V: np.ndarray  # K x r
    b: np.ndarray | None
    P: int


def _linear_numbers(problem: UFM, sol: _Linear, lam_H: float, lam_W: np.ndarray, *, b_known=True):
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
    lw, lh = _sv_len(problem)
    sv_W = tuple(_pad(f[l + 1], lw[l]) for l in range(L))
    prods = [np.prod(f[: l + 1], axis=0) for l in range(L)]  # prods[l] = sigma(H_{l+1})
    sv_H = tuple(_pad(prods[l], lh[l]) for l in range(L))
    sqn = np.sqrt(np.asarray(problem.class_sizes, float))
    Bm = (sol.U * sol.sig) @ sol.V.T
    if sol.b is not None and b_known:
        out = np.linalg.svd(Bm + np.outer(sol.b, sqn), compute_uv=False)
    elif sol.b is not None:
        out = np.full(K, np.nan)
    else:
        out = _pad(sol.sig, K)
    gram_H = tuple(((sol.V / sqn[:, None]) * prods[l] ** 2) @ (sol.V / sqn[:, None]).T for l in range(L))
    gram_W = (sol.U * f[L] ** 2) @ sol.U.T
    return dict(
        sv_W=sv_W,
        sv_H=sv_H,
        sv_out=_pad(out, K),
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


def _mse_linear(problem: UFM, lam_H, lam_W, lam_b) -> Prediction | tuple:
    K, L, P = problem.K, problem.L, problem.L + 1
    ns = np.asarray(problem.class_sizes, float)
    N = ns.sum()
    kappa = float(np.exp(np.mean(np.log(np.concatenate([[lam_H], lam_W])))))
    dmin = min(problem.widths)
    shallow = L == 1
    ref = REF_ZHOU if shallow else REF_DANG
    reasons = []
    C_bal = (ns[0] * lam_H * np.prod(lam_W)) ** (1.0 / P) if problem.balanced else math.nan
    if P == 2:
        control = "rho = K sqrt(n lam_W lam_H) (zero regime iff rho >= 1)"
        cval, cthr = (K * C_bal, 1.0) if problem.balanced else (math.nan, math.nan)
    else:
        control = "C = (n lam_H prod lam_W)^{1/P}, P = L+1 (zero regime iff C >= C* = A*(P)/(K P/2))"
        cval, cthr = (C_bal, phi_threshold(P) / (K * P / 2.0)) if problem.balanced else (math.nan, math.nan)
    bias = problem.bias
    mu = lam_b / (1.0 + lam_b) if bias == "reg" else (1.0 if bias == "none" else 0.0)

    if bias == "reg" and not problem.balanced:
        if P != 2:
            why = "deep linear UFM with a regularised bias and unequal class sizes is not treated in THEORY.md (§9.9)"
            return _unknown(problem, why, ref, control=control)
        # THEORY §9.3: B0 = D^{1/2} - N c (I + u u^T / lam_b); if B0 is PSD the fit gradient at B0 is -c I, and
        # I is in the subdifferential of ||.||_* at every PSD matrix, so B0 is optimal (convex problem).
        # Otherwise (or with narrow features) the convex program is solved and certified (ufm/_convex.py).
        c = np.sqrt(lam_W[0] * lam_H)
        u = np.sqrt(ns / N)
        B0 = np.diag(np.sqrt(ns)) - N * c * (np.eye(K) + np.outer(u, u) / lam_b)
        w, Vv = np.linalg.eigh(B0)
        if w.min() < -1e-12 * np.abs(w).max() or dmin < K:
            return _convex_linear(problem, lam_H, lam_W, lam_b, 0.0)
        w = np.clip(w, 0.0, None)
        loss = c * np.sum(np.sqrt(ns)) - N * c * c / 2.0 * (K + 1.0 / lam_b)
        b = -(B0 - np.diag(np.sqrt(ns))) @ np.sqrt(ns) / (N * (1.0 + lam_b))
        sol = _Linear(Vv, w, Vv, b, 2)
        return dict(
            known=True,
            loss=float(loss),
            regime="collapse",
            structure="all classes active; class means coupled (not orthogonal, not an ETF): M^T M = "
            "sqrt(lam_W/lam_H) D^{-1/2} B0 D^{-1/2}, W W^T = sqrt(lam_H/lam_W) B0 (THEORY §9.3)",
            reference=ref + "; " + REF_REGIMB,
            reason="; ".join(reasons),
            sol=sol,
            target=(None,),
            control=control,
            cval=cval,
            cthr=cthr,
        )

    if bias == "reg" and (dmin >= K):
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
        sol = _Linear(Uq[:, keep], sig[keep], Uq[:, keep], b, P)
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
        return dict(
            known=known,
            loss=float(loss),
            regime=regime,
            structure=structure,
            reference=ref,
            reason="; ".join(rs),
            sol=sol,
            target=(tg,),
            control=control,
            cval=cval,
            cthr=cthr,
        )

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
    sol = _Linear(Pm[:, keep], sig[keep], Qm[:, keep], b, P)
    regime = "zero" if not keep.any() else ("threshold" if "threshold" in regs else "collapse")
    # structure and per-layer targets (the same in every layer: all factors are aligned)
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
                "aligned with the last class means" + ("" if shallow else ", consecutive layers aligned")
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
    return dict(
        known=True,
        loss=loss,
        regime=regime,
        structure=structure,
        reference=ref,
        reason="; ".join(reasons),
        sol=sol,
        target=(target,),
        gram_unique=not tied,
        control=control,
        cval=cval,
        cthr=cthr,
    )


def _ce_linear(problem: UFM, lam_H, lam_W, alpha) -> dict | Prediction:
    K, L = problem.K, problem.L
    ref = REF_ZHU + ("; " + REF_GUO if alpha > 0 else "")
    control = "alpha + K sqrt(n lam_W lam_H) (zero regime iff >= 1)"
    if L > 1:
        return _unknown(
            problem,
            "deep cross-entropy UFM (L >= 2): no closed form in THEORY.md (non-convex in the "
            "product; low-rank optima are possible, cf. Garrod & Keating 2024)",
            ref,
            control=control,
        )
    if not problem.balanced:
        lam_b = float(np.asarray(problem.lam_b, float)) if problem.bias == "reg" else 0.0
        return _convex_linear(problem, lam_H, lam_W, lam_b, alpha)
    d = problem.widths[0]
    if d < K - 1:
        return _unknown(
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
    sol = _Linear(Q[:, keep], sig[keep], Q[:, keep], b, 2)
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
    return dict(
        known=True,
        loss=float(loss),
        regime=regime,
        structure=structure,
        reference=ref,
        reason=reason,
        sol=sol,
        target=("zero" if regime == "zero" else "etf",),
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


def _convex_linear(problem: UFM, lam_H, lam_W, lam_b, alpha) -> dict | Prediction:
    """Shallow CE with unequal classes (bias none/free/reg; THEORY §9.4) and shallow MSE with a regularised bias
    and unequal classes (THEORY §9.3): the convex nuclear-norm program, solved and certified by ufm/_convex.py.
    ``known`` iff the relative duality gap is <= 1e-10 and the optimum's rank fits the feature width d (then the
    balanced factorisation of B realises it, THEORY §0 (F)); otherwise the certified-or-not point is a candidate."""
    ns = np.asarray(problem.class_sizes, float)
    N = ns.sum()
    c = float(np.sqrt(lam_W[0] * lam_H))
    ce = problem.loss == "ce"
    if ce:
        res = _convex.solve_ce(ns, c, bias=problem.bias, lam_b=lam_b, alpha=alpha)
        ref = REF_HONG + "; " + REF_CONVEX
        sizes, counts = np.unique(ns, return_counts=True)
        shared = sizes[counts >= 2]
        control = "c = sqrt(lam_W lam_H) (two classes of equal size n_B merge iff c >= (1 - alpha) sqrt(n_B)/N)"
        cthr = float((1 - alpha) * np.sqrt(shared.min()) / N) if shared.size else math.nan
    else:
        res = _convex.solve_mse_regbias(ns, c, lam_b)
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
            f"{_convex.GAP_RTOL:g} ({cert.method}); the loss is the primal value, an upper bound"
        )
    if r > d:
        reasons.append(
            f"the convex optimum has rank {r} > d = {d}: with the rank cap the problem is non-convex (THEORY §9.7, "
            "§9.9); the loss is the convex program's value, a lower bound, and no explicit point is returned"
        )
        return _unknown(problem, "; ".join(reasons), ref, control=control, certificate=cert)
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
    return dict(
        known=res.certified,
        loss=float(cert.primal),
        regime=regime,
        structure=structure,
        reference=ref,
        reason="; ".join(reasons),
        sol=_Linear(U[:, :r], sv[:r], Vt[:r].T, b, 2),
        target=(None,),
        control=control,
        cval=c,
        cthr=cthr,
        b_known=not (ce and problem.bias == "free"),
        certificate=cert,
        collapsed=groups,
    )


def _from_linear(problem: UFM, res: dict, lam_H, lam_W) -> Prediction:
    sol = res["sol"]
    nums = _linear_numbers(problem, sol, lam_H, lam_W, b_known=res.get("b_known", True))
    t = res["target"][0]
    if res["regime"] == "zero":
        t = "zero"
    target = (t,) * problem.L
    gram_H = nums.pop("gram_H")
    gram_W = nums.pop("gram_W")
    b = None if sol.b is None else np.asarray(sol.b, float)
    if b is not None and not res.get("b_known", True):
        b = np.full(problem.K, math.nan)
    if not res.get("gram_unique", True):
        gram_H, gram_W = (None,) * problem.L, None
    return Prediction(
        known=res["known"],
        loss=float(res["loss"]),
        regime=res["regime"],
        structure=res["structure"],
        reference=res["reference"],
        reason=res["reason"],
        b=b,
        gram_H=gram_H,
        gram_W=gram_W,
        target_gram=target,
        control=res["control"],
        control_value=float(res["cval"]),
        control_threshold=float(res["cthr"]),
        certificate=res.get("certificate"),
        collapsed_classes=res.get("collapsed", ()),
        **nums,
    )


# ----------------------------------------------------------------------------------------------------------------
# Deep ReLU UFM (L >= 2)
# ----------------------------------------------------------------------------------------------------------------


def _dnc_classwise(problem: UFM, lam_H, lam_W):
    """Per-class DNC point: the bias-free deep-linear optimum (P = L+1) with non-negative orthogonal class means
    (THEORY §4.1, §9.5). Returns (loss, s_k, factor values a[i, k], regimes)."""
    K, P = problem.K, problem.L + 1
    ns = np.asarray(problem.class_sizes, float)
    N = ns.sum()
    mus = np.concatenate([[lam_H], lam_W])
    kappa = float(np.exp(np.mean(np.log(mus))))
    s = np.zeros(K)
    vals = np.zeros(K)
    regs = []
    for k in range(K):
        A = P / 2.0 * N * kappa * ns[k] ** (1.0 / P - 1.0)
        s[k], vals[k], rk = phi_min(A, P)
        regs.append(rk)
    loss = float(np.sum(ns / N * vals))
    a = np.array([np.sqrt(kappa / mu) * (np.sqrt(ns) * s) ** (1.0 / P) for mu in mus])  # (P, K)
    return loss, s, a, regs


def _dnc_prediction(problem: UFM, lam_H, lam_W, *, known: bool, reason: str, reference: str) -> Prediction:
    K, L = problem.K, problem.L
    ns = np.asarray(problem.class_sizes, float)
    loss, s, a, regs = _dnc_classwise(problem, lam_H, lam_W)
    lw, lh = _sv_len(problem)
    # sigma(H_l) (l >= 2) = prod_{i<l} a_i (per class), sigma(W_l) (l >= 2) = a_l; W_1 and H_1 are not unique
    # (THEORY §4.1 non-uniqueness), but ||W_1||_F^2 = sum a_1^2 and ||H_1||_F^2 = sum a_0^2 are.
    prods = [np.prod(a[: l + 1], axis=0) for l in range(L)]
    sv_W = (np.full(lw[0], np.nan),) + tuple(_pad(a[l + 1], lw[l]) for l in range(1, L))
    sv_H = (np.full(lh[0], np.nan),) + tuple(_pad(prods[l], lh[l]) for l in range(1, L))
    m = [prods[l] / np.sqrt(ns) for l in range(L)]  # class-mean norms of H_{l+1}
    gram_H = (None,) + tuple(np.diag(m[l] ** 2) for l in range(1, L))
    zero = not np.any(s > 0)
    regime = "zero" if zero else ("threshold" if "threshold" in regs else "collapse")
    if zero:
        structure = "all-zero features and weights (loss 1/2)"
    elif problem.balanced:
        structure = (
            "DNC in every layer: within-class collapse everywhere; class means of H_2..H_L form a "
            "non-negative orthogonal frame (ReLUs inactive), W_l (l >= 2) has K equal singular values; "
            "W_1, H_1 not unique (only their norms and ||W_1 H_1||_*)"
        )
    else:
        zeroed = [k for k in range(K) if s[k] == 0]
        structure = (
            "DNC-type point: non-negative orthogonal class means with class-dependent norms in layers >= 2 "
            "(the deep-linear optimum of THEORY §9.1 rotated into the non-negative orthant)"
        )
        if zeroed:
            structure += f"; minority collapse: classes {zeroed} zeroed"
    P = L + 1
    C = (ns[0] * lam_H * np.prod(lam_W)) ** (1.0 / P) if problem.balanced else math.nan
    return Prediction(
        known=known,
        loss=loss,
        regime=regime,
        structure=structure,
        reference=reference,
        reason=reason,
        sv_W=sv_W,
        sv_H=sv_H,
        sv_out=_pad(np.sqrt(ns) * s, K),
        norms_W=np.array([np.sqrt(np.sum(a[l + 1] ** 2)) for l in range(L)]),
        norms_H=np.array([np.sqrt(np.sum(prods[l] ** 2)) for l in range(L)]),
        b=None,
        gram_H=gram_H if not zero else (None,) * L,
        gram_W=np.diag(a[L] ** 2),
        target_gram=(None,)
        + (("zero" if zero else "orthogonal" if problem.balanced else "orthogonal-unequal"),) * (L - 1),
        configuration="dnc",
        dnc_loss=loss,
        control="C = (n lam_H prod lam_W)^{1/(L+1)} (zero regime iff C >= C*)",
        control_value=C,
        control_threshold=phi_threshold(P) / (K * P / 2.0),
    )


def _triangular_r(K: int) -> int | None:
    r = int(round((1 + math.sqrt(1 + 8 * K)) / 2))
    return r if r >= 3 and r * (r - 1) // 2 == K else None


def _srg_members(problem: UFM, lam_H, lam_W):
    """(srg member, family-best member) admissible for the problem's widths, or (None, None)."""
    K, L = problem.K, problem.L
    r = _triangular_r(K)
    w = problem.widths
    if r is None or not problem.balanced or w[-1] < K or (L == 2 and w[0] < K):
        return None, None
    max_rows = min(w[1 : L - 1]) if L > 2 else None
    n = problem.class_sizes[0]
    fam = srg_search(r, L, lam_H, lam_W, n, max_rows=max_rows, d1=w[0])
    pure = srg_search(r, L, lam_H, lam_W, n, max_rows=max_rows, d1=w[0], pure=True)
    cands = [m for m in (pure, fam) if m is not None and m.kind != "dnc"]
    srg = min(cands, key=lambda m: m.loss) if cands else None
    return srg, fam


def _srg_params_np(problem: UFM, mem: SRGMember, lam_H, lam_W):
    """Explicit parameters (NumPy) of an SRG-family member (see ufm/_srg.py for the derivation of each map)."""
    K, L, r = problem.K, problem.L, mem.r
    n = problem.class_sizes[0]
    w = problem.widths + (K,)
    Bi = incidence(r)
    A = Bi.T @ Bi - 2 * np.eye(K)
    Abar = np.ones((K, K)) - np.eye(K) - A
    d, s, t = mem.entries
    ZL = d * np.eye(K) + s * A + t * Abar
    E = idempotents(r)

    def embed(M, rows):
        out = np.zeros((rows, M.shape[1]))
        out[: M.shape[0]] = M
        return out

    Ms = []  # M_2..M_{L-1}
    for l in range(L - 2):
        al, be, ga = mem.scales[l]
        blocks = [al * np.eye(K), be * Bi, ga * np.ones((1, K))]
        M = np.concatenate([blk for b, blk in enumerate(blocks) if b in mem.blocks], axis=0)
        Ms.append(embed(M, w[l + 1]))
    ZLe = embed(ZL, w[L - 1])
    ML = np.maximum(ZLe, 0.0)
    first_target = Ms[0] if L > 2 else ZLe  # Z_2 (d_2 x K); first layer factors it with cost sqrt(lam n lam_H)||.||_*
    W1, M1 = _factor_first(first_target, n, lam_H, lam_W[0], w[0])
    Ws = [W1]

    def gram_pinv(M):
        # G = M^T M = sum_j e_j E_j (Bose-Mesner algebra), so G^+ = sum over present eigenspaces of E_j / e_j
        G = M.T @ M
        mult = [np.trace(Ej) for Ej in E]
        ev = [np.sum(G * Ej) / mj if mj > 0.5 else 0.0 for Ej, mj in zip(E, mult, strict=True)]
        top = max(ev)
        return sum(Ej / e for Ej, e, mj in zip(E, ev, mult, strict=True) if mj > 0.5 and e > 1e-12 * top)

    for l in range(L - 3):  # middle W_l, l = 2..L-2: M_{l+1} G_l^+ M_l^T
        Ws.append(Ms[l + 1] @ gram_pinv(Ms[l]) @ Ms[l].T)
    if L > 2:
        Ws.append(ZLe @ gram_pinv(Ms[-1]) @ Ms[-1].T)  # W_{L-1}
    lw = lam_W[L - 1]
    WL = np.linalg.solve(ML.T @ ML + K * lw * np.eye(K), ML.T)  # ridge: (M^T M + K lam I)^{-1} M^T
    Ws.append(WL)
    return np.repeat(M1, n, axis=1), Ws


def _factor_first(Z2m: np.ndarray, ns, lam_H, lam_W1, d1):
    """Balanced factorisation of the first layer: W_1 M_1 = Z2m (class means; class sizes ns) at the minimal cost
    lam_W1/2 ||W_1||^2 + lam_H/2 ||M_1 D^{1/2}||^2 = sqrt(lam_W1 lam_H) ||Z2m D^{1/2}||_* (THEORY §0 (F), §9.0):
    with Z2m D^{1/2} = U S V^T and q = (lam_H/lam_W1)^{1/4}: W_1 = U S^{1/2} q Q^T, M_1 = Q S^{1/2} V^T D^{-1/2} / q.
    Balanced: sqrt(lam_W1 n lam_H) ||Z2m||_*."""
    ns = np.broadcast_to(np.asarray(ns, float), (Z2m.shape[1],))
    U, S, Vt = np.linalg.svd(Z2m * np.sqrt(ns)[None, :], full_matrices=False)
    r = int(np.sum(S > 1e-14 * max(S.max(), 1e-300))) if S.size else 0
    if r > d1:
        raise ValueError(f"construct: the first layer needs d_1 >= rank(Z_2) = {r}; got d_1 = {d1}")
    q = (lam_H / lam_W1) ** 0.25
    W1 = np.zeros((Z2m.shape[0], d1))
    W1[:, :r] = U[:, :r] * np.sqrt(S[:r]) * q
    M1 = np.zeros((d1, Z2m.shape[1]))
    M1[:r] = ((np.sqrt(S[:r]) / q)[:, None] * Vt[:r]) / np.sqrt(ns)[None, :]
    return W1, M1


def _srg_prediction(
    problem: UFM, mem: SRGMember, lam_H, lam_W, dnc_loss, fam_loss, srg_loss, *, chosen: bool, reason: str
) -> Prediction:
    H, Ws = _srg_params_np(problem, mem, lam_H, lam_W)
    L, K = problem.L, problem.K
    lw, lh = _sv_len(problem)
    Hs = [H]
    for W in Ws[:-1]:
        Hs.append(np.maximum(W @ Hs[-1], 0.0))
    out = Ws[-1] @ Hs[-1]
    n = problem.class_sizes[0]
    sv = lambda M, k: _pad(np.linalg.svd(M, compute_uv=False), k)  # noqa: E731
    grams = tuple((Hl[:, ::n].T @ Hl[:, ::n]) for Hl in Hs)
    rank_pre = int(np.linalg.matrix_rank(Ws[-2] @ Hs[-2][:, ::n], tol=1e-9)) if L > 1 else K
    structure = (
        f"SRG configuration ({mem.kind}, r = {mem.r}, K = {K}): intermediate class means "
        f"{'/'.join(('alpha I', 'beta B', 'gamma 1^T')[b] for b in mem.blocks) or '-'} (B = incidence matrix of "
        f"K_{mem.r}); last pre-activation Z_L = d I + s A + t Abar with (d, s, t) = "
        f"({mem.entries[0]:.6g}, {mem.entries[1]:.6g}, {mem.entries[2]:.6g}), rank {rank_pre} before the last "
        "ReLU; within-class collapse in every layer"
    )
    return Prediction(
        known=False,
        loss=float(mem.loss),
        regime="low-rank" if chosen else "unknown",
        structure=structure,
        reference=REF_SLM24,
        reason=reason,
        sv_W=tuple(sv(W, lw[i]) for i, W in enumerate(Ws)),
        sv_H=tuple(sv(Hl, lh[i]) for i, Hl in enumerate(Hs)),
        sv_out=sv(out, K),
        norms_W=np.array([np.linalg.norm(W) for W in Ws]),
        norms_H=np.array([np.linalg.norm(Hl) for Hl in Hs]),
        b=None,
        gram_H=(None,) + grams[1:],
        gram_W=Ws[-1] @ Ws[-1].T,
        target_gram=(None,) * L,
        configuration="srg",
        dnc_loss=dnc_loss,
        srg_loss=srg_loss,
        srg_family_loss=fam_loss,
    )


def _dufm(problem: UFM, lam_H, lam_W, configuration) -> Prediction:
    K, L = problem.K, problem.L
    ref = REF_SMI23 if K == 2 else REF_SLM24
    if problem.loss != "mse" or problem.bias != "none":
        return _unknown(
            problem,
            f"deep ReLU UFM with loss={problem.loss!r}, bias={problem.bias!r}: THEORY.md treats only "
            "MSE without bias (§4); no candidate",
            ref,
            configuration=configuration,
        )
    w = problem.widths
    d1_min = K - 1 if problem.balanced else K
    dnc_ok = all(d >= K for d in w[1:]) and w[0] >= d1_min
    dnc_reason = "" if dnc_ok else (f"the DNC point needs d_1 >= {d1_min} and d_2..d_L >= K = {K}; got widths {w}")
    if K >= 3 and problem.balanced:  # the SRG family exists only for K = r(r-1)/2 (None otherwise); cached
        srg, fam = _srg_members(problem, lam_H, lam_W)
    else:
        srg, fam = None, None
    dnc_loss = _dnc_classwise(problem, lam_H, lam_W)[0] if dnc_ok else math.nan
    fam_loss = fam.loss if fam is not None else math.nan
    srg_loss = srg.loss if srg is not None else math.nan
    lowrank = srg is not None and (not dnc_ok or srg.loss < dnc_loss * (1 - 1e-9))
    r = _triangular_r(K)
    if configuration == "srg":
        if srg is None:
            why = (
                f"K = {K} is not r(r-1)/2 for an integer r >= 3"
                if r is None
                else "imbalanced classes"
                if not problem.balanced
                else f"widths {w} too small for an SRG member (needs d_L >= K and intermediate widths >= r = {r})"
            )
            return _unknown(problem, f"no SRG configuration: {why}", REF_SLM24, configuration="srg", dnc_loss=dnc_loss)
        why = "explicit point of the SRG family (an upper bound on the optimum, not a proven optimum); " + (
            f"its loss is below the DNC loss (ratio {srg.loss / dnc_loss:.6g}), so DNC is NOT optimal"
            if lowrank and dnc_ok
            else f"its loss is not below the DNC loss (ratio {srg.loss / dnc_loss:.6g})"
            if dnc_ok
            else dnc_reason
        )
        return _srg_prediction(problem, srg, lam_H, lam_W, dnc_loss, fam_loss, srg_loss, chosen=lowrank, reason=why)
    if configuration is None and lowrank:
        why = (
            f"DNC is NOT optimal here: the explicit SRG point has loss {srg.loss:.10g} < DNC loss {dnc_loss:.10g} "
            f"(ratio {srg.loss / dnc_loss:.6g}); the true optimum is unknown (this is an upper bound)"
            if dnc_ok
            else f"{dnc_reason}; best explicit point is the SRG configuration (an upper bound)"
        )
        return _srg_prediction(problem, srg, lam_H, lam_W, dnc_loss, fam_loss, srg_loss, chosen=True, reason=why)
    if not dnc_ok:
        return _unknown(problem, dnc_reason + "; no explicit candidate", ref, configuration="dnc")
    if K == 2 and problem.balanced:
        known = True
        why = (
            ""
            if w[0] >= K
            else "d_1 = 1 < K: the theorem assumes widths >= K; the DNC point (first layer Z_2 = m_2 K/(K-1)(I - J/K), "
            "THEORY §4.1) is feasible here and optimal in any wider network, hence optimal here"
        )
    elif K == 2:
        known = False
        why = (
            "K = 2 with unequal class sizes: the DNC-type point is optimal on numerical evidence only (THEORY §9.5: "
            "no random start in ~50 settings went below it); loss is its value (an upper bound)"
        )
    else:
        known = False
        parts = ["K >= 3: DNC optimality is not proven (THEORY §4.2-4.3); the loss is the DNC value, an upper bound"]
        if not problem.balanced:
            parts.append("imbalanced classes: DNC-type point with class-dependent norms (THEORY §9.5)")
        elif r is None:
            parts.append(f"K = {K} is not r(r-1)/2, so no SRG candidate was evaluated")
        elif lowrank:
            parts.append(
                f"DNC is NOT optimal here: the explicit SRG point has a lower loss (SRG / DNC = "
                f"{srg_loss / dnc_loss:.6g}; predict(problem) describes it)"
            )
        elif fam is not None:
            parts.append(
                f"the SRG family does not beat DNC here (best family member / DNC = {fam_loss / dnc_loss:.6g})"
            )
        if L >= 3 and not lowrank:
            parts.append(
                "random L-BFGS starts reach losses below DNC at K = 3..6, L = 4, lambda = 0.004 (THEORY §4.3, "
                "asymmetric low-rank points), so DNC may well not be optimal"
            )
        why = "; ".join(parts)
    p = _dnc_prediction(problem, lam_H, lam_W, known=known, reason=why, reference=ref)
    return p._replace(srg_loss=srg_loss, srg_family_loss=fam_loss)


# ----------------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------------


def predict(problem: UFM, configuration: str | None = None) -> Prediction:
    """The predicted global optimum of ``problem``: loss, regime, spectra, structure and its source.

    Covered (THEORY.md sections; P = L + 1 factors, C = (n lam_H prod lam_W)^{1/P}):

    * linear (or L = 1) MSE UFM, any depth, bias none / free: per-direction scalar problems (§0, §1, §3, §9.1,
      §9.2), balanced or imbalanced, including narrow widths (§9.7) and the zero threshold (rho = K sqrt(n lam_W
      lam_H) >= 1 for P = 2, C >= C* = A*(P)/(K P/2) for P >= 3, first order);
    * shallow MSE with a regularised bias (§1 balanced; §9.3 imbalanced when B0 is PSD); deep + regularised
      bias: the class-symmetric candidate (``known=False``) unless narrow (§9.7, known);
    * shallow cross-entropy, balanced, d >= K-1, bias none / free / reg, with label smoothing (§2, §9.6);
    * deep ReLU MSE without bias (L >= 2): K = 2 balanced: DNC, a theorem (Súkeník et al. 2023); K >= 3: DNC and,
      for K = r(r-1)/2, the SRG family (§4.3); the lower is reported, ``known=False`` (upper bounds only).

    Everything else returns ``known=False`` with the reason (never raises for a valid problem): deep CE,
    imbalanced CE, CE with d < K-1, imbalanced + regularised bias + narrow/deep, deep ReLU with bias or CE.
    Requirements of the theorems (widths, balance) are checked and reported in ``reason``.

    Args:
      problem: a concrete (not traced, not batched) `ufm.UFM`; computed in NumPy float64 whatever its dtype.
      configuration: deep ReLU only: None (best belief), "dnc" or "srg" (that configuration's prediction).

    Returns:
      A `Prediction`.

    Example:
      >>> import ufm
      >>> p = ufm.UFM(num_classes=4, n_per_class=3, widths=(8,), bias="free", lam_H=1e-2, lam_W=1e-2)
      >>> pred = ufm.predict(p)
      >>> pred.known, pred.regime, round(pred.loss, 6)   # (K-1)/(2K) rho(2 - rho), rho = K sqrt(n lam_W lam_H)
      (True, 'collapse', 0.050162)
    """
    lam_H, lam_W, lam_b, alpha = _concrete_lams(problem)
    _check_configuration(problem, configuration)
    if lam_H <= 0 or np.any(lam_W <= 0):
        return _unknown(
            problem,
            "every lambda_H, lambda_W must be > 0: with a zero lambda the infimum is not attained "
            "(rescaling H against W) or the problem is unregularised; the theorems assume all > 0",
            configuration=configuration,
        )
    if problem.activation == "relu" and problem.L >= 2:
        return _dufm(problem, lam_H, lam_W, configuration)
    if problem.loss == "mse":
        res = _mse_linear(problem, lam_H, lam_W, lam_b)
    else:
        res = _ce_linear(problem, lam_H, lam_W, alpha)
    if isinstance(res, Prediction):
        return res
    return _from_linear(problem, res, lam_H, lam_W)


def _linear_params_np(problem: UFM, sol: _Linear, lam_H, lam_W):
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


def _dnc_params_np(problem: UFM, lam_H, lam_W):
    """The DNC point (THEORY §4.1, §9.5): layers >= 2 have class means diag(m_l) (a non-negative orthogonal frame,
    so the ReLUs are inactive) and W_l = diag(a_l) embedded; the first layer factors the class means of Z_2:
    diag(m_2) (d_1 >= K) or, for d_1 = K-1 (balanced), m_2 K/(K-1) (I - J/K), whose ReLU is again m_2 I and
    whose nuclear norm is the same K m_2 (THEORY §4.1 non-uniqueness, t = 1/(K-1))."""
    K, L = problem.K, problem.L
    ns = np.asarray(problem.class_sizes, float)
    w = problem.widths + (K,)
    _, s, a, _ = _dnc_classwise(problem, lam_H, lam_W)
    m2 = a[0] * a[1] / np.sqrt(ns)  # class-mean norms of H_2
    Z2 = np.diag(m2) if w[0] >= K else m2[0] * K / (K - 1.0) * (np.eye(K) - 1.0 / K)
    Z2e = np.zeros((w[1], K))
    Z2e[:K] = Z2
    W1, M1 = _factor_first(Z2e, ns, lam_H, lam_W[0], w[0])
    Ws = [W1]
    for l in range(1, L):
        W = np.zeros((w[l + 1], w[l]))
        W[np.arange(K), np.arange(K)] = a[l + 1]
        Ws.append(W)
    return M1[:, problem.labels()], Ws


def construct(problem: UFM, configuration: str | None = None, dtype=None) -> Params:
    """Explicit parameters (H, Ws, b) attaining ``predict(problem, configuration).loss``.

    For the linear models: the balanced factorisation of the optimal class-coordinate matrix B (THEORY §0 (F),
    §9.0), with W_l = diag embeddings (every layer aligned); deep ReLU: the DNC point (THEORY §4.1) or the
    explicit SRG-family member (THEORY §4.3, ufm/_srg.py). For ``known=False`` predictions with a candidate
    (an upper bound) the candidate is returned.

    Args:
      problem: a concrete `ufm.UFM`.
      configuration: None (the predicted optimum), "dnc" or "srg" (deep ReLU only).
      dtype: the dtype of the returned arrays (default: JAX's default float).

    Raises:
      ValueError: naming why, when no explicit point is known (``predict(...).loss`` is nan).
    """
    dt = _check_dtype(dtype)
    pred = predict(problem, configuration)
    if not np.isfinite(pred.loss):
        raise ValueError(f"construct: no explicit optimum or candidate is known for this problem: {pred.reason}")
    lam_H, lam_W, lam_b, alpha = _concrete_lams(problem)
    if pred.configuration == "srg":
        srg, _ = _srg_members(problem, lam_H, lam_W)
        H, Ws = _srg_params_np(problem, srg, lam_H, lam_W)
        b = None
    elif pred.configuration == "dnc":
        H, Ws = _dnc_params_np(problem, lam_H, lam_W)
        b = None
    else:
        res = (
            _mse_linear(problem, lam_H, lam_W, lam_b)
            if problem.loss == "mse"
            else _ce_linear(problem, lam_H, lam_W, alpha)
        )
        sol = res["sol"]
        H, Ws = _linear_params_np(problem, sol, lam_H, lam_W)
        b = None if sol.b is None else np.nan_to_num(np.asarray(sol.b, float), nan=0.0)
    return Params(jnp.asarray(H, dt), tuple(jnp.asarray(W, dt) for W in Ws), None if b is None else jnp.asarray(b, dt))
