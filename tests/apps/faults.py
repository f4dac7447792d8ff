"""Plain functions for the fault-injection tests, run through celery_ordered.call."""

from __future__ import annotations

import os
import time

import redis


def tracked_square(x: int, seconds: float, redis_url: str, key: str) -> int:
    """Square ``x`` slowly, noting which process runs it and how often it ran.

    ``{key}:started`` gets ``"pid:x"`` as each run starts; ``{key}:runs``
    counts how many times each number started.
    """
    client = redis.Redis.from_url(redis_url)
    client.hincrby(f"{key}:runs", str(x), 1)
    client.rpush(f"{key}:started", f"{os.getpid()}:{x}")
    time.sleep(seconds)
    return x * x


def square(x: int) -> int:
    """Square ``x``."""
    return x * x


def slow_square(x: int, seconds: float) -> int:
    """Square ``x`` after ``seconds``."""
    time.sleep(seconds)
    return x * x


def where(x: int) -> list[object]:
    """``[x, this worker's node name]``, after 20 ms of work."""
    from celery import current_task

    time.sleep(0.02)  # work that keeps a node busy, so the other takes the next
    return [x, current_task.request.hostname]
