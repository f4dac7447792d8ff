"""The map of modules in docs/how-it-works.md names every module of the package, and only those."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "celery_ordered"


def mapped_modules() -> set[str]:
    """The paths the "The modules" table names, relative to ``celery_ordered/``."""
    page = (ROOT / "docs" / "how-it-works.md").read_text(encoding="utf-8")
    section = page.split("\n## The modules\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    names: set[str] = set()
    for row in rows[2:]:  # past the header and its rule
        module_cell = row.split("|")[2]
        names.update(re.findall(r"`([\w/*.]+\.(?:py|lua))`", module_cell))
    return names


def package_modules() -> set[str]:
    """Every Python module of the package, and its Lua scripts as one glob."""
    modules = {str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")}
    # Subpackages' __init__ files only collect their modules: the table lists those.
    modules -= {"redis/__init__.py", "contrib/__init__.py"}
    if list((PACKAGE / "redis" / "lua").glob("*.lua")):
        modules.add("redis/lua/*.lua")
    return modules


def test_the_module_map_names_every_module_and_no_other() -> None:
    mapped = mapped_modules()
    actual = package_modules()
    assert sorted(actual - mapped) == [], "modules missing from docs/how-it-works.md"
    assert sorted(mapped - actual) == [], "modules in docs/how-it-works.md that do not exist"


def test_the_stream_parts_do_not_import_the_stream() -> None:
    # The stream builds its parts; they must not reach back into it.
    for part in ("producer.py", "consumer.py"):
        source = (PACKAGE / part).read_text(encoding="utf-8")
        assert not re.search(r"^from \.(stream|maps|consumer|producer) import", source, re.M), part
