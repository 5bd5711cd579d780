"""A lean line search: a fixed batch of trial step sizes evaluated at once, no nested ``while_loop``.

Given the direction d from the transformations before it in an ``optax.chain`` (for L-BFGS: ``scale_by_lbfgs``
then ``scale(-lr)``), the current point x, f = f(x) and g = grad f(x), with slope s = <g, d> < 0, a step size a is
*acceptable* when (Wolfe conditions, Nocedal & Wright 2006, eq. 3.6; approximate Wolfe, Hager & Zhang 2005, eq. 23)

    finite f(x + a d) and finite <grad f(x + a d), d>, and either
      Armijo + curvature:   f(x + a d) <= f + c1 a s    and   <grad f(x + a d), d> >= c2 s
      approximate Wolfe:    f(x + a d) <= f + eps |f|   and   c2 s <= <grad f(x + a d), d> <= (2 c1 - 1) s.

The approximate condition lets the search accept a step once f can no longer resolve the Armijo decrease (near a
minimum the decrease c1 a |s| falls below the rounding of f), where it compares slopes, which stay accurate; the
curvature condition keeps the L-BFGS pairs positive (<y, s> > 0).

The trials are a_j = a0 r^j, j = 0..M-1 (``num_trials`` M, ``decrease_factor`` r). The first trial a0 is evaluated
alone; only when it is not acceptable are the other M-1 evaluated, together, in one ``vmap`` of ``value_and_grad``
(a ``lax.cond``: under ``vmap`` both branches run, so a batched step always costs exactly M evaluations, whatever
the other runs do). The accepted step is the largest acceptable a_j; when none is acceptable, the largest trial
with a sufficient decrease (Armijo or approximate, curvature waived: at a ReLU kink the slope jumps), else no step.
The next a0 is min(max_stepsize, a / r) after a step (1 for L-BFGS: its natural step) and (smallest trial) * r
after none, so a run that keeps failing searches ever smaller steps, step after step, instead of inside one step.

The value and gradient at the accepted point are stored in the state (``value``, ``grad``): the driver reuses them
(`stored_value_and_grad`) instead of evaluating f again. A direction with s >= 0 (an L-BFGS memory spoiled by
rounding) is replaced by -g.

References:
  J. Nocedal, S. J. Wright, Numerical Optimization, 2nd ed., Springer 2006, §3.1 (Wolfe conditions), §3.5.
  W. W. Hager, H. Zhang, A new conjugate gradient method with guaranteed descent and an efficient line search,
  SIAM J. Optim. 16(1), 2005 (approximate Wolfe conditions).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax


class TrialLinesearchInfo(NamedTuple):
    """What one line-search step did (for tests and diagnostics).

    Attributes:
      acceptable: the accepted step met the (approximate) Wolfe conditions.
      num_evaluations: value-and-gradient evaluations made (1 or M; M under ``vmap``).
      slope: s = <g, d> of the direction used (< 0).
      decrease: f(x + a d) - f.
    """

    acceptable: jax.Array
    num_evaluations: jax.Array
    slope: jax.Array
    decrease: jax.Array


class ScaleByTrialLinesearchState(NamedTuple):
    """State of `scale_by_trial_linesearch`.

    Attributes:
      learning_rate: the last accepted step size a (0: no step).
      initial_step: a0 of the next search.
      value: f at the accepted point (inf before the first step).
      grad: grad f at the accepted point.
      info: `TrialLinesearchInfo` of the last step.
    """

    learning_rate: jax.Array
    initial_step: jax.Array
    value: jax.Array
    grad: Any
    info: TrialLinesearchInfo


def _vdot(a, b):
    return sum(jnp.vdot(x, y) for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


class TrialRule(NamedTuple):
    """The acceptance rule of the trial line search (module docstring), shared by `scale_by_trial_linesearch` and
    the one-evaluation-per-iteration L-BFGS of `ufm._driver` (which tries the same a_j one at a time).

    Attributes:
      num_trials: M >= 1, trial step sizes a0 r^j, j = 0..M-1.
      decrease_factor: r in (0, 1).
      slope_rtol: c1 of the Armijo condition.
      curv_rtol: c2 of the curvature condition.
      approx_dec_rtol: eps of the approximate Wolfe condition.
      max_stepsize: the largest a0.
    """

    num_trials: int = 6
    decrease_factor: float = 0.3
    slope_rtol: float = 1e-4
    curv_rtol: float = 0.9
    approx_dec_rtol: float = 1e-6
    max_stepsize: float = 1.0

    def decrease(self, a, f, df, value, slope):
        """Finite, and Armijo f <= value + c1 a s or the approximate Wolfe decrease f <= value + eps |value| with
        df <= (2 c1 - 1) s (module docstring); ``df`` = <grad f(x + a d), d>, ``slope`` = s = <grad f(x), d>."""
        armijo = f <= value + self.slope_rtol * a * slope
        approx = (f <= value + self.approx_dec_rtol * jnp.abs(value)) & (df <= (2 * self.slope_rtol - 1) * slope)
        return jnp.isfinite(f) & jnp.isfinite(df) & (armijo | approx)

    def acceptable(self, a, f, df, value, slope):
        """`decrease` and the curvature condition df >= c2 s."""
        return self.decrease(a, f, df, value, slope) & (df >= self.curv_rtol * slope)

    def next_initial(self, a0, a, took):
        """a0 of the next search: min(max_stepsize, a / r) after a step, (smallest trial) * r after none."""
        r = self.decrease_factor
        smallest = a0 * r ** (self.num_trials - 1)
        return jnp.where(took, jnp.minimum(self.max_stepsize, a / r), smallest * r)


DEFAULT_RULE = TrialRule()  # the defaults of `scale_by_trial_linesearch`


def scale_by_trial_linesearch(
    num_trials: int = 6,
    decrease_factor: float = 0.3,
    slope_rtol: float = 1e-4,
    curv_rtol: float = 0.9,
    approx_dec_rtol: float = 1e-6,
    max_stepsize: float = 1.0,
    lazy: bool = True,
) -> optax.GradientTransformationExtraArgs:
    """Scale the incoming direction by a step size found among a fixed batch of trials (module docstring).

    Args:
      num_trials: M >= 1, trial step sizes a0 r^j, j = 0..M-1, per step.
      decrease_factor: r in (0, 1).
      slope_rtol: c1 of the Armijo condition, in (0, 1).
      curv_rtol: c2 of the curvature condition, in (c1, 1) (0.9 is the usual choice for quasi-Newton directions).
      approx_dec_rtol: eps of the approximate Wolfe condition (relative increase of f tolerated), >= 0.
      max_stepsize: the largest a0 (1 for L-BFGS).
      lazy: evaluate a0 alone first and the other trials only when it fails (a ``lax.cond``: one evaluation per
        typical L-BFGS step); ``False`` evaluates all M trials in one ``vmap`` every step (one copy of f and its
        gradient in the compiled program instead of two: a smaller program, M times the arithmetic per step).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update`` needs ``params`` and the keyword arguments
      ``value`` (f(x)), ``grad`` (grad f(x)) and ``value_fn`` (f), as ``optax.scale_by_zoom_linesearch``.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from ufm._linesearch import scale_by_trial_linesearch
      >>> f = lambda x: jnp.sum((x - 1.0) ** 2)
      >>> opt = optax.chain(optax.sgd(0.5), scale_by_trial_linesearch())
      >>> x = jnp.zeros(2); s = opt.init(x)
      >>> u, s = opt.update(2 * (x - 1.0), s, x, value=f(x), grad=2 * (x - 1.0), value_fn=f)
      >>> x + u
      Array([1., 1.], dtype=float32)
    """
    if not (isinstance(num_trials, int) and num_trials >= 1):
        raise ValueError(f"num_trials must be a positive integer; got {num_trials!r}")
    if not 0 < decrease_factor < 1:
        raise ValueError(f"decrease_factor must be in (0, 1); got {decrease_factor!r}")
    if not 0 < slope_rtol < curv_rtol < 1:
        raise ValueError(f"need 0 < slope_rtol < curv_rtol < 1; got {slope_rtol!r}, {curv_rtol!r}")
    if not approx_dec_rtol >= 0 or not max_stepsize > 0:
        raise ValueError(f"need approx_dec_rtol >= 0 and max_stepsize > 0; got {approx_dec_rtol!r}, {max_stepsize!r}")
    M, r = num_trials, decrease_factor
    rule = TrialRule(num_trials, decrease_factor, slope_rtol, curv_rtol, approx_dec_rtol, max_stepsize)

    def init_fn(params) -> ScaleByTrialLinesearchState:
        leaves = jax.tree_util.tree_leaves(params)
        dt = jnp.result_type(*leaves) if leaves else jnp.float32
        return ScaleByTrialLinesearchState(
            learning_rate=jnp.asarray(max_stepsize, dt),
            initial_step=jnp.asarray(max_stepsize, dt),
            value=jnp.asarray(jnp.inf, dt),
            grad=jax.tree_util.tree_map(jnp.zeros_like, params),
            info=TrialLinesearchInfo(jnp.bool_(True), jnp.int32(0), jnp.zeros((), dt), jnp.zeros((), dt)),
        )

    def update_fn(updates, state, params, *, value, grad, value_fn, **extra_args):
        del extra_args
        dt = state.value.dtype
        slope = _vdot(grad, updates).astype(dt)
        ascent = ~(slope < 0)  # not a descent direction: fall back to -g
        d = jax.tree_util.tree_map(lambda u, g: jnp.where(ascent, -g, u), updates, grad)
        slope = jnp.where(ascent, -_vdot(grad, grad).astype(dt), slope)
        value = jnp.asarray(value, dt)

        def trial(a):
            x = jax.tree_util.tree_map(lambda p, u: p + (a * u).astype(p.dtype), params, d)
            f, g = jax.value_and_grad(value_fn)(x)
            return f.astype(dt), g, _vdot(g, d).astype(dt)

        def choose(a_all, f_all, g_all, df_all):
            """The largest acceptable trial; else the largest with a sufficient decrease; else no step (index M)."""
            ok = rule.acceptable(a_all, f_all, df_all, value, slope)
            dec = rule.decrease(a_all, f_all, df_all, value, slope)
            j = jnp.where(ok.any(), jnp.argmax(ok), jnp.where(dec.any(), jnp.argmax(dec), M))
            jj = jnp.minimum(j, M - 1)
            take = j < M
            a_j = jnp.where(take, a_all[jj], 0.0)
            f_j = jnp.where(take, f_all[jj], value)
            g_j = jax.tree_util.tree_map(lambda x, g_in: jnp.where(take, x[jj], g_in), g_all, grad)
            return a_j, f_j, g_j, ok.any(), take

        def finish(a, f, g, ok, took, n):
            next_a0 = rule.next_initial(a0, a, took).astype(dt)
            new_updates = jax.tree_util.tree_map(lambda u: (a * u).astype(u.dtype), d)
            info = TrialLinesearchInfo(ok, n, slope, f - value)
            return new_updates, ScaleByTrialLinesearchState(a.astype(dt), next_a0, f, g, info)

        a0 = state.initial_step
        if not lazy:
            a = a0 * r ** jnp.arange(M, dtype=dt)
            return finish(*choose(a, *jax.vmap(trial)(a)), jnp.int32(M))
        f0, g0, df0 = trial(a0)
        ok0 = rule.acceptable(a0, f0, df0, value, slope)

        def grid(_):
            a = a0 * r ** jnp.arange(M, dtype=dt)
            f, g, df = jax.vmap(trial)(a[1:])
            f_all, df_all = jnp.concatenate([f0[None], f]), jnp.concatenate([df0[None], df])
            g_all = jax.tree_util.tree_map(lambda x, y: jnp.concatenate([x[None], y]), g0, g)
            return *choose(a, f_all, g_all, df_all), jnp.int32(M)

        def first(_):
            return a0, f0, g0, jnp.bool_(True), jnp.bool_(True), jnp.int32(1)

        return finish(*jax.lax.cond(ok0, first, grid, None))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def find_state(opt_state) -> ScaleByTrialLinesearchState | None:
    """The `ScaleByTrialLinesearchState` inside an optax state (a chain's tuple), or None."""
    found = [
        s
        for s in jax.tree_util.tree_leaves(opt_state, is_leaf=lambda x: isinstance(x, ScaleByTrialLinesearchState))
        if isinstance(s, ScaleByTrialLinesearchState)
    ]
    return found[0] if len(found) == 1 else None


def stored_value_and_grad(opt_state):
    """(f, grad f) at the point the trial line search accepted, or None when ``opt_state`` has no such search."""
    s = find_state(opt_state)
    return None if s is None else (s.value, s.grad)
