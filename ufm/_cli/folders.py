"""Results folders on the command line: choose and create the output folder, clear an overwritten one, save the
inputs, load a saved folder; every failure is a one-line `UsageError` naming the folder or file (the files
themselves are written and read by `ufm._io`)."""

from __future__ import annotations

import contextlib
from pathlib import Path

from .. import _io
from .._terminal import UsageError
from .analysis import check_memory
from .figures import FIGURES


def writable(folder: Path, flag: str) -> None:
    """`UsageError` naming ``flag`` and ``folder`` when a file cannot be created in ``folder``."""
    try:
        _io.check_writable(folder)
    except OSError as e:
        raise UsageError(f"{flag} {folder} is not writable: {e.strerror or e}") from None


def prepare_out(args) -> tuple[Path, bool]:
    """The results folder, created if needed and checked writable; ``(folder, created)``."""
    if args.out is None:
        try:
            out = _io.new_results_dir(".")
        except OSError as e:
            raise UsageError(f"cannot create a results folder in {Path.cwd()}: {e.strerror or e}") from None
        created = True
    else:
        out = args.out
        if out.exists() and not out.is_dir():
            raise UsageError(f"--out {out} exists and is not a folder")
        taken = [f for f in (_io.CONFIG_FILE, _io.REPORT_FILE, _io.SOLUTION_FILE) if (out / f).exists()]
        if taken and not args.overwrite:
            raise UsageError(
                f"--out {out} already holds results ({', '.join(taken)}); choose another folder or pass --overwrite"
            )
        created = not out.exists()
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UsageError(f"--out {out} cannot be created: {e.strerror or e}") from None
    try:
        writable(out, "--out")
    except UsageError:
        discard(out, created)
        raise
    return out, created


def discard(folder: Path, created: bool) -> bool:
    """Remove ``folder`` if this command created it and it is still empty; True if removed."""
    if created:
        with contextlib.suppress(OSError):
            folder.rmdir()
            return True
    return False


def write_error(e: OSError) -> UsageError:
    """The one-line `UsageError` for a failed write (a full disk, a read-only folder), naming the file."""
    return UsageError(f"cannot write {e.filename or 'the results'}: {e.strerror or e}")


def status_name(solution) -> str:
    """The solver status of ``solution`` by name (e.g. "converged", "interrupted")."""
    return _io.solution_summary(solution)["status_name"]


def clear_old_results(out: Path) -> None:
    """Before overwriting: remove the old report.json first (a folder without it is incomplete) and the old
    figures (a figure this run does not draw must not survive from the last one)."""
    for name in (_io.REPORT_FILE, *(f"{f}.{ext}" for f in FIGURES for ext in ("png", "pdf", "svg"))):
        try:
            (out / name).unlink()
        except FileNotFoundError:
            pass
        except OSError as e:
            raise UsageError(f"--overwrite: cannot remove {out / name}: {e.strerror or e}") from None


def save_inputs(out: Path, created: bool, config: dict, solution, history_every: int) -> None:
    """config.json, then solution.npz (atomically each). On a write error: a folder this command created loses
    what it got and is removed; an overwritten folder keeps whole files and no report.json (incomplete)."""
    try:
        _io.write_json(out / _io.CONFIG_FILE, config)
        _io.save_solution(out / _io.SOLUTION_FILE, solution, history_every=history_every)
    except OSError as e:
        if created:
            with contextlib.suppress(OSError):
                (out / _io.CONFIG_FILE).unlink()
            discard(out, created)
        raise write_error(e) from None


def load_folder(folder: Path, hessian_mode: str, extras):
    """Read config.json, size the problem (refusing it before reading the arrays if it cannot fit in memory),
    then read solution.npz; `UsageError` naming the file and field on any problem."""
    try:
        _, problem = _io.read_config(folder)
        check_memory(problem, None, hessian_mode, f"the problem of {folder}")
        return _io.load_results(folder, extras=extras)
    except _io.ResultsError as e:
        raise UsageError(str(e)) from None
