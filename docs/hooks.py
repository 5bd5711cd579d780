"""MkDocs hooks: the stored notebooks as pages, and the command line's help texts generated from the parser.

* ``on_files``: every ``notebooks/*.ipynb`` of the repository (stored with outputs; never executed here) becomes the
  page ``notebooks/NAME.ipynb``, rendered by mkdocs-jupyter, so the notebooks stay where the test suite keeps them;
  the figures of ``benchmarks/results/`` are added as ``results/NAME.png`` for the benchmarks page.
* ``on_page_markdown``: the marker ``<!-- ufm-cli-help -->`` in ``cli.md`` is replaced by the ``--help`` text of
  ``ufm`` and of each of its subcommands, produced by ``ufm.cli.main`` in one subprocess at build time, so the
  page lists every subcommand and option of the installed code.
* ``on_page_markdown``: the marker ``<!-- ufm-api-members -->`` in ``api/ufm.md`` becomes a mkdocstrings block
  listing every public name of ``ufm`` (its ``__all__``, else its explicit re-exports ``from ._x import y as y``),
  so a name added to the package appears in the reference without editing the page.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

from mkdocs.plugins import event_priority
from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[1]
MARKER = "<!-- ufm-cli-help -->"
API_MARKER = "<!-- ufm-api-members -->"

_HELP_SCRIPT = r"""
import contextlib, io, json, re, sys
from ufm.cli import main

def help_of(argv):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.suppress(SystemExit):
        main([*argv, "--help"])
    return buf.getvalue()

top = help_of([])
subs = re.search(r"\{([a-z_,-]+)\}", top).group(1).split(",")
print(json.dumps({"": top, **{s: help_of([s]) for s in subs}}))
"""


@event_priority(100)  # before mkdocs-jupyter turns the notebooks into pages
def on_files(files: Files, config) -> Files:
    for nb in sorted((ROOT / "notebooks").glob("*.ipynb")):
        files.append(File(f"notebooks/{nb.name}", str(ROOT), config["site_dir"], config["use_directory_urls"]))
    # the figures benchmarks/README.md links to (as results/NAME.png), for the page that includes it
    for png in sorted((ROOT / "benchmarks" / "results").glob("*.png")):
        files.append(
            File(f"results/{png.name}", str(ROOT / "benchmarks"), config["site_dir"], config["use_directory_urls"])
        )
    return files


def _cli_help() -> str:
    env = dict(os.environ, COLUMNS="110", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run(
        [sys.executable, "-c", _HELP_SCRIPT], capture_output=True, text=True, env=env, cwd=ROOT, check=True, timeout=300
    ).stdout
    helps = json.loads(out)
    parts = []
    for sub, text in helps.items():
        title = "ufm" if not sub else f"ufm {sub}"
        parts.append(f"### `{title}`\n\n```text\n{text.rstrip()}\n```\n")
    return "\n".join(parts)


def public_names(init: Path = ROOT / "ufm" / "__init__.py") -> list[str]:
    """The public names of ``ufm``: its ``__all__`` if it has one, else every name it re-exports explicitly
    (``from ._x import name as name``) plus its public submodules imported the same way, read with `ast`."""
    tree = ast.parse(init.read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
            return [str(v) for v in ast.literal_eval(node.value)]
    names = []
    for node in tree.body:
        if isinstance(node, ast.ImportFrom):
            names += [a.asname for a in node.names if a.asname and a.asname == a.name and not a.name.startswith("_")]
    return names


def _api_members(skip: tuple[str, ...]) -> str:
    names = sorted((n for n in public_names() if n not in skip), key=str.lower)
    return "::: ufm\n    options:\n      members:\n" + "".join(f"        - {n}\n" for n in names)


def on_page_markdown(markdown: str, page, config, files) -> str:
    if MARKER in markdown:
        markdown = markdown.replace(MARKER, _cli_help())
    if API_MARKER in markdown:  # the modules with their own pages are not repeated on the ufm page
        markdown = markdown.replace(
            API_MARKER, _api_members(("metrics", "plotting", "sweep_plots", "networks", "network_plots"))
        )
    return markdown
