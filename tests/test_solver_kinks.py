"""The kink polish (`ufm._kinks`): convergence of deep ReLU runs at ReLU kinks.

Independent references: a NumPy forward pass with explicit ReLU slopes and central finite differences (the Clarke
gradient of given slopes, and the slopes the multipliers imply), the binary DNC optimum of `ufm.construct` (a
closed form, Súkeník et al. 2023, with its kinks known), and `ufm.check`/`ufm.certify` (a separate kink-aware
stationarity search) on the issue's case K=3, L=4, widths 6, lambda=0.004.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ufm
import ufm._solver as solver_module
from ufm._certificates import kink_masks, stationarity
from ufm._kinks import (
    MAX_STEPS_BELOW,
    MAX_STEPS_FACTOR,
    apply_polish,
    kink_slopes,
    polish,
    polish_jit,
    polish_piece,
    slope_gradient,
)
from ufm._options import solver_options
from ufm._solver import polish_batch, polish_map

# ---------------------------------------------------------------------------------------------------------------
# NumPy reference: the fit with activation relu(z) off the masks and s * z on them, plus shifts e (dF/dh = dF/de)


def np_fit(problem, H, Ws, masks, slopes, shifts):
    h = H
    for W, m, s, e in zip(Ws[:-1], masks, slopes, shifts, strict=True):
        z = W @ h
        h = np.maximum(z, 0) * (1 - m) + m * s * z + e
    out = Ws[-1] @ h
    Y = np.zeros_like(out)
    Y[np.asarray(problem.labels()), np.arange(problem.N)] = 1.0
    return np.sum((out - Y) ** 2) / (2 * problem.N)


def fd_grad(f, x, h=1e-6):
    """Central differences of a scalar function of a flat vector (error ~ h^2 f''' + eps/h ~ 1e-10 here)."""
    g = np.zeros_like(x)
    for i in range(x.size):
        e = np.zeros_like(x)
        e[i] = h
        g[i] = (f(x + e) - f(x - e)) / (2 * h)
    return g


SMALL = ufm.UFM(
    num_classes=2, n_per_class=2, widths=(5, 5, 5, 5), activation="relu", loss="mse", lam_H=0.01, lam_W=0.02
)


def random_case(seed):
    """A random point of SMALL with random masks whose pre-activations are exactly 0 (a point at those kinks: row i
    of W_l is projected off the features h_{l-1}[:, j] of its masked columns j, layer by layer), and random slopes
    in (0.1, 0.9) on the masks; drawn again until every other pre-activation is >= 1e-3 from 0 (deterministic)."""
    rng = np.random.default_rng(seed)
    for attempt in range(100):
        p0 = ufm.init_params(SMALL, jax.random.key(100 * seed + attempt), 1.0)
        H, Ws = np.asarray(p0.H), [np.array(W) for W in p0.Ws]
        masks, h, ok = [], H, True
        for W in Ws[:-1]:
            m = (rng.random((W.shape[0], h.shape[1])) < 0.3).astype(float)
            for i in range(W.shape[0]):
                cols = np.flatnonzero(m[i])
                if cols.size:
                    Q = np.linalg.qr(h[:, cols])[0]
                    W[i] -= Q @ (Q.T @ W[i])
            z = W @ h
            ok &= bool(np.all(np.abs(z[m > 0]) < 1e-12) and np.all(np.abs(z[m == 0]) > 1e-3))
            masks.append(m)
            h = np.maximum(z, 0) * (1 - m)
        if ok and all(m.any() for m in masks):
            slopes = [m * rng.uniform(0.1, 0.9, m.shape) for m in masks]
            return ufm.Params(jnp.asarray(H), tuple(jnp.asarray(W) for W in Ws), None), masks, slopes
    raise AssertionError("no valid random kink point")


def test_slope_gradient_is_the_gradient_of_the_slope_piece():
    # ||grad f_s|| and ||grad F_s|| + ||grad R|| against finite differences of the NumPy piece (grad R = lambda theta)
    params, masks, slopes = random_case(0)
    H, Ws = np.asarray(params.H), [np.asarray(W) for W in params.Ws]
    shapes = [H.shape] + [W.shape for W in Ws]
    sizes = [int(np.prod(s)) for s in shapes]

    def unflat(v):
        parts = np.split(v, np.cumsum(sizes)[:-1])
        return [a.reshape(s) for a, s in zip(parts, shapes, strict=True)]

    def F(v):
        H_, *Ws_ = unflat(v)
        return np_fit(SMALL, H_, Ws_, masks, slopes, [0.0] * 3)

    x = np.concatenate([H.ravel()] + [W.ravel() for W in Ws])
    gF = fd_grad(F, x)
    lam = np.concatenate([np.full(sizes[0], 0.01)] + [np.full(s, 0.02) for s in sizes[1:]])
    gR = lam * x
    gn, scale = slope_gradient(SMALL, params, tuple(map(jnp.asarray, masks)), tuple(map(jnp.asarray, slopes)))
    np.testing.assert_allclose(float(gn), np.linalg.norm(gF + gR), rtol=1e-7)
    np.testing.assert_allclose(float(scale), np.linalg.norm(gF) + np.linalg.norm(gR), rtol=1e-7)


def test_kink_slopes_recover_planted_slopes():
    # plant slopes s* on three kink layers, set lambda_a = s*_a g_a(s*) with g = dF/dh by finite differences in
    # NumPy: the layer-by-layer solve (last layer first) must return s* (to the FD error, ~1e-8 relative)
    params, masks, slopes = random_case(1)
    H, Ws = np.asarray(params.H), [np.asarray(W) for W in params.Ws]
    zero = [np.zeros(m.shape) for m in masks]
    lam = []
    for i, m in enumerate(masks):

        def F(e, i=i, m=m):
            shifts = [e.reshape(m.shape) if j == i else zero[j] for j in range(3)]
            return np_fit(SMALL, H, Ws, masks, slopes, shifts)

        g = fd_grad(F, zero[i].ravel()).reshape(m.shape)
        assert np.all(np.abs(g[m > 0]) > 1e-6)  # non-degenerate kinks: the slopes are determined
        lam.append(slopes[i] * g)
    got = kink_slopes(SMALL, params, tuple(map(jnp.asarray, masks)), tuple(map(jnp.asarray, lam)))
    for s, s_star in zip(got, slopes, strict=True):
        np.testing.assert_allclose(np.asarray(s), s_star, atol=1e-7)


# ---------------------------------------------------------------------------------------------------------------
# planted: the binary DNC optimum (closed form, `ufm.construct`; its zero pre-activations are the kinks)

DNC2 = ufm.UFM(num_classes=2, n_per_class=2, widths=(4, 4, 4), activation="relu", loss="mse", lam_H=5e-3, lam_W=5e-3)


def test_polish_returns_to_the_planted_dnc_optimum():
    star = ufm.construct(DNC2)
    masks = kink_masks(DNC2, star)
    # the pattern: each class mean lives on its own coordinate after every ReLU, the other entries are 0
    assert sum(int(m.sum()) for m in masks) == 2 * (4 * 4 - 4)
    noise = jax.tree_util.tree_map(lambda x: 1e-3 * jax.random.normal(jax.random.key(3), x.shape), star)
    start = jax.tree_util.tree_map(jnp.add, star, noise)
    res = polish_piece(DNC2, start, tuple(jnp.asarray(m, jnp.float64) for m in masks), 1e-7)
    f_star = ufm.predict(DNC2).loss
    # the piece's minimum near the start is the DNC optimum: loss to 1e-10 (the polish stops at rel_grad ~1e-8,
    # and the loss gap is ~ rel_grad^2 near a minimum)
    assert abs(float(res.value) - f_star) <= 1e-10 * f_star
    assert float(res.rel_grad) <= 1e-7 and float(res.violation) <= 1e-9
    # the certificates' own kink search agrees that the point is Clarke-stationary (ufm.check's tolerance 1e-6)
    assert stationarity(DNC2, res.params).grad_norm_rel <= 1e-6


# ---------------------------------------------------------------------------------------------------------------
# the case: before the polish, 6/6 default runs ended "stalled"

KINK = ufm.UFM(num_classes=3, n_per_class=1, widths=(6,) * 4, activation="relu", loss="mse", lam_H=0.004, lam_W=0.004)


@functools.cache
def _runs(lam_H, seed):
    """(the unpolished run, the default run) of the issue's case at lam_H from seed (cached: shared by tests)."""
    p = KINK.replace(lam_H=lam_H)
    return ufm.solve(p, key=seed, polish=False), ufm.solve(p, key=seed)


def _kink_case(seeds, lam_H=0.004, before=("stalled", "precision_floor")):
    p = KINK.replace(lam_H=lam_H)
    for seed in seeds:
        bare, sol = _runs(lam_H, seed)
        assert bare.status_name in before  # what the polish has to finish
        assert sol.status_name == "converged", (seed, sol.status_name, float(sol.rel_grad))
        assert float(sol.rel_grad) <= 1e-7
        assert int(sol.num_steps) == int(bare.num_steps) and int(sol.polish_steps) > 0  # the polish's own count
        assert float(sol.value) <= float(bare.value) * (1 + 1e-8)  # the polish never raises the loss
        # the independent check: ufm.check recomputes a kink-aware stationarity and must not call the point
        # unfinished (matches / local-min / below-prediction are all stationary-or-better verdicts)
        rep = ufm.check(p, sol, hessian=False)
        assert rep.verdict not in ("not-converged", "unresolved"), (seed, rep.explanation)


def test_kink_case_converges_and_check_agrees():
    before = polish_jit._cache_size()
    _kink_case([2, 4])
    # new numbers do not recompile the polish: a second lambda and seed reuse the program. Seed 5 at lam_H = 0.0041
    # stalls before the polish (measured); round 3's polish ended there at rel_grad 3.6e-7: its active set held
    # entries whose multiplier slopes were far outside [0, 1] (-7199, 99, ...), which are released now
    _kink_case([5], lam_H=0.0041)
    # seed 6 at 0.004 chattered at a kink for its 10,000 steps with optax's two-loop L-BFGS (rel_grad 1.9e-5 <=
    # MAX_STEPS_BELOW: polished); with the compact L-BFGS (round 5, equal to rounding) it stalls at the kink instead.
    # Either way the polish has to finish it
    _kink_case([6], before=("stalled", "precision_floor", "max_steps"))
    assert polish_jit._cache_size() - before <= 1


def test_polish_step_cap_is_a_status():
    # the polish stops at its cap on L-BFGS steps (all rounds): the same program (the cap is dynamic), steps equal to
    # the cap, not accepted, and the run reports max_steps (its budget ran out) instead of its stalled status.
    # ufm.solve's cap is MAX_STEPS_FACTOR x max_steps: a solve that converges in n steps with a budget just above n
    # caps the polish below what seed 2's polish needs
    bare, full = _runs(0.004, 2)
    need = int(full.polish_steps)
    assert need > 20  # the cap below stops it well before the end
    p = KINK.replace(lam_H=0.004)
    before = polish_jit._cache_size()
    res = polish(solver_module.polish_problem(p, jnp.float64), bare.params, bare.value, 1e-7, 0.0, max_steps=need // 2)
    assert polish_jit._cache_size() == before  # a new cap is a new number, not a new program
    assert bool(res.capped) and not bool(res.accepted) and int(res.steps) == need // 2
    out = apply_polish(bare, res)
    assert out.status_name == "max_steps" and int(out.polish_steps) == need // 2
    free = polish(solver_module.polish_problem(p, jnp.float64), bare.params, bare.value, 1e-7, 0.0)
    assert not bool(free.capped) and bool(free.accepted) and int(free.steps) == need  # the default cap: as solve
    # through solve, from the stalled point with max_steps = 60: the run ends stalled or at max_steps near the kink
    # (polished either way) and its polish is capped at MAX_STEPS_FACTOR x 60 = 120 < need steps
    assert MAX_STEPS_FACTOR * 60 < need
    capped = ufm.solve(p, init=bare.params, max_steps=60)
    assert capped.status_name == "max_steps" and int(capped.polish_steps) == MAX_STEPS_FACTOR * 60
    assert float(capped.value) <= float(bare.value) * (1 + 1e-8)
    # the batched polish caps each run as solve does (MAX_STEPS_FACTOR x the batch's max_steps), with solve's
    # program: the stalled run as a batch of one, options with max_steps = 60
    o60 = solver_options("lbfgs", None, 60, None, None, 1, None, jnp.dtype("float64"))
    one = jax.tree_util.tree_map(lambda a: jnp.asarray(a)[None], bare)
    got = polish_batch(p, one, o60, need=np.ones(1, bool))
    assert int(got.polish_steps[0]) == MAX_STEPS_FACTOR * 60 and int(got.status[0]) == int(capped.status)


# the 16 runs (seeds 0-7, lam_H = 0.004 and 0.0041): seed 6 at 0.004 ends at max_steps near a kink, the
# other 15 stall; all 16 must end "converged" and be judged stationary by ufm.check
SIXTEEN = [(lh, s) for lh in (0.004, 0.0041) for s in range(8)]


@pytest.mark.slow
def test_kink_case_all_sixteen_runs():
    for lh, seed in SIXTEEN:
        _kink_case([seed], lam_H=lh, before=("stalled", "precision_floor", "max_steps"))


# ---------------------------------------------------------------------------------------------------------------
# the batched polish (`ufm._solver.polish_batch`) against the single one (`ufm.solve`)

BATCH = [(0.004, 2), (0.004, 4), (0.0041, 5), (0.004, 6)]


def test_polish_batch_equals_single_polish():
    # the unpolished runs stacked into one batched Solution (per-run lam_H); polish_batch must end each where
    # ufm.solve's own polish ends it. Four more members test the selection and the failure path:
    #   4: a run marked converged (not polished: unchanged, polish_steps 0)
    #   5: a run marked max_steps far from stationary (rel_grad 1e-2 > MAX_STEPS_BELOW: unchanged)
    #   6: a run marked max_steps near a kink (its own rel_grad <= MAX_STEPS_BELOW: polished like a stalled one)
    #   7: a stalled run at a non-finite point (its polish fails inside the map: kept as it is, no exception)
    bare2 = _runs(0.004, 2)[0]
    extra = [
        bare2._replace(status=jnp.asarray(0, jnp.int32)),
        bare2._replace(status=jnp.asarray(1, jnp.int32), rel_grad=jnp.asarray(1e-2)),
        bare2._replace(status=jnp.asarray(1, jnp.int32)),
        bare2._replace(params=jax.tree_util.tree_map(lambda a: a * jnp.nan, bare2.params)),
    ]
    assert float(bare2.rel_grad) <= MAX_STEPS_BELOW
    stack = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *[_runs(*c)[0] for c in BATCH], *extra)
    lam_H = jnp.asarray([lh for lh, _ in BATCH] + [0.004] * 4)
    o = solver_options("lbfgs", None, None, None, None, 1, None, jnp.dtype("float64"))
    got = polish_batch(KINK, stack, o, lam_H=lam_H)
    assert got.polish_steps.shape == (8,)
    single2 = _runs(0.004, 2)[1]
    for i, s in enumerate([_runs(*c)[1] for c in BATCH] + [None, None, single2]):
        if s is None:
            continue
        assert s.status_name == "converged", (i, s.status_name)  # both polish: the comparison is meaningful
        assert int(got.status[i]) == int(s.status)
        np.testing.assert_allclose(float(got.value[i]), float(s.value), rtol=1e-10, atol=0)
        assert float(got.rel_grad[i]) <= 1e-7
        assert int(got.polish_steps[i]) == int(s.polish_steps)
    for i in (4, 5):  # not polished: every field as given
        assert int(got.polish_steps[i]) == 0 and int(got.status[i]) == int(stack.status[i])
        np.testing.assert_array_equal(np.asarray(got.params.H[i]), np.asarray(stack.params.H[i]))
        assert float(got.value[i]) == float(stack.value[i]) and float(got.rel_grad[i]) == float(stack.rel_grad[i])
    assert int(got.status[7]) == int(bare2.status) and np.isnan(np.asarray(got.params.H[7])).all()
    with pytest.raises(ValueError, match="batched ufm.Solution"):
        polish_batch(KINK, bare2, o)  # one run is not a batch
    # flags given by the caller (solve_batch passes the ones it computed) select the runs: run 0 stalled but is not
    # flagged, so it is returned as it is; run 1 is polished as above
    flags = np.zeros(8, bool)
    flags[1] = True
    sel = polish_batch(KINK, stack, o, lam_H=lam_H, need=flags)
    assert int(sel.polish_steps[0]) == 0 and int(sel.status[0]) == int(stack.status[0])
    assert float(sel.value[0]) == float(stack.value[0])
    assert int(sel.polish_steps[1]) == int(got.polish_steps[1]) and float(sel.value[1]) == float(got.value[1])
    with pytest.raises(ValueError, match="need must have shape"):
        polish_batch(KINK, stack, o, need=flags[:2])
    # one compiled program, solve's: the single runs above compiled it, the batch and new numbers reuse it
    n = polish_jit._cache_size()
    polish_batch(KINK, stack, o, lam_H=lam_H * 1.01)
    assert polish_jit._cache_size() == n
    # solve_batch's wiring (polish=None: on for this ReLU model): the engine's result (here the stack, through a
    # patched engine) is polished with each run's own lam_H, exactly as polish_batch does; polish=False keeps it
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(solver_module, "run_engine", lambda *a, **k: stack)
        wired = ufm.solve_batch(KINK, seeds=np.arange(8), lam_H=lam_H)
        kept = ufm.solve_batch(KINK, seeds=np.arange(8), lam_H=lam_H, polish=False)
    np.testing.assert_array_equal(np.asarray(wired.status), np.asarray(got.status))
    np.testing.assert_array_equal(np.asarray(wired.value), np.asarray(got.value))
    assert kept is stack
    with pytest.raises(TypeError, match="polish"):
        ufm.solve_batch(KINK, seeds=np.arange(2), polish="yes")


def test_polish_option():
    with pytest.raises(TypeError, match="polish"):
        ufm.solve(DNC2, key=0, polish="yes")


@pytest.mark.slow
def test_polish_batch_vmapped_path():
    # the ``batch_size`` path (polish_map: lax.map of vmapped groups, its own program, ~20 s to compile on 2 loaded
    # cores) ends every run where the default run-by-run path (solve's program) does; a run flagged False by the
    # caller's ``need`` is returned as it is although it stalled
    runs = [_runs(0.004, 2)[0], _runs(0.004, 4)[0], _runs(0.004, 2)[0]]
    stack = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *runs)
    o = solver_options("lbfgs", None, None, None, None, 1, None, jnp.dtype("float64"))
    need = np.array([True, True, False])
    each = polish_batch(KINK, stack, o, need=need)
    grouped = polish_batch(KINK, stack, o, need=need, batch_size=2)
    assert polish_map._cache_size() >= 1  # the vmapped program ran
    for i in range(2):
        assert each.status_name[i] == grouped.status_name[i] == "converged"
        # vmapped arithmetic may round differently: the same piece, polished to rel_grad <= 1e-7 (loss gap ~ rel^2)
        np.testing.assert_allclose(float(grouped.value[i]), float(each.value[i]), rtol=1e-10)
        assert float(grouped.rel_grad[i]) <= 1e-7 and int(grouped.polish_steps[i]) > 0
    for got in (each, grouped):  # not flagged: unchanged, polish_steps 0
        assert int(got.polish_steps[2]) == 0 and got.status_name[2] == runs[2].status_name == "stalled"
        assert float(got.value[2]) == float(runs[2].value)
