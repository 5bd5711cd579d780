"""Solver options: the ONE validator, with every default written once (used by `ufm.solve`, `ufm.solve_batch`,
the command line and sweeps).

Stopping rule (scale-aware stationarity, THEORY/ANCHORS shared definition). With f = F + R, F the fit and R the
regulariser (`ufm.objective_parts`),

    rel_grad(theta) = ||grad f(theta)|| / (||grad F(theta)|| + ||grad R(theta)||),   0 when the denominator is 0.

At a stationary point grad F = -grad R, so rel_grad measures how well the two forces cancel, independently of the
lambdas and of the loss scale (an absolute gradient tolerance does not: the gradient scales with lambda). A run is
"converged" when ``rel_grad <= rtol`` or, when the user gives one, ``||grad f|| <= tol``. Rounding bounds rel_grad
below by about c * eps(dtype); the default ``rtol`` sits above the floor a line-search method reaches in each dtype
(measured: `DEFAULT_RTOL`).
"""

from __future__ import annotations

import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ._problem import is_concrete

METHODS = ("lbfgs", "gd", "momentum", "adam")
LBFGS_LINESEARCH = "trial"  # line search of method "lbfgs": "trial" (ufm._linesearch) or "zoom" (optax)
DEFAULT_LR = {"gd": 0.1, "momentum": 0.1, "adam": 1e-3, "lbfgs": 1.0}
DEFAULT_MAX_STEPS = {"lbfgs": 10_000, "gd": 100_000, "momentum": 100_000, "adam": 100_000}
DEFAULT_PATIENCE = {"lbfgs": 50, "gd": 1000, "momentum": 1000, "adam": 1000}
# relative stationarity tolerance by dtype (see the module docstring): a line search that compares loss values
# stalls near sqrt(eps) (float64 1.5e-8, float32 3.5e-4), so the float64 default sits a factor ~7 above it (1e-8
# left the default `ufm solve` stalled at rel_grad 1.5e-8 with its loss equal to the DNC optimum to 1e-12); near a
# minimum the relative loss gap is ~0.3-2 x rel_grad^2 (measured for `ufm.check`), i.e. <= 2e-14 at 1e-7.
DEFAULT_RTOL = {"float64": 1e-7, "float32": 1e-4}
# below this rel_grad a stalled run is at the precision floor of its dtype ("the dtype cannot resolve this point")
RESOLVE_FLOOR = {"float64": 1e-6, "float32": 1e-2}
MEMORY_LIMIT_BYTES = 2 * 1024**3  # history + snapshots preallocated by one solve (refused above, with the estimate)
DIVERGENCE_FACTOR = 1e4
DEFAULT_INIT_SCALE = "auto"  # `auto_init_scale`: the measured rule per model family and depth


class SolverOptions(NamedTuple):
    """Validated solver options with every default resolved (see `solver_options`)."""

    method: Any
    lr: Any
    max_steps: int
    tol: Any
    rtol: Any
    patience: int
    history_every: int
    snapshot_every: int | None
    momentum: float
    memory_size: int
    dtype: Any


def check_dtype(dtype) -> np.dtype:
    """The solve dtype: float32 or float64 (None: JAX's default float). Raises TypeError/ValueError naming ``dtype``.

    float16/bfloat16 are refused: their eps (1e-3, 8e-3) cannot resolve a UFM optimum (the regulariser alone
    spans many orders of magnitude at the lambdas of interest)."""
    if dtype is None:
        return jnp.dtype(jnp.result_type(float))
    try:
        dt = jnp.dtype(dtype)
    except TypeError as e:
        raise TypeError(f"dtype must be a floating dtype, 'float32' or 'float64'; got {dtype!r}") from e
    if not jnp.issubdtype(dt, jnp.floating):
        raise TypeError(f"dtype must be a floating dtype, 'float32' or 'float64'; got {dtype!r}")
    if dt not in (jnp.float32, jnp.float64):
        raise TypeError(
            f"dtype must be a floating dtype, 'float32' or 'float64' (half precision cannot resolve a "
            f"UFM optimum); got {dtype!r}"
        )
    if dt == jnp.float64 and not jax.config.jax_enable_x64:  # type: ignore[attr-defined]  # set on jax's Config at runtime; its stub omits it
        raise ValueError("dtype='float64' needs jax.config.update('jax_enable_x64', True) before any JAX call")
    return dt


