"""Waiting for a condition under a deadline, never for a fixed time."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import redis

#: Seconds anything started by the tests (a server, a topology) may take to
#: start, or to change state when told to.
DEFAULT_TIMEOUT = 60.0

#: How long :func:`wait_until` sleeps between two checks.
POLL = 0.02

_T = TypeVar("_T")


class WaitTimeout(RuntimeError):
    """A condition :func:`wait_until` waited for did not come true in time."""


def wait_until(
    check: Callable[[], _T],
    what: str,
    timeout: float = DEFAULT_TIMEOUT,
    *,
    error: type[Exception] = WaitTimeout,
) -> _T:
    """Poll ``check`` until it returns something true; return that.

    Raises ``error`` (:class:`WaitTimeout` by default) naming ``what`` after
    ``timeout`` seconds. Errors of ``check`` that a server still starting
    gives (Redis and OS errors) count as "not yet".
    """
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while True:
        try:
            value = check()
        except (redis.RedisError, OSError) as exc:
            last, value = exc, None  # type: ignore[assignment]
        if value:
            return value
        if time.monotonic() > deadline:
            raise error(f"{what}: not within {timeout:g}s (last error: {last!r})")
        time.sleep(POLL)
