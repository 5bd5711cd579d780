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


INIT_PRODUCT = 0.008  # deep linear: the product of the L + 1 layer scales at the start, s^(L+1) (measured, below)
ESCAPE_PRODUCT = 4.0  # the auto scale's product is at least this many times the zero basin's edge (`escape_scale`)


def escape_scale(activation: str, L: int, num_classes: int, class_sizes, lam_H, lam_W, loss="mse", label_smoothing=0.0):
    """The init scale below which a deep UFM (L >= 2) starts inside the basin of the zero point: a balanced
    one-direction model of the first steps (derivation below). NumPy in, NumPy out; JAX arrays (traced ones
    included) in, JAX out, elementwise over a leading batch axis of ``lam_H`` (B,) and ``lam_W`` (B,) or (B, L).

    Derivation. Along the class direction v = 1_k / sqrt(n_k) of R^N, write sigma_0 for the singular value of H and
    sigma_l for that of W_l on the aligned path, t = prod_i sigma_i for the end-to-end product's (i = 0..L: L + 1
    factors). Near zero the residual is the zero output's, so with g0 = ||Y v|| = sqrt(n_k) for MSE
    ((1 - alpha) sqrt(n_k (1 - 1/K)) for CE with label smoothing alpha: the softmax at 0 is uniform)

        f = F + R,   dF/d sigma_i = -(g0 / N) t / sigma_i,   dR/d sigma_i = lambda_i sigma_i.

    The data term pushes every factor out, the weight decay pulls it in; compared in geometric mean over the
    factors (Lambda = (lambda_H prod_l lambda_l)^(1/(L+1)); at a balanced point lambda_i sigma_i^2 is the same for
    every i) the data term wins iff

        (g0 / N) t  >  Lambda t^(2/(L+1))   <=>   t  >  t* = (N Lambda / g0)^((L+1)/(L-1)).

    For L + 1 >= 3 factors the right side dominates near 0, so zero is a strict local minimum (THEORY.md §0) with a
    basin of product size t*; for L = 1 the condition does not involve t (no basin). t* is largest for the
    smallest class (g0 = sqrt(n_min)), the last direction to leave, and the predicted optimum needs every class.
    The random init of scale s (`ufm.init_params`: H ~ N(0, s^2), W_l ~ N(0, s^2 / d_l)) has
    E||W_l u||^2 = s^2 (d_{l+1} / d_l) ||u||^2, so a column of the output has E||out||^2 = K s^(2(L+1)) (a ReLU
    keeps half of that energy at each of its L - 1 layers): t0 = sqrt(K) rho^(L-1) s^(L+1) with rho = 1
    (linear) or 1/sqrt(2) (ReLU). The edge of the basin is t0 = t*:

        s_esc = ( t* / (sqrt(K) rho^(L-1)) )^(1/(L+1)).

    Checked against measured edges (L-BFGS, `ufm.solve_batch` at explicit scales, issue 13 round 5): Dang et
    al.'s K=4, n=100, widths 64 x 6, lambda=5e-4 (s_esc = 0.414): 3 seeds from 0.37 and 0.41 end 3/6 at saddles
    10-19x above the optimum (directions that did not escape), from 0.435 2/5, from 0.457 0/5; at L=3
    (s_esc = 0.119) every seed from 0.119 up converges. K=3, n=(3,2,1), widths (4,4), lambda=0.1 (s_esc = 0.50
    for the smallest class, 0.29 for the largest): 0.14-0.25 end at zero, 0.29-0.35 half at zero, 0.43 none of 4
    seeds, 0.63 one of 20 keys (hence a product 4x the edge in `auto_init_scale`).
    Deep ReLU K=6, L=4, widths 11, lambda=0.004 (s_esc = 0.30): 0.1 ends at zero in every seed.

    Args:
      activation: "linear" or "relu".
      L: the depth (number of weight matrices).
      num_classes: K.
      class_sizes: (n_1, ..., n_K).
      lam_H: lambda_H, a scalar or (B,).
      lam_W: lambda_W, a scalar, (L,), (B,) or (B, L).
      loss: "mse" or "ce"; label_smoothing: alpha (CE).

    Returns:
      s_esc, a scalar or (B,) (0 when some lambda is 0 or L < 2: no basin to escape).
    """
    xp = np if all(is_concrete(v) for v in (lam_H, lam_W, label_smoothing)) else jnp
    if xp is np:  # concrete numbers (JAX arrays included) in NumPy: no eager XLA kernels to compile
        lam_H, lam_W, label_smoothing = (np.asarray(v, dtype=float) for v in (lam_H, lam_W, label_smoothing))
    if L < 2:
        return xp.zeros(xp.shape(lam_H))
    sizes = np.asarray(class_sizes, dtype=float)
    N, n_min = float(sizes.sum()), float(sizes.min())
    g0 = np.sqrt(n_min) if loss == "mse" else np.sqrt(n_min * (1 - 1 / num_classes))
    g0 = g0 * (1 - xp.asarray(label_smoothing)) if loss == "ce" else g0
    lH, lW = xp.asarray(lam_H), xp.asarray(lam_W)
    lW = xp.broadcast_to(lW[..., None] if lW.ndim == lH.ndim else lW, lH.shape + (L,))
    # Lambda = (lam_H prod lam_l)^(1/(L+1)) as exp(mean log): 0 when any lambda is 0
    logs = xp.concatenate([xp.log(xp.maximum(lH, 1e-300))[..., None], xp.log(xp.maximum(lW, 1e-300))], axis=-1)
    lam = xp.where(xp.all(xp.concatenate([lH[..., None], lW], axis=-1) > 0, axis=-1), xp.exp(logs.mean(-1)), 0.0)
    rho = 1.0 if activation == "linear" else 2.0**-0.5
    t_star = (N * lam / g0) ** ((L + 1) / (L - 1))
    return (t_star / (np.sqrt(num_classes) * rho ** (L - 1))) ** (1 / (L + 1))


