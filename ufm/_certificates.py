"""Certificates at a point: first order (gradient norms) and second order (the bottom of the Hessian spectrum).

The Hessian is never formed for large problems: its smallest eigenvalues come from Hessian-vector products
(forward-over-reverse, ``jax.jvp`` of ``jax.grad``) inside a compiled Lanczos iteration with full
reorthogonalisation (`ufm._lanczos`; one ``jit`` per cycle of ``krylov_dim`` steps, explicitly restarted from the
bottom Ritz vector, under an iteration and a time budget). Small problems (``num_params <= dense_max``) use the
dense Hessian built from the same products, which is exact and as cheap there.

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
an orthonormal basis of the complement (dense), or by running Lanczos on ``P Hess P`` inside the range of P, the
projector on the complement, applied matrix-free (`_sym_projector`: a closed-form Lyapunov solve per rotated
space, no tangent matrix). ``symmetry_dim`` reports how many directions were removed.

Second order at ReLU kinks and the scale-aware stationarity: see `KinkTest`, `certify` and `rounding_floor`.

Arithmetic: when ``jax_enable_x64`` is on, a float32 point is evaluated in float64 (the point is exactly
representable; the certificate then describes *that* point, not a float32 computation at it).
"""

from __future__ import annotations

import itertools
import math
import time
import warnings
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg
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
      largest: the largest eigenvalue of the Hessian (dense: unrestricted; Lanczos: restricted, the top Ritz
        value), the scale for tolerances.
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


class KinkTest(NamedTuple):
    """Second order at ReLU kinks (`certify`).

    Near a kink entry a of a pre-activation (z_a = 0, activation h_a = relu(z_a)) write g_a = dF/dh_a, the
    derivative of the fit in that activation (with the chosen slopes c downstream). Where g_a > 0 the fit
    increases with h_a, so locally relu(z_a) = min {h_a : h_a >= 0, h_a >= z_a} and the point is a local minimum
    of f exactly when it is one of the smooth problem in (theta, h_A) with these two inequality constraints. Its
    KKT multipliers are mu_0 = (1 - c_a) g_a (for h_a >= 0) and mu_1 = c_a g_a (for h_a >= z_a), with c the
    kink slopes at which grad f_c = 0 (the Clarke stationarity of `Stationarity`), both >= 0 iff g_a >= 0. The
    Hessian of its Lagrangian on its critical cone is the Hessian of the smooth piece f_c (slopes c at the kinks,
    curvature 0 there), restricted to the directions with dz_a = 0 where both multipliers are positive and one-sided
    where one is; dropping those constraints gives a sufficient test: if g_a > 0 at every kink and the Hessian of
    f_c (symmetry directions removed) has no eigenvalue below -hess_tol, the second-order condition holds (to that
    tolerance). A kink with g_a < 0 can be opened with a first-order decrease (tried explicitly along grad z_a).
    A kink with g_a = 0 is degenerate: opening it costs nothing at first order, and at second order the activation
    moves by u_a = max(dz_a, 0). Treating u_a as a free variable (an additive shift of the activation, "lifted")
    gives a quadratic form in (delta, u) whose restriction to u = max(dz, 0) is the second-order change of f; if it
    has no negative eigenvalue neither has the restriction (a sufficient test). Kinks with grad z_a = 0 (both the
    row of W and the column of the features entering z_a are zero) move only at second order and are not lifted:
    at second order their activation does not move.

    **The critical subspace** (when that relaxed test fails and no multiplier is negative). Lift every kink
    activation by e_a = relu(z_a) - mu_a z_a (mu the Clarke slopes of `stationarity`): f(theta) = Phi(theta, e(theta))
    with Phi(theta, e) the smooth piece with activation mu_a z_a + e_a at the kinks, grad_theta Phi = grad f_mu = 0
    and dPhi/de_a = c_a (= g_a above). Along theta + eps delta, with z_a = eps t_a + O(eps^2) (t_a the first-order
    motion, through the kinks before a: nesting is inside e),

        f(theta + eps delta) - f(theta) = sum_a c_a e_a + eps^2/2 delta' H_mu delta + O(eps |e| + |e|^2 + eps^3),

    and relu(z) - mu z >= min(mu, 1 - mu) |z| >= 0 for mu in [0, 1]. So (i) the first-order change is
    eps sum_a c_a (relu(t_a) - mu_a t_a), > 0 whenever t_a != 0 at a strictly complementary kink (c_a > 0 and
    0 < mu_a < 1); (ii) on T = {t_a = 0 at those kinks} their e_a are O(eps^2) and add a non-negative amount, so the
    change is >= eps^2/2 delta' H_mu delta + o(eps^2). The first-order motions are those of the piece with slopes mu
    (the critical cone of the other kinks, one-sided, has relu(t) = mu t), and on T they do not depend on the later
    kinks' pieces. This is the classical second-order sufficient condition (Nocedal & Wright 2006, Thm 12.6) of the
    smooth reformulation above, whose Lagrangian Hessian on its critical cone is H_mu. Test: with every c_a >= 0
    (none below -g_tol), the smallest eigenvalue of H_mu (degenerate kinks lifted by free shifts u, as above: a
    superset of their cone) on T minus the symmetry-orbit tangent (`critical_subspace_spectrum`, dense, up to
    `CRITICAL_DENSE_MAX` variables); kinks with mu_a within `SLOPE_RTOL` of 0 or 1 are not constrained (a superset
    again, so the test stays sufficient). No eigenvalue below -hess_tol: "certified" (a positive minimum: a strict
    local minimum modulo the symmetries; a zero one: second order to tolerance). A negative one is tried for a lower
    point along its eigenvector ("descent"), else "first-order only". Checked numerically (tests/
    test_certificates_kink_critical.py): f rises at first order off T by exactly the multipliers' model, and only
    at second order on T.

    Not certified by the tests above: points with degenerate kinks (c_a = 0) whose lifted form is indefinite. At the
    binary DNC optimum (THEORY.md §4.2, a global optimum by Sukenik et al. 2023) every kink is degenerate (the
    outgoing weights of a class's neurons reach only its own path), so T is the whole space and the test is the
    lifted one. There the second-order change is q(delta) = Q(delta, u) with u_a = max(J_a delta + sum_b K_ab u_b, 0):
    the activation shifts u_b of layer l open the kinks of layer l + 1 (K != 0), so q is piecewise quadratic on up
    to 2^m pieces. The sign relaxations (u_a = max(J_a delta, 0), or u >= 0 free) are not copositive there: on the
    64-parameter binary case of the tests a direction has Q = -1.4e-3 |delta|^2 in the relaxation but a true second
    difference of +0.37 |delta|^2. The exact test is copositivity on a polyhedral fan (co-NP-hard in general); the
    nested fan below is a polynomial sufficient test that certifies DNC. A
    dead neuron (incoming row and outgoing column 0, its kinks degenerate) also makes the lifted form indefinite
    (u_b times its outgoing weight); it is tested apart by `dead_neurons` (a separate second-order block, certified
    when a bound of its bilinear term is below sqrt(lam lam')). ``degenerate_at`` names the degenerate kinks.

    **The nested fan** (every kink degenerate, the tests above inconclusive): `kink_fan_bound` keeps the nesting and
    the complementarity u_a (u_a - t_a) = 0, and bounds q from below by a semidefinite program with the products
    u_a (u_b - t_b) >= 0 of every pair of kinks (polynomial: m^2 multipliers). It certifies the binary DNC optimum
    (tau = -3e-9 against hess_tol = 1.5e-6 on the 64-parameter case with 36 kinks; with the 12 kinks of the pruned
    widths, 24 parameters, it runs by default). Cost (Clarabel, 2 loaded cores): 0.4-4 s at 36 parameters + kinks,
    9-27 s at 52-63, 25 s at 100, so `certify` runs it by default only up to `FAN_AUTO_MAX_VARS` parameters + kinks,
    and never above `FAN_MAX_VARS`: the README quickstart (12,600 kinks) stays "first-order only".

    Attributes:
      kinks: entries at the kink; ``strong``, ``degenerate``, ``negative``: how many have g_a > g_tol,
        |g_a| <= g_tol, g_a < -g_tol, with g_tol = ``mult_rtol`` times the largest |dF/dh| over all ReLU
        activations (``g_scale``); ``lifted``: the degenerate kinks lifted by a shift variable.
      min_multiplier: min_a g_a / g_scale (0 when g_scale = 0).
      strict: the strictly complementary kinks (g_a > g_tol, min(mu_a, 1 - mu_a) >= `SLOPE_RTOL`).
      critical_dim, critical_min: the dimension of the critical subspace T (symmetries removed) and the smallest
        eigenvalue of H_mu on it, when that test ran (None otherwise).
      degenerate_at: (l, i, j) of the degenerate kinks (Z_l[i, j], l = 2..L), at most 20.
      dead: (l, j, bound, sqrt(lam lam')) per dead neuron (row j of Z_l: `dead_neurons`), when the critical test
        ran; a bound >= the limit leaves the point uncertified (critical_min is then -inf).
      fan_min, fan_dim, fan_pairs: when every kink is degenerate and the tests above are inconclusive, the verified
        bound tau of `kink_fan_bound` (second order on the nested kink fan: q >= tau |x|^2), the size of its form
        and the cross products used (None when it did not run: see `certify`'s ``kink_fan``; no wall time here, so
        that sweep records stay a function of their configuration).
    """

    kinks: int
    strong: int
    degenerate: int
    negative: int
    lifted: int
    min_multiplier: float
    g_scale: float
    strict: int = 0
    critical_dim: int | None = None
    critical_min: float | None = None
    degenerate_at: tuple = ()
    dead: tuple = ()
    fan_min: float | None = None
    fan_dim: int | None = None
    fan_pairs: int | None = None


