"""Sphinx configuration for the sb3-offtrc documentation.

Pages are Markdown read by MyST; the API pages use autodoc on the package in this checkout.
``make docs`` builds them with ``-W`` (every warning fails the build), so keep this file free of
anything that needs the network at build time (no intersphinx).
"""

from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
# Import the package from this checkout whether or not it was pip-installed.
sys.path.insert(0, ROOT)

with open(os.path.join(ROOT, "sb3_offtrc", "version.txt")) as handle:
    release = handle.read().strip()
version = release

project = "sb3-offtrc"
author = "sb3-offtrc contributors"
copyright = "sb3-offtrc contributors (MIT licence)"

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
]

source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]

# $...$ / $$...$$ maths, ::: fences, and anchors for links to section headings.
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3

autodoc_member_order = "bysource"
# Inherited docstrings come from gymnasium / SB3 and are not always valid reStructuredText.
autodoc_inherit_docstrings = False
autodoc_typehints = "signature"
autodoc_default_options = {"show-inheritance": True}
# Importing the package must not need MuJoCo or Safety-Gymnasium (it is lazy), so nothing is mocked.

try:
    import sphinx_rtd_theme  # noqa: F401

    html_theme = "sphinx_rtd_theme"
except ImportError:  # the `docs` extra installs it; fall back rather than fail
    html_theme = "alabaster"
html_title = f"sb3-offtrc {release}"
html_show_sourcelink = False


def _write_cli_help() -> None:
    """Write the help of ``python -m sb3_offtrc`` and its subcommands for api.md to include.

    Generated at every build from the real parser, so the page cannot drift from the code.
    """
    import argparse

    from sb3_offtrc.cli import build_parser

    parser = build_parser()
    parser.prog = "python -m sb3_offtrc"
    parts = [parser.format_help()]
    for action in parser._actions:  # argparse keeps the subparsers here; there is no public accessor
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                sub.prog = f"python -m sb3_offtrc {name}"
                parts.append(sub.format_help())
    os.makedirs(os.path.join(HERE, "_generated"), exist_ok=True)
    target = os.path.join(HERE, "_generated", "cli_help.txt")
    text = "\n".join(parts)
    # rewrite only on change, so Sphinx does not see a new file on every build
    if not os.path.exists(target) or open(target).read() != text:
        with open(target, "w") as handle:
            handle.write(text)


# argparse wraps help to the terminal width; fix it so the generated page is stable
os.environ["COLUMNS"] = "100"
_write_cli_help()


def _tolerate_markdown_habits(lines: list[str]) -> list[str]:
    """Insert the blank lines reStructuredText wants around lists and field lists.

    The package's docstrings are written to read well in plain text, where a list may follow its
    introducing line directly and a remark may follow the ``:param:`` block without a gap.
    docutils reports both (and ``-W`` turns that into a failed build), so the blank lines are added
    here instead of making every docstring awkward to read in an editor.
    """
    out: list[str] = []
    state = None  # "list" or "fields" while inside one, else None
    for line in lines:
        stripped = line.strip()
        top_level = bool(stripped) and not line[:1].isspace()
        is_item = top_level and stripped.startswith(("- ", "* "))
        is_field = top_level and stripped.startswith(":")
        prev_blank = not out or not out[-1].strip()
        if is_item and state != "list" and not prev_blank:
            out.append("")
        elif top_level and not is_item and state == "list" and not prev_blank:
            out.append("")
        elif top_level and not is_field and state == "fields" and not prev_blank:
            out.append("")
        if not stripped:
            state = None
        elif is_item:
            state = "list"
        elif is_field:
            state = "fields"
        elif top_level:
            state = None
        out.append(line)
    return out


def _process_docstring(app, what, name, obj, options, lines) -> None:  # noqa: ANN001
    lines[:] = _tolerate_markdown_habits(lines)


def setup(app) -> None:  # noqa: ANN001
    app.connect("autodoc-process-docstring", _process_docstring)
