"""The verdict: is a solution the predicted optimum, a better point, a local minimum, a saddle, or unconverged?

`check` gathers, for one solution of one problem: the relative loss gap to `ufm.predict`, rotation-invariant
distances to the predicted optimum layer by layer, the collapse metrics of every layer (`ufm.metrics`), the
first- and second-order certificates (`ufm.certify`), and a one-word verdict with a one-line explanation.
"""

from __future__ import annotations

import json
import math
from typing import Any, NamedTuple

import jax
import numpy as np

from . import metrics as _metrics
from ._certificates import Certificate, certify, rounding_floor
from ._json import to_jsonable
from ._model import Params, check_params, forward
from ._problem import UFM
from ._theory import construct, predict

VERDICTS = ("matches", "below-prediction", "local-min", "saddle", "not-converged", "unresolved", "no-prediction")

# Defaults by the dtype of the solution (the point is always *evaluated* in float64 when x64 is on).
#  rel_grad_tol: on the scale-aware stationarity rel_grad = ||grad f|| / (||grad F|| + ||grad R||) (kink-aware
#             numerator for ReLU; `ufm.certify`), the definition the solver's stopping rule shares. It does not
#             depend on lambda or on the loss scale: at a critical point grad F = -grad R and rel_grad measures how
#             well the two cancel. Measured (tests/test_certificates_scale.py, README): near a minimum the
#             relative loss gap is ~ 0.3-2 x rel_grad^2, so rel_grad <= 1e-6 (float64) / 1e-3 (float32) keeps an
#             unconverged point's gap ~1e-12 / ~1e-6, far inside gap_tol; exact optima rounded to float64 give
#             rel_grad ~1e-14, to float32 ~1e-7..1e-6 at lambda >= 1e-3 (and up to 0.6 at lambda = 1e-8: there
#             float32 cannot resolve the point, see `ufm.certificates.rounding_floor`); an L-BFGS run stopped at
#             ||grad f|| <= 1e-9 on the README quickstart has rel_grad 2e-8.
#  gap_tol:   on the relative loss gap |f - f_pred| / |f_pred|: quadratic in the distance near a minimum;
#             float32 losses carry ~1e-7 relative rounding per operation, 1e-4 leaves room for a solve's.
#  hess_rtol: an eigenvalue counts as negative below -hess_rtol * |lambda_max|. A point that is stationary
#             only to within g moves eigenvalues by O(g * third derivative); Lanczos runs at relative tol 1e-8.
DEFAULT_TOLERANCES = {
    "float64": {"rel_grad_tol": 1e-6, "gap_tol": 1e-6, "hess_rtol": 1e-6},
    "float32": {"rel_grad_tol": 1e-3, "gap_tol": 1e-4, "hess_rtol": 1e-4},
}


