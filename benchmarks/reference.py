"""Reference problems of the time-to-optimum benchmark and their optimal loss from THEORY.md's closed forms.

Computed here independently of ``ufm`` (NumPy/SciPy only), and cross-checked against
``ufm.predict(problem).loss`` when that function exists (``optimum`` returns both).

Conventions (THEORY.md §0): fit = 1/(2N)||Out - Y||^2 (MSE) or 1/N sum CE; penalties lam/2||.||_F^2 with H
penalised as a whole, so n enters only through n lam_H.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.optimize import brentq

LAM = 5e-4  # the weight decay of Dang et al. 2023 (their K=4, n=100, d=64 setting)


def shallow_mse_nobias(K, n, lam_H, lam_W) -> float:
    """THEORY.md §1, no bias (mu = 1): rho = K sqrt(n lam_W lam_H); f* = rho - rho^2/2 if rho < 1 else 1/2.

    (Per singular direction the nuclear-norm problem (1-a)^2/(2K) + sqrt(n lam_W lam_H) a has a* = (1-rho)_+;
    summing the K equal directions gives the formula; Zhou et al. 2022, Tirer & Bruna 2022.)
    """
    rho = K * math.sqrt(n * lam_W * lam_H)
    return rho - rho**2 / 2 if rho < 1 else 0.5


def shallow_ce_nobias(K, n, lam_H, lam_W) -> float:
    """THEORY.md §2 (Zhu et al. 2021): c = sqrt(n lam_W lam_H); if K c < 1,
    alpha* = log((1 - (K-1)c)/c) and f* = -log(1 - (K-1)c) + c (K-1) alpha*; else f* = log K.

    (Minimising log(1 + (K-1)e^{-alpha}) + c(K-1)alpha: the derivative vanishes where the wrong-class
    probability mass (K-1)e^{-alpha}/(1+(K-1)e^{-alpha}) equals c(K-1), i.e. e^{alpha} = (1-(K-1)c)/c.)
    """
    c = math.sqrt(n * lam_W * lam_H)
    if K * c >= 1:
        return math.log(K)
    a = math.log((1 - (K - 1) * c) / c)
    return -math.log(1 - (K - 1) * c) + c * (K - 1) * a


def deep_scalar(K, n, lam_H, lam_Ws, P) -> float:
    """THEORY.md §0/§3: min_s phi(s), phi(s) = (1-s)^2/2 + K (P/2) C s^{2/P}, C = (n lam_H prod lam_W)^{1/P}.

    This is the bias-free deep linear UFM optimum with P = M + 1 factors (Dang et al. 2023) and the DNC loss
    of the deep ReLU UFM with L = P - 1 layers (§4.1), optimal for K = 2 (Súkeník et al. 2023; §4.2).
    For P >= 3 the positive stationary points solve g(s) = (1-s) s^{1-2/P} = K C; the local minimum is the
    root above s_m = (P-2)/(2P-2), where g peaks. It is compared with phi(0) = 1/2.
    """
    C = (n * lam_H * float(np.prod(lam_Ws))) ** (1.0 / P)

    def phi(s):
        return (1 - s) ** 2 / 2 + K * (P / 2) * C * s ** (2.0 / P)

    if P == 2:
        s = max(0.0, 1 - K * C)
        return phi(s)
    s_m = (P - 2) / (2 * P - 2)

    def g(s):
        return (1 - s) * s ** (1 - 2.0 / P) - K * C

    if g(s_m) <= 0:
        return 0.5
    s_plus = brentq(g, s_m, 1.0, xtol=1e-16, rtol=1e-15, maxiter=500)
    return min(phi(s_plus), 0.5)


def reference_problems(size: str = "full"):
    """The four reference problems: (name, ufm.UFM, closed-form f*). ``size="tiny"`` for the smoke test."""
    import ufm

    if size == "tiny":
        K, n, d = 3, 4, 8
    else:
        K, n, d = 4, 100, 64  # Dang et al. 2023's setting
    Kb = 2
    lam = LAM if size != "tiny" else 5e-3
    probs = [
        (
            "shallow MSE",
            ufm.UFM(num_classes=K, n_per_class=n, widths=(d,), loss="mse", lam_H=lam, lam_W=lam),
            shallow_mse_nobias(K, n, lam, lam),
        ),
        (
            "shallow CE",
            ufm.UFM(num_classes=K, n_per_class=n, widths=(d,), loss="ce", lam_H=lam, lam_W=lam),
            shallow_ce_nobias(K, n, lam, lam),
        ),
        (
            "deep linear (L=3)",
            ufm.UFM(num_classes=K, n_per_class=n, widths=(d, d, d), loss="mse", lam_H=lam, lam_W=lam),
            deep_scalar(K, n, lam, [lam] * 3, 4),
        ),
        (
            "binary deep ReLU (L=3)",
            ufm.UFM(
                num_classes=Kb, n_per_class=n, widths=(d, d, d), activation="relu", loss="mse", lam_H=lam, lam_W=lam
            ),
            deep_scalar(Kb, n, lam, [lam] * 3, 4),
        ),
    ]
    return probs


def optimum(problem, closed_form: float) -> dict:
    """The reference optimum: ``ufm.predict(problem).loss`` when available, cross-checked with the closed
    form computed here (relative difference recorded; the closed form is used if predict is absent)."""
    import ufm

    out = dict(closed_form=closed_form, predict=None, rel_diff=None, source="closed form (benchmarks/reference.py)")
    predict = getattr(ufm, "predict", None)
    if predict is not None:
        try:
            v = float(predict(problem).loss)
            out.update(predict=v, rel_diff=abs(v - closed_form) / abs(closed_form), source="ufm.predict")
        except Exception as e:  # record, fall back to the closed form
            out["predict_error"] = repr(e)
            out["source"] = "closed form (ufm.predict failed)"
    out["loss"] = out["predict"] if out["predict"] is not None else closed_form
    return out
