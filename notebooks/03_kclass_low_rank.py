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
# # 3 · K-class deep ReLU UFM: deep neural collapse against low rank (Súkeník et al. 2024)
#
# **The claim.** Súkeník, Lampert, Mondelli (NeurIPS 2024), *Neural collapse versus low-rank bias: is deep neural
# collapse really optimal?*: "as soon as we go beyond two layers or two classes, DNC stops being optimal", because
# multi-layer weight decay favours solutions of lower rank than collapse. Their construction takes K = r(r−1)/2 classes
# as the edges of the complete graph K_r (a strongly regular graph, SRG); its class means have rank r before the last
# ReLU. Their Fig. 2: a 4-layer DUFM with K = 10, every λ = 0.004, width 30, trained by gradient descent (lr 0.5),
# ends below the DNC loss, near the SRG loss, with low-rank class means. Fig. 3 (left): the closed-form ratio
# L_SRG / L_DNC falls with r and with depth. They also report that the rank decreases as weight decay grows
# *[figure numbers and theorem statement recalled]*.
#
# What the library knows (THEORY.md §4.3; `ufm.predict`): the DNC loss (exact, §4.1) and an explicit SRG family point
# (an **upper bound** on the optimum); for K = 10, L = 4, λ = 0.004 the SRG point has 0.816 × the DNC loss, so DNC is
# provably not optimal there. The true optimum is unknown. THEORY.md also warns that random L-BFGS starts at K = 10
# mostly end at DNC or near 0.845 × the DNC loss, not at the SRG value.
#
# **This notebook** (1) runs a reduced Fig. 2 with the paper's optimiser (GD, lr 0.5) and with L-BFGS, and reports
# where each start ends relative to the DNC and SRG losses; (2) looks at the rank of the class means found; (3) draws
# the closed-form ratio curves of Fig. 3 (left); (4) sweeps the weight decay and reports the rank at convergence.

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
    K, L, WIDTH, N = 10, 4, 30, 1  # the paper's Fig. 2 (K = 10 = r(r-1)/2 with r = 5); n = 1 sample per class
    SEEDS = 10  # random starts
    GD_STEPS, LR, POLISH_STEPS = 20000, 0.5, 10000
    RATIO_R, RATIO_L = range(3, 9), (3, 4, 5)  # Fig. 3 (left)
    SWEEP_LAMS, SWEEP_SEEDS = np.array([0.001, 0.002, 0.004, 0.008, 0.016]), 2  # lams x seeds = SEEDS: no recompile
elif SIZE == "small":
    K, L, WIDTH, N = 3, 3, 4, 1  # K = 3 = r(r-1)/2 with r = 3
    SEEDS = 2
    GD_STEPS, LR, POLISH_STEPS = 200, 0.5, 200
    RATIO_R, RATIO_L = range(3, 5), (3, 4)
    SWEEP_LAMS, SWEEP_SEEDS = np.array([0.002, 0.008]), 1
else:
    raise ValueError(f"UFM_NOTEBOOK_SIZE must be 'full' or 'small'; got {SIZE!r}")
LAM = 0.004  # every lambda (lambda_H and each lambda_W), as in the paper's Fig. 2
RANK_RTOL = 1e-3  # numerical rank: singular values above this times the largest
T0 = time.perf_counter()
print(f"size {SIZE}: K = {K}, L = {L}, width {WIDTH}, n = {N}, lambda = {LAM}, {SEEDS} starts")

problem = ufm.UFM(num_classes=K, n_per_class=N, widths=(WIDTH,) * L, activation="relu", loss="mse", bias="none",
                  lam_H=LAM, lam_W=LAM)
pred = ufm.predict(problem)
dnc = ufm.predict(problem, configuration="dnc")
print(f"DNC loss {pred.dnc_loss:.8f}; SRG point loss {pred.srg_loss:.8f} (ratio {pred.srg_loss / pred.dnc_loss:.4f}); "
      f"best family member {pred.srg_family_loss:.8f}")
