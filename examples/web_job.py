"""What the Flask and FastAPI examples run: a job of uneven tasks, and their page.

A job puts its tasks, and a ``{"marker": "batch k done"}`` after each batch,
into a named stream; items 13, 26... fail on purpose, so that each error
shows at its place while the job goes on. The page, ``job_page.html``, starts
a job and follows it live (the Django example serves the same page).
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from celery_ordered import ordered_task

#: How many tasks a job runs ahead of the page that follows it.
WINDOW = 16
#: A job nobody follows for this long (seconds) is abandoned: its producer stops.
ABANDON_AFTER = 600.0
#: The page of the web examples.
PAGE = Path(__file__).resolve().parent / "job_page.html"

#: What a job puts, given its number of items and its batch size.
Job = Callable[[int, int], Iterable[Any]]


@ordered_task(name="web_job.process")
def process(item: int, seconds: float) -> dict[str, Any]:
    """One item of work: uneven, so later items often finish first."""
    time.sleep(seconds)
    if item and item % 13 == 0:
        raise ValueError(f"item {item} is unlucky")
    return {"item": item, "seconds": seconds, "worker": os.getpid()}


def demo_job(items: int, batch: int) -> Iterator[Any]:
    """What a job puts, in order: its tasks, and a marker after each batch."""
    for item in range(items):
        yield process.s(item, random.choice([0.01, 0.05, 0.1, 0.4]))
        if item % batch == batch - 1 or item == items - 1:
            yield {"marker": f"batch {item // batch} done"}
