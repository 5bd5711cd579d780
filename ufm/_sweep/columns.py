"""Sweep records as columns: NumPy columns (`to_columns`) and pandas DataFrames (`to_frame`, optional pandas).

The DataFrame layout (one row per run, ``index`` = the run's position in the grid):

* nested dicts are flattened with dots: ``config.lam_H``, ``config.widths``, ``prediction.loss``,
  ``check.certificate.stationarity.grad_norm``;
* per-layer entries (lists of dicts in ``metrics``) become one group of columns per layer, named by the entry's
  ``name`` (``metrics.features.H_1.nc1``, ``metrics.features.Z_2.nc1``, ``metrics.weights.W_2.balancedness``,
  ``metrics.features.out.nc1``) or, for ``metrics.dnc``, by its ``layer`` (``metrics.dnc.1.dnc1``);
* lists of numbers (``config.widths``, per-class ``config.n_per_class``, ``ranks.H``, spectra such as
  ``metrics.features.H_1.singular_values``) are one cell holding a tuple (hashable: ``groupby`` works on them);
* null is NaN in float columns and None elsewhere.

A DataFrame goes back to records with `frame_records` (what `ufm.sweep_plots` does with a DataFrame).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .grid import is_int, is_num


def to_columns(records: Sequence[Mapping]) -> dict[str, np.ndarray]:
    """Records as NumPy columns: nested dicts are flattened with dots (``config.lam_H``, ``ranks.H``,
    ``prediction.loss``). Numbers become float64 (null -> NaN) or int64 columns, booleans bool, strings str,
    equal-length lists of numbers 2-D int64 / float64 arrays (``ranks.H``: runs x layers); anything else (lists
    of dicts, ragged lists, mixed types) an object array. A field that is null in every record is a NaN column."""
    flat = []

    def walk(f, prefix, v):
        if isinstance(v, Mapping):
            for k, x in v.items():
                walk(f, f"{prefix}.{k}" if prefix else str(k), x)
        else:
            f[prefix] = v

    for r in records:
        f: dict[str, Any] = {}
        walk(f, "", r)
        flat.append(f)
    keys: list[str] = []
    for f in flat:
        keys.extend(k for k in f if k not in keys)
    cols = {}
    for k in keys:
        vals = [f.get(k) for f in flat]
        present = [v for v in vals if v is not None]
        if not present:
            cols[k] = np.full(len(vals), np.nan)
        elif all(isinstance(v, bool) for v in present) and len(present) == len(vals):
            cols[k] = np.asarray(vals, bool)
        elif present and all(is_int(v) for v in present) and len(present) == len(vals):
            cols[k] = np.asarray(vals, np.int64)
        elif present and all(is_num(v) for v in present):
            cols[k] = np.asarray([np.nan if v is None else v for v in vals], np.float64)
        elif present and all(isinstance(v, str) for v in present) and len(present) == len(vals):
            cols[k] = np.asarray(vals, str)
        else:
            arr: np.ndarray | None = None
            if len(present) == len(vals) and all(isinstance(v, list) for v in vals):
                items = [x for v in vals for x in (v or [])]
                dt = np.int64 if all(is_int(x) for x in items) else np.float64
                try:
                    arr = np.asarray(vals, dt) if all(is_num(x) for x in items) else None
                except (ValueError, TypeError):
                    arr = None
                if arr is not None and arr.ndim != 2:
                    arr = None
            if arr is None:
                arr = np.empty(len(vals), object)
                arr[:] = vals
            cols[k] = arr
    return cols


def _layer_keys(items: list) -> list[str] | None:
    """Column labels for a list of per-layer dicts: their distinct ``name``s, else their ``layer``s, else None."""
    for field in ("name", "layer"):
        keys = [str(x.get(field)) for x in items]
        if all(isinstance(x.get(field), (str, int)) for x in items) and len(set(keys)) == len(keys):
            return keys
    return None


def flatten_record(record: Mapping) -> dict[str, Any]:
    """One record as a flat dict of DataFrame cells (the layout in the module docstring)."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, v: Any) -> None:
        if isinstance(v, Mapping):
            for k, x in v.items():
                walk(f"{prefix}.{k}" if prefix else str(k), x)
        elif isinstance(v, list) and v and all(isinstance(x, Mapping) for x in v) and (keys := _layer_keys(v)):
            for key, x in zip(keys, v, strict=True):
                walk(f"{prefix}.{key}", {k: y for k, y in x.items() if k not in ("name", "layer")})
        elif isinstance(v, list):
            flat[prefix] = tuple(tuple(x) if isinstance(x, list) else x for x in v)
        else:
            flat[prefix] = v

    walk("", record)
    return flat


def _pandas():
    try:
        import pandas
    except ImportError:
        raise ImportError("as_frame=True needs pandas: pip install pandas (or 'ufm[frames]')") from None
    return pandas


def to_frame(records: Sequence[Mapping]):
    """Records as a pandas DataFrame, one row per run (layout in the module docstring). Needs pandas."""
    pd = _pandas()
    rows = [flatten_record(r) for r in records]
    df = pd.DataFrame.from_records(rows)
    for col in df.columns:  # numbers with nulls: float NaN instead of object None
        vals = [v for v in df[col] if v is not None and not (isinstance(v, float) and math.isnan(v))]
        if vals and all(is_num(v) for v in vals) and df[col].dtype == object:
            df[col] = np.asarray([np.nan if v is None else v for v in df[col]], np.float64)
    if "index" in df.columns:
        df = df.set_index("index", drop=False).rename_axis(None)
    return df


def frame_records(frame) -> list[dict]:
    """DataFrame rows (from `to_frame`, possibly filtered) back to nested records: dotted columns become nested
    dicts (per-layer groups stay dicts keyed by layer name), tuples lists, NaN None."""
    out = []
    for row in frame.to_dict("records"):
        rec: dict[str, Any] = {}
        for col, v in row.items():
            if isinstance(v, float) and math.isnan(v):
                v = None
            elif isinstance(v, tuple):
                v = [list(x) if isinstance(x, tuple) else x for x in v]
            elif isinstance(v, np.generic):
                v = v.item()
            parts = str(col).split(".")
            d = rec
            for p in parts[:-1]:
                if not isinstance(d.get(p), dict):
                    d[p] = {}  # a null parent column (e.g. "prediction" where other runs have one) gives way
                d = d[p]
            else:
                if not (v is None and isinstance(d.get(parts[-1]), dict)):  # a null parent column never hides
                    d[parts[-1]] = v
        out.append(rec)
    return out
