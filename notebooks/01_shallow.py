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
# # 1 · The shallow UFM: MSE and cross-entropy, with and without a bias
#
# **The claims.** For the shallow unconstrained features model
#
# $$f(W, H, b) = \text{fit}(WH + b\mathbf 1^\top, Y) + \tfrac{\lambda_W}{2}\lVert W\rVert_F^2
#   + \tfrac{\lambda_H}{2}\lVert H\rVert_F^2 \;(+\tfrac{\lambda_b}{2}\lVert b\rVert^2),$$
#
# * cross-entropy (Zhu et al. 2021, NeurIPS, Thm 3.1 *[recalled]*): every global minimiser is a **simplex ETF**
#   (classifier rows and class means), with h = √(λ_W/(nλ_H)) w_k, and b* = 0 unless the bias is free;
# * MSE (Zhou et al. 2022, ICML; Tirer & Bruna 2022 *[recalled]*): a **simplex ETF** with a free bias, an
#   **orthogonal frame** without one, and in between with a regularised bias (the centred means stay an ETF);
# * in both, every other critical point is a strict saddle *[recalled]*, so gradient methods from random starts find
#   the global minimum; and beyond a threshold of the collapse parameter (ρ = K√(nλ_Wλ_H) ≥ 1 for MSE,
#   K√(nλ_Wλ_H) ≥ 1 for CE) the zero solution W = H = 0 takes over.
#
# The closed forms (THEORY.md §1–2) are in `ufm.predict`. This notebook solves all six (loss, bias) combinations from
# random starts, checks each against the prediction with `ufm.check`, draws the geometry, and sweeps λ across the
# threshold.

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
    K, N, D = 3, 10, 4  # classes, samples per class, feature width d
    CONFIGS = [(loss, bias) for loss in ("mse", "ce") for bias in ("none", "free", "reg")]
    SEEDS, SWEEP_POINTS = 8, 24  # random starts per configuration; lambda values in the threshold sweep
elif SIZE == "small":
    K, N, D = 3, 2, 3
    CONFIGS = [("mse", "free"), ("ce", "none")]  # every new configuration costs a compile (seconds)
    SEEDS, SWEEP_POINTS = 2, 2  # equal: the sweep reuses the compiled solve
else:
    raise ValueError(f"UFM_NOTEBOOK_SIZE must be 'full' or 'small'; got {SIZE!r}")
LAM, LAM_B = 1e-2, 0.5  # lambda_H = lambda_W, and lambda_b for bias="reg"
REACHED = 1e-8  # a start "reaches" the prediction if its relative loss gap is below this
T0 = time.perf_counter()
print(f"size {SIZE}: K = {K}, n = {N}, d = {D}, lambda = {LAM}, lambda_b = {LAM_B}, {SEEDS} starts per configuration")


def make(loss, bias, lam=LAM):
    return ufm.UFM(num_classes=K, n_per_class=N, widths=(D,), loss=loss, bias=bias, lam_H=lam, lam_W=lam,
                   lam_b=LAM_B if bias == "reg" else 0.0)


# %% [markdown]
# ## 1. Six configurations from random starts
#
# One compiled, vmapped L-BFGS call per configuration solves all the random starts (`ufm.solve_batch`). For each
# configuration: the predicted optimal loss, the best loss found, the relative gap, how many starts reach the
# prediction, the collapse metrics of the best start (`ufm.metrics.layer_metrics`: NC1 and the distance of the class
# means to the geometry the theory predicts) and `ufm.check`'s verdict (gap, gradient norm, Hessian spectrum with the
# rotation symmetry projected out).

# %%
runs = {}
print(f"{'loss':>4} {'bias':>4} {'geometry':>10} {'predicted f*':>13} {'best f':>13} {'gap':>9} {'reached':>7} "
      f"{'NC1':>8} {'NC2':>8}  verdict")
