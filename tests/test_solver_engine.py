"""The solver engine (ufm._driver, ufm._batch, ufm._options): progress from inside the compiled loop, SIGINT,
every optax transformation, the scale-aware stopping rule, the batched slot engine, statuses and validation."""

import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ufm
from ufm._linesearch import scale_by_trial_linesearch

SHALLOW = ufm.UFM(num_classes=3, n_per_class=4, widths=(5,), lam_H=1e-3, lam_W=1e-3)


def test_progress_callback_is_bit_identical_and_reports_the_end():
    calls = []
    plain = ufm.solve(SHALLOW, key=0)
    seen = ufm.solve(SHALLOW, key=0, progress=lambda k, v, g: calls.append((k, v, g)), progress_every=10)
    for a, b in zip(jax.tree_util.tree_leaves(plain), jax.tree_util.tree_leaves(seen)):
        np.testing.assert_array_equal(a, b)  # same program, the callback only reads: bit for bit
    assert calls, "progress was never called"
    steps = [c[0] for c in calls]
    assert steps == sorted(steps) and steps[-1] == int(plain.num_steps)
    assert calls[-1][1] == float(plain.value) and calls[-1][2] == float(plain.grad_norm)


def test_sigint_ends_a_compiled_solve_with_status_interrupted():
    # the callback itself sends SIGINT once at step >= 500: the run must stop at the next report (every 100 steps;
    # the user's callable is throttled to 10 calls a second, the interrupt check is not)
    sent = []
    before = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN in a pytest-xdist worker

    def cb(k, v, g):
        if k >= 500 and not sent:
            sent.append(k)
            os.kill(os.getpid(), signal.SIGINT)

    s = ufm.solve(
        SHALLOW, key=0, method="gd", lr=0.1, max_steps=100_000, tol=0.0, rtol=0.0, progress=cb, progress_every=100
    )
    assert s.status_name == "interrupted" and not s.success
    # within a few reports: the callback runs on a host thread that can lag the loop on a loaded machine
    assert sent and sent[0] <= int(s.num_steps) <= sent[0] + 500
    np.testing.assert_allclose(ufm.objective(SHALLOW, s.params), s.value, rtol=1e-13)
    # the caller's handler is restored (a later SIGINT behaves as it did before the solve)
    assert signal.getsignal(signal.SIGINT) is before


def test_cli_run_solver_with_progress_equals_the_python_api():
    from ufm import cli

    p = ufm.UFM(num_classes=3, n_per_class=2, widths=(4, 4), activation="relu", lam_H=1e-2, lam_W=1e-2)
    s = dict(cli.DEFAULT_SOLVER, method="gd", lr=0.5, steps=120, tol=0.0, patience=1000, snapshot_every=6)
    calls = []
    one = cli.run_solver(p, s)
    shown = cli.run_solver(p, s, progress=lambda *a: calls.append(a))
    for a, b in zip(jax.tree_util.tree_leaves(one), jax.tree_util.tree_leaves(shown)):
        np.testing.assert_array_equal(a, b)
    assert calls and calls[-1][0] == 120


# ---------------------------------------------------------------------------------------------------------------
# Validation and resource guards: refused before any compute, the argument named.

