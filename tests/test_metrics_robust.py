"""ufm.metrics on the features a theorist measures: offsets (ReLU layers), float32 at large N, extreme scales,
non-finite input, imbalanced classes, streaming; and the peers' variants (unweighted global mean, hyperspherical
uniformity, per-class NC3/NC4, partial products). Every expected value comes from an independent float64 NumPy
formula evaluated on *centred* data (explicit covariance matrices and np.linalg.pinv), from a loop over samples or
pairs, or from a closed form derived in a comment; nothing is copied from ufm's output (issues 12 and 17)."""

import itertools
import math

import numpy as np
import pytest

import ufm
from ufm import metrics as m

threadpoolctl = pytest.importorskip("threadpoolctl")  # a dependency of scikit-learn, installed with it


@pytest.fixture(autouse=True, scope="module")
def _one_blas_thread():
    # Small matrices: multi-threaded OpenBLAS is 10-100x slower on a loaded 2-core machine (measured: nc1 on
    # d=120, K=100 took 3.0 s with the default threads, 0.024 s with one, at load 16).
    with threadpoolctl.threadpool_limits(limits=1, user_api="blas"):
        yield


# ---------------------------------------------------------------------------------------------------------------
# independent references (explicit d x d covariances on centred data)


def ref_nc1_family(A, y, K, unweighted=False):
    """NC1 = tr(Sigma_W pinv(Sigma_B))/K, trace ratio, CDNV, from the data centred by its own mean first (NC1 is
    offset-invariant, so centring changes nothing but the rounding), in float64."""
    A = np.asarray(A, np.float64)
    A = A - A.mean(axis=1, keepdims=True)
    N = A.shape[1]
    mus = np.stack([A[:, y == k].mean(axis=1) for k in range(K)], axis=1)
    muG = mus.mean(axis=1) if unweighted else A.mean(axis=1)
    R = A - mus[:, y]
    SW = R @ R.T / N
    Mc = mus - muG[:, None]
    SB = Mc @ Mc.T / K
    nc1 = np.trace(SW @ np.linalg.pinv(SB, rcond=1e-10, hermitian=True)) / K
    V = np.array([np.mean(np.sum(R[:, y == k] ** 2, axis=0)) for k in range(K)])
    D = np.sum((mus[:, :, None] - mus[:, None, :]) ** 2, axis=0)  # ||mu_k - mu_j||^2, by differences
    iu = np.triu_indices(K, 1)
    pairs = (V[:, None] + V[None, :])[iu] / (2 * D[iu])
    return nc1, np.trace(SW) / np.trace(SB), np.mean(pairs), Mc


def draw(seed, d, K, ns, noise=1.0, sep=2.0):
    rng = np.random.default_rng(seed)
    y = np.concatenate([[k] * n for k, n in enumerate(ns)]).astype(np.int64)
    A = noise * rng.normal(size=(d, len(y))) + sep * rng.normal(size=(d, K))[:, y]
    return A, y


def etf_ref(V):
    G = V.T @ V
    K = V.shape[1]
    return np.linalg.norm(G / np.linalg.norm(G) - (np.eye(K) - 1 / K) / np.sqrt(K - 1))


# ---------------------------------------------------------------------------------------------------------------
# issue 12, bug 1: NC1 with an offset


def test_issue12_reproduction_offset_example():
    A = np.array([[9.5, 11.4, 11.0, 9.8], [9.5, 9.0, 9.3, 8.5]])
    y = np.array([0, 0, 1, 1])
    want = ref_nc1_family(A, y, 2)[0]
    # by hand: centred means +-(0.475, -0.175)... -> 1.952 (the issue's value on centred data); was 3.1e29
    assert want == pytest.approx(1.952, rel=1e-12)
    assert m.nc1(A, y) == pytest.approx(want, rel=1e-12)
    assert m.nc1(A - A.mean(1, keepdims=True), y) == pytest.approx(want, rel=1e-12)


# (K, d, counts): d > K and d < K, balanced and imbalanced, K = 2 .. 100
SHAPES = [
    (2, 2, (4, 4)),
    (3, 5, (5, 2, 7)),
    (10, 64, (3,) * 10),
    (10, 4, tuple(range(2, 12))),
    (100, 120, (2,) * 100),
    (100, 30, (2, 3) * 50),
]


