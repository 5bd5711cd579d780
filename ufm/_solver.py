"""Compiled solvers: the whole optimisation loop is one `lax.while_loop` inside `jit`.

A method is an optax `GradientTransformation`; the driver owns the loop, the step budget, the stopping
rule, the non-finite/divergence guard and the history. `solve_batch` vmaps the same driver over seeds and
hyperparameters (one compile for the whole batch).

Stopping rule (decided every step k, after the step):

    converged  if ||grad f(x_k)||_2 <= tol          (Euclidean norm over all parameters)
    diverged   if f(x_k) or grad f(x_k) is non-finite, or f(x_k) > 1e4 * max(1, f(x_0))
    stalled    if neither min_j<=k f(x_j) nor min_j<=k ||grad f(x_j)|| improved in the last `patience` steps
    max_steps  if k == max_steps and none of the above.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ._model import Params, check_params, init_params, objective, tree_norm
from ._problem import UFM, is_concrete
from ._solution import (
    CONVERGED,
    DIVERGED,
    MAX_STEPS,
    MESSAGES,
    NONFINITE_INIT,
    RUNNING,
    STALLED,
    History,
    Snapshots,
    Solution,
)

METHODS = ("lbfgs", "gd", "momentum", "adam")
DEFAULT_LR = {"gd": 0.1, "momentum": 0.1, "adam": 1e-3, "lbfgs": 1.0}
DEFAULT_MAX_STEPS = {"lbfgs": 10_000, "gd": 100_000, "momentum": 100_000, "adam": 100_000}
DIVERGENCE_FACTOR = 1e4


def default_tol(dtype) -> float:
    """Gradient-norm tolerance by dtype: 1e-9 in float64, 1e-5 in float32 (about 100 sqrt(eps32))."""
    return 1e-9 if jnp.dtype(dtype) == jnp.float64 else 1e-5


def _make_optimizer(method, lr, momentum: float, memory_size: int):
    if isinstance(method, optax.GradientTransformation):
        return method
    if method == "gd":
        return optax.sgd(lr)
    if method == "momentum":
        return optax.sgd(lr, momentum=momentum)
    if method == "adam":
        return optax.adam(lr)
    if method == "lbfgs":
        # L-BFGS with a zoom (strong Wolfe) line search; lr scales the accepted step (1.0 = plain L-BFGS).
        return optax.chain(
            optax.scale_by_lbfgs(memory_size=memory_size),
            optax.scale(-lr),
            optax.scale_by_zoom_linesearch(max_linesearch_steps=30, initial_guess_strategy="one"),
        )
    raise ValueError(f"method must be one of {METHODS} or an optax.GradientTransformation; got {method!r}")


def _run(problem: UFM, params0: Params, lr, tol, *, method, max_steps, patience, history_every, snapshot_every,
         momentum, memory_size) -> Solution:
    """The driver (traceable; jit/vmap it from outside)."""
    dtype = params0.H.dtype
    f = functools.partial(objective, problem)
    opt = _make_optimizer(method, jnp.asarray(lr, dtype), momentum, memory_size)
    uses_linesearch = method == "lbfgs"
    if uses_linesearch:
        value_and_grad = optax.value_and_grad_from_state(f)
    tol = jnp.asarray(tol, dtype)

    opt_state0 = opt.init(params0)
    v0, g0 = jax.value_and_grad(f)(params0)
    gn0 = tree_norm(g0)
    nh = max_steps // history_every + 1
    hist0 = History(jnp.full((nh,), jnp.nan, dtype).at[0].set(v0), jnp.full((nh,), jnp.nan, dtype).at[0].set(gn0))
    if snapshot_every:
        ns = max_steps // snapshot_every + 1
        snaps0 = Snapshots(
            jnp.full((ns,), -1, jnp.int32).at[0].set(0),
            jax.tree_util.tree_map(lambda x: jnp.zeros((ns,) + x.shape, x.dtype).at[0].set(x), params0),
        )
    else:
        snaps0 = None
    finite0 = jnp.isfinite(v0) & jnp.isfinite(gn0)
    status0 = jnp.where(~finite0, NONFINITE_INIT, jnp.where(gn0 <= tol, CONVERGED, RUNNING)).astype(jnp.int32)
    limit = DIVERGENCE_FACTOR * jnp.maximum(1.0, jnp.abs(v0))

    # carry: k, params, opt_state, value, grad, gnorm, best_v, best_g, last_improve, status, hist, snaps
    init = (jnp.int32(0), params0, opt_state0, v0, g0, gn0, v0, gn0, jnp.int32(0), status0, hist0, snaps0)

    def cond(c):
        return (c[9] == RUNNING) & (c[0] < max_steps)

    def body(c):
        k, x, s, v, g, gn, best_v, best_g, last, status, hist, snaps = c
        if uses_linesearch:
            upd, s = opt.update(g, s, x, value=v, grad=g, value_fn=f)
            x = optax.apply_updates(x, upd)
            v, g = value_and_grad(x, state=s)
        else:
            upd, s = opt.update(g, s, x)
            x = optax.apply_updates(x, upd)
            v, g = jax.value_and_grad(f)(x)
        k = k + 1
        gn = tree_norm(g)
        improved = (v < best_v) | (gn < best_g)
        best_v = jnp.minimum(best_v, v)
        best_g = jnp.minimum(best_g, gn)
        last = jnp.where(improved, k, last)
        bad = ~jnp.isfinite(v) | ~jnp.isfinite(gn) | (v > limit)
        status = jnp.where(
            bad, DIVERGED, jnp.where(gn <= tol, CONVERGED, jnp.where(k - last >= patience, STALLED, RUNNING))
        ).astype(jnp.int32)
        j = k // history_every
        write = (k % history_every) == 0
        hist = History(
            hist.loss.at[j].set(jnp.where(write, v, hist.loss[j])),
            hist.grad_norm.at[j].set(jnp.where(write, gn, hist.grad_norm[j])),
        )
        if snaps is not None:
            i = k // snapshot_every
            w = (k % snapshot_every) == 0
            snaps = Snapshots(
                snaps.step.at[i].set(jnp.where(w, k, snaps.step[i])),
                jax.tree_util.tree_map(lambda a, y: a.at[i].set(jnp.where(w, y, a[i])), snaps.params, x),
            )
        return (k, x, s, v, g, gn, best_v, best_g, last, status, hist, snaps)

    k, x, _, v, _, gn, _, _, _, status, hist, snaps = jax.lax.while_loop(cond, body, init)
    status = jnp.where(status == RUNNING, MAX_STEPS, status).astype(jnp.int32)
    return Solution(x, v, gn, k, status, hist, snaps)


_STATIC = ("method", "max_steps", "patience", "history_every", "snapshot_every", "momentum", "memory_size", "history")


@functools.partial(jax.jit, static_argnames=_STATIC)
def _solve_jit(problem, params0, lr, tol, *, method, max_steps, patience, history_every, snapshot_every, momentum,
               memory_size, history):
    sol = _run(problem, params0, lr, tol, method=method, max_steps=max_steps, patience=patience,
               history_every=history_every, snapshot_every=snapshot_every, momentum=momentum,
               memory_size=memory_size)
    return sol if history else sol._replace(history=None)


@functools.partial(jax.jit, static_argnames=_STATIC + ("dtype", "given_init"))
def _solve_batch_jit(problem, keys, init, lam_H, lam_W, lam_b, lr, init_scale, tol, *, method, max_steps, patience,
                     history_every, snapshot_every, momentum, memory_size, history, dtype, given_init):
    def one(key, x0, lH, lW, lb, lr_, sc):
        p = jax.tree_util.tree_unflatten(
            jax.tree_util.tree_structure(problem), [lH, lW, lb, problem.label_smoothing]
        )
        params0 = x0 if given_init else init_params(p, key, sc, dtype)
        sol = _run(p, params0, lr_, tol, method=method, max_steps=max_steps, patience=patience,
                   history_every=history_every, snapshot_every=snapshot_every, momentum=momentum,
                   memory_size=memory_size)
        return sol if history else sol._replace(history=None)

    return jax.vmap(one)(keys, init, lam_H, lam_W, lam_b, lr, init_scale)


def _options(method, lr, max_steps, tol, patience, history_every, snapshot_every, dtype):
    if isinstance(method, str):
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS} or an optax.GradientTransformation; got {method!r}")
    elif not isinstance(method, optax.GradientTransformation):
        raise TypeError(f"method must be a string in {METHODS} or an optax.GradientTransformation; got {method!r}")
    key = method if isinstance(method, str) else "adam"
    if lr is None:
        lr = DEFAULT_LR[key]
    if is_concrete(lr):
        a = np.asarray(lr)
        if not np.issubdtype(a.dtype, np.number) or np.any(~np.isfinite(a)) or np.any(a <= 0):
            raise ValueError(f"lr must be a finite learning rate > 0; got {lr!r}")
    if max_steps is None:
        max_steps = DEFAULT_MAX_STEPS[key]
    if isinstance(max_steps, bool) or not isinstance(max_steps, (int, np.integer)) or max_steps < 1:
        raise ValueError(f"max_steps must be a positive integer; got {max_steps!r}")
    if tol is None:
        tol = default_tol(dtype)
    if is_concrete(tol) and (np.any(np.asarray(tol) < 0) or not np.all(np.isfinite(np.asarray(tol)))):
        raise ValueError(f"tol must be a finite gradient-norm tolerance >= 0; got {tol!r}")
    if patience is None:
        patience = 50 if method == "lbfgs" else 1000
    for name, v in (("patience", patience), ("history_every", history_every)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name} must be a positive integer; got {v!r}")
    if snapshot_every is not None and (
        isinstance(snapshot_every, bool) or not isinstance(snapshot_every, (int, np.integer)) or snapshot_every < 1
    ):
        raise ValueError(f"snapshot_every must be None or a positive integer; got {snapshot_every!r}")
    return lr, int(max_steps), tol, int(patience)


def _canonical(problem: UFM, dtype) -> UFM:
    """The problem with every array leaf (lambdas, label smoothing) as a non-weak array of the solve dtype.

    jit keys its cache on each leaf's dtype *and* weak type, so without this a problem built from NumPy
    scalars or a per-layer lam_W list (strong float64) and one built from Python floats (weak) would compile
    the solver twice. The objective casts the leaves to the parameter dtype anyway, so values are unchanged.
    """
    return jax.tree_util.tree_map(lambda x: jnp.asarray(x, dtype), problem)


def _check_dtype(dtype):
    if dtype is None:
        return jnp.dtype(jnp.result_type(float))
    try:
        dt = jnp.dtype(dtype)
    except TypeError as e:
        raise TypeError(f"dtype must be a floating dtype such as 'float32' or 'float64'; got {dtype!r}") from e
    if not jnp.issubdtype(dt, jnp.floating):
        raise TypeError(f"dtype must be a floating dtype such as 'float32' or 'float64'; got {dtype!r}")
    if dt == jnp.float64 and not jax.config.jax_enable_x64:
        raise ValueError("dtype='float64' needs jax.config.update('jax_enable_x64', True) before any JAX call")
    return dt


def solve(
    problem: UFM,
    key: jax.Array | int | None = None,
    *,
    init: Params | None = None,
    method: str | optax.GradientTransformation = "lbfgs",
    lr: float | None = None,
    max_steps: int | None = None,
    tol: float | None = None,
    init_scale: float = 1.0,
    dtype=None,
    patience: int | None = None,
    history: bool = True,
    history_every: int = 1,
    snapshot_every: int | None = None,
    momentum: float = 0.9,
    memory_size: int = 10,
    throw: bool = False,
) -> Solution:
    """Minimise the UFM objective from one starting point; the whole loop is compiled.

    Args:
      problem: a `ufm.UFM`.
      key: a `jax.random.key` (or an int seed) for `init_params`; ignored when ``init`` is given.
      init: explicit starting `Params` (their dtype is used).
      method: ``"lbfgs"`` (default: L-BFGS, memory ``memory_size``, with a zoom/strong-Wolfe line search;
        fastest to high precision), ``"gd"`` (full-batch gradient descent with fixed ``lr``, the papers'
        recipe), ``"momentum"`` (heavy ball, ``optax.sgd(lr, momentum)``), ``"adam"``, or any
        `optax.GradientTransformation` (compiled once per transformation object).
      lr: learning rate (defaults: gd/momentum 0.1, adam 1e-3; for lbfgs a step scale, 1.0). May be a JAX
        scalar: new values do not recompile.
      max_steps: step budget (default 10,000 for lbfgs, 100,000 for first-order methods).
      tol: stop when ||grad f||_2 <= tol (default 1e-9 in float64, 1e-5 in float32).
      init_scale: scale of the random init (see `init_params`).
      dtype: float32 or float64 (default: JAX's default float; ignored with ``init``).
      patience: steps without improvement of the best loss or best gradient norm before status "stalled"
        (default 50 for lbfgs, 1000 otherwise).
      history: record loss and gradient norm every ``history_every`` steps (NaN-padded to max_steps).
      snapshot_every: save the parameters every so many steps (memory: max_steps/snapshot_every copies).
      throw: raise RuntimeError unless the run converged (for interactive use; never inside vmap).

    Returns:
      A `Solution` (status 0 converged, 1 max_steps, 2 non-finite init, 3 diverged, 4 stalled; ``message``
      says what to do next). Never raises for numerical failure unless ``throw=True``.

    Example:
      >>> import jax, ufm
      >>> p = ufm.UFM(num_classes=3, n_per_class=2, widths=(4,), loss="mse", bias="free",
      ...             lam_H=1e-2, lam_W=1e-2)
      >>> sol = ufm.solve(p, key=jax.random.key(0), dtype="float32")
      >>> bool(sol.success), sol.value.dtype
      (True, dtype('float32'))
    """
    if not isinstance(problem, UFM):
        raise TypeError(f"problem must be a ufm.UFM; got {type(problem).__name__}")
    if init is not None:
        check_params(problem, init, "init")
        init = Params(*init)
        dt = jnp.asarray(init.H).dtype
        init = jax.tree_util.tree_map(jnp.asarray, init)
    else:
        dt = _check_dtype(dtype)
        if key is None:
            key = jax.random.key(0)
        elif isinstance(key, (int, np.integer)):
            key = jax.random.key(int(key))
        init = init_params(problem, key, init_scale, dt)
    lr, max_steps, tol, patience = _options(method, lr, max_steps, tol, patience, history_every, snapshot_every, dt)
    sol = _solve_jit(
        _canonical(problem, dt), init, lr, tol, method=method, max_steps=max_steps, patience=patience,
        history_every=history_every, snapshot_every=snapshot_every, momentum=momentum, memory_size=memory_size,
        history=history,
    )
    if throw and int(sol.status) != CONVERGED:
        raise RuntimeError(f"ufm.solve did not converge (status {int(sol.status)}): {MESSAGES[int(sol.status)]}")
    return sol


def _batch_size(named: dict[str, Any]) -> int:
    sizes = {}
    for name, v in named.items():
        if v is None:
            continue
        s = np.shape(v)
        if len(s) >= 1:
            sizes[name] = s[0]
    if not sizes:
        raise ValueError("solve_batch needs a batch: give keys/seeds, init, or a lam_H/lam_W/lam_b/lr/init_scale array")
    B = set(sizes.values())
    if len(B) != 1:
        raise ValueError(f"solve_batch: batched arguments disagree on the batch size B: {sizes}")
    return B.pop()


def solve_batch(
    problem: UFM,
    *,
    keys: jax.Array | None = None,
    seeds=None,
    init: Params | None = None,
    lam_H=None,
    lam_W=None,
    lam_b=None,
    lr=None,
    init_scale=1.0,
    method: str | optax.GradientTransformation = "lbfgs",
    max_steps: int | None = None,
    tol: float | None = None,
    dtype=None,
    patience: int | None = None,
    history: bool = True,
    history_every: int = 1,
    snapshot_every: int | None = None,
    momentum: float = 0.9,
    memory_size: int = 10,
) -> Solution:
    """Solve a batch of B problems that share shapes, in ONE compiled, vmapped call.

    Every batched argument has a leading axis of size B; scalars are broadcast. New numbers (lambdas,
    learning rates, seeds) never recompile; only B, shapes and the static options do.

    Args:
      problem: the shared `ufm.UFM` (shapes, modes, and default lambdas).
      keys: PRNG keys of shape (B,) (``jax.random.split(key, B)``), or ``seeds``: B integers.
      init: starting `Params` with a leading axis B on every leaf (instead of keys).
      lam_H: (B,) values of lambda_H (default: the problem's).
      lam_W: (B,) one scalar per run, or (B, L) one per layer (default: the problem's).
      lam_b: (B,) values of lambda_b (bias='reg' only).
      lr: (B,) learning rates, or a scalar.
      init_scale: (B,) or scalar.
      Other options as in `solve`.

    Returns:
      One `Solution` whose every field has a leading axis B (``sols.take(i)`` is run i).

    Example:
      >>> import jax, jax.numpy as jnp, ufm
      >>> p = ufm.UFM(num_classes=2, n_per_class=3, widths=(4,), lam_H=1e-2, lam_W=1e-2)
      >>> sols = ufm.solve_batch(p, keys=jax.random.split(jax.random.key(0), 4),
      ...                        lam_H=jnp.array([1e-3, 1e-2, 1e-2, 1e-1]), dtype="float32")
      >>> sols.value.shape
      (4,)
    """
    if not isinstance(problem, UFM):
        raise TypeError(f"problem must be a ufm.UFM; got {type(problem).__name__}")
    if seeds is not None:
        if keys is not None:
            raise ValueError("give keys or seeds, not both")
        seeds = np.asarray(seeds)
        if seeds.ndim != 1 or not np.issubdtype(seeds.dtype, np.integer):
            raise ValueError(
                f"seeds must be a 1-D sequence of B integers; got shape {seeds.shape}, dtype {seeds.dtype}"
            )
        keys = jax.vmap(jax.random.key)(jnp.asarray(seeds))
    if init is not None:
        init = Params(*init)
        leaves = jax.tree_util.tree_leaves(init)
        B0 = np.shape(leaves[0])[0] if np.ndim(leaves[0]) else None
        if B0 is None:
            raise ValueError("init must have a leading batch axis B on every leaf")
        check_params(problem, jax.tree_util.tree_map(lambda x: x[0], init), "init[i]")
        dt = jnp.asarray(init.H).dtype
        init = jax.tree_util.tree_map(jnp.asarray, init)
        init_shapes = {np.shape(x)[0] for x in jax.tree_util.tree_leaves(init)}
        if len(init_shapes) != 1:
            raise ValueError(f"init leaves disagree on the batch size: {sorted(init_shapes)}")
    else:
        dt = _check_dtype(dtype)
    L = problem.L
    lam_W_arr = None if lam_W is None else np.asarray(lam_W) if is_concrete(lam_W) else lam_W
    lwb = None
    if lam_W_arr is not None:
        if np.ndim(lam_W_arr) not in (1, 2) or (np.ndim(lam_W_arr) == 2 and np.shape(lam_W_arr)[1] != L):
            raise ValueError(f"lam_W must have shape (B,) or (B, L={L}) in solve_batch; got {np.shape(lam_W_arr)}")
        lwb = lam_W_arr
    named = dict(keys=keys, init=None if init is None else init.H, lam_H=lam_H, lam_W=lwb, lam_b=lam_b,
                 lr=lr, init_scale=init_scale)
    B = _batch_size(named)
    if keys is None and init is None:
        keys = jax.random.split(jax.random.key(0), B)
    if keys is not None and np.shape(keys) != (B,):
        raise ValueError(f"keys must have shape (B,) = ({B},); got {np.shape(keys)}")
    # validate numbers through the problem constructor (names the argument on error)
    for name, v in (("lam_H", lam_H), ("lam_W", lam_W), ("lam_b", lam_b)):
        if v is not None and is_concrete(v):
            problem.replace(**{name: np.asarray(v).ravel()[0]})
            if np.any(np.asarray(v) < 0):
                raise ValueError(f"{name} must be >= 0; got {v!r}")
    lr, max_steps, tol, patience = _options(method, lr, max_steps, tol, patience, history_every, snapshot_every, dt)

    def bcast(v, default, shape=()):
        v = default if v is None else v
        return jnp.broadcast_to(jnp.asarray(v, dt), (B,) + shape)

    lH = bcast(lam_H, problem.lam_H)
    if lam_W is None:
        lW = jnp.broadcast_to(jnp.asarray(problem.lam_W, dt), (B, L))
    else:
        lW = jnp.asarray(lam_W, dt)
        lW = jnp.broadcast_to(lW[:, None], (B, L)) if lW.ndim == 1 else lW
    lb = bcast(lam_b, problem.lam_b)
    lrs = bcast(lr, None)
    scales = bcast(init_scale, None)
    if keys is None:
        keys = jax.random.split(jax.random.key(0), B)
    return _solve_batch_jit(
        _canonical(problem, dt), keys, init, lH, lW, lb, lrs, scales, tol, method=method, max_steps=max_steps,
        patience=patience, history_every=history_every, snapshot_every=snapshot_every, momentum=momentum,
        memory_size=memory_size, history=history, dtype=dt, given_init=init is not None,
    )