for loss, bias in CONFIGS:
    p = make(loss, bias)
    pred = ufm.predict(p)
    sols = ufm.solve_batch(p, keys=jax.random.split(jax.random.key(0), SEEDS), method="lbfgs")
    gaps = (np.asarray(sols.value) - pred.loss) / pred.loss
    best = int(np.argmin(gaps))
    report = ufm.check(p, sols.take(best), pred)
    f = report.metrics["features"][0]  # H (the free features)
    runs[loss, bias] = dict(problem=p, pred=pred, sols=sols, gaps=gaps, best=best, report=report)
    print(f"{loss:>4} {bias:>4} {str(f['nc2_target']):>10} {pred.loss:13.10f} {float(sols.value[best]):13.10f} "
          f"{gaps[best]:9.1e} {np.sum(np.abs(gaps) < REACHED):>3}/{SEEDS} {f['nc1']:8.1e} "
          f"{f['nc2'] if f['nc2'] is not None else np.nan:8.1e}  {report.verdict}")

# %% [markdown]
# NC2 is the distance of the class-mean Gram matrix to the predicted geometry (`ufm.metrics.nc2_target`: the simplex
# ETF of the centred means, or the orthogonal frame of the uncentred ones); "None" means the theory predicts neither
# (the regularised MSE bias gives a blend, compared below through the norms and the bias instead).
#
# The norms and the bias, found against predicted:

# %%
print(f"{'loss':>4} {'bias':>4} {'||W||_F found/pred':>22} {'||H||_F found/pred':>22}  b found / b predicted")
for (loss, bias), r in runs.items():
    params = r["sols"].take(r["best"]).params
    pred = r["pred"]
    nW, nH = float(np.linalg.norm(params.Ws[0])), float(np.linalg.norm(params.H))
    b = "-" if params.b is None else np.array2string(np.asarray(params.b), precision=6)
    bp = "-" if pred.b is None else np.array2string(np.asarray(pred.b), precision=6)
    print(f"{loss:>4} {bias:>4} {nW:10.6f}/{pred.norms_W[0]:10.6f} {nH:10.6f}/{pred.norms_H[0]:10.6f}  {b} / {bp}")
print("(CE with a free bias: b is any constant vector, 'nan' in the prediction; only its centred part, 0, is fixed)")
if ("ce", "free") in runs:
    b = np.asarray(runs["ce", "free"]["sols"].take(runs["ce", "free"]["best"]).params.b)
    print(f"CE, free bias: centred b = {np.array2string(b - b.mean(), precision=2)}")

# %%
print("Explanations of ufm.check for the best start of each configuration:")
for (loss, bias), r in runs.items():
    print(f"  {loss}/{bias}: {r['report'].explanation}")

# %% [markdown]
# ## 2. The pictures: simplex ETF with a bias, orthogonal frame without
#
# `ufm.plotting.class_means_plot` projects the class means (and every sample) of H and of the output onto the top
# singular directions of the class-mean matrix; the origin stays the origin. With a free bias the centred means form a
# regular simplex (pairwise angle arccos(−1/(K−1)) = 120° for K = 3); without a bias the uncentred means are
# orthogonal (90°).

# %%
for key in [("mse", "free"), ("mse", "none"), ("ce", "none")]:
    if key in runs:
        r = runs[key]
        p, params = r["problem"], r["sols"].take(r["best"]).params
        dim = 2 if r["pred"].target_gram[0] == "etf" else 3
        display(ufm.plotting.class_means_plot(p, params, dim=dim, title=f"{key[0].upper()}, bias {key[1]}"))

# %%
r = runs[CONFIGS[0]]
display(ufm.plotting.gram_heatmaps(r["problem"], r["sols"].take(r["best"]).params,
                                   title=f"{CONFIGS[0][0].upper()}, bias {CONFIGS[0][1]}: class-mean Grams"))
display(ufm.plotting.training_curves(r["sols"].take(r["best"]), predicted_loss=r["pred"].loss,
                                     title=f"{CONFIGS[0][0].upper()}, bias {CONFIGS[0][1]}: L-BFGS, one start"))

# %% [markdown]
# ## 3. The λ threshold where the zero solution takes over
#
# Along λ_H = λ_W = λ the control parameter of `ufm.predict` (ρ = K√(nλ_Wλ_H) for MSE, α + K√(nλ_Wλ_H) for CE) is
# proportional to λ; the zero solution is optimal from `control_threshold` on (1 in both cases). One vmapped call
# solves the whole λ grid (the lambdas are array leaves: no recompile). The grid spans 0.1 to 3 times the threshold.

