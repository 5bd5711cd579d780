"""The ``ufm`` command: solve a UFM, check the optimum against the theory, save it and draw it.

::

    ufm solve [OPTIONS]      solve (default: the binary deep ReLU UFM of Súkeník et al. 2023, L = 3), check it
                             against ufm.predict, print a short report and write a results folder
    ufm check RESULTS        re-check a saved solution (prints the report; the folder is not changed)
    ufm plot RESULTS         redraw the figures of a saved solution
    ufm sweep CONFIG         run a grid of solves (`ufm._sweep.sweep_main`; see ``ufm sweep --help``)

``python -m ufm ...`` is the same command. Every field of the problem (`ufm.UFM`) and of the solver
(`ufm.solve`) is an option, or comes from a TOML/JSON file given with ``--config`` (tables ``[problem]`` and
``[solver]``, or flat keys); options on the command line override the file, which overrides the built-in
default problem. A results folder's ``config.json`` is itself a valid ``--config`` file.

The command computes in float64 by default: it turns on ``jax_enable_x64`` before any JAX computation (a
global JAX setting, also when `main` is called from Python). ``--dtype float32`` solves in float32.

Progress. The solver loop is one compiled ``lax.while_loop`` that reports through a host callback. When progress is
on (``--progress auto``, the default, means: when stderr is a terminal) a line with the step, the loss and the
gradient norm is rewritten on stderr from inside the compiled loop (`ufm.solve`'s ``progress`` callback, at most
every 0.1 s). The run is a single `ufm.solve` call either way, bit-identical to the Python API with the same
problem, seed and options. Ctrl-C during the solve ends it within about a second with status "interrupted"; the
results folder is written with the point reached.

Exit codes (`ufm._terminal`): 0 when the command ran (whatever the verdict or the solver's status: a non-finite
run writes its report, with a note for each metric or figure that is undefined there); 2 for bad input or an
unusable environment (an unknown option or value, an invalid config field, a missing or malformed results
folder, an output folder that cannot be written, a full disk, a problem whose estimated memory exceeds what is
available), with one line on stderr naming the field or file and no traceback; 130 when interrupted (what came
back from the solver is saved; see `cmd_solve`).

Results folders are written and read by `ufm._io` (`ufm.save_results`, `ufm.load_results`): each file atomically,
and read back as untrusted input.
"""

from __future__ import annotations

import argparse
import sys

from ._cli.analysis import analyse as _analyse
from ._cli.config import DEFAULT_PROBLEM as DEFAULT_PROBLEM
from ._cli.config import DEFAULT_SOLVER as DEFAULT_SOLVER
from ._cli.config import load_config_file as load_config_file
from ._cli.config import read_config_data as read_config_data
from ._cli.config import resolve_config as resolve_config
from ._cli.explore import EXPLORE_DEFAULT_PROBLEM as EXPLORE_DEFAULT_PROBLEM
from ._cli.explore import EXPLORE_DEFAULTS as EXPLORE_DEFAULTS
from ._cli.explore import add_explore_parser, cmd_explore
from ._cli.explore import draw_explore_figures as draw_explore_figures
from ._cli.explore import format_exploration as format_exploration
from ._cli.explore import resolve_explore_config as resolve_explore_config
from ._cli.figures import draw_figures as draw_figures
from ._cli.saved import add_check_parser, add_plot_parser, cmd_check, cmd_plot
from ._cli.solve import add_solve_parser, cmd_solve
from ._cli.solve import run_solver as run_solver
from ._io import build_report as build_report
from ._memory import estimate_memory as estimate_memory
from ._report_text import format_report as format_report
from ._terminal import PROG as PROG
from ._terminal import Parser as _Parser
from ._terminal import UsageError as UsageError
from ._terminal import exit_code
from ._terminal import version as _version

# The command's modules (ufm/_cli/): args (option types and tables), config (defaults <- --config <- options),
# analysis (prediction, check, metrics, notes), figures, folders (results folders), solve, saved (check and plot),
# explore. The names above are this module's API, as before the split.


def _build_parser() -> argparse.ArgumentParser:
    """The ``ufm`` parser: ``--version`` and the subcommands solve, check, plot, explore and sweep (whose own
    parser is `ufm._sweep.sweep_main`'s)."""
    parser = _Parser(prog=PROG, description="Unconstrained features models of neural collapse: solve, check, plot.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="{solve,check,plot,explore,sweep}", parser_class=_Parser)
    sub.required = True
    add_solve_parser(sub)
    add_check_parser(sub)
    add_plot_parser(sub)
    add_explore_parser(sub)
    # 'ufm sweep' is parsed by ufm._sweep.sweep_main (main() hands it the rest of the command line)
    sub.add_parser("sweep", help="run a grid of solves into a resumable store (see 'ufm sweep --help')", add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``ufm`` command (``ufm = "ufm.cli:main"``); returns the exit code.

    ``ufm solve`` gets this module's `run_solver` and ``_analyse`` (looked up at each call, so that they can be
    replaced, as tests do to interrupt a solve or a check)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    prefix = PROG
    if argv[:1] == ["sweep"]:
        from ._sweep import sweep_main

        return sweep_main(argv[1:])
    try:
        import jax

        jax.config.update("jax_enable_x64", True)  # before any JAX computation of this process
        parser = _build_parser()
        args, extra = parser.parse_known_args(argv)
        prefix = f"{PROG} {args.command}"
        if extra:
            raise UsageError(f"unrecognized arguments: {' '.join(extra)} (see '{prefix} --help')")
        if args.command == "solve":
            return cmd_solve(args, argv, run_solver=run_solver, analyse=_analyse)
        if args.command == "check":
            return cmd_check(args)
        if args.command == "explore":
            return cmd_explore(args, argv)
        return cmd_plot(args)
    except UsageError as e:
        return exit_code(e, prefix)
    except (SystemExit, KeyboardInterrupt, BrokenPipeError) as e:  # --help, Ctrl-C, a closed stdout
        return exit_code(e, prefix)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
