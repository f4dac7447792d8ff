"""A job: its tasks and a marker after each batch, put in order by a producer thread."""

import random
import threading
from typing import Any

from project.celery import app as celery_app

from celery_ordered import OrderedResultStream, StreamClosedError

from .tasks import process

#: How many tasks a job runs ahead of its consumer.
WINDOW = 16


def start_job(items: int, batch: int, **stream_options: Any) -> OrderedResultStream:
    """Start a job of ``items`` tasks in batches of ``batch``; return its stream."""
    stream = OrderedResultStream(celery_app, window=WINDOW, **stream_options)
    threading.Thread(
        target=produce, args=(stream, items, batch), name=stream.name, daemon=True
    ).start()
    return stream


def produce(stream: OrderedResultStream, items: int, batch: int) -> None:
    """Put every task, and a marker after each batch; then close the stream."""
    try:
        with stream:
            for item in range(items):
                stream.put(process, item, random.choice([0.01, 0.05, 0.1, 0.3]))
                if item % batch == batch - 1 or item == items - 1:
                    first = item - item % batch
                    stream.put({"marker": f"batch {item // batch} done: items {first}-{item}"})
    except StreamClosedError:
        pass  # its consumer left and closed it: the job stops here
