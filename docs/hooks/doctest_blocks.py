"""MkDocs hook: render the doctest examples in fipo_jax's docstrings (`>>>` lines and the output
lines after them) as `pycon` code blocks.

Many module docstrings carry doctests outside a Google-style "Examples:" section; Markdown would
otherwise read them as nested block quotes, and an output such as `['a', 'b']` after `...[:2]` as a
cross-reference link (mkdocs-autorefs then warns: "Could not find cross-reference target").
The hook registers a Markdown preprocessor, used for the pages and for mkdocstrings' docstrings alike.
"""

from __future__ import annotations

import re

from markdown import Extension
from markdown.preprocessors import Preprocessor
from mkdocs.plugins import event_priority

_FENCE = re.compile(r"^\s*(```|~~~)")
_PROMPT = re.compile(r"^(\s*)>>> ")


def fence_doctests(lines: list[str]) -> list[str]:
    """Wrap each run of doctest lines (a `>>>` line, then lines up to a blank one) in a code fence;
    lines inside an existing fence are left as they are."""
    out: list[str] = []
    in_fence = in_doctest = False
    indent = ""
    for line in lines:
        if in_doctest:
            if line.strip():
                out.append(line)
                continue
            out.append(indent + "```")
            in_doctest = False
        if _FENCE.match(line):
            in_fence = not in_fence
        elif not in_fence and (match := _PROMPT.match(line)):
            indent = match.group(1)
            out += ["", indent + "```pycon"] if out and out[-1].strip() else [indent + "```pycon"]
            in_doctest = True
        out.append(line)
    if in_doctest:
        out.append(indent + "```")
    return out


class _DoctestPreprocessor(Preprocessor):
    def run(self, lines: list[str]) -> list[str]:
        return fence_doctests(lines)


class DoctestExtension(Extension):
    def extendMarkdown(self, md):  # noqa: N802  (Python-Markdown's name)
        # before pymdownx.superfences' fenced-block preprocessor (priority 32), which then renders the fence
        md.preprocessors.register(_DoctestPreprocessor(md), "fipo_doctest_blocks", 40)


@event_priority(100)  # before mkdocstrings reads the Markdown extensions
def on_config(config):
    config.markdown_extensions.append(DoctestExtension())
    return config