P_REG = ufm.UFM(num_classes=3, n_per_class=2, widths=(4,), bias="reg", lam_b=1e-3)


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(tol="x"), TypeError, "tol must be a number"),
        (dict(rtol=-1.0), ValueError, "rtol must be a finite scalar"),
        (dict(key=2**70), ValueError, r"key must be a jax.random.key or an integer seed in \[0, 2\*\*63\)"),
        (dict(key="seed"), TypeError, "key must be a jax.random.key"),
        (dict(method="momentum", momentum=1.5), ValueError, r"momentum must be a number in \[0, 1\)"),
        (dict(dtype="float16"), TypeError, "half precision"),
        (dict(dtype=jnp.bfloat16), TypeError, "half precision"),
        (dict(lr="fast"), TypeError, "lr must be a number"),
        (dict(init_scale=float("nan")), ValueError, "init_scale must be a finite number"),
        (dict(progress="yes"), TypeError, "progress must be None, True or a callable"),
        (dict(memory_size=0), ValueError, "memory_size must be a positive integer"),
        # 2 * (1e9 + 1) * 8 bytes of history: refused with the estimate, not OOM-killed
        (dict(max_steps=10**9), ValueError, r"would preallocate 14.90 GiB of history/snapshots"),
    ],
)
def test_solve_refuses_bad_options_naming_them(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        ufm.solve(SHALLOW, **kwargs)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(lam_H=[1e-3, float("nan")]), r"lam_H must be >= 0 and finite in every element .* index \(1,\)"),
        (dict(lam_H=[float("nan"), 1e-3]), r"lam_H must be >= 0 and finite in every element .* index \(0,\)"),
        (dict(lam_W=[1e-3, -1.0]), r"lam_W must be >= 0 .* index \(1,\)"),
        (dict(lam_b=[1e-3, 0.0]), r"lam_b must be > 0 and finite in every element .* index \(1,\)"),
        (dict(init_scale=[1.0, float("inf")]), r"init_scale must be >= 0 and finite"),
        (dict(seeds=[0, -1]), "seeds must be a 1-D sequence of B integers >= 0"),
    ],
)
def test_solve_batch_validates_every_element(kwargs, match):
    kw = dict(seeds=[0, 1], **kwargs) if "seeds" not in kwargs else kwargs
    with pytest.raises(ValueError, match=match):
        ufm.solve_batch(P_REG, **kw)


def test_slot_engine_with_refill_matches_single_solves():
    # 8 deep ReLU runs on 3 slots in segments of 5 steps: runs are retired and slots refilled many times; run i
    # must end where ufm.solve of problem i from the same seed ends (loss to 1e-6 relative) in >= 90% of runs
    # (batched arithmetic may round differently; on a non-convex problem that can, rarely, change the minimum).
    p = ufm.UFM(num_classes=2, n_per_class=2, widths=(3, 3), activation="relu", lam_H=1e-2, lam_W=1e-2)
    lam = np.array([1e-3, 3e-3, 1e-2, 3e-2, 1e-3, 3e-3, 1e-2, 3e-2])
    seeds = np.arange(8)
    sols = ufm.solve_batch(p, seeds=seeds, lam_H=lam, lam_W=lam, slots=3, segment=5, max_steps=500)
    same = 0
    for i in range(8):
        q = p.replace(lam_H=float(lam[i]), lam_W=float(lam[i]))
        s = ufm.solve(q, key=int(seeds[i]), max_steps=500)
        same += abs(float(sols.value[i]) - float(s.value)) <= 1e-6 * abs(float(s.value))
        assert int(sols.num_steps[i]) >= 1 and int(sols.status[i]) >= 0
        # the stored value is the objective at the stored parameters, the history ends at the last step
        np.testing.assert_allclose(ufm.objective(q, sols.take(i).params), sols.value[i], rtol=1e-12)
        np.testing.assert_allclose(sols.history.loss[i, int(sols.num_steps[i])], sols.value[i], rtol=1e-14)
    assert same >= 0.9 * 8, same


def test_slots_step_on_parameter_trees_equals_the_flat_loop_of_solve():
    # ufm.solve's loop carries x and grad f as flat vectors (`ufm._driver.flat_step`); the slots engine steps the
    # parameter tree (`ufm._driver.step`: ravel, the same flat_step, unravel). Adam (per-coordinate state, no line
    # search) takes identical steps on both: the same elementwise arithmetic on the same values, so run i of the
    # batch equals ufm.solve of run i to rounding (1e-12 relative; measured bit for bit).
    p = ufm.UFM(num_classes=2, n_per_class=2, widths=(3, 3), activation="relu", lam_H=1e-2, lam_W=1e-2)
    kw = dict(method="adam", lr=0.05, max_steps=40, tol=0.0, rtol=0.0)
    sols = ufm.solve_batch(p, seeds=[0, 1], engine="slots", slots=2, segment=7, threads=1, **kw)
    for i in range(2):
        s = ufm.solve(p, key=i, **kw)
        assert int(sols.num_steps[i]) == int(s.num_steps) == 40
        for a, b in zip(jax.tree_util.tree_leaves(sols.take(i).params), jax.tree_util.tree_leaves(s.params)):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(sols.history.loss[i, :41], s.history.loss[:41], rtol=1e-12)


