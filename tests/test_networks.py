"""Tests of ufm.networks: real MLPs trained on digits / a Gaussian mixture, per-layer collapse, fine-grained structure,
the shallow-versus-expressive comparison and the UFM beside the network.

Every metric reported on real features is recomputed here with an independent NumPy formula (explicit Sigma_W,
Sigma_B and a pseudo-inverse, explicit Gram matrices, explicit forward pass). The effects of the papers are
asserted in their direction with a margin, on fixed seeds (XLA CPU runs are deterministic). Compile time
dominates: the deep network is trained once (module fixture) and reused by the per-layer, metric, UFM and
comparison tests.
"""

import itertools

import jax
import numpy as np
import pytest

import ufm.networks as nets

# ---------------------------------------------------------------------------------------------------------------
# independent NumPy formulas (THEORY.md §5), written without ufm.metrics


def np_forward(params, X, relu=True):
    """Layers H_0 = X, H_l = relu(W_l H_{l-1} + b_l), out = W_{D+1} H_D + b_{D+1}."""
    Ws = [np.asarray(W, np.float64) for W in params.Ws]
    bs = [np.zeros(W.shape[0]) for W in Ws] if params.bs is None else [np.asarray(b, np.float64) for b in params.bs]
    H = [np.asarray(X, np.float64)]
    for W, b in zip(Ws[:-1], bs[:-1], strict=True):
        z = W @ H[-1] + b[:, None]
        H.append(np.maximum(z, 0) if relu else z)
    return H, Ws[-1] @ H[-1] + bs[-1][:, None]


def np_means(A, y, K):
    M = np.stack([A[:, y == k].mean(axis=1) for k in range(K)], axis=1)
    return M, A.mean(axis=1)


def np_nc1(A, y, K):
    """tr(Sigma_W Sigma_B^+)/K with Sigma_W = 1/N sum (a - mu_y)(a - mu_y)^T, Sigma_B = 1/K sum (mu_k - mu_G)(...)^T.
    Sigma_B has rank K-1 (its K-th eigenvalue is rounding noise ~1e-16 relative): rcond=1e-10 drops it only."""
    M, muG = np_means(A, y, K)
    R = A - M[:, y]
    SW = R @ R.T / A.shape[1]
    Mc = M - muG[:, None]
    SB = sum(np.outer(Mc[:, k], Mc[:, k]) for k in range(K)) / K
    return np.trace(SW @ np.linalg.pinv(SB, rcond=1e-10, hermitian=True)) / K


def np_trace_ratio(A, y, K):
    M, muG = np_means(A, y, K)
    return (np.sum((A - M[:, y]) ** 2) / A.shape[1]) / (np.sum((M - muG[:, None]) ** 2) / K)


def np_cos(V):
    C = np.array(
        [
            [V[:, i] @ V[:, j] / np.linalg.norm(V[:, i]) / np.linalg.norm(V[:, j]) for j in range(V.shape[1])]
            for i in range(V.shape[1])
        ]
    )
    return C[~np.eye(V.shape[1], dtype=bool)]


def np_etf_distance(V):
    K = V.shape[1]
    G = V.T @ V
    return np.linalg.norm(G / np.linalg.norm(G) - (np.eye(K) - 1.0 / K) / np.sqrt(K - 1))


def np_orth_distance(V):
    G = V.T @ V
    return np.linalg.norm(G / np.linalg.norm(G) - np.eye(V.shape[1]) / np.sqrt(V.shape[1]))


def np_ncc_pred(A, M):
    return np.array(
        [np.argmin([np.linalg.norm(A[:, i] - M[:, k]) for k in range(M.shape[1])]) for i in range(A.shape[1])]
    )


# ---------------------------------------------------------------------------------------------------------------
# shared runs

WD = 3e-3
STEPS = 600
RECORD = [0, 100, 300, 600]


@pytest.fixture(scope="module")
def gmm():
    return nets.gaussian_mixture(5, 40, 32, separation=5.0, noise=1.0, seed=0)


