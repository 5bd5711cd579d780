"""The default initialisation scale (`ufm._options.auto_init_scale`, ``init_scale="auto"``, the default of `ufm.solve`,
`ufm.solve_batch` and ``ufm solve``) and the zero-saddle restart, its safety net.

The rule: s = min(1, max(s_depth, 4^(1/(L+1)) s_esc)), s_depth^(L+1) = 0.008 for deep linear models and 1 otherwise,
s_esc the edge of the zero point's basin (`ufm._options.escape_scale`, derived in its docstring). The closed forms
below are recomputed here by hand from that derivation; the measured claims (steps, seeds) are checked by solving.
"""

import inspect
import math
import warnings

import jax
import numpy as np
import pytest

import ufm
import ufm._options as options
from ufm._options import DEFAULT_INIT_SCALE, auto_init_scale, auto_init_scale_for, escape_scale, resolve_init_scale
from ufm._solver import batch_inputs


def _p(activation, L, width=4):
    return ufm.UFM(num_classes=3, n_per_class=2, widths=(width,) * L, activation=activation, lam_H=1e-3, lam_W=1e-3)


@pytest.mark.parametrize(
    "activation, L, expected",
    [
        ("linear", 1, 1.0),  # shallow: unchanged
        ("relu", 1, 1.0),  # shallow (no ReLU layer)
        ("linear", 2, 0.2),  # 0.2^3 = 0.008; s_esc = 3.5e-3 at lambda = 1e-3 (below): the depth rule decides
        ("linear", 3, 0.008**0.25),  # 0.2991
        ("linear", 6, 0.008 ** (1 / 7)),  # 0.5013
        ("relu", 2, 1.0),  # deep ReLU: 1.0 (smaller scales fall on the zero saddle)
        ("relu", 4, 1.0),
    ],
)
def test_rule_per_family_and_depth(activation, L, expected):
    p = _p(activation, L)
    assert auto_init_scale(p) == pytest.approx(expected, rel=1e-12)
    assert resolve_init_scale(p, "auto") == pytest.approx(expected, rel=1e-12)
    assert resolve_init_scale(p, 0.7) == 0.7


def _by_hand(activation, L, K, sizes, lam):
    # escape_scale's derivation, redone with math: t* = (N Lambda / sqrt(n_min))^((L+1)/(L-1)) (MSE, equal lambdas:
    # Lambda = lambda), t0 = sqrt(K) rho^(L-1) s^(L+1), rho = 1 or 1/sqrt(2)
    N, g0 = sum(sizes), math.sqrt(min(sizes))
    t_star = (N * lam / g0) ** ((L + 1) / (L - 1))
    rho = 1.0 if activation == "linear" else 1 / math.sqrt(2)
    return (t_star / (math.sqrt(K) * rho ** (L - 1))) ** (1 / (L + 1))