def default_tol(dtype) -> float:
    """The default ABSOLUTE gradient-norm tolerance: 0.0 (off), in every dtype; the default stopping test is the
    relative one, ``rel_grad <= default_rtol(dtype)`` (module docstring). Kept for callers that store a tol."""
    del dtype
    return 0.0


def default_rtol(dtype) -> float:
    """The default relative stationarity tolerance: 1e-7 in float64, 1e-4 in float32 (`DEFAULT_RTOL`)."""
    return DEFAULT_RTOL["float64" if jnp.dtype(dtype) == jnp.float64 else "float32"]


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _tolerance(name: str, v, what: str):
    if not is_concrete(v):
        return v
    try:
        a = np.asarray(v, dtype=float)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number ({what}); got {v!r}") from None
    if a.ndim or not np.isfinite(a) or a < 0:
        raise ValueError(f"{name} must be a finite scalar {what} >= 0; got {v!r}")
    return v


def method_key(method) -> str:
    """The defaults' key of a method: its name, or "adam" for a user's optax transformation."""
    return method if isinstance(method, str) else "adam"


def solver_options(
    method="lbfgs",
    lr=None,
    max_steps=None,
    tol=None,
    patience=None,
    history_every=1,
    snapshot_every=None,
    dtype=None,
    *,
    rtol=None,
    momentum=0.9,
    memory_size=10,
) -> SolverOptions:
    """Validate solver options and resolve their defaults (before any compute).

    Args:
      method: one of `METHODS` or an `optax.GradientTransformation` (any ``GradientTransformationExtraArgs``
        such as ``optax.lbfgs()`` included).
      lr: learning rate > 0 (default `DEFAULT_LR` by method), a scalar or, in `solve_batch`, a (B,) array.
      max_steps: positive step budget (default `DEFAULT_MAX_STEPS`).
      tol: absolute tolerance on ||grad f||_2 (default 0: only the relative test).
      patience: steps without improvement before "stalled" (default `DEFAULT_PATIENCE`).
      history_every, snapshot_every: recording strides (positive integers; snapshot_every may be None).
      dtype: float32 or float64 (`check_dtype`).
      rtol: relative stationarity tolerance (default `default_rtol`).
      momentum: heavy-ball coefficient in [0, 1).
      memory_size: L-BFGS memory, a positive integer.

    Returns:
      `SolverOptions`. Raises ValueError/TypeError naming the argument.
    """
    dt = check_dtype(dtype)
    if isinstance(method, str):
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS} or an optax.GradientTransformation; got {method!r}")
    elif not isinstance(method, optax.GradientTransformation):
        raise TypeError(f"method must be a string in {METHODS} or an optax.GradientTransformation; got {method!r}")
    key = method_key(method)
    if lr is None:
        lr = DEFAULT_LR[key]
    if is_concrete(lr):
        try:
            a = np.asarray(lr, dtype=float)
        except (TypeError, ValueError):
            raise TypeError(f"lr must be a number (a learning rate > 0); got {lr!r}") from None
        if np.any(~np.isfinite(a)) or np.any(a <= 0):
            raise ValueError(f"lr must be a finite learning rate > 0; got {lr!r}")
    if max_steps is None:
        max_steps = DEFAULT_MAX_STEPS[key]
    if not _is_int(max_steps) or max_steps < 1 or max_steps > 2**31 - 2:
        raise ValueError(f"max_steps must be a positive integer below 2**31; got {max_steps!r}")
    tol = _tolerance("tol", default_tol(dt) if tol is None else tol, "(absolute gradient-norm tolerance)")
    rtol = _tolerance("rtol", default_rtol(dt) if rtol is None else rtol, "(relative stationarity tolerance)")
    if patience is None:
        patience = DEFAULT_PATIENCE[key]
    for name, v in (("patience", patience), ("history_every", history_every), ("memory_size", memory_size)):
        if not _is_int(v) or v < 1:
            raise ValueError(f"{name} must be a positive integer; got {v!r}")
    if snapshot_every is not None and (not _is_int(snapshot_every) or snapshot_every < 1):
        raise ValueError(f"snapshot_every must be None or a positive integer; got {snapshot_every!r}")
    if not isinstance(momentum, numbers.Real) or isinstance(momentum, bool) or momentum < 0 or not momentum < 1:
        raise ValueError(f"momentum must be a number in [0, 1); got {momentum!r}")
    return SolverOptions(
        method,
        lr,
        int(max_steps),
        tol,
        rtol,
        int(patience),
        int(history_every),
        None if snapshot_every is None else int(snapshot_every),
        float(momentum),
        int(memory_size),
        dt,
    )


