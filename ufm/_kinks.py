"""Convergence at ReLU kinks: finish a stalled deep ReLU run on the smooth piece of its activation pattern.

A deep ReLU UFM is not differentiable where a pre-activation z_a = (W_l H_{l-1})_{ij} (l = 2..L) is 0, and its
minima often sit there (dead neurons, the DNC optimum's zero entries). L-BFGS then chatters across the kink and
stalls with a gradient (JAX's, slope 0 at 0) that never vanishes. The *kink polish* fixes the pattern and solves
the smooth problem on it:

1. **Active set.** A = {a : |z_a| <= kink_rtol * max|Z_l|} (`ufm._certificates.kink_masks`, the same rule as
   `ufm.certify`), tried for each threshold of `KINK_RTOLS` in turn.
2. **Smooth piece.** Hold the active pre-activations at 0: minimise

       f_A(theta) = F(out_A(theta)) + R(theta)   subject to   z_a(theta) = 0 for a in A,

   where out_A is the forward pass with the active activations set to 0 (the other entries keep their ReLU, and
   are away from 0). On the constraint set f_A = f exactly. The constraints are bilinear in (W_l, H_{l-1}), so
   there is no cheap projection or reduced parametrisation; an **augmented Lagrangian** handles them with only
   gradients (Nocedal & Wright 2006, Alg. 17.4): minimise

       Phi(theta; mu, rho) = f_A(theta) + sum_a mu_a z_a + rho/2 sum_a z_a^2

   by L-BFGS (`_lbfgs`, a lean Armijo line search), then mu <- mu + rho z, and rho <- 10 rho when ||z|| fell by less
   than 4x. The active set enters as 0/1 masks of the shapes of Z_2..Z_L, so the program compiles once per
   problem shape and dtype (`polish_piece`); new numbers and new active sets do not recompile.
3. **Kink-aware stationarity.** The Clarke (chain-rule) gradients at a point with z_A = 0 are
   grad f_s = grad F_s + grad R, F_s the fit with ReLU slope s_a in [0, 1] at the kinks. Every path from a
   parameter to the output meets the kink layers' slope diagonals in order, so
   grad f_s = grad f_A + sum_a s_a g_a(s) grad z_a, with g_a(s) = dF_s/dh_a (it depends only on the slopes of
   later layers) and grad z_a taken through the piece. The augmented Lagrangian's KKT condition is
   grad f_A + sum_a lambda_a grad z_a = 0 with lambda = mu + rho z, so the slopes s_a = lambda_a / g_a(s),
   solved layer by layer from the output (`kink_slopes`), clipped to [0, 1], give an element of the Clarke
   subdifferential whose norm is the polish's own measure. The point is accepted when

       rel_grad = min(||grad f_s||, stationarity) / (||grad F_s|| + ||grad R||)  <=  rtol

   (or ||.|| <= tol), with ``stationarity`` the minimal-norm search of `ufm._certificates.stationarity` (the
   measure `ufm.check` uses) and f(theta) not above the stalled point's value (`ACCEPT_RISE`).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np

from ._certificates import kink_masks, stationarity
from ._model import Params, fit_loss, objective, regulariser, tree_norm
from ._problem import UFM

__all__ = ["KINK_RTOLS", "Polish", "kink_slopes", "polish", "polish_piece", "slope_gradient"]

KINK_RTOLS = (1e-3, 1e-5)  # active-set thresholds |z_a| <= kink_rtol max|Z_l|, tried in turn (measured below)
MEMORY = 10  # L-BFGS pairs
ROUNDS = 3  # re-identifications of the active set per threshold (new kinks appear while polishing)
OUTER = 20  # augmented-Lagrangian updates of (mu, rho) per round
INNER = 500  # L-BFGS steps per augmented-Lagrangian subproblem
RHO0, RHO_MAX = 1.0, 1e8  # penalty: start, cap (a pre-activation is O(max|Z_l|) = O(1) at the minima we polish)
CERTIFY_WITHIN = 1e3  # the certificates' (slower, host-side) search runs only when rel_grad <= this x rtol
ACCEPT_RISE = 1e-8  # an accepted point may exceed the stalled value by this much relative (rounding of f)


class Polish(NamedTuple):
    """Result of one compiled polish (`polish_piece`).

    Attributes:
      params: the polished point theta.
      value: f(theta), the true objective (the ReLU forward pass).
      grad_norm: ||grad f_s(theta)|| at the slopes s of `kink_slopes` (a Clarke gradient's norm).
      rel_grad: grad_norm / (||grad F_s|| + ||grad R||).
      violation: ||z_A(theta)||_2, the constraint residual.
      steps: L-BFGS steps taken (all subproblems).
    """

    params: Params
    value: jax.Array
    grad_norm: jax.Array
    rel_grad: jax.Array
    violation: jax.Array
    steps: jax.Array


def _piece(problem: UFM, params: Params, masks, slopes=None, shifts=None):
    """(out, constraints): the forward pass with activation ``slopes * z`` at the masked entries (0 when
    ``slopes`` is None; the values equal the ReLU's where z = 0) plus ``shifts`` (for dF/dh), and the masked
    pre-activations ``m * Z_l`` (l = 2..L)."""
    h = params.H
    cons = []
    for i, (W, m) in enumerate(zip(params.Ws[:-1], masks, strict=True)):
        z = W @ h
        cons.append(m * z)
        h = jax.nn.relu(z) * (1 - m)
        if slopes is not None:
            h = h + m * slopes[i] * z
        if shifts is not None:
            h = h + shifts[i]
    out = params.Ws[-1] @ h
    if params.b is not None:
        out = out + params.b[:, None]
    return out, cons


def _fit(problem: UFM, params: Params, masks, slopes=None, shifts=None):
    return fit_loss(problem, _piece(problem, params, masks, slopes, shifts)[0])


def kink_slopes(problem: UFM, params: Params, masks, lam) -> tuple[jax.Array, ...]:
    """The ReLU slopes s_a with s_a g_a(s) = lambda_a at the masked entries, clipped to [0, 1] (module docstring).

    Args:
      problem: a ReLU `ufm.UFM` with L >= 2.
      params: the point (its masked pre-activations at 0).
      masks: L - 1 arrays of the shapes of Z_2..Z_L (d_{l+1} x N), 1 at the kink entries.
      lam: the constraint multipliers, same shapes.

    Returns:
      L - 1 arrays of slopes (0 off the masks). Layer l's g_a depends only on the slopes of layers after it, so
      one pass from the last ReLU layer to the first solves the system exactly; where |g_a| is below 1e-30 the
      slope is 0 (a degenerate kink, whose term g_a s_a grad z_a vanishes with g_a).
    """
    slopes = [jnp.zeros_like(m) for m in masks]
    zero = [jnp.zeros_like(m) for m in masks]
    for i in reversed(range(len(masks))):
        g = jax.grad(lambda e, s=tuple(slopes): _fit(problem, params, masks, s, e))(zero)[i]
        ok = jnp.abs(g) > 1e-30
        s = jnp.where(ok, lam[i] / jnp.where(ok, g, 1), 0)
        slopes[i] = masks[i] * jnp.clip(s, 0, 1)
    return tuple(slopes)


def slope_gradient(problem: UFM, params: Params, masks, slopes) -> tuple[jax.Array, jax.Array]:
    """(||grad f_s||, ||grad F_s|| + ||grad R||): the Clarke gradient of the ReLU slopes ``slopes`` at the masked
    entries, and the scale of the scale-aware rule (its ratio is rel_grad)."""
    gF = jax.grad(lambda p: _fit(problem, p, masks, slopes))(params)
    gR = jax.grad(lambda p: regulariser(problem, p))(params)
    g = jax.tree_util.tree_map(jnp.add, gF, gR)
    return tree_norm(g), tree_norm(gF) + tree_norm(gR)


class _LBFGSState(NamedTuple):
    x: jax.Array  # flat point
    f: jax.Array
    g: jax.Array
    S: jax.Array  # (MEMORY, n) steps s_i, a ring buffer
    Y: jax.Array  # (MEMORY, n) gradient changes y_i
    k: jax.Array  # steps taken
    stuck: jax.Array  # the line search found no decrease: stop


def _two_loop(st: _LBFGSState) -> jax.Array:
    """-H_k g by the L-BFGS two-loop recursion over the stored pairs (Nocedal & Wright 2006, Alg. 7.4); pairs with
    s.y <= 0 (unfilled slots included) are skipped; H_0 = (s.y / y.y) I of the newest pair, or I."""
    m = st.S.shape[0]
    sy = jnp.sum(st.S * st.Y, axis=1)
    ok = sy > 0
    rho = jnp.where(ok, 1 / jnp.where(ok, sy, 1), 0)
    order = (st.k - 1 - jnp.arange(m)) % m  # newest first

    def first(q_a, i):
        q, a = q_a
        j = order[i]
        ai = rho[j] * (st.S[j] @ q)
        return (q - ai * st.Y[j], a.at[j].set(ai)), None

    (q, a), _ = jax.lax.scan(first, (st.g, jnp.zeros(m, st.g.dtype)), jnp.arange(m))
    newest = order[0]
    yy = st.Y[newest] @ st.Y[newest]
    gamma = jnp.where(ok[newest] & (yy > 0), sy[newest] / jnp.where(yy > 0, yy, 1), 1)
    r = gamma * q

    def second(r, i):
        j = order[m - 1 - i]
        b = rho[j] * (st.Y[j] @ r)
        return r + st.S[j] * (a[j] - b), None

    r, _ = jax.lax.scan(second, r, jnp.arange(m))
    return -r


def _lbfgs(fn, x, gtol, steps: int):
    """Minimise ``fn`` (a function of `Params`) from ``x`` by L-BFGS until ||grad|| <= gtol, ``steps`` steps, or a
    failed line search; returns (x, steps taken).

    The line search halves the step from 1 until the approximate Armijo condition of Hager & Zhang (2005)
    f(x + t d) <= f(x) + 1e-4 t g.d + 4 eps |f(x)| holds (at most 40 halvings): the eps term lets the search pass
    where f no longer resolves the decrease, near the minimum, where the unit L-BFGS step is right. A small
    search compiles in a fraction of optax's zoom (measured: the polish compiled in ~25 s with zoom under load).
    """
    flat, unravel = jax.flatten_util.ravel_pytree(x)
    vg = jax.value_and_grad(lambda v: fn(unravel(v)))
    f_only = lambda v: fn(unravel(v))  # noqa: E731
    eps = jnp.finfo(flat.dtype).eps
    f0, g0 = vg(flat)
    zeros = jnp.zeros((MEMORY, flat.size), flat.dtype)
    st0 = _LBFGSState(flat, f0, g0, zeros, zeros, jnp.int32(0), jnp.bool_(False))

    def cond(st):
        return (st.k < steps) & (jnp.linalg.norm(st.g) > gtol) & ~st.stuck

    def body(st):
        d = _two_loop(st)
        slope = st.g @ d
        d = jnp.where(slope < 0, d, -st.g)  # not a descent direction: steepest descent
        slope = st.g @ d
        slack = 4 * eps * jnp.abs(st.f)

        def bad(c):
            t, j = c
            return (f_only(st.x + t * d) > st.f + 1e-4 * t * slope + slack) & (j < 40)

        t, j = jax.lax.while_loop(bad, lambda c: (c[0] / 2, c[1] + 1), (jnp.asarray(1.0, flat.dtype), 0))
        x = st.x + t * d
        f, g = vg(x)
        stuck = (j >= 40) | ~jnp.isfinite(f)
        i = st.k % MEMORY
        new = _LBFGSState(x, f, g, st.S.at[i].set(x - st.x), st.Y.at[i].set(g - st.g), st.k + 1, stuck)
        return jax.tree_util.tree_map(lambda a, b: jnp.where(stuck, a, b), st._replace(stuck=stuck), new)

    st = jax.lax.while_loop(cond, body, st0)
    return unravel(st.x), st.k


@functools.partial(jax.jit, static_argnames=("outer", "inner"))
def polish_piece(problem: UFM, params: Params, masks, rtol, *, outer: int = OUTER, inner: int = INNER) -> Polish:
    """One compiled polish on the piece of the masks (module docstring, steps 2-3).

    Args:
      problem: a ReLU `ufm.UFM` with L >= 2 (its array leaves in the dtype of ``params``).
      params: the start, e.g. a stalled run's point.
      masks: L - 1 arrays of the shapes of Z_2..Z_L (d_{l+1} x N), 1.0 at the pre-activations held at 0.
      rtol: the relative stationarity target; each subproblem is solved to ||grad Phi|| <= rtol/10 times the
        start's scale ||grad F|| + ||grad R||, and the loop stops once ||z_A|| is below the same number.
      outer, inner: augmented-Lagrangian updates and L-BFGS steps per subproblem (static).

    Returns:
      A `Polish`.
    """
    dt = params.H.dtype
    gR0 = jax.grad(lambda p: regulariser(problem, p))(params)
    gF0 = jax.grad(lambda p: _fit(problem, p, masks))(params)
    gtol = jnp.asarray(rtol, dt) / 10 * (tree_norm(gF0) + tree_norm(gR0))

    def phi(x, mu, rho):
        out, cons = _piece(problem, x, masks)
        pen = sum(jnp.sum(m * c + rho / 2 * c**2) for m, c in zip(mu, cons, strict=True))
        return fit_loss(problem, out) + regulariser(problem, x) + pen

    def cond(c):
        return (c[3] < outer) & ((c[4] > gtol) | (c[3] == 0))

    def body(c):
        x, mu, rho, j, viol_old, steps = c
        x, k = _lbfgs(functools.partial(phi, mu=mu, rho=rho), x, gtol, inner)
        cons = _piece(problem, x, masks)[1]
        viol = tree_norm(cons)
        mu = tuple(a + rho * z for a, z in zip(mu, cons, strict=True))
        rho = jnp.where(viol > viol_old / 4, jnp.minimum(rho * 10, RHO_MAX), rho)
        return x, mu, rho, j + 1, viol, steps + k

    mu0 = tuple(jnp.zeros_like(m) for m in masks)
    viol0 = tree_norm(_piece(problem, params, masks)[1])
    x, mu, _, _, viol, steps = jax.lax.while_loop(
        cond, body, (params, mu0, jnp.asarray(RHO0, dt), jnp.int32(0), viol0, jnp.int32(0))
    )
    slopes = kink_slopes(problem, x, masks, mu)  # mu was updated after the last subproblem: lambda = mu + rho z
    gn, scale = slope_gradient(problem, x, masks, slopes)
    rel = jnp.where(scale > 0, gn / jnp.where(scale > 0, scale, 1), 0)
    return Polish(x, objective(problem, x), gn, rel, viol, steps)


def polish(
    problem: UFM, params: Params, value: float, rtol: float, tol: float = 0.0, kink_rtols=KINK_RTOLS
) -> tuple[Polish | None, bool]:
    """Finish a stalled ReLU run at ``params`` (value ``value``) on the smooth piece of its kinks (module docstring).

    For each threshold in ``kink_rtols`` and up to `ROUNDS` re-identifications of the active set, run
    `polish_piece` and accept the first point with kink-aware rel_grad <= ``rtol`` (or norm <= ``tol``) whose value
    is at most ``value`` (1 + `ACCEPT_RISE`). The measure is the polish's own Clarke gradient (the multipliers'
    slopes), or, when that is within `CERTIFY_WITHIN` x ``rtol``, the smaller of it and
    `ufm._certificates.stationarity`'s search (5 s at most). A threshold is left when a round does not halve
    rel_grad.

    Returns:
      (best, accepted): the accepted `Polish` (its ``grad_norm``/``rel_grad`` the kink-aware measure) and True; or
      the polished point with the lowest rel_grad whose value is not above ``value`` (or None) and False.
    """
    best: Polish | None = None
    limit = value + ACCEPT_RISE * max(1.0, abs(value))
    for kink_rtol in kink_rtols:
        x, last = params, np.inf
        for _ in range(ROUNDS):
            masks = tuple(jnp.asarray(m, x.H.dtype) for m in kink_masks(problem, x, kink_rtol))
            if not any(bool(np.any(np.asarray(m))) for m in masks):
                break
            res = polish_piece(problem, x, masks, rtol)
            if not (np.isfinite(float(res.value)) and float(res.value) <= limit):
                break
            if float(res.rel_grad) <= CERTIFY_WITHIN * rtol:  # close: ask the certificates' slope search too
                res = _with_certificate(problem, res, rtol, tol)
            if float(res.rel_grad) <= rtol or float(res.grad_norm) <= tol:
                return res, True
            if best is None or float(res.rel_grad) < float(best.rel_grad):
                best = res
            if float(res.rel_grad) > last / 2:  # a re-identified active set did not help: next threshold
                break
            x, last = res.params, float(res.rel_grad)
    return best, False


def _with_certificate(problem: UFM, res: Polish, rtol: float, tol: float) -> Polish:
    """``res`` with the smaller of its measure and `ufm._certificates.stationarity`'s (the one `ufm.check` uses)."""
    st = stationarity(problem, res.params, tol=tol, rel_tol=rtol, max_time=5.0)
    if st.grad_norm_rel < float(res.rel_grad):
        dt = res.value.dtype
        return res._replace(grad_norm=jnp.asarray(st.stationarity, dt), rel_grad=jnp.asarray(st.grad_norm_rel, dt))
    return res
