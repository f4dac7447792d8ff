"""Tasks the liveness tests (tests/test_liveness.py) run.

They keep their notes in the Redis named by ``redis_url`` (the tests' own),
under keys that start with the ``key`` the test gives: ``{key}:runs`` counts
the runs of each value, ``{key}:events`` lists ``"<event> <value> <node>"``
as runs start and end.
"""

from __future__ import annotations

import functools
import time
from typing import Any

import redis
from celery import current_task

from celery_ordered import ordered_task

#: The longest a held task waits for the test to release it.
HOLD = 120


@functools.cache
def _client(redis_url: str) -> redis.Redis:
    return redis.Redis.from_url(redis_url)


def _node() -> str:
    return str(current_task.request.hostname or "?")


def _note(client: redis.Redis, key: str, event: str, value: Any) -> None:
    client.rpush(f"{key}:events", f"{event} {value} {_node()}")


def _wait_for_gate(client: redis.Redis, key: str) -> None:
    """Wait until the test pushes to ``{key}:gate`` (at most :data:`HOLD` s).

    In slices of a second: a blocking read longer than the client's socket
    timeout would fail.
    """
    deadline = time.monotonic() + HOLD
    while time.monotonic() < deadline:
        if client.blpop([f"{key}:gate"], timeout=1) is not None:
            return


@ordered_task
def held_on(victims: str, redis_url: str, key: str, value: Any) -> list[Any]:
    """``[value, node]``: held on a node whose name starts with ``victims``, else at once.

    A run on a victim waits until the test pushes to ``{key}:gate`` (at most
    :data:`HOLD` s): the worker can be killed or frozen while it holds the
    task. A run elsewhere returns at once.
    """
    client = _client(redis_url)
    client.hincrby(f"{key}:runs", str(value), 1)
    _note(client, key, "start", value)
    if _node().startswith(victims):
        _wait_for_gate(client, key)
    _note(client, key, "end", value)
    return [value, _node()]


@ordered_task
def first_run_held(redis_url: str, key: str, value: Any) -> list[Any]:
    """``[value, node]``; the first run of each value waits for ``{key}:gate``.

    A straggler whose backup copy (hedging) finishes at once.
    """
    client = _client(redis_url)
    runs = client.hincrby(f"{key}:runs", str(value), 1)
    _note(client, key, "start", value)
    if runs == 1:
        _wait_for_gate(client, key)
    _note(client, key, "end", value)
    return [value, _node()]