@pytest.mark.parametrize(
    "method",
    [
        optax.lbfgs(),
        optax.chain(optax.scale_by_lbfgs(), optax.scale(-1.0), optax.scale_by_zoom_linesearch(max_linesearch_steps=20)),
        optax.chain(optax.sgd(1.0), optax.scale_by_backtracking_linesearch(max_backtracking_steps=20, store_grad=True)),
        optax.sgd(0.5),
        optax.chain(optax.scale_by_lbfgs(), optax.scale(-1.0), scale_by_trial_linesearch(num_trials=4, lazy=False)),
    ],
    ids=["optax.lbfgs", "chain+zoom", "sgd+backtracking", "sgd", "chain+trial"],
)
def test_every_optax_transformation_works(method):
    # shallow MSE with bias-free UFM has no spurious local minima (Zhou et al. 2022): every method that makes
    # progress reaches the same optimum as the default L-BFGS; line-search ones get value, grad and value_fn
    p = ufm.UFM(num_classes=2, n_per_class=2, widths=(3,), lam_H=1e-2, lam_W=1e-2)
    ref = ufm.solve(p, key=0)
    s = ufm.solve(p, key=0, method=method, max_steps=20_000, rtol=1e-6)
    assert s.status_name == "converged", s.message
    np.testing.assert_allclose(s.value, ref.value, rtol=1e-9)  # both rel_grad <= 1e-6: loss within ~1e-12


def test_run_ending_at_the_zero_point_reports_the_zero_saddle():
    # deep linear, P = L + 1 = 3: theta = 0 is a strict local minimum (THEORY.md §0) with f(0) = 1/2 (MSE, one-hot
    # Y: ||Y||^2 / (2N) = N / (2N)); from a tiny init the run falls into it. ufm.predict gives a lower optimum
    # here, so the status must say "zero_saddle" (not converged/stalled), and a normal init must not.
    p = ufm.UFM(num_classes=3, n_per_class=2, widths=(4, 4), lam_H=5e-3, lam_W=5e-3)
    assert float(ufm.predict(p).loss) < 0.5 * (1 - 1e-4)
    s = ufm.solve(p, key=0, init_scale=1e-3, max_steps=2000)
    np.testing.assert_allclose(s.value, 0.5, rtol=1e-6)
    assert s.status_name == "zero_saddle" and "increase init_scale" in s.message
    ok = ufm.solve(p, key=0, max_steps=2000)
    assert ok.status_name == "converged" and float(ok.value) < 0.5 * (1 - 1e-4)


def test_auto_init_scale_rule():
    # s^(L+1) = 0.008 for deep linear models (measured rule, see ufm._options.auto_init_scale); 1 otherwise
    from ufm._options import auto_init_scale

    deep = ufm.UFM(num_classes=4, n_per_class=2, widths=(6,) * 3)
    assert auto_init_scale(deep) == pytest.approx(0.008**0.25) and auto_init_scale(SHALLOW) == 1.0
    assert auto_init_scale(deep.replace(activation="relu")) == 1.0
    with pytest.raises(ValueError, match="init_scale must be a finite number"):
        ufm.solve(deep, key=0, init_scale="big")


def test_a_solve_without_progress_has_no_host_callback():
    # JAX's persistent compilation cache skips programs with host callbacks: without a progress handler the solve's
    # program must contain none (lowered only, not compiled); with one it must contain the io_callback
    from ufm._driver import run_jit
    from ufm._options import solver_options
    from ufm._solver import _canonical, _config

    p = _canonical(SHALLOW, jnp.float64)
    o = solver_options("lbfgs", None, 100, None, None, 1, None, "float64")
    start = (jax.random.key(0), jnp.asarray(1.0))
    text = [
        run_jit.lower(p, start, o.lr, o.tol, o.rtol, 0, cfg=_config(o, False, every), dtype=o.dtype).as_text()
        for every in (0, 10)
    ]
    assert "callback" not in text[0].lower()
    assert "callback" in text[1].lower()


# ---------------------------------------------------------------------------------------------------------------
# The lockstep engine (ufm._batch.solve_lockstep): one trial evaluation per lane per iteration.

