"""The package's layout: no module imports one that imports it back, lazy imports included, and the top
of src/roletune stays small (the spine and one module per verb; the rest lives in packages)."""
from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

PACKAGE = ROOT / "src" / "roletune"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the roletune modules it imports anywhere in its code, each with the packages Python
    initialises on the way (a package's __init__ runs before its submodule does)."""
    modules = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the importer's package
                    anchor = name.split(".")[:len(name.split(".")) - node.level + (1 if is_package else 0)]
                    base = ".".join([*anchor, *filter(None, [base])])
                targets.update(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                               for alias in node.names)
        edges = set()
        for target in (t for t in targets if t in modules):
            parts = target.split(".")
            owners = {".".join(parts[:i]) for i in range(1, len(parts))}
            # The importer's own packages are initialised already, before the importer itself runs.
            edges.update(o for o in owners if o in modules and not (name + ".").startswith(o + "."))
            edges.add(target)
        edges.discard(name)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for following in sorted(graph[node]):
            if following not in index:
                visit(following)
                low[node] = min(low[node], low[following])
            elif following in on_stack:
                low[node] = min(low[node], index[following])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_module_imports_one_that_imports_it_back():
    assert cycles(import_graph()) == []


def test_the_cycle_check_finds_every_cycle_and_nothing_else():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a", "e"}, "e": {"d"}, "f": {"a"}}) == [
        ["a", "b", "c"], ["d", "e"]]
    assert cycles({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []


def test_the_graph_holds_lazy_imports_and_packages(tmp_path, monkeypatch):
    package = tmp_path / "roletune"
    (package / "speed").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "model.py").write_text("from roletune.speed import attention\n")
    (package / "speed" / "__init__.py").write_text("from roletune.speed import lora\n")
    (package / "speed" / "attention.py").write_text("")
    (package / "speed" / "lora.py").write_text("def f():\n    from roletune.model import SHARED\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", package)
    graph = import_graph()
    assert graph["roletune.model"] == {"roletune.speed", "roletune.speed.attention"}
    assert graph["roletune.speed.lora"] == {"roletune.model"}
    assert cycles(graph) == [["roletune.model", "roletune.speed", "roletune.speed.lora"]]


def test_the_top_of_the_package_holds_at_most_16_modules():
    top = sorted(path.name for path in PACKAGE.glob("*.py"))
    assert len(top) <= 16, top


def test_the_levers_are_applied_through_one_entry_point():
    """Outside roletune.speed, only speed.levers applies levers (in its written order); speed.attention is
    read too, by loading and batching, for which attention a model runs."""
    graph = import_graph()
    reached = {(name, target) for name, targets in graph.items() if not name.startswith("roletune.speed")
               for target in targets if target.startswith("roletune.speed.")}
    assert {target for _, target in reached} <= {"roletune.speed.levers", "roletune.speed.attention"}, sorted(reached)