SECOND_ORDER = ("certified", "first-order only", "negative curvature", "descent", "not checked: budget", "not checked")


class Certificate(NamedTuple):
    """`Stationarity`, and (unless skipped) `HessianSpectrum` and the `Descent` test along its bottom eigenvector,
    of the objective at one point. ``dtype`` is the dtype of the point as given.

    ``second_order`` is one of ``SECOND_ORDER``: "certified" (no Hessian eigenvalue below -hess_tol after removing
    the symmetry directions, Lanczos converged, and at ReLU kinks no negative multiplier and no such eigenvalue of
    the piece's (lifted) Hessian on the whole space or on the critical subspace of the strictly complementary
    kinks: `KinkTest`),
    "first-order only" (at kinks the test is inconclusive: a negative multiplier, or negative curvature of the
    relaxed or lifted form, with no decrease found), "negative curvature" (a smooth point with an eigenvalue below
    -hess_tol: not a local minimum, a theorem), "descent" (an explicit lower point was found: `descent`),
    "not checked: budget" (Lanczos ran out of iterations or time without a conclusion), "not checked" (second
    order not computed). ``hess_tol`` is the absolute eigenvalue tolerance used; ``kink`` the `KinkTest`."""

    stationarity: Stationarity
    hessian: HessianSpectrum | None
    descent: Descent | None
    dtype: str
    second_order: str = "not checked"
    hess_tol: float | None = None
    kink: KinkTest | None = None

    def to_dict(self) -> dict:
        kink = None if self.kink is None else self.kink._asdict()
        return {
            "stationarity": self.stationarity._asdict(),
            "hessian": None
            if self.hessian is None
            else {**self.hessian._asdict(), "smallest": list(self.hessian.smallest)},
            "descent": None if self.descent is None else self.descent._asdict(),
            "dtype": self.dtype,
            "second_order": self.second_order,
            "hess_tol": self.hess_tol,
            "kink": kink,
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


def _hvp_inner(problem, params, masks, slopes, smask, v):
    g, n = _lifted_grad_fn(problem, params, masks, slopes, smask)
    x = jnp.concatenate([ravel_pytree(params)[0], jnp.zeros(v.shape[0] - n, v.dtype)])
    return jax.jvp(g, (x,), (v,))[1]


_hvp_many = jax.jit(jax.vmap(_hvp_inner, in_axes=(None, None, None, None, None, 0)))


def _flat(params: Params) -> np.ndarray:
    return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree_util.tree_leaves(params)])


def _work_params(params: Params) -> Params:
    """The point in the working precision: float64 when x64 is enabled, else its own dtype."""
    params = Params(*params)
    dt = jnp.float64 if jax.config.jax_enable_x64 else jnp.asarray(params.H).dtype  # type: ignore[attr-defined]  # set on jax's Config at runtime; its stub omits it
    return jax.tree_util.tree_map(lambda x: jnp.asarray(x, dt), params)


# ---------------------------------------------------------------------------------------------------------------
# first order


def _forward_slopes(problem: UFM, params: Params, masks, slopes, shifts=None):
    """The output with ReLU slope ``slopes[l]`` at the masked (kink) entries of Z_{l+2} and the usual 0/1 slope
    elsewhere; the values are exactly those of `forward` (only the derivative changes). ``shifts`` (one array per
    ReLU layer, or None) is added to the activations H_{l+2}: the derivative in it is dF/dH_{l+2}."""
    h = params.H
    shifts = shifts if shifts is not None else (None,) * len(masks)
    for W, m, c, e in zip(params.Ws[:-1], masks, slopes, shifts, strict=True):
        z = W @ h
        zs = jax.lax.stop_gradient(z)
        d = jnp.where(m, c, (zs > 0).astype(z.dtype))
        h = jax.nn.relu(zs) + (z - zs) * d
        if e is not None:
            h = h + e
    out = params.Ws[-1] @ h
    return out if params.b is None else out + params.b[:, None]


@jax.jit
def _slope_fit_grads(problem, params, masks, slopes):
    """Fit gradients (flattened) for a batch of slope settings (leading axis on every slope array)."""

    def one(sl):
        fit = lambda p: fit_loss(problem, _forward_slopes(problem, p, masks, sl))
        return ravel_pytree(jax.grad(fit)(params))[0]

    return jax.vmap(one)(slopes)


@partial(jax.jit, static_argnames=("num_steps",))
def _slope_search_chunk(problem, P, masks, gr, state, tol, *, num_steps: int):
    """``num_steps`` iterations (at most) of projected accelerated gradient (FISTA with adaptive restart) on
    phi(c) = ||g_fit(c) + g_reg||^2 / 2 over the kink slopes c in [0, 1] (one array per ReLU layer, used at the
    ``masks`` entries), compiled as one ``lax.while_loop``; it stops early once sqrt(2 phi) <= ``tol``.

    ``state`` = (x, y, t, step, best, c_best, plain): the iterate, the extrapolated point, the momentum parameter,
    the step size, the best phi seen and its slopes, and whether y came from a step without momentum; returns the
    new state and the number of iterations done. The gradient of phi is the vector-Jacobian
    product J(c)^T (g_fit(c) + g_reg), J = d g_fit / d c (reverse over reverse: one call costs a few gradients).
    Restarts (O'Donoghue & Candes 2015): when phi(y) rises above the best value seen, the momentum is dropped, the
    iteration restarts from the best point and the step is halved (g is multi-affine in the slopes, so for L >= 3
    the step from the initial Lipschitz estimate may be too long); when the gradient opposes the last move, the
    momentum is dropped."""
    jm = masks

    def g_of(c):
        fit = lambda p: fit_loss(problem, _forward_slopes(problem, p, jm, c))
        return ravel_pytree(jax.grad(fit)(P))[0]

    def proj(c):
        return tuple(jnp.where(m, jnp.clip(x, 0.0, 1.0), 0.0) for m, x in zip(jm, c, strict=True))

    def cond(s):
        return (s[7] < num_steps) & (jnp.sqrt(2 * s[4]) > tol)

    def body(s):
        x, y, t, step, best, cb, plain, k = s
        g, vjp = jax.vjp(g_of, y)
        r = g + gr
        phi = 0.5 * jnp.vdot(r, r)
        (dphi,) = vjp(r)
        worse = phi > best
        # worse after a plain projected-gradient step: the step is too long for the local curvature; halve it
        step = jnp.where(worse & plain, 0.5 * step, step)
        pick = lambda a, b: jax.tree_util.tree_map(lambda u, v: jnp.where(worse, u, v), a, b)  # noqa: E731
        nb = jnp.where(worse, best, phi)
        ncb = pick(cb, y)
        if_worse_grad = jax.tree_util.tree_map(jnp.zeros_like, dphi)
        base, d = pick(cb, y), pick(if_worse_grad, dphi)  # worse: go back to the best point (then a plain step)
        xn = proj(tuple(a - step * b for a, b in zip(base, d, strict=True)))
        # gradient restart: the step opposes the momentum
        opp = sum(jnp.vdot(b, a - c) for b, a, c in zip(dphi, xn, x, strict=True)) > 0
        reset = worse | opp
        t = jnp.where(reset, 1.0, t)
        tn = (1 + jnp.sqrt(1 + 4 * t * t)) / 2
        beta = jnp.where(reset, 0.0, (t - 1) / tn)
        yn = proj(tuple(a + beta * (a - c) for a, c in zip(xn, x, strict=True)))
        return xn, yn, tn, step, nb, ncb, beta == 0, k + 1

    k0 = jnp.zeros((), jnp.int32)
    out = jax.lax.while_loop(cond, body, state + (k0,))
    return out[:7], out[7]


@jax.jit
def _slope_lipschitz(problem, P, masks, c0, u0):
    """An estimate of ||J||^2 (J = d g_fit / d c at ``c0``, restricted to the kink entries): 30 power iterations on
    J^T J from ``u0``, times 1.1 (the Lipschitz constant of grad phi when g is affine in c, i.e. one ReLU layer)."""

    def g_of(c):
        fit = lambda p: fit_loss(problem, _forward_slopes(problem, p, masks, c))
        return ravel_pytree(jax.grad(fit)(P))[0]

    def mask(c):
        return tuple(jnp.where(m, x, 0.0) for m, x in zip(masks, c, strict=True))

    _, vjp = jax.vjp(g_of, c0)

    def body(_, u):
        nu = jnp.sqrt(sum(jnp.vdot(a, a) for a in u))
        u = tuple(a / jnp.where(nu > 0, nu, 1.0) for a in u)
        (w,) = vjp(jax.jvp(g_of, (c0,), (u,))[1])
        return mask(w)

    w = jax.lax.fori_loop(0, 30, body, mask(u0))
    return 1.1 * jnp.sqrt(sum(jnp.vdot(a, a) for a in w))


def _kink_preacts(problem, P, masks):
    """The masked pre-activations m * Z_l (l = 2..L) through the piece with slope 0 at the kinks (their derivative
    is the Jacobian J of the constraints z_A = 0, each kink's row blind to the kinks before it)."""
    h, out = P.H, []
    for W, m in zip(P.Ws[:-1], masks, strict=True):
        z = W @ h
        out.append(jnp.where(m, z, 0.0))
        zs = jax.lax.stop_gradient(z)
        h = jax.nn.relu(zs) + (z - zs) * jnp.where(m, 0.0, (zs > 0).astype(z.dtype))
    return tuple(out)


