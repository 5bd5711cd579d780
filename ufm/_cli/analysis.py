"""What the commands compute on a solution: the prediction, the check, the per-layer metrics, and a note for each
thing not computed (and why); the memory refusal before any compute.

At a non-finite objective (status nonfinite_init or diverged, or a hand-edited file with NaN/inf parameters) the
check still runs (its verdict is 'not-converged'), but the per-layer metrics and the parameter figures are skipped
with a note: metrics of non-finite features are undefined, and SVDs of them fail.
"""

from __future__ import annotations

import contextlib
import math
import warnings

from .. import _io, _memory
from .._report_text import field
from .._terminal import UsageError

# --hessian auto: the second-order certificate up to this many parameters. Measured (benchmarks/bench_check.py,
# round 3): the default check costs 0.68x the solve it checks on the README quickstart (14,720 parameters) and 0.29x
# at a K=10, L=4 stationary point (4,992); the Lanczos basis holds 150 x n float64 numbers (60 MB at this limit).
HESSIAN_AUTO_MAX = 50_000


def use_hessian(mode: str, problem) -> tuple[bool, str | None]:
    """--hessian auto: the second-order certificate (ufm.check's Hessian spectrum) only up to `HESSIAN_AUTO_MAX`
    parameters (measured at most the cost of the solve up to 14,720 parameters, round 3). Returns ``(on, note)``,
    the note saying why it is off (None when on)."""
    n = problem.num_params
    if mode == "on":
        return True, None
    if mode == "off":
        return False, "second-order certificate skipped (--hessian off): 'matches' means first-order only"
    if n <= HESSIAN_AUTO_MAX:
        return True, None
    return False, (
        f"second-order certificate skipped: {n:,} parameters > {HESSIAN_AUTO_MAX} (--hessian on computes "
        "it, slowly): 'matches' means first-order only"
    )


def finite(solution) -> bool:
    """The objective and every parameter finite: only then are metrics and figures of the parameters defined."""
    import jax
    import numpy as np

    leaves = jax.tree_util.tree_leaves(solution.params)
    return math.isfinite(float(solution.value)) and all(bool(np.all(np.isfinite(np.asarray(x)))) for x in leaves)


@contextlib.contextmanager
def quiet_numerics():
    """Overflow/invalid warnings off: used only where the objective is already known not to be finite."""
    import numpy as np

    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def nonfinite_note(solution, what: str) -> str:
    """The note for ``what`` skipped at a non-finite objective or parameters (it names the status and f)."""
    summary = _io.solution_summary(solution)
    return (
        f"{what} skipped: the objective or the parameters are not finite (status {summary['status_name']}, "
        f"f = {summary['value']:g})"
    )


def layer_metrics(problem, params, notes: list[str]):
    """`ufm.metrics.layer_metrics` of finite parameters, or None with a note appended to ``notes`` when it fails
    numerically (overflow at ~1e150 is a note, never a traceback)."""
    import numpy as np

    from .. import metrics

    try:
        return metrics.layer_metrics(problem, params)
    except (np.linalg.LinAlgError, ArithmeticError) as e:
        notes.append(f"per-layer metrics not computed: {type(e).__name__}: {e}")
        return None


def analyse(problem, solution, hessian_mode: str):
    """``(prediction, check report, per-layer metrics, notes)`` of a solution: `ufm.predict`, `ufm.check` (with
    the Hessian certificate as `use_hessian` decides) and the metrics (those of the check, else
    `layer_metrics`); ``notes`` says what was not computed, and why."""
    from .._checks import check
    from .._theory import predict

    notes: list[str] = []
    prediction = predict(problem)
    is_finite = finite(solution)
    hessian, why = use_hessian(hessian_mode, problem)
    if is_finite:
        report = check(problem, solution, prediction, hessian=hessian)
    else:
        with quiet_numerics():
            report = check(problem, solution, prediction, hessian=False)
        why = None
    if why:
        notes.append(why)
    metrics = field(report, "metrics")
    if metrics is None and is_finite:
        metrics = layer_metrics(problem, solution.params, notes)
    elif metrics is None:
        notes.append(nonfinite_note(solution, "per-layer metrics"))
    return prediction, report, metrics, notes


def predicted_sv(prediction, name: str, L: int):
    """Per-layer predicted singular values ``prediction.<name>`` (list of L entries, None where not fixed) or
    None."""
    sv = field(prediction, name)
    if sv is None:
        return None
    if isinstance(sv, dict):
        sv = [sv.get(f"{name[-1]}_{l + 1}", sv.get(l + 1)) for l in range(L)]
    sv = list(sv)
    if len(sv) != L:
        return None
    return sv


def check_memory(problem, solver: dict | None, hessian_mode: str, what: str) -> None:
    """Refuse, before any compute, a problem whose estimated memory exceeds what is available (`ufm._memory`):
    `UsageError` naming ``what``."""
    hessian, _ = use_hessian(hessian_mode, problem)
    why = _memory.memory_refusal(problem, solver, hessian, what)
    if why:
        raise UsageError(why)