# %%
sweeps = {}
for key in [("mse", "free"), ("ce", "none")]:
    if key not in runs:
        continue
    p = runs[key]["problem"]
    pred = runs[key]["pred"]
    lam_star = LAM * pred.control_threshold / pred.control_value  # control value is proportional to lambda
    lams = lam_star * np.geomspace(0.1, 3.0, SWEEP_POINTS)
    sols = ufm.solve_batch(p, keys=jax.random.split(jax.random.key(1), lams.size), lam_H=lams, lam_W=lams,
                           method="lbfgs")
    preds = [ufm.predict(p.replace(lam_H=lam, lam_W=lam)) for lam in lams]
    value = np.asarray(sols.value)
    loss_pred = np.array([q.loss for q in preds])
    control = np.array([q.control_value for q in preds])
    norm_WH = np.array([np.linalg.norm(np.asarray(sols.params.Ws[0][i] @ sols.params.H[i])) for i in range(lams.size)])
    sweeps[key] = dict(lams=lams, control=control, value=value, loss_pred=loss_pred, norm_WH=norm_WH,
                       regime=[q.regime for q in preds], threshold=pred.control_threshold)

fig = Figure(figsize=(10, 3.4), layout="constrained")
ax1, ax2 = fig.subplots(1, 2)
for i, (key, s) in enumerate(sweeps.items()):
    ax1.plot(s["control"], s["loss_pred"], "-", color=f"C{i}", label=f"{key[0].upper()}/{key[1]}: ufm.predict")
    ax1.plot(s["control"], s["value"], "o", color=f"C{i}", mfc="none", label=f"{key[0].upper()}/{key[1]}: solver")
    ax2.plot(s["control"], np.maximum(s["norm_WH"], 1e-17), "o-", color=f"C{i}", mfc="none",
             label=f"{key[0].upper()}/{key[1]}")
for ax in (ax1, ax2):
    ax.axvline(1.0, color="k", ls=":", lw=1)
    ax.set_xscale("log")
    ax.set_xlabel("control parameter (ρ for MSE, α + K√(nλ_Wλ_H) for CE)")
ax1.set(ylabel="loss", title="optimal loss: collapse, then zero")
ax2.set(yscale="log", ylabel=r"$\|WH\|_F$", title="the zero solution takes over at the threshold")
ax1.legend(fontsize=7)
ax2.legend(fontsize=7)
display(fig)

# %%
for key, s in sweeps.items():
    gap = (s["value"] - s["loss_pred"]) / s["loss_pred"]
    zero_found = s["norm_WH"] < 1e-6
    zero_pred = np.array([g == "zero" for g in s["regime"]])
    print(f"{key[0].upper()}/{key[1]}: max |relative gap| over the sweep {np.max(np.abs(gap)):.1e}; "
          f"zero solution found at {zero_found.sum()}/{zero_found.size} lambdas, predicted at {zero_pred.sum()}; "
          f"agreement on which side of the threshold: {np.mean(zero_found == zero_pred):.0%}")

# %% [markdown]
# ## Verdict

# %%
n_match = sum(r["report"].verdict == "matches" for r in runs.values())
all_reach = sum(np.all(np.abs(r["gaps"]) < REACHED) for r in runs.values())
print(f"{n_match}/{len(runs)} configurations: the best start matches the prediction (ufm.check 'matches'); "
      f"in {all_reach}/{len(runs)} every one of the {SEEDS} random starts reaches it (|gap| < {REACHED:g}), "
      "as the strict-saddle landscape predicts.")
worst = max(float(np.max(np.abs((s["value"] - s["loss_pred"]) / s["loss_pred"]))) for s in sweeps.values())
sides = all(np.array_equal(s["norm_WH"] < 1e-6, np.array([g == "zero" for g in s["regime"]])) for s in sweeps.values())
print(f"Threshold sweep: largest |relative gap| {worst:.1e}; the solver finds the zero solution "
      f"{'exactly where' if sides else 'NOT only where'} ufm.predict puts the zero regime.")
print(f"Wall time {time.perf_counter() - T0:.0f} s at size {SIZE}.")
