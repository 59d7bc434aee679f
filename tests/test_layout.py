"""The shape of the code: no import cycles (benchmarks too); the core imports neither ``training`` nor ``export``.

The import graph is read from the source with ``ast`` (every ``import`` / ``from ... import``,
at module level or inside a function, except those under ``if TYPE_CHECKING:``), so a lazy import
that closes a cycle is caught too.
"""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {
    "freetickets_hub": ROOT / "freetickets_hub",
    "freetickets_hub.training": ROOT / "training",
    "freetickets_hub.export": ROOT / "export",
    "": ROOT / "benchmarks",  # scripts that import each other by bare name (``from ood_report import ...``)
}  # fmt: skip  (pyproject's package-dir mapping, and the benchmarks)
STAGES = ("freetickets_hub.training", "freetickets_hub.export")
CLI_VERBS = "freetickets_hub.cli"  # the verbs import the stages, lazily, to run them


def _modules() -> dict[str, Path]:
    found = {}
    for package, folder in FOLDERS.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            if "__pycache__" in parts or (package == "freetickets_hub" and parts[0] in ("training", "export")):
                continue
            name = ".".join(p for p in (package, *parts) if p).removesuffix(".__init__")
            found[name] = path
    return found


def _is_type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def _imports(name: str, path: Path, modules: set[str]) -> set[str]:
    """The package modules ``name`` imports (``from a import b`` counts ``a.b`` when that is a module)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                continue
            if isinstance(child, ast.Import):
                targets.update(alias.name for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.rsplit(".", child.level - 1)[0] if child.level > 1 else package
                    base = f"{anchor}.{base}" if base else anchor
                targets.add(base)
                targets.update(f"{base}.{alias.name}" for alias in child.names)
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    return {t for t in targets if t in modules and t != name}


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, set(modules)) for name, path in modules.items()}


def _without_parents(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """Drop edges to a module's own parent packages: importing ``a.b`` runs ``a/__init__`` first by design."""
    return {name: {t for t in targets if not name.startswith(t + ".")} for name, targets in graph.items()}


def test_the_graph_sees_the_rooms() -> None:
    graph = import_graph()
    assert "ood_report" in graph["ood"] and "ood_sets" in graph["ood"]
    assert "freetickets_hub.artifact.config" in graph["freetickets_hub.model.ensemble"]
    assert "freetickets_hub.engines.base" in graph["freetickets_hub.engines.onnxruntime"]


def test_there_are_no_import_cycles() -> None:
    try:
        graphlib.TopologicalSorter(_without_parents(import_graph())).prepare()
    except graphlib.CycleError as err:
        pytest.fail(f"import cycle: {' -> '.join(err.args[1])}")


def test_a_cycle_would_be_found() -> None:
    graph = _without_parents(import_graph())
    graph["freetickets_hub.artifact.config"].add("freetickets_hub.model.ensemble")  # ensemble imports config
    with pytest.raises(graphlib.CycleError):
        graphlib.TopologicalSorter(graph).prepare()


def test_the_core_imports_neither_training_nor_export_but_in_the_cli_verbs() -> None:
    graph = import_graph()
    offenders = {
        f"{name} -> {target}"
        for name, targets in graph.items()
        if name.startswith("freetickets_hub")
        and not name.startswith(STAGES)
        and not (name == CLI_VERBS or name.startswith(CLI_VERBS + "."))
        for target in targets
        if target.startswith(STAGES)
    }
    assert offenders == set()
