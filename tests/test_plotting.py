"""Each plotting function renders a PNG with the expected axes, and draws the numbers it is given.

The parameters are built by hand, not solved: the exact optimum of the shallow MSE UFM with a free bias
(THEORY.md §1, Zhou et al. 2022) and a two-layer linear extension of it, so that what a figure shows can be
compared with closed forms: a simplex-ETF Gram, equal singular values, an equilateral triangle of class means.
"""

import io
import math
import subprocess
import sys

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest
from matplotlib.image import imread

import ufm
from ufm import metrics, plotting

K, n, d = 3, 4, 5
lam_H, lam_W = 1e-3, 2e-3


def _etf_optimum(L: int):
    """Exact global optimum of the bias-free-regularised (free-bias) MSE UFM, K=3, n=4, d=5, with L linear layers.

    Shallow (L=1), THEORY.md §1: rho = K sqrt(n lam_W lam_H), class-mean outputs a*(I - J/K) with a* = 1 - rho,
    b = 1/K, and the balanced factorisation lam_W alpha^2 = n lam_H beta^2, alpha*beta = a*, where W = alpha Q R^T
    and the class means of H are beta R Q^T (Q: orthonormal basis of the centred K-subspace, R: d x (K-1)
    orthonormal). For L = 2 we only need *some* parameters whose class means are an ETF in every layer
    (W_1 = I on the span), not the L = 2 optimum: the figures are compared with the geometry, not a loss.
    """
    rho = K * math.sqrt(n * lam_W * lam_H)
    a = 1 - rho
    alpha = (n * lam_H / lam_W) ** 0.25 * math.sqrt(a)
    beta = (lam_W / (n * lam_H)) ** 0.25 * math.sqrt(a)
    E = np.eye(K) - np.ones((K, K)) / K
    Q = np.linalg.svd(E)[0][:, : K - 1]  # K x (K-1), orthonormal, orthogonal to 1
    R = np.linalg.qr(np.random.default_rng(0).standard_normal((d, K - 1)))[0]  # d x (K-1)
    M_H = beta * R @ Q.T  # d x K class means
    H = np.repeat(M_H, n, axis=1)  # class-major columns
    W_last = alpha * Q @ R.T  # K x d
    Ws = (W_last,) if L == 1 else (R @ R.T, W_last)
    p = ufm.UFM(
        num_classes=K,
        n_per_class=n,
        widths=(d,) * L,
        activation="linear",
        loss="mse",
        bias="free",
        lam_H=lam_H,
        lam_W=lam_W,
    )
    return p, ufm.Params(H, Ws, np.full(K, 1.0 / K)), alpha, beta, a


def _png(fig) -> np.ndarray:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=60)
    raw = buf.getvalue()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    img = imread(io.BytesIO(raw))
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    assert float(np.std(img[..., :3])) > 0.01  # not a blank canvas
    return img


def _main_axes(fig):
    """Axes that are not colour bars."""
    return [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]


def test_training_curves_draws_gap_gradient_and_nc1():
    # synthetic history with known values: f_k = f* + 2^-k (k < 30), one step below f* at the end
    f_star = 0.25
    k = np.arange(31)
    loss = f_star + 2.0 ** (-k)
    loss[-1] = f_star - 1e-12
    gn = 2.0 ** (-k)
    loss_padded = np.concatenate([loss, [np.nan] * 5])  # NaN padding after the last step is dropped
    gn_padded = np.concatenate([gn, [np.nan] * 5])
    nc1_steps = np.array([0, 10, 20, 30])
    nc1 = np.array([[1.0, 2.0], [1e-3, 1e-4], [1e-9, 0.0], [1e-15, 1e-16]])
    fig = plotting.training_curves(
        ufm.History(loss_padded, gn_padded),
        predicted_loss=f_star,
        history_every=2,
        nc1=nc1,
        nc1_steps=nc1_steps,
        layer_names=["H_1", "H_2"],
        tol=1e-9,
    )
    _png(fig)
    ax_loss, ax_grad, ax_nc1 = fig.axes
    assert len(fig.axes) == 3
    for ax in fig.axes:
        assert ax.get_yscale() == "log" and ax.get_xlabel() and ax.get_ylabel()
    above, below = ax_loss.lines[:2]
    x, y = above.get_data()
    np.testing.assert_array_equal(x, 2 * k)  # history_every = 2
    # the gap f_k - f* = 2^-k exactly up to the rounding of f* + 2^-k (|err| <= eps * f*, relative <= 3e-8 at k=29)
    np.testing.assert_allclose(y[:30], 2.0 ** (-k[:30]), rtol=1e-7)
    assert np.isnan(y[30])  # the step below the prediction is drawn by the red series instead
    xb, yb = below.get_data()
    assert np.isnan(yb[:30]).all() and yb[30] == pytest.approx(1e-12, rel=1e-3)
    np.testing.assert_allclose(ax_grad.lines[0].get_ydata(), gn)
    assert ax_grad.lines[1].get_ydata()[0] == 1e-9  # the tol line
    assert len(ax_nc1.lines) == 2
    np.testing.assert_array_equal(ax_nc1.lines[0].get_xdata(), nc1_steps)
    y2 = ax_nc1.lines[1].get_ydata()
    assert y2[2] == plotting._FLOOR and y2[3] == 1e-16  # exact zero drawn at the floor, not dropped


