# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 2 · Binary deep ReLU UFM: deep neural collapse in every layer (Súkeník et al. 2023)
#
# **The claim.** Súkeník, Mondelli, Lampert (NeurIPS 2023), *Deep neural collapse is provably optimal for the deep
# unconstrained features model*: for K = 2 classes, the L-layer deep ReLU UFM
#
# $$f = \tfrac{1}{2N}\lVert W_L\,\sigma(W_{L-1}\cdots\sigma(W_1 H_1)) - Y\rVert_F^2
#   + \sum_{l=1}^{L}\tfrac{\lambda_{W_l}}{2}\lVert W_l\rVert_F^2 + \tfrac{\lambda_{H_1}}{2}\lVert H_1\rVert_F^2$$
#
# (σ = ReLU after W_1 … W_{L−1}, none on H_1, no bias) has as its unique global optimum (up to symmetries) the
# **deep neural collapse** (DNC) configuration: within-class collapse in every layer (DNC1), class means of every
# layer l ≥ 2 forming a non-negative orthogonal frame (DNC2), and the rows of W_l aligned with those means (DNC3);
# or the zero solution above a λ threshold *[main theorem, recalled]*. Their experiments train the DUFM with gradient
# descent, see the DNC metrics go to zero in every layer, and find that wider models reach DNC more reliably.
#
# The DNC loss equals the optimum of the bias-free deep linear UFM with P = L + 1 factors (THEORY.md §4.1);
# `ufm.predict` returns it, with the per-layer singular values (except W_1 and H_1, whose spectra are not unique).
#
# **This notebook** (1) trains L = 2 … 5 with full-batch gradient descent from random starts, polishes with L-BFGS,
# and checks the best start against the DNC prediction with `ufm.check`; (2) follows DNC1–3 in every layer during
# training; (3) counts how often a random start reaches DNC as the width grows.

# %%
# %matplotlib inline
import os
import time

import jax

jax.config.update("jax_enable_x64", True)

import numpy as np  # noqa: E402
from IPython.display import display  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

import ufm  # noqa: E402
import ufm.metrics  # noqa: E402
import ufm.plotting  # noqa: E402

SIZE = os.environ.get("UFM_NOTEBOOK_SIZE", "full")  # "full": the figures below; "small": the test suite's size
if SIZE == "full":
    N = 5  # samples per class (n enters the optimum only through n lambda_H)
    DEPTHS, WIDTH = (2, 3, 4, 5), 32
    SEEDS = 8  # random starts per setting
    GD_STEPS, LR, POLISH_STEPS, SNAPSHOT_EVERY = 3000, 0.5, 2500, 100
    WIDTH_DEPTH, WIDTHS = 3, (2, 4, 8, 16, 32)  # success rate against width, at this depth
elif SIZE == "small":
    N = 2
    DEPTHS, WIDTH = (2,), 4
    SEEDS = 2
    GD_STEPS, LR, POLISH_STEPS, SNAPSHOT_EVERY = 200, 0.5, 200, 50
    WIDTH_DEPTH, WIDTHS = 2, (4,)  # reuses the compiled depth-2 solve
else:
    raise ValueError(f"UFM_NOTEBOOK_SIZE must be 'full' or 'small'; got {SIZE!r}")
K, LAM = 2, 5e-3  # lambda_H = lambda_W (every layer)
GAP_TOL = 1e-6  # a start "reaches DNC" if its relative loss gap is below this (ufm.check's float64 default)
T0 = time.perf_counter()
print(f"size {SIZE}: K = {K}, n = {N}, lambda = {LAM}, depths {DEPTHS}, width {WIDTH}, {SEEDS} starts, "
      f"GD lr {LR} for {GD_STEPS} steps, then L-BFGS")


def make(L, width):
    return ufm.UFM(num_classes=K, n_per_class=N, widths=(width,) * L, activation="relu", loss="mse", bias="none",
                   lam_H=LAM, lam_W=LAM)


