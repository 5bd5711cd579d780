"""The batched engines of `ufm.solve_batch` that retire finished runs: "slots" and "lockstep".

A ``vmap``ped ``while_loop`` runs until its slowest member stops, so a batch whose step counts spread (median 198,
max 3,307 on the deep ReLU benchmark) costs B times the slowest run. Both engines here advance the runs on S device
slots (lanes) in segments (one compiled program each); between segments the host reads the S statuses, retires
finished runs into the (B,)-batched result on the device and refills their slots with pending runs. Only S statuses
and S run indices cross between host and device; states, histories and results stay on the device.

* "slots" (`solve_slots`): each slot runs exactly the driver of `ufm.solve` (`ufm._driver.init`/`step`) with the
  trial line search evaluating all its M trials in one ``vmap`` every step.
* "lockstep" (`solve_lockstep`, L-BFGS): every iteration evaluates f and its gradient ONCE per lane, all lanes in
  one ``vmap``; each lane's line search is a state machine that evaluates one trial per iteration with the
  acceptance rule of `ufm._linesearch`, and the L-BFGS direction is the loop-free compact form of `ufm._lbfgs`
  (its memory written by a select, not a per-lane scatter), so nothing inside the loop is a nested loop.

Run i ends where ``ufm.solve`` of problem i ends up to the rounding of batched arithmetic.
"""

from __future__ import annotations

import functools
import inspect
import os
import threading
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from . import _lbfgs as lbfgs_core
from ._driver import (
    Config,
    Records,
    SolverState,
    draw_params,
    finish,
    init,
    init_records,
    make_optimizer,
    record,
    rel_grad,
    step,
    unraveler,
)
from ._linesearch import scale_by_trial_linesearch
from ._model import objective
from ._options import DIVERGENCE_FACTOR, RESOLVE_FLOOR
from ._solution import (
    CONVERGED,
    DIVERGED,
    MAX_STEPS,
    NONFINITE_INIT,
    PRECISION_FLOOR,
    RUNNING,
    STALLED,
    Solution,
)

DEFAULT_SLOTS = 64
DEFAULT_SEGMENT = {"lbfgs": 25, "gd": 500, "momentum": 500, "adam": 500}


MAX_THREADS = 8  # host threads of a batch at most (`default_threads`)


def default_threads() -> int:
    """Host threads of ``solve_batch(threads=None)``: on a CPU backend the cores this process may use
    (``os.sched_getaffinity``, else ``os.cpu_count()``), at most `MAX_THREADS`; 1 on an accelerator (its programs
    already run on the device's own cores). Measured on the 2-core CPU: two threads that call the same compiled
    program run at the same time (XLA's CPU client executes each call on the calling thread), so a batch's engine
    cycles driven from two threads use both cores (benchmarks/README.md, "Batched engine")."""
    if jax.default_backend() != "cpu":
        return 1
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        n = os.cpu_count() or 1
    return max(1, min(MAX_THREADS, n))


def check_threads(threads) -> int:
    """``threads`` of `ufm.solve_batch`: None (`default_threads`) or a positive integer; TypeError/ValueError
    naming it otherwise."""
    if threads is None:
        return default_threads()
    if isinstance(threads, bool) or not isinstance(threads, (int, np.integer)):
        raise TypeError(f"threads must be None or a positive integer (host threads of the batch); got {threads!r}")
    if threads < 1:
        raise ValueError(f"threads must be a positive integer (host threads of the batch); got {threads!r}")
    return int(threads)


class RunQueue:
    """The pending runs 0..B-1 of a batch, shared by its host threads: `take` hands each run out exactly once,
    in order; `abort` makes every later `take` return None (a thread failed, or the caller was interrupted)."""

    def __init__(self, B: int):
        self._next = 0
        self._B = B
        self._lock = threading.Lock()
        self.aborted = False

    def take(self) -> int | None:
        """The next pending run, or None when none is left or the batch was aborted."""
        with self._lock:
            if self.aborted or self._next >= self._B:
                return None
            i = self._next
            self._next += 1
            return i

    def abort(self) -> None:
        with self._lock:
            self.aborted = True