def test_training_curves_without_prediction_or_snapshots_says_so():
    fig = plotting.training_curves((np.array([1.0, 0.5]), np.array([1.0, 0.1])))
    _png(fig)
    assert "no prediction" in fig.axes[0].get_title()
    assert any("snapshot" in t.get_text() for t in fig.axes[2].texts)
    np.testing.assert_array_equal(fig.axes[0].lines[0].get_ydata(), [1.0, 0.5])


def test_training_curves_rejects_batched_history():
    with pytest.raises(ValueError, match="sols.take"):
        plotting.training_curves((np.ones((2, 3)), np.ones((2, 3))))


def test_collapse_bars_one_bar_per_layer_with_values():
    p, params, *_ = _etf_optimum(L=2)
    m = metrics.layer_metrics(p, params)
    fig = plotting.collapse_bars(m)
    _png(fig)
    assert len(fig.axes) == 3
    names = [f["name"] for f in m["features"]]  # H_1, H_2, out
    ax1, ax2, ax3 = fig.axes
    assert [t.get_text() for t in ax1.get_xticklabels()] == [plotting._sub(nm) for nm in names]
    assert len(ax1.patches) == len(names) and len(ax3.patches) == p.L
    # exact collapse: every NC1 is exactly 0 (H = M kron 1^T), drawn at the floor and labelled "0"
    assert all(f["nc1"] == 0 for f in m["features"])
    assert [t.get_text() for t in ax1.texts] == ["0"] * len(names)
    # NC2 to the ETF target is ~1e-16 here; each bar's top is its value
    tops = [pt.get_y() + pt.get_height() for pt in ax2.patches]
    for top, f in zip(tops, m["features"], strict=True):
        assert top == pytest.approx(f["nc2"] if f["nc2"] > 0 else plotting._FLOOR, rel=1e-9)


def test_collapse_bars_rejects_other_input():
    with pytest.raises(TypeError, match="layer_metrics"):
        plotting.collapse_bars({"nc1": [1.0]})


def test_gram_heatmaps_show_the_simplex_etf():
    p, params, *_ = _etf_optimum(L=2)
    fig = plotting.gram_heatmaps(p, params)
    _png(fig)
    main = _main_axes(fig)
    assert len(main) == p.L + 2 and len(fig.axes) == p.L + 3  # H_1, H_2, out, predicted + colour bar
    etf = (np.eye(K) - np.ones((K, K)) / K) / math.sqrt(K - 1)  # the simplex-ETF Gram at unit Frobenius norm
    for ax in main:
        G = ax.images[0].get_array()
        # the centred class-mean Gram of every layer of an ETF optimum is exactly the ETF Gram (rounding only)
        np.testing.assert_allclose(G, etf, atol=1e-12)
    assert "simplex ETF" in main[-1].get_title()


def test_gram_heatmaps_note_when_no_geometry_is_predicted():
    # deep ReLU, H_1 has no unique geometry (THEORY.md §4.1); imbalanced CE has none anywhere (§9.4)
    p = ufm.UFM(num_classes=3, n_per_class=(3, 2, 1), widths=(4,), loss="ce", bias="free", lam_H=1e-3, lam_W=1e-3)
    rng = np.random.default_rng(0)
    params = ufm.Params(rng.standard_normal((4, 6)), (rng.standard_normal((3, 4)),), np.zeros(3))
    fig = plotting.gram_heatmaps(p, params)
    _png(fig)
    assert any("no unique" in t.get_text() for t in _main_axes(fig)[-1].texts)


def test_gram_heatmaps_draw_a_given_predicted_gram():
    """Imbalanced bias-free MSE: the predicted geometry is an orthogonal frame with class-dependent norms
    (Dang et al. 2023), which has no fixed target Gram; the figure draws prediction.gram_H, normalised."""
    from types import SimpleNamespace

    p = ufm.UFM(
        num_classes=3,
        n_per_class=(3, 2, 1),
        widths=(4, 4),
        activation="linear",
        loss="mse",
        bias="none",
        lam_H=1e-3,
        lam_W=1e-3,
    )
    rng = np.random.default_rng(0)
    params = ufm.Params(rng.standard_normal((4, 6)), (rng.standard_normal((4, 4)), rng.standard_normal((3, 4))), None)
    G = np.diag([9.0, 4.0, 1.0])
    fig = plotting.gram_heatmaps(p, params, prediction=SimpleNamespace(gram_H=(None, G)))
    _png(fig)
    ax = _main_axes(fig)[-1]
    np.testing.assert_allclose(ax.images[0].get_array(), G / np.linalg.norm(G), rtol=1e-15)
    assert "H_{2}" in ax.get_title() and "unequal" in ax.get_title()


