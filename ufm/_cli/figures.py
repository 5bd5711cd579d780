"""The figures of a results folder (``ufm solve``, ``ufm plot``): built by `ufm.plotting` without pyplot, so no
backend is chosen here, and each written atomically."""

from __future__ import annotations

import contextlib
from functools import partial
from pathlib import Path

from .. import _io
from .analysis import finite, nonfinite_note, predicted_sv, quiet_numerics

FIGURES = ("training", "collapse", "gram", "singular_values", "class_means")  # the file names, without suffix


def _savefig(fig, fh, *, dpi: int, fmt: str) -> None:
    fig.savefig(fh, dpi=dpi, format=fmt)


def draw_figures(
    problem,
    solution,
    prediction,
    metrics,
    *,
    folder: Path,
    fmt: str = "png",
    dpi: int = 150,
    history_every: int = 1,
    tol: float | None = None,
    trace=None,
    notes: list[str] | None = None,
) -> list[Path]:
    """Draw the five figures of a results folder (figures from `ufm.plotting`, built without pyplot, so no
    backend is chosen here); returns the files written, each written atomically.

    A figure that cannot be drawn (the parameter figures at a non-finite objective, or a numerical failure) is
    skipped and the reason appended to ``notes``; a file that cannot be written raises `OSError`."""
    import numpy as np

    notes = [] if notes is None else notes
    is_finite = finite(solution)
    makers = _figure_makers(problem, solution, prediction, metrics, history_every, tol, trace, is_finite)
    if not is_finite:
        notes.append(nonfinite_note(solution, "figures " + ", ".join(n for n in FIGURES if n != "training")))
    written = []
    for name, make in makers.items():
        path = folder / f"{name}.{fmt}"
        try:
            with quiet_numerics() if not is_finite else contextlib.nullcontext():
                fig = make()
                _io.atomic_write(path, partial(_savefig, fig, dpi=dpi, fmt=fmt))
        except (np.linalg.LinAlgError, ArithmeticError) as e:
            notes.append(f"figure {name} not drawn: {type(e).__name__}: {e}")
            continue
        written.append(path)
    return written


def _figure_makers(problem, solution, prediction, metrics, history_every, tol, trace, is_finite) -> dict:
    """name -> a function drawing that figure: the training curves whenever there is a history, the parameter
    figures only at finite parameters (the collapse bars also need the metrics)."""
    from .. import plotting

    L = problem.L
    makers = {}
    if solution.history is not None:
        steps, nc1, names = trace if trace is not None else (None, None, None)
        f_pred, known = _io.predicted_loss(prediction)
        makers["training"] = lambda: plotting.training_curves(
            solution.history,
            predicted_loss=f_pred,
            predicted_known=known,
            history_every=history_every,
            nc1=nc1,
            nc1_steps=steps,
            layer_names=names,
            tol=tol,
        )
    if is_finite and metrics is not None:
        makers["collapse"] = lambda: plotting.collapse_bars(metrics)
    if is_finite:
        makers["gram"] = lambda: plotting.gram_heatmaps(problem, solution.params, prediction=prediction)
        makers["singular_values"] = lambda: plotting.singular_value_plot(
            problem,
            solution.params,
            predicted_W=predicted_sv(prediction, "sv_W", L),
            predicted_H=predicted_sv(prediction, "sv_H", L),
        )
        makers["class_means"] = lambda: plotting.class_means_plot(
            problem, solution.params, dim=2 if problem.num_classes <= 3 else 3
        )
    return makers
