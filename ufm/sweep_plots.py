"""Phase diagrams from a sweep store: the verdict, the gap to the prediction, a rank, or the fraction of seeds that
reach the predicted optimum, as a heat map over two swept fields.

Numbers and display are apart: `phase_table` aggregates records into arrays (no matplotlib); `phase_diagram`
draws one (matplotlib is imported inside).

Example (``source`` may also be a DataFrame of ``ufm.load_sweep(path, as_frame=True)``)::

    import ufm, ufm.sweep_plots as sp
    runs = ufm.load_sweep("sweep.jsonl")
    sp.phase_diagram(runs, x="lam_H", y="L", value="reach", tol=1e-6)          # fraction of seeds at f*
    sp.phase_diagram(runs, x="lam_H", y="num_classes", value="verdict")
    sp.phase_diagram(runs, x="lam", y="L", value="rank", layer=-1, where={"activation": "relu"})
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import numpy as np

from ._sweep import as_records, iter_fields

VALUES = ("verdict", "status", "reach", "gap", "gap_abs", "rank", "loss")


class PhaseTable(NamedTuple):
    """A two-field table of aggregated runs.

    Attributes:
      x, y: the sorted distinct values of the two fields (cells are ``values[iy, ix]``).
      values: float array (len(y), len(x)); NaN where a cell has no run (or, for "reach"/"gap", no
        prediction). For categorical values ("verdict", "status") the entry is an index into ``categories``.
      counts: runs per cell.
      categories: the category names for categorical values, else None.
      label: what ``values`` holds, in words.
    """

    x: list
    y: list
    values: np.ndarray
    counts: np.ndarray
    categories: list | None
    label: str


def _field(records, name: str) -> list:
    if name == "lam":
        lH = iter_fields(records, "lam_H")
        lW = iter_fields(records, "lam_W")
        if any(a != b for a, b in zip(lH, lW, strict=True)):
            raise ValueError(
                "field 'lam' means lam_H = lam_W, but these records have lam_H != lam_W; use lam_H or lam_W"
            )
        return lH
    return iter_fields(records, name)


def _sort_key(v):
    return (0, v, "") if isinstance(v, (int, float)) and not isinstance(v, bool) else (1, 0, str(v))


def _reached(r: Mapping, tol: float) -> float:
    g = r.get("gap")
    return float("nan") if g is None else float(abs(g) <= tol)


def phase_table(
    source,
    x: str,
    y: str,
    value: str = "verdict",
    *,
    tol: float = 1e-6,
    layer: int = -1,
    rank_of: str = "H",
    reduce: Callable[[np.ndarray], float] | None = None,
    where: Mapping[str, Any] | None = None,
) -> PhaseTable:
    """Aggregate sweep records over two fields into a table (runs sharing a cell, e.g. seeds, are pooled).

    Args:
      source: a store path, a `SweepResult`, a pandas DataFrame of ``ufm.load_sweep(..., as_frame=True)``
        (possibly filtered) or a list of records.
      x, y: fields: any config field (``lam_H``, ``lam_W``, ``num_classes``, ``n_per_class``, ``lr``,
        ``init_scale``, ``seed``), ``lam`` (lam_H when lam_H = lam_W), ``L`` (depth = len(widths)), ``width``
        (d when all widths are equal), or a dotted record path.
      value:
        * ``"verdict"`` / ``"status"``: the most frequent verdict (of `ufm.check`) / solver status in the cell
          (ties: the first in sorted order);
        * ``"reach"``: the fraction of runs with |gap| <= ``tol``, i.e. |f - f_pred| <= tol |f_pred|, where
          f_pred is `ufm.predict`'s loss (runs without a prediction are not counted; NaN if none has one);
        * ``"gap"`` / ``"gap_abs"``: the median of |f - f_pred|/|f_pred| / of |f - f_pred|;
        * ``"rank"``: the median numerical rank ``ranks[rank_of][layer]`` (``rank_of`` "H": class means of H_l,
          "Z": pre-activations, "W": weights; "out": the output class means, ``layer`` ignored);
        * ``"loss"`` or any dotted numeric record path: the median.
      tol: the relative-gap tolerance of "reach".
      layer: layer index for "rank" (Python indexing over l = 1..L; -1 is the last).
      reduce: replaces the median for numeric values (e.g. ``np.mean``, ``np.min``).
      where: keep only records whose fields equal these values (e.g. ``{"activation": "relu", "L": 3}``).

    Returns:
      `PhaseTable`.
    """
    recs = _filtered(as_records(source), where)
    xs_all, ys_all = _field(recs, x), _field(recs, y)
    xs = sorted(set(xs_all), key=_sort_key)
    ys = sorted(set(ys_all), key=_sort_key)
    cells: dict[tuple[int, int], list] = {}
    xi = {v: i for i, v in enumerate(xs)}
    yi = {v: i for i, v in enumerate(ys)}
    for r, a, b in zip(recs, xs_all, ys_all, strict=True):
        cells.setdefault((yi[b], xi[a]), []).append(_cell_value(r, value, tol, layer, rank_of))
    categorical = value in ("verdict", "status")
    agg = reduce or (np.mean if value == "reach" else np.median)  # reach: the mean of 0/1 is the fraction
    values, counts, categories = _aggregate(cells, (len(ys), len(xs)), categorical, agg)
    label = {
        "verdict": "most frequent verdict",
        "status": "most frequent solver status",
        "reach": f"fraction of runs with |f - f_pred| <= {tol:g} |f_pred|",
        "gap": "median |f - f_pred| / |f_pred|",
        "gap_abs": "median |f - f_pred|",
        "rank": "median rank of " + ("output class means" if rank_of == "out" else f"{rank_of}[{layer}]"),
    }.get(value, f"median {value}")
    if reduce is not None and not categorical and value != "reach":
        label = label.replace("median", getattr(reduce, "__name__", "reduced"))
    if value == "reach" and reduce is not None:
        label = label.replace("fraction", getattr(reduce, "__name__", "reduced"))
    return PhaseTable(xs, ys, values, counts, categories, label)


def _filtered(recs: list[dict], where: Mapping[str, Any] | None) -> list[dict]:
    """The records whose fields equal ``where``'s values (a list value matches a tuple field); ValueError if none."""
    if where:
        for k, v in where.items():
            vals = _field(recs, k)
            want = tuple(v) if isinstance(v, list) else v
            recs = [r for r, got in zip(recs, vals, strict=True) if got == want]
    if not recs:
        raise ValueError(f"no records to tabulate (where={dict(where or {})})")
    return recs


