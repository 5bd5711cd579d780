"""L-BFGS without loops: the compact representation of the inverse-Hessian approximation over flat vectors.

The memory holds the last m pairs s_i = x_{i+1} - x_i, y_i = g_{i+1} - g_i as the rows of two (m, n) arrays S, Y (a
ring buffer: the pair pushed j-th sits in row j mod m) and the m x m products SY = S Y^T, YY = Y Y^T, updated by one
row and one column per push. The L-BFGS matrix H (Nocedal & Wright 2006, eq. 7.19, started from gamma I) is, with the
pairs in the order they were pushed (Byrd, Nocedal & Schnabel 1994, Theorem 2.2; Nocedal & Wright eq. 7.24):

    H = gamma I + [S^T  gamma Y^T] [[R^-T (D + gamma Y Y^T) R^-1,  -R^-T],  [S      ]
                                    [-R^-1,                          0  ]]  [gamma Y]

    R = the upper triangle of S Y^T (R_ij = s_i . y_j, i <= j),  D = diag(s_i . y_i),

so, with a = S g, b = Y g and u = R^-1 a,

    H g = gamma g + S^T p - gamma Y^T u,     p = R^-T ((D + gamma Y Y^T) u - gamma b).

One direction is four products with the memory (S g, Y g, S^T p, Y^T u), two m x m triangular solves and
O(m^2) arithmetic: no loop over the pairs, so nothing for XLA to unroll (the two-loop recursion is 2m dependent
dot-and-axpy steps, which XLA:CPU compiles as 2m pairs of kernels), and under ``vmap`` (a leading lane axis) the
products are batched arithmetic instead of a sequence.

It is ``optax.scale_by_lbfgs(memory_size=m)`` (``scale_init_precond=True``) in exact arithmetic, and agrees with it
to rounding (tested to 1e-12 relative in float64): the same pairs (a pair with s . y = 0 has weight 0 in optax, so
it drops out here), gamma = s . y / y . y of the newest pair (1 when y = 0) and, before any pair,
gamma = min(1, 1 / ||g||). `update` is optax's ``update``: the first call records (x, g) only, every later call
pushes the pair (x - x_prev, g - g_prev), and both return H g.

Every function is pure, works on one flat vector (n,) and under ``vmap`` over lanes; the memory is a pytree.

References:
  R. H. Byrd, J. Nocedal, R. B. Schnabel, Representations of quasi-Newton matrices and their use in limited memory
  methods, Math. Programming 63, 1994, 129-156 (Theorem 2.2, section 4).
  J. Nocedal, S. J. Wright, Numerical Optimization, 2nd ed., Springer 2006, §7.2 (eqs. 7.19, 7.24).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy.linalg import solve_triangular


class Memory(NamedTuple):
    """The L-BFGS memory (a pytree; a batch of memories has a leading axis on every leaf).

    Attributes:
      calls: calls of `update` so far (optax's ``count``): pairs pushed = max(calls - 1, 0).
      x, g: the point and gradient of the last `update` (n,).
      S, Y: (m, n) pairs s_i, y_i; the pair pushed j-th (j = 0, 1, ...) is row j mod m.
      SY: (m, m) with SY[i, j] = s_i . y_j.
      YY: (m, m) with YY[i, j] = y_i . y_j.
    """

    calls: jax.Array
    x: jax.Array
    g: jax.Array
    S: jax.Array
    Y: jax.Array
    SY: jax.Array
    YY: jax.Array


def init(x: jax.Array, memory_size: int = 10) -> Memory:
    """An empty memory of ``memory_size`` pairs m >= 1 for flat vectors like ``x`` (n,)."""
    m = int(memory_size)
    if m < 1:
        raise ValueError(f"memory_size must be >= 1; got {memory_size!r}")
    if jnp.ndim(x) != 1:
        raise ValueError(f"x must be a flat vector of shape (n,); got shape {jnp.shape(x)}")
    dt = x.dtype
    z = jnp.zeros((m,) + x.shape, dt)
    zm = jnp.zeros((m, m), dt)
    return Memory(jnp.int32(0), jnp.zeros_like(x), jnp.zeros_like(x), z, z, zm, zm)


def num_pairs(mem: Memory) -> jax.Array:
    """Pairs held: min(pushed, m)."""
    m = mem.S.shape[0]
    return jnp.minimum(jnp.maximum(mem.calls - 1, 0), m)


def push(mem: Memory, s: jax.Array, y: jax.Array, where: jax.Array | None = None, full: bool = True) -> Memory:
    """The memory with the pair (s, y) in row k = max(calls - 1, 0) mod m (the oldest pair dropped when full);
    ``calls``, ``x`` and ``g`` unchanged (`update` advances them).

    Row and column k of SY and YY are refreshed from two matrix products with the memory (S y; Y [s, y]: matrix
    products stay one library call each on XLA:CPU, where a vector reduction becomes several kernels). ``where``
    (a boolean scalar, optional) writes only when true: the rows are then written by a select over (m, n) instead
    of an in-place update (the form that stays cheap under ``vmap``, where a per-lane index becomes a scatter).
    ``full=False`` refreshes only the diagonal entries SY[k, k] = s . y and YY[k, k] = y . y: enough for
    `two_loop` and `gamma`, not for `direction` (a memory is kept one way throughout).
    """
    m, dt = mem.S.shape[0], mem.S.dtype
    k = jnp.maximum(mem.calls - 1, 0) % m
    s, y = s.astype(dt), y.astype(dt)
    rows = jnp.arange(m) == k
    if where is None:
        S = jax.lax.dynamic_update_index_in_dim(mem.S, s, k, 0)
        Y = jax.lax.dynamic_update_index_in_dim(mem.Y, y, k, 0)
    else:
        rows = rows & where
        S = jnp.where(rows[:, None], s[None, :], mem.S)
        Y = jnp.where(rows[:, None], y[None, :], mem.Y)
    if not full:  # only the new pair's s . y and y . y (all `two_loop` reads): no pass over the memory
        d = rows[:, None] & rows[None, :]
        SY = jnp.where(d, jnp.vdot(s, y), mem.SY)
        YY = jnp.where(d, jnp.vdot(y, y), mem.YY)
        return Memory(mem.calls, mem.x, mem.g, S, Y, SY, YY)
    sy = S @ y  # s_i . y -> SY[:, k]
    ys, yy = (Y @ jnp.stack([s, y], axis=1)).T  # y_j . s -> SY[k, :];  y_i . y -> YY[:, k] = YY[k, :]
    SY = jnp.where(rows[None, :], sy[:, None], jnp.where(rows[:, None], ys[None, :], mem.SY))
    YY = jnp.where(rows[None, :], yy[:, None], jnp.where(rows[:, None], yy[None, :], mem.YY))
    return Memory(mem.calls, mem.x, mem.g, S, Y, SY, YY)


def gamma(mem: Memory, g: jax.Array, gg: jax.Array | None = None) -> jax.Array:
    """The scale of the initial matrix gamma I: s . y / y . y of the newest pair (1 when y = 0), and min(1, 1/||g||)
    before any pair (optax's first-step rule: the first step has length at most 1). ``gg``: g . g when the caller
    has it (else computed)."""
    m, dt = mem.S.shape[0], mem.S.dtype
    k = (jnp.maximum(mem.calls - 1, 0) + m - 1) % m  # row of the newest pair
    sy, yy = mem.SY[k, k], mem.YY[k, k]
    gam = jnp.where(yy > 0, sy / jnp.where(yy > 0, yy, 1), 1.0)
    first = jnp.minimum(1.0, 1.0 / jnp.sqrt(jnp.vdot(g, g) if gg is None else gg))
    return jnp.where(mem.calls > 1, gam, first).astype(dt)


def direction(mem: Memory, g: jax.Array, scale: jax.Array | None = None, gg: jax.Array | None = None) -> jax.Array:
    """H g (module docstring) for g (n,), from gamma I with gamma = ``scale`` (default: `gamma`; ``gg`` = g . g
    when known).

    A pair with s . y = 0 is left out (optax gives it weight 0), as are the empty rows of a young memory: their
    rows and columns of R become those of the identity and their a, b entries 0, so they contribute exactly 0.
    """
    m, dt = mem.S.shape[0], mem.S.dtype
    gam = gamma(mem, g, gg) if scale is None else jnp.asarray(scale, dt)
    pushed = jnp.maximum(mem.calls - 1, 0)
    # time order: position t holds row (pushed + t) mod m, the oldest first; a young memory's empty rows come first
    order = (pushed + jnp.arange(m)) % m
    back = (jnp.arange(m) - pushed) % m  # the position of each row in time order
    filled = jnp.arange(m) >= m - jnp.minimum(pushed, m)
    SY = mem.SY[order][:, order]
    d = jnp.diagonal(SY)
    use = filled & (d != 0)
    both = use[:, None] & use[None, :]
    R = jnp.where(both, jnp.triu(SY), 0.0) + jnp.diag(jnp.where(use, 0.0, 1.0)).astype(dt)
    YY = jnp.where(both, mem.YY[order][:, order], 0.0)
    a = jnp.where(use, (mem.S @ g)[order], 0.0)
    b = jnp.where(use, (mem.Y @ g)[order], 0.0)
    u = solve_triangular(R, a, lower=False)
    v = jnp.where(use, d, 0.0) * u + gam * (YY @ u) - gam * b
    p = solve_triangular(R, v, lower=False, trans="T")
    return (gam * g + p[back] @ mem.S - gam * (u[back] @ mem.Y)).astype(dt)


def two_loop(mem: Memory, g: jax.Array, scale: jax.Array | None = None, gg: jax.Array | None = None) -> jax.Array:
    """H g of `direction` by the two-loop recursion (Nocedal & Wright 2006, Alg. 7.4) over the same memory: the
    pairs newest first, then oldest first, rho_i = 1 / (s_i . y_i) (0 for a pair with s . y = 0 and for the empty
    rows of a young memory: they drop out, as in optax), from gamma I (``scale``; default `gamma`).

    Which form to use: a single run's solve (`ufm._driver`) uses this one. It reads each stored row twice (2m
    dot-and-axpy steps, in time order), while `direction` reads the memory in six matrix products (S y, Y [s, y]
    in `push`, S g, Y g, p^T S, u^T Y); on XLA:CPU the products over (m, n) are not faster than the recursion's
    kernels, so for one vector the recursion is cheaper (measured round 5 at m = 10: the compact update 1.24x the
    recursion's at n = 3,456, equal at n = 14,720). Under ``vmap`` over lanes the compact form's products batch
    and the recursion's 2m steps do not, so `ufm._batch`'s lockstep lanes use `direction`. Needs only the
    diagonals of SY and YY (`push` with ``full=False``)."""
    m, dt = mem.S.shape[0], mem.S.dtype
    gam = gamma(mem, g, gg) if scale is None else jnp.asarray(scale, dt)
    pushed = jnp.maximum(mem.calls - 1, 0)
    rows = jnp.arange(m)
    sy = jnp.diagonal(mem.SY)
    ok = (rows < jnp.minimum(pushed, m)) & (sy != 0)  # rows 0..pushed-1 (mod m) hold pairs
    rho = jnp.where(ok, 1 / jnp.where(ok, sy, 1), 0.0).astype(dt)
    newest_first = (pushed - 1 - rows) % m

    def first(i, qa):
        q, a = qa
        j = newest_first[i]
        ai = rho[j] * jnp.vdot(mem.S[j], q)
        return q - ai * mem.Y[j], a.at[j].set(ai)

    def second(i, r):
        j = newest_first[m - 1 - i]
        return r + mem.S[j] * (a[j] - rho[j] * jnp.vdot(mem.Y[j], r))

    q, a = jax.lax.fori_loop(0, m, first, (g.astype(dt), jnp.zeros(m, dt)))
    return jax.lax.fori_loop(0, m, second, gam * q).astype(dt)


def update(
    mem: Memory,
    x: jax.Array,
    g: jax.Array,
    where: jax.Array | None = None,
    gg: jax.Array | None = None,
    recursion: bool = False,
) -> tuple[jax.Array, Memory]:
    """``optax.scale_by_lbfgs(m).update(g, state, x)`` on flat vectors: (H g, the new memory).

    The first call records (x, g); every later call first pushes (x - x_prev, g - g_prev) (`push`), then returns
    H g with gamma from that pair. ``where`` (boolean scalar, optional): update only when true; the memory is
    returned unchanged otherwise, and the H g returned is then that of the old memory (to be discarded). ``gg``:
    g . g when the caller has it (used by the first call's step rule). ``recursion=True``: H g by `two_loop`
    (the memory then keeps only the diagonals of SY and YY: use it so throughout), else by `direction`.
    """
    dt = mem.S.dtype
    x, g = x.astype(dt), g.astype(dt)
    started = mem.calls > 0
    # the first call writes a zero pair in row 0, which the next push overwrites (calls - 1 pairs are held)
    s = jnp.where(started, x - mem.x, 0.0).astype(dt)
    y = jnp.where(started, g - mem.g, 0.0).astype(dt)
    new = push(mem, s, y, where=where, full=not recursion)
    if where is None:
        new = Memory(mem.calls + 1, x, g, new.S, new.Y, new.SY, new.YY)
    else:
        new = Memory(
            jnp.where(where, mem.calls + 1, mem.calls),
            jnp.where(where, x, mem.x),
            jnp.where(where, g, mem.g),
            new.S,
            new.Y,
            new.SY,
            new.YY,
        )
    return (two_loop if recursion else direction)(new, g, gg=gg), new
