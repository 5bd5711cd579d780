"""Reliability (issue 17): no traceback for a user's mistake, no unbounded work, no silent loss of settings.

Each test is a reproduction from the issue (or a variation) that failed before the fix. The CLI runs are
in-process (``ufm.cli.main``) on the tiny problem of tests/test_cli.py (shallow CE, K = 3, n = 2, d = 4, 200
L-BFGS steps), so they share its compiled programs; pytest turns every warning into an error, so a run that
overflows in NumPy without saying so fails here too.
"""

import errno
import json
import os
import shutil
import zipfile

import jax.numpy as jnp
import numpy as np
import pytest
from cli_cases import TINY

import ufm
from ufm import _io, _memory, _solution, cli

TINY_PROBLEM = ufm.UFM(
    num_classes=3, n_per_class=2, widths=(4,), activation="linear", loss="ce", bias="free", lam_H=1e-3, lam_W=2e-3
)


def _main(argv, capsys):
    rc = cli.main(argv)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _one_line_error(rc, out, err, *words):
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ufm"), err
    assert "Traceback" not in err
    for w in words:
        assert w in lines[0], (w, lines[0])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One tiny solve saved without figures (copied by the tests that tamper with it)."""
    folder = tmp_path_factory.mktemp("rel") / "res"
    assert cli.main(["solve", *TINY, "--no-plots", "--json", "--out", str(folder)]) == 0
    return folder


# ---------------------------------------------------------------------------------------------------------------
# item 7, item 8 (problem part): the problem keeps its settings and refuses what it cannot use


def test_replace_keeps_a_per_layer_lam_W():
    p = ufm.UFM(num_classes=3, n_per_class=2, widths=(4, 4), lam_W=(1e-3, 2e-3))
    q = p.replace(widths=(5, 6))  # L unchanged: the per-layer lambdas stay (they were dropped to lam_W[0])
    np.testing.assert_array_equal(np.asarray(q.lam_W), np.asarray(p.lam_W))
    assert q.widths == (5, 6)
    u = ufm.UFM(num_classes=3, n_per_class=2, widths=(4, 4), lam_W=3e-3)
    assert u.replace(widths=(4, 4, 4)).to_dict()["lam_W"] == pytest.approx(3e-3)  # equal in every layer: a scalar
    with pytest.raises(ValueError, match=r"lam_W.*\(L,\) = \(3,\)"):
        p.replace(widths=(4, 4, 4))  # per-layer and different: refuse rather than guess
    assert p.replace(widths=(4, 4, 4), lam_W=1e-3).L == 3
    with pytest.raises(TypeError, match="unknown field 'lamH'"):
        p.replace(lamH=1.0)


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("lam_H", [1e-3, 1e-2], r"lam_H must be a scalar \(lambda_H\); got shape \(2,\)"),
        ("lam_H", np.array([1e-3]), r"lam_H must be a scalar"),
        ("lam_b", [1e-3, 1e-3], r"lam_b must be a scalar"),
        ("label_smoothing", [0.1, 0.2], r"label_smoothing must be a scalar"),
        ("label_smoothing", -0.1, r"label_smoothing must be >= 0 \(alpha in \[0, 1\)\)"),
        ("lam_W", [[1e-3, 1e-3]], r"lam_W must be a scalar or a vector \(lambda_W: a scalar or shape \(L,\) = \(2,\)"),
        ("lam_W", [1e-3, 1e-3, 1e-3], r"lam_W must be a scalar or have one entry per layer \(L=2\)"),
        ("lam_H", [[1e-3], [1e-2, 1.0]], r"lam_H must be a non-negative number"),
        ("num_classes", 2**70, r"num_classes must be <= 2147483647"),
        ("widths", (4, 2**40), r"widths\[1\] must be <= 2147483647"),
    ],
)
def test_problem_refuses_what_solve_cannot_use(field, value, match):
    """Before: lam_H=[1e-3, 1e-2] (and the others) were accepted and failed inside solve with a JAX shape error."""
    kw = dict(num_classes=3, n_per_class=2, widths=(4, 4), loss="ce", bias="reg", lam_b=1e-3)
    kw[field] = value
    with pytest.raises((ValueError, TypeError), match=match):
        ufm.UFM(**kw)


# ---------------------------------------------------------------------------------------------------------------
# item 3: non-finite results are a status in a written report, never a traceback


def test_nonfinite_init_writes_its_report(tmp_path, capsys):
    """Before: status nonfinite_init, then a 65-line LinAlgError traceback, exit 1 and an empty folder."""
    out = tmp_path / "r"
    rc, stdout, err = _main(["solve", *TINY, "--init-scale", "1e200", "--out", str(out)], capsys)
    assert rc == 0, err
    assert "Traceback" not in err
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "report.json", "solution.npz", "training.png"} <= names
    assert not names & {"gram.png", "collapse.png", "class_means.png", "singular_values.png"}
    rep = json.loads((out / "report.json").read_text())
    assert rep["solution"]["status_name"] == "nonfinite_init" and rep["solution"]["success"] is False
    assert rep["solution"]["value"] is None  # strict JSON: a non-finite loss is null
    assert rep["check"]["verdict"] == "not-converged" and rep["metrics"] is None
    assert any("per-layer metrics skipped" in n and "nonfinite_init" in n for n in rep["notes"])
    assert any("figures collapse, gram" in n for n in rep["notes"])
    assert "nonfinite_init" in stdout and "gap         n/a" in stdout

    rc, stdout, err = _main(["check", str(out)], capsys)
    assert rc == 0 and "not-converged" in stdout and "Traceback" not in err
    rc, stdout, err = _main(["plot", str(out), "--out", str(tmp_path / "figs"), "--dpi", "20"], capsys)
    assert rc == 0 and [p.name for p in (tmp_path / "figs").iterdir()] == ["training.png"]
    assert "note: figures collapse" in err


def test_check_and_plot_a_folder_with_nan_parameters(run, tmp_path, capsys):
    """Before: LinAlgError traceback (metrics of NaN features)."""
    bad = tmp_path / "nan"
    shutil.copytree(run, bad)
    z = dict(np.load(bad / "solution.npz"))
    z["H"][0, 0] = np.nan
    np.savez(bad / "solution.npz", **z)
    rc, out, err = _main(["check", str(bad), "--json"], capsys)
    assert rc == 0, err
    rep = json.loads(out)
    assert rep["check"]["verdict"] == "not-converged" and rep["metrics"] is None
    assert any("per-layer metrics skipped" in n for n in rep["notes"])
    rc, out, err = _main(["plot", str(bad), "--out", str(tmp_path / "f"), "--dpi", "20"], capsys)
    assert rc == 0 and "training.png" in out and "note: figures" in err


def test_hand_edited_solver_table_is_not_trusted(run, tmp_path, capsys):
    """config.json's solver table is provenance, not input, for check/plot: junk there is shown, not formatted."""
    for i, solver in enumerate(({"tol": "x", "method": 5, "history_every": "2"}, [1, 2])):
        folder = tmp_path / f"s{i}"
        shutil.copytree(run, folder)
        cfg = json.loads((folder / "config.json").read_text())
        cfg["solver"] = solver
        (folder / "config.json").write_text(json.dumps(cfg))
        rc, out, err = _main(["check", str(folder), "--hessian", "off"], capsys)
        assert rc == 0 and "Traceback" not in err and "verdict" in out, err
    rc, out, err = _main(["plot", str(folder), "--out", str(folder / "f"), "--dpi", "20"], capsys)
    assert rc == 0, err


