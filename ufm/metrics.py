"""Neural-collapse metrics on plain arrays (NumPy or JAX), for UFM solutions and for real networks alike.

Conventions (`THEORY.md` §5, `ANCHORS.md` "Metric variants"):

* ``features`` is d x N (samples are **columns**); ``labels`` are N integers in [0, K).
* class means mu_k = mean of the columns of class k; the global mean mu_G = (1/N) sum_i a_i (the sample mean;
  for balanced classes it equals the mean of the class means); M = [mu_1 ... mu_K] (d x K, *uncentred*) and
  M~ = [mu_k - mu_G] (*centred*).
* Sigma_W = (1/N) sum_i (a_i - mu_{y_i})(a_i - mu_{y_i})^T, Sigma_B = (1/K) M~ M~^T  (Papyan, Han, Donoho 2020).
* E = (I - J/K)/sqrt(K-1) is the simplex-ETF Gram at unit Frobenius norm, I/sqrt(K) the orthogonal-frame Gram.

Where papers disagree, each variant has its own function whose name says which one it is. Every metric is
computed in float64 (whatever the input dtype), returns a Python float, never warns, and is defined and finite
at exact collapse, at the all-zero solution, for K = 2 and for d < K. Degenerate cases are given documented
values: a zero matrix "normalised" to unit norm is taken as the zero matrix, a 0/0 ratio of a variability to a
separation is 0 (nothing varies, so nothing is uncollapsed), and x/0 with x > 0 is ``inf`` (variability with no
separation at all, e.g. every class mean equal while samples differ).

The per-layer summary of a UFM is `layer_metrics`; the deep-collapse set of Súkeník et al. 2023 is in its
``"dnc"`` entry.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = [
    "class_means",
    "nc1",
    "nc1_trace_ratio",
    "cdnv",
    "etf_distance",
    "orthogonal_frame_distance",
    "equinorm",
    "equiangularity",
    "max_angle",
    "inverse_condition_number",
    "nc2_etf",
    "nc2_orthogonal",
    "nc2_equinorm",
    "nc2_equiangularity",
    "nc2_max_angle",
    "nc3_product",
    "nc3_difference",
    "self_duality_gram",
    "ncc_mismatch",
    "bias_residual",
    "dnc3",
    "singular_values",
    "numerical_rank",
    "stable_rank",
    "balancedness",
    "nc2_target",
    "layer_metrics",
]


# ---------------------------------------------------------------------------------------------------------------
# input handling


def _eps_of(x) -> float:
    """Machine epsilon of the *input* dtype (float32 data cannot resolve structure below ~eps32)."""
    dt = np.asarray(x).dtype if not hasattr(x, "dtype") else np.dtype(x.dtype)
    return float(np.finfo(dt).eps) if np.issubdtype(dt, np.floating) else float(np.finfo(np.float64).eps)


def _matrix(x: Any, name: str, rows: str = "d", cols: str = "N") -> np.ndarray:
    if isinstance(x, (str, bytes)) or x is None:
        raise TypeError(f"{name} must be a {rows} x {cols} numeric array; got {type(x).__name__}")
    a = np.asarray(x)
    if not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
        raise TypeError(f"{name} must be a {rows} x {cols} numeric array; got dtype {a.dtype}")
    if a.ndim != 2:
        raise ValueError(f"{name} must be a 2-D {rows} x {cols} array; got shape {a.shape}")
    return a.astype(np.float64)


def _labels(labels: Any, N: int, num_classes: int | None, features_shape=None) -> tuple[np.ndarray, int]:
    y = np.asarray(labels)
    if y.ndim != 1 or not (np.issubdtype(y.dtype, np.integer) or y.dtype == bool):
        raise TypeError(f"labels must be a 1-D integer array of length N; got shape {y.shape}, dtype {y.dtype}")
    if y.shape[0] != N:
        hint = ""
        if features_shape is not None and features_shape[0] == y.shape[0]:
            hint = " (features look like N x d: pass features.T, samples are columns)"
        raise ValueError(f"labels must have length N = {N} (the columns of features); got {y.shape[0]}{hint}")
    y = y.astype(np.int64)
    if N and y.min() < 0:
        raise ValueError(f"labels must be in [0, K); got a minimum of {y.min()}")
    K = int(y.max()) + 1 if num_classes is None else int(num_classes)
    if num_classes is not None and (isinstance(num_classes, bool) or K < 1):
        raise ValueError(f"num_classes must be a positive integer K; got {num_classes!r}")
    if N and y.max() >= K:
        raise ValueError(f"labels must be in [0, K) with K = {K}; got a maximum of {y.max()}")
    if K < 2:
        raise ValueError(f"collapse metrics need K >= 2 classes; got K = {K}")
    counts = np.bincount(y, minlength=K)
    if np.any(counts == 0):
        empty = np.flatnonzero(counts == 0).tolist()
        raise ValueError(f"every class needs at least one sample (n_k >= 1); classes {empty} have none")
    return y, K


def _prepare(features, labels, num_classes):
    A = _matrix(features, "features")
    y, K = _labels(labels, A.shape[1], num_classes, A.shape)
    return A, y, K


def _means(A: np.ndarray, y: np.ndarray, K: int):
    counts = np.bincount(y, minlength=K)
    order = np.argsort(y, kind="stable")
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    M = np.add.reduceat(A[:, order], starts, axis=1) / counts  # every class is non-empty (checked)
    muG = A.mean(axis=1)
    return M, muG, counts


def _ratio(num: float, den: float, neg_num: bool) -> float:
    """num/den with the module's conventions: 0 when num is negligible, inf when only den vanishes."""
    if neg_num:
        return 0.0
    if den <= 0.0:
        return math.inf
    return float(num / den)


