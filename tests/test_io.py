"""Results in and out (issue 19 item 3): a results folder saved from Python is read by ``ufm check``/``ufm plot``
and by `ufm.load_results`, a CLI run opens in Python, both without pickle and stamped with the versions that made
them; junk is refused with one line naming the file and the field.

The reference for every round trip is the in-memory object itself (bitwise equality of the arrays: ``.npz``
stores IEEE values exactly), and the CLI's independent re-check of the loaded folder.
"""

import json
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cli_cases import TINY

import ufm
from ufm import _io, cli

PROBLEM = ufm.UFM(
    num_classes=3, n_per_class=2, widths=(4,), activation="linear", loss="ce", bias="free", lam_H=1e-3, lam_W=2e-3
)


@pytest.fixture(scope="module")
def solved():
    """The tiny shallow CE problem of tests/test_cli.py, solved by the Python API (200 L-BFGS steps) and checked."""
    sol = ufm.solve(PROBLEM, key=jax.random.key(0), max_steps=200)
    return sol, ufm.check(PROBLEM, sol)


def _same_solution(a, b):
    for x, y in zip(jax.tree_util.tree_leaves(a.params), jax.tree_util.tree_leaves(b.params)):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    for name in ("value", "grad_norm", "num_steps", "status"):
        assert np.asarray(getattr(a, name)) == np.asarray(getattr(b, name)), name
    n = int(a.num_steps) + 1  # the history is trimmed to the entries written (the rest is NaN padding)
    np.testing.assert_array_equal(np.asarray(a.history.loss)[:n], np.asarray(b.history.loss))
    np.testing.assert_array_equal(np.asarray(a.history.grad_norm)[:n], np.asarray(b.history.grad_norm))


def test_python_to_folder_to_python_and_cli(solved, tmp_path, capsys):
    sol, report = solved
    folder = ufm.save_results(
        tmp_path / "py",
        PROBLEM,
        sol,
        report,
        solver={"method": "lbfgs", "seed": 0},
        extras={"my_curve": np.arange(5.0)},
    )
    assert {p.name for p in folder.iterdir()} == {"config.json", "report.json", "solution.npz"}
    res = ufm.load_results(folder)
    assert res.problem.to_dict() == PROBLEM.to_dict()
    _same_solution(sol, res.solution)
    np.testing.assert_array_equal(res.extras["my_curve"], np.arange(5.0))
    assert res.report["check"]["verdict"] == report.verdict
    assert res.report["comparison"]["predicted_loss"] == pytest.approx(report.predicted_loss, rel=1e-15)
    assert res.config["solver"] == {"method": "lbfgs", "seed": 0, "history_every": 1}
    # provenance: the versions that made the files, in every file
    for made in (res.config["made_by"], res.report["made_by"]):
        assert made["format"] == "ufm-results" and made["format_version"] == 1
        assert made["jax"] == jax.__version__ and made["numpy"] == np.__version__ and made["ufm"]
    with np.load(folder / "solution.npz", allow_pickle=False) as z:  # every member loads without pickle
        assert json.loads(str(z["made_by"]))["jax"] == jax.__version__
        assert all(z[k].dtype != object for k in z.files)
    # the CLI reads it: ufm check recomputes the same loss and verdict from the files alone
    rc = cli.main(["check", str(folder), "--json"])
    rep = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert rep["solution"]["value"] == float(sol.value) and rep["check"]["verdict"] == report.verdict
    # config.json is a valid --config file (made_by is ignored)
    problem, solver = cli.resolve_config(
        cli._build_parser().parse_args(["solve", "--config", str(folder / "config.json")])
    )
    assert problem.to_dict() == PROBLEM.to_dict() and solver["method"] == "lbfgs"


