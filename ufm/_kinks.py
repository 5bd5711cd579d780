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

   by L-BFGS (`optax.lbfgs`, zoom line search), then mu <- mu + rho z, and rho <- 10 rho when ||z|| fell by less
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
import jax.numpy as jnp
import numpy as np
import optax

from ._certificates import kink_masks, stationarity
from ._model import Params, fit_loss, objective, regulariser, tree_norm
from ._problem import UFM

__all__ = ["KINK_RTOLS", "Polish", "kink_slopes", "polish", "polish_piece", "slope_gradient"]

KINK_RTOLS = (1e-3, 1e-5)  # active-set thresholds |z_a| <= kink_rtol max|Z_l|, tried in turn (measured below)
ROUNDS = 3  # re-identifications of the active set per threshold (new kinks appear while polishing)
OUTER = 20  # augmented-Lagrangian updates of (mu, rho) per round
INNER = 500  # L-BFGS steps per augmented-Lagrangian subproblem
RHO0, RHO_MAX = 1.0, 1e8  # penalty: start, cap (a pre-activation is O(max|Z_l|) = O(1) at the minima we polish)
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


def _lbfgs(fn, x, gtol, steps: int):
    """Minimise ``fn`` from ``x`` by `optax.lbfgs` until ||grad|| <= gtol or ``steps`` steps; (x, steps taken)."""
    opt = optax.lbfgs()
    vg = optax.value_and_grad_from_state(fn)

    def cond(c):
        return (c[2] < steps) & (c[3] > gtol)

    def body(c):
        x, s, k, _ = c
        v, g = vg(x, state=s)
        u, s = opt.update(g, s, x, value=v, grad=g, value_fn=fn)
        return optax.apply_updates(x, u), s, k + 1, tree_norm(g)

    x, _, k, _ = jax.lax.while_loop(cond, body, (x, opt.init(x), jnp.int32(0), jnp.asarray(jnp.inf, gtol.dtype)))
    return x, k


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
    is at most ``value`` (1 + `ACCEPT_RISE`). The measure is the smaller of the polish's own Clarke gradient (the
    multipliers' slopes) and `ufm._certificates.stationarity`'s search.

    Returns:
      (best, accepted): the accepted `Polish` (its ``grad_norm``/``rel_grad`` the kink-aware measure) and True; or
      the polished point with the lowest rel_grad whose value is not above ``value`` (or None) and False.
    """
    best: Polish | None = None
    limit = value + ACCEPT_RISE * max(1.0, abs(value))
    for kink_rtol in kink_rtols:
        x = params
        for _ in range(ROUNDS):
            masks = tuple(jnp.asarray(m, x.H.dtype) for m in kink_masks(problem, x, kink_rtol))
            if not any(bool(np.any(np.asarray(m))) for m in masks):
                break
            res = polish_piece(problem, x, masks, rtol)
            if not (np.isfinite(float(res.value)) and float(res.value) <= limit):
                break
            res = _with_certificate(problem, res, rtol, tol)
            if float(res.rel_grad) <= rtol or float(res.grad_norm) <= tol:
                return res, True
            if best is None or float(res.rel_grad) < float(best.rel_grad):
                best = res
            x = res.params
    return best, False


def _with_certificate(problem: UFM, res: Polish, rtol: float, tol: float) -> Polish:
    """``res`` with the smaller of its measure and `ufm._certificates.stationarity`'s (the one `ufm.check` uses)."""
    st = stationarity(problem, res.params, tol=tol, rel_tol=rtol, max_time=10.0)
    if st.grad_norm_rel < float(res.rel_grad):
        dt = res.value.dtype
        return res._replace(grad_norm=jnp.asarray(st.stationarity, dt), rel_grad=jnp.asarray(st.grad_norm_rel, dt))
    return res
