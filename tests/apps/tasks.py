"""Tasks the tests run on real worker processes."""

from __future__ import annotations

import functools
import os
import time
from typing import Any

import redis
from celery import shared_task

from celery_ordered import OrderedTask, ordered_task


@functools.cache
def _client(redis_url: str) -> redis.Redis:
    """One client per URL per worker process.

    No socket timeout: :func:`gate` blocks in BLPOP for as long as the test
    holds it (redis-py 8 reads with a 5 s timeout by default).
    """
    return redis.Redis.from_url(redis_url, socket_timeout=None)


class CustomError(Exception):
    """An exception class of the tests' own, rebuilt in the consumer."""


class NeedsTwoArgs(Exception):
    """An exception whose constructor cannot be called with its args alone."""

    def __init__(self, code: int, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code


@ordered_task
def echo(value: Any) -> Any:
    """Return ``value``."""
    return value


@ordered_task
def sleep_echo(value: Any, seconds: float) -> Any:
    """Wait ``seconds``, then return ``value`` (the work of uneven tasks)."""
    time.sleep(seconds)
    return value


@ordered_task
def fail(message: str) -> None:
    """Raise CustomError(message)."""
    raise CustomError(message)


@ordered_task
def fail_redis_error(message: str) -> None:
    """Raise redis.ConnectionError(message): a task whose own Redis (a cache) is down."""
    raise redis.ConnectionError(message)


@ordered_task
def fail_value_error(message: str) -> None:
    """Raise ValueError(message)."""
    raise ValueError(message)


@ordered_task
def fail_two_args(code: int) -> None:
    """Raise an exception that cannot be rebuilt from its args."""
    raise NeedsTwoArgs(code, "detail")


@ordered_task
def unencodable_result() -> object:
    """Return something JSON cannot encode."""
    return object()


@ordered_task
def pid() -> int:
    """The worker process's pid."""
    return os.getpid()


@ordered_task
def record_start(
    redis_url: str, progress_key: str, log_key: str, index: int, seconds: float
) -> int:
    """Log how far the consumer had got when this task started, then work.

    The consumer stores how many results it has taken in ``progress_key``;
    this task appends ``"index:progress"`` to ``log_key`` as it starts, so a
    test can check the window from the worker's side.
    """
    client = _client(redis_url)
    progress = int(client.get(progress_key) or 0)
    client.rpush(log_key, f"{index}:{progress}")
    time.sleep(seconds)
    return index


def plain_add(x: int, y: int = 0) -> int:
    """A plain top-level function, run by celery_ordered.call."""
    return x + y


def plain_fail(message: str) -> None:
    """A plain function that raises KeyError."""
    raise KeyError(message)


def inverse_or_fail(x: int) -> float:
    """1/x, or CustomError for x == 0 (a plain top-level function)."""
    if x == 0:
        raise CustomError(f"no inverse of {x}")
    return 1 / x


@ordered_task
def gate(redis_url: str, key: str, value: Any, seconds: float = 30) -> Any:
    """Wait until the test pushes to ``key`` (a Redis list), then return ``value``.

    A task that finishes exactly when the test says so: the test holds a
    number in flight as long as it needs, without sleeping. Raises
    TimeoutError if the test never releases it within ``seconds``.
    """
    if _client(redis_url).blpop([key], timeout=seconds) is None:
        raise TimeoutError(f"gate {key} was not opened within {seconds}s")
    return value


@shared_task
def plain_celery_add(x: int, y: int) -> int:
    """An ordinary Celery task (not @ordered_task): streams must refuse it."""
    return x + y


class Holder:
    """A class whose methods are not plain functions (for refused puts)."""

    def method(self, x: int) -> int:
        return x

    @staticmethod
    def static(x: int) -> int:
        return x


@ordered_task
def die_once(redis_url: str, key: str, value: Any) -> Any:
    """Kill this worker process the first time it runs (per ``key``), then return ``value``.

    The process dies mid-task, as on an OOM kill; the task's message must run
    again for the stream to get an outcome at this number.
    """
    if _client(redis_url).set(key, 1, nx=True, ex=120):
        os._exit(1)
    return value


@ordered_task
def check_positive(x: int) -> int:
    """Return ``x``, or raise ValueError when it is negative."""
    if x < 0:
        raise ValueError(f"{x} is negative")
    return x


# The executor's chunk task (celery_ordered.executor.chunk) must be registered on
# the workers; redundant once celery_ordered/__init__.py imports the executor.
import celery_ordered.executor  # noqa: E402,F401


@ordered_task
def keywords(**kwargs: Any) -> Any:
    """Return the keyword arguments it got (``timeout`` included)."""
    return kwargs


@ordered_task(bind=True)
def request_seen(self: Any, value: Any) -> list[Any]:
    """What the task saw of its call, with ``value``.

    ``[value, its request's args, called directly?, is it Celery's current
    task?, its request's id]``.
    """
    from celery import current_task

    return [
        value,
        list(self.request.args or ()),
        bool(self.request.called_directly),
        current_task is not None and current_task.name == self.name,
        self.request.id,
    ]


@ordered_task(bind=True)
def mark_request(self: Any, value: Any) -> bool:
    """Whether this call's request already had the mark a call leaves on it."""
    marked = bool(getattr(self.request, "co_test_mark", False))
    self.request.co_test_mark = True
    return marked


class Tagging(OrderedTask):
    """A base with its own ``__call__``, as apps that open a context around each call have."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return ["tagged", super().__call__(*args, **kwargs)]


@ordered_task(base=Tagging)
def tagged_echo(value: Any) -> Any:
    """Return ``value`` (its base tags each call's return value)."""
    return value
