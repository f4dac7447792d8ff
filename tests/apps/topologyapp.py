"""The Celery app of workers whose streams live on a topology under test.

``celery -A tests.apps.topologyapp:worker_app worker`` (see
:func:`tests.support.topologies.topology_worker`) reads the streams' Redis
from ``CO_TOPO_STORE_URL`` and extra settings, as JSON, from
``CO_TOPO_SETTINGS``; its broker is the tests' usual one.
:func:`topology_app` makes the same app for the test's own producers and
consumers.
"""

from __future__ import annotations

import json
import os
from typing import Any

from celery import Celery

#: Environment of a topology worker: the streams' Redis, and extra settings (JSON).
STORE_ENV = "CO_TOPO_STORE_URL"
SETTINGS_ENV = "CO_TOPO_SETTINGS"


def topology_app(store_url: str, queue: str, **settings: Any) -> Celery:
    """A Celery app on the tests' broker whose streams live at ``store_url``.

    The same configuration a topology worker gets (its ``settings`` too),
    for the test process's producers and consumers. ``broker_url`` among the
    ``settings`` puts it on another broker.
    """
    app = Celery("topology", include=["tests.apps.tasks"], set_as_current=False)
    app.conf.update(
        {
            "broker_url": os.environ.get("CO_TEST_BROKER_URL", "redis://127.0.0.1:6379/13"),
            "result_backend": None,
            "ordered_redis_url": store_url,
            "task_default_queue": queue,
            "worker_prefetch_multiplier": 1,
            "worker_hijack_root_logger": False,
            "broker_connection_retry_on_startup": True,
            **settings,
        }
    )
    return app


def _worker_app() -> Celery:
    settings = json.loads(os.environ.get(SETTINGS_ENV) or "{}")
    return topology_app(os.environ.get(STORE_ENV, ""), "celery", **settings)


#: What ``celery -A tests.apps.topologyapp:worker_app worker`` runs.
worker_app = _worker_app()
