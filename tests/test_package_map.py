"""The README's map of the package names every module, and only modules that exist."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_map_matches_the_modules():
    text = (ROOT / "README.md").read_text()
    section = text.split("## Map of the package", 1)[1].split("\n## ", 1)[0]
    mapped = set(re.findall(r"`(\w+)\.py`", section))
    modules = {p.stem for p in (ROOT / "syntagen_st").glob("*.py")} - {"__init__"}
    assert mapped == modules, (sorted(modules - mapped), sorted(mapped - modules))
