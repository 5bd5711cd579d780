"""ufm.certify / ufm.check: Hessian eigenvalues against the dense jax.hessian, symmetry tangents against finite
rotations, closed-form stationarity and saddle curvature, and the verdicts on constructed cases."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
from jax.flatten_util import ravel_pytree

import ufm
from ufm import _certificates as cert

# Problems shared across tests (one compile each).
P_SHALLOW = ufm.UFM(3, 2, (4,), loss="mse", bias="none", lam_H=2e-2, lam_W=1e-2)
P_DEEP = ufm.UFM(3, 2, (4, 4), loss="mse", bias="none", lam_H=1e-2, lam_W=(1e-2, 2e-2))
P_RELU = ufm.UFM(3, 2, (3, 4), activation="relu", loss="mse", bias="none", lam_H=1e-2, lam_W=1e-2)


def dense_hessian(p, params):
    flat, unravel = ravel_pytree(params)
    return np.asarray(jax.jit(jax.hessian(lambda x: ufm.objective(p, unravel(x))))(flat))


def random_params(p, seed, scale=1.0):
    return ufm.init_params(p, jax.random.key(seed), scale=scale)


# ---------------------------------------------------------------------------------------------------------------
# second order against the dense Hessian


def test_hessian_eigenvalues_match_dense_jax_hessian():
    params = random_params(P_RELU, 3)
    Hd = dense_hessian(P_RELU, params)
    ev = np.linalg.eigvalsh(Hd)
    tol = 1e-9 * abs(ev[-1])
    for method in ("lanczos", "dense"):
        hs = ufm.hessian_spectrum(P_RELU, params, k=4, method=method, project_symmetries=False)
        assert hs.method == method and hs.converged and hs.symmetry_dim is None
        np.testing.assert_allclose(hs.smallest, ev[:4], atol=tol, rtol=0)
        assert hs.largest == pytest.approx(ev[-1], rel=1e-6)
    assert ev[0] < 0  # a random point has negative curvature: the comparison covers the sign that matters
    # with the symmetry directions removed: the spectrum of C^T Hess C, C an orthonormal basis of their complement
    T = cert.symmetry_tangents(P_RELU, params)
    C = scipy.linalg.null_space(T)
    evc = np.linalg.eigvalsh(C.T @ Hd @ C)
    hs = ufm.hessian_spectrum(P_RELU, params, k=4, method="lanczos")
    assert hs.symmetry_dim == T.shape[0] == 3  # O(3) on the features, no fixed directions at a random point
    np.testing.assert_allclose(hs.smallest, evc[:4], atol=tol, rtol=0)


def skew(rng, d):
    A = rng.normal(size=(d, d))
    return A - A.T


@pytest.mark.parametrize("case", ["linear", "relu", "ce-free-bias"])
def test_symmetry_tangents_are_exact_symmetries(case):
    p = {
        "linear": P_DEEP,
        "relu": P_RELU,
        "ce-free-bias": ufm.UFM(3, 2, (4,), loss="ce", bias="free", lam_H=1e-2, lam_W=1e-2),
    }[case]
    params = random_params(p, 1)
    H, Ws, b = (
        np.asarray(params.H),
        [np.asarray(W) for W in params.Ws],
        None if params.b is None else np.asarray(params.b),
    )
    rng = np.random.default_rng(0)
    layers = range(p.L) if p.activation == "linear" else range(1)
    S = {l: skew(rng, p.widths[l]) for l in layers}
    t = 1e-6
    shift = 1.0 if case == "ce-free-bias" else 0.0

    def moved(t):
        R = {l: scipy.linalg.expm(t * S[l]) for l in layers}
        H2 = R[0] @ H
        Ws2 = []
        for l, W in enumerate(Ws):
            W2 = W @ R[l].T if l in R else W
            Ws2.append(R[l + 1] @ W2 if l + 1 in R else W2)
        b2 = None if b is None else b + t * shift
        return ufm.Params(jnp.asarray(H2), tuple(map(jnp.asarray, Ws2)), None if b2 is None else jnp.asarray(b2))

    # a finite transformation leaves the objective unchanged (rotations keep every ||.||_F; softmax is shift-free)
    f0 = float(ufm.objective(p, params))
    assert float(ufm.objective(p, moved(0.3))) == pytest.approx(f0, rel=1e-13)
    # its velocity lies in the span of the closed-form tangents
    v = (ravel_pytree(moved(t))[0] - ravel_pytree(params)[0]) / t
    v = np.asarray(v)
    T = cert.symmetry_tangents(p, params)
    assert T.shape[0] == cert.num_symmetry_generators(p)
    coef = np.linalg.lstsq(T.T, v, rcond=None)[0]
    assert np.linalg.norm(T.T @ coef - v) <= 1e-5 * np.linalg.norm(v)


def test_symmetry_zero_modes_are_counted_at_the_optimum():
    # deep linear optimum (THEORY §3): every tangent is a zero mode (Hess t = S grad f = 0), and nothing else is flat
    c = ufm.construct(P_DEEP)
    ev = np.linalg.eigvalsh(dense_hessian(P_DEEP, c))
    hs = ufm.hessian_spectrum(P_DEEP, c, k=3)
    zeros = int(np.sum(np.abs(ev) < 1e-9 * ev[-1]))
    assert hs.symmetry_dim == zeros > 0
    # removing them leaves the next eigenvalues of the dense Hessian
    np.testing.assert_allclose(hs.smallest, ev[zeros : zeros + 3], rtol=1e-9)
    assert hs.smallest[0] > 1e-3


def test_saddle_curvature_at_zero_closed_form():
    # Shallow bias-free MSE at W = H = 0: f = f0 - (1/N) <W, Y H^T> + lam_W/2 ||W||^2 + lam_H/2 ||H||^2 + O(4). For a
    # singular pair of Y (sigma = sqrt(n)) the Hessian block is [[lam_W, -sigma/N], [-sigma/N, lam_H]], so
    # lambda_min = (lam_W + lam_H)/2 - sqrt(((lam_W - lam_H)/2)^2 + n/N^2).
    p = P_SHALLOW
    z = ufm.Params(jnp.zeros((4, 6)), (jnp.zeros((3, 4)),), None)
    lW, lH, n, N = 1e-2, 2e-2, 2, 6
    want = (lW + lH) / 2 - math.sqrt(((lW - lH) / 2) ** 2 + n / N**2)
    c = ufm.certify(p, z)
    assert c.stationarity.grad_norm == 0.0
    assert c.hessian.smallest[0] == pytest.approx(want, rel=1e-12)
    assert c.descent.decrease > 0  # an explicit lower point along the eigenvector


def test_stationarity_at_the_closed_form_optimum():
    # Shallow MSE with a free bias (THEORY §1, Zhou et al. 2022), built here from the formulas (not ufm.construct):
    # rho = K sqrt(n lam_W lam_H), a = 1 - rho, W H = a (I - J/K) (x) 1_n^T, b = 1/K, balanced factors
    # W = s V [I 0], H = s [I; 0] V^T E / sqrt(n), s = (sqrt(n) a)^{1/2} (lam_W = lam_H), V an orthonormal basis of
    # the centred directions; f* = (K-1)/(2K) rho (2 - rho).
    K, n, d, lam = 3, 2, 4, 1e-2
    p = ufm.UFM(K, n, (d,), loss="mse", bias="free", lam_H=lam, lam_W=lam)
    rho = K * math.sqrt(n) * lam
    a = 1 - rho
    V = np.linalg.qr(np.eye(K) - 1 / K)[0][:, : K - 1]
    E = np.eye(K)[:, p.labels()]
    s = math.sqrt(math.sqrt(n) * a)
    W = np.zeros((K, d))
    W[:, : K - 1] = s * V
    H = np.zeros((d, K * n))
    H[: K - 1] = s * V.T @ E / math.sqrt(n)
    params = ufm.Params(jnp.asarray(H), (jnp.asarray(W),), jnp.full(K, 1 / K))
    st = cert.stationarity(p, params)
    assert st.value == pytest.approx((K - 1) / (2 * K) * rho * (2 - rho), rel=1e-13)
    assert st.grad_norm < 1e-14 and st.grad_norm_rel < 1e-12 and st.kinks == 0
    assert st.grad_fit_norm == pytest.approx(st.grad_reg_norm, rel=1e-12) and st.grad_reg_norm > 0.01
    assert ufm.check(p, params, hessian=False).verdict == "matches"


# ---------------------------------------------------------------------------------------------------------------
# verdicts


def test_verdicts_shallow_matches_saddle_not_converged_and_solution_input():
    p = P_SHALLOW
    c = ufm.construct(p)
    r = ufm.check(p, c)
    assert r.verdict == "matches", r.explanation
    assert abs(r.gap) < 1e-12 and r.distances["max"] < 1e-12
    assert r.certificate.hessian.symmetry_dim == 6 and r.certificate.hessian.smallest[0] > 0
    pert = jax.tree_util.tree_map(lambda x: x + 1e-3 * jnp.sin(jnp.arange(x.size).reshape(x.shape)), c)
    r = ufm.check(p, pert)
    assert r.verdict == "not-converged" and r.certificate.stationarity.grad_norm > 1e-4, r.explanation
    z = ufm.Params(jnp.zeros((4, 6)), (jnp.zeros((3, 4)),), None)
    r = ufm.check(p, z)
    assert r.verdict == "saddle", r.explanation  # THEORY §0: for P = 2 the zero point is a strict saddle (rho < 1)
    sol = ufm.solve(p, key=jax.random.key(0))
    r = ufm.check(p, sol)
    assert r.verdict == "matches" and r.solver["status"] == 0, r.explanation
    d = json.loads(r.to_json())
    assert d["verdict"] == "matches" and d["certificate"]["hessian"]["symmetry_dim"] == 6
    assert d["metrics"]["features"][0]["name"] == "H_1" and d["tolerances"]["gap_tol"] == 1e-6
    assert ufm.check(p, c, prediction=r.value * 1.01).verdict == "below-prediction"
    with pytest.raises(ValueError, match="batch"):
        ufm.check(p, jax.tree_util.tree_map(lambda x: jnp.stack([x, x]), sol))  # a batch of 2 runs
    with pytest.raises(TypeError, match="Params"):
        ufm.check(p, "params")
    with pytest.raises(ValueError, match=r"d_1 x N"):
        ufm.check(p, ufm.Params(jnp.zeros((4, 5)), (jnp.zeros((3, 4)),), None))


def test_verdict_float32_uses_float32_tolerances():
    p = P_SHALLOW
    r = ufm.check(p, ufm.construct(p, dtype="float32"))
    assert r.verdict == "matches" and r.dtype == "float32" and r.tolerances["gap_tol"] == 1e-4, r.explanation


def test_verdict_local_min_at_zero_for_three_factors():
    # THEORY §0: for P >= 3 the zero point is a strict local minimum (every term of the fit that moves is of order
    # >= 3), here above the collapsed optimum -> "local-min" with the gap (1/2 - f*)/f*.
    p = P_DEEP
    z = ufm.Params(jnp.zeros((4, 6)), (jnp.zeros((4, 4)), jnp.zeros((3, 4))), None)
    r = ufm.check(p, z)
    f_star = ufm.predict(p).loss
    assert r.verdict == "local-min", r.explanation
    assert r.gap == pytest.approx((0.5 - f_star) / f_star, rel=1e-12)
    assert r.certificate.hessian.smallest[0] == pytest.approx(1e-2, rel=1e-12)  # only the penalties curve at 0


def test_verdict_no_prediction():
    # deep ReLU with CE has no prediction (nan loss); its zero point is stationary (every factor 0) and a local min
    p = ufm.UFM(3, 2, (3, 3), activation="relu", loss="ce", bias="none", lam_H=1e-2, lam_W=1e-2)
    z = ufm.Params(jnp.zeros((3, 6)), (jnp.zeros((3, 3)), jnp.zeros((3, 3))), None)
    r = ufm.check(p, z)
    assert r.verdict == "no-prediction" and r.predicted_loss is None and r.distances is None, r.explanation
    json.loads(r.to_json())


def test_verdicts_deep_relu_dnc_matches_and_low_rank_run_is_below_dnc():
    # THEORY §4.3 / Súkeník et al. 2024: K = 3, L = 4, lambda = 0.004 — gradient runs reach losses below the DNC
    # loss (random L-BFGS starts ~0.98 of it). 300 L-BFGS steps from this seed are already ~1% below.
    p = ufm.UFM(3, 1, (6, 6, 6, 6), activation="relu", loss="mse", bias="none", lam_H=4e-3, lam_W=4e-3)
    dnc = ufm.predict(p, configuration="dnc")
    r = ufm.check(p, ufm.construct(p, "dnc"), prediction=dnc)
    assert r.verdict == "matches", r.explanation
    assert r.distances["max"] < 1e-12 and r.distances["W"][0]["sv"] is None  # W_1 spectrum not determined
    assert r.distances["first_layer_nuclear"] < 1e-12
    assert r.certificate.stationarity.kinks > 0  # DNC sits on ReLU kinks (non-negative orthogonal frames)
    key = jax.random.split(jax.random.key(0), 12)[4]
    sol = ufm.solve(p, key=key, max_steps=300, history=False)
    r = ufm.check(p, sol, prediction=dnc, hessian=False)
    assert r.verdict == "below-prediction", r.explanation
    assert r.gap < -5e-3
