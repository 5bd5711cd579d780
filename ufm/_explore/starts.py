"""The strategies of `explore`: where each local solve starts.

Every start is a `Job` holding NumPy float64 parameters and the name of the strategy that made it; `Strategist`
draws new starts in proportion to each strategy's prior weight plus its record of improving the best value.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from .._model import Params
from .._problem import UFM
from .._theory import construct, predict
from .minima import Ledger
from .structure import class_means

STRATEGIES = ("explicit", "random", "low-rank", "perturbed", "continuation", "truncate", "hop", "rank-hop", "gd")
"""The strategies `explore` knows, in the order the first round uses them."""

DEFAULT_STRATEGIES = ("explicit", "random", "low-rank", "perturbed", "continuation", "truncate", "hop", "rank-hop")
"""The strategies `explore` uses by default (large-step gradient descent, ``gd``, did not pay: benchmarks/README.md)."""

PRIOR_WEIGHTS = {
    "explicit": 0.0,
    "random": 4.0,
    "low-rank": 1.0,
    "perturbed": 1.0,
    "continuation": 1.0,
    "truncate": 4.0,
    "hop": 1.0,
    "rank-hop": 1.0,
    "gd": 1.0,
}
"""Relative frequency of each strategy among new starts before any of them has improved the best value (each
improvement adds 3; moves from found minima, `HOPS`, are at least half once a minimum exists). Measured:
benchmarks/README.md §5."""

HOPS = ("truncate", "hop", "rank-hop")
"""The strategies that start from a minimum already found."""

TRUNCATE_POOL = 16
"""``truncate`` starts from one of this many lowest minima, near-copies skipped (`Ledger.top` with spread 1e-3):
any basin can lead to a low-rank one, so the pool is kept diverse."""

RANDOM_SCALES = (0.5, 1.0, 2.0)
"""Scales of the random starts (`ufm.init_params` convention): none near the zero saddle."""

HOP_SIGMAS = (0.03, 0.1, 0.2, 0.5)
"""Relative noise of a hop around one of the best minima."""

GD_SCALE = 0.5
"""Scale of the random starts of a large-step gradient-descent phase (at lr 0.5, scale 2 starts diverge)."""


class Job(NamedTuple):
    """One local solve to run: its start, the strategy that made it and where it stands.

    Attributes:
      init: the start (`Params` of NumPy float64 arrays).
      strategy: the strategy that produced it.
      lam_factor: the weight decays are multiplied by this in the next solve (continuation's first stage), else 1.
      polish: how many times this run has been continued.
      new_start: True for a new start (counted in ``max_starts``), False for a continuation.
      gd: True when a large-step gradient-descent phase runs before L-BFGS.
    """

    init: Params
    strategy: str
    lam_factor: float = 1.0
    polish: int = 0
    new_start: bool = True
    gd: bool = False


def as_numpy(params: Params) -> Params:
    """A float64 NumPy copy (`Params` annotates its fields as jax.Array; the starts here hold NumPy arrays)."""
    f: Any = lambda x: np.asarray(x, np.float64)  # noqa: E731
    return Params(f(params.H), tuple(f(W) for W in params.Ws), None if params.b is None else f(params.b))


def random_start(problem: UFM, rng: np.random.Generator, scale: float) -> Params:
    """Gaussian start as `ufm.init_params`: H ~ N(0, scale²), W_l ~ N(0, scale²/d_l), b = 0."""
    hs, ws, bs = problem.param_shapes()
    H: Any = scale * rng.standard_normal(hs)
    Ws: tuple[Any, ...] = tuple(scale * rng.standard_normal(s) / np.sqrt(s[1]) for s in ws)
    b: Any = None if bs is None else np.zeros(bs)
    return Params(H, Ws, b)


def low_rank_start(problem: UFM, rng: np.random.Generator) -> tuple[Params, int]:
    """Class means of H of rank r, and the map W_{L-1} before the last ReLU of rank r, r in 1..K-1."""
    K, L = problem.K, problem.L
    r = int(rng.integers(1, K)) if K > 2 else 1
    p = random_start(problem, rng, 1.0)
    d1 = p.H.shape[0]
    C = rng.standard_normal((d1, r)) @ rng.standard_normal((r, K)) / np.sqrt(r)
    H = C[:, problem.labels()] + 0.01 * rng.standard_normal(p.H.shape)
    Ws = list(p.Ws)
    if L >= 2:
        W = Ws[L - 2]
        U = rng.standard_normal((W.shape[0], r))
        V = rng.standard_normal((r, W.shape[1]))
        Ws[L - 2] = U @ V / np.sqrt(r * W.shape[1])
    return Params(H, tuple(Ws), p.b), r


def perturb(params: Params, rng: np.random.Generator, sigma: float) -> Params:
    """Relative Gaussian noise: each leaf X -> X + sigma * ||X||_F / sqrt(size) * N(0, 1)."""

    def one(X):
        X = np.asarray(X, np.float64)
        nrm = np.linalg.norm(X) / np.sqrt(max(X.size, 1))
        nrm = nrm if nrm > 0 else 1.0
        return X + sigma * nrm * rng.standard_normal(X.shape)

    return Params(one(params.H), tuple(one(W) for W in params.Ws), None if params.b is None else one(params.b))


def rank_reduce(
    problem: UFM, params: Params, rng: np.random.Generator, layer: int | None = None, noise: float = 0.01
) -> Params:
    """Lower by one the rank of the class means of a pre-activation Z_l = W_{l-1} H_{l-1}, then add relative noise.

    With M_Z = U S Vᵀ the class means of Z_l and r their numerical rank (singular values above 1e-3 x the
    largest), W_{l-1} -> (I - u_r u_rᵀ) W_{l-1} removes the weakest direction u_r: the class means of Z_l become
    the rank r-1 truncation U_{r-1} S_{r-1} V_{r-1}ᵀ of M_Z (H_{l-1} is unchanged). Below-DNC minima of the deep
    ReLU UFM are low rank before the last ReLU (Súkeník et al. 2024); this hop moves a found minimum towards lower
    rank, and the local solve then finds the best point nearby.

    Args:
      problem: the `ufm.UFM` (L >= 2; for L = 1 only the noise is added).
      params: the point.
      rng: the NumPy generator.
      layer: l in 2..L (default: L with probability 1/2, else drawn in 2..L-1).
      noise: relative Gaussian noise added afterwards (`perturb`).

    Returns:
      The new point (NumPy float64); unchanged but for the noise where the rank is already <= 1.
    """
    L = problem.L
    p = as_numpy(params)
    if L < 2:
        return perturb(p, rng, noise)
    if layer is None:
        layer = L if (L == 2 or rng.random() < 0.5) else int(rng.integers(2, L))
    if not 2 <= layer <= L:
        raise ValueError(f"layer must be in 2..L = 2..{L}; got {layer!r}")
    _, MZ = class_means(problem, p)
    U, S, _ = np.linalg.svd(MZ[layer - 2], full_matrices=False)
    r = int(np.sum(S > 1e-3 * S[0])) if S.size and S[0] > 0 else 0
    Ws = list(p.Ws)
    if r >= 2:
        u = U[:, r - 1 : r]
        Ws[layer - 2] = Ws[layer - 2] - u @ (u.T @ Ws[layer - 2])
    out = Params(p.H, tuple(Ws), p.b)
    return perturb(out, rng, noise) if noise > 0 else out


def truncate(problem: UFM, params: Params, rank: int, rng: np.random.Generator, noise: float = 0.01) -> Params:
    """Project every pre-activation's class means onto its top ``rank`` directions, then add relative noise.

    For l = 2..L in turn (each with the layers before it already projected), with U_r the top ``rank`` left
    singular vectors of the class means of Z_l = W_{l-1} H_{l-1}: W_{l-1} -> U_r U_rᵀ W_{l-1}. The class means of
    every Z_l then have rank <= ``rank``. Below-DNC minima of the deep ReLU UFM have low rank in every layer before
    the last ReLU (at K = 6, L = 4 the best known are rank 3 at Z_2, Z_3, Z_4); a local solve from the projection
    of any minimum, even a poor one, lands in such a basin far more often than a random start or a small hop
    (measured: benchmarks/README.md §5).

    Args:
      problem: the `ufm.UFM` (for L = 1 only the noise is added).
      params: the point (a minimum found).
      rank: r >= 1.
      rng: the NumPy generator.
      noise: relative Gaussian noise added afterwards (`perturb`).

    Returns:
      The new point (NumPy float64).
    """
    p = as_numpy(params)
    Ws = list(p.Ws)
    for l in range(2, problem.L + 1):
        _, MZ = class_means(problem, Params(p.H, tuple(Ws), p.b))
        U = np.linalg.svd(MZ[l - 2], full_matrices=False)[0][:, :rank]
        Ws[l - 2] = U @ (U.T @ Ws[l - 2])
    out = Params(p.H, tuple(Ws), p.b)
    return perturb(out, rng, noise) if noise > 0 else out


def truncate_rank(problem: UFM, ledger: Ledger, rng: np.random.Generator) -> int:
    """The rank of a ``truncate`` start: half the time the rank before the last ReLU of the best minimum (when
    below K), else drawn in 2..K-1 (1 when K = 2)."""
    K = problem.K
    best = ledger.top(1)
    if best and best[0].ranks_Z and 1 <= best[0].ranks_Z[-1] < K and rng.random() < 0.5:
        return int(best[0].ranks_Z[-1])
    return int(rng.integers(2, K)) if K > 2 else 1


def explicit_candidates(problem: UFM, dtype) -> dict[str, Params]:
    """The explicit points of `ufm.construct`: DNC and SRG (deep ReLU), or the predicted candidate."""
    out = {}
    configs: Sequence[str | None] = ("dnc", "srg") if (problem.activation == "relu" and problem.L >= 2) else (None,)
    for c in configs:
        try:
            pr = predict(problem, c)
            if c is not None and pr.configuration != c:
                continue
            if np.isfinite(pr.loss):
                out[c or "predicted"] = construct(problem, c, dtype=dtype)
        except ValueError:
            continue
    return out


class Strategist:
    """Draws new starts: which strategies, in what proportion, and each start itself.

    Weights: `PRIOR_WEIGHTS` + 3 x (how often a strategy lowered the best value, from the `Ledger`); the moves from
    found minima (`HOPS` together) are at least half once a minimum exists; the first round uses every strategy
    once.
    """

    def __init__(self, problem: UFM, strategies: Sequence[str], explicit: dict, rng: np.random.Generator):
        self.problem, self.strategies, self.explicit, self.rng = problem, tuple(strategies), explicit, rng

    def available(self, ledger: Ledger) -> list[str]:
        """The strategies that can draw a start now (hops need a minimum, perturbed an explicit point)."""
        return [
            s
            for s in self.strategies
            if s != "explicit" and (s not in HOPS or ledger.minima) and (s != "perturbed" or self.explicit)
        ]

    def pick(self, n: int, ledger: Ledger, first: bool) -> list[str]:
        """Strategy names of ``n`` new starts."""
        others = self.available(ledger)
        if not others or n <= 0:
            return []
        w = np.array([PRIOR_WEIGHTS[s] + 3.0 * ledger.stats[s]["wins"] for s in others])
        hops = [i for i, s in enumerate(others) if s in HOPS]
        if hops and w[hops].sum() < 0.5 * w.sum():
            w[hops] *= (w.sum() - w[hops].sum()) / w[hops].sum()
        head = others[:n] if first else []  # every strategy once in the first round
        return head + [str(s) for s in self.rng.choice(others, size=n - len(head), p=w / w.sum())]

    def job(self, s: str, ledger: Ledger) -> Job:
        """A new start of strategy ``s``."""
        rng, problem = self.rng, self.problem
        if s == "random":
            return Job(random_start(problem, rng, float(rng.choice(RANDOM_SCALES))), s)
        if s == "low-rank":
            return Job(low_rank_start(problem, rng)[0], s)
        if s == "perturbed" and self.explicit:
            base = list(self.explicit.values())[int(rng.integers(len(self.explicit)))]
            return Job(perturb(as_numpy(base), rng, float(rng.choice([0.1, 0.3, 0.5]))), s)
        if s == "continuation":
            return Job(random_start(problem, rng, 1.0), s, lam_factor=float(rng.choice([2.0, 4.0])))
        if s == "truncate" and ledger.minima:
            pool = ledger.top(TRUNCATE_POOL, spread=1e-3)
            base = pool[int(rng.integers(len(pool)))].params
            return Job(truncate(problem, base, truncate_rank(problem, ledger, rng), rng), s)
        if s in ("hop", "rank-hop") and ledger.minima:
            top = ledger.top(3)
            base = top[int(rng.integers(len(top)))].params
            if s == "hop":
                return Job(perturb(as_numpy(base), rng, float(rng.choice(HOP_SIGMAS))), s)
            return Job(rank_reduce(problem, base, rng), s)
        if s == "gd":
            return Job(random_start(problem, rng, GD_SCALE), s, gd=True)
        return Job(random_start(problem, rng, 1.0), "random" if "random" in self.strategies else s)