@pytest.mark.parametrize("K,d,ns", SHAPES)
def test_nc1_family_offset_invariant_against_centred_reference(K, d, ns):
    A, y = draw(K + d, d, K, ns)
    nc1, tr, cd, _ = ref_nc1_family(A, y, K)
    for off in (0.0, 1e1, 1e3, 1e5):
        Ao = A + off * np.random.default_rng(1).uniform(0.5, 1.5, size=(d, 1))  # a different offset per row
        # The data A + off is itself rounded at ~1.1e-16 * off per entry; with unit-size noise and separations
        # every quantity is perturbed relatively by ~1e-16 * off * cond; 1e-6 at off = 1e5 leaves 1e3 of margin
        # (the bug gave 1e19-1e29).
        tol = 1e-10 + 1e-11 * off
        if off == 1e5:
            assert ref_nc1_family(Ao, y, K)[0] == pytest.approx(nc1, rel=tol)  # the reference is offset-invariant
        assert m.nc1(Ao, y, K) == pytest.approx(nc1, rel=tol), off
        assert m.nc1_trace_ratio(Ao, y, K) == pytest.approx(tr, rel=tol), off
        assert m.cdnv(Ao, y, K) == pytest.approx(cd, rel=tol), off


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("K,d,n", [(2, 2, 3), (10, 64, 3), (10, 5, 2), (40, 50, 2)])
def test_exact_collapse_with_offset_is_zero(dtype, K, d, n):
    rng = np.random.default_rng(K * d)
    y = np.repeat(np.arange(K), n)
    for off in (1e1, 1e3, 1e5):
        A = (rng.normal(size=(d, K)) + off)[:, y].astype(dtype)  # every sample equals its class mean exactly
        # exact collapse: Sigma_W = 0, so NC1 = trace ratio = CDNV = 0 (was 1e-3 .. 7e-2 at off = 1e3)
        assert m.nc1(A, y) <= 1e-25 and m.nc1_trace_ratio(A, y) <= 1e-25 and m.cdnv(A, y) <= 1e-25, off


# ---------------------------------------------------------------------------------------------------------------
# issue 12, bug 2: float32 at N = 50,000


def test_float32_large_n_matches_float64_reference():
    # N = 50,000 (K = 100, n = 500), noise 0.01: the old cut-off 10 max(d, N) eps32 ||A|| was 3% of ||A||, above
    # the within-class scatter, and gave exactly 0. The float64 reference is evaluated on the *same* float32 values.
    d, K, n = 16, 100, 500
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(K), n)
    A = (rng.normal(size=(d, K))[:, y] + 0.01 * rng.normal(size=(d, K * n)) + 3.0).astype(np.float32)
    A64 = A.astype(np.float64)
    A64c = A64 - A64.mean(axis=1, keepdims=True)
    mus = np.stack([A64c[:, y == k].mean(axis=1) for k in range(K)], axis=1)  # balanced: mu_G = 0 here
    R = A64c - mus[:, y]
    trW, trB = np.sum(R**2) / (K * n), np.sum((mus - mus.mean(axis=1, keepdims=True)) ** 2) / K
    st = m.class_stats(A, y)
    assert m.nc1_trace_ratio(st) == pytest.approx(trW / trB, rel=1e-9)
    assert 1e-5 < m.nc1_trace_ratio(st) < 1e-3 and m.cdnv(st) > 1e-6
    V = np.sum(R**2, axis=0).reshape(K, n).mean(axis=1)
    D = np.sum((mus[:, :, None] - mus[:, None, :]) ** 2, axis=0)
    iu = np.triu_indices(K, 1)
    assert m.cdnv(st) == pytest.approx(np.mean((V[:, None] + V[None, :])[iu] / (2 * D[iu])), rel=1e-9)


# ---------------------------------------------------------------------------------------------------------------
# invariances (seeded draws)