# ---------------------------------------------------------------------------------------------------------------
# item 4 (file part): memory is estimated before compute, untrusted files are read header first


def _npy_header(shape, dtype="<f8"):
    """A .npy v1.0 header declaring ``shape`` (NumPy's own writer, so the header is exactly what np.save makes)."""
    import io

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": dtype, "fortran_order": False, "shape": shape})
    return buf.getvalue()


def test_npz_declaring_a_huge_member_is_refused_from_its_header(run, tmp_path, capsys):
    """Before: every member was decompressed before names and shapes were checked (a 21 MB file declaring 5 GB
    was OOM-killed). Here an extra member declares 8 GB and carries 8 bytes: refused from the header, and H
    declaring the wrong shape is refused before anything is read."""
    bomb = tmp_path / "bomb"
    shutil.copytree(run, bomb)
    with zipfile.ZipFile(bomb / "solution.npz", "a") as zf:
        zf.writestr("huge.npy", _npy_header((10**9,)) + b"\0" * 8)
    huge = r"'huge', shape \(1000000000,\) float64: 8,000,000,000 bytes.*max_bytes"
    with pytest.raises(_io.ResultsError, match=huge):
        ufm.load_results(bomb)
    res = ufm.load_results(bomb, extras=False)  # what the CLI does: only the known members
    assert "huge" not in res.extras
    rc, out, err = _main(["check", str(bomb), "--json"], capsys)
    assert rc == 0, err

    z = dict(np.load(run / "solution.npz"))
    for i, (name, value, words) in enumerate(
        (
            ("H", None, ("H must have shape d_1 x N = (4, 6)", "(1000000000,)")),
            ("value", np.ones(3), ("value must have shape", "a scalar ()", "(3,)")),
            ("status", np.asarray(0.5), ("status", "must be integer", "float64")),
            ("history_loss", np.ones(10**4), ("history_loss must be 1-D with at most num_steps + 1",)),
            ("W1", np.ones((3, 4), np.float32), ("one floating dtype",)),
            ("num_steps", np.asarray(-5), ("num_steps must be >= 0",)),
            ("status", np.asarray(99), ("status 99 is not a status code of this ufm", "0 converged")),
        )
    ):
        folder = tmp_path / f"{name}{i}"
        shutil.copytree(run, folder)
        zz = {k: v for k, v in z.items() if k != name}
        np.savez(folder / "solution.npz", **zz)
        with zipfile.ZipFile(folder / "solution.npz", "a") as zf:
            if value is None:
                zf.writestr(f"{name}.npy", _npy_header((10**9,)) + b"\0" * 8)
            else:
                buf = __import__("io").BytesIO()
                np.save(buf, value)
                zf.writestr(f"{name}.npy", buf.getvalue())
        rc, out, err = _main(["check", str(folder)], capsys)
        _one_line_error(rc, out, err, "solution.npz", *words)


