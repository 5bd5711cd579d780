"""The solver engine: a named state, a pure ``init``/``step`` pair, and one driver that owns the loop.

A method is an optax transformation (`make_optimizer`); `step` passes ``value``, ``grad`` and ``value_fn`` to
every transformation (plain ones are wrapped with `optax.with_extra_args_support`), so line-search methods such as
``optax.lbfgs()`` or ``optax.chain(..., optax.scale_by_zoom_linesearch(...))`` work as given.

Stopping rule, decided after every step k (``options`` are the resolved `ufm._options.SolverOptions`):

    converged        rel_grad(x_k) <= rtol  or  ||grad f(x_k)||_2 <= tol
    diverged         f(x_k) or grad f(x_k) non-finite, or f(x_k) > 1e4 max(1, |f(x_0)|)
    stalled          neither min_{j<=k} f(x_j) nor min_{j<=k} ||grad f(x_j)|| improved in the last `patience` steps;
                     reported as "precision_floor" when rel_grad(x_k) <= RESOLVE_FLOOR[dtype] (the dtype cannot
                     resolve the point further)
    interrupted      SIGINT seen by the progress callback (`solve` only)
    max_steps        k == max_steps and none of the above,

with the scale-aware stationarity (shared with `ufm.check`, see `ufm._options`)

    rel_grad(x) = ||grad f(x)|| / (||grad F(x)|| + ||grad R(x)||),  0 when the denominator is 0,

F the fit and R the regulariser (grad R is exact: lam * x blockwise, so grad F = grad f - grad R).
"""

from __future__ import annotations

import functools
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import io_callback
from jax.flatten_util import ravel_pytree

from . import _lbfgs as lbfgs_core
from ._linesearch import DEFAULT_RULE, TrialRule, find_state, scale_by_trial_linesearch, stored_value_and_grad
from ._model import Params, init_params, objective, regulariser, tree_norm
from ._options import DIVERGENCE_FACTOR, LBFGS_LINESEARCH, RESOLVE_FLOOR
from ._solution import (
    CONVERGED,
    DIVERGED,
    INTERRUPTED,
    MAX_STEPS,
    NONFINITE_INIT,
    PRECISION_FLOOR,
    RUNNING,
    STALLED,
    History,
    Snapshots,
    Solution,
)


class SolverState(NamedTuple):
    """The state of one run (a pytree; a batch of runs has a leading axis on every leaf).

    Attributes:
      step: k, steps taken.
      params: x_k (`Params`; a flat vector (P,) inside `run`'s loop).
      opt_state: the optax state of the method.
      value, grad: f(x_k) and grad f(x_k) (as ``params``).
      grad_norm: ||grad f(x_k)||_2.
      rel_grad: the scale-aware stationarity at x_k (module docstring).
      best_value, best_grad_norm: min_{j<=k} f(x_j) and min_{j<=k} ||grad f(x_j)||.
      last_improve: the last step that improved either.
      limit: the divergence threshold 1e4 max(1, |f(x_0)|).
      status: RUNNING (-1) or a final status code (`ufm._solution`).
    """

    step: jax.Array
    params: Any
    opt_state: Any
    value: jax.Array
    grad: Any
    grad_norm: jax.Array
    rel_grad: jax.Array
    best_value: jax.Array
    best_grad_norm: jax.Array
    last_improve: jax.Array
    limit: jax.Array
    status: jax.Array


class Config(NamedTuple):
    """Static (compile-time) settings of the driver; hashable."""

    method: Any
    momentum: float
    memory_size: int
    max_steps: int
    patience: int
    history_every: int
    snapshot_every: int | None
    history: bool
    progress_every: int = 0


