"""The Celery app the tests and their worker processes share.

Its Redis comes from the environment that ``tests/conftest.py`` sets up: the
machine's Redis when one answers, else a private embedded one.
"""

from __future__ import annotations

import os

from celery import Celery

REDIS_URL = os.environ.get("CO_TEST_REDIS_URL", "redis://127.0.0.1:6379/13")
BROKER_URL = os.environ.get("CO_TEST_BROKER_URL", REDIS_URL)
QUEUE = os.environ.get("CO_TEST_QUEUE", "celery-ordered-tests")

app = Celery("tests", include=["tests.apps.tasks", "tests.apps.liveness_tasks"])
app.conf.update(
    broker_url=BROKER_URL,
    result_backend=None,
    ordered_redis_url=REDIS_URL,
    task_default_queue=QUEUE,
    worker_prefetch_multiplier=1,
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
)
