"""Quickstart: results of parallel Celery tasks, in the order they were put.

Needs a Redis (broker and stream store) and a worker. From the repository root:

    celery -A examples.quickstart worker --loglevel=INFO     # terminal 1
    python -m examples.quickstart                            # terminal 2

``REDIS_URL`` picks another Redis (default: redis://127.0.0.1:6379/0),
``BROKER_URL`` another broker (default: that Redis), and ``QUEUE`` another
Celery queue (default: ``celery``) for both commands.
"""

from __future__ import annotations

import os
import random
import sys
import threading
import time

from celery import Celery

from celery_ordered import OrderedResultStream, ordered_task

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
BROKER_URL = os.environ.get("BROKER_URL", REDIS_URL)

app = Celery("quickstart", broker=BROKER_URL)
app.conf.ordered_redis_url = REDIS_URL
app.conf.task_default_queue = os.environ.get("QUEUE", "celery")


# The name is explicit: run as ``python -m examples.quickstart`` this module
# is ``__main__``, and Celery would name the task after that here but after
# ``examples.quickstart`` in the worker, which would not know it.
@ordered_task(name="examples.quickstart.render")
def render(page: int) -> str:
    """Pretend to render a page: uneven work, so tasks finish out of order."""
    time.sleep(random.uniform(0.0, 0.05))
    return f"page {page:3} rendered by worker process {os.getpid()}"


def main(pages: int = 40, batch: int = 10) -> None:
    """Render ``pages`` pages in parallel; print them, and each batch, in order."""
    stream = OrderedResultStream(app, window=16)

    def produce() -> None:
        with stream:  # closes the stream when done
            for page in range(pages):
                stream.put(render, page)
                if page % batch == batch - 1:
                    stream.put(f"--- pages {page - batch + 1}-{page} done ---")  # a marker

    threading.Thread(target=produce, daemon=True).start()
    try:
        for line in stream:
            print(line)
    finally:
        stream.delete()


if __name__ == "__main__":
    main(*(int(arg) for arg in sys.argv[1:]))
