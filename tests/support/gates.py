"""Streams whose outcomes the test holds back: a gate (tests.apps.tasks.gate) at one place."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from tests.apps.tasks import echo, gate


def gated_stream(
    make_stream: Callable[..., Any],
    redis_url: str,
    key: str,
    values: Sequence[str],
    held: int,
    *,
    close: bool = True,
) -> Any:
    """A stream of ``values``, each a task's result, whose position ``held`` arrives only
    once the test pushes to the Redis list ``key``; closed unless ``close=False``."""
    stream = make_stream()
    for position, value in enumerate(values):
        if position == held:
            stream.put(gate, redis_url, key, value)
        else:
            stream.put(echo, value)
    if close:
        stream.close()
    return stream
