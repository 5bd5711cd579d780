"""The rotation-invariant structure of a point: per-layer class-mean ranks, Gram spectra and a description."""

from __future__ import annotations

import numpy as np

from .. import metrics as _metrics
from .._model import Params
from .._problem import UFM

RANK_RTOL = 1e-3
"""Relative singular-value threshold of the numerical ranks reported per layer (solutions polished by a few
thousand L-BFGS steps at ReLU kinks are accurate to ~1e-6 relative, so 1e-3 separates true zeros robustly)."""


def class_means(problem: UFM, params: Params) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The class means of every layer, in float64 NumPy (a NumPy forward pass: `ufm.forward`'s layers).

    Returns:
      (Ms, MZs): Ms[l-1] is the d_l x K matrix M_l of class means of H_l (l = 1..L, H_1 = H,
      H_{l+1} = s(W_l H_l)); MZs[l-2] the class means of the pre-activations Z_l = W_{l-1} H_{l-1}, l = 2..L.
    """
    y = np.asarray(problem.labels())
    K = problem.K
    onehot = (y[None, :] == np.arange(K)[:, None]).astype(np.float64)  # K x N
    avg = onehot.T / onehot.sum(axis=1)  # N x K: column k averages class k
    relu = problem.activation == "relu"
    h = np.asarray(params.H, np.float64)
    Ms, MZ = [h @ avg], []
    for W in params.Ws[:-1]:
        z = np.asarray(W, np.float64) @ h
        MZ.append(z @ avg)
        h = np.maximum(z, 0.0) if relu else z
        Ms.append(h @ avg)
    return Ms, MZ


def structure(problem: UFM, params: Params, rank_rtol: float = RANK_RTOL) -> dict:
    """Rotation-invariant structure of a point: per-layer class-mean ranks and Gram spectra, and a description.

    With M_l the d_l x K class means of H_l (H_1 = H, H_{l+1} = s(W_l H_l)), the Gram M_lᵀ M_l is invariant under
    H_l -> R H_l for orthogonal R, so its spectrum identifies a point up to the symmetries of the objective and
    permutations of the classes.

    Args:
      problem: the `ufm.UFM`.
      params: the point (`ufm.Params`).
      rank_rtol: singular values below ``rank_rtol`` x the largest count as zero.

    Returns:
      {"ranks": (rank M_1..M_L), "ranks_Z": (rank of the class means of Z_2..Z_L), "gram_spectra": (K eigenvalues
      per layer, descending), "description": str}.
    """
    Ms, MZ = class_means(problem, params)
    ranks = tuple(_metrics.numerical_rank(M, rank_rtol) for M in Ms)
    ranks_Z = tuple(_metrics.numerical_rank(M, rank_rtol) for M in MZ)
    spectra = tuple(np.sort(np.linalg.eigvalsh(M.T @ M))[::-1] for M in Ms)
    return {
        "ranks": ranks,
        "ranks_Z": ranks_Z,
        "gram_spectra": spectra,
        "description": describe(problem, Ms, ranks, ranks_Z),
    }


def describe(problem: UFM, Ms, ranks, ranks_Z) -> str:
    """The structure in words: the rank before the last ReLU, the class-mean ranks, and the last layer's Gram
    (orthogonal frame, simplex ETF, a graph's adjacency when it has two off-diagonal values, else asymmetric)."""
    L = problem.L
    parts = []
    ML = Ms[-1]
    if np.linalg.norm(ML) == 0:
        return "zero solution (H_L = 0)"
    if problem.activation == "relu" and L >= 2:
        parts.append(f"rank {ranks_Z[-1]} before the last ReLU (Z_{L})")
    parts.append("class-mean ranks of H_1..H_L: " + ",".join(map(str, ranks)))
    if _metrics.orthogonal_frame_distance(ML) < 1e-3:
        parts.append(f"H_{L} means an orthogonal frame (DNC)")
    elif _metrics.etf_distance(ML) < 1e-3:
        parts.append(f"H_{L} means a simplex ETF")
    else:
        parts.append(describe_gram(ML.T @ ML, L))
    return "; ".join(parts)


def describe_gram(G: np.ndarray, L: int) -> str:
    """A K x K class-mean Gram in words: ∝ I + a few off-diagonal values (and the regular graph they draw)."""
    K = G.shape[0]
    G = G / np.mean(np.diag(G)) if np.mean(np.diag(G)) > 0 else G
    off = np.sort(G[~np.eye(K, dtype=bool)])
    groups = cluster(off, 2e-2)
    diag_cv = float(np.std(np.diag(G)) / max(float(np.mean(np.diag(G))), 1e-300))
    if len(groups) <= 3 and diag_cv < 2e-2:
        vals = ", ".join(f"{v:.3g}" for v in groups)
        desc = f"Gram of H_{L} means ∝ I + off-diagonal values {{{vals}}}"
        if len(groups) == 2:
            hi = (G > 0.5 * (groups[0] + groups[1])) & ~np.eye(K, dtype=bool)
            deg = hi.sum(axis=1)
            if np.all(deg == deg[0]):
                desc += f" (a {int(deg[0])}-regular graph's adjacency on the larger value)"
        return desc
    return f"H_{L} means asymmetric ({len(groups)} distinct Gram entries)"


def cluster(x: np.ndarray, tol: float) -> list[float]:
    """Group sorted values that differ by less than tol (absolute, on a Gram normalised to unit diagonal)."""
    if x.size == 0:
        return []
    groups, start = [], 0
    for i in range(1, x.size + 1):
        if i == x.size or x[i] - x[i - 1] > tol:
            groups.append(float(np.mean(x[start:i])))
            start = i
    return groups
