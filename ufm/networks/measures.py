"""Collapse measurements of a trained MLP: per-layer metrics over training, the affine NC1 floor, clustering.

`layer_metrics` (Parker et al. 2023) computes the `ufm.metrics` of every layer at every recorded step;
`affine_nc1_floor` (E & Wojtowytsch 2022) is the smallest NC1 any affine map of the inputs can reach; `kmeans` and
`cluster_accuracy` score how much fine structure clustering recovers (Yang, Steinhardt, Hu 2023).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np
from numpy.typing import ArrayLike

from .. import metrics
from ..metrics import as_matrix as matrix
from ..metrics import prepare
from ._args import positive_int
from .data import Dataset
from .mlp import TrainResult, check_inputs, check_result, features, fit_loss

__all__ = [
    "LayerMetrics",
    "layer_metrics",
    "feature_metrics",
    "AffineFloor",
    "affine_nc1_floor",
    "KMeans",
    "kmeans",
    "cluster_accuracy",
]


class LayerMetrics(NamedTuple):
    """Collapse metrics of every layer at every recorded step: arrays of shape (R, D + 2), rows = recorded steps,
    columns = ``layers`` = ("input", "H_1", ..., "H_D", "out") (post-activation features; "input" is X).

    Metric definitions (`ufm.metrics`, THEORY.md §5): ``nc1`` = tr(Sigma_W Sigma_B^+)/K (Papyan, Han, Donoho 2020);
    ``nc1_trace_ratio`` = tr Sigma_W / tr Sigma_B (Tirer et al. 2023); ``cdnv`` (Galanti et al. 2022);
    ``nc2_etf`` = ||G/||G||_F - (I - J/K)/sqrt(K-1)||_F for the centred class means (Zhu et al. 2021);
    ``nc2_orthogonal`` = ||G/||G||_F - I/sqrt(K)||_F for the uncentred means (bias-free and ReLU layers);
    ``equinorm``, ``equiangularity`` (std of the pairwise cosines) and ``max_angle`` = mean_{k != j}
    |cos(mu_k - mu_G, mu_j - mu_G) + 1/(K-1)| (Papyan et al. 2020) of the centred means: 0 at a simplex ETF, so
    their fall with depth is the "opening" of the angles between class means towards the ETF (Parker et al. 2023).
    (The *mean* centred cosine is not reported: it is -1/(K-1) for any equinorm means, since sum_k n_k(mu_k - mu_G)
    = 0.) ``mean_cos_uncentred`` = mean_{k != j} cos(mu_k, mu_j): near 1 for non-negative inputs and ReLU
    features at init, 0 at an orthogonal frame. ``ncc_accuracy`` = the fraction of samples whose nearest class
    mean (Euclidean, in that layer) is their own class (Papyan et al.; Rangamani et al. 2023).
    Per step (R,): ``loss`` (objective on ``data``), ``error`` (training error on ``data``), ``nc3`` (`nc3_product`
    of the last layer W_{D+1} on H_D, target "etf", or "orthogonal" for bias-free MSE) and ``nc4`` (`ncc_mismatch`
    between the network's prediction and the nearest class mean of H_D, Papyan et al.'s NC4).
    """

    steps: np.ndarray
    layers: tuple[str, ...]
    nc1: np.ndarray
    nc1_trace_ratio: np.ndarray
    cdnv: np.ndarray
    nc2_etf: np.ndarray
    nc2_orthogonal: np.ndarray
    equinorm: np.ndarray
    equiangularity: np.ndarray
    max_angle: np.ndarray
    mean_cos_uncentred: np.ndarray
    ncc_accuracy: np.ndarray
    loss: np.ndarray
    error: np.ndarray
    nc3: np.ndarray
    nc4: np.ndarray
    num_classes: int


_LAYER_FIELDS = (
    "nc1",
    "nc1_trace_ratio",
    "cdnv",
    "nc2_etf",
    "nc2_orthogonal",
    "equinorm",
    "equiangularity",
    "max_angle",
    "mean_cos_uncentred",
    "ncc_accuracy",
)


def _mean_cos(V: np.ndarray) -> float:
    n = np.linalg.norm(V, axis=0)
    U = np.divide(V, n, out=np.zeros_like(V), where=n > 0)
    C = U.T @ U
    K = V.shape[1]
    return float(C[~np.eye(K, dtype=bool)].mean())


def _ncc_accuracy(A: np.ndarray, y: np.ndarray, M: np.ndarray) -> float:
    d2 = np.sum(M**2, axis=0)[:, None] - 2 * M.T @ A
    return float(np.mean(np.argmin(d2, axis=0) == y))


def feature_metrics(A: Any, y: np.ndarray, K: int) -> dict[str, float]:
    """The per-layer metrics of `LayerMetrics` (every name in its ``layers`` columns) of features ``A`` (d x N)
    with labels ``y`` (N,) in [0, K)."""
    A64 = np.asarray(A, np.float64)
    M, muG = metrics.class_means(A64, y, K)
    Mc = M - muG[:, None]
    return {
        "nc1": metrics.nc1(A, y, K),
        "nc1_trace_ratio": metrics.nc1_trace_ratio(A, y, K),
        "cdnv": metrics.cdnv(A, y, K),
        "nc2_etf": metrics.etf_distance(Mc),
        "nc2_orthogonal": metrics.orthogonal_frame_distance(M),
        "equinorm": metrics.equinorm(Mc),
        "equiangularity": metrics.equiangularity(Mc),
        "max_angle": metrics.max_angle(Mc),
        "mean_cos_uncentred": _mean_cos(M),
        "ncc_accuracy": _ncc_accuracy(A64, y, M),
    }


def layer_metrics(result: TrainResult, data: Dataset, *, snapshots: ArrayLike | None = None) -> LayerMetrics:
    """Per-layer collapse over training (Parker et al. 2023): the metrics of `LayerMetrics` for every layer
    (input, every hidden layer, output) at every recorded step (or the snapshot indices ``snapshots``), on
    ``data`` (usually the training set)."""
    result = check_result(result)
    data = check_inputs(result, data)
    R = result.steps.size
    idx = np.arange(R) if snapshots is None else np.atleast_1d(np.asarray(snapshots)) % R
    cfg = result.config
    K = cfg.num_classes
    D = cfg.depth
    layers = ("input",) + tuple(f"H_{l}" for l in range(1, D + 1)) + ("out",)
    vals = {f: np.zeros((idx.size, D + 2)) for f in _LAYER_FIELDS}
    loss = np.zeros(idx.size)
    err = np.zeros(idx.size)
    nc3 = np.zeros(idx.size)
    nc4 = np.zeros(idx.size)
    y = data.y
    Y = np.eye(K)[:, y]
    target = "orthogonal" if (cfg.loss == "mse" and not cfg.bias) else "etf"
    for r, i in enumerate(idx):
        lay = features(result, data, int(i))
        params = result.snapshot(int(i))
        for j, A in enumerate((*lay.H, lay.out)):
            for f, v in feature_metrics(A, y, K).items():
                vals[f][r, j] = v
        out = np.asarray(lay.out, np.float64)
        fit = float(fit_loss(cfg.loss, jnp.asarray(out), jnp.asarray(Y)))
        loss[r] = fit + result.weight_decay / 2 * sum(float(np.sum(np.asarray(W, np.float64) ** 2)) for W in params.Ws)
        err[r] = float(np.mean(np.argmax(out, axis=0) != y))
        WL = np.asarray(params.Ws[-1])
        bL = None if params.bs is None else np.asarray(params.bs[-1])
        nc3[r] = metrics.nc3_product(WL, lay.H[-1], y, K, target=target)
        nc4[r] = metrics.ncc_mismatch(WL, lay.H[-1], y, K, b=bL)
    return LayerMetrics(
        steps=result.steps[idx], layers=layers, **vals, loss=loss, error=err, nc3=nc3, nc4=nc4, num_classes=K
    )


class AffineFloor(NamedTuple):
    """The smallest NC1 any affine map of the inputs can reach (`affine_nc1_floor`).

    Attributes:
      gammas: (r,) ascending generalised eigenvalues gamma_1 <= ... <= gamma_r of the pencil (Sigma_W, Sigma_B)
        of the inputs on the directions Sigma_B sees (r = rank Sigma_B, K - 1 for generic data).
      floor: gamma_1 / K, a lower bound on NC1(V X + c 1^T) for every V, c (any rank).
      floor_full_rank: (gamma_1 + ... + gamma_r) / K, the lower bound (and the minimum) over maps whose class
        means keep rank r (every class separated, the usual case for a trained classifier).
    """

    gammas: np.ndarray
    floor: float
    floor_full_rank: float


def affine_nc1_floor(
    X: ArrayLike, labels: ArrayLike, num_classes: int | None = None, *, rtol: float = 1e-10
) -> AffineFloor:
    """Lower bounds on NC1 = tr(Sigma_W Sigma_B^+)/K of features H = V X + c 1^T, over all V (d x p) and c.

    Derivation. Centring removes c; H has Sigma_W(H) = V Sigma_W V^T =: A and Sigma_B(H) = V Sigma_B V^T =: B. With
    Q an orthonormal basis of range(B) (dim r'), tr(A B^+) = tr((Q^T A Q)(Q^T B Q)^{-1}) is the sum of the r'
    generalised eigenvalues of the pencil (Q^T A Q, Q^T B Q). This pencil is the restriction of the quotient
    R(w) = w^T Sigma_W w / w^T Sigma_B w to the r'-dimensional subspace {V^T Q c}, on which Sigma_B is positive
    definite, so by Courant-Fischer its i-th eigenvalue is >= gamma_i, the i-th smallest value of the min-max of R
    over subspaces where Sigma_B > 0. Writing w = U_B S^{-1/2} a + U_0 c (U_B S U_B^T = Sigma_B, U_0 spans its null
    space) and minimising over c gives R = a^T S_c a / |a|^2 with the Schur complement

        S_c = T^T Sigma_W T - T^T Sigma_W U_0 (U_0^T Sigma_W U_0)^+ U_0^T Sigma_W T,     T = U_B S^{-1/2},

    so gamma_i are the eigenvalues of S_c. Hence NC1(H) >= (gamma_1 + ... + gamma_{r'})/K >= gamma_1/K, with
    equality for V = the top eigenvectors mapped back (the LDA projection). The same bound holds for the output
    W (V X + c) + b of a linear model: it is again affine in X. Note that the derivation is for NC1 with the
    pseudo-inverse on the exact range of Sigma_B(H); `ufm.metrics.nc1` cuts singular values below ``rtol``, which
    can only drop terms when class means nearly coincide.

    Args:
      X: p x N inputs (samples are columns). labels: (N,) in [0, K).
      rtol: eigenvalues of Sigma_B below ``rtol`` times the largest count as zero.

    Numerics (as `ufm.metrics.nc1`, module `ufm._metrics`): everything is computed in the shifted, scaled float64
    coordinates of `ufm.metrics.class_stats` (x = (a - shift)/scale), so the centred class means and the
    within-class residuals are accurate to the rounding of the *spread* of X, not of its offset; the known null
    direction of the centred means (M~ n = 0, n the class counts) is removed exactly before the rank decision;
    and a direction of Sigma_B is kept only when its eigenvalue exceeds ``rtol`` times the largest *and* its
    singular value exceeds the rounding level of the class means, (sqrt(p) + sqrt(K)) eps max|mu_k| (eps of the
    input dtype). An offset c 1^T added to X leaves the result unchanged (to rounding of the spread).

    Returns:
      `AffineFloor`; NaN for non-finite X. ValueError when the class means coincide (nothing separates them).
    """
    A, y, K = prepare(X, labels, num_classes)
    st = metrics.class_stats(A, y, K)  # x = (a - shift) / scale: float64, shifted by a data point, scale 2^k
    r = min(st.dim, K - 1)
    if not st.finite:
        return AffineFloor(np.full(r, np.nan), np.nan, np.nan)
    U, s = _between_class_directions(st)
    e = s**2 / K  # the nonzero eigenvalues of Sigma_B = B B^T / K, descending
    floor = (np.sqrt(st.dim) + np.sqrt(K)) * st.eps * st.mean_abs / st.scale  # rounding of the class means
    keep = np.zeros(U.shape[1], bool)
    if s.size and s[0] > floor:
        keep[: s.size] = (e > rtol * e[0]) & (s > floor)
    if not np.any(keep):
        raise ValueError("the class means of X coincide: no map of X separates the classes")
    R = (np.asarray(A, np.float64) - st.shift[:, None]) / st.scale - st.means[:, y]  # within-class residuals
    SW = R @ R.T / A.shape[1]
    T = U[:, keep] / np.sqrt(e[keep[: s.size]])
    U0 = U[:, ~keep]
    S = T.T @ SW @ T
    if U0.shape[1]:
        C = T.T @ SW @ U0
        S = S - C @ np.linalg.pinv(U0.T @ SW @ U0, rcond=1e-12, hermitian=True) @ C.T
    g = np.clip(np.linalg.eigvalsh((S + S.T) / 2), 0.0, None)
    return AffineFloor(g, float(g[0] / K), float(g.sum() / K))


def _between_class_directions(st) -> tuple[np.ndarray, np.ndarray]:
    """``(U, s)``: U (p x p) orthonormal, its first columns the left singular vectors of B = M~ Q with singular
    values s (descending), where M~ are the centred class means of ``st`` (shifted coordinates) and Q (K x (K-1))
    an orthonormal basis of the complement of the counts n (M~ n = 0 exactly, so the spurious K-th direction
    that rounding gives M~ never enters). Sigma_B = B B^T / K."""
    n = st.counts.astype(np.float64)
    Mc = st.means - (st.means @ n)[:, None] / n.sum()
    Qn = np.linalg.qr(n[:, None], mode="complete")[0]  # first column ∝ n, the others its complement
    B = Mc @ Qn[:, 1:]
    U, s, _ = np.linalg.svd(B, full_matrices=True)
    return U, s


class KMeans(NamedTuple):
    """`kmeans` result: ``labels`` (N,) cluster of each column, ``centers`` (d x k), ``inertia`` = sum of squared
    distances to the assigned centres (the best of the restarts), ``n_iter`` of the best restart."""

    labels: np.ndarray
    centers: np.ndarray
    inertia: float
    n_iter: int


def kmeans(features: Any, k: int, *, restarts: int = 10, max_iter: int = 300, seed: int = 0) -> KMeans:
    """k-means on the columns of ``features`` (d x N): scikit-learn's `sklearn.cluster.KMeans` (Lloyd's algorithm,
    k-means++ seeding, Arthur & Vassilvitskii 2007), the best of ``restarts`` runs by inertia, each run iterated
    until the assignments stop changing (``tol=0``) or ``max_iter``; reproducible from ``seed``.

    Args:
      features: d x N, one point per column (the ``ufm`` convention; scikit-learn's is N x d).
      k: the number of clusters, 1 <= k <= N.
      restarts: k-means++ initialisations (scikit-learn's ``n_init``).
      max_iter: Lloyd iterations per run.
      seed: scikit-learn's ``random_state``.

    Returns:
      A `KMeans`: ``labels`` (N,), ``centers`` (d x k), ``inertia`` and ``n_iter`` of the best run.

    Raises ImportError naming the extra to install when scikit-learn is missing.
    """
    A = matrix(features, "features")
    k = positive_int("k", k, "number of clusters")
    if k > A.shape[1]:
        raise ValueError(f"k must be <= N = {A.shape[1]} (the columns of features); got {k}")
    restarts = positive_int("restarts", restarts, "k-means restarts")
    max_iter = positive_int("max_iter", max_iter, "Lloyd iterations")
    try:
        from sklearn.cluster import KMeans as SklearnKMeans
    except ImportError as e:
        raise ImportError(
            "ufm.networks.kmeans (and fine_grained) need scikit-learn: pip install 'ufm[networks]' "
            "(or pip install scikit-learn)"
        ) from e
    from threadpoolctl import threadpool_limits  # a scikit-learn dependency

    # one thread for the small clusterings of the experiments: OpenMP start-up dominates below ~1e6 entries (measured
    # 35 ms single-threaded vs 430 ms threaded for 80 points x 64 dims, 10 restarts, on a loaded 2-core machine)
    with threadpool_limits(limits=1 if A.size < 1_000_000 else None):
        km = SklearnKMeans(
            n_clusters=k, init="k-means++", n_init=restarts, max_iter=max_iter, tol=0.0, random_state=seed
        ).fit(A.T)
    return KMeans(km.labels_.astype(np.int64), km.cluster_centers_.T.copy(), float(km.inertia_), int(km.n_iter_))


def cluster_accuracy(clusters: ArrayLike, labels: ArrayLike) -> tuple[float, dict[int, int]]:
    """Accuracy of the best one-to-one matching of clusters to labels (Hungarian algorithm on the contingency table,
    `scipy.optimize.linear_sum_assignment`): max over matchings pi of (1/N) #{i: pi(cluster_i) = label_i}.
    Returns the accuracy and the matching {cluster: label}; unmatched clusters count as errors."""
    from scipy.optimize import linear_sum_assignment

    c = np.asarray(clusters)
    t = np.asarray(labels)
    if c.shape != t.shape or c.ndim != 1 or c.size == 0:
        raise ValueError(f"clusters and labels must be 1-D of the same length N; got {c.shape} and {t.shape}")
    cu, ci = np.unique(c, return_inverse=True)
    tu, ti = np.unique(t, return_inverse=True)
    table = np.zeros((cu.size, tu.size), np.int64)
    np.add.at(table, (ci, ti), 1)
    r, s = linear_sum_assignment(table, maximize=True)
    return float(table[r, s].sum() / c.size), {int(cu[i]): int(tu[j]) for i, j in zip(r, s, strict=True)}