def test_singular_value_plot_against_prediction():
    p, params, alpha, beta, a = _etf_optimum(L=1)
    # closed forms (THEORY.md §1): sigma(W) = alpha (K-1 times), sigma(H over N columns) = sqrt(n) beta
    fig = plotting.singular_value_plot(
        p, params, predicted_W=[[alpha] * (K - 1)], predicted_H=[[math.sqrt(n) * beta] * (K - 1)]
    )
    _png(fig)
    assert len(fig.axes) == 2 * p.L
    ax_w, ax_h = fig.axes
    found_w = ax_w.lines[0].get_ydata()
    np.testing.assert_allclose(found_w[: K - 1], alpha, rtol=1e-12)
    assert np.all(found_w[K - 1 :] < 1e-12)  # rank K-1: the rest are rounding-level (or drawn at the floor)
    np.testing.assert_allclose(ax_h.lines[0].get_ydata()[: K - 1], math.sqrt(n) * beta, rtol=1e-12)
    np.testing.assert_allclose(ax_w.lines[1].get_ydata(), alpha)  # the predicted marks
    lo, hi = ax_w.get_ylim()
    assert lo <= 1e-12 and hi >= alpha  # every value visible
    fig = plotting.singular_value_plot(p, params, max_index=1)  # only sigma_1 drawn; the label says what is left out
    _png(fig)
    assert fig.axes[0].lines[0].get_ydata().size == 1 and "2 more" in fig.axes[0].get_xlabel()


def test_singular_value_plot_checks_prediction_length():
    p, params, *_ = _etf_optimum(L=2)
    with pytest.raises(ValueError, match="one entry per layer"):
        plotting.singular_value_plot(p, params, predicted_W=[[1.0]])


def test_class_means_plot_draws_an_equilateral_triangle():
    p, params, *_ = _etf_optimum(L=1)
    fig = plotting.class_means_plot(p, params, dim=2)
    _png(fig)
    assert len(fig.axes) == p.L + 1  # H_1, out
    ax = fig.axes[0]
    # the class means (the big dots, collection with K points) of an ETF form an equilateral triangle
    means = [c for c in ax.collections if c.get_offsets().shape[0] == K and c.get_sizes()[0] == 40][0]
    P = np.asarray(means.get_offsets())
    dists = [np.linalg.norm(P[i] - P[j]) for i in range(K) for j in range(i + 1, K)]
    np.testing.assert_allclose(dists, dists[0], rtol=1e-10)
    # the samples (N points) sit on their class means: exact within-class collapse
    samples = [c for c in ax.collections if c.get_offsets().shape[0] == p.N][0]
    np.testing.assert_allclose(np.asarray(samples.get_offsets()), np.repeat(P, n, axis=0), atol=1e-12)
    assert "120.0° centred" in ax.get_title()  # arccos(-1/(K-1)) = 120 degrees for K = 3


def test_class_means_plot_3d():
    p, params, *_ = _etf_optimum(L=2)
    fig = plotting.class_means_plot(p, params, dim=3)
    _png(fig)
    assert len(fig.axes) == p.L + 1 and all(ax.name == "3d" for ax in fig.axes)
    with pytest.raises(ValueError, match="dim"):
        plotting.class_means_plot(p, params, dim=4)


def test_nc1_over_training_matches_metrics_on_snapshots():
    p, params, *_ = _etf_optimum(L=2)
    rng = np.random.default_rng(1)
    noisy = ufm.Params(params.H + 0.1 * rng.standard_normal(params.H.shape), params.Ws, params.b)
    stacked = ufm.Params(
        np.stack([noisy.H, params.H, params.H]), tuple(np.stack([W] * 3) for W in params.Ws), np.stack([params.b] * 3)
    )
    snaps = ufm.Snapshots(np.array([0, 5, -1]), stacked)  # the last slot is unused
    steps, nc1, names = plotting.nc1_over_training(p, snaps)
    np.testing.assert_array_equal(steps, [0, 5])
    assert names == ["H_1", "H_2"] and nc1.shape == (2, 2)
    y = p.labels()
    assert nc1[0, 0] == pytest.approx(metrics.nc1(noisy.H, y, K), rel=1e-12) and nc1[0, 0] > 0
    assert nc1[1, 0] == 0 and nc1[1, 1] == 0  # exact collapse


def test_import_ufm_does_not_import_matplotlib():
    code = "import sys, ufm, ufm.plotting; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
