"""Plain functions that workers on separate hosts run for tests/test_hosts.py.

Run through ``celery_ordered.call`` by workers of ``tests.apps.celeryapp`` started
in network namespaces (tests/support/netns.py). They keep their notes in the Redis
their worker reaches (the app's ``ordered_redis_url``, over the host's link),
under keys that start with the ``key`` the test gives.
"""

from __future__ import annotations

import functools
import os
import time
from typing import Any

import redis
from celery import current_task

#: How long a task waits for the test (a meeting partner, a gate) before giving up.
WAIT = 30


@functools.cache
def _client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url)


def _pop(client: redis.Redis, key: str) -> Any:
    """BLPOP ``key`` for up to :data:`WAIT` s, in one-second slices.

    One blocking read of ``WAIT`` s would outlast the client's socket timeout
    (5 s in redis-py 8) and fail while the host is cut off; a slice that
    fails that way counts as "nothing yet".
    """
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        try:
            popped = client.blpop([key], timeout=1)
        except (redis.ConnectionError, redis.TimeoutError):
            time.sleep(0.2)  # a backoff while the link is down, not a synchronisation
            continue
        if popped is not None:
            return popped
    return None


def visit(x: int, key: str, *, meet: str | None = None, hold: str | None = None) -> list[Any]:
    """``[x, host, netns inode]``: which host ran ``x``, and in which network namespace.

    The host is the first part of the worker's node name (``host-a@...``);
    the inode is that of ``/proc/self/ns/net``, which names the network
    namespace the process really runs in. Each start is noted as
    ``"host x"`` on ``{key}:started``.

    ``meet``: a meeting point for two tasks: the first to arrive waits until a
    second arrives (TimeoutError after ``WAIT`` s). Two workers of one process
    each can only both arrive if they are on different hosts, so two tasks
    meeting proves two hosts worked at once.

    ``hold``: a host name. The first task to start on that host holds: it
    pushes ``x`` to ``{key}:holding``, waits for a push to ``{key}:gate``,
    then notes ``"host x"`` on ``{key}:released`` and returns. The test thus
    knows a task is in progress on that host, and ends it when it likes.
    """
    host = str(current_task.request.hostname).split("@")[0]
    client = _client(current_task.app.conf.ordered_redis_url)
    client.rpush(f"{key}:started", f"{host} {x}")
    if meet is not None:
        point = f"{key}:meet:{meet}"
        if client.incr(f"{point}:arrived") == 1:
            if _pop(client, f"{point}:go") is None:
                raise TimeoutError(f"{host} waited {WAIT}s at {meet!r}; no other host came")
        else:
            client.rpush(f"{point}:go", host)
    if hold == host and client.set(f"{key}:held", x, nx=True):
        client.rpush(f"{key}:holding", x)
        if _pop(client, f"{key}:gate") is None:
            raise TimeoutError(f"{host} held {x} for {WAIT}s; the test never let it go")
        client.rpush(f"{key}:released", f"{host} {x}")
    return [x, host, os.stat("/proc/self/ns/net").st_ino]
