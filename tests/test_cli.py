"""The ``ufm`` command end to end: subprocess runs for the real entry points (few: each pays JAX import and
compile), in-process ``ufm.cli.main([...])`` for option parsing, config files and bad input.

Independent references: the deep ReLU UFM's DNC loss from its scalar problem (THEORY.md §0, §4.1), solved here
with SciPy; the Python API (`ufm.solve`) for the same problem and seed.
"""

import json
import math
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from cli_cases import TINY
from scipy.optimize import brentq

import ufm
from ufm import _io, cli

RESULT_FILES = {"config.json", "report.json", "solution.npz"}
FIGURES = {"training.png", "collapse.png", "gram.png", "singular_values.png", "class_means.png"}


def _run(args, cwd, timeout=300):
    env = dict(os.environ, MPLBACKEND="Agg", PYTHONWARNINGS="error::RuntimeWarning")
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def _ufm_exe():
    """The installed console script (pyproject: ufm = "ufm.cli:main"), or python -m ufm where it is not on PATH."""
    exe = shutil.which("ufm")
    return [exe] if exe else [sys.executable, "-m", "ufm"]


def dnc_loss(K, n, lam_H, lam_W, L):
    """f_DNC of the bias-free deep ReLU UFM = the bias-free deep-linear optimum with P = L + 1 factors
    (THEORY.md §4.1). Per direction phi(s) = (1-s)^2/2 + K (P/2) C s^{2/P}, C = (n lam_H prod lam_W)^{1/P};
    for P >= 3 the nonzero minimiser solves phi'(s) = 0 <=> (1 - s) s^{1-2/P} = K C on (s_m, 1),
    s_m = (P-2)/(2P-2) (the maximiser of the left side), and the optimum is min(phi(s+), phi(0) = 1/2)."""
    P = L + 1
    C = (n * lam_H * lam_W**L) ** (1 / P)
    phi = lambda s: (1 - s) ** 2 / 2 + K * (P / 2) * C * s ** (2 / P)
    s_m = (P - 2) / (2 * P - 2)
    s_plus = brentq(lambda s: (1 - s) * s ** (1 - 2 / P) - K * C, s_m, 1.0, xtol=1e-15, rtol=1e-15)
    return min(phi(s_plus), 0.5)


# ---------------------------------------------------------------------------------------------------------------
# subprocess runs


