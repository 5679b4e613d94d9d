"""The documentation site: `make docs`'s build, with warnings as errors, checked page by page.

The build executes the landing page's example (docs/examples/quickstart.py) and the three
colab/ notebooks (small, offline settings), so this module is the default suite's test that
they run (tests/test_notebooks.py keeps a slow direct execution).
"""

from __future__ import annotations

import importlib
import inspect
import os
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import pytest

import hessjax

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "colab").glob("*.ipynb"))

pytest.importorskip("sphinx", reason="the docs extra is not installed: pip install -e '.[docs]'")


def _build(out: Path) -> None:
    """``make docs`` into ``out``: any warning fails (-W), notebooks and the example run."""
    env = dict(os.environ, HESSJAX_DOCS_EXECUTE="force")
    env.pop("MPLBACKEND", None)  # the notebooks' figures come from the inline backend
    cmd = [sys.executable, "-m", "sphinx", "-E", "-W", "--keep-going", "-n", "-q", "-b", "html"]
    proc = subprocess.run(
        [*cmd, str(ROOT / "docs"), str(out)], cwd=ROOT, env=env, capture_output=True, text=True
    )
    sphinx_lines = [
        line for line in proc.stderr.splitlines() if not line.startswith("[IPKernelApp]")
    ]
    assert proc.returncode == 0, "\n".join(sphinx_lines[-60:])


def _public_modules() -> dict[str, list[str]]:
    """Module -> public names, read from the package: ``__all__`` (else its own defs)."""

    def names(module):
        if hasattr(module, "__all__"):
            return list(module.__all__)
        return [
            n
            for n, obj in vars(module).items()
            if not n.startswith("_")
            and (inspect.isfunction(obj) or inspect.isclass(obj))
            and obj.__module__ == module.__name__
        ]

    out = {}
    for sub in hessjax._SUBMODULES:
        module = importlib.import_module(f"hessjax.{sub}")
        out[module.__name__] = names(module)
        for info in pkgutil.iter_modules(getattr(module, "__path__", [])):
            if info.name.startswith("_"):
                continue
            child = importlib.import_module(f"{module.__name__}.{info.name}")
            if hasattr(child, "__all__") and not set(child.__all__) <= set(names(module)):
                out[child.__name__] = names(child)
    return out


def _ids(html: str) -> set[str]:
    return set(re.findall(r'id="([^"]+)"', html))


def _check_build_has_no_warnings(site):
    assert (site / "index.html").exists()
    for page in ("guides/measure", "guides/robust", "guides/curvature", "guides/own_model",
                 "guides/scaling", "guides/resume", "results", "api/index"):  # fmt: skip
        assert (site / f"{page}.html").exists(), page


def _check_every_public_name_has_an_api_entry(site):
    modules = _public_modules()
    assert {"hessjax.measures", "hessjax.estimators", "hessjax.transforms"} <= set(modules)
    missing = []
    for module, names in modules.items():
        page = site / "api" / f"{module}.html"
        assert page.exists(), f"no API page for {module}"
        ids = _ids(page.read_text())
        missing += [f"{module}.{n}" for n in names if f"{module}.{n}" not in ids]
    assert not missing, f"public names without an API entry: {missing}"


def _check_top_level_names_link_to_their_entries(site):
    html = (site / "api" / "index.html").read_text()
    targets = {a for _, a in re.findall(r'href="(hessjax\.[\w.]+\.html)#([\w.]+)"', html)}
    for name, sub in hessjax._EXPORTS.items():
        anchor = f"hessjax.{sub}.{name}"
        assert anchor in targets, f"hessjax.{name}: no link to {anchor}"
        assert anchor in _ids((site / "api" / f"hessjax.{sub}.html").read_text())


def _check_notebooks_are_rendered_with_their_outputs(site):
    assert len(NOTEBOOKS) == 3
    for path in NOTEBOOKS:
        html = (site / "notebooks" / f"{path.stem}.html").read_text()
        assert html.count("cell_output") >= 3, path.stem
        assert "Traceback" not in html and "output_error" not in html, path.stem
    spectra = (site / "notebooks" / "03_curvature_spectra.html").read_text()
    assert "<img" in spectra  # the matplotlib figure


def _check_landing_page_runs_the_quickstart(site):
    html = (site / "index.html").read_text()
    assert "finetune_and_measure" in html  # the code
    for text in ("measure = sum_i sqrt(calH_i / n)", "plain:", "robust:", "test accuracy"):
        assert text in html, text  # its output, from this build


def _check_maths_is_rendered_by_a_local_mathjax(site):
    html = (site / "guides" / "measure.html").read_text()
    assert 'class="math notranslate nohighlight"' in html and r"\mathcal{H}_i" in html
    script = re.search(r'<script[^>]+src="([^"]*mathjax[^"]*)"', html)
    assert script and not script.group(1).startswith(("http:", "https:", "//"))
    assert (site / "_static" / "mathjax" / "tex-chtml.js").exists()


def _check_pages_load_nothing_from_the_network(site):
    pattern = re.compile(r'<(?:script|link|img)[^>]+(?:src|href)="((?:https?:)?//[^"]+)"')
    remote = {}
    for page in site.rglob("*.html"):
        found = pattern.findall(page.read_text())
        if found:
            remote[str(page.relative_to(site))] = found
    assert not remote, remote


def test_docs_site(tmp_path):
    """One test (one build, whichever xdist worker gets it): build, then check every page."""
    site = tmp_path / "html"  # myst-nb writes its executed notebooks beside it
    _build(site)
    _check_build_has_no_warnings(site)
    _check_every_public_name_has_an_api_entry(site)
    _check_top_level_names_link_to_their_entries(site)
    _check_notebooks_are_rendered_with_their_outputs(site)
    _check_landing_page_runs_the_quickstart(site)
    _check_maths_is_rendered_by_a_local_mathjax(site)
    _check_pages_load_nothing_from_the_network(site)
