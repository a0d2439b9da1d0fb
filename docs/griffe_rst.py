"""A griffe extension for the API reference: the reStructuredText roles of sdediff's docstrings as Markdown.

The docstrings are numpy style and also read well in a terminal, so they use Sphinx's roles, which mkdocstrings
would show verbatim. Before the docstrings are parsed this rewrites

- ``:math:`x``` to inline math ``$x$`` and a ``.. math::`` directive (with its indented continuation lines) to a
  ``$$ ... $$`` block, both typeset by pymdownx.arithmatex and MathJax;
- ``:func:`~sdediff.a.b``` (also ``meth``, ``class``, ``mod``, ``attr``, ``data``, ``obj``, ``exc``) to an optional
  mkdocs-autorefs link titled ``b`` (the whole path without ``~``); a name that is not rendered in the reference
  (another package, an alias) stays plain code instead of failing the strict build.

Loaded by mkdocs.yml (``extensions: [docs/griffe_rst.py]`` of the mkdocstrings python handler).
"""

from __future__ import annotations

import html
import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(?:func|meth|class|mod|attr|data|obj|exc):`(~?)([^`]+?)`")
_MATH = re.compile(r":math:`([^`]+)`")
_DIRECTIVE = re.compile(r"^(?P<indent>[ \t]*)\.\. math::[ \t]*(?P<first>.*)$")


def _reference(match: re.Match[str]) -> str:
    short, target = match.group(1) == "~", match.group(2).strip()
    target = target.removesuffix("()")
    title = html.escape(target.rsplit(".", 1)[-1] if short else target)
    return f'<autoref identifier="{html.escape(target)}" optional><code>{title}</code></autoref>'


def _math_blocks(text: str) -> str:
    lines, out, i = text.split("\n"), [], 0
    while i < len(lines):
        match = _DIRECTIVE.match(lines[i])
        if match is None:
            out.append(lines[i])
            i += 1
            continue
        indent, body = match.group("indent"), [match.group("first").strip()]
        i += 1
        while i < len(lines) and (not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > len(indent)):
            body.append(lines[i].strip())
            i += 1
        while body and not body[-1]:
            body.pop()
        out += ["", f"{indent}$$", *(f"{indent}{line}" for line in body if line), f"{indent}$$", ""]
    return "\n".join(out)


def rst_to_markdown(text: str) -> str:
    """``text`` with the ``math`` role and directive and the cross-reference roles rewritten as described above."""
    text = _math_blocks(text)
    text = _MATH.sub(lambda m: f"${m.group(1).strip()}$", text)
    return _ROLE.sub(_reference, text)


class RstRoles(griffe.Extension):
    """Rewrite every docstring with :func:`rst_to_markdown` as griffe loads it."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = rst_to_markdown(obj.docstring.value)
