"""ufm.metrics against independent NumPy formulas (loops, explicit covariances, np.linalg.pinv), exact values on
constructed simplex ETFs and orthogonal frames, and robustness at exact collapse, at zero, for K = 2, d < K and
float32 input."""

import itertools
import json
import math

import jax.numpy as jnp
import numpy as np
import pytest

import ufm
from ufm import metrics as m

# ---------------------------------------------------------------------------------------------------------------
# independent reference implementations (written from the formulas in the papers, sample by sample)


def ref_stats(A, y, K):
    d, N = A.shape
    mus = np.stack([A[:, y == k].mean(axis=1) for k in range(K)], axis=1)
    muG = A.mean(axis=1)
    SW = np.zeros((d, d))
    for i in range(N):
        r = A[:, i] - mus[:, y[i]]
        SW += np.outer(r, r) / N
    SB = np.zeros((d, d))
    for k in range(K):
        r = mus[:, k] - muG
        SB += np.outer(r, r) / K
    return mus, muG, SW, SB


def random_case(seed, d, K, ns):
    rng = np.random.default_rng(seed)
    y = np.concatenate([[k] * n for k, n in enumerate(ns)])
    A = rng.normal(size=(d, len(y))) + 2 * rng.normal(size=(d, K))[:, y]
    return A, y


CASES = [(0, 6, 4, (3, 3, 3, 3)), (1, 5, 3, (5, 2, 4)), (2, 2, 5, (2, 3, 2, 2, 4)), (3, 3, 2, (4, 1))]