DEEP = ufm.UFM(num_classes=2, n_per_class=2, widths=(3, 3), activation="relu", lam_H=1e-2, lam_W=1e-2)
LAMS = np.array([1e-3, 3e-3, 1e-2, 3e-2, 1e-3, 3e-3, 1e-2, 3e-2])


@pytest.fixture(scope="module")
def lockstep_and_singles():
    # 8 runs on 3 lanes in segments of 5 iterations: lanes are retired and refilled many times (one compiled cycle)
    sols = ufm.solve_batch(
        DEEP, seeds=np.arange(8), lam_H=LAMS, lam_W=LAMS, engine="lockstep", slots=3, segment=5, max_steps=500
    )
    singles = [
        ufm.solve(DEEP.replace(lam_H=float(lam), lam_W=float(lam)), key=i, max_steps=500) for i, lam in enumerate(LAMS)
    ]
    return sols, singles


def test_lockstep_runs_end_where_single_solves_end(lockstep_and_singles):
    # the criterion: run i with seed i ends at the loss of ufm.solve(problem_i, key=i) to 1e-6 relative in
    # >= 90% of runs (the lanes round differently from a single run; on a non-convex problem that can, rarely, lead
    # to another minimum). Each run's own result must be consistent: the stored value is the objective at the stored
    # parameters (1e-12: one evaluation), the history ends at the last step, the status is final.
    sols, singles = lockstep_and_singles
    same = 0
    for i, s in enumerate(singles):
        q = DEEP.replace(lam_H=float(LAMS[i]), lam_W=float(LAMS[i]))
        same += abs(float(sols.value[i]) - float(s.value)) <= 1e-6 * abs(float(s.value))
        assert int(sols.num_steps[i]) >= 1 and int(sols.status[i]) >= 0
        np.testing.assert_allclose(ufm.objective(q, sols.take(i).params), sols.value[i], rtol=1e-12)
        np.testing.assert_allclose(sols.history.loss[i, int(sols.num_steps[i])], sols.value[i], rtol=1e-14)
        np.testing.assert_allclose(
            sols.history.loss[i, 0], ufm.objective(q, ufm.init_params(q, jax.random.key(i))), rtol=1e-14
        )
    assert same >= 0.9 * 8, same


def test_lockstep_takes_the_steps_of_the_trial_line_search(lockstep_and_singles):
    # the state machine must accept the same trial as ufm._linesearch (first the unit/previous step, then the
    # fallbacks largest first, else the largest with a decrease): a wrong choice changes the loss at that step by
    # far more than rounding. The first 20 steps' losses agree with the single solve's to 1e-9 relative (rounding
    # of batched arithmetic grows slowly along a trajectory; a different step size differs at 1e-3 or more).
    sols, singles = lockstep_and_singles
    for i, s in enumerate(singles):
        n = min(20, int(s.num_steps), int(sols.num_steps[i]))
        np.testing.assert_allclose(sols.history.loss[i, : n + 1], s.history.loss[: n + 1], rtol=1e-9)


def test_lockstep_falls_back_to_map_for_other_methods():
    # only L-BFGS with the trial line search has a lockstep emulation; gd must give exactly the "map" results
    a = ufm.solve_batch(SHALLOW, seeds=[0, 1], method="gd", lr=0.1, max_steps=50, engine="lockstep")
    b = ufm.solve_batch(SHALLOW, seeds=[0, 1], method="gd", lr=0.1, max_steps=50, engine="map")
    np.testing.assert_array_equal(a.value, b.value)


