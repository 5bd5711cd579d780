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

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg
import scipy.sparse.linalg as spla
from jax.flatten_util import ravel_pytree

from ._model import Params, check_params, fit_loss, forward, objective, regulariser
from ._problem import UFM


class Stationarity(NamedTuple):
    """First-order certificate.

    Attributes:
      value: f at the point; ``fit`` and ``reg`` its two parts (fit + reg = value).
      grad_norm: ||grad f||_2 over all parameters (the solver's stopping quantity).
      grad_fit_norm, grad_reg_norm: ||grad fit||_2 and ||grad reg||_2.
      grad_norm_rel: ``||grad f|| / (||grad fit|| + ||grad reg||)`` in [0, 1], a scale-free measure: 0 at a
        critical point (the two forces cancel), 1 when they do not oppose at all; 0/0 (the zero point of a
        bias-free model, where both vanish) is 0.
    """

    value: float
    fit: float
    reg: float
    grad_norm: float
    grad_fit_norm: float
    grad_reg_norm: float
    grad_norm_rel: float


class HessianSpectrum(NamedTuple):
    """Second-order certificate.

    Attributes:
      smallest: the smallest eigenvalues, ascending, of the Hessian restricted to the orthogonal complement of
        the symmetry-orbit tangent (all eigenvalues if ``project_symmetries=False``).
      largest: the largest eigenvalue of the (unrestricted) Hessian, the scale for tolerances.
      symmetry_dim: the number of symmetry directions removed (the rank of the orbit tangent), or None when the
        projection was skipped (``project_symmetries=False``, or the tangent basis would exceed ``max_tangent``
        entries; then zero eigenvalues from symmetries remain among ``smallest``).
      num_params: the number of scalar parameters.
      method: "dense" or "lanczos".
      converged: False if Lanczos stopped before convergence (``smallest`` then holds the Ritz values it had;
        each is >= the true eigenvalue of the same rank, so a negative value still certifies a saddle).
    """

    smallest: tuple[float, ...]
    largest: float
    symmetry_dim: int | None
    num_params: int
    method: str
    converged: bool


class Certificate(NamedTuple):
    """`Stationarity` and (unless skipped) `HessianSpectrum` of the objective at one point."""

    stationarity: Stationarity
    hessian: HessianSpectrum | None
    dtype: str

    def to_dict(self) -> dict:
        return {
            "stationarity": self.stationarity._asdict(),
            "hessian": None if self.hessian is None else {**self.hessian._asdict(), "smallest": list(self.hessian.smallest)},
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


def _hvp_inner(problem, params, v):
    flat, unravel = ravel_pytree(params)
    g = lambda x: ravel_pytree(jax.grad(objective, argnums=1)(problem, unravel(x)))[0]
    return jax.jvp(g, (flat,), (v,))[1]


_hvp = jax.jit(_hvp_inner)
_hvp_many = jax.jit(jax.vmap(_hvp_inner, in_axes=(None, None, 0)))


def _flat(params: Params) -> np.ndarray:
    return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree_util.tree_leaves(params)])


def _work_params(params: Params) -> Params:
    """The point in the working precision: float64 when x64 is enabled, else its own dtype."""
    params = Params(*params)
    dt = jnp.float64 if jax.config.jax_enable_x64 else jnp.asarray(params.H).dtype
    return jax.tree_util.tree_map(lambda x: jnp.asarray(x, dt), params)


# ---------------------------------------------------------------------------------------------------------------
# first order


def stationarity(problem: UFM, params: Params) -> Stationarity:
    """Value, fit/penalty split and gradient norms at ``params`` (see `Stationarity`)."""
    check_params(problem, params)
    vf, vr, gf, gr = _grads(problem, _work_params(params))
    gf, gr = np.asarray(gf, np.float64), np.asarray(gr, np.float64)
    g = np.linalg.norm(gf + gr)
    nf, nr = np.linalg.norm(gf), np.linalg.norm(gr)
    rel = float(g / (nf + nr)) if nf + nr > 0 else 0.0
    vf, vr = float(vf), float(vr)
    return Stationarity(vf + vr, vf, vr, float(g), float(nf), float(nr), rel)


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


def _dense_hessian(problem, params, n, chunk=128) -> np.ndarray:
    eye = np.eye(n)
    out = np.empty((n, n))
    dt = jnp.asarray(params.H).dtype
    for s in range(0, n, chunk):
        block = eye[s : s + chunk]
        pad = chunk - block.shape[0]
        if pad:  # one compiled shape for every chunk
            block = np.concatenate([block, np.zeros((pad, n))])
        hv = np.asarray(_hvp_many(problem, params, jnp.asarray(block, dt)), np.float64)
        out[s : s + chunk] = hv[: chunk - pad]
    return (out + out.T) / 2