def test_object_arrays_are_never_unpickled(run, tmp_path):
    folder = tmp_path / "pickled"
    shutil.copytree(run, folder)
    z = dict(np.load(run / "solution.npz"))
    z["trace"] = np.array([{"a": 1}], dtype=object)
    np.savez(folder / "solution.npz", **z)  # np.savez pickles object arrays
    with pytest.raises(_io.ResultsError, match=r"'trace' holds Python objects"):
        ufm.load_results(folder)


def test_a_problem_too_large_for_memory_is_refused_before_compute(run, tmp_path, capsys, monkeypatch):
    """Before: an 80 GB problem hung with no message. widths 10^5 x 3 is 2e10 parameters (160 GB in float64
    for the parameters alone, more than any test machine has)."""
    monkeypatch.chdir(tmp_path)
    rc, out, err = _main(["solve", "--widths", "100000,100000,100000"], capsys)
    _one_line_error(rc, out, err, "needs at least about", "20,010,200,000 parameters", "available")
    assert not any(tmp_path.iterdir())  # refused before the results folder was made
    # the estimate is compared with what is available: with 1 kB available even the tiny saved run is refused
    monkeypatch.setattr(_memory, "available_memory", lambda: 1000)
    rc, out, err = _main(["check", str(run)], capsys)
    _one_line_error(rc, out, err, "needs at least about", "1.0 kB available")