@pytest.mark.parametrize("seed", range(4))
def test_invariances_offset_rotation_class_permutation_and_scale(seed):
    rng = np.random.default_rng(seed)
    K = int(rng.integers(2, 8))
    d = int(rng.integers(1, 12))
    ns = tuple(int(x) for x in rng.integers(1, 6, size=K))
    A, y = draw(seed, d, K, ns)
    Qr = np.linalg.qr(rng.normal(size=(d, d)))[0]
    perm = rng.permutation(K)
    names = [
        "nc1",
        "nc1_trace_ratio",
        "cdnv",
        "nc2_etf",
        "nc2_equinorm",
        "nc2_equiangularity",
        "nc2_max_angle",
        "nc2_uniformity",
    ]
    base = m.feature_metrics(A, y, K)
    variants = {
        "rotation": (Qr @ A, y),
        "permutation": (A, perm[y]),
        "offset": (A + 1e4 * rng.normal(size=(d, 1)), y),
        "x1e-200": (A * 1e-200, y),
        "x1e200": (A * 1e200, y),
    }
    for what, (B, yb) in variants.items():
        got = m.feature_metrics(B, yb, K)
        for k in names:
            tol = 1e-6 if what == "offset" else 1e-10
            assert got[k] == pytest.approx(base[k], rel=tol, abs=1e-12), (what, k)
    # uncentred geometry is rotation- and scale-invariant but not offset-invariant
    for B in (Qr @ A, A * 1e-200, A * 1e200):
        assert m.nc2_orthogonal(B, y, K) == pytest.approx(base["nc2_orthogonal"], rel=1e-10)
    W = rng.normal(size=(K, d))
    for s in (1e-200, 1e200):
        assert m.nc3_product(W * s, A * s, y, K) == pytest.approx(m.nc3_product(W, A, y, K), rel=1e-10)
        # sqrt(2 - 2c) with c = 1 - O(eps): the formula itself resolves only ~sqrt(eps64) = 1.5e-8 near 0
        assert m.self_duality_gram(W * s, A * s) == pytest.approx(m.self_duality_gram(W, A), rel=1e-9, abs=3e-8)
        assert m.stable_rank(A * s) == pytest.approx(m.stable_rank(A), rel=1e-12)
        assert m.dnc3(W * s, A * s) == pytest.approx(m.dnc3(W, A), rel=1e-10, abs=1e-15)


def test_issue17_scale_reproduction():
    # issue 17: at x1e-200 trace ratio and CDNV returned 0.0 ("perfect collapse"), NC1 NaN; at x1e200 the same
    A, y = draw(7, 3, 4, (3, 3, 3, 3))
    nc1, tr, cd, _ = ref_nc1_family(A, y, 4)
    for s in (1e-200, 1e200):
        assert m.nc1(A * s, y) == pytest.approx(nc1, rel=1e-10)
        assert m.nc1_trace_ratio(A * s, y) == pytest.approx(tr, rel=1e-10)
        assert m.cdnv(A * s, y) == pytest.approx(cd, rel=1e-10)


# ---------------------------------------------------------------------------------------------------------------
# non-finite input, bad tolerances (issue 17 items 3 and 6)


def test_nonfinite_input_gives_nan_never_a_plausible_value_or_an_exception():
    A, y = draw(3, 4, 3, (3, 3, 3))
    W = np.random.default_rng(0).normal(size=(3, 4))
    for bad in (np.nan, np.inf, -np.inf):
        B = A.copy()
        B[1, 2] = bad
        for k, v in m.feature_metrics(B, y).items():
            assert math.isnan(v), (bad, k)
        for f in (
            m.etf_distance,
            m.orthogonal_frame_distance,
            m.equinorm,
            m.equiangularity,
            m.max_angle,
            m.inverse_condition_number,
            m.hyperspherical_uniformity,
            m.stable_rank,
            m.numerical_rank,
        ):
            assert math.isnan(f(B)), (bad, f.__name__)
        assert np.all(np.isnan(m.singular_values(B)))
        assert math.isnan(m.nc3_product(W, B, y)) and math.isnan(m.nc3_difference(W, B, y))
        assert math.isnan(m.ncc_mismatch(W, B, y)) and math.isnan(m.bias_residual(W, B, y))
        assert math.isnan(m.self_duality_gram(W, B)) and math.isnan(m.dnc3(W, B))
        assert math.isnan(m.balancedness(B, W.T @ W)) and np.all(np.isnan(m.nc3_per_class(W, B, y)))
        Wb = W.copy()
        Wb[0, 0] = bad
        assert math.isnan(m.nc3_product(Wb, A, y)) and math.isnan(m.ncc_mismatch(Wb, A, y))


