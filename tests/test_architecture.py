"""The house rules of docs/ARCHITECTURE.md, checked: who may import whom, no private names
across modules, an explicit top-level API."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import hessjax

ROOT = Path(__file__).resolve().parents[1]
CORE = ("hessian", "mapping", "partition", "estimators", "measures", "bounds", "losses",
        "noise", "transforms")  # fmt: skip
APPLICATION = ("hessjax.sharding", "hessjax.train", "hessjax.experiment", "hessjax.cli")


def _modules(folder: Path):
    for path in sorted(folder.rglob("*.py")):
        yield path, ast.parse(path.read_text())


def _private_imports(path: Path, tree: ast.Module, own_package: str) -> list[str]:
    """``from hessjax.x import _name``, or a private module of another package."""
    found = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.ImportFrom) and (node.module or "").startswith("hessjax")):
            continue
        found += [f"{path}:{node.lineno} {node.module}.{a.name}"
                  for a in node.names if a.name.startswith("_")]  # fmt: skip
        parts = node.module.split(".")
        private = [i for i, p in enumerate(parts) if p.startswith("_")]
        if private and not own_package.startswith(".".join(parts[: private[0]]) + "."):
            found.append(f"{path}:{node.lineno} {node.module}")
    return found


def test_the_core_does_not_import_the_application_layer():
    code = (
        "import sys, json, importlib\n"
        f"for m in {CORE!r}: importlib.import_module('hessjax.' + m)\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('hessjax'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=ROOT)  # fmt: skip
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    assert not [m for m in loaded if m.startswith(APPLICATION)], loaded


def test_no_private_names_imported_across_modules():
    found = []
    for path, tree in _modules(ROOT / "hessjax"):
        package = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        found += _private_imports(path.relative_to(ROOT), tree, package)
    assert found == []


@pytest.mark.parametrize("folder", ["experiments", "docs/examples"])
def test_scripts_use_public_names_only(folder):
    found = []
    for path, tree in _modules(ROOT / folder):
        found += _private_imports(path.relative_to(ROOT), tree, "scripts")
        found += [f"{path}:{n.lineno} hessjax.cli" for n in ast.walk(tree)
                  if isinstance(n, ast.ImportFrom | ast.Import)
                  and any("hessjax.cli" in (getattr(n, "module", None) or a.name)
                          for a in n.names)]  # fmt: skip
    assert found == []


def test_notebooks_use_public_names_only():
    for path in sorted((ROOT / "colab").glob("*.ipynb")):
        cells = json.loads(path.read_text())["cells"]
        code = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
        lines = [ln for ln in code.splitlines() if not ln.lstrip().startswith(("!", "%"))]
        tree = ast.parse("\n".join(lines))
        assert _private_imports(path, tree, "notebook") == []
        assert "hessjax.cli" not in code, path


def test_top_level_api_is_explicit():
    assert hessjax.__all__ and len(set(hessjax.__all__)) == len(hessjax.__all__)
    for name in hessjax.__all__:
        assert getattr(hessjax, name) is not None
    assert callable(hessjax.hvp) and type(hessjax.hvp).__name__ == "function"
    public = {n for n in vars(hessjax) if not n.startswith("_")}
    assert public <= set(hessjax._SUBMODULES), public - set(hessjax._SUBMODULES)
    for name in ("fit", "TrainConfig", "make_mesh", "main", "annotations", "Any", "importlib"):
        assert name not in hessjax.__all__