def auto_init_scale(problem, lam_H=None, lam_W=None):
    """The default initialisation scale s of `ufm.init_params` (``init_scale="auto"``): the larger of a depth rule
    that keeps deep linear models from crawling and a start whose product is `ESCAPE_PRODUCT` = 4 times the zero
    basin's edge, at most 1:

        s = min(1, max(s_depth, 4^(1/(L+1)) s_esc)),

    s_esc = `escape_scale` (derived there from the depth, widths, class sizes, loss and the lambdas; 0 for L = 1),
    s_depth:

    - deep linear (L >= 2): s_depth^(L+1) = `INIT_PRODUCT` = 0.008, the product of the L + 1 layer scales at about
      1/125. Why small: the parts of the factors that cancel in the product are removed by weight decay alone, at a
      rate lambda (5e-4 in Dang et al.'s setting), so initial scale the data do not need is slow to shed. Measured
      in Dang et al.'s setting (K=4, n=100, widths 64 x L, lambda=5e-4, MSE): L=3 converges in 1,773-2,577 steps
      from s=1, 1,008-1,054 from 0.5, 283-362 from 0.3 (= 0.008^(1/4), 3 seeds; 155-219 from 0.12-0.2); at L=6
      from s=0.6 or more every seed is 66-130x above the optimum after 800 steps, from 0.54 one in three (29x),
      from 0.505 (= 4^(1/7) s_esc, the rule) 6/6 converge in 342-484 steps, from 0.50 (= 0.008^(1/7)) 5/5 in
      349-412, from 0.457 5/5 in 309-362; below that the start is in or near the basin (`escape_scale`).
    - deep ReLU (L >= 2): 1.0 (measured: at K=6, L=4, widths 11, lambda=0.004 init 0.1 puts every start on the zero
      saddle, 1.0 none).
    - shallow (L = 1): 1.0.

    Why a product 4x the edge: K=3, n=(3,2,1), widths (4,4), lambda=0.1 (s_depth = 0.2: every seed ends at the zero
    saddle; s_esc = 0.50) ends at zero in 1/20 keys from 0.63 (2x), in 0/20 from 0.7, 0.79 (4x, the rule), 0.9 and
    1.0; 10/20 reach the optimum of `ufm.predict` from 0.79 (15/20 from 1.0), the others a stationary point 1.39%
    above it with the smallest class collapsed. A larger product makes Dang et al.'s L=6 crawl (above). The cap at
    1 keeps the scale where every family was measured; a run that still ends at the zero saddle is restarted
    (`ufm.solve`, `ufm.solve_batch`, ``ufm solve``). For a `ufm.UFM` with concrete lambdas the result is a float;
    with traced ones a JAX scalar. ``lam_H`` (B,) and ``lam_W`` (B,) or (B, L), when given, replace the problem's
    (one scale per run: `ufm.solve_batch`).
    """
    return auto_init_scale_for(
        problem.activation,
        problem.L,
        num_classes=problem.K,
        class_sizes=problem.class_sizes,
        lam_H=problem.lam_H if lam_H is None else lam_H,
        lam_W=problem.lam_W if lam_W is None else lam_W,
        loss=problem.loss,
        label_smoothing=problem.label_smoothing,
    )


def auto_init_scale_for(
    activation: str,
    L: int,
    *,
    num_classes: int | None = None,
    class_sizes=None,
    lam_H=None,
    lam_W=None,
    loss: str = "mse",
    label_smoothing=0.0,
):
    """`auto_init_scale` from its ingredients, for sweeps (which resolve it per setting before any `UFM` is built)
    and batches (``lam_H`` (B,), ``lam_W`` (B,) or (B, L): one scale per run, NumPy or JAX, traceable). Without the
    lambdas (``lam_H`` None) it is the depth rule s_depth alone.

    Args:
      activation, L: the model family and depth.
      num_classes, class_sizes, lam_H, lam_W, loss, label_smoothing: as in `escape_scale`.

    Returns:
      s = min(1, max(s_depth, `ESCAPE_PRODUCT`^(1/(L+1)) s_esc)): a float for scalar NumPy/Python lambdas, else an
      array of the lambdas' batch shape."""
    s_depth = INIT_PRODUCT ** (1 / (L + 1)) if activation == "linear" and L >= 2 else 1.0
    if lam_H is None or L < 2 or num_classes is None:
        return s_depth
    s_esc = escape_scale(activation, L, num_classes, class_sizes, lam_H, lam_W, loss, label_smoothing)
    xp = np if isinstance(s_esc, (np.ndarray, np.generic, float)) else jnp
    s = xp.minimum(xp.maximum(s_depth, ESCAPE_PRODUCT ** (1 / (L + 1)) * s_esc), 1.0)
    return float(s) if xp is np and np.ndim(s) == 0 else s


def resolve_init_scale(problem, init_scale=DEFAULT_INIT_SCALE):
    """The number an ``init_scale`` option stands for: `auto_init_scale` for ``"auto"``, else ``init_scale`` (checked
    by the caller). For the command line and sweeps, which store the number that was used."""
    if isinstance(init_scale, str):
        if init_scale != "auto":
            raise ValueError(f'init_scale must be a finite number >= 0 or "auto"; got {init_scale!r}')
        return auto_init_scale(problem)
    return init_scale