print(f"ufm.predict: configuration {pred.configuration!r}, known = {pred.known}: {pred.reason}")

# %% [markdown]
# ## 1. A reduced Fig. 2: where do gradient descent and L-BFGS end?
#
# Gradient descent with the paper's learning rate from `SEEDS` random starts (one vmapped call), then L-BFGS from its
# end points (to settle each start in its basin); and, for comparison, L-BFGS from the same random starts. Each end
# point is compared with the DNC loss (`ufm.check` against the "dnc" prediction) and with the SRG loss.

# %%
keys = jax.random.split(jax.random.key(0), SEEDS)
gd = ufm.solve_batch(problem, keys=keys, method="gd", lr=LR, max_steps=GD_STEPS, history_every=10)
gd_polished = ufm.solve_batch(problem, init=gd.params, method="lbfgs", max_steps=POLISH_STEPS, history=False)
starts = jax.vmap(lambda k: ufm.init_params(problem, k))(keys)  # the random starts GD used
lbfgs = ufm.solve_batch(problem, init=starts, method="lbfgs", max_steps=POLISH_STEPS, history=False)

ends = {"GD (paper's recipe)": gd, "GD, then L-BFGS": gd_polished, "L-BFGS": lbfgs}
print(f"{'run':>20}  f / f_DNC for each start (sorted)")
for name, s in ends.items():
    print(f"{name:>20}  {np.array2string(np.sort(np.asarray(s.value)) / pred.dnc_loss, precision=4)}")
print(f"{'SRG point':>20}  {pred.srg_loss / pred.dnc_loss:.4f}")

# %%
reports = [ufm.check(problem, gd_polished.take(i), dnc, hessian=False) for i in range(SEEDS)]
verdicts = [r.verdict for r in reports]
print("ufm.check of each polished GD start against the DNC prediction:",
      {v: verdicts.count(v) for v in sorted(set(verdicts))})
best = int(np.argmin(np.asarray(gd_polished.value)))
print("best start:", reports[best].explanation)
vals = np.asarray(gd_polished.value)
print(f"best loss / DNC loss = {vals[best] / pred.dnc_loss:.4f}; "
      f"best loss / SRG loss = {vals[best] / pred.srg_loss:.4f}")

# %%
display(ufm.plotting.training_curves(gd.take(best), predicted_loss=pred.dnc_loss, history_every=10,
                                     title=f"GD, lr {LR}: loss measured against the DNC loss (red: below it)"))

# %% [markdown]
# ## 2. The rank of the class means
#
# At DNC the class means of every layer l ≥ 2 are a (scaled) orthogonal frame: K equal singular values. The SRG
# configuration has rank r before the last ReLU (Z_L). The singular values of the class means of each layer of the best
# start, normalised by the largest:

# %%
def class_mean_rank(entry):
    """Singular values of the class means above RANK_RTOL times the largest (entry: a layer_metrics feature)."""
    s = np.asarray(entry["class_mean_singular_values"])
    return int(np.sum(s > RANK_RTOL * s[0])) if s[0] > 0 else 0


m = ufm.metrics.layer_metrics(problem, gd_polished.take(best).params, rank_rtol=RANK_RTOL)
fig = Figure(figsize=(10, 3.2), layout="constrained")
ax = fig.subplots()
for i, f in enumerate(m["features"]):
    s = np.asarray(f["class_mean_singular_values"])
    rank = class_mean_rank(f)
    ax.plot(np.arange(1, s.size + 1), np.maximum(s / s[0], 1e-17), "o-", color=f"C{i}", ms=4,
            label=f"{f['name']} (rank {rank})")
    print(f"{f['name']:>4}: class-mean rank {rank} of K = {K}; normalised singular values "
          f"{np.array2string(s / s[0], precision=3)}")
ax.axhline(RANK_RTOL, color="k", ls=":", lw=1)
ax.set(yscale="log", xlabel="index", ylabel="σ_i(M_l) / σ_1(M_l)", title="class-mean spectra of the best start")
ax.legend(fontsize=7, ncol=2)
display(fig)