@pytest.fixture(scope="module")
def deep(gmm):
    return nets.train(gmm, (32, 32, 32, 32), loss="mse", weight_decay=WD, steps=STEPS, record_steps=RECORD, key=0)


@pytest.fixture(scope="module")
def deep_metrics(deep, gmm):
    return nets.layer_metrics(deep, gmm)


# ---------------------------------------------------------------------------------------------------------------
# data


def test_as_dataset_is_class_major_with_samples_as_columns():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((12, 3))
    y = np.array([2, 0, 1, 2, 0, 1, 1, 0, 2, 2, 0, 1])
    d = nets.as_dataset(X, y)
    order = np.argsort(y, kind="stable")
    assert d.X.shape == (3, 12) and d.num_classes == 3 and d.class_sizes == (4, 4, 4)
    np.testing.assert_array_equal(d.y, y[order])
    np.testing.assert_array_equal(d.X, X[order].T)
    c = nets.coarsen(d, np.array([0, 1, 0]))
    np.testing.assert_array_equal(c.y, [0] * 8 + [1] * 4)
    np.testing.assert_array_equal(c.fine, [0] * 4 + [2] * 4 + [1] * 4)
    tr, te = nets.split(c, 2, seed=1)
    assert te.class_sizes == (2, 2) and tr.N == 8 and tr.fine is not None
    assert sorted(map(tuple, np.concatenate([tr.X, te.X], axis=1).T.round(12))) == sorted(map(tuple, X.round(12)))


def test_load_digits_balanced_subset():
    pytest.importorskip("sklearn")
    d = nets.load_digits(20, seed=3)
    assert d.X.shape == (64, 200) and d.class_sizes == (20,) * 10
    assert d.X.min() >= 0 and d.X.max() <= 1 and np.all(np.diff(d.y) >= 0)
    with pytest.raises(ValueError, match="n_per_class"):
        nets.load_digits(500)


# ---------------------------------------------------------------------------------------------------------------
# training and recording