def test_sweep_padding_slots_end_at_once():
    # a chunk of 3 runs padded to 8: the 5 padding slots start at x = 0 (init_scale 0), a stationary point of the
    # bias-free UFM (every gradient block is a product with a zero factor), so they end at step 0 with status
    # converged; the real runs are the runs of an unpadded solve (same numbers: same values to rounding)
    from ufm._sweep.grid import expand_grid
    from ufm._sweep.runner import dispatch

    grid = dict(num_classes=2, n_per_class=2, widths=[3], lam_H=[1e-3, 1e-2, 1e-1], lam_W=1e-2, max_steps=200)
    rows = expand_grid(grid)
    (sol,) = dispatch(rows, 8, jax.devices()[:1], engine="map")
    assert np.all(np.asarray(sol.num_steps)[3:] == 0) and np.all(np.asarray(sol.status)[3:] == 0)
    ref = ufm.solve_batch(
        ufm.UFM(num_classes=2, n_per_class=2, widths=(3,), lam_W=1e-2),
        seeds=[r["seed"] for r in rows],
        lam_H=[r["lam_H"] for r in rows],
        max_steps=200,
        history=False,
        engine="map",
    )
    np.testing.assert_allclose(np.asarray(sol.value)[:3], ref.value, rtol=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# Host threads (solve_batch(threads=)): each thread drives its own lanes/slots/parts over a shared queue of runs.


@pytest.mark.parametrize("engine", ["lockstep", "map", "slots"])
def test_threads_do_not_change_any_run(engine):
    # run i's arithmetic does not depend on the lane, slot or part it runs in, nor on the other runs, so one thread
    # and two must give each run the same result: losses to 1e-10 relative (measured: bit for bit), the same step
    # count and status. 8 runs on 3 lanes/slots per thread, refilled every 5 iterations: with two threads the runs
    # are handed out as threads free up, so lane composition differs from the one-thread order.
    # Run 7 (seed 15 at lambda 10^(-16/7), found by a scan) ends at a kink and needs the kink polish (76 steps): on
    # two threads "map" polishes it on a thread as soon as its part is done (`map_threads`), the others after the
    # engine; either way it must equal the one-thread polish (which follows the whole batch).
    lams = np.r_[LAMS[:7], 0.005179474679231213]
    kw = dict(seeds=np.r_[0:7, 15], lam_H=lams, lam_W=lams, engine=engine, slots=3, segment=5, max_steps=500)
    one = ufm.solve_batch(DEEP, threads=1, **kw)
    two = ufm.solve_batch(DEEP, threads=2, **kw)
    np.testing.assert_allclose(two.value, one.value, rtol=1e-10)
    np.testing.assert_array_equal(two.num_steps, one.num_steps)
    np.testing.assert_array_equal(two.status, one.status)
    np.testing.assert_allclose(two.params.H, one.params.H, rtol=1e-8, atol=1e-12)
    if engine == "map":  # the same arithmetic as solve (lockstep's ends run 7 converged without the polish)
        assert int(one.polish_steps[7]) > 0 and (np.asarray(one.polish_steps)[:7] == 0).all()
    assert (two.polish_steps is None) == (one.polish_steps is None)
    if one.polish_steps is not None:
        np.testing.assert_array_equal(two.polish_steps, one.polish_steps)
    # every run was solved by one of the threads: its stored value is the objective at its stored parameters
    for i in (0, 7):
        q = DEEP.replace(lam_H=float(lams[i]), lam_W=float(lams[i]))
        np.testing.assert_allclose(ufm.objective(q, two.take(i).params), two.value[i], rtol=1e-12)


@pytest.mark.parametrize("engine", ["lockstep", "slots"])
def test_an_exception_in_a_thread_is_raised_naming_its_runs(engine, monkeypatch):
    # a failure inside a host thread must not be swallowed (nor leave a silent zero row): it is raised by
    # solve_batch as ThreadFailed naming the runs that thread held, and the other thread stops
    import ufm._batch as batch

    name = "_lockstep_cycle" if engine == "lockstep" else "_cycle"
    real = getattr(batch, name)

    def failing(*a, **k):
        load = np.asarray(a[6] if engine == "lockstep" else a[3])
        if (load == 7).any():  # run 7 is loaded by a refill (runs 0-5 fill the slots first)
            raise FloatingPointError("injected")
        return real(*a, **k)

    monkeypatch.setattr(batch, name, failing)
    kw = dict(seeds=np.arange(8), lam_H=LAMS, lam_W=LAMS, engine=engine, slots=3, segment=5, max_steps=500)
    with pytest.raises(batch.ThreadFailed, match=r"runs \[.*7.*\]: FloatingPointError: injected"):
        ufm.solve_batch(DEEP, threads=2, **kw)


@pytest.mark.parametrize("threads,exc", [(0, ValueError), (-1, ValueError), (1.5, TypeError), (True, TypeError)])
def test_solve_batch_refuses_bad_threads(threads, exc):
    with pytest.raises(exc, match="threads must be"):
        ufm.solve_batch(SHALLOW, seeds=[0, 1], threads=threads)


def test_an_exception_in_a_map_part_is_raised_naming_its_runs(monkeypatch):
    # engine "map" on 2 threads: 8 runs in parts of 1 run; the part of run 5 fails before any compute
    import ufm._batch as batch
    import ufm._solver as solver

    real = solver.batch_map_rows

    def failing(problem, inputs, rows, *a, **k):
        if 5 in np.asarray(rows):
            raise FloatingPointError("injected")
        return real(problem, inputs, rows, *a, **k)

    monkeypatch.setattr(solver, "batch_map_rows", failing)
    with pytest.raises(batch.ThreadFailed, match=r"map engine failed while solving runs \[5\]: FloatingPointError"):
        ufm.solve_batch(DEEP, seeds=np.arange(8), lam_H=LAMS, lam_W=LAMS, engine="map", threads=2, max_steps=500)


def test_task_queue_hands_out_follow_up_tasks_first_and_waits_for_busy_items():
    # `TaskQueue` (engine "map" on threads: parts, then the polish of a finished part's runs): items in order, a task
    # added while an item is being done comes before the next item; once nothing is left, `take` waits while an item
    # is still being done (it may add a task) and returns None after; `abort` ends every wait.
    import threading

    from ufm._batch import TaskQueue

    q = TaskQueue(2)
    assert q.take() == 0
    q.add(("polish", 0))
    assert q.take() == ("polish", 0)
    assert q.take() == 1
    q.done()  # the task
    got = []
    waiter = threading.Thread(target=lambda: got.append(q.take()))
    waiter.start()
    waiter.join(0.2)
    assert waiter.is_alive()  # items 0 and 1 are still being done: nothing to hand out yet, but tasks may come
    q.add("late")
    waiter.join(5)
    assert got == ["late"]
    for _ in range(3):
        q.done()  # items 0, 1 and the late task
    assert q.take() is None
    q2 = TaskQueue(1)
    assert q2.take() == 0
    waiter = threading.Thread(target=lambda: got.append(q2.take()))
    waiter.start()
    q2.abort()
    waiter.join(5)
    assert not waiter.is_alive() and got[-1] is None


def test_an_exception_in_a_polish_task_is_raised_naming_its_run(monkeypatch):
    # engine "map" on 2 threads polishes run 7 (the kinked run of test_threads_do_not_change_any_run) as a task of
    # the thread that finished its part: a failure there is raised as ThreadFailed naming run 7 only
    import ufm._batch as batch
    import ufm._solver as solver

    def failing(*a, **k):
        raise FloatingPointError("injected")

    monkeypatch.setattr(solver, "polish_kinks", failing)
    lams = np.r_[LAMS[:7], 0.005179474679231213]
    with pytest.raises(batch.ThreadFailed, match=r"map engine failed while solving runs \[7\]: FloatingPointError"):
        ufm.solve_batch(DEEP, seeds=np.r_[0:7, 15], lam_H=lams, lam_W=lams, engine="map", threads=2, max_steps=500)


def test_solve_batch_checks_init_rows_before_compute():
    # batched init: run i's shapes are checked (on a row made on the host, no eager slicing) and a bad one is named
    # in the papers' symbols; NumPy leaves are accepted; a leaf without the batch axis is refused, not an IndexError
    hs, ws, _ = DEEP.param_shapes()
    H, Ws = np.zeros((4,) + hs), tuple(np.zeros((4,) + s) for s in ws)
    with pytest.raises(ValueError, match=r"init\[i\]\.H must have shape d_1 x N = \(3, 4\); got \(3, 3\)"):
        ufm.solve_batch(DEEP, init=ufm.Params(H[:, :, :3], Ws, None))
    with pytest.raises(ValueError, match=r"init\[i\]\.Ws\[0\] \(W_1\) must have shape d_2 x d_1 = \(3, 3\) .*got \(\)"):
        ufm.solve_batch(DEEP, init=ufm.Params(H, (np.float64(0.0), Ws[1]), None))
    with pytest.raises(ValueError, match="disagree on the batch size"):
        ufm.solve_batch(DEEP, init=ufm.Params(H[:3], Ws, None))
    with pytest.raises(TypeError, match="one floating dtype"):
        ufm.solve_batch(DEEP, init=ufm.Params(H.astype(np.float32), Ws, None))
