"""Compiled Lanczos iteration with full reorthogonalisation, for the extreme eigenvalues of a symmetric operator.

One call of `lanczos` runs m steps of the three-term recurrence (Lanczos 1950; Golub & Van Loan, *Matrix
Computations*, 4th ed., §10.1) inside one traced program: with v_0 = v / ||v||,

    w = A v_j - beta_{j-1} v_{j-1},   alpha_j = <v_j, w>,   w <- w - alpha_j v_j,
    w <- w - V^T (V w)  (twice: "twice is enough", Giraud et al. 2005),   beta_j = ||w||,   v_{j+1} = w / beta_j,

so V_m^T A V_m = T_m, the tridiagonal matrix of the alpha's and beta's. The eigenvalues of T_m (Ritz values) lie in
[lambda_min(A), lambda_max(A)] (Cauchy interlacing), the extreme ones converge first, and the Ritz pair (theta, V^T y)
has the residual ||A V^T y - theta V^T y|| = beta_m |y_m| (exact in exact arithmetic; full reorthogonalisation keeps
it so in floating point), which bounds the distance from theta to the spectrum of A.

`ritz` extracts Ritz values, residuals and vectors on the host. A breakdown (beta_j ~ 0: the Krylov space is
invariant, every Ritz value is an exact eigenvalue) is reported by the number of valid steps, and the rest of the
basis is zero.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

_BLOCK = 16


def _reorthogonalise(V, w, j):
    """w - V^T (V w) over the rows 0..j of V only (the rest are still 0; V has a multiple of ``_BLOCK`` rows), in
    blocks of ``_BLOCK`` rows: cost and memory traffic grow with the filled part, not with m. A full
    ``V.T @ (V @ w)`` on the (m, n) basis is memory-bound in XLA's CPU dot: 16 s for 150 steps at n = 27,520,
    against 1.5 s for this loop (load 15)."""

    def blk(b, w):
        Vb = jax.lax.dynamic_slice_in_dim(V, b * _BLOCK, _BLOCK)
        return w - jnp.einsum("m,mn->n", jnp.einsum("mn,n->m", Vb, w), Vb)

    return jax.lax.fori_loop(0, j // _BLOCK + 1, blk, w)


def lanczos(
    matvec: Callable[[jax.Array], jax.Array],
    v0: jax.Array,
    num_steps: int,
    *,
    restrict: Callable[[jax.Array], jax.Array] | None = None,
    breakdown_rtol: float = 1e-10,
):
    """m = ``num_steps`` Lanczos steps on the symmetric operator ``matvec`` (n -> n) from ``v0`` (n,), traceable.

    ``restrict``: the orthogonal projector on an invariant subspace the iteration must stay in (applied to every new
    vector, so rounding cannot bring back directions projected out of ``matvec``). A breakdown is declared when
    beta_j <= ``breakdown_rtol`` * max_i (|alpha_i| + beta_i) (a running estimate of ||A||): the rounding in a
    Hessian-vector product is relative to ||A||, not to the current alpha_j.

    Returns:
      ``(alpha, beta, V, steps)``: alpha (m,), beta (m,) (beta[j] couples steps j and j+1; beta[m-1] is the
      residual factor), the orthonormal basis V (m, n), and ``steps`` the number of valid steps (< m after a
      breakdown, when ``beta[steps-1]`` is at rounding level: later rows of V are 0).
    """
    n = v0.shape[0]
    dt = v0.dtype
    m = int(num_steps)
    restrict = restrict or (lambda x: x)
    v = restrict(v0)
    v = v / jnp.linalg.norm(v)
    V = jnp.zeros((-(-m // _BLOCK) * _BLOCK, n), dt)  # padded to whole blocks (`_reorthogonalise`)

    def body(j, carry):
        V, alpha, beta, v, v_prev, b_prev, steps, alive, anorm = carry
        V = V.at[j].set(v)
        w = matvec(v) - b_prev * v_prev
        a = jnp.vdot(v, w)
        w = restrict(w - a * v)
        w = _reorthogonalise(V, w, j)
        w = _reorthogonalise(V, w, j)
        b = jnp.linalg.norm(w)
        anorm = jnp.maximum(anorm, jnp.abs(a) + jnp.maximum(b, b_prev))
        ok = alive & (b > breakdown_rtol * anorm)
        alpha = alpha.at[j].set(jnp.where(alive, a, 0.0))
        beta = beta.at[j].set(jnp.where(alive, b, 0.0))
        v_next = jnp.where(ok, w / jnp.where(b > 0, b, 1.0), 0.0)
        steps = steps + alive.astype(jnp.int32)
        return V, alpha, beta, v_next, v * alive, jnp.where(ok, b, 0.0), steps, ok, anorm

    init = (
        V,
        jnp.zeros(m, dt),
        jnp.zeros(m, dt),
        v,
        jnp.zeros(n, dt),
        jnp.zeros((), dt),
        jnp.int32(0),
        jnp.bool_(True),
        jnp.zeros((), dt),
    )
    V, alpha, beta, _, _, _, steps, _, _ = jax.lax.fori_loop(0, m, body, init)
    return alpha, beta, V[:m], steps


def ritz(alpha, beta, steps: int):
    """Ritz values (ascending), their residual norms beta_m |y_m| and the eigenvectors y of T_m (host, float64).

    After a breakdown (``steps`` < m) the residuals are 0: the Krylov space is invariant."""
    k = int(steps)
    a = np.asarray(alpha, np.float64)[:k]
    b = np.asarray(beta, np.float64)[:k]
    T = np.diag(a) + np.diag(b[:-1], 1) + np.diag(b[:-1], -1)
    theta, Y = np.linalg.eigh(T)
    res = np.abs(b[-1] * Y[-1, :]) if k else np.zeros(0)
    return theta, res, Y
