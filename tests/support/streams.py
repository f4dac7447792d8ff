"""Reading what comes out of a stream, errors kept in their places."""

from __future__ import annotations

from typing import Any


def outcomes(iterator: Any) -> list[Any]:
    """Drain ``iterator``, keeping exceptions in place of the items that raised."""
    seen: list[Any] = []
    while True:
        try:
            seen.append(next(iterator))
        except StopIteration:
            return seen
        except Exception as exc:
            seen.append(exc)
