"""Every third-party import is declared in pyproject.toml.

A package installed by hand on a developer's machine once let `import lightning` pass CI while a
fresh `pip install -e .` could not train. This test maps each imported top-level module to the
distributions that install it and fails, naming the file and the import, unless one of them is
declared: syntagen_st/ against the dependencies, scripts/ and tests/ against those plus `dev`.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(requirement: str) -> str:
    return _normalise(re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement.strip()).group(0))


def declared(with_dev: bool) -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = list(project["dependencies"])
    if with_dev:
        requirements += project["optional-dependencies"]["dev"]
    return {_requirement_name(r) for r in requirements}


def top_level_imports(path: Path) -> set[str]:
    """Absolute imports anywhere in a file (functions included), as top-level module names."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def undeclared(folder: str, allowed: set[str]) -> list[str]:
    providers = importlib.metadata.packages_distributions()
    problems = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        local = {p.stem for p in path.parent.glob("*.py")}  # scripts and tests import their neighbours
        for name in sorted(top_level_imports(path) - set(sys.stdlib_module_names) - local - {"syntagen_st"}):
            dists = {_normalise(d) for d in providers.get(name, [])}
            if not dists & allowed:
                found = ", ".join(sorted(dists)) or "no installed distribution"
                problems.append(f"{path.relative_to(ROOT)}: import {name} ({found}) is not declared in pyproject.toml")
    return problems


@pytest.mark.parametrize("folder, with_dev", [("syntagen_st", False), ("scripts", True), ("tests", True)])
def test_every_import_is_declared(folder, with_dev):
    assert undeclared(folder, declared(with_dev)) == []


def test_an_undeclared_import_is_named(tmp_path, monkeypatch):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "mod.py").write_text("import numpy\n\ndef f():\n    from yaml import safe_load\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert undeclared("pkg", {"numpy"}) == [
        "pkg/mod.py: import yaml (pyyaml) is not declared in pyproject.toml"
    ]
