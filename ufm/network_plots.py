"""Figures of ``ufm.networks`` experiments: per-layer collapse over training, and the shallow/deep/UFM comparison.

As in `ufm.plotting`, every function returns a `matplotlib.figure.Figure` built without pyplot (nothing is shown,
no global figure state is touched; save it with ``fig.savefig``), and matplotlib is imported inside the functions.
The inputs are the results of `ufm.networks.layer_metrics`, `ufm.networks.ufm_reference` and
`ufm.networks.shallow_vs_expressive`; this module reads their fields and imports nothing of ``ufm``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["plot_layer_metrics", "plot_comparison"]


def plot_layer_metrics(
    metrics: Any,
    *,
    names: Sequence[str] = ("nc1", "nc1_trace_ratio", "max_angle", "ncc_accuracy"),
    reference: Any | None = None,
    log: Sequence[str] = ("nc1", "nc1_trace_ratio", "cdnv"),
) -> Figure:
    """One panel per metric of a `ufm.networks.LayerMetrics`: its value against the layer, one line per recorded
    step (darker = later).

    Args:
      metrics: a `ufm.networks.LayerMetrics` (arrays (R, D + 2) over steps and layers).
      names: the `LayerMetrics` fields drawn, one panel each.
      reference: a `ufm.networks.UFMReference` (`ufm.networks.ufm_reference`) or None: its ``predicted`` values
        are drawn as black stars on the layers the UFM stands for (a predicted 0 on a log axis is a triangle on
        the bottom edge).
      log: the fields drawn on a log axis.

    Returns:
      The `matplotlib.figure.Figure` (pyplot is not used; nothing is shown).
    """
    from matplotlib import colormaps
    from matplotlib.figure import Figure
    from matplotlib.transforms import blended_transform_factory

    fig = Figure(figsize=(3.4 * len(names), 3.0))
    axes = fig.subplots(1, len(names), squeeze=False)
    x = np.arange(len(metrics.layers))
    R = metrics.steps.size
    cmap = colormaps["viridis"]
    for ax, f in zip(axes[0], names, strict=True):
        vals = getattr(metrics, f)
        for r in range(R):
            label = f"step {metrics.steps[r]}" if r in (0, R - 1) else None
            ax.plot(x, vals[r], "o-", ms=3, color=cmap(r / max(R - 1, 1)), label=label)
        if reference is not None:
            pts = [
                (metrics.layers.index(n), v[f])
                for n, v in reference.predicted.items()
                if f in v and n in metrics.layers
            ]
            on_axis = [(xv, v) for xv, v in pts if not (f in log and v <= 0)]
            at_zero = [xv for xv, v in pts if f in log and v <= 0]
            if on_axis:
                xs, vs = zip(*on_axis, strict=True)
                ax.plot(xs, vs, "k*", ms=9, ls="none", label="UFM prediction")
            if at_zero:  # a predicted 0 on a log axis: a marker on the bottom edge
                tr = blended_transform_factory(ax.transData, ax.transAxes)
                ax.plot(
                    at_zero,
                    [0.0] * len(at_zero),
                    "kv",
                    ms=8,
                    ls="none",
                    transform=tr,
                    clip_on=False,
                    label="UFM prediction: 0",
                )
        if f in log:
            ax.set_yscale("log")
        ax.set_xticks(x, metrics.layers, rotation=45)
        ax.set_title(f)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_comparison(comparison: Any) -> Figure:
    """Bar chart of NC1 of the penultimate features and of the outputs for each model of a
    `ufm.networks.Comparison` (`ufm.networks.shallow_vs_expressive`), with the affine floor (the NC1 no affine
    feature map can beat, ``comparison.floor.floor_full_rank``) as a dashed line; exact zeros are drawn at 1e-16.

    Returns:
      The `matplotlib.figure.Figure` (pyplot is not used; nothing is shown).
    """
    from matplotlib.figure import Figure

    rows = comparison.rows
    fig = Figure(figsize=(6, 3.2))
    ax = fig.subplots()
    x = np.arange(len(rows))
    tiny = 1e-16
    ax.bar(x - 0.2, [max(r.nc1_features, tiny) for r in rows], 0.4, label="NC1 penultimate")
    ax.bar(x + 0.2, [max(r.nc1_output, tiny) for r in rows], 0.4, label="NC1 output")
    ax.axhline(comparison.floor.floor_full_rank, color="k", ls="--", lw=1, label="affine floor (rank K-1)")
    ax.set_yscale("log")
    ax.set_xticks(x, [r.name for r in rows])
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
