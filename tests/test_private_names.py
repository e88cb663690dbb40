"""No module of the package reaches into another's private names (``from .x import _y`` or ``x._y``): what one
module uses from another is part of that module's public surface, so a rename cannot silently break a caller."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "fpxint_hf"


PRIVATE_SUBMODULES = {p.stem for p in PACKAGE.rglob("_*.py") if not p.stem.startswith("__")}
"""Files such as ``_autoregister.py``: importing a private submodule (``from . import _autoregister``) is fine."""


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _module_name(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)


def cross_module_private_uses(source: str, filename: str) -> list[str]:
    """``"line: what"`` for every private name that ``source`` takes from another module of the package."""
    tree = ast.parse(source, filename)
    found, package_modules = [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (
            node.level > 0 or (node.module or "").startswith("fpxint_hf")
        ):
            for alias in node.names:
                if _private(alias.name) and alias.name not in PRIVATE_SUBMODULES:
                    found.append(
                        f"{node.lineno}: from {'.' * node.level}{node.module or ''} import {alias.name}"
                    )
                else:
                    package_modules.add(alias.asname or alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("fpxint_hf"):
                    package_modules.add((alias.asname or alias.name).split(".")[0])
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in package_modules
            and _private(node.attr)
        ):
            found.append(f"{node.lineno}: {node.value.id}.{node.attr}")
    return found


def test_the_check_can_fail():
    assert cross_module_private_uses("from .kernels import _widths\n", "x.py") == [
        "1: from .kernels import _widths"
    ]
    assert cross_module_private_uses("from . import kernels\nkernels._widths(1)\n", "x.py") == [
        "2: kernels._widths"
    ]
    assert cross_module_private_uses("from . import kernels\nkernels.term_widths(1)\n", "x.py") == []


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=_module_name)
def test_no_private_names_across_modules(path: Path):
    uses = cross_module_private_uses(path.read_text(), str(path))
    assert not uses, f"{_module_name(path)} uses private names of other modules: {uses}"
