"""The derivatives of the forward pass (`ufm._model.layer_matmul`, a custom JVP that keeps every backward product in
the untransposed layout) against central finite differences and against plain ``W @ H`` autodiff: gradient and
Hessian-vector products (``jvp(grad)``, what the certificates use) in float64 (issue 20)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ufm
from ufm._model import layer_matmul


def _plain_objective(problem, params):
    # the objective of THEORY.md §0/§4 written again with plain matmuls (MSE, bias-free, targets one-hot)
    h = params.H
    for W in params.Ws[:-1]:
        h = jax.nn.relu(W @ h) if problem.activation == "relu" else W @ h
    out = params.Ws[-1] @ h
    Y = jax.nn.one_hot(problem.labels(), problem.num_classes, dtype=out.dtype).T
    lam_W = np.broadcast_to(np.asarray(problem.lam_W, float), (problem.L,))
    reg = sum(lw / 2 * jnp.sum(W**2) for lw, W in zip(lam_W, params.Ws)) + problem.lam_H / 2 * jnp.sum(params.H**2)
    return jnp.sum((out - Y) ** 2) / (2 * problem.N) + reg


@pytest.mark.parametrize("activation", ["relu", "linear"])
def test_grad_and_hvp_match_plain_autodiff_and_finite_differences(activation):
    p = ufm.UFM(3, 2, (4, 5, 4), activation=activation, loss="mse", bias="none", lam_H=1e-2, lam_W=2e-2)
    params = ufm.init_params(p, jax.random.key(1), dtype="float64")
    v = jax.tree.map(lambda x: jax.random.normal(jax.random.key(2), x.shape, x.dtype), params)
    f = lambda q: ufm.objective(p, q)  # noqa: E731
    g = jax.grad(f)(params)
    g_ref = jax.grad(lambda q: _plain_objective(p, q))(params)
    assert float(f(params)) == pytest.approx(float(_plain_objective(p, params)), rel=1e-14)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-15)
    hv = jax.jvp(jax.grad(f), (params,), (v,))[1]
    hv_ref = jax.jvp(jax.grad(lambda q: _plain_objective(p, q)), (params,), (v,))[1]
    for a, b in zip(jax.tree.leaves(hv), jax.tree.leaves(hv_ref)):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
    # central differences of the gradient along v: error O(eps^2 f''') + O(1e-16 / eps); eps = 1e-5 -> ~1e-9
    # (ReLU: the random point is almost surely away from the kinks, so the objective is smooth there)
    eps = 1e-5
    gp = jax.grad(f)(jax.tree.map(lambda x, t: x + eps * t, params, v))
    gm = jax.grad(f)(jax.tree.map(lambda x, t: x - eps * t, params, v))
    for a, b, c in zip(jax.tree.leaves(hv), jax.tree.leaves(gp), jax.tree.leaves(gm)):
        np.testing.assert_allclose(a, (b - c) / (2 * eps), rtol=1e-6, atol=1e-9)
    # directional derivative of f along v = <grad, v>; central-difference truncation eps^2 |f3(v, v, v)|/6 with
    # ||v|| ~ 8 here is ~1e-9 absolute on a derivative ~0.1: rel 1e-6
    fd = f(jax.tree.map(lambda x, t: x + eps * t, params, v)) - f(jax.tree.map(lambda x, t: x - eps * t, params, v))
    dot = sum(jnp.sum(a * b) for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(v)))
    assert float(fd / (2 * eps)) == pytest.approx(float(dot), rel=1e-6)


def test_layer_matmul_value_and_vjp_are_the_products():
    rng = np.random.default_rng(0)
    W, H, G = (jnp.asarray(rng.normal(size=s)) for s in ((3, 4), (4, 5), (3, 5)))
    out, vjp = jax.vjp(layer_matmul, W, H)
    np.testing.assert_allclose(out, np.asarray(W) @ np.asarray(H), rtol=1e-14)
    dW, dH = vjp(G)
    np.testing.assert_allclose(dW, np.asarray(G) @ np.asarray(H).T, rtol=1e-13)
    np.testing.assert_allclose(dH, np.asarray(W).T @ np.asarray(G), rtol=1e-13)


def _kink_point(p, dtype):
    # a point ON ReLU kinks: column 0 of H is zero, so column 0 of Z_2 = W_1 H is exactly zero, and row 0 of W_2 is
    # zero, so row 0 of Z_3 = W_2 relu(Z_2) is exactly zero: relu'(0) is where autodiff conventions could differ
    params = ufm.init_params(p, jax.random.key(3), dtype=dtype)
    Ws = list(params.Ws)
    Ws[1] = Ws[1].at[0].set(0.0)
    return params._replace(H=params.H.at[:, 0].set(0.0), Ws=tuple(Ws))


def _kink_direction(params, key):
    # a direction that keeps those entries of Z at exactly zero along the whole line x + t v (zero column of v_H,
    # zero row of v_W2): f is smooth along it, so finite differences are valid although the point is on a kink
    v = jax.tree.map(lambda x: jax.random.normal(key, x.shape, x.dtype), params)
    Ws = list(v.Ws)
    Ws[1] = Ws[1].at[0].set(0.0)
    return v._replace(H=v.H.at[:, 0].set(0.0), Ws=tuple(Ws))


def test_grad_and_hvp_at_relu_kinks_match_plain_autodiff_eager_and_jitted():
    p = ufm.UFM(3, 2, (4, 5, 4), activation="relu", loss="mse", bias="none", lam_H=1e-2, lam_W=2e-2)
    params = _kink_point(p, "float64")
    out = ufm.forward(p, params)
    assert float(jnp.min(jnp.abs(out.Z[0][:, 0]))) == 0.0 and float(jnp.min(jnp.abs(out.Z[1][0]))) == 0.0
    v = _kink_direction(params, jax.random.key(4))
    f = lambda q: ufm.objective(p, q)  # noqa: E731
    f_ref = lambda q: _plain_objective(p, q)  # noqa: E731
    hvp = lambda fn: lambda q, t: jax.jvp(jax.grad(fn), (q,), (t,))  # noqa: E731
    g_ref, hv_ref = hvp(f_ref)(params, v)
    # eager and jitted (a different XLA fusion of the same rule) must agree with plain W @ H autodiff, which makes
    # the same choice relu'(0) = 0: only rounding differs
    for run in (hvp(f), jax.jit(hvp(f))):
        g, hv = run(params, v)
        for a, b in zip(jax.tree.leaves((g, hv)), jax.tree.leaves((g_ref, hv_ref))):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
    # along v the kink entries stay at 0, so f and grad f are smooth on the line: central differences (eps = 1e-5,
    # truncation ~eps^2 |f'''| ~ 1e-9, rounding ~1e-16 / eps ~ 1e-11) check <grad, v> and the HVP
    eps = 1e-5
    xp, xm = (jax.tree.map(lambda x, t, s=s: x + s * eps * t, params, v) for s in (1.0, -1.0))
    dot = sum(jnp.sum(a * b) for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(v)))
    vg = jax.jit(jax.value_and_grad(f))
    (fp, gp), (fm, gm) = vg(xp), vg(xm)
    assert float((fp - fm) / (2 * eps)) == pytest.approx(float(dot), rel=1e-6)
    for a, b, c in zip(jax.tree.leaves(hv), jax.tree.leaves(gp), jax.tree.leaves(gm)):
        np.testing.assert_allclose(a, (b - c) / (2 * eps), rtol=1e-6, atol=1e-9)


def test_float32_objective_grad_and_hvp_stay_float32_and_match_plain_autodiff():
    p = ufm.UFM(3, 2, (4, 5, 4), activation="relu", loss="mse", bias="none", lam_H=1e-2, lam_W=2e-2)
    params = ufm.init_params(p, jax.random.key(1), dtype="float32")
    v = jax.tree.map(lambda x: jax.random.normal(jax.random.key(2), x.shape, x.dtype), params)
    # jitted: one compile instead of the dozens of per-primitive compiles of eager mode (test time)
    g, hv = jax.jit(lambda q, t: jax.jvp(jax.grad(lambda x: ufm.objective(p, x)), (q,), (t,)))(params, v)
    # the float64 reference at the same (float32-representable) point: float32 rounding, ~1e-7 per operation
    # through 4 layers of sums of <= 5 terms, so rtol 1e-5 relative to each leaf's scale
    p64 = jax.tree.map(lambda x: x.astype(jnp.float64), (params, v))
    g_ref, hv_ref = jax.jit(lambda q, t: jax.jvp(jax.grad(lambda x: _plain_objective(p, x)), (q,), (t,)))(*p64)
    for a, b in zip(jax.tree.leaves((g, hv)), jax.tree.leaves((g_ref, hv_ref))):
        assert a.dtype == jnp.float32
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(b))))