@pytest.mark.parametrize(
    "activation, L, K, sizes, lam, s_esc, auto",
    [
        # K=4, n=1, lambda=1/16, L=3: t* = (4/16)^2 = 1/16, s_esc = (1/32)^(1/4) and 4^(1/4) s_esc = 2^(-3/4)
        ("linear", 3, 4, (1, 1, 1, 1), 1 / 16, 32**-0.25, 2**-0.75),
        # issue 13's large-lambda case: t* = 0.6^3, s_esc = 0.6 / 3^(1/6) = 0.49963; 4^(1/3) x that = 0.79313
        ("linear", 2, 3, (3, 2, 1), 0.1, 0.6 / 3 ** (1 / 6), 4 ** (1 / 3) * 0.6 / 3 ** (1 / 6)),
        # Dang et al., L = 6: 4^(1/7) s_esc = 0.50502 just above the depth rule's 0.50170; L = 3: s_esc = 0.11892,
        # 4^(1/4) s_esc = 0.16818 < 0.29907, the depth rule decides
        ("linear", 6, 4, (100,) * 4, 5e-4, None, 4 ** (1 / 7) * _by_hand("linear", 6, 4, (100,) * 4, 5e-4)),
        ("linear", 3, 4, (100,) * 4, 5e-4, None, 0.008**0.25),
        # deep ReLU, K=6, L=4, lambda=0.004: s_esc = 0.297, the rule keeps 1.0
        ("relu", 4, 6, (1,) * 6, 0.004, None, 1.0),
        # large lambda: the cap at 1
        ("linear", 2, 3, (1, 1, 1), 1.0, None, 1.0),
    ],
)
def test_escape_scale_closed_forms(activation, L, K, sizes, lam, s_esc, auto):
    hand = _by_hand(activation, L, K, sizes, lam)
    if s_esc is not None:
        assert hand == pytest.approx(s_esc, rel=1e-12)  # the test's own arithmetic against the closed form
    got = escape_scale(activation, L, K, sizes, lam, lam)
    assert float(got) == pytest.approx(hand, rel=1e-12)
    p = ufm.UFM(num_classes=K, n_per_class=sizes, widths=(5,) * L, activation=activation, lam_H=lam, lam_W=lam)
    assert auto_init_scale(p) == pytest.approx(auto, rel=1e-12)


def test_escape_scale_geometric_mean_and_zero_lambda():
    # Lambda = (lam_H lam_1 lam_2)^(1/3): (0.05, 0.1, 0.2) has the geometric mean 0.1, so the same edge as lambda = 0.1
    a = escape_scale("linear", 2, 3, (3, 2, 1), 0.05, (0.1, 0.2))
    assert float(a) == pytest.approx(_by_hand("linear", 2, 3, (3, 2, 1), 0.1), rel=1e-12)
    assert float(escape_scale("linear", 2, 3, (3, 2, 1), 0.0, 0.1)) == 0.0  # no weight decay on H: no basin
    assert float(escape_scale("linear", 1, 3, (3, 2, 1), 0.1, 0.1)) == 0.0  # shallow: no basin


def test_batch_auto_scales_are_each_runs_rule():
    # solve_batch's "auto": run i's scale is auto_init_scale of the problem with run i's lambdas; NumPy and traced
    # inputs give the same numbers
    p = ufm.UFM(num_classes=3, n_per_class=(3, 2, 1), widths=(4, 4), lam_H=1e-2, lam_W=1e-2)
    lam_H = np.array([1e-2, 0.1, 0.3])
    lam_W = np.array([[1e-2, 1e-2], [0.1, 0.1], [0.3, 0.1]])
    keys = jax.random.split(jax.random.key(0), 3)
    scales = np.asarray(batch_inputs(p, np.dtype("float64"), 3, keys, lam_H, lam_W, None, 1.0, "auto")[5])
    each = [auto_init_scale(p.replace(lam_H=h, lam_W=tuple(w))) for h, w in zip(lam_H, lam_W, strict=True)]
    np.testing.assert_allclose(scales, each, rtol=1e-12)
    assert scales[0] == pytest.approx(0.2) and scales[1] == pytest.approx(4 ** (1 / 3) * 0.6 / 3 ** (1 / 6))
    traced = jax.jit(
        lambda h, w: auto_init_scale_for("linear", 2, num_classes=3, class_sizes=(3, 2, 1), lam_H=h, lam_W=w)
    )(lam_H, lam_W)
    np.testing.assert_allclose(np.asarray(traced), each, rtol=1e-12)


def test_auto_is_the_default_everywhere_and_refuses_other_strings():
    assert DEFAULT_INIT_SCALE == "auto"
    assert inspect.signature(ufm.solve).parameters["init_scale"].default == DEFAULT_INIT_SCALE
    assert inspect.signature(ufm.solve_batch).parameters["init_scale"].default == DEFAULT_INIT_SCALE
    with pytest.raises(ValueError, match="init_scale"):
        ufm.solve(_p("linear", 2), key=0, init_scale="big")
    with pytest.raises(ValueError, match="init_scale"):
        ufm.solve_batch(_p("linear", 2), seeds=[0, 1], init_scale="big")


