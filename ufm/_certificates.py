"""Certificates at a point: first order (gradient norms) and second order (the bottom of the Hessian spectrum).

The Hessian is never formed for large problems: its smallest eigenvalues come from Hessian-vector products
(forward-over-reverse, ``jax.jvp`` of ``jax.grad``) fed to ARPACK's implicitly restarted Lanczos
(``scipy.sparse.linalg.eigsh``). Small problems (``num_params <= dense_max``) use the dense Hessian built from
the same products, which is exact and as cheap there.

Exact zero modes from symmetries are projected out explicitly. The objective is invariant under the
orthogonal group acting on each hidden space that has no ReLU in front of it (THEORY.md §0): with R_l in
O(d_l),

    H -> R_1 H,   W_l -> R_{l+1} W_l R_l^T   (linear: l = 1..L, R_{L+1} = I),
    H -> R_1 H,   W_1 -> W_1 R_1^T           (ReLU: only the feature space; a ReLU commutes with permutations
                                              and positive scalings only, which are not orthogonal-group
                                              symmetries of the penalty except permutations, a finite group),

because ||R X||_F = ||X||_F, and for CE with an unregularised bias the softmax is invariant under b -> b + c 1.
The tangent of the orbit at the point is known in closed form: for skew S_l (a basis E_ij = e_i e_j^T - e_j e_i^T),

    dH = S_1 H,   dW_l = S_{l+1} W_l - W_l S_l,      (and db = 1 for the CE shift).

At a critical point the Hessian annihilates every such tangent (differentiate grad f(R theta) = R grad f(theta)),
so these directions always carry eigenvalue 0 and say nothing about the point being a minimum. We orthonormalise
the tangents (SVD, keeping singular values above ``sym_rtol`` times the largest; a rotation that fixes the point,
such as one acting on the orthogonal complement of a collapsed layer, gives a zero tangent and is dropped) and
compute the spectrum of the Hessian restricted to their orthogonal complement: exactly, as ``C^T Hess C`` with C
an orthonormal basis of the complement (dense), or as the operator ``P Hess P + alpha (I - P)`` with P the
projector on the complement and alpha above the top of the spectrum (Lanczos), which moves the symmetry
directions out of the bottom of the spectrum. ``symmetry_dim`` reports how many directions were removed.

Arithmetic: when ``jax_enable_x64`` is on, a float32 point is evaluated in float64 (the point is exactly
representable; the certificate then describes *that* point, not a float32 computation at it).
"""

from __future__ import annotations

import time
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg
import scipy.optimize
from jax.flatten_util import ravel_pytree

from ._lanczos import lanczos, ritz
from ._model import Params, check_params, fit_loss, forward, objective, regulariser
from ._problem import UFM


class Stationarity(NamedTuple):
    """First-order certificate.

    Attributes:
      value: f at the point; ``fit`` and ``reg`` its two parts (fit + reg = value).
      grad_norm: ||grad f||_2 over all parameters (the solver's stopping quantity).
      grad_fit_norm, grad_reg_norm: ||grad fit||_2 and ||grad reg||_2.
      grad_norm_rel: ``||g|| / (||g_fit|| + ||g_reg||)`` in [0, 1] for the gradient g used in ``stationarity``,
        a scale-free measure: 0 at a critical point (the two forces cancel), 1 when they do not oppose at all;
        0/0 (the zero point of a bias-free model, where both vanish) is 0.
      kinks: ReLU models: the number of pre-activation entries at the kink, |Z_l[i, j]| <= kink_rtol max|Z_l|
        (0 for linear models).
      stationarity: the first-order measure used by `ufm.check`: ``grad_norm`` for smooth points; at kinks the
        smallest ||g(c)|| over the ReLU slopes c in [0, 1] at the kink entries (the minimal-norm element of the
        chain-rule ("conservative", Bolte & Pauwels 2021) subdifferential; JAX's own gradient uses slope 0 at 0).
        A local minimum has 0 in its Clarke subdifferential, which this set contains, so a large value proves
        that the point is not a local minimum; a small one is necessary, not sufficient.
    """

    value: float
    fit: float
    reg: float
    grad_norm: float
    grad_fit_norm: float
    grad_reg_norm: float
    grad_norm_rel: float
    kinks: int
    stationarity: float


