"""The operator's layers (operator/ftoperator/__init__.py): the pure core never reaches the API, the clock or kopf."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "operator" / "ftoperator"
PURE = ["api", "podapi", "leadership", "naming", "conditions", "stageplan", "validation", "builders", "observe", "decide",
        "progress", "mergepatch", "gang", "gangstage", "feedback",
        "crdgen", "config"]
FORBIDDEN_IN_PURE = {"kopf", "kubernetes", "ftoperator.kubeapi", "ftoperator.reconciler", "ftoperator.handlers",
                     "ftoperator.metrics", "time", "urllib", "requests", "aiohttp", "socket", "subprocess"}


def imports_of(module: str) -> set[str]:
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


@pytest.mark.parametrize("module", PURE)
def test_pure_core_module_imports_no_io_no_clock_and_no_kopf(module):
    bad = {name for name in imports_of(module)
           if any(name == f or name.startswith(f + ".") for f in FORBIDDEN_IN_PURE)}
    assert not bad, f"ftoperator.{module} imports {sorted(bad)}"


def test_only_kubeapi_and_the_entry_points_talk_to_kubernetes():
    talking = {p.stem for p in PACKAGE.glob("*.py")
               if any(n == "kubernetes" or n.startswith("kubernetes.") for n in imports_of(p.stem))}
    assert talking <= {"kubeapi"}, talking


def test_only_handlers_and_main_use_kopf():
    users = {p.stem for p in PACKAGE.glob("*.py") if any(n == "kopf" or n.startswith("kopf.") for n in imports_of(p.stem))}
    assert users <= {"handlers", "__main__"}, users