def test_memory_estimate_parts_are_the_array_sizes():
    """Each part is the bytes of the arrays it counts (docstring of `ufm._memory.estimate_memory`), checked by hand for
    widths (64, 64, 64), K = 2, N = 100: P = 64*100 + 64*64*2 + 2*64 = 14,720."""
    p = ufm.UFM(num_classes=2, n_per_class=50, widths=(64, 64, 64), activation="relu", lam_H=5e-3, lam_W=5e-3)
    assert p.num_params == 64 * 100 + 64 * 64 * 2 + 2 * 64 == 14_720
    est = _memory.estimate_memory(
        p,
        dict(dtype="float64", method="lbfgs", memory_size=10, steps=10_000, history_every=1, snapshot_every=50),
        hessian=False,
    )
    assert est["solve"] == 8 * 14_720 * 28
    assert est["history"] == 2 * 8 * 10_001
    assert est["snapshots"] == 8 * 14_720 * 201
    assert est["total"] == sum(v for k, v in est.items() if k != "total")


# ---------------------------------------------------------------------------------------------------------------
# item 9: CLI user errors end in one line and exit 2


def test_dpi_out_of_range(run, tmp_path, capsys):
    for dpi in ("0", "-3", "100000"):
        rc, out, err = _main(["plot", str(run), "--dpi", dpi, "--out", str(tmp_path / "x")], capsys)
        _one_line_error(rc, out, err, "--dpi must be an integer in [1, 1200]")


def test_oversized_config_file_is_refused_unread(tmp_path, capsys):
    big = tmp_path / "big.json"
    with open(big, "wb") as fh:  # a sparse 17 MiB file: refused from its size, never read
        fh.truncate(17 * 2**20)
    rc, out, err = _main(["solve", "--config", str(big)], capsys)
    _one_line_error(rc, out, err, "--config", "17,825,792 bytes", "at most 16,777,216")


def test_unwritable_output_folder(tmp_path, capsys, monkeypatch):
    """A read-only --out is found before the solve (a probe file), not after it with a traceback."""
    ro = tmp_path / "ro"
    ro.mkdir()
    if os.geteuid() == 0:  # root writes into a chmod 500 folder: simulate the refusal of the file system

        def refuse(*a, **k):
            raise PermissionError(errno.EACCES, "Permission denied")

        monkeypatch.setattr(_io.tempfile, "mkstemp", refuse)
    else:
        ro.chmod(0o500)
    try:
        rc, out, err = _main(["solve", *TINY, "--no-plots", "--out", str(ro)], capsys)
    finally:
        ro.chmod(0o700)
    _one_line_error(rc, out, err, f"--out {ro} is not writable", "Permission denied")
    assert list(ro.iterdir()) == []


def test_disk_full_is_one_line_and_leaves_no_partial_file(tmp_path, capsys, monkeypatch):
    """Simulated ENOSPC at the flush of the first file: one line naming the file, no temporary file left, and
    the folder this command created removed (nothing in it was complete)."""

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(_io.os, "fsync", full)
    out = tmp_path / "full"
    rc, stdout, err = _main(["solve", *TINY, "--no-plots", "--out", str(out)], capsys)
    _one_line_error(rc, stdout, err, "cannot write", "config.json", "No space left on device")
    assert not out.exists()


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path):
    path = tmp_path / "f.json"
    _io.write_json(path, {"a": 1})

    def boom(fh):
        fh.write(b"{partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match="No space left") as e:
        _io.atomic_write(path, boom)
    assert e.value.filename == str(path)
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]  # no temporary file left behind
    # a planted symlink at the target is replaced, its target never written through
    victim = tmp_path / "victim"
    victim.write_text("keep")
    link = tmp_path / "link.json"
    link.symlink_to(victim)
    _io.write_json(link, {"b": 2})
    assert victim.read_text() == "keep" and not link.is_symlink()


# ---------------------------------------------------------------------------------------------------------------
# item 10 (CLI part): Ctrl-C saves what was reached


def test_interrupt_before_any_solution_removes_the_new_folder(tmp_path, capsys, monkeypatch):
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "run_solver", interrupted)
    out = tmp_path / "r"
    rc, stdout, err = _main(["solve", *TINY, "--out", str(out)], capsys)
    assert rc == 130 and "interrupted" in err and "nothing saved" in err and "Traceback" not in err
    assert not out.exists()