def make_optimizer(
    method, lr, momentum: float, memory_size: int, *, lazy: bool = True
) -> optax.GradientTransformationExtraArgs:
    """The optax transformation of a method name (or the user's transformation), with extra-args support.

    ``lazy`` is passed to the trial line search of L-BFGS (`ufm._linesearch.scale_by_trial_linesearch`): the
    batched engine evaluates all its trials in one ``vmap`` (``lazy=False``), a single run the first trial alone.
    """
    if isinstance(method, optax.GradientTransformation):
        opt = method
    elif method == "lbfgs" and LBFGS_LINESEARCH == "trial":
        # L-BFGS with the trial line search; lr scales the accepted step (1.0 = plain L-BFGS)
        ls = scale_by_trial_linesearch(lazy=lazy)
        opt = optax.chain(optax.scale_by_lbfgs(memory_size=memory_size), optax.scale(-lr), ls)
    elif method == "gd":
        opt = optax.sgd(lr)
    elif method == "momentum":
        opt = optax.sgd(lr, momentum=momentum)
    elif method == "adam":
        opt = optax.adam(lr)
    elif method == "lbfgs":
        # L-BFGS with a zoom (strong-Wolfe) line search; lr scales the accepted step (1.0 = plain L-BFGS).
        ls = optax.scale_by_zoom_linesearch(max_linesearch_steps=30, initial_guess_strategy="one")
        opt = optax.chain(optax.scale_by_lbfgs(memory_size=memory_size), optax.scale(-lr), ls)
    else:
        raise ValueError(f"unknown method {method!r}")
    return optax.with_extra_args_support(opt)


def rel_grad(problem, params: Params, grad: Params) -> jax.Array:
    """rel_grad = ||g|| / (||g_F|| + ||g_R||) with g_R = grad R exact and g_F = g - g_R (0 when 0/0)."""
    g_R = jax.grad(regulariser, argnums=1)(problem, params)
    g_F = jax.tree_util.tree_map(lambda a, b: a - b, grad, g_R)
    num = tree_norm(grad)
    den = tree_norm(g_F) + tree_norm(g_R)
    return jnp.where(den > 0, num / jnp.where(den > 0, den, 1), jnp.zeros_like(num))


def flat_lambdas(problem, params: Params) -> jax.Array:
    """The weight decay of every parameter as one flat vector lam (ravelled like ``params``): grad R(x) = lam * x.

    It is grad R at x = 1 (exact: (lam/2)(2 * 1) = lam), so every bias mode and per-layer lam_W is covered."""
    ones = jax.tree_util.tree_map(jnp.ones_like, params)
    return ravel_pytree(jax.grad(regulariser, argnums=1)(problem, ones))[0]