@jax.jit
def multiplier_slopes(problem, P, masks, gr, max_iter):
    """Kink slopes from least-squares multipliers: the warm start of the kink search (`min_slope_gradient`).

    With slopes s at the kink entries A the Clarke gradient splits as (`ufm._kinks` module docstring)

        grad f_s = grad f_0 + sum_a s_a g_a(s) grad z_a = grad f_0 + J^T lambda,   lambda_a = s_a g_a(s),

    where f_0 has slope 0 at the kinks, J = d z_A / d theta through that piece and g_a(s) = dF_s/dh_a depends only
    on the slopes of later layers. The multipliers minimising ||grad f_0 + J^T lambda|| (CGLS, Hestenes-Stiefel on
    the normal equations J J^T lambda = -J grad f_0; one Jacobian-vector and one vector-Jacobian product of z_A
    per iteration, at most ``max_iter``) give the slopes s_a = lambda_a / g_a(s), solved from the last ReLU layer
    to the first and clipped to [0, 1] (0 where |g_a| <= 1e-30 max|g|: a degenerate kink). At a point the kink polish
    (`ufm._kinks`) accepted these are (up to the clipping) its own slopes, found without its multipliers.

    Args:
      problem: a ReLU `UFM` with L >= 2; P: the point (`Params`, working precision).
      masks: boolean masks of the kink entries of Z_2..Z_L (d_{l+1} x N); gr: the flat penalty gradient (n,).
      max_iter: the CGLS iteration cap (a traced integer: no recompiles).

    Returns:
      The slopes, one array per ReLU layer (0 off the masks)."""
    dt = P.H.dtype
    zero = tuple(jnp.zeros(m.shape, dt) for m in masks)
    fit0 = lambda p: fit_loss(problem, _forward_slopes(problem, p, masks, zero))
    b = -(ravel_pytree(jax.grad(fit0)(P))[0] + gr)
    flat, unravel = ravel_pytree(P)
    cons = lambda x: _kink_preacts(problem, unravel(x), masks)
    _, jv = jax.linearize(cons, flat)
    jt = jax.linear_transpose(jv, flat)
    dot = lambda a, c: sum(jnp.vdot(u, v) for u, v in zip(a, c, strict=True))

    def AT(lam):  # J^T lambda
        return jt(lam)[0]

    r = b
    s_ = jv(r)
    gamma = dot(s_, s_)
    tol = (1e-15 * jnp.linalg.norm(b)) ** 2

    def cond(c):
        return (c[5] < max_iter) & (c[4] > tol)

    def body(c):
        lam, r, p, _, gamma, k = c
        q = AT(p)
        qq = jnp.vdot(q, q)
        alpha = jnp.where(qq > 0, gamma / jnp.where(qq > 0, qq, 1.0), 0.0)
        lam = tuple(a + alpha * u for a, u in zip(lam, p, strict=True))
        r = r - alpha * q
        s = jv(r)
        gn = dot(s, s)
        beta = jnp.where(gamma > 0, gn / jnp.where(gamma > 0, gamma, 1.0), 0.0)
        p = tuple(u + beta * v for u, v in zip(s, p, strict=True))
        return lam, r, p, s, jnp.where(qq > 0, gn, 0.0), k + 1

    lam = jax.lax.while_loop(cond, body, (zero, r, s_, s_, gamma, jnp.int32(0)))[0]
    slopes = list(zero)
    for i in reversed(range(len(masks))):
        g = jax.grad(lambda e, sl=tuple(slopes): fit_loss(problem, _forward_slopes(problem, P, masks, sl, e)))(zero)[i]
        ok = jnp.abs(g) > 1e-30 * jnp.max(jnp.abs(g))
        s = jnp.where(ok, lam[i] / jnp.where(ok, g, 1.0), 0.0)
        slopes[i] = jnp.where(masks[i], jnp.clip(s, 0.0, 1.0), 0.0)
    return tuple(slopes)


def min_slope_gradient(
    problem, P, masks, gr, tol: float = 0.0, max_steps: int = 4000, deadline: float = math.inf, start=None
):
    """Minimise ||g_fit(c) + g_reg|| over the kink slopes c in [0, 1] (the kink-aware stationarity of `Stationarity`).

    Every gradient entry is a product of the ReLU-derivative diagonals of the layers between the parameter and
    the output, each at most once, so g(c) is affine in the slopes of any one layer, and for one ReLU layer (L = 2)
    phi(c) = ||g(c) + g_reg||^2 / 2 is a convex quadratic on a box. It is minimised by projected accelerated
    gradient with restarts (`_slope_search_chunk`, compiled: one ``lax.while_loop``, chunks of 250 iterations
    between which the ``deadline`` (``time.perf_counter()``) is checked), from ``start`` (default c = 0, JAX's
    convention), with the step 1/Lip from a power-iteration estimate of ||J||^2 and halved on any increase. It stops
    at ||g|| <= ``tol``, after ``max_steps`` iterations, at the deadline, or when 250 iterations improve phi by less
    than 1e-4 relative (while it still improves faster it runs on: on the issue-13 point below 1,000 iterations
    stopped at 4.4e-4 relative, 5,000 reach 8.8e-5). For L >= 3 (phi not convex) and when stopped early the result
    is an upper bound of the minimum, never above phi(start).

    Args:
      problem: the `UFM`; P: the point (`Params`, working precision).
      masks: boolean masks of the kink entries of Z_2..Z_L (`kink_masks`), shapes (d_l, N).
      gr: the flat penalty gradient (n,); tol: the target norm.
      max_steps, deadline: the iteration and wall-clock (``time.perf_counter()``) budgets.
      start: the initial slopes (arrays of the masks' shapes, clipped to [0, 1]; e.g. `multiplier_slopes`), or
        None for 0.

    Returns:
      (gf, c): the flat fit gradient (n,) at the slopes found and the slopes (arrays of the masks' shapes, 0 off
      the masks)."""
    dt = jnp.asarray(P.H).dtype
    jm = tuple(jnp.asarray(m) for m in masks)
    jgr = jnp.asarray(gr, dt)
    c0 = tuple(
        jnp.zeros(m.shape, dt) if start is None else jnp.where(m, jnp.clip(jnp.asarray(x, dt), 0, 1), 0)
        for m, x in zip(jm, start if start is not None else jm, strict=True)
    )
    rng = np.random.default_rng(0)
    u0 = tuple(jnp.asarray(rng.random(m.shape), dt) for m in masks)
    lip = float(_slope_lipschitz(problem, P, jm, c0, u0))
    step = 1.0 / lip if lip > 0 and math.isfinite(lip) else 1.0
    inf = jnp.asarray(np.inf, dt)
    state = (c0, c0, jnp.asarray(1.0, dt), jnp.asarray(step, dt), inf, c0, jnp.asarray(True))
    done, prev = 0, math.inf
    while done < max_steps:
        state, k = _slope_search_chunk(problem, P, jm, jgr, state, jnp.asarray(tol, dt), num_steps=250)
        done += int(k)
        best = float(state[4])
        if int(k) < 250 or time.perf_counter() > deadline or best > prev * (1 - 1e-4):
            break
        prev = best
    c = tuple(np.asarray(x, np.float64) for x in state[5])
    gf = np.asarray(_slope_fit_grads(problem, P, jm, tuple(jnp.asarray(x[None], dt) for x in c)), np.float64)[0]
    return gf, c


def kink_search(problem, P, masks, gr, tol: float, deadline: float = math.inf):
    """The kink-aware stationarity search of `stationarity`: `min_slope_gradient` warm-started from the least-squares
    multipliers' slopes (`multiplier_slopes`), then, unless that reached ``tol``, from c = 0; the better of the two.

    The cold start alone can stop far above the minimum for L >= 3 (phi is not convex): on the issue-13 point
    (K=3, L=4, widths 6, lambda=0.004, n=1, seed 1) it stopped at rel 4.4e-4 while the kink polish's slopes give
    7.9e-9; the warm start reaches 6.8e-9 there. Returns (gf, c) as `min_slope_gradient`."""
    dt = jnp.asarray(P.H).dtype
    jm = tuple(jnp.asarray(m) for m in masks)
    jgr = jnp.asarray(gr, dt)
    m = int(sum(int(x.sum()) for x in masks))
    warm = multiplier_slopes(problem, P, jm, jgr, jnp.int32(min(m, 500)))
    gf, c = min_slope_gradient(problem, P, masks, gr, tol, deadline=deadline, start=warm)
    best = float(np.linalg.norm(gf + gr))
    if best > tol and time.perf_counter() < deadline:
        gf0, c0 = min_slope_gradient(problem, P, masks, gr, tol, deadline=deadline)
        if float(np.linalg.norm(gf0 + gr)) < best:
            gf, c = gf0, c0
    return gf, c


def kink_masks(problem: UFM, params: Params, kink_rtol: float | None = None) -> tuple[np.ndarray, ...]:
    """Boolean masks of the pre-activation entries of Z_2..Z_L at the ReLU kink: ``|Z_l[i, j]| <= kink_rtol *
    max|Z_l|`` (default kink_rtol: 1e-6 for float64 points, 1e-3 for float32). Empty for linear models."""
    if problem.activation != "relu" or problem.L < 2:
        return ()
    kink_rtol = kink_rtol_of(params, kink_rtol)
    Zs = [np.abs(np.asarray(z, np.float64)) for z in forward(problem, _work_params(params)).Z]
    return tuple(z <= kink_rtol * z.max() if z.max() > 0 else np.ones(z.shape, bool) for z in Zs)


