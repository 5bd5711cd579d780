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
# # 5 · Collapse in a real network: per layer, and the fine structure under coarse labels
#
# The UFM frees the penultimate features from the data. How close does a real trained network come? Two experiments
# from the papers that study it, on scikit-learn's handwritten digits (8×8 images, K = 10; `ufm.networks`):
#
# * **Per-layer collapse** (Parker, Onal, Stengel, Intrater 2023, *Neural collapse in the intermediate hidden layers
#   of classification neural networks*; also Rangamani et al. 2023): trained past zero training error, an MLP's
#   within-class variability (NC1) falls **with depth**, and the class means open towards the simplex ETF, most in the
#   last layers. We set the network's last layer beside the shallow UFM with the same K, class sizes, loss and weight
#   decay (`ufm.networks.ufm_reference`, its optimum from `ufm.predict`).
# * **Fine-grained structure** (Yang, Steinhardt, Hu 2023, *Are neurons actually collapsed? On the fine-grained
#   structure in neural representations*): train on **superclasses** (pairs of digits); the penultimate features of a
#   superclass still carry its fine labels, which k-means recovers without labels, well above the trivial baseline,
#   although NC1 on the superclass labels is small. (Their networks are ResNets on CIFAR; here a small MLP on digits.)
#
# These are measurements on a real network, not a UFM optimum: the verdicts below are observations with numbers, and
# the UFM numbers are what complete collapse would look like.

# %%
# %matplotlib inline
import os
import time

import jax

jax.config.update("jax_enable_x64", True)

import matplotlib.pyplot as plt  # noqa: E402  (ufm.networks' plots use pyplot; closed after display)
import numpy as np  # noqa: E402
from IPython.display import display  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

import ufm.networks as nets  # noqa: E402

SIZE = os.environ.get("UFM_NOTEBOOK_SIZE", "full")  # "full": the figures below; "small": the test suite's size
if SIZE == "full":
    N_PER_CLASS = 150  # balanced subset of the digits (the smallest class has 174), so the balanced UFM applies
    WIDTHS = (64, 64, 64, 64)
    STEPS, RECORD = 1500, [0, 50, 100, 200, 400, 800, 1500]
    FINE_WIDTHS, FINE_STEPS, TEST_PER_CLASS = (64, 64, 64), 1500, 30
elif SIZE == "small":
    N_PER_CLASS = 12
    WIDTHS = (16, 16)
    STEPS, RECORD = 40, [0, 40]
    FINE_WIDTHS, FINE_STEPS, TEST_PER_CLASS = (16, 16), 40, 8  # the held-out set must hold every fine digit
else:
    raise ValueError(f"UFM_NOTEBOOK_SIZE must be 'full' or 'small'; got {SIZE!r}")
WEIGHT_DECAY = 1e-3  # lambda in lambda/2 sum_l ||W_l||^2 (weights only); the UFM's lambda_W (and lambda_H)
T0 = time.perf_counter()
data = nets.load_digits(N_PER_CLASS, seed=0)
print(f"size {SIZE}: {data.name}, K = {data.num_classes}, N = {data.N}, p = {data.p}; MLP widths {WIDTHS}, "
      f"MSE, Adam, weight decay {WEIGHT_DECAY}, {STEPS} full-batch steps")

# %% [markdown]
# ## 1. Per-layer collapse during training
#
# A ReLU MLP (biases in every layer, MSE, Adam at the library's default rate, full batch), with its parameters recorded
# at `RECORD` steps; `ufm.networks.layer_metrics` measures every layer (input, hidden layers, output) at each of them.

# %%
result = nets.train(data, WIDTHS, loss="mse", weight_decay=WEIGHT_DECAY, steps=STEPS, record_steps=RECORD, key=0)
lm = nets.layer_metrics(result, data)
print(f"training error {result.error:.3f} (zero from step {result.zero_error_step}); objective {result.loss:.5f}")
print(f"{'step':>6}  NC1 per layer  " + "  ".join(f"{name:>8}" for name in lm.layers))
for r, step in enumerate(lm.steps):
    print(f"{step:>6}  {'':13}  " + "  ".join(f"{v:8.2e}" for v in lm.nc1[r]))

# %%
ref = nets.ufm_reference(result, data, depth=1)
fig = nets.plot_layer_metrics(lm, reference=ref)
display(fig)
plt.close(fig)

# %% [markdown]
# The stars are the values at the UFM optimum for the layers the shallow UFM stands for (the penultimate features and
# the output): complete collapse, NC1 = 0, an ETF. How far is the network from it? `ufm_reference` evaluates the UFM
# objective at the network's own penultimate features and last layer (after the free rescaling of features against
# weights), against the UFM's predicted optimum:

# %%
pred = ref.prediction
print(f"UFM: {ref.problem.to_dict()}")
print(f"predicted optimum: loss {pred.loss:.6f} ({pred.regime}; {pred.structure})")
print(f"UFM objective at the network's features: {ref.network_value_balanced:.6f} "
      f"({ref.network_value_balanced / pred.loss:.3f} x the optimum)")
