"""The notebooks run, at their small size, and the stored .ipynb files are in sync with their jupytext sources.

Each notebook is ``notebooks/NN_name.py`` (jupytext percent format, the source of truth) paired with
``notebooks/NN_name.ipynb`` (the same cells executed at full size, stored with outputs; regenerate it with
``python notebooks/execute.py NN_name.py``). Here:

* every source is executed top to bottom in a fresh python3 kernel with ``UFM_NOTEBOOK_SIZE=small`` (the tiny size
  each notebook defines in its first code cell) and the Agg backend, so a notebook that breaks fails CI;
* every stored .ipynb must have exactly the cells of its source (type and text), every code cell executed in order
  without an error output, and ``metadata["ufm"]["size"] == "full"``, so a stale stored notebook fails CI.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

jupytext = pytest.importorskip("jupytext")
nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

FOLDER = Path(__file__).resolve().parent.parent / "notebooks"
SOURCES = sorted(FOLDER.glob("[0-9][0-9]_*.py"))
CELL_TIMEOUT_S = 300  # per cell, small size; the whole small run of all notebooks takes well under 100 s


def _cells(nb) -> list[tuple[str, str]]:
    return [(c.cell_type, c.source.strip()) for c in nb.cells]


def test_every_notebook_has_a_source_and_a_stored_copy():
    assert SOURCES, f"no notebook sources NN_name.py in {FOLDER}"
    stored = sorted(FOLDER.glob("[0-9][0-9]_*.ipynb"))
    assert [p.stem for p in stored] == [p.stem for p in SOURCES], (
        "every notebooks/NN_name.py needs its executed NN_name.ipynb (python notebooks/execute.py NN_name.py) "
        "and every .ipynb its .py source"
    )


@pytest.mark.parametrize("source", SOURCES, ids=[p.stem for p in SOURCES])
def test_stored_notebook_matches_source(source):
    stored = source.with_suffix(".ipynb")
    assert stored.exists(), f"{stored.name} is missing: run python notebooks/execute.py {source.name}"
    nb_src = jupytext.read(source, fmt="py:percent")
    nb = nbformat.read(stored, as_version=4)
    nbformat.validate(nb)
    assert _cells(nb) == _cells(nb_src), (
        f"{stored.name} is stale (its cells differ from {source.name}): run python notebooks/execute.py {source.name}"
    )
    code = [c for c in nb.cells if c.cell_type == "code"]
    counts = [c.get("execution_count") for c in code]
    assert counts == list(range(1, len(code) + 1)), f"{stored.name}: not executed top to bottom: {counts}"
    errors = [o for c in code for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, f"{stored.name} stores an error output: {errors[0].get('ename')}: {errors[0].get('evalue')}"
    assert nb.metadata.get("ufm", {}).get("size") == "full", f"{stored.name} was not executed at full size"


@pytest.mark.parametrize("source", SOURCES, ids=[p.stem for p in SOURCES])
def test_notebook_executes_at_small_size(source):
    nb = jupytext.read(source, fmt="py:percent")
    env = dict(os.environ, UFM_NOTEBOOK_SIZE="small", MPLBACKEND="Agg")
    client = nbclient.NotebookClient(
        nb, timeout=CELL_TIMEOUT_S, kernel_name="python3", resources={"metadata": {"path": str(FOLDER)}}
    )
    client.execute(env=env)  # raises CellExecutionError (with the cell and traceback) if any cell fails
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.get("execution_count") for c in code)
