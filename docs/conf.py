"""Sphinx configuration of the hessjax documentation (``make docs`` builds it into ``site/``).

Sphinx rather than MkDocs: hessjax's docstrings are Google style with reST roles
(``:func:`hessian_distance```, ``:class:`~hessjax.partition.Partition```), which Sphinx's
napoleon and autodoc render natively and, with ``nitpicky``, check: a broken cross-reference
fails the build (``-W``). Notebooks are executed at build time by myst-nb (small settings,
offline); MathJax is served from the site itself (its files come from the
``sphinx-mathjax-offline`` package), so a built site needs no network either.

The API pages are generated here, one per public module: the modules ``import hessjax`` exposes
(``hessjax._SUBMODULES``) and every submodule of a subpackage that declares an ``__all__`` with
names its package does not export. A module's members are its ``__all__`` (or, without one,
its public functions and classes), so names added later appear without editing the docs.
"""

from __future__ import annotations

import importlib
import inspect
import os
import pkgutil
import re
import shutil
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))

# Notebooks run with their small, offline settings (seconds on a CPU); inherited by the kernel.
os.environ.setdefault("HESSJAX_NOTEBOOK_SMALL", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import hessjax  # noqa: E402

project = "hessjax"
author = "the hessjax authors"
copyright = "2026, the hessjax authors"  # noqa: A001
release = version = hessjax.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "myst_nb",
]

exclude_patterns = ["_build", "examples", "**/.ipynb_checkpoints", "README.md"]
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
root_doc = "index"

html_theme = "furo"
html_title = f"hessjax {release}"
html_static_path = []
html_show_sourcelink = False
pygments_style = "friendly"
highlight_language = "none"  # literal blocks are the docstrings' maths; code says its language
pygments_dark_style = "monokai"

# MathJax 3 from the sphinx-mathjax-offline package (PyPI), served by the site itself: no CDN.
# Only what tex-chtml loads is copied (3 of the package's 24 MB).
mathjax_path = "mathjax/tex-chtml.js"
_MATHJAX_FILES = ("tex-chtml.js", "output/chtml/fonts/woff-v2", "input/tex/extensions")
_MATHJAX_FILES += ("a11y", "ui")

# MyST: $...$ and $$...$$ maths in guides and notebooks; ::: fences.
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3

# Notebooks: executed at build time (every build: the docs test is the one that runs them);
# any error in a cell fails the build.
nb_execution_mode = os.environ.get("HESSJAX_DOCS_EXECUTE", "force")
nb_execution_timeout = 600
nb_execution_raise_on_error = True
nb_execution_show_tb = True
nb_merge_streams = True
nb_output_stderr = "remove"  # tqdm's "IProgress not found" and the like; errors still fail

# autodoc + napoleon (Google style). Type hints go in the description; signatures stay short.
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented_params"
autodoc_member_order = "groupwise"
autodoc_default_options = {"members": True, "undoc-members": True}
autodoc_preserve_defaults = True
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True  # "Attributes:" as fields, not duplicate object descriptions
napoleon_use_rtype = False
napoleon_attr_annotations = False  # types would print as jaxlib's private class names
add_module_names = False
python_use_unqualified_type_names = True

# Fail on every broken cross-reference into hessjax. References to other packages (jax,
# numpy, optax, flax, the standard library) cannot be resolved offline (no intersphinx
# inventories), so those alone are ignored.
nitpicky = True
nitpick_ignore_regex = [
    (r"py:.*", r"(?!hessjax\b).*"),
    (r"py:.*", r"hessjax\.(PyTree|LossFn|Array|Batch)$"),
]


# ---------------------------------------------------------------------------------------------
# The public modules and their public names (also used by tests/test_docs.py).


def module_names(module) -> list[str]:
    """The public names of ``module``: its ``__all__``, else its own functions and classes."""
    if hasattr(module, "__all__"):
        return list(module.__all__)
    return [
        name
        for name, obj in vars(module).items()
        if not name.startswith("_")
        and (inspect.isfunction(obj) or inspect.isclass(obj))
        and getattr(obj, "__module__", None) == module.__name__
    ]


