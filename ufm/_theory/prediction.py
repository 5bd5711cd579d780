"""The prediction record (`Prediction`), the references, and the input handling shared by the theory modules."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .._json import to_jsonable
from .._problem import UFM
from .convex import ConvexCertificate

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


REF_CONVEX = "convex reduction solved and certified by a duality gap (ufm/_theory/convex.py; THEORY.md §9.3-9.4)"


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
    certificate: ConvexCertificate | None = None
    collapsed_classes: tuple = ()

    def to_dict(self) -> dict:
        """A JSON-serialisable dict (arrays as nested lists, nan as None; the certificate as a dict)."""
        return to_jsonable(self._asdict())


def concrete_lams(problem: UFM) -> tuple[float, np.ndarray, float, float]:
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


def check_dtype(dtype):
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


def check_configuration(problem: UFM, configuration):
    if configuration not in (None, "dnc", "srg"):
        raise ValueError(f"configuration must be None, 'dnc' or 'srg'; got {configuration!r}")
    if configuration is not None and not (problem.activation == "relu" and problem.L >= 2):
        raise ValueError(
            f"configuration={configuration!r} applies to the deep ReLU UFM (activation='relu', L >= 2) only; "
            f"got activation={problem.activation!r}, L={problem.L}"
        )


def sv_len(problem: UFM):
    dims = problem.widths + (problem.K,)
    return [min(dims[l + 1], dims[l]) for l in range(problem.L)], [min(d, problem.N) for d in problem.widths]


def pad(v, n):
    v = np.sort(np.asarray(v, float))[::-1][:n]
    return np.concatenate([v, np.zeros(n - v.size)])


def unknown(problem: UFM, reason: str, reference: str = "", regime: str = "unknown", **kw) -> Prediction:
    lw, lh = sv_len(problem)
    nanv = lambda n: np.full(n, np.nan)  # noqa: E731
    b = None if problem.bias == "none" else nanv(problem.K)
    base: dict[str, Any] = dict(
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