def train(problem, seeds, key=0):
    """Full-batch gradient descent (the papers' optimiser) from `seeds` random starts, then L-BFGS (memory 50: the
    kinks at the DNC point make it slow with the default 10) from its end points; one compiled vmapped call each.
    Parameter snapshots of the GD phase every SNAPSHOT_EVERY steps."""
    keys = jax.random.split(jax.random.key(key), seeds)
    gd = ufm.solve_batch(problem, keys=keys, method="gd", lr=LR, max_steps=GD_STEPS, snapshot_every=SNAPSHOT_EVERY)
    polished = ufm.solve_batch(problem, init=gd.params, method="lbfgs", max_steps=POLISH_STEPS, memory_size=50,
                               history=False)
    return gd, polished


# %% [markdown]
# ## 1. L = 2 … 5: gradient descent reaches the DNC optimum
#
# `ufm.check` judges the best start of each depth: relative gap to the DNC loss and the kink-aware stationarity
# measure (at the DNC point many pre-activations sit exactly at the ReLU kink, where the gradient need not vanish; the
# measure takes the best one-sided slope there). The second-order (Hessian) part is skipped here: with hundreds of
# parameters and kinks it costs minutes per point.

# %%
runs = {}
print(f"{'L':>2} {'DNC loss':>12} {'best f':>12} {'rel. gap':>9} {'reached':>8} {'max DNC1':>9} {'max DNC2':>9} "
      f"{'max DNC3':>9}  verdict")
for L in DEPTHS:
    p = make(L, WIDTH)
    pred = ufm.predict(p)
    gd, sols = train(p, SEEDS)
    gaps = (np.asarray(sols.value) - pred.loss) / pred.loss
    best = int(np.argmin(gaps))
    report = ufm.check(p, sols.take(best), pred, hessian=False)
    dnc = [d for d in report.metrics["dnc"] if not d["exempt"]]
    runs[L] = dict(problem=p, pred=pred, gd=gd, sols=sols, gaps=gaps, best=best, report=report)
    print(f"{L:>2} {pred.loss:12.9f} {float(sols.value[best]):12.9f} {gaps[best]:9.1e} "
          f"{np.sum(np.abs(gaps) < GAP_TOL):>4}/{SEEDS} {max(d['dnc1'] for d in dnc):9.1e} "
          f"{max(d['dnc2_orthogonal'] for d in dnc):9.1e} {max(d['dnc3'] for d in dnc):9.1e}  {report.verdict}")

# %% [markdown]
# DNC1 = NC1 of H_l (tr(Σ_W Σ_B⁺)/K), DNC2 = distance of the class-mean Gram of H_l to the orthogonal frame, DNC3 =
# 1 − mean over the rows of W_l of the largest |cos| with a class mean of H_l (`ufm.metrics.layer_metrics`, "dnc"),
# maxima over the layers the theory constrains (layer 1 is exempt from DNC2/DNC3: its optimum is not unique).
# What `ufm.check` says about the deepest model, and what the prediction is:

# %%
deep = runs[DEPTHS[-1]]
print(deep["report"].explanation)
print(f"prediction: known = {deep['pred'].known}, {deep['pred'].structure}")
print("reference:", deep["pred"].reference)

# %%
p, params = deep["problem"], deep["sols"].take(deep["best"]).params
display(ufm.plotting.collapse_bars(ufm.metrics.layer_metrics(p, params),
                                   title=f"L = {p.L}, best start after training: collapse in every layer"))
display(ufm.plotting.singular_value_plot(p, params, predicted_W=deep["pred"].sv_W, predicted_H=deep["pred"].sv_H,
                                         title="singular values against DNC (W_1, H_1 not unique: not predicted)"))

# %% [markdown]
# ## 2. DNC1–3 in every layer during gradient descent
#
# The snapshots of the GD phase of the best start of the deepest model, through `ufm.plotting.nc1_over_training` (DNC1)
# and `ufm.metrics.layer_metrics` (DNC2, DNC3) at each snapshot. GD collapses the features within classes (DNC1) long
# before the class means reach the orthogonal frame (DNC2) and the weights align (DNC3); the printout compares the end
# of the GD phase with the polished point of section 1.