def _unit(G: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(G)
    return G / n if n > 0 else np.zeros_like(G)


def _etf_gram(K: int) -> np.ndarray:
    return (np.eye(K) - np.ones((K, K)) / K) / math.sqrt(K - 1)


def _vectors(V, name: str = "V") -> np.ndarray:
    V = _matrix(V, name, "d", "K")
    if V.shape[1] < 2:
        raise ValueError(f"{name} must have K >= 2 columns (one vector per class); got shape {V.shape}")
    return V


# ---------------------------------------------------------------------------------------------------------------
# class means, NC1


def class_means(features, labels, num_classes: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Class means M = [mu_1 ... mu_K] (d x K, float64) and the global sample mean mu_G (d,).

    ``mu_k = (1/n_k) sum_{i: y_i = k} a_i`` and ``mu_G = (1/N) sum_i a_i``.
    """
    A, y, K = _prepare(features, labels, num_classes)
    M, muG, _ = _means(A, y, K)
    return M, muG


def _within(A, y, M):
    return A - M[:, y]


def nc1(features, labels, num_classes: int | None = None, *, rtol: float | None = None) -> float:
    """NC1 of Papyan, Han, Donoho (2020): ``tr(Sigma_W Sigma_B^+) / K``.

    Computed without forming Sigma_B or its pseudo-inverse: with the thin SVD M~ = U diag(s) V^T of the
    centred class means (float64), ``Sigma_B^+ = U diag(K/s^2) U^T`` on the kept directions, so

        NC1 = sum_j ||u_j^T (A - M_y)||^2 / (N s_j^2),      over j with s_j > rtol * s_1.

    This is the variant most peers report (rhubarbwu/neural-collapse, tding1/Neural-Collapse). It is >= 0 by
    construction, 0 at exact collapse, and does not blow up at or near collapse: the spurious K-th direction
    of M~ (rank <= K-1 because sum_k n_k (mu_k - mu_G) = 0) is ~1e-16 s_1 in float64 and is dropped, whereas
    peers invert Sigma_B in float32 and divide by its rounding noise. Within-class scatter *outside* the
    span of the class means is ignored by this variant (see `nc1_trace_ratio`, which sees it).

    Args:
      features: d x N array (samples are columns).
      labels: N integers in [0, K).
      num_classes: K (default: max(labels) + 1).
      rtol: relative cut-off on the singular values of M~ (default ``10 * max(d, K) * eps``, eps of the input
        dtype: float32 data cannot resolve class-mean directions below ~eps32 * s_1).

    Returns:
      A float >= 0; 0 when all class means coincide *and* all samples equal their class mean (e.g. the zero
      solution); ``inf`` when all class means coincide but samples vary.
    """
    A, y, K = _prepare(features, labels, num_classes)
    rtol = 10 * max(A.shape[0], K) * _eps_of(features) if rtol is None else float(rtol)
    M, muG, _ = _means(A, y, K)
    R = _within(A, y, M)
    N = A.shape[1]
    negligible = np.linalg.norm(R) <= rtol * np.linalg.norm(A)
    U, s, _ = np.linalg.svd(M - muG[:, None], full_matrices=False)
    keep = s > rtol * s[0] if s.size and s[0] > 0 else np.zeros(s.shape, bool)
    if not np.any(keep):
        return _ratio(1.0, 0.0, negligible)
    proj = U[:, keep].T @ R
    return float(np.sum(np.sum(proj**2, axis=1) / s[keep] ** 2) / N)


def nc1_trace_ratio(features, labels, num_classes: int | None = None) -> float:
    """NC1 as the trace ratio ``tr(Sigma_W) / tr(Sigma_B)`` (Tirer, Huang, Niles-Weed 2023).

    ``tr Sigma_W = ||A - M_y||_F^2 / N`` and ``tr Sigma_B = ||M~||_F^2 / K``. Unlike `nc1` it counts
    within-class scatter in every direction. 0/0 (the zero solution) is 0; x/0 with x > 0 is ``inf``.
    """
    A, y, K = _prepare(features, labels, num_classes)
    M, muG, _ = _means(A, y, K)
    R = _within(A, y, M)
    trW = np.sum(R**2) / A.shape[1]
    trB = np.sum((M - muG[:, None]) ** 2) / K
    negligible = np.linalg.norm(R) <= 10 * max(A.shape) * _eps_of(features) * np.linalg.norm(A)
    return _ratio(trW, trB, negligible or trW == 0.0)


def cdnv(features, labels, num_classes: int | None = None) -> float:
    """Class-distance normalised variance (Galanti, György, Hutter 2022), averaged over class pairs:

        CDNV = mean_{k < j} (V_k + V_j) / (2 ||mu_k - mu_j||^2),     V_k = (1/n_k) sum_{i in k} ||a_i - mu_k||^2.

    A pair with coincident means contributes 0 if both classes are collapsed (V_k = V_j = 0) and ``inf``
    otherwise.
    """
    A, y, K = _prepare(features, labels, num_classes)
    M, _, counts = _means(A, y, K)
    R = _within(A, y, M)
    V = np.bincount(y, weights=np.sum(R**2, axis=0), minlength=K) / counts
    tiny = (10 * max(A.shape) * _eps_of(features) * np.linalg.norm(A)) ** 2 / A.shape[1]
    vals = []
    for k in range(K):
        for j in range(k + 1, K):
            den = 2 * np.sum((M[:, k] - M[:, j]) ** 2)
            num = V[k] + V[j]
            vals.append(_ratio(num, den, num <= tiny))
    return float(np.mean(vals))


# ---------------------------------------------------------------------------------------------------------------
# NC2 on a set of K vectors (columns of V: class means, or classifier rows W^T)


def etf_distance(V) -> float:
    """Distance of the Gram of the columns of V (d x K) to the simplex ETF (Zhu et al. 2021; Zhou et al. 2022):

        || G/||G||_F - (I - J/K)/sqrt(K-1) ||_F,      G = V^T V,

    in [0, 2]. V is used as given (no centring): pass the *centred* class means (`nc2_etf` does) or the
    classifier rows ``W.T``. For V = 0 the normalised Gram is taken as 0, so the distance is 1.
    """
    V = _vectors(V)
    K = V.shape[1]
    return float(np.linalg.norm(_unit(V.T @ V) - _etf_gram(K)))


def orthogonal_frame_distance(V, equinorm: bool = True) -> float:
    """Distance of the Gram of the columns of V (d x K) to an orthogonal frame.

    ``equinorm=True``: ``|| G/||G||_F - I/sqrt(K) ||_F`` (the target of bias-free MSE and of ReLU layers,
    THEORY.md §5; DNC2 of Súkeník et al. 2023 up to normalisation). ``equinorm=False``: the distance to the
    nearest *general* orthogonal frame (orthogonal, unequal norms; Dang et al. 2023, imbalanced classes),
    ``||offdiag(G)||_F / ||G||_F``. G = V^T V with V uncentred. In [0, 2] (resp. [0, 1]); V = 0 gives 1.
    """
    V = _vectors(V)
    K = V.shape[1]
    G = V.T @ V
    if equinorm:
        return float(np.linalg.norm(_unit(G) - np.eye(K) / math.sqrt(K)))
    n = np.linalg.norm(G)
    return float(np.linalg.norm(G - np.diag(np.diag(G))) / n) if n > 0 else 1.0


def equinorm(V) -> float:
    """Equinorm (Papyan et al. 2020): coefficient of variation std_k ||v_k|| / mean_k ||v_k|| of the column norms
    (population std). 0 when all norms are equal, including V = 0."""
    V = _vectors(V)
    norms = np.linalg.norm(V, axis=0)
    m = norms.mean()
    return float(norms.std() / m) if m > 0 else 0.0


def _cosines(V):
    norms = np.linalg.norm(V, axis=0)
    Vn = np.divide(V, norms, out=np.zeros_like(V), where=norms > 0)
    C = Vn.T @ Vn
    K = V.shape[1]
    return C[~np.eye(K, dtype=bool)]


def equiangularity(V) -> float:
    """Equiangularity (Papyan et al. 2020): std over pairs k != j of cos(v_k, v_j) (population std; a zero vector
    has cosine 0 with everything). 0 for K = 2 (one angle)."""
    V = _vectors(V)
    return float(np.std(_cosines(V)))


def max_angle(V) -> float:
    """Max-angle criterion (Papyan et al. 2020): mean over pairs k != j of |cos(v_k, v_j) + 1/(K-1)|; 0 for a
    simplex ETF (cosines -1/(K-1)), 1/(K-1) for an orthogonal frame."""
    V = _vectors(V)
    K = V.shape[1]
    return float(np.mean(np.abs(_cosines(V) + 1.0 / (K - 1))))


def inverse_condition_number(V) -> float:
    """sigma_K(V) / sigma_1(V) for V with K columns (Súkeník et al. 2023 use the condition number sigma_1/sigma_K
    as a DNC2 measure; its inverse is reported so that the value stays finite): 1 iff V^T V is a multiple of I
    (an orthogonal frame when d >= K), 0 when d < K or V is rank deficient, 0 for V = 0."""
    V = _vectors(V)
    K = V.shape[1]
    if V.shape[0] < K:
        return 0.0
    s = np.linalg.svd(V, compute_uv=False)
    return float(s[K - 1] / s[0]) if s[0] > 0 else 0.0


# feature-level NC2 wrappers


def nc2_etf(features, labels, num_classes: int | None = None) -> float:
    """NC2, Zhu/Zhou style: `etf_distance` of the **centred** class means M~ (the target with a free bias or CE)."""
    A, y, K = _prepare(features, labels, num_classes)
    M, muG, _ = _means(A, y, K)
    return etf_distance(M - muG[:, None])


def nc2_orthogonal(features, labels, num_classes: int | None = None, *, equinorm: bool = True) -> float:
    """NC2 against an orthogonal frame: `orthogonal_frame_distance` of the **uncentred** class means M (the target
    of bias-free MSE, deep linear layers without bias and ReLU layers; ``equinorm=False`` for imbalanced data)."""
    A, y, K = _prepare(features, labels, num_classes)
    M, _, _ = _means(A, y, K)
    return orthogonal_frame_distance(M, equinorm=equinorm)


def nc2_equinorm(features, labels, num_classes: int | None = None, *, centred: bool = True) -> float:
    """NC2 equinorm (Papyan et al. 2020): `equinorm` of the centred (default) or uncentred class means."""
    A, y, K = _prepare(features, labels, num_classes)
    M, muG, _ = _means(A, y, K)
    return equinorm(M - muG[:, None] if centred else M)


def nc2_equiangularity(features, labels, num_classes: int | None = None, *, centred: bool = True) -> float:
    """NC2 equiangularity (Papyan et al. 2020): `equiangularity` of the centred (default) or uncentred means."""
    A, y, K = _prepare(features, labels, num_classes)
    M, muG, _ = _means(A, y, K)
    return equiangularity(M - muG[:, None] if centred else M)


def nc2_max_angle(features, labels, num_classes: int | None = None) -> float:
    """NC2 max-angle (Papyan et al. 2020): `max_angle` of the centred class means."""
    A, y, K = _prepare(features, labels, num_classes)
    M, muG, _ = _means(A, y, K)
    return max_angle(M - muG[:, None])


# ---------------------------------------------------------------------------------------------------------------
# NC3, NC4


def _classifier(W, d: int, K: int) -> np.ndarray:
    W = _matrix(W, "W", "K", "d")
    if W.shape != (K, d):
        raise ValueError(f"W must be K x d = ({K}, {d}) (one row per class, d = the features' rows); got {W.shape}")
    return W


def nc3_product(W, features, labels, num_classes: int | None = None, *, target: str = "etf") -> float:
    """NC3, product form (Zhu et al. 2021): distance of the class-mean outputs W M to their target,

        ``target="etf"``:        || W M~ / ||W M~||_F - (I - J/K)/sqrt(K-1) ||_F   (centred means; free bias, CE)
        ``target="orthogonal"``: || W M  / ||W M||_F  - I/sqrt(K) ||_F             (uncentred; bias-free MSE)

    W is K x d. W M = 0 gives 1.
    """
    A, y, K = _prepare(features, labels, num_classes)
    W = _classifier(W, A.shape[0], K)
    M, muG, _ = _means(A, y, K)
    if target == "etf":
        return float(np.linalg.norm(_unit(W @ (M - muG[:, None])) - _etf_gram(K)))
    if target == "orthogonal":
        return float(np.linalg.norm(_unit(W @ M) - np.eye(K) / math.sqrt(K)))
    raise ValueError(f"target must be 'etf' or 'orthogonal'; got {target!r}")


def nc3_difference(W, features, labels, num_classes: int | None = None, *, centred: bool = True,
                   squared: bool = True) -> float:
    """NC3, difference form (Papyan et al. 2020): ``|| W^T/||W||_F - M~/||M~||_F ||_F^2`` (``squared=True``, as in
    Papyan et al.) or its square root. ``centred=False`` uses the uncentred means M (bias-free models). A zero
    W or M is normalised to 0. In [0, 4] (squared)."""
    A, y, K = _prepare(features, labels, num_classes)
    W = _classifier(W, A.shape[0], K)
    M, muG, _ = _means(A, y, K)
    D = np.linalg.norm(_unit(W.T) - _unit(M - muG[:, None] if centred else M))
    return float(D**2 if squared else D)


def self_duality_gram(W, means) -> float:
    """Rotation-invariant self-duality of a layer: ``|| W^T W/||W^T W||_F - M M^T/||M M^T||_F ||_F``.

    W is d_out x d (any layer's weights), ``means`` is d x K (the class means of that layer's input). The UFM
    optima give W_l^T W_l proportional to M_l M_l^T (THEORY.md §1: W^T W = (n lam_H/lam_W) M M^T for the shallow
    MSE UFM; equal spectra and aligned layers in §3 and at the DNC point of §4.1, layers >= 2). Computed from
    K x K and d_out x d_out Grams: ||X - Y||^2 = 2 - 2 ||W M||_F^2 / (||W W^T||_F ||M^T M||_F). A zero factor
    gives 1 (its normalised Gram is 0)."""
    W = _matrix(W, "W", "d_out", "d")
    M = _matrix(means, "means", "d", "K")
    if W.shape[1] != M.shape[0]:
        raise ValueError(f"W (d_out x d) and means (d x K) must share d; got {W.shape} and {M.shape}")
    a = np.linalg.norm(W @ W.T)
    b = np.linalg.norm(M.T @ M)
    if a == 0 or b == 0:
        return 1.0
    c = np.sum((W @ M) ** 2) / (a * b)
    return float(math.sqrt(max(2.0 - 2.0 * c, 0.0)))


def ncc_mismatch(W, features, labels, num_classes: int | None = None, b=None) -> float:
    """NC4 (Papyan et al. 2020): the fraction of samples where the classifier disagrees with the nearest class
    centre, ``argmax_k (W a + b)_k != argmin_k ||a - mu_k||`` (ties go to the smallest k in both). In [0, 1]."""
    A, y, K = _prepare(features, labels, num_classes)
    W = _classifier(W, A.shape[0], K)
    M, _, _ = _means(A, y, K)
    out = W @ A
    if b is not None:
        out = out + _bias(b, K)[:, None]
    dist = np.sum(M**2, axis=0)[:, None] - 2 * M.T @ A
    return float(np.mean(np.argmax(out, axis=0) != np.argmin(dist, axis=0)))


def _bias(b, K):
    b = np.asarray(b, dtype=np.float64)
    if b.shape != (K,):
        raise ValueError(f"b must have shape (K,) = ({K},); got {b.shape}")
    return b


def bias_residual(W, features, labels, num_classes: int | None = None, b=None) -> float:
    """The bias residual ``||W mu_G + b||_2`` that Zhu et al. (2021) plot under the name "NC4" (not the NCC rule of
    Papyan et al.; see `ncc_mismatch`). It is 0 at the CE optimum with a regularised bias (mu_G = 0, b = 0), and
    1/sqrt(K) at the balanced MSE optimum with a free bias (mean output 1/K per class)."""
    A, y, K = _prepare(features, labels, num_classes)
    W = _classifier(W, A.shape[0], K)
    r = W @ A.mean(axis=1)
    if b is not None:
        r = r + _bias(b, K)
    return float(np.linalg.norm(r))


def dnc3(W, means) -> float:
    """DNC3 of a layer (after Súkeník et al. 2023; THEORY.md §5): one minus the mean, over rows w_r of W, of
    ``max_k |cos(w_r, mu_k)|``, weighted by ||w_r||^2 (zero rows do not count):

        DNC3 = 1 - sum_r ||w_r||^2 max_k |cos(w_r, mu_k)| / sum_r ||w_r||^2.

    0 when every nonzero row of W is collinear with one class mean (the DNC point, layers >= 2, whose means
    form a non-negative orthogonal frame). W is d_out x d, ``means`` d x K. W = 0 gives 0 (no row is
    misaligned); means = 0 gives 1."""
    W = _matrix(W, "W", "d_out", "d")
    M = _matrix(means, "means", "d", "K")
    if W.shape[1] != M.shape[0]:
        raise ValueError(f"W (d_out x d) and means (d x K) must share d; got {W.shape} and {M.shape}")
    wn = np.linalg.norm(W, axis=1)
    if not np.any(wn > 0):
        return 0.0
    mn = np.linalg.norm(M, axis=0)
    Mu = np.divide(M, mn, out=np.zeros_like(M), where=mn > 0)
    Wu = np.divide(W, wn[:, None], out=np.zeros_like(W), where=wn[:, None] > 0)
    best = np.minimum(np.max(np.abs(Wu @ Mu), axis=1), 1.0)  # |cos| <= 1 up to rounding
    return float(1.0 - np.sum(wn**2 * best) / np.sum(wn**2))


# ---------------------------------------------------------------------------------------------------------------
# spectra


def singular_values(A) -> np.ndarray:
    """Singular values of a matrix, descending, float64."""
    return np.linalg.svd(_matrix(A, "A", "m", "n"), compute_uv=False)


def numerical_rank(A, rtol: float | None = None) -> int:
    """The number of singular values above ``rtol * sigma_1`` (default ``max(m, n) * eps`` of the input dtype,
    NumPy's ``matrix_rank`` rule). Pass a looser rtol (e.g. 1e-4) for solutions converged only to ~1e-8. 0 for 0."""
    s = singular_values(A)
    if s.size == 0 or s[0] == 0:
        return 0
    rtol = max(np.shape(A)) * _eps_of(A) if rtol is None else float(rtol)
    return int(np.sum(s > rtol * s[0]))


def stable_rank(A) -> float:
    """Stable rank ||A||_F^2 / ||A||_2^2 (Rudelson & Vershynin 2007), in [1, rank A]; 0 for A = 0."""
    s = singular_values(A)
    return float(np.sum(s**2) / s[0] ** 2) if s.size and s[0] > 0 else 0.0


def balancedness(W_prev, W_next, lam_prev: float = 1.0, lam_next: float = 1.0, *, diagonal: bool = False) -> float:
    """Relative imbalance of consecutive factors ``W_next @ s(W_prev @ ...)``:

        ||lam_next W_next^T W_next - lam_prev W_prev W_prev^T||_F / (||lam_next W_next^T W_next||_F
                                                                    + ||lam_prev W_prev W_prev^T||_F)

    in [0, 1], 0 for zero factors. With weight decay this is exactly 0 at every stationary point of a linear
    network (the objective is invariant under W_prev -> G W_prev, W_next -> W_next G^-1; the derivative at G = I
    of the penalty must vanish; cf. Arora et al. 2018, Du et al. 2018). For the free features use
    ``W_prev = H`` and ``lam_prev = lam_H``. Across a ReLU only positive diagonal G are symmetries, so only the
    diagonals balance (per neuron: lam_prev ||row_j(W_prev)||^2 = lam_next ||col_j(W_next)||^2): use
    ``diagonal=True``, which compares the diagonals only."""
    Wp = _matrix(W_prev, "W_prev", "d", "m")
    Wn = _matrix(W_next, "W_next", "m_out", "d")
    if Wn.shape[1] != Wp.shape[0]:
        raise ValueError(f"W_next's columns must match W_prev's rows (d); got {Wn.shape} and {Wp.shape}")
    if diagonal:
        X = lam_next * np.sum(Wn**2, axis=0)
        Y = lam_prev * np.sum(Wp**2, axis=1)
    else:
        X = lam_next * Wn.T @ Wn
        Y = lam_prev * Wp @ Wp.T
    den = np.linalg.norm(X) + np.linalg.norm(Y)
    return float(np.linalg.norm(X - Y) / den) if den > 0 else 0.0


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


def _nc2_value(target, M, muG):
    if target == "etf":
        return etf_distance(M - muG[:, None])
    if target == "orthogonal":
        return orthogonal_frame_distance(M)
    if target == "orthogonal-unequal":
        return orthogonal_frame_distance(M, equinorm=False)
    return None


def _feature_entry(name, A, y, K, target, rank_rtol):
    A = np.asarray(A)  # keep the solution's dtype: the default cut-offs depend on it
    M, muG, _ = _means(A.astype(np.float64), y, K)
    Mc = M - muG[:, None]
    sv = singular_values(A)
    return {
        "name": name,
        "shape": list(A.shape),
        "nc1": nc1(A, y, K),
        "nc1_trace_ratio": nc1_trace_ratio(A, y, K),
        "cdnv": cdnv(A, y, K),
        "nc2_target": target,
        "nc2": _nc2_value(target, M, muG),
        "nc2_etf": etf_distance(Mc),
        "nc2_orthogonal": orthogonal_frame_distance(M),
        "equinorm": equinorm(Mc),
        "equiangularity": equiangularity(Mc),
        "max_angle": max_angle(Mc),
        "mean_norms": np.linalg.norm(M, axis=0).tolist(),
        "singular_values": sv.tolist(),
        "class_mean_singular_values": np.linalg.svd(M, compute_uv=False).tolist(),
        "numerical_rank": numerical_rank(A, rank_rtol),
        "stable_rank": stable_rank(A),
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

    ``"dnc"`` lists, per layer l = 1..L, the deep-collapse set of Súkeník et al. 2023 (normalisations as in
    THEORY.md §5): DNC1_l = `nc1` of H_l, DNC2_l = `orthogonal_frame_distance` of the uncentred means of H_l and
    their `inverse_condition_number`, DNC3_l = `dnc3` of W_l against the means of H_l. Layer 1 is reported but
    exempt from DNC2/DNC3 for ReLU models (its optimum is not unique, §4.1): ``"exempt": True``.
    """
    from ._model import Params, check_params, forward  # local: keep `ufm.metrics` importable on its own

    check_params(problem, params)
    params = Params(*params)
    fw = forward(problem, params)
    y = problem.labels()
    K = problem.num_classes
    L = problem.L
    relu = problem.activation == "relu"
    lam_H = float(np.asarray(problem.lam_H))
    lam_W = np.broadcast_to(np.asarray(problem.lam_W, dtype=np.float64), (L,))

    feats = [_feature_entry("H_1", fw.H[0], y, K, nc2_target(problem, "H_1"), rank_rtol)]
    for l in range(2, L + 1):
        if relu:
            feats.append(_feature_entry(f"Z_{l}", fw.Z[l - 2], y, K, nc2_target(problem, f"Z_{l}"), rank_rtol))
        feats.append(_feature_entry(f"H_{l}", fw.H[l - 1], y, K, nc2_target(problem, f"H_{l}"), rank_rtol))
    feats.append(_feature_entry("out", fw.out, y, K, nc2_target(problem, "out"), rank_rtol))

    Hs = [np.asarray(h, np.float64) for h in fw.H]
    Ws = [np.asarray(W, np.float64) for W in params.Ws]
    weights = []
    dnc = []
    for l in range(1, L + 1):
        W = Ws[l - 1]
        prev, lam_prev = (np.asarray(params.H, np.float64), lam_H) if l == 1 else (Ws[l - 2], lam_W[l - 2])
        M, _, _ = _means(Hs[l - 1], y, K)
        s = np.linalg.svd(W, compute_uv=False)
        weights.append({
            "name": f"W_{l}",
            "shape": list(W.shape),
            "frobenius_norm": float(np.linalg.norm(W)),
            "singular_values": s.tolist(),
            "numerical_rank": numerical_rank(W, rank_rtol),
            "stable_rank": stable_rank(W),
            "balancedness": balancedness(prev, W, lam_prev, lam_W[l - 1], diagonal=relu and l >= 2),
            "self_duality_gram": self_duality_gram(W, M),
            "dnc3": dnc3(W, M),
        })
        dnc.append({
            "layer": l,
            "exempt": relu and l == 1 and L >= 2,
            "dnc1": nc1(Hs[l - 1], y, K),
            "dnc2_orthogonal": orthogonal_frame_distance(M, equinorm=problem.balanced),
            "dnc2_inverse_condition": inverse_condition_number(M),
            "dnc3": dnc3(W, M),
        })

    HL = Hs[-1]
    WL = Ws[-1]
    b = None if params.b is None else np.asarray(params.b, np.float64)
    nc3_target = "orthogonal" if (problem.loss == "mse" and problem.bias == "none") else "etf"
    classifier = {
        "nc3_target": nc3_target,
        "nc3_product": nc3_product(WL, HL, y, K, target=nc3_target),
        "nc3_difference": nc3_difference(WL, HL, y, K, centred=nc3_target == "etf"),
        "ncc_mismatch": ncc_mismatch(WL, HL, y, K, b=b),
        "bias_residual": bias_residual(WL, HL, y, K, b=b),
        "bias": None if b is None else b.tolist(),
    }
    return {"features": feats, "weights": weights, "classifier": classifier, "dnc": dnc, "rank_rtol": rank_rtol}
