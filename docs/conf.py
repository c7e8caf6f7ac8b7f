"""Sphinx configuration of jacdistill's documentation: pages in Markdown (MyST), the furo theme, the extension
points' docstrings through autodoc. Build: `sphinx-build -W -b html docs docs/_build/html`."""

from __future__ import annotations

project = "jacdistill"
author = "jacdistill contributors"
copyright = "jacdistill contributors"

extensions = ["myst_parser", "sphinx.ext.autodoc", "sphinx.ext.napoleon", "sphinx.ext.mathjax"]
source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "results/records"]

myst_enable_extensions = ["dollarmath", "amsmath", "deflist"]
myst_heading_anchors = 3

# The package's docstrings write code in single backquotes, as Markdown does: shown as code.
default_role = "literal"
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "show-inheritance": True}

html_theme = "furo"
html_title = "jacdistill"
html_static_path: list[str] = []


def literal_blocks(app, what, name, obj, options, lines):
    """The package's docstrings set tables, formulas and signatures off by indenting them (plain text, as `help()`
    shows them); reStructuredText reads such a block as a block quote and warns where it ends. Each indented block
    that follows prose becomes a literal block (`::`), shown as written."""
    out: list[str] = []
    for index, line in enumerate(lines):
        indented = line.startswith("    ") and line.strip()
        previous = out[-1] if out else ""
        if indented and previous.strip() and not previous.startswith(" "):
            out[-1] = previous.rstrip() + ("" if previous.rstrip().endswith("::") else " ::")
            out.append("")
        elif indented and not previous.strip() and len(out) > 1 and out[-2].strip() and not out[-2].startswith(" "):
            out[-2] = out[-2].rstrip() + ("" if out[-2].rstrip().endswith("::") else " ::")
        out.append(line)
        if not indented and line.strip() and previous.startswith("    ") and previous.strip():
            out.insert(len(out) - 1, "")
    lines[:] = out


def setup(app):
    app.connect("autodoc-process-docstring", literal_blocks)