def test_layer_metrics_on_nan_parameters_are_nan():
    p = ufm.UFM(3, 2, (4, 4), loss="mse", bias="none", lam_H=1e-2, lam_W=2e-2)
    params = ufm.construct(p)
    params = params._replace(H=np.full(np.shape(params.H), np.nan))
    d = m.layer_metrics(p, params)  # was LinAlgError
    assert all(math.isnan(e["nc1"]) and math.isnan(e["stable_rank"]) for e in d["features"])


@pytest.mark.parametrize("bad", [-1.0, math.nan, math.inf, 1.0])
def test_bad_rtol_and_lambda_refused(bad):
    A, y = draw(0, 4, 3, (3, 3, 3))
    with pytest.raises(ValueError, match="rtol"):
        m.nc1(A, y, rtol=bad)
    with pytest.raises(ValueError, match="rtol"):
        m.numerical_rank(A, rtol=bad)
    if bad != 1.0:
        with pytest.raises(ValueError, match="lam_prev"):
            m.balancedness(A, A.T, lam_prev=bad)
    with pytest.raises(ValueError, match="global_mean"):
        m.nc1(A, y, global_mean="mean")


# ---------------------------------------------------------------------------------------------------------------
# one pass, streaming


def test_streaming_blocks_and_memmap_equal_one_block(tmp_path):
    A, y = draw(5, 6, 4, (7, 3, 9, 5))
    A = A + 100.0
    whole = m.class_stats(A, y, block=10**6)
    path = tmp_path / "A.npy"
    np.save(path, A)
    mm = np.load(path, mmap_mode="r")
    for st in (
        m.class_stats(A, y, block=3),
        m.class_stats(mm, y, block=5),
        m.class_stats_blocks([(A[:, i : i + 4], y[i : i + 4]) for i in range(0, A.shape[1], 4)], 4),
    ):
        for k, v in m.feature_metrics(st).items():
            assert v == pytest.approx(m.feature_metrics(whole)[k], rel=1e-11), k
        np.testing.assert_allclose(m.class_means(st)[0], m.class_means(whole)[0], rtol=1e-13)


# ---------------------------------------------------------------------------------------------------------------
# the peers' variants


def test_unweighted_global_mean_convention_against_reference():
    # imbalanced: Wu & Papyan's library centres at the mean of the class means, which changes NC1 and NC2
    A, y = draw(11, 6, 4, (2, 9, 3, 12))
    nc1_u, tr_u, _, Mc_u = ref_nc1_family(A, y, 4, unweighted=True)
    nc1_w, _, _, Mc_w = ref_nc1_family(A, y, 4)
    assert m.nc1(A, y, global_mean="unweighted") == pytest.approx(nc1_u, rel=1e-10)
    assert m.nc1_trace_ratio(A, y, global_mean="unweighted") == pytest.approx(tr_u, rel=1e-12)
    assert m.nc2_etf(A, y, global_mean="unweighted") == pytest.approx(etf_ref(Mc_u), rel=1e-12)
    assert m.nc2_etf(A, y) == pytest.approx(etf_ref(Mc_w), rel=1e-12)
    assert abs(etf_ref(Mc_u) - etf_ref(Mc_w)) > 1e-3  # the conventions do differ here
    M, muG = m.class_means(A, y, global_mean="unweighted")
    np.testing.assert_allclose(muG, M.mean(axis=1), rtol=1e-13)


def test_hyperspherical_uniformity_against_pair_loop_and_zero_on_etf():
    rng = np.random.default_rng(2)
    V = rng.normal(size=(5, 6))
    U = V / np.linalg.norm(V, axis=0)
    dists = [np.linalg.norm(U[:, i] - U[:, j]) for i, j in itertools.combinations(range(6), 2)]
    assert m.hyperspherical_uniformity(V) == pytest.approx(np.var([-math.log(t) for t in dists]), rel=1e-12)
    assert m.hyperspherical_uniformity(V, "distance") == pytest.approx(np.var(dists), rel=1e-12)
    # a simplex ETF (K = 5 in R^6): every pair of unit vectors at the same distance sqrt(2 + 2/(K-1)) -> 0
    Q = np.linalg.qr(rng.normal(size=(6, 5)))[0]
    E = Q @ (np.eye(5) - 1 / 5)
    assert m.hyperspherical_uniformity(E) <= 1e-28 and m.hyperspherical_uniformity(E, "distance") <= 1e-28
    with pytest.raises(ValueError, match="kernel"):
        m.hyperspherical_uniformity(V, "riesz")