def test_snapshots_history_and_features_match_numpy(deep, gmm):
    assert deep.finite and deep.error == 0.0
    np.testing.assert_array_equal(deep.steps, RECORD)
    # the last snapshot is the final parameters; the first is the initialisation from the same key split
    for a, b in zip(jax.tree_util.tree_leaves(deep.snapshot(-1)), jax.tree_util.tree_leaves(deep.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    init = nets.init_mlp(deep.config, jax.random.split(jax.random.key(0))[0])
    for a, b in zip(jax.tree_util.tree_leaves(deep.snapshot(0)), jax.tree_util.tree_leaves(init), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    Y = np.eye(5)[:, gmm.y]
    for r, k in enumerate(RECORD):
        params = deep.snapshot(r)
        H, out = np_forward(params, gmm.X)
        lay = nets.features(deep, gmm, r)
        for a, b in zip(lay.H, H, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(lay.out, out, rtol=1e-12, atol=1e-12)
        # objective = 1/(2N)||out - Y||^2 + wd/2 sum ||W||^2, the MSE convention of THEORY.md §0
        obj = np.sum((out - Y) ** 2) / (2 * gmm.N) + WD / 2 * sum(np.sum(np.asarray(W) ** 2) for W in params.Ws)
        if k < STEPS:  # history[k] is evaluated at the parameters after k steps (full batch)
            np.testing.assert_allclose(deep.history.loss[k], obj, rtol=1e-10)
            assert deep.history.error[k] == np.mean(np.argmax(out, axis=0) != gmm.y)
        else:
            np.testing.assert_allclose(deep.loss, obj, rtol=1e-10)


@pytest.mark.parametrize("optimizer", ["sgd", "momentum"])
def test_named_optimizers_are_plain_gradient_steps(optimizer):
    """ "sgd" is W <- W - lr g and "momentum" the heavy ball t <- g + m t, W <- W - lr t (optax.sgd's recursion),
    with g the gradient of 1/(2N)||out - Y||^2 + wd/2 sum ||W_l||^2 written here in jax.numpy (not the library's
    objective); three full-batch steps from the recorded initialisation agree to round-off."""
    import jax.numpy as jnp

    data = nets.gaussian_mixture(3, 4, 5, seed=1)
    lr, m, wd = 0.1, 0.9, 1e-2
    res = nets.train(
        data, (6,), optimizer=optimizer, lr=lr, momentum=m, weight_decay=wd, steps=3, record_steps=[0, 1, 2, 3], key=0
    )
    X = jnp.asarray(data.X)
    Y = jnp.asarray(np.eye(3)[:, data.y])

    def objective(p):
        (W1, W2), (b1, b2) = p
        out = W2 @ jax.nn.relu(W1 @ X + b1[:, None]) + b2[:, None]
        return jnp.sum((out - Y) ** 2) / (2 * X.shape[1]) + wd / 2 * (jnp.sum(W1**2) + jnp.sum(W2**2))

    p = (tuple(res.snapshot(0).Ws), tuple(res.snapshot(0).bs))
    t = jax.tree_util.tree_map(jnp.zeros_like, p)
    for k in range(1, 4):
        g = jax.grad(objective)(p)
        t = jax.tree_util.tree_map(lambda gi, ti: gi + m * ti, g, t) if optimizer == "momentum" else g
        p = jax.tree_util.tree_map(lambda pi, ti: pi - lr * ti, p, t)
        got = res.snapshot(k)
        for a, b in zip(
            jax.tree_util.tree_leaves((tuple(got.Ws), tuple(got.bs))), jax.tree_util.tree_leaves(p), strict=True
        ):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-12, atol=1e-14)


def test_zero_error_step(deep):
    e = np.append(deep.history.error, deep.error)
    k = deep.zero_error_step
    assert k is not None and np.all(e[k:] == 0) and (k == 0 or e[k - 1] > 0)


def test_load_digits_without_sklearn_names_the_extra(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # makes `from sklearn.datasets import ...` fail
    with pytest.raises(ImportError, match=r"ufm\[networks\]"):
        nets.load_digits()


def test_minibatch_float32_stays_float32(gmm):
    data32 = gmm._replace(X=gmm.X.astype(np.float32))  # float32 data train in float32 by default
    res = nets.train(data32, (16,), loss="ce", batch_size=50, steps=300, key=1, record_steps=[300])
    assert res.finite and res.history.loss.shape == (300,)
    assert all(np.asarray(x).dtype == np.float32 for x in jax.tree_util.tree_leaves(res.params))
    lay = nets.features(res, gmm)
    assert lay.out.dtype == np.float32 and lay.H[1].dtype == np.float32
    assert res.error <= 0.02  # separable mixture: 300 Adam steps on batches of 50 fit it
    # the reported objective is CE: 1/N sum_i (-out_{y_i} + log sum_j exp out_j) + wd/2 sum ||W||^2 (THEORY.md §0)
    _, out = np_forward(res.params, gmm.X)
    m = out.max(axis=0)
    ce = np.mean(-out[gmm.y, np.arange(gmm.N)] + m + np.log(np.sum(np.exp(out - m), axis=0)))
    reg = 1e-3 / 2 * sum(np.sum(np.asarray(W, np.float64) ** 2) for W in res.params.Ws)
    np.testing.assert_allclose(res.loss, ce + reg, rtol=1e-5)  # float32 forward pass: ~1e-7 relative rounding


# ---------------------------------------------------------------------------------------------------------------
# per-layer collapse (Parker et al. 2023)


def test_per_layer_metrics_match_numpy(deep, deep_metrics, gmm):
    lm = deep_metrics
    assert lm.layers == ("input", "H_1", "H_2", "H_3", "H_4", "out") and lm.nc1.shape == (len(RECORD), 6)
    y, K = gmm.y, 5
    for r in (1, len(RECORD) - 1):
        params = deep.snapshot(r)
        H, out = np_forward(params, gmm.X)
        for j, A in enumerate([*H, out]):
            M, muG = np_means(A, y, K)
            Mc = M - muG[:, None]
            np.testing.assert_allclose(lm.nc1[r, j], np_nc1(A, y, K), rtol=1e-7)
            np.testing.assert_allclose(lm.nc1_trace_ratio[r, j], np_trace_ratio(A, y, K), rtol=1e-10)
            np.testing.assert_allclose(lm.nc2_etf[r, j], np_etf_distance(Mc), rtol=1e-10)
            np.testing.assert_allclose(lm.nc2_orthogonal[r, j], np_orth_distance(M), rtol=1e-10)
            cos_c = np_cos(Mc)
            np.testing.assert_allclose(lm.max_angle[r, j], np.mean(np.abs(cos_c + 1 / (K - 1))), rtol=1e-10)
            np.testing.assert_allclose(lm.equiangularity[r, j], np.std(cos_c), rtol=1e-10)
            norms = np.linalg.norm(Mc, axis=0)
            np.testing.assert_allclose(lm.equinorm[r, j], norms.std() / norms.mean(), rtol=1e-10)
            np.testing.assert_allclose(lm.mean_cos_uncentred[r, j], np.mean(np_cos(M)), rtol=1e-10, atol=1e-14)
            assert lm.ncc_accuracy[r, j] == np.mean(np_ncc_pred(A, M) == y)
        # NC4 (Papyan): classifier argmax vs nearest class mean of the penultimate layer
        M4, _ = np_means(H[-1], y, K)
        assert lm.nc4[r] == np.mean(np.argmax(out, axis=0) != np_ncc_pred(H[-1], M4))
        # NC3 (Zhu, product form, ETF target with a bias): ||W M~/||W M~|| - E||
        WM = np.asarray(params.Ws[-1]) @ (M4 - H[-1].mean(axis=1)[:, None])
        E = (np.eye(K) - 1 / K) / np.sqrt(K - 1)
        np.testing.assert_allclose(lm.nc3[r], np.linalg.norm(WM / np.linalg.norm(WM) - E), rtol=1e-10)
        assert lm.error[r] == np.mean(np.argmax(out, axis=0) != y)


def test_collapse_grows_with_depth_and_training(deep_metrics):
    lm = deep_metrics
    last = -1
    # after training: the penultimate layer is far more collapsed than the first hidden layer (Parker et al.)
    assert lm.nc1[last, 4] < 0.5 * lm.nc1[last, 1]
    # the trace ratio (all within-class directions) falls monotonically through the hidden layers to the output
    assert np.all(np.diff(lm.nc1_trace_ratio[last, 1:]) < 0)
    assert lm.nc1[last, 5] < 0.2 * lm.nc1[last, 4]
    # collapse of the penultimate layer keeps growing past zero training error (step 300 -> 600)
    i300 = RECORD.index(300)
    assert lm.error[i300] == 0.0
    assert lm.nc1[last, 4] < 0.6 * lm.nc1[i300, 4]
    assert lm.nc1_trace_ratio[last, 4] < 0.6 * lm.nc1_trace_ratio[i300, 4]
    # the class means of the output approach a simplex ETF (max-angle criterion -> 0)
    assert lm.max_angle[last, 5] < 0.05 * lm.max_angle[0, 5]
    assert lm.ncc_accuracy[last, 4] >= lm.ncc_accuracy[last, 1]


# ---------------------------------------------------------------------------------------------------------------
# the UFM beside the network


def test_ufm_reference_bounds_the_network(deep, gmm):
    ref = nets.ufm_reference(deep, gmm, key=0)
    p = ref.problem
    assert (p.K, p.n_per_class, p.widths, p.loss, p.bias, p.activation) == (5, 40, (32,), "mse", "free", "linear")
    np.testing.assert_allclose(np.asarray(p.lam_W), WD)
    np.testing.assert_allclose(float(p.lam_H), WD)
    assert ref.layers == ("H_4", "out")
    # the UFM objective at the network's own features, by hand: 1/(2N)||W H + b - Y||^2 + lam/2 (||W||^2 + ||H||^2)
    params = deep.params
    H, out = np_forward(params, gmm.X)
    W = np.asarray(params.Ws[-1])
    Y = np.eye(5)[:, gmm.y]
    by_hand = np.sum((out - Y) ** 2) / (2 * gmm.N) + WD / 2 * (np.sum(W**2) + np.sum(H[-1] ** 2))
    np.testing.assert_allclose(ref.network_value, by_hand, rtol=1e-10)
    # rebalanced by hand: a^4 = ||W||^2/||H||^2 (equal lambdas) makes the two penalties equal, sum lam ||W|| ||H||
    pen = WD * np.linalg.norm(W) * np.linalg.norm(H[-1])
    np.testing.assert_allclose(
        ref.network_value_balanced, by_hand - WD / 2 * (np.sum(W**2) + np.sum(H[-1] ** 2)) + pen, rtol=1e-10
    )
    np.testing.assert_allclose(ref.network["H_4"]["nc1"], np_nc1(H[-1], gmm.y, 5), rtol=1e-7)
    # the shallow MSE UFM with a free bias is solved in closed form (THEORY.md §1): the numerical solve agrees,
    # and every network point, rebalanced or not, lies above the optimum (the UFM minimises over all features)
    pred = ref.prediction
    assert pred.known and pred.regime == "collapse" and pred.target_gram == ("etf",)
    assert bool(ref.solution.success)
    np.testing.assert_allclose(float(ref.solution.value), pred.loss, rtol=1e-9)
    assert ref.network_value >= ref.network_value_balanced >= pred.loss
    sv = np.linalg.svd(np.asarray(ref.solution.params.H), compute_uv=False)
    np.testing.assert_allclose(sv[:4], ref.sv_predicted[0][:4], rtol=1e-6)
    a = (np.sum(W**2) / np.sum(H[-1] ** 2)) ** 0.25
    np.testing.assert_allclose(ref.sv_network[0], a * np.linalg.svd(H[-1], compute_uv=False), rtol=1e-10)
    assert ref.ufm["H_4"]["nc1"] < 1e-10 and ref.ufm["H_4"]["nc2_etf"] < 1e-6
    assert ref.predicted["H_4"]["nc2_etf"] == 0.0 and ref.predicted["out"]["nc1"] == 0.0
    assert "nc2_orthogonal" not in ref.predicted["H_4"]  # the ETF target says nothing about uncentred means


def test_deep_ufm_reference_maps_the_top_layers():
    """depth=2 on a bias-free ReLU network: the UFM's free features are H_{D-1}, its ReLU layer is H_D."""
    data = nets.gaussian_mixture(3, 6, 5, seed=2)
    res = nets.train(data, (8, 8, 8), bias=False, steps=5, record_steps=[5], key=3)
    ref = nets.ufm_reference(res, data, depth=2, lam_H=1e-2, solve=False)
    p = ref.problem
    assert (p.widths, p.activation, p.bias, p.L) == ((8, 8), "relu", "none", 2)
    assert ref.layers == ("H_2", "H_3", "out") and res.params.bs is None
    H, out = np_forward(res.params, data.X)
    Ws = [np.asarray(W) for W in res.params.Ws]
    Y = np.eye(3)[:, data.y]
    by_hand = (
        np.sum((Ws[3] @ np.maximum(Ws[2] @ H[2], 0) - Y) ** 2) / (2 * data.N)
        + 1e-3 / 2 * (np.sum(Ws[2] ** 2) + np.sum(Ws[3] ** 2))
        + 1e-2 / 2 * np.sum(H[2] ** 2)
    )
    np.testing.assert_allclose(ref.network_value, by_hand, rtol=1e-10)
    np.testing.assert_allclose(ref.network["H_3"]["nc1"], np_nc1(H[3], data.y, 3), rtol=1e-7)
    assert ref.network_value >= ref.network_value_balanced
    # the DNC prediction: orthogonal frame for H_2 of the UFM (the network's H_3), nothing for its free H_1
    assert ref.prediction.target_gram == (None, "orthogonal")
    assert ref.predicted["H_3"]["nc2_orthogonal"] == 0.0 and "nc2_etf" not in ref.predicted["H_2"]


# ---------------------------------------------------------------------------------------------------------------
# shallow versus expressive (E & Wojtowytsch 2022)


def _nc1_of_linear_map(V, X, y, K):
    return np_nc1(V @ X, y, K)


def test_affine_floor_is_the_minimum_over_linear_maps():
    """gamma_1/K is min over rank-1 maps (a Rayleigh quotient), (gamma_1 + gamma_2)/K the min over rank-(K-1) maps;
    checked by minimising NC1(V X) numerically over V (scipy BFGS, several starts) with the NumPy NC1 above."""
    from scipy.optimize import minimize

    rng = np.random.default_rng(0)
    K, n, p = 3, 10, 4
    y = np.repeat(np.arange(K), n)
    means = 1.5 * rng.standard_normal((p, K))
    X = rng.standard_normal((p, K * n)) * np.array([[1.0], [0.5], [2.0], [1.0]]) + means[:, y]
    fl = nets.affine_nc1_floor(X, y)
    assert fl.gammas.shape == (K - 1,) and np.all(fl.gammas > 0)
    for rank, target in ((1, fl.floor), (K - 1, fl.floor_full_rank)):

        def f(v, rank=rank):
            return _nc1_of_linear_map(v.reshape(rank, p), X, y, K)

        best = min(
            minimize(f, rng.standard_normal(rank * p), method="BFGS", options={"gtol": 1e-10}).fun for _ in range(5)
        )
        np.testing.assert_allclose(best, target, rtol=1e-6)
    # and no random affine map of any rank beats the floor
    for _ in range(50):
        d = int(rng.integers(1, 6))
        H = rng.standard_normal((d, p)) @ X + rng.standard_normal((d, 1))
        assert np_nc1(H, y, K) >= fl.floor * (1 - 1e-9)


def test_affine_floor_is_invariant_to_an_offset_of_the_inputs():
    """NC1 of V X + c 1^T does not depend on any offset of X (centring removes it), so neither does the floor.
    X has 10 fractional bits and |X| < 2^6, so X + 2^k is exact in float64 for k <= 40: any change is the code's
    rounding. Before the fix (Sigma_B from uncentred means, cut relative to its largest eigenvalue only) an offset
    of 2^36 moved gamma_1 by ~1e-6 relatively and 2^40 added a spurious gamma of ~1e8; in the shifted coordinates
    of `ufm.metrics.class_stats` the error is that of the spread (rtol 1e-12: a few hundred eps). The inputs of
    float32 data with an offset of 2^12 are exact too (|X + 2^12| < 2^13 with 10 fractional bits fits 24 bits)."""
    rng = np.random.default_rng(3)
    K, n, p = 4, 30, 6
    y = np.repeat(np.arange(K), n)
    X = rng.standard_normal((p, K * n)) + 2.0 * rng.standard_normal((p, K))[:, y]
    X = np.round(X * 2**10) / 2**10
    assert np.max(np.abs(X)) < 2**6
    ref = nets.affine_nc1_floor(X, y)
    assert ref.gammas.shape == (K - 1,)
    for c in (2.0**20, 2.0**36, 2.0**40):
        assert np.array_equal((X + c) - c, X)  # the offset inputs are exact
        fl = nets.affine_nc1_floor(X + c, y)
        assert fl.gammas.shape == (K - 1,), (c, fl.gammas)
        np.testing.assert_allclose(fl.gammas, ref.gammas, rtol=1e-12, err_msg=f"offset {c}")
        np.testing.assert_allclose([fl.floor, fl.floor_full_rank], [ref.floor, ref.floor_full_rank], rtol=1e-12)
    X32 = X.astype(np.float32)
    assert np.array_equal(((X32 + np.float32(2**12)) - np.float32(2**12)).astype(np.float64), X)
    np.testing.assert_allclose(nets.affine_nc1_floor(X32 + np.float32(2**12), y).gammas, ref.gammas, rtol=1e-12)
    # non-finite inputs give NaN (as ufm.metrics), not an exception or a number
    Xn = X.copy()
    Xn[0, 0] = np.nan
    assert np.all(np.isnan(nets.affine_nc1_floor(Xn, y).gammas))


@pytest.fixture(scope="module")
def comparison(deep, gmm):
    return nets.shallow_vs_expressive(gmm, width=32, deep=deep, loss="mse", weight_decay=WD, steps=STEPS, key=1)


def test_shallow_features_cannot_collapse_the_ufm_does(comparison, gmm):
    cmp = comparison
    shallow, net, u = cmp.rows
    assert [r.name for r in cmp.rows] == ["shallow (affine features)", "deep ReLU MLP", "UFM"]
    fl = nets.affine_nc1_floor(gmm.X, gmm.y)
    np.testing.assert_allclose(cmp.floor.gammas, fl.gammas)
    # the shallow model's features and outputs are affine in X: above the floor (theorem), however trained
    lay = nets.features(cmp.shallow, gmm)
    H, out = np_forward(cmp.shallow.params, gmm.X, relu=False)
    np.testing.assert_allclose(lay.out, out, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(shallow.nc1_output, np_nc1(out, gmm.y, 5), rtol=1e-7)
    assert shallow.nc1_features >= fl.floor and shallow.nc1_output >= fl.floor
    Mc = np_means(out, gmm.y, 5)[0] - out.mean(axis=1)[:, None]
    s = np.linalg.svd(Mc, compute_uv=False)
    assert s[3] > 1e-3 * s[0]  # output class means of rank K-1, so the full-rank floor applies
    assert shallow.nc1_output >= fl.floor_full_rank * (1 - 1e-9)
    # the expressive network beats every affine model by a wide margin; the UFM collapses exactly
    assert net.nc1_output < 0.1 * fl.floor_full_rank
    assert u.nc1_features < 1e-12 and u.nc1_output < 1e-12 and u.error == 0.0


# ---------------------------------------------------------------------------------------------------------------
# fine-grained structure (Yang, Steinhardt, Hu 2023)


def test_kmeans_and_best_matching():
    pytest.importorskip("sklearn")
    rng = np.random.default_rng(1)
    centers = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]]).T
    y = np.repeat(np.arange(3), 30)
    A = centers[:, y] + rng.standard_normal((2, 90))
    km = nets.kmeans(A, 3, restarts=5, seed=0)
    acc, match = nets.cluster_accuracy(km.labels, y)
    assert acc == 1.0 and sorted(match.values()) == [0, 1, 2]
    # for separated blobs the optimum is the true partition: inertia = sum of squared distances to the label means
    M = np.stack([A[:, y == k].mean(axis=1) for k in range(3)], axis=1)
    np.testing.assert_allclose(km.inertia, np.sum((A - M[:, y]) ** 2), rtol=1e-12)
    # best matching against brute force over all assignments
    c = np.array([0, 0, 0, 1, 1, 2, 2, 1])
    t = np.array([1, 1, 0, 0, 0, 2, 1, 2])
    brute = max(np.mean(np.array(perm)[c] == t) for perm in itertools.permutations(range(3)))
    assert nets.cluster_accuracy(c, t)[0] == brute == 5 / 8


def test_fine_labels_survive_collapse_on_superclasses():
    """Yang, Steinhardt, Hu 2023: trained on 5 superclasses of digits to NC1 ~ 0 on them, the penultimate features
    still separate the 10 digits: k-means within each superclass recovers them far above the one-cluster baseline.
    The fine-label network (same architecture, init and training) fits all 10 labels."""
    pytest.importorskip("sklearn")
    data = nets.coarsen(nets.load_digits(40, seed=0), np.arange(10) // 2)
    fg = nets.fine_grained(data, (64, 64, 64, 64), steps=1000, record_steps=[0, 1000], key=0, weight_decay=1e-3)
    assert fg.coarse_accuracy == 1.0 and fg.fine_accuracy == 1.0
    assert fg.chance == 0.5  # balanced pairs of digits
    assert fg.nc1_by_step[-1] < 0.02  # collapsed on the superclasses (NC1 of random-init features: > 1)
    assert fg.accuracy > fg.chance + 0.2
    assert np.all(fg.per_group > 0.5)
    # the returned prediction is the matching it reports, and it is scored on the fine labels
    assert np.mean(fg.predicted == data.fine) == fg.accuracy
    assert fg.input_accuracy > fg.chance + 0.3  # the data already carry the fine structure


@pytest.mark.slow
def test_fine_labels_on_held_out_digits_early_and_late():
    pytest.importorskip("sklearn")
    data = nets.coarsen(nets.load_digits(60, seed=0), np.arange(10) // 2)
    tr, te = nets.split(data, 20, seed=0)
    fg = nets.fine_grained(
        tr, (64, 64, 64, 64), eval_data=te, steps=1500, record_steps=[400, 1500], key=0, weight_decay=1e-3
    )
    assert fg.coarse_accuracy > 0.9 and fg.fine_accuracy > 0.9
    assert fg.accuracy_by_step[0] > fg.chance + 0.25


# ---------------------------------------------------------------------------------------------------------------
# plots and bad input


def test_plots_return_figures(deep, deep_metrics, gmm, comparison):
    """The figures are built without pyplot (ufm.network_plots, as ufm.plotting): pyplot's figure list is unchanged."""
    import sys

    from matplotlib.figure import Figure

    before = sys.modules["matplotlib.pyplot"].get_fignums() if "matplotlib.pyplot" in sys.modules else []
    ref = nets.ufm_reference(deep, gmm, solve=False)
    fig = nets.plot_layer_metrics(deep_metrics, reference=ref)
    assert isinstance(fig, Figure) and len(fig.axes) == 4
    labels = [line.get_label() for line in fig.axes[0].lines]
    assert "UFM prediction: 0" in labels  # NC1 = 0 predicted on H_4 and out, drawn on the log axis' bottom edge
    fig2 = nets.plot_comparison(comparison)
    assert isinstance(fig2, Figure) and len(fig2.axes) == 1
    fig2.savefig(__import__("io").BytesIO(), format="png")  # renders with any backend (no pyplot canvas needed)
    after = sys.modules["matplotlib.pyplot"].get_fignums() if "matplotlib.pyplot" in sys.modules else []
    assert after == before


def test_kmeans_without_sklearn_names_the_extra(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "sklearn.cluster", None)  # makes `from sklearn.cluster import ...` fail
    with pytest.raises(ImportError, match=r"ufm\[networks\]"):
        nets.kmeans(np.eye(3), 2)


def test_bad_input_raises_before_compute(gmm, deep):
    with pytest.raises(ValueError, match="loss"):
        nets.train(gmm, (8,), loss="hinge")
    with pytest.raises(ValueError, match=r"widths\[1\]"):
        nets.train(gmm, (8, 0))
    with pytest.raises(ValueError, match="record_steps"):
        nets.train(gmm, (8,), steps=10, record_steps=[11])
    with pytest.raises(ValueError, match="batch_size"):
        nets.train(gmm, (8,), batch_size=10_000)
    with pytest.raises(TypeError, match="Dataset"):
        nets.train(gmm.X, (8,))
    with pytest.raises(ValueError, match="rows of X"):
        nets.as_dataset(np.zeros((5, 3)), np.arange(4))
    with pytest.raises(ValueError, match="groups"):
        nets.coarsen(gmm, np.arange(3))
    with pytest.raises(ValueError, match="bias=False"):
        nets.ufm_problem(deep, gmm, depth=2)
    with pytest.raises(ValueError, match="fine labels"):
        nets.fine_grained(gmm, (8,))
    with pytest.raises(ValueError, match="snapshot index"):
        nets.features(deep, gmm, len(RECORD))
    other = nets.gaussian_mixture(5, 4, 7, seed=0)
    with pytest.raises(ValueError, match="p = 32"):
        nets.layer_metrics(deep, other)
