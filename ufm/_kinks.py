"""Convergence at ReLU kinks: finish a stalled deep ReLU run on the smooth piece of its activation pattern.

A deep ReLU UFM is not differentiable where a pre-activation z_a = (W_l H_{l-1})_{ij} (l = 2..L) is 0, and its
minima often sit there (dead neurons, the DNC optimum's zero entries). L-BFGS then chatters across the kink and
stalls with a gradient (JAX's, slope 0 at 0) that never vanishes. The *kink polish* fixes the pattern and solves
the smooth problem on it:

1. **Active set.** A = {a : |z_a| <= kink_rtol * max|Z_l|} (`traced_kink_masks`, the rule of
   `ufm._certificates.kink_masks` and `ufm.certify`), tried for each threshold of `KINK_RTOLS` in turn.
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

       rel_grad = ||grad f_s|| / (||grad F_s|| + ||grad R||)  <=  rtol

   (or ||grad f_s|| <= tol) and f(theta) is not above the stalled point's value (`ACCEPT_RISE`).
4. **Rounds** (`polish_run`). A round that is not accepted starts the next from its point with the active set
   re-identified (new kinks appear while polishing). When a round does not halve rel_grad, the entries whose
   multiplier slopes lambda_a / g_a lie outside [-`SLOPE_SLACK`, 1 + `SLOPE_SLACK`] are *released* (dropped from
   the active set for the rest of this threshold): such a constraint pushes the point to one side of the kink, the
   classical active-set rule for a multiplier of the wrong sign. Measured on issue 13's seed 5 at lambda_H = 0.0041
   (K=3, L=4, widths 6): the 1e-3 active set held entries with slopes -7199, -1958, 99, 278, ...; re-identifying
   alone ended at rel_grad 3.6e-7 (round 3), releasing them gives 7e-9 one round later. Releasing *before*
   re-identification stalls (seed 3 at 0.004: the multipliers of a degenerate active set are not unique, and
   re-identification alone reaches 5.8e-9), hence the order. A threshold is left when the loss rose, its active
   set is empty, or a round neither halved rel_grad nor released an entry; at most `ROUNDS` rounds each.
5. **Host fallback** (`certify_close`, after the compiled program): a point that was not accepted but is within
   `CERTIFY_WITHIN` = 10 x rtol is measured again by the minimal-norm slope search of
   `ufm._certificates.stationarity` (the measure `ufm.check` uses), and accepted when that meets the tolerance.
   It compiles 5 more programs (4-13 s on a loaded 2-core CPU), so it is kept for points just above the tolerance
   (round 4 ran it up to 1e3 x rtol: on the latency benchmark's NumPy-lambdas run, a polish ending at rel_grad
   1.8e-5, it compiled and still did not accept). Issue 13's 16 kink runs are all accepted by the traced polish.

Steps 1-4 are one traced program (`polish_run`; every loop a ``lax.while_loop``, every decision a ``where``), so
the single solve compiles it once per problem shape and dtype (`polish_jit`) and a batch polishes its runs with
the same program (`ufm._solver.polish_batch`); a run whose polish fails (non-finite, loss rose) keeps its own point
and status.

**What the program holds (its compile is what a user waits for).** The augmented Lagrangian's outer updates, the
inner L-BFGS with its halving line search, the start's scale (gtol) and the L passes of the slope solve are ONE
``while_loop`` (`_al_piece`, phases of `_ALState`) that evaluates the piece's objective and its gradient at one
point per iteration: one copy of value-and-gradient in the program (round 4: five gradients, of Phi at the
subproblem's start and at the accepted step, a value-only copy in the line search, the fit at the start, L - 1 + 1
for the slopes and grad F_s, in three nested loops). Same points, steps and rel_grad as round 4 on issue 13's 16
runs (to the printed digits); the compiled polish of the latency problem (K=4, n=10, widths 32 x 3, float64) has
4,133 lines of optimised HLO and 210 fusions against 5,046 and 277, and 4 while loops against 6. The price is the
run time of a polish once compiled (every iteration carries the whole loop's state; the L-BFGS memory is updated
in place, the small fields selected by phase): 1.0-1.4x round 4's on the latency problem (8,500-9,445 steps,
5.6-6.5 s against 4.3-6.2 s at load 6), 2-3x on issue 13's tiny K=3 runs (4.6 s against 1.7 s for all 16).
`ufm._driver.make_optimizer("lbfgs")` as the subproblem solver was measured in round 4: it compiled 1.2-1.4x slower
for the same 16/16, so the polish keeps its own L-BFGS.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np

from ._certificates import stationarity
from ._model import Params, fit_loss, forward, objective, regulariser, tree_norm
from ._problem import UFM, is_concrete
from ._solution import CONVERGED, MAX_STEPS, PRECISION_FLOOR, STALLED, Solution

__all__ = [
    "KINK_RTOLS",
    "MAX_STEPS_FACTOR",
    "POLISH_MAX_STEPS",
    "Polish",
    "apply_polish",
    "certify_close",
    "kink_slopes",
    "needs_polish",
    "polish",
    "polish_jit",
    "polish_piece",
    "polish_run",
    "slope_gradient",
    "solve_cap",
    "step_cap",
    "traced_kink_masks",
]

KINK_RTOLS = (1e-3, 1e-5)  # active-set thresholds |z_a| <= kink_rtol max|Z_l|, tried in turn (measured below)
MEMORY = 10  # L-BFGS pairs
ROUNDS = 4  # rounds per threshold: re-identified active set, released entries (new kinks appear while polishing)
SLOPE_SLACK = 0.05  # a multiplier slope outside [-0.05, 1.05] releases its entry from the active set (measured below)
MAX_STEPS_BELOW = 1e-3  # max_steps runs are polished when their rel_grad is at most this (near a kink, not far off)
OUTER = 20  # augmented-Lagrangian updates of (mu, rho) per round
INNER = 500  # L-BFGS steps per augmented-Lagrangian subproblem
RHO0, RHO_MAX = 1.0, 1e8  # penalty: start, cap (a pre-activation is O(max|Z_l|) = O(1) at the minima we polish)
CERTIFY_WITHIN = 10.0  # the certificates' host-side search (5 more programs to compile) only at rel_grad <= this x rtol
ACCEPT_RISE = 1e-8  # an accepted point may exceed the stalled value by this much relative (rounding of f)
MAX_STEPS_FACTOR = 2  # ufm.solve caps the polish at this many times its max_steps L-BFGS steps (all rounds)
POLISH_MAX_STEPS = 20_000  # the cap when none is given (`polish`, `polish_run`): MAX_STEPS_FACTOR x L-BFGS's 10,000


class Polish(NamedTuple):
    """Result of one compiled polish (`polish_piece`).

    Attributes:
      params: the polished point theta.
      value: f(theta), the true objective (the ReLU forward pass).
      grad_norm: ||grad f_s(theta)|| at the slopes s of `kink_slopes` (a Clarke gradient's norm).
      rel_grad: grad_norm / (||grad F_s|| + ||grad R||).
      violation: ||z_A(theta)||_2, the constraint residual.
      steps: L-BFGS steps taken (all subproblems; in `polish_run`, all rounds and thresholds).
      accepted: True when the point is kink-aware stationary to tolerance (`polish_run`, `certify_close`).
      capped: True when `polish_run` stopped at its step cap ``max_steps`` (None from `polish_piece`).
    """

    params: Params
    value: jax.Array
    grad_norm: jax.Array
    rel_grad: jax.Array
    violation: jax.Array
    steps: jax.Array
    accepted: jax.Array
    capped: jax.Array | None = None


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
    return _slopes(problem, params, masks, lam)[0]


def _slopes(problem: UFM, params: Params, masks, lam):
    """(the clipped slopes of `kink_slopes`, the unclipped ones: lambda_a / g_a(s) before the clip)."""
    slopes, raw, _ = _slopes_and_fit_grad(problem, params, masks, lam)
    return slopes, raw


def _fit_grads(problem: UFM, params: Params, masks, slopes):
    """(grad_theta F_s, (dF_s/dh at each kink layer)): one reverse pass of the slope piece's fit with zero shifts."""
    zero = tuple(jnp.zeros_like(m) for m in masks)
    return jax.grad(lambda p, e: _fit(problem, p, masks, slopes, e), argnums=(0, 1))(params, zero)


def _slopes_and_fit_grad(problem: UFM, params: Params, masks, lam):
    """The slopes of `kink_slopes` (clipped, and raw), and grad_theta F_s at those slopes, with ONE copy of the fit's
    gradient in the program: L passes of `_fit_grads` in a ``fori_loop``, each updating every layer's slopes from the
    current ones. Layer l's g_a depends only on the slopes of later layers, so after pass j the last j kink layers
    are exact; the L-th pass (the slopes no longer change) gives grad F_s."""
    n = len(masks)

    def one(_, c):
        slopes, raw, _ = c
        gF, gs = _fit_grads(problem, params, masks, slopes)
        new, new_raw = [], []
        for m, g, lam_i in zip(masks, gs, lam, strict=True):
            ok = jnp.abs(g) > 1e-30
            s = jnp.where(ok, lam_i / jnp.where(ok, g, 1), 0)
            new_raw.append(m * s)
            new.append(m * jnp.clip(s, 0, 1))
        return tuple(new), tuple(new_raw), gF

    zeros = tuple(jnp.zeros_like(m) for m in masks)
    gF0 = jax.tree_util.tree_map(jnp.zeros_like, params)
    return jax.lax.fori_loop(0, n + 1, one, (zeros, zeros, gF0))


def slope_gradient(problem: UFM, params: Params, masks, slopes) -> tuple[jax.Array, jax.Array]:
    """(||grad f_s||, ||grad F_s|| + ||grad R||): the Clarke gradient of the ReLU slopes ``slopes`` at the masked
    entries, and the scale of the scale-aware rule (its ratio is rel_grad)."""
    return _slope_measure(problem, params, _fit_grads(problem, params, masks, slopes)[0])


def _slope_measure(problem: UFM, params: Params, gF) -> tuple[jax.Array, jax.Array]:
    """(||gF + grad R||, ||gF|| + ||grad R||) for the fit gradient ``gF``."""
    gR = jax.grad(lambda p: regulariser(problem, p))(params)
    g = jax.tree_util.tree_map(jnp.add, gF, gR)
    return tree_norm(g), tree_norm(gF) + tree_norm(gR)


class _ALState(NamedTuple):
    """The loop state of `_al_piece`: ONE ``while_loop`` evaluates the piece's Phi and its gradient at one point
    per iteration (one copy of them in the program) for every phase: 0, the start's scale (gtol); 1, the augmented
    Lagrangian (outer multiplier updates, inner L-BFGS with its halving line search); 2, the L passes of the slope
    solve (`_slopes_and_fit_grad`'s arithmetic) and grad F_s; 3, done."""

    phase: jax.Array
    x: jax.Array  # flat point (the subproblem's current iterate)
    f: jax.Array  # Phi(x; mu, rho)
    g: jax.Array  # grad Phi(x; mu, rho); in phase 2, grad F_s + grad R at the current slopes
    cons: tuple  # the masked pre-activations at x
    d: jax.Array  # search direction
    t: jax.Array  # trial step (0: evaluate x itself, a fresh subproblem)
    halvings: jax.Array
    S: jax.Array  # (MEMORY, n) steps s_i, a ring buffer
    Y: jax.Array  # (MEMORY, n) gradient changes y_i
    k: jax.Array  # L-BFGS steps of this subproblem; in phase 2, slope passes done
    mu: tuple
    rho: jax.Array
    outer: jax.Array  # multiplier updates done
    viol: jax.Array  # ||z_A|| after the last update
    steps: jax.Array  # L-BFGS steps, all subproblems
    gtol: jax.Array
    slopes: tuple  # phase 2: the clipped slopes so far
    raw: tuple  # phase 2: the unclipped ones


def _two_loop(S, Y, k, g) -> jax.Array:
    """-H_k g by the L-BFGS two-loop recursion over the min(k, m) newest stored pairs (Nocedal & Wright 2006,
    Alg. 7.4; slot (k - 1 - i) mod m holds the i-th newest); pairs with s.y <= 0 are skipped; H_0 = (s.y / y.y) I of
    the newest pair, or I."""
    m = S.shape[0]
    order = (k - 1 - jnp.arange(m)) % m  # newest first
    sy = jnp.sum(S * Y, axis=1)
    filled = jnp.zeros(m, bool).at[order].set(jnp.arange(m) < k)  # slots written by this subproblem
    ok = (sy > 0) & filled
    rho = jnp.where(ok, 1 / jnp.where(ok, sy, 1), 0)

    def first(q_a, i):
        q, a = q_a
        j = order[i]
        ai = rho[j] * (S[j] @ q)
        return (q - ai * Y[j], a.at[j].set(ai)), None

    (q, a), _ = jax.lax.scan(first, (g, jnp.zeros(m, g.dtype)), jnp.arange(m))
    newest = order[0]
    yy = Y[newest] @ Y[newest]
    gamma = jnp.where(ok[newest] & (yy > 0), sy[newest] / jnp.where(yy > 0, yy, 1), 1)
    r = gamma * q

    def second(r, i):
        j = order[m - 1 - i]
        b = rho[j] * (Y[j] @ r)
        return r + S[j] * (a[j] - b), None

    r, _ = jax.lax.scan(second, r, jnp.arange(m))
    return -r


def _al_piece(problem: UFM, params: Params, masks, rtol, active, outer: int, inner: int, budget=None):
    """The augmented Lagrangian on the piece of ``masks`` (traceable; no iteration when ``active`` is False).

    Each subproblem min_theta Phi(theta; mu, rho) is solved by L-BFGS (memory `MEMORY`, fresh for every (mu, rho))
    from the previous solution until ||grad Phi|| <= gtol, ``inner`` steps, or a failed line search; then
    mu <- mu + rho z and rho <- 10 rho when ||z|| fell by less than 4x; at most ``outer`` updates, and none once
    ||z|| <= gtol; the whole piece stops after ``budget`` L-BFGS steps (`polish_run`'s cap; None:
    `POLISH_MAX_STEPS`). The line search halves the step from 1 until the approximate Armijo condition of Hager & Zhang
    (2005) f(x + t d) <= f(x) + 1e-4 t g.d + 4 eps |f(x)| holds (at most 40 halvings: the eps term lets the search
    pass where f no longer resolves the decrease, near the minimum, where the unit L-BFGS step is right).
    gtol = rtol/10 (||grad F_A|| + ||grad R||) at ``params``. The slopes of `kink_slopes` (from lambda = the last
    mu) and the measure come last. All of it is one loop with one evaluation of the piece's objective

        Phi_s(theta, e; mu, rho) = F_s(theta, e) + R(theta) + sum_a mu_a z_a + rho/2 sum_a z_a^2

    (slopes s at the kinks, shifts e of the kink layers' outputs) and its gradient in (theta, e) per iteration
    (`_ALState`): s = 0, mu = rho = 0 for the scale, s = 0 for the augmented Lagrangian, mu = rho = 0 for the slope
    passes (grad_e is dF_s/dh, grad_theta - grad R is grad F_s). Round 4 held five such gradients in three
    nested loops.

    Returns (`Polish`, the unclipped multiplier slopes): slopes outside [0, 1] mark entries that want to leave the
    kink (an inactive constraint, `polish_run`)."""
    dt = params.H.dtype
    flat0, unravel = jax.flatten_util.ravel_pytree(params)
    eps = jnp.finfo(dt).eps
    ones = jax.tree_util.tree_map(jnp.ones_like, params)
    lam = jax.flatten_util.ravel_pytree(jax.grad(lambda p: regulariser(problem, p))(ones))[0]  # grad R(x) = lam x
    zeros_m = tuple(jnp.zeros_like(m) for m in masks)
    budget = jnp.asarray(POLISH_MAX_STEPS if budget is None else budget, jnp.int32)

    def phi(v, e, mu, rho, slopes):
        x = unravel(v)
        out, cons = _piece(problem, x, masks, slopes, e)
        pen = sum(jnp.sum(m * c + rho / 2 * c**2) for m, c in zip(mu, cons, strict=True))
        return fit_loss(problem, out) + regulariser(problem, x) + pen, tuple(cons)

    vg = jax.value_and_grad(phi, argnums=(0, 1), has_aux=True)
    zeros_n = jnp.zeros((MEMORY, flat0.size), dt)
    zero = jnp.asarray(0.0, dt)
    st0 = _ALState(
        jnp.where(active, 0, 3).astype(jnp.int32), flat0, zero, jnp.zeros_like(flat0), zeros_m,
        jnp.zeros_like(flat0), zero, jnp.int32(0), zeros_n, zeros_n, jnp.int32(0), zeros_m, jnp.asarray(RHO0, dt),
        jnp.int32(0), zero, jnp.int32(0), zero, zeros_m, zeros_m,
    )  # fmt: skip

    def body(st: _ALState) -> _ALState:
        al = st.phase == 1
        (ft, ct), (gt, ge) = vg(
            st.x + jnp.where(al, st.t, 0) * st.d,
            zeros_m,
            tuple(jnp.where(al, a, 0) for a in st.mu),
            jnp.where(al, st.rho, 0),
            st.slopes,
        )
        ev = (ft, ct, gt, ge)
        # every phase's update from the one evaluation; the L-BFGS memory (the large part of the state) is updated in
        # place by phase 1 only (no select or branch copies it), the small fields are selected by phase
        a = _al_step(inner, outer, eps, budget)(st, ev, al)
        s0 = _al_start(lam, rtol, st, ev)
        s2 = _slope_pass(masks)(st, ev)

        def pick(f0, f1, f2):
            return jax.tree_util.tree_map(lambda u, v, w: jnp.where(st.phase == 0, u, jnp.where(al, v, w)), f0, f1, f2)

        small = ("phase", "g", "viol", "gtol", "k", "slopes", "raw")
        return a._replace(**{n: pick(getattr(s0, n), getattr(a, n), getattr(s2, n)) for n in small})

    st = jax.lax.while_loop(lambda st: st.phase < 3, body, st0)
    x = unravel(st.x)
    gR = lam * st.x
    gn = jnp.linalg.norm(st.g)
    scale = jnp.linalg.norm(st.g - gR) + jnp.linalg.norm(gR)
    rel = jnp.where(scale > 0, gn / jnp.where(scale > 0, scale, 1), 0)
    return Polish(x, objective(problem, x), gn, rel, st.viol, st.steps, jnp.bool_(False)), st.raw


def _al_start(lam, rtol, st: _ALState, ev) -> _ALState:
    """Phase 0: gtol = rtol/10 (||grad F_A|| + ||grad R||) and ||z_A|| at the start (Phi with mu = rho = 0)."""
    ft, ct, gt, _ = ev
    gR = lam * st.x
    gtol = jnp.asarray(rtol, st.x.dtype) / 10 * (jnp.linalg.norm(gt - gR) + jnp.linalg.norm(gR))
    return st._replace(phase=jnp.int32(1), viol=tree_norm(ct), gtol=gtol)


def _al_step(inner: int, outer: int, eps, budget):
    """Phase 1: one trial of the augmented Lagrangian's inner L-BFGS (`_al_piece`); at a subproblem's end the
    multiplier update, and phase 2 once the outer loop is over or ``budget`` L-BFGS steps are spent. Outside
    phase 1 (``al`` False) it changes nothing but the fields the other phases select."""

    def step(st: _ALState, ev, al) -> _ALState:
        ft, ct, gt, _ = ev
        fresh = st.t == 0
        slope = st.g @ st.d
        ok = al & (fresh | (ft <= st.f + 1e-4 * st.t * slope + 4 * eps * jnp.abs(st.f)))
        stuck = al & (~fresh & ~ok & (st.halvings + 1 >= 40) | ~jnp.isfinite(ft))
        x = jnp.where(ok, st.x + st.t * st.d, st.x)
        f, g = jnp.where(ok, ft, st.f), jnp.where(ok, gt, st.g)
        cons = jax.tree_util.tree_map(lambda a, b: jnp.where(ok, a, b), ct, st.cons)
        moved = ok & ~fresh
        i = st.k % MEMORY
        S = st.S.at[i].set(jnp.where(moved, x - st.x, st.S[i]))
        Y = st.Y.at[i].set(jnp.where(moved, g - st.g, st.Y[i]))
        k = st.k + moved

        def direction(_):
            d = _two_loop(S, Y, k, g)
            return jnp.where(g @ d < 0, d, -g)  # not a descent direction: steepest descent

        d = jax.lax.cond(ok, direction, lambda _: st.d, None)  # a new direction only after an accepted point
        # the subproblem ends: converged, out of steps, or a failed line search (the point before it is kept)
        spent = al & (st.steps + moved >= budget)  # the step cap: end here, slopes and measure at this point
        end = stuck | spent | (ok & ((jnp.linalg.norm(g) <= st.gtol) | (k >= inner)))
        viol = tree_norm(cons)
        mu = tuple(jnp.where(end, a + st.rho * z, a) for a, z in zip(st.mu, cons, strict=True))
        rho = jnp.where(end & (viol > st.viol / 4), jnp.minimum(st.rho * 10, RHO_MAX), st.rho)
        n_outer = st.outer + end
        viol = jnp.where(end, viol, st.viol)
        done = end & ((n_outer >= outer) | (viol <= st.gtol) | spent)  # the outer loop's condition, after an update
        return st._replace(
            phase=jnp.where(done, 2, 1).astype(jnp.int32),
            x=x, f=f, g=g, cons=cons, d=d,
            t=jnp.where(al, jnp.where(end, 0.0, jnp.where(ok, 1.0, st.t / 2)), st.t).astype(st.t.dtype),
            halvings=jnp.where(ok | end, 0, st.halvings + al),
            S=S, Y=Y, k=jnp.where(end, 0, k),  # k = 0: a fresh memory (the stored pairs are masked by k)
            mu=mu, rho=rho, outer=n_outer, viol=viol, steps=st.steps + moved,
        )  # fmt: skip

    return step


def _slope_pass(masks):
    """Phase 2: one pass of the slope solve (lambda = mu): s_a = lambda_a / g_a(s) from dF_s/dh at the current
    slopes, clipped to [0, 1] (0 where |g_a| <= 1e-30: a degenerate kink, whose term g_a s_a grad z_a vanishes with
    g_a). Layer l's g_a depends only on the slopes of later layers, so after pass j the last j kink layers are exact;
    pass L (the slopes no longer change) leaves them as they are and its gradient, grad F_s + grad R at the final
    slopes, is kept in ``g``."""

    def one(st: _ALState, ev) -> _ALState:
        _, _, gt, ge = ev
        new, raw = [], []
        for m, g, lam_a in zip(masks, ge, st.mu, strict=True):
            ok = jnp.abs(g) > 1e-30
            s = jnp.where(ok, lam_a / jnp.where(ok, g, 1), 0)
            raw.append(m * s)
            new.append(m * jnp.clip(s, 0, 1))
        passes = st.k + 1
        return st._replace(
            phase=jnp.where(passes > len(masks), 3, 2).astype(jnp.int32),
            g=gt,
            slopes=tuple(new),
            raw=tuple(raw),
            k=passes,
        )

    return one


@functools.partial(jax.jit, static_argnames=("outer", "inner"))
def polish_piece(problem: UFM, params: Params, masks, rtol, *, outer: int = OUTER, inner: int = INNER) -> Polish:
    """One compiled augmented-Lagrangian solve on the piece of the masks (module docstring, steps 2-3).

    Args:
      problem: a ReLU `ufm.UFM` with L >= 2 (its array leaves in the dtype of ``params``).
      params: the start, e.g. a stalled run's point.
      masks: L - 1 arrays of the shapes of Z_2..Z_L (d_{l+1} x N), 1.0 at the pre-activations held at 0.
      rtol: the relative stationarity target; each subproblem is solved to ||grad Phi|| <= rtol/10 times the
        start's scale ||grad F|| + ||grad R||, and the loop stops once ||z_A|| is below the same number.
      outer, inner: augmented-Lagrangian updates and L-BFGS steps per subproblem (static).

    Returns:
      A `Polish` (``accepted`` False: acceptance is `polish_run`'s decision).
    """
    return _al_piece(problem, params, masks, rtol, jnp.bool_(True), outer, inner)[0]


def traced_kink_masks(problem: UFM, params: Params, kink_rtol) -> tuple[jax.Array, ...]:
    """`ufm._certificates.kink_masks` inside a trace, as 0/1 arrays of the dtype of ``params``: entry (i, j) of
    Z_l (l = 2..L) is 1 when |Z_l[i, j]| <= kink_rtol * max|Z_l| (every entry when Z_l = 0)."""
    dt = params.H.dtype
    out = []
    for z in forward(problem, params).Z:
        a = jnp.abs(z)
        top = jnp.max(a)
        out.append(jnp.where(top > 0, a <= jnp.asarray(kink_rtol, dt) * top, True).astype(dt))
    return tuple(out)


class _Attempts(NamedTuple):
    t: jax.Array  # index of the active-set threshold in KINK_RTOLS
    r: jax.Array  # round within the threshold
    x: Params  # the start of the next round
    released: tuple  # entries dropped from the active set at this threshold (their slopes left [0, 1])
    last: jax.Array  # rel_grad of the previous round (inf at a new threshold)
    best: Polish
    steps: jax.Array
    done: jax.Array


def polish_run(
    problem: UFM,
    params: Params,
    value,
    rtol,
    tol,
    need=True,
    max_steps=POLISH_MAX_STEPS,
    *,
    outer: int = OUTER,
    inner: int = INNER,
) -> Polish:
    """The whole kink polish of one run, traceable and vmappable (module docstring, steps 1-4; never raises).

    For each threshold of `KINK_RTOLS`, up to `ROUNDS` rounds: the active set of the current point (minus the
    released entries), `polish_piece` on it, acceptance when rel_grad <= ``rtol`` (or grad_norm <= ``tol``) and
    f <= ``value`` (1 + `ACCEPT_RISE`); otherwise the next round starts from the polished point with the entries
    whose multiplier slopes left [-`SLOPE_SLACK`, 1 + `SLOPE_SLACK`] released. A threshold is left (the next one
    starts from ``params``) when the loss rose, the active set is empty, or a round neither halved rel_grad nor
    released an entry. The polish stops after ``max_steps`` L-BFGS steps in all (the cap; ``capped`` True), with
    the slopes and the measure taken at the point reached.

    Args:
      problem: a ReLU `ufm.UFM` with L >= 2, its array leaves in the dtype of ``params``.
      params: the run's end point theta (d_1 x N features H, the W_l).
      value: f(theta), the loss the polish may not raise.
      rtol, tol: the solve's relative and absolute stationarity tolerances.
      need: False skips the polish (no iteration): the unpolished lanes of a batch cost nothing.
      max_steps: the cap on L-BFGS steps, all rounds and thresholds (dynamic: a new cap does not recompile;
        default `POLISH_MAX_STEPS`).
      outer, inner: augmented-Lagrangian updates and L-BFGS steps per subproblem (static).

    Returns:
      The accepted `Polish` (``accepted`` True), else the finite polished point of lowest rel_grad whose loss
      did not rise (``accepted`` False), else ``params`` with rel_grad = inf. ``steps`` counts every L-BFGS step
      taken, accepted or not; ``capped`` says whether the cap stopped it.
    """
    dt = params.H.dtype
    value = jnp.asarray(value, dt)
    cap = jnp.asarray(max_steps, jnp.int32)
    limit = value + ACCEPT_RISE * jnp.maximum(1.0, jnp.abs(value))
    rtols = jnp.asarray(KINK_RTOLS, dt)
    inf = jnp.asarray(jnp.inf, dt)
    zeros = tuple(jnp.zeros_like(z) for z in forward(problem, params).Z)
    best0 = Polish(params, value, inf, inf, inf, jnp.int32(0), jnp.bool_(False))
    st0 = _Attempts(jnp.int32(0), jnp.int32(0), params, zeros, inf, best0, jnp.int32(0), ~jnp.asarray(need, bool))

    def body(st: _Attempts) -> _Attempts:
        masks = tuple(m * (1 - rl) for m, rl in zip(traced_kink_masks(problem, st.x, rtols[st.t]), st.released))
        active = sum(jnp.sum(m) for m in masks) > 0
        res, raw = _al_piece(problem, st.x, masks, rtol, active, outer, inner, cap - st.steps)
        ok = active & jnp.isfinite(res.value) & (res.value <= limit) & jnp.isfinite(res.rel_grad)
        acc = ok & ((res.rel_grad <= rtol) | (res.grad_norm <= tol))
        take = acc | (ok & (res.rel_grad < st.best.rel_grad))
        best = jax.tree_util.tree_map(lambda a, b: jnp.where(take, a, b), res._replace(accepted=acc), st.best)
        out = tuple(m * ((s < -SLOPE_SLACK) | (s > 1 + SLOPE_SLACK)) for m, s in zip(masks, raw, strict=True))
        halved = res.rel_grad <= st.last / 2
        release = ~halved & (sum(jnp.sum(o) for o in out) > 0)  # re-identification stopped helping: release
        go_on = ok & ~acc & (st.r + 1 < ROUNDS) & (halved | release)
        t = jnp.where(go_on, st.t, st.t + 1)
        keep = lambda a, b: jnp.where(go_on, a, b)  # noqa: E731
        return _Attempts(
            t,
            jnp.where(go_on, st.r + 1, 0),
            jax.tree_util.tree_map(keep, res.params, params),
            tuple(
                keep(jnp.where(release, jnp.maximum(rl, o), rl), z)
                for rl, o, z in zip(st.released, out, zeros, strict=True)
            ),
            keep(res.rel_grad, inf),
            best,
            st.steps + res.steps,
            acc | (t >= len(KINK_RTOLS)) | (st.steps + res.steps >= cap),
        )

    st = jax.lax.while_loop(lambda st: ~st.done, body, st0)
    return st.best._replace(steps=st.steps, capped=~st.best.accepted & (st.steps >= cap))


polish_jit = jax.jit(polish_run, static_argnames=("outer", "inner"))


def needs_polish(status, rel_grad) -> np.ndarray:
    """Which runs the polish finishes: stalled or precision_floor, and max_steps with rel_grad <= `MAX_STEPS_BELOW`
    (a run that spent its budget chattering at a kink; one far from stationary keeps its budget's verdict).
    Elementwise over a batch, on the host (NumPy on the fetched statuses: no eager XLA program after a solve)."""
    status = np.asarray(status)
    rel = np.asarray(rel_grad)
    return (status == STALLED) | (status == PRECISION_FLOOR) | ((status == MAX_STEPS) & (rel <= MAX_STEPS_BELOW))


def certify_close(problem: UFM, res: Polish, rtol: float, tol: float) -> Polish:
    """Host side, one run: an unaccepted polish within `CERTIFY_WITHIN` x ``rtol`` is measured again by
    `ufm._certificates.stationarity`'s slope search (the one `ufm.check` uses, 5 s at most); the smaller measure
    is kept and accepted when it meets the tolerance."""
    rel = float(res.rel_grad)
    if bool(res.accepted) or not rel <= CERTIFY_WITHIN * rtol:
        return res
    st = stationarity(problem, res.params, tol=tol, rel_tol=rtol, max_time=5.0)
    if not st.grad_norm_rel < rel:
        return res
    dt = res.value.dtype
    acc = st.grad_norm_rel <= rtol or st.stationarity <= tol
    return res._replace(
        grad_norm=jax.device_put(np.asarray(st.stationarity, dt)),
        rel_grad=jax.device_put(np.asarray(st.grad_norm_rel, dt)),
        accepted=jax.device_put(np.bool_(acc)),
    )


def apply_polish(sol: Solution, res: Polish) -> Solution:
    """``sol`` with the polish ``res`` applied (elementwise over a batch): accepted -> the polished point, its
    kink-aware grad_norm/rel_grad and status converged; not accepted but lower in both loss and rel_grad -> the
    polished point, status unchanged; else ``sol``'s point. Not accepted and stopped at its step cap
    (``res.capped``) -> status max_steps whichever point is kept (the budget ran out: a larger ``max_steps``
    gives the polish more). ``polish_steps`` = ``res.steps`` either way.

    Decided on the host in NumPy (the fetched arrays, put back on the device): no eager XLA program per comparison
    after a polish (round 5: seven, about 0.4 s in a fresh process). Inside a trace, the same with ``jnp``."""
    xp: Any = np if is_concrete(res.value) and is_concrete(sol.value) else jnp
    put = jax.device_put if xp is np else (lambda a: a)
    acc = xp.asarray(res.accepted)
    rel = xp.asarray(np.inf if sol.rel_grad is None else sol.rel_grad, xp.asarray(res.rel_grad).dtype)
    use = acc | ((xp.asarray(res.value) <= xp.asarray(sol.value)) & (xp.asarray(res.rel_grad) < rel))
    capped = xp.zeros_like(acc) if res.capped is None else xp.asarray(res.capped) & ~acc

    def pick(a, b):
        a, b = xp.asarray(a), xp.asarray(b)
        return put(xp.where(xp.reshape(use, use.shape + (1,) * (b.ndim - use.ndim)), a, b))

    status = xp.where(acc, CONVERGED, xp.where(capped, MAX_STEPS, xp.asarray(sol.status))).astype(np.int32)
    return sol._replace(
        params=jax.tree_util.tree_map(pick, res.params, sol.params),
        value=pick(res.value, sol.value),
        grad_norm=pick(res.grad_norm, sol.grad_norm),
        rel_grad=pick(res.rel_grad, rel),
        status=put(status),
        polish_steps=put(xp.asarray(res.steps)),
    )


def step_cap(max_steps: int | np.integer | None = None) -> np.int32:
    """The polish's cap on L-BFGS steps as `polish_run` takes it: ``max_steps`` (None: `POLISH_MAX_STEPS`), clipped
    to int32."""
    return np.int32(min(POLISH_MAX_STEPS if max_steps is None else int(max_steps), np.iinfo(np.int32).max))


def solve_cap(solve_max_steps: int) -> np.int32:
    """The polish's cap in `ufm.solve` and `ufm.solve_batch`: `MAX_STEPS_FACTOR` x their ``max_steps``."""
    return step_cap(MAX_STEPS_FACTOR * int(solve_max_steps))


def polish(
    problem: UFM, params: Params, value, rtol: float, tol: float = 0.0, max_steps: int | np.integer | None = None
) -> Polish:
    """The kink polish of one run (`polish_run`, compiled once per problem shape and dtype, then `certify_close`).

    Args:
      problem: a ReLU `ufm.UFM` with L >= 2, its array leaves in the dtype of ``params``.
      params: the run's end point; value: its loss; rtol, tol: the solve's tolerances.
      max_steps: the cap on the polish's L-BFGS steps (default `POLISH_MAX_STEPS`; `ufm.solve` passes
        `MAX_STEPS_FACTOR` x its own ``max_steps``). A new cap does not recompile.

    Returns:
      A `Polish` (``accepted`` says whether the point is kink-aware stationary to tolerance).
    """
    res = polish_jit(problem, params, value, rtol, tol, True, step_cap(max_steps))
    return certify_close(problem, res, rtol, tol)