def public_modules() -> list[str]:
    """hessjax's documented modules, in the package's own order."""
    names = [f"hessjax.{m}" for m in hessjax._SUBMODULES]
    extra = []
    for name in names:
        package = importlib.import_module(name)
        if not hasattr(package, "__path__"):
            continue
        exported = set(module_names(package))
        for info in pkgutil.iter_modules(package.__path__, prefix=f"{name}."):
            if info.name.rsplit(".", 1)[-1].startswith("_"):
                continue
            sub = importlib.import_module(info.name)
            if hasattr(sub, "__all__") and not set(sub.__all__) <= exported:
                extra.append(info.name)
    return names + sorted(extra)


def _is_api_object(obj) -> bool:
    return inspect.isfunction(obj) or inspect.isclass(obj) or inspect.ismodule(obj)


def _describe(value) -> str:
    if isinstance(value, dict | tuple | list | set | frozenset):
        keys = ", ".join(f"``{k}``" for k in list(value)[:40] if isinstance(k, str))
        return f"{len(value)} entries" + (f" ({keys})" if keys else "")
    return repr(value)[:90]


def _write_if_changed(path: Path, text: str) -> None:
    if not path.exists() or path.read_text() != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def generate_api_pages() -> None:
    """docs/api/<module>.rst for every public module, and the index with every top-level name."""
    api = DOCS / "api"
    modules = public_modules()
    for name in modules:
        module = importlib.import_module(name)
        names = module_names(module)
        objects = [n for n in names if _is_api_object(getattr(module, n))]
        title = f"``{name}``"
        text = f"{title}\n{'=' * len(title)}\n\n.. automodule:: {name}\n"
        if objects:
            text += f"   :members: {', '.join(objects)}\n   :undoc-members:\n"
        else:
            text += "   :no-members:\n"
        for n in names:
            if n not in objects:  # constants: autodoc skips imported data without a docstring
                value = getattr(module, n)
                text += f"\n.. py:data:: {n}\n   :module: {name}\n"
                text += f"   :type: {type(value).__name__}\n"
                if len(repr(value)) <= 90:
                    text += f"   :value: {value!r}\n"
                else:
                    text += f"\n   {_describe(value)}.\n"
        _write_if_changed(api / f"{name}.rst", text)
    for stale in api.glob("hessjax.*.rst"):
        if stale.stem not in modules:
            stale.unlink()
    rows = "\n".join(
        f"   * - :obj:`hessjax.{n} <hessjax.{m}.{n}>`\n     - :mod:`hessjax.{m}`"
        for n, m in hessjax._EXPORTS.items()
    )
    toc = "\n".join(f"   {name}" for name in modules)
    index = f"""API reference
=============

.. automodule:: hessjax
   :no-members:

One page per public module; a module lists its ``__all__``. Every name below is also
available as ``hessjax.<name>`` (loaded on first use).

.. toctree::
   :maxdepth: 1

{toc}

.. list-table:: ``hessjax.<name>``
   :header-rows: 1
   :widths: 50 50

   * - name
     - defined in
{rows}
"""
    _write_if_changed(api / "index.rst", index)


def copy_notebooks() -> None:
    """colab/*.ipynb -> docs/notebooks/ (generated; the notebooks' sources stay in colab/)."""
    target = DOCS / "notebooks"
    target.mkdir(exist_ok=True)
    sources = sorted((ROOT / "colab").glob("*.ipynb"))
    for path in sources:
        out = target / path.name
        if not out.exists() or out.read_bytes() != path.read_bytes():
            shutil.copyfile(path, out)
    for stale in target.glob("*.ipynb"):
        if not (ROOT / "colab" / stale.name).exists():
            stale.unlink()


generate_api_pages()
copy_notebooks()


# ---------------------------------------------------------------------------------------------
# Cross-references to where an object is defined (``hessjax.measures.distance.HessianDistance``)
# or to its top-level alias (``hessjax.iterate_batches``) resolve to the page that documents it.


