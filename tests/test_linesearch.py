"""The trial line search (ufm._linesearch): acceptance conditions checked from independently recomputed values,
exact steps on quadratics, dtype preservation, and its use by the solver. No Hessians; small sizes."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ufm
from ufm._linesearch import scale_by_trial_linesearch

C1 = 1e-4  # slope_rtol default
C2 = 0.9  # curv_rtol default
EPS = 1e-6  # approx_dec_rtol default


def _quadratic(h):
    # f(x) = h/2 ||x||^2, grad = h x
    return lambda x: 0.5 * h * jnp.sum(x**2)


@pytest.mark.parametrize("lazy", [True, False])
def test_exact_step_on_a_quadratic(lazy):
    # Along d = -g = -h x, phi(a) = f(x) (1 - a h)^2: Armijo holds iff a <= 2 (1 - c1) / h and the curvature
    # condition phi'(a) >= c2 phi'(0) iff a >= (1 - c2) / h. With h = 5 (a* = 0.2): trial 1 fails Armijo
    # (1 > 0.39996), trial 0.3 = r^1 is the largest acceptable one, so x_new = x (1 - 0.3 * 5) = -0.5 x.
    h, x = 5.0, jnp.array([1.0, -2.0, 0.5])
    f = _quadratic(h)
    opt = optax.chain(optax.sgd(1.0), scale_by_trial_linesearch(num_trials=6, decrease_factor=0.3, lazy=lazy))
    s = opt.init(x)
    g = jax.grad(f)(x)
    u, s = opt.update(g, s, x, value=f(x), grad=g, value_fn=f)
    ls = s[1]
    np.testing.assert_allclose(ls.learning_rate, 0.3, rtol=1e-6)
    np.testing.assert_allclose(x + u, -0.5 * x, rtol=1e-6)
    # stored value/grad are those of the new point (the driver reuses them)
    np.testing.assert_allclose(ls.value, f(-0.5 * x), rtol=1e-6)
    np.testing.assert_allclose(ls.grad, h * (-0.5 * x), rtol=1e-6)
    # next first trial: min(1, 0.3 / 0.3) = 1
    np.testing.assert_allclose(ls.initial_step, 1.0, rtol=1e-6)
    assert bool(ls.info.acceptable) and int(ls.info.num_evaluations) == (6 if not lazy else 6)
    # h = 1: the first trial a = 1 is the exact minimiser, accepted alone by the lazy search
    f1 = _quadratic(1.0)
    s = opt.init(x)
    u, s = opt.update(x, s, x, value=f1(x), grad=x, value_fn=f1)
    np.testing.assert_allclose(x + u, 0.0, atol=1e-7)
    assert int(s[1].info.num_evaluations) == (1 if lazy else 6)


def test_no_acceptable_step_falls_back_to_sufficient_decrease_then_to_no_step():
    # f(x) = -x^2/2 is unbounded below: along d = -g every trial satisfies Armijo but the curvature test
    # phi'(a) = -g^2 (1 + a) >= c2 phi'(0) = -c2 g^2 fails for all a > 0; the largest trial with a sufficient
    # decrease (a0 = 1) is taken, x = 1 -> 2, and the next first trial stays min(1, 1 / r) = 1.
    f = lambda x: -0.5 * jnp.sum(x**2)  # noqa: E731
    x = jnp.array([1.0])
    opt = optax.chain(optax.sgd(1.0), scale_by_trial_linesearch())
    s = opt.init(x)
    g = jax.grad(f)(x)
    u, s = opt.update(g, s, x, value=f(x), grad=g, value_fn=f)
    assert not bool(s[1].info.acceptable)
    np.testing.assert_allclose(x + u, 2.0)
    np.testing.assert_allclose(s[1].initial_step, 1.0)
    # a function that only increases along d (a wrong gradient): no step at all, value and grad unchanged, and
    # the next first trial is r^M = 0.3^6 times a0
    up = lambda x: jnp.sum(x)  # noqa: E731
    s = opt.init(x)
    u, s = opt.update(-jnp.ones(1), s, x, value=up(x), grad=-jnp.ones(1), value_fn=up)
    np.testing.assert_array_equal(u, 0.0)
    np.testing.assert_array_equal(s[1].value, up(x))
    np.testing.assert_allclose(s[1].initial_step, 0.3**6, rtol=1e-6)


P = ufm.UFM(num_classes=3, n_per_class=2, widths=(4, 4), activation="relu", lam_H=1e-2, lam_W=1e-2)


def test_every_accepted_step_satisfies_the_wolfe_conditions_on_a_ufm():
    # 40 L-BFGS steps with the trial search on a deep ReLU UFM, in one compiled scan; for every step the
    # conditions are re-checked from f and grad f recomputed independently at x_k and x_{k+1} (float64):
    #   Armijo  f(x+) <= f(x) + c1 a s   or the approximate  f(x+) <= f(x) + eps |f(x)|,
    #   curvature <grad f(x+), d> >= c2 s,  s = <grad f(x), d>,  d = (x+ - x) / a.
    x0 = ufm.init_params(P, jax.random.key(0), dtype="float64")
    xf0, unravel = jax.flatten_util.ravel_pytree(x0)

    def f(z):
        return ufm.objective(P, unravel(z))

    opt = optax.chain(optax.scale_by_lbfgs(), optax.scale(-1.0), scale_by_trial_linesearch())

    def body(c, _):
        x, s = c
        v, g = jax.value_and_grad(f)(x)
        u, s = opt.update(g, s, x, value=v, grad=g, value_fn=f)
        return (x + u, s), (x, x + u, s[2].learning_rate, s[2].info.acceptable)

    _, (xs, xn, a, ok) = jax.jit(lambda x: jax.lax.scan(body, (x, opt.init(x)), None, length=40))(xf0)
    fv = jax.vmap(f)
    gv = jax.vmap(jax.grad(f))
    f0, f1, g0, g1 = fv(xs), fv(xn), gv(xs), gv(xn)
    # the first steps are accepted (later ones may find no acceptable step once the run sits at the optimum, where
    # the search then takes no step or the lowest value below f)
    ok = np.asarray(ok)
    assert ok[:10].all(), np.flatnonzero(~ok)
    xs, xn, a, f0, f1, g0, g1 = (np.asarray(v)[ok] for v in (xs, xn, a, f0, f1, g0, g1))
    assert (a > 0).all()
    d = (xn - xs) / a[:, None]
    s = np.sum(g0 * d, axis=1)
    assert (s < 0).all()
    armijo = f1 <= f0 + C1 * a * s
    approx = f1 <= f0 + EPS * np.abs(f0)
    assert (armijo | approx).all()
    # curvature, up to the rounding of d = (x+ - x)/a (relative 1e-10 of |s|)
    assert (np.sum(g1 * d, axis=1) >= C2 * s - 1e-10 * np.abs(s)).all()
    assert f1[-1] < f0[0]


def test_float32_stays_float32_and_the_solver_uses_it():
    x = jnp.ones(3, jnp.float32)
    f = _quadratic(2.0)
    opt = optax.chain(optax.sgd(1.0), scale_by_trial_linesearch())
    s = opt.init(x)
    u, s = opt.update(2 * x, s, x, value=f(x), grad=2 * x, value_fn=f)
    assert u.dtype == jnp.float32 and s[1].value.dtype == jnp.float32 and s[1].learning_rate.dtype == jnp.float32
    # as a user's transformation in ufm.solve (shallow MSE, no spurious minima: reaches the L-BFGS optimum)
    p = ufm.UFM(num_classes=2, n_per_class=2, widths=(3,), lam_H=1e-2, lam_W=1e-2)
    m = optax.chain(optax.scale_by_lbfgs(), optax.scale(-1.0), scale_by_trial_linesearch())
    sol = ufm.solve(p, key=0, method=m, dtype="float32", max_steps=2000, patience=50)
    assert sol.value.dtype == jnp.float32 and sol.params.H.dtype == jnp.float32
    assert sol.status_name == "converged", sol.message
    # the closed-form optimum of the shallow bias-free MSE UFM (THEORY.md §1, ufm.predict); near a minimum the
    # relative loss gap is ~rel_grad^2 <= 1e-8, below float32's rounding of f (6e-8): 1e-5 covers both
    np.testing.assert_allclose(float(sol.value), float(ufm.predict(p).loss), rtol=1e-5)


def test_bad_arguments_are_refused():
    for kw, match in [
        (dict(num_trials=0), "num_trials"),
        (dict(decrease_factor=1.0), "decrease_factor"),
        (dict(slope_rtol=0.95), "slope_rtol < curv_rtol"),
        (dict(max_stepsize=0.0), "max_stepsize"),
    ]:
        with pytest.raises(ValueError, match=match):
            scale_by_trial_linesearch(**kw)


def test_draw_params_equals_init_params_bit_for_bit():
    # the solver draws its start with one normal draw hashed by its own threefry2x32 (ufm._driver.draw_params);
    # the numbers must be those of the public ufm.init_params (jax.random) for the same key, scale and dtype
    # (regularised bias included: b = 0), eagerly and compiled (as inside the solver's program), for a typed key
    # and a legacy uint32 key; the hash itself equals JAX's threefry_2x32 on random counts
    from jax._src.random.threefry2x32 import threefry_2x32

    from ufm._driver import draw_params, threefry2x32

    p = ufm.UFM(num_classes=3, n_per_class=(2, 3, 1), widths=(5, 4), bias="reg", lam_b=1e-3)
    jitted = jax.jit(draw_params, static_argnums=(0, 3))
    for dt in ("float64", "float32"):
        for key in (jax.random.key(7), jax.random.PRNGKey(11)):
            a = ufm.init_params(p, key, 0.5, dt)
            for b in (draw_params(p, key, 0.5, dt), jitted(p, key, 0.5, dt)):
                for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
                    assert x.dtype == y.dtype and x.shape == y.shape
                    np.testing.assert_array_equal(x, y)
    rng = np.random.default_rng(0)
    k = rng.integers(0, 2**32, size=2, dtype=np.uint32)
    c = rng.integers(0, 2**32, size=(2, 64), dtype=np.uint32)
    ours = jnp.concatenate(threefry2x32(k[0], k[1], jnp.asarray(c[0]), jnp.asarray(c[1])))
    np.testing.assert_array_equal(ours, threefry_2x32(jnp.asarray(k), jnp.asarray(c.reshape(-1))))


def test_one_trial_per_iteration_lbfgs_takes_the_steps_of_the_batched_search():
    # The default "lbfgs" runs the search as a state machine (ufm._driver.lbfgs_step: one trial point per loop
    # iteration, tried largest first, so the first acceptable one is the largest acceptable); the same L-BFGS with
    # scale_by_trial_linesearch given as a user transformation runs the former algorithm (all fallback trials in
    # one vmap). Both must take the same steps: same step count, same point up to the rounding of batched
    # evaluations (1e-10 relative; they are bit-identical while every search accepts its first trial).
    p = ufm.UFM(num_classes=3, n_per_class=2, widths=(4, 4), activation="linear", lam_H=1e-2, lam_W=1e-2)
    machine = ufm.solve(p, key=3, max_steps=40, history=True)
    chain = optax.chain(optax.scale_by_lbfgs(memory_size=10), optax.scale(-1.0), scale_by_trial_linesearch())
    batched = ufm.solve(p, key=3, method=chain, max_steps=40, patience=50, history=True)
    assert int(machine.num_steps) == int(batched.num_steps)
    np.testing.assert_allclose(machine.history.loss, batched.history.loss, rtol=1e-10)
    for a, b in zip(jax.tree_util.tree_leaves(machine.params), jax.tree_util.tree_leaves(batched.params)):
        np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-12)