class HessianSpectrum(NamedTuple):
    """Second-order certificate.

    Attributes:
      smallest: the smallest eigenvalues, ascending, of the Hessian restricted to the orthogonal complement of
        the symmetry-orbit tangent (all eigenvalues if ``project_symmetries=False``). Lanczos: the smallest Ritz
        values, where a multiple eigenvalue appears once (a single Krylov sequence sees one copy).
      largest: the largest eigenvalue of the (unrestricted) Hessian, the scale for tolerances.
      symmetry_dim: the number of symmetry directions removed (the rank of the orbit tangent), or None when the
        projection was skipped (``project_symmetries=False``, or the tangent basis would exceed ``max_tangent``
        entries; then zero eigenvalues from symmetries remain among ``smallest``).
      num_params: the number of scalar parameters.
      method: "dense" or "lanczos".
      converged: False if Lanczos stopped on its budget before convergence (``smallest`` then holds the Ritz values
        it had; each is >= the true eigenvalue of the same rank, so a negative value still shows negative
        curvature, but a non-negative one certifies nothing).
      status: "converged", or "budget" (the iteration or time budget ran out first).
      iterations: Hessian-vector products used (Lanczos steps; n for the dense Hessian).
      seconds: wall time of the computation.
    """

    smallest: tuple[float, ...]
    largest: float
    symmetry_dim: int | None
    num_params: int
    method: str
    converged: bool
    status: str = "converged"
    iterations: int = 0
    seconds: float = 0.0


class Descent(NamedTuple):
    """An explicit decrease along the bottom eigenvector v of the (projected) Hessian:
    ``decrease = f(theta) - min_t f(theta + t v)`` over a grid of steps t (both signs), with ``step`` the
    minimising t and ``step_rel = |t| / ||theta||``. A positive decrease at a stationary point is a concrete
    certificate that the point is not a local minimum (with or without kinks)."""

    decrease: float
    step: float
    step_rel: float


class Certificate(NamedTuple):
    """`Stationarity`, and (unless skipped) `HessianSpectrum` and the `Descent` test along its bottom eigenvector,
    of the objective at one point. ``dtype`` is the dtype of the point as given."""

    stationarity: Stationarity
    hessian: HessianSpectrum | None
    descent: Descent | None
    dtype: str

    def to_dict(self) -> dict:
        return {
            "stationarity": self.stationarity._asdict(),
            "hessian": None if self.hessian is None else {**self.hessian._asdict(),
                                                           "smallest": list(self.hessian.smallest)},
            "descent": None if self.descent is None else self.descent._asdict(),
            "dtype": self.dtype,
        }


# ---------------------------------------------------------------------------------------------------------------
# compiled pieces (one compile per problem structure and dtype)


@jax.jit
def _grads(problem: UFM, params: Params):
    fit = lambda p: fit_loss(problem, forward(problem, p).out)
    reg = lambda p: regulariser(problem, p)
    vf, gf = jax.value_and_grad(fit)(params)
    vr, gr = jax.value_and_grad(reg)(params)
    return vf, vr, ravel_pytree(gf)[0], ravel_pytree(gr)[0]


def _hvp_inner(problem, params, masks, slopes, v):
    flat, unravel = ravel_pytree(params)
    g = lambda x: ravel_pytree(jax.grad(_piece_objective, argnums=1)(problem, unravel(x), masks, slopes))[0]
    return jax.jvp(g, (flat,), (v,))[1]


_hvp_many = jax.jit(jax.vmap(_hvp_inner, in_axes=(None, None, None, None, 0)))


def _flat(params: Params) -> np.ndarray:
    return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree_util.tree_leaves(params)])


def _work_params(params: Params) -> Params:
    """The point in the working precision: float64 when x64 is enabled, else its own dtype."""
    params = Params(*params)
    dt = jnp.float64 if jax.config.jax_enable_x64 else jnp.asarray(params.H).dtype
    return jax.tree_util.tree_map(lambda x: jnp.asarray(x, dt), params)


# ---------------------------------------------------------------------------------------------------------------
# first order