def stationarity(
    problem: UFM,
    params: Params,
    *,
    kink_rtol: float | None = None,
    tol: float = 0.0,
    rel_tol: float = 0.0,
    max_time: float = 60.0,
) -> Stationarity:
    """Value, fit/penalty split and gradient norms at ``params``, kink-aware for ReLU models (see `Stationarity`).

    At kinks the slopes c in [0, 1] are chosen by a compiled projected accelerated gradient (`kink_search`: warm from
    least-squares multipliers, then cold from 0, the better kept); for L >= 3 this is a local search, so
    ``stationarity`` is an upper bound on the minimal norm. The search is skipped when JAX's gradient is already
    stationary (``grad_norm <= tol`` or its relative measure ``<= rel_tol``), and stops after ``max_time`` seconds
    (an upper bound again)."""
    return _stationarity(problem, params, kink_rtol, tol, rel_tol, max_time)[0]


def _stationarity(problem, params, kink_rtol=None, tol=0.0, rel_tol=0.0, max_time=60.0):
    """`stationarity`, the kink masks and the slopes at them (zeros when the search was skipped)."""
    check_params(problem, params)
    P = _work_params(params)
    vf, vr, gf, gr = _grads(problem, P)
    gf, gr = np.asarray(gf, np.float64), np.asarray(gr, np.float64)
    g = float(np.linalg.norm(gf + gr))
    masks = kink_masks(problem, params, kink_rtol)
    kinks = int(sum(m.sum() for m in masks))
    slopes = [np.zeros(m.shape) for m in masks]
    stat, gfs = g, gf
    scale = float(np.linalg.norm(gf) + np.linalg.norm(gr))
    if kinks and g > tol and g > rel_tol * scale:
        gfs, c = kink_search(problem, P, masks, gr, max(tol, 0.5 * rel_tol * scale), time.perf_counter() + max_time)
        stat = min(g, float(np.linalg.norm(gfs + gr)))
        if stat == g:
            gfs = gf
        else:
            slopes = c
    nf, nr = np.linalg.norm(gfs), np.linalg.norm(gr)
    rel = float(stat / (nf + nr)) if nf + nr > 0 else 0.0
    vf, vr = float(vf), float(vr)
    slopes = tuple(np.asarray(s).reshape(m.shape) for s, m in zip(slopes, masks, strict=True))
    return Stationarity(vf + vr, vf, vr, g, float(nf), float(nr), rel, kinks, stat), masks, slopes


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


def _dense_hessian(problem, params, n, masks=(), slopes=(), smask=(), chunk=128) -> np.ndarray:
    eye = np.eye(n)
    out = np.empty((n, n))
    dt = jnp.asarray(params.H).dtype
    for s in range(0, n, chunk):
        block = eye[s : s + chunk]
        pad = chunk - block.shape[0]
        if pad:  # one compiled shape for every chunk
            block = np.concatenate([block, np.zeros((pad, n))])
        hv = np.asarray(_hvp_many(problem, params, masks, slopes, smask, jnp.asarray(block, dt)), np.float64)
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
      krylov_dim: Lanczos steps per compiled cycle, each restarted from the bottom Ritz vector (default 60: on the
        README quickstart one cycle of 60 converges in 0.8 s where one of 150 took 2.3 s, the reorthogonalisation
        being quadratic in the steps).

    At a ReLU kink the Hessian is that of JAX's convention (slope 0 and curvature 0 at 0): the Hessian of one
    smooth piece, so a negative eigenvalue there is only a hint; `certify` checks it with an explicit `Descent`.
    """
    return _hessian(problem, params, **options)[0]


def _piece_objective(problem, params, masks, slopes, shifts=None):
    """The smooth piece of the objective with ReLU slope ``slopes[l]`` at the masked (kink) entries (curvature 0
    there); with all slopes 0 it is JAX's own convention (``jax.nn.relu`` has derivative 0 at 0). ``shifts``: added
    to the activations (the lifted kink variables of `KinkTest`)."""
    if not masks:
        return objective(problem, params)
    return fit_loss(problem, _forward_slopes(problem, params, masks, slopes, shifts)) + regulariser(problem, params)


def _lifted_grad_fn(problem, P, masks, slopes, smask):
    """x -> grad of the piece at x = (flat theta, flat activation shifts at the ``smask`` entries; none if smask is
    empty), and the size of theta."""
    flat, unravel = ravel_pytree(P)
    n = flat.shape[0]
    shapes = [m.shape for m in smask]
    sizes = np.cumsum([0] + [int(np.prod(s)) for s in shapes])

    def f(x):
        e = None
        if smask:
            e = tuple(
                jnp.where(m, x[n + a : n + b].reshape(s), 0.0)
                for m, s, a, b in zip(smask, shapes, sizes[:-1], sizes[1:], strict=True)
            )
        return _piece_objective(problem, unravel(x[:n]), masks, slopes, e)

    return jax.grad(f), n


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
        out = (
            _tangent(problem, P, solve(_tangent_adjoint(problem, P, dmats)))
            if pairs
            else [jnp.zeros_like(x) for x in dmats]
        )
        b = None if p.b is None else (jnp.full_like(p.b, jnp.mean(p.b)) if shift else jnp.zeros_like(p.b))
        return ravel_pytree(Params(out[0], tuple(out[1:]), b))[0]

    dim = None
    if len(pairs) <= 1:  # a traced count inside jit; an int outside
        dim = sum(jnp.sum(jnp.triu(k, 1)) for _, _, k in eig) + int(shift)
    return apply, dim


@partial(jax.jit, static_argnames=("num_steps", "project", "cg_steps"))
def _lanczos_cycle(
    problem, P, masks, slopes, smask, v0, sym_rtol, *, num_steps: int, project: bool, cg_steps: int = 50
):
    """One compiled cycle of ``num_steps`` Lanczos steps on the Hessian of the smooth piece (``slopes`` at the
    kinks; lifted by activation shifts at the ``smask`` entries), restricted to the complement of the symmetry
    tangent when ``project`` (and to the ``smask`` entries of the shifts)."""
    grad, n = _lifted_grad_fn(problem, P, masks, slopes, smask)
    x0 = jnp.concatenate([ravel_pytree(P)[0], jnp.zeros(v0.shape[0] - n, v0.dtype)])
    hvp = lambda v: jax.jvp(grad, (x0,), (v,))[1]
    keep = jnp.concatenate([jnp.ones(n, bool)] + [m.ravel() for m in smask])
    proj = _sym_projector(problem, P, sym_rtol, cg_steps)[0] if project else (lambda v: jnp.zeros_like(v))
    perp = lambda v: jnp.where(keep, jnp.concatenate([v[:n] - proj(v[:n]), v[n:]]), 0.0)
    return lanczos(lambda v: perp(hvp(perp(v))), v0, num_steps, restrict=perp)


def _hessian(
    problem,
    params,
    *,
    k: int = 6,
    method: str = "auto",
    project_symmetries: bool = True,
    sym_rtol: float = 1e-6,
    dense_max: int = 1500,
    max_tangent: int = 50_000_000,
    tol: float = 1e-8,
    maxiter: int | None = None,
    krylov_dim: int = 60,
    max_time: float = 60.0,
    masks=(),
    slopes=(),
    smask=(),
) -> tuple[HessianSpectrum, np.ndarray | None]:
    """`hessian_spectrum` and the unit eigenvector of its smallest eigenvalue (in the flat parameter space, and the
    flat activation shifts after it when lifted). ``masks``/``slopes``: the smooth piece (see
    `_piece_objective`); default JAX's convention. ``smask``: lift by activation shifts at these entries."""
    check_params(problem, params)
    if method not in ("auto", "dense", "lanczos"):
        raise ValueError(f"method must be 'auto', 'dense' or 'lanczos'; got {method!r}")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer; got {k!r}")
    for name, v in (("tol", tol), ("max_time", max_time), ("sym_rtol", sym_rtol)):
        if isinstance(v, bool) or not isinstance(v, (int, float, np.floating)) or not v > 0:
            raise ValueError(f"{name} must be a number > 0; got {v!r}")
    for name, iv in (("maxiter", maxiter), ("krylov_dim", krylov_dim)):
        if iv is not None and (isinstance(iv, bool) or not isinstance(iv, (int, np.integer)) or iv < 1):
            raise ValueError(f"{name} must be a positive integer; got {iv!r}")
    t_start = time.perf_counter()
    P = _work_params(params)
    dt = jnp.asarray(P.H).dtype
    masks = tuple(jnp.asarray(m) for m in masks)
    slopes = tuple(jnp.asarray(s, dt) for s in slopes) if slopes else tuple(jnp.zeros(m.shape, dt) for m in masks)
    smask = tuple(jnp.asarray(m) for m in smask) if any(np.any(m) for m in smask) else ()
    n = int(sum(np.size(x) for x in jax.tree_util.tree_leaves(P)))
    n_e = int(sum(m.size for m in smask))
    lifted = np.concatenate([np.ones(n, bool)] + [np.asarray(m).ravel() for m in smask])
    if method == "auto":
        method = "dense" if n + int(lifted[n:].sum()) <= dense_max else "lanczos"

    op = _PieceOperator(problem, P, n, n_e, lifted, masks, slopes, smask)
    if method == "dense":
        return _dense_spectrum(op, k, project_symmetries, sym_rtol, max_tangent, t_start)
    return _lanczos_spectrum(op, k, project_symmetries, sym_rtol, tol, maxiter, krylov_dim, max_time, t_start)


