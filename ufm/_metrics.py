"""Neural-collapse metrics on plain arrays (NumPy, JAX or memory-mapped): arrays in, numbers out.

This module imports nothing of ufm; `ufm.metrics` is its public face (with the per-layer summaries of a UFM from
`ufm._summaries`).

Conventions (`THEORY.md` §5, `ANCHORS.md` "Metric variants"):

* ``features`` is d x N (samples are **columns**); ``labels`` are N integers in [0, K).
* class means mu_k = mean of the columns of class k; the global mean is, by default, the sample mean
  mu_G = (1/N) sum_i a_i = sum_k (n_k/N) mu_k (``global_mean="weighted"``); Wu & Papyan's library uses the
  unweighted mean of the class means mu_G' = (1/K) sum_k mu_k (``global_mean="unweighted"``). Both coincide for
  balanced classes. M = [mu_1 ... mu_K] (d x K, *uncentred*) and M~ = [mu_k - mu_G] (*centred*).
* Sigma_W = (1/N) sum_i (a_i - mu_{y_i})(a_i - mu_{y_i})^T, Sigma_B = (1/K) M~ M~^T  (Papyan, Han, Donoho 2020).
* E = (I - J/K)/sqrt(K-1) is the simplex-ETF Gram at unit Frobenius norm, I/sqrt(K) the orthogonal-frame Gram.

How the numbers are made exact on any features:

* **One pass of statistics** (`class_stats`, a `ClassStats`): counts, class means, per-class within-class sums of
  squares and the within-class scatter restricted to the span of the centred class means, accumulated over
  column blocks (a memory-mapped array larger than memory works) in float64 whatever the input dtype, on data
  shifted by a reference point (the mean of the first block) and scaled by a power of two (exact). Every
  feature metric accepts a `ClassStats` in place of ``features`` so one pass serves all of them.
* **Offset invariance**: the shift makes the centred means accurate to rounding of the *spread* of the data, not of
  its offset, and the known null direction of M~ (M~ n = 0 for the class counts n, or M~ 1 = 0 unweighted) is
  removed exactly (Householder reflection) before any rank decision.
* **Cut-offs from the quantity they guard**: a singular value of M~ is kept when it exceeds ``rtol`` times the
  largest *and* the rounding level of the class means in the input dtype, ``(sqrt(d) + sqrt(K)) eps max|mu_k|``
  (the spectral norm of a d x K matrix of independent rounding errors of size eps |mu|); a within-class energy
  counts as zero when it is below the float64 rounding of the shifted data it was computed from,
  ``(10 eps_64)^2 sum_i ||a_i - c||^2``. No threshold grows with N.
* **Non-finite input** gives NaN (never a plausible number, never an exception); scale-invariant metrics are
  scale-invariant from 1e-300 to 1e300 (inputs are rescaled by powers of two before any square).

Every metric returns a Python float (or a NumPy array for per-class variants) and never warns. Degenerate cases
have documented values: a zero matrix "normalised" to unit norm is the zero matrix, a 0/0 ratio of a variability
to a separation is 0 (nothing varies), and x/0 with x > 0 is ``inf``.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, overload

import numpy as np
import scipy.sparse as sp

__all__ = [
    "ClassStats",
    "class_stats",
    "class_stats_blocks",
    "as_matrix",
    "prepare",
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
    "hyperspherical_uniformity",
    "nc2_etf",
    "nc2_orthogonal",
    "nc2_equinorm",
    "nc2_equiangularity",
    "nc2_max_angle",
    "nc2_uniformity",
    "nc3_product",
    "nc3_difference",
    "nc3_per_class",
    "self_duality_gram",
    "ncc_mismatch",
    "ncc_agreement_per_class",
    "bias_residual",
    "dnc3",
    "partial_products",
    "singular_values",
    "numerical_rank",
    "stable_rank",
    "balancedness",
    "feature_metrics",
]

_EPS64 = float(np.finfo(np.float64).eps)
_GLOBAL_MEANS = ("weighted", "unweighted")


# ---------------------------------------------------------------------------------------------------------------
# input handling


def _eps_of(x) -> float:
    """Machine epsilon of the *input* dtype (float32 data cannot resolve structure below ~eps32)."""
    dt = np.dtype(x.dtype) if hasattr(x, "dtype") else np.asarray(x).dtype
    return float(np.finfo(dt).eps) if np.issubdtype(dt, np.floating) else _EPS64


def _check_array(x: Any, name: str, rows: str, cols: str):
    if isinstance(x, (str, bytes)) or x is None:
        raise TypeError(f"{name} must be a {rows} x {cols} numeric array; got {type(x).__name__}")
    a = x if (hasattr(x, "shape") and hasattr(x, "dtype")) else np.asarray(x)
    dt = np.dtype(a.dtype)
    if not (np.issubdtype(dt, np.floating) or np.issubdtype(dt, np.integer)):
        raise TypeError(f"{name} must be a {rows} x {cols} numeric array; got dtype {dt}")
    if len(a.shape) != 2:
        raise ValueError(f"{name} must be a 2-D {rows} x {cols} array; got shape {tuple(a.shape)}")
    return a


def as_matrix(x: Any, name: str, rows: str = "d", cols: str = "N") -> np.ndarray:
    """``x`` as a 2-D float64 NumPy array, or a TypeError/ValueError naming ``name`` and its shape ``rows x cols``."""
    return np.asarray(_check_array(x, name, rows, cols), dtype=np.float64)


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
    if num_classes is not None and (isinstance(num_classes, bool) or int(num_classes) < 1):
        raise ValueError(f"num_classes must be a positive integer K; got {num_classes!r}")
    K = int(y.max()) + 1 if num_classes is None else int(num_classes)
    if N and y.max() >= K:
        raise ValueError(f"labels must be in [0, K) with K = {K}; got a maximum of {y.max()}")
    if K < 2:
        raise ValueError(f"collapse metrics need K >= 2 classes; got K = {K}")
    counts = np.bincount(y, minlength=K)
    if np.any(counts == 0):
        empty = np.flatnonzero(counts == 0).tolist()
        raise ValueError(f"every class needs at least one sample (n_k >= 1); classes {empty} have none")
    return y, K


def prepare(features, labels, num_classes: int | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """Validated ``(A, y, K)``: features as a d x N float64 array, labels as int64 in [0, K), and K.

    Raises TypeError/ValueError naming the argument and its expected shape (d x N, length N) before any compute.
    """
    A = as_matrix(features, "features")
    y, K = _labels(labels, A.shape[1], num_classes, A.shape)
    return A, y, K


@overload
def _rtol(rtol, default: float) -> float: ...
@overload
def _rtol(rtol, default: None) -> float | None: ...
def _rtol(rtol, default: float | None) -> float | None:
    if rtol is None:
        return default
    if isinstance(rtol, bool) or not isinstance(rtol, (int, float, np.floating, np.integer)):
        raise TypeError(f"rtol must be a real number in [0, 1); got {rtol!r}")
    r = float(rtol)
    if not (0.0 <= r < 1.0):
        raise ValueError(f"rtol must be a real number in [0, 1); got {rtol!r}")
    return r


def _global_mean(global_mean: str) -> str:
    if global_mean not in _GLOBAL_MEANS:
        raise ValueError(f"global_mean must be one of {_GLOBAL_MEANS}; got {global_mean!r}")
    return global_mean


def _pow2(x: float) -> float:
    """The power of two at or above x > 0 (0 -> 1): dividing by it is exact."""
    if not (x > 0) or not math.isfinite(x):
        return 1.0
    return math.ldexp(1.0, math.frexp(x)[1])


def _rescaled(X: np.ndarray) -> np.ndarray:
    """X divided by a power of two near its largest entry, so that squares neither underflow nor overflow."""
    return X / _pow2(float(np.max(np.abs(X)))) if X.size else X


def _finite(*xs) -> bool:
    return all(bool(np.all(np.isfinite(x))) for x in xs)


# ---------------------------------------------------------------------------------------------------------------
# one pass of class statistics


class ClassStats(NamedTuple):
    """Sufficient statistics of labelled features for every metric of this module, from `class_stats`.

    Stored in shifted and scaled float64 coordinates x = (a - shift)/scale (``scale`` a power of two).

    Attributes:
      counts: (K,) class sizes n_k.
      shift: (d,) the reference point c (mean of the first block).
      scale: the power of two s.
      means: (d, K) class means of x: (mu_k - c)/s.
      basis: (d, r) orthonormal Q whose span contains every mu_k - mu_j, r = min(d, K - 1).
      within_basis: (r, r) Q^T [sum_i (x_i - m_{y_i})(x_i - m_{y_i})^T] Q (within-class scatter on that span).
      class_ss: (K,) sum_{i in k} ||x_i - m_k||^2 (per-class within-class sums of squares).
      total_ss: sum_i ||x_i||^2 (the energy of the shifted data: the rounding floor of the sums above).
      mean_abs: max_k,j |mu_k,j| in the input's units (the size of the uncentred means: their rounding level).
      eps: machine epsilon of the input dtype.
      finite: False when the input had a NaN or an infinity (every metric is then NaN).
    """

    counts: np.ndarray
    shift: np.ndarray
    scale: float
    means: np.ndarray
    basis: np.ndarray
    within_basis: np.ndarray
    class_ss: np.ndarray
    total_ss: float
    mean_abs: float
    eps: float
    finite: bool

    @property
    def num_classes(self) -> int:
        return int(self.counts.shape[0])

    @property
    def dim(self) -> int:
        return int(self.means.shape[0])

    @property
    def num_samples(self) -> int:
        return int(self.counts.sum())


def _onehot(y: np.ndarray, K: int):
    n = y.shape[0]
    return sp.csr_matrix((np.ones(n), (np.arange(n), y)), shape=(n, K))


def _null_reflect(X: np.ndarray, w: np.ndarray) -> np.ndarray:
    """X Q, with Q (K x (K-1)) an orthonormal basis of the complement of w (Householder: H w ∝ e_1, Q = H[:, 1:]).

    Applied implicitly (X - 2 (X v) v^T / v^T v), so the cost is O(d K) and no K x K matrix is formed."""
    w = w / np.linalg.norm(w)
    v = w.copy()
    v[0] += 1.0 if w[0] >= 0 else -1.0
    XH = X - np.outer(X @ v, v) * (2.0 / (v @ v))
    return XH[:, 1:]


def _empty_stats(d: int, K: int, counts, eps: float) -> ClassStats:
    r = min(d, K - 1)
    nan = math.nan
    return ClassStats(
        counts,
        np.full(d, nan),
        1.0,
        np.full((d, K), nan),
        np.full((d, r), nan),
        np.full((r, r), nan),
        np.full(K, nan),
        nan,
        nan,
        eps,
        False,
    )


def _shifted_rows(Ab, shift, inv, out=None):
    """(B, d) float64 rows x_i = (a_i - shift) * inv of a d x B block (one transposing copy, in-place ops)."""
    X = np.empty((Ab.shape[1], Ab.shape[0])) if out is None or out.shape != Ab.T.shape else out
    X[...] = Ab.T
    with np.errstate(invalid="ignore", over="ignore"):  # non-finite data: detected from the sums, reported as NaN
        X -= shift
        if inv != 1.0:
            X *= inv
    return X


def class_stats_blocks(blocks, num_classes: int, *, eps: float | None = None) -> ClassStats:
    """`ClassStats` from a re-iterable of ``(features_block, labels_block)`` pairs (d x B_i arrays, (B_i,) labels).

    Two sweeps over the blocks (means, then residuals): each block is read twice, never held with another. Use
    it for features that do not fit in memory (e.g. a generator function wrapped in a list-like object, or
    `class_stats` with a ``np.memmap``). ``eps`` is the input dtype's epsilon (default: that of the first block).
    Labels must be integers in [0, K).
    """
    K = int(num_classes)
    if K < 2:
        raise ValueError(f"collapse metrics need K >= 2 classes; got K = {K}")
    counts = np.zeros(K, np.int64)
    sums = None
    shift = None
    inv = 1.0
    d = None
    buf = None
    for Ab, yb in blocks:
        if eps is None:
            eps = _eps_of(Ab)
        Ab = np.asarray(Ab)
        yb = np.asarray(yb, dtype=np.int64)
        if d is None:
            d = Ab.shape[0]
            sums = np.zeros((K, d))
            A0 = Ab.astype(np.float64)
            shift = A0.mean(axis=1) if A0.shape[1] else np.zeros(d)
            with np.errstate(invalid="ignore", over="ignore"):
                spread = float(np.max(np.abs(A0 - shift[:, None]), initial=0.0))
            # rescale only where squares could underflow or overflow (a power of two: exact)
            scale = _pow2(spread) if not (2.0**-200 < spread < 2.0**200) else 1.0
            inv = 1.0 / scale
        if Ab.shape[1] == 0:
            continue
        buf = _shifted_rows(Ab, shift, inv, buf)
        counts += np.bincount(yb, minlength=K)
        with np.errstate(invalid="ignore", over="ignore"):
            sums += _onehot(yb, K).T @ buf  # (K, B) sparse @ (B, d) C-contiguous
    if d is None:
        raise ValueError("features must have at least one column (N >= 1)")
    assert sums is not None and shift is not None  # set with d, on the first block
    eps = _EPS64 if eps is None else eps
    if np.any(counts == 0):
        empty = np.flatnonzero(counts == 0).tolist()
        raise ValueError(f"every class needs at least one sample (n_k >= 1); classes {empty} have none")
    scale = 1.0 / inv
    if not (np.all(np.isfinite(sums)) and np.all(np.isfinite(shift))):  # a NaN or an infinity in the data
        return _empty_stats(d, K, counts, eps)
    means = (sums / counts[:, None]).T  # d x K
    centred = means - (means @ counts)[:, None] / counts.sum()
    B = _null_reflect(centred, counts.astype(np.float64))
    Q = np.linalg.svd(B, full_matrices=False)[0] if B.size else np.zeros((d, 0))
    r = Q.shape[1]
    within = np.zeros((r, r))
    class_ss = np.zeros(K)
    meansT = np.ascontiguousarray(means.T)
    for Ab, yb in blocks:
        Ab = np.asarray(Ab)
        if Ab.shape[1] == 0:
            continue
        yb = np.asarray(yb, dtype=np.int64)
        R = _shifted_rows(Ab, shift, inv, buf)
        R -= meansT[yb]
        class_ss += np.bincount(yb, weights=np.einsum("ij,ij->i", R, R), minlength=K)
        P = R @ Q
        within += P.T @ P
    total_ss = float(np.sum(class_ss) + np.sum(counts * np.sum(means**2, axis=0)))  # sum_i ||x_i||^2
    mean_abs = float(np.max(np.abs(shift[:, None] + scale * means)))
    if not (math.isfinite(total_ss) and math.isfinite(mean_abs)):
        return _empty_stats(d, K, counts, eps)
    return ClassStats(counts, shift, scale, means, Q, within, class_ss, total_ss, mean_abs, eps, True)


class _Blocks:
    """Column blocks of a d x N array with their labels (re-iterable)."""

    def __init__(self, A, y, block):
        self.A, self.y, self.block = A, y, block

    def __iter__(self):
        N = self.A.shape[1]
        for i in range(0, N, self.block):
            yield self.A[:, i : i + self.block], self.y[i : i + self.block]


def class_stats(features, labels, num_classes: int | None = None, *, block: int | None = None) -> ClassStats:
    """One pass of class statistics shared by every feature metric (see `ClassStats`).

    Args:
      features: d x N array (samples are columns): NumPy, JAX or a ``np.memmap`` (read ``block`` columns at a time).
      labels: N integers in [0, K).
      num_classes: K (default: max(labels) + 1).
      block: columns per block (default: about 2^22 / d, i.e. 32 MB of float64 per block).

    Returns:
      A `ClassStats`; pass it as ``features`` to `nc1`, `nc1_trace_ratio`, `cdnv`, `class_means`, the ``nc2_*``,
      `nc3_product`, `nc3_difference`, `nc3_per_class`, `bias_residual` or `feature_metrics`.

    Cost: O(d N) for the means plus O(r d N) (r = min(d, K - 1)) for the scatter on the span of the class means;
    memory O(d K + d B).
    """
    if isinstance(features, ClassStats):
        return features
    A = _check_array(features, "features", "d", "N")
    if not isinstance(A, np.ndarray):
        A = np.asarray(A)
    y, K = _labels(labels, A.shape[1], num_classes, A.shape)
    if block is None:
        block = max(256, (1 << 22) // max(A.shape[0], 1))
    if isinstance(block, bool) or int(block) < 1:
        raise ValueError(f"block must be a positive number of columns; got {block!r}")
    return class_stats_blocks(_Blocks(A, y, int(block)), K, eps=_eps_of(A))


def _stats(features, labels, num_classes) -> ClassStats:
    return features if isinstance(features, ClassStats) else class_stats(features, labels, num_classes)


def _centred(st: ClassStats, global_mean: str = "weighted") -> np.ndarray:
    """Centred class means in the scaled coordinates (accurate to the rounding of the spread, not the offset)."""
    w = st.counts.astype(np.float64) if _global_mean(global_mean) == "weighted" else np.ones(st.num_classes)
    return st.means - (st.means @ w)[:, None] / w.sum()


def _uncentred(st: ClassStats) -> np.ndarray:
    return st.shift[:, None] + st.scale * st.means


def _within_floor(st: ClassStats) -> float:
    """Within-class energy (sum of squares, scaled units) indistinguishable from float64 rounding of the data."""
    return (10 * _EPS64) ** 2 * st.total_ss


def _mean_floor(st: ClassStats) -> float:
    """Spectral size (scaled units) of the rounding of the class means in the input dtype and in the shifted
    float64 sums: (sqrt(d) + sqrt(K)) eps |mu| plus 10 eps_64 times the RMS shifted sample norm."""
    d, K = st.dim, st.num_classes
    data = (math.sqrt(d) + math.sqrt(K)) * st.eps * st.mean_abs / st.scale
    return data + 10 * _EPS64 * math.sqrt(st.total_ss / st.num_samples)


def class_means(
    features, labels=None, num_classes: int | None = None, *, global_mean: str = "weighted"
) -> tuple[np.ndarray, np.ndarray]:
    """Class means M = [mu_1 ... mu_K] (d x K, float64) and the global mean mu_G (d,).

    ``mu_k = (1/n_k) sum_{i: y_i = k} a_i``; ``mu_G = (1/N) sum_i a_i`` (``global_mean="weighted"``) or
    ``(1/K) sum_k mu_k`` (``"unweighted"``, Wu & Papyan's library). NaN for non-finite features.
    """
    st = _stats(features, labels, num_classes)
    M = _uncentred(st)
    w = st.counts.astype(np.float64) if _global_mean(global_mean) == "weighted" else np.ones(st.num_classes)
    muG = st.shift + st.scale * (st.means @ w) / w.sum()
    return M, muG


# ---------------------------------------------------------------------------------------------------------------
# NC1


def nc1(
    features, labels=None, num_classes: int | None = None, *, rtol: float | None = None, global_mean: str = "weighted"
) -> float:
    """NC1 of Papyan, Han, Donoho (2020): ``tr(Sigma_W Sigma_B^+) / K``.

    With B = M~ Q (Q: K x (K-1) orthonormal, orthogonal to the known null vector of M~: the counts n, or 1 for
    ``global_mean="unweighted"``), Sigma_B = B B^T / K exactly, and with the thin SVD B = U diag(s) V^T,

        NC1 = sum_j u_j^T [sum_i (a_i - mu_{y_i})(a_i - mu_{y_i})^T] u_j / (N s_j^2),   over the kept j,

    a direction being kept when s_j > rtol * s_1 and s_j is above the rounding level of the class means (module
    docstring). The spurious K-th direction of M~, whose size scales with the offset of the features, never enters.
    Within-class scatter outside the span of the class means is ignored by this variant (`nc1_trace_ratio` sees
    it).

    Args:
      features: d x N array (samples are columns), or a `ClassStats`.
      labels: N integers in [0, K) (ignored with a `ClassStats`).
      num_classes: K (default: max(labels) + 1).
      rtol: relative cut-off on the singular values of B, in [0, 1) (default ``10 * max(d, K) * eps`` of the input
        dtype: a float32 solution resolves class-mean directions only down to ~eps32 * s_1).
      global_mean: "weighted" (the sample mean, default) or "unweighted" (mean of the class means).

    Returns:
      A float >= 0: 0 to rounding at exact collapse (any offset), ``inf`` when all class means coincide but
      samples vary, NaN for non-finite features.
    """
    st = _stats(features, labels, num_classes)
    rtol = _rtol(rtol, 10 * max(st.dim, st.num_classes) * st.eps)
    gm = _global_mean(global_mean)
    if not st.finite:
        return math.nan
    K = st.num_classes
    w = st.counts.astype(np.float64) if gm == "weighted" else np.ones(K)
    Bq = st.basis.T @ _null_reflect(_centred(st, gm), w)  # r x (K-1), the between-class span in the basis
    negligible = float(np.sum(st.class_ss)) <= _within_floor(st)
    if Bq.size == 0:
        return 0.0 if negligible else math.inf
    U, s, _ = np.linalg.svd(Bq, full_matrices=False)
    keep = (s > rtol * s[0]) & (s > _mean_floor(st)) if s[0] > 0 else np.zeros(s.shape, bool)
    if not np.any(keep):
        return 0.0 if negligible else math.inf
    if negligible:
        return 0.0
    Uk = U[:, keep]
    e = np.einsum("ij,ij->j", Uk, st.within_basis @ Uk)
    return float(max(np.sum(e / s[keep] ** 2), 0.0) / st.num_samples)


def nc1_trace_ratio(features, labels=None, num_classes: int | None = None, *, global_mean: str = "weighted") -> float:
    """NC1 as the trace ratio ``tr(Sigma_W) / tr(Sigma_B)`` (Tirer, Huang, Niles-Weed 2023).

    ``tr Sigma_W = sum_i ||a_i - mu_{y_i}||^2 / N`` and ``tr Sigma_B = ||M~||_F^2 / K``. Unlike `nc1` it counts
    within-class scatter in every direction. 0/0 (the zero solution) is 0; x/0 with x > 0 is ``inf``; a sum below
    the float64 rounding of the data counts as 0. NaN for non-finite features.
    """
    st = _stats(features, labels, num_classes)
    gm = _global_mean(global_mean)
    if not st.finite:
        return math.nan
    ssW = float(np.sum(st.class_ss))
    ssB = float(np.sum(_centred(st, gm) ** 2))
    if ssW <= _within_floor(st):
        return 0.0
    if math.sqrt(ssB) <= _mean_floor(st):
        return math.inf
    return float((ssW / st.num_samples) / (ssB / st.num_classes))


def cdnv(features, labels=None, num_classes: int | None = None) -> float:
    """Class-distance normalised variance (Galanti, György, Hutter 2022), averaged over class pairs:

        CDNV = mean_{k < j} (V_k + V_j) / (2 ||mu_k - mu_j||^2),     V_k = (1/n_k) sum_{i in k} ||a_i - mu_k||^2.

    A pair with coincident means (below their rounding level) contributes 0 if both classes are collapsed (V_k,
    V_j below the rounding of the data) and ``inf`` otherwise. NaN for non-finite features.
    """
    st = _stats(features, labels, num_classes)
    if not st.finite:
        return math.nan
    K = st.num_classes
    V = st.class_ss / st.counts
    vfloor = _within_floor(st) / st.num_samples
    dfloor = _mean_floor(st) ** 2
    M = st.means
    total = 0.0
    for k in range(K - 1):
        D = M[:, k + 1 :] - M[:, [k]]
        den = 2 * np.einsum("ij,ij->j", D, D)
        num = V[k] + V[k + 1 :]
        small = num <= vfloor
        with np.errstate(divide="ignore", invalid="ignore"):
            vals = np.where(small, 0.0, np.where(den <= dfloor, math.inf, num / np.where(den > 0, den, 1.0)))
        total += float(np.sum(vals))
    return float(total / (K * (K - 1) / 2))


# ---------------------------------------------------------------------------------------------------------------
# NC2 on a set of K vectors (columns of V: class means, or classifier rows W^T)


def _unit(G: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(G)
    return G / n if n > 0 else np.zeros_like(G)


def _etf_gram(K: int) -> np.ndarray:
    return (np.eye(K) - np.ones((K, K)) / K) / math.sqrt(K - 1)


def _vectors(V, name: str = "V") -> np.ndarray:
    V = as_matrix(V, name, "d", "K")
    if V.shape[1] < 2:
        raise ValueError(f"{name} must have K >= 2 columns (one vector per class); got shape {V.shape}")
    return V


def etf_distance(V) -> float:
    """Distance of the Gram of the columns of V (d x K) to the simplex ETF (Zhu et al. 2021; Zhou et al. 2022):

        || G/||G||_F - (I - J/K)/sqrt(K-1) ||_F,      G = V^T V,

    in [0, 2]. V is used as given (no centring): pass the *centred* class means (`nc2_etf` does) or the
    classifier rows ``W.T``. For V = 0 the normalised Gram is taken as 0, so the distance is 1. NaN if V is not
    finite; invariant under V -> c V for any c != 0 (V is rescaled by a power of two first).
    """
    V = _vectors(V)
    if not _finite(V):
        return math.nan
    V = _rescaled(V)
    return float(np.linalg.norm(_unit(V.T @ V) - _etf_gram(V.shape[1])))


def orthogonal_frame_distance(V, equinorm: bool = True) -> float:
    """Distance of the Gram of the columns of V (d x K) to an orthogonal frame.

    ``equinorm=True``: ``|| G/||G||_F - I/sqrt(K) ||_F`` (the target of bias-free MSE and of ReLU layers,
    THEORY.md §5; DNC2 of Súkeník et al. 2023 up to normalisation). ``equinorm=False``: the distance to the
    nearest *general* orthogonal frame (orthogonal, unequal norms; Dang et al. 2023, imbalanced classes),
    ``||offdiag(G)||_F / ||G||_F``. G = V^T V with V uncentred. In [0, 2] (resp. [0, 1]); V = 0 gives 1; NaN if V
    is not finite.
    """
    V = _vectors(V)
    if not _finite(V):
        return math.nan
    V = _rescaled(V)
    K = V.shape[1]
    G = V.T @ V
    if equinorm:
        return float(np.linalg.norm(_unit(G) - np.eye(K) / math.sqrt(K)))
    n = np.linalg.norm(G)
    return float(np.linalg.norm(G - np.diag(np.diag(G))) / n) if n > 0 else 1.0


def equinorm(V) -> float:
    """Equinorm (Papyan et al. 2020): coefficient of variation std_k ||v_k|| / mean_k ||v_k|| of the column norms
    (population std). 0 when all norms are equal, including V = 0; NaN if V is not finite."""
    V = _vectors(V)
    if not _finite(V):
        return math.nan
    norms = np.linalg.norm(_rescaled(V), axis=0)
    m = norms.mean()
    return float(norms.std() / m) if m > 0 else 0.0


def _unit_columns(V):
    norms = np.linalg.norm(V, axis=0)
    return np.divide(V, norms, out=np.zeros_like(V), where=norms > 0)


def _cosines(V):
    Vn = _unit_columns(_rescaled(V))
    C = Vn.T @ Vn
    K = V.shape[1]
    return C[~np.eye(K, dtype=bool)]


def equiangularity(V) -> float:
    """Equiangularity (Papyan et al. 2020): std over pairs k != j of cos(v_k, v_j) (population std; a zero vector
    has cosine 0 with everything). 0 for K = 2 (one angle); NaN if V is not finite."""
    V = _vectors(V)
    if not _finite(V):
        return math.nan
    return float(np.std(_cosines(V)))


def max_angle(V) -> float:
    """Max-angle criterion (Papyan et al. 2020): mean over pairs k != j of |cos(v_k, v_j) + 1/(K-1)|; 0 for a
    simplex ETF (cosines -1/(K-1)), 1/(K-1) for an orthogonal frame; NaN if V is not finite."""
    V = _vectors(V)
    if not _finite(V):
        return math.nan
    return float(np.mean(np.abs(_cosines(V) + 1.0 / (V.shape[1] - 1))))


def inverse_condition_number(V) -> float:
    """sigma_K(V) / sigma_1(V) for V with K columns (Súkeník et al. 2023 use the condition number sigma_1/sigma_K
    as a DNC2 measure; its inverse is reported so that the value stays finite): 1 iff V^T V is a multiple of I
    (an orthogonal frame when d >= K), 0 when d < K or V is rank deficient, 0 for V = 0, NaN if not finite."""
    V = _vectors(V)
    if not _finite(V):
        return math.nan
    K = V.shape[1]
    if V.shape[0] < K:
        return 0.0
    s = np.linalg.svd(_rescaled(V), compute_uv=False)
    return float(s[K - 1] / s[0]) if s[0] > 0 else 0.0


def hyperspherical_uniformity(V, kernel: str = "log") -> float:
    """Hyperspherical-uniformity NC2 (Liu et al. 2023, "Generalizing and decoupling neural collapse via
    hyperspherical uniformity gap"; the ``nc2g`` of Wu & Papyan's library): the population variance, over pairs
    k < j, of a kernel of the distance between the unit vectors v_k/||v_k||,

        kernel="log":      log(1 / ||v^_k - v^_j||)           (the library's ``log_kernel``)
        kernel="distance": ||v^_k - v^_j||                    (``dist_kernel``)

    0 when the unit vectors are equidistant (a simplex ETF, an orthogonal frame, any K = 2). A zero vector is
    normalised to 0; two coincident unit vectors give ``inf`` with the log kernel. NaN if V is not finite.
    """
    V = _vectors(V)
    if kernel not in ("log", "distance"):
        raise ValueError(f"kernel must be 'log' or 'distance'; got {kernel!r}")
    if not _finite(V):
        return math.nan
    U = _unit_columns(_rescaled(V))
    K = U.shape[1]
    iu = np.triu_indices(K, 1)
    G = U.T @ U
    sq = np.diag(G)[:, None] + np.diag(G)[None, :] - 2 * G
    D = np.sqrt(np.maximum(sq[iu], 0.0))
    if kernel == "log":
        if np.any(D == 0):
            return math.inf
        D = -np.log(D)
    return float(np.var(D))


# feature-level NC2 wrappers


def nc2_etf(features, labels=None, num_classes: int | None = None, *, global_mean: str = "weighted") -> float:
    """NC2, Zhu/Zhou style: `etf_distance` of the **centred** class means M~ (the target with a free bias or CE)."""
    st = _stats(features, labels, num_classes)
    return etf_distance(_centred(st, global_mean)) if st.finite else math.nan


def nc2_orthogonal(features, labels=None, num_classes: int | None = None, *, equinorm: bool = True) -> float:
    """NC2 against an orthogonal frame: `orthogonal_frame_distance` of the **uncentred** class means M (the target
    of bias-free MSE, deep linear layers without bias and ReLU layers; ``equinorm=False`` for imbalanced data)."""
    st = _stats(features, labels, num_classes)
    return orthogonal_frame_distance(_uncentred(st), equinorm=equinorm) if st.finite else math.nan


def nc2_equinorm(
    features, labels=None, num_classes: int | None = None, *, centred: bool = True, global_mean: str = "weighted"
) -> float:
    """NC2 equinorm (Papyan et al. 2020): `equinorm` of the centred (default) or uncentred class means."""
    st = _stats(features, labels, num_classes)
    if not st.finite:
        return math.nan
    return equinorm(_centred(st, global_mean) if centred else _uncentred(st))


def nc2_equiangularity(
    features, labels=None, num_classes: int | None = None, *, centred: bool = True, global_mean: str = "weighted"
) -> float:
    """NC2 equiangularity (Papyan et al. 2020): `equiangularity` of the centred (default) or uncentred means."""
    st = _stats(features, labels, num_classes)
    if not st.finite:
        return math.nan
    return equiangularity(_centred(st, global_mean) if centred else _uncentred(st))


def nc2_max_angle(features, labels=None, num_classes: int | None = None, *, global_mean: str = "weighted") -> float:
    """NC2 max-angle (Papyan et al. 2020): `max_angle` of the centred class means."""
    st = _stats(features, labels, num_classes)
    return max_angle(_centred(st, global_mean)) if st.finite else math.nan


def nc2_uniformity(
    features, labels=None, num_classes: int | None = None, *, kernel: str = "log", global_mean: str = "weighted"
) -> float:
    """NC2 as hyperspherical uniformity (Liu et al. 2023): `hyperspherical_uniformity` of the centred class means.
    Wu & Papyan's library reports it with ``global_mean="unweighted"``."""
    st = _stats(features, labels, num_classes)
    return hyperspherical_uniformity(_centred(st, global_mean), kernel) if st.finite else math.nan


# ---------------------------------------------------------------------------------------------------------------
# NC3, NC4


def _classifier(W, d: int, K: int) -> np.ndarray:
    W = as_matrix(W, "W", "K", "d")
    if W.shape != (K, d):
        raise ValueError(f"W must be K x d = ({K}, {d}) (one row per class, d = the features' rows); got {W.shape}")
    return W


def nc3_product(
    W, features, labels=None, num_classes: int | None = None, *, target: str = "etf", global_mean: str = "weighted"
) -> float:
    """NC3, product form (Zhu et al. 2021): distance of the class-mean outputs W M to their target,

        ``target="etf"``:        || W M~ / ||W M~||_F - (I - J/K)/sqrt(K-1) ||_F   (centred means; free bias, CE)
        ``target="orthogonal"``: || W M  / ||W M||_F  - I/sqrt(K) ||_F             (uncentred; bias-free MSE)

    W is K x d. W M = 0 gives 1; NaN when W or the features are not finite.
    """
    if target not in ("etf", "orthogonal"):
        raise ValueError(f"target must be 'etf' or 'orthogonal'; got {target!r}")
    st = _stats(features, labels, num_classes)
    K = st.num_classes
    W = _classifier(W, st.dim, K)
    if not (st.finite and _finite(W)):
        return math.nan
    W = _rescaled(W)
    if target == "etf":
        return float(np.linalg.norm(_unit(W @ _centred(st, global_mean)) - _etf_gram(K)))
    return float(np.linalg.norm(_unit(W @ _rescaled(_uncentred(st))) - np.eye(K) / math.sqrt(K)))


def nc3_difference(
    W,
    features,
    labels=None,
    num_classes: int | None = None,
    *,
    centred: bool = True,
    squared: bool = True,
    global_mean: str = "weighted",
) -> float:
    """NC3, difference form (Papyan et al. 2020): ``|| W^T/||W||_F - M~/||M~||_F ||_F^2`` (``squared=True``, as in
    Papyan et al.) or its square root. ``centred=False`` uses the uncentred means M (bias-free models). A zero
    W or M is normalised to 0. In [0, 4] (squared). NaN when W or the features are not finite."""
    st = _stats(features, labels, num_classes)
    W = _classifier(W, st.dim, st.num_classes)
    if not (st.finite and _finite(W)):
        return math.nan
    M = _centred(st, global_mean) if centred else _rescaled(_uncentred(st))
    D = np.linalg.norm(_unit(_rescaled(W).T) - _unit(M))
    return float(D**2 if squared else D)


def nc3_per_class(
    W, features, labels=None, num_classes: int | None = None, *, centred: bool = True, global_mean: str = "weighted"
) -> np.ndarray:
    """Per-class self-duality (the per-class NC3 of Wu & Papyan's library, ``similarities(..., cos=True)``):
    the (K,) cosines ``cos(w_k, mu_k - mu_G)`` (``centred=False``: ``cos(w_k, mu_k)``); 1 at NC3. A zero vector
    has cosine 0. NaN entries when W or the features are not finite."""
    st = _stats(features, labels, num_classes)
    K = st.num_classes
    W = _classifier(W, st.dim, K)
    if not (st.finite and _finite(W)):
        return np.full(K, math.nan)
    M = _centred(st, global_mean) if centred else _rescaled(_uncentred(st))
    return np.sum(_unit_columns(_rescaled(W).T) * _unit_columns(M), axis=0)


def self_duality_gram(W, means) -> float:
    """Rotation-invariant self-duality of a layer: ``|| W^T W/||W^T W||_F - M M^T/||M M^T||_F ||_F``.

    W is d_out x d (any layer's weights), ``means`` is d x K (the class means of that layer's input). The UFM
    optima give W_l^T W_l proportional to M_l M_l^T (THEORY.md §1: W^T W = (n lam_H/lam_W) M M^T for the shallow
    MSE UFM; equal spectra and aligned layers in §3 and at the DNC point of §4.1, layers >= 2). Computed from
    K x K and d_out x d_out Grams: ||X - Y||^2 = 2 - 2 ||W M||_F^2 / (||W W^T||_F ||M^T M||_F). A zero factor
    gives 1 (its normalised Gram is 0); NaN if either is not finite."""
    W = as_matrix(W, "W", "d_out", "d")
    M = as_matrix(means, "means", "d", "K")
    if W.shape[1] != M.shape[0]:
        raise ValueError(f"W (d_out x d) and means (d x K) must share d; got {W.shape} and {M.shape}")
    if not _finite(W, M):
        return math.nan
    W, M = _rescaled(W), _rescaled(M)
    a = np.linalg.norm(W @ W.T)
    b = np.linalg.norm(M.T @ M)
    if a == 0 or b == 0:
        return 1.0
    c = np.sum((W @ M) ** 2) / (a * b)
    return float(math.sqrt(max(2.0 - 2.0 * c, 0.0)))


def _bias(b, K):
    b = np.asarray(b, dtype=np.float64)
    if b.shape != (K,):
        raise ValueError(f"b must have shape (K,) = ({K},); got {b.shape}")
    return b


def _ncc_hits(W, features, labels, num_classes, b):
    """Per-class counts of samples where argmax_k (W a + b)_k == argmin_k ||a - mu_k|| (one more pass)."""
    A = _check_array(features, "features", "d", "N")
    if not isinstance(A, np.ndarray):
        A = np.asarray(A)
    y, K = _labels(labels, A.shape[1], num_classes, A.shape)
    W = _classifier(W, A.shape[0], K)
    b = None if b is None else _bias(b, K)
    st = class_stats(A, y, K)
    if not (st.finite and _finite(W) and (b is None or _finite(b))):
        return None, st.counts
    Ms = st.means
    sq = np.sum(Ms**2, axis=0)
    hits = np.zeros(K)
    step = max(256, (1 << 22) // max(A.shape[0], 1))
    for i in range(0, A.shape[1], step):
        Ab = np.asarray(A[:, i : i + step], dtype=np.float64)
        X = (Ab - st.shift[:, None]) * (1.0 / st.scale)
        out = W @ Ab if b is None else W @ Ab + b[:, None]
        ncc = np.argmin(sq[:, None] - 2 * Ms.T @ X, axis=0)
        yb = y[i : i + step]
        hits += np.bincount(yb, weights=(np.argmax(out, axis=0) == ncc).astype(np.float64), minlength=K)
    return hits, st.counts


def ncc_mismatch(W, features, labels, num_classes: int | None = None, b=None) -> float:
    """NC4 (Papyan et al. 2020): the fraction of samples where the classifier disagrees with the nearest class
    centre, ``argmax_k (W a + b)_k != argmin_k ||a - mu_k||`` (ties go to the smallest k in both). In [0, 1];
    NaN when W, b or the features are not finite. (Wu & Papyan's ``clf_ncc_agreement`` with ``weighted=True`` is
    one minus this.)"""
    hits, counts = _ncc_hits(W, features, labels, num_classes, b)
    return math.nan if hits is None else float((counts.sum() - hits.sum()) / counts.sum())


def ncc_agreement_per_class(W, features, labels, num_classes: int | None = None, b=None) -> np.ndarray:
    """Per-class NC4 rates: the (K,) fractions of the samples of class k on which the classifier agrees with the
    nearest class centre (Wu & Papyan's ``DecAccumulator`` hit rates; their ``clf_ncc_agreement(weighted=False)``
    is the mean of this vector). NaN entries when W, b or the features are not finite."""
    hits, counts = _ncc_hits(W, features, labels, num_classes, b)
    return np.full(counts.shape, math.nan) if hits is None else hits / counts


def bias_residual(W, features, labels=None, num_classes: int | None = None, b=None) -> float:
    """The bias residual ``||W mu_G + b||_2`` that Zhu et al. (2021) plot under the name "NC4" (not the NCC rule of
    Papyan et al.; see `ncc_mismatch`). It is 0 at the CE optimum with a regularised bias (mu_G = 0, b = 0), and
    1/sqrt(K) at the balanced MSE optimum with a free bias (mean output 1/K per class). NaN if not finite."""
    st = _stats(features, labels, num_classes)
    K = st.num_classes
    W = _classifier(W, st.dim, K)
    _, muG = class_means(st)
    r = W @ muG
    if b is not None:
        r = r + _bias(b, K)
    return float(np.linalg.norm(r)) if _finite(r) else math.nan


def dnc3(W, means) -> float:
    """DNC3 of a layer (after Súkeník et al. 2023; THEORY.md §5): one minus the mean, over rows w_r of W, of
    ``max_k |cos(w_r, mu_k)|``, weighted by ||w_r||^2 (zero rows do not count):

        DNC3 = 1 - sum_r ||w_r||^2 max_k |cos(w_r, mu_k)| / sum_r ||w_r||^2.

    0 when every nonzero row of W is collinear with one class mean (the DNC point, layers >= 2, whose means
    form a non-negative orthogonal frame). W is d_out x d, ``means`` d x K. W = 0 gives 0 (no row is
    misaligned); means = 0 gives 1; NaN if either is not finite."""
    W = as_matrix(W, "W", "d_out", "d")
    M = as_matrix(means, "means", "d", "K")
    if W.shape[1] != M.shape[0]:
        raise ValueError(f"W (d_out x d) and means (d x K) must share d; got {W.shape} and {M.shape}")
    if not _finite(W, M):
        return math.nan
    W, M = _rescaled(W), _rescaled(M)
    wn = np.linalg.norm(W, axis=1)
    if not np.any(wn > 0):
        return 0.0
    Mu = _unit_columns(M)
    Wu = _unit_columns(W.T).T
    best = np.minimum(np.max(np.abs(Wu @ Mu), axis=1), 1.0)  # |cos| <= 1 up to rounding
    return float(1.0 - np.sum(wn**2 * best) / np.sum(wn**2))


def partial_products(Ws) -> list[np.ndarray]:
    """The partial products P_l = W_L W_{L-1} ... W_l (K x d_l), l = 1..L, of a list [W_1, ..., W_L].

    For a linear model the output is P_l H_l + b, so NC3 of the map from layer l to the output is
    ``nc3_product(P_l, H_l, y)`` (deep linear UFMs: every P_l is aligned with the class means of H_l at the
    optimum, Dang et al. 2023; Garrod & Keating 2024)."""
    mats = [as_matrix(W, f"Ws[{i}]", "d_out", "d_in") for i, W in enumerate(Ws)]
    if not mats:
        raise ValueError("Ws must hold at least one matrix W_1")
    for i in range(1, len(mats)):
        if mats[i].shape[1] != mats[i - 1].shape[0]:
            raise ValueError(
                f"Ws[{i}] ({mats[i].shape}) must have as many columns as Ws[{i - 1}] has rows ({mats[i - 1].shape})"
            )
    out = [mats[-1]]
    for W in reversed(mats[:-1]):
        out.append(out[-1] @ W)
    return out[::-1]


# ---------------------------------------------------------------------------------------------------------------
# spectra


def singular_values(A) -> np.ndarray:
    """Singular values of a matrix, descending, float64 (all NaN if A is not finite)."""
    A = as_matrix(A, "A", "m", "n")
    if not _finite(A):
        return np.full(min(A.shape), math.nan)
    if A.size == 0:
        return np.zeros(0)
    c = _pow2(float(np.max(np.abs(A))))
    return np.linalg.svd(A / c, compute_uv=False) * c


def numerical_rank(A, rtol: float | None = None) -> int | float:
    """The number of singular values of A (m x n) above a cut-off.

    Default: above the spectral size of the rounding of A in its own dtype, ``10 eps (sqrt(m) + sqrt(n)) max|a_ij|``
    (a matrix of independent errors of size eps |a| has spectral norm ~ eps |a| (sqrt(m) + sqrt(n))), so a
    float32 d x N feature matrix keeps every direction its dtype resolves whatever N (NumPy's ``max(m, n) eps
    sigma_1`` would discard directions up to 0.6% of sigma_1 at N = 50,000). With ``rtol`` in [0, 1): above
    ``rtol * sigma_1`` (pass e.g. 1e-4 for solutions converged only to ~1e-8). 0 for 0; NaN (a float) if A is not
    finite."""
    shape = np.shape(A)
    rtol = _rtol(rtol, None)
    s = singular_values(A)
    if s.size and not np.isfinite(s[0]):
        return math.nan
    if s.size == 0 or s[0] == 0:
        return 0
    if rtol is None:
        cut = 10 * _eps_of(A) * (math.sqrt(shape[0]) + math.sqrt(shape[1])) * float(np.max(np.abs(np.asarray(A))))
    else:
        cut = rtol * s[0]
    return int(np.sum(s > cut))


def stable_rank(A) -> float:
    """Stable rank ||A||_F^2 / ||A||_2^2 (Rudelson & Vershynin 2007), in [1, rank A]; 0 for A = 0; NaN if A is
    not finite."""
    s = singular_values(A)
    if s.size and not np.isfinite(s[0]):
        return math.nan
    return float(np.sum((s / s[0]) ** 2)) if s.size and s[0] > 0 else 0.0


def _lam(x, name: str) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float, np.floating, np.integer)):
        raise TypeError(f"{name} must be a finite real number >= 0; got {x!r}")
    v = float(x)
    if not (math.isfinite(v) and v >= 0):
        raise ValueError(f"{name} must be a finite real number >= 0; got {x!r}")
    return v


def balancedness(W_prev, W_next, lam_prev: float = 1.0, lam_next: float = 1.0, *, diagonal: bool = False) -> float:
    """Relative imbalance of consecutive factors ``W_next @ s(W_prev @ ...)``:

        ||lam_next W_next^T W_next - lam_prev W_prev W_prev^T||_F / (||lam_next W_next^T W_next||_F
                                                                    + ||lam_prev W_prev W_prev^T||_F)

    in [0, 1], 0 for zero factors, NaN if a factor is not finite (``lam_*`` must be finite and >= 0). With weight
    decay this is exactly 0 at every stationary point of a linear network (the objective is invariant under
    W_prev -> G W_prev, W_next -> W_next G^-1; the derivative at G = I of the penalty must vanish; cf. Arora et
    al. 2018, Du et al. 2018). For the free features use ``W_prev = H`` and ``lam_prev = lam_H``. Across a ReLU
    only positive diagonal G are symmetries, so only the diagonals balance (per neuron: lam_prev
    ||row_j(W_prev)||^2 = lam_next ||col_j(W_next)||^2): use ``diagonal=True``, which compares the diagonals only."""
    Wp = as_matrix(W_prev, "W_prev", "d", "m")
    Wn = as_matrix(W_next, "W_next", "m_out", "d")
    lam_prev, lam_next = _lam(lam_prev, "lam_prev"), _lam(lam_next, "lam_next")
    if Wn.shape[1] != Wp.shape[0]:
        raise ValueError(f"W_next's columns must match W_prev's rows (d); got {Wn.shape} and {Wp.shape}")
    if not _finite(Wp, Wn):
        return math.nan
    c = _pow2(max(float(np.max(np.abs(Wp), initial=0.0)), float(np.max(np.abs(Wn), initial=0.0))))
    Wp, Wn = Wp / c, Wn / c
    if diagonal:
        X = lam_next * np.sum(Wn**2, axis=0)
        Y = lam_prev * np.sum(Wp**2, axis=1)
    else:
        X = lam_next * Wn.T @ Wn
        Y = lam_prev * Wp @ Wp.T
    den = np.linalg.norm(X) + np.linalg.norm(Y)
    return float(np.linalg.norm(X - Y) / den) if den > 0 else 0.0


# ---------------------------------------------------------------------------------------------------------------
# every feature metric from one pass


def feature_metrics(
    features, labels=None, num_classes: int | None = None, *, global_mean: str = "weighted", rtol: float | None = None
) -> dict:
    """Every feature-level metric from one `class_stats` pass, as a dict of Python floats: ``nc1``,
    ``nc1_trace_ratio``, ``cdnv``, ``nc2_etf``, ``nc2_orthogonal``, ``nc2_equinorm``, ``nc2_equiangularity``,
    ``nc2_max_angle``, ``nc2_uniformity`` (log kernel). ``features`` may be a `ClassStats`."""
    st = _stats(features, labels, num_classes)
    gm = global_mean
    return {
        "nc1": nc1(st, rtol=rtol, global_mean=gm),
        "nc1_trace_ratio": nc1_trace_ratio(st, global_mean=gm),
        "cdnv": cdnv(st),
        "nc2_etf": nc2_etf(st, global_mean=gm),
        "nc2_orthogonal": nc2_orthogonal(st),
        "nc2_equinorm": nc2_equinorm(st, global_mean=gm),
        "nc2_equiangularity": nc2_equiangularity(st, global_mean=gm),
        "nc2_max_angle": nc2_max_angle(st, global_mean=gm),
        "nc2_uniformity": nc2_uniformity(st, global_mean=gm),
    }
