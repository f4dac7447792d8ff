"""A job: its tasks and a marker after each batch, put in order by a producer thread."""

import logging
import random
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from project.celery import app as celery_app

from celery_ordered import OrderedResultStream, StreamClosedError, StreamFull

from .tasks import process

#: How many tasks a job runs ahead of its consumer.
WINDOW = 16
#: A job nobody follows for this long (seconds) is abandoned: its producer stops.
ABANDON_AFTER = 600.0

#: What a job puts, given its number of items and its batch size.
Job = Callable[[int, int], Iterable[Any]]

logger = logging.getLogger(__name__)


def demo_job(items: int, batch: int) -> Iterator[Any]:
    """The example's job: uneven tasks, and a marker after each batch."""
    for item in range(items):
        yield process.s(item, random.choice([0.01, 0.05, 0.1, 0.3]))
        if item % batch == batch - 1 or item == items - 1:
            first = item - item % batch
            yield {"marker": f"batch {item // batch} done: items {first}-{item}"}


def start_job(
    items: int, batch: int, *, job: Job = demo_job, **stream_options: Any
) -> OrderedResultStream:
    """Start a job of ``items`` tasks in batches of ``batch``; return its stream.

    ``job(items, batch)`` says what it puts; ``stream_options`` go to the
    stream (``name=`` to serve it by name).
    """
    stream = OrderedResultStream(celery_app, window=WINDOW, **stream_options)
    threading.Thread(
        target=produce, args=(stream, job(items, batch)), name=stream.name, daemon=True
    ).start()
    return stream


def produce(stream: OrderedResultStream, work: Iterable[Any]) -> None:
    """Put everything ``work`` yields (tasks and markers); then close the stream."""
    try:
        with stream:  # closes the stream when the work is all put
            for entry in work:
                stream.put(entry, timeout=ABANDON_AFTER)
    except StreamFull:
        logger.warning("nobody followed job %s for %.0fs: abandoned", stream.name, ABANDON_AFTER)
        stream.delete()
    except StreamClosedError:
        pass  # its consumer left and closed it: the job stops here
