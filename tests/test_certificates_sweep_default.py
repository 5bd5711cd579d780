"""Sweeps compute the second-order certificate by default (issue 16 part 2): ``ufm.sweep(..., second_order=True)``
and ``ufm sweep`` (config entry ``second_order``, default true). Measured cost per record against the solve:
``python -m benchmarks.bench_check --sweep`` (benchmarks/results/check_sweep.md)."""

import inspect

import ufm
from ufm._sweep import cli as sweep_cli


def test_sweep_default_is_second_order():
    assert inspect.signature(ufm.sweep).parameters["second_order"].default is True


def test_sweep_cli_default_is_second_order():
    args = sweep_cli._parser().parse_args(["grid.toml"])
    assert sweep_cli._options(args, {})["second_order"] is True
    # the config entry still turns it off
    assert sweep_cli._options(args, {"second_order": False})["second_order"] is False


def test_sweep_record_carries_the_hessian_certificate_by_default():
    # a shallow MSE UFM (THEORY.md §2, a strict minimum modulo rotations): the run converges, so the default record
    # holds a Hessian spectrum and a second-order verdict; second_order=False leaves it "not checked"
    grid = {"K": 2, "n": 2, "width": 3, "L": 1, "lam": 1e-2, "seeds": 1}
    (rec,) = ufm.sweep(grid, None, metrics=False, progress=False).records
    assert rec["status"] == "converged"
    cert = rec["check"]["certificate"]
    assert cert["hessian"] is not None and cert["second_order"] == "certified", cert["second_order"]
    (rec1,) = ufm.sweep(grid, None, metrics=False, progress=False, second_order=False).records
    assert rec1["check"]["certificate"]["second_order"] == "not checked"
