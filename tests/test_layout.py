"""The package's shape: its import graph has no circle, imports inside functions counted (every
module can be read, and moved, after the ones it imports); the engines import the chat interface
and the routing rules, never the factory that builds them; no module is over 500 lines."""
from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

PACKAGE = ROOT / "mentalarena"


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The package modules `path` imports anywhere in it (`from .x import`, `from . import x`,
    `from mentalarena.x import`, `import mentalarena.x`)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:
                found |= {node.module.split(".")[0]} if node.module else {a.name for a in node.names}
            elif node.module and node.module.split(".")[0] == "mentalarena":
                parts = node.module.split(".")
                found |= {parts[1]} if len(parts) > 1 else {a.name for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("mentalarena.")}
    return found & modules - {path.stem}


def graph() -> dict[str, set[str]]:
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    return {name: imports_of(PACKAGE / f"{name}.py", modules) for name in modules}


def circle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import circle (as a path that returns to its start), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = 2
        path.pop()
        return None

    for start in sorted(edges):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_the_package_has_no_import_circle():
    assert circle(graph()) is None, " -> ".join(circle(graph()))


def test_the_circle_finder_finds_one():
    assert circle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert circle({"a": {"b"}, "b": set()}) is None


def test_engines_import_the_interface_not_the_factory():
    edges = graph()
    for engine in ("hf_backend", "openai_backend", "seq2seq_backend", "batcher", "engine"):
        assert "backends" not in edges[engine], engine
    assert edges["chat"] <= {"errors", "halving"}  # the interface imports nothing above it
    tree = ast.parse((PACKAGE / "embedded.py").read_text(encoding="utf-8"))  # the embedded model's place: no torch
    assert not [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
                and "torch" in ast.dump(n)]


def test_no_module_is_over_500_lines():
    long = {p.name: n for p in PACKAGE.glob("*.py") if (n := len(p.read_text(encoding="utf-8").splitlines())) > 500}
    assert not long, long
