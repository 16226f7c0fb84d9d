"""The house's shape, checked: imports flow api -> services -> (core, store, backends, wire),
core imports nothing else of the package, and no module grows past one concept's size.

These read the source, not the behaviour: they are what keeps the layout of
docs/architecture.md true as the code changes."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "src" / "branchwise"

# layer -> the layers it may import (besides itself)
ALLOWED: dict[str, set[str]] = {
    "core": set(),
    "settings": set(),
    "observe": {"settings"},  # logs, metrics, traces: a leaf every layer may use
    "wire": {"core"},
    "store": {"core", "settings"},
    "backends": {"core", "settings"},
    "services": {"core", "wire", "store", "backends", "settings", "observe"},
    "api": {"core", "wire", "services", "settings", "observe"},
    "testing": set(),
    "explorer": set(),  # static files and the routes that serve them
    # composition roots: they wire everything together
    "app": {"core", "wire", "store", "backends", "services", "api", "settings", "explorer", "observe"},
    "cli": {"core", "wire", "store", "backends", "services", "api", "settings", "app", "observe"},
    "__init__": {"settings", "app"},
    "__main__": {"cli"},
}
MAX_LINES = 500


def _modules() -> list[Path]:
    return sorted(p for p in PKG.rglob("*.py") if "migrations" not in p.parts)


def _layer(path: Path) -> str:
    rel = path.relative_to(PKG)
    return rel.parts[0].removesuffix(".py")


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "branchwise" and len(parts) > 1:
                found.add(parts[1])
            elif parts[0] == "branchwise" and isinstance(node, ast.ImportFrom):
                found.update(a.name for a in node.names)
    return found


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PKG)))
def test_imports_flow_one_way(path: Path) -> None:
    layer = _layer(path)
    assert layer in ALLOWED, f"{path.relative_to(PKG)} is in no known layer: add it to ALLOWED"
    wrong = {used for used in _imports(path) if used != layer and used not in ALLOWED[layer]}
    assert not wrong, f"{path.relative_to(PKG)} ({layer}) imports {sorted(wrong)}"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PKG)))
def test_modules_stay_small(path: Path) -> None:
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(PKG)} has {lines} lines: split it by concept"