@pytest.mark.parametrize("seed,d,K,ns", CASES)
def test_nc1_variants_against_loops(seed, d, K, ns):
    A, y = random_case(seed, d, K, ns)
    mus, muG, SW, SB = ref_stats(A, y, K)
    # Papyan et al. 2020: tr(Sigma_W Sigma_B^+)/K; random data, Sigma_B well conditioned on its range -> pinv is
    # accurate here (rank min(d, K-1), cut at 1e-10 relative).
    want = np.trace(SW @ np.linalg.pinv(SB, rcond=1e-10)) / K
    assert m.nc1(A, y) == pytest.approx(want, rel=1e-10)
    assert m.nc1_trace_ratio(A, y) == pytest.approx(np.trace(SW) / np.trace(SB), rel=1e-12)
    # CDNV (Galanti et al. 2022): mean over pairs of (V_k + V_j) / (2 ||mu_k - mu_j||^2)
    V = [np.mean(np.sum((A[:, y == k] - mus[:, [k]]) ** 2, axis=0)) for k in range(K)]
    pairs = [(V[k] + V[j]) / (2 * np.sum((mus[:, k] - mus[:, j]) ** 2)) for k, j in itertools.combinations(range(K), 2)]
    assert m.cdnv(A, y) == pytest.approx(np.mean(pairs), rel=1e-12)
    Mc, mg = m.class_means(A, y)
    np.testing.assert_allclose(Mc, mus, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(mg, muG, rtol=1e-13, atol=1e-13)


def test_nc1_closed_form_two_points_per_class():
    # K = 2, d = 1: class 0 at -1 +- eps, class 1 at +1 +- eps. mu = -+1, mu_G = 0, Sigma_B = (1 + 1)/2 = 1,
    # Sigma_W = eps^2, so NC1 = eps^2 / (1 * K) = eps^2/2, trace ratio eps^2, CDNV = 2 eps^2 / (2 * 4) = eps^2/4.
    eps = 0.1
    A = np.array([[-1 - eps, -1 + eps, 1 - eps, 1 + eps]])
    y = np.array([0, 0, 1, 1])
    assert m.nc1(A, y) == pytest.approx(eps**2 / 2, rel=1e-12)
    assert m.nc1_trace_ratio(A, y) == pytest.approx(eps**2, rel=1e-12)
    assert m.cdnv(A, y) == pytest.approx(eps**2 / 4, rel=1e-12)


@pytest.mark.parametrize("seed,d,K,ns", CASES)
def test_nc2_nc3_nc4_against_loops(seed, d, K, ns):
    A, y = random_case(seed, d, K, ns)
    rng = np.random.default_rng(seed + 100)
    W = rng.normal(size=(K, d))
    b = rng.normal(size=K)
    mus, muG, _, _ = ref_stats(A, y, K)
    Mt = mus - muG[:, None]
    E = (np.eye(K) - np.ones((K, K)) / K) / np.sqrt(K - 1)

    def unitF(X):
        return X / np.sqrt(np.sum(X**2))

    assert m.nc2_etf(A, y) == pytest.approx(np.sqrt(np.sum((unitF(Mt.T @ Mt) - E) ** 2)), rel=1e-12)
    assert m.nc2_orthogonal(A, y) == pytest.approx(
        np.sqrt(np.sum((unitF(mus.T @ mus) - np.eye(K) / np.sqrt(K)) ** 2)), rel=1e-12
    )
    G = mus.T @ mus
    off = np.sqrt(sum(G[i, j] ** 2 for i in range(K) for j in range(K) if i != j)) / np.sqrt(np.sum(G**2))
    assert m.nc2_orthogonal(A, y, equinorm=False) == pytest.approx(off, rel=1e-12)
    norms = [np.linalg.norm(Mt[:, k]) for k in range(K)]
    assert m.nc2_equinorm(A, y) == pytest.approx(np.std(norms) / np.mean(norms), rel=1e-12)
    cos = [Mt[:, i] @ Mt[:, j] / (norms[i] * norms[j]) for i in range(K) for j in range(K) if i != j]
    assert m.nc2_equiangularity(A, y) == pytest.approx(np.std(cos), rel=1e-10, abs=1e-15)
    assert m.nc2_max_angle(A, y) == pytest.approx(np.mean(np.abs(np.array(cos) + 1 / (K - 1))), rel=1e-12)
    # NC3 (Zhu et al. 2021 product form; Papyan et al. 2020 difference form)
    assert m.nc3_product(W, A, y) == pytest.approx(np.sqrt(np.sum((unitF(W @ Mt) - E) ** 2)), rel=1e-12)
    assert m.nc3_product(W, A, y, target="orthogonal") == pytest.approx(
        np.sqrt(np.sum((unitF(W @ mus) - np.eye(K) / np.sqrt(K)) ** 2)), rel=1e-12
    )
    assert m.nc3_difference(W, A, y) == pytest.approx(np.sum((unitF(W.T) - unitF(Mt)) ** 2), rel=1e-12)
    assert m.nc3_difference(W, A, y, centred=False, squared=False) == pytest.approx(
        np.sqrt(np.sum((unitF(W.T) - unitF(mus)) ** 2)), rel=1e-12
    )
    # NC4: nearest class centre vs classifier, sample by sample
    mism = 0
    for i in range(A.shape[1]):
        ncc = min(range(K), key=lambda k: np.sum((A[:, i] - mus[:, k]) ** 2))
        mism += int(np.argmax(W @ A[:, i] + b) != ncc)
    assert m.ncc_mismatch(W, A, y, b=b) == pytest.approx(mism / A.shape[1], abs=0)
    assert m.bias_residual(W, A, y, b=b) == pytest.approx(np.linalg.norm(W @ muG + b), rel=1e-12)
    # self-duality (Gram form, d x d matrices formed explicitly) and DNC3 (row by row)
    X, Y = W.T @ W, mus @ mus.T
    assert m.self_duality_gram(W, mus) == pytest.approx(np.sqrt(np.sum((unitF(X) - unitF(Y)) ** 2)), rel=1e-9)
    num = den = 0.0
    for r in range(W.shape[0]):
        w = W[r]
        best = max(abs(w @ mus[:, k]) / (np.linalg.norm(w) * np.linalg.norm(mus[:, k])) for k in range(K))
        num += w @ w * best
        den += w @ w
    assert m.dnc3(W, mus) == pytest.approx(1 - num / den, rel=1e-12)
    s = np.linalg.svd(mus, compute_uv=False)
    want = s[K - 1] / s[0] if d >= K else 0.0
    assert m.inverse_condition_number(mus) == pytest.approx(want, rel=1e-12, abs=1e-300)


def test_spectra_and_balancedness_against_direct_formulas():
    rng = np.random.default_rng(5)
    A = rng.normal(size=(6, 4)) @ rng.normal(size=(4, 9))  # rank 4
    assert m.numerical_rank(A) == np.linalg.matrix_rank(A) == 4
    s = np.linalg.svd(A, compute_uv=False)
    np.testing.assert_allclose(m.singular_values(A), s, rtol=1e-13)
    assert m.stable_rank(A) == pytest.approx(np.sum(s**2) / s[0] ** 2, rel=1e-13)
    Wp, Wn = rng.normal(size=(5, 7)), rng.normal(size=(3, 5))
    X, Y = 0.3 * Wn.T @ Wn, 0.7 * Wp @ Wp.T
    want = np.linalg.norm(X - Y) / (np.linalg.norm(X) + np.linalg.norm(Y))
    assert m.balancedness(Wp, Wn, 0.7, 0.3) == pytest.approx(want, rel=1e-12)
    x, yv = 0.3 * np.sum(Wn**2, axis=0), 0.7 * np.sum(Wp**2, axis=1)
    want = np.linalg.norm(x - yv) / (np.linalg.norm(x) + np.linalg.norm(yv))
    assert m.balancedness(Wp, Wn, 0.7, 0.3, diagonal=True) == pytest.approx(want, rel=1e-12)
    # a balanced pair: W_next = G^T-free construction W_prev = U S V^T, W_next = Q S U^T gives W_n^T W_n = W_p W_p^T
    U = np.linalg.qr(rng.normal(size=(5, 5)))[0]
    S = np.diag([3.0, 2.0, 1.0, 0.5, 0.1])
    Vt = np.linalg.qr(rng.normal(size=(7, 5)))[0].T
    Q = np.linalg.qr(rng.normal(size=(5, 5)))[0]
    assert m.balancedness(U @ S @ Vt, Q @ S @ U.T) < 1e-14


# ---------------------------------------------------------------------------------------------------------------
# exact values on constructed geometries


def frame(d, K, seed=0):
    return np.linalg.qr(np.random.default_rng(seed).normal(size=(d, K)))[0]  # d x K, orthonormal columns


@pytest.mark.parametrize("K,d,n", [(4, 6, 3), (2, 3, 2), (5, 5, 1)])
def test_exact_values_on_a_simplex_etf(K, d, n):
    U = frame(d, K)
    Mt = 1.7 * U @ (np.eye(K) - np.ones((K, K)) / K)  # centred means: a simplex ETF
    offset = frame(d, 1, seed=9)[:, 0] * 0.3 if d > K else np.zeros(d)  # a global mean (a bias) changes nothing
    M = Mt + offset[:, None]
    y = np.repeat(np.arange(K), n)
    A = M[:, y]
    assert m.nc1(A, y) <= 1e-28 and m.nc1_trace_ratio(A, y) <= 1e-28 and m.cdnv(A, y) <= 1e-28
    for f in (m.nc2_etf, m.nc2_equinorm, m.nc2_equiangularity, m.nc2_max_angle):
        assert f(A, y) <= 1e-14, f.__name__
    # the ETF Gram E vs the orthogonal target I/sqrt(K): ||E - I/sqrt K||^2 = 1 + 1 - 2 tr(E)/sqrt(K)
    # = 2 - 2 (K-1)/(sqrt(K-1) sqrt(K)) = 2 - 2 sqrt((K-1)/K)
    assert m.orthogonal_frame_distance(Mt) == pytest.approx(math.sqrt(2 - 2 * math.sqrt((K - 1) / K)), rel=1e-12)
    W = 0.4 * Mt.T  # self-dual classifier
    assert m.nc3_product(W, A, y) <= 1e-14
    assert m.nc3_difference(W, A, y) <= 1e-28
    assert m.self_duality_gram(W, Mt) <= 1e-6  # sqrt of a difference of O(1) terms: ~sqrt(eps)
    assert m.ncc_mismatch(W, A, y) == 0.0
    assert m.inverse_condition_number(Mt) <= 1e-15  # rank K-1


@pytest.mark.parametrize("K,d,n", [(4, 6, 3), (2, 2, 2), (3, 5, 1)])
def test_exact_values_on_orthogonal_frames(K, d, n):
    U = frame(d, K)
    y = np.repeat(np.arange(K), n)
    M = 0.8 * U
    A = M[:, y]
    assert m.nc2_orthogonal(A, y) <= 1e-14
    assert m.nc2_etf(A, y) <= 1e-14  # centring an orthogonal frame gives c^2 (I - J/K): a simplex ETF
    assert m.nc2_equiangularity(A, y, centred=False) <= 1e-14
    assert m.inverse_condition_number(M) == pytest.approx(1.0, rel=1e-13)
    assert m.etf_distance(M) == pytest.approx(math.sqrt(2 - 2 * math.sqrt((K - 1) / K)), rel=1e-12)
    assert m.dnc3(2.0 * M.T, M) <= 1e-14  # every row collinear with one mean
    assert m.nc3_product(M.T, A, y, target="orthogonal") <= 1e-14
    # a general orthogonal frame (unequal norms a_k): orthogonal, not equinorm. With G = diag(a^2),
    # ||G/||G|| - I/sqrt K||^2 = 2 - 2 sum(a^2) / (sqrt(K) ||a^2||)
    a = np.linspace(0.5, 2.0, K)
    Mu = U * a
    assert m.orthogonal_frame_distance(Mu, equinorm=False) <= 1e-14
    want = math.sqrt(2 - 2 * np.sum(a**2) / (math.sqrt(K) * np.linalg.norm(a**2)))
    assert m.orthogonal_frame_distance(Mu) == pytest.approx(want, rel=1e-10)
    assert m.equinorm(Mu) == pytest.approx(np.std(a) / np.mean(a), rel=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# robustness: every metric finite at collapse, at zero, K = 2, d < K, float32


def all_metrics(A, y, K, W, b):
    M, muG = m.class_means(A, y, K)
    return {
        "nc1": m.nc1(A, y, K),
        "trace": m.nc1_trace_ratio(A, y, K),
        "cdnv": m.cdnv(A, y, K),
        "etf": m.nc2_etf(A, y, K),
        "orth": m.nc2_orthogonal(A, y, K),
        "orth_u": m.nc2_orthogonal(A, y, K, equinorm=False),
        "equinorm": m.nc2_equinorm(A, y, K),
        "equiang": m.nc2_equiangularity(A, y, K),
        "maxang": m.nc2_max_angle(A, y, K),
        "invcond": m.inverse_condition_number(M),
        "nc3p": m.nc3_product(W, A, y, K),
        "nc3po": m.nc3_product(W, A, y, K, target="orthogonal"),
        "nc3d": m.nc3_difference(W, A, y, K),
        "sd": m.self_duality_gram(W, M),
        "ncc": m.ncc_mismatch(W, A, y, K, b=b),
        "bres": m.bias_residual(W, A, y, K, b=b),
        "dnc3": m.dnc3(W, M),
        "srank": m.stable_rank(A),
        "rank": m.numerical_rank(A),
        "bal": m.balancedness(A, W),
    }


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("K,d,n", [(2, 3, 4), (4, 2, 3), (3, 1, 2), (5, 8, 2)])
def test_every_metric_finite_at_zero_collapse_small_K_narrow_and_float32(dtype, K, d, n):
    y = np.repeat(np.arange(K), n)
    rng = np.random.default_rng(K * 10 + d)
    Mr = rng.normal(size=(d, K))
    points = {
        "zero": (np.zeros((d, K * n)), np.zeros((K, d)), np.zeros(K)),
        "collapse": (Mr[:, y], Mr.T.copy(), np.zeros(K)),
        "near": (Mr[:, y] + 1e-7 * rng.normal(size=(d, K * n)), Mr.T.copy(), np.ones(K) / K),
        "random": (rng.normal(size=(d, K * n)), rng.normal(size=(K, d)), rng.normal(size=K)),
    }
    for name, (A, W, b) in points.items():
        vals = all_metrics(A.astype(dtype), y, K, W.astype(dtype), b.astype(dtype))
        for k, v in vals.items():
            assert isinstance(v, (float, int)) and math.isfinite(v) and v >= 0, (name, k, v)
        if name in ("zero", "collapse"):
            assert vals["nc1"] == 0.0 or vals["nc1"] <= 1e-20, (name, vals["nc1"])
            assert vals["trace"] <= 1e-20 and vals["cdnv"] <= 1e-20
    zero = all_metrics(np.zeros((d, K * n), dtype), y, K, np.zeros((K, d), dtype), None)
    # documented conventions: a zero Gram "normalised" is 0, so the distances are the norm of the target, 1
    assert zero["etf"] == pytest.approx(1.0, rel=1e-15) and zero["orth"] == pytest.approx(1.0, rel=1e-15)
    assert zero["equinorm"] == 0.0 and zero["invcond"] == 0.0


def test_nc1_near_collapse_float32_scales_as_noise_squared():
    # Peers invert Sigma_B in float32 and get negative or huge NC1 near collapse (ANCHORS.md). Here NC1 of
    # features = ETF means + eps * noise, given in float32, must scale as eps^2 down to eps ~ 1e-6 (where the
    # float32 rounding of the means, ~6e-8 relative, is still below the noise) and stay finite and >= 0 below.
    K, d, n = 10, 12, 5
    rng = np.random.default_rng(0)
    Mt = frame(d, K) @ (np.eye(K) - np.ones((K, K)) / K) * 3.0
    y = np.repeat(np.arange(K), n)
    noise = rng.normal(size=(d, K * n))
    vals = {eps: m.nc1((Mt[:, y] + eps * noise).astype(np.float32), y) for eps in (1e-3, 1e-4, 1e-5, 1e-6, 1e-8)}
    assert vals[1e-3] / vals[1e-4] == pytest.approx(100, rel=0.05)
    assert vals[1e-4] / vals[1e-5] == pytest.approx(100, rel=0.05)
    assert vals[1e-5] / vals[1e-6] == pytest.approx(100, rel=0.3)
    assert 0 <= vals[1e-8] < 1e-10


def test_jax_arrays_and_float32_inputs_give_python_floats():
    A, y = random_case(0, 6, 4, (3, 3, 3, 3))
    a64 = m.nc1(A, y)
    a32 = m.nc1(jnp.asarray(A, jnp.float32), jnp.asarray(y))
    assert isinstance(a32, float) and a32 == pytest.approx(a64, rel=1e-5)
    assert isinstance(m.nc2_etf(jnp.asarray(A), y), float)


def test_degenerate_separation_conventions():
    # every class mean equal but samples vary: NC1 and the trace ratio are +inf (documented), CDNV too
    A = np.array([[1.0, -1.0, 1.0, -1.0]])
    y = np.array([0, 0, 1, 1])
    assert m.nc1(A, y) == math.inf and m.nc1_trace_ratio(A, y) == math.inf and m.cdnv(A, y) == math.inf


def test_bad_input_raises_with_shapes():
    A, y = random_case(0, 6, 4, (3, 3, 3, 3))
    with pytest.raises(ValueError, match=r"features\.T"):
        m.nc1(A.T, y)
    with pytest.raises(ValueError, match="length N"):
        m.nc1(A, y[:-1])
    with pytest.raises(TypeError, match="integer"):
        m.nc1(A, y.astype(float))
    with pytest.raises(ValueError, match="no"):
        m.nc1(A, y, num_classes=5)  # class 4 has no sample
    with pytest.raises(ValueError, match="K >= 2"):
        m.nc1(A, np.zeros(12, int))
    with pytest.raises(ValueError, match="2-D"):
        m.nc1(A[0], y)
    with pytest.raises(ValueError, match=r"K x d"):
        m.nc3_product(np.zeros((3, 6)), A, y)
    with pytest.raises(TypeError):
        m.nc1("features", y)


# ---------------------------------------------------------------------------------------------------------------
# the per-layer summary of a UFM


def test_layer_metrics_json_and_consistent_with_the_functions():
    p = ufm.UFM(3, 2, (4, 5, 4), activation="relu", loss="mse", bias="free", lam_H=1e-2, lam_W=1e-2)
    import jax

    params = ufm.init_params(p, jax.random.key(0))
    d = m.layer_metrics(p, params)
    json.dumps(d, allow_nan=False)
    names = [f["name"] for f in d["features"]]
    assert names == ["H_1", "Z_2", "H_2", "Z_3", "H_3", "out"]
    fw = ufm.forward(p, params)
    y = p.labels()
    f = {e["name"]: e for e in d["features"]}
    assert f["H_2"]["nc1"] == pytest.approx(m.nc1(fw.H[1], y), rel=1e-12)
    assert f["Z_3"]["nc2_etf"] == pytest.approx(m.nc2_etf(fw.Z[1], y), rel=1e-12)
    assert f["H_1"]["nc2_target"] is None and f["H_1"]["nc2"] is None  # ReLU with a bias: no theory
    assert d["weights"][2]["balancedness"] == pytest.approx(
        m.balancedness(params.Ws[1], params.Ws[2], 1e-2, 1e-2, diagonal=True), rel=1e-12
    )
    assert d["classifier"]["ncc_mismatch"] == m.ncc_mismatch(params.Ws[2], fw.H[2], y, b=params.b)
    assert len(d["dnc"]) == 3 and d["dnc"][0]["exempt"] and not d["dnc"][1]["exempt"]


def test_layer_metrics_vanish_on_constructed_optima():
    # deep linear bias-free MSE (THEORY §3): every layer an orthogonal frame, balanced, self-dual
    p = ufm.UFM(3, 2, (4, 4), loss="mse", bias="none", lam_H=1e-2, lam_W=2e-2)
    d = m.layer_metrics(p, ufm.construct(p))
    for e in d["features"]:
        assert e["nc2_target"] == "orthogonal" and e["nc2"] <= 1e-12 and e["nc1"] <= 1e-20, e["name"]
    for w in d["weights"]:
        # lam_{l+1} W_{l+1}^T W_{l+1} = lam_l W_l W_l^T at every stationary point of a linear network
        assert w["balancedness"] <= 1e-12 and w["self_duality_gram"] <= 1e-6
    assert d["classifier"]["nc3_product"] <= 1e-12 and d["classifier"]["ncc_mismatch"] == 0
    # shallow MSE with a free bias (Zhou et al. 2022): ETF, and the mean output is 1/K per class, so the
    # "bias residual" ||W mu_G + b|| = ||1/K 1|| = 1/sqrt(K)
    p = ufm.UFM(4, 2, (5,), loss="mse", bias="free", lam_H=1e-2, lam_W=1e-2)
    d = m.layer_metrics(p, ufm.construct(p))
    assert d["features"][0]["nc2_target"] == "etf" and d["features"][0]["nc2"] <= 1e-12
    assert d["classifier"]["bias_residual"] == pytest.approx(1 / 2, rel=1e-12)
    # deep ReLU DNC (THEORY §4.1): DNC1-3 vanish in layers >= 2, layer 1 exempt
    p = ufm.UFM(2, 2, (3, 3, 3), activation="relu", loss="mse", bias="none", lam_H=4e-3, lam_W=4e-3)
    d = m.layer_metrics(p, ufm.construct(p))
    for e in d["dnc"][1:]:
        assert e["dnc1"] <= 1e-20 and e["dnc2_orthogonal"] <= 1e-12 and e["dnc3"] <= 1e-12
        assert e["dnc2_inverse_condition"] == pytest.approx(1, rel=1e-12)
    assert d["dnc"][0]["exempt"]
