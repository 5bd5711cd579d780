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