# %% [markdown]
# ## 3. The closed-form ratio curves of Fig. 3 (left)
#
# `ufm.srg_ratio(r, L)`: L_SRG / L_DNC for K = r(r−1)/2 classes, every λ = 0.004, no training. The pure SRG member (the
# paper's construction) and the best member of the SRG family (which contains DNC, so its ratio is ≤ 1). Below 1, DNC
# is not a global optimum.

# %%
fig = Figure(figsize=(9, 3.2), layout="constrained")
ax1, ax2 = fig.subplots(1, 2, sharey=True)
ratios = {}
print("     " + "".join(f"  r={r} (K={r * (r - 1) // 2:>2})" for r in RATIO_R))
for j, depth in enumerate(RATIO_L):
    pure = [ufm.srg_ratio(r, depth, LAM) for r in RATIO_R]
    family = [ufm.srg_ratio(r, depth, LAM, member="family") for r in RATIO_R]
    ax1.plot(list(RATIO_R), pure, "o-", color=f"C{j}", label=f"L = {depth}")
    ax2.plot(list(RATIO_R), family, "o-", color=f"C{j}", label=f"L = {depth}")
    print(f"L = {depth} pure   " + "".join(f"{x:15.4f}" for x in pure))
    print(f"L = {depth} family " + "".join(f"{x:15.4f}" for x in family))
    ratios[depth] = pure
for ax, title in ((ax1, "pure SRG member (the paper's construction)"), (ax2, "best SRG-family member")):
    ax.axhline(1.0, color="k", ls=":", lw=1)
    ax.set(xlabel="r  (K = r(r-1)/2)", title=title)
    ax.legend(fontsize=7)
ax1.set_ylabel(r"$L_{SRG} / L_{DNC}$")
display(fig)
for depth, pure in ratios.items():
    r_min = list(RATIO_R)[int(np.argmin(pure))]
    print(f"L = {depth}: pure-SRG ratio non-increasing in r: {bool(np.all(np.diff(pure) <= 0))} (smallest at r = "
          f"{r_min}); below 1 from r = {next((r for r, x in zip(RATIO_R, pure) if x < 1), None)}")
deeper = all(np.all(np.asarray(ratios[b]) <= np.asarray(ratios[a])) for a, b in zip(RATIO_L, RATIO_L[1:]))
print(f"ratio non-increasing in the depth L at every r: {deeper}")

# %% [markdown]
# ## 4. Rank at convergence against the weight decay
#
# The same model (K, L, width) for several λ (λ_H = every λ_W = λ), `SWEEP_SEEDS` random starts each, GD then L-BFGS,
# all in one vmapped call (the lambdas are array leaves). For each end point: the loss against the DNC loss at that λ,
# and the rank of the class means before the last ReLU (Z_L) and of the last features H_L.

# %%
lams = np.repeat(SWEEP_LAMS, SWEEP_SEEDS)
keys = jax.random.split(jax.random.key(1), lams.size)
sw_gd = ufm.solve_batch(problem, keys=keys, lam_H=lams, lam_W=lams, method="gd", lr=LR, max_steps=GD_STEPS,
                        history_every=10)
sw = ufm.solve_batch(problem, init=sw_gd.params, lam_H=lams, lam_W=lams, method="lbfgs", max_steps=POLISH_STEPS,
                     history=False)
rows = []
for i, lam in enumerate(lams):
    p_i = problem.replace(lam_H=lam, lam_W=lam)
    m_i = ufm.metrics.layer_metrics(p_i, sw.take(i).params, rank_rtol=RANK_RTOL)
    rank = {f["name"]: class_mean_rank(f) for f in m_i["features"]}
    f_dnc = ufm.predict(p_i, configuration="dnc").loss
    rows.append((lam, float(sw.value[i]) / f_dnc, rank[f"Z_{L}"], rank[f"H_{L}"]))
    print(f"lambda {lam:.4f}: f / f_DNC = {rows[-1][1]:.4f}; rank of Z_{L} = {rank[f'Z_{L}']}, "
          f"of H_{L} = {rank[f'H_{L}']} (class-mean ranks, rtol {RANK_RTOL:g})")