class TaskQueue:
    """The work of a batch's host threads when doing an item can create more: items 0..n-1 handed out in order,
    and follow-up tasks (`add`, any object but an int) handed out first, before the next item. `take` waits while
    nothing is left to hand out but an item or task is still being done (it may add tasks); each thread calls `done`
    after each item or task it took. `abort` makes every later `take` return None."""

    def __init__(self, n: int):
        self._next = 0
        self._n = n
        self._tasks: deque = deque()
        self._busy = 0
        self._cv = threading.Condition()
        self.aborted = False

    def take(self) -> Any:
        """The next follow-up task, else the next item, else None once nothing is left and nothing is being done
        (or the queue was aborted)."""
        with self._cv:
            while True:
                if self.aborted:
                    return None
                if self._tasks:
                    k = self._tasks.popleft()
                elif self._next < self._n:
                    k = self._next
                    self._next += 1
                elif self._busy == 0:
                    return None
                else:
                    self._cv.wait()
                    continue
                self._busy += 1
                return k

    def add(self, task) -> None:
        """A follow-up task, handed out before the next item."""
        with self._cv:
            self._tasks.append(task)
            self._cv.notify()

    def done(self) -> None:
        """The item or task the calling thread took is done (its follow-up tasks added)."""
        with self._cv:
            self._busy -= 1
            self._cv.notify_all()

    def abort(self) -> None:
        with self._cv:
            self.aborted = True
            self._cv.notify_all()


class ThreadFailed(RuntimeError):
    """An exception inside one of a batch's host threads, with the runs that thread was solving."""


def fan_out(work: Sequence[Callable[[], Any]], queue: RunQueue | TaskQueue) -> list:
    """Call each of ``work`` in its own host thread (`ThreadPoolExecutor`) and return their results in order. The
    first exception of a thread (re-raised here, with its runs named when the thread said them: `ThreadFailed`), or
    an interrupt of the caller, aborts ``queue``: the other threads stop after their current cycle, then it is
    raised."""
    with ThreadPoolExecutor(max_workers=len(work), thread_name_prefix="ufm-batch") as pool:
        futures = [pool.submit(w) for w in work]
        try:
            return [f.result() for f in futures]
        except BaseException:
            queue.abort()
            raise


def thread_failed(e: Exception, runs, what: str) -> ThreadFailed:
    """The `ThreadFailed` of exception ``e`` raised in a host thread of ``what`` while it held ``runs``."""
    return ThreadFailed(
        f"ufm.solve_batch: a host thread of the {what} engine failed while solving runs "
        f"{sorted(int(r) for r in runs if r >= 0)}: {type(e).__name__}: {e}"
    )


def to_device(a: np.ndarray) -> jax.Array:
    """A NumPy array on the default device, by ``jax.device_put`` (``jnp.asarray`` of a NumPy array compiles a
    small program per shape and dtype on first use; a transfer does not)."""
    return jax.device_put(np.asarray(a))


def merge_rows(done: Sequence[tuple[Any, Sequence[int]]], B: int):
    """The (B,)-batched result of a batch's host threads, from ``done`` = [(a thread's (B,)-batched result, the
    runs it solved), ...]: row i from the thread that solved run i (each thread's result holds only its own runs),
    joined on the host: no program to compile."""
    owner = np.zeros(B, np.int32)
    for t, (_, runs) in enumerate(done):
        owner[list(runs)] = t

    def pick(*xs):
        res = np.array(xs[0])
        for t in range(1, len(xs)):
            res[owner == t] = np.asarray(xs[t])[owner == t]
        return to_device(res)

    return jax.tree_util.tree_map(pick, *(o for o, _ in done))


def drain(
    queue: RunQueue | TaskQueue, do: Callable[[Any], Any], held: Callable[[Any], Sequence[int]], what: str
) -> None:
    """One host thread's loop over ``queue``: ``do(k)`` for every item k it takes (then `TaskQueue.done`), until the
    queue is empty or aborted; an exception becomes the `ThreadFailed` of ``what`` naming the runs ``held(k)`` of the
    item at hand."""
    k = None
    try:
        while (k := queue.take()) is not None:
            try:
                do(k)
            finally:
                if isinstance(queue, TaskQueue):
                    queue.done()
    except Exception as e:
        raise thread_failed(e, [] if k is None else held(k), what) from e


