"""The arrows between packages (DESIGN.md, "The flow"), read off the source with an AST walk.

Every import counts, also one inside a function: a lazy import is still an arrow. An AST walk
rather than import-linter because the rules are few and the walk needs nothing installed.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("core", "training", "model_export", "service", "loadtest")
# package -> the packages of ours it may import (itself always)
ALLOWED = {
    "core": set(),
    "training": {"core"},
    "model_export": {"training", "core"},
    "service": {"core"},
    "loadtest": {"core"},
}
# Third-party imports a package must never make (the serving image carries no torch).
FORBIDDEN = {
    "core": {"torch", "transformers", "fastapi", "locust"},
    "service": {"torch", "transformers", "locust"},
    "loadtest": {"torch", "transformers", "onnxruntime"},
}


def imports_of(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def modules(package: str) -> dict[str, set[str]]:
    """romebert.<package>.<module> -> the modules it imports."""
    return {f"romebert.{package}.{p.stem}": imports_of(p) for p in sorted((ROOT / package).glob("*.py"))}


@pytest.mark.parametrize("package", PACKAGES)
def test_a_package_imports_only_what_its_arrows_allow(package):
    wrong = []
    for module, names in modules(package).items():
        for name in names:
            parts = name.split(".")
            if parts[0] in PACKAGES:
                wrong.append(f"{module} imports {name}: our code is imported as romebert.{name}")
            elif parts[0] == "romebert" and len(parts) > 1 and parts[1] != package and parts[1] not in ALLOWED[package]:
                wrong.append(f"{module} imports {name}")
            elif parts[0] in FORBIDDEN.get(package, ()):
                wrong.append(f"{module} imports {name}")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycle_between_modules():
    graph = {m: {n for n in names if n.startswith("romebert.")} for p in PACKAGES for m, names in modules(p).items()}
    graph = {m: {n for n in targets if n in graph} for m, targets in graph.items()}
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in graph[module]:
            assert state.get(target) != "open", "import cycle: " + " -> ".join(path + [module, target])
            if target not in state:
                visit(target, path + [module])
        state[module] = "done"

    for module in graph:
        if module not in state:
            visit(module, [])


def test_the_arrow_test_sees_a_forbidden_import(tmp_path):
    """The walk itself: an import inside a function is found."""
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from romebert.training.train import train\n    import torch\n")
    assert imports_of(source) == {"romebert.training.train", "torch"}


def test_nothing_of_ours_imports_loadtest_or_bench():
    for package in PACKAGES:
        if package == "loadtest":
            continue
        for module, names in modules(package).items():
            assert not any(n.startswith(("romebert.loadtest", "bench")) for n in names), module
