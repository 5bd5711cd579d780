"""`ufm.solve` and `ufm.solve_batch`: validation, then one compiled program (the engine is `ufm._driver`).

The stopping rule and the statuses are documented in `ufm._driver` (scale-aware stationarity, shared with
`ufm.check`); the options and their defaults in `ufm._options`.
"""

from __future__ import annotations

import functools
import math
import threading
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ._batch import (
    RunQueue,
    TaskQueue,
    check_threads,
    drain,
    fan_out,
    member_problem,
    solve_lockstep,
    solve_slots,
    start_params,
    to_device,
)
from ._driver import (
    Config,
    Throttle,
    catch_sigint,
    compiled_programs,
    register_progress,
    run,
    run_jit,
    unregister_progress,
)
from ._kinks import apply_polish, certify_close, needs_polish, polish_run, solve_cap
from ._kinks import polish as polish_kinks
from ._model import Params, check_params
from ._options import (
    DEFAULT_INIT_SCALE,
    DEFAULT_LR,
    DEFAULT_MAX_STEPS,
    LBFGS_LINESEARCH,
    METHODS,
    SolverOptions,
    auto_init_scale,
    check_dtype,
    check_memory,
    default_rtol,
    default_tol,
    resolve_init_scale,
    solver_options,
)
from ._problem import UFM, is_concrete
from ._solution import CONVERGED, MAX_STEPS, MESSAGES, PRECISION_FLOOR, STALLED, ZERO_SADDLE, Solution

__all__ = [
    "DEFAULT_LR",
    "DEFAULT_MAX_STEPS",
    "METHODS",
    "compiled_programs",
    "default_rtol",
    "default_tol",
    "solve",
    "solve_batch",
]

RESTART_SCALE = 1.0  # an init_scale="auto" run that ends at the zero saddle restarts once from this scale
PROGRESS_EVERY = {"lbfgs": 100, "gd": 1000, "momentum": 1000, "adam": 1000}  # measured: a report every 10 L-BFGS steps
# costs 1.5-2x the run time of a small problem; every 100 keeps Ctrl-C well under a second


def _canonical(problem: UFM, dtype) -> UFM:
    """The problem with every array leaf (lambdas, label smoothing) as a non-weak array of the solve dtype.

    jit keys its cache on each leaf's dtype *and* weak type, so without this a problem built from NumPy
    scalars or a per-layer lam_W list (strong float64) and one built from Python floats (weak) would compile
    the solver twice. The objective casts the leaves to the parameter dtype anyway, so values are unchanged.
    Concrete leaves become NumPy arrays (`host_array`): no eager XLA program per leaf before the solve.
    """
    return jax.tree_util.tree_map(lambda x: host_array(x, dtype), problem)


def host_array(x, dtype):
    """``x`` as a non-weak array of ``dtype``: a NumPy array when ``x`` is concrete (a cast on the host compiles
    nothing; ``jnp.asarray`` compiles a small XLA program per new shape and dtype, about 15-60 ms each in a fresh
    process), ``jnp.asarray`` for a tracer."""
    return np.asarray(x, dtype) if is_concrete(x) else jnp.asarray(x, dtype)


def num_params(problem: UFM) -> int:
    """The number of scalar parameters of ``problem`` (H, every W_l, b)."""
    hs, ws, bs = problem.param_shapes()
    return math.prod(hs) + sum(math.prod(w) for w in ws) + (math.prod(bs) if bs else 0)


def _key(key, name="key"):
    """A typed PRNG key from ``key``: a key, raw threefry key data (2,) uint32, an integer seed, or None (seed 0)."""
    if key is None:
        return seed_key(0)
    if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
        if not 0 <= int(key) < 2**63:
            raise ValueError(f"{name} must be a jax.random.key or an integer seed in [0, 2**63); got {key!r}")
        return seed_key(int(key))
    if isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key) and key.shape == ():
        return key
    if isinstance(key, jax.Array) and key.dtype == jnp.uint32 and key.shape == (2,):
        return jax.random.wrap_key_data(key)
    raise TypeError(f"{name} must be a jax.random.key or an integer seed; got {key!r}")


def seed_key(seed: int) -> jax.Array:
    """``jax.random.key(seed)`` for an integer seed in [0, 2**63), without an eager XLA program.

    JAX's threefry seeding is the key data (seed >> 32, seed & 0xFFFFFFFF) as uint32 (``_threefry_seed``; without
    x64 the seed is int32 and the high word 0), computed here in NumPy and wrapped (`jax.random.wrap_key_data`
    compiles nothing); ``jax.random.key`` compiles two small programs (about 60-100 ms in a fresh process). Other
    default key implementations, and seeds >= 2**31 without x64, go through ``jax.random.key`` (tested equal)."""
    x64 = bool(jax.config.jax_enable_x64)  # type: ignore[attr-defined]  # runtime config attribute
    impl = str(jax.config.jax_default_prng_impl)  # type: ignore[attr-defined]  # runtime config attribute
    if impl != "threefry2x32" or not (x64 or seed < 2**31):
        return jax.random.key(seed)
    data = np.array([seed >> 32, seed & 0xFFFFFFFF], np.uint32)
    return jax.random.wrap_key_data(data)  # type: ignore[arg-type]  # a NumPy array is accepted (no eager program)


def zero_point_loss(problem: UFM) -> float:
    """f(0): the fit of the zero output, 1/2 for MSE (||Y||^2 / (2N) with one-hot Y) and log K for CE."""
    return 0.5 if problem.loss == "mse" else math.log(problem.num_classes)


def at_zero_saddle(problem: UFM, value) -> bool:
    """True when a run ended at the zero point's loss (|f - f(0)| <= 1e-6 f(0)) of a problem whose predicted minimum
    (`ufm.predict`) is below f(0) by more than 1e-4 relative: zero is then a saddle or a spurious local minimum."""
    f0 = zero_point_loss(problem)
    if not abs(float(value) - f0) <= 1e-6 * f0:
        return False
    from ._theory import predict  # core -> core; only reached for runs that end at the zero loss

    try:
        pred = float(predict(problem).loss)
    except Exception:  # noqa: BLE001 - no prediction for this family: make no claim
        return False
    return bool(np.isfinite(pred) and pred < f0 * (1 - 1e-4))


def _print_progress(step, value, grad_norm):
    import sys

    sys.stderr.write(f"\rstep {step:>8d}   f = {value:.12e}   |grad f| = {grad_norm:.2e} ")
    sys.stderr.flush()


