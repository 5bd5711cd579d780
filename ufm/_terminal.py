"""What every ``ufm`` subcommand shares at the terminal: the program name, usage errors, the argument parser,
versions and the device, exit codes.

A face module (imports nothing of the core). Exit codes of every subcommand:

* 0: the command ran (whatever the verdict or the solver's status, which the report states);
* 2: bad input or an unusable environment (an unknown option or value, an invalid config field, a missing or
  malformed results folder, an output folder that cannot be written, a full disk, a problem too large for the
  memory): one line on stderr naming the cause, no traceback;
* 130: interrupted (Ctrl-C); what was reached is saved where the subcommand says so.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from collections.abc import Callable
from importlib import metadata

PROG = "ufm"
EXIT_OK = 0
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
PACKAGES = ("ufm", "jax", "jaxlib", "optax", "numpy", "scipy", "matplotlib")


class UsageError(Exception):
    """Bad input or an unusable environment: printed as one line, exit code 2 (``prog`` names the (sub)command
    when known)."""

    def __init__(self, message: str, prog: str | None = None):
        super().__init__(message)
        self.prog = prog


class Parser(argparse.ArgumentParser):
    """An `argparse.ArgumentParser` whose errors are one-line `UsageError`s (no usage dump)."""

    def error(self, message):
        raise UsageError(f"{message} (see '{self.prog} --help')", self.prog)


def version() -> str:
    """The installed ufm version (the package's ``__version__`` when not installed)."""
    try:
        return metadata.version("ufm")
    except metadata.PackageNotFoundError:  # a source tree on sys.path: the package's own number (no import cycle)
        return str(getattr(sys.modules.get(__package__ or "ufm"), "__version__", "unknown"))


def versions() -> dict:
    """Python, platform and the versions of ufm and its numerical dependencies (None where not installed)."""
    out: dict = {"python": platform.python_version(), "platform": platform.platform()}
    for pkg in PACKAGES:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = version() if pkg == "ufm" else None
    return out


def device() -> str:
    """The first JAX device and the device count, e.g. ``"cpu:cpu (1 device(s))"`` (the ``run`` record of a
    report)."""
    import jax

    d = jax.devices()[0]
    return f"{d.platform}:{getattr(d, 'device_kind', str(d))} ({jax.device_count()} device(s))"


def exit_code(exc: BaseException, prefix: str) -> int:
    """The documented exit code for what ended a command, after saying so on stderr: `UsageError` -> one line
    ``"<prog>: error: <message>"`` and 2; Ctrl-C -> ``"<prog>: interrupted"`` and 130; a closed stdout
    (``ufm ... | head``) -> quiet exit 1 (stdout is pointed at /dev/null so the interpreter's last flush is
    silent); ``--help``/``--version`` (SystemExit) -> their own code. Anything else is a bug: re-raised with its
    traceback."""
    if isinstance(exc, UsageError):
        sys.stderr.write(f"{exc.prog or prefix}: error: {exc}\n")
        return EXIT_USAGE
    if isinstance(exc, SystemExit):
        return exc.code if isinstance(exc.code, int) else 0
    if isinstance(exc, KeyboardInterrupt):
        sys.stderr.write(f"\n{prefix}: interrupted\n")
        return EXIT_INTERRUPTED
    if isinstance(exc, BrokenPipeError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    raise exc


def run_command(prefix: str, command: Callable[[], int]) -> int:
    """``command()``, with what can end it turned into the documented exit code (`exit_code`)."""
    try:
        return command()
    except (UsageError, SystemExit, KeyboardInterrupt, BrokenPipeError) as e:
        return exit_code(e, prefix)
