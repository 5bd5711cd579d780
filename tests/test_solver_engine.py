"""The solver engine (ufm._driver, ufm._batch, ufm._options): progress from inside the compiled loop, SIGINT,
every optax transformation, the scale-aware stopping rule, the batched slot engine, statuses and validation."""

import os
import signal

import jax
import numpy as np

import ufm

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

    def cb(k, v, g):
        if k >= 500 and not sent:
            sent.append(k)
            os.kill(os.getpid(), signal.SIGINT)

    s = ufm.solve(SHALLOW, key=0, method="gd", lr=0.1, max_steps=100_000, tol=0.0, rtol=0.0, progress=cb,
                  progress_every=100)
    assert s.status_name == "interrupted" and not s.success
    assert sent and sent[0] <= int(s.num_steps) <= sent[0] + 100
    np.testing.assert_allclose(ufm.objective(SHALLOW, s.params), s.value, rtol=1e-13)
    # the handler is restored: a later SIGINT raises KeyboardInterrupt as usual
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


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