def solve(
    problem: UFM,
    key: jax.Array | int | None = None,
    *,
    init: Params | None = None,
    method: str | optax.GradientTransformation = "lbfgs",
    lr: float | None = None,
    max_steps: int | None = None,
    tol: float | None = None,
    init_scale: float | str = DEFAULT_INIT_SCALE,
    dtype=None,
    patience: int | None = None,
    history: bool = True,
    history_every: int = 1,
    snapshot_every: int | None = None,
    momentum: float = 0.9,
    memory_size: int = 10,
    throw: bool = False,
    rtol: float | None = None,
    progress=None,
    progress_every: int | None = None,
    polish: bool | None = None,
) -> Solution:
    """Minimise the UFM objective from one starting point; initialisation and the whole loop are one compiled
    program, followed for ReLU models by a kink polish when the run stalls at a ReLU kink.

    Stopping rule (`ufm._driver`): converged when the scale-aware stationarity

        rel_grad = ||g|| / (||grad fit|| + ||grad reg||)  <=  rtol

    (0 when both vanish), or when ``||g||_2 <= tol`` if an absolute ``tol`` is given. rel_grad does not depend
    on lambda or on the loss scale, so "converged" means the same at every lambda and dtype.

    **"converged" means 0 is in the (Clarke) subdifferential to rtol.** At smooth points g = grad f. A deep ReLU
    run that stalls (stalled or precision_floor) at ReLU kinks is finished by the kink polish (`ufm._kinks`: the
    pre-activations near 0 held at 0, the smooth piece solved by an augmented Lagrangian) and accepted when some
    g = grad fit_s + grad reg, with ReLU slopes s in [0, 1] at the kinks, has rel_grad <= rtol and the loss did
    not rise; ``grad_norm`` and ``rel_grad`` then carry that kink-aware measure.

    Args:
      problem: a `ufm.UFM`.
      key: a `jax.random.key` (or an int seed) for `init_params`; ignored when ``init`` is given.
      init: explicit starting `Params` (their dtype is used).
      method: ``"lbfgs"`` (default: L-BFGS, memory ``memory_size``, with a zoom/strong-Wolfe line search;
        fastest to high precision), ``"gd"`` (full-batch gradient descent with fixed ``lr``, the papers'
        recipe), ``"momentum"`` (heavy ball, ``optax.sgd(lr, momentum)``), ``"adam"``, or any
        `optax.GradientTransformation`, line-search ones included (``optax.lbfgs()``): the driver passes
        ``value``, ``grad`` and ``value_fn`` to every transformation.
      lr: learning rate (defaults: gd/momentum 0.1, adam 1e-3; for lbfgs a step scale, 1.0). May be a JAX
        scalar: new values do not recompile.
      max_steps: step budget (default 10,000 for lbfgs, 100,000 for first-order methods).
      tol: absolute tolerance on ||g||_2 (default: none, only the relative test).
      init_scale: scale of the random init (see `init_params`), or ``"auto"`` (default;
        `ufm._options.auto_init_scale`: the larger of a measured depth rule and a start whose end-to-end product is
        4 times the edge of the zero point's basin, derived from the depth, widths, class sizes and lambdas; at
        most 1). An ``"auto"`` run that still ends at the zero saddle while theory predicts a lower minimum
        restarts once from the same key at scale 1.0, with a RuntimeWarning saying so (``num_steps`` then counts
        both runs; history and snapshots are the restart's).
      dtype: float32 or float64 (default: JAX's default float; ignored with ``init``).
      patience: steps without improvement of the best loss or best gradient norm before status "stalled"
        (default 50 for lbfgs, 1000 otherwise).
      history: record loss and gradient norm every ``history_every`` steps (NaN-padded to max_steps).
      snapshot_every: save the parameters every so many steps (memory: max_steps/snapshot_every copies).
        History and snapshots are preallocated: a solve needing more than 2 GiB is refused with the estimate.
      momentum: heavy-ball coefficient in [0, 1) for ``method="momentum"``.
      memory_size: L-BFGS memory.
      throw: raise RuntimeError unless the run converged (for interactive use; never inside vmap).
      rtol: relative stationarity tolerance (default 1e-7 in float64, 1e-4 in float32).
      progress: None, True (a status line on stderr) or a callable ``progress(step, value, grad_norm)``, called
        from inside the compiled loop (at most every 0.1 s, and at the end). The numbers are identical with and
        without it. With a progress handler (or an explicit ``progress_every``), Ctrl-C in the main thread ends
        the solve at the next report with status "interrupted" and the point reached; a second Ctrl-C raises.
        Without either, the program has no host callback, so JAX's persistent compilation cache can keep it.
      progress_every: steps between reports (default with a handler: 100 for lbfgs, 1000 otherwise).
      polish: run the kink polish on stalled ReLU runs, and on max_steps runs with rel_grad <= 1e-3
        (`ufm._kinks.needs_polish`; default: True for ReLU models with L >= 2; ignored otherwise; False keeps
        the optimiser's own end point). Its program compiles once per problem shape and dtype; its steps are in
        ``polish_steps``.

    Returns:
      A `Solution` (status 0 converged, 1 max_steps, 2 non-finite init, 3 diverged, 4 stalled, 5 at the zero
      saddle, 6 interrupted, 7 precision floor of the dtype; ``message`` says what to do next). Never raises for
      numerical failure unless ``throw=True``.

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
    start, dt = _start(problem, key, init, init_scale, dtype)
    o = solver_options(
        method,
        lr,
        max_steps,
        tol,
        patience,
        history_every,
        snapshot_every,
        dt,
        rtol=rtol,
        momentum=momentum,
        memory_size=memory_size,
    )
    check_memory(num_params(problem), dt.itemsize, o, history=history)
    progress, every = _progress_options(progress, progress_every, method)
    polish = resolve_polish(problem, polish)
    cfg = _config(o, history, every)
    sol = _solve_from(problem, start, o, cfg, progress, dt, polish)
    if init is None and isinstance(init_scale, str):
        sol = _restart_at_zero_saddle(problem, sol, start, o, cfg, progress, dt, polish)
    if throw and int(sol.status) != CONVERGED:
        raise RuntimeError(f"ufm.solve did not converge (status {int(sol.status)}): {MESSAGES[int(sol.status)]}")
    return sol


def _restart_at_zero_saddle(problem: UFM, sol: Solution, start, o, cfg, progress, dt, polish) -> Solution:
    """An ``init_scale="auto"`` run that ended at the zero saddle, run again once from the same key at
    `RESTART_SCALE` (the same compiled program: the scale is dynamic), with a RuntimeWarning; else ``sol``.

    The safety net of the rule: `ufm._options.escape_scale` estimates the zero basin's edge from a one-direction
    model (to a factor of about 1.3 where measured), and the rule keeps the product only 4x above it (a larger
    start makes deep linear models crawl), so a start can still fall in the basin."""
    if int(sol.status) != ZERO_SADDLE or not float(start[1]) < RESTART_SCALE:
        return sol
    first = int(sol.num_steps)
    sol = _solve_from(problem, (start[0], host_array(RESTART_SCALE, dt)), o, cfg, progress, dt, polish)
    warnings.warn(
        f"ufm.solve: init_scale='auto' (s = {float(start[1]):.4g}) ended at the zero saddle after {first} steps; "
        f"restarted once from init_scale={RESTART_SCALE} (status {sol.status_name}; num_steps counts both runs, "
        "history and snapshots are those of the restart). Pass init_scale explicitly to choose.",
        RuntimeWarning,
        stacklevel=3,
    )
    return sol._replace(num_steps=sol.num_steps + first)


def _solve_from(problem: UFM, start, o: SolverOptions, cfg: Config, progress, dt, polish: bool) -> Solution:
    """One compiled run from ``start``, the kink polish of a stalled ReLU run, and the zero-saddle status."""
    sol = _run(_canonical(problem, dt), start, o, cfg, progress, dt)
    status = int(sol.status)
    if polish and bool(needs_polish(status, sol.rel_grad)):
        sol = _polish(polish_problem(problem, sol.value.dtype), sol, o)
        status = int(sol.status)
    if status in (CONVERGED, MAX_STEPS, STALLED, PRECISION_FLOOR) and at_zero_saddle(problem, sol.value):
        sol = sol._replace(status=jax.device_put(np.int32(ZERO_SADDLE)))
    return sol


def _start(problem: UFM, key, init, init_scale, dtype):
    """Validate the starting point: (explicit `Params`, their dtype) or ((key, init_scale), the solve dtype)."""
    if init is not None:
        check_params(problem, init, "init")
        init = jax.tree_util.tree_map(jnp.asarray, Params(*init))
        return init, check_dtype(init.H.dtype)
    dt = check_dtype(dtype)
    init_scale = resolve_init_scale(problem, init_scale)
    if is_concrete(init_scale):
        a = np.asarray(init_scale)
        if a.ndim or not np.issubdtype(a.dtype, np.number) or not np.isfinite(a) or a < 0:
            raise ValueError(f"init_scale must be a finite number >= 0; got {init_scale!r}")
    return (_key(key), host_array(init_scale, dt)), dt


def _progress_options(progress, progress_every, method):
    """(the progress callable or None, the report interval; 0 = no host callback in the program)."""
    if progress_every is None:
        # no callback without a progress handler: a program with a host callback is not kept by JAX's persistent
        # compilation cache (measured: the solve program was recompiled in a new process, 5 other programs hit)
        progress_every = 0 if progress is None else PROGRESS_EVERY.get(method if isinstance(method, str) else "adam")
    elif isinstance(progress_every, bool) or not isinstance(progress_every, (int, np.integer)) or progress_every < 1:
        raise ValueError(f"progress_every must be a positive integer; got {progress_every!r}")
    if progress is True:
        progress = _print_progress
    if progress is not None and not callable(progress):
        raise TypeError(f"progress must be None, True or a callable progress(step, value, grad_norm); got {progress!r}")
    assert progress_every is not None  # PROGRESS_EVERY has every method name solver_options accepts
    return progress, int(progress_every)


def _run(problem: UFM, start, o: SolverOptions, cfg: Config, progress, dt) -> Solution:
    """The compiled solve, with the progress handler registered and Ctrl-C caught around it."""
    handle = register_progress(None if progress is None else Throttle(progress))
    try:
        with catch_sigint():
            if isinstance(start, Params):
                sol = run_jit(problem, start, o.lr, o.tol, o.rtol, handle, cfg)
            else:
                sol = run_jit(problem, start, o.lr, o.tol, o.rtol, handle, cfg, dtype=dt)
            jax.block_until_ready(sol)
    finally:
        unregister_progress(handle)
    return sol


def resolve_polish(problem: UFM, polish) -> bool:
    """The ``polish`` option of `solve` and `solve_batch`: None means True for ReLU models with L >= 2; the polish
    applies to those models only (False for the others whatever is asked)."""
    if polish is not None and not isinstance(polish, (bool, np.bool_)):
        raise TypeError(f"polish must be None, True or False; got {polish!r}")
    return problem.activation == "relu" and problem.L >= 2 and polish is not False


def _polish(cp: UFM, sol: Solution, o: SolverOptions) -> Solution:
    """A ReLU run that stalled (or spent max_steps near a kink, `ufm._kinks.needs_polish`) finished by the kink polish
    (`ufm._kinks.polish` on the polish problem ``cp``, `polish_problem`; capped at `ufm._kinks.solve_cap` of
    ``max_steps``), applied by `ufm._kinks.apply_polish`: converged with the kink-aware measure when accepted; else
    the polished point when it lowered both the loss and rel_grad; else ``sol``. ``polish_steps`` is set. `solve`
    and every batch polish run by run (`row_polisher`) call it."""
    res = polish_kinks(cp, sol.params, sol.value, float(o.rtol), float(o.tol), solve_cap(o.max_steps))
    return apply_polish(sol, res)


def polish_problem(problem: UFM, dt) -> UFM:
    """The problem as the polish program takes it, for `solve` and `solve_batch` alike: every leaf a strong array of
    ``dt`` and lam_W one per layer (L,), so that both call the same compiled `ufm._kinks.polish_jit` (jit keys on
    leaf shapes and dtypes; a scalar lam_W is the same objective as L equal ones)."""
    p = _canonical(problem, dt)
    lam_W = np.broadcast_to(p.lam_W, (problem.L,)) if is_concrete(p.lam_W) else jnp.broadcast_to(p.lam_W, (problem.L,))
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(p), [p.lam_H, lam_W, p.lam_b, p.label_smoothing])


def polish_batch(
    problem: UFM,
    sols: Solution,
    o: SolverOptions,
    lam_H=None,
    lam_W=None,
    lam_b=None,
    *,
    batch_size: int | None = None,
    need=None,
    threads: int = 1,
) -> Solution:
    """The kink polish of a batch (`ufm.solve_batch`'s ``polish=``): run i is polished exactly as `ufm.solve`
    polishes it (`ufm._kinks.polish`: the compiled `ufm._kinks.polish_jit`, then `ufm._kinks.certify_close` on the
    host). By default the runs that need it are polished one after the other by `solve`'s own program (one compile
    per problem shape and dtype, shared with `solve`: a batch after a solve, or a solve after a batch, compiles no
    polish); ``batch_size`` maps them in one program instead (`polish_map`, ``vmap`` of ``batch_size`` runs).

    Runs that do not need it (`ufm._kinks.needs_polish`: not stalled/precision_floor, nor max_steps near a kink)
    cost no iteration and are returned unchanged; a run whose polish fails keeps its result and status (the
    polish never raises inside the map). Non-ReLU or L = 1 problems are returned as given.

    Args:
      problem: the shared `ufm.UFM` (shapes and modes; its lambdas are the default of each run).
      sols: the batch's `Solution`, a leading axis B on every field (``ufm.solve_batch``'s result).
      o: the batch's resolved `ufm._options.SolverOptions` (``rtol``, ``tol``).
      lam_H: (B,) lambda_H of each run (None: the problem's).
      lam_W: (B,) or (B, L) lambda_W of each run (None: the problem's).
      lam_b: (B,) lambda_b of each run (None: the problem's).
      batch_size: runs polished together in one ``vmap`` (``jax.lax.map``'s ``batch_size``, its own compiled
        program); None (default) polishes them one after the other with `solve`'s program, so a batch costs the
        sum of its polished runs' work (best on a CPU; the vmap is 8x slower there, measured in round 4).
      need: (B,) booleans, the runs to polish, when the caller has them (`ufm.solve_batch` does); None computes
        `ufm._kinks.needs_polish` of ``sols``.
      threads: host threads polishing runs at the same time (one after the other in each; ``batch_size=None``
        only). A run's polish does not depend on the thread that ran it.

    Returns:
      The batched `Solution` with the polished runs replaced and ``polish_steps`` (B,) set (0 where not polished).
    """
    if not isinstance(sols, Solution) or np.ndim(sols.value) != 1 or sols.rel_grad is None:
        raise ValueError("sols must be a batched ufm.Solution (value, rel_grad of shape (B,)) as solve_batch returns")
    if problem.activation != "relu" or problem.L < 2:
        return sols
    dt = sols.value.dtype
    B = int(np.shape(sols.value)[0])
    lH, lW, lb = _batch_lambdas(problem, dt, B, lam_H, lam_W, lam_b)
    need = np.asarray(needs_polish(sols.status, sols.rel_grad) if need is None else need, dtype=bool)
    if need.shape != (B,):
        raise ValueError(f"need must have shape (B,) = ({B},); got {need.shape}")
    cp = polish_problem(problem, dt)
    if batch_size is None:
        return _polish_each(cp, sols, o, need, (lH, lW, lb), threads)
    res = polish_map(cp, sols.params, sols.value, need, lH, lW, lb, o.rtol, o.tol, solve_cap(o.max_steps), batch_size)
    for i in np.flatnonzero(need & ~np.asarray(res.accepted)):
        one = jax.tree_util.tree_map(lambda a, i=i: a[i], res)
        fixed = certify_close(member_problem(cp, lH[i], lW[i], lb[i]), one, float(o.rtol), float(o.tol))
        if fixed is not one:
            res = jax.tree_util.tree_map(lambda a, b, i=i: a.at[i].set(b), res, fixed)
    return apply_polish(sols, res)


def _polish_each(cp: UFM, sols: Solution, o: SolverOptions, need: np.ndarray, lams, threads: int = 1) -> Solution:
    """`polish_batch` run by run: `row_polisher` (`solve`'s compiled program) of each run with ``need``, at its own
    lambdas, on ``threads`` host threads; the others keep their result (``polish_steps`` 0). Runs are taken out and
    put back in NumPy (an eager ``.at[i].set`` would compile a scatter per field shape); each run's row is written by
    one thread."""
    out = _host_rows(sols._replace(polish_steps=None))
    steps = np.zeros(need.shape[0], np.int32)
    todo = np.flatnonzero(need)
    queue = RunQueue(todo.size)
    polish_one = row_polisher(cp, o, lams)

    def do(k: int) -> None:
        i = int(todo[k])
        steps[i] = polish_row(polish_one, out, i, i)

    work = functools.partial(drain, queue, do, lambda k: [todo[k]], "polish")
    if threads > 1 and todo.size > 1:
        fan_out([work] * min(threads, todo.size), queue)
    else:
        work()
    return jax.tree_util.tree_map(to_device, out)._replace(polish_steps=to_device(steps))


def row_polisher(cp: UFM, o: SolverOptions, lams) -> Callable[[int, Solution], Solution]:
    """The kink polish of one run of a batch, ``polish_one(i, row)``: `ufm._kinks.polish` (`solve`'s compiled
    program, then `ufm._kinks.apply_polish`) of the single-run `Solution` ``row`` of run i, at run i's lambdas
    ``lams`` = (lam_H (B,), lam_W (B, L), lam_b (B,)), for the polish problem ``cp`` (`polish_problem`). Safe to
    call from several host threads: the first call (which compiles the program, once) runs alone."""
    lams = [np.asarray(a) for a in lams]
    first = threading.Lock()
    warm: list[bool] = []

    def polish(i: int, one: Solution) -> Solution:
        return _polish(member_problem(cp, *(a[i] for a in lams)), one, o)

    def polish_one(i: int, one: Solution) -> Solution:
        if not warm:
            with first:
                if not warm:
                    done = polish(i, one)
                    warm.append(True)
                    return done
        return polish(i, one)

    return polish_one


def polish_row(polish_one: Callable[[int, Solution], Solution], rows: Solution, r: int, i: int) -> int:
    """Row ``r`` of the NumPy batch ``rows`` (`_host_rows`), which holds run ``i``, replaced in place by its polish
    ``polish_one(i, row)`` (`row_polisher`); returns the polish's steps."""
    one = jax.tree_util.tree_map(lambda a: a[r], rows)  # NumPy rows: no eager slicing programs to compile
    done = polish_one(i, one)
    _put_row(rows, r, done._replace(polish_steps=None))
    return int(np.asarray(done.polish_steps))


def _host_rows(sols: Solution) -> Solution:
    """A writable NumPy copy of every field of a batched `Solution` (for `_put_row`)."""
    return jax.tree_util.tree_map(np.array, sols)


def _put_row(out: Solution, i: int, one: Solution) -> None:
    """Row ``i`` of the NumPy batch ``out`` (from `_host_rows`) set to the single-run `Solution` ``one``, in place."""
    for a, b in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(one), strict=True):
        a[i] = np.asarray(b)


def _batch_lambdas(problem: UFM, dt, B: int, lam_H, lam_W, lam_b):
    """(lam_H (B,), lam_W (B, L), lam_b (B,)) in ``dt``: the given ones (lam_W (B,) broadcast over the layers) or the
    problem's, checked against the batch size B. Concrete numbers are broadcast in NumPy and transferred (no eager
    program to compile); traced ones with ``jnp``."""
    xp = np if all(is_concrete(v) for v in (problem.lam_H, problem.lam_W, problem.lam_b, lam_H, lam_W, lam_b)) else jnp
    lW = xp.asarray(problem.lam_W if lam_W is None else batch_lam_W(problem, lam_W), dt)
    lW = lW[:, None] if lam_W is not None and lW.ndim == 1 else lW
    out = []
    for name, v, default, shape in (
        ("lam_H", lam_H, problem.lam_H, (B,)),
        ("lam_W", lW, None, (B, problem.L)),
        ("lam_b", lam_b, problem.lam_b, (B,)),
    ):
        a = xp.asarray(default if v is None else v, dt)
        try:
            out.append(xp.broadcast_to(a, shape))
        except ValueError:
            raise ValueError(f"{name} must broadcast to {shape} (B = {B} runs); got shape {a.shape}") from None
    return tuple(to_device(np.array(a)) for a in out) if xp is np else tuple(out)


@functools.partial(jax.jit, static_argnames=("batch_size",))
def polish_map(problem, params, value, need, lH, lW, lb, rtol, tol, cap, batch_size):
    """`ufm._kinks.polish_run` over a batch (leading axis B on ``params``, ``value``, ``need`` and the lambdas), in one
    compiled program per problem shape, dtype and ``batch_size`` (``jax.lax.map``), each run's polish capped at
    ``cap`` L-BFGS steps (dynamic; `solve` uses `ufm._kinks.solve_cap` of its ``max_steps``); returns a
    batched `Polish`."""

    def one(a):
        x, v, nd, h, w, b = a
        return polish_run(member_problem(problem, h, w, b), x, v, rtol, tol, nd, cap)  # problem: leaves in the dtype

    return jax.lax.map(one, (params, value, need, lH, lW, lb), batch_size=batch_size)


def _config(o: SolverOptions, history: bool, progress_every: int = 0) -> Config:
    return Config(
        o.method,
        o.momentum,
        o.memory_size,
        o.max_steps,
        o.patience,
        o.history_every,
        o.snapshot_every,
        bool(history),
        progress_every,
    )


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


def _check_batched(name: str, v, shape: str, *, positive: bool = False):
    """Every element of a concrete batched number is finite and >= 0 (> 0 when ``positive``)."""
    if v is None or not is_concrete(v):
        return
    try:
        a = np.asarray(v, dtype=float)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be numbers of shape {shape}; got {v!r}") from None
    bad = ~np.isfinite(a) | ((a <= 0) if positive else (a < 0))
    if np.any(bad):
        i = np.argwhere(bad)[0]
        raise ValueError(
            f"{name} must be {'> 0' if positive else '>= 0'} and finite in every element (shape "
            f"{shape}); got {a[tuple(i)]!r} at index {tuple(int(j) for j in i)}"
        )


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
    init_scale=DEFAULT_INIT_SCALE,
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
    rtol: float | None = None,
    slots: int | None = None,
    segment: int | None = None,
    engine: str = "auto",
    polish: bool | None = None,
    threads: int | None = None,
) -> Solution:
    """Solve a batch of B problems that share shapes: each run as `solve` would, in compiled batched programs.

    Every batched argument has a leading axis of size B; scalars are broadcast. New numbers (lambdas,
    learning rates, seeds) never recompile; only B, shapes and the static options do.

    Engines (``engine``), each costing about the sum of the runs' steps rather than B times the slowest run:
    ``"map"`` runs the B runs one after the other inside ONE compiled program (``lax.map`` of the single-run
    driver: the arithmetic of `solve`, so run i ends where ``ufm.solve`` of problem i ends, and the compile is
    about that of one solve); ``"lockstep"`` (`ufm._batch.solve_lockstep`, L-BFGS only; other methods run
    "map") advances ``slots`` lanes with ONE vmapped evaluation of f and its gradient per iteration: each lane's
    trial line search evaluates one trial per iteration with the rule of `ufm._linesearch` (a run takes the
    steps of `solve`); finished runs are retired and lanes refilled every ``segment`` iterations; ``"slots"``
    (`ufm._batch.solve_slots`): slots that run the driver's step with
    all 6 line-search trials every step; ``"vmap"``: one vmapped loop (B x the slowest run). ``"auto"``
    (default, `auto_engine`): "map" on a CPU (with ``threads`` on every core; lockstep was not faster
    robustly there: benchmarks/README.md, "Batched engine"), "lockstep" for L-BFGS on an accelerator (not
    measured), else "slots". Inside a trace (``jit``/``shard_map`` of this function) the batch is one ``vmap``
    of the driver.

    Args:
      problem: the shared `ufm.UFM` (shapes, modes, and default lambdas).
      keys: PRNG keys of shape (B,) (``jax.random.split(key, B)``), or ``seeds``: B integers.
      init: starting `Params` with a leading axis B on every leaf (instead of keys).
      lam_H: (B,) values of lambda_H (default: the problem's).
      lam_W: (B,) one scalar per run, or (B, L) one per layer (default: the problem's).
      lam_b: (B,) values of lambda_b (bias='reg' only, then > 0).
      lr: (B,) learning rates, or a scalar.
      init_scale: (B,) or scalar, or ``"auto"`` (default, as in `solve`: each run's scale from its own lambdas,
        `ufm._options.auto_init_scale`, computed without a recompile). An ``"auto"`` run that ends at the zero
        saddle is run again from the same key at scale 1.0 by `solve`'s program (a second pass over those runs
        only), with one RuntimeWarning naming them.
      slots: runs on the device at a time (engine "lockstep": default min(B, 16); engine "slots": min(B, 64)).
      segment: iterations between retire/refill points ("lockstep": 32; "slots": 25 for lbfgs, 500 otherwise).
      engine: "auto", "lockstep", "map", "slots" or "vmap" (above).
      polish: the kink polish of `solve` on the runs that need it (`polish_batch`; default: True for ReLU models
        with L >= 2). Its program compiles only when some run of the batch needs it; not applied inside a trace.
        With "map" on several threads a finished part's runs are polished on the threads before the next part
        (`map_threads`); the result is the same.
      threads: host threads that solve the batch at the same time (default None: `ufm._batch.default_threads`,
        the usable CPU cores up to 8 on a CPU backend, 1 on an accelerator; 1: today's single-threaded engines).
        Each thread drives its own lanes/slots ("lockstep", "slots") or parts of the batch ("map") over a shared
        queue of runs; on a CPU the threads' calls of the compiled programs run at the same time, one core each.
        Run i's result does not depend on the thread count (the lanes' arithmetic is independent); "vmap" and a
        traced batch ignore it. An exception inside a thread is raised here, naming the runs it held
        (`ufm._batch.ThreadFailed`); the other threads stop after their current cycle.
      **options: the other options, as in `solve`.

    Returns:
      One `Solution` whose every field has a leading axis B (``sols.take(i)`` is run i). Run i reaches the same
      point as ``ufm.solve`` of problem i from the same key up to rounding: vmapped arithmetic may round
      differently, and on non-convex problems such differences can, rarely, end a run at another local minimum.

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
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}; got {engine!r}")
    threads = check_threads(threads)
    keys = seed_keys(keys, seeds)
    init, dt = batch_init(problem, init, dtype)
    lam_W_b = batch_lam_W(problem, lam_W)
    named = dict(keys=keys, init=None if init is None else init.H, lam_H=lam_H, lam_W=lam_W_b, lam_b=lam_b, lr=lr)
    B = _batch_size(dict(named, init_scale=init_scale))
    keys = batch_keys(keys, init, B)
    init_scale = check_batch_numbers(problem, lam_H, lam_W, lam_b, init_scale)
    o = solver_options(
        method,
        lr,
        max_steps,
        tol,
        patience,
        history_every,
        snapshot_every,
        dt,
        rtol=rtol,
        momentum=momentum,
        memory_size=memory_size,
    )
    check_memory(num_params(problem), dt.itemsize, o, history=history, batch=B)
    start = init if init is not None else keys
    inputs = batch_inputs(problem, dt, B, start, lam_H, lam_W, lam_b, o.lr, init_scale)
    xdt = None if init is not None else dt  # None: the start is given parameters, not keys
    polish = resolve_polish(problem, polish)
    cfg = _config(o, history)
    if polish and not traced(inputs, o):  # engine "map" on threads polishes as its parts finish (`map_threads`)
        polisher = row_polisher(polish_problem(problem, dt), o, inputs[1:4])  # the runs' lambdas, (B,) (B, L) (B,)
    else:
        polisher = None
    sols = run_engine(engine, _canonical(problem, dt), inputs, o, cfg, xdt, slots, segment, threads, polisher)
    if traced(inputs, o):  # inside a trace: no host-side polish, zero-saddle test or restart
        return sols
    # the runs that need the polish, unless the engine polished them already (then polish_steps is set)
    sols = _polish_needed(problem, sols, o, inputs, threads) if polish and sols.polish_steps is None else sols
    sols = mark_zero_saddles(problem, sols, inputs)
    if init is None and isinstance(init_scale, str):
        sols = _restart_batch_at_zero_saddle(problem, sols, inputs, o, cfg, dt, polish)
    return sols


def _polish_needed(problem: UFM, sols: Solution, o: SolverOptions, inputs, threads: int = 1) -> Solution:
    """`polish_batch` of a batch's runs (each at its own lambdas, ``inputs[1:4]``, on ``threads`` host threads) when
    one of them needs it; else ``sols`` (the polish program is compiled only when it has work)."""
    need = np.asarray(needs_polish(sols.status, sols.rel_grad))
    if not need.any():
        return sols
    return polish_batch(problem, sols, o, inputs[1], inputs[2], inputs[3], need=need, threads=threads)


def mark_zero_saddles(problem: UFM, sols: Solution, inputs) -> Solution:
    """A batch's runs that ended at the zero point of a problem whose `ufm.predict` minimum is lower get status
    zero_saddle, as in `solve` (`at_zero_saddle` of run i at its own lambdas ``inputs[1:4]``; `ufm.predict` is asked
    only for runs whose loss is the zero point's, once per distinct lambdas). Runs drawn at ``init_scale`` exactly 0
    start at the zero point by request (the sweep pads its chunks with them) and keep their status."""
    f0 = zero_point_loss(problem)
    value, status = np.asarray(sols.value, dtype=float), np.asarray(sols.status)
    ends = np.isin(status, (CONVERGED, MAX_STEPS, STALLED, PRECISION_FLOOR)) & (np.abs(value - f0) <= 1e-6 * f0)
    if not isinstance(inputs[0], Params):  # a start drawn at scale exactly 0 (`ufm.sweep`'s padding slots) is left
        ends &= np.asarray(inputs[5]) != 0  # as it ended: it is the zero point by request
    if not ends.any():
        return sols
    lams = [np.asarray(a) for a in inputs[1:4]]
    seen: dict[tuple, bool] = {}
    flag = np.zeros(value.shape, bool)
    for i in np.flatnonzero(ends):
        key = tuple(np.concatenate([np.ravel(a[i]) for a in lams]).tolist())
        if key not in seen:
            seen[key] = at_zero_saddle(member_problem(problem, *(jnp.asarray(a[i]) for a in lams)), value[i])
        flag[i] = seen[key]
    if not flag.any():
        return sols
    return sols._replace(status=to_device(np.where(flag, ZERO_SADDLE, status).astype(np.int32)))  # host: no eager op


def _restart_batch_at_zero_saddle(problem: UFM, sols: Solution, inputs, o, cfg: Config, dt, polish) -> Solution:
    """`solve`'s zero-saddle restart for the runs of an ``init_scale="auto"`` batch that ended at the zero saddle:
    each run again from its key at `RESTART_SCALE` by `solve`'s own program (one compile per problem shape, shared
    with `solve`; a second pass over those runs only), with one RuntimeWarning naming them."""
    keys, lH, lW, lb, lrs, scales = inputs
    idx = np.flatnonzero((np.asarray(sols.status) == ZERO_SADDLE) & (np.asarray(scales) < RESTART_SCALE))
    if idx.size == 0:
        return sols
    for i in idx:
        p = member_problem(problem, lH[i], lW[i], lb[i])
        one = _solve_from(
            p, (keys[i], jnp.asarray(RESTART_SCALE, dt)), o._replace(lr=float(lrs[i])), cfg, None, dt, polish
        )
        one = one._replace(num_steps=one.num_steps + sols.num_steps[i])
        sols = _set_run(sols, int(i), one)
    warnings.warn(
        f"ufm.solve_batch: init_scale='auto' runs {idx.tolist()} ended at the zero saddle; each restarted once from "
        f"init_scale={RESTART_SCALE} with its own key (num_steps counts both runs, history and snapshots are those "
        "of the restart). Pass init_scale explicitly to choose.",
        RuntimeWarning,
        stacklevel=3,
    )
    return sols


def _set_run(sols: Solution, i: int, one: Solution) -> Solution:
    """``sols`` with run ``i`` replaced by the single-run `Solution` ``one`` (``polish_steps`` 0 where unset)."""
    out = _host_rows(sols._replace(polish_steps=None))  # NumPy: the row and the steps are set on the host
    _put_row(out, i, one._replace(polish_steps=None))
    res = jax.tree_util.tree_map(to_device, out)
    if sols.polish_steps is None and one.polish_steps is None:
        return res
    steps = np.zeros(np.shape(sols.value)[0], np.int32) if sols.polish_steps is None else np.array(sols.polish_steps)
    steps[i] = 0 if one.polish_steps is None else int(np.asarray(one.polish_steps))
    return res._replace(polish_steps=to_device(steps))


def seed_keys(keys, seeds):
    """``keys``, or the (B,) keys ``jax.random.key(s)`` of ``seeds`` (B integers >= 0); both given is an error."""
    if seeds is None:
        return keys
    if keys is not None:
        raise ValueError("give keys or seeds, not both")
    seeds = np.asarray(seeds)
    if seeds.ndim != 1 or not np.issubdtype(seeds.dtype, np.integer) or np.any(seeds < 0):
        raise ValueError(
            f"seeds must be a 1-D sequence of B integers >= 0; got shape {seeds.shape}, dtype {seeds.dtype}"
        )
    return keys_of_seeds(to_device(seeds))


keys_of_seeds = jax.jit(jax.vmap(jax.random.key))
"""``jax.random.key`` of each of B seeds, one compiled program (eager, it compiled two)."""


def batch_keys(keys, init, B: int):
    """The (B,) keys of a batch: ``keys`` (shape checked), or split from key 0 when neither keys nor init is given."""
    if keys is None and init is None:
        keys = jax.random.split(jax.random.key(0), B)
    if keys is not None and np.shape(keys) != (B,):
        raise ValueError(f"keys must have shape (B,) = ({B},); got {np.shape(keys)}")
    return keys


def batch_init(problem: UFM, init, dtype):
    """Validate batched starting `Params` (a leading axis B on every leaf, each element fitting ``problem``);
    returns them as arrays with their dtype, or (None, the solve dtype)."""
    if init is None:
        return None, check_dtype(dtype)
    init = Params(*init)
    leaves = jax.tree_util.tree_leaves(init)
    if not np.ndim(leaves[0]):
        raise ValueError("init must have a leading batch axis B on every leaf")
    # NumPy leaves go to the device by one transfer (jnp.asarray compiles a small program per shape and dtype); run
    # i's shapes are checked on a zero row made on the host (an eager x[0] compiles a slice and a squeeze per leaf)
    init = jax.tree_util.tree_map(lambda x: x if isinstance(x, jax.Array) else to_device(np.asarray(x)), init)
    row = jax.tree_util.tree_map(
        lambda x: x[0] if isinstance(x, jax.core.Tracer) else to_device(np.zeros(np.shape(x)[1:], x.dtype)), init
    )
    check_params(problem, row, "init[i]")
    sizes = {np.shape(x)[0] for x in jax.tree_util.tree_leaves(init)}
    if len(sizes) != 1:
        raise ValueError(f"init leaves disagree on the batch size: {sorted(sizes)}")
    return init, check_dtype(init.H.dtype)


def batch_lam_W(problem: UFM, lam_W):
    """``lam_W`` of a batch, of shape (B,) or (B, L) (None: the problem's)."""
    if lam_W is None:
        return None
    a = np.asarray(lam_W) if is_concrete(lam_W) else lam_W
    if np.ndim(a) not in (1, 2) or (np.ndim(a) == 2 and np.shape(a)[1] != problem.L):
        raise ValueError(f"lam_W must have shape (B,) or (B, L={problem.L}) in solve_batch; got {np.shape(a)}")
    return a


def check_batch_numbers(problem: UFM, lam_H, lam_W, lam_b, init_scale):
    """Every element of every batched number, before any compute; returns ``init_scale`` ("auto" kept: each run's
    scale comes from its own lambdas in `batch_inputs`)."""
    _check_batched("lam_H", lam_H, "(B,)")
    _check_batched("lam_W", lam_W, "(B,) or (B, L)")
    if lam_b is not None:
        if problem.bias != "reg" and is_concrete(lam_b) and np.any(np.asarray(lam_b, dtype=float) != 0):
            raise ValueError(f"lam_b is only used with bias='reg'; got bias={problem.bias!r}")
        _check_batched("lam_b", lam_b, "(B,)", positive=problem.bias == "reg")
    if isinstance(init_scale, str):
        resolve_init_scale(problem, init_scale)  # refuses any string but "auto"
        return init_scale
    _check_batched("init_scale", init_scale, "(B,) or a scalar")
    return init_scale


def batch_inputs(problem: UFM, dt, B: int, start, lam_H, lam_W, lam_b, lr, init_scale) -> tuple:
    """The engines' inputs ``(start, lam_H (B,), lam_W (B, L), lam_b (B,), lr (B,), init_scale (B,))`` in ``dt``
    (scalars broadcast; None: the problem's value; ``init_scale="auto"``: `ufm._options.auto_init_scale` at each
    run's lambdas)."""

    def bcast(v):
        if is_concrete(v):  # NumPy, then one transfer: no eager program to compile
            return to_device(np.broadcast_to(np.asarray(v, dt), (B,)))
        return jnp.broadcast_to(jnp.asarray(v, dt), (B,))

    lH, lW, lb = _batch_lambdas(problem, dt, B, lam_H, lam_W, lam_b)
    if isinstance(init_scale, str):  # "auto": each run's scale from its own lambdas (NumPy when concrete)
        init_scale = auto_init_scale(problem, lam_H=lH, lam_W=lW)
    return (start, lH, lW, lb, bcast(lr), bcast(init_scale))


def traced(inputs, o: SolverOptions) -> bool:
    """Whether `solve_batch` runs inside a trace (``jit``/``vmap`` of it): then the batch is one ``vmap``."""
    return any(isinstance(x, jax.core.Tracer) for x in jax.tree_util.tree_leaves((inputs, o.tol, o.rtol)))


def run_engine(
    engine: str,
    prob: UFM,
    inputs,
    o: SolverOptions,
    cfg: Config,
    xdt,
    slots,
    segment,
    threads: int = 1,
    polish: Callable[[int, Solution], Solution] | None = None,
) -> Solution:
    """Solve the batch ``inputs`` with ``engine`` on ``threads`` host threads (see `solve_batch`); inside a trace
    always one ``vmap``. Engine "map" on several threads also applies ``polish`` (`row_polisher`) to the runs
    that need it as its parts finish (`map_threads`; ``polish_steps`` set when a run was polished); the other
    engines leave the polish to the caller."""
    if traced(inputs, o):
        return batch_vmap(prob, inputs, o.tol, o.rtol, cfg=cfg, dtype=xdt)
    if engine == "auto":
        engine = auto_engine(cfg)
    if engine == "lockstep" and not lockstep_applies(cfg):
        engine = "map"
    if engine == "map":
        return map_threads(prob, inputs, o.tol, o.rtol, cfg, xdt, threads, polish)
    if engine == "vmap":
        return batch_vmap_jit(prob, inputs, o.tol, o.rtol, cfg=cfg, dtype=xdt)
    if engine == "lockstep":
        return solve_lockstep(prob, inputs, o.tol, o.rtol, cfg, xdt, lanes=slots, ticks=segment, threads=threads)
    return solve_slots(prob, inputs, o.tol, o.rtol, cfg, xdt, slots=slots, segment=segment, threads=threads)


MAP_PARTS_PER_THREAD = 4  # engine "map" on n threads: 4n equal parts, handed out as threads free up


def map_threads(
    problem: UFM,
    inputs,
    tol,
    rtol,
    cfg: Config,
    dtype,
    threads: int,
    polish: Callable[[int, Solution], Solution] | None = None,
) -> Solution:
    """Engine "map" on ``threads`` host threads: the B runs cut into n = `MAP_PARTS_PER_THREAD` x threads equal
    contiguous parts of c = ceil(B / n) runs (the last one padded by repeating run B - 1: fewer than n extra runs),
    each part one call of `batch_map_rows` (one compiled program), parts handed out in order to the threads as
    they free up; the parts are joined in order (`join_parts`). One thread: `batch_map` of the whole batch.

    With ``polish`` (`row_polisher`, threads > 1 only), the kink polish is done on the same threads as the parts
    finish: the runs of a finished part that need it (`ufm._kinks.needs_polish`) become tasks handed out before the
    next part (`TaskQueue`), so the polish overlaps the other threads' parts instead of following the whole batch.
    Then ``polish_steps`` is set (B,) when a run needed it, as `polish_batch` sets it; else it stays None."""
    B = int(np.shape(inputs[1])[0])
    if threads == 1 or B == 1:
        return batch_map(problem, inputs, tol, rtol, cfg=cfg, dtype=dtype)
    n = min(B, MAP_PARTS_PER_THREAD * threads)
    c = -(-B // n)
    n = -(-B // c)
    queue = TaskQueue(n)
    parts: list = [None] * n
    steps = np.zeros(B, np.int32)
    polished: list[int] = []

    def part(j: int) -> None:
        rows = to_device(np.minimum(np.arange(j * c, (j + 1) * c), B - 1).astype(np.int32))
        parts[j] = _host_rows(batch_map_rows(problem, inputs, rows, tol, rtol, cfg=cfg, dtype=dtype))
        if polish is not None:  # the padding rows (run B - 1 again) are not polished
            need = needs_polish(parts[j].status, parts[j].rel_grad)[: B - j * c]
            for r in np.flatnonzero(need):
                queue.add((j, int(r)))

    def do(k) -> None:
        if isinstance(k, int):
            part(k)
        else:
            j, r = k
            steps[j * c + r] = polish_row(polish, parts[j], r, j * c + r)  # type: ignore[arg-type]  # set when tasks exist
            polished.append(j * c + r)

    def held(k) -> Sequence[int]:
        return range(k * c, min(B, (k + 1) * c)) if isinstance(k, int) else [k[0] * c + k[1]]

    fan_out([functools.partial(drain, queue, do, held, "map")] * min(threads, n), queue)
    out = join_parts(tuple(parts), B)
    return out._replace(polish_steps=to_device(steps)) if polished else out


def join_parts(parts: tuple, B: int) -> Solution:
    """The first B rows of the parts' batched `Solution`s, concatenated in order on the host (no program to
    compile)."""
    return jax.tree_util.tree_map(lambda *xs: to_device(np.concatenate([np.asarray(x) for x in xs])[:B]), *parts)


def one_run(problem: UFM, params0, lH, lW, lb, lr, tol, rtol, cfg: Config) -> Solution:
    """Run one member of a batch: the problem with its own lambdas, from ``params0``."""
    return run(member_problem(problem, lH, lW, lb), params0, lr, tol, rtol, cfg)


def lockstep_applies(cfg: Config) -> bool:
    """The lockstep engine emulates L-BFGS with the trial line search (method "lbfgs"); other methods use "map"."""
    return cfg.method == "lbfgs" and LBFGS_LINESEARCH == "trial"


ENGINES = ("auto", "lockstep", "map", "slots", "vmap")
# engine="auto" by backend (measured, benchmarks/README.md "Batched engine"): on a CPU "map". Round 6 gave both engines
# both cores (threads=2): lockstep (16 lanes) against map at 1,000 runs measured 3x faster, equal and 1.4x slower in
# three runs on the shared machine, and the same CPU time within noise at 256 runs; map keeps the single solve's
# arithmetic, compiles faster and has no tail (the lanes' slowest run), so it stays. Round 7 measured why lockstep
# cannot lead on this CPU even without its tail: a lockstep iteration costs about 48 us for 1 lane, 127 us for 4,
# 521 us for 16 and 693 us for 32 (22-33 us a lane, one evaluation each), while a map step (6 trial evaluations)
# costs about 22-25 us of CPU; shrinking the lanes at the tail would only bring lockstep up to map. On an
# accelerator S lanes cost about one.
AUTO_ENGINE = {"cpu": "map"}


def auto_engine(cfg: Config) -> str:
    """The engine of ``engine="auto"``: `AUTO_ENGINE` of the default backend; on an accelerator "lockstep" for
    L-BFGS with the trial line search, else "slots"."""
    e = AUTO_ENGINE.get(jax.default_backend())
    if e is not None:
        return e
    return "lockstep" if lockstep_applies(cfg) else "slots"


@functools.partial(jax.jit, static_argnames=("cfg", "dtype"))
def batch_map(problem, inputs, tol, rtol, *, cfg: Config, dtype) -> Solution:
    """The batch as one program that runs the B runs in sequence (``lax.map``): cost = the sum of their steps."""
    start, lH, lW, lb, lrs, scales = inputs
    x0 = start_params(problem, start, scales, dtype)
    return jax.lax.map(lambda a: one_run(problem, a[0], a[1], a[2], a[3], a[4], tol, rtol, cfg), (x0, lH, lW, lb, lrs))


@functools.partial(jax.jit, static_argnames=("cfg", "dtype"))
def batch_map_rows(problem, inputs, rows, tol, rtol, *, cfg: Config, dtype) -> Solution:
    """`batch_map` of the runs ``rows`` (indices into the batch ``inputs``): one compiled program per part size."""
    take = functools.partial(jax.tree_util.tree_map, lambda x: x[rows])
    return batch_map(problem, take(inputs), tol, rtol, cfg=cfg, dtype=dtype)


@functools.partial(jax.jit, static_argnames=("cfg", "dtype"))
def batch_vmap_jit(problem, inputs, tol, rtol, *, cfg: Config, dtype) -> Solution:
    """`batch_vmap` compiled."""
    return batch_vmap(problem, inputs, tol, rtol, cfg=cfg, dtype=dtype)


def batch_vmap(problem, inputs, tol, rtol, *, cfg: Config, dtype) -> Solution:
    """The whole batch as one ``vmap`` of the driver (used inside traces; every run costs the slowest's steps)."""
    start, lH, lW, lb, lrs, scales = inputs
    x0 = start_params(problem, start, scales, dtype)
    return jax.vmap(lambda x, h, w, b, r: one_run(problem, x, h, w, b, r, tol, rtol, cfg))(x0, lH, lW, lb, lrs)
