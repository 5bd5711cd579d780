"""The per-layer collapse summary of a UFM solution (`layer_metrics`) and the NC2 geometry the theory predicts for
each layer (`nc2_target`). Public through `ufm.metrics`; the metrics themselves are the pure `ufm._metrics`."""

from __future__ import annotations

import numpy as np

from . import _metrics as m
from ._model import Params, check_params, forward

__all__ = ["nc2_target", "layer_metrics"]


# ---------------------------------------------------------------------------------------------------------------
# the per-layer summary of a UFM


def nc2_target(problem, layer: str) -> str | None:
    """The geometry the theory predicts for the class means of one layer of a UFM, or None where it predicts none.

    ``layer`` is "H_1", "Z_l", "H_l" (l >= 2) or "out". Returns "etf" (compare the centred means with
    `etf_distance`), "orthogonal" (uncentred means, `orthogonal_frame_distance`), "orthogonal-unequal" (the
    general orthogonal frame of imbalanced bias-free MSE, Dang et al. 2023), or None:

    * CE (any bias) or MSE with a bias, shallow or deep linear, balanced: "etf" in every layer (Zhu et al. 2021;
      Zhou et al. 2022; THEORY.md §1-3). Imbalanced with a bias or CE: None (the means are not an ETF, §9.2, §9.4).
    * bias-free MSE, linear: "orthogonal" ("orthogonal-unequal" when imbalanced), every layer (§1, §3, §9.1).
    * ReLU: H_l (l >= 2) and Z_l (l >= 3) and the output of bias-free MSE are "orthogonal" (the DNC point,
      §4.1); H_1 and Z_2 are None (not unique, §4.1); with CE or a bias: None (no theory here).
    * narrow layers (a width below the number of tied directions: K, or K - 1 with a bias or CE): None (§9.7,
      the geometry is not unique).
    """
    K = problem.num_classes
    biasfree_mse = problem.loss == "mse" and problem.bias == "none"
    ndir = K if biasfree_mse else K - 1
    if min(problem.widths) < ndir:
        return None
    if problem.activation == "relu" and problem.L >= 2:
        if not biasfree_mse:
            return None
        if layer in ("H_1", "Z_2"):
            return None
        return "orthogonal" if problem.balanced else "orthogonal-unequal"
    if biasfree_mse:
        return "orthogonal" if problem.balanced else "orthogonal-unequal"
    return "etf" if problem.balanced else None


def _nc2_value(target, st):
    if target == "etf":
        return m.nc2_etf(st)
    if target == "orthogonal":
        return m.nc2_orthogonal(st)
    if target == "orthogonal-unequal":
        return m.nc2_orthogonal(st, equinorm=False)
    return None


def _feature_entry(name, A, y, K, target, rank_rtol):
    A = np.asarray(A)  # keep the solution's dtype: the default cut-offs depend on it
    st = m.class_stats(A, y, K)  # one pass, shared by every metric of the entry
    M, muG = m.class_means(st)
    Mc = M - muG[:, None]
    sv = m.singular_values(A)
    return {
        "name": name,
        "shape": list(A.shape),
        "nc1": m.nc1(st),
        "nc1_trace_ratio": m.nc1_trace_ratio(st),
        "cdnv": m.cdnv(st),
        "nc2_target": target,
        "nc2": _nc2_value(target, st),
        "nc2_etf": m.nc2_etf(st),
        "nc2_orthogonal": m.nc2_orthogonal(st),
        "equinorm": m.equinorm(Mc),
        "equiangularity": m.equiangularity(Mc),
        "max_angle": m.max_angle(Mc),
        "mean_norms": np.linalg.norm(M, axis=0).tolist(),
        "singular_values": sv.tolist(),
        "class_mean_singular_values": m.singular_values(M).tolist(),
        "numerical_rank": m.numerical_rank(A, rank_rtol),
        "stable_rank": m.stable_rank(A),
    }


