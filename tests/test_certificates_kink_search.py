"""The compiled kink-aware stationarity search (`ufm._certificates.min_slope_gradient`, issue 16 part 2) against an
independent formulation: for one ReLU layer (L = 2) the minimal gradient norm over the kink slopes is a bounded
linear least-squares problem, solved here from a NumPy reimplementation of the gradient by SciPy's BVLS."""

import numpy as np
import pytest
import scipy.optimize

import ufm
from ufm import _certificates as cert

P2 = ufm.UFM(2, 3, (4, 4), activation="relu", loss="mse", bias="none", lam_H=1e-2, lam_W=1e-2)


def _kinked_point(seed):
    """Random (H, W_1, W_2) with one pre-activation per row of Z_2 = W_1 H put exactly at 0: W_1[i] is projected
    orthogonal to the column h_j, j = i mod N. Its multiplier dF/dh_a is generic (nonzero)."""
    rng = np.random.default_rng(seed)
    H = rng.standard_normal((4, P2.N))
    W1 = rng.standard_normal((4, 4))
    W2 = rng.standard_normal((2, 4))
    for i in range(4):
        h = H[:, i % P2.N]
        W1[i] -= (W1[i] @ h) / (h @ h) * h
    return ufm.Params(H, (W1, W2), None)


def _np_fit_grad(params, slopes_at_kinks, mask):
    return _np_grad(params, slopes_at_kinks, mask, lam=0.0)


def _np_grad(params, slopes_at_kinks, mask, lam=1e-2):
    """NumPy gradient of f = ||W_2 relu(W_1 H) - Y||^2 / (2N) + lam/2 (||H||^2 + ||W_1||^2 + ||W_2||^2) with ReLU
    slope c_a at the masked kink entries: dOut = (Out - Y)/N, grad W_2 = dOut A^T, dZ = (W_2^T dOut) * D with
    D = 1[Z > 0] off the kinks and c at them, grad W_1 = dZ H^T, grad H = W_1^T dZ (ravel order H, W_1, W_2)."""
    H, (W1, W2) = np.asarray(params.H), [np.asarray(w) for w in params.Ws]
    Y = np.eye(2)[:, P2.labels()]
    Z = W1 @ H
    A = np.maximum(Z, 0.0)
    dO = (W2 @ A - Y) / P2.N
    D = np.where(mask, slopes_at_kinks, (Z > 0).astype(float))
    dZ = (W2.T @ dO) * D
    return np.concatenate([(W1.T @ dZ + lam * H).ravel(), (dZ @ H.T + lam * W1).ravel(), (dO @ A.T + lam * W2).ravel()])


def _bvls(D, b):
    r = scipy.optimize.lsq_linear(D, b, bounds=(0.0, 1.0), method="bvls", tol=1e-14)
    return r.x, np.linalg.norm(D @ r.x - b)


@pytest.mark.parametrize("seed", [0, 1])
def test_compiled_kink_search_equals_bounded_least_squares(seed):
    # g(c) is affine in the slopes of one ReLU layer: g(c) = g(0) + D c with D[:, a] = g(e_a) - g(0), so
    # min_{c in [0,1]^m} ||g_fit(c) + r|| is the bounded least-squares problem min ||D c - (-(g_fit(0) + r))||.
    q = _kinked_point(seed)
    masks = cert.kink_masks(P2, q)
    (mask,) = masks
    assert mask.sum() == 4  # the four planted kinks and no others
    idx = np.flatnonzero(mask.ravel())
    lam_part = _np_grad(q, 0.0, mask) - _np_fit_grad(q, 0.0, mask)
    gf0 = _np_fit_grad(q, 0.0, mask)
    cols = []
    for a in idx:
        e = np.zeros(mask.size)
        e[a] = 1.0
        cols.append(_np_fit_grad(q, e.reshape(mask.shape), mask) - gf0)
    D = np.stack(cols, axis=1)
    P = cert._work_params(q)
    # (a) a right-hand side whose minimiser has two slopes inside the box and two beyond its bounds (-0.3, 1.4):
    # the bounds are active and the minimum is far below the value at c = 0 (the slopes decide the answer)
    rng = np.random.default_rng(seed)
    target = np.array([0.25, 0.7, -0.3, 1.4])
    r = -(gf0 + D @ target) + 1e-3 * rng.standard_normal(gf0.size)
    x, want = _bvls(D, -(gf0 + r))
    assert want < 0.5 * np.linalg.norm(gf0 + r)
    gf, c = cert.min_slope_gradient(P2, P, masks, r)
    got = np.linalg.norm(gf + r)
    # FISTA with restarts on a 4-slope box QP converges to rounding; 1e-9 relative to ||g(0) + r|| is the bar
    assert got == pytest.approx(want, abs=1e-9 * np.linalg.norm(gf0 + r))
    assert np.allclose(c[0].ravel()[idx], x, atol=1e-6) and np.all(c[0][~mask] == 0)
    # the returned fit gradient is the one at the returned slopes (NumPy, independently)
    assert np.allclose(gf, _np_fit_grad(q, c[0], mask), rtol=0, atol=1e-13)
    # (b) the point's own penalty gradient: `stationarity` reports the bounded least-squares minimum
    _, want = _bvls(D, -(gf0 + lam_part))
    st = cert.stationarity(P2, q)
    assert st.kinks == 4 and st.stationarity == pytest.approx(want, abs=1e-9 * st.grad_norm)
    assert st.stationarity <= st.grad_norm