rows = np.array(rows)

fig = Figure(figsize=(9, 3.2), layout="constrained")
ax1, ax2 = fig.subplots(1, 2)
ax1.plot(rows[:, 0], rows[:, 2], "o", mfc="none", label=f"$Z_{L}$ (before the last ReLU)")
ax1.plot(rows[:, 0], rows[:, 3], "x", label=f"$H_{L}$")
ax1.axhline(K, color="k", ls=":", lw=1)
ax1.set(xscale="log", xlabel=r"$\lambda$", ylabel="numerical rank", title="rank at convergence (DNC: K)")
ax1.legend(fontsize=7)
ax2.plot(rows[:, 0], rows[:, 1], "o", mfc="none")
ax2.axhline(1.0, color="k", ls=":", lw=1)
ax2.set(xscale="log", xlabel=r"$\lambda$", ylabel=r"$f / f_{DNC}$", title="loss against the DNC loss")
display(fig)

# %% [markdown]
# ## Verdict

# %%
below = vals < pred.dnc_loss * (1 - 1e-6)
print(f"Fig. 2 (reduced): {below.sum()}/{SEEDS} GD starts (after the L-BFGS polish) end below the DNC loss; "
      f"the best at {vals[best] / pred.dnc_loss:.4f} x DNC, against {pred.srg_loss / pred.dnc_loss:.4f} x DNC for the "
      f"SRG point; L-BFGS from the same starts: {np.sum(np.asarray(lbfgs.value) < pred.dnc_loss * (1 - 1e-6))}/{SEEDS}"
      " below DNC.")
reached_srg = np.sum(vals <= pred.srg_loss * (1 + 1e-3))
print(f"Starts within 0.1% of the SRG loss or below it: {reached_srg}/{SEEDS}.")
outcome = ("reproduced" if below.any() and reached_srg else "below DNC, not near SRG" if below.any()
           else "NOT reproduced")
print(f"Paper's claim 'GD ends below DNC, near the SRG loss': {outcome} at this size.")
ratio = rows[:, 1].reshape(-1, SWEEP_SEEDS)
rank_best = rows[:, 2].reshape(-1, SWEEP_SEEDS)[np.arange(SWEEP_LAMS.size), np.argmin(ratio, axis=1)]
print("Fig. 3 (left), 'the ratio falls with r and with L': "
      + "; ".join(f"L = {d}: {'falls' if np.all(np.diff(x) <= 0) else 'not monotone'} in r" for d, x in ratios.items())
      + f"; {'falls' if deeper else 'not monotone'} in L.")
print(f"Rank of Z_{L} of the lowest-loss start at each lambda {SWEEP_LAMS.tolist()}: {rank_best.astype(int).tolist()} "
      f"({'non-increasing' if np.all(np.diff(rank_best) <= 0) else 'not monotone'} in lambda; DNC has rank {K}).")
mid = [f for f in m["features"] if f["name"] not in ("H_1", "out", f"H_{L}")]
print("Class-mean ranks of the best start, intermediate layers: "
      + ", ".join(f"{f['name']} {class_mean_rank(f)}" for f in mid) + f" (DNC: {K} in every layer).")
print(f"Wall time {time.perf_counter() - T0:.0f} s at size {SIZE}.")

# %% [markdown]
# ## Exploration: the best point found, and an atlas over K and L
#
# `ufm.explore` (README, "Exploration") spends a budget of starts on a portfolio: the explicit DNC and SRG points
# (so it never returns anything above them), random starts at several scales, low-rank starts, perturbed DNC/SRG,
# continuation in λ, low-rank truncation of found minima (every pre-activation projected to rank r, then
# re-solved), basin hopping and rank-reducing hops, all through one compiled `ufm.solve_batch` program. It
# deduplicates the local minima by loss and by the spectra of the class-mean Grams (rotation-invariant), after
# polishing the lowest ones at their ReLU kinks, and describes the best one. Below: one small search (the same
# size at both notebook sizes, K = 3, L = 4, width 6,
# 8 starts; seconds), then the atlas stored by `python -m benchmarks.bench_explore atlas` in
# `benchmarks/results/atlas*.json` (loaded, not recomputed: each setting is a separate compile and search; per
# setting the lowest stored run is shown). Every entry is a numerical **upper bound** on the global optimum (a
# feasible point), not a proof that it is optimal.

