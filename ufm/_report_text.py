"""The short human report of a results folder, as text: the loss, the prediction, the gap, the verdict, notes and
the per-layer NC metrics (from the report dict that `ufm._io.build_report` makes), and `emit`, which prints a
report as this text or as JSON. A face module."""

from __future__ import annotations

import json
import math
import sys
import textwrap

from ._json import to_jsonable


def field(obj, name, default=None):
    """``obj.name`` or ``obj[name]`` (a dict), or ``default`` when absent or when ``obj`` is None."""
    if obj is None:
        return default
    if isinstance(obj, dict):
        return obj.get(name, default)
    return getattr(obj, name, default)


def is_real(v) -> bool:
    """A finite int or float (not a bool): what may be formatted as a number."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _wrap(label: str, text: str, width: int = 110) -> list[str]:
    return textwrap.wrap(text, width=width, initial_indent=f"{label:<12}", subsequent_indent=" " * 12) or [label]


def _fmt(v, spec=".2e") -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float) and v == 0:
        return "0"
    return format(v, spec)


def format_report(report: dict, header: str) -> str:
    """The short human report: loss, predicted loss, gap, verdict, per-layer NC metrics."""
    sol, cmp_ = report["solution"], report["comparison"]
    lines = [header]
    run = report.get("run") or {}
    solver = report.get("solver") or {}
    t = f", {run['solve_time_s']:.1f} s" if "solve_time_s" in run else ""
    outcome = (
        f"stopped at max_steps = {sol['num_steps']}"
        if sol["status_name"] == "max_steps"
        else f"{sol['status_name']} after {sol['num_steps']} steps"
    )
    lines.append(
        f"solver      {solver.get('method', '?')}, seed {solver.get('seed', '?')}, {sol['dtype']}: "
        f"{outcome}, |grad f| = {sol['grad_norm']:.1e}"
        f"{' (tol ' + format(solver['tol'], '.0e') + ')' if is_real(solver.get('tol')) else ''}{t}"
    )
    if not sol["success"]:
        lines.extend(_wrap("", sol["message"]))
    lines.append(f"loss        {sol['value']:.15g}")
    pred = report.get("prediction")
    if cmp_["predicted_loss"] is not None:
        if cmp_.get("predicted_is_optimum", True):
            lines.append(
                f"predicted   {cmp_['predicted_loss']:.15g}  (the global optimum; regime {field(pred, 'regime', '?')})"
            )
        else:
            lines.append(
                f"best known  {cmp_['predicted_loss']:.15g}  (an upper bound, not a proven optimum; regime "
                f"{field(pred, 'regime', '?')})"
            )
        if cmp_["gap"] is None:
            lines.append("gap         n/a (the loss is not finite)")
        else:
            lines.append(f"gap         {cmp_['gap']:+.2e}  (relative {cmp_['relative_gap']:+.2e})")
    elif pred is not None:
        lines.append("predicted   unknown")
    check = report.get("check")
    if check is not None:
        lines.append(f"verdict     {field(check, 'verdict')}")
        expl = field(check, "explanation")
        if expl:
            for para in str(expl).splitlines():
                lines.extend(_wrap("", para))
    for label, key in (("structure", "structure"), ("source", "reference"), ("caveat", "reason")):
        text = field(pred, key)
        if text and text != "unknown":
            lines.extend(_wrap(label, str(text)))
    for why in report.get("notes", []):
        lines.extend(_wrap("note", why))
    m = report.get("metrics")
    if m:
        lines.append("per layer   NC1          NC2 (to predicted geometry)   rank")
        for f in m["features"]:
            tgt = f.get("nc2_target")
            nc2 = f"{_fmt(f['nc2'])} ({tgt})" if tgt else "n/a (no unique prediction)"
            lines.append(f"  {f['name']:<9} {_fmt(f['nc1']):<12} {nc2:<29} {f['numerical_rank']}")
        c = m.get("classifier", {})
        if c:
            lines.append(
                f"classifier  NC3 ({c.get('nc3_target')}) {_fmt(c.get('nc3_product'))}, "
                f"NC4 (NCC mismatch) {_fmt(c.get('ncc_mismatch'))}"
            )
    return "\n".join(lines)


def header(problem) -> str:
    """One line naming the model: kind, K, n, widths, activation, loss, bias and the lambdas."""
    d = problem.to_dict()
    kind = {("relu", True): "deep ReLU UFM", ("linear", True): "deep linear UFM"}.get(
        (d["activation"], problem.L >= 2), "shallow UFM"
    )
    lam = f"lam_H={d['lam_H']:g}, lam_W={d['lam_W'] if isinstance(d['lam_W'], list) else format(d['lam_W'], 'g')}"
    if d["bias"] == "reg":
        lam += f", lam_b={d['lam_b']:g}"
    if d["loss"] == "ce" and d["label_smoothing"]:
        lam += f", label_smoothing={d['label_smoothing']:g}"
    n = d["n_per_class"]
    return (
        f"{kind}: K={d['num_classes']}, n={n if isinstance(n, int) else ','.join(map(str, n))}, "
        f"widths {','.join(map(str, d['widths']))}, {d['activation']}, {d['loss']}, bias {d['bias']}, {lam}"
    )


def emit(report: dict, header: str, as_json: bool) -> None:
    """Print ``report`` on stdout: as JSON (strict: no NaN) when ``as_json``, else as `format_report`'s text."""
    if as_json:
        sys.stdout.write(json.dumps(to_jsonable(report), indent=2, allow_nan=False) + "\n")
    else:
        sys.stdout.write(format_report(report, header) + "\n")
    sys.stdout.flush()
