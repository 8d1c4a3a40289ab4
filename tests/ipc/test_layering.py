"""Dependency direction: nucleus -> ipc, never back (components and cloud_sync only know the SDK)."""

from __future__ import annotations

import ast
from pathlib import Path

IPC = Path(__file__).resolve().parents[2] / "ipc"
FORBIDDEN = ("nucleus", "cloud_sync", "components")


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_ipc_imports_nothing_of_the_nucleus() -> None:
    files = sorted(IPC.rglob("*.py"))
    assert files, f"no sources under {IPC}"
    offenders = {
        str(f.relative_to(IPC.parent)): sorted(m for m in imported_modules(f) if m.split(".")[0] in FORBIDDEN)
        for f in files
    }
    assert {f: m for f, m in offenders.items() if m} == {}
