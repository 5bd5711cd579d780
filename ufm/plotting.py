"""Figures of a UFM solution: training curves, per-layer collapse, class-mean Grams, spectra, class means.

Every function returns a `matplotlib.figure.Figure` built without pyplot: nothing is shown, no global figure
state is touched, and any backend (Agg in scripts and tests, inline in notebooks) can render it; save it with
``fig.savefig("name.png", dpi=150)``. matplotlib is imported inside the functions so that ``import ufm`` stays
light.

Figures are sized for a paper (about 7-10 inches wide, 9-10 pt text). Log axes show exact zeros as a floor
marked "0" rather than dropping them silently.

Layers follow `ufm.forward` and THEORY.md §4: H_1 are the free features, H_l = s(W_{l-1} H_{l-1}) (l >= 2) the
input of W_l, and "out" = W_L H_L + b the output. Metrics come from `ufm.metrics` (names and formulas there).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = [
    "nc1_over_training",
    "training_curves",
    "collapse_bars",
    "gram_heatmaps",
    "singular_value_plot",
    "class_means_plot",
    "exploration_minima",
    "gram_spectra_plot",
]

_FLOOR = 1e-17  # where exact zeros are drawn on log axes (below float64 rounding of O(1) quantities)
_RC = {
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.labelsize": 9,
    "legend.fontsize": 8,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "axes.grid": True,
    "grid.alpha": 0.3,
}


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _rc():
    import matplotlib as mpl

    return mpl.rc_context(_RC)


def _layer_colors(n: int):
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    return [cmap(0.85 * i / max(n - 1, 1)) for i in range(n)]


def _positive(x) -> np.ndarray:
    """Values for a log axis: exact zeros -> _FLOOR, NaN/negatives -> NaN (not drawn)."""
    x = np.asarray(x, dtype=np.float64)
    out = np.where(x > 0, x, np.nan)
    return np.where(x == 0, _FLOOR, out)


def _log_ylim(ax, values, min_decades: float = 2.0) -> None:
    """Log y-limits that show every positive value and span at least ``min_decades`` (a near-constant series
    would otherwise fill the axis with one meaningless tick range)."""
    v = np.asarray(values, np.float64)
    v = v[np.isfinite(v) & (v > 0)]
    if not v.size:
        return
    lo, hi = float(v.min()) / 3, float(v.max()) * 3
    if hi / lo < 10**min_decades:
        mid = math.sqrt(lo * hi)
        lo, hi = mid / 10 ** (min_decades / 2), mid * 10 ** (min_decades / 2)
    ax.set_ylim(lo, hi)


def _history_arrays(history) -> tuple[np.ndarray, np.ndarray]:
    if hasattr(history, "history") and hasattr(history, "params"):  # a Solution
        history = history.history
        if history is None:
            raise ValueError("the solution has no history: solve with history=True")
    if hasattr(history, "loss") and hasattr(history, "grad_norm"):
        loss, gn = history.loss, history.grad_norm
    elif isinstance(history, (tuple, list)) and len(history) == 2:
        loss, gn = history
    else:
        raise TypeError(
            f"history must be a ufm.History, a ufm.Solution or a (loss, grad_norm) pair; got {type(history).__name__}"
        )
    loss = np.asarray(loss, dtype=np.float64)
    gn = np.asarray(gn, dtype=np.float64)
    if loss.ndim != 1 or gn.shape != loss.shape:
        raise ValueError(
            f"history loss and grad_norm must be 1-D of equal length (one entry per recorded step; for a batch "
            f"pass sols.take(i)); got shapes {loss.shape} and {gn.shape}"
        )
    written = np.flatnonzero(~(np.isnan(loss) & np.isnan(gn)))
    n = written[-1] + 1 if written.size else 0
    return loss[:n], gn[:n]


def _feature_layers(problem, params):
    """[(name, H_l)] for l = 1..L and the output, as float64 NumPy arrays."""
    from ._model import Params, forward

    fw = forward(problem, Params(*params))
    layers = [(f"H_{l + 1}", np.asarray(h, np.float64)) for l, h in enumerate(fw.H)]
    layers.append(("out", np.asarray(fw.out, np.float64)))
    return layers


def _sub(name: str) -> str:
    """'H_2' -> mathtext H$_2$ for titles."""
    if "_" in name:
        a, b = name.split("_", 1)
        return f"${a}_{{{b}}}$"
    return name


# ---------------------------------------------------------------------------------------------------------------
# training curves


def nc1_over_training(problem, snapshots) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """NC1 of every feature layer H_1..H_L at every parameter snapshot of a solve.

    NC1 is `ufm.metrics.nc1`, ``tr(Sigma_W Sigma_B^+)/K`` (Papyan, Han, Donoho 2020). ``snapshots`` is the
    `ufm.Snapshots` of ``ufm.solve(..., snapshot_every=k)`` (unused slots, step -1, are skipped).

    Returns ``(steps (S,), nc1 (S, L), names)`` with names ``["H_1", ..., "H_L"]``.
    """
    import jax

    from . import metrics
    from ._model import forward

    steps = np.asarray(snapshots.step)
    if steps.ndim != 1:
        raise ValueError(f"snapshots.step must be 1-D (one solve; for a batch pass sols.take(i)); got {steps.shape}")
    used = steps >= 0
    params = jax.tree_util.tree_map(lambda x: x[used], snapshots.params)
    Hs = jax.vmap(lambda p: forward(problem, p).H)(params)
    y = problem.labels()
    K = problem.num_classes
    out = np.array([[metrics.nc1(np.asarray(H[s]), y, K) for H in Hs] for s in range(int(used.sum()))])
    return steps[used], out.reshape(int(used.sum()), problem.L), [f"H_{l + 1}" for l in range(problem.L)]


def training_curves(
    history,
    *,
    predicted_loss: float | None = None,
    predicted_known: bool = True,
    history_every: int = 1,
    nc1: Any = None,
    nc1_steps: Any = None,
    layer_names: Sequence[str] | None = None,
    tol: float | None = None,
    title: str | None = None,
):
    """Training curves on log axes: the loss gap to the prediction, the gradient norm, and NC1 per layer.

    Args:
      history: a `ufm.History`, a `ufm.Solution` (its history) or a ``(loss, grad_norm)`` pair of arrays
        (NaN padding after the last step is dropped).
      predicted_loss: f_pred, the predicted optimal loss (``ufm.predict(problem).loss``). With it the first panel
        is |f_k - f_pred|, steps where f_k < f_pred (the run beat the prediction) drawn in red; without it the
        panel is the loss f_k itself, and says so. ``predicted_known=False`` labels f_pred as the best known
        upper bound rather than the optimum (``ufm.predict(...).known``).
      history_every: steps between history entries (as passed to `ufm.solve`).
      nc1, nc1_steps, layer_names: NC1 per layer at the snapshot steps, shape (S, L), e.g. from
        `nc1_over_training`. Without them the third panel says that no snapshots were taken.
      tol: the solver's gradient-norm tolerance, drawn as a dashed line.

    Returns:
      A Figure with 3 axes.
    """
    loss, gn = _history_arrays(history)
    steps = np.arange(loss.size) * int(history_every)
    with _rc():
        fig = _figure(10.0, 3.2)
        ax_loss, ax_grad, ax_nc1 = fig.subplots(1, 3)
        _loss_panel(ax_loss, steps, loss, predicted_loss, predicted_known)
        _grad_panel(ax_grad, steps, gn, tol)
        _nc1_panel(ax_nc1, nc1, nc1_steps, layer_names)
        ax_nc1.set_ylabel(r"NC1 = tr$(\Sigma_W \Sigma_B^{+})/K$")
        for ax in (ax_loss, ax_grad, ax_nc1):
            ax.set_xlabel("optimiser step $k$")
        if title:
            fig.suptitle(title)
    return fig


def _loss_panel(ax, steps, loss, predicted_loss, predicted_known: bool) -> None:
    """The first panel of `training_curves`: |f_k - f_pred| (below-prediction steps in red), or f_k alone."""
    if predicted_loss is not None and np.isfinite(predicted_loss):
        gap = loss - float(predicted_loss)
        above = np.where(gap >= 0, _positive(gap), np.nan)
        below = np.where(gap < 0, -gap, np.nan)
        ax.plot(steps, above, color="C0", lw=1.5, label=r"$f_k - f_{\rm pred} \geq 0$")
        if np.any(gap < 0):
            ax.plot(steps, below, "o", color="C3", ms=2.5, label=r"$f_{\rm pred} - f_k > 0$ (below prediction)")
        ax.set_yscale("log")
        ax.set_ylabel(r"$|f_k - f_{\rm pred}|$")
        what = "prediction" if predicted_known else "best known bound"
        ax.set_title(f"loss gap to {what} $f_{{\\rm pred}}$ = {float(predicted_loss):.6g}")
        ax.legend(loc="upper right")
    else:
        ax.plot(steps, _positive(loss), color="C0", lw=1.5)
        ax.set_yscale("log")
        ax.set_ylabel(r"loss $f_k$")
        ax.set_title("loss (no prediction to compare)")


def _grad_panel(ax, steps, gn, tol) -> None:
    """The second panel of `training_curves`: the gradient norm, and ``tol`` dashed."""
    ax.plot(steps, _positive(gn), color="C1", lw=1.5, label=r"$\|\nabla f\|_2$")
    if tol is not None and tol > 0:
        ax.axhline(tol, color="k", ls="--", lw=1, label=f"tol = {tol:.0e}")
        ax.legend(loc="upper right")
    ax.set_yscale("log")
    ax.set_ylabel(r"gradient norm $\|\nabla f(x_k)\|_2$")
    ax.set_title("gradient norm")


def _nc1_panel(ax, nc1, nc1_steps, layer_names) -> None:
    """The third panel of `training_curves`: NC1 per layer at the snapshot steps, or a note that there are none."""
    if nc1 is not None and nc1_steps is not None and np.size(nc1):
        nc1 = np.asarray(nc1, np.float64).reshape(len(nc1_steps), -1)
        names = list(layer_names) if layer_names is not None else [f"H_{l + 1}" for l in range(nc1.shape[1])]
        for l, c in enumerate(_layer_colors(nc1.shape[1])):
            ax.plot(nc1_steps, _positive(nc1[:, l]), "-o", ms=2.5, lw=1.3, color=c, label=_sub(names[l]))
        ax.set_yscale("log")
        ax.legend(loc="upper right", ncol=1 + nc1.shape[1] // 5)
        if np.all(nc1 == 0):
            ax.text(
                0.5,
                0.3,
                "NC1 = 0 exactly at every snapshot\n(drawn at 1e-17; e.g. one sample per class)",
                ha="center",
                va="center",
                transform=ax.transAxes,
                fontsize=8,
            )
        ax.set_title("within-class variability per layer")
    else:
        ax.text(
            0.5,
            0.5,
            "no parameter snapshots:\nsolve with snapshot_every=k",
            ha="center",
            va="center",
            transform=ax.transAxes,
        )
        ax.set_title("within-class variability per layer")


# ---------------------------------------------------------------------------------------------------------------
# per-layer collapse metrics


def _bars(ax, names, values, colors):
    """Bars on a log axis, each labelled with its value; exact zeros at _FLOOR ("0"), None as "n/a"."""
    import matplotlib.transforms as mtransforms

    x = np.arange(len(names))
    vals = np.array([np.nan if v is None else float(v) for v in values])
    heights = _positive(vals)
    finite = heights[np.isfinite(heights)]
    top = max(1.0, float(np.max(finite)) if finite.size else 1.0) * 30
    bottom = min(1e-3, float(np.min(finite)) / 10 if finite.size else 1e-3)
    ax.set_yscale("log")
    ax.set_ylim(bottom, top)
    ax.bar(x, np.where(np.isfinite(heights), heights - bottom, 0.0), color=colors, width=0.7, bottom=bottom)
    base = mtransforms.blended_transform_factory(ax.transData, ax.transAxes)
    for i, v in enumerate(vals):
        if np.isnan(v):
            ax.text(x[i], 0.02, "n/a", transform=base, ha="center", va="bottom", fontsize=7, color="0.4")
            continue
        text = "0" if v == 0 else (f"{v:.0e}" if v < 1e-2 else f"{v:.2f}")
        ax.annotate(
            text,
            (x[i], heights[i]),
            xytext=(0, 2),
            textcoords="offset points",
            ha="center",
            va="bottom",
            fontsize=7,
            annotation_clip=False,
        )
    ax.set_xticks(x, [_sub(n) for n in names])


def collapse_bars(metrics: dict, *, title: str | None = None):
    """Per-layer bars of the collapse metrics, in the shape of Parker et al. (2023)'s per-layer plots.

    ``metrics`` is the dict of `ufm.metrics.layer_metrics(problem, params)`. Three panels, layers along x
    (log y; exact zeros drawn at 1e-17 and labelled "0"; each bar is labelled with its value):

    * NC1 = tr(Sigma_W Sigma_B^+)/K of every feature layer (H_1, pre-activations Z_l and post-activations H_l of
      ReLU models, the output): within-class variability (Papyan, Han, Donoho 2020).
    * NC2: distance of the class-mean Gram to the geometry the theory predicts for that layer
      (`ufm.metrics.nc2_target`: simplex ETF of the centred means, or orthogonal frame of the uncentred ones);
      "n/a" where the theory predicts none (e.g. H_1 of a ReLU model, THEORY.md §4.1).
    * DNC3 of each W_l: 1 - weighted mean over rows of max_k |cos(w_r, mu_k)| against the class means of its
      input H_l (Súkeník et al. 2023; W_L against H_L is the classifier's NC3-type alignment).

    Returns:
      A Figure with 3 axes.
    """
    if not isinstance(metrics, dict) or "features" not in metrics or "weights" not in metrics:
        raise TypeError("metrics must be the dict returned by ufm.metrics.layer_metrics(problem, params)")
    feats = metrics["features"]
    weights = metrics["weights"]
    names = [f["name"] for f in feats]
    colors = ["#9ecae1" if n.startswith("Z_") else "#3182bd" for n in names]
    targets = sorted({f["nc2_target"] for f in feats if f.get("nc2_target")})
    with _rc():
        fig = _figure(max(7.0, 1.0 + 0.55 * (2 * len(names) + len(weights))), 3.2)
        ax1, ax2, ax3 = fig.subplots(1, 3, gridspec_kw={"width_ratios": [len(names), len(names), max(len(weights), 3)]})
        _bars(ax1, names, [f["nc1"] for f in feats], colors)
        ax1.set_title("NC1 (within-class variability)")
        ax1.set_ylabel(r"tr$(\Sigma_W \Sigma_B^{+})/K$")
        _bars(ax2, names, [f["nc2"] for f in feats], colors)
        tnames = {"etf": "simplex ETF", "orthogonal": "orthogonal frame", "orthogonal-unequal": "general orth. frame"}
        ax2.set_title("NC2: distance to predicted geometry")
        ax2.set_ylabel(r"$\| G/\|G\|_F - G_{\rm pred} \|_F$")
        if targets:
            ax2.text(
                0.02,
                0.97,
                "target: " + ", ".join(tnames.get(t, t) for t in targets),
                transform=ax2.transAxes,
                va="top",
                fontsize=7,
            )
        _bars(ax3, [w["name"] for w in weights], [w["dnc3"] for w in weights], ["#e6550d"] * len(weights))
        ax3.set_title("DNC3 (alignment)")
        ax3.set_ylabel(r"$1 - $mean$_r \max_k |\cos(w_r, \mu_k)|$")
        for ax in (ax1, ax2):
            ax.set_xlabel(
                "feature layer (light: pre-activation $Z_l$)"
                if any(n.startswith("Z_") for n in names)
                else "feature layer"
            )
        ax3.set_xlabel("$W_l$ vs class means of $H_l$")
        if title:
            fig.suptitle(title)
    return fig


# ---------------------------------------------------------------------------------------------------------------
# class-mean Gram matrices


def _target_gram(target: str | None, K: int) -> np.ndarray | None:
    if target == "etf":
        return (np.eye(K) - np.ones((K, K)) / K) / math.sqrt(K - 1)
    if target == "orthogonal":
        return np.eye(K) / math.sqrt(K)
    return None


def gram_heatmaps(problem, params, *, prediction=None, title: str | None = None):
    """Class-mean Gram matrices of every layer as heatmaps, beside the predicted structure.

    For each feature layer H_1..H_L and the output, the K x K matrix ``G / ||G||_F`` with ``G = M^T M`` of the
    uncentred class means, or of the centred means M~ where the theory predicts a simplex ETF (CE, or MSE with a
    bias). The last panel is the predicted Gram (`ufm.metrics.nc2_target`): ``(I - J/K)/sqrt(K-1)`` (simplex
    ETF) or ``I/sqrt(K)`` (orthogonal frame); for other geometries (e.g. the orthogonal frame with class-dependent
    norms of imbalanced data, Dang et al. 2023) the predicted class-mean Gram of the deepest layer that has one,
    ``prediction.gram_H`` of `ufm.predict`, normalised, when ``prediction`` is given; else a note that the theory
    predicts no unique geometry. One shared colour scale; entries are printed when K <= 6.

    Returns:
      A Figure with L + 2 heatmap axes and one colour-bar axis.
    """
    K = problem.num_classes
    mats, subtitles, targets = _layer_grams(problem, params)
    t_pred, G_pred, pred_title = _predicted_gram(targets, K, prediction)
    vmax = max(1e-12, max(float(np.max(np.abs(G))) for G in mats))
    with _rc():
        ncols = len(mats) + 1
        fig = _figure(min(2.0 * ncols + 0.8, 14.0), 2.6)
        axes = fig.subplots(1, ncols)
        im = None
        for ax, G, st in zip(axes, mats + [G_pred], subtitles + ["predicted"], strict=True):
            ax.grid(False)
            if G is None:
                note = "no unique\npredicted geometry" if t_pred is None else _GEOMETRY_NAMES.get(t_pred, t_pred)
                ax.text(0.5, 0.5, note, ha="center", va="center", transform=ax.transAxes)
                ax.set_xticks([])
                ax.set_yticks([])
                ax.set_title("predicted")
                continue
            im = _gram_image(ax, G, vmax)
            predicted_title = pred_title or f"predicted:\n{_GEOMETRY_NAMES.get(t_pred, t_pred)}"
            ax.set_title(st if st != "predicted" else predicted_title)
        axes[0].set_ylabel("class $j$")
        if im is not None:
            fig.colorbar(im, ax=list(axes), shrink=0.8, label=r"$G_{jk} / \|G\|_F$")
        fig.suptitle(title or r"class-mean Gram $G = M^\top M$ per layer, normalised")
    return fig


_GEOMETRY_NAMES: dict[str | None, str] = {
    "etf": "simplex ETF",
    "orthogonal": "orthogonal frame",
    "orthogonal-unequal": "orth. frame, unequal norms",
}


def _layer_grams(problem, params) -> tuple[list, list[str], list[str | None]]:
    """Per feature layer and the output: the normalised class-mean Gram (centred where the target is the simplex
    ETF), its panel title, and the layer's NC2 target (`ufm.metrics.nc2_target`)."""
    from . import metrics

    K = problem.num_classes
    y = problem.labels()
    mats, subtitles, targets = [], [], []
    for name, A in _feature_layers(problem, params):
        t = metrics.nc2_target(problem, name)
        M, muG = metrics.class_means(A, y, K)
        centred = t == "etf"
        V = M - muG[:, None] if centred else M
        G = V.T @ V
        n = np.linalg.norm(G)
        mats.append(G / n if n > 0 else G)
        subtitles.append(_sub(name) + (" (centred)" if centred else ""))
        targets.append(t)
    return mats, subtitles, targets


def _predicted_gram(targets: list[str | None], K: int, prediction) -> tuple[str | None, Any, str | None]:
    """``(target, normalised Gram, panel title)`` of the prediction panel: the most common layer target's Gram;
    else the deepest finite ``prediction.gram_H`` (with its own title); else None (no unique geometry)."""
    predicted = [t for t in targets if t is not None]
    t_pred = max(set(predicted), key=predicted.count) if predicted else None
    G_pred = _target_gram(t_pred, K)
    grams = getattr(prediction, "gram_H", None) if prediction is not None else None
    if G_pred is None and grams is not None:
        for l in range(len(grams) - 1, -1, -1):
            G = None if grams[l] is None else np.asarray(grams[l], np.float64)
            if G is not None and G.shape == (K, K) and np.all(np.isfinite(G)) and np.linalg.norm(G) > 0:
                name = _GEOMETRY_NAMES.get(t_pred, t_pred or "ufm.predict")
                return t_pred, G / np.linalg.norm(G), f"predicted, {_sub(f'H_{l + 1}')}:\n{name}"
    return t_pred, G_pred, None


def _gram_image(ax, G, vmax: float):
    """One K x K Gram heatmap on the shared scale [-vmax, vmax], its entries printed when K <= 6."""
    K = G.shape[0]
    im = ax.imshow(G, cmap="RdBu_r", vmin=-vmax, vmax=vmax)
    ticks = np.arange(K) if K <= 10 else np.arange(0, K, max(1, K // 5))
    ax.set_xticks(ticks, [str(k + 1) for k in ticks])
    ax.set_yticks(ticks, [str(k + 1) for k in ticks])
    ax.set_xlabel("class $k$")
    if K <= 6:
        for i in range(K):
            for j in range(K):
                ax.text(
                    j,
                    i,
                    f"{G[i, j]:.2f}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if abs(G[i, j]) > 0.6 * vmax else "black",
                )
    return im


# ---------------------------------------------------------------------------------------------------------------
# singular values


def singular_value_plot(
    problem,
    params,
    *,
    predicted_W: Sequence | None = None,
    predicted_H: Sequence | None = None,
    max_index: int | None = None,
    title: str | None = None,
):
    """Singular values of every weight matrix W_l (top row) and feature matrix H_l (bottom row, all N columns),
    on a log axis, against predicted values.

    ``predicted_W[l]`` / ``predicted_H[l]``: the predicted singular values of W_{l+1} / H_{l+1} (an array, drawn
    as black rings at each index), or None / all-nan where the theory does not fix them (e.g. W_1 and H_1 of
    the deep ReLU UFM, THEORY.md §4.1): such panels say "not predicted". ``ufm.predict(problem).sv_W`` /
    ``.sv_H`` give them. Exact zeros (found or predicted) are drawn at 1e-17. Only the ``max_index`` largest are
    drawn (default max(12, 3K): the K (or K - 1) predicted nonzero ones and the gap below them); the x label states
    how many more there are and their largest value.

    Returns:
      A Figure with 2 L axes.
    """
    from ._model import Params

    params = Params(*params)
    L = problem.L
    shown_max = max(12, 3 * problem.num_classes) if max_index is None else int(max_index)
    layers = _feature_layers(problem, params)[:L]
    rows = [
        [(f"W_{l + 1}", np.asarray(W, np.float64)) for l, W in enumerate(params.Ws)],
        layers,
    ]
    preds = [
        list(predicted_W) if predicted_W is not None else [None] * L,
        list(predicted_H) if predicted_H is not None else [None] * L,
    ]
    for p in preds:
        if len(p) != L:
            raise ValueError(f"predicted singular values need one entry per layer (L={L}); got {len(p)}")
    with _rc():
        fig = _figure(min(2.6 * L + 0.8, 14.0), 5.0)
        axes = np.asarray(fig.subplots(2, L, squeeze=False))
        for r in range(2):
            for l in range(L):
                name, A = rows[r][l]
                _sv_panel(axes[r, l], name, A, preds[r][l], shown_max, "C0" if r == 0 else "C2", l == 0)
        fig.suptitle(
            title
            or "singular values per layer: weights (top), features over all N samples (bottom); "
            "exact zeros drawn at 1e-17"
        )
    return fig


def _sv_panel(ax, name: str, A, pred, shown_max: int, color: str, first: bool) -> None:
    """One panel of `singular_value_plot`: the ``shown_max`` largest singular values of ``A`` and the predicted
    ones ``pred`` (None or all-nan: "not predicted")."""
    from matplotlib.ticker import MaxNLocator

    s_all = np.linalg.svd(A, compute_uv=False)
    s = s_all[:shown_max]
    j = np.arange(1, s.size + 1)
    ax.plot(j, _positive(s), "o", ms=3.5, color=color, label="found")
    pv = None
    if pred is not None:
        pv = np.atleast_1d(np.asarray(pred, np.float64))[:shown_max]
        pv = None if np.all(np.isnan(pv)) else pv  # nan: not determined by the theory
    if pv is not None:
        ax.plot(np.arange(1, pv.size + 1), _positive(pv), "o", ms=8, mfc="none", mew=1.2, color="k", label="predicted")
    ax.set_yscale("log")
    shown = [_positive(s)] + ([] if pv is None else [_positive(pv)])
    _log_ylim(ax, np.concatenate(shown))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlim(0.3, max(s.size, pv.size if pv is not None else 0) + 0.7)
    ax.set_title(_sub(name) + f"  ({A.shape[0]}$\\times${A.shape[1]})")
    more = s_all.size - s.size
    ax.set_xlabel("index $j$" + (f"  ({more} more, all $\\leq$ {s_all[s.size]:.0e})" if more else ""))
    if first:
        ax.set_ylabel(r"singular value $\sigma_j$")
    if pv is not None:
        ax.legend(loc="upper right")
    else:
        ax.text(0.97, 0.97, "not predicted", ha="right", va="top", transform=ax.transAxes, fontsize=7)


# ---------------------------------------------------------------------------------------------------------------
# class means in 2-D / 3-D


def class_means_plot(problem, params, *, dim: int = 2, title: str | None = None):
    """The class means of every layer projected to ``dim`` = 2 or 3 dimensions, with the samples.

    For each layer (H_1..H_L, output) the uncentred class means M (d x K) and all samples are projected onto the
    top-``dim`` left singular vectors of M, so the origin stays the origin: an orthogonal frame shows as K
    arrows at right angles, a simplex ETF (free bias) as a regular simplex around the global mean (star). The
    means are joined pairwise (the simplex edges). Each panel gives the mean pairwise angle between the centred
    and the uncentred class means (90° for an orthogonal frame; arccos(-1/(K-1)) between centred means for a
    simplex ETF), the scale ||M||_F (near 0 in the zero regime, where the picture is rounding noise) and the share of
    ||M||_F^2 the projection keeps (below 100% when rank M > dim).

    Returns:
      A Figure with L + 1 axes (3-D axes for ``dim=3``).
    """
    from matplotlib.ticker import MaxNLocator

    from . import metrics

    if dim not in (2, 3):
        raise ValueError(f"dim must be 2 or 3; got {dim!r}")
    K = problem.num_classes
    y = problem.labels()
    layers = _feature_layers(problem, params)
    colors = [f"C{k % 10}" for k in range(K)]
    with _rc():
        n = len(layers)
        fig = _figure(min((2.9 if dim == 2 else 3.5) * n, 14.0), 3.3 if dim == 2 else 3.8)
        kw = {"projection": "3d"} if dim == 3 else {}
        axes = [fig.add_subplot(1, n, i + 1, **kw) for i in range(n)]
        for ax, (name, A) in zip(axes, layers, strict=True):
            M, muG = metrics.class_means(A, y, K)
            U, s, _ = np.linalg.svd(M, full_matrices=False)
            q = min(dim, U.shape[1])
            P = np.zeros((dim, A.shape[0]))
            P[:q] = U[:, :q].T
            Mp, Ap, gp = P @ M, P @ A, P @ muG
            kept = float(np.sum(s[:q] ** 2) / np.sum(s**2)) if np.sum(s**2) > 0 else 1.0
            pts = [Ap[i] for i in range(dim)]
            ax.scatter(*pts, c=[colors[k] for k in y], s=6, alpha=0.35, linewidths=0)
            for k in range(K):
                ax.plot(*[[0.0, Mp[i, k]] for i in range(dim)], color=colors[k], lw=1.2)
            for a in range(K):
                for b in range(a + 1, K):
                    ax.plot(*[[Mp[i, a], Mp[i, b]] for i in range(dim)], color="0.4", lw=0.8, ls=":")
            ax.scatter(*[Mp[i] for i in range(dim)], c=colors, s=40, edgecolors="k", linewidths=0.6, zorder=3)
            ax.scatter(*[[0.0]] * dim, marker="+", c="k", s=50)
            ax.scatter(*[[gp[i]] for i in range(dim)], marker="*", c="k", s=50)
            ang_u = _mean_angle(M)
            ang_c = _mean_angle(M - muG[:, None])
            ax.set_title(
                f"{_sub(name)}\nangle: {ang_u} uncentred, {ang_c} centred\n"
                f"$\\|M\\|_F$ = {np.linalg.norm(M):.2g}, projection keeps {100 * kept:.0f}%",
                fontsize=8,
            )
            ax.set_xlabel("PC 1")
            ax.set_ylabel("PC 2")
            if dim == 3:
                # one common range on all three axes: a rank-2 configuration must look flat, not have its
                # rounding-level third coordinate blown up to fill the box
                allp = np.concatenate([Ap, Mp, np.zeros((dim, 1))], axis=1)
                centre = (allp.max(axis=1) + allp.min(axis=1)) / 2
                half = max(float(np.max(allp.max(axis=1) - allp.min(axis=1))) / 2, 1e-300) * 1.1
                ax.set_xlim(centre[0] - half, centre[0] + half)
                ax.set_ylim(centre[1] - half, centre[1] + half)
                ax.set_zlim(centre[2] - half, centre[2] + half)
                ax.set_box_aspect((1, 1, 1), zoom=0.78)
                for axis in (ax.xaxis, ax.yaxis, ax.zaxis):
                    axis.set_major_locator(MaxNLocator(4))
                ax.set_zlabel("PC 3", labelpad=8)
            else:
                ax.set_aspect("equal", adjustable="datalim")
        fig.suptitle(title or "class means (large dots), samples (small), origin (+), global mean (*)")
    return fig


def _mean_angle(V: np.ndarray) -> str:
    norms = np.linalg.norm(V, axis=0)
    if np.any(norms <= 1e-12 * max(1.0, float(norms.max()))):
        return "n/a"
    C = (V / norms).T @ (V / norms)
    K = V.shape[1]
    off = C[~np.eye(K, dtype=bool)]
    return f"{np.degrees(np.arccos(np.clip(off, -1, 1))).mean():.1f}°"


# ---------------------------------------------------------------------------------------------------------------
# ufm.explore figures


def exploration_minima(exploration, *, title: str | None = None):
    """The distinct local minima an `ufm.explore` run found, per strategy that reached each one first.

    One row per strategy; each minimum is a dot at its loss (divided by the DNC loss where DNC is defined, else
    the raw loss), its area proportional to how many starts ended there. Dashed lines mark the explicit candidates
    (`ufm.construct`: DNC, SRG) and the best point.

    Args:
      exploration: a `ufm.Exploration`.

    Returns:
      A Figure with one axis.
    """
    minima = exploration.minima
    dnc = float(exploration.dnc_loss)
    scale = dnc if math.isfinite(dnc) and dnc > 0 else 1.0
    names = [s for s in exploration.strategies if any(m.strategy == s for m in minima)] or ["(none)"]
    with _rc():
        fig = _figure(7.0, 0.5 * len(names) + 1.6)
        ax = fig.add_subplot(1, 1, 1)
        colors = _layer_colors(len(names))
        # the interesting range: from the best to a little above the worst explicit point (or 2x the best); minima
        # above it (e.g. the zero saddle) are drawn as arrows at the right edge with their number
        ref = [v / scale for v in exploration.explicit.values()] or [2 * exploration.value / scale]
        lo = float(exploration.value / scale)
        hi = max(max(ref), lo) * 1.02 + 1e-12
        span = hi - lo
        for i, s in enumerate(names):
            vals = np.array([m.value / scale for m in minima if m.strategy == s], float)
            counts = np.array([m.count for m in minima if m.strategy == s], float)
            inside = vals <= hi
            if inside.any():
                ax.scatter(
                    vals[inside],
                    np.full(inside.sum(), i),
                    s=18 * np.sqrt(counts[inside]) + 8,
                    color=colors[i],
                    alpha=0.7,
                    edgecolors="k",
                    linewidths=0.4,
                )
            if (~inside).any():
                ax.scatter([hi + 0.04 * span], [i], marker=">", color=colors[i], edgecolors="k", linewidths=0.4)
                ax.annotate(
                    f"{int((~inside).sum())} above",
                    (hi + 0.04 * span, i),
                    xytext=(0, 6),
                    textcoords="offset points",
                    fontsize=7,
                    ha="center",
                )
        for name, v in exploration.explicit.items():
            ax.axvline(v / scale, color="0.4", ls="--", lw=0.8)
            ax.annotate(name, (v / scale, len(names) - 0.5), fontsize=7, rotation=90, va="top", ha="right")
        ax.axvline(exploration.value / scale, color="C3", ls="-", lw=0.8)
        ax.set_xlim(lo - 0.05 * span, hi + 0.08 * span)
        ax.set_yticks(range(len(names)), names)
        ax.set_ylim(-0.7, len(names) - 0.3)
        ax.set_xlabel("loss / DNC loss" if scale != 1.0 else "loss")
        ax.set_title(
            title
            or f"{len(minima)} distinct minima from {exploration.num_starts} starts "
            "(area ∝ starts reaching it; red: best)"
        )
    return fig


def gram_spectra_plot(problem, params, *, reference=None, reference_label: str = "DNC", title: str | None = None):
    """Eigenvalues of the class-mean Gram M_lᵀ M_l of every feature layer H_1..H_L (log axis), the
    rotation-invariant fingerprint `ufm.explore` uses to tell minima apart, beside a reference point's.

    Args:
      problem: the `ufm.UFM`.
      params: the point (`ufm.Params`).
      reference: optional `ufm.Params` drawn as black rings (e.g. ``ufm.construct(problem, "dnc")``).

    Returns:
      A Figure with L axes.
    """
    from . import metrics
    from ._model import forward

    def spectra(p):
        fw = forward(problem, p)
        out = []
        for h in fw.H:
            M, _ = metrics.class_means(np.asarray(h, np.float64), problem.labels(), problem.num_classes)
            out.append(np.sort(np.linalg.eigvalsh(M.T @ M))[::-1])
        return out

    ours = spectra(params)
    ref = spectra(reference) if reference is not None else None
    L = len(ours)
    with _rc():
        fig = _figure(min(2.4 * L + 1, 12), 2.6)
        axes = fig.subplots(1, L, squeeze=False)[0]
        idx = np.arange(1, problem.num_classes + 1)
        for l, ax in enumerate(axes):
            ax.semilogy(idx, np.maximum(ours[l], _FLOOR), "o-", ms=4, color="C0", label="point")
            if ref is not None:
                ax.semilogy(idx, np.maximum(ref[l], _FLOOR), "o", ms=7, mfc="none", mec="k", label=reference_label)
            ax.set_title(f"Gram of {_sub(f'H_{l + 1}')}")
            ax.set_xlabel("index")
            _log_ylim(ax, np.concatenate([ours[l]] + ([ref[l]] if ref is not None else [])))
        axes[0].set_ylabel("eigenvalue of MᵀM")
        axes[0].legend(loc="lower left")
        if title:
            fig.suptitle(title)
    return fig