if ref.solution is not None:
    print(f"numerical UFM solve (L-BFGS): {float(ref.solution.value):.6f}, relative gap to the prediction "
          f"{(float(ref.solution.value) - pred.loss) / pred.loss:.1e}")
for name in ref.layers:
    print(f"{name:>4}: NC1 network {ref.network[name]['nc1']:.2e}, UFM optimum "
          f"{ref.ufm[name]['nc1'] if ref.ufm else float('nan'):.1e}; ETF distance network "
          f"{ref.network[name]['nc2_etf']:.3f}, UFM {ref.ufm[name]['nc2_etf'] if ref.ufm else float('nan'):.1e}")

# %%
final = lm.nc1[-1, 1:-1]  # hidden layers H_1..H_D at the last recorded step
decreasing = bool(np.all(np.diff(final) < 0))
print(f"final NC1 of the hidden layers H_1..H_{len(final)}: {np.array2string(final, precision=3)}; "
      f"strictly decreasing with depth: {decreasing}")
print(f"max-angle (0 at a simplex ETF) of H_1..H_{len(final)}: {np.array2string(lm.max_angle[-1, 1:-1], precision=3)}")

# %% [markdown]
# ## 2. Fine-grained structure under coarse labels
#
# Merge the digits in pairs {0,1}, {2,3}, … into 5 superclasses (`ufm.networks.coarsen`) and train on those only.
# `ufm.networks.fine_grained` clusters the penultimate features of each superclass into two groups (k-means, no labels)
# and scores the best matching of clusters to the fine digits, on held-out samples, at every recorded step; the same
# network trained on the 10 fine labels, the same clustering of the raw pixels, and the trivial one-cluster baseline
# give the scale.

# %%
coarse = nets.coarsen(data, np.arange(10) // 2)
train_set, test_set = nets.split(coarse, TEST_PER_CLASS, seed=0)
fg = nets.fine_grained(train_set, FINE_WIDTHS, eval_data=test_set, loss="mse", weight_decay=WEIGHT_DECAY,
                       steps=FINE_STEPS, record_steps=RECORD if FINE_STEPS == STEPS else None, key=0)
print(f"held-out accuracy of the coarse network on the superclasses: {fg.coarse_accuracy:.3f}; "
      f"of the same network trained on the fine labels: {fg.fine_accuracy:.3f}")
print(f"fine labels recovered by clustering within each superclass: {fg.accuracy:.3f} "
      f"(per superclass {np.array2string(fg.per_group, precision=2)}); raw pixels {fg.input_accuracy:.3f}; "
      f"trivial baseline {fg.chance:.3f}")

fig = Figure(figsize=(9, 3.2), layout="constrained")
ax1, ax2 = fig.subplots(1, 2)
ax1.plot(fg.steps, fg.accuracy_by_step, "o-", label="penultimate features")
ax1.axhline(fg.input_accuracy, color="C1", ls="--", label="raw pixels")
ax1.axhline(fg.chance, color="k", ls=":", label="one cluster per superclass")
ax1.set(xlabel="training step", ylabel="fine-label recovery (held out)", title="fine structure under coarse labels")
ax1.legend(fontsize=7)
ax2.plot(fg.steps, np.maximum(fg.nc1_by_step, 1e-17), "o-")
ax2.set(yscale="log", xlabel="training step", ylabel="NC1 on the superclasses (held out)", title="coarse collapse")
display(fig)

# %% [markdown]
# ## Verdict

# %%
print(f"Per-layer collapse (Parker et al. 2023): NC1 falls with depth in every hidden layer: {decreasing} "
      f"(final NC1 from {final[0]:.2e} in H_1 to {final[-1]:.2e} in H_{len(final)}); the penultimate layer is "
      f"{ref.network_value_balanced / pred.loss:.2f} x the UFM optimum in the UFM objective"
      f"{' (at it)' if ref.network_value_balanced <= pred.loss * (1 + 1e-6) else ' (above it: not the UFM optimum)'}.")
above = fg.accuracy - fg.chance
eroded = fg.accuracy_by_step[-1] < fg.accuracy_by_step[0] - 0.05
kept = ("erased" if above < 0.05 else "kept" if fg.accuracy >= fg.input_accuracy - 0.05
        else "partly kept: above the trivial baseline" + (", but eroded during training" if eroded else ""))
print(f"Fine-grained structure (Yang et al. 2023): at the end, k-means recovers the fine digits at {fg.accuracy:.1%} "
      f"(trivial baseline {fg.chance:.1%}, raw pixels {fg.input_accuracy:.1%}); over training the recovery went from "
      f"{fg.accuracy_by_step[0]:.1%} to {fg.accuracy_by_step[-1]:.1%} while NC1 on the superclasses fell from "
      f"{fg.nc1_by_step[0]:.2g} to {fg.nc1_by_step[-1]:.2g}. The fine structure is {kept}.")
print(f"Wall time {time.perf_counter() - T0:.0f} s at size {SIZE}.")
