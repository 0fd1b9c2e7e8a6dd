"""The package's shape, read from its imports (ast, no code run): no import cycle between
modules, subpackages that depend on each other one way only, commands only at the top, and no
module of the package importing the test models."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "syntagen_st"

LAYERS = [
    {"core"},
    {"prompts", "scaleout", "reporting"},
    {"generation", "segmentation"},
    {"submission"},
    {"selftrain"},
    {"(commands)"},
]
"""Bottom to top: a module may import its own subpackage and any subpackage of a lower layer,
never one of its own layer or above (generation and segmentation do not know each other)."""
COMMANDS = {"fit", "generate", "train", "evaluate", "export", "validate", "reproduce", "report"}


def modules(pkg: Path = PKG) -> dict[str, Path]:
    out = {}
    for path in sorted(pkg.rglob("*.py")):
        parts = list(path.relative_to(pkg.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The package modules ``name`` imports, anywhere in the file (lazy imports count too)."""
    here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = here[: len(here) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            targets = [module, *(f"{module}.{a.name}" for a in node.names)]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name and not target.startswith(name + "."):
                found.add(target)
    return found


def graph(pkg: Path = PKG) -> dict[str, set[str]]:
    mods = modules(pkg)
    return {name: imports(name, path, set(mods)) for name, path in mods.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def stage(module: str) -> str:
    """The subpackage a module belongs to; '(commands)' at the top; '' for the package itself."""
    parts = module.split(".")
    if len(parts) == 1:
        return ""
    return parts[1] if (PKG / parts[1]).is_dir() else "(commands)"


def level(group: str) -> int:
    return next(n for n, layer in enumerate(LAYERS) if group in layer)


def against_the_direction(edges: dict[str, set[str]]) -> list[str]:
    wrong = []
    for source, targets in sorted(edges.items()):
        a = stage(source)
        for target in sorted(targets):
            b = stage(target)
            if not a or not b or a == b or b == "testing":
                continue
            if a == "testing":
                continue
            if level(b) < level(a):
                continue
            wrong.append(f"{source} imports {target} ({a} -> {b})")
    return wrong


def test_no_import_cycle_between_modules():
    assert cycles(graph()) == []


def test_subpackages_depend_one_way():
    assert against_the_direction(graph()) == []


def test_the_package_never_imports_the_test_models():
    users = [m for m, targets in graph().items() if stage(m) != "testing" and any(stage(t) == "testing" for t in targets)]
    assert users == []


def test_the_top_level_holds_only_the_commands():
    top = {p.stem for p in PKG.glob("*.py")} - {"__init__"}
    assert top == COMMANDS
    every_group = {g for layer in LAYERS for g in layer} | {"testing"}
    assert {p.name for p in PKG.iterdir() if (p / "__init__.py").is_file()} <= every_group


@pytest.mark.parametrize("edges, expected", [
    ({"p.a": {"p.b"}, "p.b": {"p.c"}, "p.c": {"p.a"}, "p.d": {"p.a"}}, [["p.a", "p.b", "p.c"]]),
    ({"p.a": {"p.b"}, "p.b": set()}, []),
])
def test_a_cycle_is_found(edges, expected):
    assert cycles(edges) == expected


def test_an_import_against_the_direction_is_named(tmp_path, monkeypatch):
    pkg = tmp_path / "syntagen_st"
    for sub in ("core", "selftrain"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "selftrain" / "loop.py").write_text("X = 1\n")
    (pkg / "core" / "config.py").write_text("def f():\n    from ..selftrain.loop import X\n")
    monkeypatch.setitem(globals(), "PKG", pkg)
    assert against_the_direction(graph(pkg)) == [
        "syntagen_st.core.config imports syntagen_st.selftrain.loop (core -> selftrain)"]
