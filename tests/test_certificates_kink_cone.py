"""Why the sign relaxations cannot certify the binary DNC optimum (issue 16, part 3; `ufm._certificates.KinkTest`): the
second-order change at its degenerate kinks is q(delta) = Q(delta, u) with u the activation shifts, which are
nested across layers, u_a = max(J_a delta + sum_b K_ab u_b, 0). Dropping the nesting (u_a = max(J_a delta, 0),
a point of the sign-relaxed cone u >= 0) gives a form that is negative in some direction, while the true second
difference of the objective along that direction is positive: no test on the sign-relaxed cone can certify DNC
(the nested fan can: test_certificates_kink_fan.py)."""

import jax.numpy as jnp
import numpy as np
import scipy.linalg
import scipy.optimize
from jax.flatten_util import ravel_pytree

import ufm
from ufm import _certificates as cert

P_BIN = ufm.UFM(2, 3, (4, 4, 4), activation="relu", loss="mse", bias="none", lam_H=5e-3, lam_W=5e-3)


def test_sign_relaxed_kink_cone_is_not_copositive_at_binary_dnc_but_the_objective_rises():
    c = ufm.construct(P_BIN)
    P = cert._work_params(c)
    masks = cert.kink_masks(P_BIN, c)
    jm = tuple(jnp.asarray(m) for m in masks)
    sl = tuple(jnp.zeros(m.shape) for m in masks)
    n = cert._flat(P).size
    ne = sum(m.size for m in masks)
    lift = np.concatenate([np.ones(n, bool)] + [m.ravel() for m in masks])
    Hd = cert._dense_hessian(P_BIN, P, n + ne, jm, sl, jm)[np.ix_(lift, lift)]  # lifted form, slopes 0
    Cn = scipy.linalg.null_space(cert._orthonormal_rows(cert.symmetry_tangents(P_BIN, P), 1e-6))
    A, B, C = Cn.T @ Hd[:n, :n] @ Cn, Cn.T @ Hd[:n, n:], Hd[n:, n:]
    rows = [
        np.asarray(cert._preactivation_grad(P_BIN, P, jm, sl, li, int(i), int(j)))
        for li, m in enumerate(masks)
        for i, j in zip(*np.nonzero(m), strict=True)
    ]
    J = np.array(rows) @ Cn  # d z_a / d delta at every kink (all move at first order here)

    def q(d):  # the sign-relaxed form and its gradient (piecewise quadratic)
        z = J @ d
        u = np.maximum(z, 0.0)
        v = (B.T @ d + C @ u) * (z > 0)
        return d @ A @ d + 2 * d @ B @ u + u @ C @ u, 2 * (A @ d + B @ u + J.T @ v)

    def ratio(d):
        val, g = q(d)
        s = d @ d
        return val / s, g / s - 2 * val * d / s**2

    rng = np.random.default_rng(0)
    best = min(
        (scipy.optimize.minimize(ratio, rng.standard_normal(A.shape[0]), jac=True, method="BFGS") for _ in range(16)),
        key=lambda r: r.fun,
    )
    lam_max = float(np.linalg.eigvalsh(Hd)[-1])
    # the relaxation is negative: well below rounding (lam_max ~ 1.5, so -1e-4 is 1e-4 relative)
    assert best.fun < -1e-4, best.fun
    d = Cn @ (best.x / np.linalg.norm(best.x))
    flat, unravel = ravel_pytree(P)
    f0 = float(ufm.objective(P_BIN, P))
    # the objective itself rises along that direction at second order, whichever sign (one-sided differences at
    # t = 1e-3 and 1e-4: the two second differences agree, so it is the quadratic term, not higher order)
    for sign in (1.0, -1.0):
        sd = [2 * (float(ufm.objective(P_BIN, unravel(flat + t * sign * d))) - f0) / t**2 for t in (1e-3, 1e-4)]
        assert min(sd) > 1e-2 * lam_max and abs(sd[0] - sd[1]) < 1e-2 * abs(sd[1]), sd
