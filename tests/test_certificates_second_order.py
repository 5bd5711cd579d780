"""Second-order certificates (issues 16 and 17): the compiled Lanczos against numpy.linalg.eigvalsh, the matrix-free
symmetry projector against the explicit SVD basis, the Lanczos Hessian spectrum against the dense one, the budget
fallback, and the kink test (multipliers against finite differences, the binary DNC optimum, the zero point, a
stalled non-optimal point)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
from jax.flatten_util import ravel_pytree

import ufm
from ufm import _certificates as cert
from ufm import _lanczos

P_LIN3 = ufm.UFM(3, 2, (4, 5, 4), loss="mse", bias="none", lam_H=1e-2, lam_W=1e-2)  # three coupled rotation spaces
P_CE = ufm.UFM(3, 2, (4,), loss="ce", bias="free", lam_H=1e-2, lam_W=1e-2)  # rotations + the softmax shift
P_SH = ufm.UFM(3, 2, (4,), loss="mse", bias="none", lam_H=2e-2, lam_W=1e-2)
P_BIN = ufm.UFM(2, 3, (4, 4, 4), activation="relu", loss="mse", bias="none", lam_H=5e-3, lam_W=5e-3)

_lanczos_dense = jax.jit(lambda A, v0, m: _lanczos.lanczos(lambda v: A @ v, v0, m), static_argnums=2)


def test_lanczos_ritz_values_against_eigvalsh():
    rng = np.random.default_rng(0)
    n = 40
    Q = np.linalg.qr(rng.standard_normal((n, n)))[0]
    ev = np.concatenate([[-3.0, -1.0], np.linspace(0.0, 1.0, n - 4), [2.0, 5.0]])
    A = (Q * ev) @ Q.T
    v0 = jnp.asarray(rng.standard_normal(n))
    # m = n steps: T_n is similar to A (full reorthogonalisation keeps V orthonormal), every eigenvalue exact
    a, b, V, steps = _lanczos_dense(jnp.asarray(A), v0, n)
    theta, res, Y = _lanczos.ritz(a, b, steps)
    np.testing.assert_allclose(theta, ev, atol=1e-12)
    assert np.abs(np.asarray(V) @ np.asarray(V).T - np.eye(n)).max() < 1e-12
    # m = 20 steps: the isolated extremes have converged, the residual bound |beta_m y_m| is honest, and every Ritz
    # value lies inside [lambda_min, lambda_max] (interlacing)
    a, b, V, steps = _lanczos_dense(jnp.asarray(A), v0, 20)
    theta, res, Y = _lanczos.ritz(a, b, steps)
    x = np.asarray(V).T @ Y[:, 0]
    assert np.linalg.norm(A @ x - theta[0] * x) == pytest.approx(res[0], abs=1e-12)
    assert abs(theta[0] + 3.0) < 1e-10 and abs(theta[-1] - 5.0) < 1e-10
    assert theta.min() >= -3.0 - 1e-12 and theta.max() <= 5.0 + 1e-12
    # three distinct eigenvalues: the Krylov space is 3-dimensional, so the iteration breaks down after 3 steps
    A3 = (Q * np.repeat([-1.0, 0.5, 2.0], [10, 20, 10])) @ Q.T
    a, b, V, steps = _lanczos_dense(jnp.asarray(A3), v0, 10)
    theta, res, _ = _lanczos.ritz(a, b, steps)
    assert int(steps) == 3
    np.testing.assert_allclose(theta, [-1.0, 0.5, 2.0], atol=1e-12)


@pytest.mark.parametrize("case", ["linear-3-spaces", "ce-free-bias-optimum"])
def test_matrix_free_symmetry_projector_equals_explicit_basis(case):
    p, params = {
        "linear-3-spaces": (P_LIN3, ufm.init_params(P_LIN3, jax.random.key(1))),
        "ce-free-bias-optimum": (P_CE, ufm.construct(P_CE)),
    }[case]
    Q = cert._orthonormal_rows(cert.symmetry_tangents(p, params), 1e-6)  # SVD of the closed-form tangents
    apply, dim = cert._sym_projector(p, cert._work_params(params), 1e-6)
    apply = jax.jit(apply)
    v = np.random.default_rng(0).standard_normal(Q.shape[1])
    assert np.linalg.norm(np.asarray(apply(jnp.asarray(v))) - Q.T @ (Q @ v)) < 1e-12 * np.linalg.norm(v)
    if case == "ce-free-bias-optimum":
        assert int(dim) == Q.shape[0]  # one rotated space: the rank is counted exactly (here 5 rotations + shift)


def test_lanczos_hessian_spectrum_matches_dense_after_projection():
    params = ufm.init_params(P_LIN3, jax.random.key(2))
    d = ufm.hessian_spectrum(P_LIN3, params, k=1, method="dense")
    lz = ufm.hessian_spectrum(P_LIN3, params, k=1, method="lanczos")
    assert lz.method == "lanczos" and lz.status == "converged" and lz.converged
    assert lz.smallest[0] == pytest.approx(d.smallest[0], abs=1e-9 * abs(d.largest))
    # Lanczos's largest is that of the restricted Hessian C^T Hess C (C an orthonormal basis of the complement of the
    # tangent), computed here densely from jax.hessian
    flat, unravel = ravel_pytree(params)
    Hd = np.asarray(jax.hessian(lambda x: ufm.objective(P_LIN3, unravel(x)))(flat))
    C = scipy.linalg.null_space(cert.symmetry_tangents(P_LIN3, params))
    assert lz.largest == pytest.approx(np.linalg.eigvalsh(C.T @ Hd @ C)[-1], rel=1e-9)
    assert d.smallest[0] < 0  # a random point: the comparison covers the sign that matters


def test_budget_gives_an_explicit_not_checked():
    c = ufm.construct(P_SH)
    hs = ufm.hessian_spectrum(P_SH, c, method="lanczos", maxiter=2, krylov_dim=2, tol=1e-15)
    assert hs.status == "budget" and not hs.converged and hs.iterations == 2
    r = ufm.check(
        P_SH, c, metrics=False, hessian_options={"method": "lanczos", "maxiter": 2, "krylov_dim": 2, "tol": 1e-15}
    )
    assert r.verdict == "matches" and r.second_order == "not checked: budget", r.explanation
    assert "second order not checked: budget" in r.explanation
    # a time budget: one cycle always runs, then the clock stops it
    r = ufm.check(
        P_SH, c, metrics=False, max_time=1e-9, hessian_options={"method": "lanczos", "krylov_dim": 2, "tol": 1e-15}
    )
    assert r.second_order == "not checked: budget", r.explanation
    # without a budget the same check certifies (smooth point, no negative curvature off the 6 symmetry directions)
    r = ufm.check(P_SH, c, metrics=False, hessian_options={"method": "lanczos"})
    assert r.second_order == "certified" and r.certificate.hessian.symmetry_dim == 6, r.explanation


def _np_fit_with_shift(p, params, layer, i, j, e):
    """NumPy forward of the bias-free ReLU MSE fit with e added to the activation H_{layer+2}[i, j]."""
    h = np.asarray(params.H, np.float64)
    Ws = [np.asarray(W, np.float64) for W in params.Ws]
    for li, W in enumerate(Ws[:-1]):
        h = np.maximum(W @ h, 0.0)
        if li == layer:
            h = h.copy()
            h[i, j] += e
    out = Ws[-1] @ h
    Y = np.eye(p.num_classes)[:, p.labels()]
    return np.sum((out - Y) ** 2) / (2 * p.N)


def test_kink_multipliers_against_finite_differences():
    params = ufm.init_params(P_BIN, jax.random.key(5))
    P = cert._work_params(params)
    masks = tuple(np.zeros((4, 6), bool) for _ in range(2))
    slopes = tuple(jnp.zeros((4, 6)) for _ in range(2))
    G = cert._activation_grads(P_BIN, P, tuple(map(jnp.asarray, masks)), slopes)
    h = 1e-6
    for layer, i, j in [(0, 1, 2), (1, 3, 0), (1, 0, 5)]:
        fd = _np_fit_with_shift(P_BIN, params, layer, i, j, h) - _np_fit_with_shift(P_BIN, params, layer, i, j, -h)
        assert float(G[layer][i, j]) == pytest.approx(fd / (2 * h), rel=1e-6, abs=1e-10)


def test_binary_dnc_optimum_kinks_are_degenerate_and_matches():
    # THEORY §4.1: the binary DNC optimum (a theorem, known=True) puts each class on its own ReLU neurons, so the
    # other class's pre-activations sit exactly at the kink, and the outgoing weights of those neurons reach only
    # their own class's path: dF/dh_a = 0 at every kink (degenerate multipliers). The lifted form (the activation
    # shift as a free variable) has negative curvature that the cone u = max(dz, 0) may not realise, and no lower
    # point is found. Its 64 parameters + 36 kinks are above FAN_AUTO_MAX_VARS: the nested-fan test does not run:
    # "first-order only" (with kink_fan=True it certifies: test_certificates_kink_fan.py, slow).
    c = ufm.construct(P_BIN)
    r = ufm.check(P_BIN, c, metrics=False)
    k = r.certificate.kink
    assert r.verdict == "matches" and abs(r.gap) < 1e-12, r.explanation
    assert k.kinks == 36 and k.degenerate == k.kinks and k.negative == 0 and k.min_multiplier == 0.0
    assert r.second_order == "first-order only" and "first-order only" in r.explanation
    assert r.certificate.descent is None or r.certificate.descent.decrease <= 1e-12


def test_zero_point_of_deep_relu_is_a_certified_local_min():
    # THEORY §0: with P = L + 1 >= 3 factors the zero point is a strict local minimiser for every lambda > 0 (the fit
    # moves at order >= 3, the penalty at order 2), so no descent exists there. Every pre-activation is at the kink,
    # with grad z_a = 0 (both factors of z_a = W_l[i, :] h_l[:, j] vanish): nothing is lifted, and the Hessian is
    # lambda I (eigenvalue exactly lambda = 5e-3).
    z = jax.tree_util.tree_map(jnp.zeros_like, ufm.construct(P_BIN))
    r = ufm.check(P_BIN, z, metrics=False)
    assert r.verdict == "local-min" and r.second_order == "certified", r.explanation
    assert r.certificate.kink.lifted == 0 and r.certificate.hessian.smallest[0] == pytest.approx(5e-3, rel=1e-12)


def test_stalled_non_optimal_point_is_not_certified():
    # A point where gradient methods stall: the binary DNC optimum (widths 4, 4) with class 2 switched off (its
    # features, its neurons and its output row set to 0). The class-1 path is still optimal for its own scalar
    # problem, every gradient involving class 2 passes through a ReLU at 0, so the point is Clarke-stationary
    # (rel_grad at rounding level) with a loss far above the DNC optimum. Its 14 kinks are degenerate and the lifted
    # form has negative curvature: the check must not call it a certified minimum.
    p = ufm.UFM(2, 2, (4, 4), activation="relu", lam_H=1e-3, lam_W=1e-3)
    c = ufm.construct(p)
    y = p.labels()
    Z = np.asarray(ufm.forward(p, c).Z[0])
    off = (Z[:, y == 1] > 1e-9).any(1)  # class 2's neurons
    H, W1, W2 = np.asarray(c.H).copy(), np.asarray(c.Ws[0]).copy(), np.asarray(c.Ws[1]).copy()
    H[:, y == 1] = 0
    W1[off] = 0
    W2[:, off] = 0
    W2[1] = 0
    q = ufm.Params(jnp.asarray(H), (jnp.asarray(W1), jnp.asarray(W2)), None)
    r = ufm.check(p, q, metrics=False)
    assert r.certificate.stationarity.grad_norm_rel < 1e-12 and r.gap > 1.0, r.explanation
    assert r.verdict == "local-min" and r.second_order == "first-order only", r.explanation
    assert r.certificate.kink.lifted > 0 and r.certificate.hessian.smallest[0] < -r.certificate.hess_tol
    # it is not a minimum of the problem: its loss exceeds the DNC optimum's (what the verdict's gap reports)
    assert float(ufm.objective(p, q)) > ufm.predict(p).loss * 2


def test_flat_parameter_order_matches_ravel_pytree():
    # the lifted vectors put theta first, in ravel_pytree order (what descent_test expects)
    c = ufm.construct(P_SH)
    assert cert._flat(cert._work_params(c)).size == ravel_pytree(c)[0].size
