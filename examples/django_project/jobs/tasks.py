"""The work of a job, run by the Celery workers."""

import os
import time
from typing import Any

from celery_ordered import ordered_task


@ordered_task(name="jobs.process")
def process(item: int, seconds: float) -> dict[str, Any]:
    """One item of work: uneven, so later items often finish first."""
    time.sleep(seconds)
    if item and item % 13 == 0:
        raise ValueError(f"item {item} is unlucky")
    return {"item": item, "seconds": seconds, "worker": os.getpid()}
