"""A Celery worker that serves Prometheus metrics of the streams in its Redis.

Needs ``pip install 'celery-ordered[metrics]'`` and a Redis (broker and
stream store). From the repository root:

    CO_METRICS_PORT=9808 celery -A examples.metrics_worker worker --loglevel=INFO   # terminal 1
    python -m examples.metrics_worker                                               # terminal 2
    curl -s http://127.0.0.1:9808/metrics | grep celery_ordered_stream              # terminal 3

When the worker is ready, a ``worker_ready`` signal handler starts an HTTP
server on ``CO_METRICS_PORT`` (``CO_METRICS_ADDR`` picks the address; default
127.0.0.1, ``0.0.0.0`` lets Prometheus scrape it from another machine). It
runs in the worker's main process, beside the pool, and reports every stream
of the worker's Redis at each scrape. Terminal 2 runs a slow job to watch.

``REDIS_URL`` picks another Redis (default: redis://127.0.0.1:6379/0),
``BROKER_URL`` another broker (default: that Redis), and ``QUEUE`` another
queue than Celery's default (the same in every terminal).
"""

from __future__ import annotations

import logging
import os
import random
import sys
import time
from typing import Any

from celery import Celery
from celery.signals import worker_ready, worker_shutdown

from celery_ordered import OrderedResultStream, ordered_task
from celery_ordered.metrics import MetricsServer, start_metrics_server

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
BROKER_URL = os.environ.get("BROKER_URL", REDIS_URL)

app = Celery("metrics_worker", broker=BROKER_URL)
app.conf.ordered_redis_url = REDIS_URL
app.conf.task_default_queue = os.environ.get("QUEUE", "celery")

logger = logging.getLogger(__name__)

#: The metrics server of this worker, once it is ready (None elsewhere).
metrics_server: MetricsServer | None = None


@worker_ready.connect
def serve_metrics(sender: Any = None, **_: Any) -> None:
    """Start the metrics server once the worker is ready, if ``CO_METRICS_PORT`` says where."""
    global metrics_server
    port = os.environ.get("CO_METRICS_PORT")
    if not port:
        return
    addr = os.environ.get("CO_METRICS_ADDR", "127.0.0.1")
    metrics_server = start_metrics_server(int(port), addr, app=sender.app)
    logger.warning("celery-ordered metrics at %s", metrics_server.url)


@worker_shutdown.connect
def stop_metrics(**_: Any) -> None:
    """Stop the metrics server with the worker."""
    if metrics_server is not None:
        metrics_server.close()


# Named, so that terminal 2 (this module run as __main__) sends the task the worker knows.
@ordered_task(name="examples.metrics_worker.process")
def process(item: int, seconds: float | None = None) -> dict[str, Any]:
    """One item of uneven work (``seconds`` long, else 0.05 to 0.5 s)."""
    if seconds is None:
        seconds = random.choice([0.05, 0.1, 0.5])
    time.sleep(seconds)
    return {"item": item, "seconds": seconds, "worker": os.getpid()}


def main(items: int = 200) -> None:
    """Run a slow job on a named stream, so its metrics have something to show."""
    stream = OrderedResultStream(app, "metrics-example", window=20)
    try:
        for done, outcome in enumerate(stream.map(process, range(items)), start=1):
            if done % 20 == 0:
                print(f"{done} items done, the last by process {outcome['worker']}")
    finally:
        stream.delete()


if __name__ == "__main__":
    main(*(int(arg) for arg in sys.argv[1:]))