def _cell_value(r: dict, value: str, tol: float, layer: int, rank_of: str):
    """What one record contributes to its cell for ``value`` (see `phase_table`): a category name or a float."""
    if value in ("verdict", "status"):
        v = r.get(value)
        return "none" if v is None else str(v)
    if value == "reach":
        return _reached(r, tol)
    if value in ("gap", "gap_abs"):
        g = r.get(value)
        return float("nan") if g is None else abs(float(g))
    if value == "rank":
        ranks = r.get("ranks") or {}
        if rank_of == "out":
            return ranks.get("out", float("nan"))
        seq = ranks.get(rank_of) or []
        return seq[layer] if -len(seq) <= layer < len(seq) else float("nan")
    got = _field([r], value)[0]
    return float("nan") if got is None else float(got)


def _aggregate(cells: dict, shape: tuple[int, int], categorical: bool, agg: Callable):
    """``(values, counts, categories)`` of the cells: the most frequent category's code (ties: the first in sorted
    order; ``categories`` lists them), or ``agg`` of the non-NaN numbers (NaN for none)."""
    values = np.full(shape, np.nan)
    counts = np.zeros(shape, np.int64)
    categories = None
    if categorical:
        categories = sorted({v for vs in cells.values() for v in vs})
        code = {c: i for i, c in enumerate(categories)}
    for (i, j), vs in cells.items():
        counts[i, j] = len(vs)
        if categorical:
            c = Counter(vs)
            top = max(c.values())
            values[i, j] = code[min(k for k, n in c.items() if n == top)]
        else:
            arr = np.asarray(vs, np.float64)
            arr = arr[~np.isnan(arr)]
            values[i, j] = float(agg(arr)) if arr.size else np.nan
    return values, counts, categories


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    if isinstance(v, tuple):
        return "(" + ",".join(map(str, v)) + ")"
    return str(v)


def phase_diagram(
    source,
    x: str,
    y: str,
    value: str = "verdict",
    *,
    ax=None,
    annotate: bool = True,
    cmap: str | None = None,
    **table_kw,
):
    """Draw `phase_table` as a heat map (cells on an evenly spaced grid labelled by the swept values, so
    log-spaced lambdas read naturally). Categorical values get a legend; "gap"/"gap_abs" a log colour scale;
    "reach" a 0..1 scale. ``annotate`` writes the value (and run count) in each cell. Returns the Axes."""
    import matplotlib.pyplot as plt
    from matplotlib import colors

    t = phase_table(source, x, y, value, **table_kw)
    if ax is None:
        _, ax = plt.subplots(figsize=(1.0 + 0.7 * max(len(t.x), 3), 1.0 + 0.55 * max(len(t.y), 3)))
    data = np.ma.masked_invalid(t.values)
    if t.categories is not None:
        base = plt.get_cmap(cmap or "tab10")
        cm = colors.ListedColormap([base(i % base.N) for i in range(len(t.categories))])
        im = ax.imshow(data, origin="lower", aspect="auto", cmap=cm, vmin=-0.5, vmax=len(t.categories) - 0.5)
        from matplotlib.patches import Patch

        ax.legend(
            handles=[Patch(color=cm(i), label=c) for i, c in enumerate(t.categories)],
            title=t.label,
            loc="upper left",
            bbox_to_anchor=(1.01, 1.0),
            fontsize="small",
        )
    else:
        norm: colors.Normalize | None = None
        if value in ("gap", "gap_abs"):
            pos = t.values[np.isfinite(t.values) & (t.values > 0)]
            if pos.size:
                norm = colors.LogNorm(vmin=max(pos.min(), 1e-16), vmax=max(pos.max(), pos.min() * 10))
        elif value == "reach":
            norm = colors.Normalize(0.0, 1.0)
        im = ax.imshow(data, origin="lower", aspect="auto", cmap=cmap or "viridis", norm=norm)
        ax.figure.colorbar(im, ax=ax, label=t.label)
    if annotate:
        for i in range(len(t.y)):
            for j in range(len(t.x)):
                if t.counts[i, j] == 0:
                    continue
                v = t.values[i, j]
                if t.categories is not None:
                    s = t.categories[int(v)]
                elif not math.isfinite(v):
                    s = "n/a"
                elif value == "rank":
                    s = f"{v:g}"
                else:
                    s = f"{v:.2g}"
                ax.text(
                    j,
                    i,
                    f"{s}\n(n={t.counts[i, j]})",
                    ha="center",
                    va="center",
                    fontsize="x-small",
                    color="white" if t.categories is None else "black",
                )
    ax.set_xticks(range(len(t.x)), [_fmt(v) for v in t.x], rotation=45 if len(t.x) > 6 else 0)
    ax.set_yticks(range(len(t.y)), [_fmt(v) for v in t.y])
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.set_title(t.label, fontsize="medium")
    return ax
