"""The README's map of the package names every subpackage (as `name/`) and every command module
(as `name.py`), and only those that exist on disk; a subpackage run as a command
(`name/__main__.py`) is named as `python -m syntagen_st.name`."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "syntagen_st"


def map_section() -> str:
    text = (ROOT / "README.md").read_text()
    assert "\n## Map of the package\n" in text, "README.md has no '## Map of the package' section"
    return text.split("\n## Map of the package\n", 1)[1].split("\n## ", 1)[0]


def subpackages() -> set[str]:
    return {p.parent.name for p in PKG.glob("*/__init__.py")}


def commands() -> set[str]:
    return {p.stem for p in PKG.glob("*.py")} - {"__init__"}


def test_readme_map_names_every_subpackage_and_only_those():
    mapped = set(re.findall(r"`(\w+)/`", map_section()))
    on_disk = subpackages()
    assert mapped == on_disk, {"missing from the map": sorted(on_disk - mapped),
                               "mapped but not on disk": sorted(mapped - on_disk)}


def test_readme_map_names_every_command_module_and_only_those():
    mapped = set(re.findall(r"`(\w+)\.py`", map_section()))
    on_disk = commands()
    assert mapped == on_disk, {"missing from the map": sorted(on_disk - mapped),
                               "mapped but not on disk": sorted(mapped - on_disk)}


def test_readme_map_names_every_subpackage_command():
    section = map_section()
    runnable = {p.parent.name for p in PKG.glob("*/__main__.py")}
    missing = sorted(name for name in runnable if f"python -m syntagen_st.{name}`" not in section)
    assert not missing, missing
