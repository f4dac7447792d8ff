"""The Celery app and tasks the benchmark worker runs.

Configured from the environment that ``benchmarks/run.py`` sets for itself,
its consumer subprocesses and its worker:

``BENCH_REDIS_URL``   redis-py URL: result backend and stream store
``BENCH_BROKER_URL``  kombu URL of the same Redis (the broker)
``BENCH_QUEUE``       the run's own queue, so no other worker takes its tasks
``BENCH_STREAM_URL``  redis-py URL of the streams, if not ``BENCH_REDIS_URL``
                      (``benchmarks/cost.py`` keeps them apart, to measure
                      the streams' own Redis work)
"""

from __future__ import annotations

import functools
import os
import time

import redis
from celery import Celery

from celery_ordered import ordered_task
from celery_ordered.redis.urls import socket_url

REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/14")
BROKER_URL = os.environ.get("BENCH_BROKER_URL", REDIS_URL)
QUEUE = os.environ.get("BENCH_QUEUE", "celery-ordered-bench")
STREAM_URL = os.environ.get("BENCH_STREAM_URL", REDIS_URL)


app = Celery("benchmarks", set_as_current=True)
app.conf.update(
    broker_url=BROKER_URL,
    # Celery spells the Redis backend on a unix socket redis+socket:///path.
    result_backend=socket_url(REDIS_URL, kombu=True),
    ordered_redis_url=STREAM_URL,
    task_default_queue=QUEUE,
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    # Celery's defaults otherwise; remote control off so the run creates no
    # pidbox keys in a shared Redis.
    worker_enable_remote_control=False,
    worker_send_task_events=False,
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
)


@functools.cache
def _client(url: str) -> redis.Redis:
    """One client per worker process."""
    return redis.Redis.from_url(url)


def _count(counter_key: str, done_key: str, total: int) -> None:
    client = _client(REDIS_URL)
    if client.incr(counter_key) == total:
        client.rpush(done_key, 1)


@app.task(ignore_result=True)
def count(counter_key: str, done_key: str, total: int) -> None:
    """INCR a counter; the task that brings it to ``total`` pushes to ``done_key``."""
    _count(counter_key, done_key, total)


@app.task(ignore_result=True, acks_late=True)
def count_late(counter_key: str, done_key: str, total: int) -> None:
    """:func:`count`, its message acknowledged after it ran, as an ordered task's is."""
    _count(counter_key, done_key, total)


@ordered_task(ignore_result=True)
def ordered_count(counter_key: str, done_key: str, total: int) -> int:
    """:func:`count` as an ordered task; returns ``total``."""
    _count(counter_key, done_key, total)
    return total


@app.task(ignore_result=True)
def sleep_count(counter_key: str, done_key: str, total: int, seconds: float) -> None:
    """Sleep ``seconds``, then :func:`count`: plain Celery's row of the fleet benchmark."""
    time.sleep(seconds)
    count(counter_key, done_key, total)


@app.task
def noop(x: int) -> int:
    """A trivial plain Celery task."""
    return x


@app.task
def sleep(seconds: float) -> float:
    """A plain Celery task that sleeps ``seconds``."""
    time.sleep(seconds)
    return seconds


@ordered_task
def ordered_noop(x: int) -> int:
    """A trivial ordered task."""
    return x


@ordered_task
def ordered_sleep(seconds: float) -> float:
    """An ordered task that sleeps ``seconds``."""
    time.sleep(seconds)
    return seconds


@ordered_task
def ordered_stamp(x: int) -> float:
    """An ordered task whose value is the wall-clock time just before it returns."""
    return time.time()


@app.task
def stamp(x: int) -> float:
    """A plain Celery task whose value is the wall-clock time just before it returns."""
    return time.time()


def square(x: int) -> int:
    """The trivial function of the multiprocessing rows."""
    return x * x