class _PieceOperator(NamedTuple):
    """The Hessian `_hessian` decomposes: that of the smooth piece (``masks``, ``slopes``) at the parameters ``P``
    (``n`` entries), lifted by ``n_e`` activation shifts at ``smask`` (``lifted``: the kept coordinates)."""

    problem: Any
    P: Params
    n: int
    n_e: int
    lifted: np.ndarray
    masks: tuple
    slopes: tuple
    smask: tuple


def _dense_spectrum(op: _PieceOperator, k, project_symmetries, sym_rtol, max_tangent, t_start):
    """`_hessian`, dense: C^T Hess C with C an orthonormal basis of the complement of the symmetry tangent (and the
    lifted shifts appended, not rotated); exact, from n (+ lifted) Hessian-vector products."""
    problem, P, n, n_e, lifted, masks, slopes, smask = op
    Q = None
    if project_symmetries and num_symmetry_generators(problem) * n <= max_tangent:
        Q = _orthonormal_rows(symmetry_tangents(problem, P), sym_rtol)
    r = 0 if Q is None else Q.shape[0]
    Hd = _dense_hessian(problem, P, n + n_e, masks, slopes, smask)[np.ix_(lifted, lifted)]
    largest = float(np.linalg.eigvalsh(Hd)[-1])
    C = scipy.linalg.null_space(Q) if r else np.eye(n)  # n x (n - r), orthonormal
    C = scipy.linalg.block_diag(C, np.eye(Hd.shape[0] - n))  # the shifts are not rotated
    ev, U = np.linalg.eigh(C.T @ Hd @ C)
    vec = None
    if ev.size:
        vec = np.zeros(n + n_e)
        vec[lifted] = C @ U[:, 0]
    return HessianSpectrum(
        tuple(float(x) for x in ev[:k]),
        largest,
        None if Q is None else r,
        n,
        "dense",
        True,
        "converged",
        n,
        time.perf_counter() - t_start,
    ), vec


def _lanczos_spectrum(op: _PieceOperator, k, project_symmetries, sym_rtol, tol, maxiter, krylov_dim, max_time, t_start):
    """`_hessian` by the compiled Lanczos (`_lanczos_cycle`) on the projected operator P Hess P."""
    problem, P, n, n_e, lifted, masks, slopes, smask = op
    dt = jnp.asarray(P.H).dtype
    # Lanczos: cycles of m compiled steps, explicitly restarted from the bottom Ritz vector, until the bottom k
    # Ritz pairs have residual <= tol * max|theta| or the budget (maxiter steps in all, max_time seconds) is spent.
    project = bool(project_symmetries)
    sym = _sym_projector(problem, P, sym_rtol)[1] if project else None
    sym = None if sym is None else int(sym)
    r = sym or 0
    m = int(min(krylov_dim, max(n - r + int(lifted[n:].sum()), 2)))
    maxiter = 20 * m if maxiter is None else int(maxiter)
    v0 = jnp.asarray(np.random.default_rng(0).standard_normal(n + n_e), dt)
    steps_done, status = 0, "budget"
    theta, res, vec = np.zeros(0), np.zeros(0), None
    while True:
        alpha, beta, V, steps = _lanczos_cycle(
            problem, P, masks, slopes, smask, v0, sym_rtol, num_steps=m, project=project
        )
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
    return HessianSpectrum(
        tuple(float(x) for x in theta[:k]),
        float(theta[-1]) if theta.size else float("nan"),
        sym,
        n,
        "lanczos",
        status == "converged",
        status,
        steps_done,
        time.perf_counter() - t_start,
    ), vec


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


@jax.jit
def _activation_grads(problem, P, masks, slopes):
    """dF/dH_{l+2} for every ReLU layer (the fit's derivative in the activations, slopes c at the kinks)."""
    shifts = tuple(jnp.zeros(m.shape, P.H.dtype) for m in masks)
    fit = lambda e: fit_loss(problem, _forward_slopes(problem, P, masks, slopes, e))
    return jax.grad(fit)(shifts)


@partial(jax.jit, static_argnames=("layer",))
def _preactivation_grad(problem, P, masks, slopes, layer: int, i, j):
    """d z_{layer}[i, j] / d theta (flat), the pre-activation of ReLU layer ``layer`` (0-based), slopes c above."""

    def z(p):
        h = p.H
        for li, (W, m, c) in enumerate(zip(p.Ws[:-1], masks, slopes, strict=True)):
            zz = W @ h
            if li == layer:
                return zz[i, j]
            zs = jax.lax.stop_gradient(zz)
            h = jax.nn.relu(zs) + (zz - zs) * jnp.where(m, c, (zs > 0).astype(zz.dtype))
        raise AssertionError("layer out of range")

    return ravel_pytree(jax.grad(z)(P))[0]


def rounding_floor(problem: UFM, params: Params, samples: int = 2) -> float:
    """The relative gradient (`Stationarity.grad_norm_rel`) that rounding the point to its own dtype causes:
    ||Hess delta|| / (||grad F|| + ||grad R||) with delta_i = (eps/2) |theta_i| xi_i, xi_i = +-1 at random (the
    rounding error of each entry is at most eps/2 |theta_i|), averaged over ``samples`` draws, plus 10 eps for
    the rounding of the gradient's own evaluation in that dtype. A relative stationarity tolerance below this is
    out of the dtype's reach even at the exact optimum: the point cannot be resolved (float32 at small lambda,
    where ||grad R|| ~ lambda ||theta|| is tiny next to the fit's curvature times eps ||theta||)."""
    check_params(problem, params)
    eps = float(np.finfo(np.asarray(Params(*params).H).dtype).eps)
    P = _work_params(params)
    _, _, gf, gr = _grads(problem, P)
    den = float(np.linalg.norm(np.asarray(gf)) + np.linalg.norm(np.asarray(gr)))
    flat = _flat(P)
    xi = np.random.default_rng(0).choice([-1.0, 1.0], size=(samples, flat.size))
    D = jnp.asarray(0.5 * eps * np.abs(flat) * xi, jnp.asarray(P.H).dtype)
    HD = np.asarray(_hvp_many(problem, P, (), (), (), D), np.float64)
    num = float(np.mean(np.linalg.norm(HD, axis=1)))
    return (num / den if den > 0 else 0.0) + 10 * eps


def _default_rtol(params) -> float:
    return 1e-6 if np.asarray(Params(*params).H).dtype == np.float64 else 1e-4


def _kink_test(problem, params, P, st, masks, slopes, kink_rtol, mult_rtol):
    """The multipliers g_a = dF/dh_a at the kink entries (`KinkTest`), and the degenerate kinks to lift: those with
    |g_a| <= mult_rtol * max|dF/dh| whose pre-activation moves at first order (||W_l[i, :]||^2 + ||H_l[:, j]||^2 > 0).

    Returns:
      (`KinkTest`, G the list of dF/dH_{l+2} arrays (d_l, N), smask the lifted-entry masks or (), the masks of the
      strictly complementary kinks: g_a > g_tol and min(c_a, 1 - c_a) >= `SLOPE_RTOL`)."""
    dt = jnp.asarray(P.H).dtype
    jm = tuple(jnp.asarray(m) for m in masks)
    js = tuple(jnp.asarray(s, dt) for s in slopes)
    G = [np.asarray(g, np.float64) for g in _activation_grads(problem, P, jm, js)]
    g_scale = max(float(np.max(np.abs(g))) for g in G)
    g_tol = mult_rtol * g_scale
    gk = np.concatenate([g[m] for g, m in zip(G, masks, strict=True)])
    neg, deg = int(np.sum(gk < -g_tol)), int(np.sum(np.abs(gk) <= g_tol))
    # degenerate kinks whose pre-activation moves at first order: ||W_l[i, :]||^2 + ||H_l[:, j]||^2 > 0
    fw = forward(problem, P)
    moving = []
    for li, (g, m) in enumerate(zip(G, masks, strict=True)):
        W = np.asarray(P.Ws[li], np.float64)
        Hl = np.asarray(fw.H[li], np.float64)
        s2 = (W**2).sum(1)[:, None] + (Hl**2).sum(0)[None, :]
        ref = max(float(s2.max()), np.finfo(np.float64).tiny)
        moving.append(m & (np.abs(g) <= g_tol) & (s2 > (kink_rtol_of(params, kink_rtol)) ** 2 * ref))
    lifted = int(sum(x.sum() for x in moving))
    smask = tuple(moving) if lifted else ()
    strict = [
        m & (g > g_tol) & (np.minimum(sl, 1 - sl) >= SLOPE_RTOL)
        for g, m, sl in zip(G, masks, [np.asarray(x, np.float64) for x in slopes], strict=True)
    ]
    at = tuple(
        (li + 2, int(i), int(j))
        for li, (g, m) in enumerate(zip(G, masks, strict=True))
        for i, j in zip(*np.nonzero(m & (np.abs(g) <= g_tol)), strict=True)
    )
    kt = KinkTest(
        st.kinks,
        int(gk.size - neg - deg),
        deg,
        neg,
        lifted,
        float(gk.min() / g_scale) if g_scale > 0 else 0.0,
        g_scale,
        int(sum(x.sum() for x in strict)),
        degenerate_at=at[:20],
    )
    return kt, G, smask, tuple(strict)


DEAD_SUBSETS_MAX_N = 10  # dead-neuron test: activation patterns enumerated up to this many samples
CRITICAL_DENSE_MAX = 3000  # the critical-subspace test (dense Hessian and kink Jacobian) up to this many variables
SLOPE_RTOL = 1e-3  # a kink slope mu_a is interior (strict complementarity) when min(mu_a, 1 - mu_a) >= this