def _documented() -> dict[int, str]:
    """id(object) -> the full name under which its API page documents it."""
    out: dict[int, str] = {}
    for name in public_modules():
        module = importlib.import_module(name)
        for member in module_names(module):
            obj = getattr(module, member)
            if inspect.isfunction(obj) or inspect.isclass(obj):
                out.setdefault(id(obj), f"{name}.{member}")
    return out


_DOCUMENTED = _documented()
_PUBLIC = public_modules()


def _lookup(target: str):
    parts = target.split(".")
    for i in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        try:
            for attr in parts[i:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return None
        return obj
    return None


def _resolve(app, env, node, contnode):
    """A missing ``py`` reference to an existing hessjax object: its API entry, else its page.

    Names that do not exist stay missing (and fail the build).
    """
    if node.get("refdomain") != "py":
        return None
    target = node.get("reftarget", "").lstrip("~.")
    if not target.startswith("hessjax."):
        current = node.get("py:module") or ""
        if not current.startswith("hessjax"):
            return None
        target = f"{current}.{target}"
    obj = _lookup(target)
    if obj is None:
        return None
    py = env.get_domain("py")
    candidates = [_DOCUMENTED.get(id(obj))]
    modules = set(_PUBLIC) | {"hessjax"}
    parts = (obj.__name__ if inspect.ismodule(obj) else target).split(".")
    candidates += [".".join(parts[:i]) for i in range(len(parts), 0, -1)]
    for name in candidates:
        if name is None:
            continue
        if name in _DOCUMENTED.values():
            kind = "obj"
        elif name in modules:
            kind = "mod"
        else:
            continue
        found = py.resolve_xref(env, node["refdoc"], app.builder, kind, name, node, contnode)
        if found is not None:
            return found
    return None


_BULLET = re.compile(r"^(\*|-|\+|\d+\.|#\.)\s")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def literal_maths(lines: list[str]) -> list[str]:
    """Indented blocks after a paragraph (the docstrings' plain-notation maths) -> literal.

    In reST such a block is a block quote (proportional font, alignment lost); the docstrings
    mean a displayed formula, as in the source. Lists, fields, directives and blocks that
    already follow ``::`` are left alone.
    """
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        out.append(line)
        stripped = line.strip()
        if (
            stripped
            and i + 2 < len(lines)
            and not lines[i + 1].strip()
            and lines[i + 2].strip()
            and _indent(lines[i + 2]) > _indent(line)
            and not stripped.endswith("::")
            and not stripped.startswith((".. ", ":", ">>>", "..."))
            and not _BULLET.match(stripped)
        ):
            out += ["", " " * _indent(line) + "::"]
        i += 1
    return out


def _process_docstring(app, what, name, obj, options, lines):
    lines[:] = literal_maths(lines)


def _no_undocumented_class_members(app, what, name, obj, skip, options):
    # Modules list every public name (undoc-members). Inside a class, fields (NamedTuple and
    # dataclass fields, documented by the "Attributes:" section) and undocumented members are
    # left out.
    if what in ("class", "exception"):
        if type(obj).__name__ == "_tuplegetter" or not (
            inspect.isroutine(obj) or isinstance(obj, property | classmethod | staticmethod)
        ):
            return True
        if not getattr(obj, "__doc__", None):
            return True
    return None


def _copy_mathjax(app, exc):
    if exc is not None or app.builder.format != "html":
        return
    package = Path(importlib.import_module("sphinx-mathjax-offline").__file__).parent
    source, target = package / "static" / "mathjax", Path(app.outdir) / "_static" / "mathjax"
    for name in _MATHJAX_FILES:
        if (source / name).is_dir():
            shutil.copytree(source / name, target / name, dirs_exist_ok=True)
        else:
            target.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source / name, target / name)


def setup(app):
    app.connect("build-finished", _copy_mathjax)
    app.connect("autodoc-process-docstring", _process_docstring)
    app.connect("autodoc-skip-member", _no_undocumented_class_members)
    app.connect("missing-reference", _resolve)
    return {"parallel_read_safe": True}