def layer_metrics(problem, params, *, rank_rtol: float = 1e-4) -> dict:
    """Collapse metrics in every layer of a UFM solution, as a JSON-serialisable dict (Python floats, ints, lists,
    strings, None; a degenerate ratio such as NC1 with coincident class means may be ``inf``, which ufm's strict
    JSON writers store as null).

    Layers, in the notation of `ufm.forward` (THEORY.md §4): the free features H_1; for l = 2..L the
    pre-activation Z_l = W_{l-1} H_{l-1} and the post-activation H_l = s(Z_l) (for a linear model Z_l = H_l and
    only H_l is listed); and the output W_L H_L + b. Each feature entry has NC1 (`nc1`, `nc1_trace_ratio`,
    `cdnv`), NC2 against both targets (`etf_distance` of the centred means, `orthogonal_frame_distance` of the
    uncentred means), ``nc2`` against the target the theory predicts for that layer (`nc2_target`; None where
    it predicts none), equinorm, equiangularity, max-angle, class-mean norms, the singular values of the
    features (all N columns) and of the class means, the numerical rank (singular values above ``rank_rtol``
    times the largest) and the stable rank.

    Each weight entry W_l has its singular values, Frobenius norm, ranks, `balancedness` with the previous factor
    (H for W_1; per neuron across a ReLU), `self_duality_gram` with the class means of its input, and `dnc3`.

    ``"classifier"`` has NC3 (`nc3_product` against the predicted target, `nc3_difference`), NC4
    (`ncc_mismatch`) and the `bias_residual`, for W_L on H_L.

    ``"partial"`` (linear models only; empty for ReLU) lists, per layer l, `nc3_product` of the partial product
    W_L ... W_l (`partial_products`) on the class means of H_l, against the same target as ``"classifier"``.

    ``"dnc"`` lists, per layer l = 1..L, the deep-collapse set of Súkeník et al. 2023 (normalisations as in
    THEORY.md §5): DNC1_l = `nc1` of H_l, DNC2_l = `orthogonal_frame_distance` of the uncentred means of H_l and
    their `inverse_condition_number`, DNC3_l = `dnc3` of W_l against the means of H_l. Layer 1 is reported but
    exempt from DNC2/DNC3 for ReLU models (its optimum is not unique, §4.1): ``"exempt": True``.
    """
    check_params(problem, params)
    params = Params(*params)
    fw = forward(problem, params)
    y = problem.labels()
    K = problem.num_classes
    Hs = [np.asarray(h, np.float64) for h in fw.H]
    Ws = [np.asarray(W, np.float64) for W in params.Ws]
    weights, dnc = _weight_and_dnc_entries(problem, params, fw, Hs, Ws, y, rank_rtol)
    b = None if params.b is None else np.asarray(params.b, np.float64)
    nc3_target = "orthogonal" if (problem.loss == "mse" and problem.bias == "none") else "etf"
    partial = []
    if problem.activation != "relu":  # out = (W_L ... W_l) H_l + b: NC3 of the map from layer l to the output
        for l, P in enumerate(m.partial_products(Ws), start=1):
            partial.append({"layer": l, "nc3_product": m.nc3_product(P, Hs[l - 1], y, K, target=nc3_target)})
    return {
        "features": _feature_entries(problem, fw, y, rank_rtol),
        "weights": weights,
        "classifier": _classifier_entry(Hs[-1], Ws[-1], b, y, K, nc3_target),
        "dnc": dnc,
        "partial": partial,
        "rank_rtol": rank_rtol,
    }


def _feature_entries(problem, fw, y, rank_rtol: float) -> list[dict]:
    """The feature entries of `layer_metrics`: H_1, then Z_l (ReLU only) and H_l for l = 2..L, then the output."""
    K = problem.num_classes
    feats = [_feature_entry("H_1", fw.H[0], y, K, nc2_target(problem, "H_1"), rank_rtol)]
    for l in range(2, problem.L + 1):
        if problem.activation == "relu":
            feats.append(_feature_entry(f"Z_{l}", fw.Z[l - 2], y, K, nc2_target(problem, f"Z_{l}"), rank_rtol))
        feats.append(_feature_entry(f"H_{l}", fw.H[l - 1], y, K, nc2_target(problem, f"H_{l}"), rank_rtol))
    feats.append(_feature_entry("out", fw.out, y, K, nc2_target(problem, "out"), rank_rtol))
    return feats


def _weight_and_dnc_entries(problem, params, fw, Hs, Ws, y, rank_rtol: float) -> tuple[list[dict], list[dict]]:
    """The weight entries W_1..W_L and the deep-collapse entries DNC1-3 of layers 1..L of `layer_metrics`."""
    K = problem.num_classes
    L = problem.L
    relu = problem.activation == "relu"
    lam_H = float(np.asarray(problem.lam_H))
    lam_W = np.broadcast_to(np.asarray(problem.lam_W, dtype=np.float64), (L,))
    weights = []
    dnc = []
    for l in range(1, L + 1):
        W = Ws[l - 1]
        prev, lam_prev = (np.asarray(params.H, np.float64), lam_H) if l == 1 else (Ws[l - 2], lam_W[l - 2])
        M, _ = m.class_means(Hs[l - 1], y, K)
        s = m.singular_values(W)
        weights.append(
            {
                "name": f"W_{l}",
                "shape": list(W.shape),
                "frobenius_norm": float(np.linalg.norm(W)),
                "singular_values": s.tolist(),
                "numerical_rank": m.numerical_rank(W, rank_rtol),
                "stable_rank": m.stable_rank(W),
                "balancedness": m.balancedness(prev, W, lam_prev, lam_W[l - 1], diagonal=relu and l >= 2),
                "self_duality_gram": m.self_duality_gram(W, M),
                "dnc3": m.dnc3(W, M),
            }
        )
        dnc.append(
            {
                "layer": l,
                "exempt": relu and l == 1 and L >= 2,
                "dnc1": m.nc1(np.asarray(fw.H[l - 1]), y, K),  # the solution's dtype sets the default cut-off
                "dnc2_orthogonal": m.orthogonal_frame_distance(M, equinorm=problem.balanced),
                "dnc2_inverse_condition": m.inverse_condition_number(M),
                "dnc3": m.dnc3(W, M),
            }
        )
    return weights, dnc


def _classifier_entry(HL, WL, b, y, K: int, nc3_target: str) -> dict:
    """The ``"classifier"`` entry of `layer_metrics`: NC3, NC4 and the bias residual of W_L (and b) on H_L."""
    return {
        "nc3_target": nc3_target,
        "nc3_product": m.nc3_product(WL, HL, y, K, target=nc3_target),
        "nc3_difference": m.nc3_difference(WL, HL, y, K, centred=nc3_target == "etf"),
        "ncc_mismatch": m.ncc_mismatch(WL, HL, y, K, b=b),
        "bias_residual": m.bias_residual(WL, HL, y, K, b=b),
        "bias": None if b is None else b.tolist(),
    }
