"""The Flask and FastAPI examples (examples/flask_app, examples/fastapi_app) set up
for tests: their Celery app on the tests' Redis and broker, on a queue of the
test module's own, and the worker their docs start."""

from __future__ import annotations

import contextlib
import importlib
import os
import uuid
from collections.abc import Iterator
from typing import Any

from examples.web_job import process
from tests.support.workers import example_worker


@contextlib.contextmanager
def configured_example(name: str, redis_url: str) -> Iterator[Any]:
    """The example module ``examples.<name>.app``, its ``celery_app`` pointed at the
    tests' Redis and broker and a queue of its own; its settings are put back after."""
    from celery import current_app

    previous_app = current_app._get_current_object()
    example = importlib.import_module(f"examples.{name}.app")
    conf = example.celery_app.conf
    saved = {key: conf.get(key) for key in ("broker_url", "ordered_redis_url")}
    saved["task_default_queue"] = conf.task_default_queue
    conf.update(
        broker_url=os.environ["CO_TEST_BROKER_URL"],
        ordered_redis_url=redis_url,
        task_default_queue=f"{name}-{uuid.uuid4().hex[:8]}",
    )
    try:
        yield example
    finally:
        conf.update(saved)
        previous_app.set_current()  # importing the example made its Celery app the current one


def environment(example: Any, redis_url: str) -> dict[str, str]:
    """The environment the example's worker and server run in: the tests' Redis and
    broker, and (``QUEUE``, read by the FastAPI example) the example's queue."""
    return {
        **os.environ,
        "REDIS_URL": redis_url,
        "BROKER_URL": os.environ["CO_TEST_BROKER_URL"],
        "QUEUE": example.celery_app.conf.task_default_queue,
    }


@contextlib.contextmanager
def running_example(name: str, redis_url: str) -> Iterator[Any]:
    """:func:`configured_example`, with ``celery -A examples.<name>.app:celery_app
    worker`` running as the example's docs start it (plus the tests' tasks), on the
    example's queue: yields the example module once the worker runs its job's task."""
    with configured_example(name, redis_url) as example, example_worker(
        f"{example.__name__}:celery_app", example.celery_app, process,
        "--include", "tests.apps.tasks", env=environment(example, redis_url),
    ):  # fmt: skip
        yield example
