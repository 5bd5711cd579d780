"""ufm._lbfgs: the loop-free (compact) L-BFGS against optax's two-loop recursion and a dense BFGS reconstruction."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ufm import _lbfgs as L

N, M = 7, 4
UPDATE = jax.jit(L.update)  # one compiled program shared by the tests (same shapes)
DIRECTION = jax.jit(L.direction)


def _trajectory(steps, seed=0, repeat_at=()):
    """Points and gradients of a smooth non-quadratic function along a fixed path (x_{k+1} = x_k - 0.3 u_k with u
    optax's direction); at the steps in ``repeat_at`` the point is not moved (s = y = 0: weight 0 in optax)."""
    rng = np.random.default_rng(seed)
    A = rng.normal(size=(N, N))
    A = A @ A.T + np.eye(N)
    opt = optax.scale_by_lbfgs(memory_size=M)
    st = opt.init(jnp.zeros(N))
    x = rng.normal(size=N)
    out = []
    for k in range(steps):
        g = A @ x + np.sin(x)
        u, st = opt.update(jnp.asarray(g), st, jnp.asarray(x))
        out.append((x.copy(), g.copy(), np.asarray(u)))
        if k not in repeat_at:
            x = x - 0.3 * np.asarray(u)
    return out


def _dense_lbfgs(pairs, g, gamma):
    """H g from the BFGS inverse update applied to gamma I over ``pairs`` oldest first (Nocedal & Wright eq. 7.19):
    H <- (I - rho s y^T) H (I - rho y s^T) + rho s s^T, rho = 1 / (y^T s); pairs with y^T s = 0 are skipped."""
    H = gamma * np.eye(len(g))
    for s, y in pairs:
        sy = y @ s
        if sy == 0:
            continue
        rho = 1.0 / sy
        V = np.eye(len(g)) - rho * np.outer(y, s)
        H = V.T @ H @ V + rho * np.outer(s, s)
    return H @ g


def test_direction_equals_optax_two_loop_young_full_and_wrapped_memory():
    # 14 updates with m = 4: a young memory (updates 1-4), full (5) and wrapped around the ring (6-14); one step
    # repeats its point (s = y = 0, weight 0 in optax; left out here). Same arithmetic up to rounding: the compact
    # form solves with R (condition ~1e2 here), so 1e-12 relative in float64 is ~1e4 eps.
    traj = _trajectory(14, repeat_at=(6,))
    mem = L.init(jnp.zeros(N), M)
    for x, g, u_optax in traj:
        u, mem = UPDATE(mem, jnp.asarray(x), jnp.asarray(g))
        np.testing.assert_allclose(np.asarray(u), u_optax, rtol=1e-12, atol=1e-14 * np.linalg.norm(u_optax))
    assert int(L.num_pairs(mem)) == M


RECURSION = jax.jit(lambda mem, x, g: L.update(mem, x, g, recursion=True))


def test_two_loop_equals_optax_and_the_compact_form():
    # the recursion over the same ring memory (diagonal products only, `push(full=False)`) against optax along
    # the same 14 updates (young, full, wrapped memory, a zero pair): same algorithm, so to ~100 eps; and against
    # the compact form of a memory kept in full (1e-12, the compact form's R solve) and the dense reconstruction
    traj = _trajectory(14, repeat_at=(6,))
    mem, full = L.init(jnp.zeros(N), M), L.init(jnp.zeros(N), M)
    for x, g, u_optax in traj:
        u, mem = RECURSION(mem, jnp.asarray(x), jnp.asarray(g))
        uc, full = UPDATE(full, jnp.asarray(x), jnp.asarray(g))
        np.testing.assert_allclose(np.asarray(u), u_optax, rtol=1e-13, atol=1e-15 * np.linalg.norm(u_optax))
        np.testing.assert_allclose(np.asarray(u), np.asarray(uc), rtol=1e-12, atol=1e-14 * np.linalg.norm(u_optax))
    xs, gs = [t[0] for t in traj], [t[1] for t in traj]
    pairs = [(xs[i + 1] - xs[i], gs[i + 1] - gs[i]) for i in range(len(xs) - 1) if i != 6][-M:]
    g = np.random.default_rng(6).normal(size=N)
    np.testing.assert_allclose(
        np.asarray(L.two_loop(mem, jnp.asarray(g), 1.0)), _dense_lbfgs(pairs, g, 1.0), rtol=1e-10
    )


def test_direction_equals_dense_bfgs_inverse_reconstruction():
    # the last m pairs, gamma = s.y / y.y of the newest pair: H g from the dense update in NumPy (independent)
    traj = _trajectory(9)
    mem = L.init(jnp.zeros(N), M)
    for x, g, _ in traj:
        _, mem = UPDATE(mem, jnp.asarray(x), jnp.asarray(g))
    xs = [t[0] for t in traj]
    gs = [t[1] for t in traj]
    pairs = [(xs[i + 1] - xs[i], gs[i + 1] - gs[i]) for i in range(len(xs) - 1)][-M:]
    s, y = pairs[-1]
    gamma = (s @ y) / (y @ y)
    g = np.random.default_rng(5).normal(size=N)
    expect = _dense_lbfgs(pairs, g, gamma)
    np.testing.assert_allclose(np.asarray(DIRECTION(mem, jnp.asarray(g))), expect, rtol=1e-10)
    np.testing.assert_allclose(float(L.gamma(mem, jnp.asarray(g))), gamma, rtol=1e-14)
    # and with an explicit scale (gamma = 1: the memory alone)
    np.testing.assert_allclose(
        np.asarray(L.direction(mem, jnp.asarray(g), 1.0)), _dense_lbfgs(pairs, g, 1.0), rtol=1e-10
    )


def test_first_update_is_optax_capped_gradient_step():
    # no pair yet: H g = min(1, 1/||g||) g (optax's first-step rule)
    g = jnp.asarray([3.0, 4.0, 0.0, 0.0, 0.0, 0.0, 0.0])  # ||g|| = 5
    u, mem = UPDATE(L.init(jnp.zeros(N), M), jnp.ones(N), g)
    np.testing.assert_allclose(np.asarray(u), np.asarray(g) / 5.0, rtol=1e-15)
    assert int(mem.calls) == 1 and int(L.num_pairs(mem)) == 0


def test_lanes_vmap_with_where_equals_separate_memories():
    # a leading lane axis: lane 0 updates at every call, lane 1 every other call (``where``): each lane's memory
    # and direction equal those of a memory updated alone with the same calls
    a, b = _trajectory(8, seed=1), _trajectory(8, seed=2)
    vupd = jax.jit(jax.vmap(L.update))
    mems = jax.vmap(lambda x: L.init(x, M))(jnp.zeros((2, N)))
    alone = [L.init(jnp.zeros(N), M), L.init(jnp.zeros(N), M)]
    for k in range(8):
        w = jnp.asarray([True, k % 2 == 0])
        xs = jnp.asarray(np.stack([a[k][0], b[k][0]]))
        gs = jnp.asarray(np.stack([a[k][1], b[k][1]]))
        u, mems = vupd(mems, xs, gs, w)
        for lane in range(2):
            if bool(w[lane]):
                u1, alone[lane] = UPDATE(alone[lane], xs[lane], gs[lane])
                np.testing.assert_allclose(np.asarray(u[lane]), np.asarray(u1), rtol=1e-12, atol=1e-15)
    for lane in range(2):
        for leaf, ref in zip(jax.tree_util.tree_leaves(mems), jax.tree_util.tree_leaves(alone[lane]), strict=True):
            np.testing.assert_allclose(np.asarray(leaf[lane]), np.asarray(ref), rtol=1e-12, atol=1e-15)


def test_float32_stays_float32():
    mem = L.init(jnp.zeros(N, jnp.float32), M)
    x = jnp.linspace(0.0, 1.0, N, dtype=jnp.float32)
    u, mem = L.update(mem, x, x + 1)
    u, mem = L.update(mem, 2 * x, 3 * x + 1)
    assert u.dtype == jnp.float32
    assert all(leaf.dtype in (jnp.float32, jnp.int32) for leaf in jax.tree_util.tree_leaves(mem))


def test_bad_input_is_refused_before_compute():
    with pytest.raises(ValueError, match="memory_size"):
        L.init(jnp.zeros(N), 0)
    with pytest.raises(ValueError, match=r"\(n,\)"):
        L.init(jnp.zeros((2, N)), M)
