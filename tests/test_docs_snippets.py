"""Every ```python block of README.md and docs/**/*.md runs, so the docs cannot drift from the code.

A page's blocks run in order in one namespace (a later block may use names from an earlier
one), in a fresh temporary working directory, with torch seeded. A block whose previous
non-blank line is ``<!-- skip: reason -->`` is not run (only for code that cannot run on a
CPU-only machine, e.g. torchrun or CUDA); it must still compile. A page with a line
``<!-- requires: module -->`` is skipped where that optional extra's module is not installed
(CI installs every extra).

``torch.compile`` runs with ``backend="eager"`` unless a block names a backend: Dynamo traces
the same graph (``fullgraph=True`` still fails on any graph break) but Inductor's code
generation, which takes minutes on a small CPU machine, is skipped.
"""

from __future__ import annotations

import ast
import re
import sys
import textwrap
import traceback
import types
from pathlib import Path
from types import CodeType
from typing import NamedTuple

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

_OPEN = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*\{?\.?(?P<lang>[\w+-]*)")
_SKIP = re.compile(r"^\s*<!--\s*skip\b.*-->\s*$")
_LANGS = {"python", "py", "python3"}
_REQUIRES = re.compile(r"^\s*<!--\s*requires:\s*([\w.]+)\s*-->\s*$", re.MULTILINE)


class Block(NamedTuple):
    """One fenced code block: where it starts (1-based line of its first code line) and its code."""

    line: int
    code: str
    skip: bool


def extract_blocks(text: str) -> list[Block]:
    """The python code blocks of a markdown text, dedented (they may sit in admonitions/tabs)."""
    lines = text.splitlines()
    blocks: list[Block] = []
    last_text = ""  # previous non-blank line outside code blocks
    i = 0
    while i < len(lines):
        m = _OPEN.match(lines[i])
        if not m:
            if lines[i].strip():
                last_text = lines[i]
            i += 1
            continue
        fence, lang = m["fence"], m["lang"].lower()
        close = re.compile(rf"^[ \t]*{re.escape(fence[0])}{{{len(fence)},}}[ \t]*$")
        j = i + 1
        while j < len(lines) and not close.match(lines[j]):
            j += 1
        if j == len(lines):
            raise ValueError(f"unclosed code fence opened on line {i + 1}")
        if lang in _LANGS:
            code = textwrap.dedent("\n".join(lines[i + 1 : j]))
            blocks.append(Block(i + 2, code, bool(_SKIP.match(last_text))))
        last_text = ""
        i = j + 1
    return blocks


PAGES = sorted(
    [p for p in [ROOT / "README.md"] if p.exists()] + list((ROOT / "docs").glob("**/*.md")))
CODE_PAGES = [p for p in PAGES if extract_blocks(p.read_text(encoding="utf-8"))]


def _compile(block: Block, page: Path) -> CodeType:
    """Compile a block with the page's own line numbers, so tracebacks point into the page."""
    tree = ast.parse(block.code, filename=str(page))
    ast.increment_lineno(tree, block.line - 1)
    return compile(tree, str(page), "exec")


_compile_for_real = torch.compile


def _eager_compile(model=None, **kwargs):
    kwargs.setdefault("backend", "eager")
    return _compile_for_real(model, **kwargs)


def test_extractor_reads_fences_and_skips() -> None:
    text = textwrap.dedent("""\
        Intro.

        ```python
        a = 1
        ```

        <!-- skip: needs CUDA -->
        ```py
        b = 2
        ```

        !!! note
            ```python
            c = a + 1
            ```

        ```bash
        echo not python
        ```
        ````markdown
        ```python
        inside = "a fence inside a bigger fence is not a block"
        ```
        ````
        """)
    blocks = extract_blocks(text)
    assert [(b.line, b.code, b.skip) for b in blocks] == [
        (4, "a = 1", False), (9, "b = 2", True), (14, "c = a + 1", False)]


def test_requires_marker() -> None:
    text = "<!-- requires: lightning -->\n# Title\n  <!--  requires: a.b  -->\n<!-- skip: x -->\n"
    assert _REQUIRES.findall(text) == ["lightning", "a.b"]


def test_docs_have_snippets() -> None:
    assert len(CODE_PAGES) >= 10, CODE_PAGES  # the extractor still finds the docs' examples


def test_api_reference_covers_every_export() -> None:
    """Every name in ``__all__`` of the public modules has a ``:::`` entry in docs/api."""
    import imtl_func.distributed
    import imtl_func.nn

    text = "\n".join(p.read_text(encoding="utf-8") for p in (ROOT / "docs" / "api").glob("*.md"))
    documented = set(re.findall(r"^::: ([\w.]+)\s*$", text, flags=re.MULTILINE))

    def covered(module: types.ModuleType, name: str) -> bool:
        path = f"{module.__name__}.{name}"
        if isinstance(getattr(module, name), types.ModuleType):  # imtl_func.nn: its members
            return any(d.startswith(path + ".") for d in documented)
        return path in documented

    modules = (imtl_func, imtl_func.nn, imtl_func.distributed)
    missing = [f"{module.__name__}.{name}" for module in modules
               for name in module.__all__ if not covered(module, name)]
    assert not missing, f"add these to a page in docs/api/: {missing}"


@pytest.mark.parametrize("page", CODE_PAGES, ids=[str(p.relative_to(ROOT)) for p in CODE_PAGES])
@pytest.mark.usefixtures("fresh_dynamo")
def test_page_snippets_run(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = page.read_text(encoding="utf-8")
    for module_name in _REQUIRES.findall(text):
        pytest.importorskip(module_name)
    blocks = extract_blocks(text)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(torch, "compile", _eager_compile)
    torch.manual_seed(0)
    # A real, importable module: torch.compile looks up the globals' module by name.
    module = types.ModuleType("docs_snippets_" + re.sub(r"\W", "_", page.stem))
    module.__file__ = str(page)
    monkeypatch.setitem(sys.modules, module.__name__, module)
    namespace = module.__dict__
    for block in blocks:
        code = _compile(block, page)  # skipped blocks must at least be valid Python
        if block.skip:
            continue
        try:
            exec(code, namespace)
        except Exception:
            failure = traceback.format_exc()
        else:
            continue
        pytest.fail(f"the block at {page.relative_to(ROOT)}:{block.line} failed:\n{failure}",
                    pytrace=False)


@pytest.fixture
def fresh_dynamo():
    """Compiled functions of one page must not linger into the next test."""
    yield
    if "torch._dynamo" in sys.modules:
        torch._dynamo.reset()
