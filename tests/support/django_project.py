"""The Django example project (examples/django_project), set up for tests.

Shared by tests/test_django.py and tests/test_django_browser.py: Django is
configured once per process from the project's settings, pointed at the
tests' Redis, and ``celery -A project worker`` runs as the project's README
starts it, on a queue of the caller's own.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support import ROOT
from tests.support.workers import Worker, example_worker

EXAMPLE = ROOT / "examples" / "django_project"


@contextlib.contextmanager
def configured_project(redis_url: str, queue_prefix: str) -> Iterator[Any]:
    """Django set up with the example project's settings; yields its Celery app.

    The app's tasks go to a queue named ``queue_prefix-<random>``.
    """
    import django
    from celery import current_app

    previous_app = current_app._get_current_object()
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(EXAMPLE))  # the project's modules: project, jobs
        with pytest.MonkeyPatch.context() as env:
            # Read once, as the settings load; not left for worker processes to inherit.
            env.setenv("DJANGO_SETTINGS_MODULE", "project.settings")
            env.setenv("REDIS_URL", redis_url)
            env.setenv("BROKER_URL", os.environ["CO_TEST_BROKER_URL"])
            django.setup()
        from project.celery import app as celery_app

        saved_queue = celery_app.conf.task_default_queue
        celery_app.conf.task_default_queue = f"{queue_prefix}-{uuid.uuid4().hex[:8]}"
        try:
            yield celery_app
        finally:
            celery_app.conf.task_default_queue = saved_queue
            previous_app.set_current()  # Celery("project") made itself the current app


@contextlib.contextmanager
def project_worker(project: Any, redis_url: str, *extra_args: str) -> Iterator[Worker]:
    """``celery -A project worker`` on the project app's queue, once it answers."""
    from jobs.tasks import process

    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "DJANGO_SETTINGS_MODULE": "project.settings",
        "REDIS_URL": redis_url,
        "BROKER_URL": os.environ["CO_TEST_BROKER_URL"],
    }
    with example_worker("project", project, process, *extra_args, cwd=EXAMPLE, env=env) as worker:
        yield worker
