"""The public surface is what the README documents, and each part is documented."""

from __future__ import annotations

import inspect
import re

import celery_ordered
from celery_ordered.redis.protocol import SCRIPTS
from tests.support import ROOT


def documented_names() -> set[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## API", 1)[1].split("\n## ", 1)[0]
    names = set(re.findall(r"`([A-Za-z_]+)`", section))
    return names - {"celery_ordered", "parallel_queue", "TypeError", "__cause__"}


def test_all_is_what_the_readme_documents() -> None:
    assert set(celery_ordered.__all__) == documented_names()


def test_every_public_name_and_method_has_a_docstring() -> None:
    undocumented = []
    for name in celery_ordered.__all__:
        if name == "__version__":
            continue
        obj = getattr(celery_ordered, name)
        if not (obj.__doc__ or "").strip():
            undocumented.append(name)
        if inspect.isclass(obj):
            for attr, value in vars(obj).items():
                if attr.startswith("_") or not (callable(value) or isinstance(value, property)):
                    continue
                if not (value.__doc__ or "").strip():
                    undocumented.append(f"{name}.{attr}")
    assert undocumented == []


def test_errors_share_one_base_and_timeouts_are_queue_errors() -> None:
    import queue

    errors = [
        getattr(celery_ordered, name)
        for name in celery_ordered.__all__
        if name.endswith(("Error", "Full", "Empty", "Exhausted", "Failed", "Lost", "Unavailable"))
    ]
    assert all(issubclass(e, celery_ordered.OrderedStreamError) for e in errors)
    assert issubclass(celery_ordered.StreamEmpty, queue.Empty)
    assert issubclass(celery_ordered.StreamFull, queue.Full)
    assert issubclass(celery_ordered.UnsendableError, TypeError)


def test_version_matches_the_changelog_or_is_unreleased() -> None:
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert re.match(r"\d+\.\d+\.\d+", celery_ordered.__version__)
    assert "## [Unreleased]" in changelog or f"## [{celery_ordered.__version__}]" in changelog


def test_package_ships_its_scripts_and_type_marker() -> None:
    package = ROOT / "celery_ordered"
    assert (package / "py.typed").exists()
    lua = package / "redis" / "lua"
    # _prelude.lua is no script: protocol.py puts it in front of every one.
    assert (lua / "_prelude.lua").is_file()
    scripts = [p for p in lua.glob("*.lua") if not p.name.startswith("_")]
    assert {p.stem for p in scripts} == set(SCRIPTS)
    for script in scripts:
        header = script.read_text().split("\n\n")[0]
        assert "KEYS[1]" in header, f"{script.name} must name its keys in its header"