def _forward_slopes(problem: UFM, params: Params, masks, slopes):
    """The output with ReLU slope ``slopes[l]`` at the masked (kink) entries of Z_{l+2} and the usual 0/1 slope
    elsewhere; the values are exactly those of `forward` (only the derivative changes)."""
    h = params.H
    for W, m, c in zip(params.Ws[:-1], masks, slopes, strict=True):
        z = W @ h
        zs = jax.lax.stop_gradient(z)
        d = jnp.where(m, c, (zs > 0).astype(z.dtype))
        h = jax.nn.relu(zs) + (z - zs) * d
    out = params.Ws[-1] @ h
    return out if params.b is None else out + params.b[:, None]


@jax.jit
def _slope_fit_grads(problem, params, masks, slopes):
    """Fit gradients (flattened) for a batch of slope settings (leading axis on every slope array)."""

    def one(sl):
        fit = lambda p: fit_loss(problem, _forward_slopes(problem, p, masks, sl))
        return ravel_pytree(jax.grad(fit)(params))[0]

    return jax.vmap(one)(slopes)


def _min_slope_gradient(problem, P, masks, gr, tol: float = 0.0, sweeps: int = 10):
    """Minimise ||g_fit(c) + g_reg|| over the kink slopes c in [0, 1] by exact block-coordinate descent.

    Every gradient entry is a product of the ReLU-derivative diagonals of the layers between the parameter and
    the output, each at most once, so g(c) is affine in the slopes of any one layer: with the others fixed,
    g(c) = g(c_0) + G (c_l - c_{l,0}) with G[:, j] = g(c_0 + e_j) - g(c_0) (one batched gradient call), and the
    layer's slopes solve a box-constrained convex QP (L-BFGS-B on its m_l x m_l Gram). One ReLU layer (L = 2) is
    solved globally in one step; deeper models take up to ``sweeps`` sweeps, stopping once a sweep improves by
    less than 1% or the norm is below ``tol``."""
    dt = jnp.asarray(P.H).dtype
    jm = tuple(jnp.asarray(m) for m in masks)
    sel = [np.flatnonzero(m.ravel()) for m in masks]
    c = [np.zeros(m.size) for m in masks]  # JAX's convention: slope 0 at 0
    B = min(512, 1 << int(max(idx.size for idx in sel)).bit_length())  # batch size, a power of 2 (few compiles)

    def grads(rows):  # rows: list of per-layer flat slope vectors, evaluated B at a time
        out = []
        for s in range(0, len(rows), B):
            chunk = rows[s : s + B]
            batch = []
            for li, m in enumerate(masks):
                arr = np.zeros((B, m.size))
                arr[: len(chunk)] = [r[li] for r in chunk]
                batch.append(jnp.asarray(arr.reshape((B,) + m.shape), dt))
            out.append(np.asarray(_slope_fit_grads(problem, P, jm, tuple(batch)), np.float64)[: len(chunk)])
        return np.concatenate(out)

    gf = grads([c])[0]
    best = np.linalg.norm(gf + gr)
    for _ in range(sweeps):
        improved = False
        for li, idx in enumerate(sel):
            if idx.size == 0:
                continue
            rows = [c]
            for j in idx:
                cj = [x.copy() for x in c]
                cj[li][j] += 1.0
                rows.append(cj)
            G = grads(rows)
            g0 = G[0]
            D = (G[1:] - g0).T  # n x m_l
            # the layer's slopes: min ||D x - rhs||^2 over the box [0, 1], a small convex QP in the m_l x m_l Gram
            A = D.T @ D
            q = D.T @ (-(g0 + gr) + D @ c[li][idx])
            qp = lambda x, A=A, q=q: (0.5 * x @ A @ x - q @ x, A @ x - q)  # noqa: E731
            r = scipy.optimize.minimize(qp, c[li][idx], jac=True, method="L-BFGS-B", bounds=[(0.0, 1.0)] * idx.size,
                                        options={"maxiter": 1000, "ftol": 1e-15, "gtol": 1e-14})
            new = [x.copy() for x in c]
            new[li][idx] = r.x
            gf_new = g0 + D @ (r.x - c[li][idx])
            val = np.linalg.norm(gf_new + gr)
            if val < best * (1 - 1e-9):
                c, gf, best, improved = new, gf_new, val, val < best * (1 - 1e-2) or improved
        if not improved or len(sel) == 1 or best <= tol:
            break
    gf = grads([c])[0]  # recompute exactly at the final slopes
    return gf


