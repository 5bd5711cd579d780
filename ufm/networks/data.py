"""Datasets for ``ufm.networks``: samples as columns (``X`` is p x N), stored class-major.

`load_digits` (scikit-learn's digits, ``pip install ufm[networks]``), `gaussian_mixture` (no extra dependency),
`as_dataset` (any N x p array in the scikit-learn layout), `coarsen` (superclasses, the fine labels kept) and
`split` (a seeded per-class train/test split).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
from numpy.typing import ArrayLike, DTypeLike

from ._args import positive_int

__all__ = ["Dataset", "as_dataset", "load_digits", "gaussian_mixture", "coarsen", "split", "check_dataset"]


class Dataset(NamedTuple):
    """A labelled dataset, samples as **columns**, stored class-major.

    Attributes:
      X: p x N inputs (float).
      y: (N,) integer labels in [0, K), non-decreasing (class-major, as ``ufm.UFM.labels()``).
      num_classes: K.
      fine: (N,) the original (fine) labels when ``y`` are superclasses (see `coarsen`), else None.
      name: a label for plots.
    """

    X: np.ndarray
    y: np.ndarray
    num_classes: int
    fine: np.ndarray | None = None
    name: str = ""

    @property
    def N(self) -> int:
        return int(self.X.shape[1])

    @property
    def p(self) -> int:
        return int(self.X.shape[0])

    @property
    def class_sizes(self) -> tuple[int, ...]:
        return tuple(int(c) for c in np.bincount(self.y, minlength=self.num_classes))


def as_dataset(X: ArrayLike, y: ArrayLike, *, fine: ArrayLike | None = None, name: str = "") -> Dataset:
    """A `Dataset` from arrays in the scikit-learn layout: ``X`` is N x p (**one sample per row**), ``y`` (N,).

    The result stores X transposed (p x N) and sorted class-major (stably by ``y``, then by ``fine``). Labels must
    be the integers 0..K-1, each present at least once.
    """
    X = np.asarray(X)
    y = np.asarray(y)
    if X.ndim != 2 or not np.issubdtype(X.dtype, np.number):
        raise ValueError(f"X must be a numeric N x p array (one sample per row); got shape {X.shape}, dtype {X.dtype}")
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise TypeError(f"y must be a 1-D integer array of N labels; got shape {y.shape}, dtype {y.dtype}")
    if y.shape[0] != X.shape[0]:
        raise ValueError(
            f"y must have N = {X.shape[0]} labels (the rows of X: samples are rows here); got {y.shape[0]}"
        )
    if not np.all(np.isfinite(X)):
        raise ValueError("X must be finite")
    K = int(y.max()) + 1 if y.size else 0
    if y.size == 0 or y.min() < 0 or K < 2 or np.any(np.bincount(y, minlength=K) == 0):
        raise ValueError(f"y must use every label 0..K-1 with K >= 2; got the labels {np.unique(y).tolist()}")
    if fine is not None:
        fine = np.asarray(fine)
        if fine.shape != y.shape or not np.issubdtype(fine.dtype, np.integer):
            raise ValueError(f"fine must be N = {y.shape[0]} integer labels; got shape {fine.shape}")
        order = np.lexsort((fine, y))
        fine = fine[order].astype(np.int64)
    else:
        order = np.argsort(y, kind="stable")
    if not np.issubdtype(X.dtype, np.floating):
        X = X.astype(np.float64)
    return Dataset(np.ascontiguousarray(X[order].T), y[order].astype(np.int64), K, fine, name)


def check_dataset(data: Any, name: str = "data") -> Dataset:
    """``data`` if it is a class-major `Dataset`, else a TypeError/ValueError naming ``name``."""
    if not isinstance(data, Dataset):
        raise TypeError(
            f"{name} must be a ufm.networks.Dataset (see as_dataset, load_digits); got {type(data).__name__}"
        )
    if data.X.ndim != 2 or data.y.shape != (data.X.shape[1],):
        raise ValueError(f"{name}.X must be p x N and {name}.y (N,); got {data.X.shape} and {data.y.shape}")
    if np.any(np.diff(data.y) < 0):
        raise ValueError(f"{name}.y must be class-major (non-decreasing); build datasets with as_dataset")
    return data


def _subsample(X, y, n_per_class, seed, name):
    if n_per_class is None:
        return X, y
    n = positive_int("n_per_class", n_per_class, "samples kept per class")
    rng = np.random.default_rng(seed)
    keep = []
    for k in range(int(y.max()) + 1):
        idx = np.flatnonzero(y == k)
        if n > idx.size:
            raise ValueError(f"n_per_class must be <= {idx.size} (the smallest class of {name} has that many); got {n}")
        keep.append(np.sort(rng.choice(idx, n, replace=False)))
    keep = np.concatenate(keep)
    return X[keep], y[keep]


def load_digits(n_per_class: int | None = None, *, seed: int = 0, dtype: DTypeLike = np.float64) -> Dataset:
    """scikit-learn's handwritten digits (8x8 images, K = 10, p = 64, 1797 samples; ships inside scikit-learn).

    Pixels are scaled to [0, 1] (divided by 16). ``n_per_class`` keeps a random balanced subset (seeded), so that
    the balanced UFM closed forms apply; ``None`` keeps all (class sizes 174..183).

    Raises ImportError naming the extra to install when scikit-learn is missing.
    """
    try:
        from sklearn.datasets import load_digits as _sk_load_digits
    except ImportError as e:
        raise ImportError(
            "ufm.networks.load_digits needs scikit-learn (the digits ship inside it): pip install 'ufm[networks]' "
            "(or pip install scikit-learn); gaussian_mixture needs no extra dependency"
        ) from e
    d = _sk_load_digits()
    X, y = _subsample(d.data / 16.0, d.target.astype(np.int64), n_per_class, seed, "digits")
    return as_dataset(X.astype(dtype), y, name="digits")


def gaussian_mixture(
    num_classes: int,
    n_per_class: int,
    dim: int,
    *,
    separation: float = 4.0,
    noise: float = 1.0,
    seed: int = 0,
    dtype: DTypeLike = np.float64,
) -> Dataset:
    """A synthetic Gaussian mixture: class k has mean mu_k = separation * g_k / ||g_k|| (g_k ~ N(0, I_p), so
    ||mu_k|| = separation and the means are nearly orthogonal for p >> K) and samples mu_k + noise * N(0, I_p)."""
    K = positive_int("num_classes", num_classes, "K", 2)
    n = positive_int("n_per_class", n_per_class, "n")
    p = positive_int("dim", dim, "p, the input dimension")
    if not (np.isfinite(separation) and separation > 0 and np.isfinite(noise) and noise >= 0):
        raise ValueError(f"separation must be > 0 and noise >= 0; got {separation!r}, {noise!r}")
    rng = np.random.default_rng(seed)
    G = rng.standard_normal((K, p))
    mu = separation * G / np.linalg.norm(G, axis=1, keepdims=True)
    y = np.repeat(np.arange(K), n)
    X = mu[y] + noise * rng.standard_normal((K * n, p))
    return as_dataset(X.astype(dtype), y, name=f"gaussian mixture K={K}")


def coarsen(data: Dataset, groups: ArrayLike) -> Dataset:
    """Merge classes into superclasses: the new label of a sample of class k is ``groups[k]``; the old labels are
    kept in ``fine``. E.g. ``groups = np.arange(10) // 2`` merges the digits into 5 superclasses {0,1}, {2,3}, ...
    """
    data = check_dataset(data)
    g = np.asarray(groups)
    if g.shape != (data.num_classes,) or not np.issubdtype(g.dtype, np.integer):
        raise ValueError(
            f"groups must map each of the K = {data.num_classes} classes to a superclass (shape (K,), "
            f"integers); got shape {g.shape}"
        )
    return as_dataset(data.X.T, g[data.y], fine=data.y, name=f"{data.name} coarse")


def split(data: Dataset, test_per_class: int, *, seed: int = 0) -> tuple[Dataset, Dataset]:
    """Random train/test split with ``test_per_class`` test samples from every class (seeded); both class-major."""
    data = check_dataset(data)
    t = positive_int("test_per_class", test_per_class, "test samples per class")
    rng = np.random.default_rng(seed)
    test = np.zeros(data.N, bool)
    for k in range(data.num_classes):
        idx = np.flatnonzero(data.y == k)
        if t >= idx.size:
            raise ValueError(f"test_per_class must be < {idx.size} (class {k} has {idx.size} samples); got {t}")
        test[rng.choice(idx, t, replace=False)] = True

    def part(mask, suffix):
        f = None if data.fine is None else data.fine[mask]
        return Dataset(data.X[:, mask], data.y[mask], data.num_classes, f, f"{data.name} {suffix}")

    return part(~test, "train"), part(test, "test")
