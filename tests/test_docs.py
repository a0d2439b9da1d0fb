"""Run the ```python blocks of every docs page (and of README.md) so the documentation cannot rot.

The blocks of one page run in order in one shared namespace, so a later block may use names an earlier
one defined. A block whose first line is ``# skip-test`` is not run. Each page runs in a temporary
working directory, with the default dtype and the solver registry restored afterwards (a page may
register its own solver or switch to float64 without leaking that into other tests).
"""

from __future__ import annotations

import os
import re
import textwrap
import unicodedata
from pathlib import Path

import pytest
import torch

import sdediff
import sdediff.solvers.base as solver_base

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted((ROOT / "docs").rglob("*.md")) + [ROOT / "README.md"]  # docs/api/ pages too (mkdocstrings only)

# an opening fence (up to 3 spaces of indent, 3+ backticks) whose info string is exactly "python",
# then everything up to a closing fence of the same indent and at least as many backticks
FENCE = re.compile(r"^(?P<indent> {0,3})(?P<ticks>`{3,})[ \t]*python[ \t]*\n(?P<body>.*?)^(?P=indent)(?P=ticks)`*[ \t]*$",
                   re.MULTILINE | re.DOTALL)
SKIP_MARK = "# skip-test"


def python_blocks(text: str) -> list[tuple[int, str]]:
    """``(line number of the opening fence, code)`` for every ```python block of a markdown text."""
    blocks = []
    for match in FENCE.finditer(text):
        line = text.count("\n", 0, match.start()) + 1
        blocks.append((line, textwrap.dedent(match.group("body"))))
    return blocks


def pages_with_code() -> list[Path]:
    return [p for p in PAGES if p.is_file() and python_blocks(p.read_text(encoding="utf-8"))]


def test_block_parser():
    text = ("intro\n```python\nx = 1\n```\n\n```bash\nls\n```\n"
            "- item\n\n  ```python\n  y = x + 1\n  ```\n````python\nz = '```'\n````\n")
    assert python_blocks(text) == [(2, "x = 1\n"), (11, "y = x + 1\n"), (14, "z = '```'\n")]


def test_docs_exist():
    names = {p.name for p in (ROOT / "docs").glob("*.md")}
    assert {"index.md", "quickstart.md", "custom_sde.md", "sampling.md", "likelihood.md", "concepts.md"} <= names


def test_sampling_page_covers_every_solver():
    """docs/sampling.md must describe every registered solver (as `name`, families by their base name)."""
    text = (ROOT / "docs" / "sampling.md").read_text(encoding="utf-8")
    missing = [name for name in sdediff.available_solvers() if f"`{name.split(':')[0]}`" not in text]
    assert not missing, f"solvers not documented in docs/sampling.md: {missing}"


def slugify(heading: str) -> str:
    """The anchor Python-Markdown's toc extension (used by mkdocs) gives a heading."""
    text = heading.replace("`", "").replace("*", "")  # inline code and emphasis markers
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def test_internal_links_resolve():
    """Every relative link between docs pages points at an existing page and, if given, heading (an API page's
    anchors are the dotted names mkdocstrings renders there: ``::: sdediff.x`` and its members)."""
    docs = ROOT / "docs"
    anchors = {}
    for page in docs.rglob("*.md"):
        text = re.sub(r"^```.*?^```", "", page.read_text(encoding="utf-8"), flags=re.MULTILINE | re.DOTALL)
        anchors[page.relative_to(docs).as_posix()] = {slugify(h) for h in re.findall(r"^#{1,6}\s+(.+?)\s*$", text,
                                                                                  re.MULTILINE)}
        anchors[page.relative_to(docs).as_posix()] |= set(re.findall(r"^::: ([\w.]+)", text, re.MULTILINE))
    broken = []
    for page in docs.rglob("*.md"):
        rel = page.relative_to(docs)
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text(encoding="utf-8")):
            if re.match(r"[a-z]+:", target):
                continue  # external
            name, _, anchor = target.partition("#")
            name = (rel.parent / name).as_posix() if name else rel.as_posix()
            name = Path(os.path.normpath(name)).as_posix()
            if not name.endswith(".md"):  # an image or another file shipped with the docs
                if not (docs / name).is_file():
                    broken.append(f"{rel.as_posix()} -> {target}")
                continue
            if name not in anchors or (anchor and anchor not in anchors[name]):
                broken.append(f"{rel.as_posix()} -> {target}")
    assert not broken, f"broken links: {broken}"


@pytest.mark.parametrize("page", pages_with_code(), ids=lambda p: str(p.relative_to(ROOT)))
def test_page_code_runs(page: Path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": f"docs_{page.stem}"}
    dtype = torch.get_default_dtype()
    registry = getattr(solver_base, "_REGISTRY", {})
    saved = dict(registry)
    rel = page.relative_to(ROOT)
    try:
        for line, code in python_blocks(page.read_text(encoding="utf-8")):
            if code.lstrip().startswith(SKIP_MARK):
                continue
            # blank lines keep tracebacks pointing at the right line of the markdown file
            source = "\n" * line + code
            try:
                exec(compile(source, str(rel), "exec"), namespace)
            except Exception as err:
                raise AssertionError(f"{rel}: the python block at line {line} failed: "
                                     f"{type(err).__name__}: {err}") from err
    finally:
        torch.set_default_dtype(dtype)
        registry.clear()
        registry.update(saved)


def test_site_lists_every_page_and_module():
    """mkdocs.yml's nav names every docs page (and only existing ones), and docs/api/ renders every public module."""
    nav = set(re.findall(r"^\s*- [^:\n]+: (\S+\.md)\s*$", (ROOT / "mkdocs.yml").read_text(encoding="utf-8"), re.MULTILINE))
    pages = {p.relative_to(ROOT / "docs").as_posix() for p in (ROOT / "docs").rglob("*.md")}
    assert not pages - nav, f"pages missing from the nav of mkdocs.yml: {sorted(pages - nav)}"
    assert not nav - pages, f"nav entries of mkdocs.yml without a page: {sorted(nav - pages)}"
    api = "\n".join(p.read_text(encoding="utf-8") for p in (ROOT / "docs" / "api").glob("*.md"))
    documented = set(re.findall(r"^::: ([\w.]+)", api, re.MULTILINE))
    modules = {".".join(p.relative_to(ROOT).with_suffix("").parts) for p in (ROOT / "sdediff").rglob("*.py")
               if not p.name.startswith("_")}
    assert not modules - documented, f"modules without an API page entry (docs/api/*.md): {sorted(modules - documented)}"


def test_griffe_extension_rewrites_rst_roles():
    """docs/griffe_rst.py (loaded by mkdocs.yml) turns the docstrings' Sphinx roles into Markdown for the API pages."""
    pytest.importorskip("griffe")
    import importlib.util

    spec = importlib.util.spec_from_file_location("griffe_rst", ROOT / "docs" / "griffe_rst.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    text = "Uses :math:`x_t = m x_0` and :func:`~sdediff.sample`.\n\n.. math::  a = b\n           + c\n\nAfter."
    assert module.rst_to_markdown(text) == (
        'Uses $x_t = m x_0$ and <autoref identifier="sdediff.sample" optional><code>sample</code></autoref>.\n\n'
        "\n$$\na = b\n+ c\n$$\n\nAfter.")
