"""docs/guarantees.md names, for each promise, tests that exist."""

from __future__ import annotations

import re

from tests.support import ROOT
from tests.test_docs import defined_tests

#: ``test_x.py::test_name`` as the page cites a test (``tests/`` prefix optional).
CITED = re.compile(r"`(?:tests/)?(test_\w+\.py)::(\w+)`")


def test_every_test_the_guarantees_page_cites_exists() -> None:
    page = (ROOT / "docs" / "guarantees.md").read_text(encoding="utf-8")
    cited = CITED.findall(page)
    assert len(cited) >= 20
    missing = [
        f"{path}::{name}"
        for path, name in cited
        if not (ROOT / "tests" / path).is_file() or name not in defined_tests(ROOT / "tests" / path)
    ]
    assert missing == [], f"docs/guarantees.md cites tests that do not exist: {missing}"