def hessian_spectrum(
    problem: UFM,
    params: Params,
    *,
    k: int = 6,
    method: str = "auto",
    project_symmetries: bool = True,
    sym_rtol: float = 1e-6,
    dense_max: int = 1500,
    max_tangent: int = 50_000_000,
    tol: float = 1e-10,
    maxiter: int | None = None,
) -> HessianSpectrum:
    """The k smallest eigenvalues of the Hessian of the objective at ``params``, symmetry zero modes removed.

    Args:
      k: how many of the smallest eigenvalues to return.
      method: "dense" (exact, from n Hessian-vector products; for n <= a few thousand), "lanczos"
        (``scipy.sparse.linalg.eigsh`` on Hessian-vector products, which="SA"; never forms the Hessian), or "auto"
        (dense when num_params <= ``dense_max``).
      project_symmetries: restrict to the complement of the symmetry-orbit tangent (module docstring).
      sym_rtol: tangent singular values below ``sym_rtol`` times the largest are treated as 0.
      max_tangent: skip the projection (``symmetry_dim=None``) when the tangent matrix would have more entries.
      tol, maxiter: ARPACK's relative accuracy and iteration cap (default 20 n).
    """
    check_params(problem, params)
    if method not in ("auto", "dense", "lanczos"):
        raise ValueError(f"method must be 'auto', 'dense' or 'lanczos'; got {method!r}")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer; got {k!r}")
    P = _work_params(params)
    n = int(sum(np.size(x) for x in jax.tree_util.tree_leaves(P)))
    Q = None
    if project_symmetries and num_symmetry_generators(problem) * n <= max_tangent:
        Q = _orthonormal_rows(symmetry_tangents(problem, P), sym_rtol)
    r = 0 if Q is None else Q.shape[0]
    if method == "auto":
        method = "dense" if n <= dense_max else "lanczos"
    if method == "lanczos" and n - r < k + 2:
        method = "dense"  # ARPACK needs k < dimension - 1
    dt = jnp.asarray(P.H).dtype

    if method == "dense":
        Hd = _dense_hessian(problem, P, n)
        largest = float(np.linalg.eigvalsh(Hd)[-1])
        if Q is not None and r:
            C = scipy.linalg.null_space(Q)  # n x (n - r), orthonormal
            Hd = C.T @ Hd @ C
        ev = np.linalg.eigvalsh(Hd)
        return HessianSpectrum(tuple(float(x) for x in ev[:k]), largest, None if Q is None else r, n, "dense", True)

    hv = lambda v: np.asarray(_hvp(problem, P, jnp.asarray(v, dt)), np.float64)
    maxiter = 20 * n if maxiter is None else int(maxiter)
    rng = np.random.default_rng(0)
    v0 = rng.standard_normal(n)
    op = spla.LinearOperator((n, n), matvec=hv, dtype=np.float64)
    try:
        largest = float(spla.eigsh(op, k=1, which="LA", tol=1e-6, v0=v0, maxiter=maxiter, return_eigenvectors=False)[0])
    except spla.ArpackNoConvergence as e:
        largest = float(np.max(e.eigenvalues)) if len(e.eigenvalues) else float("nan")
    if Q is not None and r:
        alpha = 2.0 * abs(largest) + 1.0 if math.isfinite(largest) else 1.0

        def mv(v):
            c = Q @ v
            w = hv(v - Q.T @ c)
            return w - Q.T @ (Q @ w) + alpha * (Q.T @ c)

        opp = spla.LinearOperator((n, n), matvec=mv, dtype=np.float64)
        v0 = v0 - Q.T @ (Q @ v0)
    else:
        opp = op
    converged = True
    try:
        ev = spla.eigsh(opp, k=k, which="SA", tol=tol, v0=v0, maxiter=maxiter, return_eigenvectors=False)
    except spla.ArpackNoConvergence as e:
        ev, converged = np.asarray(e.eigenvalues), False
    ev = np.sort(np.asarray(ev, np.float64))
    return HessianSpectrum(tuple(float(x) for x in ev[:k]), largest, None if Q is None else r, n, "lanczos", converged)


def certify(problem: UFM, params: Params, *, hessian: bool = True, **hessian_options) -> Certificate:
    """First- and second-order certificate at ``params``: `stationarity` and `hessian_spectrum` (options passed
    on). ``hessian=False`` skips the second order (``Certificate.hessian`` is None)."""
    st = stationarity(problem, params)
    hs = hessian_spectrum(problem, params, **hessian_options) if hessian else None
    return Certificate(st, hs, str(jnp.asarray(Params(*params).H).dtype))