@partial(jax.jit, static_argnames=("n",))
def _lifted_preact_jacobian(problem, P, masks, slopes, smask, *, n: int):
    """d (Z_2, ..., Z_L) / d x, flattened rows (layer-major, then ravel order), at x = (flat theta, activation shifts
    at the ``smask`` entries, as in `_lifted_grad_fn`), through the piece with slopes ``slopes`` at the kinks."""
    flat, unravel = ravel_pytree(P)
    shapes = [m.shape for m in smask]
    sizes = np.cumsum([0] + [int(np.prod(sh)) for sh in shapes])

    def zs_of(x):
        p = unravel(x[:n])
        e = [None] * len(masks)
        if smask:
            e = [
                jnp.where(m, x[n + a : n + b].reshape(sh), 0.0)
                for m, sh, a, b in zip(smask, shapes, sizes[:-1], sizes[1:], strict=True)
            ]
        h, out = p.H, []
        for W, m, c, ee in zip(p.Ws[:-1], masks, slopes, e, strict=True):
            z = W @ h
            out.append(z.ravel())
            zst = jax.lax.stop_gradient(z)
            h = jax.nn.relu(zst) + (z - zst) * jnp.where(m, c, (zst > 0).astype(z.dtype))
            if ee is not None:
                h = h + ee
        return jnp.concatenate(out)

    x = jnp.concatenate([flat, jnp.zeros(int(sizes[-1]), flat.dtype)])
    return jax.jacrev(zs_of)(x)


def critical_subspace_spectrum(
    problem, params, masks, slopes, strict, smask=(), k: int = 3, sym_rtol: float = 1e-6, fixed=None
):
    """The smallest eigenvalues of the Hessian of the piece f_mu (slopes ``slopes`` at the kinks, degenerate kinks
    lifted by activation shifts at ``smask``) restricted to the critical subspace

        T = {(delta, u) : dz_a = grad z_a . (delta, u) = 0 for every strictly complementary kink a (``strict``)}

    minus the symmetry-orbit tangent (dense: for small problems; see `KinkTest` for the derivation).

    Args:
      problem: a ReLU `UFM`, L >= 2; params: the point.
      masks, slopes: the kink entries of Z_2..Z_L and the Clarke slopes mu at them (`stationarity`).
      strict: boolean masks (same shapes) of the strictly complementary kinks (multiplier c_a > 0 and
        min(mu_a, 1 - mu_a) >= `SLOPE_RTOL`); smask: the lifted degenerate kinks (or ()).
      k: how many eigenvalues; sym_rtol: as in `hessian_spectrum`.
      fixed: a boolean mask over the flat parameters held at 0 (the dead neurons' weights, tested apart by
        `dead_neurons`), or None.

    Returns:
      (eigenvalues ascending (up to k), the unit eigenvector of the smallest in (theta, shifts) coordinates of
      `_lifted_grad_fn` (full shift arrays, zeros off ``smask``), dim T minus the symmetry directions)."""
    P = _work_params(params)
    dt = jnp.asarray(P.H).dtype
    jm = tuple(jnp.asarray(m) for m in masks)
    js = tuple(jnp.asarray(x, dt) for x in slopes)
    jsm = tuple(jnp.asarray(m) for m in smask) if smask and any(np.any(m) for m in smask) else ()
    n = int(_flat(P).size)
    n_e = int(sum(m.size for m in jsm))
    lifted = np.concatenate([np.ones(n, bool)] + [np.asarray(m).ravel() for m in jsm])
    Hd = _dense_hessian(problem, P, n + n_e, jm, js, jsm)[np.ix_(lifted, lifted)]
    J = np.asarray(_lifted_preact_jacobian(problem, P, jm, js, jsm, n=n), np.float64)
    rows = np.concatenate([np.asarray(m).ravel() for m in strict])
    J = J[rows][:, lifted]
    Q = symmetry_tangents(problem, P)
    Q = np.concatenate([Q, np.zeros((Q.shape[0], J.shape[1] - n))], axis=1) if Q.size else np.zeros((0, J.shape[1]))
    A = np.concatenate([J, _orthonormal_rows(Q, sym_rtol) if Q.shape[0] else Q])
    if fixed is not None and np.any(fixed):
        E = np.zeros((int(fixed.sum()), J.shape[1]))
        E[np.arange(E.shape[0]), np.flatnonzero(fixed)] = 1.0
        A = np.concatenate([A, E])
    C = scipy.linalg.null_space(A, rcond=1e-10) if A.shape[0] else np.eye(J.shape[1])
    if C.shape[1] == 0:
        return (), None, 0
    ev, U = np.linalg.eigh(C.T @ Hd @ C)
    vec = np.zeros(n + n_e)
    vec[lifted] = C @ U[:, 0]
    return tuple(float(x) for x in ev[:k]), vec, int(C.shape[1])


def dead_neurons(problem, params, masks, slopes, G, g_tol: float, rtol: float = 1e-6):
    """Dead ReLU neurons and their exact second-order test.

    Neuron j of H_{l+1} (l = li + 1, pre-activation row Z_{l+1}[j] = v^T H_l with v = W_l[j, :]) is dead when its
    N pre-activations are kinks with degenerate multipliers (|dF/dh| <= g_tol) and both v and its outgoing column
    w = W_{l+1}[:, j] are 0 (norms <= ``rtol`` times their matrices'). Moving (v, w) by (eps v', eps w') changes the
    fit by eps^2 sum_s (g_s . w') relu(v' . h_s) + o(eps^2), g_s = dF/d(W_{l+1} H_{l+1})[:, s] (the next
    pre-activation's adjoint, Clarke slopes downstream) and h_s = H_l[:, s]; every other parameter meets (v, w) at
    third order (the activation is 0 and both weights are 0), so with the penalty the second-order change is the
    separate block q(v', w') = sum_s (g_s . w') relu(v' . h_s) + lam_l/2 |v'|^2 + lam_{l+1}/2 |w'|^2. Minimising over
    the direction of w' and then the two norms gives q >= 0 for all (v', w') iff |G(u)| <= sqrt(lam_l lam_{l+1}) for
    all unit u, G(u) = sum_s g_s relu(u . h_s); by Cauchy-Schwarz |G(u)| <= sigma_max([g_s]) sigma_max(H_l), and
    on the cone of an activation pattern S, G(u) = (sum_{s in S} g_s h_s^T) u, so |G(u)| <= max_S ||.||_2 too (the
    2^N patterns enumerated for N <= `DEAD_SUBSETS_MAX_N`). The smaller of the two, ``bound``, below
    sqrt(lam_l lam_{l+1}) makes the block positive definite (a sufficient test; the lifted shift
    variable, free in sign, cannot see this: u w' with u free is indefinite).

    Returns:
      (list of (li, j, bound, sqrt(lam_l lam_{l+1})), boolean mask over the flat parameters of their v and w)."""
    P = _work_params(params)
    L = len(P.Ws)
    fw = forward(problem, P)
    lam = np.broadcast_to(np.asarray(problem.lam_W, np.float64), (L,))
    gout = np.asarray(jax.grad(lambda o: fit_loss(problem, o))(fw.out), np.float64)
    sizes = [int(np.size(x)) for x in jax.tree_util.tree_leaves(P)]
    offs = np.cumsum([0] + sizes)  # H, W_1..W_L, (b)
    fixed = np.zeros(int(offs[-1]), bool)
    out = []
    for li, (m, g) in enumerate(zip(masks, G, strict=True)):
        W, Wn = np.asarray(P.Ws[li], np.float64), np.asarray(P.Ws[li + 1], np.float64)
        if li + 1 < L - 1:  # the next pre-activation's adjoint: dF/dH_{l+2} times its slopes
            z = np.asarray(fw.Z[li + 1], np.float64)
            d = np.where(masks[li + 1], np.asarray(slopes[li + 1], np.float64), (z > 0).astype(float))
            gn = np.asarray(G[li + 1], np.float64) * d
        else:
            gn = gout
        Hin = np.asarray(fw.H[li], np.float64)
        for j in range(m.shape[0]):
            v, w = W[j], Wn[:, j]
            if not (m[j].all() and np.all(np.abs(np.asarray(g)[j]) <= g_tol)):
                continue
            if np.linalg.norm(v) > rtol * np.linalg.norm(W) or np.linalg.norm(w) > rtol * np.linalg.norm(Wn):
                continue
            bound = float(np.linalg.norm(gn, 2) * np.linalg.norm(Hin, 2))
            if Hin.shape[1] <= DEAD_SUBSETS_MAX_N:  # G(u) = M_S u on the cone of pattern S: |G(u)| <= max_S ||M_S||
                pats = np.array(list(itertools.product((False, True), repeat=Hin.shape[1])))
                bound = min(bound, max(float(np.linalg.norm(gn[:, S] @ Hin[:, S].T, 2)) for S in pats))
            out.append((li, j, bound, float(np.sqrt(lam[li] * lam[li + 1]))))
            fixed[offs[li + 1] + j * W.shape[1] + np.arange(W.shape[1])] = True
            fixed[offs[li + 2] + np.arange(Wn.shape[0]) * Wn.shape[1] + j] = True
    return out, fixed


def _other_side_descent(problem, params, masks, slopes, smask, n, hess_tol, opts) -> Descent | None:
    """The lifted form is not positive: one more spectrum on the piece with slope 1 at the degenerate kinks, and the
    `descent_test` along its bottom eigenvector when it is below -hess_tol (else None)."""
    s1 = tuple(np.where(sm, 1.0, s) for sm, s in zip(smask, slopes, strict=True))
    h1, v1 = _hessian(problem, params, masks=masks, slopes=s1, **opts)
    if v1 is not None and h1.smallest and h1.smallest[0] < -hess_tol:
        return descent_test(problem, params, v1[:n])
    return None


