"""The package's shape: its import graph has no circle, imports inside functions counted (every
module can be read, and moved, after the ones it imports); the engines import the chat interface
and the routing rules, never the factory that builds them; no module is over 500 lines."""
from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

PACKAGE = ROOT / "mentalarena"


def module_name(path: Path) -> str:
    """`engines.chat` for mentalarena/engines/chat.py; a folder's __init__ is the folder's name."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The package modules `path` imports anywhere in it (`from mentalarena.x.y import`,
    `from mentalarena.x import y`, `import mentalarena.x.y`). A relative import counts too, from
    where the file is."""
    here = module_name(path).split(".")
    package = here if path.stem == "__init__" else here[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1] + (node.module.split(".") if node.module else [])
            elif node.module and node.module.split(".")[0] == "mentalarena":
                base = node.module.split(".")[1:]
            else:
                continue
            for alias in node.names:  # `from mentalarena.x import y`: the module x.y when there is one, else x
                name = ".".join(base + [alias.name])
                found.add(name if name in modules else ".".join(base))
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".", 1)[1] for a in node.names if a.name.startswith("mentalarena.")}
    return found & modules - {module_name(path), ""}


def graph() -> dict[str, set[str]]:
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: imports_of(path, set(paths)) for name, path in paths.items()}


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


def test_the_graph_sees_every_kind_of_import():
    edges = graph()
    assert "engines.chat" in edges["engines.openai_backend"]  # from mentalarena.engines.chat import ...
    assert "training.quality" in edges["reports.report"]  # from mentalarena.training import quality, in a function
    assert "training.sft" in edges["reports.report"] and "errors" in edges["reports.report"]


def test_the_circle_finder_finds_one():
    assert circle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert circle({"a": {"b"}, "b": set()}) is None


def test_engines_import_the_interface_not_the_factory():
    edges = graph()
    for engine in ("hf_backend", "openai_backend", "seq2seq_backend", "batcher", "engine"):
        assert "engines.backends" not in edges[f"engines.{engine}"], engine
    assert edges["engines.chat"] <= {"errors", "engines.halving"}  # the interface imports nothing above it
    tree = ast.parse((PACKAGE / "engines" / "embedded.py").read_text(encoding="utf-8"))  # the embedded model's place: no torch
    assert not [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
                and "torch" in ast.dump(n)]


def test_no_module_is_over_500_lines():
    long = {module_name(p): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text(encoding="utf-8").splitlines())) > 500}
    assert not long, long