def _dang(L):
    return ufm.UFM(num_classes=4, n_per_class=100, widths=(64,) * L, lam_H=5e-4, lam_W=5e-4)


def _dang_check(L, old=False):
    # Dang et al.'s setting (K=4, n=100, L layers of width 64, lambda=5e-4): from the default init L-BFGS reaches the
    # closed-form optimum (ufm.predict, Dang et al. 2023) within 600 steps, seeds 0-2 (measured: 283-362 steps at
    # L=3, 349-412 at L=6); from the old default 1.0 (``old``) it is still > 10x above it after the same 600 steps.
    # One batch (one compile) at the scale "auto" gives each run (test_batch_auto_scales_are_each_runs_rule)
    p = _dang(L)
    f_star = ufm.predict(p).loss
    s = auto_init_scale(p)
    seeds, scales = [0, 1, 2] + [0] * old, [s] * 3 + [1.0] * old
    sols = ufm.solve_batch(p, seeds=seeds, init_scale=scales, max_steps=600, history=False)
    assert list(sols.status_name[:3]) == ["converged"] * 3, sols.num_steps
    np.testing.assert_allclose(np.asarray(sols.value[:3]), f_star, rtol=1e-10)
    if old:
        assert float(sols.value[3]) > 10 * f_star


def test_default_init_converges_in_dangs_setting_L3():
    _dang_check(3)


@pytest.mark.slow
def test_default_init_converges_in_dangs_setting_L6():
    _dang_check(6, old=True)


@pytest.mark.slow
def test_relu_default_never_at_the_zero_saddle():
    # K=6, L=4, widths 11, lambda=0.004, n=1 (issue 13): init 0.1 puts every start on the zero saddle (loss 1/2, the
    # DNC loss is 8.4x lower); from the default none is
    p = ufm.UFM(num_classes=6, n_per_class=1, widths=(11,) * 4, activation="relu", lam_H=0.004, lam_W=0.004)
    assert auto_init_scale(p) == 1.0
    low = ufm.solve_batch(p, seeds=range(4), init_scale=0.1, history=False, polish=False)
    assert list(low.status_name) == ["zero_saddle"] * 4  # the batch reports the zero saddle as solve does
    sols = ufm.solve_batch(p, seeds=range(4), history=False, polish=False)
    assert "zero_saddle" not in list(sols.status_name), sols.status_name


def _large_lambda_deep_linear():
    # issue 13: deep linear at large lambda, where the depth rule alone (s = 0.2, L = 2) lands on the zero saddle in
    # every seed (weight decay beats the product of three small factors); the escape term gives 0.793
    return ufm.UFM(num_classes=3, n_per_class=(3, 2, 1), widths=(4, 4), activation="linear", lam_H=0.1, lam_W=0.1)


def test_large_lambda_default_leaves_the_zero_saddle():
    p = _large_lambda_deep_linear()
    f_star = ufm.predict(p).loss  # the closed form (THEORY.md), independent of the solver: 0.43679...
    assert f_star == pytest.approx(0.43679, abs=1e-5)
    depth_only = ufm.solve_batch(p, seeds=range(4), init_scale=0.2, history=False)
    assert list(depth_only.status_name) == ["zero_saddle"] * 4  # an explicit scale: reported, never restarted
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # the rule leaves the basin by itself: no restart
        sols = ufm.solve_batch(p, seeds=range(4), history=False)
        one = ufm.solve(p, key=0, history=False)
    assert list(sols.status_name) == ["converged"] * 4
    v = np.asarray(sols.value)
    assert np.all(v < 0.5 * (1 - 1e-3))  # off the zero point (f(0) = 1/2)
    # seeds 0 and 1 reach the optimum; the others a stationary point with the smallest class collapsed (measured
    # 1.39% above, as from 1.0 in 2/8 seeds)
    np.testing.assert_allclose(v[:2], f_star, rtol=1e-10)
    assert float(one.value) == pytest.approx(float(v[0]), rel=1e-10)  # solve and solve_batch: the same run