def memory_estimate(num_params: int, itemsize: int, options: SolverOptions, batch: int = 1) -> int:
    """Bytes preallocated for history and snapshots by a solve of ``batch`` runs."""
    per = 0
    if options.history_every:
        per += 2 * (options.max_steps // options.history_every + 1) * itemsize
    if options.snapshot_every:
        per += (options.max_steps // options.snapshot_every + 1) * (num_params * itemsize + 4)
    return per * batch


def check_memory(
    num_params: int, itemsize: int, options: SolverOptions, *, history: bool, batch: int = 1, limit: int | None = None
) -> None:
    """Refuse (ValueError, with the estimate) a solve whose history/snapshots would exceed ``limit`` bytes
    (default `MEMORY_LIMIT_BYTES`)."""
    o = options._replace(history_every=options.history_every if history else 0)
    need = memory_estimate(num_params, itemsize, o, batch)
    limit = MEMORY_LIMIT_BYTES if limit is None else limit
    if need > limit:
        raise ValueError(
            f"this solve would preallocate {need / 2**30:.2f} GiB of history/snapshots (max_steps={o.max_steps}, "
            f"history_every={options.history_every if history else None}, snapshot_every={o.snapshot_every}, "
            f"{batch} run(s) of {num_params} parameters), above the {limit / 2**30:.1f} GiB limit: raise "
            f"history_every/snapshot_every, pass history=False, or lower max_steps"
        )


def auto_init_scale(problem) -> float:
    """The default initialisation scale s of `ufm.init_params` (``init_scale="auto"``), a rule per model family and
    depth, measured with L-BFGS (benchmarks/README.md, "Time to optimum"):

    - deep linear (L >= 2): s with s^(L+1) = 0.008, i.e. the product of the L + 1 layer scales at about 1/125.
      Dang et al.'s setting (K=4, n=100, widths 64 x L, lambda=5e-4, MSE, 2 seeds): L=3 converges in 1,773-2,577
      steps from s=1, 1,008-1,054 from 0.5, 325-379 from 0.3 (= 0.008^(1/4)); L=6 from s=1 or 0.7 is still
      120-290x above the optimum after 3,000 steps, from 0.5 (= 0.008^(1/7)) converges in 401-446 steps, from 0.3
      stops at a saddle 18x above the optimum and from 0.2 at the zero saddle.
    - deep ReLU (L >= 2): 1.0. A ReLU halves the signal at every layer, so smaller scales reach the zero saddle
      early: at K=6, L=4, widths 11, lambda=0.004, init 0.1 puts every start there; from 1.0 none is.
    - shallow (L = 1): 1.0 (the shallow UFM converges from any scale in the tested range).
    """
    return auto_init_scale_for(problem.activation, problem.L)


def auto_init_scale_for(activation: str, L: int) -> float:
    """`auto_init_scale` from the two things the rule reads: the activation and the depth L (for sweeps, which
    resolve it per setting before any `UFM` is built)."""
    if activation == "linear" and L >= 2:
        return 0.008 ** (1 / (L + 1))
    return 1.0


def resolve_init_scale(problem, init_scale=DEFAULT_INIT_SCALE):
    """The number an ``init_scale`` option stands for: `auto_init_scale` for ``"auto"``, else ``init_scale`` (checked
    by the caller). For the command line and sweeps, which store the number that was used."""
    if isinstance(init_scale, str):
        if init_scale != "auto":
            raise ValueError(f'init_scale must be a finite number >= 0 or "auto"; got {init_scale!r}')
        return auto_init_scale(problem)
    return init_scale
