"""One round of `explore`: a fixed-size batch of starts through one compiled `ufm.solve_batch` program.

Every round has the same batch size B, step count and shapes, so the whole search compiles the L-BFGS program
once (and the large-step gradient-descent program once, if that strategy is used); a short batch is padded with
copies of its first start, whose results are discarded.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np

from .._model import Params
from .._problem import UFM
from .._solver import solve_batch
from .starts import Job

GD_LR = 0.5
"""Learning rate of the large-step gradient-descent phase (Súkeník et al. 2024 train their deep UFMs at lr 0.5)."""


class Endpoint(NamedTuple):
    """Where one run of a round ended: its point (NumPy, in the solve dtype), value, solver status and gradient norm."""

    params: Params
    value: float
    status: int
    grad_norm: float


def stack(jobs: list[Job], B: int, dtype) -> Params:
    """The starts of ``jobs`` padded to B (copies of the first) as one batched `Params` of ``dtype``."""
    padded = jobs + [jobs[0]] * (B - len(jobs))
    b0 = padded[0].init.b
    return Params(
        jnp.asarray(np.stack([j.init.H for j in padded]), dtype),
        tuple(jnp.asarray(np.stack([j.init.Ws[i] for j in padded]), dtype) for i in range(len(padded[0].init.Ws))),
        None if b0 is None else jnp.asarray(np.stack([np.asarray(j.init.b) for j in padded]), dtype),
    )


def unstack(sols, n: int) -> list[Endpoint]:
    """The first n runs of a batched `Solution` as `Endpoint`s."""
    prm = sols.params
    H = np.asarray(prm.H)  # one transfer per leaf, then NumPy slices (in the solve dtype)
    Ws = [np.asarray(W) for W in prm.Ws]
    b = None if prm.b is None else np.asarray(prm.b)
    values = np.asarray(sols.value, np.float64)
    status = np.asarray(sols.status)
    gnorm = np.asarray(sols.grad_norm, np.float64)
    out = []
    f: Any = np.array  # NumPy arrays in Params (see starts.as_numpy)
    for i in range(n):
        p = Params(f(H[i]), tuple(f(W[i]) for W in Ws), None if b is None else f(b[i]))
        out.append(Endpoint(p, float(values[i]), int(status[i]), float(gnorm[i])))
    return out


def lbfgs_round(problem: UFM, jobs: list[Job], B: int, steps: int, dtype) -> list[Endpoint]:
    """``steps`` L-BFGS steps from each job's start, at the job's weight decays (λ x ``lam_factor``)."""
    L = problem.L
    lam_W0 = np.broadcast_to(np.asarray(problem.lam_W, np.float64), (L,))
    fac = np.array([j.lam_factor for j in jobs] + [jobs[0].lam_factor] * (B - len(jobs)))
    sols = solve_batch(
        problem,
        init=stack(jobs, B, dtype),
        lam_H=float(np.asarray(problem.lam_H)) * fac,
        lam_W=fac[:, None] * lam_W0[None, :],
        lam_b=float(np.asarray(problem.lam_b)) * fac,
        max_steps=int(steps),
        history=False,
        polish=False,  # short screening rounds: explore polishes its lowest minima itself (`polish_top`)
    )
    return unstack(sols, len(jobs))


def gd_round(problem: UFM, jobs: list[Job], B: int, steps: int, dtype) -> list[Endpoint]:
    """``steps`` steps of full-batch gradient descent at lr `GD_LR` from each job's start (a batch of B)."""
    sols = solve_batch(
        problem, init=stack(jobs, B, dtype), method="gd", lr=GD_LR, max_steps=int(steps), history=False, polish=False
    )
    return unstack(sols, len(jobs))