def test_per_class_nc3_nc4_against_loops():
    A, y = draw(4, 5, 3, (4, 6, 5))
    rng = np.random.default_rng(4)
    W, b = rng.normal(size=(3, 5)), rng.normal(size=3)
    mus = np.stack([A[:, y == k].mean(axis=1) for k in range(3)], axis=1)
    Mc = mus - A.mean(axis=1, keepdims=True)
    cos = [W[k] @ Mc[:, k] / (np.linalg.norm(W[k]) * np.linalg.norm(Mc[:, k])) for k in range(3)]
    np.testing.assert_allclose(m.nc3_per_class(W, A, y), cos, rtol=1e-12)
    agree = np.zeros(3)
    for i in range(A.shape[1]):
        ncc = int(np.argmin(np.sum((A[:, [i]] - mus) ** 2, axis=0)))
        agree[y[i]] += int(np.argmax(W @ A[:, i] + b) == ncc)
    rates = agree / np.bincount(y)
    np.testing.assert_allclose(m.ncc_agreement_per_class(W, A, y, b=b), rates, rtol=0, atol=1e-15)
    assert m.ncc_mismatch(W, A, y, b=b) == pytest.approx(1 - agree.sum() / A.shape[1], abs=1e-15)


def test_partial_products_and_layer_metrics_partial_entry():
    rng = np.random.default_rng(6)
    Ws = [rng.normal(size=(4, 5)), rng.normal(size=(3, 4)), rng.normal(size=(2, 3))]
    P = m.partial_products(Ws)
    np.testing.assert_allclose(P[0], Ws[2] @ Ws[1] @ Ws[0], rtol=1e-13)
    np.testing.assert_allclose(P[1], Ws[2] @ Ws[1], rtol=1e-13)
    np.testing.assert_array_equal(P[2], Ws[2])
    with pytest.raises(ValueError, match="columns"):
        m.partial_products([Ws[0], Ws[2]])
    # deep linear bias-free MSE optimum (THEORY §3): every W_L ... W_l maps the means of H_l onto an orthogonal
    # frame, so NC3 of every partial product vanishes
    p = ufm.UFM(3, 2, (4, 4), loss="mse", bias="none", lam_H=1e-2, lam_W=2e-2)
    d = m.layer_metrics(p, ufm.construct(p))
    assert [e["layer"] for e in d["partial"]] == [1, 2]
    assert all(e["nc3_product"] <= 1e-12 for e in d["partial"])


def test_numerical_rank_default_cut_does_not_grow_with_n():
    # rank-3 float32 features with N = 20,000 and a third direction at 1e-3 of the first: NumPy's rule
    # max(d, N) eps32 sigma_1 = 2.4e-3 sigma_1 drops it; the dtype resolves it (rounding ~1e-7 relative per entry).
    rng = np.random.default_rng(0)
    U = np.linalg.qr(rng.normal(size=(8, 3)))[0]
    V = np.linalg.qr(rng.normal(size=(20000, 3)))[0]
    A = (U * np.array([1.0, 0.1, 1e-3])) @ V.T * 100
    assert np.linalg.matrix_rank(A.astype(np.float32)) == 2  # the N-scaled rule, for contrast
    assert m.numerical_rank(A.astype(np.float32)) == 3 and m.numerical_rank(A) == 3
    assert m.numerical_rank(A, rtol=1e-2) == 2


def test_issue12_seed_failure_rates_are_zero():
    # issue 12: K = d = 2 failed in 5/50 seeds at offset 10 and 34/50 at offset 100; K = 10, d = 64 at offset
    # 1000 in 50/50 (NC1 ~1e19-1e29). Every seed must now match the centred reference.
    for K, d, n, off, seeds in ((2, 2, 2, 10.0, 50), (2, 2, 2, 100.0, 50), (10, 64, 5, 1000.0, 20)):
        for seed in range(seeds):
            A, y = draw(seed, d, K, (n,) * K)
            want = ref_nc1_family(A, y, K)[0]
            # rounding of A + off is ~1e-16 off per entry; tolerance 1e-11 off relative (as above)
            assert m.nc1(A + off, y) == pytest.approx(want, rel=1e-10 + 1e-11 * off), (K, d, off, seed)
