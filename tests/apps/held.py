"""A plain function whose first run waits to be killed (run through ``celery_ordered.call``).

For tests that SIGKILL a worker's pool process in the middle of a task and
need to know it was in the middle: the run announces itself, then waits for
the kill.
"""

from __future__ import annotations

import functools
import os

import redis

#: Seconds a first run waits for its kill before it gives up (it then raises).
HOLD = 60

#: Seconds the notes of a run live in Redis.
NOTES_TTL = 300


@functools.cache
def _client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url)


def square_after_a_kill(x: int, redis_url: str, key: str) -> int:
    """``x * x``, but the first run of each ``x`` waits to be killed.

    Every run counts itself in the hash ``{key}:runs`` (field ``x``). The
    first one pushes ``"pid:x"`` to ``{key}:held`` and waits (up to
    :data:`HOLD` s, on a list nobody pushes to) for the test to SIGKILL its
    process; a later run returns at once.
    """
    client = _client(redis_url)
    runs = client.hincrby(f"{key}:runs", str(x), 1)
    client.expire(f"{key}:runs", NOTES_TTL)
    if runs == 1:
        client.rpush(f"{key}:held", f"{os.getpid()}:{x}")
        client.expire(f"{key}:held", NOTES_TTL)
        client.blpop([f"{key}:never"], timeout=HOLD)
        raise RuntimeError(f"run 1 of {x} was held {HOLD}s and nobody killed it")
    return x * x