def test_default_solve_end_to_end(tmp_path):
    """The true default `ufm solve` (the README's first command): report, files, provenance, and the loss equal to
    the DNC closed form (K = 2: DNC is the global optimum, Súkeník et al. 2023)."""
    out = _run(_ufm_exe() + ["solve"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr
    folders = [p for p in tmp_path.iterdir() if p.name.startswith("ufm-results-")]
    assert len(folders) == 1
    folder = folders[0]
    assert RESULT_FILES | FIGURES <= {p.name for p in folder.iterdir()}
    for fig in FIGURES:
        assert (folder / fig).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    report = json.loads((folder / "report.json").read_text())
    config = json.loads((folder / "config.json").read_text())
    assert config["problem"] == cli.DEFAULT_PROBLEM
    assert config["solver"]["method"] == "lbfgs" and config["solver"]["dtype"] == "float64"
    f_dnc = dnc_loss(K=2, n=50, lam_H=5e-3, lam_W=5e-3, L=3)
    value = report["solution"]["value"]
    # L-BFGS stops at ||grad f|| <= 1e-9; near a minimiser f - f* = O(||grad||^2 / curvature) << 1e-10, and the
    # DNC point is the global optimum here (K = 2), so the float64 run must agree to well below 1e-9 relative.
    assert report["solution"]["status_name"] in ("converged", "stalled", "precision_floor")
    assert abs(value - f_dnc) <= 1e-9 * f_dnc
    assert value >= f_dnc - 1e-12  # no run can go below the global optimum (beyond rounding)
    cmp_ = report["comparison"]
    assert cmp_["predicted_loss"] == pytest.approx(f_dnc, rel=1e-12)  # ufm.predict agrees with our scalar solve
    assert cmp_["gap"] == pytest.approx(value - cmp_["predicted_loss"], abs=1e-15)
    # per-layer metrics: NC1 collapses in every layer (H = M kron 1^T up to the solver's precision)
    assert all(f["nc1"] < 1e-10 for f in report["metrics"]["features"])
    # provenance
    run = report["run"]
    assert run["versions"]["jax"] == jax.__version__ and run["versions"]["ufm"]
    assert run["device"]
    assert run["seed"] == 0 and run["wall_time_s"] > run["solve_time_s"] > 0 and run["x64"] is True
    assert run["progress_chunks"] is False  # stderr is not a terminal here: one compiled solve
    # the human report names the essentials
    text = out.stdout
    for word in ("loss", "predicted", "gap", "per layer", "H_3", str(folder.name)):
        assert word in text, word
    # ufm.check: at the K = 2 DNC optimum (a theorem) the verdict must be "matches"; 14,720 parameters is within
    # --hessian auto's limit, so the second-order certificate is computed (no "skipped" note)
    assert report["check"]["verdict"] == "matches", report["check"]["explanation"]
    assert "verdict     matches" in text
    assert report["check"]["certificate"]["hessian"] is not None
    assert not any("second-order certificate skipped" in n for n in report["notes"])
    loss_line = next(line for line in text.splitlines() if line.startswith("loss"))
    assert float(loss_line.split()[1]) == pytest.approx(value, rel=1e-14)
    # the NC1 trace over training is stored for `ufm plot`
    with np.load(folder / "solution.npz") as z:
        assert z["trace_nc1"].shape == (z["trace_nc1_step"].size, 3) and z["trace_nc1_step"][0] == 0
        assert z["history_loss"].size == report["solution"]["num_steps"] + 1


def test_config_options_json_agree_with_python_api(tmp_path):
    """`python -m ufm solve --config F --OPTIONS --json`: stdout parses, options override the file, and the result
    equals `ufm.solve` on the same problem and seed."""
    (tmp_path / "run.toml").write_text(
        "[problem]\n"
        "num_classes = 3\nn_per_class = [3, 2, 2]\nwidths = [4, 3]\nactivation = 'linear'\nloss = 'mse'\n"
        "bias = 'free'\nlam_H = 0.5\nlam_W = [1e-3, 2e-3]\n"
        "[solver]\nsteps = 300\nseed = 1\n"
    )
    out = _run(
        [
            sys.executable,
            "-m",
            "ufm",
            "solve",
            "--config",
            "run.toml",
            "--lam-H",
            "1e-3",
            "--seed",
            "7",
            "--init-scale",
            "0.5",
            "--json",
            "--no-plots",
            "--out",
            "res",
        ],
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    rep = json.loads(out.stdout)  # stdout is exactly one JSON document
    prob = ufm.UFM(
        num_classes=3,
        n_per_class=(3, 2, 2),
        widths=(4, 3),
        activation="linear",
        loss="mse",
        bias="free",
        lam_H=1e-3,
        lam_W=(1e-3, 2e-3),
    )
    assert rep["problem"] == prob.to_dict()  # lam_H from the command line, the rest from the file
    assert rep["solver"]["seed"] == 7 and rep["solver"]["steps"] == 300
    sol = ufm.solve(
        prob, key=jax.random.key(7), max_steps=300, init_scale=0.5, snapshot_every=rep["solver"]["snapshot_every"]
    )
    # the command is one ufm.solve call with these arguments: the same compiled loop, so equal to rounding
    assert rep["solution"]["value"] == pytest.approx(float(sol.value), rel=1e-12, abs=1e-300)
    assert rep["solution"]["num_steps"] == int(sol.num_steps)
    assert rep["solution"]["status"] == int(sol.status)
    saved = np.load(tmp_path / "res" / "solution.npz")
    np.testing.assert_allclose(saved["H"], np.asarray(sol.params.H), rtol=1e-10, atol=1e-14)
    assert rep["comparison"]["predicted_loss"] is not None  # linear MSE with free bias has a closed form


def test_bad_input_exits_2_with_one_line(tmp_path):
    out = _run(_ufm_exe() + ["solve", "--lam-W", "1e-3,2e-3"], cwd=tmp_path)  # L = 3 layers, 2 lambdas
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "lam_W" in lines[0] and "L=3" in lines[0], out.stderr
    assert out.stdout == "" and not any(tmp_path.iterdir())  # nothing computed, nothing written


# ---------------------------------------------------------------------------------------------------------------
# in-process


def _solve_in_process(argv, capsys):
    rc = cli.main(argv)
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """One tiny in-process solve (shallow CE, K = 3) saved without figures; later tests re-check and re-plot it."""
    folder = tmp_path_factory.mktemp("run") / "res"
    rc = cli.main(["solve", *TINY, "--no-plots", "--json", "--out", str(folder)])
    assert rc == 0
    return folder


def test_saved_run_is_complete(saved_run):
    assert {p.name for p in saved_run.iterdir()} == RESULT_FILES
    res = _io.load_results(saved_run)
    rep = json.loads((saved_run / "report.json").read_text())
    assert float(res.solution.value) == rep["solution"]["value"]
    assert res.problem.to_dict() == rep["problem"]
    # shallow CE, balanced, d >= K-1 (THEORY.md §2): f* = -log(1 - (K-1)c) + c(K-1) alpha*,
    # alpha* = log((1 - (K-1)c)/c), c = sqrt(n lam_W lam_H)
    K, c = 3, math.sqrt(2 * 2e-3 * 1e-3)  # n = 2
    alpha = math.log((1 - (K - 1) * c) / c)
    f_star = -math.log(1 - (K - 1) * c) + c * (K - 1) * alpha
    assert rep["comparison"]["predicted_loss"] == pytest.approx(f_star, rel=1e-12)
    assert rep["solution"]["success"]
    assert rep["solution"]["value"] == pytest.approx(f_star, rel=1e-9)  # converged to ||grad|| <= 1e-9
    # 39 parameters: --hessian auto computes the second-order certificate, and the optimum passes it
    assert rep["check"]["verdict"] == "matches" and rep["check"]["certificate"]["hessian"] is not None
    assert rep["notes"] == []


def test_check_reproduces_the_saved_report(saved_run, capsys):
    rc, out, err = _solve_in_process(["check", str(saved_run), "--json"], capsys)
    assert rc == 0, err
    rep = json.loads(out)
    saved = json.loads((saved_run / "report.json").read_text())
    assert rep["solution"] == saved["solution"]
    assert rep["comparison"] == saved["comparison"]
    assert rep["metrics"]["features"][0]["nc1"] == saved["metrics"]["features"][0]["nc1"]
    assert rep["check"]["verdict"] == saved["check"]["verdict"] == "matches"
    rc, out, err = _solve_in_process(["check", str(saved_run), "--hessian", "off"], capsys)
    assert rc == 0 and "loss" in out and "re-checked" in out
    assert "verdict     matches" in out and "second-order certificate skipped (--hessian off)" in out


def test_plot_redraws_every_figure(saved_run, capsys, tmp_path):
    rc, out, err = _solve_in_process(["plot", str(saved_run), "--out", str(tmp_path / "figs")], capsys)
    assert rc == 0, err
    assert {p.name for p in (tmp_path / "figs").iterdir()} == FIGURES
    assert len(out.strip().splitlines()) == len(FIGURES)


def test_config_precedence_and_exact_rerun(saved_run, tmp_path, capsys, monkeypatch):
    """Defaults < file < command line; a results folder's config.json re-runs the same solve exactly."""
    monkeypatch.chdir(tmp_path)
    rc, out, err = _solve_in_process(
        ["solve", "--config", str(saved_run / "config.json"), "--no-plots", "--json", "--out", "again"], capsys
    )
    assert rc == 0, err
    a = np.load(saved_run / "solution.npz")
    b = np.load(tmp_path / "again" / "solution.npz")
    assert float(a["value"]) == float(b["value"]) and int(a["num_steps"]) == int(b["num_steps"])
    np.testing.assert_array_equal(a["H"], b["H"])
    assert json.loads((tmp_path / "again" / "config.json").read_text()) == json.loads(
        (saved_run / "config.json").read_text()
    )

    # flat keys, dashes, JSON, and command-line overrides (the same shapes and step budget as TINY: no recompile)
    (tmp_path / "flat.json").write_text(
        json.dumps(
            {
                "num-classes": 3,
                "widths": [4],
                "lam-H": 0.25,
                "loss": "ce",
                "activation": "linear",
                "bias": "free",
                "n_per_class": 2,
                "max_steps": 200,
                "seed": 3,
            }
        )
    )
    rc, out, err = _solve_in_process(
        [
            "solve",
            "--config",
            "flat.json",
            "--lam-H",
            "1e-3",
            "--lam-W",
            "2e-3",
            "--no-plots",
            "--json",
            "--out",
            "flat",
        ],
        capsys,
    )
    assert rc == 0, err
    cfg = json.loads((tmp_path / "flat" / "config.json").read_text())
    assert cfg["problem"]["lam_H"] == 1e-3 and cfg["problem"]["num_classes"] == 3 and cfg["problem"]["lam_W"] == 2e-3
    assert cfg["solver"]["steps"] == 200 and cfg["solver"]["seed"] == 3
    assert cfg["solver"]["lr"] == 1.0 and cfg["solver"]["tol"] == 0.0  # solver defaults resolved and recorded
    # "--steps default" restores the solver default over the file's value
    problem, solver = cli.resolve_config(
        cli._build_parser().parse_args(["solve", "--config", "flat.json", "--steps", "default"])
    )
    assert solver["steps"] == 10_000 and problem.num_classes == 3


def _write(tmp_path, name, text):
    (tmp_path / name).write_text(text)
    return str(tmp_path / name)


BAD = [
    (["solve", "--activation", "tanh"], "activation"),
    (["solve", "--loss", "hinge"], "loss"),
    (["solve", "--widths", "4,x"], "--widths"),
    (["solve", "-n", "2.5"], "--n-per-class"),
    (["solve", "--lam-H", "-1"], "lam_H"),
    (["solve", "--lam-W", "1e-3,2e-3"], "lam_W"),
    (["solve", "--bias", "reg"], "lam_b"),
    (["solve", "--label-smoothing", "0.1"], "label_smoothing"),
    (["solve", "-K", "1"], "num_classes"),
    (["solve", "--steps", "0"], "steps"),
    (["solve", "--lr", "-0.1"], "lr"),
    (["solve", "--method", "newton"], "method"),
    (["solve", "--dtype", "float16"], "dtype"),
    (["solve", "--snapshot-every", "-2"], "snapshot_every"),
    (["solve", "--nonsense"], "unrecognized arguments: --nonsense"),
    (["solve", "--config", "missing.toml"], "missing.toml does not exist"),
    (["solve", "--config", "cfg.yaml"], ".toml or .json"),
    (["solve", "--config", "unknown.toml"], "unknown field 'lamH'"),
    (["solve", "--config", "badtype.toml"], "widths"),
    (["solve", "--config", "broken.toml"], "could not be parsed"),
    (["solve", "--config", "badsolver.toml"], "unknown field 'steps_max' in [solver]"),
    (["check", "no-such-folder"], "no-such-folder does not exist"),
    (["check", "empty"], "config.json is missing"),
    (["check", "nosolution"], "solution.npz is missing"),
    (["check", "badconfig"], "not valid JSON"),
    (["check", "wrongshape"], "H must have shape d_1 x N"),
    (["plot", "wrongshape"], "H must have shape d_1 x N"),
    (["bogus"], "invalid choice"),
    (["sweep", "missing.toml"], "not found"),  # handed to ufm._sweep.sweep_main
]


@pytest.mark.parametrize("argv,message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_one_clear_line(argv, message, saved_run, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _write(tmp_path, "cfg.yaml", "x: 1\n")
    _write(tmp_path, "unknown.toml", "[problem]\nlamH = 1.0\n")
    _write(tmp_path, "badtype.toml", "[problem]\nwidths = 'abc'\n")
    _write(tmp_path, "broken.toml", "[problem\nwidths = [4]\n")
    _write(tmp_path, "badsolver.toml", "[solver]\nsteps_max = 3\n")
    (tmp_path / "empty").mkdir()
    for name in ("nosolution", "badconfig", "wrongshape"):
        shutil.copytree(saved_run, tmp_path / name)
    (tmp_path / "nosolution" / "solution.npz").unlink()
    (tmp_path / "badconfig" / "config.json").write_text("{not json")
    z = dict(np.load(saved_run / "solution.npz"))
    z["H"] = z["H"][:, :-1]  # d_1 x (N-1): does not fit the config's problem
    np.savez(tmp_path / "wrongshape" / "solution.npz", **z)
    before = sorted(p.name for p in tmp_path.iterdir())

    rc, out, err = _solve_in_process(argv, capsys)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert message in lines[0] and lines[0].startswith("ufm"), lines[0]
    assert "Traceback" not in err and out == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no results folder was created


def test_out_folder_is_not_overwritten(saved_run, capsys):
    rc, out, err = _solve_in_process(["solve", *TINY, "--out", str(saved_run)], capsys)
    assert rc == 2 and "already holds results" in err and "--overwrite" in err


def test_help_exits_0(capsys):
    assert cli.main(["solve", "--help"]) == 0
    text = capsys.readouterr().out
    for opt in (
        "--num-classes",
        "--n-per-class",
        "--widths",
        "--activation",
        "--loss",
        "--bias",
        "--lam-H",
        "--lam-W",
        "--lam-b",
        "--label-smoothing",
        "--method",
        "--lr",
        "--steps",
        "--tol",
        "--seed",
        "--init-scale",
        "--dtype",
        "--config",
        "--out",
        "--json",
        "--progress",
    ):
        assert opt in text, opt


# the names `ufm.cli` had before its concepts moved to ufm/_cli/ (scripts, tests and docs/hooks.py use them)
CLI_NAMES = (
    "main",
    "PROG",
    "DEFAULT_PROBLEM",
    "DEFAULT_SOLVER",
    "read_config_data",
    "load_config_file",
    "resolve_config",
    "run_solver",
    "draw_figures",
    "build_report",
    "format_report",
    "estimate_memory",
    "UsageError",
    "EXPLORE_DEFAULT_PROBLEM",
    "EXPLORE_DEFAULTS",
    "resolve_explore_config",
    "format_exploration",
    "draw_explore_figures",
)


def test_cli_module_keeps_its_names_and_every_subcommand_has_help(capsys):
    missing = [n for n in CLI_NAMES if not hasattr(cli, n)]
    assert not missing, missing
    assert cli.main(["--help"]) == 0
    top = capsys.readouterr().out
    for sub in ("solve", "check", "plot", "explore", "sweep"):
        assert sub in top, sub
    for sub, opt in (("check", "--hessian"), ("plot", "--dpi"), ("explore", "--time-budget")):
        assert cli.main([sub, "--help"]) == 0
        assert opt in capsys.readouterr().out, sub


# ---------------------------------------------------------------------------------------------------------------
# progress: the chunked run


def test_progress_line_on_stderr(saved_run, tmp_path, capsys):
    rc, out, err = _solve_in_process(
        ["solve", *TINY, "--steps", "40", "--progress", "always", "--no-plots", "--out", str(tmp_path / "p")], capsys
    )
    assert rc == 0
    assert "step" in err and "|grad f|" in err and "/40" in err
    assert "step " not in out  # progress never pollutes stdout


# ---------------------------------------------------------------------------------------------------------------
# initialisation: "auto" kept (with the number it stood for), and the zero-saddle restart as in ufm.solve

LARGE_LAMBDA = "-K 3 -n 3,2,1 --widths 4,4 --activation linear --lam-H 0.1 --lam-W 0.1".split()


def _large_lambda_cli(tmp_path, capsys, name):
    rc, out, err = _solve_in_process(
        ["solve", *LARGE_LAMBDA, "--hessian", "off", "--no-plots", "--json", "--out", str(tmp_path / name)], capsys
    )
    assert rc == 0, err
    config = json.loads((tmp_path / name / "config.json").read_text())
    return json.loads(out), config


def test_cli_records_auto_and_restarts_at_the_zero_saddle_as_solve_does(tmp_path, capsys, monkeypatch):
    import ufm._options as options

    monkeypatch.setattr(options, "ESCAPE_PRODUCT", 0.0)  # the depth rule alone: s = 0.2, every start at zero
    with pytest.warns(RuntimeWarning, match="zero saddle.*restarted once from init_scale=1.0"):
        rep, config = _large_lambda_cli(tmp_path, capsys, "restart")
    # config.json keeps "auto" (a rerun applies the rule and the restart again) and the number it stood for
    assert config["solver"]["init_scale"] == "auto" and config["solver"]["init_scale_auto"] == pytest.approx(0.2)
    problem, solver = cli.resolve_config(
        cli._build_parser().parse_args(["solve", "--config", str(tmp_path / "restart" / "config.json")])
    )
    assert solver["init_scale"] == "auto" and solver["init_scale_auto"] == config["solver"]["init_scale_auto"]
    p = ufm.UFM(num_classes=3, n_per_class=(3, 2, 1), widths=(4, 4), lam_H=0.1, lam_W=0.1)
    with pytest.warns(RuntimeWarning):
        sol = ufm.solve(p, key=0, snapshot_every=config["solver"]["snapshot_every"])
    assert rep["solution"]["status"] == int(sol.status) == 0
    assert rep["solution"]["value"] == float(sol.value) and rep["solution"]["num_steps"] == int(sol.num_steps)
    assert rep["solution"]["value"] == pytest.approx(float(ufm.predict(p).loss), rel=1e-10)
