"""Execute the notebooks from their jupytext sources and store the paired .ipynb files with outputs.

Each notebook is ``notebooks/NN_name.py`` (jupytext percent format, the source of truth) paired with
``notebooks/NN_name.ipynb`` (the same cells, executed at full size, stored with outputs so that it reads on a code
host). After editing a .py, regenerate its .ipynb (``tests/test_notebooks.py`` fails on a stale one):

    python notebooks/execute.py                      # every notebook, full size (minutes each)
    python notebooks/execute.py 04_deep_linear.py    # one notebook
    python notebooks/execute.py --size small         # quick run at the test size; writes nothing

The size is passed to the kernel as the environment variable ``UFM_NOTEBOOK_SIZE`` (read in each notebook's first
code cell). The stored notebook records the size and the wall time in its metadata (``metadata["ufm"]``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SIZES = ("full", "small")


def notebook_sources(folder: Path = HERE) -> list[Path]:
    """The jupytext sources ``NN_name.py`` in ``folder``, in order."""
    return sorted(p for p in folder.glob("[0-9][0-9]_*.py"))


def read_source(path: Path):
    """The notebook of a jupytext percent-format source (no outputs)."""
    import jupytext

    return jupytext.read(path, fmt="py:percent")


def execute(path: Path, size: str = "full", timeout: int = 1200, env: dict | None = None):
    """Execute the notebook of ``path`` (a .py source) in a fresh python3 kernel at ``size``.

    Returns ``(notebook, wall_seconds)``. Raises ``nbclient.exceptions.CellExecutionError`` naming the failing cell.
    """
    from nbclient import NotebookClient

    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}; got {size!r}")
    nb = read_source(path)
    kernel_env = dict(os.environ if env is None else env)
    kernel_env["UFM_NOTEBOOK_SIZE"] = size
    resources = {"metadata": {"path": str(path.parent)}}
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", resources=resources)
    t0 = time.perf_counter()
    client.execute(env=kernel_env)
    return nb, time.perf_counter() - t0


def store(path: Path, nb, wall: float, size: str) -> Path:
    """Write the executed notebook beside its source as ``NN_name.ipynb``, paired by jupytext."""
    import jupytext
    import nbformat

    nb.metadata.setdefault("jupytext", {})["formats"] = "ipynb,py:percent"
    nb.metadata["ufm"] = {"size": size, "wall_s": round(wall, 1)}
    out = path.with_suffix(".ipynb")
    nbformat.validate(nb)
    jupytext.write(nb, out, fmt="ipynb")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*", help="notebook sources (NN_name.py); default: all")
    ap.add_argument("--size", choices=SIZES, default="full", help="full (stored) or small (test size, not stored)")
    ap.add_argument("--timeout", type=int, default=1200, help="per-cell timeout in seconds")
    args = ap.parse_args(argv)
    paths = [HERE / Path(n).name for n in args.names] if args.names else notebook_sources()
    for path in paths:
        if not path.exists():
            print(f"no such notebook source: {path}", file=sys.stderr)
            return 2
    for path in paths:
        nb, wall = execute(path, args.size, args.timeout)
        if args.size == "full":
            out = store(path, nb, wall, args.size)
            print(f"{path.name}: {wall:.1f} s -> {out.name}")
        else:
            print(f"{path.name}: {wall:.1f} s at size {args.size} (not stored)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
