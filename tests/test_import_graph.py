"""The package's import graph has no cycles (module-level and function-level imports alike)."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "sae_refusal"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports anywhere in its code.

    ``if TYPE_CHECKING:`` blocks are left out (they never run); ``from a.b import c`` is an import of
    ``a.b.c`` when that is a module, else of ``a.b``.
    """
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        typing_only = {
            id(sub)
            for node in ast.walk(tree)
            if isinstance(node, ast.If)
            and isinstance(node.test, ast.Name)
            and node.test.id == "TYPE_CHECKING"
            for sub in ast.walk(node)
        }
        found: set[str] = set()
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    found.add(full if full in modules else node.module)
            elif isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
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
    return found


def test_the_package_has_no_import_cycles() -> None:
    assert cycles(import_graph()) == []


def test_the_cycles_the_issue_named_are_gone_and_the_check_sees_lazy_imports() -> None:
    graph = import_graph()
    untied = [
        ("sae_refusal.cli", "sae_refusal.cli_lightning"),
        ("sae_refusal.eval.job", "sae_refusal.eval.capability_stage"),
        ("sae_refusal.sae.base", "sae_refusal.sae.formats"),
    ]
    for a, b in untied:
        assert not (b in graph[a] and a in graph[b]), (a, b)
    # cli imports cli_lightning inside functions only: the graph still has that edge
    assert "sae_refusal.cli_lightning" in graph["sae_refusal.cli"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def _lazy_packages() -> dict[str, tuple[set[tuple[str, str]], set[tuple[str, str]]]]:
    """Package -> (its ``TYPE_CHECKING`` imports, its ``lazy_exports`` list), each as (module, name) pairs."""
    found = {}
    for path in PACKAGE.rglob("__init__.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        calls = [
            node
            for node in ast.walk(tree)
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "lazy_exports"
        ]
        if not calls:
            continue
        listed = {
            (module, name) for module, names in ast.literal_eval(calls[0].args[1]).items() for name in names
        }
        typed = {
            (node.module or "", alias.name)
            for block in tree.body
            if isinstance(block, ast.If) and getattr(block.test, "id", None) == "TYPE_CHECKING"
            for node in block.body
            if isinstance(node, ast.ImportFrom)
            for alias in node.names
        }
        found[_module_name(path)] = (typed, listed)
    return found


def test_lazy_exports_match_what_type_checkers_see_and_all_resolve() -> None:
    packages = _lazy_packages()
    assert {"sae_refusal.llm", "sae_refusal.activations", "sae_refusal.features", "sae_refusal.sae"} <= set(
        packages
    )
    for package, (typed, listed) in packages.items():
        assert typed == listed, (package, typed ^ listed)
        module = importlib.import_module(package)
        assert module.__all__ == sorted(name for _, name in listed)
        for source, name in listed:
            assert getattr(module, name) is getattr(importlib.import_module(source), name), (package, name)


def test_a_name_exported_from_two_modules_is_refused() -> None:
    from sae_refusal.lazy import lazy_exports

    with pytest.raises(ValueError, match=r"pkg: 'x' is exported from pkg\.a and pkg\.b"):
        lazy_exports("pkg", {"pkg.a": ("x",), "pkg.b": ("y", "x")})