def stationarity(g: jax.Array, x: jax.Array, lam: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(||g||, rel_grad) from flat vectors: g = grad f(x), lam = `flat_lambdas` (so grad R = lam x, grad F = g - lam x).

    Three inner products (``vdot``); rel_grad is 0 when ||grad F|| + ||grad R|| = 0. Not one matrix product
    V V^T of the stack V = [g; grad R; grad F] (3, n): XLA:CPU runs that product through its library call for
    general matrix products, measured 30-100 us a step at n = 3,456 against about 7 us for the three ``vdot``
    (round 6, `ufm._lbfgs` module docstring)."""
    g_R = lam * x
    g_F = g - g_R
    num = jnp.sqrt(jnp.vdot(g, g))
    den = jnp.sqrt(jnp.vdot(g_F, g_F)) + jnp.sqrt(jnp.vdot(g_R, g_R))
    return num, jnp.where(den > 0, num / jnp.where(den > 0, den, 1), jnp.zeros_like(num))


def _cached_value_and_grad(opt_state, f):
    """value_and_grad that reuses a line search's value/grad at the accepted point when the state holds them."""
    if find_state(opt_state) is not None:  # the trial line search's point is always evaluated: no cond, no recompute
        return lambda x, state: stored_value_and_grad(state)
    try:
        v = optax.tree.get(opt_state, "value")
        g = optax.tree.get(opt_state, "grad")
    except (KeyError, ValueError):
        v = g = None
    if v is None or g is None:
        return lambda x, state: jax.value_and_grad(f)(x)
    return optax.value_and_grad_from_state(f)


def init(problem, params: Params, opt, tol, rtol) -> SolverState:
    """The state at x_0 (status NONFINITE_INIT, CONVERGED or RUNNING)."""
    v0, g0 = jax.value_and_grad(objective, argnums=1)(problem, params)
    gn0, rel0 = stationarity(ravel_pytree(g0)[0], ravel_pytree(params)[0], flat_lambdas(problem, params))
    status, limit = _start_status(v0, gn0, rel0, tol, rtol)
    return SolverState(
        jnp.int32(0),
        params,
        strong(opt.init(ravel_pytree(params)[0])),
        v0,
        g0,
        gn0,
        rel0,
        v0,
        gn0,
        jnp.int32(0),
        limit,
        status.astype(jnp.int32),
    )


def strong(tree):
    """Every array leaf without JAX's weak type (a weak leaf in a carried state makes jit compile twice)."""
    return jax.tree_util.tree_map(
        lambda x: (
            jnp.asarray(x, dtype=jnp.asarray(x).dtype) + jnp.zeros((), jnp.asarray(x).dtype)
            if getattr(x, "weak_type", False)
            else x
        ),
        tree,
    )


def _converged(gn, rel, tol, rtol):
    return (gn <= tol) | (rel <= rtol)


def step(problem, state: SolverState, opt, tol, rtol, patience: int) -> SolverState:
    """One step of the method and the stopping rule (module docstring): `flat_step` on the ravelled state."""
    xf, unravel = ravel_pytree(state.params)
    flat = state._replace(params=xf, grad=ravel_pytree(state.grad)[0])
    out = flat_step(problem, flat, opt, tol, rtol, patience, unravel, flat_lambdas(problem, state.params))
    return out._replace(params=unravel(out.params), grad=unravel(out.grad))


def flat_step(problem, state: SolverState, opt, tol, rtol, patience: int, unravel, lam) -> SolverState:
    """`step` on a state whose ``params`` and ``grad`` are FLAT vectors (P,) (``unravel`` maps one to `Params`;
    ``lam`` = `flat_lambdas`). `run` carries this state through its loop, so a step joins no leaves into x and g
    and splits nothing back (round 7: the joins and splits were 7-9% of a GD step at the medium size,
    ``bench_steps --pieces``); the arithmetic is `step`'s, element for element."""
    # the method sees x as ONE flat vector: every optax operation is one array operation instead of one per layer,
    # which makes the compiled program several times smaller (the L-BFGS two-loop recursion dominated its compile)
    xf, gf = state.params, state.grad

    def f(z):
        return objective(problem, unravel(z))

    upd, s = opt.update(gf, state.opt_state, xf, value=state.value, grad=gf, value_fn=f)
    xf = optax.apply_updates(xf, upd)
    v, gflat = _cached_value_and_grad(s, f)(xf, state=s)
    k = state.step + 1
    gn, rel = stationarity(gflat, xf, lam)
    status, last = _stopping_rule(state, k, v, gn, rel, tol, rtol, patience)
    return SolverState(
        k,
        xf,
        s,
        v,
        gflat,
        gn,
        rel,
        jnp.minimum(state.best_value, v),
        jnp.minimum(state.best_grad_norm, gn),
        last,
        state.limit,
        status.astype(jnp.int32),
    )


# --- L-BFGS with the trial line search, one evaluation per loop iteration ----------------------------------------


class TrialSearch(NamedTuple):
    """The method state of `lbfgs_step` (``SolverState.opt_state``): the L-BFGS memory and the search in progress.

    Attributes:
      lbfgs: the L-BFGS memory (`ufm._lbfgs.Memory`; the arithmetic of ``optax.scale_by_lbfgs``).
      lam: the flat weight decays (`flat_lambdas`): grad R(x) = lam * x.
      direction: d, the flat search direction at x_k.
      slope: s = <grad f(x_k), d> < 0.
      initial: a0 of this search.
      trial: j, the index of the next trial a0 r^j.
      has_candidate: a trial of this search had a sufficient decrease without the curvature condition.
      cand_step, cand_value, cand_grad: the largest such trial a, f(x_k + a d) and its flat gradient.
      fresh: x_0 is not evaluated yet (the first iteration evaluates it: the initialisation is in the loop).
    """

    lbfgs: lbfgs_core.Memory
    lam: jax.Array
    direction: jax.Array
    slope: jax.Array
    initial: jax.Array
    trial: jax.Array
    has_candidate: jax.Array
    cand_step: jax.Array
    cand_value: jax.Array
    cand_grad: jax.Array
    fresh: jax.Array


def uses_trial_machine(method) -> bool:
    """True when ``method`` runs as `lbfgs_init`/`lbfgs_step` in `run` (the default L-BFGS)."""
    return isinstance(method, str) and method == "lbfgs" and LBFGS_LINESEARCH == "trial"


def unraveler(problem, dtype) -> Callable[[jax.Array], Params]:
    """The inverse of ``ravel_pytree`` for the parameters of ``problem`` in ``dtype``: flat (P,) -> `Params`."""
    hs, ws, bs = problem.param_shapes()
    z = Params(
        jnp.zeros(hs, dtype), tuple(jnp.zeros(s, dtype) for s in ws), None if bs is None else jnp.zeros(bs, dtype)
    )
    return ravel_pytree(z)[1]


def lbfgs_init(problem, params: Params, memory_size: int, rule: TrialRule = DEFAULT_RULE) -> SolverState:
    """The state before x_0 is evaluated (``fresh``; status RUNNING): `lbfgs_step` evaluates it first, so the
    compiled program holds ONE copy of value-and-gradient (init, first trial and fallback trials share it).

    The state's ``params`` and ``grad`` are FLAT vectors (P,) in the ravelled order of ``params`` (no ravel or
    unravel per iteration); `run` unravels them for the records and the result."""
    xf = ravel_pytree(params)[0]
    dt = xf.dtype
    inf = jnp.asarray(jnp.inf, dt)
    zero = jnp.zeros((), dt)
    search = TrialSearch(
        lbfgs_core.init(xf, memory_size),
        flat_lambdas(problem, params).astype(dt),
        jnp.zeros_like(xf),
        zero,
        jnp.asarray(rule.max_stepsize, dt),
        jnp.int32(0),
        jnp.bool_(False),
        zero,
        inf,
        jnp.zeros_like(xf),
        jnp.bool_(True),
    )
    return SolverState(
        jnp.int32(0), xf, search, inf, jnp.zeros_like(xf), inf, inf, inf, inf, jnp.int32(0), inf, jnp.int32(RUNNING)
    )


def _evaluate_trial(problem, state: SolverState, rule: TrialRule, unravel):
    """f and grad f at the next trial x_k + a d (a = 0 at the fresh start), with <grad, d>."""
    ts = state.opt_state
    xf = state.params
    dt = xf.dtype
    a = jnp.where(ts.fresh, jnp.zeros((), dt), ts.initial * rule.decrease_factor ** ts.trial.astype(dt))
    xt = xf + (a * ts.direction).astype(dt)
    f, g = jax.value_and_grad(lambda z: objective(problem, unravel(z)))(xt)
    return a, xt, f.astype(dt), g, jnp.vdot(g, ts.direction).astype(dt)


def lbfgs_step(
    problem, state: SolverState, lr, tol, rtol, patience: int, rule: TrialRule = DEFAULT_RULE
) -> SolverState:
    """One loop iteration of L-BFGS with the trial line search (`ufm._linesearch`): evaluate ONE trial point.

    The trials a0 r^j are tried in order, so the first acceptable one is the largest (what
    `scale_by_trial_linesearch` picks among all M); the search ends at an acceptable trial, or after the M-th with
    the largest trial that had a sufficient decrease, else with no step. Only then is a step counted (k + 1), the
    L-BFGS memory and direction updated (`ufm._lbfgs.update`, two-loop) and the stopping rule of `step` applied;
    in between, the state keeps x_k and records the search. The fresh start evaluates x_0 and applies the rule of
    `init`. ``state.params`` and ``state.grad`` are flat and the memory size is the memory's (`lbfgs_init`).
    """
    ts = state.opt_state
    xf = state.params
    dt = xf.dtype
    a, xt, f, g, df = _evaluate_trial(problem, state, rule, unraveler(problem, dt))
    value, gf = state.value, state.grad
    ok = rule.acceptable(a, f, df, value, ts.slope)
    new_cand = rule.decrease(a, f, df, value, ts.slope) & ~ts.has_candidate
    has_cand = ts.has_candidate | new_cand
    cand_a = jnp.where(new_cand, a, ts.cand_step)
    cand_f = jnp.where(new_cand, f, ts.cand_value)
    cand_g = jnp.where(new_cand, g, ts.cand_grad)
    done = ts.fresh | ok | (ts.trial >= rule.num_trials - 1)

    def end_search(_):
        # the end point: this trial (fresh start or acceptable), else the candidate, else no step
        took = ok | has_cand
        a_end = jnp.where(ok, a, jnp.where(has_cand, cand_a, jnp.zeros((), dt)))
        x_end = jnp.where(ok | ts.fresh, xt, xf + (a_end * ts.direction).astype(dt))
        f_end = jnp.where(ok | ts.fresh, f, jnp.where(has_cand, cand_f, value))
        g_end = jnp.where(ok | ts.fresh, g, jnp.where(has_cand, cand_g, gf))
        # the next direction: -lr H g (L-BFGS), -g when not a descent direction
        gn, rel = stationarity(g_end, x_end, ts.lam)
        hg, lb = lbfgs_core.update(ts.lbfgs, x_end, g_end, gg=gn * gn, recursion=True)  # one run: `two_loop`
        upd = (-jnp.asarray(lr, dt) * hg).astype(dt)
        slope = jnp.vdot(g_end, upd).astype(dt)
        ascent = ~(slope < 0)
        d = jnp.where(ascent, -g_end, upd)
        slope = jnp.where(ascent, -jnp.vdot(g_end, g_end).astype(dt), slope)
        a0 = jnp.where(ts.fresh, ts.initial, rule.next_initial(ts.initial, a_end, took).astype(dt))
        k = state.step + (~ts.fresh).astype(jnp.int32)
        status0, limit0 = _start_status(f_end, gn, rel, tol, rtol)
        status, last = _stopping_rule(state, k, f_end, gn, rel, tol, rtol, patience)
        search = TrialSearch(
            lb, ts.lam, d, slope, a0, jnp.int32(0), jnp.bool_(False), cand_a, cand_f, cand_g, jnp.bool_(False)
        )
        return SolverState(
            k,
            x_end,
            search,
            f_end,
            g_end,
            gn,
            rel,
            jnp.where(ts.fresh, f_end, jnp.minimum(state.best_value, f_end)),
            jnp.where(ts.fresh, gn, jnp.minimum(state.best_grad_norm, gn)),
            jnp.where(ts.fresh, 0, last).astype(jnp.int32),
            jnp.where(ts.fresh, limit0, state.limit),
            jnp.where(ts.fresh, status0, status).astype(jnp.int32),
        )

    def go_on(_):
        search = ts._replace(
            trial=ts.trial + 1, has_candidate=has_cand, cand_step=cand_a, cand_value=cand_f, cand_grad=cand_g
        )
        return state._replace(opt_state=search)

    return jax.lax.cond(done, end_search, go_on, None)


def _start_status(v0, gn0, rel0, tol, rtol):
    """(status, divergence limit) at x_0: NONFINITE_INIT, CONVERGED or RUNNING; 1e4 max(1, |f(x_0)|)."""
    finite = jnp.isfinite(v0) & jnp.isfinite(gn0)
    status = jnp.where(~finite, NONFINITE_INIT, jnp.where(_converged(gn0, rel0, tol, rtol), CONVERGED, RUNNING))
    return status, DIVERGENCE_FACTOR * jnp.maximum(1.0, jnp.abs(v0))


def _stopping_rule(state: SolverState, k, v, gn, rel, tol, rtol, patience: int):
    """(status, last improving step) after step k reached f = v, ||g|| = gn, rel_grad = rel (module docstring)."""
    improved = (v < state.best_value) | (gn < state.best_grad_norm)
    last = jnp.where(improved, k, state.last_improve)
    bad = ~jnp.isfinite(v) | ~jnp.isfinite(gn) | (v > state.limit)
    floor = RESOLVE_FLOOR["float64" if v.dtype == jnp.float64 else "float32"]
    stalled = jnp.where(rel <= floor, PRECISION_FLOOR, STALLED)
    status = jnp.where(
        bad,
        DIVERGED,
        jnp.where(_converged(gn, rel, tol, rtol), CONVERGED, jnp.where(k - last >= patience, stalled, RUNNING)),
    )
    return status, last


class Records(NamedTuple):
    """What the driver records besides the state (None when not asked).

    Attributes:
      history: (nh + 1, 2) rows (f, ||grad f||) at steps 0, every, 2 every, ...; the extra last row takes the
        writes of the steps that record nothing (one unconditional row write per iteration: no read, no select).
      snapshots: `ufm._solution.Snapshots`.
    """

    history: jax.Array | None
    snapshots: Snapshots | None


def init_records(state: SolverState, cfg: Config) -> Records:
    dtype = state.value.dtype
    hist = snaps = None
    if cfg.history:
        nh = cfg.max_steps // cfg.history_every + 1
        hist = jnp.full((nh + 1, 2), jnp.nan, dtype).at[0].set(jnp.stack([state.value, state.grad_norm]))
    if cfg.snapshot_every:
        ns = cfg.max_steps // cfg.snapshot_every + 1
        snaps = Snapshots(
            jnp.full((ns,), -1, jnp.int32).at[0].set(0),
            jax.tree_util.tree_map(lambda a: jnp.zeros((ns,) + a.shape, a.dtype).at[0].set(a), state.params),
        )
    return Records(hist, snaps)


def record(rec: Records, state: SolverState, cfg: Config) -> Records:
    k = state.step
    hist, snaps = rec
    if hist is not None:
        nh = hist.shape[0] - 1
        row = jnp.where((k % cfg.history_every) == 0, k // cfg.history_every, nh)
        hist = jax.lax.dynamic_update_index_in_dim(hist, jnp.stack([state.value, state.grad_norm]), row, 0)
    if snaps is not None:
        assert cfg.snapshot_every is not None  # snapshots are recorded only with snapshot_every set
        i = k // cfg.snapshot_every
        w = (k % cfg.snapshot_every) == 0
        snaps = Snapshots(
            snaps.step.at[i].set(jnp.where(w, k, snaps.step[i])),
            jax.tree_util.tree_map(lambda a, y: a.at[i].set(jnp.where(w, y, a[i])), snaps.params, state.params),
        )
    return Records(hist, snaps)


def finish(state: SolverState, rec: Records, cfg: Config) -> Solution:
    status = jnp.where(state.status == RUNNING, MAX_STEPS, state.status).astype(jnp.int32)
    hist = None if rec.history is None else History(rec.history[:-1, 0], rec.history[:-1, 1])
    return Solution(state.params, state.value, state.grad_norm, state.step, status, hist, rec.snapshots, state.rel_grad)


# --- progress and interruption (host side) ------------------------------------------------------------------------

_HANDLERS: dict[int, Callable] = {}
_NEXT = [0]
_INTERRUPT = threading.Event()


_WAKEUP: list[int] = []  # read end of the signal wakeup pipe while `catch_sigint` is active


def _sigint_seen() -> bool:
    """True once SIGINT arrived. Python runs signal handlers only in the main thread between bytecodes, which
    is blocked while a compiled loop runs; the C-level wakeup fd (`signal.set_wakeup_fd`) is written at once."""
    if _WAKEUP:
        try:
            data = os.read(_WAKEUP[0], 512)
        except (BlockingIOError, OSError):
            data = b""
        if signal.SIGINT in data:
            _INTERRUPT.set()
    return _INTERRUPT.is_set()


def _host_progress(handle, k, value, grad_norm, rel, status):
    fn = _HANDLERS.get(int(handle))
    if fn is not None:
        fn(int(k), float(value), float(grad_norm), float(rel), int(status))
    return np.bool_(_sigint_seen())


def register_progress(fn: Callable | None) -> int:
    """Register a host progress handler; returns its handle (a dynamic argument: no recompile per callable)."""
    _NEXT[0] += 1
    if fn is not None:
        _HANDLERS[_NEXT[0]] = fn
    return _NEXT[0]


def unregister_progress(handle: int) -> None:
    _HANDLERS.pop(handle, None)


class catch_sigint:
    """Context manager: while active (main thread only), Ctrl-C sets a flag that the compiled loop reads at its next
    progress callback and ends the run with status "interrupted"; a second Ctrl-C raises KeyboardInterrupt."""

    def __enter__(self):
        _INTERRUPT.clear()
        self.old = self.pipe = None
        if threading.current_thread() is threading.main_thread():

            def handler(signum, frame):
                if self.seen:
                    raise KeyboardInterrupt
                self.seen = True
                _INTERRUPT.set()

            self.seen = False
            self.old = signal.signal(signal.SIGINT, handler)
            r, w = os.pipe()
            os.set_blocking(r, False)
            os.set_blocking(w, False)
            self.pipe = (r, w)
            self.old_fd = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
            _WAKEUP[:] = [r]
        return self

    def __exit__(self, *exc):
        if self.pipe is not None:
            signal.set_wakeup_fd(self.old_fd)
            _WAKEUP.clear()
            for fd in self.pipe:
                os.close(fd)
        if self.old is not None:
            signal.signal(signal.SIGINT, self.old)
        _INTERRUPT.clear()
        return False


class Throttle:
    """Calls ``fn(step, value, grad_norm)`` at most every ``interval`` seconds, and always on the final report."""

    def __init__(self, fn: Callable, interval: float = 0.1):
        self.fn, self.interval, self.last = fn, interval, -np.inf

    def __call__(self, k, value, grad_norm, rel, status):
        now = time.perf_counter()
        if status != RUNNING or now - self.last >= self.interval:
            self.last = now
            self.fn(k, value, grad_norm)


def _progress_point(handle, state: SolverState, cfg: Config, final, moved=True) -> jax.Array:
    """Report to the host when due (every ``progress_every`` steps, at a final status, at the end) and ``moved``
    (the iteration ended a step or the run); returns the host's "interrupt" flag."""

    def call(args):
        return io_callback(_host_progress, jax.ShapeDtypeStruct((), jnp.bool_), *args, ordered=True)

    due = moved & (((state.step % cfg.progress_every) == 0) | (state.status != RUNNING) | final)
    status = jnp.where(final & (state.status == RUNNING), MAX_STEPS, state.status)  # the last report is final
    args = (handle, state.step, state.value, state.grad_norm, state.rel_grad, status)
    return jax.lax.cond(due, call, lambda a: jnp.bool_(False), args)


# --- the driver ---------------------------------------------------------------------------------------------------


def run(problem, params0: Params, lr, tol, rtol, cfg: Config, handle=None) -> Solution:
    """The driver (traceable; jit/vmap it from outside): ``init``, then ``step`` until the status is final."""
    dtype = params0.H.dtype
    tol, rtol = jnp.asarray(tol, dtype), jnp.asarray(rtol, dtype)
    unravel = unraveler(problem, dtype)

    def view(state):  # the state with Params (its params and grad are flat in the loop)
        return state._replace(params=unravel(state.params), grad=unravel(state.grad))

    if uses_trial_machine(cfg.method):
        state0 = lbfgs_init(problem, params0, cfg.memory_size)

        def advance(state):
            return lbfgs_step(problem, state, lr, tol, rtol, cfg.patience)
    else:
        opt = make_optimizer(cfg.method, jnp.asarray(lr, dtype), cfg.momentum, cfg.memory_size)
        tree0 = init(problem, params0, opt, tol, rtol)
        state0 = tree0._replace(params=ravel_pytree(tree0.params)[0], grad=ravel_pytree(tree0.grad)[0])
        lam = flat_lambdas(problem, params0)  # constant over the run: computed once, outside the loop

        def advance(state):
            return flat_step(problem, state, opt, tol, rtol, cfg.patience, unravel, lam)

    rec0 = init_records(view(state0), cfg)

    def cond(c):
        state, _ = c
        return (state.status == RUNNING) & (state.step < cfg.max_steps)

    def body(c):
        state_in, rec = c
        state = advance(state_in)
        rec = record(rec, view(state), cfg)  # snapshots only read params (unravelled only when recorded)
        if cfg.progress_every:
            moved = (state.step != state_in.step) | (state.status != RUNNING)
            stop = _progress_point(handle, state, cfg, state.step >= cfg.max_steps, moved)
            state = state._replace(
                status=jnp.where(stop & (state.status == RUNNING), INTERRUPTED, state.status).astype(jnp.int32)
            )
        return state, rec

    state, rec = jax.lax.while_loop(cond, body, (state0, rec0))
    return finish(view(state), rec, cfg)


def threefry2x32(k1, k2, x1, x2):
    """The Threefry-2x32 hash (20 rounds; Salmon et al. 2011) of the uint32 counts (x1, x2) under key (k1, k2), as
    straight-line elementwise arithmetic: ONE fused kernel. The arithmetic of JAX's ``threefry2x32`` primitive, whose
    CPU lowering is a 5-trip loop that XLA unrolls into several kernels per trip (tested bit for bit through
    `draw_params`)."""
    u32 = np.uint32
    rotations = ((13, 15, 26, 6), (17, 29, 16, 24))
    ks = (k1, k2, k1 ^ k2 ^ u32(0x1BD11BDA))
    x0, x1 = x1 + ks[0], x2 + ks[1]
    for i in range(5):
        for r in rotations[i % 2]:
            x0 = x0 + x1
            x1 = (x1 << u32(r)) | (x1 >> u32(32 - r))
            x1 = x0 ^ x1
        x0 = x0 + ks[(i + 1) % 3]
        x1 = x1 + ks[(i + 2) % 3] + u32(i + 1)
    return x0, x1


def _normal_from_key(kd, n: int, dtype):
    """``jax.random.normal(key, (n,), dtype)`` for a threefry key with data ``kd`` (2,) uint32 and JAX's
    partitionable threefry: bits from the hash of the counts (0, i), the mantissa trick of ``jax.random.uniform``
    on [nextafter(-1, 0), 1), then sqrt(2) erfinv(u)."""
    dtype = np.dtype(dtype)
    finfo = jnp.finfo(dtype)
    nbits, nmant = finfo.bits, finfo.nmant
    counts = jnp.arange(n, dtype=jnp.uint32)
    b1, b2 = threefry2x32(kd[0], kd[1], jnp.zeros_like(counts), counts)
    ut: Any = np.uint64 if nbits == 64 else np.uint32
    bits = (b1.astype(ut) << ut(32)) | b2.astype(ut) if nbits == 64 else b1 ^ b2
    fbits = (bits >> ut(nbits - nmant)) | jnp.asarray(np.array(1.0, dtype).view(ut), ut)
    floats = jax.lax.bitcast_convert_type(fbits, dtype) - jnp.asarray(1.0, dtype)
    lo = np.nextafter(np.array(-1.0, dtype), np.array(0.0, dtype), dtype=dtype)
    hi = np.array(1.0, dtype)
    u = jax.lax.max(jnp.asarray(lo, dtype), floats * jnp.asarray(hi - lo, dtype) + jnp.asarray(lo, dtype))
    return jax.lax.mul(jnp.asarray(np.sqrt(2), dtype), jax.lax.erf_inv(u))


def draw_params(problem, key, scale, dtype) -> Params:
    """`ufm.init_params` (the same numbers, bit for bit) with ONE normal draw instead of one per layer.

    With JAX's partitionable threefry (the default since JAX 0.5), the bits of ``jax.random.normal(k, shape)``
    depend only on k and the flat index, so the draw of each layer is the first prod(shape) entries of a draw of
    the largest size from the same per-layer key (``jax.random.split(key, L + 1)``). The split and the draws hash
    with `threefry2x32` written out (one fused kernel each): JAX's CPU lowering of the hash is a loop that XLA
    unrolls into many kernels, which made the initialisation about a quarter of the first solve's compile.
    Other key implementations, the non-partitionable threefry, or float types other than float32/float64 fall back
    to `init_params`.
    """
    partitionable = bool(jax.config.jax_threefry_partitionable)  # type: ignore[attr-defined]  # runtime config attribute
    dtype = jnp.dtype(dtype)
    if (
        not partitionable
        or str(jax.random.key_impl(key)) != "threefry2x32"
        or dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.float64))
        or (dtype == jnp.float64 and not jax.config.jax_enable_x64)  # type: ignore[attr-defined]
    ):
        return init_params(problem, key, scale, dtype)
    hs, ws, bs = problem.param_shapes()
    shapes = (hs,) + tuple(ws)
    sizes = [int(np.prod(s)) for s in shapes]
    kd = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else jnp.asarray(key)
    kd = kd.astype(jnp.uint32)
    counts = jnp.arange(problem.L + 1, dtype=jnp.uint32)
    k1, k2 = threefry2x32(kd[0], kd[1], jnp.zeros_like(counts), counts)  # jax.random.split(key, L + 1)
    z = jax.vmap(lambda a, b: _normal_from_key(jnp.stack([a, b]), max(sizes), dtype))(k1, k2)
    scale = jnp.asarray(scale, dtype)
    H = scale * z[0, : sizes[0]].reshape(hs)
    Ws = tuple(
        scale * z[i + 1, : sizes[i + 1]].reshape(s) / jnp.sqrt(jnp.asarray(s[1], dtype)) for i, s in enumerate(ws)
    )
    return Params(H, Ws, None if bs is None else jnp.zeros(bs, dtype))


@functools.partial(jax.jit, static_argnames=("cfg", "dtype"))
def run_jit(problem, start, lr, tol, rtol, handle, cfg: Config, dtype=None) -> Solution:
    """`run` compiled, initialisation included: ``start`` is the initial `Params` (``dtype=None``) or a pair
    ``(key, init_scale)`` drawn by `draw_params` (= `init_params`) inside the same program. One program per problem
    shapes/modes, `Config` and dtype; numbers, keys and the progress handle are dynamic."""
    params0 = start if dtype is None else draw_params(problem, start[0], start[1], dtype)
    return run(problem, params0, lr, tol, rtol, cfg, handle)


def compiled_programs() -> int:
    """Number of compiled single-solve programs (entries in the jit cache of `run_jit`): a counter of recompiles."""
    return run_jit._cache_size()  # type: ignore[attr-defined]  # jit's private cache counter; not in jax's stub
