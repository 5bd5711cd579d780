"""`predict` and `construct`: the public entry points of the theory package."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from .._model import Params
from .._problem import UFM
from .deep_relu import dnc_params, dufm, srg_members, srg_params
from .linear import LinearOptimum, ce_linear, from_linear, linear_params, mse_linear
from .prediction import Prediction, check_configuration, check_dtype, concrete_lams, unknown

__all__ = ["construct", "predict"]


def predict(problem: UFM, configuration: str | None = None) -> Prediction:
    """The predicted global optimum of ``problem``: loss, regime, spectra, structure and its source.

    Covered (THEORY.md sections; P = L + 1 factors, C = (n lam_H prod lam_W)^{1/P}):

    * linear (or L = 1) MSE UFM, any depth, bias none / free: per-direction scalar problems (§0, §1, §3, §9.1,
      §9.2), balanced or imbalanced, including narrow widths (§9.7) and the zero threshold (rho = K sqrt(n lam_W
      lam_H) >= 1 for P = 2, C >= C* = A*(P)/(K P/2) for P >= 3, first order);
    * shallow MSE with a regularised bias (§1 balanced; §9.3 imbalanced: closed form when B0 is PSD, else the
      convex program, certified); deep + regularised bias: the class-symmetric candidate (``known=False``) unless
      narrow (§9.7, known);
    * shallow cross-entropy, balanced, d >= K-1, bias none / free / reg, with label smoothing (§2, §9.6);
    * shallow cross-entropy with unequal class sizes, bias none / free / reg, label smoothing (§9.4; the
      nuclear-norm program of Hong & Ling 2023), including minority collapse: solved in NumPy and ``known=True``
      only with a duality-gap certificate (``Prediction.certificate``, relative gap <= 1e-10) and when the
      optimum's rank fits the width d;
    * deep ReLU MSE without bias (L >= 2): K = 2 balanced: DNC, a theorem (Súkeník et al. 2023); K >= 3: DNC and,
      for K = r(r-1)/2, the SRG family (§4.3); the lower is reported, ``known=False`` (upper bounds only).

    Everything else returns ``known=False`` with the reason (never raises for a valid problem): deep CE,
    balanced CE with d < K-1, a convex optimum whose rank exceeds d or whose gap stays above 1e-10, deep linear
    + regularised bias + unequal classes, deep ReLU with bias or CE.
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
    lam_H, lam_W, lam_b, alpha = concrete_lams(problem)
    check_configuration(problem, configuration)
    if lam_H <= 0 or np.any(lam_W <= 0):
        return unknown(
            problem,
            "every lambda_H, lambda_W must be > 0: with a zero lambda the infimum is not attained "
            "(rescaling H against W) or the problem is unregularised; the theorems assume all > 0",
            configuration=configuration,
        )
    if problem.activation == "relu" and problem.L >= 2:
        return dufm(problem, lam_H, lam_W, configuration)
    if problem.loss == "mse":
        res = mse_linear(problem, lam_H, lam_W, lam_b)
    else:
        res = ce_linear(problem, lam_H, lam_W, lam_b, alpha)
    if isinstance(res, Prediction):
        return res
    return from_linear(problem, res, lam_H, lam_W)


def construct(problem: UFM, configuration: str | None = None, dtype=None) -> Params:
    """Explicit parameters (H, Ws, b) attaining ``predict(problem, configuration).loss``.

    For the linear models: the balanced factorisation of the optimal class-coordinate matrix B (THEORY §0 (F),
    §9.0), with W_l = diag embeddings (every layer aligned); deep ReLU: the DNC point (THEORY §4.1) or the
    explicit SRG-family member (THEORY §4.3, ufm/_theory/srg.py). For ``known=False`` predictions with a candidate
    (an upper bound) the candidate is returned.

    Args:
      problem: a concrete `ufm.UFM`.
      configuration: None (the predicted optimum), "dnc" or "srg" (deep ReLU only).
      dtype: the dtype of the returned arrays, "float32" or "float64" (default: JAX's default float).

    Raises:
      TypeError: ``dtype`` is not float32 / float64 (checked before any compute).
      ValueError: naming why, when no explicit point is known (``predict(...).loss`` is nan).
    """
    dt = check_dtype(dtype)
    pred = predict(problem, configuration)
    if not np.isfinite(pred.loss):
        raise ValueError(f"construct: no explicit optimum or candidate is known for this problem: {pred.reason}")
    lam_H, lam_W, lam_b, alpha = concrete_lams(problem)
    if pred.configuration == "srg":
        srg, _ = srg_members(problem, lam_H, lam_W)
        H, Ws = srg_params(problem, srg, lam_H, lam_W)
        b = None
    elif pred.configuration == "dnc":
        H, Ws = dnc_params(problem, lam_H, lam_W)
        b = None
    else:
        res = (
            mse_linear(problem, lam_H, lam_W, lam_b)
            if problem.loss == "mse"
            else ce_linear(problem, lam_H, lam_W, lam_b, alpha)
        )
        assert isinstance(res, LinearOptimum)  # a finite predicted loss comes with a point
        sol = res.sol
        H, Ws = linear_params(problem, sol, lam_H, lam_W)
        b = None if sol.b is None else np.nan_to_num(np.asarray(sol.b, float), nan=0.0)
    return Params(jnp.asarray(H, dt), tuple(jnp.asarray(W, dt) for W in Ws), None if b is None else jnp.asarray(b, dt))