class Report(NamedTuple):
    """What `check` found. Never prints; ``to_dict()`` / ``to_json()`` for storage.

    Attributes:
      verdict: one of ``VERDICTS``:
        "matches" (stationary, no negative curvature, loss within ``gap_tol`` of the prediction),
        "below-prediction" (loss below the prediction by more than ``gap_tol``: the predicted configuration is
        not the global optimum here; stationary or not, the point itself is the proof),
        "local-min" (stationary, no negative curvature found, loss above the prediction),
        "saddle" (stationary with a negative Hessian eigenvalue at a smooth point, or an explicit lower point found
        by the second-order test: `ufm.certify`),
        "not-converged" (not stationary, or non-finite values),
        "unresolved" (not stationary, and the point's dtype cannot make it so: rounding the parameters alone gives
        a relative gradient above the tolerance, `rounding_floor`; solve in float64),
        "no-prediction" (stationary and no negative curvature, but no predicted loss to compare with).
        What "matches"/"local-min" certify is in ``second_order``.
      explanation: one line for a human.
      value: the objective at the solution (float64 evaluation).
      predicted_loss: the prediction's loss (None if there is none).
      gap: (value - predicted_loss) / |predicted_loss| (None without prediction).
      prediction: ``Prediction.to_dict()`` (or {"loss": x} for a bare number; None without).
      certificate: the `Certificate` (stationarity; the Hessian spectrum and descent test only at stationary
        points, else None).
      distances: rotation-invariant distances to the predicted optimum (`distances`), None without prediction.
      metrics: ``ufm.metrics.layer_metrics`` of the solution (None if ``metrics=False``).
      tolerances: the tolerances used.
      solver: status/message/num_steps of a `ufm.Solution`, None for bare params.
      problem: ``problem.to_dict()``.
      dtype: the solution's dtype.
      second_order: ``certificate.second_order``: "certified" (second-order conditions hold to tolerance: no
        Hessian eigenvalue below -hess_tol off the symmetry directions, and at ReLU kinks every multiplier
        positive or the lifted form positive, or on the critical subspace, or, with every kink degenerate, the
        semidefinite bound on the nested kink fan: `ufm._certificates.KinkTest`), "first-order only" (ReLU kinks
        where the test is inconclusive),
        "descent"/"negative curvature" (verdict "saddle"), "not checked: budget" (Lanczos ran out of iterations
        or time), "not checked" (``hessian=False`` or not stationary).
    """

    verdict: str
    explanation: str
    value: float
    predicted_loss: float | None
    gap: float | None
    prediction: dict | None
    certificate: Certificate
    distances: dict | None
    metrics: dict | None
    tolerances: dict
    solver: dict | None
    problem: dict
    dtype: str
    second_order: str = "not checked"

    def to_dict(self) -> dict:
        """A JSON-serialisable dict (`ufm._json.to_jsonable`: NumPy/JAX numbers become Python numbers, arrays lists,
        and non-finite floats None, as everywhere in ufm: strict JSON has no NaN)."""
        d = self._asdict()
        d["certificate"] = self.certificate.to_dict()
        return to_jsonable(d)

    def to_json(self, **kwargs) -> str:
        """``json.dumps(self.to_dict(), allow_nan=False, **kwargs)``."""
        return json.dumps(self.to_dict(), allow_nan=False, **kwargs)


# ---------------------------------------------------------------------------------------------------------------
# distances to the prediction


def _rel(a, b) -> float | None:
    """||a - b|| / ||b|| over the entries where b is finite (absolute ||a - b|| when b = 0); None if b has no
    finite entry (not determined by the theory)."""
    a = np.asarray(a, np.float64).ravel()
    b = np.asarray(b, np.float64).ravel()
    if b.size == 0:
        return None
    ok = np.isfinite(b)
    if not np.any(ok):
        return None
    diff = float(np.linalg.norm(a[ok] - b[ok]))
    nb = float(np.linalg.norm(b[ok]))
    return diff / nb if nb > 0 else diff


def _sv(A, n):
    s = np.linalg.svd(np.asarray(A, np.float64), compute_uv=False)
    s = s[:n]
    return np.concatenate([s, np.zeros(n - s.size)])