# %%
import json  # noqa: E402
from pathlib import Path  # noqa: E402

p3 = ufm.UFM(num_classes=3, n_per_class=1, widths=(6,) * 4, activation="relu", loss="mse", bias="none",
             lam_H=LAM, lam_W=LAM)
ex = ufm.explore(p3, max_starts=8, key=0, batch_size=8, steps=500, check_hessian=False)
print(ex.message)
print("explicit points: " + ", ".join(f"{k} {v / ex.dnc_loss:.4f} x DNC" for k, v in ex.explicit.items()))
for mm in ex.minima[:5]:
    print(f"  {mm.value / ex.dnc_loss:.4f} x DNC, reached by {mm.count} start(s), first by {mm.strategy!r}: "
          f"{mm.description}")
print(f"check against DNC: {ex.check_dnc.verdict}: {ex.check_dnc.explanation}")
display(ufm.plotting.exploration_minima(ex))
display(ufm.plotting.gram_spectra_plot(p3, ex.params, reference=ufm.construct(p3, "dnc")))

# %%
results = Path("../benchmarks/results")
if not results.exists():
    results = Path("benchmarks/results")  # executed from the repository root
best_rows = {}  # (K, L) -> the lowest row over every stored atlas run (each row is a feasible point: an upper bound)
for f in sorted(results.glob("atlas*.json")):
    run = json.loads(f.read_text())
    for r in run["rows"]:
        r = dict(r, file=f.name, starts=r.get("starts", run.get("max_starts")))
        if (r["K"], r["L"]) not in best_rows or r["ratio"] < best_rows[r["K"], r["L"]]["ratio"]:
            best_rows[r["K"], r["L"]] = r
rows = [best_rows[k] for k in sorted(best_rows, key=lambda kl: (kl[1], kl[0]))]
print(f"atlas: {len(rows)} settings (the lowest of the stored runs per setting), lambda = {LAM}")
print(f"{'K':>3} {'L':>2} {'width':>5}  {'best/DNC':>8}  {'published/DNC':>13}  beats  starts  "
      "structure of the best point")
for r in rows:
    print(f"{r['K']:>3} {r['L']:>2} {r['width']:>5}  {r['ratio']:>8.4f}  {r['published_ratio']:>13.4f}  "
          f"{'yes' if r['beats_published'] else 'no ':>5}  {r['starts']!s:>6}  {r['structure']}")
if rows:
    Ks = sorted({r["K"] for r in rows})
    Ls = sorted({r["L"] for r in rows})
    grid = np.full((len(Ls), len(Ks)), np.nan)
    for r in rows:
        grid[Ls.index(r["L"]), Ks.index(r["K"])] = r["ratio"]
    fig = Figure(figsize=(1.0 * len(Ks) + 2, 0.6 * len(Ls) + 1.5), layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(grid, cmap="viridis_r", vmin=np.nanmin(grid), vmax=1.0)
    for i in range(len(Ls)):
        for j in range(len(Ks)):
            if np.isfinite(grid[i, j]):
                beats = best_rows[Ks[j], Ls[i]]["beats_published"]
                ax.text(j, i, f"{grid[i, j]:.3f}" + ("*" if beats else ""), ha="center", va="center", fontsize=8,
                        color="w")
    ax.set(xticks=range(len(Ks)), xticklabels=Ks, yticks=range(len(Ls)), yticklabels=Ls, xlabel="K", ylabel="L",
           title=r"best found / DNC loss ($\lambda$ = 0.004, upper bounds; * below the published point)")
    fig.colorbar(im, ax=ax)
    display(fig)
