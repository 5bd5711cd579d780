"""The result of a solve: an immutable pytree that speaks SciPy (``success``, ``message``)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import numpy as np

from ._model import Params

# status codes, decided once at the end of the loop
CONVERGED = 0
MAX_STEPS = 1
NONFINITE_INIT = 2
DIVERGED = 3
STALLED = 4
ZERO_SADDLE = 5
INTERRUPTED = 6
PRECISION_FLOOR = 7
RUNNING = -1

STATUS_NAMES = {
    CONVERGED: "converged",
    MAX_STEPS: "max_steps",
    NONFINITE_INIT: "nonfinite_init",
    DIVERGED: "diverged",
    STALLED: "stalled",
    ZERO_SADDLE: "zero_saddle",
    INTERRUPTED: "interrupted",
    PRECISION_FLOOR: "precision_floor",
    RUNNING: "running",
}

MESSAGES = {
    CONVERGED: "Converged: a point where 0 is in the (Clarke) subdifferential to tolerance: rel_grad = ||grad f|| / "
    "(||grad fit|| + ||grad reg||) <= rtol (or ||grad f|| <= tol when tol was given); at ReLU kinks the gradient is "
    "the kink-aware one (the smallest over the ReLU slopes in [0, 1] at the pre-activations at 0).",
    MAX_STEPS: "Stopped at max_steps before the gradient norm reached tol: raise max_steps, raise lr, "
    "or use method='lbfgs' (much faster to high precision).",
    NONFINITE_INIT: "The initial loss or gradient is not finite: check the init parameters, init_scale and lambdas.",
    DIVERGED: "Diverged: the loss became non-finite or grew above 1e4 * max(1, initial loss). "
    "The learning rate is too large for this problem: lower lr (or init_scale).",
    STALLED: "Stalled: neither the loss nor the gradient norm improved for `patience` steps while the gradient "
    "norm was above tolerance. Either this is the precision floor of the dtype (use float64 via jax_enable_x64, or a "
    "looser tol), or the point is non-smooth: ReLU pre-activations sitting exactly at 0, where the gradient need not "
    "vanish and the kink polish (polish=True, the default for deep ReLU) did not reach a kink-aware stationary point "
    "either; judge such runs with ufm.check, or restart from another key.",
    ZERO_SADDLE: "At the zero saddle: the run ended at (numerically) zero parameters, a stationary point that is "
    "not the minimum of this problem; increase init_scale.",
    INTERRUPTED: "Interrupted (SIGINT): the solution is the point reached when the run was stopped.",
    PRECISION_FLOOR: "Stalled at the precision floor: the dtype cannot resolve this point (rel_grad is small but "
    "above rtol and rounding stops progress). In float32 use float64 (jax_enable_x64); in float64 pass a looser rtol.",
    RUNNING: "Running.",
}


class History(NamedTuple):
    """Per-step traces, recorded every ``history_every`` steps: entry j is step ``j * history_every``
    (entry 0 is the initial point). Entries after the last step are NaN."""

    loss: jax.Array
    grad_norm: jax.Array


class Snapshots(NamedTuple):
    """Parameters saved every ``snapshot_every`` steps: ``params`` has a leading snapshot axis;
    ``step[j]`` is the step of snapshot j, or -1 for an unused slot."""

    step: jax.Array
    params: Params


class Solution(NamedTuple):
    """Result of `ufm.solve` (fields gain a leading batch axis from `ufm.solve_batch`).

    Attributes:
      params: the final `Params` (H, Ws, b).
      value: the objective f at ``params``.
      grad_norm: ||grad f(params)||_2, the Euclidean norm over all parameters (after an accepted kink polish, the
        norm of the kink-aware gradient: ReLU slopes in [0, 1] at the pre-activations at 0, see `ufm.solve`).
      num_steps: optimiser steps taken.
      status: int code (0 converged, 1 max_steps, 2 non-finite init, 3 diverged, 4 stalled, 5 at the zero
        saddle, 6 interrupted, 7 precision floor of the dtype); see ``message`` for what to do next.
      history: `History` of loss and gradient norm, or None.
      snapshots: `Snapshots`, or None.
      rel_grad: the scale-aware stationarity ||grad f|| / (||grad fit|| + ||grad reg||) at ``params`` (kink-aware
        after a kink polish), or None for a solution built elsewhere.
      polish_steps: L-BFGS steps spent by the kink polish (`ufm._kinks`, all its subproblems, whether or not the
        polished point was kept), or None when no polish ran. ``num_steps`` counts the optimiser's steps only (the
        ones the history records); the total work is ``num_steps + polish_steps``.
    """

    params: Params
    value: jax.Array
    grad_norm: jax.Array
    num_steps: jax.Array
    status: jax.Array
    history: History | None = None
    snapshots: Snapshots | None = None
    rel_grad: jax.Array | None = None
    polish_steps: jax.Array | None = None

    @property
    def success(self):
        """True where ``status == 0`` (a bool, or a bool array for a batch)."""
        s = np.asarray(self.status)
        return bool(s == CONVERGED) if s.ndim == 0 else s == CONVERGED

    @property
    def status_name(self):
        s = np.asarray(self.status)
        if s.ndim == 0:
            return STATUS_NAMES[int(s)]
        return np.vectorize(lambda c: STATUS_NAMES[int(c)])(s)

    @property
    def message(self):
        """Human-readable outcome with the next thing to try (a list for a batch)."""
        s = np.asarray(self.status)
        if s.ndim == 0:
            return MESSAGES[int(s)]
        return [MESSAGES[int(c)] for c in s.ravel()]

    def take(self, i) -> Solution:
        """Run(s) ``i`` of a batched solution: ``sols.take(3)`` is the 4th run, ``sols.take(mask)`` a subset."""
        return jax.tree_util.tree_map(lambda x: x[i], self)

    @property
    def batch_size(self) -> int | None:
        s = np.shape(self.status)
        return s[0] if len(s) else None
