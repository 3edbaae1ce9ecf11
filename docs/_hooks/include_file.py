"""MkDocs hook: ``<!-- include-file: PATH -->`` in a page is replaced by the file at PATH.

PATH is relative to the repository root (the folder of mkdocs.yml), so a page can show a
file that lives outside ``docs/``, such as ``benchmarks/README.md``, which the benchmark
script rewrites. The included text is adapted to its new place: its headings move one level
down, and its relative links and images (which point next to the file, not into the site)
become plain path references. A missing file gives a note instead of a broken build.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

log = logging.getLogger("mkdocs.hooks.include_file")

_MARKER = re.compile(r"^<!--\s*include-file:\s*(?P<path>\S+)\s*-->[ \t]*$", re.MULTILINE)
_FENCE = re.compile(r"^[ \t]*(`{3,}|~{3,})")
_LINK = re.compile(r"(?P<bang>!?)\[(?P<text>[^\]]*)\]\((?P<target>[^)\s]+)(?:\s+\"[^\"]*\")?\)")
_ABSOLUTE = re.compile(r"^(?:[a-z][a-z0-9+.-]*:|#|/)", re.IGNORECASE)


def _adapt(text: str, folder: str) -> str:
    """Demote headings and turn relative links into path references, outside code fences."""
    out: list[str] = []
    fence = ""
    for line in text.splitlines():
        m = _FENCE.match(line)
        if m and (not fence or m.group(1).startswith(fence)):
            fence = "" if fence else m.group(1)
        elif not fence:
            if line.startswith("#"):
                line = "#" + line
            line = _LINK.sub(lambda m: _relink(m, folder), line)
        out.append(line)
    return "\n".join(out)


def _relink(m: re.Match, folder: str) -> str:
    target = m["target"]
    if _ABSOLUTE.match(target):
        return m.group(0)
    path = f"`{folder}/{target}`" if folder else f"`{target}`"
    if m["bang"]:
        return f"*(figure {path})*"
    return f"{m['text']} ({path})"


def _replacement(root: Path, rel: str) -> str:
    file = root / rel
    if not file.is_file():
        log.info("include-file: %s does not exist (yet); the page shows a note instead", rel)
        return (f'!!! note "Not generated yet"\n    `{rel}` is not in this checkout yet; '
                "see above for the command that writes it.\n")
    folder = str(Path(rel).parent).replace("\\", "/")
    return _adapt(file.read_text(encoding="utf-8"), "" if folder == "." else folder)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    root = Path(config["config_file_path"]).parent
    return _MARKER.sub(lambda m: _replacement(root, m["path"]), markdown)