def test_interrupted_solution_is_saved(tmp_path, capsys, monkeypatch):
    """The engine's solve returns status 'interrupted' on SIGINT (code 6 there); the CLI saves config, solution
    and report, notes it, and exits 130. The run is loadable and re-checkable."""
    code = next((c for c, n in _solution.STATUS_NAMES.items() if n == "interrupted"), None)
    if code is None:  # before the engine's status exists: add it for this test
        code = 6
        monkeypatch.setitem(_solution.STATUS_NAMES, code, "interrupted")
        monkeypatch.setitem(_solution.MESSAGES, code, "Interrupted.")
    real = cli.run_solver

    def stopped_early(problem, solver, progress=None):
        sol = real(problem, dict(solver, steps=200), progress)
        return sol._replace(status=jnp.asarray(code, jnp.int32))

    monkeypatch.setattr(cli, "run_solver", stopped_early)
    out = tmp_path / "r"
    rc, stdout, err = _main(["solve", *TINY, "--out", str(out)], capsys)
    assert rc == 130, err
    assert {p.name for p in out.iterdir()} == {"config.json", "report.json", "solution.npz"}
    rep = json.loads((out / "report.json").read_text())
    assert rep["run"]["interrupted"] is True and rep["solution"]["status_name"] == "interrupted"
    n = rep["solution"]["num_steps"]
    assert any(f"interrupted after {n} steps" in note for note in rep["notes"]), rep["notes"]
    res = ufm.load_results(out)
    assert int(res.solution.num_steps) == n and int(res.solution.status) == code


def test_interrupt_during_the_check_still_writes_the_report(tmp_path, capsys, monkeypatch):
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_analyse", interrupted)
    out = tmp_path / "r"
    rc, stdout, err = _main(["solve", *TINY, "--out", str(out)], capsys)
    assert rc == 130
    rep = json.loads((out / "report.json").read_text())
    assert rep["run"]["interrupted"] is True and rep["check"] is None
    assert any("interrupted during the check" in n for n in rep["notes"])
    assert ufm.load_results(out).solution.success


@pytest.mark.slow
def test_real_sigint_during_a_long_solve(tmp_path):
    """End to end with a real SIGINT, 3 s into a 2·10^6-step gradient descent: exit 130, no traceback, and either
    a loadable folder whose solution is the point reached (status 'interrupted': the solver honours SIGINT) or no
    folder at all (a solver that only raises KeyboardInterrupt after its compiled loop)."""
    import signal
    import subprocess
    import sys
    import time

    env = dict(os.environ, MPLBACKEND="Agg")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ufm",
            "solve",
            *TINY[:-2],
            "--method",
            "gd",
            "--lr",
            "0.01",
            "--tol",
            "0",
            "--steps",
            "2000000",
            "--no-plots",
            "--out",
            "r",
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(3.0)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "interrupted" in err + out
    folder = tmp_path / "r"
    if folder.exists():
        res = ufm.load_results(folder)
        assert res.solution.status_name == "interrupted" and res.report["run"]["interrupted"] is True
        assert 0 < int(res.solution.num_steps) < 2_000_000


def test_overwrite_removes_the_old_report_and_figures_first(tmp_path, capsys, monkeypatch):
    """--overwrite of a results folder: the old report.json (the completeness mark) and the old figures go
    before anything new is written, so a failed or different rerun never leaves the last run's figures."""
    out = tmp_path / "r"
    out.mkdir()
    for name in ("config.json", "report.json", "gram.png", "notes.txt"):
        (out / name).write_text("old")

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(_io.os, "fsync", full)
    rc, stdout, err = _main(["solve", *TINY, "--no-plots", "--overwrite", "--out", str(out)], capsys)
    _one_line_error(rc, stdout, err, "cannot write", "config.json")
    # the old config.json is whole (atomic), the completeness mark and the stale figure are gone, user files stay
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "notes.txt"]
    assert (out / "config.json").read_text() == "old"
