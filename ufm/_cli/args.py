"""Command-line argument types and the option tables shared by ``ufm solve`` and ``ufm explore``.

Each ``parse_*`` function is an `argparse` ``type=``: it turns the text of one option into a value or raises
`argparse.ArgumentTypeError` with the expected form. `PROBLEM_OPTIONS` and `SOLVER_OPTIONS` list, for each field of
`ufm.UFM` and of `ufm.solve`, its flags, its field name (the ``dest``), its type and its help line.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any


def parse_int_or_list(text: str):
    """An integer, or a tuple of integers from a comma list (``"3"`` -> 3, ``"3,4"`` -> (3, 4))."""
    try:
        vals = tuple(int(t) for t in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or a comma list of integers; got {text!r}") from None
    return vals[0] if len(vals) == 1 else vals


def parse_int_list(text: str):
    """A tuple of integers from a comma list (``"64,64"`` -> (64, 64))."""
    try:
        return tuple(int(t) for t in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of integers such as 64,64,64; got {text!r}") from None


def parse_float(text: str):
    """A number."""
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number; got {text!r}") from None


def parse_float_or_list(text: str):
    """A number, or a tuple of numbers from a comma list."""
    try:
        vals = tuple(float(t) for t in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or a comma list of numbers; got {text!r}") from None
    return vals[0] if len(vals) == 1 else vals


def parse_int(text: str):
    """An integer."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer; got {text!r}") from None


DEFAULT = "default"  # an option given as "default"/"auto": use the solver's default even over a config file


def parse_float_or_default(text: str):
    """A number, or `DEFAULT` for ``default``/``auto``."""
    return DEFAULT if text.lower() in ("default", "auto") else parse_float(text)


def parse_int_or_default(text: str):
    """An integer, or `DEFAULT` for ``default``/``auto``."""
    return DEFAULT if text.lower() in ("default", "auto") else parse_int(text)


# (flags, field, type, help): the add_argument flags, the dest (a UFM field or a solve argument), type= and help=
Option = tuple[tuple[str, ...], str, Callable[[str], Any], str]
PROBLEM_OPTIONS: list[Option] = [
    (("-K", "--num-classes"), "num_classes", parse_int, "K, the number of classes (default 2)"),
    (
        ("-n", "--n-per-class"),
        "n_per_class",
        parse_int_or_list,
        "n, samples per class, or a comma list n_1,...,n_K for unequal classes (default 50)",
    ),
    (
        ("--widths",),
        "widths",
        parse_int_list,
        "d_1,...,d_L: the feature dimension and the input widths of W_1..W_L; L = their number (default 64,64,64)",
    ),
    (("--activation",), "activation", str, "linear | relu, applied after W_1..W_{L-1} (default relu)"),
    (("--loss",), "loss", str, "mse | ce (default mse)"),
    (("--bias",), "bias", str, "none | free | reg: the output bias b (default none)"),
    (("--lam-H", "--lam-h"), "lam_H", parse_float, "lambda_H, weight decay on H (default 5e-3)"),
    (
        ("--lam-W", "--lam-w"),
        "lam_W",
        parse_float_or_list,
        "lambda_W, one value or a comma list with one per layer (default 5e-3)",
    ),
    (("--lam-b",), "lam_b", parse_float, "lambda_b > 0, only with --bias reg (default 0)"),
    (("--label-smoothing",), "label_smoothing", parse_float, "alpha in [0, 1), only with --loss ce (default 0)"),
]
SOLVER_OPTIONS: list[Option] = [
    (("--method",), "method", str, "lbfgs | gd | momentum | adam (default lbfgs)"),
    (
        ("--lr",),
        "lr",
        parse_float_or_default,
        "learning rate (default: the solver's, 1.0 for lbfgs, 0.1 gd/momentum, 1e-3 adam)",
    ),
    (("--steps",), "steps", parse_int_or_default, "step budget max_steps (default: 10000 lbfgs, 100000 others)"),
    (("--tol",), "tol", parse_float_or_default, "stop when ||grad f||_2 <= tol (default 1e-9 float64, 1e-5 float32)"),
    (("--seed",), "seed", parse_int, "seed of the random init, jax.random.key(seed) (default 0)"),
    (
        ("--init-scale",),
        "init_scale",
        parse_float_or_default,
        (
            "scale of the random init (default auto: from depth, class sizes and lambdas, see ufm.solve; "
            "restarts at 1.0 if the run ends at the zero saddle)"
        ),
    ),
    (("--dtype",), "dtype", str, "float64 | float32 (default float64)"),
    (
        ("--patience",),
        "patience",
        parse_int_or_default,
        "steps without improvement before status 'stalled' (default 50 lbfgs, 1000 others)",
    ),
    (("--history-every",), "history_every", parse_int, "record loss and gradient norm every k steps (default 1)"),
    (
        ("--snapshot-every",),
        "snapshot_every",
        parse_int_or_default,
        "save parameters every k steps for the NC1 curves; 0 = none (default auto: at most 200 snapshots)",
    ),
    (("--momentum",), "momentum", parse_float, "momentum of --method momentum (default 0.9)"),
    (("--memory-size",), "memory_size", parse_int, "L-BFGS memory (default 10)"),
]