def distances(problem: UFM, params: Params, prediction) -> dict:
    """Rotation-invariant distances between a solution and the predicted optimum (``construct(problem,
    prediction.configuration)``, whose spectra, norms and Gram matrices the `Prediction` carries), layer by layer.

    Every entry is a relative distance ||x - x_pred|| / ||x_pred|| (absolute where x_pred = 0), over the entries
    the theory determines, or None where it determines none:

    * ``W[l]``: ``sv`` the singular values of W_l (descending), ``norm`` ||W_l||_F;
    * ``H[l]``: ``sv`` the singular values of the features H_l (all N columns), ``norm`` ||H_l||_F, ``gram`` the
      class-mean Gram M_l^T M_l (K x K, in class coordinates, hence invariant under rotations of the feature
      space; compared only where `Prediction.gram_H` is given);
    * ``out_sv``: singular values of the output; ``gram_W``: W_L W_L^T (K x K); ``b``: the bias.

    Only what is determined is compared (THEORY.md §4.1, §9.7): for the deep ReLU optimum W_1, H_1 and Z_2 are not
    unique even modulo rotations (a one-parameter family of first layers has the same loss), so ``sv`` of W_1/H_1
    and ``gram`` of H_1 are None and only ||W_1||_F, ||H_1||_F and (``first_layer_nuclear``) ||W_1 H_1||_* are
    compared; with narrow widths only singular values and norms are (the Grams are None in the prediction); for
    CE with a free bias b is determined only up to a constant (None). Where the prediction is an SRG/DNC candidate
    that is not proven optimal, these are distances to that candidate.
    """
    fw = forward(problem, params)
    y = problem.labels()
    K = problem.num_classes
    L = problem.L
    out: dict[str, Any] = {"W": [], "H": []}
    for l in range(L):
        W = np.asarray(params.Ws[l], np.float64)
        out["W"].append(
            {
                "sv": _rel(_sv(W, len(prediction.sv_W[l])), prediction.sv_W[l]),
                "norm": _rel(np.linalg.norm(W), prediction.norms_W[l]),
            }
        )
        Hl = np.asarray(fw.H[l], np.float64)
        G = prediction.gram_H[l]
        M, _ = _metrics.class_means(Hl, y, K)
        out["H"].append(
            {
                "sv": _rel(_sv(Hl, len(prediction.sv_H[l])), prediction.sv_H[l]),
                "norm": _rel(np.linalg.norm(Hl), prediction.norms_H[l]),
                "gram": None if G is None else _rel(M.T @ M, G),
            }
        )
    o = np.asarray(fw.out, np.float64)
    out["out_sv"] = _rel(_sv(o, len(prediction.sv_out)), prediction.sv_out)
    WL = np.asarray(params.Ws[-1], np.float64)
    out["gram_W"] = None if prediction.gram_W is None else _rel(WL @ WL.T, prediction.gram_W)
    out["b"] = None if (prediction.b is None or params.b is None) else _rel(params.b, prediction.b)
    out["first_layer_nuclear"] = None
    if problem.activation == "relu" and L >= 2 and math.isfinite(prediction.loss):
        ref = construct(problem, prediction.configuration)
        nuc = lambda W, H: float(np.linalg.norm(np.asarray(W, np.float64) @ np.asarray(H, np.float64), "nuc"))
        out["first_layer_nuclear"] = _rel(nuc(params.Ws[0], params.H), nuc(ref.Ws[0], ref.H))
    vals = jax.tree_util.tree_leaves(out)  # None entries are empty subtrees, not leaves
    out["max"] = max(vals) if vals else None
    return out


# ---------------------------------------------------------------------------------------------------------------
# the verdict


def _unpack(problem: UFM, solution):
    if hasattr(solution, "params") and hasattr(solution, "status"):
        if np.ndim(solution.status) > 0:
            raise ValueError(
                f"check takes one solution; got a batch of {np.shape(solution.status)[0]} "
                "(pick one with solutions.take(i))"
            )
        st = int(np.asarray(solution.status))
        solver = {
            "status": st,
            "num_steps": int(np.asarray(solution.num_steps)),
            "grad_norm": float(np.asarray(solution.grad_norm)),
        }
        try:
            solver["status_name"] = solution.status_name
            solver["message"] = solution.message
        except (AttributeError, KeyError):
            pass
        params = solution.params
    elif isinstance(solution, Params) or (isinstance(solution, tuple) and len(solution) == 3):
        params, solver = solution, None
    else:
        raise TypeError(f"solution must be a ufm.Solution or ufm.Params(H, Ws, b); got {type(solution).__name__}")
    check_params(problem, params, "solution.params" if solver is not None else "params")
    return Params(*params), solver


def _prediction(problem, prediction, configuration):
    if prediction is None:
        prediction = predict(problem, configuration)
    elif configuration is not None:
        raise ValueError("give prediction or configuration, not both")
    if isinstance(prediction, (int, float, np.floating, np.integer)) and not isinstance(prediction, bool):
        loss = float(prediction)
        return None, (loss if math.isfinite(loss) else None), {"loss": loss}
    if not hasattr(prediction, "loss"):
        raise TypeError(
            f"prediction must be a ufm.Prediction, a number (a reference loss) or None; got {type(prediction).__name__}"
        )
    loss = float(prediction.loss)
    return prediction, (loss if math.isfinite(loss) else None), prediction.to_dict()


def _fmt(x: float | None) -> str:
    return f"{x:.4g}"