def _critical_test(problem, params, kt: KinkTest, G, masks, slopes, strict, smask, mult_rtol):
    """The sign-relaxed test failed: restrict to the critical subspace of the strictly complementary kinks
    (`critical_subspace_spectrum`), with the dead neurons tested apart (`dead_neurons`: their kinks not lifted,
    their weights held at 0 in the subspace test). Returns (``kt`` with critical_dim/critical_min/dead set when the
    test ran; critical_min is -inf when a dead neuron's bound fails), the bottom eigenvector or None)."""
    dead, fixed = dead_neurons(problem, params, masks, slopes, G, mult_rtol * kt.g_scale)
    if not (kt.strict or dead):
        return kt, None
    sm = smask
    if dead and smask:
        sm = tuple(np.asarray(x).copy() for x in smask)
        for li, j, _, _ in dead:
            sm[li][j, :] = False
    ev, cvec, dim = critical_subspace_spectrum(problem, params, masks, slopes, strict, sm, fixed=fixed)
    dead_ok = all(b < r for _, _, b, r in dead)
    kt = kt._replace(
        critical_dim=dim,
        critical_min=(ev[0] if ev else math.inf) if dead_ok else -math.inf,
        dead=tuple((li + 2, j, b, r) for li, j, b, r in dead),
    )
    return kt, cvec


FAN_AUTO_MAX_VARS = 40  # `certify(kink_fan=None)` runs the fan relaxation up to this many parameters + kinks
# (Clarabel's cost per iteration grows like (n + m)^6: its PSD block has (n + m)^2 / 2 entries; measured on 2 loaded
# cores: 0.4-4 s at n + m = 36, 9-27 s at 52-63, 25 s at 100, each ~26 interior-point iterations)
FAN_MAX_VARS = 400  # and at most this many variables (parameters + kinks), even when asked for
# Clarabel's tolerances: the bound is verified by eigvalsh afterwards, but tight ones move it from -1e-5 to -2e-8 at
# the stalled point of the tests (a local minimum with flat directions: tau* = 0), far inside hess_tol = 1.2e-6
FAN_SOLVER_SETTINGS = dict(max_iter=100, tol_gap_abs=1e-11, tol_gap_rel=1e-11, tol_feas=1e-11, tol_ktratio=1e-9)


class FanBound(NamedTuple):
    """The doubly-nonnegative relaxation of second order on the nested kink fan (`kink_fan_bound`).

    Attributes:
      bound: tau such that Q(delta, u) >= tau (|delta|^2 + |u|^2) on the fan, verified: the smallest eigenvalue
        of Q minus the multipliers' terms, computed here by a dense ``eigvalsh`` (the conic solver only proposes
        the multipliers; its own status does not enter).
      dim: variables of the form (symmetry complement of theta, plus one shift per kink).
      kinks: m, the kinks (all degenerate).
      pairs: the products u_a v_b >= 0 used (a != b).
      seconds: wall time.
      status: the conic solver's status.
    """

    bound: float
    dim: int
    kinks: int
    pairs: int
    seconds: float
    status: str


def _fan_form(problem, params, masks, sym_rtol):
    """Q (the lifted Hessian of the piece with slope 0 at every kink, on the symmetry complement of theta plus one
    shift per kink) and T (t~ = T x: the first-order motion of each kink's pre-activation, J delta + K u)."""
    P = _work_params(params)
    dt = jnp.asarray(P.H).dtype
    jm = tuple(jnp.asarray(m) for m in masks)
    zeros = tuple(jnp.zeros(m.shape, dt) for m in masks)
    n = int(_flat(P).size)
    ne = sum(int(m.size) for m in masks)
    kin = np.concatenate([np.ravel(m) for m in masks])
    lift = np.concatenate([np.ones(n, bool), kin])
    Hd = _dense_hessian(problem, P, n + ne, jm, zeros, jm)[np.ix_(lift, lift)]
    Jz = np.asarray(_lifted_preact_jacobian(problem, P, jm, zeros, jm, n=n), np.float64)[kin][:, lift]
    S = _orthonormal_rows(symmetry_tangents(problem, P), sym_rtol)
    C = scipy.linalg.null_space(S) if S.shape[0] else np.eye(n)
    m = int(kin.sum())
    E = scipy.linalg.block_diag(C, np.eye(m))
    return E.T @ Hd @ E, Jz @ E, C.shape[1], m


def kink_fan_bound(problem: UFM, params: Params, masks, *, sym_rtol: float = 1e-6, max_time: float = 60.0):
    """A lower bound of the second-order change of f on the nested kink fan, where every kink is degenerate.

    With every multiplier c_a = dF/dh_a = 0 (`KinkTest`: e.g. the binary DNC optimum), every smooth piece is
    stationary and, writing the kink activations as free shifts u (the piece with slope 0 at the kinks),

        f(theta + eps delta) - f(theta) = eps^2/2 Q(delta, u) + o(eps^2),   u_a = max(t_a, 0),
        t_a = J_a delta + sum_b K_ab u_b     (K: a shift of layer l moves the kinks of layer l + 1; nesting).

    Put v = u - t >= 0. On the fan u >= 0, v >= 0, u_a v_a = 0, so for any real nu and any N >= 0 (entrywise)

        Q(x) >= Q(x) - sum_a nu_a u_a v_a - sum_{a != b} N_ab u_a v_b,       x = (delta, u),

    and the right side is a quadratic form in x (v is linear in x). If it is >= tau |x|^2 for some multipliers,
    q(delta) >= tau (|delta|^2 + |u|^2) on the fan. The multipliers that maximise tau solve a semidefinite program
    (a doubly-nonnegative / RLT relaxation of copositivity on the fan: polynomial, with m + m(m-1) multipliers and
    one PSD block of size dim); it is solved by cvxpy/Clarabel (optional: the ``certify`` extra), and the bound is
    then recomputed here from the multipliers (clipped to N >= 0) by a dense eigenvalue solve. At the binary DNC
    optimum the sign relaxations fail (`KinkTest`) and so does this one without the cross products (nu alone:
    -lam; products of kinks of one sample or of one sample class: -2.2e-3 on the 64-parameter case of the tests),
    while all pairs give tau = -3e-9 (rounding level against lambda_max = 1.5: the flat directions of DNC): the
    certificate needs u_a v_b across the two classes (one class's samples opening the other class's neurons while
    the other's close them, as a rotation mixing the two paths does).

    Args:
      problem, params: the point (every kink degenerate; not checked here).
      masks: `kink_masks` at the point.
      sym_rtol: as in `hessian_spectrum`.
      max_time: the conic solver's time limit (seconds).

    Returns:
      A `FanBound`, or None when cvxpy (with Clarabel) is not installed.
    """
    t0 = time.perf_counter()
    Q, T, ny, m = _fan_form(problem, params, masks, sym_rtol)
    out = fan_relaxation(Q, T, ny, max_time=max_time)
    if out is None:  # pragma: no cover - cvxpy is in the certify and test extras
        return None
    bound, pairs, status = out
    return FanBound(bound, ny + m, m, pairs, time.perf_counter() - t0, status)


def fan_relaxation(Q: np.ndarray, T: np.ndarray, ny: int, *, max_time: float = 60.0):
    """The largest tau with Q - sum_a nu_a sym(u_a v_a) - sum_{a != b} N_ab sym(u_a v_b) >= tau I (N >= 0), x = (y, u),
    u = x[ny:], v = u - T x (`kink_fan_bound`), solved by cvxpy/Clarabel and then verified by ``eigvalsh``.

    Args:
      Q: (ny + m, ny + m) symmetric: the quadratic form in x.
      T: (m, ny + m): t = T x, the kinks' first-order motions (their nesting in the u columns).
      ny: the number of free variables before the m kink shifts.
      max_time: the solver's time limit (seconds).

    Returns:
      (tau, the number of pairs a != b, the solver's status), tau the smallest eigenvalue of the certificate's form
      with the solver's multipliers (N clipped to >= 0); -inf when the solver fails. None without cvxpy.
    """
    try:
        import cvxpy as cp
        import scipy.sparse as sp
    except ImportError:  # pragma: no cover - cvxpy is in the certify and test extras
        return None
    m = T.shape[0]
    nx = ny + m
    V = -T
    V[:, ny:] += np.eye(m)
    pairs = [(a, a) for a in range(m)] + [(a, b) for a in range(m) for b in range(m) if a != b]
    rows, cols, vals = [], [], []
    for k, (a, b) in enumerate(pairs):  # sym(e_{ny+a} V_b^T), flattened: row ny+a and column ny+a get V_b / 2
        nz = np.flatnonzero(V[b])
        rows += [(ny + a) * nx + nz, nz * nx + ny + a]
        cols += [np.full(2 * nz.size, k)]
        vals += [V[b, nz] / 2, V[b, nz] / 2]
    A = sp.csc_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(nx * nx, len(pairs)))
    w, tau = cp.Variable(len(pairs)), cp.Variable()
    M = cp.reshape(Q.ravel() - tau * np.eye(nx).ravel() - A @ w, (nx, nx), order="C")
    prob = cp.Problem(cp.Maximize(tau), [w[m:] >= 0, (M + M.T) / 2 >> 0])
    try:
        with warnings.catch_warnings():  # "inaccurate" is common near tau = 0; the bound is verified below anyway
            warnings.simplefilter("ignore")
            prob.solve(solver=cp.CLARABEL, time_limit=max(max_time, 1.0), **FAN_SOLVER_SETTINGS)
    except cp.error.SolverError:
        return -math.inf, len(pairs) - m, "solver error"
    if w.value is None:
        return -math.inf, len(pairs) - m, str(prob.status)
    wv = np.asarray(w.value, np.float64).copy()
    wv[m:] = np.maximum(wv[m:], 0.0)
    R = Q - (A @ wv).reshape(nx, nx)
    bound = float(scipy.linalg.eigvalsh((R + R.T) / 2, subset_by_index=(0, 0))[0])
    return bound, len(pairs) - m, str(prob.status)


