"""The batched engine of `ufm.solve_batch`: slots, segments, retirement and refill.

A ``vmap``ped ``while_loop`` runs until its slowest member stops, so a batch whose step counts spread (median 198,
max 3,307 on the deep ReLU benchmark) costs B times the slowest run. Here the runs advance on S device slots in
segments of at most ``segment`` steps (one compiled program, `_cycle`); between segments the host reads the S
statuses, retires finished runs into the (B,)-batched result on the device (`_retire`) and refills their slots
with pending runs (initialised inside `_cycle`). Only S statuses and S run indices cross between host and device;
states, histories and results stay on the device. A batch thus costs about (sum of its runs' steps) / S segments
of S-wide steps, plus the tail where fewer than S runs remain.

Each slot runs exactly the driver of `ufm.solve` (`ufm._driver.init`/`step`, the same stopping rule) on its own
problem numbers, so run i ends where ``ufm.solve`` of problem i ends up to the rounding of batched arithmetic.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

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
    step,
)
from ._solution import MAX_STEPS, RUNNING, Solution

DEFAULT_SLOTS = 64
DEFAULT_SEGMENT = {"lbfgs": 25, "gd": 500, "momentum": 500, "adam": 500}


class Slots(NamedTuple):
    """The device state of S slots: each slot's solver state, records, numbers and run index (-1: empty)."""

    state: SolverState
    records: Records
    numbers: tuple  # (lam_H, lam_W, lam_b, lr) per slot
    run: jax.Array


def _problem_of(problem, lH, lW, lb):
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(problem), [lH, lW, lb, problem.label_smoothing])


def _fresh(problem, inputs, ids, tol, rtol, cfg: Config, dtype):
    """Initial slot contents for runs ``ids`` (clipped to [0, B); the caller masks unused slots)."""
    start, lH, lW, lb, lrs, scales = inputs
    ids = jnp.clip(ids, 0, lH.shape[0] - 1)
    take = functools.partial(jax.tree_util.tree_map, lambda x: x[ids])

    def one(x0, h, w, b, lr):
        p = _problem_of(problem, h, w, b)
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
        p = _problem_of(problem, h, w, b)
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
    problem, inputs, tol, rtol, cfg: Config, dtype, *, slots: int | None = None, segment: int | None = None
) -> Solution:
    """Solve the B runs of ``inputs = (start, lam_H, lam_W, lam_b, lr, init_scale)`` (see module docstring)."""
    B = int(np.shape(inputs[1])[0])
    S = min(B, DEFAULT_SLOTS if slots is None else int(slots))
    if S < 1:
        raise ValueError(f"slots must be a positive integer; got {slots!r}")
    key = cfg.method if isinstance(cfg.method, str) else "adam"
    seg = DEFAULT_SEGMENT[key] if segment is None else int(segment)
    if seg < 1:
        raise ValueError(f"segment must be a positive integer; got {segment!r}")
    tol, rtol = jnp.asarray(tol, inputs[1].dtype), jnp.asarray(rtol, inputs[1].dtype)
    run_of = np.full(S, -1, np.int64)
    load = np.arange(S, dtype=np.int32)
    run_of[:] = load
    nxt = S
    # slot contents before the first load: a copy of the first S runs (every slot is loaded by the first cycle)
    state, rec, nums = _fresh_jit(problem, inputs, jnp.asarray(load), tol, rtol, cfg=cfg, dtype=dtype)
    sl = Slots(state, rec, nums, jnp.asarray(load))
    load = np.full(S, -1, np.int32)  # already loaded
    out = None
    while True:
        sl, status = _cycle(problem, inputs, sl, jnp.asarray(load), tol, rtol, cfg=cfg, dtype=dtype, segment=seg)
        st = np.asarray(status)
        done = (st != RUNNING) & (run_of >= 0)
        load = np.full(S, -1, np.int32)
        if done.any():
            if out is None:
                out = _allocate(sl, cfg, B)
            where = np.where(done, run_of, B).astype(np.int32)
            out = _retire(out, sl, jnp.asarray(where), cfg)
            for s in np.flatnonzero(done):
                if nxt < B:
                    load[s] = nxt
                    run_of[s] = nxt
                    nxt += 1
                else:
                    run_of[s] = -1
        if (run_of < 0).all():
            assert out is not None  # every run was retired into out
            return out
        if not (load >= 0).any() and not (st[run_of >= 0] == RUNNING).any():
            assert out is not None  # no slot is running, so each was retired into out
            return out
