"""The one check for what a test needs beyond Python and the tests' Redis.

A missing program or server skips the test, unless ``CO_REQUIRE_TOOLS=1``
(CI, which installs and starts everything): then it fails the test.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable

import pytest


def require_tool(name: str, why: str, *, find: Callable[[str], str | None] = shutil.which) -> str:
    """What ``find(name)`` finds (by default the path of program ``name``).

    When it finds nothing the test is skipped, saying ``name`` is missing and
    ``why`` the test needs it; under ``CO_REQUIRE_TOOLS=1`` it fails instead.
    ``find`` may look for something other than a program: a server that
    answers (its URL), a capability of the machine.
    """
    found = find(name)
    if found is None:
        message = f"{name} is not available ({why})"
        if os.environ.get("CO_REQUIRE_TOOLS") == "1":
            pytest.fail(message + "; CO_REQUIRE_TOOLS=1 requires it")
        pytest.skip(message)
    return found