@pytest.fixture
def rule_without_escape(monkeypatch):
    """The rule as it was (depth only): its scale 0.2 puts the large-lambda case on the zero saddle in every seed."""
    monkeypatch.setattr(options, "ESCAPE_PRODUCT", 0.0)


def test_solve_restarts_once_from_one_at_the_zero_saddle(rule_without_escape):
    p = _large_lambda_deep_linear()
    f_star = ufm.predict(p).loss
    assert auto_init_scale(p) == pytest.approx(0.2)
    explicit = ufm.solve(p, key=0, init_scale=0.2, history=False)
    assert explicit.status_name == "zero_saddle"
    with pytest.warns(RuntimeWarning, match="zero saddle.*restarted once from init_scale=1.0"):
        sol = ufm.solve(p, key=0, history=False)
    assert sol.status_name == "converged"
    assert abs(float(sol.value) - f_star) <= 1e-10 * f_star
    one = ufm.solve(p, key=0, init_scale=1.0, history=False)
    assert float(sol.value) == float(one.value)  # the restart is the run from 1.0 with the same key
    assert int(sol.num_steps) == int(explicit.num_steps) + int(one.num_steps)


def test_solve_batch_restarts_each_run_at_the_zero_saddle(rule_without_escape):
    # per run, as solve: the batch's zero-saddle runs are run again from 1.0 with their own keys and lambdas
    p = _large_lambda_deep_linear()
    lam_H = np.array([0.1, 0.1, 1e-2])  # run 2: s_depth = 0.2 is fine at lambda = 1e-2 (no restart)
    with pytest.warns(RuntimeWarning, match=r"runs \[0, 1\] ended at the zero saddle"):
        sols = ufm.solve_batch(p, seeds=[0, 1, 2], lam_H=lam_H, lam_W=lam_H, history=False)
    for i in range(3):
        q = p.replace(lam_H=lam_H[i], lam_W=lam_H[i])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            ref = ufm.solve(q, key=i, history=False)
        assert sols.status_name[i] == ref.status_name == "converged"
        assert float(sols.value[i]) == pytest.approx(float(ref.value), rel=1e-10)
        assert int(sols.num_steps[i]) == int(ref.num_steps)  # both runs counted, as solve counts them


# --- the first solve is one compiled program (issue 13 point 6) ---------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 12345, 2**31 - 1, 2**31, 2**32 + 5, 2**63 - 1])
def test_integer_seed_is_jax_random_key(seed):
    # seed_key builds the threefry key data in NumPy; JAX's own seeding is the reference
    from ufm._solver import seed_key

    want = jax.random.key_data(jax.random.key(seed))
    np.testing.assert_array_equal(np.asarray(jax.random.key_data(seed_key(seed))), np.asarray(want))


def test_first_solve_compiles_one_program(caplog):
    # a shape no other test solves (its program is new in this process): the only XLA compilation between the
    # problem and the result is the solve program itself (no eager per-leaf casts, key seeding or host-side status
    # decisions as jnp ops; the UFM constructor's own casts happen before and are not counted)
    import logging

    p = ufm.UFM(num_classes=3, n_per_class=1, widths=(5, 7), activation="relu", lam_H=3e-3, lam_W=3e-3)
    prev = jax.config.jax_log_compiles
    jax.config.update("jax_log_compiles", True)
    try:
        with caplog.at_level(logging.WARNING):
            sol = ufm.solve(p, key=3, method="gd", max_steps=3, history=False)
            int(sol.status)
    finally:
        jax.config.update("jax_log_compiles", prev)
    compiled = [r.getMessage().split(" with ")[0] for r in caplog.records if r.getMessage().startswith("Compiling")]
    assert compiled == ["Compiling jit(run_jit)"], compiled
    assert sol.status_name == "max_steps"  # 3 GD steps from a random start: nowhere near a kink, no polish
