"""Sphinx configuration of the celery-ordered documentation.

Build: ``python -m sphinx -W --keep-going -b html docs docs/_build/html``.
Nothing is fetched from the network (no intersphinx), so the build works
offline; warnings are errors.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # document the checkout, not some installed copy

import celery_ordered  # noqa: E402

project = "celery-ordered"
author = "celery-ordered developers"
copyright = "celery-ordered developers"
release = celery_ordered.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
]

source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build"]

# MyST: anchors for headings down to ### so pages can link to sections
# ([text](guarantees.md#consumer-crash)).
myst_heading_anchors = 3

# autodoc: document what the module says, in its order; signatures keep
# their annotations, and the Google-style "Args:" sections go through napoleon.
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_preserve_defaults = True
napoleon_google_docstring = True
napoleon_numpy_docstring = False

html_theme = "alabaster"
html_title = f"celery-ordered {release}"
html_theme_options = {
    "description": "Celery tasks in parallel, results in submission order.",
    "fixed_sidebar": True,
    "page_width": "1100px",  # room for the diagrams and tables
}


# napoleon reads the first line of an attribute's docstring as Google's
# "type: description", but this project's attribute comments are sentences
# ("#: The window cap: how far claims may run ahead..."), with the type in
# the annotation. Hide those docstrings from napoleon (its handler runs at the
# default priority, 500) and put them back after it.
_ATTRIBUTE_KINDS = frozenset({"attribute", "data", "property"})
_hidden: dict[str, list[str]] = {}


def _hide_attribute_docstring(
    app: Any, what: str, name: str, obj: Any, options: Any, lines: list[str]
) -> None:
    if what in _ATTRIBUTE_KINDS:
        _hidden[name] = list(lines)
        lines.clear()


def _restore_attribute_docstring(
    app: Any, what: str, name: str, obj: Any, options: Any, lines: list[str]
) -> None:
    if what in _ATTRIBUTE_KINDS and name in _hidden:
        lines[:] = _hidden.pop(name)
    # A value with no "#:" comment (``__version__``) would show the docstring
    # of its type (str's); the directive's own text says what it is.
    type_doc = getattr(type(obj), "__doc__", None)
    if what == "data" and type_doc and " ".join(lines).split() == type_doc.split():
        lines.clear()


def setup(app: Any) -> None:
    """Wrap napoleon's docstring handler for attributes (see above)."""
    app.connect("autodoc-process-docstring", _hide_attribute_docstring, priority=400)
    app.connect("autodoc-process-docstring", _restore_attribute_docstring, priority=600)