def _second_order_text(cert: Certificate, curv: str) -> str:
    """The explanation's second-order clause for a stationary point: what ``cert.second_order`` certifies, with the
    curvature text ``curv`` and the kink counts."""
    so = cert.second_order
    if so == "certified":
        second = f"second order certified ({curv}"
        if cert.kink is not None:
            k = cert.kink
            second += (
                f"; {k.kinks} ReLU kinks: {k.strong} with positive multipliers, {k.degenerate} degenerate"
                f" ({k.lifted} lifted)"
            )
            if k.critical_dim is not None and k.fan_min is None:
                second += (
                    f"; on the critical subspace of the {k.strict} strictly complementary kinks (dim"
                    f" {k.critical_dim}) the smallest eigenvalue is {_fmt(k.critical_min)}"
                )
            if k.fan_min is not None:
                second += (
                    f"; on the nested fan of the degenerate kinks, by a semidefinite relaxation"
                    f" ({k.fan_pairs} kink pairs), the form is >= {_fmt(k.fan_min)} |x|^2"
                )
        second += ")"
    elif so == "first-order only":
        kt = cert.kink
        second = (
            f"first-order only: at the {cert.stationarity.kinks} ReLU kinks the second-order test is inconclusive ("
            + (f"{kt.negative} negative multipliers, " if kt and kt.negative else "")
            + (f"{kt.degenerate} degenerate kinks, " if kt and kt.degenerate else "")
            + f"{curv} on the {'lifted ' if kt and kt.lifted else ''}form"
            + (f", {_fmt(kt.critical_min)} on the critical subspace" if kt and kt.critical_min is not None else "")
            + (f", {_fmt(kt.fan_min)} on the nested kink fan" if kt and kt.fan_min is not None else "")
            + ", no lower point found)"
        )
    elif so == "not checked: budget":
        hs = cert.hessian
        assert hs is not None  # the budget ran out inside the Hessian computation
        second = (
            f"second order not checked: budget ({hs.iterations} Lanczos steps, {_fmt(hs.seconds)} s; {curv} so far)"
        )
    else:
        second = "second order not checked"
    return second