def test_cli_folder_opens_in_python(solved, tmp_path, capsys):
    """A CLI run (same problem, seed 0, 200 steps: the same compiled solve) loads into the objects the API made."""
    sol, report = solved
    out = tmp_path / "cli"
    assert (
        cli.main(
            [
                "solve",
                *TINY,
                "--no-plots",
                "--json",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    capsys.readouterr()
    res = ufm.load_results(out)
    assert res.report["run"]["versions"]["jax"] == jax.__version__
    snap = res.config["solver"]["snapshot_every"]
    again = ufm.solve(PROBLEM, key=jax.random.key(0), max_steps=200, snapshot_every=snap)
    _same_solution(again, res.solution)
    assert res.extras["trace_nc1"].shape == (res.extras["trace_nc1_step"].size, 1)
    assert ufm.check(res.problem, res.solution).verdict == res.report["check"]["verdict"] == report.verdict


def test_float32_stays_float32(tmp_path):
    sol = ufm.solve(PROBLEM, key=jax.random.key(1), max_steps=5, dtype="float32", method="gd")
    ufm.save_results(tmp_path / "f32", PROBLEM, sol)
    res = ufm.load_results(tmp_path / "f32")
    assert res.solution.params.H.dtype == jnp.float32 and res.report["solution"]["dtype"] == "float32"
    _same_solution(sol, res.solution)
    assert res.report["check"] is None and res.report["metrics"] is None  # report=None: the summary only


def test_save_results_refuses_what_it_cannot_save(solved, tmp_path):
    sol, _ = solved
    ufm.save_results(tmp_path / "a", PROBLEM, sol)
    with pytest.raises(ValueError, match="already holds results.*overwrite=True"):
        ufm.save_results(tmp_path / "a", PROBLEM, sol)
    ufm.save_results(tmp_path / "a", PROBLEM, sol, overwrite=True)
    batch = jax.tree_util.tree_map(lambda x: jnp.stack([x, x]), sol)
    with pytest.raises(ValueError, match=r"one solution; got a batch of 2.*take\(i\)"):
        ufm.save_results(tmp_path / "b", PROBLEM, batch)
    with pytest.raises(ValueError, match=r"solution.params.H must have shape d_1 x N = \(5, 6\)"):
        ufm.save_results(tmp_path / "c", PROBLEM.replace(widths=(5,)), sol)
    with pytest.raises(TypeError, match="report must be a ufm.Report, a dict or None"):
        ufm.save_results(tmp_path / "d", PROBLEM, sol, report="good")
    with pytest.raises(TypeError, match=r"extras\['s'\] must be a numeric array"):
        ufm.save_results(tmp_path / "e", PROBLEM, sol, extras={"s": np.array(["x"])})
    assert not (tmp_path / "b").exists()


def _junk(tmp_path, solved, kind):
    sol, _ = solved
    f = tmp_path / kind
    if kind == "binary-file":
        f.write_bytes(b"\x00\xff" * 50)
        return f
    ufm.save_results(f, PROBLEM, sol)
    if kind == "binary-config":
        (f / "config.json").write_bytes(b"\x00\xff\xfe")
    elif kind == "config-list":
        (f / "config.json").write_text("[1, 2]")
    elif kind == "bad-problem":
        (f / "config.json").write_text(json.dumps({"problem": {**PROBLEM.to_dict(), "lam_H": [1e-3, 1e-2]}}))
    elif kind == "newer-format":
        cfg = json.loads((f / "config.json").read_text())
        cfg["made_by"]["format_version"] = 99
        (f / "config.json").write_text(json.dumps(cfg))
    elif kind == "npz-not-zip":
        (f / "solution.npz").write_text("not a zip")
    elif kind == "npz-bad-header":
        with zipfile.ZipFile(f / "solution.npz", "a") as zf:
            zf.writestr("junk.npy", b"\x93NUMPY garbage")
    elif kind == "npz-missing-W1":
        z = {k: v for k, v in np.load(f / "solution.npz").items() if k != "W1"}
        np.savez(f / "solution.npz", **z)
    return f


JUNK = [
    ("binary-file", "is not a folder"),
    ("binary-config", "config.json is not valid JSON"),
    ("config-list", "must hold a JSON object; got list"),
    ("bad-problem", "[problem]: lam_H must be a scalar"),
    ("newer-format", "format_version 99, newer than this ufm reads (1)"),
    ("npz-not-zip", "could not be read as .npz"),
    ("npz-bad-header", "array 'junk' has no valid .npy header"),
    ("npz-missing-W1", "has no array 'W1'"),
]


@pytest.mark.parametrize("kind,message", JUNK, ids=[k for k, _ in JUNK])
def test_load_results_on_junk_names_the_file(kind, message, solved, tmp_path):
    folder = _junk(tmp_path, solved, kind)
    with pytest.raises(ufm.ResultsError) as e:
        ufm.load_results(folder)
    text = str(e.value)
    assert message in text and "\n" not in text
    assert str(folder) in text


BAD_CALLS = [
    (lambda: ufm.load_results(123), TypeError, "folder must be a path"),
    (lambda: ufm.load_results(None), TypeError, "folder must be a path"),
    (lambda: ufm.load_results(".", max_bytes=-1), ValueError, "max_bytes must be a positive integer"),
    (lambda: ufm.load_results(".", max_bytes="1"), TypeError, "max_bytes must be a positive integer"),
    (lambda: ufm.load_results(".", extras="H"), TypeError, "extras must be True, False or a sequence"),
    (lambda: ufm.save_results(None, PROBLEM, None), TypeError, "folder must be a path"),
    (lambda: ufm.save_results("x", {"num_classes": 3}, None), TypeError, "problem must be a ufm.UFM"),
    (lambda: ufm.save_results("x", PROBLEM, "s"), TypeError, "solution must be a ufm.Solution"),
]


@pytest.mark.parametrize("call,exc,message", BAD_CALLS, ids=[m + str(i) for i, (_, _, m) in enumerate(BAD_CALLS)])
def test_api_errors_name_the_argument(call, exc, message, tmp_path, monkeypatch):
    """Before: NumPy/pathlib messages ('expected str, bytes or os.PathLike object, not int') or a comparison error
    deep inside; now the argument is named, before any file is touched."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(exc, match=message):
        call()
    assert not any(tmp_path.iterdir())


def test_polish_steps_round_trip(solved, tmp_path):
    # `Solution.polish_steps` (the kink polish's L-BFGS steps, None when no polish ran) is saved when set and read
    # back as the same integer; a file without it loads as None (files written before the field existed)
    sol, _ = solved
    polished = sol._replace(polish_steps=jnp.asarray(37, jnp.int32))
    a = _io.load_solution(_io.save_solution(tmp_path / "a.npz", polished), PROBLEM)[0]
    b = _io.load_solution(_io.save_solution(tmp_path / "b.npz", sol), PROBLEM)[0]
    assert int(a.polish_steps) == 37 and b.polish_steps is None
    _same_solution(polished, a)