def share(B: int, S: int, threads: int) -> tuple[int, int]:
    """(threads, lanes per thread) of a batch of B runs: at most B threads, each with min(S, ceil(B / threads))
    lanes, so that the first loads use every thread."""
    n = max(1, min(threads, B))
    return n, max(1, min(S, -(-B // n)))


class Slots(NamedTuple):
    """The device state of S slots: each slot's solver state, records, numbers and run index (-1: empty)."""

    state: SolverState
    records: Records
    numbers: tuple  # (lam_H, lam_W, lam_b, lr) per slot
    run: jax.Array


def member_problem(problem, lH, lW, lb):
    """Run i of a batch: ``problem``'s shapes and modes with its own lambdas (leaves as given, no dtype change)."""
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(problem), [lH, lW, lb, problem.label_smoothing])


def _fresh(problem, inputs, ids, tol, rtol, cfg: Config, dtype):
    """Initial slot contents for runs ``ids`` (clipped to [0, B); the caller masks unused slots)."""
    start, lH, lW, lb, lrs, scales = inputs
    ids = jnp.clip(ids, 0, lH.shape[0] - 1)
    take = functools.partial(jax.tree_util.tree_map, lambda x: x[ids])

    def one(x0, h, w, b, lr):
        p = member_problem(problem, h, w, b)
        opt = make_optimizer(cfg.method, lr, cfg.momentum, cfg.memory_size, lazy=False)
        s = init(p, x0, opt, tol, rtol)
        return s, init_records(s, cfg)

    state, rec = jax.vmap(one)(
        start_params(problem, take(start), scales[ids], dtype), lH[ids], lW[ids], lb[ids], lrs[ids]
    )
    return state, rec, (lH[ids], lW[ids], lb[ids], lrs[ids])


_fresh_jit = jax.jit(_fresh, static_argnames=("cfg", "dtype"))


def start_params(problem, start, scales, dtype):
    """Initial parameters of a batch: ``start`` itself (``dtype=None``) or `init_params` of each key (drawn by
    `draw_params`, in ``lax.map``: XLA compiles threefry under ``vmap`` about 5x slower than once; same values)."""
    if dtype is None:
        return start
    return jax.lax.map(lambda a: draw_params(problem, a[0], a[1], dtype), (start, scales))


def _select(mask, a, b):
    return jax.tree_util.tree_map(lambda x, y: jnp.where(mask.reshape(mask.shape + (1,) * (x.ndim - 1)), x, y), a, b)


@functools.partial(jax.jit, static_argnames=("cfg", "dtype", "segment"), donate_argnames=("slots",))
def _cycle(problem, inputs, slots: Slots, load, tol, rtol, *, cfg: Config, dtype, segment: int):
    """Load runs ``load[s] >= 0`` into slot s, then advance every slot by up to ``segment`` steps."""
    state, rec, nums = _fresh(problem, inputs, load, tol, rtol, cfg, dtype)
    sel = load >= 0
    slots = Slots(
        _select(sel, state, slots.state),
        _select(sel, rec, slots.records),
        _select(sel, nums, slots.numbers),
        jnp.where(sel, load, slots.run),
    )

    def advance(state, rec, nums):
        h, w, b, lr = nums
        p = member_problem(problem, h, w, b)
        opt = make_optimizer(cfg.method, lr, cfg.momentum, cfg.memory_size, lazy=False)
        k0 = state.step

        def cond(c):
            s, _ = c
            return (s.status == RUNNING) & (s.step < cfg.max_steps) & (s.step - k0 < segment)

        def body(c):
            s, r = c
            # Under vmap the body runs for every slot, finished ones too (their result is discarded by the loop's
            # select). A finished slot at a stationary point would make a line search run to its maximum trials,
            # stalling the whole batch, so it steps with a zero gradient: direction 0, accepted at the first trial.
            live = s.status == RUNNING
            s_in = s._replace(grad=jax.tree_util.tree_map(lambda g: jnp.where(live, g, jnp.zeros_like(g)), s.grad))
            s = step(p, s_in, opt, tol, rtol, cfg.patience)
            return s, record(r, s, cfg)

        s, r = jax.lax.while_loop(cond, body, (state, rec))
        s = s._replace(
            status=jnp.where((s.status == RUNNING) & (s.step >= cfg.max_steps), MAX_STEPS, s.status).astype(jnp.int32)
        )
        return s, r

    state, rec = jax.vmap(advance)(slots.state, slots.records, slots.numbers)
    slots = slots._replace(state=state, records=rec)
    return slots, slots.state.status


@functools.partial(jax.jit, static_argnames=("cfg",), donate_argnames=("out",))
def _retire(out: Solution, slots: Slots, where, cfg: Config) -> Solution:
    """Scatter the slots' results into ``out`` at run indices ``where`` (index B drops the slot)."""
    sol = jax.vmap(lambda s, r: finish(s, r, cfg))(slots.state, slots.records)
    return jax.tree_util.tree_map(lambda o, x: o.at[where].set(x, mode="drop"), out, sol)


@functools.partial(jax.jit, static_argnames=("cfg", "B"))
def _allocate(slots: Slots, cfg: Config, B: int) -> Solution:
    sol = jax.vmap(lambda s, r: finish(s, r, cfg))(slots.state, slots.records)
    return jax.tree_util.tree_map(lambda x: jnp.zeros((B,) + x.shape[1:], x.dtype), sol)


def compiled_programs() -> int:
    """Number of compiled batched programs (the jit caches of `_cycle`, `_fresh`, `_retire`, `_allocate`)."""
    return sum(f._cache_size() for f in (_cycle, _fresh_jit, _retire, _allocate))  # type: ignore[attr-defined]  # jit's private cache counter; not in jax's stub


def solve_slots(
    problem,
    inputs,
    tol,
    rtol,
    cfg: Config,
    dtype,
    *,
    slots: int | None = None,
    segment: int | None = None,
    threads: int = 1,
) -> Solution:
    """Solve the B runs of ``inputs = (start, lam_H, lam_W, lam_b, lr, init_scale)`` (see module docstring).

    ``threads`` host threads each drive their own S slots (``slots``, default `DEFAULT_SLOTS`, at most
    ceil(B / threads)) over a shared queue of runs (`RunQueue`); each thread retires into its own (B,) result and
    `merge_rows` joins them. A run's arithmetic does not depend on its slot or thread."""
    B = int(np.shape(inputs[1])[0])
    S = DEFAULT_SLOTS if slots is None else int(slots)
    if S < 1:
        raise ValueError(f"slots must be a positive integer; got {slots!r}")
    key = cfg.method if isinstance(cfg.method, str) else "adam"
    seg = DEFAULT_SEGMENT[key] if segment is None else int(segment)
    if seg < 1:
        raise ValueError(f"segment must be a positive integer; got {segment!r}")
    n, S = share(B, S, threads)
    tol, rtol = to_device(np.asarray(tol, inputs[1].dtype)), to_device(np.asarray(rtol, inputs[1].dtype))
    queue = RunQueue(B)
    cycle = functools.partial(_cycle, problem, inputs, tol=tol, rtol=rtol, cfg=cfg, dtype=dtype, segment=seg)
    first = []
    for _ in range(n):  # each thread's first S runs, loaded here (one compiled program, before any thread starts)
        load = np.asarray([queue.take() for _ in range(S)], object)
        run_of = np.asarray([-1 if r is None else r for r in load], np.int64)
        ids = to_device(np.where(run_of >= 0, run_of, 0).astype(np.int32))
        state, rec, nums = _fresh_jit(problem, inputs, ids, tol, rtol, cfg=cfg, dtype=dtype)
        first.append((Slots(state, rec, nums, to_device(run_of.astype(np.int32))), run_of))
    if n == 1:
        return _drive_slots(cycle, cfg, B, queue, *first[0])[0]
    done = fan_out([functools.partial(_drive_slots, cycle, cfg, B, queue, *f) for f in first], queue)
    return merge_rows(done, B)


def _drive_slots(cycle, cfg: Config, B: int, queue: RunQueue, sl: Slots, run_of: np.ndarray):
    """One host thread of `solve_slots`: cycles of its slots ``sl`` (holding runs ``run_of``, -1: none) until the
    queue is empty and its slots are retired. Returns its (B,) result and the runs it solved."""
    out = None
    runs: list[int] = []
    load = np.full(run_of.shape, -1, np.int32)  # the first runs are loaded already
    try:
        while not queue.aborted:
            sl, status = cycle(sl, to_device(load))
            st = np.asarray(status)
            done = (st != RUNNING) & (run_of >= 0)
            load = np.full(run_of.shape, -1, np.int32)
            if done.any():
                if out is None:
                    out = _allocate(sl, cfg, B)
                out = _retire(out, sl, to_device(np.where(done, run_of, B).astype(np.int32)), cfg)
                runs += run_of[done].tolist()
                for s in np.flatnonzero(done):
                    nxt = queue.take()
                    run_of[s] = -1 if nxt is None else nxt
                    load[s] = run_of[s]
            if (run_of < 0).all():
                break
    except Exception as e:
        raise thread_failed(e, run_of, "slots") from e
    if out is None:  # a thread with no run (aborted before its first retire)
        out = _allocate(sl, cfg, B)
    return out, runs


# --- the lockstep engine: L-BFGS with one trial evaluation per slot per iteration ---------------------------------

DEFAULT_LANES = 16  # measured on the 2-core CPU: 16 lanes 2.3x faster than 64 at 1,000 runs (memory traffic)
DEFAULT_TICKS = 32


def trial_linesearch_defaults() -> dict:
    """The parameters of the trial line search that ``method="lbfgs"`` uses (the defaults of
    `ufm._linesearch.scale_by_trial_linesearch`, read from its signature so that the two cannot drift apart)."""
    sig = inspect.signature(scale_by_trial_linesearch)
    names = ("num_trials", "decrease_factor", "slope_rtol", "curv_rtol", "approx_dec_rtol", "max_stepsize")
    return {n: sig.parameters[n].default for n in names}


class Lanes(NamedTuple):
    """The device state of S lanes of the lockstep engine (every leaf has a leading axis S).

    Attributes:
      x, g: the accepted point x_k and grad f(x_k), flat (S, P).
      value, grad_norm, rel, best_value, best_grad_norm, last_improve, limit, step, status: as in
        `ufm._driver.SolverState`.
      lbfgs: the L-BFGS memory (`ufm._lbfgs.Memory`, one per lane).
      d, slope: the search direction at x_k and <g, d> < 0.
      a0, j: the first trial step of the current search and the index of the trial evaluated next (a0 r^j).
      has_dec, dec_a, dec_f, dec_g: the largest trial so far with a sufficient decrease (the search's fallback).
      fresh: the lane was just loaded; its next evaluation is at x_0 (the driver's ``init``).
      numbers: (lam_H, lam_W, lam_b, lr) of the lane's run.
      run: the run index (-1: empty).
      records: history and snapshots (`ufm._driver.Records`).
    """

    x: jax.Array
    g: jax.Array
    value: jax.Array
    grad_norm: jax.Array
    rel: jax.Array
    best_value: jax.Array
    best_grad_norm: jax.Array
    last_improve: jax.Array
    limit: jax.Array
    step: jax.Array
    status: jax.Array
    lbfgs: Any
    d: jax.Array
    slope: jax.Array
    a0: jax.Array
    j: jax.Array
    has_dec: jax.Array
    dec_a: jax.Array
    dec_f: jax.Array
    dec_g: jax.Array
    fresh: jax.Array
    numbers: tuple
    run: jax.Array
    records: Records


def _dot(a, b):
    """<a, b> of two flat vectors as a fused multiply-and-sum: under ``vmap`` XLA's CPU ``dot`` of S pairs of
    vectors is a loop of S tiny products (measured 25 ms per L-BFGS update for 128 lanes, against 1 ms here)."""
    return jnp.sum(a * b)


def _state_of(problem, lane: Lanes, unravel) -> SolverState:
    """The `ufm._driver.SolverState` of one lane (for `record` and `finish`; no optax state)."""
    return SolverState(
        lane.step,
        unravel(lane.x),
        None,
        lane.value,
        unravel(lane.g),
        lane.grad_norm,
        lane.rel,
        lane.best_value,
        lane.best_grad_norm,
        lane.last_improve,
        lane.limit,
        lane.status,
    )


def _where(c, a, b):
    return jax.tree_util.tree_map(lambda x, y: jnp.where(c, x, y), a, b)


def _search(lane: Lanes, a, ft, gt, dft, M: int):
    """The trial line search's rule (`ufm._linesearch`) on the trial a just evaluated (f, grad f, slope along d):
    acceptable = decrease & curvature; the first acceptable trial in the order a0, a0 r, ... is the largest; after M
    trials without one, the largest with a decrease (remembered in the lane), else no step. Returns (acceptable,
    decrease, the search ends, a step is taken, and the step's a, f and grad f)."""
    ls = trial_linesearch_defaults()
    c1, c2, eps = ls["slope_rtol"], ls["curv_rtol"], ls["approx_dec_rtol"]
    dt = lane.value.dtype
    v, s = lane.value, lane.slope
    armijo = ft <= v + c1 * a * s
    approx = (ft <= v + eps * jnp.abs(v)) & (dft <= (2 * c1 - 1) * s)
    dec = jnp.isfinite(ft) & jnp.isfinite(dft) & (armijo | approx)
    ok = dec & (dft >= c2 * s)
    commit = ~lane.fresh & (ok | (lane.j >= M - 1))
    use_dec = ~ok & lane.has_dec
    took = ok | lane.has_dec | dec
    a_c = jnp.where(ok, a, jnp.where(use_dec, lane.dec_a, jnp.where(dec, a, 0.0))).astype(dt)
    f_c = jnp.where(ok, ft, jnp.where(use_dec, lane.dec_f, jnp.where(dec, ft, v)))
    g_c = jnp.where(ok, gt, jnp.where(use_dec, lane.dec_g, jnp.where(dec, gt, lane.g)))
    return ok, dec, commit, took, a_c, f_c, g_c


def _stopping(lane: Lanes, k, vn, gnorm, rel, tol, rtol, cfg: Config):
    """The driver's status at the new point (`ufm._driver.init` for a fresh lane, `ufm._driver.step` otherwise),
    with the last improving step and the divergence limit."""
    fresh, dt = lane.fresh, lane.value.dtype
    conv = (gnorm <= tol) | (rel <= rtol)
    finite0 = jnp.isfinite(vn) & jnp.isfinite(gnorm)
    status0 = jnp.where(~finite0, NONFINITE_INIT, jnp.where(conv, CONVERGED, RUNNING))
    improved = (vn < lane.best_value) | (gnorm < lane.best_grad_norm)
    last_imp = jnp.where(fresh, 0, jnp.where(improved, k, lane.last_improve)).astype(jnp.int32)
    bad = ~jnp.isfinite(vn) | ~jnp.isfinite(gnorm) | (vn > lane.limit)
    floor = RESOLVE_FLOOR["float64" if dt == jnp.float64 else "float32"]
    stalled = jnp.where(rel <= floor, PRECISION_FLOOR, STALLED)
    status1 = jnp.where(
        bad, DIVERGED, jnp.where(conv, CONVERGED, jnp.where(k - last_imp >= cfg.patience, stalled, RUNNING))
    )
    status = jnp.where(fresh, status0, status1)
    status = jnp.where((status == RUNNING) & (k >= cfg.max_steps), MAX_STEPS, status).astype(jnp.int32)
    limit = jnp.where(fresh, DIVERGENCE_FACTOR * jnp.maximum(1.0, jnp.abs(vn)), lane.limit).astype(dt)
    return status, last_imp, limit


def _tick(problem, lane: Lanes, tol, rtol, cfg: Config, unravel):
    """One iteration of one lane: ONE value-and-gradient evaluation, then the state machine (`solve_lockstep`)."""
    ls = trial_linesearch_defaults()
    M, r, amax = ls["num_trials"], ls["decrease_factor"], ls["max_stepsize"]
    dt = lane.value.dtype
    h, w, b, lr = lane.numbers
    p = member_problem(problem, h, w, b)

    def f(z):
        return objective(p, unravel(z))

    # records and the L-BFGS memory are written once, below (no select over the largest arrays)
    rec, mem = lane.records, lane.lbfgs
    lane = lane._replace(records=None, lbfgs=None)  # type: ignore[arg-type]  # restored before the return
    active = lane.fresh | (lane.status == RUNNING)
    a = jnp.where(lane.fresh, jnp.zeros((), dt), lane.a0 * r ** lane.j.astype(dt)).astype(dt)
    xt = lane.x + (a * lane.d).astype(dt)
    ft, gt = jax.value_and_grad(f)(xt)
    ft = ft.astype(dt)
    dft = _dot(gt, lane.d).astype(dt)

    ok, dec, commit, took, a_c, f_c, g_c = _search(lane, a, ft, gt, dft, M)
    x_c = lane.x + (a_c * lane.d).astype(dt)
    next_a0 = jnp.where(took, jnp.minimum(amax, a_c / r), lane.a0 * r ** (M - 1) * r).astype(dt)

    # the new accepted point: x_0 for a fresh lane (the driver's init), x_{k+1} after a committed search (its step)
    fresh = lane.fresh
    xn = jnp.where(fresh, xt, x_c)
    vn = jnp.where(fresh, ft, f_c)
    gn_vec = jnp.where(fresh, gt, g_c)
    gnorm = jnp.linalg.norm(gn_vec)
    rel = rel_grad(p, unravel(xn), unravel(gn_vec))
    k = jnp.where(fresh, 0, lane.step + 1).astype(jnp.int32)
    status, last_imp, limit = _stopping(lane, k, vn, gnorm, rel, tol, rtol, cfg)

    # the next direction (L-BFGS two-loop recursion, then the line search's descent check)
    new = active & (fresh | commit)
    u, lb_state = lbfgs_core.update(mem, xn, gn_vec, where=new)
    dn = (-lr * u).astype(dt)
    sn = _dot(gn_vec, dn).astype(dt)
    ascent = ~(sn < 0)
    dn = jnp.where(ascent, -gn_vec, dn)
    sn = jnp.where(ascent, -_dot(gn_vec, gn_vec).astype(dt), sn)

    searching = active & ~new
    remember = searching & dec & ~ok & ~lane.has_dec
    moved = lane._replace(
        x=xn,
        g=gn_vec,
        value=vn,
        grad_norm=gnorm,
        rel=rel,
        best_value=jnp.where(fresh, vn, jnp.minimum(lane.best_value, vn)),
        best_grad_norm=jnp.where(fresh, gnorm, jnp.minimum(lane.best_grad_norm, gnorm)),
        last_improve=last_imp,
        limit=limit,
        step=k,
        status=status,
        d=dn,
        slope=sn,
        a0=jnp.where(fresh, jnp.asarray(amax, dt), next_a0),
        j=jnp.zeros((), jnp.int32),
        has_dec=jnp.zeros((), bool),
        fresh=jnp.zeros((), bool),
    )
    waiting = lane._replace(
        j=lane.j + 1,
        has_dec=lane.has_dec | remember,
        dec_a=jnp.where(remember, a, lane.dec_a),
        dec_f=jnp.where(remember, ft, lane.dec_f),
        dec_g=jnp.where(remember, gt, lane.dec_g),
    )
    lane = _where(new, moved, _where(searching, waiting, lane))
    # a lane that did not move rewrites its current entry with the same numbers (record is idempotent then)
    return lane._replace(records=record(rec, _state_of(problem, lane, unravel), cfg), lbfgs=lb_state)


def _load(problem, x0, nums, lanes: Lanes | None, load, cfg: Config, unravel) -> Lanes:
    """Lanes ``load[s] >= 0`` take run ``load[s]``: start point x0[run], its numbers, fresh optimiser and records."""
    ids = jnp.clip(load, 0, x0.shape[0] - 1)
    dt = x0.dtype
    S = load.shape[0]
    xs = x0[ids]
    z = jnp.zeros((S,), dt)
    i0 = jnp.zeros((S,), jnp.int32)

    def blank(x):
        nan = jnp.full((), jnp.nan, dt)
        return SolverState(i0[0], unravel(x), None, nan, None, nan, nan, nan, nan, i0[0], nan, i0[0])

    fresh = Lanes(
        x=xs,
        g=jnp.zeros_like(xs),
        value=z,
        grad_norm=z,
        rel=z,
        best_value=z,
        best_grad_norm=z,
        last_improve=i0,
        limit=z,
        step=i0,
        status=jnp.full((S,), RUNNING, jnp.int32),
        lbfgs=jax.vmap(lambda x: lbfgs_core.init(x, cfg.memory_size))(xs),
        d=jnp.zeros_like(xs),
        slope=z,
        a0=z,
        j=i0,
        has_dec=jnp.zeros((S,), bool),
        dec_a=z,
        dec_f=z,
        dec_g=jnp.zeros_like(xs),
        fresh=jnp.ones((S,), bool),
        numbers=jax.tree_util.tree_map(lambda a: a[ids], nums),
        run=load,
        records=jax.vmap(lambda x: init_records(blank(x), cfg))(xs),
    )
    return fresh if lanes is None else _select(load >= 0, fresh, lanes)


def _finish_lanes(problem, lanes: Lanes, cfg: Config, unravel) -> Solution:
    return jax.vmap(lambda ln: finish(_state_of(problem, ln, unravel), ln.records, cfg))(lanes)


@functools.partial(jax.jit, static_argnames=("cfg", "ticks"), donate_argnames=("lanes", "out"))
def _lockstep_cycle(problem, x0, nums, lanes: Lanes, out: Solution, where, load, tol, rtol, *, cfg: Config, ticks):
    """Retire lanes into ``out`` at ``where`` (index B: none), load runs ``load`` (-1: none), then run up to ``ticks``
    iterations of every lane (fewer when no lane is active). Returns the lanes, ``out`` and each lane's status."""
    unravel = unraveler(problem, x0.dtype)
    B = x0.shape[0]

    def retire(o):
        sol = _finish_lanes(problem, lanes, cfg, unravel)
        return jax.tree_util.tree_map(lambda a, y: a.at[where].set(y, mode="drop"), o, sol)

    out = jax.lax.cond((where < B).any(), retire, lambda o: o, out)
    # loading builds S fresh lanes (L-BFGS memories included) and selects: only in cycles that load
    lanes = jax.lax.cond(
        (load >= 0).any(), lambda ln: _load(problem, x0, nums, ln, load, cfg, unravel), lambda ln: ln, lanes
    )

    def live(ln):
        return (ln.run >= 0) & (ln.fresh | (ln.status == RUNNING))

    def cond(c):
        i, ln = c
        return (i < ticks) & live(ln).any()

    def body(c):
        i, ln = c
        tick = functools.partial(_tick, problem, tol=tol, rtol=rtol, cfg=cfg, unravel=unravel)
        return i + 1, jax.vmap(tick)(ln)

    _, lanes = jax.lax.while_loop(cond, body, (jnp.int32(0), lanes))
    return lanes, out, jnp.where(live(lanes), RUNNING, lanes.status)


@functools.partial(jax.jit, static_argnames=("cfg", "dtype", "S", "copies"))
def _lockstep_start(problem, inputs, *, cfg: Config, dtype, S: int, copies: int = 1):
    """The flat start points (B, P) of a batch, its numbers, and ``copies`` sets of empty lanes and empty results
    (one per host thread: each is donated to its own cycles)."""
    start, lH, lW, lb, lrs, scales = inputs
    x0 = start_params(problem, start, scales, dtype)
    x0 = jax.vmap(lambda p: ravel_pytree(p)[0])(x0)
    nums = (lH, lW, lb, lrs)
    unravel = unraveler(problem, x0.dtype)
    lanes, outs = [], []
    for c in range(copies):
        ln = _load(problem, x0, nums, None, (jnp.arange(S, dtype=jnp.int32) + c) % x0.shape[0], cfg, unravel)
        ln = ln._replace(run=jnp.full((S,), -1, jnp.int32), status=jnp.full((S,), MAX_STEPS, jnp.int32))
        sol = _finish_lanes(problem, ln, cfg, unravel)
        lanes.append(ln)
        outs.append(jax.tree_util.tree_map(lambda a: jnp.zeros((x0.shape[0],) + a.shape[1:], a.dtype), sol))
    return x0, nums, tuple(lanes), tuple(outs)


def solve_lockstep(
    problem,
    inputs,
    tol,
    rtol,
    cfg: Config,
    dtype,
    *,
    lanes: int | None = None,
    ticks: int | None = None,
    threads: int = 1,
) -> Solution:
    """Solve the B runs of ``inputs = (start, lam_H, lam_W, lam_b, lr, init_scale)`` with L-BFGS in lockstep.

    S lanes (``lanes``, default `DEFAULT_LANES`, at most ceil(B / threads)) hold one run each. Every iteration
    evaluates f and its gradient ONCE per lane, for all lanes in one ``vmap`` (batched matrix products), and
    advances each lane's state machine: a fresh lane evaluates x_0 (the driver's ``init``); a searching lane
    evaluates its next trial step a0 r^j of the trial line search (`ufm._linesearch`, the same acceptance rule: the
    first acceptable trial in the order a0, a0 r, ..., else after M trials the largest with a sufficient decrease,
    else no step), and on acceptance takes the step, applies the driver's stopping rule (`ufm._driver`, with its
    ``rel_grad``) and computes the next L-BFGS direction. A run thus takes the steps of `ufm.solve`, at one
    evaluation per iteration instead of a nested loop. Between segments of ``ticks`` iterations (default
    `DEFAULT_TICKS`) the host reads the S statuses, retires finished runs into the (B,) result and loads pending
    runs into their lanes; only S statuses and indices cross between host and device.

    ``threads`` host threads each drive their own S lanes over a shared queue of runs (`RunQueue`), at the same
    time on a CPU (each thread's call of the compiled cycle runs on that thread); each retires into its own (B,)
    result and `merge_rows` joins them. A lane's arithmetic does not depend on the other lanes, so run i's result
    does not depend on the thread count.
    """
    B = int(np.shape(inputs[1])[0])
    S = DEFAULT_LANES if lanes is None else int(lanes)
    T = DEFAULT_TICKS if ticks is None else int(ticks)
    if S < 1:
        raise ValueError(f"lanes must be a positive integer; got {lanes!r}")
    if T < 1:
        raise ValueError(f"ticks must be a positive integer; got {ticks!r}")
    n, S = share(B, S, threads)
    dt = inputs[1].dtype
    tol, rtol = to_device(np.asarray(tol, dt)), to_device(np.asarray(rtol, dt))
    x0, nums, lns, outs = _lockstep_start(problem, inputs, cfg=cfg, dtype=dtype, S=S, copies=n)
    cycle = functools.partial(_lockstep_cycle, problem, x0, nums, tol=tol, rtol=rtol, cfg=cfg, ticks=T)
    queue = RunQueue(B)
    if n == 1:
        return _drive_lockstep(cycle, B, queue, lns[0], outs[0])[0]
    # compiled here, before the threads start: a cycle that retires and loads nothing runs zero iterations
    first = cycle(lns[0], outs[0], to_device(np.full(S, B, np.int32)), to_device(np.full(S, -1, np.int32)))
    lns, outs = (first[0],) + lns[1:], (first[1],) + outs[1:]
    done = fan_out([functools.partial(_drive_lockstep, cycle, B, queue, lns[t], outs[t]) for t in range(n)], queue)
    return merge_rows(done, B)


def _drive_lockstep(cycle, B: int, queue: RunQueue, ln: Lanes, out: Solution):
    """One host thread of `solve_lockstep`: cycles of its lanes ``ln`` until the queue is empty and every lane is
    retired into its (B,) result ``out``. Returns ``out`` and the runs it solved."""
    S = ln.run.shape[0]
    run_of = np.full(S, -1, np.int64)
    where = np.full(S, B, np.int32)
    load = np.full(S, -1, np.int32)
    runs: list[int] = []
    try:
        while True:
            for s in np.flatnonzero(run_of < 0):
                nxt = queue.take()
                if nxt is None:
                    break
                load[s] = run_of[s] = nxt
            if (run_of < 0).all() or queue.aborted:
                # a last cycle only to retire (no lane is loaded, none is live: zero iterations)
                ln, out, _ = cycle(ln, out, to_device(where), to_device(np.full(S, -1, np.int32)))
                return out, runs
            ln, out, status = cycle(ln, out, to_device(where), to_device(load))
            st = np.asarray(status)
            done = (st != RUNNING) & (run_of >= 0)
            where = np.where(done, run_of, B).astype(np.int32)
            runs += run_of[done].tolist()
            load = np.full(S, -1, np.int32)
            run_of[done] = -1
    except Exception as e:
        raise thread_failed(e, run_of, "lockstep") from e