def _tolerances(dtype: str, **given) -> dict[str, Any]:
    """`DEFAULT_TOLERANCES` of the dtype, with the tolerances the caller gave (each a finite number >= 0)."""
    tol_key = "float32" if dtype in ("float32", "float16", "bfloat16") else "float64"
    tol: dict[str, Any] = dict(DEFAULT_TOLERANCES[tol_key])
    for name, v in given.items():
        if v is not None:
            if isinstance(v, bool) or not (isinstance(v, (int, float, np.floating)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be a finite number >= 0; got {v!r}")
            tol[name] = float(v)
    return tol


def _verdict(problem, params, pred, f_star, gap, finite, cert, tol, grad_tol, dtype) -> tuple[str, str]:
    """`check`'s verdict and its explanation from the certificate and the gap (the rules of `check`'s docstring);
    records ``hess_tol`` (and ``rounding_floor`` where it was needed) in ``tol``."""
    st = cert.stationarity
    f = st.value
    hs = cert.hessian
    lam_min = hs.smallest[0] if (hs is not None and hs.smallest) else None
    tol["hess_tol"] = cert.hess_tol
    name = "" if pred is None else (pred.configuration or "")
    label = f"the predicted {name + ' ' if name else ''}loss"
    caveat = ""
    if pred is not None and not pred.known:
        caveat = " (the prediction is a candidate, not a proven optimum)"
    sym = "" if hs is None or not hs.symmetry_dim else f" after removing {hs.symmetry_dim} symmetry directions"
    curv = "" if lam_min is None else f"smallest Hessian eigenvalue {_fmt(lam_min)}{sym}"
    if grad_tol is None:
        stat_txt = f"relative gradient {_fmt(st.grad_norm_rel)}"
        stationary = st.grad_norm_rel <= tol["rel_grad_tol"]
        tol_txt = f"rel_grad_tol {_fmt(tol['rel_grad_tol'])}"
    else:
        stat_txt = f"gradient norm {_fmt(st.stationarity)}"
        stationary = st.stationarity <= grad_tol
        tol_txt = f"grad_tol {_fmt(grad_tol)}"
    stat_txt += f" (kink-aware, {st.kinks} kinks)" if st.kinks else ""
    so = cert.second_order
    if not finite:
        verdict, why = "not-converged", "Not converged: the objective or the parameters are not finite."
    elif gap is not None and gap < -tol["gap_tol"]:
        verdict = "below-prediction"
        why = (
            f"Loss {_fmt(f)} is {_fmt(-100 * gap)}% below {label} {_fmt(f_star)}: the predicted configuration is "
            f"not the global optimum here"
            + ("" if stationary else f" (the point itself is not yet stationary: {stat_txt})")
            + "."
        )
    elif not stationary:
        floor = rounding_floor(problem, params)
        tol["rounding_floor"] = floor
        reach = floor >= (
            tol["rel_grad_tol"]
            if grad_tol is None
            else grad_tol / max(st.grad_fit_norm + st.grad_reg_norm, np.finfo(np.float64).tiny)
        )
        if reach:
            verdict = "unresolved"
            why = (
                f"Unresolved: the {dtype} dtype cannot resolve this point: {stat_txt} > {tol_txt}, and rounding "
                f"the parameters to {dtype} alone gives a relative gradient ~{_fmt(floor)}; solve in float64"
            )
        else:
            verdict = "not-converged"
            why = f"Not stationary: {stat_txt} > {tol_txt}"
        why += "." if gap is None else f"; loss is {_fmt(100 * gap)}% off {label}."
    elif so in ("descent", "negative curvature"):
        verdict = "saddle"
        why = f"Saddle: stationary ({stat_txt}) but the {curv} < -{_fmt(cert.hess_tol)}"
        if cert.descent is not None and so == "descent":
            why = (
                f"Saddle: stationary ({stat_txt}) but a step {_fmt(cert.descent.step)} along a second-order "
                f"direction lowers the loss by {_fmt(cert.descent.decrease)} ({curv})"
            )
        why += "."
    else:
        second = _second_order_text(cert, curv)
        if f_star is None:
            verdict = "no-prediction"
            reason = "" if pred is None else f" ({pred.reason.split(';')[0]})"
            why = f"No predicted loss for this problem{reason}; the point is stationary ({stat_txt}), {second}."
        else:
            assert gap is not None  # set whenever f_star is and the point is finite
            if abs(gap) <= tol["gap_tol"]:
                verdict = "matches"
                why = f"Matches {label} {_fmt(f_star)}{caveat}: relative gap {_fmt(gap)}, {stat_txt}, {second}."
            else:
                verdict = "local-min"
                why = (
                    f"Local minimum {_fmt(100 * gap)}% above {label} {_fmt(f_star)}{caveat}: stationary "
                    f"({stat_txt}), {second}."
                )
    return verdict, why


def check(
    problem: UFM,
    solution,
    prediction=None,
    *,
    configuration: str | None = None,
    gap_tol: float | None = None,
    grad_tol: float | None = None,
    hess_rtol: float | None = None,
    hessian: bool = True,
    metrics: bool = True,
    kink_rtol: float | None = None,
    hessian_options: dict | None = None,
    rel_grad_tol: float | None = None,
    max_time: float = 60.0,
) -> Report:
    """Check one solution of a UFM against the theory: gap, distances, metrics, certificates and a verdict.

    The verdict, decided in this order (f = the objective at the point, f* = the predicted loss):

    1. "not-converged" if f or a parameter is not finite;
    2. "below-prediction" if (f - f*)/|f*| < -gap_tol: a point with a lower loss proves that the predicted
       configuration is not the global optimum (for a ``known=True`` prediction this would contradict a
       theorem: suspect the problem setup);
    3. not stationary: the scale-aware stationarity rel_grad = ||grad f|| / (||grad F|| + ||grad R||) (F the
       fit, R the penalty; for ReLU models the numerator is the smallest norm over the slopes in [0, 1] at the
       kinks, see `ufm.certify`; 0/0 = 0) exceeds ``rel_grad_tol`` (or, if an absolute ``grad_tol`` is given,
       the kink-aware ||grad f|| exceeds it): "unresolved" when the dtype of the point cannot get below the
       tolerance even at the exact optimum (`rounding_floor` >= the tolerance), else "not-converged";
    4. "saddle" if the second-order test (`ufm.certify`) found negative curvature at a smooth point or an explicit
       lower point;
    5. "no-prediction" if there is no predicted loss (metrics and certificates alone);
    6. "matches" if |f - f*|/|f*| <= gap_tol, else "local-min" (above the prediction); ``second_order`` says
       whether second order is certified, first-order only (ReLU kinks), or not checked (budget / off).

    The second-order certificate (compiled Lanczos on Hessian-vector products with the rotation symmetries
    projected out; dense below 1500 parameters) is computed only at stationary points, within ``max_time``
    seconds and ``hessian_options["maxiter"]`` Lanczos steps; past that budget ``second_order`` is
    "not checked: budget" and "matches"/"local-min" are first-order statements. With ``hessian=False`` it is
    skipped.

    Args:
      problem: the `ufm.UFM`.
      solution: a `ufm.Solution` (one run; ``sols.take(i)`` from a batch) or bare `ufm.Params`.
      prediction: a `ufm.Prediction`, a number (a reference loss), or None for ``ufm.predict(problem,
        configuration)``.
      configuration: deep ReLU: "dnc" or "srg" to check against that configuration (with ``prediction=None``).
      gap_tol, rel_grad_tol, hess_rtol: tolerances; None for the defaults of the solution's dtype
        (``DEFAULT_TOLERANCES``: float64 1e-6, 1e-6, 1e-6; float32 1e-4, 1e-3, 1e-4).
      grad_tol: an absolute tolerance on the (kink-aware) gradient norm instead of the relative one (the old
        default; not scale-aware: at small lambda the gradient is small everywhere).
      hessian: compute the second-order certificate at stationary points.
      max_time: seconds for the certificates (the kink search and Lanczos); past it, an explicit
        "not checked: budget".
      metrics: compute ``ufm.metrics.layer_metrics``.
      kink_rtol: ReLU kink threshold for the stationarity measure (see `ufm.certify`).
      hessian_options: passed to `ufm.certify` (``kink_fan``: the nested-fan test, None auto / True / False) and
        on to `ufm.hessian_spectrum` (k, method, project_symmetries, maxiter, krylov_dim, ...).

    Returns:
      A `Report`.

    Example:
      >>> import ufm
      >>> p = ufm.UFM(num_classes=3, n_per_class=2, widths=(4,), bias="free", lam_H=1e-2, lam_W=1e-2)
      >>> ufm.check(p, ufm.construct(p)).verdict
      'matches'
    """
    if not isinstance(problem, UFM):
        raise TypeError(f"problem must be a ufm.UFM; got {type(problem).__name__}")
    params, solver = _unpack(problem, solution)
    dtype = str(np.asarray(params.H).dtype)
    # the float tolerances, and (below) hess_tol, None where no Hessian was computed
    tol = _tolerances(
        dtype, gap_tol=gap_tol, grad_tol=grad_tol, hess_rtol=hess_rtol, rel_grad_tol=rel_grad_tol, max_time=max_time
    )
    pred, f_star, pred_dict = _prediction(problem, prediction, configuration)

    finite = all(bool(np.all(np.isfinite(np.asarray(x)))) for x in jax.tree_util.tree_leaves(params))
    cert = certify(
        problem,
        params,
        hessian="if-stationary" if (hessian and finite) else False,
        kink_rtol=kink_rtol,
        grad_tol=grad_tol,
        rel_grad_tol=tol["rel_grad_tol"],
        hess_rtol=tol["hess_rtol"],
        max_time=max_time,
        **(hessian_options or {}),
    )
    f = cert.stationarity.value
    finite = finite and math.isfinite(f)
    gap = None
    if f_star is not None and finite:
        gap = (f - f_star) / max(abs(f_star), np.finfo(np.float64).tiny)
    dist = distances(problem, params, pred) if (pred is not None and f_star is not None and finite) else None
    mets = _metrics.layer_metrics(problem, params) if (metrics and finite) else None
    verdict, why = _verdict(problem, params, pred, f_star, gap, finite, cert, tol, grad_tol, dtype)
    so = cert.second_order
    return Report(verdict, why, f, f_star, gap, pred_dict, cert, dist, mets, tol, solver, problem.to_dict(), dtype, so)