def kink_masks(problem: UFM, params: Params, kink_rtol: float | None = None) -> tuple[np.ndarray, ...]:
    """Boolean masks of the pre-activation entries of Z_2..Z_L at the ReLU kink: ``|Z_l[i, j]| <= kink_rtol *
    max|Z_l|`` (default kink_rtol: 1e-6 for float64 points, 1e-3 for float32). Empty for linear models."""
    if problem.activation != "relu" or problem.L < 2:
        return ()
    if kink_rtol is None:
        kink_rtol = 1e-6 if jnp.asarray(Params(*params).H).dtype == jnp.float64 else 1e-3
    Zs = [np.abs(np.asarray(z, np.float64)) for z in forward(problem, _work_params(params)).Z]
    return tuple(z <= kink_rtol * z.max() if z.max() > 0 else np.ones(z.shape, bool) for z in Zs)


def stationarity(problem: UFM, params: Params, *, kink_rtol: float | None = None, tol: float = 0.0) -> Stationarity:
    """Value, fit/penalty split and gradient norms at ``params``, kink-aware for ReLU models (see `Stationarity`).

    At kinks the slopes c in [0, 1] are chosen by exact block-coordinate descent (`_min_slope_gradient`); for
    L >= 3 this is a local search, so ``stationarity`` is an upper bound on the minimal norm. The search is
    skipped when JAX's gradient norm is already <= ``tol``."""
    check_params(problem, params)
    P = _work_params(params)
    vf, vr, gf, gr = _grads(problem, P)
    gf, gr = np.asarray(gf, np.float64), np.asarray(gr, np.float64)
    g = float(np.linalg.norm(gf + gr))
    masks = kink_masks(problem, params, kink_rtol)
    kinks = int(sum(m.sum() for m in masks))
    stat, gfs = g, gf
    if kinks and g > tol:
        gfs = _min_slope_gradient(problem, P, masks, gr, tol)
        stat = min(g, float(np.linalg.norm(gfs + gr)))
        if stat == g:
            gfs = gf
    nf, nr = np.linalg.norm(gfs), np.linalg.norm(gr)
    rel = float(stat / (nf + nr)) if nf + nr > 0 else 0.0
    vf, vr = float(vf), float(vr)
    return Stationarity(vf + vr, vf, vr, g, float(nf), float(nr), rel, kinks, stat)


# ---------------------------------------------------------------------------------------------------------------
# symmetry tangents


def _rotation_layers(problem: UFM) -> list[int]:
    """Hidden spaces (1-based l, of dimension d_l) on which O(d_l) acts as a symmetry."""
    return list(range(1, problem.L + 1)) if problem.activation == "linear" else [1]


def symmetry_tangents(problem: UFM, params: Params) -> np.ndarray:
    """The orbit tangent vectors at ``params`` (rows, not orthonormalised), flattened in the order of
    ``jax.flatten_util.ravel_pytree(params)`` (H, W_1, ..., W_L, b): one row per basis element E_ij (i < j) of the
    skew matrices of each rotation-symmetric space (see the module docstring), plus the CE bias shift."""
    params = Params(*params)
    leaves = [np.asarray(x, np.float64) for x in jax.tree_util.tree_leaves(params)]
    sizes = [x.size for x in leaves]
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    n = int(offsets[-1])
    rows = []
    for l in _rotation_layers(problem):
        X = leaves[l - 1]  # H (l = 1) or W_{l-1}: its rows live in R^{d_l}
        W = leaves[l]  # W_l: its columns live in R^{d_l}
        d = X.shape[0]
        I, J = np.triu_indices(d, 1)
        m = I.size
        if m == 0:
            continue
        ar = np.arange(m)
        dX = np.zeros((m,) + X.shape)
        dX[ar, I] = X[J]  # (E_ij X)[i] = X[j]
        dX[ar, J] = -X[I]  # (E_ij X)[j] = -X[i]
        dW = np.zeros((m,) + W.shape)
        dW[ar, :, J] = -W[:, I].T  # -(W E_ij)[:, j] = -W[:, i]
        dW[ar, :, I] = W[:, J].T  # -(W E_ij)[:, i] = +W[:, j]
        T = np.zeros((m, n))
        T[:, offsets[l - 1] : offsets[l]] = dX.reshape(m, -1)
        T[:, offsets[l] : offsets[l + 1]] = dW.reshape(m, -1)
        rows.append(T)
    if problem.loss == "ce" and problem.bias == "free":
        t = np.zeros((1, n))
        t[0, offsets[-2] :] = 1.0  # b is the last leaf
        rows.append(t)
    return np.concatenate(rows, axis=0) if rows else np.zeros((0, n))


