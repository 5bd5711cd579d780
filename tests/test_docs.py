"""The documentation site: its pages exist and cover the public API; the strict build (slow) has an anchor for every
public name.

`mkdocs build --strict` itself runs in .ci/run (with the ``docs`` extra); the slow test here runs the same build into
a temporary folder and checks that every public name of the documented modules has its own entry in the API
reference, which a passing build alone does not guarantee (a name left out of a page is not a warning).
"""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
API_MODULES = ("ufm", "ufm.metrics", "ufm.plotting", "ufm.sweep_plots", "ufm.networks", "ufm.network_plots")


def _hooks():
    sys.path.insert(0, str(DOCS))
    try:
        return importlib.import_module("hooks")
    finally:
        sys.path.remove(str(DOCS))


def _nav_pages(nav) -> list[str]:
    out = []
    for item in nav:
        value = next(iter(item.values())) if isinstance(item, dict) else item
        out += _nav_pages(value) if isinstance(value, list) else [value]
    return out


def _public(module: str) -> list[str]:
    if module == "ufm":
        pytest.importorskip("mkdocs")
        return _hooks().public_names()
    mod = importlib.import_module(module)
    if hasattr(mod, "__all__"):
        return list(mod.__all__)
    return [n for n, v in vars(mod).items() if not n.startswith("_") and getattr(v, "__module__", None) == module]


def test_every_page_in_the_nav_exists_and_every_module_has_an_api_page():
    yaml = pytest.importorskip("yaml")
    text = (ROOT / "mkdocs.yml").read_text()
    config = yaml.load(text, Loader=yaml.BaseLoader)  # plain strings: no python tags in this file
    pages = _nav_pages(config["nav"])
    for page in pages:
        if page.startswith("notebooks/"):  # added from the repository's notebooks/ by docs/hooks.py
            assert (ROOT / page).is_file(), page
        else:
            assert (DOCS / page).is_file(), page
    stored = {f"notebooks/{p.name}" for p in (ROOT / "notebooks").glob("*.ipynb")}
    assert stored <= set(pages), f"notebooks missing from the nav: {sorted(stored - set(pages))}"
    api = "\n".join(p.read_text() for p in (DOCS / "api").glob("*.md"))
    for module in API_MODULES[1:]:
        assert re.search(rf"^::: {re.escape(module)}$", api, re.M), f"no API page renders {module}"
    assert "<!-- ufm-api-members -->" in (DOCS / "api" / "ufm.md").read_text()


@pytest.mark.slow
def test_strict_build_documents_every_public_name(tmp_path):
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings")
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1", PYTHONPATH=str(ROOT))
    run = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    html = "\n".join(p.read_text() for p in (tmp_path / "site" / "api").rglob("index.html"))
    missing = [f"{m}.{n}" for m in API_MODULES for n in _public(m) if f'id="{m}.{n}"' not in html]
    assert not missing, f"public names without an API entry: {missing}"