# %%
run = deep["gd"].take(deep["best"])
steps, nc1, names = ufm.plotting.nc1_over_training(p, run.snapshots)
display(ufm.plotting.training_curves(run, predicted_loss=deep["pred"].loss, nc1=nc1, nc1_steps=steps,
                                     layer_names=names, title=f"L = {p.L}: gradient descent, lr {LR}"))

used = np.flatnonzero(np.asarray(run.snapshots.step) >= 0)
per_snapshot = [ufm.metrics.layer_metrics(p, jax.tree_util.tree_map(lambda x, j=j: x[j], run.snapshots.params))["dnc"]
                for j in used]
fig = Figure(figsize=(10, 3.2), layout="constrained")
axes = fig.subplots(1, 2)
for ax, key, title in zip(axes, ("dnc2_orthogonal", "dnc3"), ("DNC2: distance to orthogonal frame", "DNC3"),
                          strict=True):
    for l in range(2, p.L + 1):
        vals = np.array([snap[l - 1][key] for snap in per_snapshot])
        ax.plot(steps, np.maximum(vals, 1e-17), color=f"C{l - 1}", label=f"layer {l}")
    ax.set(yscale="log", xlabel="GD step", title=title)
    ax.legend(fontsize=7)
display(fig)
polished = [d for d in deep["report"].metrics["dnc"] if not d["exempt"]]
for key in ("dnc1", "dnc2_orthogonal", "dnc3"):
    print(f"max {key} over layers 2..L: end of GD (step {steps[-1]}) {max(d[key] for d in per_snapshot[-1][1:]):.1e}, "
          f"after the L-BFGS polish {max(d[key] for d in polished):.1e}")

# %% [markdown]
# ## 3. How often does a random start reach DNC, as the width grows?
#
# At depth L = `WIDTH_DEPTH`, the same recipe from many random starts for each width (d_1 = … = d_L). A start counts as
# reaching DNC when its relative loss gap is below `GAP_TOL`; the others end at local minima above it.

# %%
rates = {}
for width in WIDTHS:
    if width == WIDTH and WIDTH_DEPTH in runs:
        gaps = runs[WIDTH_DEPTH]["gaps"]
    else:
        p = make(WIDTH_DEPTH, width)
        _, sols = train(p, SEEDS, key=1)
        f_dnc = ufm.predict(p).loss
        gaps = (np.asarray(sols.value) - f_dnc) / f_dnc
    rates[width] = gaps
    ends = np.unique(np.round(gaps[np.abs(gaps) >= GAP_TOL], 3))
    print(f"width {width:>3}: {np.sum(np.abs(gaps) < GAP_TOL):>2}/{gaps.size} starts reach DNC; "
          f"the others end {ends.tolist()} above it (relative)")

fig = Figure(figsize=(4.5, 3.2), layout="constrained")
ax = fig.subplots()
ax.plot(list(rates), [np.mean(np.abs(g) < GAP_TOL) for g in rates.values()], "o-")
ax.set(xscale="log", xlabel="width d", ylabel="fraction of starts reaching DNC", ylim=(-0.05, 1.05),
       title=f"L = {WIDTH_DEPTH}, {SEEDS} starts per width")
ax.set_xticks(list(rates), [str(w) for w in rates])
display(fig)

# %% [markdown]
# ## Verdict

# %%
n_match = sum(r["report"].verdict == "matches" for r in runs.values())
frac = [np.mean(np.abs(g) < GAP_TOL) for g in rates.values()]
print(f"{n_match}/{len(runs)} depths: the best start matches the DNC loss (ufm.check 'matches', first order); "
      f"largest |gap| of a best start {max(abs(r['gaps'][r['best']]) for r in runs.values()):.1e}.")
below = [L for L, r in runs.items() if r["report"].verdict == "below-prediction"]
print(f"No start went below the DNC loss: {not below and all(np.all(r['gaps'] > -GAP_TOL) for r in runs.values())} "
      "(the theorem says none can).")
print(f"Success rate against width {list(rates)}: {[f'{x:.0%}' for x in frac]}; "
      f"{'non-decreasing' if np.all(np.diff(frac) >= 0) else 'not monotone'} in the width here.")
print(f"Wall time {time.perf_counter() - T0:.0f} s at size {SIZE}.")