def num_symmetry_generators(problem: UFM) -> int:
    """The number of rows `symmetry_tangents` returns (before removing dependent ones)."""
    m = sum(problem.widths[l - 1] * (problem.widths[l - 1] - 1) // 2 for l in _rotation_layers(problem))
    return m + int(problem.loss == "ce" and problem.bias == "free")


def _orthonormal_rows(T: np.ndarray, rtol: float) -> np.ndarray:
    if T.shape[0] == 0:
        return T
    _, s, Vt = np.linalg.svd(T, full_matrices=False)
    if s.size == 0 or s[0] == 0:
        return np.zeros((0, T.shape[1]))
    return Vt[s > rtol * s[0]]


# ---------------------------------------------------------------------------------------------------------------
# second order


def _dense_hessian(problem, params, n, masks=(), slopes=(), chunk=128) -> np.ndarray:
    eye = np.eye(n)
    out = np.empty((n, n))
    dt = jnp.asarray(params.H).dtype
    for s in range(0, n, chunk):
        block = eye[s : s + chunk]
        pad = chunk - block.shape[0]
        if pad:  # one compiled shape for every chunk
            block = np.concatenate([block, np.zeros((pad, n))])
        hv = np.asarray(_hvp_many(problem, params, masks, slopes, jnp.asarray(block, dt)), np.float64)
        out[s : s + chunk] = hv[: chunk - pad]
    return (out + out.T) / 2


def hessian_spectrum(problem: UFM, params: Params, **options) -> HessianSpectrum:
    """The k smallest eigenvalues of the Hessian of the objective at ``params``, symmetry zero modes removed.

    Keyword options (all optional):
      k: how many of the smallest eigenvalues to return (default 6).
      method: "dense" (exact, from n Hessian-vector products; for n <= a few thousand), "lanczos"
        (``scipy.sparse.linalg.eigsh`` on Hessian-vector products, which="SA"; never forms the Hessian), or "auto"
        (default: dense when num_params <= ``dense_max`` = 1500).
      project_symmetries: restrict to the complement of the symmetry-orbit tangent (default True; module
        docstring).
      sym_rtol: tangent singular values below ``sym_rtol`` (default 1e-6) times the largest are treated as 0.
      max_tangent: skip the projection (``symmetry_dim=None``) when the tangent matrix would have more entries
        (default 5e7).
      tol, maxiter: ARPACK's relative accuracy (default 1e-8) and iteration cap (default 20 n).

    At a ReLU kink the Hessian is that of JAX's convention (slope 0 and curvature 0 at 0): the Hessian of one
    smooth piece, so a negative eigenvalue there is only a hint; `certify` checks it with an explicit `Descent`.
    """
    return _hessian(problem, params, **options)[0]


def _piece_objective(problem, params, masks, slopes):
    """The smooth piece of the objective with ReLU slope ``slopes[l]`` at the masked (kink) entries (curvature 0
    there); with all slopes 0 it is JAX's own convention (``jax.nn.relu`` has derivative 0 at 0)."""
    if not masks:
        return objective(problem, params)
    return fit_loss(problem, _forward_slopes(problem, params, masks, slopes)) + regulariser(problem, params)


# --- the symmetry projector, matrix-free (no n x m tangent matrix) ---------------------------------------------
#
# The tangent map T(S) = (dH, dW) of the skew matrices S_l (module docstring) has the adjoint
# T*(v)_l = skew(dX_l X_l^T - W_l^T dW_l), where X_l is the matrix whose rows live in R^{d_l} (H or W_{l-1}) and W_l
# the one whose columns do, skew(M) = (M - M^T)/2. For one rotated space the normal operator is a Lyapunov
# operator: T*T S = skew(S X X^T + W^T W S) = (S A + A S)/2 with A = X X^T + W^T W (use S^T = -S), so in the
# eigenbasis A = U diag(a) U^T it is diagonal: (U^T S U)_ij -> (a_i + a_j)/2 (U^T S U)_ij. The orthogonal
# projection on the orbit tangent is T (T*T)^+ T*; pairs with a_i + a_j <= sym_rtol^2 (a_1 + a_2) are rotations
# that (numerically) fix the point and are dropped, as the explicit basis drops singular values of T below
# sym_rtol times the largest. Several rotated spaces (deep linear models) are coupled through the W between
# them; there (T*T)^+ is applied by preconditioned conjugate gradients with these per-space inverses.


def _rot_pairs(problem, P):
    """(l, X, W) for each rotation-symmetric space: X = H or W_{l-1} (rows in R^{d_l}), W = W_l (columns)."""
    mats = [P.H, *P.Ws]
    return [(l, mats[l - 1], mats[l]) for l in _rotation_layers(problem)]


def _tangent(problem, P, S):
    dmats = [jnp.zeros_like(P.H), *[jnp.zeros_like(W) for W in P.Ws]]
    for (l, X, W), s in zip(_rot_pairs(problem, P), S, strict=True):
        dmats[l - 1] = dmats[l - 1] + s @ X
        dmats[l] = dmats[l] - W @ s
    return dmats


def _tangent_adjoint(problem, P, dmats):
    out = []
    for l, X, W in _rot_pairs(problem, P):
        M = dmats[l - 1] @ X.T - W.T @ dmats[l]
        out.append((M - M.T) / 2)
    return out


def _sym_projector(problem, P, sym_rtol, cg_steps: int = 50):
    """(apply, dim): ``apply(v)`` is the orthogonal projection of the flat vector v on the symmetry-orbit tangent
    (rotations, and the CE bias shift), traceable; ``dim`` the rank counted from the kept pairs (exact for one
    rotated space, None for several, where the coupling is not counted)."""
    pairs = _rot_pairs(problem, P)
    unravel = ravel_pytree(P)[1]
    eig = []
    for _, X, W in pairs:
        a, U = jnp.linalg.eigh(X @ X.T + W.T @ W)
        top2 = a[-1] + (a[-2] if a.shape[0] > 1 else 0.0)
        den = (a[:, None] + a[None, :]) / 2
        keep = (a[:, None] + a[None, :]) > sym_rtol**2 * top2
        eig.append((U, jnp.where(keep, 1.0 / jnp.where(keep, den, 1.0), 0.0), keep))

    def precond(R):
        return [U @ ((U.T @ r @ U) * inv) @ U.T for (U, inv, _), r in zip(eig, R, strict=True)]

    def normal(S):
        return _tangent_adjoint(problem, P, _tangent(problem, P, S))

    def dot(A, B):
        return sum(jnp.vdot(a, b) for a, b in zip(A, B, strict=True))

    def solve(R):  # (T*T)^+ R by PCG (exact in one step for one rotated space)
        X = precond(R)
        if len(pairs) == 1:
            return X
        Rk = [r - q for r, q in zip(R, normal(X), strict=True)]
        Z = precond(Rk)
        D = Z
        rz = dot(Rk, Z)

        def body(_, c):
            X, Rk, D, rz = c
            ND = normal(D)
            dnd = dot(D, ND)
            a = jnp.where(dnd > 0, rz / jnp.where(dnd > 0, dnd, 1.0), 0.0)
            X = [x + a * d for x, d in zip(X, D, strict=True)]
            Rk = [r - a * q for r, q in zip(Rk, ND, strict=True)]
            Z = precond(Rk)
            rz_new = dot(Rk, Z)
            bt = jnp.where(rz > 0, rz_new / jnp.where(rz > 0, rz, 1.0), 0.0)
            D = [z + bt * d for z, d in zip(Z, D, strict=True)]
            return X, Rk, D, rz_new

        return jax.lax.fori_loop(0, cg_steps, body, (X, Rk, D, rz))[0]

    shift = problem.loss == "ce" and problem.bias == "free"

    def apply(v):
        p = unravel(v)
        dmats = [p.H, *p.Ws]
        out = _tangent(problem, P, solve(_tangent_adjoint(problem, P, dmats))) if pairs else [
            jnp.zeros_like(x) for x in dmats]
        b = None if p.b is None else (jnp.full_like(p.b, jnp.mean(p.b)) if shift else jnp.zeros_like(p.b))
        return ravel_pytree(Params(out[0], tuple(out[1:]), b))[0]

    dim = None
    if len(pairs) <= 1:  # a traced count inside jit; an int outside
        dim = sum(jnp.sum(jnp.triu(k, 1)) for _, _, k in eig) + int(shift)
    return apply, dim


@partial(jax.jit, static_argnames=("num_steps", "project", "cg_steps"))
def _lanczos_cycle(problem, P, masks, slopes, v0, sym_rtol, *, num_steps: int, project: bool, cg_steps: int = 50):
    """One compiled cycle of ``num_steps`` Lanczos steps on the Hessian of the smooth piece (``slopes`` at the
    kinks), restricted to the complement of the symmetry tangent when ``project``."""
    flat, unravel = ravel_pytree(P)
    grad = lambda x: ravel_pytree(jax.grad(_piece_objective, argnums=1)(problem, unravel(x), masks, slopes))[0]
    hvp = lambda v: jax.jvp(grad, (flat,), (v,))[1]
    if project:
        proj = _sym_projector(problem, P, sym_rtol, cg_steps)[0]
        perp = lambda v: v - proj(v)
        return lanczos(lambda v: perp(hvp(perp(v))), v0, num_steps, restrict=perp)
    return lanczos(hvp, v0, num_steps)


def _hessian(problem, params, *, k: int = 6, method: str = "auto", project_symmetries: bool = True,
             sym_rtol: float = 1e-6, dense_max: int = 1500, max_tangent: int = 50_000_000, tol: float = 1e-8,
             maxiter: int | None = None, krylov_dim: int = 150, max_time: float = 60.0, masks=(), slopes=(),
             ) -> tuple[HessianSpectrum, np.ndarray | None]:
    """`hessian_spectrum` and the unit eigenvector of its smallest eigenvalue (in the flat parameter space).
    ``masks``/``slopes``: the smooth piece (see `_piece_objective`); default JAX's convention."""
    check_params(problem, params)
    if method not in ("auto", "dense", "lanczos"):
        raise ValueError(f"method must be 'auto', 'dense' or 'lanczos'; got {method!r}")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer; got {k!r}")
    for name, v in (("tol", tol), ("max_time", max_time), ("sym_rtol", sym_rtol)):
        if isinstance(v, bool) or not isinstance(v, (int, float, np.floating)) or not v > 0:
            raise ValueError(f"{name} must be a number > 0; got {v!r}")
    for name, v in (("maxiter", maxiter), ("krylov_dim", krylov_dim)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1):
            raise ValueError(f"{name} must be a positive integer; got {v!r}")
    t_start = time.perf_counter()
    P = _work_params(params)
    dt = jnp.asarray(P.H).dtype
    masks = tuple(jnp.asarray(m) for m in masks)
    slopes = tuple(jnp.asarray(s, dt) for s in slopes) if slopes else tuple(jnp.zeros(m.shape, dt) for m in masks)
    n = int(sum(np.size(x) for x in jax.tree_util.tree_leaves(P)))
    if method == "auto":
        method = "dense" if n <= dense_max else "lanczos"

    if method == "dense":
        Q = None
        if project_symmetries and num_symmetry_generators(problem) * n <= max_tangent:
            Q = _orthonormal_rows(symmetry_tangents(problem, P), sym_rtol)
        r = 0 if Q is None else Q.shape[0]
        Hd = _dense_hessian(problem, P, n, masks, slopes)
        largest = float(np.linalg.eigvalsh(Hd)[-1])
        C = scipy.linalg.null_space(Q) if r else np.eye(n)  # n x (n - r), orthonormal
        ev, U = np.linalg.eigh(C.T @ Hd @ C)
        vec = C @ U[:, 0] if ev.size else None
        return HessianSpectrum(tuple(float(x) for x in ev[:k]), largest, None if Q is None else r, n, "dense",
                               True, "converged", n, time.perf_counter() - t_start), vec

    # Lanczos: cycles of m compiled steps, explicitly restarted from the bottom Ritz vector, until the bottom k
    # Ritz pairs have residual <= tol * max|theta| or the budget (maxiter steps in all, max_time seconds) is spent.
    project = bool(project_symmetries)
    sym = _sym_projector(problem, P, sym_rtol)[1] if project else None
    sym = None if sym is None else int(sym)
    r = sym or 0
    m = int(min(krylov_dim, max(n - r, 2)))
    maxiter = 20 * m if maxiter is None else int(maxiter)
    v0 = jnp.asarray(np.random.default_rng(0).standard_normal(n), dt)
    steps_done, status = 0, "budget"
    theta, res, vec = np.zeros(0), np.zeros(0), None
    while True:
        alpha, beta, V, steps = _lanczos_cycle(problem, P, masks, slopes, v0, sym_rtol, num_steps=m, project=project)
        steps = int(steps)
        steps_done += steps
        theta, res, Y = ritz(alpha, beta, steps)
        scale = max(float(np.max(np.abs(theta))), np.finfo(np.float64).tiny) if theta.size else 1.0
        kk = min(k, theta.size)
        Vn = np.asarray(V[:steps], np.float64)
        vec = Vn.T @ Y[:, 0]
        if steps < m or np.all(res[:kk] <= tol * scale):
            status = "converged"
            break
        if steps_done >= maxiter or time.perf_counter() - t_start > max_time:
            break
        v0 = jnp.asarray(vec, dt)
    # Ritz values of the projected operator; on the complement (projected out: eigenvalue 0 after the projection)
    # they are eigenvalues of the restricted Hessian. Unconverged Ritz values are still >= the true eigenvalue of
    # the same rank (interlacing), so a negative one still shows negative curvature.
    return HessianSpectrum(tuple(float(x) for x in theta[:k]), float(theta[-1]) if theta.size else float("nan"),
                           sym, n, "lanczos", status == "converged", status, steps_done,
                           time.perf_counter() - t_start), vec


@jax.jit
def _objective_many(problem, params, X):
    unravel = ravel_pytree(params)[1]
    return jax.vmap(lambda x: objective(problem, unravel(x)))(X)


def descent_test(problem: UFM, params: Params, direction, num: int = 25) -> Descent:
    """The best decrease of the objective along ``direction`` (flat, in `ravel_pytree` order): f is evaluated at
    theta + t v/||v|| for t = +-s 10^j, j on ``num`` points in [-8, 0], s = max(||theta||, 1) (one vmapped call).
    """
    P = _work_params(params)
    flat = _flat(P)
    v = np.asarray(direction, np.float64)
    v = v / np.linalg.norm(v)
    scale = max(float(np.linalg.norm(flat)), 1.0)
    ts = scale * np.logspace(-8, 0, num)
    ts = np.concatenate([ts, -ts])
    X = jnp.asarray(flat[None, :] + ts[:, None] * v[None, :], jnp.asarray(P.H).dtype)
    f = np.asarray(_objective_many(problem, P, X), np.float64)
    f0 = float(objective(problem, P))
    f = np.where(np.isfinite(f), f, np.inf)
    i = int(np.argmin(f))
    return Descent(f0 - float(f[i]), float(ts[i]), float(abs(ts[i]) / scale))


def certify(problem: UFM, params: Params, *, hessian: bool | str = True, kink_rtol: float | None = None,
            grad_tol: float = 0.0, **hessian_options) -> Certificate:
    """First- and second-order certificate at ``params``: `stationarity` (``grad_tol`` is its ``tol``: no kink
    search below it), `hessian_spectrum` (options passed on) and, when the smallest eigenvalue is negative, the
    `descent_test` along its eigenvector. ``hessian=False`` skips the second order (``hessian`` and ``descent``
    are None); ``hessian="if-stationary"`` computes it only when ``stationarity <= grad_tol`` (curvature away
    from a critical point decides nothing)."""
    if hessian not in (True, False, "if-stationary"):
        raise ValueError(f"hessian must be True, False or 'if-stationary'; got {hessian!r}")
    st = stationarity(problem, params, kink_rtol=kink_rtol, tol=grad_tol)
    if hessian == "if-stationary":
        hessian = st.stationarity <= grad_tol
    hs, vec, desc = None, None, None
    if hessian:
        hs, vec = _hessian(problem, params, **hessian_options)
        if vec is not None and hs.smallest and hs.smallest[0] < 0:
            desc = descent_test(problem, params, vec)
    return Certificate(st, hs, desc, str(jnp.asarray(Params(*params).H).dtype))