def _open_most_negative_kink(problem, params, G, masks, slopes) -> Descent | None:
    """`descent_test` along grad z_a of the kink with the most negative multiplier g_a (opening it lowers the fit at
    first order by |g_a| dz_a); None when that pre-activation does not move at first order."""
    P = _work_params(params)
    dt = jnp.asarray(P.H).dtype
    jm = tuple(jnp.asarray(m) for m in masks)
    js = tuple(jnp.asarray(s, dt) for s in slopes)
    li, idx = min(
        (
            (li, int(np.argmin(np.where(m, g, np.inf))))
            for li, (g, m) in enumerate(zip(G, masks, strict=True))
            if m.any()
        ),
        key=lambda t: G[t[0]].ravel()[t[1]],
    )
    i, j = np.unravel_index(idx, masks[li].shape)
    d = np.asarray(_preactivation_grad(problem, P, jm, js, li, int(i), int(j)), np.float64)
    return descent_test(problem, params, d) if np.linalg.norm(d) > 0 else None


def certify(
    problem: UFM,
    params: Params,
    *,
    hessian: bool | str = True,
    kink_rtol: float | None = None,
    grad_tol: float | None = None,
    rel_grad_tol: float = 0.0,
    hess_rtol: float | None = None,
    mult_rtol: float | None = None,
    descent_rtol: float = 1e-12,
    max_time: float = 60.0,
    other_side: bool = False,
    kink_fan: bool | None = None,
    **hessian_options,
) -> Certificate:
    """First- and second-order certificate at ``params``.

    First order: `stationarity` (kink-aware). The point is *stationary* when ``stationarity <= grad_tol`` if an
    absolute ``grad_tol`` is given, else when ``grad_norm_rel <= rel_grad_tol`` (the scale-aware measure
    ||grad f|| / (||grad F|| + ||grad R||), see `Stationarity`).

    Second order (``hessian=True``, or ``"if-stationary"``: only at stationary points, since curvature away from a
    critical point decides nothing; ``False`` skips it): the bottom of the Hessian spectrum with the symmetry
    directions removed (`hessian_spectrum`, options passed on; ``max_time`` seconds at most), an eigenvalue below
    ``hess_tol = hess_rtol * |lambda_max|`` (default hess_rtol 1e-6 for float64 points, 1e-4 for float32) counting
    as negative, the `descent_test` along its eigenvector (a decrease > ``descent_rtol * max(1, |f|)`` is explicit),
    and at ReLU kinks the `KinkTest` (multipliers' signs, the piece with the stationarity slopes lifted at the
    degenerate kinks; ``mult_rtol`` default 1e-6 / 1e-3; with ``other_side=True``, when the lifted form is not
    positive, one more Lanczos run on the piece with slope 1 at the degenerate kinks, looking for a lower point along
    its bottom eigenvector). When every kink is degenerate and that is inconclusive, ``kink_fan`` (None: only up to
    `FAN_AUTO_MAX_VARS` parameters + kinks; True: up to `FAN_MAX_VARS`; False: never) runs `kink_fan_bound` (needs
    cvxpy, the ``certify`` extra; skipped without it), a bound >= -hess_tol certifying. The outcome is
    ``Certificate.second_order``.

    Returns:
      A `Certificate`.
    """
    if hessian not in (True, False, "if-stationary"):
        raise ValueError(f"hessian must be True, False or 'if-stationary'; got {hessian!r}")
    for name, v in (
        ("grad_tol", grad_tol),
        ("rel_grad_tol", rel_grad_tol),
        ("hess_rtol", hess_rtol),
        ("mult_rtol", mult_rtol),
        ("descent_rtol", descent_rtol),
        ("max_time", max_time),
    ):
        if v is not None and (
            isinstance(v, bool) or not isinstance(v, (int, float, np.floating)) or not math.isfinite(v) or v < 0
        ):
            raise ValueError(f"{name} must be a finite number >= 0; got {v!r}")
    t0 = time.perf_counter()
    # a quarter of the budget for the kink search (an upper bound of the kink-aware gradient when cut short)
    st, masks, slopes = _stationarity(problem, params, kink_rtol, grad_tol or 0.0, rel_grad_tol, max_time / 4)
    stationary = st.stationarity <= grad_tol if grad_tol is not None else st.grad_norm_rel <= rel_grad_tol
    if hessian == "if-stationary":
        hessian = stationary
    dtype = str(jnp.asarray(Params(*params).H).dtype)
    if not hessian or not math.isfinite(st.value):
        return Certificate(st, None, None, dtype)
    hess_rtol = _default_rtol(params) if hess_rtol is None else hess_rtol
    mult_rtol = (1e-6 if dtype == "float64" else 1e-3) if mult_rtol is None else mult_rtol
    descent_tol = descent_rtol * max(1.0, abs(st.value))
    opts = dict(hessian_options)
    opts.setdefault("max_time", max(max_time - (time.perf_counter() - t0), 1e-3))
    P = _work_params(params)
    n = int(_flat(P).size)
    smask: tuple[Any, ...] = ()
    kt: KinkTest | None = None
    G: list | None = None
    if st.kinks:  # ReLU kinks: multipliers g_a = dF/dh_a at the kink entries
        kt, G, smask, strict = _kink_test(problem, params, P, st, masks, slopes, kink_rtol, mult_rtol)
    hs, vec = _hessian(problem, params, masks=masks, slopes=slopes, smask=smask, **opts)
    hess_tol = hess_rtol * abs(hs.largest) if math.isfinite(hs.largest) else 0.0
    lam = hs.smallest[0] if hs.smallest else math.inf
    desc = descent_test(problem, params, vec[:n]) if (vec is not None and lam < 0 and np.any(vec[:n])) else None
    found = desc is not None and desc.decrease > descent_tol
    if kt is None:
        if lam < -hess_tol:
            so = "descent" if found else "negative curvature"
        else:
            so = "certified" if hs.converged else "not checked: budget"
        return Certificate(st, hs, desc, dtype, so, hess_tol, None)
    if other_side and kt.lifted and lam < -hess_tol and not found and time.perf_counter() - t0 < max_time:
        opts["max_time"] = max(max_time - (time.perf_counter() - t0), 1e-3)
        d1 = _other_side_descent(problem, params, masks, slopes, smask, n, hess_tol, opts)
        if d1 is not None and d1.decrease > descent_tol:
            desc, found = d1, True
    if not kt.negative and not found and lam < -hess_tol and n + kt.lifted <= CRITICAL_DENSE_MAX:
        assert G is not None  # set with kt
        kt, cvec = _critical_test(problem, params, kt, G, masks, slopes, strict, smask, mult_rtol)
        lam = kt.critical_min if kt.critical_min is not None else lam
        if cvec is not None and lam < -hess_tol and np.any(cvec[:n]):
            dc = descent_test(problem, params, cvec[:n])
            if dc.decrease > descent_tol:
                desc, found = dc, True
    if _fan_wanted(kt, kink_fan, n, lam < -hess_tol and not found):
        fb = kink_fan_bound(problem, params, masks, max_time=max(max_time - (time.perf_counter() - t0), 1.0))
        if fb is not None:
            kt = kt._replace(fan_min=fb.bound, fan_dim=fb.dim, fan_pairs=fb.pairs)
            lam = fb.bound
    if kt.negative and not found:  # open the most negative kink: a first-order decrease g_a (1 - c_a) dz or g_a c_a dz
        assert G is not None  # set with kt
        dk = _open_most_negative_kink(problem, params, G, masks, slopes)
        if dk is not None and dk.decrease > descent_tol and (desc is None or dk.decrease > desc.decrease):
            desc, found = dk, True
    if found:
        so = "descent"
    elif kt.negative or lam < -hess_tol:
        so = "first-order only"
    else:  # the critical-subspace spectrum is dense (exact)
        so = (
            "certified"
            if hs.converged or kt.critical_dim is not None or kt.fan_min is not None
            else "not checked: budget"
        )
    return Certificate(st, hs, desc, dtype, so, hess_tol, kt)


def _fan_wanted(kt: KinkTest, kink_fan: bool | None, n: int, inconclusive: bool) -> bool:
    """Whether `certify` runs `kink_fan_bound`: the tests before it are inconclusive, every kink is degenerate, and
    the size is within the caps of ``kink_fan`` (None: `FAN_AUTO_MAX_VARS`; True: `FAN_MAX_VARS` parameters + kinks)."""
    if kink_fan is False or not inconclusive or kt.negative or kt.degenerate != kt.kinks:
        return False
    if n + kt.kinks > FAN_MAX_VARS:
        return False
    return kink_fan is True or n + kt.kinks <= FAN_AUTO_MAX_VARS


def kink_rtol_of(params, kink_rtol: float | None) -> float:
    """The kink threshold: ``kink_rtol``, or its default for the point's dtype (1e-6 float64, 1e-3 float32)."""
    if kink_rtol is not None:
        return float(kink_rtol)
    return 1e-6 if jnp.asarray(Params(*params).H).dtype == jnp.float64 else 1e-3
