"""Griffe extension: Sphinx roles in docstrings become Markdown code and cross-references.

The package's docstrings use Sphinx roles (``:func:`gramian```, ``:class:`Losses```), which
Markdown would print literally. This extension rewrites them before mkdocstrings renders the
docstrings: a role naming an object that the package exports (``imtl_func.X`` or
``imtl_func.nn.X``) becomes a link to that object's entry in the API reference, anything else
(modules, attributes, private names) becomes inline code.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(
    r":(?:py:)?(?P<role>class|func|meth|attr|mod|data|obj|exc):`~?(?P<target>[\w.]+)`")
_EXPORTING = ("imtl_func", "imtl_func.nn")


def _exported(package: griffe.Object, name: str) -> str | None:
    """The public path of ``name`` if the package or ``imtl_func.nn`` exports it, else None."""
    for module in _EXPORTING:
        try:
            owner = package if module == package.path else package[module.split(".", 1)[1]]
        except (KeyError, IndexError, griffe.AliasResolutionError):
            continue
        exports = owner.exports
        if exports is not None and name in exports:
            return f"{module}.{name}"
    return None


def _rewrite(text: str, package: griffe.Object) -> str:
    def replace(m: re.Match[str]) -> str:
        target = m["target"]
        name = target.rsplit(".", 1)[-1]
        path = None if m["role"] == "mod" else _exported(package, name)
        return f"[`{name}`][{path}]" if path else f"`{target}`"

    return _ROLE.sub(replace, text)


class SphinxRoles(griffe.Extension):
    """Rewrite Sphinx roles in every docstring of the loaded package."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        self._visit(pkg, pkg, set())

    def _visit(self, obj: griffe.Object, package: griffe.Module, seen: set[str]) -> None:
        if obj.path in seen:
            return
        seen.add(obj.path)
        if obj.docstring is not None:
            obj.docstring.value = _rewrite(obj.docstring.value, package)
        for member in obj.members.values():
            if not member.is_alias:
                self._visit(member, package, seen)
